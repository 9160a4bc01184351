//! How this process runs workloads, as one value: set once by whoever
//! starts the platform (`commons serve` resolves flags, environment and
//! file into it), read by the drivers. A process that sets nothing gets
//! what the environment says, read once.

use std::sync::OnceLock;

/// `COMMONS_SANDBOX=1`: workloads run as their own users, in namespaces.
pub const SANDBOX_VAR: &str = "COMMONS_SANDBOX";
/// `COMMONS_SINGLE_USER=1`: one person's platform (unsafe, explicit).
pub const SINGLE_USER_VAR: &str = "COMMONS_SINGLE_USER";

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
            .finish()
    }
}

static CURRENT: OnceLock<RuntimeSettings> = OnceLock::new();

fn yes(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1" || v == "true")
}

impl RuntimeSettings {
    /// What the environment says.
    pub fn from_env() -> RuntimeSettings {
        RuntimeSettings {
            sandboxed: yes(SANDBOX_VAR),
            single_user: yes(SINGLE_USER_VAR),
            postgres_admin_url: std::env::var(crate::drivers::postgres::ADMIN_URL_VAR)
                .ok()
                .filter(|u| !u.is_empty()),
        }
    }

    /// Makes these the settings of this process. Only the first call
    /// counts, and only before anything read them: a later one is refused
    /// (with the settings in force), so no workload runs under two policies.
    pub fn install(self) -> Result<(), RuntimeSettings> {
        CURRENT.set(self).map_err(|_| current().clone())
    }
}

/// The settings in force.
pub fn current() -> &'static RuntimeSettings {
    CURRENT.get_or_init(RuntimeSettings::from_env)
}
