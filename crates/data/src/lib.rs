//! DataCommons: user-owned data in the AT Protocol's repository format.
//!
//! - [`syntax`]: the protocol's string formats (DIDs, NSIDs, TIDs, ...).
//! - [`model`]: values, their JSON and DAG-CBOR forms, CIDs.
//! - [`keys`]: P-256 / K-256 signing keys and `did:key`.
//! - [`mst`]: the Merkle search tree of `collection/rkey` -> record CID.
//! - [`car`]: CAR v1 files.
//! - [`repo`]: signed commits over a tree; export, verify, diff.
//! - [`lexicon`]: Lexicon schemas and record validation.
//! - [`seal`]: envelope encryption of the encrypted classes.
//! - [`service`]: the rules: apps, grants, classes, writes, reads, export, erase.
//! - [`feed`]: the change feed's events and cursor rules.
//! - [`fork`]: three-way merges of a fork and its origin, with conflicts.

#![forbid(unsafe_code)]

pub mod car;
pub mod db;
pub mod feed;
pub mod fork;
pub mod keys;
pub mod lexicon;
pub mod model;
pub mod mst;
pub mod repo;
pub mod seal;
pub mod service;
pub mod syntax;
