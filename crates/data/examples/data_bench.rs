//! DataCommons figures on the embedded default (SQLite), for `bench/data.sh`.
//!
//! Usage: data_bench DIR [RECORDS]. Prints one line per figure with the
//! target and the anchor it is compared to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use commons_data::feed::Message;
use commons_data::service::{
    Action, AppCall, AppDecl, Class, CollectionDecl, DataCommons, Grantee, NoUsage, Viewer, WriteOp,
};
use serde_json::json;

const NSID: &str = "app.bench.entry";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: data_bench DIR [RECORDS]"));
    let records: usize = args
        .next()
        .map_or(100_000, |n| n.parse().expect("RECORDS is a number"));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let commons = DataCommons::open(&dir, Arc::new(NoUsage), 1_000_000).unwrap();
    let schema = json!({"lexicon": 1, "id": NSID, "defs": {"main": {"type": "record", "key": "any",
        "record": {"type": "object", "required": ["text"], "properties": {
            "text": {"type": "string", "maxLength": 1000},
            "score": {"type": "integer", "minimum": 0},
            "when": {"type": "string", "format": "datetime"}}}}}});
    commons
        .register_app(&AppDecl {
            app: "bench".into(),
            revision: "r1".into(),
            collections: vec![CollectionDecl {
                nsid: NSID.into(),
                class: Class::Private,
                licence: None,
                schema,
                purpose: "benchmark".into(),
                read: true,
                write: true,
                fields: None,
                indexed: Vec::new(),
            }],
        })
        .unwrap();
    commons.consent("user", "bench").unwrap();
    let call = AppCall {
        app: "bench".into(),
        user: "user".into(),
    };

    // A live subscriber, to time how soon a write is seen.
    let mut live = commons
        .subscribe(Viewer::App("bench".into()), None)
        .unwrap();

    // Writes: validation + sealing (private class) + signed MST commit + SQLite.
    let started = Instant::now();
    let mut written = Vec::with_capacity(records);
    for i in 0..records {
        let rkey = format!("k{i:08}");
        commons
            .create(&call, NSID, Some(&rkey), &json!({"$type": NSID, "text": format!("entry number {i}"), "score": i, "when": "2026-12-06T10:00:00Z"}))
            .unwrap();
        written.push(rkey);
    }
    let write_s = started.elapsed().as_secs_f64();
    let writes_per_s = records as f64 / write_s;
    println!("data writes (private: validate, seal, signed commit): {writes_per_s:.0}/s over {records} records (target >= 5000/s; Bluesky PDS allows ~1666 creates/hour: x{:.0})", writes_per_s / (1666.0 / 3600.0));

    // Live latency: one write at a time, time until the subscriber has it.
    let mut latencies = Vec::new();
    rt.block_on(async {
        // Drain what the bulk load queued (the subscriber lagged: it
        // catches up from the database).
        let mut seen = 0;
        while seen < records {
            if let Ok(Message::Event(_)) = live.next().await {
                seen += 1;
            }
        }
        for i in 0..500 {
            let t = Instant::now();
            commons
                .create(
                    &call,
                    NSID,
                    Some(&format!("live{i:04}")),
                    &json!({"$type": NSID, "text": "live"}),
                )
                .unwrap();
            match live.next().await.unwrap() {
                Message::Event(_) => latencies.push(t.elapsed()),
                Message::Info(_) => {}
            }
        }
    });
    latencies.sort();
    println!(
        "write visible to a live subscriber: p50 {:.2} ms, p99 {:.2} ms (target p99 <= 100 ms)",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );

    // Reads: grant check, tree lookup, block, open, filter, JSON.
    let reads = records.min(100_000);
    let started = Instant::now();
    for i in 0..reads {
        let rkey = &written[(i * 7919) % written.len()];
        commons.get(&call, "user", NSID, rkey).unwrap();
    }
    let reads_per_s = reads as f64 / started.elapsed().as_secs_f64();
    println!("data reads (private, decrypted): {reads_per_s:.0}/s (target >= 50000/s; Community Solid Server ~47 GET/s per worker: x{:.0})", reads_per_s / 47.0);

    // Grant checks.
    let mut checks = Vec::with_capacity(100_000);
    let grantee = Grantee::App("bench".into());
    for _ in 0..100_000 {
        let t = Instant::now();
        assert!(commons.allowed("user", &grantee, NSID, Action::Read));
        checks.push(t.elapsed());
    }
    checks.sort();
    println!(
        "grant check: p50 {:.1} us, p99 {:.1} us (target p99 <= 1 ms)",
        percentile(&checks, 0.5).as_secs_f64() * 1e6,
        percentile(&checks, 0.99).as_secs_f64() * 1e6
    );

    // Feed fan-out: replay everything to one subscriber.
    let total = records + 500;
    let started = Instant::now();
    rt.block_on(async {
        let mut sub = commons
            .subscribe(Viewer::App("bench".into()), Some(0))
            .unwrap();
        let mut n = 0;
        while n < total {
            if let Message::Event(_) = sub.next().await.unwrap() {
                n += 1;
            }
        }
    });
    let events_per_s = total as f64 / started.elapsed().as_secs_f64();
    println!("feed fan-out to one subscriber: {events_per_s:.0} events/s (target >= 50000/s; Jetstream ~200000/s: x{:.2})", events_per_s / 200_000.0);

    // Export and erase of the user.
    let started = Instant::now();
    let archive = commons.export("user").unwrap();
    println!(
        "export of {} records: {:.2} s, {} MiB (target <= 10 s for 100000)",
        total,
        started.elapsed().as_secs_f64(),
        archive.len() / (1 << 20)
    );
    let started = Instant::now();
    commons.erase("user").unwrap();
    println!(
        "erase of {} records: {:.2} s (target <= 60 s for 100000)",
        total,
        started.elapsed().as_secs_f64()
    );

    // Batched writes (applyWrites): 200 records per signed commit, another user.
    commons.consent("batcher", "bench").unwrap();
    let batcher = AppCall {
        app: "bench".into(),
        user: "batcher".into(),
    };
    let batched = (records / 5).clamp(200, 20_000) / 200 * 200;
    let started = Instant::now();
    for b in 0..batched / 200 {
        let writes: Vec<WriteOp> = (0..200)
            .map(|i| WriteOp {
                collection: NSID.into(),
                rkey: Some(format!("b{:08}", b * 200 + i)),
                value: Some(json!({"$type": NSID, "text": format!("batched entry {i}"), "score": i, "when": "2026-12-06T10:00:00Z"})),
                create: true,
            })
            .collect();
        commons.apply_writes(&batcher, &writes).unwrap();
    }
    let batched_per_s = batched as f64 / started.elapsed().as_secs_f64();
    println!("data writes in batches of 200 (one signed commit each): {batched_per_s:.0}/s over {batched} records");
    let _ = std::fs::remove_dir_all(&dir);
}
