//! `commons`: deploy open-source services from blueprints.
//!
//! A thin layer: every command parses its arguments, calls the engine, and
//! renders the result for people (or as JSON with `--json`). Exit codes:
//! 0 success, 1 the operation failed, 2 bad input.

mod agent;
mod daemon;
mod data;
mod kubernetes;
mod ledger;
mod money;
mod nodes;
mod output;
mod progress;
mod remote;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

use commons_engine::{Engine, EngineError, DEFAULT_JOBS};

#[derive(Parser)]
#[command(
    name = "commons",
    version,
    about = "Deploy open-source services from blueprints",
    long_about = "Deploy open-source services from blueprints.\n\n\
        A blueprint (commons.yaml) declares a service's components; `commons deploy` makes them \
        real, in parallel, and records every deploy in a git repository you can share.",
    after_help = "Start with `commons init`, then `commons deploy`."
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// Data directory: state, deployment records and secrets.
    #[arg(long, global = true, env = "COMMONS_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum HostingArg {
    Free,
    AlwaysOn,
}

impl From<HostingArg> for commons_engine::Hosting {
    fn from(h: HostingArg) -> commons_engine::Hosting {
        match h {
            HostingArg::Free => commons_engine::Hosting::Free,
            HostingArg::AlwaysOn => commons_engine::Hosting::AlwaysOn,
        }
    }
}

#[derive(clap::Args)]
struct TargetArgs {
    /// A deployment name, a blueprint file or directory, or catalog:NAME [default: ./commons.yaml]
    target: Option<String>,

    /// Deploy under this name instead of the blueprint's.
    #[arg(long)]
    name: Option<String>,

    /// Set an input: `-i greeting=hello` (repeatable).
    #[arg(short = 'i', long = "input", value_name = "NAME=VALUE", value_parser = parse_input)]
    inputs: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a commons.yaml to start from.
    Init {
        /// Directory to create it in.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// The blueprint's name [default: the directory's name]
        #[arg(long)]
        name: Option<String>,
    },
    /// Check a blueprint and report every problem at once.
    Validate {
        /// Blueprint file or directory [default: ./commons.yaml]
        path: Option<PathBuf>,
    },
    /// Show what a deploy would change, attribute by attribute (with
    /// --kubeconfig: the objects it would apply to the cluster).
    Plan {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        cluster: kubernetes::ClusterArgs,
    },
    /// Make a deployment match its blueprint.
    Deploy {
        #[command(flatten)]
        target: TargetArgs,
        /// Tasks to run at once.
        #[arg(short = 'j', long, default_value_t = DEFAULT_JOBS)]
        jobs: usize,
        /// Hosting plan: `free` sites are idled when nobody uses them and
        /// woken by the next request; `always-on` ones keep running
        /// [default: as before, free for a new site].
        #[arg(long, value_enum, conflicts_with = "kubeconfig")]
        hosting: Option<HostingArg>,
        #[command(flatten)]
        cluster: kubernetes::ClusterArgs,
    },
    /// Show the state of a deployment's components (all deployments with no name and no ./commons.yaml).
    Status {
        /// Deployment name [default: the name in ./commons.yaml]
        name: Option<String>,
        /// A site on a Kubernetes cluster: follow its workloads as the
        /// cluster changes them, until every one is ready or one failed.
        #[arg(long)]
        watch: bool,
    },
    /// List deployments.
    List,
    /// Show what components printed.
    Logs {
        /// Deployment name [default: the name in ./commons.yaml]
        name: Option<String>,
        /// Only this component.
        component: Option<String>,
        /// Keep printing as new lines arrive.
        #[arg(short, long)]
        follow: bool,
        /// Lines to show from the end of each log.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
    },
    /// List the deployment records of a deployment, or diff two.
    History {
        /// Deployment name [default: the name in ./commons.yaml]
        name: Option<String>,
        /// Show the differences between two revisions (numbers or commit ids).
        #[arg(long, num_args = 2, value_names = ["A", "B"])]
        diff: Option<Vec<String>>,
    },
    /// Stop and remove every component of a deployment.
    Destroy {
        /// Deployment name [default: the name in ./commons.yaml]
        name: Option<String>,
        /// Tasks to run at once.
        #[arg(short = 'j', long, default_value_t = DEFAULT_JOBS)]
        jobs: usize,
    },
    /// Start a deployment's idle or stopped processes and wait until they are healthy.
    Wake {
        /// Deployment name [default: the name in ./commons.yaml]
        name: Option<String>,
    },
    /// Back a deployment up: data, volumes, databases and its record, in one archive.
    Backup {
        /// Deployment name [default: the name in ./commons.yaml]
        name: Option<String>,
    },
    /// Stand a backed-up deployment up again.
    Restore {
        /// The backup archive (archive/SHA256.tar in the data directory).
        archive: PathBuf,
        /// Restore under this name instead of the backed-up one.
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        /// Tasks to run at once.
        #[arg(short = 'j', long, default_value_t = DEFAULT_JOBS)]
        jobs: usize,
    },
    /// Print the JSON Schema of commons.yaml, for editors.
    Schema,
    /// Run the platform on this machine: the gateway in front of every site,
    /// the API (usage ingest, payment webhooks, tiers) and the supervisor.
    Serve(ServeArgs),
    /// A gateway on its own, beside the platform's `commons serve` instances
    /// on one database: routes from the bus, certificates and keys from the
    /// database, idle sites woken through a control plane's API.
    Gateway(GatewayArgs),
    /// Curated open-source applications: `commons deploy catalog:NAME`.
    Catalog,
    /// The platform daemon (`commons serve`) of this data directory: start,
    /// status, stop. A deploy that leaves processes starts it when needed
    /// (`COMMONS_DAEMON=off` says not to).
    #[command(subcommand)]
    Daemon(daemon::DaemonCommand),
    /// API tokens: scoped, shown once, stored hashed.
    #[command(subcommand)]
    Token(TokenCommand),
    /// This machine as a provider's node: join a control plane, run its
    /// assignments.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// DataCommons: users' repositories in the AT Protocol format.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Providers' nodes that joined this platform: state, last heartbeat,
    /// sites (the running daemon's).
    Nodes,
    /// Place a site among providers' nodes — or, with --dry-run, say where
    /// it would go and every node's verdict.
    Place(nodes::PlaceArgs),
    /// Move a site placed on a node, with its data, to another node (or
    /// the best node of a provider); requests wait meanwhile, none fail.
    Move {
        site: String,
        /// A node id, or a provider.
        #[arg(long, required_unless_present = "confirm", conflicts_with = "confirm")]
        to: Option<String>,
        /// The move went well: the nodes the site left remove their stopped
        /// copies.
        #[arg(long)]
        confirm: bool,
    },
    /// Domains the platform's administrator verified for an organisation:
    /// only that organisation's sites may route them (and their subdomains).
    #[command(subcommand)]
    Domains(DomainsCommand),
    /// Usage events: ingest them, see aggregates.
    #[command(subcommand)]
    Usage(money::UsageCommand),
    /// Subscribe a user to a tier, change it, cancel it, or show it.
    Subscribe(money::SubscribeArgs),
    /// Close a billing period: allocate every subscriber's payment by what they used.
    #[command(subcommand)]
    Period(PeriodCommand),
    /// What a recipient received, from which sites, under which policy.
    Statement {
        /// operator:ID, provider:ID, project:ID or general-fund.
        recipient: String,
        /// Only this period (YYYY-MM).
        #[arg(long)]
        period: Option<String>,
    },
    /// The ledger: balances, signed checkpoints, exports anyone can verify.
    #[command(subcommand)]
    Ledger(ledger::LedgerCommand),
    /// Sign in to a remote platform: the site commands (catalog, plan,
    /// deploy, list, status, logs, history, backup, destroy) then act there.
    ///
    /// Asks for the account's email and password (on the terminal, or one
    /// line each on standard input) and keeps a token of the CLI's own, never
    /// the password. Plain http:// only for this machine (loopback).
    Login {
        /// The platform's address, e.g. https://commons.example.org.
        url: String,
        /// The account's email [default: asked].
        #[arg(long)]
        email: Option<String>,
        /// The organisation new sites go to [default: the first you may deploy in].
        #[arg(long)]
        org: Option<String>,
        /// Sign in with an existing API token read from standard input
        /// instead (`commons logout` then leaves it alone).
        #[arg(long, conflicts_with = "email")]
        token_stdin: bool,
    },
    /// Forget the remote platform (revoking the CLI's token): commands act
    /// on this machine again.
    Logout,
    /// Stand up the service recorded in a deployment record repository.
    Clone {
        /// Path or git URL of a deployment record.
        record: String,
        /// Deploy under this name instead of the recorded one.
        #[arg(long)]
        name: Option<String>,
        /// Tasks to run at once.
        #[arg(short = 'j', long, default_value_t = DEFAULT_JOBS)]
        jobs: usize,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; it is printed once and only its hash is kept.
    Create {
        /// What the token is for.
        name: String,
        /// usage:write, usage:read, billing:read, billing:write, runtime:wake,
        /// deployments:read, periods:close, session or admin (repeatable).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// List tokens (never their values).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum DomainsCommand {
    /// Give HOST (and its subdomains) to ORG, once you have checked that
    /// ORG controls it.
    Add {
        host: String,
        #[arg(long)]
        org: String,
    },
    /// List verified domains and their organisations.
    List,
}

#[derive(Subcommand)]
enum PeriodCommand {
    /// Close a period (YYYY-MM); closing twice changes nothing.
    Close { period: String },
}

fn parse_input(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got \"{s}\"")),
    }
}

/// How a command ended.
enum Failure {
    /// The user's input was wrong (exit 2).
    Input(String),
    /// The operation failed (exit 1); already reported if the text is empty.
    Failed(String),
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Failure {
        match e {
            EngineError::Blueprint(d) => {
                output::diagnostics(&d);
                Failure::Input(String::new())
            }
            e if e.is_bad_input() => Failure::Input(e.to_string()),
            e => Failure::Failed(e.to_string()),
        }
    }
}

fn default_home() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("commons");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    if cfg!(target_os = "macos") {
        home.join("Library/Application Support/commons")
    } else {
        home.join(".local/share/commons")
    }
}

fn main() -> ExitCode {
    // The sandbox helper: not a user command, and it must start fast.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__sandbox") {
        commons_runtime::sandbox::helper_main(&args[2..]);
    }
    // Processes are started under this binary acting as their keeper.
    if let Ok(me) = std::env::current_exe() {
        commons_runtime::proc::set_helper(me);
    }
    let cli = Cli::parse();
    // `serve` resolves its own (flags, environment, file); every other
    // command runs workloads under the platform's defaults.
    if !matches!(cli.command, Command::Serve(_)) {
        let mut settings = commons_runtime::RuntimeSettings::for_platform();
        if matches!(cli.command, Command::Agent(_)) {
            // A provider's node serves no data API: its sites are told of
            // none rather than of a port on the node's own loopback.
            settings.data_api = None;
        }
        let _ = settings.install();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(msg)) => {
            if !msg.is_empty() {
                output::error(&msg);
            }
            ExitCode::from(2)
        }
        Err(Failure::Failed(msg)) => {
            if !msg.is_empty() {
                output::error(&msg);
            }
            ExitCode::from(1)
        }
    }
}

/// A deploy target as the engine takes it: `catalog:NAME` becomes the
/// catalog blueprint's file.
fn catalog_target(
    home: &std::path::Path,
    target: Option<String>,
) -> Result<Option<String>, Failure> {
    match target
        .as_deref()
        .and_then(|t| t.strip_prefix(commons_server::catalog::PREFIX))
    {
        Some(name) => commons_server::catalog::materialize(home, name)
            .map(|p| Some(p.display().to_string()))
            .map_err(Failure::Input),
        None => Ok(target),
    }
}

/// The deployment a name-taking command acts on: the given name, or the
/// blueprint name in ./commons.yaml.
fn name_or_local(name: Option<String>) -> Result<String, Failure> {
    if let Some(n) = name {
        return Ok(n);
    }
    let path = PathBuf::from(commons_blueprint::FILE_NAME);
    if !path.exists() {
        return Err(Failure::Input(
            "name a deployment, or run this in a directory with a commons.yaml".into(),
        ));
    }
    let bp = commons_blueprint::load(&path, &commons_blueprint::FileSystem)
        .map_err(EngineError::Blueprint)?;
    Ok(bp.name)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the async runtime starts")
}

fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    let home = cli.home.clone().unwrap_or_else(default_home);
    let store = commons_engine::StoreConfig::from_env();
    // A person's command waits for a deployment the platform's idler,
    // supervisor or another command is working on, as cargo waits for a
    // lock on its build directory.
    let engine = || {
        Engine::open(&home, &store)
            .map(|e| {
                e.wait_for_locks(commons_engine::LockWait {
                    patience: std::time::Duration::from_secs(600),
                    notice: output::blocking,
                })
            })
            .map_err(Failure::from)
    };
    if let Some(remote) = remote::load(&home)? {
        if let Some(done) = remote::run(&remote, &cli.command, json) {
            return done;
        }
    }
    match cli.command {
        Command::Login {
            url,
            email,
            org,
            token_stdin,
        } => remote::login(
            &home,
            remote::LoginArgs {
                url,
                email,
                org,
                token_stdin,
            },
            json,
        ),
        Command::Logout => remote::logout(&home, json),
        Command::Init { dir, name } => output::init(&dir, name.as_deref(), json),
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&commons_blueprint::schema::json_schema())
                    .expect("json")
            );
            Ok(())
        }
        Command::Validate { path } => {
            let path = path.unwrap_or_else(|| PathBuf::from(commons_blueprint::FILE_NAME));
            match commons_blueprint::load(&path, &commons_blueprint::FileSystem) {
                Ok(bp) => {
                    if json {
                        output::json(
                            &serde_json::json!({ "valid": true, "name": bp.name, "components": bp.components.len() }),
                        );
                    }
                    Ok(())
                }
                Err(d) if json => {
                    output::json(&serde_json::json!({ "valid": false, "errors": d.0 }));
                    Err(Failure::Input(String::new()))
                }
                Err(d) => Err(EngineError::Blueprint(d).into()),
            }
        }
        Command::Plan { target: t, cluster } => {
            let engine = engine()?;
            let target = engine.target(
                catalog_target(&home, t.target)?.as_deref(),
                t.name.as_deref(),
                &t.inputs,
            )?;
            if cluster.kubeconfig.is_some() {
                return kubernetes::plan(&target, &cluster, json);
            }
            let plan = engine.plan(&target)?;
            if json {
                output::json(&plan);
            } else {
                output::plan(&plan);
            }
            Ok(())
        }
        Command::Deploy {
            target: t,
            jobs,
            hosting,
            cluster,
        } => {
            let engine = engine()?;
            let target = engine.target(
                catalog_target(&home, t.target)?.as_deref(),
                t.name.as_deref(),
                &t.inputs,
            )?;
            if cluster.kubeconfig.is_some() {
                return kubernetes::deploy(&home, &engine, &target, &cluster, json);
            }
            if let Some(p) = kubernetes::placement_of(&home, &target.name)? {
                return Err(Failure::Input(format!(
                    "\"{}\" runs on the Kubernetes cluster of {}; deploy it there with --kubeconfig, \
                     or `commons destroy {}` first",
                    p.site,
                    p.kubeconfig.display(),
                    p.site
                )));
            }
            let started = Instant::now();
            let progress = progress::Reporter::new(json, "Deploying");
            let outcome = runtime().block_on(engine.deploy(&target, jobs, &progress))?;
            progress.done();
            if let Some(h) = hosting {
                engine.set_hosting(&outcome.deployment, h.into())?;
            }
            output::outcome(&outcome, json, started.elapsed(), "Deployed")?;
            daemon::ensure_supervised(&home, &engine, &outcome.deployment);
            Ok(())
        }
        Command::Destroy { name, jobs } => {
            let name = name_or_local(name)?;
            let engine = engine()?;
            if let Some(p) = kubernetes::placement_of(&home, &name)? {
                return kubernetes::destroy(&home, &engine, &p, json);
            }
            let started = Instant::now();
            let progress = progress::Reporter::new(json, "Destroying");
            let outcome = runtime().block_on(engine.destroy(&name, jobs, &progress))?;
            progress.done();
            output::outcome(&outcome, json, started.elapsed(), "Destroyed")?;
            // The last site is gone, but the daemon a deploy started is not.
            let none_left = engine.list().map(|l| l.is_empty()).unwrap_or(false);
            if let (true, false, Some(d)) = (none_left, json, commons_server::local::running(&home))
            {
                eprintln!(
                    "{:>12} the platform daemon (pid {}) still runs for {}; `commons daemon stop` stops it",
                    "Note",
                    d.pid,
                    home.display()
                );
            }
            Ok(())
        }
        Command::Clone { record, name, jobs } => {
            let engine = engine()?;
            let started = Instant::now();
            let progress = progress::Reporter::new(json, "Deploying");
            let (_, outcome) = runtime().block_on(engine.clone_record(
                &record,
                name.as_deref(),
                jobs,
                &progress,
            ))?;
            progress.done();
            output::outcome(&outcome, json, started.elapsed(), "Cloned")?;
            daemon::ensure_supervised(&home, &engine, &outcome.deployment);
            Ok(())
        }
        Command::Status { name, watch } => {
            let engine = engine()?;
            let name = match name {
                Some(n) => n,
                None if PathBuf::from(commons_blueprint::FILE_NAME).exists() => {
                    name_or_local(None)?
                }
                None => return output::list(&engine.list()?, &kubernetes::placed(&home)?, json),
            };
            if let Some(p) = kubernetes::placement_of(&home, &name)? {
                if watch {
                    return kubernetes::watch(&p, json);
                }
                return kubernetes::status(&p, json);
            }
            if watch {
                // Not a site at all: that is the error to give.
                engine.status(&name)?;
                return Err(Failure::Input(format!(
                    "--watch follows a site on a Kubernetes cluster, and \"{name}\" runs here; \
                     `commons logs -f {name}` follows its output"
                )));
            }
            let status = engine.status(&name)?;
            if json {
                output::json(&status);
            } else {
                output::status(&status);
                let down = status
                    .components
                    .iter()
                    .any(|c| commons_engine::is_down(&c.state));
                if down && commons_server::local::running(&home).is_none() {
                    eprintln!(
                        "note: no platform daemon runs for this data directory, so nothing \
                         restarts stopped processes; `commons daemon start` starts it"
                    );
                }
            }
            Ok(())
        }
        Command::List => output::list(&engine()?.list()?, &kubernetes::placed(&home)?, json),
        Command::Wake { name } => {
            let name = name_or_local(name)?;
            let started = Instant::now();
            // The daemon, when it runs, wakes it: it then knows the site is
            // in use and does not idle it again at once.
            if commons_server::local::running(&home).is_some() {
                let answer = daemon::ask(&home, "POST", &format!("/api/deployments/{name}/wake"))?;
                if json {
                    println!("{}", String::from_utf8_lossy(&answer.body));
                } else {
                    eprintln!(
                        "{:>12} {name} in {:.2}s (through the platform daemon)",
                        "Woke",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(());
            }
            let engine = engine()?;
            let outcome = runtime().block_on(engine.wake(&name))?;
            output::outcome(&outcome, json, started.elapsed(), "Woke")?;
            daemon::ensure_supervised(&home, &engine, &name);
            Ok(())
        }
        Command::Backup { name } => {
            let name = name_or_local(name)?;
            let b = engine()?.backup(&name)?;
            if json {
                output::json(&b);
            } else {
                println!("{}", b.path.display());
                eprintln!(
                    "{:>12} {name} ({} bytes, {} databases, {} volumes, record {})",
                    "Backed up",
                    b.bytes,
                    b.manifest.databases.len(),
                    b.manifest.volumes.len(),
                    &b.manifest.record_commit[..b.manifest.record_commit.len().min(10)]
                );
            }
            Ok(())
        }
        Command::Restore {
            archive,
            as_name,
            jobs,
        } => {
            let engine = engine()?;
            let started = Instant::now();
            let progress = progress::Reporter::new(json, "Restoring");
            let (_, outcome) = runtime().block_on(engine.restore(
                &archive,
                as_name.as_deref(),
                jobs,
                &progress,
            ))?;
            progress.done();
            output::outcome(&outcome, json, started.elapsed(), "Restored")?;
            daemon::ensure_supervised(&home, &engine, &outcome.deployment);
            Ok(())
        }
        Command::Ledger(cmd) => ledger::run(cmd, &home, json),
        Command::Usage(cmd) => money::usage(cmd, &home, json),
        Command::Serve(args) => serve(&home, args),
        Command::Gateway(args) => gateway(&home, args),
        Command::Daemon(cmd) => daemon::run(cmd, &home, json),
        Command::Agent(cmd) => agent::run(cmd, &home, json),
        Command::Data(cmd) => data::run(cmd, &home, json),
        Command::Nodes => nodes::list(&home, json),
        Command::Place(args) => nodes::place(&home, args, json),
        Command::Move { site, to, confirm } => match to {
            Some(to) if !confirm => nodes::move_site(&home, &site, &to, json),
            _ => nodes::confirm_move(&home, &site, json),
        },
        Command::Catalog => {
            let entries = commons_server::catalog::ENTRIES;
            if json {
                output::json(&entries);
            } else {
                let entries = serde_json::to_value(entries).expect("serialises");
                output::catalog(entries.as_array().map(Vec::as_slice).unwrap_or_default());
            }
            Ok(())
        }
        Command::Token(cmd) => token(&home, cmd, json),
        Command::Domains(cmd) => domains(&home, cmd, json),
        Command::Subscribe(args) => money::subscribe(&home, args, json),
        Command::Period(PeriodCommand::Close { period }) => money::close(&home, &period, json),
        Command::Statement { recipient, period } => {
            money::show_statement(&home, &recipient, period.as_deref(), json)
        }
        Command::Logs {
            name,
            component,
            follow,
            lines,
        } => {
            let name = name_or_local(name)?;
            let files = engine()?.log_files(&name, component.as_deref())?;
            output::logs(&files, lines, follow, json)
        }
        Command::History { name, diff } => {
            let name = name_or_local(name)?;
            let engine = engine()?;
            match diff {
                Some(revs) => {
                    let text = engine.history_diff(&name, &revs[0], &revs[1])?;
                    if json {
                        output::json(&serde_json::json!({ "diff": text }));
                    } else {
                        print!("{text}");
                    }
                }
                None => {
                    let entries = engine.history(&name)?;
                    if json {
                        output::json(&entries);
                    } else {
                        output::history(&entries);
                    }
                }
            }
            Ok(())
        }
    }
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Configuration file [default: $COMMONS_HOME/commons.toml when it exists].
    /// Flags and environment variables override what it says.
    #[arg(long, env = "COMMONS_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Address of the API [default: 127.0.0.1:8070].
    #[arg(long, env = "COMMONS_LISTEN")]
    listen: Option<String>,
    #[command(flatten)]
    gateway: GatewayFlags,
    /// One person's platform, on their own machine: sites from the API and
    /// the console run unsandboxed, as this user (unsafe: let nobody else
    /// deploy). Without it, and without the sandbox (COMMONS_SANDBOX=1, as
    /// root), only the platform's administrator deploys.
    #[arg(long)]
    single_user: bool,
}

/// Where the gateway listens and how it gets certificates: `commons serve`'s
/// gateway and `commons gateway` alike.
#[derive(clap::Args, Debug)]
struct GatewayFlags {
    /// The gateway's plain-HTTP address (sites at http://NAME.localhost:PORT)
    /// [default: 127.0.0.1:8080].
    #[arg(long, env = "COMMONS_GATEWAY_HTTP")]
    http: Option<String>,
    /// The gateway's HTTPS address, "off" to disable [default: 127.0.0.1:8443].
    #[arg(long, env = "COMMONS_GATEWAY_HTTPS")]
    https: Option<String>,
    /// The gateway's metrics and routes, for operators; "off" to disable
    /// [default: 127.0.0.1:8071].
    #[arg(long, env = "COMMONS_GATEWAY_ADMIN")]
    admin: Option<String>,
    /// Gateway worker threads (1: one event loop) [default: 2].
    #[arg(long, env = "COMMONS_GATEWAY_THREADS")]
    gateway_threads: Option<usize>,
    /// ACME directory URL: certificates for the hosts sites route (e.g.
    /// https://acme-v02.api.letsencrypt.org/directory). Unset: only
    /// self-signed certificates for *.localhost.
    #[arg(long, env = "COMMONS_ACME_DIRECTORY")]
    acme_directory: Option<String>,
    /// PEM file of the CA of the ACME server's own certificate, when it is
    /// not a public one.
    #[arg(long, env = "COMMONS_ACME_ROOT")]
    acme_root: Option<std::path::PathBuf>,
    /// Contact e-mail for the ACME account.
    #[arg(long, env = "COMMONS_ACME_EMAIL")]
    acme_email: Option<String>,
    /// How the ACME server checks the gateway serves a host: http-01 (a
    /// file on port 80) or tls-alpn-01 (a handshake on port 443, for when
    /// port 80 is closed) [default: http-01].
    #[arg(long, env = "COMMONS_ACME_CHALLENGE")]
    acme_challenge: Option<String>,
}

#[derive(clap::Args, Debug)]
struct GatewayArgs {
    /// Configuration file [default: $COMMONS_HOME/commons.toml when it
    /// exists]: the platform's, for its database, bus and gateway settings.
    #[arg(long, env = "COMMONS_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    gateway: GatewayFlags,
    /// A control plane's API (any `commons serve` instance of the platform),
    /// which wakes idle sites; its token, with the scope runtime:wake, in
    /// COMMONS_CONTROL_PLANE_TOKEN.
    #[arg(long, env = "COMMONS_CONTROL_PLANE", value_name = "URL")]
    control_plane: String,
}

/// Settings of `commons serve` (or of a gateway on its own) from flags, the
/// environment and the configuration file.
fn settings(
    home: &std::path::Path,
    config: Option<&std::path::Path>,
    listen: Option<String>,
    gateway: GatewayFlags,
    single_user: bool,
) -> Result<commons_server::config::Settings, Failure> {
    let file = commons_server::config::load(home, config).map_err(Failure::Input)?;
    let flags = commons_server::config::ServeFlags {
        listen,
        http: gateway.http,
        https: gateway.https,
        admin: gateway.admin,
        gateway_threads: gateway.gateway_threads,
        acme_directory: gateway.acme_directory,
        acme_root: gateway.acme_root,
        acme_email: gateway.acme_email,
        acme_challenge: gateway.acme_challenge,
        single_user,
    };
    commons_server::config::resolve(home, flags, file, &|k| std::env::var(k).ok())
        .map_err(Failure::Input)
}

fn run_failure(e: commons_server::RunError) -> Failure {
    match e {
        commons_server::RunError::Input(m) => Failure::Input(m),
        commons_server::RunError::Failed(m) => Failure::Failed(m),
    }
}

fn serve(home: &std::path::Path, args: ServeArgs) -> Result<(), Failure> {
    let settings = settings(
        home,
        args.config.as_deref(),
        args.listen,
        args.gateway,
        args.single_user,
    )?;
    commons_server::run(settings).map_err(run_failure)
}

/// A gateway on its own, beside the platform's instances.
fn gateway(home: &std::path::Path, args: GatewayArgs) -> Result<(), Failure> {
    let settings = settings(home, args.config.as_deref(), None, args.gateway, false)?;
    let token = std::env::var("COMMONS_CONTROL_PLANE_TOKEN").map_err(|_| {
        Failure::Input(
            "set COMMONS_CONTROL_PLANE_TOKEN to a platform token with the scope runtime:wake \
             (`commons token create gateway --scope runtime:wake`): the gateway asks the \
             control plane to wake idle sites with it"
                .into(),
        )
    })?;
    let control_plane = commons_server::gateway::ControlPlane::new(args.control_plane, token);
    commons_server::edge::run(settings, control_plane).map_err(run_failure)
}

fn domains(home: &std::path::Path, cmd: DomainsCommand, json: bool) -> Result<(), Failure> {
    match cmd {
        DomainsCommand::Add { host, org } => {
            commons_server::hosts::verify(home, &host, &org).map_err(Failure::Input)?;
            if !json {
                eprintln!("{:>12} {host} for organisation {org}", "Verified");
            }
            Ok(())
        }
        DomainsCommand::List => {
            let all = commons_server::hosts::verified(home);
            if json {
                output::json(&all);
            } else {
                for (host, org) in all {
                    println!("{host}  {org}");
                }
            }
            Ok(())
        }
    }
}

fn token(home: &std::path::Path, cmd: TokenCommand, json: bool) -> Result<(), Failure> {
    // The platform's tokens where its state is (shared by its instances on
    // a database).
    let store = commons_engine::StoreConfig::from_env();
    let state = store
        .open_state(&commons_runtime::Layout::new(home).state_db())
        .map_err(|e| Failure::Failed(e.to_string()))?;
    let tokens = commons_server::Tokens::open(home, &store, state).map_err(Failure::Failed)?;
    match cmd {
        TokenCommand::Create { name, scopes } => {
            let now = commons_clock::now_ms();
            let (token, record) = tokens.create(&name, &scopes, now).map_err(Failure::Input)?;
            if json {
                output::json(
                    &serde_json::json!({ "token": token, "id": record.id, "scopes": record.scopes }),
                );
            } else {
                println!("{token}");
                eprintln!(
                    "{:>12} token {} ({}); it is shown only now",
                    "Created",
                    record.id,
                    record.scopes.join(", ")
                );
            }
            Ok(())
        }
        TokenCommand::List => {
            let all = tokens.list().map_err(|e| Failure::Failed(e.to_string()))?;
            if json {
                let v: Vec<_> = all
                    .iter()
                    .map(|r| serde_json::json!({ "id": r.id, "name": r.name, "scopes": r.scopes }))
                    .collect();
                output::json(&v);
            } else {
                for r in all {
                    println!("{}  {}  {}", r.id, r.name, r.scopes.join(","));
                }
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => match tokens.revoke(&id).map_err(Failure::Failed)? {
            true => Ok(()),
            false => Err(Failure::Input(format!("no token with id \"{id}\""))),
        },
    }
}

/// True when stdout is a terminal a person is watching.
pub fn interactive() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("CI").is_none()
}
