//! The control plane, run by `commons serve`: the application layer
//! (`app`) and the protocols over it — the REST API (`api`), the platform's
//! own routes (`platform`), the web console, OpenID Connect, the open books
//! — served by `http`; the gateway wired to the platform (`gateway`), the
//! supervisor, and the platform built from its settings (`run`).
//!
//! Every store is the embedded one under `COMMONS_HOME` unless the settings
//! name PostgreSQL. Errors are RFC 9457 problem JSON; a secret never
//! appears in a response or a log line.

pub mod accounts;
mod acme_shared;
pub mod agents;
pub mod api;
pub mod app;
pub mod books;
pub mod catalog;
pub mod client;
pub mod config;
pub mod console;
mod console_data;
mod console_nodes;
mod console_placements;
pub mod data;
pub mod edge;
pub mod error;
pub mod feed_bus;
pub mod gateway;
pub mod hosts;
pub mod http;
mod keys;
pub mod local;
pub mod my_money;
pub mod my_usage;
pub mod nodes;
pub mod oidc;
pub mod openapi;
pub mod outbound;
pub mod periods;
pub mod placement;
pub mod platform;
pub mod routes_bus;
pub mod rs256;
mod run;
mod sankey;
pub mod schema;
pub mod statements;
pub mod stripe_api;
pub mod subscribe;
pub mod supervisor;
pub mod tokens;
pub mod tunnels;
pub mod usage_bus;
pub mod web;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use commons_ledger::billing::{default_tiers, Billing, Tier};
use commons_ledger::journal::Journal;
use commons_ledger::payments::Stripe;
use commons_meter::Meter;

pub use error::{AppError, ErrorKind};
pub use http::{limits, router, serve};
pub use run::{run, RunError};
pub use tokens::Tokens;

/// Creates a directory readable only by the platform (mode 0700).
pub use commons_runtime::layout::private_dir;

/// Late events for a period are taken this long after it ends.
pub const GRACE_MS: i64 = 3 * 86_400_000;

/// This machine's host name, as the kernel has it.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// What the handlers share. Each store is behind its own lock: SQLite
/// connections serve one caller at a time, and a request holds a lock only
/// for its own short transaction.
pub struct AppState {
    pub home: PathBuf,
    pub meter: Mutex<Meter>,
    pub journal: Mutex<Journal>,
    pub billing: Mutex<Billing>,
    pub stripe: Option<Stripe>,
    /// Stripe's API, when subscriptions go through Stripe Checkout.
    pub stripe_api: Option<stripe_api::StripeApi>,
    pub tokens: Tokens,
    pub accounts: accounts::Accounts,
    pub engine: commons_engine::Engine,
    /// The gateway's plain-HTTP address, once it listens: sites are at
    /// `http://SITE.localhost:PORT/` (the console links them).
    pub gateway_http: std::sync::OnceLock<std::net::SocketAddr>,
    /// The gateway's HTTPS address, once it listens.
    pub gateway_https: std::sync::OnceLock<std::net::SocketAddr>,
    /// The OpenID Connect provider (one login for every hosted site).
    pub oidc: oidc::Provider,
    /// Where users reach the platform (`COMMONS_PUBLIC_URL`, else the API's
    /// address): the OpenID Connect issuer.
    pub public_url: std::sync::OnceLock<String>,
    /// The last deploy the API started of each site, since this server
    /// started: what a client polls to learn when and how it ended.
    pub deploys: Mutex<std::collections::HashMap<String, app::deploys::DeployRun>>,
    /// Console users on their way to sites' hosts.
    pub sign_ins: gateway::SignIns,
    /// Sessions at sites' own hosts.
    pub site_sessions: gateway::SiteSessions,
    /// Proxies in front of the API whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The journal's public export, made once per (entries, checkpoints):
    /// anyone may download it, so it is not rebuilt for each of them.
    pub books_export: Mutex<Option<((u64, usize), axum::body::Bytes)>>,
    /// Providers' nodes: join tokens, certificates, assignments, placements.
    pub nodes: std::sync::Arc<nodes::Nodes>,
    /// Where agents join (`https://ADDR` of the agent listener), once it listens.
    pub agent_url: std::sync::OnceLock<String>,
    /// Tunnels to the nodes, through which the gateway reaches their sites.
    pub tunnels: std::sync::Arc<tunnels::Tunnels>,
    /// DataCommons: users' data, apps' declarations, grants, the feed.
    pub data: data::Data,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Open(String),
}

impl AppState {
    /// Where users reach the platform, without a trailing slash (empty
    /// before the API listens).
    pub fn public_base(&self) -> String {
        self.public_url
            .get()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_default()
    }

    /// Opens every store under `home`.
    pub fn open(
        home: &Path,
        store: &commons_store::StoreConfig,
        tiers: Option<Vec<Tier>>,
        stripe_secret: Option<String>,
    ) -> Result<AppState, ServeError> {
        let err = |what: &str, e: &dyn std::fmt::Display| ServeError::Open(format!("{what}: {e}"));
        for dir in ["meter", "ledger", "gateway", "nodes"] {
            private_dir(&home.join(dir)).map_err(|e| err(dir, &e))?;
        }
        let engine = commons_engine::Engine::open(home, store).map_err(|e| err("engine", &e))?;
        let layout = engine.layout.clone();
        // The gateway's identity key (made here the first time), as every
        // instance sharing the database holds it.
        commons_gateway::identity::Signer::open(&layout.identity_key())
            .map_err(|e| err("identity key", &e))?;
        keys::adopt_shared(&engine, "gateway-identity", &layout.identity_key())
            .map_err(|e| err("identity key", &e))?;
        let site_sessions = gateway::SiteSessions::new(&engine);
        let sign_ins = match store {
            commons_store::StoreConfig::Embedded => gateway::SignIns::default(),
            commons_store::StoreConfig::Postgres { .. } => {
                gateway::SignIns::shared(engine.shared_store())
            }
        };
        // The node CA (made here the first time), as every instance sharing
        // the database holds it: a node joins and calls any of them.
        let nodes_dir = layout.nodes_dir();
        nodes::ca::NodeCa::open(&nodes_dir).map_err(|e| err("node CA", &e))?;
        keys::adopt_shared_files(
            &engine,
            "node-ca",
            &[&nodes_dir.join("ca.key"), &nodes_dir.join("ca.pem")],
        )
        .map_err(|e| err("node CA", &e))?;
        let nodes = std::sync::Arc::new(
            nodes::Nodes::open(home, nodes::NodeSettings::default(), store)
                .map_err(|e| err("nodes", &e))?,
        );
        Ok(AppState {
            home: home.to_path_buf(),
            meter: Mutex::new(periods::meter(home, store).map_err(|e| err("meter", &e))?),
            journal: Mutex::new(periods::journal(home, store).map_err(|e| err("ledger", &e))?),
            billing: Mutex::new(
                periods::billing(home, store, tiers.unwrap_or_else(default_tiers))
                    .map_err(|e| err("billing", &e))?,
            ),
            stripe: stripe_secret.map(Stripe::new),
            stripe_api: None,
            tokens: Tokens::open(home, store, engine.shared_store())
                .map_err(|e| err("tokens", &e))?,
            accounts: accounts::Accounts::new(
                store
                    .open_accounts(&layout.state_db())
                    .map_err(|e| err("accounts", &e))?,
            ),
            trusted_proxies: Vec::new(),
            engine,
            gateway_http: std::sync::OnceLock::new(),
            gateway_https: std::sync::OnceLock::new(),
            oidc: oidc::Provider::new(layout.oidc_key()),
            public_url: std::sync::OnceLock::new(),
            deploys: Mutex::new(std::collections::HashMap::new()),
            sign_ins,
            site_sessions,
            books_export: Mutex::new(None),
            nodes: nodes.clone(),
            tunnels: tunnels::Tunnels::new(nodes),
            agent_url: std::sync::OnceLock::new(),
            data: data::Data::open(&layout, store).map_err(|e| err("datacommons", &e))?,
        })
    }
}
