//! Allocation follows the policy exactly; every split sums to its whole.

use std::collections::HashMap;

use proptest::prelude::*;

use commons_ledger::allocation::*;

fn site(site: &str, usage: u64, projects: &[(&str, u64)]) -> SiteUsage {
    SiteUsage {
        site: site.into(),
        operator: format!("op-{site}"),
        usage,
        providers: vec![(format!("prov-{site}"), 1)],
        projects: projects.iter().map(|(p, w)| (p.to_string(), *w)).collect(),
    }
}

fn project(deps: &[(&str, u64)]) -> Project {
    Project {
        depends_on: deps.iter().map(|(p, w)| (p.to_string(), *w)).collect(),
        ..Project::default()
    }
}

fn amount(shares: &[Share], r: Recipient) -> u64 {
    shares
        .iter()
        .filter(|s| s.recipient == r)
        .map(|s| s.amount)
        .sum()
}

#[test]
fn the_worked_example_of_the_issue() {
    // One subscriber pays 5.00 USD with a 0.30 fee; used only site S (operator O,
    // provider P); S depends on project A (weight 1); A depends on B.
    let mut ctx = Context::default();
    ctx.projects.insert("A".into(), project(&[("B", 1)]));
    let usage = vec![SiteUsage {
        site: "S".into(),
        operator: "O".into(),
        usage: 1,
        providers: vec![("P".into(), 1)],
        projects: vec![("A".into(), 1)],
    }];
    let shares = allocate(&ctx, 500, 30, &usage).unwrap();
    assert_eq!(amount(&shares, Recipient::PaymentFee), 30);
    assert_eq!(amount(&shares, Recipient::GeneralFund), 47);
    assert_eq!(amount(&shares, Recipient::Provider("P".into())), 127);
    assert_eq!(amount(&shares, Recipient::Operator("O".into())), 207);
    assert_eq!(amount(&shares, Recipient::Project("A".into())), 45);
    assert_eq!(amount(&shares, Recipient::Project("B".into())), 44);
    assert_eq!(shares.iter().map(|s| s.amount).sum::<u64>(), 500);
    assert!(shares.iter().all(|s| s.policy_version == 1));
}

#[test]
fn largest_remainder_ties_go_to_the_earlier() {
    assert_eq!(largest_remainder(89, &[1, 1]), Some(vec![45, 44]));
    assert_eq!(largest_remainder(10, &[1, 1, 1]), Some(vec![4, 3, 3]));
    assert_eq!(largest_remainder(2, &[1, 1, 1]), Some(vec![1, 1, 0]));
    assert_eq!(largest_remainder(100, &[0, 0]), None);
    assert_eq!(largest_remainder(0, &[3, 1]), Some(vec![0, 0]));
    // 1269/2961 split of 423: the larger remainder (.9) wins the unit.
    assert_eq!(largest_remainder(423, &[3000, 7000]), Some(vec![127, 296]));
}

#[test]
fn nothing_used_funds_the_commons() {
    let shares = allocate(&Context::default(), 500, 30, &[]).unwrap();
    assert_eq!(amount(&shares, Recipient::GeneralFund), 470);
    let shares = allocate(&Context::default(), 500, 30, &[site("s", 0, &[])]).unwrap();
    assert_eq!(amount(&shares, Recipient::GeneralFund), 470);
}

#[test]
fn cycles_end_and_diamonds_pay_once() {
    let mut ctx = Context::default();
    // A -> B -> C -> A (cycle); A -> D, B -> D (diamond).
    ctx.projects
        .insert("A".into(), project(&[("B", 1), ("D", 1)]));
    ctx.projects
        .insert("B".into(), project(&[("C", 1), ("D", 1)]));
    ctx.projects.insert("C".into(), project(&[("A", 1)]));
    let shares = allocate(&ctx, 100_000, 0, &[site("s", 1, &[("A", 1)])]).unwrap();
    let total: u64 = shares.iter().map(|s| s.amount).sum();
    assert_eq!(total, 100_000);
    let projects: Vec<&Share> = shares
        .iter()
        .filter(|s| matches!(s.recipient, Recipient::Project(_)))
        .collect();
    let names: Vec<String> = projects
        .iter()
        .map(|s| format!("{:?}", s.recipient))
        .collect();
    // Each project appears once: D via A only, C at level 3 keeps everything (A already paid).
    assert_eq!(projects.len(), 4, "{names:?}");
    let a = amount(&shares, Recipient::Project("A".into()));
    let b = amount(&shares, Recipient::Project("B".into()));
    let c = amount(&shares, Recipient::Project("C".into()));
    let d = amount(&shares, Recipient::Project("D".into()));
    // projects' pool: 100000 -> fund 10000 -> site 90000 -> op 63000 -> projects 18900
    assert_eq!(a + b + c + d, 18_900);
    // A keeps half and forwards 4725 each to B and D (level 2). B forwards
    // half of its 4725 to C only (D was already reached): the tie gives B 2363.
    // D has no dependencies and keeps all; C, at level 3, keeps all.
    assert_eq!((a, b, c, d), (9_450, 2_363, 2_362, 4_725));
}

#[test]
fn depth_is_limited_to_three_levels() {
    let mut ctx = Context::default();
    for (p, d) in [("L1", "L2"), ("L2", "L3"), ("L3", "L4")] {
        ctx.projects.insert(p.into(), project(&[(d, 1)]));
    }
    let shares = allocate(&ctx, 10_000, 0, &[site("s", 1, &[("L1", 1)])]).unwrap();
    assert_eq!(
        amount(&shares, Recipient::Project("L4".into())),
        0,
        "level 4 is never reached"
    );
    assert!(amount(&shares, Recipient::Project("L3".into())) > 0);
    assert_eq!(shares.iter().map(|s| s.amount).sum::<u64>(), 10_000);
}

#[test]
fn agreements_raise_the_projects_share_and_can_apply_to_all() {
    let mut ctx = Context::default();
    ctx.projects.insert("A".into(), Project::default());
    ctx.agreements.push(Agreement {
        operator: "op-x".into(),
        project: "A".into(),
        projects_bps: 5_000,
    });
    let usage = |s: &str| vec![site(s, 1, &[("A", 1)])];
    // 10000 -> fund 1000 -> 9000 -> op 6300
    let x = allocate(&ctx, 10_000, 0, &usage("x")).unwrap();
    assert_eq!(
        amount(&x, Recipient::Project("A".into())),
        3_150,
        "agreed 50% with op-x"
    );
    let y = allocate(&ctx, 10_000, 0, &usage("y")).unwrap();
    assert_eq!(
        amount(&y, Recipient::Project("A".into())),
        1_890,
        "the 30% minimum with op-y"
    );
    ctx.projects.get_mut("A").unwrap().agreements_apply_to_all = true;
    let y = allocate(&ctx, 10_000, 0, &usage("y")).unwrap();
    assert_eq!(
        amount(&y, Recipient::Project("A".into())),
        3_150,
        "anti-free-rider: applies to op-y too"
    );
}

#[test]
fn usage_weights_split_between_sites() {
    let shares = allocate(
        &Context::default(),
        1_000,
        0,
        &[site("a", 3, &[]), site("b", 1, &[])],
    )
    .unwrap();
    // 900 net of fund: a 675, b 225; each 30% provider / 70% operator.
    assert_eq!(amount(&shares, Recipient::Provider("prov-a".into())), 203);
    assert_eq!(amount(&shares, Recipient::Operator("op-a".into())), 472);
    assert_eq!(amount(&shares, Recipient::Provider("prov-b".into())), 68);
    assert_eq!(amount(&shares, Recipient::Operator("op-b".into())), 157);
}

#[test]
fn bad_input_is_refused() {
    assert!(matches!(
        allocate(&Context::default(), 10, 11, &[]),
        Err(AllocationError::FeeExceedsPayment { .. })
    ));
}

proptest! {
    #[test]
    fn splits_always_sum_to_the_whole(total in 0u64..u64::MAX / 4, weights in prop::collection::vec(0u64..1_000_000, 1..12)) {
        if let Some(parts) = largest_remainder(total, &weights) {
            prop_assert_eq!(parts.iter().sum::<u64>(), total);
            let sum: u128 = weights.iter().map(|&w| w as u128).sum();
            for (p, w) in parts.iter().zip(&weights) {
                let exact = total as u128 * *w as u128;
                // Each part is its exact share rounded down or up, never further.
                prop_assert!((*p as u128) * sum <= exact + sum && exact <= (*p as u128) * sum + sum);
            }
        } else {
            prop_assert!(weights.iter().all(|&w| w == 0));
        }
    }

    #[test]
    fn payments_are_allocated_exactly(
        gross in 0u64..10_000_000,
        fee_pct in 0u64..20,
        sites in prop::collection::vec((0u64..1000, 0usize..4), 0..6),
        edges in prop::collection::vec((0usize..6, 0usize..6, 1u64..4), 0..12),
    ) {
        let names = ["p0", "p1", "p2", "p3", "p4", "p5"];
        let mut projects: HashMap<String, Project> = HashMap::new();
        for (from, to, w) in edges {
            projects.entry(names[from].into()).or_default().depends_on.push((names[to].into(), w));
        }
        let ctx = Context { projects, ..Context::default() };
        let usage: Vec<SiteUsage> = sites
            .iter()
            .enumerate()
            .map(|(i, (u, p))| site(&format!("s{i}"), *u, &[(names[*p], 1)]))
            .collect();
        let fee = gross * fee_pct / 100;
        let shares = allocate(&ctx, gross, fee, &usage).unwrap();
        prop_assert_eq!(shares.iter().map(|s| s.amount).sum::<u64>(), gross);
    }
}
