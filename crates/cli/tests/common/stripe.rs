//! A server speaking Stripe's API shape (https://docs.stripe.com/api) on
//! 127.0.0.1, for tests: it checks every request the way Stripe would,
//! hands out checkout sessions, and — when a test "pays" on its checkout
//! page — sends the signed webhook back to the platform, as Stripe does.
//! Nothing reaches the internet.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use commons_ledger::payments::Stripe;
use serde_json::{json, Value};

use super::http;

pub const WEBHOOK_SECRET: &str = "whsec_subscribe_test_5c1d";
pub const SECRET_KEY: &str = "sk_test_commons_7f3a";

/// One request the platform sent to "Stripe".
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lower-cased names.
    pub headers: BTreeMap<String, String>,
    /// The form-encoded body, decoded.
    pub form: BTreeMap<String, String>,
}

/// A server speaking Stripe's API shape on 127.0.0.1.
pub struct FakeStripe {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeStripe {
    /// `platform` is the API port the webhook goes back to.
    pub fn start(platform: Arc<Mutex<u16>>) -> FakeStripe {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let sessions: Arc<Mutex<BTreeMap<String, BTreeMap<String, String>>>> = Arc::default();
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let mut headers = BTreeMap::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len: usize = headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let form: BTreeMap<String, String> =
                    serde_urlencoded::from_bytes(&body).unwrap_or_default();
                let request = Seen {
                    method,
                    path,
                    headers,
                    form,
                };
                seen2.lock().unwrap().push(request.clone());
                let (status, answer) = answer(&request, port, &sessions, &platform);
                let body = answer.to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nRequest-Id: req_{}\r\n\r\n{body}",
                    body.len(),
                    seen2.lock().unwrap().len()
                );
            }
        });
        FakeStripe { port, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// What Stripe would answer: its error object for a request it would
/// refuse, a session for a good one; a payment on the checkout page sends
/// the signed `invoice.paid` webhook to the platform.
fn answer(
    r: &Seen,
    port: u16,
    sessions: &Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    platform: &Mutex<u16>,
) -> (&'static str, Value) {
    let error = |status, kind: &str, message: &str| {
        (
            status,
            json!({ "error": { "type": kind, "message": message } }),
        )
    };
    if let Some(session) = r.path.strip_prefix("/pay/") {
        let Some(form) = sessions.lock().unwrap().get(session).cloned() else {
            return error("404 Not Found", "invalid_request_error", "no such session");
        };
        let (code, body) = invoice_paid(platform, session, &form, 500, 45, "subscription_create");
        return ("200 OK", json!({ "webhook": code, "answer": body }));
    }
    // Authentication: the secret key as a bearer token.
    if r.headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {SECRET_KEY}")) {
        return error(
            "401 Unauthorized",
            "invalid_request_error",
            "Invalid API Key provided",
        );
    }
    // An invoice this server made: its charge.
    if let Some(invoice) = r.path.strip_prefix("/v1/invoices/") {
        return if r.method == "GET" && invoice.starts_with("in_cs_test_") {
            (
                "200 OK",
                json!({ "id": invoice, "object": "invoice", "charge": format!("ch_{invoice}") }),
            )
        } else {
            error("404 Not Found", "invalid_request_error", "No such invoice")
        };
    }
    // A refund of a charge: done, and the webhook says so.
    if r.method == "POST" && r.path == "/v1/refunds" {
        let Some(invoice) = r.form.get("charge").and_then(|c| c.strip_prefix("ch_")) else {
            return error("400 Bad Request", "invalid_request_error", "No such charge");
        };
        let Ok(amount) = r.form.get("amount").map_or(Ok(0), |a| a.parse::<u64>()) else {
            return error(
                "400 Bad Request",
                "invalid_request_error",
                "Invalid integer: amount",
            );
        };
        let session = invoice
            .strip_prefix("in_")
            .and_then(|i| i.split("_subscription").next())
            .unwrap_or_default();
        let Some(form) = sessions.lock().unwrap().get(session).cloned() else {
            return error("404 Not Found", "invalid_request_error", "No such charge");
        };
        charge_refunded(platform, invoice, &form, amount);
        return (
            "200 OK",
            json!({ "id": format!("re_{invoice}"), "object": "refund", "status": "succeeded", "amount": amount }),
        );
    }
    if let Some(id) = r.path.strip_prefix("/v1/subscriptions/") {
        let session = id.strip_prefix("sub_").unwrap_or_default();
        let Some(form) = sessions.lock().unwrap().get(session).cloned() else {
            return error(
                "404 Not Found",
                "invalid_request_error",
                "No such subscription",
            );
        };
        let item = format!("si_{session}");
        let subscription = json!({ "id": id, "object": "subscription",
            "items": { "object": "list", "data": [{ "id": item, "object": "subscription_item" }] },
            "cancel_at_period_end": r.form.get("cancel_at_period_end").is_some_and(|v| v == "true") });
        if r.method == "GET" {
            return ("200 OK", subscription);
        }
        // Changing the price names the item it changes.
        if let Some(changed) = r.form.get("items[0][id]") {
            if *changed != item || !r.form.contains_key("items[0][price]") {
                return error(
                    "400 Bad Request",
                    "invalid_request_error",
                    "No such subscription item",
                );
            }
            // An invoice at once for the prorated difference: paid, and
            // the webhook says so.
            if r.form.get("proration_behavior").map(String::as_str) == Some("always_invoice") {
                invoice_paid(platform, session, &form, 1_000, 59, "subscription_update");
            }
        }
        return ("200 OK", subscription);
    }
    if r.method != "POST" || r.path != "/v1/checkout/sessions" {
        return error(
            "404 Not Found",
            "invalid_request_error",
            "Unrecognized request URL",
        );
    }
    // Parameters are form-encoded.
    if r.headers.get("content-type").map(String::as_str)
        != Some("application/x-www-form-urlencoded")
    {
        return error(
            "400 Bad Request",
            "invalid_request_error",
            "Invalid request: the body must be form-encoded",
        );
    }
    let key = r
        .headers
        .get("idempotency-key")
        .cloned()
        .unwrap_or_default();
    let id = format!("cs_test_{}", key.len() + sessions.lock().unwrap().len());
    // The same idempotency key gets the same session back.
    let existing = sessions
        .lock()
        .unwrap()
        .iter()
        .find(|(_, f)| f.get("idempotency-key") == Some(&key))
        .map(|(id, _)| id.clone());
    let id = existing.unwrap_or(id);
    let mut form = r.form.clone();
    form.insert("idempotency-key".into(), key);
    sessions.lock().unwrap().insert(id.clone(), form);
    (
        "200 OK",
        json!({
            "id": id, "object": "checkout.session", "mode": "subscription",
            "url": format!("http://127.0.0.1:{port}/pay/{id}"),
        }),
    )
}

/// Sends the platform Stripe's signed `invoice.paid` for the subscription
/// checkout session `session` made; the platform's answer.
fn invoice_paid(
    platform: &Mutex<u16>,
    session: &str,
    form: &BTreeMap<String, String>,
    amount: u64,
    fee: u64,
    reason: &str,
) -> (u16, String) {
    let invoice = format!("in_{session}_{reason}");
    let event = serde_json::to_vec(&json!({
        "id": format!("evt_{invoice}"), "type": "invoice.paid",
        "data": { "object": {
            "id": invoice, "amount_paid": amount,
            "subscription": format!("sub_{session}"),
            "billing_reason": reason,
            "charge": { "balance_transaction": { "fee": fee } },
            "subscription_details": { "metadata": {
                "user": form["subscription_data[metadata][user]"],
                "tier": form["subscription_data[metadata][tier]"],
            } } } }
    }))
    .unwrap();
    webhook(platform, &event)
}

/// Sends the platform a webhook event, signed as Stripe signs it; its answer.
fn webhook(platform: &Mutex<u16>, event: &[u8]) -> (u16, String) {
    let signature = Stripe::sign(WEBHOOK_SECRET, commons_clock::now_secs() as i64, event);
    http(
        *platform.lock().unwrap(),
        "POST",
        "/api/payments/stripe/webhook",
        &[("Stripe-Signature", &signature)],
        event,
    )
    .unwrap()
}

/// Sends the platform Stripe's signed `charge.refunded` for an invoice's charge.
fn charge_refunded(
    platform: &Mutex<u16>,
    invoice: &str,
    form: &BTreeMap<String, String>,
    amount: u64,
) {
    let event = serde_json::to_vec(&json!({
        "id": format!("evt_refund_{invoice}"), "type": "charge.refunded",
        "data": { "object": {
            "id": format!("ch_{invoice}"), "invoice": invoice, "amount_refunded": amount,
            "metadata": { "user": form["subscription_data[metadata][user]"] } } }
    }))
    .unwrap();
    let (code, body) = webhook(platform, &event);
    assert_eq!(code, 200, "the refund's webhook: {body}");
}
