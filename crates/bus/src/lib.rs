//! The event bus of a scaled-out platform: every change the state store
//! records (its outbox: numbered in commit order, written in the change's
//! own transaction) is published to a NATS JetStream stream, once.
//!
//! - Each change goes to `SUBJECT.KIND` (`commons.changes.deployment.put`,
//!   …) with its `rev` as the message id (`Nats-Msg-Id`), so a publish
//!   repeated after a lost acknowledgement is dropped by the server's
//!   duplicate window, and as a header (`Commons-Rev`).
//! - Where the relay resumes is read from the stream itself (the last
//!   message's rev), so it keeps no state and any instance may run it: a
//!   change is published only after every change before it was
//!   acknowledged, in order.
//! - A change the outbox no longer keeps (the relay was further behind than
//!   [`commons_store::CHANGES_KEPT`]) cannot be published; the gap is said,
//!   and consumers read the state whole, as they do when they start.

use std::sync::Arc;
use std::time::Duration;

pub mod acme;
pub mod feed;
pub mod routes;
pub mod usage;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use commons_store::{Change, StateStore};

/// Where the relay publishes.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The NATS server, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// The platform's name there.
    pub name: String,
    /// The stream's name.
    pub stream: String,
    /// Subjects are `SUBJECT.KIND`.
    pub subject: String,
}

/// The name a platform goes by on a bus it may share with others (as it
/// may share a PostgreSQL server under a schema of its own).
pub const DEFAULT_NAME: &str = "commons";

impl RelayConfig {
    /// A platform named `name` (see [`valid_name`]) on the NATS server at
    /// `url`: stream `NAME_CHANGES`, subjects `name.changes.KIND`.
    pub fn new(url: &str, name: &str) -> RelayConfig {
        RelayConfig {
            url: url.to_string(),
            name: name.to_string(),
            stream: format!("{}_CHANGES", name.to_ascii_uppercase()),
            subject: format!("{name}.changes"),
        }
    }
}

/// 1 to 32 lowercase letters, digits and `_`, starting with a letter: a
/// stream's name and one subject token, whatever the server's version.
pub fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The header holding a change's rev.
pub const REV_HEADER: &str = "Commons-Rev";

#[derive(Debug)]
pub struct BusError(pub String);

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BusError {}

/// A client of the NATS server at `url`, with the timeouts every part of
/// the bus uses.
pub(crate) async fn nats_client(url: &str) -> Result<async_nats::Client, BusError> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(url)
        .await
        .map_err(|e| err("connecting")(&e))
}

fn err(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> BusError {
    move |e| BusError(format!("{what}: {e}"))
}

/// The stream changes are published to, made if missing.
pub async fn changes_stream(
    js: &jetstream::Context,
    config: &RelayConfig,
) -> Result<stream::Stream, BusError> {
    js.get_or_create_stream(stream::Config {
        name: config.stream.clone(),
        subjects: vec![format!("{}.>", config.subject)],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| err("making the changes' stream")(&e))
}

/// The rev of the last change the stream holds (0 when empty).
pub async fn last_published(stream: &mut stream::Stream) -> Result<i64, BusError> {
    let info = stream
        .info()
        .await
        .map_err(|e| err("reading the stream")(&e))?;
    let last = info.state.last_sequence;
    if last == 0 {
        return Ok(0);
    }
    let message = stream
        .get_raw_message(last)
        .await
        .map_err(|e| err("reading the stream's last message")(&e))?;
    rev_of(&message.headers).ok_or_else(|| {
        BusError(format!(
            "message {last} of the stream carries no {REV_HEADER}"
        ))
    })
}

/// The rev a message carries.
pub fn rev_of(headers: &HeaderMap) -> Option<i64> {
    headers.get(REV_HEADER)?.as_str().parse().ok()
}

/// A change's subject: `SUBJECT.KIND`, a kind of anything but lowercase
/// letters, digits, `_` and `.` going as `other`.
fn subject(config: &RelayConfig, kind: &str) -> String {
    let fits = !kind.is_empty()
        && kind.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    format!("{}.{}", config.subject, if fits { kind } else { "other" })
}

/// Publishes the changes after `last`, in order, each once acknowledged
/// before the next; answers the rev of the last one published.
pub async fn publish_after(
    store: &Arc<dyn StateStore>,
    js: &jetstream::Context,
    config: &RelayConfig,
    last: i64,
) -> Result<i64, BusError> {
    let s = store.clone();
    let changes: Vec<Change> = tokio::task::spawn_blocking(move || s.changes_since(last, 1000))
        .await
        .map_err(|e| err("reading the outbox")(&e))?
        .map_err(|e| err("reading the outbox")(&e))?;
    let mut published = last;
    for change in changes {
        if change.rev != published + 1 {
            eprintln!(
                "{:>12} changes {} to {} are no longer in the outbox; consumers read the state whole",
                "Warning",
                published + 1,
                change.rev - 1
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", change.rev.to_string().as_str());
        headers.insert(REV_HEADER, change.rev.to_string().as_str());
        let body = serde_json::to_vec(&change).expect("json");
        js.publish_with_headers(subject(config, &change.kind), headers, body.into())
            .await
            .map_err(|e| err("publishing a change")(&e))?
            .await
            .map_err(|e| err("publishing a change")(&e))?;
        published = change.rev;
    }
    Ok(published)
}

/// Relays the outbox to JetStream until `stop` is set: connects (and
/// again after any failure), resumes after the stream's last change, and
/// publishes what comes, checking the store every `every`.
pub async fn relay(
    store: Arc<dyn StateStore>,
    config: RelayConfig,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = relay_connected(&store, &config, every, &stop).await {
            eprintln!(
                "{:>12} relaying changes to {}: {e}; again shortly",
                "Warning", config.url
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn relay_connected(
    store: &Arc<dyn StateStore>,
    config: &RelayConfig,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), BusError> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(Duration::from_secs(2)))
        .connect(config.url.as_str())
        .await
        .map_err(|e| err("connecting")(&e))?;
    let js = jetstream::new(client);
    let mut stream = changes_stream(&js, config).await?;
    let mut last = last_published(&mut stream).await?;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let s = store.clone();
        let now = tokio::task::spawn_blocking(move || s.revision())
            .await
            .map_err(|e| err("reading the outbox")(&e))?
            .map_err(|e| err("reading the outbox")(&e))?;
        if now > last {
            last = publish_after(store, &js, config, last).await?;
        } else {
            tokio::time::sleep(every).await;
        }
    }
    Ok(())
}

/// Opens the key-value bucket `bucket` on the NATS server at `url`, making
/// it if needed (values older than `max_age`, if set, expire). `up`, if
/// given, follows whether the connection is up (the client reconnects by
/// itself, and a watch goes on where it was).
pub(crate) async fn kv_bucket(
    url: &str,
    bucket: &str,
    description: &str,
    max_age: Option<std::time::Duration>,
    up: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> Result<async_nats::jetstream::kv::Store, BusError> {
    use std::sync::atomic::Ordering;
    let mut options =
        async_nats::ConnectOptions::new().connection_timeout(std::time::Duration::from_secs(5));
    if let Some(up) = up {
        options = options.event_callback(move |event| {
            let up = up.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => up.store(false, Ordering::SeqCst),
                    async_nats::Event::Connected => up.store(true, Ordering::SeqCst),
                    _ => {}
                }
            }
        });
    }
    let client = options
        .connect(url)
        .await
        .map_err(|e| err("connecting to NATS")(&e))?;
    let js = async_nats::jetstream::new(client);
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    // The bucket's stream, made as a key-value bucket's is (`KV_NAME`,
    // subjects `$KV.NAME.>`, one value per key): `create_key_value` asks
    // the server for account details a 2.9 server does not give.
    let made = js
        .get_or_create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(description.to_string()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age: max_age.unwrap_or_default(),
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| err("making a key-value bucket")(&e))?;
    drop(made);
    js.get_key_value(bucket)
        .await
        .map_err(|e| err("opening a key-value bucket")(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_become_subjects_and_odd_ones_go_as_other() {
        let c = RelayConfig::new("nats://127.0.0.1:4222", DEFAULT_NAME);
        assert_eq!(c.stream, "COMMONS_CHANGES");
        assert_eq!(
            subject(&c, "deployment.put"),
            "commons.changes.deployment.put"
        );
        assert_eq!(subject(&c, "run.finish"), "commons.changes.run.finish");
        for odd in ["", "a..b", "a b", "a.>", "*", "Upper"] {
            assert_eq!(subject(&c, odd), "commons.changes.other", "{odd:?}");
        }
    }

    #[test]
    fn platforms_sharing_a_server_keep_apart_by_name() {
        let c = RelayConfig::new("nats://127.0.0.1:4222", "tenant_2");
        assert_eq!(c.stream, "TENANT_2_CHANGES");
        assert_eq!(subject(&c, "run.finish"), "tenant_2.changes.run.finish");
        assert!(valid_name("commons") && valid_name("p1_x"));
        for bad in ["", "1a", "A", "a.b", "a b", "a>", &"a".repeat(33)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
