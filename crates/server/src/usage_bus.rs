//! Usage through the event bus, when `[bus] nats_url` is set: the gateway
//! publishes what it metered to JetStream (any number of gateways may), and
//! every instance's meter takes it from there exactly once
//! (`commons_bus::usage`). Without a bus, the gateway writes to the meter
//! directly (`gateway::MeterSink`).

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use commons_bus::usage::{Taken, UsageConfig, UsagePublisher, METER_WORKERS};
use commons_gateway::usage::UsageSink;
use commons_meter::Event;

use crate::AppState;

/// Events a gateway keeps while the bus does not take them; past this,
/// the oldest go, with a line saying so (as a node agent's usage does).
const HELD_AT_MOST: usize = 200_000;

/// The gateway's sink: each batch published, and kept until the stream
/// holds it.
pub struct PublishingSink {
    rt: tokio::runtime::Runtime,
    config: UsageConfig,
    source: String,
    /// Batch ids are `RUN/N`: unique across this gateway's restarts.
    run: String,
    next: u64,
    publisher: Option<UsagePublisher>,
    waiting: VecDeque<(String, Vec<Event>)>,
    held: usize,
    nodes: Arc<crate::nodes::Nodes>,
}

impl PublishingSink {
    pub fn new(
        config: UsageConfig,
        source: &str,
        nodes: Arc<crate::nodes::Nodes>,
    ) -> PublishingSink {
        PublishingSink {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the usage publisher's runtime starts"),
            config,
            source: source.to_string(),
            run: run_id(),
            next: 0,
            publisher: None,
            waiting: VecDeque::new(),
            held: 0,
            nodes,
        }
    }

    /// Publishes what waits, oldest first; stops at the first failure.
    fn flush(&mut self) {
        while let Some((id, events)) = self.waiting.front() {
            if self.publisher.is_none() {
                match self
                    .rt
                    .block_on(UsagePublisher::connect(&self.config, &self.source))
                {
                    Ok(p) => self.publisher = Some(p),
                    Err(e) => {
                        tracing::warn!(error = %e, held = self.held, "usage waits for the bus");
                        return;
                    }
                }
            }
            let publisher = self.publisher.as_ref().expect("connected above");
            if let Err(e) = self.rt.block_on(publisher.publish(id, events)) {
                tracing::warn!(error = %e, held = self.held, "usage waits for the bus");
                self.publisher = None;
                return;
            }
            self.held -= events.len();
            self.waiting.pop_front();
        }
    }
}

/// 16 random hex digits: this run of a gateway (or of an instance).
pub(crate) fn run_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).expect("the OS random number generator works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl UsageSink for PublishingSink {
    fn write(&mut self, mut events: Vec<Event>) {
        self.nodes.attribute(&mut events);
        self.held += events.len();
        self.waiting
            .push_back((format!("{}/{}", self.run, self.next), events));
        self.next += 1;
        while self.held > HELD_AT_MOST {
            let Some((_, dropped)) = self.waiting.pop_front() else {
                break;
            };
            self.held -= dropped.len();
            eprintln!(
                "{:>12} {} usage events dropped: the bus has not taken them and {HELD_AT_MOST} are held",
                "Warning",
                dropped.len()
            );
        }
        self.flush();
    }
}

/// Starts this instance's meter taking usage from the bus: on
/// [`METER_WORKERS`] threads of their own (the meter's stores block), each
/// with a connection to the meter's store of its own.
pub fn spawn_meter(state: Arc<AppState>, config: UsageConfig) {
    for worker in 0..METER_WORKERS {
        let own = state
            .meter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .another_connection();
        let mut meter = match own {
            Ok(meter) => Some(meter),
            Err(e) => {
                // The shared one still takes usage, taking turns with the API.
                tracing::warn!(error = %e, "the usage taker shares the API's meter");
                None
            }
        };
        let (state, config) = (state.clone(), config.clone());
        std::thread::Builder::new()
            .name(format!("commons-usage-{worker}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the usage consumer's runtime starts");
                rt.block_on(commons_bus::usage::consume(
                    config,
                    |events| {
                        let ingested = match meter.as_mut() {
                            Some(meter) => meter.ingest(&events, None),
                            None => state
                                .meter
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .ingest(&events, None),
                        };
                        match ingested {
                            Ok(_) => Taken::Committed,
                            Err(e) => Taken::Failed(e.to_string()),
                        }
                    },
                    Arc::new(AtomicBool::new(false)),
                ));
            })
            .expect("the usage consumer's thread starts");
    }
}
