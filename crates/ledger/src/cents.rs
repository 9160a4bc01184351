//! CommonCents: payments mint tokens, period close allocates them, recipients
//! redeem them for cash from the custodian's reserve. All of it is ledger
//! transfers, so the journal shows every step and its invariants cover it.
//!
//! Two ledgers: [`CASH`] (US cents) and [`TOKENS`] (CommonCents, in minor
//! units). The token price is the cash reserve divided by the tokens
//! outstanding, so a token is a share of the revenue held. Conversions round
//! down; the rounding stays in the reserve, to every holder's benefit.
//!
//! Transfer ids are derived from what they record (payment id, period,
//! subscriber, recipient), so repeating an operation — a webhook delivered
//! twice, a period closed twice — changes nothing.

use sha2::{Digest, Sha256};

use crate::allocation::{AllocationError, Recipient};
use crate::book::{flags, Accepted, Account, Refusal, Transfer};
use crate::journal::{Journal, JournalError};

/// US dollars, in cents.
pub const CASH: u32 = 840;
/// CommonCents, in minor units.
pub const TOKENS: u32 = 1;

/// Transfer codes: why money moved.
pub mod code {
    pub const PAYMENT: u16 = 1;
    pub const PAYMENT_FEE: u16 = 2;
    pub const MINT: u16 = 3;
    pub const ALLOCATION: u16 = 4;
    pub const BURN: u16 = 5;
    pub const PAYOUT: u16 = 6;
    pub const BOOTSTRAP: u16 = 7;
    pub const REFUND: u16 = 8;
}

#[derive(Debug, thiserror::Error)]
pub enum CentsError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Allocation(#[from] AllocationError),
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error("account name {0:?} collides with another account; rename it")]
    Collision(String),
    #[error("no tokens are outstanding yet: bootstrap the reserve first (`initial price`)")]
    NoPrice,
    #[error("{0}")]
    Invalid(String),
}

/// A stable account id for a name: the first 8 bytes of its SHA-256.
pub fn account_id(name: &str) -> u64 {
    let d = Sha256::digest(name.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes")).max(1)
}

/// A stable transfer id for what a transfer records.
pub fn transfer_id(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes")).max(1)
}

/// The token account of a recipient.
pub fn recipient_account(r: &Recipient) -> String {
    match r {
        Recipient::PaymentFee => "tokens:fees".into(),
        Recipient::GeneralFund => "tokens:general-fund".into(),
        Recipient::Provider(p) => format!("tokens:provider:{p}"),
        Recipient::Operator(o) => format!("tokens:operator:{o}"),
        Recipient::Project(p) => format!("tokens:project:{p}"),
    }
}

const WORLD: &str = "cash:world";
const RESERVE: &str = "cash:reserve";
const FEES: &str = "cash:payment-fees";
const PAYOUTS: &str = "cash:payouts";
const ISSUANCE: &str = "tokens:issuance";

/// Cash in the reserve (cents) and CommonCents in circulation, as `book` has them.
pub fn reserve_and_outstanding(book: &crate::book::Book) -> (u64, u64) {
    let net = |name: &str| {
        book.account(account_id(name))
            .map_or(0, |(_, b)| b.net_credit())
    };
    (net(RESERVE).max(0) as u64, (-net(ISSUANCE)).max(0) as u64)
}

/// CommonCents over a journal.
pub struct Cents<'a> {
    pub journal: &'a mut Journal,
}

/// What a payment did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Minted {
    pub tokens: u64,
    /// False when the payment had been recorded before (nothing changed).
    pub new: bool,
}

fn ok(results: Vec<Result<Accepted, Refusal>>) -> Result<bool, CentsError> {
    let mut new = false;
    for r in results {
        match r {
            Ok(Accepted::Created) => new = true,
            Ok(Accepted::Exists) => {}
            Err(e) => return Err(CentsError::Refused(e)),
        }
    }
    Ok(new)
}

pub(crate) fn linked(mut batch: Vec<Transfer>) -> Vec<Transfer> {
    let n = batch.len();
    for t in batch.iter_mut().take(n.saturating_sub(1)) {
        t.flags |= flags::LINKED;
    }
    batch
}

fn transfer(id: u64, from: &str, to: &str, amount: u64, ledger: u32, code: u16) -> Transfer {
    Transfer {
        id,
        debit_account_id: account_id(from),
        credit_account_id: account_id(to),
        amount,
        pending_id: 0,
        ledger,
        code,
        flags: 0,
        timeout_ms: 0,
        user_data: 0,
    }
}

impl Cents<'_> {
    /// Makes sure the named accounts exist.
    pub fn ensure_accounts(&mut self, names: &[&str]) -> Result<(), CentsError> {
        let mut missing = Vec::new();
        for name in names {
            let id = account_id(name);
            match self.journal.book().account(id) {
                Some((a, _)) if a.name == *name => {}
                Some(_) => return Err(CentsError::Collision(name.to_string())),
                None => {
                    let (ledger, f) = if name.starts_with("cash:") {
                        // The outside world and fees may go any way; the reserve never below zero.
                        (
                            CASH,
                            if *name == RESERVE {
                                flags::DEBITS_MUST_NOT_EXCEED_CREDITS
                            } else {
                                0
                            },
                        )
                    } else if *name == ISSUANCE {
                        (TOKENS, 0)
                    } else {
                        // Holders of tokens can never spend more than they hold.
                        (TOKENS, flags::DEBITS_MUST_NOT_EXCEED_CREDITS)
                    };
                    missing.push(Account {
                        id,
                        ledger,
                        code: 0,
                        flags: f,
                        name: name.to_string(),
                    });
                }
            }
        }
        if !missing.is_empty() {
            ok(self.journal.create_accounts(&missing)?)?;
        }
        Ok(())
    }

    fn net_credit(&self, name: &str) -> u64 {
        self.journal
            .book()
            .account(account_id(name))
            .map(|(_, b)| b.net_credit().max(0) as u64)
            .unwrap_or(0)
    }

    /// Cash held in the reserve, in cents.
    pub fn reserve(&self) -> u64 {
        reserve_and_outstanding(self.journal.book()).0
    }

    /// Tokens in circulation.
    pub fn outstanding(&self) -> u64 {
        reserve_and_outstanding(self.journal.book()).1
    }

    /// Tokens held by an account (escrow or recipient).
    pub fn tokens(&self, account: &str) -> u64 {
        self.net_credit(account)
    }

    /// Seeds the reserve at an initial price of `cents_per_token` ×
    /// `token_minor_units`: `cash` cents buy the first tokens, held by the
    /// general fund. Refused once tokens exist.
    pub fn bootstrap(&mut self, cash: u64, tokens: u64) -> Result<(), CentsError> {
        if cash == 0 || tokens == 0 {
            return Err(CentsError::Invalid(
                "bootstrap needs some cash and some tokens".into(),
            ));
        }
        if self.outstanding() > 0 {
            return Err(CentsError::Invalid(
                "the reserve is already bootstrapped".into(),
            ));
        }
        let fund = recipient_account(&Recipient::GeneralFund);
        self.ensure_accounts(&[WORLD, RESERVE, ISSUANCE, &fund])?;
        let batch = linked(vec![
            transfer(
                transfer_id(&["bootstrap", "cash"]),
                WORLD,
                RESERVE,
                cash,
                CASH,
                code::BOOTSTRAP,
            ),
            transfer(
                transfer_id(&["bootstrap", "tokens"]),
                ISSUANCE,
                &fund,
                tokens,
                TOKENS,
                code::BOOTSTRAP,
            ),
        ]);
        ok(self.journal.create_transfers(&batch)?)?;
        Ok(())
    }

    /// Tokens that `cents` buy at the current price (rounded down).
    pub fn tokens_for(&self, cents: u64) -> Result<u64, CentsError> {
        let (reserve, outstanding) = (self.reserve(), self.outstanding());
        if outstanding == 0 || reserve == 0 {
            return Err(CentsError::NoPrice);
        }
        Ok((cents as u128 * outstanding as u128 / reserve as u128) as u64)
    }

    /// Cents that `tokens` redeem for at the current price (rounded down).
    pub fn cents_for(&self, tokens: u64) -> Result<u64, CentsError> {
        let (reserve, outstanding) = (self.reserve(), self.outstanding());
        if outstanding == 0 {
            return Err(CentsError::NoPrice);
        }
        Ok((tokens as u128 * reserve as u128 / outstanding as u128) as u64)
    }

    /// Records a subscriber's payment: the cash goes to the reserve, the
    /// provider's fee leaves it, and the net mints tokens into the
    /// subscriber's escrow at the current price. Idempotent by `payment_id`.
    pub fn record_payment(
        &mut self,
        payment_id: &str,
        subscriber: &str,
        gross: u64,
        fee: u64,
    ) -> Result<Minted, CentsError> {
        if fee > gross {
            return Err(CentsError::Invalid(format!(
                "fee {fee} exceeds payment {gross}"
            )));
        }
        let escrow = format!("tokens:escrow:{subscriber}");
        self.ensure_accounts(&[WORLD, RESERVE, FEES, ISSUANCE, &escrow])?;
        let pay_id = transfer_id(&["payment", payment_id]);
        if let Some(t) = self
            .journal
            .book()
            .transfer(transfer_id(&["mint", payment_id]))
        {
            // Seen before: the same payment again is harmless, a different one is not.
            if self.journal.book().transfer(pay_id).map(|p| p.amount) != Some(gross)
                || t.credit_account_id != account_id(&escrow)
            {
                return Err(CentsError::Refused(Refusal::ExistsWithDifferentFields));
            }
            return Ok(Minted {
                tokens: t.amount,
                new: false,
            });
        }
        let net = gross - fee;
        // Price before this payment: the new cash must not buy at its own expense.
        let tokens = self.tokens_for(net)?;
        let mut batch = vec![transfer(pay_id, WORLD, RESERVE, gross, CASH, code::PAYMENT)];
        if fee > 0 {
            batch.push(transfer(
                transfer_id(&["fee", payment_id]),
                RESERVE,
                FEES,
                fee,
                CASH,
                code::PAYMENT_FEE,
            ));
        }
        if tokens > 0 {
            batch.push(transfer(
                transfer_id(&["mint", payment_id]),
                ISSUANCE,
                &escrow,
                tokens,
                TOKENS,
                code::MINT,
            ));
        }
        let new = ok(self.journal.create_transfers(&linked(batch))?)?;
        Ok(Minted { tokens, new })
    }

    /// Burns `tokens` held by `account` and pays their cash value out of the reserve.
    pub fn redeem(
        &mut self,
        redemption_id: &str,
        account: &str,
        tokens: u64,
    ) -> Result<u64, CentsError> {
        let burn_id = transfer_id(&["burn", redemption_id]);
        if let Some(t) = self.journal.book().transfer(burn_id) {
            let paid = self
                .journal
                .book()
                .transfer(transfer_id(&["payout", redemption_id]))
                .map_or(0, |p| p.amount);
            if t.amount != tokens || t.debit_account_id != account_id(account) {
                return Err(CentsError::Refused(Refusal::ExistsWithDifferentFields));
            }
            return Ok(paid);
        }
        let cents = self.cents_for(tokens)?;
        self.ensure_accounts(&[PAYOUTS])?;
        let mut batch = vec![transfer(
            burn_id,
            account,
            ISSUANCE,
            tokens,
            TOKENS,
            code::BURN,
        )];
        if cents > 0 {
            batch.push(transfer(
                transfer_id(&["payout", redemption_id]),
                RESERVE,
                PAYOUTS,
                cents,
                CASH,
                code::PAYOUT,
            ));
        }
        ok(self.journal.create_transfers(&linked(batch))?)?;
        Ok(cents)
    }

    /// Returns `cents` of a payment to the subscriber: burns the tokens it
    /// bought from their escrow and pays the cash back out of the reserve.
    /// Refused if those tokens were already allocated at a period close.
    pub fn refund(
        &mut self,
        refund_id: &str,
        subscriber: &str,
        cents: u64,
    ) -> Result<u64, CentsError> {
        let escrow = format!("tokens:escrow:{subscriber}");
        let burn_id = transfer_id(&["refund-burn", refund_id]);
        if let Some(t) = self.journal.book().transfer(burn_id) {
            return Ok(t.amount);
        }
        let tokens = self.tokens_for(cents)?;
        self.ensure_accounts(&[WORLD, RESERVE, ISSUANCE, &escrow])?;
        let batch = linked(vec![
            transfer(
                burn_id,
                &escrow,
                ISSUANCE,
                tokens.max(1),
                TOKENS,
                code::REFUND,
            ),
            transfer(
                transfer_id(&["refund-cash", refund_id]),
                RESERVE,
                WORLD,
                cents,
                CASH,
                code::REFUND,
            ),
        ]);
        match self.journal.create_transfers(&batch)?.into_iter().find_map(Result::err) {
            None => Ok(tokens),
            Some(Refusal::ExceedsCredits) | Some(Refusal::LinkedEventFailed) => Err(CentsError::Invalid(format!(
                "the tokens {subscriber} bought were already allocated; refund {cents} from the general fund by hand"
            ))),
            Some(e) => Err(CentsError::Refused(e)),
        }
    }
}
