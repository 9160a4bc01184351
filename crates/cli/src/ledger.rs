//! `commons ledger ...`: look at the ledger, sign its state, export it, and
//! verify an export offline.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use commons_ledger::journal::Journal;
use commons_ledger::{export, proof};

use crate::{output, Failure};

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Balances of every account (or one, by id or name).
    Balance {
        /// Account id or name.
        account: Option<String>,
    },
    /// Transfers, oldest first (all, or of one account).
    Transfers {
        /// Account id or name.
        #[arg(long)]
        account: Option<String>,
        /// Show at most this many, the newest.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Seed the cash reserve at an initial token price: CASH cents buy TOKENS.
    Bootstrap {
        #[arg(long)]
        cash: u64,
        #[arg(long)]
        tokens: u64,
    },
    /// Sign the current state of the journal (a checkpoint).
    Checkpoint,
    /// The custodian's public key, which verifiers pin.
    Key,
    /// Write the journal and its checkpoints to a file anyone can verify.
    Export {
        /// Where to write [default: standard output]
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Prove a recipient's statement lines are in the signed journal: writes
    /// each line with its audit path and a fresh checkpoint, which `commons
    /// ledger verify` checks without the journal.
    Prove {
        /// operator:ID, provider:ID, project:ID or general-fund.
        recipient: String,
        /// Only this period (YYYY-MM).
        #[arg(long)]
        period: Option<String>,
        /// Where to write [default: standard output]
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Verify an export (replay every entry under the ledger's rules, check
    /// every checkpoint's signature and root) or the proofs `prove` wrote.
    Verify {
        /// The export or proof file.
        export: PathBuf,
        /// The custodian's public key (hex), obtained independently.
        #[arg(long)]
        key: String,
    },
}

fn open(home: &Path) -> Result<Journal, Failure> {
    commons_server::periods::journal(home, &commons_engine::StoreConfig::from_env())
        .map_err(|e| Failure::Failed(e.to_string()))
}

/// The custodian key the platform signs with (the one its instances share
/// on a database).
fn custodian_key(home: &Path) -> Result<commons_ledger::journal::SigningKey, Failure> {
    commons_server::app::money::custodian_key(home, &commons_engine::StoreConfig::from_env())
        .map_err(Failure::Failed)
}

pub fn run(cmd: LedgerCommand, home: &Path, json: bool) -> Result<(), Failure> {
    match cmd {
        LedgerCommand::Balance { account } => {
            let j = open(home)?;
            let mut rows: Vec<_> = j
                .book()
                .accounts()
                .filter(|(a, _)| {
                    account
                        .as_deref()
                        .is_none_or(|x| a.name == x || a.id.to_string() == x)
                })
                .map(|(a, b)| (a.clone(), *b))
                .collect();
            rows.sort_by_key(|(a, _)| a.id);
            if let Some(x) = &account {
                if rows.is_empty() {
                    return Err(Failure::Input(format!("no account \"{x}\" in the ledger")));
                }
            }
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(a, b)| serde_json::json!({ "account": a, "balance": b }))
                    .collect();
                output::json(&v);
            } else {
                println!(
                    "{:>8}  {:24}  {:>6}  {:>14}  {:>14}  {:>14}",
                    "ID", "NAME", "LEDGER", "DEBITS", "CREDITS", "PENDING"
                );
                for (a, b) in rows {
                    println!(
                        "{:>8}  {:24}  {:>6}  {:>14}  {:>14}  {:>14}",
                        a.id,
                        a.name,
                        a.ledger,
                        b.debits_posted,
                        b.credits_posted,
                        b.debits_pending as i128 - b.credits_pending as i128
                    );
                }
            }
            Ok(())
        }
        LedgerCommand::Transfers { account, limit } => {
            let j = open(home)?;
            let book = j.book();
            let id = match &account {
                None => None,
                Some(x) => Some(
                    book.accounts()
                        .find(|(a, _)| a.name == *x || a.id.to_string() == *x)
                        .map(|(a, _)| a.id)
                        .ok_or_else(|| {
                            Failure::Input(format!("no account \"{x}\" in the ledger"))
                        })?,
                ),
            };
            let name = |id: u64| {
                book.account(id)
                    .map(|(a, _)| a.name.clone())
                    .unwrap_or_else(|| id.to_string())
            };
            let all: Vec<_> = book
                .transfers()
                .into_iter()
                .filter(|(t, _)| {
                    id.is_none_or(|id| t.debit_account_id == id || t.credit_account_id == id)
                })
                .collect();
            let shown = &all[all.len().saturating_sub(limit)..];
            if json {
                let v: Vec<_> = shown
                    .iter()
                    .map(|(t, at)| serde_json::json!({ "transfer": t, "from": name(t.debit_account_id), "to": name(t.credit_account_id), "timestamp": at }))
                    .collect();
                output::json(&v);
            } else {
                for (t, _) in shown {
                    println!(
                        "{:>20}  {:>12}  {} -> {}  (ledger {}, code {})",
                        t.id,
                        t.amount,
                        name(t.debit_account_id),
                        name(t.credit_account_id),
                        t.ledger,
                        t.code
                    );
                }
            }
            Ok(())
        }
        LedgerCommand::Bootstrap { cash, tokens } => {
            let mut j = open(home)?;
            let mut cents = commons_ledger::cents::Cents { journal: &mut j };
            cents
                .bootstrap(cash, tokens)
                .map_err(|e| Failure::Input(e.to_string()))?;
            eprintln!(
                "{:>12} reserve with {cash} cents for {tokens} tokens",
                "Bootstrapped"
            );
            Ok(())
        }
        LedgerCommand::Key => {
            let key = custodian_key(home)?;
            let pk = commons_ledger::hex::encode(key.verifying_key().as_bytes());
            if json {
                output::json(&serde_json::json!({ "public_key": pk }));
            } else {
                println!("{pk}");
            }
            Ok(())
        }
        LedgerCommand::Checkpoint => {
            let mut j = open(home)?;
            let key = custodian_key(home)?;
            let cp = j
                .checkpoint(&key)
                .map_err(|e| Failure::Failed(e.to_string()))?;
            if json {
                output::json(&cp);
            } else {
                eprintln!(
                    "{:>12} {} entries, root {}",
                    "Signed", cp.tree_size, cp.root
                );
            }
            Ok(())
        }
        LedgerCommand::Export { output: path } => {
            let mut j = open(home)?;
            let key = custodian_key(home)?;
            // An export always ends with a checkpoint covering all of it.
            j.checkpoint(&key)
                .map_err(|e| Failure::Failed(e.to_string()))?;
            let text = export::export(&mut j).map_err(|e| Failure::Failed(e.to_string()))?;
            let entries = j.tree().len();
            write_out(path, &text, |p| {
                format!("{:>12} {} ({entries} entries)", "Exported", p.display())
            })?;
            Ok(())
        }
        LedgerCommand::Prove {
            recipient,
            period,
            output: path,
        } => {
            let Some(account) = commons_ledger::period::recipient_named(&recipient) else {
                return Err(Failure::Input(format!(
                    "\"{recipient}\" names no recipient: write operator:ID, provider:ID, project:ID or general-fund"
                )));
            };
            let mut j = open(home)?;
            let key = custodian_key(home)?;
            let cp = j
                .checkpoint(&key)
                .map_err(|e| Failure::Failed(e.to_string()))?;
            let proofs = proof::statement_proofs(&mut j, &account, period.as_deref(), &cp)
                .map_err(|e| Failure::Failed(e.to_string()))?;
            if proofs.is_empty() {
                return Err(Failure::Input(format!(
                    "{recipient} has no statement lines{}",
                    period.map(|p| format!(" in {p}")).unwrap_or_default()
                )));
            }
            let text = serde_json::to_string_pretty(&proofs).expect("json") + "\n";
            write_out(path, &text, |p| {
                format!(
                    "{:>12} {} statement lines of {recipient} in {} entries, root {} ({})",
                    "Proved",
                    proofs.len(),
                    cp.tree_size,
                    cp.root,
                    p.display()
                )
            })?;
            Ok(())
        }
        LedgerCommand::Verify { export: path, key } => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Failure::Input(format!("cannot read {}: {e}", path.display())))?;
            if let Ok(proofs) = serde_json::from_str::<Vec<proof::InclusionProof>>(&text) {
                return verify_proofs(&path, &proofs, key.trim(), json);
            }
            match export::verify(&text, key.trim()) {
                Ok(v) => {
                    if json {
                        output::json(&v);
                    } else {
                        eprintln!(
                            "{:>12} {}: {} entries ({} accounts, {} transfers), {} checkpoints, root {}",
                            "Verified", path.display(), v.entries, v.accounts, v.transfers, v.checkpoints, v.root
                        );
                        if v.signed_size < v.entries {
                            eprintln!(
                                "warning: entries after {} are not covered by a checkpoint",
                                v.signed_size
                            );
                        }
                    }
                    Ok(())
                }
                Err(e) => Err(Failure::Failed(format!(
                    "{} does not verify: {e}",
                    path.display()
                ))),
            }
        }
    }
}

/// Checks every proof in a file `commons ledger prove` wrote.
fn verify_proofs(
    path: &Path,
    proofs: &[proof::InclusionProof],
    key: &str,
    json: bool,
) -> Result<(), Failure> {
    let mut lines = Vec::new();
    for (n, p) in proofs.iter().enumerate() {
        let line = p.check(key).map_err(|e| {
            Failure::Failed(format!(
                "{} does not verify: proof {n}: {e}",
                path.display()
            ))
        })?;
        lines.push(line);
    }
    if json {
        output::json(&lines);
    } else {
        for l in &lines {
            let site = if l.site.is_empty() {
                "(general)"
            } else {
                &l.site
            };
            println!(
                "{:8}  {:28}  {:24}  {:>12}  v{}",
                l.period, l.recipient, site, l.amount, l.policy_version
            );
        }
        eprintln!(
            "{:>12} {}: {} statement lines included in signed checkpoints",
            "Verified",
            path.display(),
            lines.len()
        );
    }
    Ok(())
}

/// Writes `text` to `path` and says so on standard error (`done` words
/// it), or prints it when there is no path.
fn write_out(
    path: Option<PathBuf>,
    text: &str,
    done: impl FnOnce(&Path) -> String,
) -> Result<(), Failure> {
    match path {
        Some(p) => {
            std::fs::write(&p, text)
                .map_err(|e| Failure::Failed(format!("writing {}: {e}", p.display())))?;
            eprintln!("{}", done(&p));
        }
        None => print!("{text}"),
    }
    Ok(())
}
