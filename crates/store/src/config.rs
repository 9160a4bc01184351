//! Which store the platform keeps its state in, as a value: resolved once
//! by whoever starts the platform (flags, environment, file) and passed to
//! everything that opens a store.

use std::path::Path;
use std::sync::Arc;

use crate::{AccountStore, PgStore, Result, SqliteStore, StateStore};

/// The environment variable naming a PostgreSQL server for the state.
pub const DATABASE_URL_VAR: &str = "COMMONS_DATABASE_URL";
/// The schema in that server (default `commons`).
pub const DATABASE_SCHEMA_VAR: &str = "COMMONS_DATABASE_SCHEMA";

/// The embedded SQLite file (the default) or a PostgreSQL server.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StoreConfig {
    #[default]
    Embedded,
    Postgres {
        /// A libpq connection string; it may hold a password.
        url: String,
        schema: String,
    },
}

// The URL may carry a password: it never reaches a log.
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreConfig::Embedded => f.write_str("Embedded"),
            StoreConfig::Postgres { schema, .. } => {
                write!(f, "Postgres {{ url: <redacted>, schema: {schema:?} }}")
            }
        }
    }
}

impl StoreConfig {
    /// PostgreSQL when `url` names a server (in `schema`, default
    /// `commons`), else the embedded store.
    pub fn new(url: Option<String>, schema: Option<String>) -> StoreConfig {
        match url.filter(|u| !u.is_empty()) {
            Some(url) => StoreConfig::Postgres {
                url,
                schema: schema
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "commons".into()),
            },
            None => StoreConfig::Embedded,
        }
    }

    /// What `COMMONS_DATABASE_URL` and `COMMONS_DATABASE_SCHEMA` say.
    pub fn from_env() -> StoreConfig {
        StoreConfig::new(
            std::env::var(DATABASE_URL_VAR).ok(),
            std::env::var(DATABASE_SCHEMA_VAR).ok(),
        )
    }

    /// The engine's state: deployments, components, runs.
    pub fn open_state(&self, embedded_file: &Path) -> Result<Arc<dyn StateStore>> {
        Ok(match self {
            StoreConfig::Embedded => Arc::new(SqliteStore::open(embedded_file)?),
            StoreConfig::Postgres { url, schema } => Arc::new(PgStore::connect(url, schema)?),
        })
    }

    /// Users, organisations and sessions (in the same database as the state).
    pub fn open_accounts(&self, embedded_file: &Path) -> Result<Arc<dyn AccountStore>> {
        Ok(match self {
            StoreConfig::Embedded => Arc::new(SqliteStore::open(embedded_file)?),
            StoreConfig::Postgres { url, schema } => Arc::new(PgStore::connect(url, schema)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_url_is_the_embedded_store_and_the_url_never_prints() {
        assert_eq!(
            StoreConfig::new(Some(String::new()), None),
            StoreConfig::Embedded
        );
        let pg = StoreConfig::new(Some("host=db password=hunter2".into()), None);
        assert_eq!(
            pg,
            StoreConfig::Postgres {
                url: "host=db password=hunter2".into(),
                schema: "commons".into()
            }
        );
        assert!(!format!("{pg:?}").contains("hunter2"));
    }
}
