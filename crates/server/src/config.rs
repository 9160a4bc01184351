//! `commons serve`'s configuration file: TOML, `COMMONS_HOME/commons.toml`
//! unless `--config FILE` names another. A flag beats its environment
//! variable, which beats the file, which beats the built-in default.
//!
//! ```toml
//! [api]
//! listen = "127.0.0.1:8070"
//! trusted_proxies = ["10.0.0.2"]  # whose X-Forwarded-For names the client
//! data_listen = "127.0.0.1:8072"   # the data API apps call (loopback; sites reach it through the firewall)
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
//! sandbox = true          # the default as root; false runs sites unisolated (warned)
//! network = "10.200.0.0/14"  # sandboxed sites' links: a /30 each
//! insecure_registries = ["127.0.0.1:5000"]  # image registries over plain HTTP
//! registry_mirrors = { "docker.io" = "127.0.0.1:5000" }  # pull through a mirror
//! single_user = false     # true: a developer's own platform, unsandboxed (unsafe)
//! idle_after_seconds = 900
//! sample_seconds = 60
//! postgres_url = "host=127.0.0.1 user=commons"
//! postgres_prefix = "c"   # sites' database names begin c_; one per platform or node sharing a server
//! [store]
//! database_url = "host=127.0.0.1 user=commons dbname=commons"
//! [bus]
//! nats_url = "nats://127.0.0.1:4222"   # every recorded change relayed to JetStream
//! name = "commons"        # streams NAME_…, subjects name.…; one per platform sharing a server
//! [payments]
//! stripe_webhook_secret = "whsec_..."
//! stripe_secret_key = "sk_live_..."   # subscribe through Stripe Checkout
//! stripe_api_base = "https://api.stripe.com"
//! stripe_prices = { member = "price_...", patron = "price_..." }
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use commons_gateway::acme::Challenge;
use commons_runtime::RuntimeSettings;
use commons_store::StoreConfig;
use serde::Deserialize;

use crate::gateway::{AcmeSettings, GatewaySettings};

pub const FILE_NAME: &str = "commons.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub api: Api,
    pub gateway: Gateway,
    pub acme: Acme,
    pub runtime: Runtime,
    pub store: Store,
    pub bus: Bus,
    pub payments: Payments,
    pub agents: Agents,
}

/// The event bus of a scaled-out platform.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Bus {
    /// A NATS server with JetStream; the state's changes are relayed there.
    pub nats_url: Option<String>,
    /// The platform's name on that server (`commons` when unset).
    pub name: Option<String>,
}

/// Where providers' node agents reach the control plane.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Agents {
    /// The agent listener's address (TLS, the node CA's); unset: off.
    pub listen: Option<String>,
    pub certificate_lifetime_seconds: Option<u64>,
    pub heartbeat_seconds: Option<u64>,
    pub lost_after_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Api {
    pub listen: Option<String>,
    /// Where apps' data API listens (`COMMONS_DATA_LISTEN`).
    pub data_listen: Option<String>,
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
    /// The block sandboxed sites' links are numbered from.
    pub network: Option<String>,
    /// Registries images are pulled from over plain HTTP.
    pub insecure_registries: Option<Vec<String>>,
    /// Registries pulled through a mirror: registry → mirror `HOST:PORT`.
    pub registry_mirrors: Option<std::collections::BTreeMap<String, String>>,
    /// One person's platform: sites from the API run unsandboxed (unsafe).
    pub single_user: Option<bool>,
    pub idle_after_seconds: Option<u64>,
    pub sample_seconds: Option<u64>,
    pub postgres_url: Option<String>,
    /// What sites' database and role names begin with (default `c`).
    pub postgres_prefix: Option<String>,
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
    pub stripe_secret_key: Option<String>,
    pub stripe_api_base: Option<String>,
    /// Each paid tier's Stripe price id.
    pub stripe_prices: Option<std::collections::BTreeMap<String, String>>,
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
            || self.payments.stripe_secret_key.is_some()
    }
}

/// What the command line says: flags, or the environment variables named
/// beside them in `commons serve --help` (the CLI reads those).
#[derive(Debug, Default, Clone)]
pub struct ServeFlags {
    pub listen: Option<String>,
    pub http: Option<String>,
    pub https: Option<String>,
    pub admin: Option<String>,
    pub gateway_threads: Option<usize>,
    pub acme_directory: Option<String>,
    pub acme_root: Option<PathBuf>,
    pub acme_email: Option<String>,
    pub acme_challenge: Option<String>,
    pub single_user: bool,
}

/// Everything `commons serve` runs with, resolved once: flags beat the
/// environment, which beats the file, which beats the defaults. The parts
/// of the platform get these as values and read no environment.
pub struct Settings {
    pub home: PathBuf,
    /// The API's address.
    pub listen: String,
    /// The data API's own listener, for apps: on loopback, serving the
    /// data API and nothing else, so the path sandboxed sites are given to
    /// it leads nowhere else.
    pub data_listen: String,
    /// Where users reach the platform (`COMMONS_PUBLIC_URL`); unset: the
    /// API's own address.
    pub public_url: Option<String>,
    /// Proxies in front of the API whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    pub gateway: GatewaySettings,
    pub runtime: RuntimeSettings,
    pub store: StoreConfig,
    /// The NATS server the state's changes are relayed to
    /// (`COMMONS_NATS_URL`, `[bus] nats_url`) under the platform's name
    /// there (`COMMONS_BUS_NAME`, `[bus] name`); none: they stay in the
    /// store's outbox.
    pub bus: Option<commons_bus::RelayConfig>,
    pub stripe_webhook_secret: Option<String>,
    /// Stripe's API, when the platform takes subscriptions through Stripe
    /// Checkout (`COMMONS_STRIPE_SECRET_KEY`).
    pub stripe_api: Option<crate::stripe_api::StripeSettings>,
    pub supervisor: SupervisorSettings,
    /// The agent listener's address (`[agents] listen`,
    /// `COMMONS_AGENT_LISTEN`); none: nodes cannot join.
    pub agent_listen: Option<String>,
    pub nodes: crate::nodes::NodeSettings,
}

/// What the supervisor does beside restarting workloads.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// How often the sampler meters what workloads use.
    pub sample_every: Duration,
    /// Free-hosted sites with no request for this long are stopped.
    pub idle_after: Option<Duration>,
}

impl Default for SupervisorSettings {
    fn default() -> SupervisorSettings {
        SupervisorSettings {
            sample_every: Duration::from_secs(60),
            idle_after: None,
        }
    }
}

/// Resolves flags, the environment (`env` looks a variable up) and the file
/// into [`Settings`]. A value that does not parse is an error naming where
/// it came from.
pub fn resolve(
    home: &Path,
    flags: ServeFlags,
    file: ServeConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, String> {
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    let switch = |var: &str, file: Option<bool>| -> Result<bool, String> {
        match env(var).as_deref() {
            Some("1" | "true") => Ok(true),
            Some("0" | "false") => Ok(false),
            Some(other) => Err(format!("{var}={other}: say 1 or 0")),
            None => Ok(file.unwrap_or(false)),
        }
    };
    let seconds = |var: &str, file: Option<u64>| -> Result<Option<Duration>, String> {
        match env(var) {
            Some(v) => v
                .parse()
                .map(|s| Some(Duration::from_secs(s)))
                .map_err(|_| format!("{var}={v}: say a whole number of seconds")),
            None => Ok(file.map(Duration::from_secs)),
        }
    };
    let trusted_proxies = match env("COMMONS_TRUSTED_PROXIES") {
        Some(list) => list.split(',').map(str::to_string).collect(),
        None => file.api.trusted_proxies.unwrap_or_default(),
    }
    .iter()
    .map(|a| a.trim())
    .filter(|a| !a.is_empty())
    .map(|a| {
        a.parse()
            .map_err(|_| format!("trusted proxy \"{a}\" is not an IP address"))
    })
    .collect::<Result<Vec<IpAddr>, String>>()?;
    let challenge: Challenge = flags
        .acme_challenge
        .or(file.acme.challenge)
        .as_deref()
        .map(str::parse)
        .transpose()?
        .unwrap_or_default();
    let off = |a: String| (a != "off").then_some(a);
    let gateway = GatewaySettings {
        http: flags
            .http
            .or(file.gateway.http)
            .unwrap_or_else(|| "127.0.0.1:8080".into()),
        https: off(flags
            .https
            .or(file.gateway.https)
            .unwrap_or_else(|| "127.0.0.1:8443".into())),
        admin: off(flags
            .admin
            .or(file.gateway.admin)
            .unwrap_or_else(|| "127.0.0.1:8071".into())),
        threads: flags.gateway_threads.or(file.gateway.threads).unwrap_or(2),
        acme: flags
            .acme_directory
            .or(file.acme.directory)
            .map(|directory| AcmeSettings {
                directory,
                root: flags.acme_root.or(file.acme.root),
                contact: flags.acme_email.or(file.acme.email),
                challenge,
            }),
        config: commons_gateway::Config {
            node: crate::host_name().unwrap_or_else(|| "local".into()),
            ..Default::default()
        },
    };
    let sample_every = seconds("COMMONS_SAMPLE_SECONDS", file.runtime.sample_seconds)?
        .unwrap_or(SupervisorSettings::default().sample_every);
    Ok(Settings {
        home: home.to_path_buf(),
        listen: flags
            .listen
            .or(file.api.listen)
            .unwrap_or_else(|| "127.0.0.1:8070".into()),
        data_listen: env(commons_runtime::settings::DATA_LISTEN_VAR)
            .or(file.api.data_listen)
            .unwrap_or_else(|| commons_runtime::settings::DEFAULT_DATA_LISTEN.into()),
        public_url: env("COMMONS_PUBLIC_URL"),
        trusted_proxies,
        gateway,
        runtime: RuntimeSettings {
            // Secure by default: as root, sandboxed unless turned off.
            sandboxed: switch(
                commons_runtime::settings::SANDBOX_VAR,
                file.runtime
                    .sandbox
                    .or(Some(commons_runtime::settings::is_root())),
            )?,
            single_user: flags.single_user
                || switch(
                    commons_runtime::settings::SINGLE_USER_VAR,
                    file.runtime.single_user,
                )?,
            postgres_admin_url: env(commons_runtime::drivers::postgres::ADMIN_URL_VAR)
                .or(file.runtime.postgres_url),
            postgres_prefix: match env(commons_runtime::drivers::postgres::PREFIX_VAR)
                .or(file.runtime.postgres_prefix)
            {
                Some(p) if !commons_runtime::drivers::postgres::valid_prefix(&p) => {
                    return Err(format!(
                        "[runtime] postgres_prefix: \"{p}\" is not a prefix: use 1 to 16 lowercase letters and digits, starting with a letter"
                    ))
                }
                p => p.unwrap_or_default(),
            },
            network: match env(commons_runtime::settings::NETWORK_VAR).or(file.runtime.network) {
                Some(n) => n.parse().map_err(|e| format!("[runtime] network: {e}"))?,
                None => Default::default(),
            },
            insecure_registries: match env(commons_runtime::settings::INSECURE_REGISTRIES_VAR) {
                Some(v) => commons_runtime::settings::list(&v),
                None => file.runtime.insecure_registries.unwrap_or_default(),
            },
            registry_mirrors: match env(commons_runtime::settings::REGISTRY_MIRRORS_VAR) {
                Some(v) => commons_runtime::settings::mirrors(&v).map_err(|e| {
                    format!("{}: {e}", commons_runtime::settings::REGISTRY_MIRRORS_VAR)
                })?,
                None => file
                    .runtime
                    .registry_mirrors
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            },
            // Set by `run` once the data API listens.
            data_api: None,
        },
        store: StoreConfig::new(
            env(commons_store::DATABASE_URL_VAR).or(file.store.database_url),
            env(commons_store::DATABASE_SCHEMA_VAR),
        ),
        bus: match (
            env("COMMONS_NATS_URL").or(file.bus.nats_url),
            env("COMMONS_BUS_NAME").or(file.bus.name),
        ) {
            (_, Some(name)) if !commons_bus::valid_name(&name) => {
                return Err(format!(
                    "[bus] name: \"{name}\" is not a name: use 1 to 32 lowercase letters, digits and _, starting with a letter"
                ))
            }
            (Some(url), name) => Some(commons_bus::RelayConfig::new(
                &url,
                name.as_deref().unwrap_or(commons_bus::DEFAULT_NAME),
            )),
            (None, _) => None,
        },
        stripe_webhook_secret: env("COMMONS_STRIPE_WEBHOOK_SECRET")
            .or(file.payments.stripe_webhook_secret),
        stripe_api: stripe_settings(
            &env,
            file.payments.stripe_secret_key,
            file.payments.stripe_api_base,
            file.payments.stripe_prices,
        )?,
        supervisor: SupervisorSettings {
            sample_every,
            idle_after: seconds("COMMONS_IDLE_AFTER", file.runtime.idle_after_seconds)?,
        },
        agent_listen: env("COMMONS_AGENT_LISTEN").or(file.agents.listen),
        nodes: {
            let d = crate::nodes::NodeSettings::default();
            crate::nodes::NodeSettings {
                certificate_lifetime: seconds(
                    "COMMONS_NODE_CERTIFICATE_SECONDS",
                    file.agents.certificate_lifetime_seconds,
                )?
                .unwrap_or(d.certificate_lifetime)
                .max(Duration::from_secs(3)),
                heartbeat: seconds(
                    "COMMONS_NODE_HEARTBEAT_SECONDS",
                    file.agents.heartbeat_seconds,
                )?
                .unwrap_or(d.heartbeat)
                .max(Duration::from_secs(1)),
                lost_after: seconds(
                    "COMMONS_NODE_LOST_AFTER_SECONDS",
                    file.agents.lost_after_seconds,
                )?
                .unwrap_or(d.lost_after)
                .max(Duration::from_secs(2)),
            }
        },
    })
}

/// Stripe's API settings, if a secret key is given: the API base must be
/// HTTPS (the key travels in every request) unless it is on this machine.
fn stripe_settings(
    env: &dyn Fn(&str) -> Option<String>,
    file_key: Option<String>,
    file_base: Option<String>,
    file_prices: Option<std::collections::BTreeMap<String, String>>,
) -> Result<Option<crate::stripe_api::StripeSettings>, String> {
    let Some(secret_key) = env("COMMONS_STRIPE_SECRET_KEY").or(file_key) else {
        return Ok(None);
    };
    let api_base = env("COMMONS_STRIPE_API_BASE")
        .or(file_base)
        .unwrap_or_else(|| "https://api.stripe.com".into());
    let loopback = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"]
        .iter()
        .any(|p| api_base.starts_with(p));
    if !api_base.starts_with("https://") && !loopback {
        return Err(format!(
            "COMMONS_STRIPE_API_BASE is \"{api_base}\": the secret key goes with every request, \
             so give an https:// URL (plain http only on 127.0.0.1)"
        ));
    }
    let prices = match env("COMMONS_STRIPE_PRICES") {
        Some(list) => list
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((tier, price)) if !tier.trim().is_empty() && !price.trim().is_empty() => {
                    Ok((tier.trim().to_string(), price.trim().to_string()))
                }
                _ => Err(format!(
                    "COMMONS_STRIPE_PRICES has \"{pair}\"; write TIER=PRICE_ID pairs separated by commas \
                     (member=price_123,patron=price_456)"
                )),
            })
            .collect::<Result<_, _>>()?,
        None => file_prices.unwrap_or_default(),
    };
    Ok(Some(crate::stripe_api::StripeSettings {
        secret_key,
        api_base,
        prices,
    }))
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
        assert!(c.api.listen.is_none() && c.runtime.sandbox.is_none());
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
        assert_eq!(c.runtime.idle_after_seconds, Some(600));
        std::fs::write(d.join(FILE_NAME), "[gateway]\nhttp = \"x\"\nhtps = \"y\"\n").unwrap();
        let e = load(&d, None).unwrap_err();
        assert!(e.contains("commons.toml:3:1:"), "{e}");
        assert!(e.contains("unknown field `htps`"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let file: ServeConfig = toml::from_str(
            "[api]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0.2\"]\n\
             [runtime]\nsandbox = true\nidle_after_seconds = 600\n\
             [payments]\nstripe_webhook_secret = \"whsec_file\"\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "COMMONS_SANDBOX" => Some("0".to_string()),
            "COMMONS_STRIPE_WEBHOOK_SECRET" => Some("whsec_env".to_string()),
            _ => None,
        };
        let flags = ServeFlags {
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let s = resolve(Path::new("/h"), flags, file, &env).unwrap();
        assert_eq!(s.listen, "127.0.0.1:2", "the flag beats the file");
        assert!(
            !s.runtime.sandboxed,
            "COMMONS_SANDBOX=0 beats sandbox = true"
        );
        assert_eq!(s.stripe_webhook_secret.as_deref(), Some("whsec_env"));
        assert_eq!(
            s.trusted_proxies,
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(s.supervisor.idle_after, Some(Duration::from_secs(600)));
        assert_eq!(s.gateway.http, "127.0.0.1:8080", "the default");
        assert_eq!(s.store, StoreConfig::Embedded);
    }

    #[test]
    fn a_value_that_does_not_parse_says_where_it_came_from() {
        let bad = |var: &'static str, value: &'static str| {
            let env = move |k: &str| (k == var).then(|| value.to_string());
            resolve(
                Path::new("/h"),
                ServeFlags::default(),
                ServeConfig::default(),
                &env,
            )
            .err()
            .unwrap_or_default()
        };
        assert!(bad("COMMONS_SANDBOX", "yes").contains("COMMONS_SANDBOX=yes"));
        assert!(bad("COMMONS_IDLE_AFTER", "soon").contains("COMMONS_IDLE_AFTER=soon"));
        assert!(bad("COMMONS_TRUSTED_PROXIES", "10.0.0.1,proxy").contains("\"proxy\""));
        assert!(bad("COMMONS_BUS_NAME", "Two.Words").contains("[bus] name: \"Two.Words\""));
    }

    #[test]
    fn stripe_needs_https_and_prices_as_pairs() {
        let with = |vars: Vec<(&'static str, &'static str)>| {
            let env = |k: &str| {
                vars.iter()
                    .find(|(var, _)| *var == k)
                    .map(|(_, v)| v.to_string())
            };
            resolve(
                Path::new("/h"),
                ServeFlags::default(),
                ServeConfig::default(),
                &env,
            )
        };
        let key = ("COMMONS_STRIPE_SECRET_KEY", "sk_test_1");
        let s = with(vec![
            key,
            ("COMMONS_STRIPE_PRICES", "member=price_a, patron=price_b"),
        ])
        .unwrap();
        let stripe = s.stripe_api.unwrap();
        assert_eq!(stripe.api_base, "https://api.stripe.com");
        assert_eq!(stripe.prices["patron"], "price_b");
        // The key never shows in a debug print.
        assert!(!format!("{stripe:?}").contains("sk_test_1"));
        // No key, no Stripe.
        assert!(with(vec![]).unwrap().stripe_api.is_none());
        // The key would travel in the clear to another machine.
        let e = with(vec![
            key,
            ("COMMONS_STRIPE_API_BASE", "http://stripe.example.org"),
        ])
        .err()
        .unwrap_or_default();
        assert!(e.contains("https://"), "{e}");
        assert!(with(vec![key, ("COMMONS_STRIPE_API_BASE", "http://127.0.0.1:9")]).is_ok());
        let e = with(vec![key, ("COMMONS_STRIPE_PRICES", "member:price_a")])
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("COMMONS_STRIPE_PRICES") && e.contains("TIER=PRICE_ID"),
            "{e}"
        );
    }
}
