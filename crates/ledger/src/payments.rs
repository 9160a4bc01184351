//! Payment providers: how money arrives, as events the ledger records.
//!
//! A provider turns its own notifications into [`PaymentEvent`]s. Two
//! implementations: [`Stripe`] (Checkout sessions; webhooks verified with the
//! `Stripe-Signature` scheme) and [`Manual`] (an admin records a payment or
//! an invoice paid by transfer). Events carry the provider's event id, so
//! handling one twice is harmless.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// A payment-side fact the ledger records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PaymentEvent {
    /// A subscription payment (first or renewal) succeeded.
    Paid {
        /// The provider's event id (dedup key).
        event_id: String,
        /// The provider's payment id (ledger transfer key).
        payment_id: String,
        user: String,
        tier: String,
        /// Minor units charged.
        gross: u64,
        /// The provider's actual fee, minor units.
        fee: u64,
        /// False for a mid-term charge (an upgrade's proration), which does
        /// not extend the term.
        renews: bool,
        /// The provider's subscription this pays for, when it has one:
        /// what cancelling or changing the tier there names.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subscription: Option<String>,
    },
    /// Money went back to the user.
    Refunded {
        event_id: String,
        payment_id: String,
        user: String,
        amount: u64,
    },
    /// A notification we do not act on (still acknowledged).
    Ignored { event_id: String, kind: String },
}

impl PaymentEvent {
    pub fn event_id(&self) -> &str {
        match self {
            PaymentEvent::Paid { event_id, .. }
            | PaymentEvent::Refunded { event_id, .. }
            | PaymentEvent::Ignored { event_id, .. } => event_id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("missing or malformed Stripe-Signature header")]
    MalformedHeader,
    #[error("signature does not match: wrong signing secret, or the body was altered")]
    BadSignature,
    #[error("timestamp is {age_s}s from now, outside the {tolerance_s}s tolerance (a replay?)")]
    Stale { age_s: i64, tolerance_s: i64 },
    #[error("event body is not a Stripe event: {0}")]
    BadEvent(String),
}

/// A request for a hosted checkout page, as the provider's API wants it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckoutRequest {
    pub url: String,
    /// Form fields (`application/x-www-form-urlencoded`).
    pub form: Vec<(String, String)>,
}

/// What every payment provider offers the platform.
pub trait PaymentProvider {
    fn name(&self) -> &'static str;
    /// The request that creates a checkout for `user` to subscribe to `tier`.
    fn checkout(
        &self,
        user: &str,
        tier: &str,
        price_id: &str,
        success_url: &str,
        cancel_url: &str,
    ) -> CheckoutRequest;
    /// Verifies and decodes a notification; `now_s` is the current Unix time.
    fn webhook(
        &self,
        signature_header: &str,
        body: &[u8],
        now_s: i64,
    ) -> Result<PaymentEvent, WebhookError>;
}

/// Stripe, verified the way Stripe documents: HMAC-SHA256 over
/// `"{t}.{body}"` with the endpoint's signing secret, compared in constant
/// time against every `v1` signature, with a timestamp tolerance.
pub struct Stripe {
    pub signing_secret: String,
    pub tolerance_s: i64,
    pub api_base: String,
}

impl Stripe {
    pub fn new(signing_secret: impl Into<String>) -> Stripe {
        Stripe {
            signing_secret: signing_secret.into(),
            tolerance_s: 300,
            api_base: "https://api.stripe.com".into(),
        }
    }

    /// The header value Stripe would send for `body` at time `t` (for tests and tools).
    pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        let sig = crate::hex::encode(&mac.finalize().into_bytes());
        format!("t={t},v1={sig}")
    }

    fn verify(&self, header: &str, body: &[u8], now_s: i64) -> Result<(), WebhookError> {
        let mut t: Option<i64> = None;
        let mut sigs: Vec<Vec<u8>> = Vec::new();
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", v)) => t = v.parse().ok(),
                Some(("v1", v)) => {
                    if let Some(bytes) = crate::hex::decode(v) {
                        sigs.push(bytes);
                    }
                }
                _ => {}
            }
        }
        let t = t.ok_or(WebhookError::MalformedHeader)?;
        if sigs.is_empty() {
            return Err(WebhookError::MalformedHeader);
        }
        let ok = sigs.iter().any(|s| {
            let mut mac = Hmac::<Sha256>::new_from_slice(self.signing_secret.as_bytes())
                .expect("any key length");
            mac.update(format!("{t}.").as_bytes());
            mac.update(body);
            mac.verify_slice(s).is_ok()
        });
        if !ok {
            return Err(WebhookError::BadSignature);
        }
        // Checked after the signature, so an attacker learns nothing from it.
        let age = now_s - t;
        if age.abs() > self.tolerance_s {
            return Err(WebhookError::Stale {
                age_s: age,
                tolerance_s: self.tolerance_s,
            });
        }
        Ok(())
    }
}

fn str_at<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn u64_at(v: &serde_json::Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_u64()
}

impl PaymentProvider for Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn checkout(
        &self,
        user: &str,
        tier: &str,
        price_id: &str,
        success_url: &str,
        cancel_url: &str,
    ) -> CheckoutRequest {
        CheckoutRequest {
            url: format!("{}/v1/checkout/sessions", self.api_base),
            form: vec![
                ("mode".into(), "subscription".into()),
                ("line_items[0][price]".into(), price_id.into()),
                ("line_items[0][quantity]".into(), "1".into()),
                ("client_reference_id".into(), user.into()),
                ("subscription_data[metadata][user]".into(), user.into()),
                ("subscription_data[metadata][tier]".into(), tier.into()),
                ("success_url".into(), success_url.into()),
                ("cancel_url".into(), cancel_url.into()),
            ],
        }
    }

    fn webhook(&self, header: &str, body: &[u8], now_s: i64) -> Result<PaymentEvent, WebhookError> {
        self.verify(header, body, now_s)?;
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| WebhookError::BadEvent(e.to_string()))?;
        let event_id = str_at(&v, &["id"])
            .ok_or_else(|| WebhookError::BadEvent("no id".into()))?
            .to_string();
        let kind = str_at(&v, &["type"])
            .ok_or_else(|| WebhookError::BadEvent("no type".into()))?
            .to_string();
        let obj = &v["data"]["object"];
        let meta = |k: &str| {
            str_at(obj, &["metadata", k])
                .or_else(|| str_at(obj, &["subscription_details", "metadata", k]))
                .or_else(|| str_at(obj, &["lines", "data", "0", "metadata", k]))
                .map(str::to_string)
        };
        let missing =
            |what: &str| WebhookError::BadEvent(format!("{kind} {event_id} has no {what}"));
        match kind.as_str() {
            // A first payment or a renewal: both arrive as a paid invoice.
            "invoice.paid" | "invoice.payment_succeeded" => {
                let gross = u64_at(obj, &["amount_paid"]).ok_or_else(|| missing("amount_paid"))?;
                // With the charge's balance transaction expanded Stripe gives
                // the actual fee; otherwise the fee is reported later and 0 here.
                let fee = u64_at(obj, &["charge", "balance_transaction", "fee"]).unwrap_or(0);
                let renews = str_at(obj, &["billing_reason"]) != Some("subscription_update");
                Ok(PaymentEvent::Paid {
                    renews,
                    payment_id: str_at(obj, &["id"])
                        .ok_or_else(|| missing("invoice id"))?
                        .to_string(),
                    user: meta("user").ok_or_else(|| missing("metadata.user"))?,
                    tier: meta("tier").ok_or_else(|| missing("metadata.tier"))?,
                    gross,
                    fee: fee.min(gross),
                    subscription: str_at(obj, &["subscription"]).map(str::to_string),
                    event_id,
                })
            }
            "charge.refunded" => Ok(PaymentEvent::Refunded {
                payment_id: str_at(obj, &["invoice"])
                    .ok_or_else(|| missing("invoice"))?
                    .to_string(),
                user: meta("user").ok_or_else(|| missing("metadata.user"))?,
                amount: u64_at(obj, &["amount_refunded"])
                    .ok_or_else(|| missing("amount_refunded"))?,
                event_id,
            }),
            _ => Ok(PaymentEvent::Ignored { event_id, kind }),
        }
    }
}

/// Payments an admin records by hand (cash, bank transfer, invoices).
pub struct Manual;

impl Manual {
    /// A payment as an event; the admin's reference is its id.
    pub fn payment(reference: &str, user: &str, tier: &str, gross: u64, fee: u64) -> PaymentEvent {
        PaymentEvent::Paid {
            event_id: format!("manual:{reference}"),
            payment_id: format!("manual:{reference}"),
            user: user.into(),
            tier: tier.into(),
            gross,
            fee: fee.min(gross),
            renews: true,
            subscription: None,
        }
    }

    /// Money given back for payment `payment_id`, as an event: once per
    /// payment (its id is the payment's).
    pub fn refund(payment_id: &str, user: &str, amount: u64) -> PaymentEvent {
        PaymentEvent::Refunded {
            event_id: format!("refund:{payment_id}"),
            payment_id: payment_id.into(),
            user: user.into(),
            amount,
        }
    }
}
