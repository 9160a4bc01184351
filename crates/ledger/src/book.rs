//! The double-entry book: accounts, transfers, and the rules they obey.
//!
//! Modelled on TigerBeetle's semantics: money moves only as transfers
//! between two accounts of the same ledger (currency), in integer minor
//! units; transfers carry client-chosen ids, so retrying one is harmless;
//! linked transfers apply all-or-nothing; pending transfers are later posted
//! or voided, or expire. The book is a pure state machine over journal
//! entries: replaying the journal reproduces every balance.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Transfer flags.
pub mod flags {
    /// This transfer and the next succeed or fail together.
    pub const LINKED: u16 = 1;
    /// Reserve the amount; post or void it later.
    pub const PENDING: u16 = 1 << 1;
    /// Post (part of) the pending transfer `pending_id`.
    pub const POST_PENDING: u16 = 1 << 2;
    /// Release the pending transfer `pending_id`.
    pub const VOID_PENDING: u16 = 1 << 3;

    /// Account flag: debits (posted + pending) may never exceed posted credits.
    pub const DEBITS_MUST_NOT_EXCEED_CREDITS: u16 = 1;
    /// Account flag: credits (posted + pending) may never exceed posted debits.
    pub const CREDITS_MUST_NOT_EXCEED_DEBITS: u16 = 1 << 1;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: u64,
    /// Which ledger (currency or token) the account holds.
    pub ledger: u32,
    /// What kind of account it is (caller-defined).
    pub code: u16,
    pub flags: u16,
    /// A readable name: `operator:acme`, `reserve:usd`.
    pub name: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub debits_pending: u64,
    pub debits_posted: u64,
    pub credits_pending: u64,
    pub credits_posted: u64,
}

impl Balance {
    /// Posted credits minus posted debits (what an account "has", for credit-normal accounts).
    pub fn net_credit(&self) -> i128 {
        self.credits_posted as i128 - self.debits_posted as i128
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Client-chosen, unique, never zero.
    pub id: u64,
    pub debit_account_id: u64,
    pub credit_account_id: u64,
    /// Minor units. For a post, 0 means the whole pending amount.
    pub amount: u64,
    /// For post/void: the pending transfer acted on.
    #[serde(default)]
    pub pending_id: u64,
    pub ledger: u32,
    pub code: u16,
    #[serde(default)]
    pub flags: u16,
    /// For pending transfers: expires this many ms after it was accepted (0: never).
    #[serde(default)]
    pub timeout_ms: u64,
    /// Caller's reference (period, invoice, ...).
    #[serde(default)]
    pub user_data: u64,
}

/// Why a transfer or account was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    #[error("id must not be zero")]
    IdMustNotBeZero,
    #[error("flags are mutually exclusive")]
    FlagsAreMutuallyExclusive,
    #[error("exists with different fields")]
    ExistsWithDifferentFields,
    #[error("debit account not found")]
    DebitAccountNotFound,
    #[error("credit account not found")]
    CreditAccountNotFound,
    #[error("accounts must be different")]
    AccountsMustBeDifferent,
    #[error("accounts and transfer must share a ledger")]
    LedgerMismatch,
    #[error("amount must not be zero")]
    AmountMustNotBeZero,
    #[error("debits would exceed credits")]
    ExceedsCredits,
    #[error("credits would exceed debits")]
    ExceedsDebits,
    #[error("amount overflows")]
    Overflow,
    #[error("pending transfer not found")]
    PendingNotFound,
    #[error("referenced transfer is not pending")]
    PendingNotPending,
    #[error("pending transfer already posted")]
    PendingAlreadyPosted,
    #[error("pending transfer already voided")]
    PendingAlreadyVoided,
    #[error("pending transfer expired")]
    PendingExpired,
    #[error("post/void must name the pending transfer's accounts and ledger")]
    PendingMismatch,
    #[error("post exceeds the pending amount")]
    ExceedsPendingAmount,
    #[error("a linked transfer failed")]
    LinkedEventFailed,
    #[error("linked chain not closed (last transfer has the LINKED flag)")]
    LinkedEventChainOpen,
    #[error("account ledger must not be zero")]
    LedgerMustNotBeZero,
}

/// A transfer accepted now, or one accepted before with the same content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accepted {
    Created,
    Exists,
}

/// What happened to a pending transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingStatus {
    Pending,
    Posted,
    Voided,
    Expired,
}

/// One journal entry: everything that changes the book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Entry {
    Account {
        account: Account,
    },
    Transfer {
        transfer: Transfer,
        timestamp: u64,
    },
    Expire {
        pending_id: u64,
        timestamp: u64,
    },
    /// A statement line, committed here so that whoever holds it can prove
    /// it is covered by a signed checkpoint. Moves no money: the transfers
    /// of the same batch do.
    Statement {
        statement: Statement,
    },
    /// A period's close: the policy it applied and where CommonCents stood
    /// after it. Moves no money; a verifier checks its figures against the
    /// balances replay gives at that point.
    Close {
        close: PeriodClosed,
    },
}

/// What the open books chart over time, one per close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodClosed {
    pub period: String,
    pub policy: crate::allocation::Policy,
    /// Subscribers whose escrow this close allocated.
    pub subscribers: u64,
    pub tokens_allocated: u64,
    /// Cash in the reserve after the close, in cents.
    pub reserve_cents: u64,
    /// CommonCents in circulation after the close.
    pub tokens_outstanding: u64,
}

/// Part of what a recipient is owed for a period, from one site's use,
/// under one policy version (one batch of subscribers' allocations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    pub period: String,
    /// The recipient's account name (`tokens:operator:acme`).
    pub recipient: String,
    /// Empty for the general fund's part.
    pub site: String,
    /// The upstream project that passed it on (empty when it came from the
    /// site itself).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub via: String,
    pub policy_version: u32,
    pub amount: u64,
    /// How many subscribers' use it came from (never who).
    pub subscribers: u64,
}

impl Entry {
    /// The canonical bytes hashed into the journal's Merkle tree.
    pub fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("entries serialise")
    }
}

enum Undo {
    Balance(u64, Balance),
    AccountInserted(u64),
    TransferInserted(u64),
    Pending(u64, Option<PendingStatus>),
    Totals(u32, Balance),
    Clock(u64),
}

/// The book's state. Every mutation goes through [`Book::create_accounts`],
/// [`Book::create_transfers`] or [`Book::expire`], each of which appends the
/// entries it accepted to the caller's journal buffer.
#[derive(Default)]
pub struct Book {
    accounts: HashMap<u64, (Account, Balance)>,
    transfers: HashMap<u64, (Transfer, u64)>,
    pending: HashMap<u64, PendingStatus>,
    /// Sum of every account's balance, per ledger: debits always equal credits.
    totals: HashMap<u32, Balance>,
    clock: u64,
    undo: Vec<Undo>,
}

fn checked(a: u64, b: u64) -> Result<u64, Refusal> {
    a.checked_add(b).ok_or(Refusal::Overflow)
}

impl Book {
    pub fn new() -> Book {
        Book::default()
    }

    pub fn account(&self, id: u64) -> Option<(&Account, &Balance)> {
        self.accounts.get(&id).map(|(a, b)| (a, b))
    }

    pub fn accounts(&self) -> impl Iterator<Item = (&Account, &Balance)> {
        self.accounts.values().map(|(a, b)| (a, b))
    }

    pub fn transfer(&self, id: u64) -> Option<&Transfer> {
        self.transfers.get(&id).map(|(t, _)| t)
    }

    /// Every transfer with the book time it was accepted, oldest first.
    pub fn transfers(&self) -> Vec<(&Transfer, u64)> {
        let mut all: Vec<(&Transfer, u64)> =
            self.transfers.values().map(|(t, at)| (t, *at)).collect();
        all.sort_by_key(|(_, at)| *at);
        all
    }

    pub fn transfer_count(&self) -> usize {
        self.transfers.len()
    }

    pub fn pending_status(&self, id: u64) -> Option<PendingStatus> {
        self.pending.get(&id).copied()
    }

    /// A mark to roll back to (see [`Book::rollback`]).
    pub fn mark(&self) -> usize {
        self.undo.len()
    }

    /// Undoes every change since `mark`.
    pub fn rollback(&mut self, mark: usize) {
        while self.undo.len() > mark {
            match self.undo.pop().expect("len > mark") {
                Undo::Balance(id, b) => {
                    self.accounts
                        .get_mut(&id)
                        .expect("undo of a known account")
                        .1 = b
                }
                Undo::AccountInserted(id) => {
                    self.accounts.remove(&id);
                }
                Undo::TransferInserted(id) => {
                    self.transfers.remove(&id);
                }
                Undo::Pending(id, None) => {
                    self.pending.remove(&id);
                }
                Undo::Pending(id, Some(s)) => {
                    self.pending.insert(id, s);
                }
                Undo::Totals(l, b) => {
                    self.totals.insert(l, b);
                }
                Undo::Clock(c) => self.clock = c,
            }
        }
    }

    /// Forgets undo information (after a batch is durable).
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    fn tick(&mut self, now: u64) -> u64 {
        self.undo.push(Undo::Clock(self.clock));
        self.clock = now.max(self.clock + 1);
        self.clock
    }

    pub fn create_accounts(
        &mut self,
        accounts: &[Account],
        journal: &mut Vec<Entry>,
    ) -> Vec<Result<Accepted, Refusal>> {
        accounts
            .iter()
            .map(|a| {
                if a.id == 0 {
                    return Err(Refusal::IdMustNotBeZero);
                }
                if a.ledger == 0 {
                    return Err(Refusal::LedgerMustNotBeZero);
                }
                if a.flags & flags::DEBITS_MUST_NOT_EXCEED_CREDITS != 0
                    && a.flags & flags::CREDITS_MUST_NOT_EXCEED_DEBITS != 0
                {
                    return Err(Refusal::FlagsAreMutuallyExclusive);
                }
                if let Some((existing, _)) = self.accounts.get(&a.id) {
                    return if existing == a {
                        Ok(Accepted::Exists)
                    } else {
                        Err(Refusal::ExistsWithDifferentFields)
                    };
                }
                self.accounts.insert(a.id, (a.clone(), Balance::default()));
                self.undo.push(Undo::AccountInserted(a.id));
                journal.push(Entry::Account { account: a.clone() });
                Ok(Accepted::Created)
            })
            .collect()
    }

    /// Applies a batch of transfers; linked chains apply all-or-nothing.
    pub fn create_transfers(
        &mut self,
        batch: &[Transfer],
        now: u64,
        journal: &mut Vec<Entry>,
    ) -> Vec<Result<Accepted, Refusal>> {
        let mut results = vec![Ok(Accepted::Created); batch.len()];
        let mut i = 0;
        while i < batch.len() {
            let mut j = i;
            while batch[j].flags & flags::LINKED != 0 && j + 1 < batch.len() {
                j += 1;
            }
            if batch[j].flags & flags::LINKED != 0 {
                // The chain runs off the end of the batch.
                for r in &mut results[i..=j] {
                    *r = Err(Refusal::LinkedEventChainOpen);
                }
                i = j + 1;
                continue;
            }
            let mark = self.mark();
            let journal_mark = journal.len();
            for k in i..=j {
                match self.apply(&batch[k], now, journal) {
                    Ok(a) => results[k] = Ok(a),
                    Err(e) => {
                        self.rollback(mark);
                        journal.truncate(journal_mark);
                        for (n, r) in results[i..=j].iter_mut().enumerate() {
                            *r = Err(if i + n == k {
                                e
                            } else {
                                Refusal::LinkedEventFailed
                            });
                        }
                        break;
                    }
                }
            }
            i = j + 1;
        }
        debug_assert!(
            self.totals_balance(),
            "debits equal credits in every ledger"
        );
        results
    }

    fn set_balance(&mut self, id: u64, b: Balance) {
        let slot = &mut self.accounts.get_mut(&id).expect("known account").1;
        self.undo.push(Undo::Balance(id, *slot));
        *slot = b;
    }

    fn add_totals(
        &mut self,
        ledger: u32,
        f: impl FnOnce(&mut Balance) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        let old = self.totals.get(&ledger).copied().unwrap_or_default();
        let mut new = old;
        f(&mut new)?;
        self.undo.push(Undo::Totals(ledger, old));
        self.totals.insert(ledger, new);
        Ok(())
    }

    fn apply(
        &mut self,
        t: &Transfer,
        now: u64,
        journal: &mut Vec<Entry>,
    ) -> Result<Accepted, Refusal> {
        if t.id == 0 {
            return Err(Refusal::IdMustNotBeZero);
        }
        let kind = t.flags & (flags::PENDING | flags::POST_PENDING | flags::VOID_PENDING);
        if kind.count_ones() > 1 {
            return Err(Refusal::FlagsAreMutuallyExclusive);
        }
        if let Some((existing, _)) = self.transfers.get(&t.id) {
            return if existing == t {
                Ok(Accepted::Exists)
            } else {
                Err(Refusal::ExistsWithDifferentFields)
            };
        }
        let (dr, dr_bal) = self
            .accounts
            .get(&t.debit_account_id)
            .map(|(a, b)| (a.clone(), *b))
            .ok_or(Refusal::DebitAccountNotFound)?;
        let (cr, cr_bal) = self
            .accounts
            .get(&t.credit_account_id)
            .map(|(a, b)| (a.clone(), *b))
            .ok_or(Refusal::CreditAccountNotFound)?;
        if dr.id == cr.id {
            return Err(Refusal::AccountsMustBeDifferent);
        }
        if dr.ledger != t.ledger || cr.ledger != t.ledger {
            return Err(Refusal::LedgerMismatch);
        }
        let (mut d, mut c) = (dr_bal, cr_bal);
        if kind & (flags::POST_PENDING | flags::VOID_PENDING) != 0 {
            let (p, accepted_at) = self
                .transfers
                .get(&t.pending_id)
                .cloned()
                .ok_or(Refusal::PendingNotFound)?;
            match self.pending.get(&t.pending_id) {
                None => return Err(Refusal::PendingNotPending),
                Some(PendingStatus::Posted) => return Err(Refusal::PendingAlreadyPosted),
                Some(PendingStatus::Voided) => return Err(Refusal::PendingAlreadyVoided),
                Some(PendingStatus::Expired) => return Err(Refusal::PendingExpired),
                Some(PendingStatus::Pending) => {}
            }
            if p.timeout_ms > 0
                && now > accepted_at.saturating_add(p.timeout_ms.saturating_mul(1_000_000))
            {
                return Err(Refusal::PendingExpired);
            }
            if p.debit_account_id != t.debit_account_id
                || p.credit_account_id != t.credit_account_id
                || p.ledger != t.ledger
            {
                return Err(Refusal::PendingMismatch);
            }
            let amount = if kind == flags::VOID_PENDING {
                0
            } else if t.amount == 0 {
                p.amount
            } else {
                t.amount
            };
            if amount > p.amount {
                return Err(Refusal::ExceedsPendingAmount);
            }
            d.debits_pending -= p.amount;
            c.credits_pending -= p.amount;
            d.debits_posted = checked(d.debits_posted, amount)?;
            c.credits_posted = checked(c.credits_posted, amount)?;
            self.add_totals(t.ledger, |tot| {
                tot.debits_pending -= p.amount;
                tot.credits_pending -= p.amount;
                tot.debits_posted = checked(tot.debits_posted, amount)?;
                tot.credits_posted = checked(tot.credits_posted, amount)?;
                Ok(())
            })?;
            let status = if kind == flags::VOID_PENDING {
                PendingStatus::Voided
            } else {
                PendingStatus::Posted
            };
            self.undo
                .push(Undo::Pending(t.pending_id, Some(PendingStatus::Pending)));
            self.pending.insert(t.pending_id, status);
        } else {
            if t.amount == 0 {
                return Err(Refusal::AmountMustNotBeZero);
            }
            if kind == flags::PENDING {
                d.debits_pending = checked(d.debits_pending, t.amount)?;
                c.credits_pending = checked(c.credits_pending, t.amount)?;
            } else {
                d.debits_posted = checked(d.debits_posted, t.amount)?;
                c.credits_posted = checked(c.credits_posted, t.amount)?;
            }
            if dr.flags & flags::DEBITS_MUST_NOT_EXCEED_CREDITS != 0
                && checked(d.debits_posted, d.debits_pending)? > d.credits_posted
            {
                return Err(Refusal::ExceedsCredits);
            }
            if cr.flags & flags::CREDITS_MUST_NOT_EXCEED_DEBITS != 0
                && checked(c.credits_posted, c.credits_pending)? > c.debits_posted
            {
                return Err(Refusal::ExceedsDebits);
            }
            let pending = kind == flags::PENDING;
            self.add_totals(t.ledger, |tot| {
                if pending {
                    tot.debits_pending = checked(tot.debits_pending, t.amount)?;
                    tot.credits_pending = checked(tot.credits_pending, t.amount)?;
                } else {
                    tot.debits_posted = checked(tot.debits_posted, t.amount)?;
                    tot.credits_posted = checked(tot.credits_posted, t.amount)?;
                }
                Ok(())
            })?;
            if pending {
                self.undo.push(Undo::Pending(t.id, None));
                self.pending.insert(t.id, PendingStatus::Pending);
            }
        }
        self.set_balance(dr.id, d);
        self.set_balance(cr.id, c);
        let ts = self.tick(now);
        self.transfers.insert(t.id, (t.clone(), ts));
        self.undo.push(Undo::TransferInserted(t.id));
        journal.push(Entry::Transfer {
            transfer: t.clone(),
            timestamp: ts,
        });
        Ok(Accepted::Created)
    }

    /// Expires every pending transfer whose timeout has passed at `now`.
    pub fn expire(&mut self, now: u64, journal: &mut Vec<Entry>) -> usize {
        let mut due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, s)| **s == PendingStatus::Pending)
            .filter_map(|(id, _)| {
                let (t, at) = &self.transfers[id];
                (t.timeout_ms > 0
                    && now > at.saturating_add(t.timeout_ms.saturating_mul(1_000_000)))
                .then_some(*id)
            })
            .collect();
        due.sort_unstable();
        for id in &due {
            let ts = self.tick(now);
            self.release(*id);
            journal.push(Entry::Expire {
                pending_id: *id,
                timestamp: ts,
            });
        }
        due.len()
    }

    fn release(&mut self, id: u64) {
        let t = self.transfers[&id].0.clone();
        let mut d = self.accounts[&t.debit_account_id].1;
        let mut c = self.accounts[&t.credit_account_id].1;
        d.debits_pending -= t.amount;
        c.credits_pending -= t.amount;
        self.set_balance(t.debit_account_id, d);
        self.set_balance(t.credit_account_id, c);
        let _ = self.add_totals(t.ledger, |tot| {
            tot.debits_pending -= t.amount;
            tot.credits_pending -= t.amount;
            Ok(())
        });
        self.undo
            .push(Undo::Pending(id, Some(PendingStatus::Pending)));
        self.pending.insert(id, PendingStatus::Expired);
    }

    /// Applies one journal entry as it was recorded (replay). Refuses any
    /// entry the book would not have accepted, so a doctored journal cannot
    /// replay into a state the rules forbid.
    pub fn replay(&mut self, entry: &Entry) -> Result<(), Refusal> {
        let mut sink = Vec::new();
        match entry {
            Entry::Account { account } => match self
                .create_accounts(std::slice::from_ref(account), &mut sink)
                .remove(0)
            {
                Ok(Accepted::Created) => Ok(()),
                Ok(Accepted::Exists) => Err(Refusal::ExistsWithDifferentFields),
                Err(e) => Err(e),
            },
            Entry::Transfer {
                transfer,
                timestamp,
            } => {
                let before = self.clock;
                match self.apply(transfer, *timestamp, &mut sink)? {
                    Accepted::Created if self.clock == *timestamp && *timestamp > before => Ok(()),
                    // A repeat, or a timestamp the clock could not have given.
                    _ => Err(Refusal::ExistsWithDifferentFields),
                }
            }
            Entry::Expire {
                pending_id,
                timestamp,
            } => {
                let due = self.transfers.get(pending_id).is_some_and(|(t, at)| {
                    t.timeout_ms > 0
                        && *timestamp > at.saturating_add(t.timeout_ms.saturating_mul(1_000_000))
                });
                if self.pending.get(pending_id) != Some(&PendingStatus::Pending) || !due {
                    return Err(Refusal::PendingNotPending);
                }
                self.tick(*timestamp);
                self.release(*pending_id);
                Ok(())
            }
            Entry::Statement { .. } | Entry::Close { .. } => Ok(()),
        }
    }

    fn totals_balance(&self) -> bool {
        self.totals
            .values()
            .all(|t| t.debits_posted == t.credits_posted && t.debits_pending == t.credits_pending)
    }

    /// Checks every invariant from scratch; the error says which broke.
    ///
    /// - in every ledger, total debits equal total credits (posted and pending);
    /// - the per-ledger totals equal the sum of the accounts' balances;
    /// - no flagged account is past its limit.
    pub fn check(&self) -> Result<(), String> {
        let mut sums: HashMap<u32, Balance> = HashMap::new();
        for (a, b) in self.accounts.values() {
            let s = sums.entry(a.ledger).or_default();
            s.debits_pending += b.debits_pending;
            s.debits_posted += b.debits_posted;
            s.credits_pending += b.credits_pending;
            s.credits_posted += b.credits_posted;
            if a.flags & flags::DEBITS_MUST_NOT_EXCEED_CREDITS != 0
                && b.debits_posted + b.debits_pending > b.credits_posted
            {
                return Err(format!(
                    "account {} ({}) has debits past its credits",
                    a.id, a.name
                ));
            }
            if a.flags & flags::CREDITS_MUST_NOT_EXCEED_DEBITS != 0
                && b.credits_posted + b.credits_pending > b.debits_posted
            {
                return Err(format!(
                    "account {} ({}) has credits past its debits",
                    a.id, a.name
                ));
            }
        }
        for (ledger, s) in &sums {
            if s.debits_posted != s.credits_posted || s.debits_pending != s.credits_pending {
                return Err(format!(
                    "ledger {ledger}: debits {s:?} do not equal credits"
                ));
            }
            if self.totals.get(ledger).copied().unwrap_or_default() != *s {
                return Err(format!(
                    "ledger {ledger}: running totals disagree with the accounts"
                ));
            }
        }
        Ok(())
    }
}
