//! Ledger throughput and allocation speed on the embedded store.
//!
//!     cargo run --release -p commons-ledger --example ledger_bench
//!
//! Transfers go through the real journal: validated, applied, written to
//! SQLite in one transaction per batch with the WAL fsynced at each commit.

use std::collections::HashMap;
use std::time::Instant;

use commons_ledger::allocation::{Context, Project};
use commons_ledger::cents::{account_id, Cents, TOKENS};
use commons_ledger::journal::Journal;
use commons_ledger::period::{close_period, Registry, Site, Usage};
use commons_ledger::store::{PgStore, SqliteStore, Store};
use commons_ledger::{flags, Account, Transfer};

/// Transfers/s through a journal on `store`: 25 batches of 8,190.
fn transfers_per_second(store: Box<dyn Store>) -> (f64, Journal) {
    let mut j = Journal::with_store(store).unwrap();
    let accounts: Vec<Account> = (1..=10_000u64)
        .map(|id| Account {
            id,
            ledger: 840,
            code: 1,
            flags: if id == 1 {
                0
            } else {
                flags::DEBITS_MUST_NOT_EXCEED_CREDITS
            },
            name: format!("a{id}"),
        })
        .collect();
    j.create_accounts(&accounts).unwrap();
    let batch_size = 8_190;
    let batches = 25;
    let mut id = 0u64;
    let start = Instant::now();
    for b in 0..batches {
        let batch: Vec<Transfer> = (0..batch_size)
            .map(|i| {
                id += 1;
                // Fund wallets from account 1, then move money between wallets.
                let (from, to) = if b == 0 {
                    (1, 2 + (i as u64 % 8_190))
                } else {
                    (2 + (id % 8_190), 2 + ((id * 7) % 8_190))
                };
                let to = if to == from {
                    2 + ((to - 1) % 8_190)
                } else {
                    to
                };
                Transfer {
                    id,
                    debit_account_id: from,
                    credit_account_id: to,
                    amount: if b == 0 { 1_000_000 } else { 1 },
                    pending_id: 0,
                    ledger: 840,
                    code: 1,
                    flags: 0,
                    timeout_ms: 0,
                    user_data: 0,
                }
            })
            .collect();
        let r = j.create_transfers(&batch).unwrap();
        assert!(
            r.iter().all(|r| r.is_ok()),
            "{:?}",
            r.iter().find(|r| r.is_err())
        );
    }
    let secs = start.elapsed().as_secs_f64();
    j.book().check().unwrap();
    ((batch_size * batches) as f64 / secs, j)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("commons-ledger-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rate, j) =
        transfers_per_second(Box::new(SqliteStore::open(&dir.join("ledger.db")).unwrap()));
    println!("ledger on SQLite (fsync per batch of 8,190): {rate:.0} transfers/s");
    drop(j);
    let url = std::env::var("COMMONS_BENCH_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("ledger_bench_{}", std::process::id());
    match PgStore::connect(&url, &schema) {
        Ok(store) => {
            let (rate, j) = transfers_per_second(Box::new(store));
            println!(
                "ledger on PostgreSQL (one transaction per batch of 8,190): {rate:.0} transfers/s"
            );
            drop(j);
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .unwrap();
        }
        Err(e) => println!("ledger on PostgreSQL: not measured ({e}); set COMMONS_BENCH_POSTGRES"),
    }

    let reopen = Instant::now();
    let j2 = Journal::open(&dir.join("ledger.db")).unwrap();
    println!(
        "replay of {} journal entries on open: {:.2}s",
        j2.tree().len(),
        reopen.elapsed().as_secs_f64()
    );

    drop(j2);

    // Period close: 100,000 subscribers x 10 sites each, through the journal.
    let mut j = Journal::open(&dir.join("close.db")).unwrap();
    let mut cents = Cents { journal: &mut j };
    cents.bootstrap(1_000_000, 1_000_000).unwrap();
    let subscribers = 100_000u64;
    let names: Vec<String> = (0..subscribers)
        .map(|u| format!("tokens:escrow:u{u}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for chunk in refs.chunks(8_192) {
        cents.ensure_accounts(chunk).unwrap();
    }
    // Fund every escrow with 470 tokens (a 5.00 payment less a 0.30 fee).
    let mint: Vec<Transfer> = (0..subscribers)
        .map(|u| Transfer {
            id: 1_000_000 + u,
            debit_account_id: account_id("tokens:issuance"),
            credit_account_id: account_id(&names[u as usize]),
            amount: 470,
            pending_id: 0,
            ledger: TOKENS,
            code: 3,
            flags: 0,
            timeout_ms: 0,
            user_data: 0,
        })
        .collect();
    for chunk in mint.chunks(8_192) {
        assert!(cents
            .journal
            .create_transfers(chunk)
            .unwrap()
            .iter()
            .all(|r| r.is_ok()));
    }
    let mut projects = HashMap::new();
    for p in 0..50 {
        projects.insert(
            format!("p{p}"),
            Project {
                depends_on: vec![
                    (format!("p{}", (p + 1) % 50), 1),
                    (format!("p{}", (p + 7) % 50), 2),
                ],
                ..Project::default()
            },
        );
    }
    let ctx = Context {
        projects,
        ..Context::default()
    };
    let mut registry = Registry::default();
    for s in 0..200 {
        registry.sites.insert(
            format!("s{s}"),
            Site {
                operator: format!("o{}", s % 40),
                providers: vec![(format!("v{}", s % 5), 3), (format!("v{}", (s + 1) % 5), 1)],
                projects: vec![
                    (format!("p{}", s % 50), 1),
                    (format!("p{}", (s + 3) % 50), 1),
                ],
            },
        );
    }
    let usage: Usage = (0..subscribers)
        .map(|u| {
            (
                format!("u{u}"),
                (0..10u64)
                    .map(|k| (format!("s{}", (u * 13 + k * 17) % 200), 1 + (u + k) % 97))
                    .collect(),
            )
        })
        .collect();
    let start = Instant::now();
    let closed = close_period(&mut cents, &ctx, &registry, "2026-11", &usage).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(closed.tokens_allocated, 470 * subscribers);
    cents.journal.book().check().unwrap();
    println!(
        "period close, {} subscribers x 10 sites: {secs:.2}s ({} shares allocated exactly; statements written with the transfers)",
        closed.subscribers, closed.shares
    );
    // Proving an operator's lines in a checkpoint of the whole journal: the
    // public /api/books/proof, which must not cost O(journal) per line.
    let key = commons_ledger::journal::load_or_create_key(&dir.join("custodian.key")).unwrap();
    let checkpoint = cents.journal.checkpoint(&key).unwrap();
    let start = Instant::now();
    let proofs = commons_ledger::proof::statement_proofs(
        cents.journal,
        "tokens:operator:o7",
        Some("2026-11"),
        &checkpoint,
    )
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(proofs
        .iter()
        .all(|p| p.check(&checkpoint.public_key).is_ok()));
    println!(
        "inclusion proofs of an operator's {} statement lines in a journal of {} entries: {:.2} ms",
        proofs.len(),
        checkpoint.tree_size,
        secs * 1e3
    );
    std::fs::remove_dir_all(dir).unwrap();
}
