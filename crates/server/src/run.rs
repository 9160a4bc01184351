//! `commons serve`: the whole platform on this machine — the API, the
//! gateway, the supervisor — built from resolved [`Settings`]. The CLI
//! parses arguments and calls [`run`]; the node agent and further `serve`
//! instances will start the same way.

use std::io::IsTerminal;
use std::sync::Arc;

use crate::config::Settings;
use crate::AppState;

/// Why the platform did not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Something the operator can fix: a busy address, another daemon.
    #[error("{0}")]
    Input(String),
    /// Something else failed.
    #[error("{0}")]
    Failed(String),
}

/// Runs the platform until it is asked to stop (a signal, or `commons
/// daemon stop`). The runtime's settings become this process's.
pub fn run(mut settings: Settings) -> Result<(), RunError> {
    let home = settings.home.clone();
    if let Some(other) = crate::local::running(&home) {
        return Err(RunError::Input(format!(
            "the platform daemon already runs for {} (pid {}); `commons daemon stop` stops it",
            home.display(),
            other.pid
        )));
    }
    // Bound before the runtime's settings are fixed: sites are told where it is.
    let data_listener = bind_data_api(&settings.data_listen)?;
    settings.runtime.data_api = data_listener.local_addr().ok().and_then(|a| match a {
        std::net::SocketAddr::V4(v4) => Some(v4),
        std::net::SocketAddr::V6(_) => None,
    });
    if let Err(in_force) = settings.runtime.clone().install() {
        if in_force != settings.runtime {
            return Err(RunError::Failed(
                "the runtime's settings were read before they were set".into(),
            ));
        }
    }
    // The tiers the CLI's `commons subscribe` knows, from the same file.
    let money = crate::periods::MoneySettings::load(&home).map_err(|e| match e {
        crate::periods::MoneyError::Input(m) => RunError::Input(m),
        crate::periods::MoneyError::Failed(m) => RunError::Failed(m),
    })?;
    let mut state = AppState::open(
        &home,
        &settings.store,
        Some(money.tiers()),
        settings.stripe_webhook_secret.clone(),
    )
    .map_err(|e| RunError::Failed(e.to_string()))?;
    state.trusted_proxies = settings.trusted_proxies.clone();
    state.nodes = Arc::new(
        crate::nodes::Nodes::open(&home, settings.nodes.clone(), &settings.store)
            .map_err(RunError::Failed)?,
    );
    state.tunnels = crate::tunnels::Tunnels::new(state.nodes.clone());
    state.stripe_api = settings
        .stripe_api
        .clone()
        .map(crate::stripe_api::StripeApi::new)
        .transpose()
        .map_err(RunError::Failed)?;
    bootstrap_admin(&home, &state.tokens)?;
    let supervisor_engine = state
        .engine
        .reopen()
        .map_err(|e| RunError::Failed(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the async runtime starts");
    rt.block_on(async {
        let listen = &settings.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| RunError::Input(format!("cannot listen on {listen}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| RunError::Failed(e.to_string()))?;
        eprintln!(
            "{:>12} http://{addr} (data in {})",
            "Listening",
            home.display()
        );
        eprintln!("{:>12} http://{addr}/console", "Console");
        warn_about_isolation(&settings.runtime);
        if settings.runtime.sandboxed {
            // Sites' networks need the host's rules: refuse to start without them.
            settings.runtime.firewall().install().map_err(|e| {
                RunError::Input(format!("sites' networks: {e}"))
            })?;
        }
        let public = settings
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let _ = state.public_url.set(public);
        if state.accounts.store().user_count().unwrap_or(1) == 0 {
            eprintln!(
                "{:>12} the first account to sign up at http://{addr}/console/signup administers the platform",
                "Welcome"
            );
        }
        crate::supervisor::spawn(supervisor_engine, settings.supervisor.clone());
        if let Some(bus) = &settings.bus {
            eprintln!(
                "{:>12} the state's changes to NATS JetStream at {} (stream {})",
                "Relaying", bus.url, bus.stream
            );
            tokio::spawn(commons_bus::relay(
                state.engine.shared_store(),
                bus.clone(),
                std::time::Duration::from_millis(50),
                Arc::new(std::sync::atomic::AtomicBool::new(false)),
            ));
        }
        let state = Arc::new(state);
        let data_listener = tokio::net::TcpListener::from_std(data_listener)
            .map_err(|e| RunError::Failed(e.to_string()))?;
        if let Ok(addr) = data_listener.local_addr() {
            eprintln!("{:>12} data {addr} (apps' data API)", "Listening");
        }
        let data_state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve_data_api(data_listener, data_state).await {
                eprintln!("{:>12} the data API's listener stopped: {e}", "Error");
            }
        });
        if let Some(listen) = &settings.agent_listen {
            let agents = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| RunError::Input(format!("cannot listen for agents on {listen}: {e}")))?;
            let addr = agents
                .local_addr()
                .map_err(|e| RunError::Failed(e.to_string()))?;
            eprintln!("{:>12} https://{addr} (node agents)", "Listening");
            let _ = state.agent_url.set(format!("https://{addr}"));
            let agent_state = state.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::agents::serve(agents, agent_state).await {
                    eprintln!("{:>12} the agent listener stopped: {e}", "Error");
                }
            });
            let nodes = state.nodes.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    every.tick().await;
                    let nodes = nodes.clone();
                    let _ = tokio::task::spawn_blocking(move || nodes.sweep()).await;
                }
            });
        }
        // Data reads and writes reach the meter a quarter-second later, folded.
        let data_state = state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(250));
            loop {
                every.tick().await;
                let state = data_state.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let events = state.data.take_usage();
                    if events.is_empty() {
                        return;
                    }
                    let mut meter = state.meter.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = meter.ingest(&events, None) {
                        tracing::warn!(error = %e, "the meter refused data usage");
                    }
                })
                .await;
            }
        });
        // With a bus, usage goes through it: the gateway publishes, and
        // this instance's meter takes its share.
        let usage_bus = settings.bus.as_ref().map(|b| {
            commons_bus::usage::UsageConfig::new(&b.url, &b.name)
        });
        if let Some(config) = &usage_bus {
            crate::usage_bus::spawn_meter(state.clone(), config.clone());
        }
        if let Some(b) = &settings.bus {
            crate::feed_bus::spawn(
                &tokio::runtime::Handle::current(),
                state.data.commons.clone(),
                commons_bus::feed::FeedConfig::new(&b.url, &b.name),
            );
        }
        let stopping_usage = usage_bus.clone();
        let gateway = crate::gateway::spawn(
            &home,
            state.clone(),
            settings.gateway,
            usage_bus,
            settings.bus.clone(),
            crate::gateway::Role::Platform,
        )
        .map_err(RunError::Input)?;
        let bound = gateway.bound.clone();
        for (what, addr) in &bound {
            eprintln!("{:>12} {what} {addr} (gateway)", "Listening");
        }
        let info = crate::local::DaemonInfo {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            api: format!("http://{addr}"),
            gateway: bound
                .iter()
                .map(|(w, a)| (w.to_string(), a.to_string()))
                .collect(),
            started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string(),
        };
        let socket = crate::local::announce(&home, &info).map_err(RunError::Input)?;
        let served = crate::serve(listener, Some(socket), state).await;
        // Asked to stop: requests in flight finish, their usage is written.
        gateway.stop();
        // Through the bus, written means published: this instance's meter
        // (still taking) is given a moment to count it too.
        if let Some(config) = &stopping_usage {
            let limit = std::time::Duration::from_secs(5);
            match commons_bus::usage::wait_taken(config, limit).await {
                Ok(true) => {}
                Ok(false) => eprintln!(
                    "{:>12} usage is still in the bus's stream; a running instance's meter takes it",
                    "Note"
                ),
                Err(e) => eprintln!("{:>12} the usage stream: {e}", "Warning"),
            }
        }
        served.map_err(|e| RunError::Failed(e.to_string()))
    })
}

/// Says, once at start, who may deploy when workloads are not sandboxed.
fn warn_about_isolation(runtime: &commons_runtime::RuntimeSettings) {
    if runtime.sandboxed {
        return;
    }
    if commons_runtime::settings::is_root() {
        eprintln!(
            "{:>12} the sandbox is off (COMMONS_SANDBOX=0 or [runtime] sandbox = false): \
             sites run as root, on the host's network, and can reach each other, the \
             platform's API and its database; turn it back on unless every site is yours",
            "Warning"
        );
    } else {
        eprintln!(
            "{:>12} not running as root: sites are not isolated from each other (own \
             users, namespaces and networks need root)",
            "Warning"
        );
    }
    if runtime.single_user {
        eprintln!(
            "{:>12} single-user mode: sites from the API and the console run \
             unsandboxed, as this user, and can read the platform's keys; let nobody \
             else deploy here",
            "Warning"
        );
    } else {
        eprintln!(
            "{:>12} workloads are not sandboxed: the API and the console take sites from \
             the platform's administrator only (COMMONS_SANDBOX=1 as root lets users \
             deploy; COMMONS_SINGLE_USER=1 makes this one person's platform)",
            "Note"
        );
    }
}

/// On the first start, the platform's administrator: a token with every
/// scope, shown once — on the terminal when there is one, else only in a
/// file of the platform's (mode 0600), so it never lands in a log.
fn bootstrap_admin(home: &std::path::Path, tokens: &crate::Tokens) -> Result<(), RunError> {
    let existing = tokens.list().map_err(|e| RunError::Failed(e.to_string()))?;
    if existing
        .iter()
        .any(|r| r.scopes.iter().any(|s| s == "admin"))
    {
        return Ok(());
    }
    let now = commons_clock::now_ms();
    let (token, record) = tokens
        .create("admin", &["admin".to_string()], now)
        .map_err(RunError::Failed)?;
    if std::io::stderr().is_terminal() {
        eprintln!(
            "{:>12} the administrator's API token (shown only now; `commons token revoke {}` revokes it):\n{:>12} {token}",
            "Admin",
            record.id,
            ""
        );
    } else {
        let path = commons_runtime::Layout::new(home).admin_token();
        crate::private_dir(path.parent().expect("in the secrets directory"))
            .map_err(|e| RunError::Failed(e.to_string()))?;
        write_new_private(&path, &format!("{token}\n"))
            .map_err(|e| RunError::Failed(format!("{}: {e}", path.display())))?;
        eprintln!(
            "{:>12} the administrator's API token is in {} (read it, then delete the file)",
            "Admin",
            path.display()
        );
    }
    Ok(())
}

/// Creates `path` (it must not exist) readable only by the platform.
fn write_new_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

/// The data API's listener: 127.0.0.1 only, since sites are let through
/// to it by address translation to exactly that address.
fn bind_data_api(listen: &str) -> Result<std::net::TcpListener, RunError> {
    let addr: std::net::SocketAddrV4 = listen.parse().map_err(|_| {
        RunError::Input(format!(
            "the data API's address {listen:?} is not IPv4 ADDRESS:PORT ([api] data_listen, COMMONS_DATA_LISTEN)"
        ))
    })?;
    if *addr.ip() != std::net::Ipv4Addr::LOCALHOST {
        return Err(RunError::Input(format!(
            "the data API listens on 127.0.0.1 only, not {addr}: sites reach it through the platform's firewall ([api] data_listen)"
        )));
    }
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| RunError::Input(format!("cannot listen for the data API on {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| RunError::Failed(e.to_string()))?;
    Ok(listener)
}
