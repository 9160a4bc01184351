//! Every place in the data directory (`COMMONS_HOME`): a deployment's
//! files, and the platform's own (meter, ledger, gateway, tokens, uploads,
//! the daemon's files). Nothing else joins paths under the data directory;
//! the table in ARCHITECTURE.md is this file, in prose.

use std::path::PathBuf;

/// The data directory and the places in it.
#[derive(Debug, Clone)]
pub struct Layout {
    pub home: PathBuf,
}

impl Layout {
    pub fn new(home: impl Into<PathBuf>) -> Layout {
        Layout { home: home.into() }
    }

    pub fn state_db(&self) -> PathBuf {
        self.home.join("state.db")
    }

    pub fn deployment_dir(&self, deployment: &str) -> PathBuf {
        self.home.join("deployments").join(deployment)
    }

    /// The writable directory workloads get as `COMMONS_DATA_DIR`.
    pub fn data_dir(&self, deployment: &str) -> PathBuf {
        self.deployment_dir(deployment).join("data")
    }

    pub fn volume_dir(&self, deployment: &str, component: &str) -> PathBuf {
        self.deployment_dir(deployment)
            .join("volumes")
            .join(component)
    }

    pub fn sqlite_file(&self, deployment: &str, component: &str) -> PathBuf {
        self.data_dir(deployment)
            .join(format!("{component}.sqlite3"))
    }

    pub fn log_dir(&self, deployment: &str) -> PathBuf {
        self.deployment_dir(deployment).join("logs")
    }

    pub fn log_file(&self, deployment: &str, component: &str) -> PathBuf {
        self.log_dir(deployment).join(format!("{component}.log"))
    }

    pub fn pid_file(&self, deployment: &str, component: &str) -> PathBuf {
        self.deployment_dir(deployment)
            .join("run")
            .join(format!("{component}.pid"))
    }

    /// How the component's process last ended (see [`crate::exit`]).
    pub fn exit_file(&self, deployment: &str, component: &str) -> PathBuf {
        self.deployment_dir(deployment)
            .join("run")
            .join(format!("{component}.exit"))
    }

    /// The deployment's hosting plan (free, always-on), as its operator chose.
    pub fn hosting_file(&self, deployment: &str) -> PathBuf {
        self.deployment_dir(deployment).join("hosting.json")
    }

    pub fn records_dir(&self, deployment: &str) -> PathBuf {
        self.home.join("records").join(deployment)
    }

    pub fn secrets_file(&self, deployment: &str) -> PathBuf {
        self.home.join("secrets").join(format!("{deployment}.enc"))
    }

    pub fn secrets_key(&self) -> PathBuf {
        self.home.join("secrets").join("key")
    }

    /// What the gateway routes now and how many requests each upstream has
    /// in flight (written by `commons serve`, read before stopping a
    /// replaced instance).
    pub fn gateway_state(&self) -> PathBuf {
        self.home.join("gateway").join("upstreams.json")
    }

    /// The crash loops `commons serve`'s supervisor is waiting out.
    pub fn supervisor_state(&self) -> PathBuf {
        self.home.join("supervisor.json")
    }

    pub fn lock_file(&self, deployment: &str) -> PathBuf {
        self.home.join("locks").join(format!("{deployment}.lock"))
    }

    // --- the platform's own files -------------------------------------

    /// Usage events and their aggregates.
    pub fn meter_db(&self) -> PathBuf {
        self.home.join("meter").join("meter.db")
    }

    /// The ledger's directory: journal, billing, the custodian's key.
    pub fn ledger_dir(&self) -> PathBuf {
        self.home.join("ledger")
    }

    pub fn ledger_db(&self) -> PathBuf {
        self.ledger_dir().join("ledger.db")
    }

    /// Subscriptions and the payment events handled.
    pub fn billing_db(&self) -> PathBuf {
        self.ledger_dir().join("billing.db")
    }

    /// The Ed25519 key signing the journal's checkpoints.
    pub fn custodian_key(&self) -> PathBuf {
        self.ledger_dir().join("custodian.key")
    }

    /// Allocation policy, tiers, projects, sites run elsewhere, splits.
    pub fn ledger_config(&self) -> PathBuf {
        self.ledger_dir().join("config.json")
    }

    /// The gateway's keys and state.
    pub fn gateway_dir(&self) -> PathBuf {
        self.home.join("gateway")
    }

    /// The key identity assertions are signed with.
    pub fn identity_key(&self) -> PathBuf {
        self.gateway_dir().join("identity.key")
    }

    /// The OpenID provider's RSA key.
    pub fn oidc_key(&self) -> PathBuf {
        self.gateway_dir().join("oidc-rsa.pk8")
    }

    /// The platform's own logs (`serve`'s, the gateway's access log).
    pub fn platform_logs(&self) -> PathBuf {
        self.home.join("logs")
    }

    pub fn access_log(&self) -> PathBuf {
        self.platform_logs().join("gateway-access.log")
    }

    pub fn serve_log(&self) -> PathBuf {
        self.platform_logs().join("serve.log")
    }

    /// The first administrator's token, when `serve` had no terminal.
    pub fn admin_token(&self) -> PathBuf {
        self.home.join("secrets").join("admin.token")
    }

    /// The control plane's node CA, its providers' nodes and the snapshots
    /// of sites moving between them.
    pub fn nodes_dir(&self) -> PathBuf {
        self.home.join("nodes")
    }

    /// DataCommons: users' repositories, grants, the change feed
    /// (`data.db`) and the platform key that seals users' keys.
    pub fn datacommons_dir(&self) -> PathBuf {
        self.home.join("datacommons")
    }

    /// This machine as a provider's node: its identity, its key and
    /// certificate, the reports of the operations it ran.
    pub fn agent_dir(&self) -> PathBuf {
        self.home.join("agent")
    }

    /// The platform's own API tokens (hashes and scopes).
    pub fn tokens_file(&self) -> PathBuf {
        self.home.join("tokens.json")
    }

    /// A blueprint and its files sent through the API for site `name`.
    pub fn upload_dir(&self, name: &str) -> PathBuf {
        self.home.join("uploads").join(name)
    }

    /// Domains the administrator verified: host → organisation.
    pub fn domains_file(&self) -> PathBuf {
        self.home.join("domains.json")
    }

    /// Where a catalog entry's blueprint is written.
    pub fn catalog_dir(&self, name: &str) -> PathBuf {
        self.home.join("catalog").join(name)
    }

    /// Backups, named by the hash of their content.
    pub fn archive_dir(&self) -> PathBuf {
        self.home.join("archive")
    }

    /// The platform `commons login` signed in to.
    pub fn remote_file(&self) -> PathBuf {
        self.home.join("remote.json")
    }

    /// The running daemon: pid and addresses.
    pub fn daemon_file(&self) -> PathBuf {
        self.home.join("daemon.json")
    }

    /// The daemon's local API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.home.join("api.sock")
    }
}

/// Files written whole and directories made private: see `commons_files`.
pub use commons_files::{private_dir, write_durable, write_whole};
