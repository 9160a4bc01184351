//! `commons usage`, `commons subscribe`, `commons period close`,
//! `commons statement`: metering, subscriptions and CommonCents on the
//! embedded stores under `COMMONS_HOME`. The work is `commons_server::periods`';
//! this module parses and renders.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use commons_ledger::cents::Cents;
use commons_ledger::journal::Journal;
use commons_ledger::payments::Manual;
use commons_ledger::period::{recipient_named, statement};
use commons_meter::{Aggregation, Event, Meter, Outcome, Query, Window};
use commons_server::periods::{self, MoneyError, MoneySettings};

use crate::{output, Failure};

#[derive(Subcommand)]
pub enum UsageCommand {
    /// Ingest usage events (CloudEvents, as a JSON array or one per line).
    Ingest {
        /// File to read [default: standard input]
        file: Option<PathBuf>,
        /// Admit events of closed periods as an adjustment under this id.
        #[arg(long)]
        backfill: Option<String>,
    },
    /// Aggregated usage of one user, site, operator or provider.
    Show {
        /// user, site, operator or provider.
        dimension: String,
        /// Its id.
        value: String,
        /// minute, hour or day.
        #[arg(long, default_value = "day")]
        window: String,
        /// A numeric field of the events, or events:TYPE.
        #[arg(long, default_value = "events:request")]
        metric: String,
        /// sum, count, max, or unique:FIELD (distinct users, sites, ... e.g. unique:user).
        #[arg(long, default_value = "sum")]
        aggregation: String,
        /// Only this billing period (YYYY-MM).
        #[arg(long)]
        period: Option<String>,
    },
    /// Remove a backfill's events and adjustments.
    Revert { backfill: String },
}

fn money(e: MoneyError) -> Failure {
    match e {
        MoneyError::Input(m) => Failure::Input(m),
        MoneyError::Failed(m) => Failure::Failed(m),
    }
}

fn journal(home: &Path) -> Result<Journal, Failure> {
    periods::journal(home, &commons_engine::StoreConfig::from_env()).map_err(money)
}

fn meter(home: &Path) -> Result<Meter, Failure> {
    periods::meter(home, &commons_engine::StoreConfig::from_env()).map_err(money)
}

use commons_clock::now_ms;

pub fn usage(cmd: UsageCommand, home: &Path, json: bool) -> Result<(), Failure> {
    let mut m = meter(home)?;
    match cmd {
        UsageCommand::Ingest { file, backfill } => {
            let mut text = String::new();
            match &file {
                Some(p) => {
                    text = std::fs::read_to_string(p)
                        .map_err(|e| Failure::Input(format!("cannot read {}: {e}", p.display())))?
                }
                None => {
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .map_err(|e| Failure::Input(e.to_string()))?;
                }
            }
            let events: Vec<Event> = if text.trim_start().starts_with('[') {
                serde_json::from_str(&text).map_err(|e| Failure::Input(format!("events: {e}")))?
            } else {
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .enumerate()
                    .map(|(i, l)| {
                        serde_json::from_str(l)
                            .map_err(|e| Failure::Input(format!("line {}: {e}", i + 1)))
                    })
                    .collect::<Result<_, _>>()?
            };
            let outcomes = m
                .ingest(&events, backfill.as_deref())
                .map_err(|e| Failure::Failed(e.to_string()))?;
            let accepted = outcomes.iter().filter(|o| **o == Outcome::Accepted).count();
            let duplicates = outcomes
                .iter()
                .filter(|o| **o == Outcome::Duplicate)
                .count();
            let rejected: Vec<String> = outcomes
                .iter()
                .filter_map(|o| match o {
                    Outcome::Rejected(r) => Some(r.to_string()),
                    _ => None,
                })
                .collect();
            if json {
                output::json(&outcomes);
            } else {
                eprintln!(
                    "{:>12} {accepted} events ({duplicates} duplicates, {} rejected)",
                    "Ingested",
                    rejected.len()
                );
                for r in &rejected {
                    eprintln!("    rejected: {r}");
                }
            }
            if rejected.is_empty() {
                Ok(())
            } else {
                Err(Failure::Failed(String::new()))
            }
        }
        UsageCommand::Show {
            dimension,
            value,
            window,
            metric,
            aggregation,
            period,
        } => {
            let window = match window.as_str() {
                "minute" => Window::Minute,
                "hour" => Window::Hour,
                "day" => Window::Day,
                other => {
                    return Err(Failure::Input(format!(
                        "unknown window \"{other}\": use minute, hour or day"
                    )))
                }
            };
            let (from_ms, to_ms) = match &period {
                Some(p) => commons_meter::period_bounds(p)
                    .ok_or_else(|| Failure::Input(format!("\"{p}\" is not a period (YYYY-MM)")))?,
                None => (0, i64::MAX),
            };
            // unique:FIELD counts distinct users (or sites, ...) exactly, over the whole range.
            if let Some(field) = aggregation.strip_prefix("unique:") {
                let n = m
                    .unique_count(&dimension, &value, field, from_ms, to_ms)
                    .map_err(|e| Failure::Input(e.to_string()))?;
                if json {
                    output::json(&serde_json::json!({ "unique": field, "count": n }));
                } else {
                    println!("{n}");
                }
                return Ok(());
            }
            let aggregation = match aggregation.as_str() {
                "sum" => Aggregation::Sum,
                "count" => Aggregation::Count,
                "max" => Aggregation::Max,
                other => {
                    return Err(Failure::Input(format!(
                        "unknown aggregation \"{other}\": use sum, count, max or unique:FIELD (e.g. unique:user)"
                    )))
                }
            };
            let q = Query {
                window,
                dim: &dimension,
                value: &value,
                metric: &metric,
                aggregation,
                from_ms,
                to_ms,
            };
            let rows = m.query(&q).map_err(|e| Failure::Input(e.to_string()))?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(start, v)| serde_json::json!({ "start": time(*start), "value": v }))
                    .collect();
                output::json(&v);
            } else {
                for (start, v) in rows {
                    println!("{}  {v}", time(start));
                }
            }
            Ok(())
        }
        UsageCommand::Revert { backfill } => {
            let n = m
                .revert_backfill(&backfill)
                .map_err(|e| Failure::Failed(e.to_string()))?;
            eprintln!("{:>12} backfill {backfill} ({n} events)", "Reverted");
            Ok(())
        }
    }
}

fn time(ms: i64) -> String {
    commons_meter::format_time(ms)
}

#[derive(clap::Args)]
pub struct SubscribeArgs {
    /// The user.
    user: String,
    /// The tier to subscribe to or change to (free, member, patron, or as configured).
    tier: Option<String>,
    /// Record a payment made outside a payment provider (cash, bank transfer), with this reference.
    #[arg(long, value_name = "REFERENCE")]
    payment: Option<String>,
    /// Amount paid, minor units [default: the tier's price]
    #[arg(long)]
    amount: Option<u64>,
    /// What the payment cost to receive, minor units.
    #[arg(long, default_value_t = 0)]
    fee: u64,
    /// Stop renewing; the tier lasts to the end of the term.
    #[arg(long, conflicts_with = "tier")]
    cancel: bool,
}

/// `commons subscribe`.
pub fn subscribe(home: &Path, args: SubscribeArgs, json: bool) -> Result<(), Failure> {
    let SubscribeArgs {
        user,
        tier,
        payment,
        amount,
        fee,
        cancel,
    } = args;
    let (user, tier, payment) = (user.as_str(), tier.as_deref(), payment.as_deref());
    let settings = MoneySettings::load(home).map_err(money)?;
    let b = periods::billing(
        home,
        &commons_engine::StoreConfig::from_env(),
        settings.tiers(),
    )
    .map_err(money)?;
    let now = now_ms();
    let fail = |e: commons_ledger::billing::BillingError| match e {
        commons_ledger::billing::BillingError::UnknownTier(..)
        | commons_ledger::billing::BillingError::Invalid(_) => Failure::Input(e.to_string()),
        other => Failure::Failed(other.to_string()),
    };
    if cancel {
        b.cancel(user).map_err(fail)?;
    } else if let (Some(tier), Some(reference)) = (tier, payment) {
        let price = b.tiers.iter().find(|t| t.name == tier).map(|t| t.price);
        let Some(price) = price.or(amount) else {
            return Err(Failure::Input(format!("unknown tier \"{tier}\"")));
        };
        let mut j = journal(home)?;
        let mut cents = Cents { journal: &mut j };
        b.handle(
            &Manual::payment(reference, user, tier, amount.unwrap_or(price), fee),
            &mut cents,
            now,
        )
        .map_err(fail)?;
    } else if let Some(tier) = tier {
        let change = b.change_tier(user, tier, now).map_err(fail)?;
        if !json {
            eprintln!(
                "{:>12} {user}: {} -> {} ({}; {} to pay now)",
                "Changed", change.from, change.to, change.effective, change.charge_now
            );
        }
    }
    let sub = b.subscription(user).map_err(fail)?;
    let current = b.current_tier(user, now).map_err(fail)?;
    if json {
        output::json(&serde_json::json!({ "user": user, "tier": current, "subscription": sub }));
    } else {
        println!("{user}: {current}");
        if let Some(s) = sub {
            println!(
                "  {} {}, term ends {}",
                s.status,
                s.tier,
                time(s.term_end_ms)
            );
        }
    }
    Ok(())
}

/// `commons period close PERIOD`.
pub fn close(home: &Path, period: &str, json: bool) -> Result<(), Failure> {
    let closed =
        periods::close(home, &commons_engine::StoreConfig::from_env(), period).map_err(money)?;
    if json {
        output::json(&closed);
    } else {
        eprintln!(
            "{:>12} {period}: {} subscribers, {} tokens allocated in {} shares (policy v{}){}",
            "Closed",
            closed.subscribers,
            closed.tokens_allocated,
            closed.shares,
            closed.policy_version,
            if closed.already_closed > 0 {
                format!(", {} closed before", closed.already_closed)
            } else {
                String::new()
            }
        );
        if !closed.unknown_sites.is_empty() {
            eprintln!(
                "warning: usage of unknown sites went to the general fund: {}",
                closed.unknown_sites.join(", ")
            );
        }
    }
    Ok(())
}

/// `commons statement ORG`.
pub fn show_statement(
    home: &Path,
    org: &str,
    period: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let Some(account) = recipient_named(org) else {
        return Err(Failure::Input(format!(
            "\"{org}\" names no recipient: write operator:ID, provider:ID, project:ID or general-fund"
        )));
    };
    let mut j = journal(home)?;
    let lines = statement(&mut j, &account, period).map_err(|e| Failure::Failed(e.to_string()))?;
    if json {
        output::json(&serde_json::json!({ "recipient": org, "account": account, "lines": lines }));
        return Ok(());
    }
    println!(
        "Statement for {org}{}",
        period.map(|p| format!(", {p}")).unwrap_or_default()
    );
    println!(
        "{:8}  {:24}  {:>11}  {:>12}  POLICY",
        "PERIOD", "SITE", "SUBSCRIBERS", "TOKENS"
    );
    let mut total = 0;
    for l in &lines {
        total += l.amount;
        let site = if l.site.is_empty() {
            "(general)"
        } else {
            &l.site
        };
        println!(
            "{:8}  {:24}  {:>11}  {:>12}  v{}",
            l.period, site, l.subscribers, l.amount, l.policy_version
        );
    }
    println!("{:8}  {:24}  {:>11}  {:>12}", "", "total", "", total);
    Ok(())
}
