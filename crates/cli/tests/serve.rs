//! `commons serve`: the usage batch API and the Stripe webhook over real HTTP.

mod common;

use common::*;
use commons_ledger::payments::Stripe;

const SECRET: &str = "whsec_serve_test_91b2";

fn event(id: &str, bytes: u64) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "gateway/node-1", "type": "request",
        "time": commons_meter::format_time(now),
        "data": { "user": "alice", "site": "wiki", "operator": "acme", "provider": "p1", "bytes_out": bytes }
    })
}

#[test]
fn usage_batches_need_a_scoped_token_and_conflicts_are_409() {
    let s = Sandbox::new("serve-usage");
    let writer = s
        .ok(&["token", "create", "gateway", "--scope", "usage:write"])
        .stdout()
        .trim()
        .to_string();
    let reader = s
        .ok(&["token", "create", "dash", "--scope", "billing:read"])
        .stdout()
        .trim()
        .to_string();
    // Only hashes are kept.
    let stored = std::fs::read_to_string(s.home.join("tokens.json")).unwrap();
    assert!(!stored.contains(&writer));
    let server = s.serve(&[]);
    let body = serde_json::to_vec(&vec![event("e1", 10), event("e2", 20)]).unwrap();
    let (code, out) = http(server.port, "POST", "/api/usage/events", &[], &body).unwrap();
    assert_eq!(code, 401, "{out}");
    let auth = format!("Bearer {reader}");
    let (code, _) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 403, "a token without usage:write");
    let auth = format!("Bearer {writer}");
    let (code, out) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["accepted"], 2);
    // The same batch again: duplicates, still 200.
    let (code, out) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["duplicates"],
        2
    );
    // Same id, other payload: 409 with an RFC 9457 problem listing outcomes.
    let changed = serde_json::to_vec(&vec![event("e1", 99)]).unwrap();
    let (code, out) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &changed,
    )
    .unwrap();
    assert_eq!(code, 409, "{out}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["status"], 409);
    assert!(p["outcomes"][0]["rejected"]["reason"] == "conflict", "{p}");
    let (code, out) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        b"{not json",
    )
    .unwrap();
    assert_eq!(code, 400, "{out}");
    assert!(out.contains("\"title\""));
    // Revoked tokens stop working.
    let id = s.ok(&["token", "list", "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.ok(&["token", "revoke", &id]);
    let (code, _) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 403);
}

#[test]
fn stripe_webhooks_subscribe_and_bad_signatures_are_refused() {
    let s = Sandbox::new("serve-stripe");
    s.ok(&[
        "ledger",
        "bootstrap",
        "--cash",
        "100000",
        "--tokens",
        "100000",
    ]);
    let reader = s
        .ok(&["token", "create", "gateway", "--scope", "billing:read"])
        .stdout()
        .trim()
        .to_string();
    let server = s.serve(&[("COMMONS_STRIPE_WEBHOOK_SECRET", SECRET)]);
    let body = serde_json::to_vec(&serde_json::json!({
        "id": "evt_100", "type": "invoice.paid",
        "data": { "object": { "id": "in_100", "amount_paid": 500, "billing_reason": "subscription_create",
            "charge": { "balance_transaction": { "fee": 45 } },
            "subscription_details": { "metadata": { "user": "alice", "tier": "member" } } } }
    }))
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let hook = "/api/payments/stripe/webhook";
    let forged = Stripe::sign("whsec_wrong", now, &body);
    assert_eq!(
        http(
            server.port,
            "POST",
            hook,
            &[("Stripe-Signature", &forged)],
            &body
        )
        .unwrap()
        .0,
        400
    );
    let stale = Stripe::sign(SECRET, now - 3600, &body);
    let (code, out) = http(
        server.port,
        "POST",
        hook,
        &[("Stripe-Signature", &stale)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 400);
    assert!(out.contains("tolerance"), "{out}");
    let good = Stripe::sign(SECRET, now, &body);
    let (code, out) = http(
        server.port,
        "POST",
        hook,
        &[("Stripe-Signature", &good)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    // Stripe redelivers: acknowledged, nothing moves.
    let (code, out) = http(
        server.port,
        "POST",
        hook,
        &[("Stripe-Signature", &good)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(out.contains("duplicate"), "{out}");
    let auth = format!("Bearer {reader}");
    let (code, out) = http(
        server.port,
        "GET",
        "/api/users/alice/tier",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    assert!(out.contains("\"member\""), "{out}");
    drop(server);
    // The payment minted 455 tokens (500 less Stripe's 45) into alice's escrow, once.
    let b = s
        .ok(&["ledger", "balance", "tokens:escrow:alice", "--json"])
        .json();
    assert_eq!(b[0]["balance"]["credits_posted"], 455);
}
