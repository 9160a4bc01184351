//! The same journal behaviour on both stores: the embedded SQLite one and
//! PostgreSQL (a real server; `COMMONS_TEST_POSTGRES` names it, default
//! `host=127.0.0.1 user=postgres dbname=test`).

use commons_ledger::book::flags::*;
use commons_ledger::journal::{load_or_create_key, Journal, JournalError};
use commons_ledger::store::{PgStore, Side, SqliteStore, Store};
use commons_ledger::{export, Account, Refusal, Transfer};

fn pg_url() -> String {
    std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

/// A fresh PostgreSQL schema per test run; the server must be there.
fn pg(name: &str) -> impl Fn() -> Box<dyn Store> {
    let schema = format!("ledger_test_{name}_{}", std::process::id());
    let mut c = postgres::Client::connect(&pg_url(), postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is needed for this test ({}): {e}; `bash scripts/test` starts it",
            pg_url()
        )
    });
    c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .unwrap();
    move || Box::new(PgStore::connect(&pg_url(), &schema).unwrap()) as Box<dyn Store>
}

fn sqlite(name: &str) -> impl Fn() -> Box<dyn Store> {
    let dir = std::env::temp_dir().join(format!("commons-stores-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    move || Box::new(SqliteStore::open(&dir.join("ledger.db")).unwrap()) as Box<dyn Store>
}

fn account(id: u64, flags: u16) -> Account {
    Account {
        id,
        ledger: 840,
        code: 1,
        flags,
        name: format!("a{id}"),
    }
}

fn t(id: u64, from: u64, to: u64, amount: u64) -> Transfer {
    Transfer {
        id,
        debit_account_id: from,
        credit_account_id: to,
        amount,
        pending_id: 0,
        ledger: 840,
        code: 1,
        flags: 0,
        timeout_ms: 0,
        user_data: 0,
    }
}

/// The suite both stores pass.
fn suite(open: impl Fn() -> Box<dyn Store>) {
    let mut j = Journal::with_store(open()).unwrap();
    j.create_accounts(&[
        account(1, 0),
        account(2, DEBITS_MUST_NOT_EXCEED_CREDITS),
        account(3, 0),
    ])
    .unwrap();
    let r = j
        .create_transfers(&[t(1, 1, 2, 100), t(2, 2, 3, 40)])
        .unwrap();
    assert!(r.iter().all(|r| r.is_ok()));
    // A batch that dies half-way leaves nothing behind.
    j.fail_next_batch_after(1);
    assert!(matches!(
        j.create_transfers(&[t(3, 1, 2, 5), t(4, 1, 2, 6)]),
        Err(JournalError::Injected)
    ));
    assert!(j.book().transfer(3).is_none());
    // Side records go with their batch.
    let line = |amount| commons_ledger::Statement {
        period: "2026-11".into(),
        recipient: "r".into(),
        site: "s".into(),
        via: String::new(),
        policy_version: 1,
        amount,
        subscribers: 1,
    };
    let side = [
        Side::Statement {
            statement: line(7),
            seq: 0,
        },
        Side::Statement {
            statement: line(5),
            seq: 0,
        },
        // Alice's part is the first line's 7.
        Side::Shares {
            period: "2026-11".into(),
            subscriber: "alice".into(),
            parts: vec![(0, 7)],
        },
        Side::Payout {
            period: "2026-11".into(),
            recipient: "r".into(),
            paid: 4,
        },
    ];
    j.create_transfers_with(&[t(5, 1, 3, 1)], commons_ledger::journal::now_ns(), &side)
        .unwrap();
    let st = j.statement("r", Some("2026-11")).unwrap();
    assert_eq!((st.len(), st[0].amount, st[0].subscribers), (1, 12, 2));
    // Each line is committed as a journal entry after the batch's transfer.
    assert_eq!(j.statement_entries("r", None).unwrap(), vec![6, 7]);
    let entry = String::from_utf8(j.entry(6).unwrap().unwrap()).unwrap();
    assert!(entry.contains(r#""op":"statement""#), "{entry}");
    let alice = j.shares("alice", None).unwrap();
    assert_eq!(
        (alice.len(), alice[0].amount, alice[0].site.as_str()),
        (1, 7, "s")
    );
    assert_eq!(
        j.totals().unwrap(),
        vec![("2026-11".to_string(), "r".to_string(), 12)]
    );
    let key = load_or_create_key(
        &std::env::temp_dir().join(format!("commons-stores-key-{}", std::process::id())),
    )
    .unwrap();
    let cp = j.checkpoint(&key).unwrap();
    let root = j.tree().root();
    drop(j);

    // Reopened from the store: the same balances, root and checkpoints.
    let mut j = Journal::with_store(open()).unwrap();
    assert_eq!(j.tree().root(), root);
    assert_eq!(j.tree().len(), 8);
    assert_eq!(j.book().account(2).unwrap().1.credits_posted, 100);
    assert_eq!(j.book().account(3).unwrap().1.credits_posted, 41);
    assert!(j.book().transfer(3).is_none());
    assert_eq!(j.checkpoints().unwrap(), std::slice::from_ref(&cp));
    let text = export::export(&mut j).unwrap();
    assert_eq!(export::verify(&text, &cp.public_key).unwrap().entries, 8);
    // The lines are proven in the checkpoint; erasing a subscriber leaves
    // the public lines and forgets the private shares.
    let proofs = commons_ledger::proof::statement_proofs(&mut j, "r", None, &cp).unwrap();
    assert_eq!(proofs.len(), 2);
    assert_eq!(proofs[1].check(&cp.public_key).unwrap().amount, 5);
    assert_eq!(j.forget("alice").unwrap(), 1);
    assert!(j.shares("alice", None).unwrap().is_empty());
    assert_eq!(j.statement("r", None).unwrap()[0].amount, 12);
}

#[test]
fn sqlite_store_passes_the_suite() {
    suite(sqlite("suite"));
}

#[test]
fn postgres_store_passes_the_suite() {
    suite(pg("suite"));
}

/// Two writers of one journal (the CLI beside a server, servers sharing
/// PostgreSQL): the one that is behind catches up and judges its change
/// against every balance there is; side records planned on a stale book
/// are refused, not written twice.
fn two_writers(open: impl Fn() -> Box<dyn Store>) {
    let mut a = Journal::with_store(open()).unwrap();
    a.create_accounts(&[
        account(1, 0),
        account(2, DEBITS_MUST_NOT_EXCEED_CREDITS),
        account(3, 0),
    ])
    .unwrap();
    let mut b = Journal::with_store(open()).unwrap();
    assert!(a.create_transfers(&[t(1, 1, 2, 100)]).unwrap()[0].is_ok());
    // b has not seen the 100 account 2 received; writing, it learns of it.
    assert!(b.create_transfers(&[t(2, 2, 3, 60)]).unwrap()[0].is_ok());
    // a has not seen b's 60: after catching up, only 40 are left.
    assert_eq!(
        a.create_transfers(&[t(3, 2, 3, 60)]).unwrap()[0],
        Err(Refusal::ExceedsCredits)
    );
    assert_eq!(b.catch_up().unwrap(), 0, "a's refusal wrote nothing");
    assert_eq!(a.tree().root(), b.tree().root());
    // A batch with side records, when another writer slips in between
    // catching up and storing: refused whole; caught up, planned again, stored.
    let mut interloper = Some(a);
    let slipping_in = Interloper {
        inner: open(),
        before_append: Some(Box::new(move || {
            let mut a = interloper.take().unwrap();
            a.create_transfers(&[t(4, 1, 3, 1)]).unwrap();
        })),
    };
    let mut b = Journal::with_store(Box::new(slipping_in)).unwrap();
    let payout = [Side::Payout {
        period: "2026-11".into(),
        recipient: "r".into(),
        paid: 1,
    }];
    let now = commons_ledger::journal::now_ns();
    assert!(matches!(
        b.create_transfers_with(&[t(5, 1, 3, 1)], now, &payout),
        Err(JournalError::Conflict { .. })
    ));
    assert!(b
        .create_transfers_with(&[t(5, 1, 3, 1)], now, &payout)
        .unwrap()[0]
        .is_ok());
    let mut a = Journal::with_store(open()).unwrap();
    assert_eq!(a.catch_up().unwrap(), 0);
    assert_eq!(a.tree().root(), b.tree().root());
    assert_eq!(a.book().account(3).unwrap().1.credits_posted, 62);
    let reopened = Journal::with_store(open()).unwrap();
    assert_eq!(reopened.tree().root(), a.tree().root());
    reopened.book().check().unwrap();
}

#[test]
fn sqlite_store_has_room_for_two_writers() {
    two_writers(sqlite("two_writers"));
}

#[test]
fn postgres_store_has_room_for_two_writers() {
    two_writers(pg("two_writers"));
}

/// A store that lets another writer append just before it does.
struct Interloper {
    inner: Box<dyn Store>,
    before_append: Option<Box<dyn FnOnce() + Send>>,
}

impl Store for Interloper {
    fn load_from(&mut self, start: u64) -> Result<Vec<Vec<u8>>, JournalError> {
        self.inner.load_from(start)
    }
    fn append(
        &mut self,
        start: u64,
        entries: &[Vec<u8>],
        side: &[Side],
        fail_after: Option<usize>,
    ) -> Result<(), JournalError> {
        if let Some(other) = self.before_append.take() {
            other();
        }
        self.inner.append(start, entries, side, fail_after)
    }
    fn put_checkpoint(&mut self, c: &commons_ledger::Checkpoint) -> Result<(), JournalError> {
        self.inner.put_checkpoint(c)
    }
    fn checkpoints(&mut self) -> Result<Vec<commons_ledger::Checkpoint>, JournalError> {
        self.inner.checkpoints()
    }
    fn statement(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<commons_ledger::store::StatementLine>, JournalError> {
        self.inner.statement(recipient, period)
    }
    fn owed(&mut self, period: &str) -> Result<Vec<(String, u64, u64)>, JournalError> {
        self.inner.owed(period)
    }
    fn statement_entries(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<u64>, JournalError> {
        self.inner.statement_entries(recipient, period)
    }
    fn entry(&mut self, seq: u64) -> Result<Option<Vec<u8>>, JournalError> {
        self.inner.entry(seq)
    }
    fn close_entries(&mut self) -> Result<Vec<u64>, JournalError> {
        self.inner.close_entries()
    }
    fn shares(
        &mut self,
        subscriber: &str,
        period: Option<&str>,
    ) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        self.inner.shares(subscriber, period)
    }
    fn totals(&mut self) -> Result<Vec<(String, String, u64)>, JournalError> {
        self.inner.totals()
    }
    fn forget(&mut self, subscriber: &str) -> Result<u64, JournalError> {
        self.inner.forget(subscriber)
    }
}
