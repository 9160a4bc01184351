//! Sites on a provider's Kubernetes cluster: `commons plan --kubeconfig`
//! shows the objects a deploy would apply, `commons deploy --kubeconfig`
//! applies them and waits for the site, and `status` and `destroy` find a
//! site's cluster again by its placement.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use commons_engine::{Engine, Target};
use commons_kubernetes::{
    render, Cluster, ClusterError, Manifests, Placement, Placements, RenderErrors, Settings, State,
    Values, WorkloadStatus,
};

use crate::{output, runtime, Failure};

/// Where and how a site runs on a cluster.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClusterArgs {
    /// Deploy to the Kubernetes cluster of this kubeconfig's current
    /// context instead of this machine (a namespace per site).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The image `process:` and `job:` commands run in on the cluster.
    #[arg(
        long,
        env = "COMMONS_KUBERNETES_PROCESS_IMAGE",
        value_name = "IMAGE",
        requires = "kubeconfig"
    )]
    pub process_image: Option<String>,
    /// The storage class of the site's volume claims [default: the cluster's].
    #[arg(long, value_name = "CLASS", requires = "kubeconfig")]
    pub storage_class: Option<String>,
    /// The namespace the platform's gateway runs in: the only one whose
    /// pods may connect to the site's.
    #[arg(long, value_name = "NAMESPACE", default_value = "commons")]
    pub gateway_namespace: String,
    /// How long the site may take to be ready, e.g. 90s, 10m.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    commons_blueprint::load::parse_duration_ms(s)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("expected a duration such as 90s or 10m, got \"{s}\""))
}

impl ClusterArgs {
    fn settings(&self) -> Settings {
        Settings {
            process_image: self.process_image.clone(),
            storage_class: self.storage_class.clone(),
            gateway_namespace: self.gateway_namespace.clone(),
            ..Settings::default()
        }
    }
}

fn placements(home: &Path) -> Placements {
    Placements::new(home.join("kubernetes"))
}

fn cannot_keep(e: std::io::Error) -> Failure {
    Failure::Failed(format!("the site's placement: {e}"))
}

/// The site's placement on a cluster, if it has one.
pub fn placement_of(home: &Path, site: &str) -> Result<Option<Placement>, Failure> {
    placements(home).get(site).map_err(cannot_keep)
}

/// Every site deployed to a cluster from this machine.
pub fn placed(home: &Path) -> Result<Vec<Placement>, Failure> {
    placements(home).list().map_err(cannot_keep)
}

/// Blueprint problems a cluster has, shown like any blueprint's.
fn refused(e: RenderErrors) -> Failure {
    let diagnostics =
        e.0.into_iter()
            .map(|r| {
                let text = std::fs::read_to_string(&r.origin.file).unwrap_or_default();
                let offset = text
                    .split_inclusive('\n')
                    .take(r.origin.line.saturating_sub(1))
                    .map(|l| l.chars().count())
                    .sum::<usize>()
                    + r.origin.column.saturating_sub(1);
                commons_blueprint::Diagnostic {
                    file: r.origin.file,
                    line: r.origin.line,
                    column: r.origin.column,
                    offset,
                    message: format!("component \"{}\": {}", r.component, r.message),
                    help: Some(r.help),
                }
            })
            .collect();
    output::diagnostics(&commons_blueprint::Diagnostics(diagnostics));
    Failure::Input(String::new())
}

fn cluster_failure(e: ClusterError) -> Failure {
    match e {
        ClusterError::Config { .. } => Failure::Input(e.to_string()),
        e => Failure::Failed(e.to_string()),
    }
}

fn manifests(target: &Target, values: &Values, args: &ClusterArgs) -> Result<Manifests, Failure> {
    render(&target.name, &target.blueprint, values, &args.settings()).map_err(refused)
}

/// `commons plan --kubeconfig`: the objects a deploy would apply, secrets
/// redacted. Reads nothing from the cluster and stores no secret.
pub fn plan(target: &Target, args: &ClusterArgs, json: bool) -> Result<(), Failure> {
    let shown = "(redacted)".to_string();
    let values = Values {
        inputs: target.inputs.clone(),
        secrets: target
            .blueprint
            .secrets
            .keys()
            .map(|k| (k.clone(), shown.clone()))
            .collect(),
        passwords: target
            .blueprint
            .components
            .iter()
            .filter(|(_, c)| matches!(c.kind, commons_blueprint::Kind::Postgres))
            .map(|(k, _)| (k.clone(), shown.clone()))
            .collect(),
        secrets_print: shown.clone(),
    };
    let m = manifests(target, &values, args)?;
    if json {
        output::json(&serde_json::json!({
            "site": m.site,
            "namespace": m.namespace,
            "objects": m.objects,
        }));
    } else {
        print!("{}", m.to_yaml());
    }
    Ok(())
}

/// `commons deploy --kubeconfig`.
pub fn deploy(
    home: &Path,
    engine: &Engine,
    target: &Target,
    args: &ClusterArgs,
    json: bool,
) -> Result<(), Failure> {
    let kubeconfig = args
        .kubeconfig
        .clone()
        .expect("deploy to a cluster has a kubeconfig");
    let local = engine
        .store()
        .deployment(&target.name)
        .map_err(|e| Failure::Failed(e.to_string()))?
        .is_some_and(|d| d.status != "destroyed");
    if local {
        return Err(Failure::Input(format!(
            "\"{}\" is deployed on this machine; `commons destroy {}` first, or deploy under another --name",
            target.name, target.name
        )));
    }
    let started = Instant::now();
    let (_lock, secrets) = engine.cluster_secrets(target)?;
    let values = Values {
        inputs: target.inputs.clone(),
        secrets: secrets.secrets,
        passwords: secrets.passwords,
        secrets_print: secrets.print,
    };
    let m = manifests(target, &values, args)?;
    let kubeconfig = std::fs::canonicalize(&kubeconfig).unwrap_or(kubeconfig);
    let mut last: std::collections::HashMap<String, State> = Default::default();
    let mut progress = |s: &WorkloadStatus| {
        if json || last.get(&s.object) == Some(&s.state) {
            return;
        }
        last.insert(s.object.clone(), s.state.clone());
        let (word, detail) = match &s.state {
            State::Ready => ("Ready", format!("{} of {}", s.ready, s.desired)),
            State::Progressing { reason } => ("Waiting", reason.clone()),
            State::Failed { reason } => ("Failed", reason.clone()),
            State::Missing => ("Applying", String::new()),
        };
        eprintln!("{word:>12} {} {detail}", s.object);
    };
    let statuses = runtime().block_on(async {
        let cluster = Cluster::from_kubeconfig(&kubeconfig).await?;
        cluster.deploy(&m, args.timeout, &mut progress).await
    });
    // A deploy that reached the cluster is placed there even when it
    // failed: `status` shows why and `destroy` removes what it left.
    let placement = Placement {
        site: target.name.clone(),
        namespace: m.namespace.clone(),
        kubeconfig,
    };
    let reached = !matches!(
        statuses,
        Err(ClusterError::Config { .. } | ClusterError::Unreachable { .. })
    );
    if reached {
        placements(home).save(&placement).map_err(cannot_keep)?;
    }
    let statuses = statuses.map_err(cluster_failure)?;
    if json {
        output::json(&serde_json::json!({
            "site": m.site,
            "namespace": m.namespace,
            "ok": true,
            "workloads": statuses,
        }));
    } else {
        eprintln!(
            "{:>12} {} to namespace {} in {:.1}s",
            "Deployed",
            m.site,
            m.namespace,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `commons status NAME` for a site on a cluster.
pub fn status(placement: &Placement, json: bool) -> Result<(), Failure> {
    let statuses = runtime()
        .block_on(async {
            let cluster = Cluster::from_kubeconfig(&placement.kubeconfig).await?;
            cluster.status(&placement.site, &placement.namespace).await
        })
        .map_err(cluster_failure)?;
    if json {
        output::json(&serde_json::json!({
            "name": placement.site,
            "kubernetes": { "namespace": placement.namespace, "kubeconfig": placement.kubeconfig },
            "workloads": statuses,
        }));
        return Ok(());
    }
    println!(
        "{} on Kubernetes (namespace {}, {})",
        placement.site,
        placement.namespace,
        placement.kubeconfig.display()
    );
    let width = statuses.iter().map(|s| s.object.len()).max().unwrap_or(0);
    for s in &statuses {
        let state = match &s.state {
            State::Ready => "ready".to_string(),
            State::Progressing { reason } => format!("progressing: {reason}"),
            State::Failed { reason } => format!("failed: {reason}"),
            State::Missing => "missing".to_string(),
        };
        println!("  {:<width$}  {}/{}  {state}", s.object, s.ready, s.desired);
    }
    if statuses.is_empty() {
        println!("  (no workloads)");
    }
    Ok(())
}

/// `commons status NAME --watch` for a site on a cluster: each change as it
/// comes, until every workload is ready (success) or one failed.
pub fn watch(placement: &Placement, json: bool) -> Result<(), Failure> {
    let mut last: std::collections::HashMap<String, State> = Default::default();
    let mut failed = None;
    runtime()
        .block_on(async {
            let cluster = Cluster::from_kubeconfig(&placement.kubeconfig).await?;
            cluster
                .watch(&placement.site, &placement.namespace, &mut |now| {
                    if json {
                        output::json(&now);
                    }
                    for s in now {
                        if last.get(&s.object) != Some(&s.state) {
                            last.insert(s.object.clone(), s.state.clone());
                            if !json {
                                println!(
                                    "{:>12} {} {}/{}",
                                    word(&s.state),
                                    s.object,
                                    s.ready,
                                    s.desired
                                );
                            }
                        }
                        if let State::Failed { reason } = &s.state {
                            failed = Some(format!("{} failed: {reason}", s.object));
                        }
                    }
                    let done = !now.is_empty() && now.iter().all(|s| s.state == State::Ready);
                    !done && failed.is_none()
                })
                .await
        })
        .map_err(cluster_failure)?;
    match failed {
        Some(why) => Err(Failure::Failed(why)),
        None => Ok(()),
    }
}

fn word(state: &State) -> String {
    match state {
        State::Ready => "Ready".into(),
        State::Progressing { reason } => format!("Waiting ({reason})"),
        State::Failed { reason } => format!("Failed ({reason})"),
        State::Missing => "Missing".into(),
    }
}

/// `commons destroy NAME` for a site on a cluster: its namespace goes, and
/// everything in it.
pub fn destroy(
    home: &Path,
    engine: &Engine,
    placement: &Placement,
    json: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    runtime()
        .block_on(async {
            let cluster = Cluster::from_kubeconfig(&placement.kubeconfig).await?;
            cluster.destroy(&placement.namespace).await
        })
        .map_err(cluster_failure)?;
    placements(home)
        .remove(&placement.site)
        .map_err(cannot_keep)?;
    engine.forget_secrets(&placement.site);
    if json {
        output::json(&serde_json::json!({ "name": placement.site, "ok": true }));
    } else {
        eprintln!(
            "{:>12} {} (namespace {} deleted) in {:.1}s",
            "Destroyed",
            placement.site,
            placement.namespace,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
