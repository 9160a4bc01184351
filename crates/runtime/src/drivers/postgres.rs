//! `postgres: {}`: a database and a role of its own on the platform's
//! PostgreSQL server (`COMMONS_POSTGRES_URL`, an administrator's connection).
//!
//! Names are derived from the deployment and component; the role's password
//! is derived by the engine from the platform's secret key and handed over
//! in [`Spec::credential`], so nothing needs storing. Other roles lose the
//! right to connect to the database. `destroy` drops both.

use tokio_postgres::{Config, NoTls};

use crate::{Applied, BoxFuture, Driver, DriverError, Handle, Layout, Observed, Spec};

/// The platform's administrator connection.
pub const ADMIN_URL_VAR: &str = "COMMONS_POSTGRES_URL";
/// What stands for the password wherever a URL is recorded or shown.
pub const MASK: &str = "[sensitive]";

pub struct PostgresDriver;

/// What database and role names begin with, when not `c`.
pub const PREFIX_VAR: &str = "COMMONS_POSTGRES_PREFIX";

/// A prefix of database names: 1 to 16 lowercase letters and digits,
/// starting with a letter.
pub fn valid_prefix(prefix: &str) -> bool {
    (1..=16).contains(&prefix.len())
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The database and role name of a component: the prefix (`c` unless set),
/// `_`, deployment, `_`, component, lowercased, at most 63 characters.
pub fn name(deployment: &str, component: &str) -> String {
    let prefix = match crate::settings::current().postgres_prefix.as_str() {
        "" => "c",
        p => p,
    };
    let raw: String = format!("{prefix}_{deployment}_{component}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if raw.len() <= 63 {
        return raw;
    }
    // Too long: keep a prefix and make it unique with a hash of the whole.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in raw.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{}_{h:016x}", &raw[..46])
}

fn admin() -> Result<(Config, String), DriverError> {
    let url = crate::settings::current().postgres_admin_url.clone().ok_or_else(|| {
        DriverError::Failed(format!(
            "postgres components need the platform's PostgreSQL server: set {ADMIN_URL_VAR} to an administrator's connection, \
             e.g. \"host=127.0.0.1 user=postgres\""
        ))
    })?;
    let config: Config = url.parse().map_err(|e| {
        DriverError::Failed(format!(
            "{ADMIN_URL_VAR} is not a PostgreSQL connection string: {e}"
        ))
    })?;
    Ok((config, url))
}

/// The URL an app connects with; `password` may be [`MASK`]. A sandboxed
/// site reaches the server at its link's host address (see [`crate::net`]).
fn app_url(
    config: &Config,
    site: Option<&crate::net::SiteNet>,
    db: &str,
    password: &str,
) -> String {
    let host = site
        .map(|n| n.host_ip.to_string())
        .or_else(|| {
            config.get_hosts().iter().find_map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
                #[allow(unreachable_patterns)]
                _ => None,
            })
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = match site {
        Some(_) => crate::net::SITE_POSTGRES_PORT,
        None => config.get_ports().first().copied().unwrap_or(5432),
    };
    format!("postgres://{db}:{password}@{host}:{port}/{db}")
}

async fn connect(config: &Config) -> Result<tokio_postgres::Client, DriverError> {
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        DriverError::Failed(format!(
            "cannot reach the platform's PostgreSQL server: {e}"
        ))
    })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The site's network, when workloads are sandboxed.
fn site_net(layout: &Layout, deployment: &str) -> Result<Option<crate::net::SiteNet>, DriverError> {
    if !crate::sandbox::enabled() {
        return Ok(None);
    }
    crate::net::site_net(&layout.home, deployment)
        .map(Some)
        .map_err(DriverError::io("numbering the site's network"))
}

fn failed(what: &str) -> impl FnOnce(tokio_postgres::Error) -> DriverError + '_ {
    move |e| DriverError::Failed(format!("{what}: {e}"))
}

impl Driver for PostgresDriver {
    fn planned_outputs(
        &self,
        layout: &Layout,
        spec: &Spec,
        _: Option<&Handle>,
    ) -> Vec<(String, Option<String>)> {
        // Names are derived and the password is masked, so the URL is known in advance.
        let site = site_net(layout, &spec.deployment).ok().flatten();
        let url = admin().ok().map(|(config, _)| {
            app_url(
                &config,
                site.as_ref(),
                &name(&spec.deployment, &spec.component),
                MASK,
            )
        });
        vec![("url".into(), url)]
    }

    fn apply<'a>(
        &'a self,
        layout: &'a Layout,
        spec: &'a Spec,
        _: Option<&'a Handle>,
    ) -> BoxFuture<'a, Result<Applied, DriverError>> {
        Box::pin(async move {
            let (config, _) = admin()?;
            // A sandboxed site reaches the server through its own link, once
            // it has a database there: the only site traffic the host takes.
            let site = site_net(layout, &spec.deployment)?;
            if let Some(net) = &site {
                crate::net::site_network(&layout.home, &spec.deployment, spec.egress)
                    .map_err(DriverError::io("making the site's network"))?;
                let server = crate::settings::current().postgres_server().ok_or_else(|| {
                    DriverError::Failed(format!(
                        "sandboxed sites reach the platform's PostgreSQL server over TCP at an IPv4 address: \
                         give {ADMIN_URL_VAR} a host such as 127.0.0.1 or localhost"
                    ))
                })?;
                crate::net::grant_postgres(
                    &layout.home,
                    &spec.deployment,
                    &spec.component,
                    net,
                    server,
                )
                .map_err(DriverError::io("opening the way to PostgreSQL"))?;
            }
            let password = spec.credential.as_deref().ok_or_else(|| {
                DriverError::Failed("no credential was derived for this database".into())
            })?;
            // Names are [a-z0-9_]; the password is hexadecimal: both safe to quote as is.
            debug_assert!(password.chars().all(|c| c.is_ascii_hexdigit()));
            let db = name(&spec.deployment, &spec.component);
            let client = connect(&config).await?;
            let role_exists = !client
                .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&db])
                .await
                .map_err(failed("looking up the role"))?
                .is_empty();
            let verb = if role_exists { "ALTER" } else { "CREATE" };
            client
                .batch_execute(&format!("{verb} ROLE \"{db}\" LOGIN PASSWORD '{password}'"))
                .await
                .map_err(failed("creating the role"))?;
            let db_exists = !client
                .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
                .await
                .map_err(failed("looking up the database"))?
                .is_empty();
            if !db_exists {
                client
                    .batch_execute(&format!("CREATE DATABASE \"{db}\" OWNER \"{db}\""))
                    .await
                    .map_err(failed("creating the database"))?;
            }
            // Only its own role (and the platform) may connect.
            client
                .batch_execute(&format!("REVOKE CONNECT ON DATABASE \"{db}\" FROM PUBLIC; GRANT CONNECT ON DATABASE \"{db}\" TO \"{db}\""))
                .await
                .map_err(failed("restricting the database"))?;
            Ok(Applied {
                handle: Handle::default(),
                outputs: [(
                    "url".to_string(),
                    app_url(&config, site.as_ref(), &db, password),
                )]
                .into_iter()
                .collect(),
                retired: None,
            })
        })
    }

    fn remove<'a>(
        &'a self,
        layout: &'a Layout,
        deployment: &'a str,
        component: &'a str,
        _: &'a Handle,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let (config, _) = admin()?;
            if let Ok(Some(net)) = site_net(layout, deployment) {
                let _ = crate::net::revoke_postgres(&layout.home, deployment, component, &net);
            }
            let db = name(deployment, component);
            let client = connect(&config).await?;
            // A replication slot (a move following the database) would
            // keep the database from being dropped.
            client
                .batch_execute(&format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{db}'"))
                .await
                .map_err(failed("dropping the database's replication slots"))?;
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                .await
                .map_err(failed("dropping the database"))?;
            client
                .batch_execute(&format!("DROP ROLE IF EXISTS \"{db}\""))
                .await
                .map_err(failed("dropping the role"))?;
            Ok(())
        })
    }

    fn observe(&self, _: &Handle) -> Observed {
        Observed::Present
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_lowercase_names() {
        for good in ["c", "acme", "node7", "abcdefghijklmnop"] {
            assert!(valid_prefix(good), "{good}");
        }
        for bad in [
            "",
            "7up",
            "Acme",
            "a-b",
            "a_b",
            "abcdefghijklmnopq",
            "a;drop",
        ] {
            assert!(!valid_prefix(bad), "{bad}");
        }
        // Unset, names begin as they always did.
        assert_eq!(name("wiki", "db"), "c_wiki_db");
    }
}
