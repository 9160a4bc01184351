//! CommonCents end to end: bootstrap, payments mint, period close allocates,
//! redemption pays out at the price — all as ledger transfers.

use std::collections::HashMap;

use commons_ledger::allocation::{Context, Project, Recipient};
use commons_ledger::cents::{recipient_account, Cents, CentsError};
use commons_ledger::journal::Journal;
use commons_ledger::period::{close_period, statement, MemberSplit, Registry, Site, Usage};

fn journal(name: &str) -> (Journal, std::path::PathBuf) {
    let d = std::env::temp_dir().join(format!("commons-cents-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    (Journal::open(&d.join("ledger.db")).unwrap(), d)
}

fn worked_example() -> (Context, Registry, Usage) {
    let mut projects = HashMap::new();
    projects.insert(
        "A".to_string(),
        Project {
            depends_on: vec![("B".into(), 1)],
            ..Project::default()
        },
    );
    let ctx = Context {
        projects,
        ..Context::default()
    };
    let mut registry = Registry::default();
    registry.sites.insert(
        "S".into(),
        Site {
            operator: "O".into(),
            providers: vec![("P".into(), 1)],
            projects: vec![("A".into(), 1)],
        },
    );
    let usage = HashMap::from([("alice".to_string(), vec![("S".to_string(), 12)])]);
    (ctx, registry, usage)
}

#[test]
fn mint_allocate_redeem() {
    let (mut j, dir) = journal("flow");
    let mut c = Cents { journal: &mut j };
    // Payments need a price: none before the bootstrap.
    assert!(matches!(
        c.record_payment("pay-0", "alice", 500, 30),
        Err(CentsError::NoPrice)
    ));
    // Bootstrap: 1,000.00 USD buys 100,000 tokens (1 cent each).
    c.bootstrap(100_000, 100_000).unwrap();
    assert_eq!(c.tokens_for(500).unwrap(), 500);

    let m = c.record_payment("pay-1", "alice", 500, 30).unwrap();
    assert_eq!(
        m.tokens, 470,
        "the net after the provider's fee mints tokens"
    );
    assert!(
        c.record_payment("pay-1", "alice", 500, 30).unwrap()
            == commons_ledger::cents::Minted {
                tokens: 470,
                new: false
            }
    );
    assert!(
        c.record_payment("pay-1", "alice", 900, 30).is_err(),
        "same payment id, different amount"
    );
    assert_eq!(c.reserve(), 100_470);
    assert_eq!(c.tokens("tokens:escrow:alice"), 470);

    // Period close reproduces the worked example in tokens.
    let (ctx, registry, usage) = worked_example();
    let closed = close_period(&mut c, &ctx, &registry, "2026-11", &usage).unwrap();
    assert_eq!((closed.subscribers, closed.tokens_allocated), (1, 470));
    let held = |c: &Cents, r: Recipient| c.tokens(&recipient_account(&r));
    assert_eq!(held(&c, Recipient::Provider("P".into())), 127);
    assert_eq!(held(&c, Recipient::Operator("O".into())), 207);
    assert_eq!(held(&c, Recipient::Project("A".into())), 45);
    assert_eq!(held(&c, Recipient::Project("B".into())), 44);
    assert_eq!(held(&c, Recipient::GeneralFund), 100_000 + 47);
    assert_eq!(c.tokens("tokens:escrow:alice"), 0);
    // Closing twice changes nothing.
    let again = close_period(&mut c, &ctx, &registry, "2026-11", &usage).unwrap();
    assert_eq!(again.subscribers, 0);
    // One record of the close, with the policy and where CommonCents stood.
    let closes = c.journal.closes().unwrap();
    assert_eq!(
        closes.len(),
        1,
        "a close that did nothing new records nothing"
    );
    assert_eq!(
        (
            closes[0].period.as_str(),
            closes[0].policy.version,
            closes[0].tokens_allocated,
            closes[0].reserve_cents,
            closes[0].tokens_outstanding
        ),
        ("2026-11", 1, 470, 100_470, 100_470)
    );
    // An export whose close claims another reserve does not verify.
    let key = commons_ledger::journal::load_or_create_key(&dir.join("close.key")).unwrap();
    c.journal.checkpoint(&key).unwrap();
    let text = commons_ledger::export::export(c.journal).unwrap();
    let public = commons_ledger::hex::encode(key.verifying_key().as_bytes());
    commons_ledger::export::verify(&text, &public).unwrap();
    let forged = text.replace(r#""reserve_cents":100470"#, r#""reserve_cents":100471"#);
    assert_ne!(forged, text);
    let err = commons_ledger::export::verify(&forged, &public).unwrap_err();
    assert!(err.contains("the journal gives 100470"), "{err}");
    assert_eq!(held(&c, Recipient::Operator("O".into())), 207);
    // The operator's statement: what, from which site, under which policy.
    let st = statement(
        c.journal,
        &recipient_account(&Recipient::Operator("O".into())),
        None,
    )
    .unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(
        (
            st[0].site.as_str(),
            st[0].amount,
            st[0].subscribers,
            st[0].policy_version
        ),
        ("S", 207, 1, 1)
    );
    // Alice's own record of the same close: the same figures, summing to
    // what she paid in, each upstream project with the one it came through.
    let mine = c.journal.shares("alice", Some("2026-11")).unwrap();
    assert_eq!(mine.iter().map(|s| s.amount).sum::<u64>(), 470);
    let via = |r: &str| {
        mine.iter()
            .find(|s| s.recipient == r)
            .map(|s| (s.amount, s.via.clone()))
    };
    assert_eq!(via("tokens:operator:O"), Some((207, String::new())));
    assert_eq!(via("tokens:project:A"), Some((45, String::new())));
    assert_eq!(via("tokens:project:B"), Some((44, "A".to_string())));

    // The operator's line is proven in a signed checkpoint; a one-byte
    // change to the line, or to its proof, fails.
    let key = commons_ledger::journal::load_or_create_key(&dir.join("custodian.key")).unwrap();
    let cp = c.journal.checkpoint(&key).unwrap();
    let proofs = commons_ledger::proof::statement_proofs(
        c.journal,
        &recipient_account(&Recipient::Operator("O".into())),
        Some("2026-11"),
        &cp,
    )
    .unwrap();
    assert_eq!(proofs.len(), 1);
    let line = proofs[0].check(&cp.public_key).unwrap();
    assert_eq!((line.site.as_str(), line.amount), ("S", 207));
    let mut forged = proofs[0].clone();
    forged.entry = forged.entry.replace("207", "208");
    assert!(forged
        .check(&cp.public_key)
        .unwrap_err()
        .contains("not in the tree"));
    let mut forged = proofs[0].clone();
    let last = forged.path.last_mut().unwrap();
    last.replace_range(0..1, if last.starts_with('0') { "1" } else { "0" });
    assert!(forged.check(&cp.public_key).is_err());
    let mut forged = proofs[0].clone();
    forged.index ^= 1;
    assert!(forged.check(&cp.public_key).is_err());
    let other = commons_ledger::journal::load_or_create_key(&dir.join("other.key")).unwrap();
    assert!(
        proofs[0]
            .check(&commons_ledger::hex::encode(
                other.verifying_key().as_bytes()
            ))
            .unwrap_err()
            .contains("not signed"),
        "a proof checks only against the key the verifier pinned"
    );

    // Redeeming pays cash at the price; a holder cannot redeem more than it holds.
    let op = recipient_account(&Recipient::Operator("O".into()));
    let outstanding = c.outstanding();
    let paid = c.redeem("r-1", &op, 200).unwrap();
    assert_eq!(paid, (200u128 * 100_470 / outstanding as u128) as u64);
    assert_eq!(
        c.redeem("r-1", &op, 200).unwrap(),
        paid,
        "a retried redemption pays once"
    );
    assert!(c.redeem("r-2", &op, 8).is_err(), "only 7 tokens left");
    assert_eq!(c.tokens(&op), 7);
    j.book().check().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn price_is_reserve_over_outstanding() {
    let (mut j, dir) = journal("price");
    let mut c = Cents { journal: &mut j };
    // Seeded at 2 cents per token.
    c.bootstrap(20_000, 10_000).unwrap();
    assert_eq!(c.record_payment("p", "bob", 1_000, 0).unwrap().tokens, 500);
    assert_eq!(c.cents_for(500).unwrap(), 1_000);
    // Redemption at the price leaves the price where it was.
    let escrow = "tokens:escrow:bob";
    c.redeem("x", escrow, 100).unwrap();
    assert_eq!(c.cents_for(500).unwrap(), 1_000);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn organisations_split_and_recipients_auto_redeem() {
    let (mut j, dir) = journal("splits");
    let mut c = Cents { journal: &mut j };
    c.bootstrap(100_000, 100_000).unwrap();
    c.record_payment("p", "alice", 500, 30).unwrap();
    c.record_payment("q", "bob", 500, 30).unwrap();
    let (ctx, mut registry, mut usage) = worked_example();
    usage.insert("bob".into(), vec![("unknown-site".into(), 3)]);
    let op = recipient_account(&Recipient::Operator("O".into()));
    registry.splits.insert(
        op.clone(),
        MemberSplit {
            fixed: vec![("lead".into(), 100)],
            shares: vec![("dev1".into(), 1), ("dev2".into(), 1)],
        },
    );
    let provider = recipient_account(&Recipient::Provider("P".into()));
    registry.auto_redeem.push(provider.clone());
    let closed = close_period(&mut c, &ctx, &registry, "2026-11", &usage).unwrap();
    assert_eq!(closed.subscribers, 2);
    assert_eq!(closed.unknown_sites, ["unknown-site"]);
    // Bob used only a site nobody knows: all of it funds the commons.
    assert_eq!(
        c.tokens(&recipient_account(&Recipient::GeneralFund)),
        100_000 + 47 + 470
    );
    // The operator's 207: 100 fixed to the lead, 107 split 54/53.
    assert_eq!(c.tokens(&format!("{op}:member:lead")), 100);
    assert_eq!(c.tokens(&format!("{op}:member:dev1")), 54);
    assert_eq!(c.tokens(&format!("{op}:member:dev2")), 53);
    assert_eq!(c.tokens(&op), 0);
    // The provider asked for cash: its 127 tokens were redeemed.
    assert_eq!(c.tokens(&provider), 0);
    assert!(closed.paid_out_cents >= 126);
    j.book().check().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn member_split_sums_to_the_whole() {
    use commons_ledger::period::split_members;
    let s = MemberSplit {
        fixed: vec![("a".into(), 70), ("b".into(), 70)],
        shares: vec![],
    };
    assert_eq!(
        split_members(100, &s),
        [("a".to_string(), 70), ("b".to_string(), 30)],
        "fixed first, as far as the money goes"
    );
    let s = MemberSplit {
        fixed: vec![("a".into(), 30)],
        shares: vec![],
    };
    assert_eq!(
        split_members(100, &s),
        [("a".to_string(), 100)],
        "with no weighted members the rest goes to the first"
    );
    let s = MemberSplit {
        fixed: vec![],
        shares: vec![("x".into(), 2), ("y".into(), 1)],
    };
    assert_eq!(
        split_members(10, &s),
        [("x".to_string(), 7), ("y".to_string(), 3)]
    );
}
