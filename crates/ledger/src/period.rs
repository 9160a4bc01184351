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
use std::path::Path;

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::allocation::{allocate, largest_remainder, Context, Recipient, Share, SiteUsage};
use crate::book::{flags, Transfer};
use crate::cents::{account_id, code, recipient_account, transfer_id, Cents, CentsError, TOKENS};

/// Per user: the sites they used in a period and how much (meter's `usage_by_user`).
pub type Usage = HashMap<String, Vec<(String, u64)>>;

/// What the platform knows about a site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    pub subscribers: u64,
    pub amount: u64,
    pub policy_version: u32,
}

/// Statement lines, kept beside the journal.
pub struct Statements {
    conn: Connection,
}

impl Statements {
    pub fn open(path: &Path) -> Result<Statements, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS statement_lines (
                period TEXT NOT NULL, recipient TEXT NOT NULL, site TEXT NOT NULL, subscriber TEXT NOT NULL,
                amount INTEGER NOT NULL, policy_version INTEGER NOT NULL,
                PRIMARY KEY (period, recipient, site, subscriber)) WITHOUT ROWID;",
        )?;
        Ok(Statements { conn })
    }

    fn record(&mut self, period: &str, lines: &[(String, &Share)]) -> Result<(), rusqlite::Error> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO statement_lines (period, recipient, site, subscriber, amount, policy_version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (subscriber, s) in lines {
                insert.execute(params![
                    period,
                    recipient_account(&s.recipient),
                    s.site.as_deref().unwrap_or(""),
                    subscriber,
                    s.amount as i64,
                    s.policy_version
                ])?;
            }
        }
        tx.commit()
    }

    /// What `recipient` (an account name) received, by period and site.
    /// Subscribers are counted, never named.
    pub fn statement(
        &self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<StatementLine>, rusqlite::Error> {
        let mut stmt = self.conn.prepare(
            "SELECT period, site, COUNT(*), SUM(amount), policy_version FROM statement_lines
             WHERE recipient = ?1 AND (?2 IS NULL OR period = ?2)
             GROUP BY period, site, policy_version ORDER BY period, site",
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
}

/// Transfers per batch (one fsync each).
const BATCH: usize = 8_192;

/// Closes `period`: allocates every escrow with tokens by `usage` (per user:
/// site and weight), splits organisations' receipts, pays out opted-in
/// recipients, writes statements.
pub fn close_period(
    cents: &mut Cents<'_>,
    statements: &mut Statements,
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
    let mut lines: Vec<(String, Share)> = Vec::new();
    let mut received: HashMap<String, u64> = HashMap::new();
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
        let escrow = format!("tokens:escrow:{user}");
        let names: Vec<String> = shares
            .iter()
            .map(|s| recipient_account(&s.recipient))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        cents.ensure_accounts(&refs)?;
        let start = batch.len();
        for (s, to) in shares.iter().zip(&names) {
            let site = s.site.as_deref().unwrap_or("");
            batch.push(Transfer {
                id: transfer_id(&["allocate", period, &user, to, site]),
                debit_account_id: account_id(&escrow),
                credit_account_id: account_id(to),
                amount: s.amount,
                pending_id: 0,
                ledger: TOKENS,
                code: code::ALLOCATION,
                flags: flags::LINKED,
                timeout_ms: 0,
                user_data: 0,
            });
            *received.entry(to.clone()).or_default() += s.amount;
        }
        batch[start].id = marker;
        batch
            .last_mut()
            .expect("a subscriber with tokens has shares")
            .flags &= !flags::LINKED;
        closed.subscribers += 1;
        closed.tokens_allocated += held;
        closed.shares += shares.len();
        lines.extend(shares.into_iter().map(|s| (user.clone(), s)));
        if batch.len() >= BATCH {
            submit(cents, &mut batch)?;
            flush(statements, period, &mut lines)?;
        }
    }
    submit(cents, &mut batch)?;
    flush(statements, period, &mut lines)?;

    // Organisations split what they received among their members.
    let mut names: Vec<&String> = received.keys().collect();
    names.sort();
    for org in names {
        let Some(split) = registry.splits.get(org) else {
            continue;
        };
        let parts = split_members(received[org], split);
        let members: Vec<String> = parts
            .iter()
            .map(|(m, _)| format!("{org}:member:{m}"))
            .collect();
        let refs: Vec<&str> = members.iter().map(String::as_str).collect();
        cents.ensure_accounts(&refs)?;
        for ((m, amount), to) in parts.iter().zip(&members) {
            batch.push(Transfer {
                id: transfer_id(&["split", period, org, m]),
                debit_account_id: account_id(org),
                credit_account_id: account_id(to),
                amount: *amount,
                pending_id: 0,
                ledger: TOKENS,
                code: code::ALLOCATION,
                flags: 0,
                timeout_ms: 0,
                user_data: 0,
            });
        }
    }
    submit(cents, &mut batch)?;

    // Recipients that asked to be paid out in cash.
    for account in &registry.auto_redeem {
        let held = cents.tokens(account);
        if held > 0 {
            closed.paid_out_cents +=
                cents.redeem(&format!("auto:{period}:{account}"), account, held)?;
        }
    }
    closed.unknown_sites = unknown.into_iter().collect();
    Ok(closed)
}

fn submit(cents: &mut Cents<'_>, batch: &mut Vec<Transfer>) -> Result<(), CentsError> {
    if batch.is_empty() {
        return Ok(());
    }
    let results = cents.journal.create_transfers(batch)?;
    batch.clear();
    match results.into_iter().find_map(Result::err) {
        None => Ok(()),
        Some(e) => Err(CentsError::Refused(e)),
    }
}

fn flush(
    statements: &mut Statements,
    period: &str,
    lines: &mut Vec<(String, Share)>,
) -> Result<(), CentsError> {
    let refs: Vec<(String, &Share)> = lines.iter().map(|(u, s)| (u.clone(), s)).collect();
    statements
        .record(period, &refs)
        .map_err(|e| CentsError::Invalid(format!("statements: {e}")))?;
    lines.clear();
    Ok(())
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
