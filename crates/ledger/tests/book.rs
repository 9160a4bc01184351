//! The book's rules, and a seeded simulator that injects crashes mid-batch:
//! the invariants always hold and no partial batch is ever visible.

use commons_ledger::book::flags::*;
use commons_ledger::export;
use commons_ledger::journal::{load_or_create_key, Journal, JournalError};
use commons_ledger::*;

const USD: u32 = 840;

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("commons-ledger-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn account(id: u64, flags: u16) -> Account {
    Account {
        id,
        ledger: USD,
        code: 1,
        flags,
        name: format!("acct-{id}"),
    }
}

fn t(id: u64, from: u64, to: u64, amount: u64) -> Transfer {
    Transfer {
        id,
        debit_account_id: from,
        credit_account_id: to,
        amount,
        pending_id: 0,
        ledger: USD,
        code: 1,
        flags: 0,
        timeout_ms: 0,
        user_data: 0,
    }
}

fn book_with(accounts: &[Account]) -> Book {
    let mut b = Book::new();
    let mut j = Vec::new();
    assert!(b
        .create_accounts(accounts, &mut j)
        .iter()
        .all(|r| r.is_ok()));
    b.commit();
    b
}

fn apply(b: &mut Book, batch: &[Transfer]) -> Vec<Result<Accepted, Refusal>> {
    let mut j = Vec::new();
    let r = b.create_transfers(batch, 1_000, &mut j);
    b.commit();
    r
}

#[test]
fn transfers_move_money_and_retries_are_harmless() {
    // 1: the world (may go negative), 2: a wallet that may not.
    let mut b = book_with(&[
        account(1, 0),
        account(2, DEBITS_MUST_NOT_EXCEED_CREDITS),
        account(3, 0),
    ]);
    assert_eq!(apply(&mut b, &[t(10, 1, 2, 500)]), [Ok(Accepted::Created)]);
    assert_eq!(
        apply(&mut b, &[t(10, 1, 2, 500)]),
        [Ok(Accepted::Exists)],
        "same id, same content"
    );
    assert_eq!(
        apply(&mut b, &[t(10, 1, 2, 501)]),
        [Err(Refusal::ExistsWithDifferentFields)]
    );
    assert_eq!(b.account(2).unwrap().1.credits_posted, 500);
    // The wallet cannot go below zero.
    assert_eq!(
        apply(&mut b, &[t(11, 2, 3, 501)]),
        [Err(Refusal::ExceedsCredits)]
    );
    assert_eq!(apply(&mut b, &[t(12, 2, 3, 500)]), [Ok(Accepted::Created)]);
    assert_eq!(
        apply(&mut b, &[t(13, 2, 2, 1)]),
        [Err(Refusal::AccountsMustBeDifferent)]
    );
    assert_eq!(
        apply(&mut b, &[t(14, 9, 2, 1)]),
        [Err(Refusal::DebitAccountNotFound)]
    );
    assert_eq!(
        apply(&mut b, &[t(0, 1, 2, 1)]),
        [Err(Refusal::IdMustNotBeZero)]
    );
    assert_eq!(
        apply(&mut b, &[t(15, 1, 2, 0)]),
        [Err(Refusal::AmountMustNotBeZero)]
    );
    let mut other = t(16, 1, 2, 1);
    other.ledger = 978;
    assert_eq!(apply(&mut b, &[other]), [Err(Refusal::LedgerMismatch)]);
    b.check().unwrap();
}

#[test]
fn linked_transfers_apply_all_or_nothing() {
    let mut b = book_with(&[
        account(1, 0),
        account(2, DEBITS_MUST_NOT_EXCEED_CREDITS),
        account(3, 0),
    ]);
    let mut a = t(1, 1, 2, 100);
    a.flags = LINKED;
    let bad = t(2, 2, 3, 1_000); // would overdraw 2
    let after = t(3, 1, 3, 5);
    let r = apply(&mut b, &[a.clone(), bad, after]);
    assert_eq!(
        r,
        [
            Err(Refusal::LinkedEventFailed),
            Err(Refusal::ExceedsCredits),
            Ok(Accepted::Created)
        ]
    );
    assert_eq!(
        *b.account(2).unwrap().1,
        Balance::default(),
        "the first leg was rolled back"
    );
    assert!(b.transfer(1).is_none());
    // A chain left open at the end of a batch is refused whole.
    let r = apply(&mut b, &[t(4, 1, 2, 1), a]);
    assert_eq!(r[1], Err(Refusal::LinkedEventChainOpen));
    b.check().unwrap();
}

#[test]
fn pending_transfers_post_void_and_expire() {
    let mut b = book_with(&[
        account(1, 0),
        account(2, DEBITS_MUST_NOT_EXCEED_CREDITS),
        account(3, 0),
    ]);
    apply(&mut b, &[t(1, 1, 2, 100)]);
    let mut hold = t(2, 2, 3, 60);
    hold.flags = PENDING;
    assert_eq!(apply(&mut b, &[hold.clone()]), [Ok(Accepted::Created)]);
    // Reserved money cannot be spent twice.
    assert_eq!(
        apply(&mut b, &[t(3, 2, 3, 50)]),
        [Err(Refusal::ExceedsCredits)]
    );
    let mut post = t(4, 2, 3, 40);
    post.flags = POST_PENDING;
    post.pending_id = 2;
    assert_eq!(apply(&mut b, &[post.clone()]), [Ok(Accepted::Created)]);
    let (_, bal) = b.account(2).unwrap();
    assert_eq!(
        (bal.debits_posted, bal.debits_pending),
        (40, 0),
        "posting 40 of 60 releases the rest"
    );
    post.id = 5;
    assert_eq!(apply(&mut b, &[post]), [Err(Refusal::PendingAlreadyPosted)]);

    let mut hold2 = t(6, 2, 3, 10);
    hold2.flags = PENDING;
    apply(&mut b, &[hold2]);
    let mut void = t(7, 2, 3, 0);
    void.flags = VOID_PENDING;
    void.pending_id = 6;
    assert_eq!(apply(&mut b, &[void]), [Ok(Accepted::Created)]);
    assert_eq!(b.pending_status(6), Some(book::PendingStatus::Voided));

    let mut hold3 = t(8, 2, 3, 10);
    hold3.flags = PENDING;
    hold3.timeout_ms = 1;
    let mut j = Vec::new();
    b.create_transfers(&[hold3], 1_000, &mut j);
    assert_eq!(b.expire(1_000 + 500_000, &mut j), 0, "not yet");
    assert_eq!(b.expire(1_000 + 2_000_000, &mut j), 1);
    assert_eq!(b.pending_status(8), Some(book::PendingStatus::Expired));
    assert_eq!(b.account(2).unwrap().1.debits_pending, 0);
    b.commit();
    b.check().unwrap();
}

/// A tiny deterministic generator (xorshift), so the simulator replays exactly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_batch(rng: &mut Rng, next_id: &mut u64, pendings: &[u64]) -> Vec<Transfer> {
    let n = 1 + rng.below(8) as usize;
    (0..n)
        .map(|_| {
            *next_id += 1;
            let from = 1 + rng.below(6);
            let mut to = 1 + rng.below(6);
            if to == from {
                to = from % 6 + 1;
            }
            let mut x = t(*next_id, from, to, 1 + rng.below(300));
            match rng.below(10) {
                0 => x.flags = LINKED,
                1 => x.flags = PENDING,
                2 if !pendings.is_empty() => {
                    let p = pendings[rng.below(pendings.len() as u64) as usize];
                    x.flags = if rng.below(2) == 0 {
                        POST_PENDING
                    } else {
                        VOID_PENDING
                    };
                    x.pending_id = p;
                    x.amount = 0;
                }
                3 => x.id = 1 + rng.below(*next_id), // a retry, or a clash
                _ => {}
            }
            x
        })
        .collect()
}

#[test]
fn simulator_crashes_never_leave_a_partial_batch() {
    for seed in 1..=12u64 {
        let dir = scratch(&format!("sim-{seed}"));
        let db = dir.join("ledger.db");
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut journal = Journal::open(&db).unwrap();
        // Two wallets that must never go negative, four that may.
        let accounts: Vec<Account> = (1..=6)
            .map(|i| {
                account(
                    i,
                    if i <= 2 {
                        DEBITS_MUST_NOT_EXCEED_CREDITS
                    } else {
                        0
                    },
                )
            })
            .collect();
        journal.create_accounts(&accounts).unwrap();
        // The model applies only what committed.
        let mut model = book_with(&accounts);
        let mut next_id = 0;
        let mut pendings: Vec<u64> = Vec::new();
        let mut now = 1_000_000u64;
        for step in 0..60 {
            now += 1_000;
            let batch = random_batch(&mut rng, &mut next_id, &pendings);
            let crash = rng.below(4) == 0;
            if crash {
                journal.fail_next_batch_after(rng.below(batch.len() as u64) as usize);
            }
            let result = journal.create_transfers_at(&batch, now);
            match result {
                Err(JournalError::Injected) => {
                    // The process "dies": reopen from disk.
                    drop(journal);
                    journal = Journal::open(&db).unwrap();
                }
                Err(e) => panic!("seed {seed} step {step}: {e}"),
                Ok(results) => {
                    let mut sink = Vec::new();
                    let expected = model.create_transfers(&batch, now, &mut sink);
                    model.commit();
                    // If the crash hook fired after the last entry, nothing was written
                    // and the batch fully applied; either way the model must agree.
                    assert_eq!(results, expected, "seed {seed} step {step}");
                    for (t, r) in batch.iter().zip(&results) {
                        if t.flags & PENDING != 0 && r.is_ok() {
                            pendings.push(t.id);
                        }
                    }
                }
            }
            journal
                .book()
                .check()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            for id in 1..=6 {
                assert_eq!(
                    journal.book().account(id).unwrap().1,
                    model.account(id).unwrap().1,
                    "seed {seed} step {step} account {id}"
                );
            }
        }
        // Replaying the journal from disk reproduces every balance and the same root.
        let root = journal.tree().root();
        drop(journal);
        let reopened = Journal::open(&db).unwrap();
        assert_eq!(reopened.tree().root(), root);
        for id in 1..=6 {
            assert_eq!(
                reopened.book().account(id).unwrap().1,
                model.account(id).unwrap().1
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn crash_between_journal_write_and_checkpoint_is_harmless() {
    let dir = scratch("checkpoint");
    let db = dir.join("ledger.db");
    let key = load_or_create_key(&dir.join("custodian.key")).unwrap();
    let mut j = Journal::open(&db).unwrap();
    j.create_accounts(&[account(1, 0), account(2, 0)]).unwrap();
    j.create_transfers(&[t(1, 1, 2, 10)]).unwrap();
    let first = j.checkpoint(&key).unwrap();
    j.create_transfers(&[t(2, 1, 2, 20)]).unwrap();
    drop(j); // dies before signing the second batch
    let mut j = Journal::open(&db).unwrap();
    assert_eq!(j.tree().len(), 4);
    let second = j.checkpoint(&key).unwrap();
    let proof = j
        .tree()
        .consistency_proof(first.tree_size, second.tree_size);
    assert!(merkle::verify_consistency(
        first.tree_size,
        second.tree_size,
        &proof,
        &merkle::from_hex(&first.root).unwrap(),
        &merkle::from_hex(&second.root).unwrap()
    ));
    let pk = &first.public_key;
    let text = export::export(&mut j).unwrap();
    let v = export::verify(&text, pk).unwrap();
    assert_eq!((v.entries, v.checkpoints, v.signed_size), (4, 2, 4));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tampering_with_an_export_is_detected() {
    let dir = scratch("tamper");
    let key = load_or_create_key(&dir.join("custodian.key")).unwrap();
    let mut j = Journal::open(&dir.join("ledger.db")).unwrap();
    j.create_accounts(&[account(1, 0), account(2, 0), account(3, 0)])
        .unwrap();
    j.create_transfers(&[t(1, 1, 2, 1_000), t(2, 2, 3, 250)])
        .unwrap();
    let cp = j.checkpoint(&key).unwrap();
    let text = export::export(&mut j).unwrap();
    assert!(export::verify(&text, &cp.public_key).is_ok());

    // Change an amount: consistent on its own, but not what was signed.
    let edited = text.replace("\"amount\":250", "\"amount\":25");
    let err = export::verify(&edited, &cp.public_key).unwrap_err();
    assert!(err.contains("do not hash to the signed root"), "{err}");
    // Drop an entry.
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(4);
    assert!(export::verify(&lines.join("\n"), &cp.public_key).is_err());
    // Someone else's key.
    let other = load_or_create_key(&dir.join("other.key")).unwrap();
    let other_pk = commons_ledger::hex::encode(other.verifying_key().as_bytes());
    assert!(export::verify(&text, &other_pk)
        .unwrap_err()
        .contains("not signed"));
    // An entry that breaks the rules cannot replay.
    let overdrawn = text.replace(
        "\"flags\":0,\"name\":\"acct-2\"",
        "\"flags\":1,\"name\":\"acct-2\"",
    );
    assert!(export::verify(&overdrawn, &cp.public_key).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_altered_journal_file_refuses_to_open() {
    let dir = scratch("altered");
    let db = dir.join("ledger.db");
    let mut j = Journal::open(&db).unwrap();
    j.create_accounts(&[account(1, 0), account(2, DEBITS_MUST_NOT_EXCEED_CREDITS)])
        .unwrap();
    j.create_transfers(&[t(1, 1, 2, 10)]).unwrap();
    drop(j);
    let conn = rusqlite_open(&db);
    conn.execute("UPDATE journal SET entry = replace(entry, '\"debit_account_id\":1,\"credit_account_id\":2', '\"debit_account_id\":2,\"credit_account_id\":1') WHERE seq = 2", []).unwrap();
    drop(conn);
    match Journal::open(&db) {
        Err(JournalError::Invalid {
            refusal: Refusal::ExceedsCredits,
            ..
        }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an overdrawing journal opened"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn rusqlite_open(p: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(p).unwrap()
}
