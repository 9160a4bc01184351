//! Repositories: commit, export, verify, import, diff — and bad files.

use commons_data::keys::{Algorithm, Keypair};
use commons_data::model::{self, Ipld};
use commons_data::repo::{self, Repo, RepoError, Write};
use commons_data::syntax::TidClock;

fn record(text: &str) -> Vec<u8> {
    model::encode(
        &model::from_json(&serde_json::json!({"$type": "app.commons.note", "text": text})).unwrap(),
    )
}

fn sample(key: &Keypair, clock: &TidClock, n: usize) -> Repo {
    let did = key.public().did_key();
    let mut repo = Repo::new(&did);
    let writes: Vec<Write> = (0..n)
        .map(|i| Write::Create {
            path: format!(
                "app.commons.note/{}",
                commons_data::syntax::encode_tid(1_700_000_000_000_000 + i as u64, 0)
            ),
            record: record(&format!("note {i}")),
        })
        .collect();
    repo.commit(&writes, key, clock.next()).unwrap();
    repo
}

#[tokio::test]
async fn export_verify_import_gives_the_same_root() {
    for algorithm in [Algorithm::P256, Algorithm::K256] {
        let key = Keypair::generate(algorithm);
        let clock = TidClock::new(0);
        let repo = sample(&key, &clock, 500);
        let car = repo.export_car().unwrap();
        let verified = repo::verify(&car, None).await.unwrap();
        assert!(
            verified.signature_checked,
            "a did:key repository checks itself"
        );
        assert_eq!(verified.records, 500);
        let imported = Repo::import_car(&car, Some(&key.public())).await.unwrap();
        assert_eq!(imported.tree().root, repo.tree().root);
        assert_eq!(imported.head().unwrap().0, repo.head().unwrap().0);
        assert_eq!(
            imported.export_car().unwrap(),
            car,
            "export is deterministic"
        );
        // Someone else's key does not verify it.
        let other = Keypair::generate(algorithm).public();
        assert!(matches!(
            repo::verify(&car, Some(&other)).await,
            Err(RepoError::Signature(_))
        ));
    }
}

#[tokio::test]
async fn commits_report_ops_and_diffs_name_them() {
    let key = Keypair::generate(Algorithm::K256);
    let clock = TidClock::new(0);
    let mut repo = sample(&key, &clock, 50);
    let before = repo.export_car().unwrap();
    let paths: Vec<String> = repo
        .entries()
        .unwrap()
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let committed = repo
        .commit(
            &[
                Write::Update {
                    path: paths[0].clone(),
                    record: record("changed"),
                },
                Write::Delete {
                    path: paths[1].clone(),
                },
                Write::Create {
                    path: "app.commons.note/new".into(),
                    record: record("new"),
                },
            ],
            &key,
            clock.next(),
        )
        .unwrap();
    let actions: Vec<&str> = committed.ops.iter().map(|o| o.action).collect();
    assert_eq!(actions, ["update", "delete", "create"]);
    assert!(committed.ops[1].prev.is_some() && committed.ops[1].cid.is_none());
    let after = repo.export_car().unwrap();
    let diff = repo::diff_cars(&before, &after).await.unwrap();
    let changed: Vec<&str> = diff.record_ops.iter().map(|(p, _, _)| p.as_str()).collect();
    let mut expected = vec![paths[0].as_str(), paths[1].as_str(), "app.commons.note/new"];
    expected.sort();
    assert_eq!(changed, expected);
    assert!(!diff.created_nodes.is_empty() && !diff.deleted_nodes.is_empty());
    // Refused writes change nothing.
    let head = repo.head().unwrap().0;
    let err = repo
        .commit(
            &[
                Write::Create {
                    path: "app.commons.note/another".into(),
                    record: record("x"),
                },
                Write::Create {
                    path: "app.commons.note/new".into(),
                    record: record("dup"),
                },
            ],
            &key,
            clock.next(),
        )
        .unwrap_err();
    assert_eq!(err, RepoError::Exists("app.commons.note/new".into()));
    assert_eq!(repo.head().unwrap().0, head);
    assert!(repo.get("app.commons.note/another").unwrap().is_none());
    // Listing pages through one collection in key order.
    let page = repo.list("app.commons.note", None, 10).unwrap();
    assert_eq!(page.len(), 10);
    let rkey = page[9].0.split_once('/').unwrap().1;
    let next = repo.list("app.commons.note", Some(rkey), 100).unwrap();
    assert_eq!(page.len() + next.len(), 50);
    assert!(next[0].0 > page[9].0);
}

#[tokio::test]
async fn bad_files_get_clear_errors() {
    let key = Keypair::generate(Algorithm::P256);
    let repo = sample(&key, &TidClock::new(0), 20);
    let car = repo.export_car().unwrap();
    // Not a CAR at all.
    let err = repo::verify(b"hello world", None).await.unwrap_err();
    assert!(err.to_string().contains("not a CAR v1 file"), "{err}");
    // Truncated.
    let err = repo::verify(&car[..car.len() - 7], None).await.unwrap_err();
    assert!(matches!(err, RepoError::Car(_)), "{err}");
    // One flipped byte in the last block: its CID no longer matches.
    let mut tampered = car.clone();
    let last = tampered.len() - 3;
    tampered[last] ^= 0x01;
    let err = repo::verify(&tampered, None).await.unwrap_err();
    assert!(
        err.to_string().contains("does not hash to its CID"),
        "{err}"
    );
    // A record block left out.
    let parsed = commons_data::car::read(&car).await.unwrap();
    let (path, missing) = repo.entries().unwrap()[3].clone();
    let kept = parsed
        .order
        .iter()
        .filter(|c| **c != missing)
        .map(|c| (*c, &parsed.blocks[c][..]));
    let partial = commons_data::car::write(parsed.roots[0], kept);
    let err = repo::verify(&partial, None).await.unwrap_err();
    assert_eq!(err, RepoError::MissingRecord { path, cid: missing });
    // A CAR whose root is a bare tree node verifies (no signature to check).
    let root = repo.tree().root;
    let nodes = repo.tree().node_cids(repo.nodes()).unwrap();
    let bare = commons_data::car::write(
        root,
        parsed
            .order
            .iter()
            .filter(|c| nodes.contains(c) || repo.entries().unwrap().iter().any(|(_, r)| r == *c))
            .map(|c| (*c, &parsed.blocks[c][..])),
    );
    let verified = repo::verify(&bare, None).await.unwrap();
    assert!(verified.commit.is_none() && !verified.signature_checked);
    assert_eq!(verified.data, root);
    let _ = Ipld::Null;
}
