//! `commons ledger`: export a real journal, verify it offline, catch tampering.

mod common;

use common::*;
use commons_ledger::{flags, Account, Transfer};

#[test]
fn export_verifies_and_tampering_fails() {
    let s = Sandbox::new("ledger");
    {
        let mut j = s.journal();
        let acct = |id: u64, name: &str, f: u16| Account {
            id,
            ledger: 840,
            code: 1,
            flags: f,
            name: name.into(),
        };
        j.create_accounts(&[
            acct(1, "payments:stripe", 0),
            acct(2, "escrow:alice", flags::DEBITS_MUST_NOT_EXCEED_CREDITS),
            acct(3, "operator:acme", 0),
        ])
        .unwrap();
        let t = |id, from, to, amount| Transfer {
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
        };
        j.create_transfers(&[t(1, 1, 2, 500), t(2, 2, 3, 296)])
            .unwrap();
    }
    let key = s.ok(&["ledger", "key"]).stdout().trim().to_string();
    assert_eq!(key.len(), 64);
    let bal = s
        .ok(&["ledger", "balance", "escrow:alice", "--json"])
        .json();
    assert_eq!(bal[0]["balance"]["credits_posted"], 500);
    assert_eq!(bal[0]["balance"]["debits_posted"], 296);

    let file = s.dir.join("ledger.export");
    s.ok(&["ledger", "export", "-o", file.to_str().unwrap()]);
    let v = s
        .ok(&[
            "ledger",
            "verify",
            file.to_str().unwrap(),
            "--key",
            &key,
            "--json",
        ])
        .json();
    assert_eq!(v["entries"], 5);
    assert_eq!(v["checkpoints"], 1);

    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("\"amount\":296", "\"amount\":290")).unwrap();
    let r = s.run(&["ledger", "verify", file.to_str().unwrap(), "--key", &key]);
    assert_eq!(r.code(), 1, "{}", r.all());
    assert!(r.stderr().contains("does not verify"), "{}", r.stderr());
    assert_eq!(s.run(&["ledger", "balance", "nobody"]).code(), 2);
}
