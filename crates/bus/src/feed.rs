//! DataCommons' change feed across instances: each instance publishes the
//! sequence number of every feed event it commits to the stream
//! `NAME_FEED`, and every instance follows it, reading what the others
//! committed from the shared database and handing it to its subscribers.
//!
//! Only sequence numbers travel: no record, key or account ever reaches the
//! bus, so what a user erases is gone from the database and nowhere else.
//! The stream is for live fan-out only and keeps messages a few minutes;
//! what an instance misses (its connection was down, it started later) its
//! subscribers read from the database anyway, since a subscription that
//! sees a gap in the sequence numbers replays from there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use futures_util::StreamExt;

use crate::{err, BusError};

/// Where feed events go: stream `NAME_FEED`, subject `name.feed`.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub url: String,
    pub stream: String,
    pub subject: String,
}

impl FeedConfig {
    /// A platform named `name` (see [`crate::valid_name`]) on the NATS
    /// server at `url`.
    pub fn new(url: &str, name: &str) -> FeedConfig {
        FeedConfig {
            url: url.to_string(),
            stream: format!("{}_FEED", name.to_ascii_uppercase()),
            subject: format!("{name}.feed"),
        }
    }
}

/// The header naming the instance that committed an event.
pub const ORIGIN_HEADER: &str = "Commons-Origin";

async fn connect(url: &str) -> Result<(async_nats::Client, jetstream::Context), BusError> {
    let client = crate::nats_client(url).await?;
    Ok((client.clone(), jetstream::new(client)))
}

async fn feed_stream(
    js: &jetstream::Context,
    config: &FeedConfig,
) -> Result<stream::Stream, BusError> {
    js.get_or_create_stream(stream::Config {
        name: config.stream.clone(),
        subjects: vec![config.subject.clone()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        // Live fan-out: the database keeps the feed's window.
        max_age: Duration::from_secs(300),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| err("making the feed stream")(&e))
}

/// One instance's way to the feed stream.
pub struct FeedPublisher {
    js: jetstream::Context,
    config: FeedConfig,
    origin: String,
}

impl FeedPublisher {
    /// Connects (making the stream if missing) as `origin`, a name unique
    /// among the platform's instances.
    pub async fn connect(config: &FeedConfig, origin: &str) -> Result<FeedPublisher, BusError> {
        let (_, js) = connect(&config.url).await?;
        feed_stream(&js, config).await?;
        Ok(FeedPublisher {
            js,
            config: config.clone(),
            origin: origin.to_string(),
        })
    }

    /// Says event `seq` was committed; returns once the stream holds it.
    /// The same `seq` again is dropped by the server.
    pub async fn publish(&self, seq: i64) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", seq.to_string().as_str());
        headers.insert(ORIGIN_HEADER, self.origin.as_str());
        self.js
            .publish_with_headers(self.config.subject.clone(), headers, seq.to_string().into())
            .await
            .map_err(|e| err("publishing a feed event")(&e))?
            .await
            .map_err(|e| err("publishing a feed event")(&e))?;
        Ok(())
    }
}

/// Hands `deliver` the sequence number of every event other instances
/// publish from now on (its own, `origin`'s, are left out: they were
/// delivered when committed), until `stop` is set; connects again after any
/// failure. `up` says whether it is following.
pub async fn follow(
    config: FeedConfig,
    origin: String,
    mut deliver: impl FnMut(i64) + Send,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = follow_once(&config, &origin, &mut deliver, &up, &stop).await {
            eprintln!(
                "{:>12} following the data feed: {e}; again shortly",
                "Warning"
            );
        }
        up.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn follow_once(
    config: &FeedConfig,
    origin: &str,
    deliver: &mut (impl FnMut(i64) + Send),
    up: &AtomicBool,
    stop: &AtomicBool,
) -> Result<(), BusError> {
    let (client, js) = connect(&config.url).await?;
    let stream = feed_stream(&js, config).await?;
    let consumer = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| err("following the feed stream")(&e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| err("following the feed stream")(&e))?;
    up.store(true, Ordering::SeqCst);
    while !stop.load(Ordering::Relaxed) {
        // Woken now and then to see whether to stop.
        let next = tokio::time::timeout(Duration::from_millis(200), messages.next()).await;
        let message = match next {
            Err(_) => continue,
            Ok(None) => return Err(BusError("the feed stream's consumer ended".into())),
            Ok(Some(m)) => m.map_err(|e| err("following the feed stream")(&e))?,
        };
        let own = message
            .headers
            .as_ref()
            .and_then(|h| h.get(ORIGIN_HEADER))
            .is_some_and(|o| o.as_str() == origin);
        let seq = std::str::from_utf8(&message.payload)
            .ok()
            .and_then(|s| s.parse::<i64>().ok());
        match seq {
            Some(seq) if !own => deliver(seq),
            Some(_) => {}
            None => eprintln!(
                "{:>12} a feed message is not a sequence number; skipped",
                "Warning"
            ),
        }
    }
    Ok(())
}
