//! Stripe webhook verification, every tier change, and payments flowing into
//! the ledger exactly once.

use commons_ledger::billing::{default_tiers, Billing, Handled, TERM_MS};
use commons_ledger::cents::Cents;
use commons_ledger::journal::Journal;
use commons_ledger::payments::{Manual, PaymentEvent, PaymentProvider, Stripe, WebhookError};

const SECRET: &str = "whsec_test_4f1c0e";
const NOW_S: i64 = 1_795_000_000;

fn invoice(
    id: &str,
    invoice: &str,
    user: &str,
    tier: &str,
    amount: u64,
    fee: u64,
    reason: &str,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id,
        "object": "event",
        "type": "invoice.paid",
        "data": { "object": {
            "id": invoice, "object": "invoice", "amount_paid": amount, "billing_reason": reason,
            "charge": { "balance_transaction": { "fee": fee } },
            "subscription_details": { "metadata": { "user": user, "tier": tier } }
        }}
    }))
    .unwrap()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("commons-billing-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn stripe_signatures_valid_wrong_secret_stale_and_tampered() {
    let stripe = Stripe::new(SECRET);
    let body = invoice(
        "evt_1",
        "in_1",
        "alice",
        "member",
        500,
        45,
        "subscription_create",
    );
    let header = Stripe::sign(SECRET, NOW_S, &body);
    match stripe.webhook(&header, &body, NOW_S + 10).unwrap() {
        PaymentEvent::Paid {
            user,
            tier,
            gross,
            fee,
            renews,
            ..
        } => {
            assert_eq!(
                (user.as_str(), tier.as_str(), gross, fee, renews),
                ("alice", "member", 500, 45, true)
            );
        }
        other => panic!("{other:?}"),
    }
    // Signed with another secret.
    let forged = Stripe::sign("whsec_someone_else", NOW_S, &body);
    assert_eq!(
        stripe.webhook(&forged, &body, NOW_S),
        Err(WebhookError::BadSignature)
    );
    // A valid signature, replayed after the tolerance.
    assert!(matches!(
        stripe.webhook(&header, &body, NOW_S + 301),
        Err(WebhookError::Stale { .. })
    ));
    // The body changed after signing.
    let mut altered = body.clone();
    let pos = altered.windows(3).position(|w| w == b"500").unwrap();
    altered[pos] = b'9';
    assert_eq!(
        stripe.webhook(&header, &altered, NOW_S),
        Err(WebhookError::BadSignature)
    );
    // Several v1 signatures (secret rotation): any one valid is enough.
    let rotated = format!("{},v1={}", header, "00".repeat(32));
    assert!(stripe.webhook(&rotated, &body, NOW_S).is_ok());
    assert_eq!(
        stripe.webhook("v1=abc", &body, NOW_S),
        Err(WebhookError::MalformedHeader)
    );
    // Other event types are acknowledged and ignored.
    let other = serde_json::to_vec(
        &serde_json::json!({"id": "evt_9", "type": "customer.created", "data": {"object": {}}}),
    )
    .unwrap();
    let h = Stripe::sign(SECRET, NOW_S, &other);
    assert!(matches!(
        stripe.webhook(&h, &other, NOW_S).unwrap(),
        PaymentEvent::Ignored { .. }
    ));
    // The checkout request names the price and carries the user through.
    let req = stripe.checkout(
        "alice",
        "member",
        "price_123",
        "https://x/ok",
        "https://x/no",
    );
    assert!(req.url.ends_with("/v1/checkout/sessions"));
    assert!(req
        .form
        .contains(&("subscription_data[metadata][user]".into(), "alice".into())));
}

/// Billing's tables in SQLite, or in PostgreSQL (a fresh schema) when
/// `postgres` — the same rules either way.
fn billing_in(dir: &std::path::Path, name: &str, postgres: bool) -> Billing {
    if !postgres {
        return Billing::open(&dir.join("billing.db"), default_tiers()).unwrap();
    }
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("billing_test_{name}_{}", std::process::id());
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
        panic!("PostgreSQL is needed for this test ({url}): {e}; `bash scripts/test` starts it")
    });
    c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .unwrap();
    Billing::connect(&url, &schema, default_tiers()).unwrap()
}

#[test]
fn payments_subscribe_renew_and_replays_change_nothing() {
    payments_subscribe_renew(false);
}

#[test]
fn payments_subscribe_renew_and_replays_change_nothing_on_postgres() {
    payments_subscribe_renew(true);
}

fn payments_subscribe_renew(postgres: bool) {
    let dir = scratch(if postgres { "flow-pg" } else { "flow" });
    let mut journal = Journal::open(&dir.join("ledger.db")).unwrap();
    let billing = billing_in(&dir, "renew", postgres);
    let stripe = Stripe::new(SECRET);
    let mut cents = Cents {
        journal: &mut journal,
    };
    cents.bootstrap(100_000, 100_000).unwrap();
    let now = NOW_S * 1000;
    assert_eq!(billing.current_tier("alice", now).unwrap(), "free");

    let body = invoice(
        "evt_1",
        "in_1",
        "alice",
        "member",
        500,
        45,
        "subscription_create",
    );
    let event = stripe
        .webhook(&Stripe::sign(SECRET, NOW_S, &body), &body, NOW_S)
        .unwrap();
    assert_eq!(
        billing.handle(&event, &mut cents, now).unwrap(),
        Handled::Applied
    );
    assert_eq!(billing.current_tier("alice", now).unwrap(), "member");
    assert_eq!(cents.tokens("tokens:escrow:alice"), 455);
    // Stripe retries the same event: nothing moves.
    assert_eq!(
        billing.handle(&event, &mut cents, now).unwrap(),
        Handled::Duplicate
    );
    assert_eq!(cents.tokens("tokens:escrow:alice"), 455);
    assert_eq!(cents.reserve(), 100_000 + 455);

    // Renewal: due at the end of the term, extends it from its old end.
    let end = billing.subscription("alice").unwrap().unwrap().term_end_ms;
    assert!(billing.renewals_due(end - 1).unwrap().is_empty());
    assert_eq!(
        billing.renewals_due(end).unwrap(),
        [("alice".to_string(), "member".to_string(), 500)]
    );
    let renewal = Manual::payment("bank-77", "alice", "member", 500, 0);
    billing.handle(&renewal, &mut cents, end + 1_000).unwrap();
    assert_eq!(
        billing.subscription("alice").unwrap().unwrap().term_end_ms,
        end + TERM_MS
    );
    // What was paid, per month it was paid in: the same in both stores.
    let month = |ms: i64| {
        // The civil calendar's month of a day (H. Hinnant's days → date).
        let z = ms.div_euclid(86_400_000) + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
        format!("{y:04}-{m:02}")
    };
    let mut want: Vec<(String, u64, u64, u64)> = vec![(month(now), 500, 45, 0)];
    if month(end + 1_000) == month(now) {
        want[0] = (month(now), 1_000, 45, 0);
    } else {
        want.push((month(end + 1_000), 500, 0, 0));
    }
    assert_eq!(billing.paid_per_period().unwrap(), want);
    let (who, first) = billing.payment("in_1").unwrap().unwrap();
    assert_eq!(
        (who.as_str(), first.gross, first.fee, first.tokens),
        ("alice", 500, 45, 455)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn upgrade_prorates_downgrade_waits_cancel_runs_out_refund_lapses() {
    tier_changes(false);
}

#[test]
fn upgrade_prorates_downgrade_waits_cancel_runs_out_refund_lapses_on_postgres() {
    tier_changes(true);
}

fn tier_changes(postgres: bool) {
    let dir = scratch(if postgres { "tiers-pg" } else { "tiers" });
    let mut journal = Journal::open(&dir.join("ledger.db")).unwrap();
    let billing = billing_in(&dir, "tiers", postgres);
    let mut cents = Cents {
        journal: &mut journal,
    };
    cents.bootstrap(100_000, 100_000).unwrap();
    let t0 = NOW_S * 1000;
    billing
        .handle(
            &Manual::payment("p1", "bob", "member", 500, 0),
            &mut cents,
            t0,
        )
        .unwrap();

    // Upgrade halfway through: pays half of the 15.00 difference, at once.
    let half = t0 + TERM_MS / 2;
    let up = billing.change_tier("bob", "patron", half).unwrap();
    assert_eq!((up.effective, up.charge_now), ("now", 750));
    assert_eq!(billing.current_tier("bob", half).unwrap(), "patron");
    let mut proration = Manual::payment("p2", "bob", "patron", 750, 0);
    if let PaymentEvent::Paid { renews, .. } = &mut proration {
        *renews = false;
    }
    billing.handle(&proration, &mut cents, half).unwrap();
    assert_eq!(
        billing.subscription("bob").unwrap().unwrap().term_end_ms,
        t0 + TERM_MS,
        "a proration does not extend the term"
    );

    // Downgrade: waits for the renewal, which charges the lower price.
    let down = billing.change_tier("bob", "member", half + 1).unwrap();
    assert_eq!((down.effective, down.charge_now), ("renewal", 0));
    assert_eq!(billing.current_tier("bob", half + 1).unwrap(), "patron");
    let due = billing.renewals_due(t0 + TERM_MS).unwrap();
    assert_eq!(due, [("bob".to_string(), "member".to_string(), 500)]);
    billing
        .handle(
            &Manual::payment("p3", "bob", "member", 500, 0),
            &mut cents,
            t0 + TERM_MS,
        )
        .unwrap();
    assert_eq!(
        billing.current_tier("bob", t0 + TERM_MS + 1).unwrap(),
        "member"
    );

    // Cancel: the tier runs to the end of the term, then it is free; no renewal.
    let s = billing.cancel("bob").unwrap();
    assert_eq!(
        billing.current_tier("bob", s.term_end_ms - 1).unwrap(),
        "member"
    );
    assert_eq!(billing.current_tier("bob", s.term_end_ms).unwrap(), "free");
    assert!(billing.renewals_due(s.term_end_ms).unwrap().is_empty());

    // Unknown tiers are refused with the list of tiers.
    assert!(billing
        .change_tier("bob", "gold", t0)
        .unwrap_err()
        .to_string()
        .contains("free, member, patron"));

    // Refund: tokens burned from escrow, cash returned, subscription lapses.
    let carol = Manual::payment("p9", "carol", "member", 500, 0);
    billing.handle(&carol, &mut cents, t0).unwrap();
    let reserve = cents.reserve();
    let refund = PaymentEvent::Refunded {
        event_id: "r9".into(),
        payment_id: "manual:p9".into(),
        user: "carol".into(),
        amount: 500,
    };
    billing.handle(&refund, &mut cents, t0 + 1).unwrap();
    assert_eq!(cents.reserve(), reserve - 500);
    assert_eq!(cents.tokens("tokens:escrow:carol"), 0);
    assert_eq!(billing.current_tier("carol", t0 + 2).unwrap(), "free");
    journal.book().check().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
