//! `commons agent`: a provider's machine as a node of a control plane.

use std::path::Path;
use std::time::Duration;

use commons_agent::protocol::{NodeOffer, Resources};
use commons_agent::AgentError;

use crate::{output, Failure};

#[derive(clap::Subcommand, Debug)]
pub enum AgentCommand {
    /// Join a control plane with a provider's join token (single-use; it
    /// pins the control plane's CA, so a man in the middle is refused).
    Join {
        /// The control plane's agent address, https://HOST:PORT.
        url: String,
        /// The join token (`cmnj_…`); read from COMMONS_JOIN_TOKEN when not given.
        #[arg(long, env = "COMMONS_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Region or jurisdiction, e.g. eu-west.
        #[arg(long)]
        region: String,
        /// CPU offered, in thousandths of a core.
        #[arg(long, default_value_t = 1000)]
        cpu_millis: u64,
        /// Memory offered, in MiB.
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        /// Disk offered, in GiB.
        #[arg(long, default_value_t = 10)]
        disk_gib: u64,
        /// CommonCents per month for a small site's resources.
        #[arg(long, default_value_t = 100)]
        price: u64,
        /// A feature offered (sandbox, postgres, volumes, images); repeat it.
        #[arg(long = "feature")]
        features: Vec<String>,
    },
    /// Run the agent: heartbeats, assignments, reports, until stopped.
    Run {
        /// How long one poll for assignments waits, in seconds.
        #[arg(long, default_value_t = 25)]
        poll_seconds: u64,
        /// How often the sites' CPU and memory are sent as usage, in seconds.
        #[arg(long, default_value_t = 60)]
        sample_seconds: u64,
    },
    /// Stand for many nodes that run nothing, for benchmarks and drills of
    /// the control planes: each joins with a token of its own, beats, takes
    /// its assignments and reports them done without running them.
    Simulate {
        /// A control plane's agent address, https://HOST:PORT; repeat it to
        /// spread the nodes among several.
        #[arg(long = "control-plane", required = true)]
        control_planes: Vec<String>,
        /// A file of join tokens, one per line: one node each.
        #[arg(long)]
        tokens: std::path::PathBuf,
        /// Region or jurisdiction of every node.
        #[arg(long, default_value = "sim")]
        region: String,
        /// CPU each node offers, in thousandths of a core.
        #[arg(long, default_value_t = 64_000)]
        cpu_millis: u64,
        /// Memory each node offers, in MiB.
        #[arg(long, default_value_t = 262_144)]
        memory_mib: u64,
        /// Disk each node offers, in GiB.
        #[arg(long, default_value_t = 4096)]
        disk_gib: u64,
        /// How long one poll for assignments waits, in seconds.
        #[arg(long, default_value_t = 25)]
        poll_seconds: u64,
    },
}

fn failure(e: AgentError) -> Failure {
    match e {
        AgentError::Input(m) | AgentError::Refused(m) => Failure::Input(m),
        AgentError::Failed(m) => Failure::Failed(m),
    }
}

pub fn run(cmd: AgentCommand, home: &Path, json: bool) -> Result<(), Failure> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the async runtime starts");
    match cmd {
        AgentCommand::Join {
            url,
            token,
            region,
            cpu_millis,
            memory_mib,
            disk_gib,
            price,
            features,
        } => {
            let offer = NodeOffer {
                region,
                capacity: Resources {
                    cpu_millis,
                    memory_bytes: memory_mib << 20,
                    disk_bytes: disk_gib << 30,
                },
                price,
                features: features.into_iter().collect(),
            };
            let id = rt
                .block_on(commons_agent::join(home, &url, &token, offer))
                .map_err(failure)?;
            if json {
                output::json(
                    &serde_json::json!({ "node": id.node, "control_plane": id.control_plane }),
                );
            } else {
                eprintln!(
                    "{:>12} {} as node {}; `commons agent run` starts it",
                    "Joined", id.control_plane, id.node
                );
            }
            Ok(())
        }
        AgentCommand::Run {
            poll_seconds,
            sample_seconds,
        } => {
            let store = commons_engine::StoreConfig::from_env();
            let engine = commons_engine::Engine::open(home, &store).map_err(Failure::from)?;
            let settings = commons_agent::AgentSettings {
                home: home.to_path_buf(),
                poll: Duration::from_secs(poll_seconds.clamp(1, 55)),
                sample: Duration::from_secs(sample_seconds.max(1)),
            };
            rt.block_on(commons_agent::run(settings, engine))
                .map_err(failure)
        }
        AgentCommand::Simulate {
            control_planes,
            tokens,
            region,
            cpu_millis,
            memory_mib,
            disk_gib,
            poll_seconds,
        } => {
            let text = std::fs::read_to_string(&tokens)
                .map_err(|e| Failure::Input(format!("{}: {e}", tokens.display())))?;
            let tokens: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            let sim = commons_agent::simulate::Simulation {
                control_planes,
                tokens,
                offer: NodeOffer {
                    region,
                    capacity: Resources {
                        cpu_millis,
                        memory_bytes: memory_mib << 20,
                        disk_bytes: disk_gib << 30,
                    },
                    price: 100,
                    features: ["sandbox".to_string()].into_iter().collect(),
                },
                poll: Duration::from_secs(poll_seconds.clamp(1, 55)),
            };
            rt.block_on(commons_agent::simulate::simulate(sim, |n, took| {
                if json {
                    output::json(
                        &serde_json::json!({ "joined": n, "seconds": took.as_secs_f64() }),
                    );
                } else {
                    eprintln!("{:>12} {n} simulated nodes in {took:.1?}", "Joined");
                }
            }))
            .map_err(failure)
        }
    }
}
