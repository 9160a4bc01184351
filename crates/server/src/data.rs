//! DataCommons wired to the platform: the service opened in the data
//! directory, each site's `data:` declaration registered at the revision it
//! is deployed at, the identity of an app's caller, and data usage carried
//! to the meter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use commons_data::service::{
    AppDecl, Class, CollectionDecl, DataCommons, DataError, UsageEvent, UsageSink,
};
use commons_gateway::identity;

use crate::error::{AppError, ErrorKind};

/// How many feed events are kept for replay.
pub const FEED_WINDOW: i64 = 100_000;

/// Data reads and writes waiting to be metered.
#[derive(Default)]
pub struct DataUsage(Mutex<Vec<UsageEvent>>);

impl UsageSink for DataUsage {
    fn record(&self, event: UsageEvent) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}

/// DataCommons as the platform runs it.
pub struct Data {
    pub commons: DataCommons,
    usage: Arc<DataUsage>,
    /// The platform's identity key, to check the assertions apps pass on.
    identity: identity::Signer,
    /// Each site's registered (state revision seen, record revision).
    registered: Mutex<HashMap<String, (i64, String)>>,
    boot_ms: i64,
    sequence: std::sync::atomic::AtomicU64,
}

impl Data {
    /// Opens DataCommons: its key in the data directory, its tables beside
    /// the platform's state (SQLite in the directory, or a schema of their
    /// own, `<schema>_data`, on the PostgreSQL server).
    pub fn open(
        layout: &commons_runtime::Layout,
        store: &commons_store::StoreConfig,
    ) -> Result<Data, String> {
        let dir = layout.datacommons_dir();
        crate::private_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let usage = Arc::new(DataUsage::default());
        let backend = match store {
            commons_store::StoreConfig::Embedded => commons_data::db::Backend::Embedded,
            commons_store::StoreConfig::Postgres { url, schema } => {
                commons_data::db::Backend::Postgres {
                    url: url.clone(),
                    schema: format!("{schema}_data"),
                }
            }
        };
        let commons = DataCommons::open_on(&backend, &dir, usage.clone(), FEED_WINDOW)
            .map_err(|e| e.to_string())?;
        let identity = identity::Signer::open(&layout.identity_key()).map_err(|e| e.to_string())?;
        Ok(Data {
            commons,
            usage,
            identity,
            registered: Mutex::new(HashMap::new()),
            boot_ms: commons_clock::now_ms(),
            sequence: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The user an identity assertion names, if it was issued for `site`
    /// and is still valid: an assertion a user's browser carried to one
    /// site cannot be replayed by another.
    pub fn user_of(&self, assertion: &str, site: &str) -> Result<String, AppError> {
        let claims = self
            .identity
            .verify(assertion, commons_clock::now_secs())
            .map_err(|e| {
                AppError::new(
                    ErrorKind::Unauthenticated,
                    "Bad identity assertion",
                    format!("X-Commons-Identity: {e}; pass on the assertion the gateway gave this request"),
                )
            })?;
        if claims.aud != site {
            return Err(AppError::new(
                ErrorKind::Forbidden,
                "Assertion for another site",
                format!(
                    "the assertion was issued for {}, not {site}: a site acts only for users who came to it",
                    claims.aud
                ),
            ));
        }
        Ok(claims.sub)
    }

    /// Registers `site`'s `data:` declaration at its current deployment
    /// record, once per change of the platform's state.
    pub fn ensure_app(&self, engine: &commons_engine::Engine, site: &str) -> Result<(), AppError> {
        let state_rev = engine.store().revision().unwrap_or(-1);
        if let Some((seen, _)) = self
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(site)
        {
            if *seen == state_rev {
                return Ok(());
            }
        }
        let internal = |e: String| AppError::new(ErrorKind::Internal, "Data declaration", e);
        let status = engine
            .status(site)
            .map_err(|e| AppError::new(ErrorKind::NotFound, "No such site", e.to_string()))?;
        let revision = engine
            .history(site)
            .map_err(|e| internal(e.to_string()))?
            .last()
            .map(|r| r.commit.clone())
            .unwrap_or_default();
        let blueprint = commons_blueprint::load(
            std::path::Path::new(&status.blueprint),
            &commons_blueprint::FileSystem,
        )
        .map_err(|d| internal(format!("the blueprint of {site} no longer loads: {d}")))?;
        let decl = AppDecl {
            app: site.to_owned(),
            revision: revision.clone(),
            collections: blueprint
                .data
                .iter()
                .map(|(nsid, c)| CollectionDecl {
                    nsid: nsid.clone(),
                    class: match c.class {
                        commons_blueprint::DataClass::Public => Class::Public,
                        commons_blueprint::DataClass::Personal => Class::Personal,
                        commons_blueprint::DataClass::Private => Class::Private,
                    },
                    licence: c.licence.clone(),
                    schema: c.schema.clone(),
                    purpose: c.purpose.clone(),
                    read: c.access.read,
                    write: c.access.write,
                    fields: c.fields.clone(),
                    indexed: c.index.clone(),
                })
                .collect(),
        };
        self.commons.register_app(&decl).map_err(|e| {
            let mut e = to_app_error(e);
            e.detail = format!("the data: section of {site}: {}", e.detail);
            e
        })?;
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(site.to_owned(), (state_rev, revision));
        Ok(())
    }

    /// The metered data usage since the last call, as usage events (one per
    /// user, site, collection and action, with a count and bytes).
    pub fn take_usage(&self) -> Vec<commons_meter::Event> {
        let pending = std::mem::take(&mut *self.usage.0.lock().unwrap_or_else(|p| p.into_inner()));
        let mut folded: HashMap<(String, String, String, &'static str), (u64, u64)> =
            HashMap::new();
        for e in pending {
            let entry = folded
                .entry((e.user, e.app, e.collection, e.action))
                .or_default();
            entry.0 += 1;
            entry.1 += e.bytes;
        }
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        folded
            .into_iter()
            .map(|((user, site, collection, action), (count, bytes))| {
                let n = self
                    .sequence
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut data = serde_json::Map::new();
                data.insert("user".into(), user.into());
                data.insert("site".into(), site.into());
                data.insert("collection".into(), collection.into());
                data.insert("action".into(), action.into());
                data.insert("count".into(), count.into());
                data.insert("bytes".into(), bytes.into());
                commons_meter::Event {
                    specversion: "1.0".into(),
                    id: format!("data-{}-{n}", self.boot_ms),
                    source: "commons/data".into(),
                    kind: "data".into(),
                    subject: None,
                    time: time.clone(),
                    data,
                }
            })
            .collect()
    }
}

/// The platform's error for a refused data operation.
pub fn to_app_error(e: DataError) -> AppError {
    let (kind, title) = match &e {
        DataError::UnknownCollection(_) => (ErrorKind::NotFound, "Unknown collection"),
        DataError::Forbidden(_) => (ErrorKind::Forbidden, "Not granted"),
        DataError::NotFound(_) => (ErrorKind::NotFound, "No such record"),
        DataError::Conflict(_) => (ErrorKind::Conflict, "Already exists"),
        DataError::Invalid { .. } => (ErrorKind::Invalid, "Invalid record"),
        DataError::TooLarge { .. } => (ErrorKind::TooLarge, "Record too large"),
        DataError::Erased(_) => (ErrorKind::NotFound, "Erased"),
        DataError::Feed(_) => (ErrorKind::Malformed, "Bad cursor"),
        DataError::Internal(_) => (ErrorKind::Internal, "Data store failed"),
    };
    AppError::new(kind, title, e.to_string())
}
