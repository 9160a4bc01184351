//! Period close: every subscriber's escrow is allocated by the policy over
//! what they used, recipients' organisations split what they received among
//! their members, opted-in recipients are paid out, and every recipient gets
//! a statement.
//!
//! Transfer ids are derived from (period, subscriber, recipient): closing
//! twice changes nothing.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::allocation::{allocate, largest_remainder, Context, Recipient, SiteUsage};
use crate::book::{PeriodClosed, Statement, Transfer};
use crate::cents::{account_id, code, recipient_account, transfer_id, Cents, CentsError, TOKENS};
use crate::journal::{now_ns, Journal, JournalError};
use crate::store::Side;
pub use crate::store::{StatementLine, SubscriberShare};

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

/// What `recipient` (an account name) received, by period and site.
pub fn statement(
    journal: &mut Journal,
    recipient: &str,
    period: Option<&str>,
) -> Result<Vec<StatementLine>, JournalError> {
    journal.statement(recipient, period)
}

/// Statement lines of one batch: (recipient, site, via) -> the line.
type Lines = HashMap<(String, String, String), Line>;

/// A statement line in the making, and its place among the batch's lines.
#[derive(Default)]
struct Line {
    index: u64,
    amount: u64,
    subscribers: u64,
}

/// Subscribers per batch (one fsync each).
const BATCH: usize = 8_192;

fn token_transfer(id: u64, from: &str, to: &str, amount: u64) -> Transfer {
    Transfer {
        id,
        debit_account_id: account_id(from),
        credit_account_id: account_id(to),
        amount,
        pending_id: 0,
        ledger: TOKENS,
        code: code::ALLOCATION,
        flags: 0,
        timeout_ms: 0,
        user_data: 0,
    }
}

/// Closes `period`: allocates every escrow with tokens by `usage` (per user:
/// site and weight), splits organisations' receipts, pays out opted-in
/// recipients, writes statements.
///
/// Each subscriber's escrow moves whole into the period's clearing account
/// in one transfer, stored in the same transaction as the statement lines
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
    // Another writer of the journal (a second server, the CLI) may append
    // between our batches; each step is idempotent, so we plan again from
    // the journal as it then is (subscribers an earlier attempt closed then
    // count as closed before).
    for _ in 0..8 {
        match close_once(cents, ctx, registry, period, usage) {
            Err(CentsError::Journal(JournalError::Conflict { .. })) => continue,
            done => return done,
        }
    }
    Err(CentsError::Journal(JournalError::Busy))
}

fn close_once(
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
    let mut private: Vec<Side> = Vec::new();
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
        let mut parts = Vec::with_capacity(shares.len());
        for s in &shares {
            let key = (
                recipient_account(&s.recipient),
                s.site.clone().unwrap_or_default(),
                s.via.clone().unwrap_or_default(),
            );
            let next = lines.len() as u64;
            let line = lines.entry(key).or_insert_with(|| Line {
                index: next,
                ..Line::default()
            });
            line.amount += s.amount;
            line.subscribers += 1;
            // The subscriber's own record: their part of the public line.
            parts.push((line.index, s.amount));
        }
        private.push(Side::Shares {
            period: period.into(),
            subscriber: user.clone(),
            parts,
        });
        batch.push(token_transfer(
            marker,
            &format!("tokens:escrow:{user}"),
            &clearing,
            held,
        ));
        closed.subscribers += 1;
        closed.tokens_allocated += held;
        closed.shares += shares.len();
        if batch.len() >= BATCH {
            submit(cents, &mut batch, period, version, &mut lines, &mut private)?;
        }
    }
    submit(cents, &mut batch, period, version, &mut lines, &mut private)?;

    // Pay every recipient what its statements say and it has not had yet,
    // with the record of what was paid, in one transaction.
    let owed = cents.journal.owed(period)?;
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
            ));
            received.push((recipient.clone(), total - paid));
        }
    }
    let paid: Vec<Side> = received
        .iter()
        .map(|(r, amount)| Side::Payout {
            period: period.into(),
            recipient: r.clone(),
            paid: *amount,
        })
        .collect();
    apply(cents, &batch, &paid)?;
    batch.clear();
    debug_assert_eq!(
        cents.tokens(&clearing),
        0,
        "clearing ends every close at zero"
    );

    // Organisations split what they received among their members.
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
            ));
        }
    }
    apply(cents, &batch, &[])?;

    // Recipients that asked to be paid out in cash.
    for account in &registry.auto_redeem {
        let held = cents.tokens(account);
        if held > 0 {
            closed.paid_out_cents +=
                cents.redeem(&format!("auto:{period}:{account}:{held}"), account, held)?;
        }
    }
    // Where CommonCents stand after it, under which policy: the books'
    // history, in the journal (a close that did nothing new adds nothing).
    if closed.subscribers > 0 {
        let record = PeriodClosed {
            period: period.into(),
            policy: ctx.policy.clone(),
            subscribers: closed.subscribers as u64,
            tokens_allocated: closed.tokens_allocated,
            reserve_cents: cents.reserve(),
            tokens_outstanding: cents.outstanding(),
        };
        apply(
            cents,
            &[],
            &[Side::Close {
                close: record,
                seq: 0,
            }],
        )?;
    }
    closed.unknown_sites = unknown.into_iter().collect();
    Ok(closed)
}

fn apply(cents: &mut Cents<'_>, batch: &[Transfer], side: &[Side]) -> Result<(), CentsError> {
    if batch.is_empty() && side.is_empty() {
        return Ok(());
    }
    let results = cents.journal.create_transfers_with(batch, now_ns(), side)?;
    match results.into_iter().find_map(Result::err) {
        None => Ok(()),
        Some(e) => Err(CentsError::Refused(e)),
    }
}

/// Stores a batch of subscribers' transfers with their statement lines
/// (committed in the journal, in a fixed order) and their private shares.
fn submit(
    cents: &mut Cents<'_>,
    batch: &mut Vec<Transfer>,
    period: &str,
    version: u32,
    lines: &mut Lines,
    private: &mut Vec<Side>,
) -> Result<(), CentsError> {
    if batch.is_empty() {
        return Ok(());
    }
    // In the order subscribers' parts name them.
    let mut lines: Vec<_> = std::mem::take(lines).into_iter().collect();
    lines.sort_by_key(|(_, l)| l.index);
    let mut side: Vec<Side> = lines
        .into_iter()
        .map(|((recipient, site, via), l)| Side::Statement {
            statement: Statement {
                period: period.into(),
                recipient,
                site,
                via,
                policy_version: version,
                amount: l.amount,
                subscribers: l.subscribers,
            },
            seq: 0,
        })
        .collect();
    side.append(private);
    apply(cents, batch, &side)?;
    batch.clear();
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
