//! The OneCommons ledger: every movement of money or tokens.
//!
//! - [`book`]: double-entry accounts and transfers (idempotent ids, linked
//!   batches, pending → post/void/expire, never-negative flags), a pure state
//!   machine over journal entries.
//! - [`journal`]: the entries on disk (SQLite, one fsync per batch), their
//!   RFC 6962 Merkle tree ([`merkle`]) and signed checkpoints.
//! - [`export`]: an export anyone can verify offline; [`proof`]: a
//!   statement line's inclusion in a signed checkpoint, checked without it.
//! - [`allocation`]: splitting a subscriber's payment exactly, by the
//!   largest-remainder method, down to upstream projects.

#![forbid(unsafe_code)]

pub mod allocation;
pub mod billing;
pub mod book;
pub mod cents;
pub mod export;
pub mod hex;
pub mod journal;
pub mod merkle;
pub mod payments;
pub mod period;
pub mod proof;
pub mod store;
pub mod tables;

pub use book::{
    flags, Accepted, Account, Balance, Book, Entry, PeriodClosed, Refusal, Statement, Transfer,
};
pub use journal::{Checkpoint, Journal, JournalError};
