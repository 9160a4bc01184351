//! Usage events through JetStream: gateways (any number of them) publish
//! what they metered, and the meter takes it exactly once.
//!
//! - **A message is a batch** of CloudEvents (`application/cloudevents-batch+json`),
//!   as a gateway's tap hands them over: acknowledgements cost one per
//!   batch, not one per event.
//! - **Published means kept**: [`UsagePublisher::publish`] returns once the
//!   stream has stored the batch (file storage), which is when a gateway
//!   may forget it. A batch it publishes again after a lost answer carries
//!   the same message id, and the server drops the copy.
//! - **Exactly once into the meter**: the consumer acknowledges a batch
//!   only after the meter committed it; a batch delivered again (the meter
//!   died before acknowledging it) meets the meter's own durable dedup by
//!   (source, id), so nothing is counted twice. The stream is a work queue:
//!   an acknowledged batch is gone from it.
//! - **Several meters** (one per platform instance) share one durable pull
//!   consumer; each batch goes to one of them.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use commons_meter::Event;
use futures_util::StreamExt;

use crate::{err, BusError};

/// Where usage goes: stream `NAME_USAGE`, subjects `name.usage.SOURCE`.
#[derive(Debug, Clone)]
pub struct UsageConfig {
    pub url: String,
    pub stream: String,
    pub subject: String,
    /// The durable consumer the meters share.
    pub consumer: String,
    /// The most a taker gives the meter in one transaction (bytes of the
    /// batches it fetched, [`FETCH_BYTES`] by default).
    pub fetch_bytes: usize,
}

impl UsageConfig {
    /// A platform named `name` (see [`crate::valid_name`]) on the NATS
    /// server at `url`.
    pub fn new(url: &str, name: &str) -> UsageConfig {
        UsageConfig {
            url: url.to_string(),
            stream: format!("{}_USAGE", name.to_ascii_uppercase()),
            subject: format!("{name}.usage"),
            consumer: "meter".into(),
            fetch_bytes: FETCH_BYTES,
        }
    }
}

/// The content type of a batch: CloudEvents' batched JSON format.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

async fn connect(url: &str) -> Result<jetstream::Context, BusError> {
    Ok(jetstream::new(crate::nats_client(url).await?))
}

/// The usage stream, made if missing.
pub async fn usage_stream(
    js: &jetstream::Context,
    config: &UsageConfig,
) -> Result<stream::Stream, BusError> {
    js.get_or_create_stream(stream::Config {
        name: config.stream.clone(),
        subjects: vec![format!("{}.>", config.subject)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| err("making the usage stream")(&e))
}

/// Waits, up to `limit`, until the meters have taken every batch the usage
/// stream holds (a work queue: a batch leaves it once acknowledged), so a
/// platform that stops has its last usage counted; whether they did.
pub async fn wait_taken(config: &UsageConfig, limit: Duration) -> Result<bool, BusError> {
    let js = connect(&config.url).await?;
    let mut stream = usage_stream(&js, config).await?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let info = stream
            .info()
            .await
            .map_err(|e| err("reading the usage stream")(&e))?;
        if info.state.messages == 0 {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A subject token for a source: what NATS allows in one, others as `_`.
fn token(source: &str) -> String {
    let t: String = source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() {
        "_".into()
    } else {
        t
    }
}

/// One gateway's (or any source's) way to the usage stream.
pub struct UsagePublisher {
    js: jetstream::Context,
    config: UsageConfig,
    subject: String,
    /// Message ids are `SOURCE/BATCH`: a batch published again keeps its id.
    source: String,
}

impl UsagePublisher {
    /// Connects (making the stream if missing) as `source`, a name unique
    /// among publishers (e.g. `gateway/HOST`).
    pub async fn connect(config: &UsageConfig, source: &str) -> Result<UsagePublisher, BusError> {
        let js = connect(&config.url).await?;
        usage_stream(&js, config).await?;
        Ok(UsagePublisher {
            js,
            subject: format!("{}.{}", config.subject, token(source)),
            config: config.clone(),
            source: source.to_string(),
        })
    }

    /// Stores `events` as the batch `batch` (unique to this source and
    /// publisher's run, e.g. `RUN/N`): returns once the stream holds it.
    /// The same `batch` again is a duplicate the server drops (within its
    /// two-minute window; the meter's dedup covers the rest).
    pub async fn publish(&self, batch: &str, events: &[Event]) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{}/{batch}", self.source).as_str());
        headers.insert("Content-Type", BATCH_CONTENT_TYPE);
        let body = serde_json::to_vec(events).expect("json");
        self.js
            .publish_with_headers(self.subject.clone(), headers, body.into())
            .await
            .map_err(|e| err("publishing usage")(&e))?
            .await
            .map_err(|e| err("publishing usage")(&e))?;
        Ok(())
    }

    pub fn config(&self) -> &UsageConfig {
        &self.config
    }
}

/// How many takers one instance's meter runs on the stream, each with a
/// connection and transactions of its own: while one's batch is in the
/// database, another's is fetched and decoded, and on PostgreSQL their
/// inserts go on at once. (Their totals' rows are taken in one order, so
/// they wait for each other there rather than deadlock.) Two measured best
/// on 2 cores (`bench/scale.sh`, `WORKERS=`): a third mostly waits for the
/// others' totals; more instances add more.
pub const METER_WORKERS: usize = 2;

/// The most one taker gives the meter in one transaction, in CloudEvents
/// JSON: about 200,000 events. A bound on what it holds decoded, and big
/// enough that each site's totals are written once for many of its events
/// (at 50,000 sites, 48 MiB took usage twice as fast as 24, `bench/scale.sh`).
pub const FETCH_BYTES: usize = 48 << 20;

/// What the meter said of a batch.
pub enum Taken {
    /// Committed (accepted, duplicates and events refused as invalid
    /// alike): acknowledge it.
    Committed,
    /// The meter's store failed: leave it for a later delivery.
    Failed(String),
}

/// Feeds the usage stream to `ingest` until `stop` is set, the batches of
/// each fetch together, acknowledging them once `ingest` committed them; connects again after any
/// failure. `ingest` runs on this task's thread (the meter's stores block).
pub async fn consume(
    config: UsageConfig,
    mut ingest: impl FnMut(Vec<Event>) -> Taken,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = consume_connected(&config, &mut ingest, &stop).await {
            eprintln!(
                "{:>12} taking usage from {}: {e}; again shortly",
                "Warning", config.url
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn consume_connected(
    config: &UsageConfig,
    ingest: &mut impl FnMut(Vec<Event>) -> Taken,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), BusError> {
    use std::sync::atomic::Ordering;
    let js = connect(&config.url).await?;
    let stream = usage_stream(&js, config).await?;
    let meter: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &config.consumer,
            consumer::pull::Config {
                durable_name: Some(config.consumer.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                // A meter that took a batch and died: it goes to another
                // (or the same, restarted) after this long.
                ack_wait: ACK_WAIT,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| err("making the meter's consumer")(&e))?;
    let mut fetch = MOST_FETCHED;
    while !stop.load(Ordering::Relaxed) {
        let fetched_at = std::time::Instant::now();
        let mut batches = meter
            .fetch()
            // The more a transaction takes, the less each event costs it:
            // its totals are a row per site and window, however many
            // events the site had. What waits is taken up to this much.
            .max_messages(fetch)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .map_err(|e| err("fetching usage")(&e))?;
        // The batches of one fetch go to the meter in one transaction (or
        // one per `fetch_bytes` of them): its cost is per transaction far
        // more than per event.
        let mut taken = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        let mut bytes = 0;
        while let Some(message) = batches.next().await {
            let message = message.map_err(|e| err("fetching usage")(&e))?;
            bytes += message.payload.len();
            match serde_json::from_slice::<Vec<Event>>(&message.payload) {
                Ok(batch) => events.extend(batch),
                // Not a batch of events: no delivery will make it one.
                Err(e) => eprintln!(
                    "{:>12} a usage message on {} is not a batch of events ({e}); dropped",
                    "Warning", message.subject
                ),
            }
            taken.push(message);
            if bytes >= config.fetch_bytes {
                if !hand_over(
                    ingest,
                    std::mem::take(&mut taken),
                    std::mem::take(&mut events),
                )
                .await?
                {
                    // The rest of this fetch is delivered again too.
                    break;
                }
                bytes = 0;
            }
        }
        if !taken.is_empty() {
            hand_over(ingest, taken, events).await?;
        }
        fetch = next_fetch(fetch, fetched_at.elapsed());
    }
    Ok(())
}

/// How long the stream waits for a batch's acknowledgement before it
/// delivers it again.
const ACK_WAIT: Duration = Duration::from_secs(10);

/// The most batches one fetch takes.
const MOST_FETCHED: usize = 256;

/// How many batches to fetch next, after a fetch of `fetch` took `took`
/// to be committed whole: every batch of it must be acknowledged within
/// [`ACK_WAIT`] of its delivery, or it is delivered again (to be found a
/// repeat, but its work done twice, on a meter already slow). So fewer
/// when it took half of that, more again when it took a fifth.
fn next_fetch(fetch: usize, took: Duration) -> usize {
    if took > ACK_WAIT / 2 {
        (fetch / 2).max(1)
    } else if took < ACK_WAIT / 5 {
        (fetch * 2).min(MOST_FETCHED)
    } else {
        fetch
    }
}

/// Gives `events` to the meter and acknowledges the batches they came in
/// once it committed them; whether it did.
async fn hand_over(
    ingest: &mut impl FnMut(Vec<Event>) -> Taken,
    taken: Vec<jetstream::Message>,
    events: Vec<Event>,
) -> Result<bool, BusError> {
    match ingest(events) {
        Taken::Committed => {
            for message in taken {
                message
                    .ack()
                    .await
                    .map_err(|e| err("acknowledging usage")(&e))?;
            }
            Ok(true)
        }
        Taken::Failed(why) => {
            // Delivered again after the ack wait; back off meanwhile.
            eprintln!("{:>12} the meter refused usage: {why}", "Warning");
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_meter_is_given_fewer_batches_at_once() {
        let slow = ACK_WAIT * 3 / 4;
        let quick = ACK_WAIT / 10;
        assert_eq!(next_fetch(256, slow), 128);
        assert_eq!(next_fetch(1, slow), 1, "one batch at least");
        assert_eq!(next_fetch(128, ACK_WAIT / 3), 128, "steady in between");
        assert_eq!(next_fetch(128, quick), 256);
        assert_eq!(next_fetch(256, quick), MOST_FETCHED);
    }

    #[test]
    fn names_and_subjects() {
        let c = UsageConfig::new("nats://127.0.0.1:4222", "commons");
        assert_eq!(c.stream, "COMMONS_USAGE");
        assert_eq!(c.subject, "commons.usage");
        assert_eq!(token("gateway/node-1.example"), "gateway_node-1_example");
        assert_eq!(token(""), "_");
    }
}
