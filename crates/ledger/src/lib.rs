//! The OneCommons ledger.
pub mod merkle;
