//! Ledger throughput and allocation speed on the embedded store.
//!
//!     cargo run --release -p commons-ledger --example ledger_bench
//!
//! Transfers go through the real journal: validated, applied, written to
//! SQLite in one transaction per batch with the WAL fsynced at each commit.

use std::collections::HashMap;
use std::time::Instant;

use commons_ledger::allocation::{allocate, Context, Project, SiteUsage};
use commons_ledger::journal::Journal;
use commons_ledger::{flags, Account, Transfer};

fn main() {
    let dir = std::env::temp_dir().join(format!("commons-ledger-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut j = Journal::open(&dir.join("ledger.db")).unwrap();
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
    let n = (batch_size * batches) as f64;
    j.book().check().unwrap();
    println!(
        "ledger (SQLite, fsync per batch of {batch_size}): {:.0} transfers/s ({n} in {secs:.2}s)",
        n / secs
    );

    let reopen = Instant::now();
    let j2 = Journal::open(&dir.join("ledger.db")).unwrap();
    println!(
        "replay of {} journal entries on open: {:.2}s",
        j2.tree().len(),
        reopen.elapsed().as_secs_f64()
    );

    // Period close arithmetic: 100,000 subscribers x 10 sites.
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
    let sites: Vec<SiteUsage> = (0..200)
        .map(|s| SiteUsage {
            site: format!("s{s}"),
            operator: format!("o{}", s % 40),
            usage: 0,
            providers: vec![(format!("v{}", s % 5), 3), (format!("v{}", (s + 1) % 5), 1)],
            projects: vec![
                (format!("p{}", s % 50), 1),
                (format!("p{}", (s + 3) % 50), 1),
            ],
        })
        .collect();
    let start = Instant::now();
    let mut total = 0u64;
    let mut shares = 0usize;
    for sub in 0..100_000u64 {
        let usage: Vec<SiteUsage> = (0..10u64)
            .map(|k| {
                let mut u = sites[((sub * 13 + k * 17) % 200) as usize].clone();
                u.usage = 1 + (sub + k) % 97;
                u
            })
            .collect();
        let s = allocate(&ctx, 500, 30, &usage).unwrap();
        total += s.iter().map(|x| x.amount).sum::<u64>();
        shares += s.len();
    }
    assert_eq!(total, 500 * 100_000);
    println!(
        "allocation for 100,000 subscribers x 10 sites: {:.2}s ({shares} shares, every payment allocated exactly)",
        start.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(dir).unwrap();
}
