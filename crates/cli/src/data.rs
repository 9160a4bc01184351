//! `commons data repo ...`: AT Protocol repository files (CAR) for
//! developers — inspect, verify and diff, like atproto's `goat repo`.

use std::path::{Path, PathBuf};

use commons_data::keys::PublicKey;
use commons_data::model::Cid;
use commons_data::repo::{self, RepoError};
use serde_json::{json, Value};

use crate::{output, runtime, Failure};

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Repository files: CAR v1 exports of a user's (or app's) repository.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Every record every app holds about a user, with provenance (the
    /// running daemon's; the platform's administrator).
    Ls { user: String },
    /// One record of a user, decrypted, with its provenance.
    Show {
        user: String,
        /// `collection/rkey`
        path: String,
    },
    /// Everything held about a user as one archive (tar): the repository,
    /// records, grants, the access log, keys.
    Export {
        user: String,
        /// Where to write it [default: commons-data-USER.tar]
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Import an export archive (`commons data export`) as a user's data on
    /// this platform: the same keys, DID and repository root.
    Import {
        user: String,
        /// The archive (tar).
        file: PathBuf,
    },
    /// Erase everything every app holds about a user: keys destroyed,
    /// public records deleted with signed commits, the feed told.
    Erase {
        user: String,
        /// Yes, erase it (it cannot be undone).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum RepoCommand {
    /// Show a CAR file's commit, tree root and records (path and CID).
    Inspect { file: PathBuf },
    /// Check a CAR file: every block's hash, the commit's signature, the
    /// tree's shape, every record present. Exits 1 with the first problem.
    Verify {
        file: PathBuf,
        /// The repository's signing key (did:key:z...); a did:key repository
        /// needs none.
        #[arg(long, value_name = "DID_KEY")]
        key: Option<String>,
    },
    /// What changed from repository A to repository B: records created,
    /// updated and deleted, tree nodes created and deleted.
    Diff { a: PathBuf, b: PathBuf },
    /// Import a repository file (an atproto CAR: a signed commit or a bare
    /// tree at its root) into a user's repository on the running platform:
    /// each record under its collection's class, provenance `import`.
    Import {
        file: PathBuf,
        /// Whose repository it joins.
        #[arg(long)]
        user: String,
    },
}

pub fn run(command: DataCommand, home: &Path, json: bool) -> Result<(), Failure> {
    match command {
        DataCommand::Ls { user } => ls(home, &user, json),
        DataCommand::Show { user, path } => show(home, &user, &path, json),
        DataCommand::Export { user, output } => export(home, &user, output, json),
        DataCommand::Erase { user, yes } => erase(home, &user, yes, json),
        DataCommand::Import { user, file } => import(home, &user, &file, json),
        DataCommand::Repo(RepoCommand::Inspect { file }) => inspect(&file, json),
        DataCommand::Repo(RepoCommand::Verify { file, key }) => verify(&file, key.as_deref(), json),
        DataCommand::Repo(RepoCommand::Diff { a, b }) => diff(&a, &b, json),
        DataCommand::Repo(RepoCommand::Import { file, user }) => {
            import_repo(home, &user, &file, json)
        }
    }
}

fn read(file: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(file).map_err(|e| Failure::Input(format!("cannot read {}: {e}", file.display())))
}

fn bad_file(file: &Path, e: RepoError) -> Failure {
    Failure::Failed(format!("{}: {e}", file.display()))
}

fn commit_json(cid: &Cid, commit: &repo::Commit) -> Value {
    json!({
        "cid": cid.to_string(),
        "did": commit.did,
        "version": commit.version,
        "rev": commit.rev,
        "data": commit.data.to_string(),
        "prev": commit.prev.map(|c| c.to_string()),
    })
}

fn inspect(file: &Path, json: bool) -> Result<(), Failure> {
    let bytes = read(file)?;
    let (loaded, entries) = runtime().block_on(async {
        let car = commons_data::car::read(&bytes)
            .await
            .map_err(|e| bad_file(file, e.into()))?;
        let loaded = repo::load(&car).map_err(|e| bad_file(file, e))?;
        let entries = loaded
            .tree
            .entries(&loaded.nodes)
            .map_err(|e| bad_file(file, e.into()))?;
        Ok::<_, Failure>((loaded, entries))
    })?;
    if json {
        output::json(&json!({
            "commit": loaded.commit.as_ref().map(|(cid, c)| commit_json(cid, c)),
            "root": loaded.tree.root.to_string(),
            "records": entries.iter().map(|(path, cid)| json!({"path": path, "cid": cid.to_string()})).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    match &loaded.commit {
        Some((cid, commit)) => {
            println!("commit   {cid}");
            println!("did      {}", commit.did);
            println!("rev      {}", commit.rev);
        }
        None => println!("commit   (none: the root is a bare tree node)"),
    }
    println!("root     {}", loaded.tree.root);
    println!("records  {}", entries.len());
    for (path, cid) in &entries {
        println!("{path}  {cid}");
    }
    Ok(())
}

fn verify(file: &Path, key: Option<&str>, json: bool) -> Result<(), Failure> {
    let key = key
        .map(PublicKey::from_did_key)
        .transpose()
        .map_err(|e| Failure::Input(format!("--key: {e}")))?;
    let bytes = read(file)?;
    let verified = runtime()
        .block_on(repo::verify(&bytes, key.as_ref()))
        .map_err(|e| bad_file(file, e))?;
    if json {
        output::json(&json!({
            "valid": true,
            "commit": verified.commit.as_ref().map(|(cid, c)| commit_json(cid, c)),
            "root": verified.data.to_string(),
            "records": verified.records,
            "nodes": verified.nodes,
            "signature_checked": verified.signature_checked,
        }));
        return Ok(());
    }
    let signature = match (&verified.commit, verified.signature_checked) {
        (Some((_, c)), true) => format!("signature of {} checked", c.did),
        (Some((_, c)), false) => format!(
            "signature NOT checked: {} is not a did:key; pass --key did:key:... to check it",
            c.did
        ),
        (None, _) => "no commit (bare tree)".into(),
    };
    println!(
        "{}: ok — {} records, {} tree nodes, {signature}",
        file.display(),
        verified.records,
        verified.nodes
    );
    Ok(())
}

fn diff(a: &Path, b: &Path, json: bool) -> Result<(), Failure> {
    let (bytes_a, bytes_b) = (read(a)?, read(b)?);
    let diff = runtime()
        .block_on(repo::diff_cars(&bytes_a, &bytes_b))
        .map_err(|e| Failure::Failed(format!("{} / {}: {e}", a.display(), b.display())))?;
    let cids = |list: &[Cid]| list.iter().map(Cid::to_string).collect::<Vec<_>>();
    if json {
        output::json(&json!({
            "record_ops": diff.record_ops.iter().map(|(path, old, new)| json!({
                "path": path,
                "old": old.map(|c| c.to_string()),
                "new": new.map(|c| c.to_string()),
            })).collect::<Vec<_>>(),
            "created_nodes": cids(&diff.created_nodes),
            "deleted_nodes": cids(&diff.deleted_nodes),
        }));
        return Ok(());
    }
    for (path, old, new) in &diff.record_ops {
        match (old, new) {
            (None, Some(new)) => println!("+ {path}  {new}"),
            (Some(_), None) => println!("- {path}"),
            (Some(old), Some(new)) => println!("~ {path}  {old} -> {new}"),
            (None, None) => {}
        }
    }
    println!(
        "{} records changed; {} tree nodes created, {} deleted",
        diff.record_ops.len(),
        diff.created_nodes.len(),
        diff.deleted_nodes.len()
    );
    Ok(())
}

fn user_data(home: &Path, user: &str) -> Result<Value, Failure> {
    let answer = crate::daemon::ask_with(home, "GET", &format!("/api/data/users/{user}"), None)?;
    serde_json::from_slice(&answer.body).map_err(|e| Failure::Failed(e.to_string()))
}

fn ls(home: &Path, user: &str, json: bool) -> Result<(), Failure> {
    let data = user_data(home, user)?;
    if json {
        output::json(&data);
        return Ok(());
    }
    let records = data["records"].as_array().cloned().unwrap_or_default();
    println!(
        "{}  {} records",
        data["did"].as_str().unwrap_or(""),
        records.len()
    );
    for r in &records {
        println!(
            "{}/{}  {}  by {} (rev {})",
            r["collection"].as_str().unwrap_or(""),
            r["rkey"].as_str().unwrap_or(""),
            r["class"].as_str().unwrap_or(""),
            r["provenance"]["app"].as_str().unwrap_or(""),
            r["provenance"]["revision"]
                .as_str()
                .unwrap_or("")
                .get(..8)
                .unwrap_or(""),
        );
    }
    Ok(())
}

fn show(home: &Path, user: &str, path: &str, json: bool) -> Result<(), Failure> {
    let data = user_data(home, user)?;
    let (collection, rkey) = path
        .split_once('/')
        .ok_or_else(|| Failure::Input(format!("{path:?} is not collection/rkey")))?;
    let record = data["records"]
        .as_array()
        .and_then(|rs| {
            rs.iter()
                .find(|r| r["collection"] == collection && r["rkey"] == rkey)
        })
        .cloned()
        .ok_or_else(|| Failure::Input(format!("{user} has no record {path}")))?;
    if json {
        output::json(&record);
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&record).unwrap_or_default()
        );
    }
    Ok(())
}

fn export(home: &Path, user: &str, output: Option<PathBuf>, json: bool) -> Result<(), Failure> {
    let answer =
        crate::daemon::ask_with(home, "GET", &format!("/api/data/users/{user}/export"), None)?;
    let path = output.unwrap_or_else(|| PathBuf::from(format!("commons-data-{user}.tar")));
    commons_runtime::layout::write_whole(&path, &answer.body)
        .map_err(|e| Failure::Failed(format!("{}: {e}", path.display())))?;
    if json {
        output::json(&json!({"file": path, "bytes": answer.body.len()}));
    } else {
        eprintln!(
            "{:>12} {} ({} bytes)",
            "Exported",
            path.display(),
            answer.body.len()
        );
    }
    Ok(())
}

fn erase(home: &Path, user: &str, yes: bool, json: bool) -> Result<(), Failure> {
    if !yes {
        return Err(Failure::Input(format!(
            "erasing {user}'s data cannot be undone; run `commons data erase {user} --yes`"
        )));
    }
    let answer = crate::daemon::ask_with(home, "DELETE", &format!("/api/data/users/{user}"), None)?;
    let erased: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    if json {
        output::json(&erased);
    } else {
        eprintln!(
            "{:>12} {} records of {user} ({} public, with signed deletions); their keys are destroyed",
            "Erased", erased["records"], erased["public_deleted"]
        );
    }
    Ok(())
}

fn import(home: &Path, user: &str, file: &Path, json: bool) -> Result<(), Failure> {
    let archive = read(file)?;
    let answer = crate::daemon::ask_bytes(
        home,
        "POST",
        &format!("/api/data/users/{user}/import"),
        "application/x-tar",
        archive,
    )?;
    let done: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    if json {
        output::json(&done);
    } else {
        eprintln!(
            "{:>12} {} as {user}: repository root {}",
            "Imported",
            file.display(),
            done["root"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn import_repo(home: &Path, user: &str, file: &Path, json: bool) -> Result<(), Failure> {
    let car = read(file)?;
    let answer = crate::daemon::ask_bytes(
        home,
        "POST",
        &format!("/api/data/users/{user}/repo"),
        "application/vnd.ipld.car",
        car,
    )?;
    let done: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    if json {
        output::json(&done);
        return Ok(());
    }
    let collections = done["collections"].as_object().cloned().unwrap_or_default();
    let records: u64 = collections.values().filter_map(Value::as_u64).sum();
    eprintln!(
        "{:>12} {records} records of {} into {user}'s repository (commit {})",
        "Imported",
        file.display(),
        done["commit"].as_str().unwrap_or("?")
    );
    for (collection, n) in collections {
        eprintln!("{:>12} {n} {collection}", "");
    }
    Ok(())
}
