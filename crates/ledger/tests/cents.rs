//! CommonCents end to end: bootstrap, payments mint, period close allocates,
//! redemption pays out at the price — all as ledger transfers.

use std::collections::HashMap;

use commons_ledger::allocation::{Context, Project, Recipient, SiteUsage};
use commons_ledger::cents::{recipient_account, Cents, CentsError};
use commons_ledger::journal::Journal;

fn journal(name: &str) -> (Journal, std::path::PathBuf) {
    let d = std::env::temp_dir().join(format!("commons-cents-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    (Journal::open(&d.join("ledger.db")).unwrap(), d)
}

fn worked_example_usage() -> (Context, Vec<SiteUsage>) {
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
    let usage = vec![SiteUsage {
        site: "S".into(),
        operator: "O".into(),
        usage: 1,
        providers: vec![("P".into(), 1)],
        projects: vec![("A".into(), 1)],
    }];
    (ctx, usage)
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
    let (ctx, usage) = worked_example_usage();
    let shares = c
        .close_subscriber(&ctx, "2026-11", "alice", &usage)
        .unwrap();
    assert_eq!(shares.iter().map(|s| s.amount).sum::<u64>(), 470);
    let held = |c: &Cents, r: Recipient| c.tokens(&recipient_account(&r));
    assert_eq!(held(&c, Recipient::Provider("P".into())), 127);
    assert_eq!(held(&c, Recipient::Operator("O".into())), 207);
    assert_eq!(held(&c, Recipient::Project("A".into())), 45);
    assert_eq!(held(&c, Recipient::Project("B".into())), 44);
    assert_eq!(held(&c, Recipient::GeneralFund), 100_000 + 47);
    assert_eq!(c.tokens("tokens:escrow:alice"), 0);
    // Closing twice changes nothing.
    assert!(c
        .close_subscriber(&ctx, "2026-11", "alice", &usage)
        .unwrap()
        .is_empty());
    assert_eq!(held(&c, Recipient::Operator("O".into())), 207);

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
