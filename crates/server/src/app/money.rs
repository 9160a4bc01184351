//! Where money went, read from the ledger: a subscriber's own split of a
//! closed period, a recipient's statements, the proofs that those lines
//! are in the signed journal, and every period's totals. Each figure is
//! what period close stored, never computed again.

use std::collections::{BTreeMap, HashMap};

use commons_ledger::billing::Payment;
use commons_ledger::journal::{load_or_create_key, Checkpoint, Journal};
use commons_ledger::period::{recipient_named, StatementLine, SubscriberShare};
use commons_ledger::proof::{statement_proofs, InclusionProof};
use serde::Serialize;

use super::{member, AppError, ErrorKind, Result};
use crate::accounts::Principal;
use crate::periods::MoneySettings;
use crate::AppState;

fn failed(e: impl std::fmt::Display) -> AppError {
    AppError::new(ErrorKind::Internal, "Ledger unavailable", e.to_string())
}

fn period_checked(period: &str) -> Result<&str> {
    match commons_meter::period_bounds(period) {
        Some(_) if period.len() == 7 => Ok(period),
        _ => Err(AppError::new(
            ErrorKind::Malformed,
            "Invalid period",
            format!("\"{period}\" is not a period; write it as YYYY-MM, e.g. 2026-11"),
        )),
    }
}

/// One band of the picture: `amount` tokens from one holder to the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub from: String,
    pub to: String,
    pub amount: u64,
    /// How far from the payment: 1 for the fund and the sites, 2 for a
    /// site's operator, providers and projects, 3+ for upstream projects.
    pub step: usize,
}

/// A subscriber's money in one closed period.
#[derive(Debug, Serialize)]
pub struct MoneyFlow {
    pub period: String,
    /// Every period of theirs that has closed, newest first.
    pub periods: Vec<String>,
    /// Their payments made in the period: cents paid, the provider's fee,
    /// the tokens the rest bought.
    pub payments: Vec<Payment>,
    /// The tokens allocated at the period's close: the sum of `shares`.
    pub tokens: u64,
    /// Exactly what was stored at close, per recipient and site.
    pub shares: Vec<SubscriberShare>,
    /// The same figures as a flow, from the payment to every recipient.
    pub flows: Vec<Flow>,
}

/// A holder's name as people read it: `operator acme`, `site wiki`.
pub fn label(account: &str) -> String {
    let name = account.strip_prefix("tokens:").unwrap_or(account);
    match name {
        "general-fund" => "General fund".into(),
        _ => name.replacen(':', " ", 1),
    }
}

/// The flows of a subscriber's shares: payment → fund and sites → each
/// site's operator, providers and projects → upstream projects.
pub fn flows(shares: &[SubscriberShare]) -> Vec<Flow> {
    let you = "Your payment".to_string();
    let mut out: Vec<Flow> = Vec::new();
    let mut add = |from: String, to: String, amount: u64, step: usize| match out
        .iter_mut()
        .find(|f| f.from == from && f.to == to && f.step == step)
    {
        Some(f) => f.amount += amount,
        None => out.push(Flow {
            from,
            to,
            amount,
            step,
        }),
    };
    let mut by_site: BTreeMap<&str, Vec<&SubscriberShare>> = BTreeMap::new();
    for s in shares {
        if s.site.is_empty() {
            add(you.clone(), label(&s.recipient), s.amount, 1);
        } else {
            by_site.entry(&s.site).or_default().push(s);
        }
    }
    for (site, shares) in by_site {
        let site_node = format!("site {site}");
        add(
            you.clone(),
            site_node.clone(),
            shares.iter().map(|s| s.amount).sum(),
            1,
        );
        // A project's band carries what it kept and what it passed on.
        let project = |s: &SubscriberShare| {
            s.recipient
                .strip_prefix("tokens:project:")
                .map(str::to_string)
        };
        let mut through: HashMap<String, u64> = HashMap::new();
        for s in &shares {
            if let Some(p) = project(s) {
                *through.entry(p).or_default() += s.amount;
            }
        }
        // Pass kept amounts up the `via` chain (at most max_depth long).
        let parent: HashMap<String, String> = shares
            .iter()
            .filter_map(|s| Some((project(s)?, s.via.clone())).filter(|(_, v)| !v.is_empty()))
            .collect();
        for s in &shares {
            let Some(mut p) = project(s) else { continue };
            while let Some(up) = parent.get(&p) {
                *through.entry(up.clone()).or_default() += s.amount;
                p = up.clone();
            }
        }
        let depth = |p: &str| {
            let mut d = 0;
            let mut at = p.to_string();
            while let Some(up) = parent.get(&at) {
                d += 1;
                at = up.clone();
            }
            d
        };
        let mut ordered = shares.clone();
        ordered.sort_by_key(|s| project(s).map_or(0, |p| depth(&p) + 1));
        for s in ordered {
            match project(s) {
                None => add(site_node.clone(), label(&s.recipient), s.amount, 2),
                Some(p) => {
                    let from = match parent.get(&p) {
                        None => site_node.clone(),
                        Some(up) => format!("project {up}"),
                    };
                    add(from, format!("project {p}"), through[&p], 2 + depth(&p));
                }
            }
        }
    }
    out
}

/// The caller's money in `period` (their latest closed one when `None`).
pub fn money_of(state: &AppState, who: &Principal, period: Option<&str>) -> Result<MoneyFlow> {
    let m = member(who)?;
    let user = &m.user.id;
    let all = state
        .journal
        .lock()
        .expect("journal lock")
        .shares(user, None)
        .map_err(failed)?;
    let mut periods: Vec<String> = all.iter().map(|s| s.period.clone()).collect();
    periods.dedup();
    periods.reverse();
    let period = match period {
        Some(p) => period_checked(p)?.to_string(),
        None => periods
            .first()
            .cloned()
            .unwrap_or_else(|| commons_meter::period_of(commons_clock::now_ms())),
    };
    let shares: Vec<SubscriberShare> = all.into_iter().filter(|s| s.period == period).collect();
    let (from_ms, to_ms) = commons_meter::period_bounds(&period).expect("checked");
    let payments = state
        .billing
        .lock()
        .expect("billing lock")
        .payments(user, from_ms, to_ms)
        .map_err(failed)?;
    Ok(MoneyFlow {
        tokens: shares.iter().map(|s| s.amount).sum(),
        flows: flows(&shares),
        period,
        periods,
        payments,
        shares,
    })
}

/// What one recipient received, period by period.
#[derive(Debug, Serialize)]
pub struct RecipientStatement {
    /// As written: `operator:acme`.
    pub recipient: String,
    /// Its ledger account: `tokens:operator:acme`.
    pub account: String,
    pub lines: Vec<StatementLine>,
    /// Per period, oldest first: (period, tokens).
    pub totals: Vec<(String, u64)>,
    /// Tokens it holds now.
    pub holds: u64,
    /// How it shares what it receives among its members, if it does.
    pub members: Option<commons_ledger::period::MemberSplit>,
    /// Whether it is paid out in cash at every close.
    pub redeems_to_cash: bool,
}

/// A recipient named as `operator:ID`, `provider:ID`, `project:ID` or `general-fund`.
pub fn account_of(recipient: &str) -> Result<String> {
    recipient_named(recipient).ok_or_else(|| {
        AppError::new(
            ErrorKind::Invalid,
            "Unknown recipient",
            format!(
                "\"{recipient}\" names no recipient: write operator:ID, provider:ID, project:ID or general-fund"
            ),
        )
    })
}

/// A recipient's statements (public, like the journal they are committed in).
pub fn statement_of(state: &AppState, recipient: &str) -> Result<RecipientStatement> {
    let account = account_of(recipient)?;
    let settings = MoneySettings::load(&state.home).map_err(failed)?;
    let mut journal = state.journal.lock().expect("journal lock");
    journal.catch_up().map_err(failed)?;
    let lines = journal.statement(&account, None).map_err(failed)?;
    let mut totals: Vec<(String, u64)> = Vec::new();
    for l in &lines {
        match totals.last_mut() {
            Some((p, t)) if *p == l.period => *t += l.amount,
            _ => totals.push((l.period.clone(), l.amount)),
        }
    }
    let holds = commons_ledger::cents::Cents {
        journal: &mut journal,
    }
    .tokens(&account);
    Ok(RecipientStatement {
        recipient: recipient.to_string(),
        members: settings.splits.get(&account).cloned(),
        redeems_to_cash: settings.auto_redeem.contains(&account),
        account,
        lines,
        totals,
        holds,
    })
}

/// Proofs that the latest signed checkpoint covers a recipient's lines
/// (signing one first if the journal has grown past it).
pub fn proofs(
    state: &AppState,
    recipient: &str,
    period: Option<&str>,
) -> Result<Vec<InclusionProof>> {
    let account = account_of(recipient)?;
    if let Some(p) = period {
        period_checked(p)?;
    }
    let mut journal = state.journal.lock().expect("journal lock");
    journal.catch_up().map_err(failed)?;
    let checkpoint = covering_checkpoint(state, &mut journal)?;
    statement_proofs(&mut journal, &account, period, &checkpoint).map_err(failed)
}

/// One period's money: what subscribers paid in it, and what its close
/// allocated, by kind of recipient.
#[derive(Debug, Default, Serialize)]
pub struct PeriodTotals {
    pub period: String,
    /// Cents paid by subscribers in the period.
    pub paid_cents: u64,
    /// Cents of it the payment providers kept.
    pub fees_cents: u64,
    /// Cents given back.
    pub refunded_cents: u64,
    /// Every token allocated: the sum of the others.
    pub allocated: u64,
    pub general_fund: u64,
    pub providers: u64,
    pub operators: u64,
    pub projects: u64,
    /// Recipients that received something.
    pub recipients: usize,
}

/// Totals of every period with payments or a close, oldest first.
pub fn period_totals(state: &AppState) -> Result<Vec<PeriodTotals>> {
    let paid = state
        .billing
        .lock()
        .expect("billing lock")
        .paid_per_period()
        .map_err(failed)?;
    let rows = state
        .journal
        .lock()
        .expect("journal lock")
        .totals()
        .map_err(failed)?;
    let mut out: Vec<PeriodTotals> = Vec::new();
    for (period, account, amount) in rows {
        if out.last().is_none_or(|t| t.period != period) {
            out.push(PeriodTotals {
                period: period.clone(),
                ..PeriodTotals::default()
            });
        }
        let t = out.last_mut().expect("pushed");
        t.allocated += amount;
        t.recipients += 1;
        let kind = account.strip_prefix("tokens:").unwrap_or(&account);
        match kind.split(':').next() {
            Some("general-fund") => t.general_fund += amount,
            Some("provider") => t.providers += amount,
            Some("operator") => t.operators += amount,
            Some("project") => t.projects += amount,
            _ => {}
        }
    }
    for (period, gross, fees, refunded) in paid {
        let at = match out.iter().position(|t| t.period == period) {
            Some(at) => at,
            None => {
                out.push(PeriodTotals {
                    period,
                    ..PeriodTotals::default()
                });
                out.len() - 1
            }
        };
        let t = &mut out[at];
        (t.paid_cents, t.fees_cents, t.refunded_cents) = (gross, fees, refunded);
    }
    out.sort_by(|a, b| a.period.cmp(&b.period));
    Ok(out)
}

/// The custodian key's name among the keys instances share.
pub(crate) const CUSTODIAN: &str = "ledger-custodian";

/// The key the platform signs its journal's checkpoints with, for a
/// command run beside it (`commons ledger`): where instances share a
/// database, the one they keep there (this data directory's file becomes
/// it, or it becomes theirs if none is kept yet); else this data
/// directory's own.
pub fn custodian_key(
    home: &std::path::Path,
    store: &commons_store::StoreConfig,
) -> std::result::Result<commons_ledger::journal::SigningKey, String> {
    let path = commons_runtime::Layout::new(home).custodian_key();
    load_or_create_key(&path).map_err(|e| e.to_string())?;
    if let commons_store::StoreConfig::Postgres { .. } = store {
        let engine = commons_engine::Engine::open(home, store).map_err(|e| e.to_string())?;
        crate::keys::adopt_shared(&engine, CUSTODIAN, &path)?;
    }
    load_or_create_key(&path).map_err(|e| e.to_string())
}

/// The latest checkpoint if it covers the whole journal, else a new one
/// signed now (so reading the books never grows them).
pub fn covering_checkpoint(state: &AppState, journal: &mut Journal) -> Result<Checkpoint> {
    let size = journal.tree().len();
    let latest = journal.checkpoints().map_err(failed)?;
    if let Some(c) = latest.into_iter().last().filter(|c| c.tree_size == size) {
        return Ok(c);
    }
    // Signed with the key every instance sharing the database signs with.
    let path = state.engine.layout.custodian_key();
    load_or_create_key(&path).map_err(failed)?;
    crate::keys::adopt_shared(&state.engine, CUSTODIAN, &path).map_err(failed)?;
    let key = load_or_create_key(&path).map_err(failed)?;
    journal.checkpoint(&key).map_err(failed)
}
