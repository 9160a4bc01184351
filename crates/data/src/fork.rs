//! Three-way merges of repositories: what a fork changed since it was
//! made, what its origin changed, and the keys both changed (conflicts).
//!
//! A pure function of three maps `path -> record CID` — the fork point
//! (base), one side and the other — so syncing a fork from its origin and
//! merging it back are the same computation with the sides swapped.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::model::Cid;

/// Which side's version a conflict keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The repository being merged into keeps its version.
    Ours,
    /// The incoming version wins.
    Theirs,
}

/// A key both sides changed since the fork point, differently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub path: String,
    /// At the fork point (`None`: absent).
    pub base: Option<String>,
    /// In the repository being merged into.
    pub ours: Option<String>,
    /// In the incoming repository.
    pub theirs: Option<String>,
}

/// What merging `theirs` into `ours` does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergePlan {
    /// Keys to set (`Some`) or delete (`None`) in `ours`.
    pub apply: Vec<(String, Option<Cid>)>,
    /// Keys both sides changed; each needs a resolution.
    pub conflicts: Vec<Conflict>,
}

/// Plans merging `theirs` into `ours`, both descended from `base`.
/// `resolved` settles conflicts: `Theirs` applies the incoming version,
/// `Ours` keeps ours; an unresolved conflict stays in the plan's list.
pub fn plan(
    base: &BTreeMap<String, Cid>,
    ours: &BTreeMap<String, Cid>,
    theirs: &BTreeMap<String, Cid>,
    resolved: &BTreeMap<String, Side>,
) -> MergePlan {
    let paths: BTreeSet<&String> = base
        .keys()
        .chain(ours.keys())
        .chain(theirs.keys())
        .collect();
    let mut out = MergePlan::default();
    for path in paths {
        let (b, o, t) = (base.get(path), ours.get(path), theirs.get(path));
        let they_changed = t != b;
        let we_changed = o != b;
        if !they_changed || o == t {
            continue;
        }
        if !we_changed {
            out.apply.push((path.clone(), t.copied()));
            continue;
        }
        match resolved.get(path) {
            Some(Side::Theirs) => out.apply.push((path.clone(), t.copied())),
            Some(Side::Ours) => {}
            None => out.conflicts.push(Conflict {
                path: path.clone(),
                base: b.map(Cid::to_string),
                ours: o.map(Cid::to_string),
                theirs: t.map(Cid::to_string),
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(s: &str) -> Cid {
        crate::model::cid_of(crate::model::DAG_CBOR, s.as_bytes())
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, Cid> {
        pairs.iter().map(|(k, v)| (k.to_string(), cid(v))).collect()
    }

    #[test]
    fn changes_on_one_side_apply_and_changes_on_both_conflict() {
        let base = map(&[("a/1", "x"), ("a/2", "y"), ("a/3", "z"), ("a/4", "w")]);
        // Ours: edited a/2, deleted a/4. Theirs: edited a/1 and a/2
        // differently, deleted a/3, added a/5, and deleted a/4 too.
        let ours = map(&[("a/1", "x"), ("a/2", "ours"), ("a/3", "z")]);
        let theirs = map(&[("a/1", "x2"), ("a/2", "theirs"), ("a/5", "new")]);
        let p = plan(&base, &ours, &theirs, &BTreeMap::new());
        assert_eq!(
            p.apply,
            vec![
                ("a/1".to_string(), Some(cid("x2"))),
                ("a/3".to_string(), None),
                ("a/5".to_string(), Some(cid("new"))),
            ]
        );
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].path, "a/2");
        assert_eq!(p.conflicts[0].ours, Some(cid("ours").to_string()));
        // Resolved for theirs, the conflict becomes an apply; for ours, nothing.
        let theirs_wins = plan(
            &base,
            &ours,
            &theirs,
            &BTreeMap::from([("a/2".to_string(), Side::Theirs)]),
        );
        assert!(theirs_wins.conflicts.is_empty());
        assert!(theirs_wins
            .apply
            .contains(&("a/2".to_string(), Some(cid("theirs")))));
        let ours_wins = plan(
            &base,
            &ours,
            &theirs,
            &BTreeMap::from([("a/2".to_string(), Side::Ours)]),
        );
        assert!(ours_wins.conflicts.is_empty());
        assert_eq!(ours_wins.apply.len(), 3);
    }
}
