//! Stripe's API, as the platform calls it: a hosted Checkout Session that
//! subscribes a user to a tier, changing its price, cancelling it, refunding. Every request follows Stripe's API
//! reference — parameters form-encoded, the secret key as the bearer
//! token, a pinned `Stripe-Version`, and an `Idempotency-Key` so a request
//! sent twice makes one session. What Stripe answers comes back through
//! the verified webhook (`platform::stripe_webhook`).

use std::collections::BTreeMap;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use commons_ledger::payments::{CheckoutRequest, PaymentProvider, Stripe};

use crate::error::{AppError, ErrorKind};

/// The API version every request pins: what the answers are read as.
pub const API_VERSION: &str = "2024-06-20";

/// How long Stripe gets to answer.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(20);

/// How the platform reaches Stripe.
#[derive(Clone, PartialEq, Eq)]
pub struct StripeSettings {
    /// The secret key (`sk_live_...`, `sk_test_...`).
    pub secret_key: String,
    /// `https://api.stripe.com`, or a server speaking its API.
    pub api_base: String,
    /// Each paid tier's Stripe price id.
    pub prices: BTreeMap<String, String>,
}

/// The secret key is never printed.
impl std::fmt::Debug for StripeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeSettings")
            .field("secret_key", &"<redacted>")
            .field("api_base", &self.api_base)
            .field("prices", &self.prices)
            .finish()
    }
}

/// A client of Stripe's API.
pub struct StripeApi {
    settings: StripeSettings,
    http: hyper_util::client::legacy::Client<crate::outbound::Https, Full<Bytes>>,
}

/// A Checkout Session Stripe made: where to send the user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckoutSession {
    pub id: String,
    pub url: String,
}

fn unavailable(detail: impl Into<String>) -> AppError {
    AppError::new(
        ErrorKind::Unavailable,
        "The payment provider did not take the request",
        detail,
    )
}

impl StripeApi {
    pub fn new(settings: StripeSettings) -> Result<StripeApi, String> {
        Ok(StripeApi {
            settings,
            http: crate::outbound::https_client()?,
        })
    }

    /// The Stripe price id of `tier`, if it has one.
    pub fn price_of(&self, tier: &str) -> Option<&str> {
        self.settings.prices.get(tier).map(String::as_str)
    }

    /// The request that makes a Checkout Session subscribing `user` to
    /// `tier` at `price_id`.
    pub fn checkout_request(
        &self,
        user: &str,
        tier: &str,
        price_id: &str,
        success_url: &str,
        cancel_url: &str,
    ) -> CheckoutRequest {
        let stripe = Stripe {
            api_base: self.settings.api_base.trim_end_matches('/').to_string(),
            ..Stripe::new(String::new())
        };
        stripe.checkout(user, tier, price_id, success_url, cancel_url)
    }

    /// Sends `request` and reads the session it made. `idempotency_key`
    /// makes the same request sent again (a second click, a retry) the
    /// same session.
    pub async fn create_checkout_session(
        &self,
        request: &CheckoutRequest,
        idempotency_key: &str,
    ) -> Result<CheckoutSession, AppError> {
        let v = self
            .post_form(&request.url, &request.form, idempotency_key)
            .await?;
        match (v["id"].as_str(), v["url"].as_str()) {
            (Some(id), Some(url)) => Ok(CheckoutSession {
                id: id.to_string(),
                url: url.to_string(),
            }),
            _ => Err(unavailable("Stripe's answer has no session id or url")),
        }
    }

    fn subscription_url(&self, id: &str) -> String {
        format!(
            "{}/v1/subscriptions/{}",
            self.settings.api_base.trim_end_matches('/'),
            crate::outbound::segment(id)
        )
    }

    /// Cancels subscription `id` at the end of the period paid for (what
    /// the platform's own cancel does: the tier lasts to the term's end).
    pub async fn cancel_at_period_end(&self, id: &str) -> Result<(), AppError> {
        let form = [("cancel_at_period_end".to_string(), "true".to_string())];
        self.post_form(&self.subscription_url(id), &form, &format!("cancel-{id}"))
            .await?;
        Ok(())
    }

    /// Moves subscription `id` to `price` by the platform's rules: an
    /// upgrade is invoiced at once for the prorated difference
    /// (`proration_behavior=always_invoice`), a downgrade is charged from
    /// the next renewal with nothing refunded (`none`). Either way the
    /// subscription renews again (`cancel_at_period_end=false`).
    pub async fn change_price(
        &self,
        id: &str,
        price: &str,
        upgrade: bool,
        idempotency_key: &str,
    ) -> Result<(), AppError> {
        let url = self.subscription_url(id);
        // The subscription's item is what changes price.
        let current = self.send(hyper::Method::GET, &url, None, None).await?;
        let Some(item) = current["items"]["data"][0]["id"].as_str() else {
            return Err(unavailable("Stripe's subscription has no item to change"));
        };
        let form = [
            ("items[0][id]".to_string(), item.to_string()),
            ("items[0][price]".to_string(), price.to_string()),
            (
                "proration_behavior".to_string(),
                if upgrade { "always_invoice" } else { "none" }.to_string(),
            ),
            ("cancel_at_period_end".to_string(), "false".to_string()),
        ];
        self.post_form(&url, &form, idempotency_key).await?;
        Ok(())
    }

    /// Refunds `amount` of the payment of invoice `invoice` to the card it
    /// came from (the invoice's charge). Stripe confirms it with the
    /// `charge.refunded` webhook, which is when the ledger records it.
    pub async fn refund_invoice(&self, invoice: &str, amount: u64) -> Result<String, AppError> {
        let base = self.settings.api_base.trim_end_matches('/');
        let url = format!("{base}/v1/invoices/{}", crate::outbound::segment(invoice));
        let found = self.send(hyper::Method::GET, &url, None, None).await?;
        let Some(charge) = found["charge"].as_str() else {
            return Err(unavailable(format!(
                "Stripe's invoice {invoice} has no charge to refund"
            )));
        };
        let form = [
            ("charge".to_string(), charge.to_string()),
            ("amount".to_string(), amount.to_string()),
            ("reason".to_string(), "requested_by_customer".to_string()),
            ("metadata[payment]".to_string(), invoice.to_string()),
        ];
        let refund = self
            .post_form(
                &format!("{base}/v1/refunds"),
                &form,
                &format!("refund-{invoice}"),
            )
            .await?;
        Ok(refund["id"].as_str().unwrap_or_default().to_string())
    }

    /// One POST of form-encoded parameters, as Stripe's API takes them.
    async fn post_form(
        &self,
        url: &str,
        form: &[(String, String)],
        idempotency_key: &str,
    ) -> Result<serde_json::Value, AppError> {
        let body = serde_urlencoded::to_string(form)
            .map_err(|e| AppError::new(ErrorKind::Internal, "Request not made", e.to_string()))?;
        self.send(hyper::Method::POST, url, Some(body), Some(idempotency_key))
            .await
    }

    /// One request: a 2xx answer's JSON, or Stripe's own error message.
    /// Only POSTs carry an idempotency key (GETs are idempotent already).
    async fn send(
        &self,
        method: hyper::Method,
        url: &str,
        form: Option<String>,
        idempotency_key: Option<&str>,
    ) -> Result<serde_json::Value, AppError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header(
                "authorization",
                format!("Bearer {}", self.settings.secret_key),
            )
            .header("stripe-version", API_VERSION)
            .header(
                "user-agent",
                concat!("OneCommons/", env!("CARGO_PKG_VERSION")),
            );
        if form.is_some() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        if let Some(key) = idempotency_key {
            req = req.header("idempotency-key", key);
        }
        let req = req
            .body(Full::new(Bytes::from(form.unwrap_or_default())))
            .map_err(|e| unavailable(format!("{url}: {e}")))?;
        let res = tokio::time::timeout(ANSWER_WITHIN, self.http.request(req))
            .await
            .map_err(|_| {
                unavailable(format!(
                    "Stripe did not answer within {} s",
                    ANSWER_WITHIN.as_secs()
                ))
            })?
            .map_err(|e| unavailable(format!("Stripe could not be reached: {e}")))?;
        let status = res.status();
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| unavailable(format!("Stripe's answer was cut off: {e}")))?
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if !status.is_success() {
            // Stripe's error object: what it says is meant for people.
            let message = v["error"]["message"].as_str().unwrap_or("no message");
            return Err(unavailable(format!("Stripe answered {status}: {message}")));
        }
        Ok(v)
    }
}
