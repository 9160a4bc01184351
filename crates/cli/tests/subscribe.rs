//! Subscribing through Stripe Checkout, end to end over real HTTP: the
//! platform calls a server (tests/common/stripe.rs) that speaks Stripe's API shape
//! (https://docs.stripe.com/api), which checks every request the way
//! Stripe would, hands out a checkout session, and — when the test "pays"
//! on its checkout page — sends the signed webhook back, as Stripe does.
//! Nothing here reaches the internet.

mod common;

use std::sync::{Arc, Mutex};

use common::stripe::*;
use common::*;
use serde_json::{json, Value};

#[test]
fn a_user_subscribes_through_stripe_checkout_and_the_webhook_starts_it() {
    let s = Sandbox::new("subscribe-checkout");
    s.ok(&[
        "ledger",
        "bootstrap",
        "--cash",
        "100000",
        "--tokens",
        "100000",
    ]);
    let platform = Arc::new(Mutex::new(0u16));
    let stripe = FakeStripe::start(platform.clone());
    let base = format!("http://127.0.0.1:{}", stripe.port);
    let server = s.serve(&[
        ("COMMONS_STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("COMMONS_STRIPE_SECRET_KEY", SECRET_KEY),
        ("COMMONS_STRIPE_API_BASE", &base),
        (
            "COMMONS_STRIPE_PRICES",
            "member=price_member_1,patron=price_patron_1",
        ),
    ]);
    *platform.lock().unwrap() = server.port;
    let ann = signup(server.port, "ann@example.org", "Ann");
    let ann_id = ann["user"]["id"].as_str().unwrap().to_string();
    let web = login(server.port, "ann@example.org", true);

    // The tiers and their prices are public.
    let (code, tiers) = Api::anonymous(server.port).get("/api/billing/tiers");
    assert_eq!(code, 200, "{tiers}");
    let prices: Vec<(String, u64)> = tiers["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().into(),
                t["price"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        prices,
        [
            ("free".into(), 0),
            ("member".into(), 500),
            ("patron".into(), 2000)
        ]
    );

    // Bad input is refused before anything reaches Stripe.
    let checkout = "/api/me/subscription/checkout";
    let (code, p) = web.post(checkout, json!({ "tier": "gold" }));
    assert_eq!(code, 422, "{p}");
    assert_eq!(p["title"], "Unknown tier");
    assert!(p["detail"].as_str().unwrap().contains("member"), "{p}");
    let (code, p) = web.post(checkout, json!({ "tier": "free" }));
    assert_eq!(code, 422, "{p}");
    assert!(stripe.seen().is_empty(), "{:?}", stripe.seen());

    // Subscribe: one Checkout Session, made the way Stripe's API wants it.
    let (code, session) = web.post(checkout, json!({ "tier": "member" }));
    assert_eq!(code, 201, "{session}");
    let url = session["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&format!("{base}/pay/cs_test_")), "{url}");
    let seen = stripe.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let r = &seen[0];
    // Endpoint: POST /v1/checkout/sessions.
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/checkout/sessions")
    );
    // Authentication: the secret key as a bearer token.
    assert_eq!(r.headers["authorization"], format!("Bearer {SECRET_KEY}"));
    // Versioning: the Stripe-Version header pins the API version.
    assert_eq!(r.headers["stripe-version"], "2024-06-20");
    // Idempotent requests: an Idempotency-Key header (Stripe: up to 255 characters).
    let key = &r.headers["idempotency-key"];
    assert!(!key.is_empty() && key.len() <= 255, "{key}");
    // Parameters: application/x-www-form-urlencoded.
    assert_eq!(
        r.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    // mode, line_items[0][price], line_items[0][quantity].
    assert_eq!(r.form["mode"], "subscription");
    assert_eq!(r.form["line_items[0][price]"], "price_member_1");
    assert_eq!(r.form["line_items[0][quantity]"], "1");
    // client_reference_id and the subscription's metadata name the account.
    assert_eq!(r.form["client_reference_id"], ann_id);
    assert_eq!(r.form["subscription_data[metadata][user]"], ann_id);
    assert_eq!(r.form["subscription_data[metadata][tier]"], "member");
    // success_url and cancel_url come back to the console.
    let console = format!("http://127.0.0.1:{}/console/billing", server.port);
    assert_eq!(r.form["success_url"], format!("{console}?checkout=done"));
    assert_eq!(
        r.form["cancel_url"],
        format!("{console}?checkout=cancelled")
    );
    // The secret key is in no answer the platform gives.
    assert!(!session.to_string().contains(SECRET_KEY));

    // A second click before paying is the same request to Stripe: same key, same session.
    let (code, again) = web.post(checkout, json!({ "tier": "member" }));
    assert_eq!(code, 201, "{again}");
    assert_eq!(again["id"], session["id"]);
    assert_eq!(stripe.seen()[1].headers["idempotency-key"], *key);

    // Nothing is subscribed until Stripe says it was paid.
    let (_, mine) = web.get("/api/me/subscription");
    assert!(mine["subscription"].is_null(), "{mine}");

    // Paying on the checkout page: Stripe sends the signed webhook back.
    let pay = url.trim_start_matches(&base).to_string();
    let (code, paid) = http(stripe.port, "POST", &pay, &[], b"").unwrap();
    assert_eq!(code, 200, "{paid}");
    let paid: Value = serde_json::from_str(&paid).unwrap();
    assert_eq!(paid["webhook"], 200, "{paid}");
    let (_, mine) = web.get("/api/me/subscription");
    assert_eq!(mine["subscription"]["tier"], "member", "{mine}");
    assert_eq!(mine["subscription"]["status"], "active", "{mine}");

    // Subscribing twice is refused, and Stripe is not asked.
    let before = stripe.seen().len();
    let (code, p) = web.post(checkout, json!({ "tier": "patron" }));
    assert_eq!(code, 409, "{p}");
    assert_eq!(p["title"], "Already subscribed");
    assert_eq!(stripe.seen().len(), before);

    // Upgrading: at once, Stripe invoicing the prorated difference now.
    let before = stripe.seen().len();
    let (code, up) = web.call(
        "PUT",
        "/api/me/subscription",
        Some(json!({ "tier": "patron" })),
    );
    assert_eq!(code, 200, "{up}");
    assert_eq!(up["change"]["effective"], "now", "{up}");
    let charge = up["change"]["charge_now"].as_u64().unwrap();
    assert!(
        charge > 1_400 && charge <= 1_500,
        "prorated 15.00 USD: {up}"
    );
    assert_eq!(up["subscription"]["tier"], "patron", "{up}");
    let seen = stripe.seen()[before..].to_vec();
    let sub = format!("/v1/subscriptions/sub_{}", session["id"].as_str().unwrap());
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Retrieve the subscription (GET /v1/subscriptions/{id}) for its item:
    // a GET has no body and needs no idempotency key.
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", sub.as_str())
    );
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {SECRET_KEY}")
    );
    assert_eq!(seen[0].headers["stripe-version"], "2024-06-20");
    assert!(!seen[0].headers.contains_key("idempotency-key"));
    // Update it (POST /v1/subscriptions/{id}): items[0][id] names the item,
    // items[0][price] the new price, proration_behavior=always_invoice
    // bills the difference now, cancel_at_period_end=false keeps it renewing.
    let r = &seen[1];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", sub.as_str()));
    assert_eq!(
        r.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(
        r.form["items[0][id]"],
        format!("si_{}", session["id"].as_str().unwrap())
    );
    assert_eq!(r.form["items[0][price]"], "price_patron_1");
    assert_eq!(r.form["proration_behavior"], "always_invoice");
    assert_eq!(r.form["cancel_at_period_end"], "false");
    assert!(!r.headers["idempotency-key"].is_empty());
    // The prorated invoice came back by webhook and was recorded.
    let (_, money) = web.get("/api/me/money");
    let paid: Vec<u64> = money["payments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["gross"].as_u64().unwrap())
        .collect();
    assert_eq!(paid, [500, 1_000], "{money}");
    // The same tier again is refused; so are tiers that are not paid ones.
    let (code, p) = web.call(
        "PUT",
        "/api/me/subscription",
        Some(json!({ "tier": "patron" })),
    );
    assert_eq!(code, 409, "{p}");
    assert_eq!(p["title"], "Already on this tier");
    for (tier, title) in [("gold", "Unknown tier"), ("free", "Not a paid tier")] {
        let (code, p) = web.call("PUT", "/api/me/subscription", Some(json!({ "tier": tier })));
        assert_eq!((code, p["title"].as_str()), (422, Some(title)), "{p}");
    }
    // Downgrading: from the next renewal, nothing billed now.
    let (code, down) = web.call(
        "PUT",
        "/api/me/subscription",
        Some(json!({ "tier": "member" })),
    );
    assert_eq!(code, 200, "{down}");
    assert_eq!(down["change"]["effective"], "renewal", "{down}");
    assert_eq!(down["change"]["charge_now"], 0);
    assert_eq!(down["subscription"]["tier"], "patron");
    assert_eq!(down["subscription"]["next_tier"], "member");
    let r = stripe.seen().pop().unwrap();
    assert_eq!(r.form["items[0][price]"], "price_member_1");
    assert_eq!(r.form["proration_behavior"], "none");

    // Cancelling: Stripe's subscription stops at the period's end, then ours.
    let (code, cancelled) = web.call("DELETE", "/api/me/subscription", None);
    assert_eq!(code, 200, "{cancelled}");
    assert_eq!(cancelled["subscription"]["status"], "canceled");
    assert_eq!(cancelled["subscription"]["tier"], "patron");
    let r = stripe.seen().pop().unwrap();
    let session_id = session["id"].as_str().unwrap();
    // Endpoint: POST /v1/subscriptions/{id} (update a subscription).
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        (
            "POST",
            format!("/v1/subscriptions/sub_{session_id}").as_str()
        )
    );
    // cancel_at_period_end=true: the term paid for runs out.
    assert_eq!(r.form["cancel_at_period_end"], "true");
    assert_eq!(r.headers["authorization"], format!("Bearer {SECRET_KEY}"));
    assert_eq!(r.headers["stripe-version"], "2024-06-20");
    assert!(!r.headers["idempotency-key"].is_empty());
    // The tier lasts to the term's end.
    let reader_view = web.get("/api/me/subscription").1;
    assert_eq!(reader_view["subscription"]["tier"], "patron");
    // Cancelling a cancelled subscription is refused, and Stripe is not asked.
    let before = stripe.seen().len();
    let (code, p) = web.call("DELETE", "/api/me/subscription", None);
    assert_eq!(code, 409, "{p}");
    assert_eq!(p["title"], "Already cancelled");
    assert_eq!(stripe.seen().len(), before);

    // The console shows the subscription; another user's console form goes to Stripe.
    let (code, _, html) = web.raw("GET", "/console/billing", None);
    assert_eq!(code, 200);
    assert!(
        html.contains("You subscribe to <strong>patron</strong>"),
        "{html}"
    );
    assert!(html.contains("does not renew"), "{html}");
    signup(server.port, "bob@example.org", "Bob");
    let bob = login(server.port, "bob@example.org", true);
    let (_, _, html) = bob.raw("GET", "/console/billing", None);
    assert!(html.contains("Subscribe to patron"), "{html}");
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let cookie = bob
        .headers
        .iter()
        .find(|(k, _)| k == "Cookie")
        .unwrap()
        .1
        .clone();
    let (code, head, _) = http_with_head(
        server.port,
        "POST",
        "/console/billing/checkout",
        &[
            ("Cookie", &cookie),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("csrf={csrf}&tier=patron").as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 303, "{head}");
    let (location, _) = location_and_cookies(&head);
    assert!(
        location.starts_with(&format!("{base}/pay/cs_test_")),
        "{location}"
    );
    let last = stripe.seen().pop().unwrap();
    assert_eq!(last.form["subscription_data[metadata][tier]"], "patron");
    assert_ne!(last.form["client_reference_id"], ann_id);

    // An operator refunds the upgrade's payment: Stripe refunds the card
    // (POST /v1/refunds with the invoice's charge), its webhook records it,
    // and the subscription lapses. Once only.
    let operator = Api::token(
        server.port,
        s.ok(&["token", "create", "refunds", "--scope", "billing:write"])
            .stdout()
            .trim(),
    );
    let upgrade = format!("in_{session_id}_subscription_update");
    let before = stripe.seen().len();
    let (code, refund) = operator.post(&format!("/api/payments/{upgrade}/refund"), Value::Null);
    assert_eq!(code, 200, "{refund}");
    // What the payment brought in: 10.00 USD less Stripe's 0.59 USD fee.
    assert_eq!(
        (refund["status"].as_str(), refund["amount"].as_u64()),
        (Some("requested"), Some(941))
    );
    let seen = stripe.seen()[before..].to_vec();
    // Retrieve the invoice (GET /v1/invoices/{id}) for its charge.
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", format!("/v1/invoices/{upgrade}").as_str())
    );
    // Create a refund (POST /v1/refunds): charge, amount in the smallest
    // currency unit, reason, metadata; idempotent.
    let r = &seen[1];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/refunds")
    );
    assert_eq!(r.form["charge"], format!("ch_{upgrade}"));
    assert_eq!(r.form["amount"], "941");
    assert_eq!(r.form["reason"], "requested_by_customer");
    assert_eq!(r.form["metadata[payment]"], upgrade);
    assert_eq!(r.headers["idempotency-key"], format!("refund-{upgrade}"));
    assert_eq!(r.headers["authorization"], format!("Bearer {SECRET_KEY}"));
    let (_, money) = web.get("/api/me/money");
    assert_eq!(money["payments"][1]["refunded"], 941, "{money}");
    assert_eq!(
        web.get("/api/me/subscription").1["subscription"]["status"],
        "lapsed"
    );
    let (code, p) = operator.post(&format!("/api/payments/{upgrade}/refund"), Value::Null);
    assert_eq!(
        (code, p["title"].as_str()),
        (409, Some("Already refunded")),
        "{p}"
    );
    let (code, p) = operator.post("/api/payments/in_nothing/refund", Value::Null);
    assert_eq!(code, 404, "{p}");
    let (code, _) = web.post(&format!("/api/payments/{upgrade}/refund"), Value::Null);
    assert_eq!(code, 401, "a user's session is no operator's token");

    // The manual path, for payments by hand: recorded, then refunded at once.
    let cara = signup(server.port, "cara@example.org", "Cara");
    let cara_id = cara["user"]["id"].as_str().unwrap();
    let manual = json!({ "reference": "bank-7", "user": cara_id, "tier": "member" });
    let (code, paid) = operator.post("/api/payments/manual", manual.clone());
    assert_eq!(
        (code, paid["payment_id"].as_str()),
        (201, Some("manual:bank-7")),
        "{paid}"
    );
    let (code, _) = operator.post("/api/payments/manual", manual);
    assert_eq!(code, 201, "a repeat is harmless");
    let cara_web = login(server.port, "cara@example.org", true);
    assert_eq!(
        cara_web.get("/api/me/subscription").1["subscription"]["tier"],
        "member"
    );
    let (code, p) = operator.post(
        "/api/payments/manual",
        json!({ "reference": "bank-8", "user": "nobody", "tier": "member" }),
    );
    assert_eq!(code, 422, "{p}");
    let (code, refund) = operator.post("/api/payments/manual:bank-7/refund", Value::Null);
    assert_eq!(
        (code, refund["status"].as_str(), refund["amount"].as_u64()),
        (200, Some("refunded"), Some(500)),
        "{refund}"
    );
    assert_eq!(
        cara_web.get("/api/me/subscription").1["subscription"]["status"],
        "lapsed"
    );
}
