//! Tiers and subscriptions: who pays what, and which tier the gateway tells
//! apps a user has.
//!
//! Every user has `free`; paid tiers are platform-wide (one subscription
//! covers every site). Subscriptions run in 30-day terms. The rules:
//!
//! - **Subscribe**: the term starts when the first payment arrives.
//! - **Renew**: at the end of a term the (next) tier's price is charged; the
//!   payment extends the term by 30 days from its old end.
//! - **Upgrade**: takes effect at once; the user pays the price difference
//!   prorated to the seconds left in the term, rounded down to the minor unit.
//! - **Downgrade**: takes effect at the next renewal; nothing is refunded.
//! - **Cancel**: the tier stays until the term ends, then it is `free`.
//! - **Refund**: the payment's tokens are burned and its cash returned; the
//!   subscription lapses to `free` at once.
//!
//! Payment events are applied once: their ids are recorded, and repeats
//! (a webhook delivered twice) change nothing.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cents::{Cents, CentsError};
use crate::payments::PaymentEvent;
use crate::tables::{TableError, Tables, Val};

/// Length of a subscription term.
pub const TERM_MS: i64 = 30 * 86_400_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    pub name: String,
    /// Price per term in minor units (US cents).
    pub price: u64,
}

/// The default tiers of product.md: free, member 5.00 USD, patron 20.00 USD.
pub fn default_tiers() -> Vec<Tier> {
    vec![
        Tier {
            name: "free".into(),
            price: 0,
        },
        Tier {
            name: "member".into(),
            price: 500,
        },
        Tier {
            name: "patron".into(),
            price: 2_000,
        },
    ]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub user: String,
    pub tier: String,
    /// active, canceled (runs to the term's end), lapsed.
    pub status: String,
    pub term_start_ms: i64,
    pub term_end_ms: i64,
    /// A downgrade waiting for the next renewal.
    pub next_tier: Option<String>,
}

/// What a tier change costs and when it takes effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TierChange {
    pub from: String,
    pub to: String,
    /// "now" or "renewal".
    pub effective: &'static str,
    /// To charge now (an upgrade's prorated difference).
    pub charge_now: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("billing store: {0}")]
    Store(#[from] TableError),
    #[error(transparent)]
    Cents(#[from] CentsError),
    #[error("unknown tier \"{0}\"; tiers are {1}")]
    UnknownTier(String, String),
    #[error("{0}")]
    Invalid(String),
}

/// A payment as its payer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payment {
    pub payment_id: String,
    /// Paid, in cents.
    pub gross: u64,
    /// Kept by the payment provider, in cents.
    pub fee: u64,
    /// CommonCents the rest bought, into the payer's escrow.
    pub tokens: u64,
    /// Returned to the payer, in cents.
    pub refunded: u64,
    pub paid_at_ms: i64,
}

const PAYMENT_COLUMNS: &str = "payment_id, gross, fee, tokens, refunded, paid_at_ms";

/// The payment in a row of [`PAYMENT_COLUMNS`].
fn payment_at(r: &[Val]) -> Payment {
    Payment {
        payment_id: r[0].text(),
        gross: r[1].int() as u64,
        fee: r[2].int() as u64,
        tokens: r[3].int() as u64,
        refunded: r[4].int() as u64,
        paid_at_ms: r[5].int(),
    }
}

/// What handling a payment event did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Handled {
    Applied,
    /// Seen before: nothing changed.
    Duplicate,
    Ignored,
}

pub struct Billing {
    tables: Tables,
    pub tiers: Vec<Tier>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS subscriptions (
    "user" TEXT PRIMARY KEY, tier TEXT NOT NULL, status TEXT NOT NULL,
    term_start_ms BIGINT NOT NULL, term_end_ms BIGINT NOT NULL, next_tier TEXT);
CREATE TABLE IF NOT EXISTS payment_events (event_id TEXT PRIMARY KEY, kind TEXT NOT NULL, handled_at_ms BIGINT NOT NULL);
-- Each payment as the subscriber sees it: what they paid, the provider's fee, the tokens it bought.
CREATE TABLE IF NOT EXISTS payments (
    payment_id TEXT PRIMARY KEY, "user" TEXT NOT NULL, gross BIGINT NOT NULL, fee BIGINT NOT NULL,
    tokens BIGINT NOT NULL, refunded BIGINT NOT NULL DEFAULT 0, paid_at_ms BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS payments_user ON payments ("user", paid_at_ms);
-- The payment provider's subscription behind a user's, when there is one.
CREATE TABLE IF NOT EXISTS provider_subscriptions ("user" TEXT PRIMARY KEY, subscription TEXT NOT NULL);
"#;

impl Billing {
    /// The embedded store: a SQLite file.
    pub fn open(path: &Path, tiers: Vec<Tier>) -> Result<Billing, BillingError> {
        Ok(Billing {
            tables: Tables::sqlite(path, SCHEMA)?,
            tiers,
        })
    }

    /// The scale-out store: PostgreSQL at `url`, in schema `namespace`.
    pub fn connect(url: &str, namespace: &str, tiers: Vec<Tier>) -> Result<Billing, BillingError> {
        Ok(Billing {
            tables: Tables::postgres(url, namespace, SCHEMA)?,
            tiers,
        })
    }

    fn tier(&self, name: &str) -> Result<&Tier, BillingError> {
        self.tiers.iter().find(|t| t.name == name).ok_or_else(|| {
            BillingError::UnknownTier(
                name.into(),
                self.tiers
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
    }

    /// One payment and who made it.
    pub fn payment(&self, payment_id: &str) -> Result<Option<(String, Payment)>, BillingError> {
        Ok(self
            .tables
            .query_one(
                &format!(r#"SELECT "user", {PAYMENT_COLUMNS} FROM payments WHERE payment_id = $1"#),
                &[payment_id.into()],
            )?
            .map(|r| (r[0].text(), payment_at(&r[1..]))))
    }

    /// Per period (`YYYY-MM`, by when they were paid), oldest first: the
    /// cents paid, kept by payment providers, and refunded.
    pub fn paid_per_period(&self) -> Result<Vec<(String, u64, u64, u64)>, BillingError> {
        let period = if self.tables.is_postgres() {
            "to_char(to_timestamp(paid_at_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM')"
        } else {
            "strftime('%Y-%m', paid_at_ms / 1000, 'unixepoch')"
        };
        let rows = self.tables.query(
            &format!(
                "SELECT {period} AS period, CAST(SUM(gross) AS BIGINT), CAST(SUM(fee) AS BIGINT),
                        CAST(SUM(refunded) AS BIGINT)
                 FROM payments GROUP BY period ORDER BY period"
            ),
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r[0].text(),
                    r[1].int() as u64,
                    r[2].int() as u64,
                    r[3].int() as u64,
                )
            })
            .collect())
    }

    /// `user`'s payments made in `[from_ms, to_ms)`, oldest first.
    pub fn payments(
        &self,
        user: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Payment>, BillingError> {
        let rows = self.tables.query(
            &format!(
                r#"SELECT {PAYMENT_COLUMNS} FROM payments
                   WHERE "user" = $1 AND paid_at_ms >= $2 AND paid_at_ms < $3 ORDER BY paid_at_ms, payment_id"#
            ),
            &[user.into(), from_ms.into(), to_ms.into()],
        )?;
        Ok(rows.iter().map(|r| payment_at(r)).collect())
    }

    pub fn subscription(&self, user: &str) -> Result<Option<Subscription>, BillingError> {
        Ok(self
            .tables
            .query_one(
                r#"SELECT "user", tier, status, term_start_ms, term_end_ms, next_tier FROM subscriptions WHERE "user" = $1"#,
                &[user.into()],
            )?
            .map(|r| Subscription {
                user: r[0].text(),
                tier: r[1].text(),
                status: r[2].text(),
                term_start_ms: r[3].int(),
                term_end_ms: r[4].int(),
                next_tier: r[5].opt_text(),
            }))
    }

    /// The payment provider's subscription behind `user`'s, if any.
    pub fn provider_subscription(&self, user: &str) -> Result<Option<String>, BillingError> {
        Ok(self
            .tables
            .query_one(
                r#"SELECT subscription FROM provider_subscriptions WHERE "user" = $1"#,
                &[user.into()],
            )?
            .map(|r| r[0].text()))
    }

    fn put(&self, s: &Subscription) -> Result<(), BillingError> {
        self.tables.execute(
            r#"INSERT INTO subscriptions ("user", tier, status, term_start_ms, term_end_ms, next_tier) VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT ("user") DO UPDATE SET tier = $2, status = $3, term_start_ms = $4, term_end_ms = $5, next_tier = $6"#,
            &[
                (&s.user).into(),
                (&s.tier).into(),
                (&s.status).into(),
                s.term_start_ms.into(),
                s.term_end_ms.into(),
                (&s.next_tier).into(),
            ],
        )?;
        Ok(())
    }

    /// The tier the gateway tells apps `user` has at `now`.
    pub fn current_tier(&self, user: &str, now_ms: i64) -> Result<String, BillingError> {
        Ok(match self.subscription(user)? {
            Some(s) if s.status != "lapsed" && now_ms < s.term_end_ms => s.tier,
            _ => "free".into(),
        })
    }

    /// Changes a subscriber's tier by the rules above; returns what it costs.
    pub fn change_tier(
        &self,
        user: &str,
        to: &str,
        now_ms: i64,
    ) -> Result<TierChange, BillingError> {
        let new = self.tier(to)?.clone();
        let Some(mut s) = self
            .subscription(user)?
            .filter(|s| s.status != "lapsed" && now_ms < s.term_end_ms)
        else {
            return Err(BillingError::Invalid(format!(
                "{user} has no running subscription; subscribe through checkout first"
            )));
        };
        let old = self.tier(&s.tier)?.clone();
        let change = if new.price > old.price {
            let left = (s.term_end_ms - now_ms).max(0) as u128;
            let charge = ((new.price - old.price) as u128 * left / TERM_MS as u128) as u64;
            s.tier = new.name.clone();
            s.next_tier = None;
            TierChange {
                from: old.name,
                to: new.name,
                effective: "now",
                charge_now: charge,
            }
        } else {
            s.next_tier = Some(new.name.clone());
            TierChange {
                from: old.name,
                to: new.name,
                effective: "renewal",
                charge_now: 0,
            }
        };
        s.status = "active".into();
        self.put(&s)?;
        Ok(change)
    }

    /// Stops renewal; the tier lasts to the end of the term. Only a
    /// running, renewing subscription can be cancelled.
    pub fn cancel(&self, user: &str) -> Result<Subscription, BillingError> {
        let Some(mut s) = self.subscription(user)? else {
            return Err(BillingError::Invalid(format!("{user} has no subscription")));
        };
        if s.status != "active" {
            return Err(BillingError::Invalid(format!(
                "{user}'s subscription is {} already; it ends with its term",
                s.status
            )));
        }
        s.status = "canceled".into();
        self.put(&s)?;
        Ok(s)
    }

    /// Subscriptions whose term has ended and that renew: (user, tier, price).
    pub fn renewals_due(&self, now_ms: i64) -> Result<Vec<(String, String, u64)>, BillingError> {
        let rows: Vec<(String, String)> = self
            .tables
            .query(
                r#"SELECT "user", COALESCE(next_tier, tier) FROM subscriptions WHERE status = 'active' AND term_end_ms <= $1 ORDER BY "user""#,
                &[now_ms.into()],
            )?
            .iter()
            .map(|r| (r[0].text(), r[1].text()))
            .collect();
        rows.into_iter()
            .map(|(u, t)| {
                let price = self.tier(&t)?.price;
                Ok((u, t, price))
            })
            .collect()
    }

    /// Applies a payment event once: records the money in the ledger and
    /// moves the subscription accordingly.
    pub fn handle(
        &self,
        event: &PaymentEvent,
        cents: &mut Cents<'_>,
        now_ms: i64,
    ) -> Result<Handled, BillingError> {
        let seen = self.tables.query_one(
            "SELECT kind FROM payment_events WHERE event_id = $1",
            &[event.event_id().into()],
        )?;
        if seen.is_some() {
            return Ok(Handled::Duplicate);
        }
        let handled = match event {
            PaymentEvent::Ignored { .. } => Handled::Ignored,
            PaymentEvent::Paid {
                payment_id,
                user,
                tier,
                gross,
                fee,
                renews,
                subscription,
                ..
            } => {
                let t = self.tier(tier)?.clone();
                if let Some(id) = subscription {
                    self.tables.execute(
                        r#"INSERT INTO provider_subscriptions ("user", subscription) VALUES ($1, $2)
                           ON CONFLICT ("user") DO UPDATE SET subscription = $2"#,
                        &[user.into(), id.into()],
                    )?;
                }
                // The ledger write is idempotent by payment id, so a crash
                // before the event is marked only repeats a no-op.
                let minted = cents.record_payment(payment_id, user, *gross, *fee)?;
                self.tables.execute(
                    r#"INSERT INTO payments (payment_id, "user", gross, fee, tokens, paid_at_ms)
                       VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (payment_id) DO NOTHING"#,
                    &[
                        payment_id.into(),
                        user.into(),
                        (*gross).into(),
                        (*fee).into(),
                        minted.tokens.into(),
                        now_ms.into(),
                    ],
                )?;
                let s = match self.subscription(user)? {
                    // A renewal (or a prorated upgrade) of a running term.
                    Some(mut s) if s.status != "lapsed" && now_ms < s.term_end_ms + TERM_MS => {
                        if *renews {
                            // From the old end, even if paid a little late.
                            s.term_start_ms = s.term_end_ms;
                            s.term_end_ms += TERM_MS;
                            s.tier = s.next_tier.take().unwrap_or(t.name.clone());
                        }
                        s.status = "active".into();
                        s
                    }
                    _ => Subscription {
                        user: user.clone(),
                        tier: t.name.clone(),
                        status: "active".into(),
                        term_start_ms: now_ms,
                        term_end_ms: now_ms + TERM_MS,
                        next_tier: None,
                    },
                };
                self.put(&s)?;
                Handled::Applied
            }
            PaymentEvent::Refunded {
                payment_id,
                user,
                amount,
                ..
            } => {
                cents.refund(payment_id, user, *amount)?;
                self.tables.execute(
                    "UPDATE payments SET refunded = refunded + $2 WHERE payment_id = $1",
                    &[payment_id.into(), (*amount).into()],
                )?;
                if let Some(mut s) = self.subscription(user)? {
                    s.status = "lapsed".into();
                    self.put(&s)?;
                }
                Handled::Applied
            }
        };
        let kind = match event {
            PaymentEvent::Paid { .. } => "paid",
            PaymentEvent::Refunded { .. } => "refunded",
            PaymentEvent::Ignored { .. } => "ignored",
        };
        self.tables.execute(
            "INSERT INTO payment_events (event_id, kind, handled_at_ms) VALUES ($1, $2, $3)",
            &[event.event_id().into(), kind.into(), now_ms.into()],
        )?;
        Ok(handled)
    }
}
