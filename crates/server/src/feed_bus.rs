//! DataCommons' change feed across instances, when `[bus] nats_url` is
//! set: this instance tells the others the sequence number of every feed
//! event it commits, and hands its own subscribers, read from the shared
//! database, what the others committed (`commons_bus::feed`). Nothing of an
//! event but its number travels.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use commons_bus::feed::{FeedConfig, FeedPublisher};
use commons_data::service::DataCommons;

/// Starts relaying `commons`' commits to the bus (on `runtime`) and
/// following the others' (on a thread of its own: the service's reads
/// block).
pub fn spawn(runtime: &tokio::runtime::Handle, commons: DataCommons, config: FeedConfig) {
    let origin = crate::usage_bus::run_id();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<i64>();
    commons.relay_commits(move |seq| {
        let _ = tx.send(seq);
    });
    {
        let (config, origin) = (config.clone(), origin.clone());
        runtime.spawn(async move {
            let mut publisher: Option<FeedPublisher> = None;
            while let Some(seq) = rx.recv().await {
                if publisher.is_none() {
                    publisher = FeedPublisher::connect(&config, &origin).await.ok();
                }
                let Some(p) = &publisher else {
                    // Not kept, nor what queued meanwhile: the others'
                    // subscribers read them from the database when the
                    // next number shows them the gap.
                    let mut dropped = 1;
                    while rx.try_recv().is_ok() {
                        dropped += 1;
                    }
                    tracing::warn!(seq, dropped, "the data feed's bus is unreachable");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                };
                if let Err(e) = p.publish(seq).await {
                    tracing::warn!(seq, error = %e, "the data feed's bus refused an event");
                    publisher = None;
                }
            }
        });
    }
    let _ = std::thread::Builder::new()
        .name("commons-feed".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the feed follower's runtime starts");
            rt.block_on(commons_bus::feed::follow(
                config,
                origin,
                move |seq| {
                    if let Err(e) = commons.committed_elsewhere(seq) {
                        tracing::warn!(seq, error = %e, "reading another instance's feed event");
                    }
                },
                Arc::new(AtomicBool::new(false)),
                Arc::new(AtomicBool::new(false)),
            ));
        });
}
