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
    let offered = tiers(state);
    let Some(t) = offered.iter().find(|t| t.name == tier) else {
        let names: Vec<&str> = offered.iter().map(|t| t.name.as_str()).collect();
        return Err(AppError::new(
            ErrorKind::Invalid,
            "Unknown tier",
            format!(
                "there is no tier \"{tier}\"; choose one of {}",
                names.join(", ")
            ),
        ));
    };
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
    let Some(to) = offered.iter().find(|t| t.name == tier) else {
        let names: Vec<&str> = offered.iter().map(|t| t.name.as_str()).collect();
        return Err(AppError::new(
            ErrorKind::Invalid,
            "Unknown tier",
            format!(
                "there is no tier \"{tier}\"; choose one of {}",
                names.join(", ")
            ),
        ));
    };
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
