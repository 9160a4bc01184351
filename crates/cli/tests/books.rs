//! The open books: after a payment, usage and a period close, anyone (no
//! log-in) sees the reserve, the price, who holds the tokens — the same
//! figures as the statements — and downloads a journal that verifies
//! offline, and fails to once a byte of it changes.

mod common;

use common::*;

#[test]
fn anyone_reads_the_books_and_checks_the_journal() {
    let s = Sandbox::new("books");
    std::fs::create_dir_all(s.home.join("ledger")).unwrap();
    std::fs::write(
        s.home.join("ledger/config.json"),
        r#"{ "sites": { "S": { "operator": "O", "providers": [["P", 1]], "projects": [["A", 1]] } },
             "projects": { "A": { "depends_on": [["B", 1]] } } }"#,
    )
    .unwrap();
    s.ok(&[
        "ledger",
        "bootstrap",
        "--cash",
        "100000",
        "--tokens",
        "100000",
    ]);
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
    let event = serde_json::json!({
        "specversion": "1.0", "id": "req-1", "source": "gateway/local", "type": "request",
        "time": commons_meter::format_time(now),
        "data": { "user": "alice", "site": "S", "operator": "O", "provider": "P", "bytes_out": 100 }
    });
    let file = s.dir.join("events.jsonl");
    std::fs::write(&file, format!("{event}\n")).unwrap();
    s.ok(&["usage", "ingest", file.to_str().unwrap()]);
    s.ok(&["period", "close", period]);
    let operator = s.ok(&["statement", "operator:O", "--json"]).json()["lines"][0]["amount"]
        .as_u64()
        .unwrap();
    let key = s.ok(&["ledger", "key"]).stdout().trim().to_string();

    let server = s.serve(&[]);
    let anon = Api::anonymous(server.port);
    let (code, books) = anon.get("/api/books");
    assert_eq!(code, 200, "{books}");
    let reserve = books["reserve_cents"].as_u64().unwrap();
    let outstanding = books["tokens_outstanding"].as_u64().unwrap();
    assert!(reserve > 100_000 && outstanding > 100_000, "{books}");
    let price = books["price_cents"].as_f64().unwrap();
    assert!((price - reserve as f64 / outstanding as f64).abs() < 1e-9);
    let held = |name: &str| {
        books["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["tokens"].as_u64().unwrap())
    };
    // The same figure as the operator's statement.
    assert_eq!(held("operator:O"), Some(operator), "{books}");
    assert!(held("project:B").is_some(), "{books}");
    assert_eq!(books["subscribers"], 1);
    assert_eq!(books["custodian_key"], key.as_str());

    // The page, for people, with no log-in, names no subscriber.
    let (code, page) = http(server.port, "GET", "/books", &[], b"").unwrap();
    assert_eq!(code, 200);
    for shown in [
        "Open books",
        "Reserve",
        "operator:O",
        &operator.to_string(),
        "role=\"img\"",
    ] {
        assert!(page.contains(shown), "{shown} missing from the page");
    }
    assert!(!page.contains("alice"), "a subscriber is named: {page}");

    // The journal, downloaded, verifies offline against the custodian's key.
    let (code, export) = http(server.port, "GET", "/api/books/export", &[], b"").unwrap();
    assert_eq!(code, 200);
    let path = s.dir.join("ledger.export");
    std::fs::write(&path, &export).unwrap();
    s.ok(&["ledger", "verify", path.to_str().unwrap(), "--key", &key]);
    // A second download signs nothing new: reading the books never grows them.
    let (_, again) = http(server.port, "GET", "/api/books/export", &[], b"").unwrap();
    assert_eq!(again, export);
    let (_, after) = anon.get("/api/books");
    assert_eq!(after["journal_entries"], books["journal_entries"]);
    // One byte changed in an amount: refused.
    let tampered = tamper_amount(&export);
    std::fs::write(&path, tampered).unwrap();
    let r = s.run(&["ledger", "verify", path.to_str().unwrap(), "--key", &key]);
    assert_ne!(r.code(), 0, "a tampered journal verified: {}", r.all());
}

/// The export with one digit of the first transfer's amount changed.
fn tamper_amount(export: &str) -> String {
    let at = export.find("\"amount\":").expect("an amount in the export") + "\"amount\":".len();
    let mut bytes = export.as_bytes().to_vec();
    let digit = bytes[at..]
        .iter()
        .position(u8::is_ascii_digit)
        .map(|i| at + i)
        .unwrap();
    bytes[digit] = if bytes[digit] == b'9' {
        b'8'
    } else {
        bytes[digit] + 1
    };
    String::from_utf8(bytes).unwrap()
}
