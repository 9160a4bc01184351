//! Allocation of a subscriber's payment to everyone whose work they used.
//!
//! All arithmetic is in integer minor units, and every split uses the
//! largest-remainder method (ties go to the earlier recipient in the
//! policy's order), so the parts of every split sum exactly to the whole and
//! the shares of one payment sum exactly to the payment.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Basis points: 10,000 is the whole.
pub const WHOLE: u32 = 10_000;

/// Splits `total` in proportion to `weights` by the largest-remainder method.
///
/// Each part gets the floor of its exact share; the units left over go one
/// each to the parts with the largest fractional remainders, ties to the
/// lower index. Returns `None` when every weight is zero.
pub fn largest_remainder(total: u64, weights: &[u64]) -> Option<Vec<u64>> {
    let sum: u128 = weights.iter().map(|&w| w as u128).sum();
    if sum == 0 {
        return None;
    }
    let exact: Vec<(u64, u128)> = weights
        .iter()
        .map(|&w| {
            let n = total as u128 * w as u128;
            ((n / sum) as u64, n % sum)
        })
        .collect();
    let mut parts: Vec<u64> = exact.iter().map(|(q, _)| *q).collect();
    let given: u64 = parts.iter().sum();
    let left = (total - given) as usize;
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Remainders share the denominator `sum`, so numerators compare directly.
    order.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1).then(a.cmp(&b)));
    for &i in order.iter().take(left) {
        parts[i] += 1;
    }
    debug_assert_eq!(parts.iter().sum::<u64>(), total);
    Some(parts)
}

/// The allocation policy; versioned so statements can say which applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub version: u32,
    /// Share of the net payment (after the provider's fee) for the general fund.
    pub general_fund_bps: u32,
    /// Share of a site's part for the providers whose nodes served it.
    pub providers_bps: u32,
    /// Minimum share of the operator's part for the site's developer projects.
    pub projects_min_bps: u32,
    /// Minimum share a project keeps of what it receives.
    pub project_keep_min_bps: u32,
    /// How many levels of projects a payment reaches (site's projects are level 1).
    pub max_depth: u32,
}

impl Default for Policy {
    /// The default policy of product.md.
    fn default() -> Policy {
        Policy {
            version: 1,
            general_fund_bps: 1_000,
            providers_bps: 3_000,
            projects_min_bps: 3_000,
            project_keep_min_bps: 5_000,
            max_depth: 3,
        }
    }
}

/// A developer project as the allocation sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Project {
    /// Upstream projects and their weights.
    pub depends_on: Vec<(String, u64)>,
    /// Share it keeps, if higher than the policy's minimum.
    pub keep_bps: Option<u32>,
    /// Anti-free-rider rule: the best share it agreed with any operator applies to all.
    pub agreements_apply_to_all: bool,
}

/// An operator's agreement to give a project a higher share of its sites' receipts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreement {
    pub operator: String,
    pub project: String,
    pub projects_bps: u32,
}

/// What one subscriber used of one site in the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteUsage {
    pub site: String,
    pub operator: String,
    /// Metered usage (direct and indirect), in any unit common to all sites.
    pub usage: u64,
    /// Providers whose nodes served the site, weighted by resource use.
    pub providers: Vec<(String, u64)>,
    /// The site blueprint's `depends_on_projects`.
    pub projects: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Recipient {
    PaymentFee,
    GeneralFund,
    Provider(String),
    Operator(String),
    Project(String),
}

/// One part of a payment: who receives it and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub recipient: Recipient,
    pub amount: u64,
    /// The site whose use earned it (none for the fee and the fund).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The upstream project that passed it on (none when it came straight
    /// from the site: the fee, the fund, providers, operators, the site's
    /// own projects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    pub policy_version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    #[error("the fee {fee} exceeds the payment {gross}")]
    FeeExceedsPayment { gross: u64, fee: u64 },
    #[error("policy share {0} is more than the whole (10000 basis points)")]
    BadShare(u32),
}

/// Everything an allocation reads besides the payment and the usage.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub policy: Policy,
    pub projects: HashMap<String, Project>,
    pub agreements: Vec<Agreement>,
}

impl Context {
    /// The projects' share of an operator's part for a site.
    fn projects_bps(&self, operator: &str, site_projects: &[(String, u64)]) -> u32 {
        let mut bps = self.policy.projects_min_bps;
        for (p, _) in site_projects {
            let uniform = self
                .projects
                .get(p)
                .is_some_and(|x| x.agreements_apply_to_all);
            for a in self.agreements.iter().filter(|a| &a.project == p) {
                if a.operator == operator || uniform {
                    bps = bps.max(a.projects_bps);
                }
            }
        }
        bps.min(WHOLE)
    }

    fn keep_bps(&self, project: &str) -> u32 {
        let min = self.policy.project_keep_min_bps;
        self.projects
            .get(project)
            .and_then(|p| p.keep_bps)
            .map_or(min, |k| k.max(min))
            .min(WHOLE)
    }
}

fn split2(total: u64, first_bps: u32) -> (u64, u64) {
    let p = largest_remainder(total, &[first_bps as u64, (WHOLE - first_bps) as u64])
        .expect("weights sum to the whole");
    (p[0], p[1])
}

/// Splits one subscriber's payment of `gross` (of which `fee` went to the
/// payment provider) across the sites they used.
pub fn allocate(
    ctx: &Context,
    gross: u64,
    fee: u64,
    usage: &[SiteUsage],
) -> Result<Vec<Share>, AllocationError> {
    let p = &ctx.policy;
    for bps in [
        p.general_fund_bps,
        p.providers_bps,
        p.projects_min_bps,
        p.project_keep_min_bps,
    ] {
        if bps > WHOLE {
            return Err(AllocationError::BadShare(bps));
        }
    }
    if fee > gross {
        return Err(AllocationError::FeeExceedsPayment { gross, fee });
    }
    let version = p.version;
    let mut out = Vec::new();
    let mut give = |recipient: Recipient, amount: u64, site: Option<&str>, via: Option<&str>| {
        if amount > 0 {
            out.push(Share {
                recipient,
                amount,
                site: site.map(str::to_string),
                via: via.map(str::to_string),
                policy_version: version,
            });
        }
    };
    give(Recipient::PaymentFee, fee, None, None);
    let (fund, rest) = split2(gross - fee, p.general_fund_bps);
    give(Recipient::GeneralFund, fund, None, None);
    let weights: Vec<u64> = usage.iter().map(|u| u.usage).collect();
    let Some(site_parts) = largest_remainder(rest, &weights) else {
        // Used nothing: all of it funds the commons.
        give(Recipient::GeneralFund, rest, None, None);
        return Ok(merge(out));
    };
    for (u, part) in usage.iter().zip(site_parts) {
        let site = Some(u.site.as_str());
        let (to_providers, mut to_operator) = split2(part, p.providers_bps);
        let provider_weights: Vec<u64> = u.providers.iter().map(|(_, w)| *w).collect();
        match largest_remainder(to_providers, &provider_weights) {
            Some(parts) => {
                for ((id, _), amount) in u.providers.iter().zip(parts) {
                    give(Recipient::Provider(id.clone()), amount, site, None);
                }
            }
            // No provider recorded (the operator ran it): the operator's.
            None => to_operator += to_providers,
        }
        let project_weights: Vec<u64> = u.projects.iter().map(|(_, w)| *w).collect();
        if project_weights.iter().sum::<u64>() == 0 {
            give(
                Recipient::Operator(u.operator.clone()),
                to_operator,
                site,
                None,
            );
            continue;
        }
        let (to_projects, kept) = split2(to_operator, ctx.projects_bps(&u.operator, &u.projects));
        give(Recipient::Operator(u.operator.clone()), kept, site, None);
        for (project, amount, via) in walk(ctx, to_projects, &u.projects) {
            give(Recipient::Project(project), amount, site, via);
        }
    }
    let out = merge(out);
    debug_assert_eq!(out.iter().map(|s| s.amount).sum::<u64>(), gross);
    Ok(out)
}

/// Joins shares of the same recipient from the same site.
fn merge(shares: Vec<Share>) -> Vec<Share> {
    let mut out: Vec<Share> = Vec::with_capacity(shares.len());
    for s in shares {
        match out
            .iter_mut()
            .find(|o| o.recipient == s.recipient && o.site == s.site)
        {
            Some(o) => o.amount += s.amount,
            None => out.push(s),
        }
    }
    out
}

/// Passes `amount` down the project graph from a site's direct projects.
///
/// Breadth-first, in declared order: each project keeps at least its keep
/// share and forwards the rest to its dependencies not yet reached in this
/// walk (so cycles end and diamonds pay a project once), to at most
/// `max_depth` levels. What cannot be forwarded stays with the project.
/// Returns (project, amount kept, the project it came through).
fn walk<'a>(
    ctx: &'a Context,
    amount: u64,
    direct: &'a [(String, u64)],
) -> Vec<(String, u64, Option<&'a str>)> {
    let weights: Vec<u64> = direct.iter().map(|(_, w)| *w).collect();
    let parts = largest_remainder(amount, &weights).expect("caller checked the weights");
    let mut seen: HashSet<&str> = direct.iter().map(|(p, _)| p.as_str()).collect();
    let mut queue: std::collections::VecDeque<(&str, u64, u32, Option<&str>)> = direct
        .iter()
        .zip(parts)
        .map(|((p, _), a)| (p.as_str(), a, 1, None))
        .collect();
    let mut kept: Vec<(String, u64, Option<&str>)> = Vec::new();
    while let Some((project, received, depth, via)) = queue.pop_front() {
        let depends_on: &[(String, u64)] = ctx.projects.get(project).map_or(&[], |p| &p.depends_on);
        let next: Vec<&(String, u64)> = depends_on
            .iter()
            .filter(|(d, w)| *w > 0 && !seen.contains(d.as_str()))
            .collect();
        if depth >= ctx.policy.max_depth || next.is_empty() || received == 0 {
            kept.push((project.to_string(), received, via));
            continue;
        }
        let (keep, forward) = split2(received, ctx.keep_bps(project));
        kept.push((project.to_string(), keep, via));
        let w: Vec<u64> = next.iter().map(|(_, w)| *w).collect();
        let parts = largest_remainder(forward, &w).expect("positive weights");
        for ((dep, _), part) in next.into_iter().zip(parts) {
            seen.insert(dep.as_str());
            queue.push_back((dep.as_str(), part, depth + 1, Some(project)));
        }
    }
    kept
}
