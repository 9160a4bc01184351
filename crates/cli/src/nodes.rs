//! `commons nodes`, `commons place`, `commons move`: providers' nodes as the
//! platform's administrator sees them, through the running daemon.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{daemon, output, Failure};

/// Where a site goes.
#[derive(clap::Args, Debug)]
pub struct PlaceArgs {
    /// The site's name.
    pub site: String,
    /// Its blueprint (one file).
    pub blueprint: PathBuf,
    /// Say where it would go and why, and place nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Only this provider (repeat it for several).
    #[arg(long = "provider")]
    pub providers: Vec<String>,
    /// Only this region (repeat it for several).
    #[arg(long = "region")]
    pub regions: Vec<String>,
    /// A provider preferred, best first (repeat it).
    #[arg(long = "prefer")]
    pub preferred: Vec<String>,
    /// CPU the site takes, in thousandths of a core.
    #[arg(long, default_value_t = 250)]
    pub cpu_millis: u64,
    /// Memory it takes, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
}

fn ask(home: &Path, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failure> {
    let answer = daemon::ask_with(home, method, path, body)?;
    Ok(serde_json::from_slice(&answer.body).unwrap_or(Value::Null))
}

fn nodes_now(home: &Path) -> Result<Vec<Value>, Failure> {
    Ok(ask(home, "GET", "/api/nodes", None)?["items"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// `commons nodes`.
pub fn list(home: &Path, json: bool) -> Result<(), Failure> {
    let nodes = nodes_now(home)?;
    if json {
        output::json(&nodes);
        return Ok(());
    }
    if nodes.is_empty() {
        eprintln!("no nodes have joined; a provider makes a join token (`POST /api/orgs/ORG/join-tokens`) for `commons agent join`");
        return Ok(());
    }
    println!(
        "{:<18} {:<12} {:<10} {:<8} {:>8}  SITES",
        "NODE", "PROVIDER", "REGION", "STATE", "HEARD"
    );
    for n in &nodes {
        let heard = n["last_heartbeat_ms_ago"]
            .as_u64()
            .map_or("-".to_string(), |ms| format!("{}s", ms / 1000));
        let placed: Vec<&str> = n["placed"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "{:<18} {:<12} {:<10} {:<8} {:>8}  {}",
            n["id"].as_str().unwrap_or(""),
            n["provider"].as_str().unwrap_or(""),
            n["offer"]["region"].as_str().unwrap_or(""),
            n["state"].as_str().unwrap_or(""),
            heard,
            placed.join(", ")
        );
    }
    Ok(())
}

/// `commons place`: the decision, with every node's verdict.
pub fn place(home: &Path, a: PlaceArgs, json: bool) -> Result<(), Failure> {
    let blueprint = std::fs::read_to_string(&a.blueprint)
        .map_err(|e| Failure::Input(format!("{}: {e}", a.blueprint.display())))?;
    let some = |v: Vec<String>| (!v.is_empty()).then_some(v);
    let decision = ask(
        home,
        "POST",
        "/api/placements",
        Some(json!({
            "site": a.site, "blueprint": blueprint, "dry_run": a.dry_run,
            "providers": some(a.providers), "regions": some(a.regions), "preferred": a.preferred,
            "needs": { "cpu_millis": a.cpu_millis, "memory_bytes": a.memory_mib << 20, "disk_bytes": 0 },
        })),
    )?;
    if json {
        output::json(&decision);
        return Ok(());
    }
    for v in decision["verdicts"].as_array().into_iter().flatten() {
        let node = v["node"].as_str().unwrap_or("");
        match v["verdict"].as_str() {
            Some("scored") => {
                let s = &v["score"];
                let total: f64 = ["price", "fit", "preference", "locality", "spread"]
                    .iter()
                    .map(|k| s[k].as_f64().unwrap_or(0.0))
                    .sum();
                println!(
                    "{node:<18} {total:>6.1}  price {:.0}, fit {:.0}, preference {:.0}, locality {:.0}, spread {:.0}",
                    s["price"].as_f64().unwrap_or(0.0),
                    s["fit"].as_f64().unwrap_or(0.0),
                    s["preference"].as_f64().unwrap_or(0.0),
                    s["locality"].as_f64().unwrap_or(0.0),
                    s["spread"].as_f64().unwrap_or(0.0),
                );
            }
            _ => {
                let why = match v["reason"].as_str().unwrap_or("") {
                    "missing_feature" => format!("lacks {}", v["feature"].as_str().unwrap_or("")),
                    "no_room" => format!("no room ({})", v["resource"].as_str().unwrap_or("")),
                    other => other.replace('_', " "),
                };
                println!("{node:<18}  refused: {why}");
            }
        }
    }
    match (decision["node"].as_str(), a.dry_run) {
        (Some(n), true) => eprintln!("{:>12} {} would go to {n}", "Placement", a.site),
        (Some(n), false) => eprintln!("{:>12} {} on {n}", "Placed", a.site),
        (None, _) => {
            return Err(Failure::Input(format!(
                "no node can take {}: every node's reason is above",
                a.site
            )))
        }
    }
    Ok(())
}

/// `commons move SITE --to NODE|PROVIDER`: starts the move and follows it
/// until the site serves from its new node.
pub fn move_site(home: &Path, site: &str, to: &str, json: bool) -> Result<(), Failure> {
    let started = Instant::now();
    let m = ask(
        home,
        "POST",
        &format!("/api/placements/{site}/move"),
        Some(json!({ "to": to })),
    )?;
    let (from, to) = (
        m["from"].as_str().unwrap_or("").to_string(),
        m["to"].as_str().unwrap_or("").to_string(),
    );
    if !json {
        eprintln!("{:>12} {site} from {from} to {to}", "Moving");
    }
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let nodes = nodes_now(home)?;
        let on = |id: &str| {
            nodes.iter().any(|n| {
                n["id"] == id
                    && n["placed"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|s| s == site))
            })
        };
        if on(&to) {
            break;
        }
        if on(&from) && started.elapsed() > Duration::from_secs(2) && !moving(&nodes, site) {
            return Err(Failure::Failed(format!(
                "{site} stayed on {from}: the move failed (the platform's log says why)"
            )));
        }
        if Instant::now() > deadline {
            return Err(Failure::Failed(format!(
                "{site} is still moving after an hour"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if json {
        output::json(
            &json!({ "site": site, "from": from, "to": to, "seconds": started.elapsed().as_secs_f64() }),
        );
    } else {
        eprintln!(
            "{:>12} {site} to {to} in {:.1}s",
            "Moved",
            started.elapsed().as_secs_f64()
        );
        eprintln!(
            "{:>12} {from} keeps a stopped copy; `commons move {site} --confirm` removes it",
            "Note"
        );
    }
    Ok(())
}

/// `commons move SITE --confirm`.
pub fn confirm_move(home: &Path, site: &str, json: bool) -> Result<(), Failure> {
    let c = ask(
        home,
        "POST",
        &format!("/api/placements/{site}/confirm"),
        None,
    )?;
    if json {
        output::json(&c);
        return Ok(());
    }
    let from: Vec<&str> = c["removed_from"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if from.is_empty() {
        eprintln!("{:>12} {site} left no copies behind", "Confirmed");
    } else {
        eprintln!(
            "{:>12} {site}: removing its copies from {}",
            "Confirmed",
            from.join(", ")
        );
    }
    Ok(())
}

fn moving(nodes: &[Value], site: &str) -> bool {
    nodes.iter().any(|n| {
        n["moving"]
            .as_array()
            .is_some_and(|m| m.iter().any(|s| s == site))
    })
}
