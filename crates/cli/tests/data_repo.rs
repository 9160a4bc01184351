//! `commons data repo inspect|verify|diff` on real repository files.

use std::path::Path;
use std::process::{Command, Output};

use commons_data::keys::{Algorithm, Keypair};
use commons_data::model;
use commons_data::repo::{Repo, Write};
use commons_data::syntax::TidClock;
use serde_json::Value;

fn commons(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_commons"))
        .args(args)
        .output()
        .expect("commons runs")
}

fn note(text: &str) -> Vec<u8> {
    model::encode(
        &model::from_json(&serde_json::json!({"$type": "app.commons.note", "text": text})).unwrap(),
    )
}

fn write_repo(dir: &Path) -> (Keypair, std::path::PathBuf, std::path::PathBuf) {
    let key = Keypair::generate(Algorithm::K256);
    // Not a did:key: the signature needs --key to be checked.
    let mut repo = Repo::new("did:web:commons.localhost");
    let clock = TidClock::new(1);
    let writes: Vec<Write> = (0..30)
        .map(|i| Write::Create {
            path: format!("app.commons.note/n{i:03}"),
            record: note(&format!("note {i}")),
        })
        .collect();
    repo.commit(&writes, &key, clock.next()).unwrap();
    let a = dir.join("a.car");
    std::fs::write(&a, repo.export_car().unwrap()).unwrap();
    repo.commit(
        &[
            Write::Delete {
                path: "app.commons.note/n001".into(),
            },
            Write::Update {
                path: "app.commons.note/n002".into(),
                record: note("edited"),
            },
            Write::Create {
                path: "app.commons.note/n100".into(),
                record: note("new"),
            },
        ],
        &key,
        clock.next(),
    )
    .unwrap();
    let b = dir.join("b.car");
    std::fs::write(&b, repo.export_car().unwrap()).unwrap();
    (key, a, b)
}

#[test]
fn inspect_verify_and_diff_repository_files() {
    let dir = tempdir();
    let (key, a, b) = write_repo(&dir);
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());

    let out = commons(&["--json", "data", "repo", "inspect", a_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["commit"]["did"], "did:web:commons.localhost");
    assert_eq!(inspected["commit"]["version"], 3);
    assert_eq!(inspected["records"].as_array().unwrap().len(), 30);
    assert_eq!(inspected["records"][0]["path"], "app.commons.note/n000");
    assert_eq!(inspected["root"], inspected["commit"]["data"]);

    let did_key = key.public().did_key();
    let out = commons(&["data", "repo", "verify", a_s, "--key", &did_key]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("30 records")
            && text.contains("signature of did:web:commons.localhost checked"),
        "{text}"
    );
    // Without the key, it says plainly that the signature was not checked.
    let out = commons(&["data", "repo", "verify", a_s]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT checked"));
    // Another key: exit 1 and the reason.
    let other = Keypair::generate(Algorithm::K256).public().did_key();
    let out = commons(&["data", "repo", "verify", a_s, "--key", &other]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature does not verify"));

    let out = commons(&["--json", "data", "repo", "diff", a_s, b_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ops = diff["record_ops"].as_array().unwrap();
    let summary: Vec<(String, bool, bool)> = ops
        .iter()
        .map(|o| {
            (
                o["path"].as_str().unwrap().to_owned(),
                o["old"].is_string(),
                o["new"].is_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("app.commons.note/n001".to_owned(), true, false),
            ("app.commons.note/n002".to_owned(), true, true),
            ("app.commons.note/n100".to_owned(), false, true),
        ]
    );
    assert!(!diff["created_nodes"].as_array().unwrap().is_empty());
    assert!(!diff["deleted_nodes"].as_array().unwrap().is_empty());
}

#[test]
fn bad_files_exit_1_with_the_first_problem() {
    let dir = tempdir();
    let (_, a, _) = write_repo(&dir);
    let mut bytes = std::fs::read(&a).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x40;
    let tampered = dir.join("tampered.car");
    std::fs::write(&tampered, &bytes).unwrap();
    let out = commons(&["data", "repo", "verify", tampered.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not hash to its CID") && err.contains("tampered.car"),
        "{err}"
    );

    let junk = dir.join("junk.car");
    std::fs::write(&junk, b"\x05hello").unwrap();
    for sub in ["verify", "inspect"] {
        let out = commons(&["data", "repo", sub, junk.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a CAR v1 file"));
    }
    let out = commons(&["data", "repo", "verify", "/nonexistent/x.car"]);
    assert_eq!(out.status.code(), Some(2));
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "commons-data-repo-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
