//! CommonsCents for people, in a real browser (headless Chromium): a
//! visitor signs up, subscribes through the Stripe-shaped test server (its
//! signed webhook comes back), uses a site through the gateway, and after
//! the period closes sees where their money went — figures that sum exactly
//! to what they paid and equal the recipients' public statements, whose
//! lines are proven in the signed journal. The open books need no log-in.
//! Screenshots are kept under `target/console-screenshots/`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::browser::*;
use common::stripe::*;
use common::*;
use serde_json::Value;

#[test]
fn a_subscriber_follows_their_money_from_checkout_to_the_open_books() {
    let s = Sandbox::new("money-console");
    // A site built on a project that is built on another: the payment
    // reaches both, level by level.
    s.blueprint(
        "name: club\ndepends_on_projects:\n  - { project: example.org/app, weight: 1 }\n\
         components:\n  web:\n    process: \"python3 -m http.server --bind 127.0.0.1 $PORT\"\n    \
         health: { http: \"/\" }\n    route: { login: [/] }\n",
    );
    ledger_with(
        &s,
        r#"{ "projects": { "example.org/app": { "depends_on": [["example.org/lib", 1]] } } }"#,
    );
    s.ok(&["deploy"]);
    let closer = s
        .ok(&["token", "create", "closer", "--scope", "periods:close"])
        .stdout()
        .trim()
        .to_string();
    let key = s.ok(&["ledger", "key"]).stdout().trim().to_string();
    let platform = Arc::new(Mutex::new(0u16));
    let stripe = FakeStripe::start(platform.clone());
    let base = format!("http://127.0.0.1:{}", stripe.port);
    let server = s.serve(&[
        ("COMMONS_STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("COMMONS_STRIPE_SECRET_KEY", SECRET_KEY),
        ("COMMONS_STRIPE_API_BASE", &base),
        ("COMMONS_STRIPE_PRICES", "member=price_member_1"),
    ]);
    *platform.lock().unwrap() = server.port;
    let console = format!("http://127.0.0.1:{}/console", server.port);
    let books = format!("http://127.0.0.1:{}/books", server.port);
    let club = format!("http://club.localhost:{}/", server.http);
    let period = commons_meter::format_time(commons_clock::now_ms() as i64)[..7].to_string();

    let driver = Driver::start(s.dir.join("chromium-profile"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&format!("{console}/signup")).await.unwrap();
        arrive(&c, "Sign up").await;
        fill(&c, "name", "Fay").await;
        fill(&c, "email", "fay@example.org").await;
        fill(&c, "password", "a long enough password").await;
        click(&c, Locator::Css("button[type=submit]")).await;
        arrive(&c, "Your sites").await;

        // Subscribe: the console sends the browser to the checkout page,
        // where paying makes "Stripe" send the signed webhook back.
        c.goto(&format!("{console}/billing")).await.unwrap();
        arrive(&c, "Subscription").await;
        accessible(&c, "billing").await;
        shot(&c, "billing-tiers").await;
        click(&c, Locator::XPath("//button[text()='Subscribe to member']")).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.source().await.unwrap().contains("\"webhook\":200") {
            assert!(
                Instant::now() < deadline,
                "the checkout page was not reached"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.goto(&format!("{console}/billing")).await.unwrap();
        arrive(&c, "Subscription").await;
        let text = text_of(&c, Locator::Css("main")).await;
        assert!(text.contains("You subscribe to member"), "{text}");
        shot(&c, "billing-subscribed").await;

        // Use the site through the gateway, signed in (its page needs it).
        for _ in 0..3 {
            c.goto(&club).await.unwrap();
            arrive(&c, "Directory listing for /").await;
        }
        let started = Instant::now();
        loop {
            c.goto(&format!("{console}/usage")).await.unwrap();
            if c.source().await.unwrap().contains("club") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no usage shown"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        accessible(&c, "usage").await;
        shot(&c, "money-usage").await;

        // The period closes (the platform's job, by its API).
        let (code, closed) = Api::token(server.port, &closer)
            .post(&format!("/api/periods/{period}/close"), Value::Null);
        assert_eq!(code, 200, "{closed}");
        assert_eq!(closed["subscribers"], 1, "{closed}");

        // Where the money went: a picture, and every figure in a table.
        c.goto(&format!("{console}/money")).await.unwrap();
        arrive(&c, &format!("Where your money went, {period}")).await;
        accessible(&c, "money").await;
        let flow = c.find(Locator::Css("svg.flow")).await.unwrap();
        let described = flow.attr("aria-label").await.unwrap().unwrap_or_default();
        assert!(
            described.contains("site club to operator local"),
            "{described}"
        );
        assert!(
            described.contains("project example.org/app to project example.org/lib"),
            "{described}"
        );
        // On the page itself: paid 5.00, of which 0.45 to Stripe, and the
        // figures of the split add up to the 455 CommonCents the rest bought.
        let text = text_of(&c, Locator::Css("main")).await;
        assert!(
            text.contains("5.00 USD") && text.contains("0.45 USD"),
            "{text}"
        );
        let figures = c
            .execute(
                "const rows = [...document.querySelectorAll('main table:last-of-type tr')];
                 return rows.slice(1).map(r => [...r.cells].map(c => c.textContent));",
                vec![],
            )
            .await
            .unwrap();
        let rows = figures.as_array().unwrap();
        let (total, parts) = rows.split_last().unwrap();
        let sum: u64 = parts
            .iter()
            .map(|r| r[3].as_str().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(total[1].as_str(), Some("455"), "{figures}");
        assert_eq!(sum, 455, "{figures}");
        shot(&c, "money-where-it-went").await;
        c.close().await.unwrap();
    });

    // The same figures as data: they sum to the payment, exactly.
    let fay = login(server.port, "fay@example.org", false);
    let (code, money) = fay.get("/api/me/money");
    assert_eq!(code, 200, "{money}");
    assert_eq!(money["period"], period.as_str());
    let payment = &money["payments"][0];
    let (gross, fee, bought) = (
        payment["gross"].as_u64().unwrap(),
        payment["fee"].as_u64().unwrap(),
        payment["tokens"].as_u64().unwrap(),
    );
    // Stripe's invoice: 5.00 USD paid, 0.45 USD kept by Stripe; at the
    // bootstrap's price of a cent a token, the rest bought 455.
    assert_eq!((gross, fee, bought), (500, 45, 455), "{money}");
    let tokens = money["tokens"].as_u64().unwrap();
    assert_eq!(tokens, bought, "everything bought was allocated");
    let shares = money["shares"].as_array().unwrap();
    assert_eq!(
        shares
            .iter()
            .map(|x| x["amount"].as_u64().unwrap())
            .sum::<u64>(),
        tokens
    );
    assert_eq!(
        fee + tokens,
        gross,
        "every cent of the payment is accounted for"
    );
    // The flows leaving the payment carry all of it; each project's band
    // carries what it kept and what it passed on.
    let flows = money["flows"].as_array().unwrap();
    let out_of = |node: &str| -> u64 {
        flows
            .iter()
            .filter(|f| f["from"] == node)
            .map(|f| f["amount"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(out_of("Your payment"), tokens);
    let into = |node: &str| -> u64 {
        flows
            .iter()
            .filter(|f| f["to"] == node)
            .map(|f| f["amount"].as_u64().unwrap())
            .sum()
    };
    let kept = |recipient: &str| -> u64 {
        shares
            .iter()
            .filter(|x| x["recipient"] == recipient)
            .map(|x| x["amount"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        into("project example.org/app"),
        kept("tokens:project:example.org/app") + kept("tokens:project:example.org/lib")
    );
    assert_eq!(
        into("project example.org/lib"),
        kept("tokens:project:example.org/lib")
    );
    assert!(kept("tokens:project:example.org/lib") > 0, "{money}");

    // Each share is the recipient's public statement line (Fay is the only
    // subscriber), in the JSON, on the page and in the CSV.
    let anon = Api::anonymous(server.port);
    for share in shares {
        let account = share["recipient"].as_str().unwrap();
        let recipient = account.strip_prefix("tokens:").unwrap();
        let (code, st) = anon.get(&format!("/api/books/statement?recipient={recipient}"));
        assert_eq!(code, 200, "{st}");
        let line = st["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["period"] == period.as_str() && l["site"] == share["site"])
            .unwrap_or_else(|| panic!("no line of {recipient} for {share}: {st}"));
        assert_eq!(line["amount"], share["amount"], "{recipient}");
        let (code, csv) = http(
            server.port,
            "GET",
            &format!("/books/statement?recipient={recipient}&format=csv"),
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(code, 200);
        let site = share["site"].as_str().unwrap();
        let row = format!(
            "{period},{recipient},{site},1,{},1",
            share["amount"].as_u64().unwrap()
        );
        assert!(csv.lines().any(|l| l == row), "{row} not in {csv}");
    }

    // The books' totals of the period: paid, fees, and the close's split of
    // the rest, which sums to it.
    let (_, books_json) = anon.get("/api/books");
    let totals = books_json["periods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["period"] == period.as_str())
        .unwrap_or_else(|| panic!("no totals for {period}: {books_json}"))
        .clone();
    assert_eq!(
        (totals["paid_cents"].as_u64(), totals["fees_cents"].as_u64()),
        (Some(500), Some(45))
    );
    let parts: u64 = ["general_fund", "providers", "operators", "projects"]
        .iter()
        .map(|k| totals[k].as_u64().unwrap())
        .sum();
    assert_eq!(
        (totals["allocated"].as_u64(), parts),
        (Some(tokens), tokens),
        "{totals}"
    );

    // A statement line's proof of inclusion verifies offline; changed, it fails.
    let (code, proofs) = anon.get(&format!(
        "/api/books/proof?recipient=operator:local&period={period}"
    ));
    assert_eq!(code, 200, "{proofs}");
    let file = s.dir.join("proofs.json");
    std::fs::write(&file, proofs.to_string()).unwrap();
    let checked = s
        .ok(&[
            "ledger",
            "verify",
            file.to_str().unwrap(),
            "--key",
            &key,
            "--json",
        ])
        .json();
    assert_eq!(
        checked[0]["amount"].as_u64(),
        Some(kept("tokens:operator:local"))
    );
    let forged = proofs
        .to_string()
        .replacen("\\\"subscribers\\\":1", "\\\"subscribers\\\":2", 1);
    assert_ne!(
        forged,
        proofs.to_string(),
        "the proof names its subscribers count"
    );
    std::fs::write(&file, forged).unwrap();
    let r = s.run(&["ledger", "verify", file.to_str().unwrap(), "--key", &key]);
    assert_eq!(r.code(), 1, "a changed line verified: {}", r.all());

    // Bad input: a problem document, and nothing changes.
    let (code, p) = fay.get("/api/me/money?period=2026-13");
    assert_eq!(code, 400, "{p}");
    let (code, p) = anon.get("/api/books/statement?recipient=nobody");
    assert_eq!(code, 422, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("operator:ID"), "{p}");
    let (code, p) = anon.post(&format!("/api/periods/{period}/close"), Value::Null);
    assert_eq!(code, 401, "{p}");
    let (code, p) = Api::token(server.port, &closer).post("/api/periods/2026-1/close", Value::Null);
    assert_eq!(code, 400, "{p}");
    let (code, again) =
        Api::token(server.port, &closer).post(&format!("/api/periods/{period}/close"), Value::Null);
    assert_eq!(
        (code, &again["subscribers"]),
        (200, &Value::from(0)),
        "{again}"
    );
    assert_eq!(fay.get("/api/me/money").1["tokens"], tokens);

    // The open books and a statement, in a browser with no log-in: they
    // name no subscriber.
    let fay_id = money["shares"][0]["subscriber"]
        .as_str()
        .unwrap()
        .to_string();
    let driver = Driver::start(s.dir.join("chromium-profile-anonymous"));
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&books).await.unwrap();
        arrive(&c, "Open books").await;
        accessible(&c, "books").await;
        let page = c.source().await.unwrap();
        assert!(page.contains("Periods") && page.contains(&period), "{page}");
        // What Fay paid and Stripe kept, beside what the close allocated.
        assert!(
            page.contains("5.00 USD") && page.contains("0.45 USD"),
            "{page}"
        );
        assert!(
            page.contains(&tokens.to_string()),
            "the period's total: {page}"
        );
        assert!(
            !page.contains(&fay_id) && !page.contains("fay@"),
            "a subscriber is named"
        );
        shot(&c, "books").await;
        click(&c, Locator::LinkText("operator:local")).await;
        arrive(&c, "Statement of operator:local").await;
        accessible(&c, "statement").await;
        let page = c.source().await.unwrap();
        assert!(page.contains("Download as CSV"), "{page}");
        assert!(!page.contains(&fay_id), "a subscriber is named");
        shot(&c, "statement").await;
        c.close().await.unwrap();
    });
}
