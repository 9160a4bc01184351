//! A user's subscription: the tiers on offer, the one they have, and
//! subscribing through the payment provider's hosted checkout. Payment is
//! confirmed only by the provider's verified webhook, never by the browser
//! coming back.

use commons_ledger::billing::{Subscription, Tier, TierChange};
use commons_store::accounts::AuditEntry;

use super::{member, AppError, ErrorKind, Result};
use crate::accounts::Principal;
use crate::stripe_api::CheckoutSession;
use crate::AppState;
use commons_clock::now_ms;

/// How long one checkout stays the same: a second click within it gets
/// the session the first made (Stripe's idempotency), a later one a new one.
const CHECKOUT_WINDOW_MS: i64 = 10 * 60_000;

/// The tiers on offer, cheapest first.
pub fn tiers(state: &AppState) -> Vec<Tier> {
    let billing = state.billing.lock().expect("billing lock");
    let mut tiers = billing.tiers.clone();
    tiers.sort_by_key(|t| t.price);
    tiers
}

/// The caller's subscription, if they ever had one.
pub fn subscription(state: &AppState, who: &Principal) -> Result<Option<Subscription>> {
    let m = member(who)?;
    let billing = state.billing.lock().expect("billing lock");
    billing.subscription(&m.user.id).map_err(failed)
}

/// The tier named `tier`, or the error that lists those on offer.
fn offered_tier(state: &AppState, tier: &str) -> Result<Tier> {
    let offered = tiers(state);
    offered
        .iter()
        .find(|t| t.name == tier)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = offered.iter().map(|t| t.name.as_str()).collect();
            AppError::new(
                ErrorKind::Invalid,
                "Unknown tier",
                format!(
                    "there is no tier \"{tier}\"; choose one of {}",
                    names.join(", ")
                ),
            )
        })
}

fn failed(e: impl std::fmt::Display) -> AppError {
    AppError::new(ErrorKind::Internal, "Billing failed", e.to_string())
}

/// Starts subscribing the caller to `tier`: a hosted checkout where they
/// pay; the subscription starts when the provider's webhook says they did.
/// `return_to` is where the checkout sends them back (the console).
pub async fn checkout(
    state: &AppState,
    who: &Principal,
    tier: &str,
    return_to: &str,
) -> Result<CheckoutSession> {
    let m = member(who)?;
    let t = offered_tier(state, tier)?;
    if t.price == 0 {
        return Err(AppError::new(
            ErrorKind::Invalid,
            "Nothing to pay",
            format!("\"{tier}\" is free: every user has it without subscribing"),
        ));
    }
    let now = now_ms();
    let running = {
        let billing = state.billing.lock().expect("billing lock");
        billing
            .subscription(&m.user.id)
            .map_err(failed)?
            .filter(|s| s.status == "active" && now < s.term_end_ms)
    };
    if let Some(s) = running {
        return Err(AppError::new(
            ErrorKind::Conflict,
            "Already subscribed",
            format!(
                "you subscribe to \"{}\" until its term ends; change the tier instead of subscribing again",
                s.tier
            ),
        ));
    }
    let Some(stripe) = &state.stripe_api else {
        return Err(AppError::new(
            ErrorKind::Unavailable,
            "Payments are not set up",
            "this platform takes no card payments (no COMMONS_STRIPE_SECRET_KEY); its operator records payments by hand",
        ));
    };
    let Some(price) = stripe.price_of(tier) else {
        return Err(AppError::new(
            ErrorKind::Unavailable,
            "Tier has no price at the payment provider",
            format!("the operator has not given \"{tier}\" a Stripe price (COMMONS_STRIPE_PRICES)"),
        ));
    };
    let user = &m.user.id;
    let request = stripe.checkout_request(
        user,
        tier,
        price,
        &format!("{return_to}?checkout=done"),
        &format!("{return_to}?checkout=cancelled"),
    );
    let key = format!("checkout-{user}-{tier}-{}", now / CHECKOUT_WINDOW_MS);
    let session = stripe.create_checkout_session(&request, &key).await?;
    state.accounts.store().record(&AuditEntry {
        at_ms: now,
        actor: who.actor(),
        org: None,
        action: "billing.checkout".into(),
        target: user.clone(),
        detail: serde_json::json!({ "tier": tier, "session": session.id }),
    })?;
    Ok(session)
}

/// Cancels the caller's subscription: it stops renewing, at the payment
/// provider too, and the tier lasts to the end of the term paid for.
pub async fn cancel(state: &AppState, who: &Principal) -> Result<Subscription> {
    let m = member(who)?;
    let user = &m.user.id;
    let (current, provider) = {
        let billing = state.billing.lock().expect("billing lock");
        (
            billing.subscription(user).map_err(failed)?,
            billing.provider_subscription(user).map_err(failed)?,
        )
    };
    match current {
        None => {
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Not subscribed",
                "you have no subscription to cancel",
            ))
        }
        Some(s) if s.status != "active" => {
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Already cancelled",
                format!(
                    "your subscription to \"{}\" is {} already: it ends with its term and does not renew",
                    s.tier, s.status
                ),
            ))
        }
        Some(_) => {}
    }
    // The provider first: if it refuses, nothing changed here either.
    if let Some(id) = &provider {
        let Some(stripe) = &state.stripe_api else {
            return Err(AppError::new(
                ErrorKind::Unavailable,
                "Payments are not set up",
                "the subscription is paid through Stripe, which this platform is not configured to reach (COMMONS_STRIPE_SECRET_KEY)",
            ));
        };
        stripe.cancel_at_period_end(id).await?;
    }
    let s = {
        let billing = state.billing.lock().expect("billing lock");
        billing.cancel(user).map_err(failed)?
    };
    state.accounts.store().record(&AuditEntry {
        at_ms: now_ms(),
        actor: who.actor(),
        org: None,
        action: "billing.cancel".into(),
        target: user.clone(),
        detail: serde_json::json!({ "tier": s.tier, "provider": provider.is_some() }),
    })?;
    Ok(s)
}

/// Moves the caller's running subscription to another paid tier: an
/// upgrade at once, its prorated difference charged now; a downgrade from
/// the next renewal, nothing refunded. A subscription paid through the
/// payment provider is changed there first.
pub async fn change(
    state: &AppState,
    who: &Principal,
    tier: &str,
) -> Result<(TierChange, Subscription)> {
    let m = member(who)?;
    let user = &m.user.id;
    let offered = tiers(state);
    let to = offered_tier(state, tier)?;
    if to.price == 0 {
        return Err(AppError::new(
            ErrorKind::Invalid,
            "Not a paid tier",
            format!("\"{tier}\" is free: cancel the subscription to have it when the term ends"),
        ));
    }
    let now = now_ms();
    let (current, provider) = {
        let billing = state.billing.lock().expect("billing lock");
        (
            billing
                .subscription(user)
                .map_err(failed)?
                .filter(|s| s.status != "lapsed" && now < s.term_end_ms),
            billing.provider_subscription(user).map_err(failed)?,
        )
    };
    let Some(current) = current else {
        return Err(AppError::new(
            ErrorKind::Conflict,
            "Not subscribed",
            "you have no running subscription to change; subscribe first",
        ));
    };
    if current.tier == tier && current.next_tier.is_none() && current.status == "active" {
        return Err(AppError::new(
            ErrorKind::Conflict,
            "Already on this tier",
            format!("you subscribe to \"{tier}\" already"),
        ));
    }
    let from_price = offered
        .iter()
        .find(|t| t.name == current.tier)
        .map_or(0, |t| t.price);
    // The provider first: if it refuses, nothing changed here either.
    if let Some(id) = &provider {
        let Some(stripe) = &state.stripe_api else {
            return Err(AppError::new(
                ErrorKind::Unavailable,
                "Payments are not set up",
                "the subscription is paid through Stripe, which this platform is not configured to reach (COMMONS_STRIPE_SECRET_KEY)",
            ));
        };
        let Some(price) = stripe.price_of(tier) else {
            return Err(AppError::new(
                ErrorKind::Unavailable,
                "Tier has no price at the payment provider",
                format!(
                    "the operator has not given \"{tier}\" a Stripe price (COMMONS_STRIPE_PRICES)"
                ),
            ));
        };
        let key = format!("change-{id}-{tier}-{}", now / CHECKOUT_WINDOW_MS);
        stripe
            .change_price(id, price, to.price > from_price, &key)
            .await?;
    }
    let (change, s) = {
        let billing = state.billing.lock().expect("billing lock");
        let change = billing.change_tier(user, tier, now).map_err(failed)?;
        (change, billing.subscription(user).map_err(failed)?)
    };
    state.accounts.store().record(&AuditEntry {
        at_ms: now,
        actor: who.actor(),
        org: None,
        action: "billing.change".into(),
        target: user.clone(),
        detail: serde_json::json!({ "from": change.from, "to": change.to, "effective": change.effective, "charge_now": change.charge_now }),
    })?;
    Ok((change, s.expect("a subscription that was just changed")))
}

/// What a refund did.
#[derive(Debug, serde::Serialize)]
pub struct Refund {
    pub payment_id: String,
    /// Cents given back: what the payment brought in after the payment
    /// provider's fee, which the provider does not return.
    pub amount: u64,
    /// `refunded` (in the ledger now) or `requested` (the payment
    /// provider's webhook records it when the money has gone back).
    pub status: &'static str,
    /// The payment provider's refund, when it made one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_refund: Option<String>,
}

/// Gives a payment back, once, before its tokens are allocated: for the
/// platform's operators (the caller is authorised by the route). A payment
/// made through the payment provider is refunded there; one recorded by
/// hand is refunded in the ledger at once. The subscription lapses.
pub async fn refund(state: &AppState, payment_id: &str) -> Result<Refund> {
    let found = {
        let billing = state.billing.lock().expect("billing lock");
        billing.payment(payment_id).map_err(failed)?
    };
    let Some((user, payment)) = found else {
        return Err(AppError::new(
            ErrorKind::NotFound,
            "No such payment",
            format!("no payment \"{payment_id}\" was recorded"),
        ));
    };
    if payment.refunded > 0 {
        return Err(AppError::new(
            ErrorKind::Conflict,
            "Already refunded",
            format!(
                "{} cents of \"{payment_id}\" were refunded already",
                payment.refunded
            ),
        ));
    }
    let amount = payment.gross - payment.fee;
    if !payment_id.starts_with("manual:") {
        let Some(stripe) = &state.stripe_api else {
            return Err(AppError::new(
                ErrorKind::Unavailable,
                "Payments are not set up",
                "the payment came through Stripe, which this platform is not configured to reach (COMMONS_STRIPE_SECRET_KEY)",
            ));
        };
        let id = stripe.refund_invoice(payment_id, amount).await?;
        return Ok(Refund {
            payment_id: payment_id.to_string(),
            amount,
            status: "requested",
            provider_refund: Some(id),
        });
    }
    let event = commons_ledger::payments::Manual::refund(payment_id, &user, amount);
    apply_event(state, &event).map_err(|e| match e {
        commons_ledger::billing::BillingError::Cents(c) => {
            AppError::new(ErrorKind::Conflict, "Cannot refund", c.to_string())
        }
        e => failed(e),
    })?;
    Ok(Refund {
        payment_id: payment_id.to_string(),
        amount,
        status: "refunded",
        provider_refund: None,
    })
}

/// Records a payment made by hand (cash, a bank transfer): the operators'
/// path, for platforms that take no cards. `reference` is theirs and makes
/// a repeat harmless.
pub fn record_manual(
    state: &AppState,
    reference: &str,
    user: &str,
    tier: &str,
    amount: Option<u64>,
    fee: u64,
) -> Result<String> {
    let Some(t) = tiers(state)
        .into_iter()
        .find(|t| t.name == tier && t.price > 0)
    else {
        return Err(AppError::new(
            ErrorKind::Invalid,
            "Unknown tier",
            format!("there is no paid tier \"{tier}\""),
        ));
    };
    if state.accounts.store().user(user).map_err(failed)?.is_none() {
        return Err(AppError::new(
            ErrorKind::Invalid,
            "No such user",
            format!("no account has the id \"{user}\""),
        ));
    }
    let event = commons_ledger::payments::Manual::payment(
        reference,
        user,
        tier,
        amount.unwrap_or(t.price),
        fee,
    );
    apply_event(state, &event).map_err(failed)?;
    Ok(format!("manual:{reference}"))
}

fn apply_event(
    state: &AppState,
    event: &commons_ledger::payments::PaymentEvent,
) -> std::result::Result<commons_ledger::billing::Handled, commons_ledger::billing::BillingError> {
    let billing = state.billing.lock().expect("billing lock");
    let mut journal = state.journal.lock().expect("journal lock");
    let mut cents = commons_ledger::cents::Cents {
        journal: &mut journal,
    };
    billing.handle(event, &mut cents, now_ms())
}
