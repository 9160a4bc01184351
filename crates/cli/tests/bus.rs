//! `commons serve` with `COMMONS_NATS_URL`: every change to the recorded
//! state reaches NATS JetStream (a real `nats-server -js`, started here on
//! loopback), as the store wrote it — a deploy's and a destroy's.

mod common;

use std::time::{Duration, Instant};

use common::*;

const SITE: &str = r#"name: hello
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
"#;

/// The (subject, key) of every message in the changes' stream.
fn published(url: &str, name: &str) -> Vec<(String, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let config = commons_bus::RelayConfig::new(url, name);
        let Ok(mut stream) = js.get_stream(&config.stream).await else {
            return Vec::new();
        };
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let m = stream.get_raw_message(seq).await.unwrap();
            let change: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            out.push((
                m.subject.to_string(),
                change["key"].as_str().unwrap_or("").to_string(),
            ));
        }
        out
    })
}

#[test]
fn a_platform_with_nats_publishes_every_change_of_its_state() {
    let s = Sandbox::new("bus");
    let nats = Nats::start(&s.dir.join("jetstream"));
    let url = nats.url.clone();
    let _server = s.serve(&[("COMMONS_NATS_URL", &url)]);
    s.blueprint(SITE);
    s.ok(&["deploy"]);
    let has = |subject: &str| {
        published(&url, s.bus_name())
            .iter()
            .any(|(sub, key)| sub == subject && key == "hello")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let subject = |kind: &str| format!("{}.changes.{kind}", s.bus_name());
    while !(has(&subject("deployment.put")) && has(&subject("run.finish"))) {
        assert!(
            Instant::now() < deadline,
            "the deploy's changes reach JetStream: {:?}",
            published(&url, s.bus_name())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = published(&url, s.bus_name()).len();
    s.ok(&["destroy", "hello"]);
    assert!(
        wait_for(Duration::from_secs(20), || published(&url, s.bus_name())
            .len()
            > before),
        "the destroy's changes too: {:?}",
        published(&url, s.bus_name())
    );
    drop(nats);
}
