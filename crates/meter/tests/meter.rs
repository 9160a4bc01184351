//! Dedup, conflicts, late events, backfills and aggregation, on a real store.

use commons_meter::*;

fn meter(name: &str) -> (Meter, std::path::PathBuf) {
    let d = std::env::temp_dir().join(format!("commons-meter-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    (Meter::open(&d.join("meter.db"), 86_400_000).unwrap(), d)
}

#[allow(clippy::too_many_arguments)]
fn query(
    m: &Meter,
    window: Window,
    dim: &str,
    value: &str,
    metric: &str,
    aggregation: Aggregation,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<(i64, f64)>, MeterError> {
    m.query(&Query {
        window,
        dim,
        value,
        metric,
        aggregation,
        from_ms,
        to_ms,
    })
}

fn ev(id: &str, time: &str, user: &str, site: &str, bytes: u64) -> Event {
    let data = serde_json::json!({ "user": user, "site": site, "operator": "acme", "provider": "p1", "bytes_out": bytes, "duration_ms": 3 });
    Event {
        specversion: "1.0".into(),
        id: id.into(),
        source: "gateway/node-1".into(),
        kind: "request".into(),
        subject: Some(site.into()),
        time: time.into(),
        data: data.as_object().unwrap().clone(),
    }
}

// "Now" inside November 2026, so November's events are on time.
const NOW: i64 = 1_795_000_000_000; // 2026-11-18

#[test]
fn duplicates_are_idempotent_and_conflicts_are_409() {
    let (mut m, dir) = meter("dedup");
    let e = ev("e1", "2026-11-18T10:00:00Z", "alice", "wiki", 100);
    assert_eq!(
        m.ingest_at(std::slice::from_ref(&e), None, NOW).unwrap(),
        [Outcome::Accepted]
    );
    assert_eq!(
        m.ingest_at(std::slice::from_ref(&e), None, NOW).unwrap(),
        [Outcome::Duplicate]
    );
    let mut changed = e.clone();
    changed.data.insert("bytes_out".into(), 999.into());
    let r = m.ingest_at(&[changed], None, NOW).unwrap();
    match &r[0] {
        Outcome::Rejected(rej @ Rejection::Conflict { .. }) => assert_eq!(rej.status(), 409),
        other => panic!("{other:?}"),
    }
    // Within one batch too, and across a reopen (durable).
    let again = m
        .ingest_at(
            &[
                ev("e2", "2026-11-18T10:00:01Z", "bob", "wiki", 5),
                ev("e2", "2026-11-18T10:00:01Z", "bob", "wiki", 5),
            ],
            None,
            NOW,
        )
        .unwrap();
    assert_eq!(again, [Outcome::Accepted, Outcome::Duplicate]);
    drop(m);
    let mut m = Meter::open(&dir.join("meter.db"), 86_400_000).unwrap();
    assert_eq!(m.ingest_at(&[e], None, NOW).unwrap(), [Outcome::Duplicate]);
    let sum = query(
        &m,
        Window::Day,
        "site",
        "wiki",
        "bytes_out",
        Aggregation::Sum,
        0,
        i64::MAX,
    )
    .unwrap();
    // The duplicate and the conflicting copy counted nothing: 100 + 5.
    assert_eq!(sum.len(), 1);
    assert_eq!(sum[0].1, 105.0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn late_events_are_refused_unless_backfilled_and_backfills_revert() {
    let (mut m, dir) = meter("late");
    // October ended more than a day (the grace) before NOW.
    let late = ev("old", "2026-10-30T12:00:00Z", "alice", "wiki", 7);
    let r = m.ingest_at(std::slice::from_ref(&late), None, NOW).unwrap();
    assert!(
        matches!(&r[0], Outcome::Rejected(Rejection::Late { period, .. }) if period == "2026-10")
    );
    assert_eq!(
        m.ingest_at(std::slice::from_ref(&late), Some("fix-1"), NOW)
            .unwrap(),
        [Outcome::Accepted]
    );
    let oct = period_bounds("2026-10").unwrap();
    let q = |m: &Meter| {
        query(
            m,
            Window::Day,
            "user",
            "alice",
            "bytes_out",
            Aggregation::Sum,
            oct.0,
            oct.1,
        )
        .unwrap()
    };
    assert_eq!(q(&m).iter().map(|(_, v)| v).sum::<f64>(), 7.0);
    assert_eq!(m.revert_backfill("fix-1").unwrap(), 1);
    assert!(q(&m).is_empty());
    // An explicitly closed period refuses on-time events too.
    m.close_period("2026-11").unwrap();
    let r = m
        .ingest_at(
            &[ev("n1", "2026-11-18T10:00:00Z", "a", "wiki", 1)],
            None,
            NOW,
        )
        .unwrap();
    assert!(matches!(&r[0], Outcome::Rejected(Rejection::Late { .. })));
    assert!(m.close_period("November").is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn aggregates_by_window_and_dimension() {
    let (mut m, dir) = meter("agg");
    let events = vec![
        ev("1", "2026-11-18T10:00:10Z", "alice", "wiki", 100),
        ev("2", "2026-11-18T10:00:50Z", "bob", "wiki", 300),
        ev("3", "2026-11-18T10:01:05Z", "alice", "wiki", 50),
        ev("4", "2026-11-18T11:30:00Z", "alice", "blog", 10),
    ];
    assert!(m
        .ingest_at(&events, None, NOW)
        .unwrap()
        .iter()
        .all(|o| *o == Outcome::Accepted));
    let all = (0, i64::MAX);
    let minutes = query(
        &m,
        Window::Minute,
        "site",
        "wiki",
        "bytes_out",
        Aggregation::Sum,
        all.0,
        all.1,
    )
    .unwrap();
    assert_eq!(
        minutes.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
        [400.0, 50.0]
    );
    let hours = query(
        &m,
        Window::Hour,
        "user",
        "alice",
        "bytes_out",
        Aggregation::Sum,
        all.0,
        all.1,
    )
    .unwrap();
    assert_eq!(
        hours.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
        [150.0, 10.0]
    );
    let max = query(
        &m,
        Window::Day,
        "operator",
        "acme",
        "bytes_out",
        Aggregation::Max,
        all.0,
        all.1,
    )
    .unwrap();
    assert_eq!(max[0].1, 300.0);
    let count = query(
        &m,
        Window::Day,
        "provider",
        "p1",
        "events:request",
        Aggregation::Count,
        all.0,
        all.1,
    )
    .unwrap();
    assert_eq!(count[0].1, 4.0);
    assert_eq!(
        m.unique_count("site", "wiki", "user", all.0, all.1)
            .unwrap(),
        2
    );
    let usage = m.usage_by_user("2026-11").unwrap();
    assert_eq!(
        usage["alice"],
        [("blog".to_string(), 1), ("wiki".to_string(), 2)]
    );
    // The same per day and site, for alice's usage page.
    let days = m.site_days("alice", all.0, all.1).unwrap();
    let nov18 = days[0].0;
    assert_eq!(commons_meter::format_time(nov18), "2026-11-18T00:00:00Z");
    assert_eq!(
        days,
        [
            (nov18, "blog".to_string(), 1),
            (nov18, "wiki".to_string(), 2)
        ]
    );
    assert!(m
        .site_days("alice", nov18 + 86_400_000, i64::MAX)
        .unwrap()
        .is_empty());
    assert!(query(&m, Window::Day, "colour", "x", "m", Aggregation::Sum, 0, 1).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn invalid_events_are_400() {
    let (mut m, dir) = meter("invalid");
    let mut e = ev("x", "yesterday", "a", "s", 1);
    let r = m.ingest_at(std::slice::from_ref(&e), None, NOW).unwrap();
    assert!(matches!(&r[0], Outcome::Rejected(rej) if rej.status() == 400));
    e.time = "2026-11-18T10:00:00Z".into();
    e.id = String::new();
    assert!(matches!(
        &m.ingest_at(&[e], None, NOW).unwrap()[0],
        Outcome::Rejected(Rejection::Invalid { .. })
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_aggregated_event_counts_as_its_count() {
    let (mut m, dir) = meter("count");
    let mut folded = ev("agg-1", "2026-11-18T10:00:00Z", "alice", "wiki", 700);
    folded.data.insert("count".into(), 7.into());
    let single = ev("one-1", "2026-11-18T10:00:30Z", "alice", "wiki", 100);
    m.ingest_at(&[folded, single], None, NOW).unwrap();
    let from = 1_795_000_000_000 - 86_400_000;
    let to = 1_795_000_000_000 + 86_400_000;
    let requests = query(
        &m,
        Window::Day,
        "site",
        "wiki",
        "events:request",
        Aggregation::Sum,
        from,
        to,
    )
    .unwrap();
    assert_eq!(requests.iter().map(|(_, v)| v).sum::<f64>(), 8.0);
    let bytes = query(
        &m,
        Window::Day,
        "site",
        "wiki",
        "bytes_out",
        Aggregation::Sum,
        from,
        to,
    )
    .unwrap();
    assert_eq!(bytes.iter().map(|(_, v)| v).sum::<f64>(), 800.0);
    let by_user = m.usage_by_user("2026-11").unwrap();
    assert_eq!(by_user["alice"], vec![("wiki".to_string(), 8)]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn two_writers_on_one_file_wait_for_each_other_instead_of_failing() {
    // The API and the supervisor each hold a connection to the meter's
    // file. A batch reads (dedup) before it writes; two such batches at
    // once must queue on the write lock, not fail with "database is locked"
    // — a node's usage refused that way was lost money.
    let (_, dir) = meter("two-writers");
    let path = dir.join("meter.db");
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut m = Meter::open(&path, 86_400_000).unwrap();
                for batch in 0..100 {
                    let events: Vec<Event> = (0..20)
                        .map(|i| {
                            ev(
                                &format!("w{w}-b{batch}-e{i}"),
                                "2026-11-18T10:00:00Z",
                                "u1",
                                "s1",
                                1,
                            )
                        })
                        .collect();
                    m.ingest_at(&events, None, NOW)
                        .unwrap_or_else(|e| panic!("writer {w}, batch {batch}: {e}"));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
