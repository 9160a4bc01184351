//! Dedup, conflicts, late events, backfills and aggregation, on a real
//! store: every case runs on the embedded SQLite file and on PostgreSQL (a
//! real server; `COMMONS_TEST_POSTGRES` names it, default
//! `host=127.0.0.1 user=postgres dbname=test`).

use commons_meter::*;

#[derive(Clone, Copy)]
enum Kind {
    Sqlite,
    Postgres,
}

/// Where one test's meter lives; removed when the test ends.
struct Place {
    kind: Kind,
    dir: std::path::PathBuf,
    schema: String,
}

fn postgres_url() -> String {
    std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

impl Place {
    fn new(kind: Kind, name: &str) -> Place {
        let tag = match kind {
            Kind::Sqlite => "sqlite",
            Kind::Postgres => "pg",
        };
        let d =
            std::env::temp_dir().join(format!("commons-meter-{name}-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let place = Place {
            kind,
            dir: d,
            schema: format!("meter_{}_{}", name.replace('-', "_"), std::process::id()),
        };
        place.drop_schema();
        place
    }

    /// Opens the meter (again).
    fn open(&self) -> Meter {
        match self.kind {
            Kind::Sqlite => Meter::open(&self.dir.join("meter.db"), 86_400_000).unwrap(),
            Kind::Postgres => Meter::open_postgres(&postgres_url(), &self.schema, 86_400_000)
                .unwrap_or_else(|e| {
                    panic!("these tests need PostgreSQL at {:?}: {e}", postgres_url())
                }),
        }
    }

    fn drop_schema(&self) {
        if let Kind::Postgres = self.kind {
            let mut db = postgres::Client::connect(&postgres_url(), postgres::NoTls)
                .unwrap_or_else(|e| {
                    panic!("these tests need PostgreSQL at {:?}: {e}", postgres_url())
                });
            // A meter still open folds its batches meanwhile, and may hold
            // the tables' locks in another order: dropping is tried again.
            let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
            let mut attempt = 0;
            while let Err(e) = db.batch_execute(&drop) {
                attempt += 1;
                let deadlock = e.code() == Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED);
                assert!(deadlock && attempt < 5, "dropping {}: {e}", self.schema);
            }
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            self.drop_schema();
        }
    }
}

fn meter(kind: Kind, name: &str) -> (Meter, Place) {
    let place = Place::new(kind, name);
    (place.open(), place)
}

/// Each case, once on each store.
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[test]
            fn sqlite() {
                super::$case(super::Kind::Sqlite)
            }
            #[test]
            fn postgres() {
                super::$case(super::Kind::Postgres)
            }
        }
    )*};
}

on_both_stores!(
    duplicates_are_idempotent_and_conflicts_are_409,
    late_events_are_refused_unless_backfilled_and_backfills_revert,
    aggregates_by_window_and_dimension,
    invalid_events_are_400,
    an_aggregated_event_counts_as_its_count,
    two_writers_wait_for_each_other_instead_of_failing,
    a_closed_period_takes_no_event_from_a_batch_in_flight,
    a_sites_last_request_is_its_latest_on_time_request,
);

/// Everything the meter answers about a set of batches, to compare.
fn readings(m: &Meter) -> Vec<String> {
    let mut out = Vec::new();
    let (from, to) = (NOW - 40 * 86_400_000, NOW + 86_400_000);
    for window in [Window::Minute, Window::Hour, Window::Day] {
        for (dim, value) in [
            ("user", "u1"),
            ("user", "u2"),
            ("site", "wiki"),
            ("site", "archive"),
            ("operator", "acme"),
            ("provider", "p1"),
        ] {
            for metric in ["events:request", "events:resources", "bytes_out", "cpu_ms"] {
                for aggregation in [Aggregation::Sum, Aggregation::Count, Aggregation::Max] {
                    let rows = query(m, window, dim, value, metric, aggregation, from, to).unwrap();
                    out.push(format!(
                        "{window:?} {dim}={value} {metric} {aggregation:?}: {rows:?}"
                    ));
                }
            }
        }
    }
    for period in ["2026-10", "2026-11"] {
        let mut usage: Vec<_> = m.usage_by_user(period).unwrap().into_iter().collect();
        usage.sort();
        out.push(format!("usage {period}: {usage:?}"));
        for user in ["u1", "u2"] {
            out.push(format!(
                "sites of {user} in {period}: {:?}",
                m.sites_used(period, user).unwrap()
            ));
        }
    }
    for user in ["u1", "u2"] {
        out.push(format!(
            "days of {user}: {:?}",
            m.site_days(user, from, to).unwrap()
        ));
    }
    for site in ["wiki", "blog", "archive"] {
        out.push(format!(
            "last request of {site}: {:?}",
            m.last_request(site).unwrap()
        ));
    }
    out
}

/// Batches for [`readings`]: requests across minutes, hours and days, an
/// aggregated one, a resources sample, events without a user, a backfill.
fn some_batches(m: &mut Meter) {
    let mut sample = ev("r1", "2026-11-18T10:05:00Z", "u1", "wiki", 0);
    sample.kind = "resources".into();
    sample.data.insert("cpu_ms".into(), 250.into());
    let mut aggregated = ev("g1", "2026-11-18T10:00:30Z", "u2", "wiki", 4000);
    aggregated.data.insert("count".into(), 4.into());
    let mut anonymous = ev("n1", "2026-11-18T10:00:40Z", "u1", "blog", 10);
    anonymous.data.remove("user");
    let batches = [
        vec![
            ev("a", "2026-11-18T10:00:03Z", "u1", "wiki", 100),
            ev("b", "2026-11-18T10:00:09Z", "u2", "wiki", 300),
            ev("c", "2026-11-18T10:01:01Z", "u1", "blog", 7),
        ],
        vec![
            ev("d", "2026-11-17T23:59:59Z", "u1", "wiki", 5),
            sample,
            aggregated,
            anonymous,
        ],
        vec![ev("e", "2026-11-18T11:30:00Z", "u1", "wiki", 1)],
    ];
    for batch in batches {
        m.ingest_at(&batch, None, NOW).unwrap();
    }
    let old = ev("f", "2026-10-30T12:00:00Z", "u1", "archive", 9);
    assert_eq!(
        m.ingest_at(&[old], Some("fix-1"), NOW).unwrap(),
        [Outcome::Accepted]
    );
}

/// PostgreSQL folds batches into the totals after their commit; a read
/// adds what is not folded yet. Both ways it answers what SQLite (which
/// updates the totals in the batch) answers, and a revert takes a
/// backfill out of both.
#[test]
fn totals_read_the_same_folded_or_not() {
    let (mut embedded, _a) = meter(Kind::Sqlite, "folding");
    some_batches(&mut embedded);
    let expected = readings(&embedded);
    assert!(
        expected.iter().any(|r| r.contains(
            "Day site=wiki events:request Sum: [(1794873600000, 1.0), (1794960000000, 7.0)]"
        )),
        "{expected:#?}"
    );

    let place = Place::new(Kind::Postgres, "folding");
    let mut db = postgres::Client::connect(&postgres_url(), postgres::NoTls).unwrap();
    // Holding the compactor's lock keeps every batch pending.
    let lock = format!("commons meter totals {}", place.schema);
    let mut m = place.open();
    db.execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock])
        .unwrap();
    some_batches(&mut m);
    let pending = |db: &mut postgres::Client| -> i64 {
        db.query_one(
            &format!("SELECT count(*) FROM {}.pending_totals", place.schema),
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert!(pending(&mut db) > 0, "the batches wait to be folded");
    assert_eq!(readings(&m), expected, "read while pending");
    db.execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock])
        .unwrap();
    m.compact().unwrap();
    assert_eq!(pending(&mut db), 0, "all folded");
    assert_eq!(readings(&m), expected, "read when folded");

    // A revert with the backfill folded, and with more batches pending.
    db.execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock])
        .unwrap();
    let more = ev("h", "2026-10-31T12:00:00Z", "u2", "archive", 3);
    assert_eq!(
        m.ingest_at(std::slice::from_ref(&more), Some("fix-1"), NOW)
            .unwrap(),
        [Outcome::Accepted]
    );
    assert_eq!(
        embedded.ingest_at(&[more], Some("fix-1"), NOW).unwrap(),
        [Outcome::Accepted]
    );
    assert_eq!(
        readings(&m),
        readings(&embedded),
        "a pending backfill on folded totals"
    );
    db.execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock])
        .unwrap();
    assert_eq!(m.revert_backfill("fix-1").unwrap(), 2);
    assert_eq!(embedded.revert_backfill("fix-1").unwrap(), 2);
    let reverted = readings(&embedded);
    assert!(
        reverted.iter().any(|r| r == "usage 2026-10: []"),
        "{reverted:#?}"
    );
    assert_eq!(readings(&m), reverted, "after the revert");
    m.compact().unwrap();
    assert_eq!(readings(&m), reverted, "after the revert, folded");
    assert_eq!(pending(&mut db), 0);
    drop(m);
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

fn duplicates_are_idempotent_and_conflicts_are_409(kind: Kind) {
    let (mut m, _place) = meter(kind, "dedup");
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
    let mut m = _place.open();
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
}

fn late_events_are_refused_unless_backfilled_and_backfills_revert(kind: Kind) {
    let (mut m, _place) = meter(kind, "late");
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
}

fn aggregates_by_window_and_dimension(kind: Kind) {
    let (mut m, _place) = meter(kind, "agg");
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
}

fn invalid_events_are_400(kind: Kind) {
    let (mut m, _place) = meter(kind, "invalid");
    let mut e = ev("x", "yesterday", "a", "s", 1);
    let r = m.ingest_at(std::slice::from_ref(&e), None, NOW).unwrap();
    assert!(matches!(&r[0], Outcome::Rejected(rej) if rej.status() == 400));
    e.time = "2026-11-18T10:00:00Z".into();
    e.id = String::new();
    assert!(matches!(
        &m.ingest_at(&[e.clone()], None, NOW).unwrap()[0],
        Outcome::Rejected(Rejection::Invalid { .. })
    ));
    // A NUL in any text the store indexes: refused on both stores, the
    // rest of the batch taken.
    e.id = "nul".into();
    e.data.insert("user".into(), "a\u{0}b".into());
    let ok = ev("fine", "2026-11-18T10:00:00Z", "a", "s", 1);
    let r = m.ingest_at(&[e, ok], None, NOW).unwrap();
    assert!(
        matches!(&r[0], Outcome::Rejected(Rejection::Invalid { message, .. }) if message.contains("NUL")),
        "{r:?}"
    );
    assert_eq!(r[1], Outcome::Accepted);
}

fn an_aggregated_event_counts_as_its_count(kind: Kind) {
    let (mut m, _place) = meter(kind, "count");
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
}

fn two_writers_wait_for_each_other_instead_of_failing(kind: Kind) {
    // The API and the supervisor each hold a connection to the meter (and,
    // scaled out, several instances do). A batch reads (dedup) before it
    // writes; two such batches at once must queue, not fail with "database
    // is locked" or a deadlock — a node's usage refused that way was lost
    // money. Half of each writer's events are the other's too, sent at the
    // same moment: each is counted once.
    let place = std::sync::Arc::new(Place::new(kind, "two-writers"));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let place = place.clone();
            std::thread::spawn(move || {
                let mut m = place.open();
                for batch in 0..100 {
                    let mut events: Vec<Event> = (0..20)
                        .map(|i| {
                            let id = if i % 2 == 0 {
                                format!("shared-b{batch}-e{i}")
                            } else {
                                format!("w{w}-b{batch}-e{i}")
                            };
                            ev(&id, "2026-11-18T10:00:00Z", "u1", "s1", 1)
                        })
                        .collect();
                    if w == 1 {
                        events.reverse();
                    }
                    m.ingest_at(&events, None, NOW)
                        .unwrap_or_else(|e| panic!("writer {w}, batch {batch}: {e}"));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let m = place.open();
    let count = query(
        &m,
        Window::Day,
        "site",
        "s1",
        "events:request",
        Aggregation::Sum,
        0,
        i64::MAX,
    )
    .unwrap();
    // 100 batches × (10 shared + 10 of each writer's own).
    assert_eq!(count.iter().map(|(_, n)| n).sum::<f64>(), 3000.0);
    assert_eq!(
        m.usage_by_user("2026-11").unwrap()["u1"],
        [("s1".to_string(), 3000)]
    );
}

fn a_closed_period_takes_no_event_from_a_batch_in_flight(kind: Kind) {
    // A writer keeps sending November's events while November is closed:
    // every event is either counted before the close or refused as late
    // after it — what period close reads right after closing is final —
    // and what the usage table says is what was accepted.
    let place = std::sync::Arc::new(Place::new(kind, "close-race"));
    let (started, first_batch) = std::sync::mpsc::channel();
    let writer = {
        let place = place.clone();
        std::thread::spawn(move || {
            let mut m = place.open();
            let mut accepted = 0u64;
            let mut late = 0u64;
            for batch in 0..60 {
                let events: Vec<Event> = (0..50)
                    .map(|i| {
                        ev(
                            &format!("b{batch}-e{i}"),
                            "2026-11-18T10:00:00Z",
                            "u1",
                            "s1",
                            1,
                        )
                    })
                    .collect();
                for o in m.ingest_at(&events, None, NOW).unwrap() {
                    match o {
                        Outcome::Accepted => accepted += 1,
                        Outcome::Rejected(Rejection::Late { .. }) => late += 1,
                        other => panic!("{other:?}"),
                    }
                }
                let _ = started.send(());
            }
            (accepted, late)
        })
    };
    // Closed while the writer is between batches or inside one.
    let closer = place.open();
    first_batch.recv().unwrap();
    closer.close_period("2026-11").unwrap();
    // What period close reads once the meter's period is closed: final.
    let at_close = closer.usage_by_user("2026-11").unwrap();
    let (accepted, late) = writer.join().unwrap();
    assert_eq!(accepted + late, 3000);
    assert!(accepted >= 50, "the first batch was on time");
    let m = place.open();
    let counted = m
        .usage_by_user("2026-11")
        .unwrap()
        .get("u1")
        .map(|s| s[0].1)
        .unwrap_or(0);
    assert_eq!(counted, accepted);
    assert_eq!(
        m.usage_by_user("2026-11").unwrap(),
        at_close,
        "events were counted after the period closed"
    );
    assert!(!m.accepts("2026-11").unwrap());
}

fn a_sites_last_request_is_its_latest_on_time_request(kind: Kind) {
    // The idler asks it of every site on every pass: kept per site as
    // batches come, not searched for among the events.
    let (mut m, place) = meter(kind, "last-request");
    let at = |t: &str| {
        humantime::parse_rfc3339(t)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    m.ingest_at(
        &[
            ev("a", "2026-11-18T10:00:03Z", "u1", "wiki", 1),
            ev("b", "2026-11-18T10:00:09Z", "u2", "wiki", 1),
            ev("c", "2026-11-18T10:00:01Z", "u1", "blog", 1),
        ],
        None,
        NOW,
    )
    .unwrap();
    // An older request later, and a later event that is no request.
    let mut sample = ev("d", "2026-11-18T11:00:00Z", "u1", "wiki", 1);
    sample.kind = "resources".into();
    m.ingest_at(
        &[ev("e", "2026-11-18T10:00:05Z", "u1", "wiki", 1), sample],
        None,
        NOW,
    )
    .unwrap();
    // A backfill's requests are of a closed period: they never wake a site.
    let old = ev("f", "2026-10-30T12:00:00Z", "u1", "archive", 1);
    assert_eq!(
        m.ingest_at(&[old], Some("fix-1"), NOW).unwrap(),
        [Outcome::Accepted]
    );
    assert_eq!(
        m.last_request("wiki").unwrap(),
        Some(at("2026-11-18T10:00:09Z"))
    );
    assert_eq!(
        m.last_request("blog").unwrap(),
        Some(at("2026-11-18T10:00:01Z"))
    );
    assert_eq!(m.last_request("archive").unwrap(), None);
    assert_eq!(m.last_request("nowhere").unwrap(), None);
    // Another connection sees the same.
    let other = m.another_connection().unwrap();
    assert_eq!(
        other.last_request("wiki").unwrap(),
        Some(at("2026-11-18T10:00:09Z"))
    );
    drop((m, other));

    // A meter of an earlier schema (which searched the events by an index
    // of site and time) has it filled from its events when opened.
    match kind {
        Kind::Sqlite => {
            let db = rusqlite::Connection::open(place.dir.join("meter.db")).unwrap();
            db.execute_batch("DROP TABLE last_requests").unwrap();
        }
        Kind::Postgres => {
            let mut db = postgres::Client::connect(&postgres_url(), postgres::NoTls).unwrap();
            db.batch_execute(&format!(
                "SET search_path TO {}; DROP TABLE last_requests;
                 CREATE INDEX events_by_site_time ON events (site, time_ms);
                 CREATE INDEX events_by_period ON events (period);",
                place.schema
            ))
            .unwrap();
        }
    }
    let m = place.open();
    assert_eq!(
        m.last_request("wiki").unwrap(),
        Some(at("2026-11-18T10:00:09Z"))
    );
    assert_eq!(m.last_request("archive").unwrap(), None);
    if let Kind::Postgres = kind {
        let mut db = postgres::Client::connect(&postgres_url(), postgres::NoTls).unwrap();
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = $1
                 AND indexname IN ('events_by_site_time', 'events_by_period')",
                &[&place.schema],
            )
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "the earlier schema's indexes are gone");
    }
}
