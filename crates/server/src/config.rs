//! `commons serve`'s configuration file: TOML, `COMMONS_HOME/commons.toml`
//! unless `--config FILE` names another. A flag beats its environment
//! variable, which beats the file, which beats the built-in default.
//!
//! ```toml
//! [api]
//! listen = "127.0.0.1:8070"
//! trusted_proxies = ["10.0.0.2"]  # whose X-Forwarded-For names the client
//! [gateway]
//! http = "127.0.0.1:8080"
//! https = "127.0.0.1:8443"      # "off" to disable
//! admin = "127.0.0.1:8071"
//! threads = 2
//! [acme]
//! directory = "https://acme-v02.api.letsencrypt.org/directory"
//! email = "ops@example.org"
//! challenge = "http-01"        # or "tls-alpn-01" when port 80 is closed
//! [runtime]
//! sandbox = true
//! single_user = false     # true: a developer's own platform, unsandboxed (unsafe)
//! idle_after_seconds = 900
//! sample_seconds = 60
//! postgres_url = "host=127.0.0.1 user=commons"
//! [store]
//! database_url = "host=127.0.0.1 user=commons dbname=commons"
//! [payments]
//! stripe_webhook_secret = "whsec_..."
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const FILE_NAME: &str = "commons.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub api: Api,
    pub gateway: Gateway,
    pub acme: Acme,
    pub runtime: Runtime,
    pub store: Store,
    pub payments: Payments,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Api {
    pub listen: Option<String>,
    /// Proxies in front of the API whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gateway {
    pub http: Option<String>,
    pub https: Option<String>,
    pub admin: Option<String>,
    pub threads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Acme {
    pub directory: Option<String>,
    pub root: Option<PathBuf>,
    pub email: Option<String>,
    /// http-01 or tls-alpn-01.
    pub challenge: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Runtime {
    pub sandbox: Option<bool>,
    /// One person's platform: sites from the API run unsandboxed (unsafe).
    pub single_user: Option<bool>,
    pub idle_after_seconds: Option<u64>,
    pub sample_seconds: Option<u64>,
    pub postgres_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Store {
    pub database_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Payments {
    pub stripe_webhook_secret: Option<String>,
}

/// Reads the configuration: `path` when given (it must exist), else
/// `home/commons.toml` when it exists, else the defaults. Errors name the
/// file, line and column.
pub fn load(home: &Path, path: Option<&Path>) -> Result<ServeConfig, String> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (home.join(FILE_NAME), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(ServeConfig::default())
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let config: ServeConfig = toml::from_str(&text).map_err(|e| located(&path, &text, &e))?;
    if config.holds_credentials() && readable_by_others(&path) {
        eprintln!(
            "warning: {} holds credentials and other users can read it; `chmod 600` it",
            path.display()
        );
    }
    Ok(config)
}

/// "FILE:LINE:COL: what is wrong" from a TOML error.
fn located(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let (line, col) = e
        .span()
        .map(|s| {
            let before = &text[..s.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            (line, col)
        })
        .unwrap_or((1, 1));
    format!("{}:{line}:{col}: {}", path.display(), e.message())
}

fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

impl ServeConfig {
    fn holds_credentials(&self) -> bool {
        self.runtime.postgres_url.is_some()
            || self.store.database_url.is_some()
            || self.payments.stripe_webhook_secret.is_some()
    }

    /// Settings read from the environment by the parts of the platform,
    /// as the file gives them: each applies where the environment does not
    /// already set it.
    pub fn environment(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut put = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                out.push((k, v));
            }
        };
        put(
            "COMMONS_SANDBOX",
            self.runtime
                .sandbox
                .map(|b| if b { "1" } else { "0" }.into()),
        );
        put(
            "COMMONS_TRUSTED_PROXIES",
            self.api.trusted_proxies.as_ref().map(|p| p.join(",")),
        );
        put(
            "COMMONS_SINGLE_USER",
            self.runtime
                .single_user
                .map(|b| if b { "1" } else { "0" }.into()),
        );
        put(
            "COMMONS_IDLE_AFTER",
            self.runtime.idle_after_seconds.map(|s| s.to_string()),
        );
        put(
            "COMMONS_SAMPLE_SECONDS",
            self.runtime.sample_seconds.map(|s| s.to_string()),
        );
        put("COMMONS_POSTGRES_URL", self.runtime.postgres_url.clone());
        put("COMMONS_DATABASE_URL", self.store.database_url.clone());
        put(
            "COMMONS_STRIPE_WEBHOOK_SECRET",
            self.payments.stripe_webhook_secret.clone(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("commons-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_missing_default_file_is_the_defaults_and_a_named_one_must_exist() {
        let d = dir("missing");
        let c = load(&d, None).unwrap();
        assert!(c.api.listen.is_none() && c.environment().is_empty());
        let e = load(&d, Some(&d.join("nope.toml"))).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn settings_are_read_and_mistakes_located() {
        let d = dir("read");
        std::fs::write(
            d.join(FILE_NAME),
            "[gateway]\nhttp = \"127.0.0.1:9080\"\nthreads = 1\n[runtime]\nidle_after_seconds = 600\n",
        )
        .unwrap();
        let c = load(&d, None).unwrap();
        assert_eq!(c.gateway.http.as_deref(), Some("127.0.0.1:9080"));
        assert_eq!(c.gateway.threads, Some(1));
        assert_eq!(
            c.environment(),
            vec![("COMMONS_IDLE_AFTER", "600".to_string())]
        );
        std::fs::write(d.join(FILE_NAME), "[gateway]\nhttp = \"x\"\nhtps = \"y\"\n").unwrap();
        let e = load(&d, None).unwrap_err();
        assert!(e.contains("commons.toml:3:1:"), "{e}");
        assert!(e.contains("unknown field `htps`"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
