//! CommonsCents for people. The open books: after a payment, usage and a
//! period close, anyone (no log-in) sees the reserve, the price, who holds
//! the tokens — the same figures as the statements — and downloads a
//! journal that verifies offline, and fails to once a byte of it changes.
//! A user's own usage: what they used through the gateway, per day and per
//! site.

mod common;

use common::*;

#[test]
fn anyone_reads_the_books_and_checks_the_journal() {
    let s = Sandbox::new("books");
    worked_example_ledger(&s);
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

/// A signed-in user sees what they used: requests through the gateway per
/// day, and the sites their payment will be split among.
#[test]
fn a_user_sees_their_usage_of_the_sites() {
    let s = Sandbox::new("my-usage");
    s.blueprint(
        "name: club\ncomponents:\n  web:\n    process: \"python3 -m http.server --bind 127.0.0.1 $PORT\"\n    \
         health: { http: \"/\" }\n",
    );
    s.ok(&["deploy"]);
    let server = s.serve(&[]);
    let ann = signup(server.port, "ann@example.org", "Ann");
    let ann_id = ann["user"]["id"].as_str().unwrap().to_string();
    // A program signed in as ann (a `session` token is named by its user).
    let token = s
        .ok(&["token", "create", &ann_id, "--scope", "session"])
        .stdout()
        .trim()
        .to_string();
    let host = format!("club.localhost:{}", server.http);
    let bearer = format!("Bearer {token}");
    for _ in 0..3 {
        let (code, _) = http(
            server.http,
            "GET",
            "/",
            &[("Host", &host), ("Authorization", &bearer)],
            b"",
        )
        .unwrap();
        assert_eq!(code, 200);
    }
    let console = login(server.port, "ann@example.org", false);
    let mut usage = serde_json::Value::Null;
    let counted = wait_for(std::time::Duration::from_secs(10), || {
        usage = console.get("/api/me/usage").1;
        usage["requests"].as_u64() >= Some(3)
    });
    assert!(counted, "{usage}");
    assert_eq!(usage["sites"][0]["site"], "club", "{usage}");
    assert!(usage["sites"][0]["events"].as_u64() >= Some(3), "{usage}");
    // Per day and site too: today's part of the club.
    let today = &commons_meter::format_time(commons_clock::now_ms() as i64)[..10];
    let club_today = usage["site_days"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["day"] == today && d["site"] == "club")
        .unwrap_or_else(|| panic!("no part of club today: {usage}"));
    assert!(club_today["events"].as_u64() >= Some(3), "{usage}");
    // Every day of the period so far, the one with the requests among them.
    let days = usage["days"].as_array().unwrap();
    let busy: Vec<&serde_json::Value> = days.iter().filter(|d| d["requests"] != 0).collect();
    assert_eq!(busy.len(), 1, "{usage}");
    assert!(busy[0]["requests"].as_u64() >= Some(3), "{usage}");
    assert_eq!(
        days.last().unwrap()["day"],
        busy[0]["day"],
        "today is the last day shown"
    );
    // The page, with its chart and its table.
    let (code, _, page) = console.raw("GET", "/console/usage", None);
    assert_eq!(code, 200);
    for shown in [
        "Your usage",
        "club",
        "role=\"img\"",
        "Requests per day",
        "Events per day, by site",
    ] {
        assert!(page.contains(shown), "{shown} missing: {page}");
    }
    // Bad input is a problem document; nobody else's usage is anyone's.
    let (code, v) = console.get("/api/me/usage?period=2026-13");
    assert_eq!(code, 400, "{v}");
    let (code, _) = Api::anonymous(server.port).get("/api/me/usage");
    assert_eq!(code, 401);
}

/// The CLI and a running server both write the ledger (as the README's
/// commands do): each catches up with the other's entries, nothing is
/// refused or lost, and the books read after either show both.
#[test]
fn the_cli_and_a_running_server_write_one_ledger() {
    let s = Sandbox::new("books-two-writers");
    worked_example_ledger(&s);
    let ops = s
        .ok(&["token", "create", "ops", "--scope", "billing:write"])
        .stdout()
        .trim()
        .to_string();
    let server = s.serve(&[]);
    let ann = signup(server.port, "ann@example.org", "Ann")["user"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let operator = Api::token(server.port, &ops);
    let pay = |reference: &str, user: &str| {
        operator.post(
            "/api/payments/manual",
            serde_json::json!({ "reference": reference, "user": user, "tier": "member" }),
        )
    };
    assert_eq!(pay("bank-1", &ann).0, 201);
    // The CLI records a payment behind the server's back...
    s.ok(&["subscribe", "bob", "member", "--payment", "bank-2"]);
    // ...and the server's next write catches up instead of failing.
    let (code, paid) = pay("bank-3", &ann);
    assert_eq!(code, 201, "{paid}");
    let anon = Api::anonymous(server.port);
    assert_eq!(anon.get("/api/books").1["subscribers"], 2);
    // The CLI closes the period; the server's books show the close.
    let period = &commons_meter::format_time(commons_clock::now_ms() as i64)[..7];
    s.ok(&["period", "close", period]);
    let (_, books) = anon.get("/api/books");
    let closes = books["closes"].as_array().unwrap();
    assert_eq!(closes.len(), 1, "{books}");
    assert_eq!(closes[0]["subscribers"], 2, "{books}");
    // 3 payments of 5.00 USD bought 1,500 tokens, all allocated.
    assert_eq!(closes[0]["tokens_allocated"], 1_500, "{books}");
    // The journal both wrote, downloaded, verifies whole and signed whole:
    // the server's checkpoint covers what the CLI wrote, too.
    let key = s.ok(&["ledger", "key"]).stdout().trim().to_string();
    let path = s.dir.join("ledger.export");
    let download_and_verify = || {
        let (code, export) = http(server.port, "GET", "/api/books/export", &[], b"").unwrap();
        assert_eq!(code, 200);
        std::fs::write(&path, export).unwrap();
        let verified = s
            .ok(&[
                "ledger",
                "verify",
                path.to_str().unwrap(),
                "--key",
                &key,
                "--json",
            ])
            .json();
        assert_eq!(verified["signed_size"], verified["entries"], "{verified}");
        verified["entries"].as_u64().unwrap()
    };
    let entries = download_and_verify();
    // The CLI writes again: the next download is made anew and covers it.
    s.ok(&["subscribe", "cara", "member", "--payment", "bank-4"]);
    assert!(download_and_verify() > entries);
}
