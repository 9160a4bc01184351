//! Period close: every subscriber's escrow is allocated by the policy over
//! what they used, recipients' organisations split what they received among
//! their members, opted-in recipients are paid out, and every recipient gets
//! a statement.
//!
//! Each subscriber's allocation is one linked chain of transfers (all or
//! nothing); many chains go in one batch, so a period of 100,000
//! subscribers costs a few dozen fsyncs, not 100,000. Transfer ids are
//! derived from (period, subscriber, recipient, site): closing twice changes
//! nothing.

use std::collections::HashMap;

use rusqlite::params;
use serde::{Deserialize, Serialize};

use crate::allocation::{allocate, largest_remainder, Context, Recipient, SiteUsage};
use crate::book::Transfer;
use crate::cents::{account_id, code, recipient_account, transfer_id, Cents, CentsError, TOKENS};
use crate::journal::{Journal, JournalError};

/// Per user: the sites they used in a period and how much (meter's `usage_by_user`).
pub type Usage = HashMap<String, Vec<(String, u64)>>;

/// What the platform knows about a site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub operator: String,
    /// Providers whose nodes serve it, weighted by resource use.
    #[serde(default)]
    pub providers: Vec<(String, u64)>,
    /// The blueprint's `depends_on_projects`.
    #[serde(default)]
    pub projects: Vec<(String, u64)>,
}

/// How an organisation splits its receipts among its members: fixed amounts
/// first (in order, as far as the money goes), the rest by weight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSplit {
    #[serde(default)]
    pub fixed: Vec<(String, u64)>,
    #[serde(default)]
    pub shares: Vec<(String, u64)>,
}

/// Sites, organisations' rules and payout preferences.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Registry {
    #[serde(default)]
    pub sites: HashMap<String, Site>,
    /// Keyed by the recipient's account name (`tokens:operator:acme`).
    #[serde(default)]
    pub splits: HashMap<String, MemberSplit>,
    /// Recipient accounts that are paid out in cash at every close.
    #[serde(default)]
    pub auto_redeem: Vec<String>,
}

/// Splits `amount` by a member split; the parts sum to `amount`.
pub fn split_members(amount: u64, split: &MemberSplit) -> Vec<(String, u64)> {
    let mut left = amount;
    let mut out: Vec<(String, u64)> = Vec::new();
    for (member, fixed) in &split.fixed {
        let part = (*fixed).min(left);
        left -= part;
        out.push((member.clone(), part));
    }
    let weights: Vec<u64> = split.shares.iter().map(|(_, w)| *w).collect();
    match largest_remainder(left, &weights) {
        Some(parts) => out.extend(split.shares.iter().map(|(m, _)| m.clone()).zip(parts)),
        // No weighted members: the first fixed member takes the rest.
        None => {
            if let Some(first) = out.first_mut() {
                first.1 += left;
            }
        }
    }
    out.retain(|(_, a)| *a > 0);
    out
}

/// Totals of one close.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Closed {
    pub period: String,
    pub policy_version: u32,
    pub subscribers: usize,
    /// Subscribers closed before (nothing done again).
    pub already_closed: usize,
    pub tokens_allocated: u64,
    pub shares: usize,
    /// Sites in the usage that the registry does not know (their weight is dropped).
    pub unknown_sites: Vec<String>,
    pub paid_out_cents: u64,
}

/// One line of a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementLine {
    pub period: String,
    pub site: String,
    /// How many subscribers' use it came from (never who).
    pub subscribers: u64,
    pub amount: u64,
    pub policy_version: u32,
}

/// Statements live beside the journal, written in the same transaction as
/// the transfers they describe.
const STATEMENTS: &str = "CREATE TABLE IF NOT EXISTS statements (
    period TEXT NOT NULL, recipient TEXT NOT NULL, site TEXT NOT NULL, policy_version INTEGER NOT NULL,
    amount INTEGER NOT NULL, subscribers INTEGER NOT NULL,
    PRIMARY KEY (period, recipient, site, policy_version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS period_payouts (
    period TEXT NOT NULL, recipient TEXT NOT NULL, paid INTEGER NOT NULL,
    PRIMARY KEY (period, recipient)) WITHOUT ROWID;";

/// What `recipient` (an account name) received, by period and site.
pub fn statement(
    journal: &Journal,
    recipient: &str,
    period: Option<&str>,
) -> Result<Vec<StatementLine>, rusqlite::Error> {
    let conn = journal.connection();
    conn.execute_batch(STATEMENTS)?;
    let mut stmt = conn.prepare(
        "SELECT period, site, subscribers, amount, policy_version FROM statements
         WHERE recipient = ?1 AND (?2 IS NULL OR period = ?2) ORDER BY period, site",
    )?;
    let rows = stmt
        .query_map(params![recipient, period], |r| {
            Ok(StatementLine {
                period: r.get(0)?,
                site: r.get(1)?,
                subscribers: r.get::<_, i64>(2)? as u64,
                amount: r.get::<_, i64>(3)? as u64,
                policy_version: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Statement lines of one batch: (recipient, site) -> (amount, subscribers).
type Lines = HashMap<(String, String), (u64, u64)>;

/// Subscribers per batch (one fsync each).
const BATCH: usize = 8_192;

fn token_transfer(id: u64, from: &str, to: &str, amount: u64, flags: u16) -> Transfer {
    Transfer {
        id,
        debit_account_id: account_id(from),
        credit_account_id: account_id(to),
        amount,
        pending_id: 0,
        ledger: TOKENS,
        code: code::ALLOCATION,
        flags,
        timeout_ms: 0,
        user_data: 0,
    }
}

/// Closes `period`: allocates every escrow with tokens by `usage` (per user:
/// site and weight), splits organisations' receipts, pays out opted-in
/// recipients, writes statements.
///
/// Each subscriber's escrow moves whole into the period's clearing account
/// in one transfer, written in the same transaction as the statement lines
/// of its exact allocation; recipients are then paid from clearing what the
/// statements say they are owed and have not been paid yet. So the journal
/// grows by one transfer per subscriber plus one per recipient (not one per
/// share), a crash at any point loses nothing, and a second close pays only
/// what is new. Clearing ends every close at zero.
pub fn close_period(
    cents: &mut Cents<'_>,
    ctx: &Context,
    registry: &Registry,
    period: &str,
    usage: &Usage,
) -> Result<Closed, CentsError> {
    let mut closed = Closed {
        period: period.into(),
        policy_version: ctx.policy.version,
        ..Closed::default()
    };
    cents
        .journal
        .connection()
        .execute_batch(STATEMENTS)
        .map_err(JournalError::from)?;
    let clearing = format!("tokens:clearing:{period}");
    cents.ensure_accounts(&[&clearing])?;
    let mut escrows: Vec<(String, u64)> = cents
        .journal
        .book()
        .accounts()
        .filter_map(|(a, b)| {
            let user = a.name.strip_prefix("tokens:escrow:")?;
            let held = b.net_credit().max(0) as u64;
            (held > 0).then(|| (user.to_string(), held))
        })
        .collect();
    escrows.sort();
    let mut unknown: std::collections::BTreeSet<String> = Default::default();
    let mut batch: Vec<Transfer> = Vec::new();
    let mut lines: Lines = HashMap::new();
    let version = ctx.policy.version;
    for (user, held) in escrows {
        let marker = transfer_id(&["close", period, &user]);
        if cents.journal.book().transfer(marker).is_some() {
            closed.already_closed += 1;
            continue;
        }
        let sites: Vec<SiteUsage> = usage
            .get(&user)
            .into_iter()
            .flatten()
            .filter_map(|(site, weight)| match registry.sites.get(site) {
                Some(s) => Some(SiteUsage {
                    site: site.clone(),
                    operator: s.operator.clone(),
                    usage: *weight,
                    providers: s.providers.clone(),
                    projects: s.projects.clone(),
                }),
                None => {
                    unknown.insert(site.clone());
                    None
                }
            })
            .collect();
        let shares = allocate(ctx, held, 0, &sites)?;
        for s in &shares {
            let line = lines
                .entry((
                    recipient_account(&s.recipient),
                    s.site.clone().unwrap_or_default(),
                ))
                .or_default();
            line.0 += s.amount;
            line.1 += 1;
        }
        batch.push(token_transfer(
            marker,
            &format!("tokens:escrow:{user}"),
            &clearing,
            held,
            0,
        ));
        closed.subscribers += 1;
        closed.tokens_allocated += held;
        closed.shares += shares.len();
        if batch.len() >= BATCH {
            submit(cents, &mut batch, period, version, &mut lines)?;
        }
    }
    submit(cents, &mut batch, period, version, &mut lines)?;

    // Pay every recipient what its statements say and it has not had yet.
    let owed = owed(cents.journal, period).map_err(JournalError::from)?;
    let names: Vec<&str> = owed.iter().map(|(r, _, _)| r.as_str()).collect();
    cents.ensure_accounts(&names)?;
    let mut received: Vec<(String, u64)> = Vec::new();
    for (recipient, total, paid) in &owed {
        if total > paid {
            batch.push(token_transfer(
                transfer_id(&["pay", period, recipient, &paid.to_string()]),
                &clearing,
                recipient,
                total - paid,
                0,
            ));
            received.push((recipient.clone(), total - paid));
        }
    }
    let paid_now = received.clone();
    let record_paid = move |tx: &rusqlite::Transaction<'_>| -> rusqlite::Result<()> {
        let mut up = tx.prepare_cached(
            "INSERT INTO period_payouts (period, recipient, paid) VALUES (?1, ?2, ?3)
             ON CONFLICT (period, recipient) DO UPDATE SET paid = paid + excluded.paid",
        )?;
        for (r, amount) in &paid_now {
            up.execute(params![period, r, *amount as i64])?;
        }
        Ok(())
    };
    // One transaction: the payouts and the record of what was paid.
    if !batch.is_empty() {
        let results = cents.journal.create_transfers_with(&batch, &record_paid)?;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(CentsError::Refused(e));
        }
    }
    batch.clear();
    debug_assert_eq!(
        cents.tokens(&clearing),
        0,
        "clearing ends every close at zero"
    );

    // Organisations split what they received among their members.
    received.sort();
    for (org, amount) in &received {
        let Some(split) = registry.splits.get(org) else {
            continue;
        };
        let parts = split_members(*amount, split);
        let members: Vec<String> = parts
            .iter()
            .map(|(m, _)| format!("{org}:member:{m}"))
            .collect();
        let refs: Vec<&str> = members.iter().map(String::as_str).collect();
        cents.ensure_accounts(&refs)?;
        for ((m, part), to) in parts.iter().zip(&members) {
            batch.push(token_transfer(
                transfer_id(&["split", period, org, m, &amount.to_string()]),
                org,
                to,
                *part,
                0,
            ));
        }
    }
    if !batch.is_empty() {
        if let Some(e) = cents
            .journal
            .create_transfers(&batch)?
            .into_iter()
            .find_map(Result::err)
        {
            return Err(CentsError::Refused(e));
        }
    }

    // Recipients that asked to be paid out in cash.
    for account in &registry.auto_redeem {
        let held = cents.tokens(account);
        if held > 0 {
            closed.paid_out_cents +=
                cents.redeem(&format!("auto:{period}:{account}:{held}"), account, held)?;
        }
    }
    closed.unknown_sites = unknown.into_iter().collect();
    Ok(closed)
}

/// Per recipient of `period`: (account, owed by the statements, paid so far).
fn owed(journal: &Journal, period: &str) -> Result<Vec<(String, u64, u64)>, rusqlite::Error> {
    let conn = journal.connection();
    let mut stmt = conn.prepare(
        "SELECT s.recipient, SUM(s.amount), COALESCE((SELECT paid FROM period_payouts p WHERE p.period = ?1 AND p.recipient = s.recipient), 0)
         FROM statements s WHERE s.period = ?1 GROUP BY s.recipient ORDER BY s.recipient",
    )?;
    let rows = stmt
        .query_map([period], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Writes a batch and its statement lines in one transaction.
fn submit(
    cents: &mut Cents<'_>,
    batch: &mut Vec<Transfer>,
    period: &str,
    version: u32,
    lines: &mut Lines,
) -> Result<(), CentsError> {
    if batch.is_empty() {
        return Ok(());
    }
    let pending = std::mem::take(lines);
    let write = |tx: &rusqlite::Transaction<'_>| -> rusqlite::Result<()> {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO statements (period, recipient, site, policy_version, amount, subscribers) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (period, recipient, site, policy_version) DO UPDATE SET
               amount = amount + excluded.amount, subscribers = subscribers + excluded.subscribers",
        )?;
        for ((recipient, site), (amount, subscribers)) in &pending {
            upsert.execute(params![
                period,
                recipient,
                site,
                version,
                *amount as i64,
                *subscribers as i64
            ])?;
        }
        Ok(())
    };
    let results = cents.journal.create_transfers_with(batch, &write)?;
    batch.clear();
    match results.into_iter().find_map(Result::err) {
        None => Ok(()),
        Some(e) => Err(CentsError::Refused(e)),
    }
}

/// The recipient account a statement or split refers to, from a short name:
/// `operator:acme`, `project:example.org/lib`, `provider:p1`, `general-fund`.
pub fn recipient_named(name: &str) -> Option<String> {
    let r = match name.split_once(':') {
        Some(("operator", id)) => Recipient::Operator(id.into()),
        Some(("provider", id)) => Recipient::Provider(id.into()),
        Some(("project", id)) => Recipient::Project(id.into()),
        None if name == "general-fund" => Recipient::GeneralFund,
        _ => return None,
    };
    Some(recipient_account(&r))
}
