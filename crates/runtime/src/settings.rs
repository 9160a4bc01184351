//! How this process runs workloads, as one value: set once by whoever
//! starts the platform (`commons serve` resolves flags, environment and
//! file into it), read by the drivers. A process that sets nothing gets
//! what the environment says, read once.

use std::sync::OnceLock;

/// `COMMONS_SANDBOX=1`: workloads run as their own users, in namespaces.
pub const SANDBOX_VAR: &str = "COMMONS_SANDBOX";
/// `COMMONS_SINGLE_USER=1`: one person's platform (unsafe, explicit).
pub const SINGLE_USER_VAR: &str = "COMMONS_SINGLE_USER";
/// `COMMONS_DATA_LISTEN`: where the platform serves apps' data API.
pub const DATA_LISTEN_VAR: &str = "COMMONS_DATA_LISTEN";
/// ... by default.
pub const DEFAULT_DATA_LISTEN: &str = "127.0.0.1:8072";

#[derive(Clone, Default, PartialEq, Eq)]
pub struct RuntimeSettings {
    /// Workloads are sandboxed: each deployment its own uid, namespaces,
    /// cgroup limits.
    pub sandboxed: bool,
    /// One person's platform: sites from the API and the console may run
    /// unsandboxed, as the platform's own user.
    pub single_user: bool,
    /// An administrator's connection to the PostgreSQL server that
    /// `postgres` components get their databases on (`COMMONS_POSTGRES_URL`).
    pub postgres_admin_url: Option<String>,
    /// What `postgres` components' database and role names begin with
    /// (`[runtime] postgres_prefix`, `COMMONS_POSTGRES_PREFIX`; empty: `c`):
    /// several nodes or platforms sharing one server each take their own.
    pub postgres_prefix: String,
    /// The block sandboxed sites' links are numbered from (`[runtime]
    /// network`, `COMMONS_SITES_NETWORK`).
    pub network: crate::net::Network,
    /// Registries (`HOST:PORT`) images are pulled from over plain HTTP
    /// (`[runtime] insecure_registries`, `COMMONS_INSECURE_REGISTRIES`,
    /// comma-separated): one on the platform's own loopback or network.
    pub insecure_registries: Vec<String>,
    /// Registries pulled through a mirror: (registry, mirror `HOST:PORT`)
    /// (`[runtime] registry_mirrors`, `COMMONS_REGISTRY_MIRRORS`:
    /// `docker.io=HOST:PORT,…`).
    pub registry_mirrors: Vec<(String, String)>,
    /// Where the platform serves apps' data API (`commons serve` sets it
    /// once it listens): sites with a `data:` section are told of it and,
    /// sandboxed, reach it at their host address.
    pub data_api: Option<std::net::SocketAddrV4>,
}

// The admin URL may carry a password: it never reaches a log.
impl std::fmt::Debug for RuntimeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeSettings")
            .field("sandboxed", &self.sandboxed)
            .field("single_user", &self.single_user)
            .field(
                "postgres_admin_url",
                &self.postgres_admin_url.as_ref().map(|_| "<redacted>"),
            )
            .field("postgres_prefix", &self.postgres_prefix)
            .field("network", &self.network)
            .field("insecure_registries", &self.insecure_registries)
            .field("registry_mirrors", &self.registry_mirrors)
            .field("data_api", &self.data_api)
            .finish()
    }
}

static CURRENT: OnceLock<RuntimeSettings> = OnceLock::new();

fn yes(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1" || v == "true")
}

/// Whether this process runs as root: then workloads are sandboxed unless
/// the operator says otherwise.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `COMMONS_INSECURE_REGISTRIES`: registries spoken to over plain HTTP.
pub const INSECURE_REGISTRIES_VAR: &str = "COMMONS_INSECURE_REGISTRIES";

/// `COMMONS_REGISTRY_MIRRORS`: `REGISTRY=MIRROR,…`.
pub const REGISTRY_MIRRORS_VAR: &str = "COMMONS_REGISTRY_MIRRORS";

/// `REGISTRY=MIRROR,…` as pairs; an entry without `=` is an error.
pub fn mirrors(text: &str) -> Result<Vec<(String, String)>, String> {
    list(text)
        .into_iter()
        .map(|entry| match entry.split_once('=') {
            Some((registry, mirror))
                if !registry.trim().is_empty() && !mirror.trim().is_empty() =>
            {
                Ok((registry.trim().to_string(), mirror.trim().to_string()))
            }
            _ => Err(format!(
                "{entry:?}: say REGISTRY=MIRROR, e.g. docker.io=127.0.0.1:5000"
            )),
        })
        .collect()
}

/// A comma-separated list, without blanks.
pub fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// `COMMONS_SITES_NETWORK`: the block sites' links are numbered from.
pub const NETWORK_VAR: &str = "COMMONS_SITES_NETWORK";

impl RuntimeSettings {
    /// What the environment says.
    pub fn from_env() -> RuntimeSettings {
        RuntimeSettings {
            sandboxed: yes(SANDBOX_VAR),
            single_user: yes(SINGLE_USER_VAR),
            postgres_admin_url: std::env::var(crate::drivers::postgres::ADMIN_URL_VAR)
                .ok()
                .filter(|u| !u.is_empty()),
            // (`commons serve` refuses a malformed value at start; here one
            // is ignored, as a mirror is.)
            postgres_prefix: std::env::var(crate::drivers::postgres::PREFIX_VAR)
                .ok()
                .filter(|p| crate::drivers::postgres::valid_prefix(p))
                .unwrap_or_default(),
            network: std::env::var(NETWORK_VAR)
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or_default(),
            insecure_registries: std::env::var(INSECURE_REGISTRIES_VAR)
                .map(|v| list(&v))
                .unwrap_or_default(),
            // (`commons serve` refuses a malformed value at start.)
            registry_mirrors: std::env::var(REGISTRY_MIRRORS_VAR)
                .ok()
                .and_then(|v| mirrors(&v).ok())
                .unwrap_or_default(),
            // Where the platform serves it, for sites deployed without the
            // daemon (which knows it, having bound it).
            data_api: std::env::var(DATA_LISTEN_VAR)
                .unwrap_or_else(|_| DEFAULT_DATA_LISTEN.into())
                .parse::<std::net::SocketAddrV4>()
                .ok()
                .filter(|a| a.port() != 0),
        }
    }

    /// What the environment says, with the platform's default: secure as
    /// root (sandboxed unless `COMMONS_SANDBOX=0`). The `commons` binary
    /// runs under these; a library user opts in with `COMMONS_SANDBOX=1`.
    pub fn for_platform() -> RuntimeSettings {
        let mut s = RuntimeSettings::from_env();
        if std::env::var_os(SANDBOX_VAR).is_none() {
            s.sandboxed = is_root();
        }
        s
    }

    /// Makes these the settings of this process. Only the first call
    /// counts, and only before anything read them: a later one is refused
    /// (with the settings in force), so no workload runs under two policies.
    pub fn install(self) -> Result<(), RuntimeSettings> {
        CURRENT.set(self).map_err(|_| current().clone())
    }
}

impl RuntimeSettings {
    /// The host's rules for sites' networks under these settings.
    pub fn firewall(&self) -> crate::net::Firewall {
        crate::net::Firewall {
            network: self.network,
            resolvers: crate::net::Firewall::host_resolvers(),
        }
    }

    /// The platform's PostgreSQL server, as the host's firewall sends
    /// sites to it: at an IPv4 address (or `localhost`), over TCP.
    pub fn postgres_server(&self) -> Option<std::net::SocketAddrV4> {
        let url = self.postgres_admin_url.as_deref()?;
        let config: tokio_postgres::Config = url.parse().ok()?;
        let host = config.get_hosts().iter().find_map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
            #[allow(unreachable_patterns)]
            _ => None,
        })?;
        let ip: std::net::Ipv4Addr = match host.as_str() {
            "localhost" => std::net::Ipv4Addr::LOCALHOST,
            h => h.parse().ok()?,
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        Some(std::net::SocketAddrV4::new(ip, port))
    }
}

/// The settings in force.
pub fn current() -> &'static RuntimeSettings {
    CURRENT.get_or_init(RuntimeSettings::from_env)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mirrors_are_registry_equals_mirror() {
        assert_eq!(
            super::mirrors("docker.io=127.0.0.1:5000, ghcr.io = m.internal:443").unwrap(),
            [
                ("docker.io".to_string(), "127.0.0.1:5000".to_string()),
                ("ghcr.io".to_string(), "m.internal:443".to_string())
            ]
        );
        let e = super::mirrors("docker.io").unwrap_err();
        assert!(e.contains("REGISTRY=MIRROR"), "{e}");
        assert!(super::mirrors("=x").is_err());
    }
}
