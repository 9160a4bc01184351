//! The money flow through the CLI: a payment mints tokens, usage is metered,
//! the period close allocates them by the policy, statements say so, and the
//! ledger export verifies.

mod common;

use common::*;

#[test]
fn payment_usage_close_statement() {
    let s = Sandbox::new("money");
    worked_example_ledger(&s);
    let r = s.run(&["subscribe", "alice", "gold", "--payment", "bank-0"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    s.ok(&[
        "subscribe",
        "alice",
        "member",
        "--payment",
        "bank-1",
        "--fee",
        "30",
    ]);
    let sub = s.ok(&["subscribe", "alice", "--json"]).json();
    assert_eq!(sub["tier"], "member");
    // The same payment recorded twice is one payment.
    s.ok(&[
        "subscribe",
        "alice",
        "member",
        "--payment",
        "bank-1",
        "--fee",
        "30",
    ]);

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let period = &commons_meter::format_time(now)[..7];
    let events: String = (0..3)
        .map(|i| {
            serde_json::json!({
                "specversion": "1.0", "id": format!("req-{i}"), "source": "gateway/local", "type": "request",
                "time": commons_meter::format_time(now - i * 1000),
                "data": { "user": "alice", "site": "S", "operator": "O", "provider": "P", "bytes_out": 100 }
            })
            .to_string()
                + "\n"
        })
        .collect();
    let file = s.dir.join("events.jsonl");
    std::fs::write(&file, &events).unwrap();
    s.ok(&["usage", "ingest", file.to_str().unwrap()]);
    // Sending them again is harmless.
    let again = s
        .ok(&["usage", "ingest", file.to_str().unwrap(), "--json"])
        .json();
    assert!(again.as_array().unwrap().iter().all(|o| o == "duplicate"));
    let shown = s
        .ok(&[
            "usage",
            "show",
            "site",
            "S",
            "--metric",
            "bytes_out",
            "--json",
        ])
        .json();
    assert_eq!(
        shown
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"].as_f64().unwrap())
            .sum::<f64>(),
        300.0
    );

    let unique = s
        .ok(&[
            "usage",
            "show",
            "site",
            "S",
            "--aggregation",
            "unique:user",
            "--json",
        ])
        .json();
    assert_eq!(unique["count"], 1);
    let closed = s.ok(&["period", "close", period, "--json"]).json();
    assert_eq!(closed["subscribers"], 1);
    assert_eq!(closed["tokens_allocated"], 470);
    let st = s.ok(&["statement", "operator:O", "--json"]).json();
    assert_eq!(st["lines"][0]["amount"], 207);
    assert_eq!(st["lines"][0]["site"], "S");
    let b = s.ok(&["statement", "project:B", "--json"]).json();
    assert_eq!(b["lines"][0]["amount"], 44);
    // Closing again changes nothing; events for the closed period are now late.
    let again = s.ok(&["period", "close", period, "--json"]).json();
    assert_eq!(again["subscribers"], 0);
    let late = s.run(&["usage", "ingest", file.to_str().unwrap()]);
    assert_eq!(
        late.code(),
        0,
        "resends of recorded events are still duplicates: {}",
        late.all()
    );

    let key = s.ok(&["ledger", "key"]).stdout().trim().to_string();
    let export = s.dir.join("ledger.export");
    s.ok(&["ledger", "export", "-o", export.to_str().unwrap()]);
    s.ok(&["ledger", "verify", export.to_str().unwrap(), "--key", &key]);
    // A statement line proven in a signed checkpoint, checked without the
    // journal; a one-byte change to the proven line fails.
    let proofs = s.dir.join("operator-O.proofs.json");
    s.ok(&[
        "ledger",
        "prove",
        "operator:O",
        "--period",
        period,
        "-o",
        proofs.to_str().unwrap(),
    ]);
    let proven = s
        .ok(&[
            "ledger",
            "verify",
            proofs.to_str().unwrap(),
            "--key",
            &key,
            "--json",
        ])
        .json();
    assert_eq!(proven[0]["amount"], 207);
    assert_eq!(proven[0]["recipient"], "tokens:operator:O");
    let text = std::fs::read_to_string(&proofs).unwrap();
    let at = text
        .find(r#"\"amount\":207"#)
        .expect("the line's amount in the proof")
        + 11;
    let mut forged = text.into_bytes();
    forged[at] = b'8';
    std::fs::write(&proofs, forged).unwrap();
    let bad = s.run(&["ledger", "verify", proofs.to_str().unwrap(), "--key", &key]);
    assert_eq!(bad.code(), 1, "{}", bad.all());
    assert!(bad.all().contains("not in the tree"), "{}", bad.all());
    assert_eq!(s.run(&["ledger", "prove", "operator:nobody"]).code(), 2);
    let transfers = s
        .ok(&[
            "ledger",
            "transfers",
            "--account",
            "tokens:operator:O",
            "--json",
        ])
        .json();
    assert_eq!(transfers.as_array().unwrap().len(), 1);
    assert_eq!(s.run(&["statement", "nobody"]).code(), 2);
}

#[test]
fn a_site_that_moved_mid_period_pays_both_providers_for_their_parts() {
    let s = Sandbox::new("money-moved");
    // The site is not in the settings: what the meter saw serve it is what
    // the providers are paid by.
    ledger_with(&s, r#"{ "sites": {} }"#);
    s.ok(&["subscribe", "alice", "member", "--payment", "bank-1"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let period = &commons_meter::format_time(now)[..7];
    // Served by acme's node, then (after the move) by globex's: 30 requests
    // and 10, and CPU time on each.
    let event = |id: &str, kind: &str, provider: &str, data: serde_json::Value| {
        let mut d =
            serde_json::json!({ "site": "wiki", "operator": "local", "provider": provider });
        d.as_object_mut()
            .unwrap()
            .extend(data.as_object().unwrap().clone());
        serde_json::json!({
            "specversion": "1.0", "id": id, "source": "gateway/test", "type": kind,
            "time": commons_meter::format_time(now - 1000), "data": d
        })
        .to_string()
            + "\n"
    };
    let events = [
        event(
            "r1",
            "request",
            "acme",
            serde_json::json!({ "user": "alice", "count": 30 }),
        ),
        event(
            "r2",
            "request",
            "globex",
            serde_json::json!({ "user": "alice", "count": 10 }),
        ),
        event(
            "c1",
            "resources",
            "acme",
            serde_json::json!({ "cpu_ms": 3000 }),
        ),
        event(
            "c2",
            "resources",
            "globex",
            serde_json::json!({ "cpu_ms": 1000 }),
        ),
    ]
    .concat();
    let file = s.dir.join("events.jsonl");
    std::fs::write(&file, events).unwrap();
    s.ok(&["usage", "ingest", file.to_str().unwrap()]);
    let closed = s.ok(&["period", "close", period, "--json"]).json();
    assert_eq!(closed["subscribers"], 1, "{closed}");
    let paid = |provider: &str| -> i64 {
        let st = s
            .ok(&["statement", &format!("provider:{provider}"), "--json"])
            .json();
        st["lines"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["site"] == "wiki")
            .map(|l| l["amount"].as_i64().unwrap())
            .sum()
    };
    let (acme, globex) = (paid("acme"), paid("globex"));
    assert!(globex > 0, "globex is paid for its part: {acme} / {globex}");
    // 33 units of work against 11: three to one, to the token.
    assert!((acme - 3 * globex).abs() <= 3, "{acme} / {globex}");
}
