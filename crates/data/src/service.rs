//! DataCommons as a service: the rules between apps, users and their data.
//!
//! - An **app** (a deployment) declares the collections it reads and writes,
//!   each with one sharing class, a schema and a purpose
//!   ([`DataCommons::register_app`]).
//! - A **user** consents per (app, collection, action); without a grant an
//!   app gets [`DataError::Forbidden`] and sees no feed events.
//! - Every write is validated against its Lexicon schema, sealed under the
//!   user's data key when its class is encrypted, committed to the user's
//!   repository with a signed commit, recorded with its provenance, put on
//!   the change feed and metered; every read is metered and logged.
//! - A user can see, export and erase everything held about them.
//!
//! One mutex guards the state: writes are serialised per platform, which
//! keeps the feed's order total and each commit atomic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::db::Db;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::db;
use crate::feed::{
    self, AccountEvent, CommitEvent, Event, FeedError, FeedOp, Info, Message, Start,
};
use crate::keys::{Algorithm, Keypair};
use crate::lexicon::Catalog;
use crate::model::{self, Cid, Ipld};
use crate::mst::{NodeStore, Tree};
use crate::repo::{Repo, RepoError, Write};
use crate::seal::{self, Key};
use crate::syntax::{self, TidClock};

/// Largest record, encoded, in bytes.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;
/// Most records one list or query returns.
pub const MAX_PAGE: usize = 1000;

/// Largest blob of a collection of `class`: media in public and personal
/// collections, smaller attachments in private ones.
pub fn max_blob_bytes(class: Class) -> usize {
    match class {
        Class::Public | Class::Personal => 10 << 20,
        Class::Private => 2 << 20,
    }
}

/// The sharing class of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Plaintext, signed, readable by anyone, under a licence.
    Public,
    /// Encrypted; the owner chooses which people and apps may read.
    Personal,
    /// Encrypted; an app sees only the fields its schema declares.
    Private,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Personal => "personal",
            Self::Private => "private",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "public" => Some(Self::Public),
            "personal" => Some(Self::Personal),
            "private" => Some(Self::Private),
            _ => None,
        }
    }

    pub fn encrypted(self) -> bool {
        self != Self::Public
    }
}

/// One collection an app declares.
#[derive(Debug, Clone)]
pub struct CollectionDecl {
    pub nsid: String,
    pub class: Class,
    /// SPDX id; required for public collections.
    pub licence: Option<String>,
    /// The Lexicon document of the collection.
    pub schema: Value,
    pub purpose: String,
    pub read: bool,
    pub write: bool,
    /// Private collections: the fields this app reads (default: all the
    /// schema declares).
    pub fields: Option<Vec<String>>,
    /// Fields to index for equality queries.
    pub indexed: Vec<String>,
}

/// What an app (a deployment at a blueprint revision) declares.
#[derive(Debug, Clone)]
pub struct AppDecl {
    pub app: String,
    pub revision: String,
    pub collections: Vec<CollectionDecl>,
}

/// An app acting for a signed-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCall {
    pub app: String,
    pub user: String,
}

/// Who a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Grantee {
    App(String),
    Person(String),
}

impl Grantee {
    pub fn key(&self) -> String {
        match self {
            Self::App(a) => format!("app:{a}"),
            Self::Person(p) => format!("user:{p}"),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.split_once(':') {
            Some(("app", a)) if !a.is_empty() => Some(Self::App(a.into())),
            Some(("user", u)) if !u.is_empty() => Some(Self::Person(u.into())),
            _ => None,
        }
    }
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Read,
    Write,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            _ => None,
        }
    }
}

/// One read or write, for the meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageEvent {
    pub user: String,
    pub app: String,
    pub collection: String,
    pub action: &'static str,
    pub bytes: u64,
}

/// Where usage goes (the platform's meter).
pub trait UsageSink: Send + Sync {
    fn record(&self, event: UsageEvent);
}

/// A sink that drops usage (tools and tests that do not meter).
pub struct NoUsage;

impl UsageSink for NoUsage {
    fn record(&self, _: UsageEvent) {}
}

/// Why a data operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataError {
    #[error("no app declared the collection {0:?}; declare it in a blueprint's data: section")]
    UnknownCollection(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} was not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("it is {size} bytes; at most {limit} are allowed")]
    TooLarge { size: usize, limit: usize },
    #[error("the account {0} was erased")]
    Erased(String),
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error("the data store failed: {0}")]
    Internal(String),
}

impl DataError {
    /// The HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownCollection(_) | Self::NotFound(_) => 404,
            Self::Forbidden(_) => 403,
            Self::Conflict(_) => 409,
            Self::Invalid { .. } => 422,
            Self::TooLarge { .. } => 413,
            Self::Erased(_) => 410,
            Self::Feed(_) => 400,
            Self::Internal(_) => 500,
        }
    }

    fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl From<db::DbError> for DataError {
    fn from(e: db::DbError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<RepoError> for DataError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Exists(p) => Self::Conflict(p),
            RepoError::NotFound(p) => Self::NotFound(p),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::mst::TreeError> for DataError {
    fn from(e: crate::mst::TreeError) -> Self {
        Self::Internal(e.to_string())
    }
}

#[derive(Debug, Clone)]
struct CollectionInfo {
    class: Class,
    licence: Option<String>,
    /// The fields the schema declares (what a private class may release).
    declared: Vec<String>,
    indexed: Vec<String>,
}

#[derive(Debug, Clone)]
struct AppUse {
    revision: String,
    read: bool,
    write: bool,
    fields: Option<Vec<String>>,
    purpose: String,
}

struct Account {
    did: String,
    signing: Keypair,
    data_key: Key,
    repo: Repo,
}

struct State {
    conn: Db,
    platform: Key,
    accounts: HashMap<String, Account>,
    collections: HashMap<String, CollectionInfo>,
    catalog: Catalog,
    apps: HashMap<(String, String), AppUse>,
    grants: HashSet<(String, String, String, Action)>,
    pending_access: HashMap<(String, String, String, &'static str), (i64, i64)>,
    events_since_prune: usize,
}

/// Hears each committed feed event's sequence number.
type Relay = Arc<dyn Fn(i64) + Send + Sync>;

struct Shared {
    state: Mutex<State>,
    clock: TidClock,
    feed: broadcast::Sender<Arc<Event>>,
    /// Told each committed event's sequence number, for other instances
    /// sharing the database (`relay_commits`).
    relay: std::sync::RwLock<Option<Relay>>,
    usage: Arc<dyn UsageSink>,
    window: i64,
    dir: PathBuf,
}

/// The DataCommons service. Cheap to clone.
#[derive(Clone)]
pub struct DataCommons {
    shared: Arc<Shared>,
}

/// A record as an app or its owner sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordView {
    pub uri: String,
    pub cid: String,
    pub collection: String,
    pub rkey: String,
    pub class: Class,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
    pub value: Value,
    pub provenance: Provenance,
}

/// Who wrote a record: the deployment, its blueprint revision, the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Provenance {
    pub app: String,
    pub revision: String,
    pub user: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Where a write landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteResult {
    pub uri: String,
    pub cid: String,
    pub rev: String,
    pub commit: String,
}

/// A page of records and the cursor for the next.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    pub records: Vec<RecordView>,
    pub cursor: Option<String>,
}

/// One grant as the console lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantView {
    pub grantee: String,
    pub collection: String,
    pub action: Action,
    pub granted_ms: i64,
}

/// What an app asks for on its consent screen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    pub collection: String,
    pub class: Class,
    pub licence: Option<String>,
    pub actions: Vec<Action>,
    pub fields: Vec<String>,
    pub purpose: String,
    pub revision: String,
}

/// A fork between two users' repositories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForkView {
    /// Who forked.
    pub fork_user: String,
    /// Whose repository was forked.
    pub source: String,
    pub created_ms: i64,
}

/// What importing a repository file did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepoImported {
    /// The file's commit (or bare tree root), as the imported records'
    /// provenance names it.
    pub source: String,
    /// Records created or updated, by collection.
    pub collections: std::collections::BTreeMap<String, usize>,
    /// The user's repository after the import: its commit and revision.
    pub commit: String,
    pub rev: String,
}

/// One write of a batch ([`DataCommons::apply_writes`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WriteOp {
    pub collection: String,
    /// The record's key; a create without one gets a TID.
    #[serde(default)]
    pub rkey: Option<String>,
    /// The record (a create or an update); none deletes.
    #[serde(default)]
    pub value: Option<Value>,
    /// A new record (refused if the key exists) rather than an update.
    #[serde(default)]
    pub create: bool,
}

/// A write as the service takes it, borrowed from the caller.
struct WriteRef<'a> {
    collection: &'a str,
    rkey: Option<&'a str>,
    value: Option<&'a Value>,
    create: bool,
}

/// The most writes one batch commits (atproto's `applyWrites` takes 200).
pub const MAX_BATCH: usize = 200;

/// What erase did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Erased {
    pub did: String,
    pub records: usize,
    pub public_deleted: usize,
}

/// One change to a repository as the service records it.
struct Change {
    path: String,
    /// The record's block (sealed for encrypted classes); `None` deletes.
    block: Option<Vec<u8>>,
    create: bool,
    class: Class,
    /// Provenance: the app and blueprint revision that wrote it.
    app: String,
    revision: String,
    /// Whose data key seals the block, when not the repository owner's
    /// (a fork's copy stays sealed under its origin's key).
    sealed_by: Option<String>,
    /// Indexed fields, already blinded for encrypted classes.
    indexed: Vec<(String, String)>,
}

/// What one commit of changes made.
struct Landed {
    did: String,
    rev: String,
    commit: Cid,
    cids: Vec<Option<Cid>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64),
    )
    .to_string()
}

impl DataCommons {
    /// Opens the data directory (`data.db` and `platform.key` in `dir`).
    /// `window` is how many feed events are kept for replay.
    pub fn open(dir: &Path, usage: Arc<dyn UsageSink>, window: i64) -> Result<Self, DataError> {
        Self::open_on(&db::Backend::Embedded, dir, usage, window)
    }

    /// Opens DataCommons with its tables on `backend`; the platform key
    /// stays in `dir` either way, so a database dump alone opens nothing.
    pub fn open_on(
        backend: &db::Backend,
        dir: &Path,
        usage: Arc<dyn UsageSink>,
        window: i64,
    ) -> Result<Self, DataError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| DataError::Internal(format!("{}: {e}", dir.display())))?;
        let platform = Key::platform(&dir.join("platform.key"))
            .map_err(|e| DataError::Internal(e.to_string()))?;
        let mut conn = db::open(backend, dir)?;
        // Instances sharing a database must share the key its accounts are
        // sealed with: one with another key would make accounts it cannot
        // open and fail on everyone else's.
        const CHECK: &[u8] = b"datacommons platform key";
        let kept = db::key_check(&mut conn, &platform.seal(CHECK, b"key-check"))?;
        if platform.open(&kept, b"key-check").ok().as_deref() != Some(CHECK) {
            return Err(DataError::Internal(format!(
                "{} is not the key this database's accounts are sealed with: every instance \
                 sharing the database needs the same file (copy it from the instance that made it)",
                dir.join("platform.key").display()
            )));
        }
        let mut catalog = Catalog::new();
        let mut collections = HashMap::new();
        for (nsid, class, licence, schema, indexed) in db::collections(&mut conn)? {
            let schema: Value =
                serde_json::from_str(&schema).map_err(|e| DataError::Internal(e.to_string()))?;
            let declared = declared_fields(&schema);
            catalog
                .add(schema)
                .map_err(|e| DataError::Internal(format!("stored schema {nsid}: {e}")))?;
            collections.insert(
                nsid,
                CollectionInfo {
                    class: Class::parse(&class).unwrap_or(Class::Private),
                    licence,
                    declared,
                    indexed: serde_json::from_str(&indexed).unwrap_or_default(),
                },
            );
        }
        let mut apps = HashMap::new();
        for (app, revision, nsid, read, write, fields, purpose) in db::app_collections(&mut conn)? {
            apps.insert(
                (app, nsid),
                AppUse {
                    revision,
                    read,
                    write,
                    fields: fields.and_then(|f| serde_json::from_str(&f).ok()),
                    purpose,
                },
            );
        }
        let grants = db::all_grants(&mut conn)?
            .into_iter()
            .filter_map(|(u, g, c, a, _)| Some((u, g, c, Action::parse(&a)?)))
            .collect();
        let (feed, _) = broadcast::channel(8192);
        Ok(Self {
            shared: Arc::new(Shared {
                relay: std::sync::RwLock::new(None),
                state: Mutex::new(State {
                    conn,
                    platform,
                    accounts: HashMap::new(),
                    collections,
                    catalog,
                    apps,
                    grants,
                    pending_access: HashMap::new(),
                    events_since_prune: 0,
                }),
                clock: TidClock::new(0),
                feed,
                usage,
                window: window.max(1),
                dir: dir.to_owned(),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Records what an app declares. A collection's schema may only grow
    /// (see [`crate::lexicon::check_compatible`]); its class and licence
    /// are fixed by whoever declared it first.
    pub fn register_app(&self, decl: &AppDecl) -> Result<(), DataError> {
        let mut state = self.state();
        for c in &decl.collections {
            let at = |field: &str| format!("data.{}.{field}", c.nsid);
            syntax::nsid(&c.nsid).map_err(|e| DataError::invalid(at("nsid"), e.to_string()))?;
            if c.schema.get("id").and_then(Value::as_str) != Some(c.nsid.as_str()) {
                return Err(DataError::invalid(
                    at("schema"),
                    format!("the schema's id must be {:?}", c.nsid),
                ));
            }
            if c.class == Class::Public && c.licence.is_none() {
                return Err(DataError::invalid(
                    at("licence"),
                    "a public collection needs a licence (an SPDX id such as CC-BY-4.0)",
                ));
            }
            if let Some(existing) = state.collections.get(&c.nsid) {
                if existing.class != c.class {
                    return Err(DataError::invalid(
                        at("class"),
                        format!(
                            "the collection is {}; a class never changes (use a new NSID)",
                            existing.class.name()
                        ),
                    ));
                }
            }
            let mut catalog = state.catalog.clone();
            catalog.add(c.schema.clone()).map_err(|e| {
                DataError::invalid(format!("{}.{}", at("schema"), e.path), e.message)
            })?;
            let declared = declared_fields(&c.schema);
            for f in c.indexed.iter().chain(c.fields.iter().flatten()) {
                if !declared.contains(f) {
                    return Err(DataError::invalid(
                        at("fields"),
                        format!("{f:?} is not a field of the schema"),
                    ));
                }
            }
            db::save_collection(
                &mut state.conn,
                &c.nsid,
                c.class.name(),
                c.licence.as_deref(),
                &c.schema.to_string(),
                &serde_json::to_string(&c.indexed).unwrap_or_default(),
            )?;
            db::save_app_collection(
                &mut state.conn,
                &decl.app,
                &decl.revision,
                &c.nsid,
                c.read,
                c.write,
                c.fields
                    .as_ref()
                    .map(|f| serde_json::to_string(f).unwrap_or_default())
                    .as_deref(),
                &c.purpose,
            )?;
            state.catalog = catalog;
            let licence = state
                .collections
                .get(&c.nsid)
                .and_then(|e| e.licence.clone())
                .or(c.licence.clone());
            state.collections.insert(
                c.nsid.clone(),
                CollectionInfo {
                    class: c.class,
                    licence,
                    declared,
                    indexed: c.indexed.clone(),
                },
            );
            state.apps.insert(
                (decl.app.clone(), c.nsid.clone()),
                AppUse {
                    revision: decl.revision.clone(),
                    read: c.read,
                    write: c.write,
                    fields: c.fields.clone(),
                    purpose: c.purpose.clone(),
                },
            );
        }
        Ok(())
    }

    /// Records that `app` — a client outside the platform's sites, such as
    /// an OpenID Connect application — uses `nsid` (which a site declared),
    /// to read and/or write it, and why: what a user may then grant it.
    /// What it declared before is kept (uses only grow).
    pub fn declare_use(
        &self,
        app: &str,
        nsid: &str,
        (read, write): (bool, bool),
        purpose: &str,
    ) -> Result<(), DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        if !state.collections.contains_key(nsid) {
            return Err(DataError::UnknownCollection(nsid.into()));
        }
        let (read, write) = match state.apps.get(&(app.to_owned(), nsid.to_owned())) {
            Some(u) => (u.read || read, u.write || write),
            None => (read, write),
        };
        db::save_app_collection(
            &mut state.conn,
            app,
            "client",
            nsid,
            read,
            write,
            None,
            purpose,
        )?;
        state.apps.insert(
            (app.to_owned(), nsid.to_owned()),
            AppUse {
                revision: "client".into(),
                read,
                write,
                fields: None,
                purpose: purpose.into(),
            },
        );
        Ok(())
    }

    /// The forks `user` made, and those others made of `user`'s repository.
    pub fn forks(&self, user: &str) -> Result<Vec<ForkView>, DataError> {
        let mut state = self.state();
        Ok(db::forks_of(&mut state.conn, user)?
            .into_iter()
            .map(|(fork_user, source, created_ms)| ForkView {
                fork_user,
                source,
                created_ms,
            })
            .collect())
    }

    /// Whose repository `did` is.
    pub fn owner_of_did(&self, did: &str) -> Result<Option<String>, DataError> {
        let mut state = self.state();
        Ok(db::owner_of_did(&mut state.conn, did)?)
    }

    /// A declared collection's class, if any app declared it.
    pub fn class_of(&self, nsid: &str) -> Option<Class> {
        self.state().collections.get(nsid).map(|c| c.class)
    }

    /// What `app` asks of a user: its consent screen.
    pub fn requests(&self, app: &str) -> Vec<Request> {
        let state = self.state();
        let mut out: Vec<Request> = state
            .apps
            .iter()
            .filter(|((a, _), _)| a == app)
            .filter_map(|((_, nsid), u)| {
                let c = state.collections.get(nsid)?;
                let mut actions = Vec::new();
                if u.read {
                    actions.push(Action::Read);
                }
                if u.write {
                    actions.push(Action::Write);
                }
                Some(Request {
                    collection: nsid.clone(),
                    class: c.class,
                    licence: c.licence.clone(),
                    actions,
                    fields: match c.class {
                        Class::Private => u.fields.clone().unwrap_or_else(|| c.declared.clone()),
                        _ => c.declared.clone(),
                    },
                    purpose: u.purpose.clone(),
                    revision: u.revision.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.collection.cmp(&b.collection));
        out
    }

    /// Grants `grantee` `action` on `user`'s `collection`.
    pub fn grant(
        &self,
        user: &str,
        grantee: &Grantee,
        collection: &str,
        action: Action,
    ) -> Result<(), DataError> {
        let mut state = self.state();
        if !state.collections.contains_key(collection) {
            return Err(DataError::UnknownCollection(collection.into()));
        }
        if let Grantee::App(app) = grantee {
            let declared = state
                .apps
                .get(&(app.clone(), collection.to_owned()))
                .is_some_and(|u| match action {
                    Action::Read => u.read,
                    Action::Write => u.write,
                });
            if !declared {
                return Err(DataError::Forbidden(format!(
                    "{app} did not declare that it {}s {collection}; it cannot be granted more than it asked for",
                    action.name()
                )));
            }
        }
        ensure_account(&mut state, user)?;
        db::grant(
            &mut state.conn,
            user,
            &grantee.key(),
            collection,
            action.name(),
            now_ms(),
        )?;
        state.grants.insert((
            user.to_owned(),
            grantee.key(),
            collection.to_owned(),
            action,
        ));
        Ok(())
    }

    /// Grants an app everything it asks for (the consent screen's "Allow").
    pub fn consent(&self, user: &str, app: &str) -> Result<usize, DataError> {
        let requests = self.requests(app);
        let mut n = 0;
        for r in &requests {
            for action in &r.actions {
                self.grant(user, &Grantee::App(app.into()), &r.collection, *action)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Revokes a grant; `false` if there was none.
    pub fn revoke(
        &self,
        user: &str,
        grantee: &Grantee,
        collection: &str,
        action: Action,
    ) -> Result<bool, DataError> {
        let mut state = self.state();
        let removed = db::revoke(
            &mut state.conn,
            user,
            &grantee.key(),
            collection,
            action.name(),
        )?;
        state.grants.remove(&(
            user.to_owned(),
            grantee.key(),
            collection.to_owned(),
            action,
        ));
        Ok(removed)
    }

    /// A user's grants.
    pub fn grants(&self, user: &str) -> Result<Vec<GrantView>, DataError> {
        let mut state = self.state();
        let mut out: Vec<GrantView> = db::all_grants(&mut state.conn)?
            .into_iter()
            .filter(|g| g.0 == user)
            .filter_map(|(_, grantee, collection, action, granted_ms)| {
                Some(GrantView {
                    grantee,
                    collection,
                    action: Action::parse(&action)?,
                    granted_ms,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.grantee, &a.collection).cmp(&(&b.grantee, &b.collection)));
        Ok(out)
    }

    /// Whether `grantee` holds `action` on `user`'s `collection` (one hash lookup).
    pub fn allowed(&self, user: &str, grantee: &Grantee, collection: &str, action: Action) -> bool {
        let state = self.state();
        has_grant(&state, user, &grantee.key(), collection, action)
    }

    /// Whether `user` has a repository here (erased ones included).
    pub fn has_account(&self, user: &str) -> Result<bool, DataError> {
        let mut state = self.state();
        Ok(db::account(&mut state.conn, user)?.is_some())
    }

    /// The DID of a user's repository (created on first use).
    pub fn did(&self, user: &str) -> Result<String, DataError> {
        let mut state = self.state();
        Ok(ensure_account(&mut state, user)?.did.clone())
    }

    /// Creates a record in the calling user's repository.
    pub fn create(
        &self,
        call: &AppCall,
        collection: &str,
        rkey: Option<&str>,
        value: &Value,
    ) -> Result<WriteResult, DataError> {
        let rkey = match rkey {
            Some(r) => r.to_owned(),
            None => self.shared.clock.next(),
        };
        self.write(call, collection, &rkey, Some(value), true)
    }

    /// Replaces a record in the calling user's repository.
    pub fn update(
        &self,
        call: &AppCall,
        collection: &str,
        rkey: &str,
        value: &Value,
    ) -> Result<WriteResult, DataError> {
        self.write(call, collection, rkey, Some(value), false)
    }

    /// Deletes a record from the calling user's repository.
    pub fn delete(
        &self,
        call: &AppCall,
        collection: &str,
        rkey: &str,
    ) -> Result<WriteResult, DataError> {
        self.write(call, collection, rkey, None, false)
    }

    fn write(
        &self,
        call: &AppCall,
        collection: &str,
        rkey: &str,
        value: Option<&Value>,
        create: bool,
    ) -> Result<WriteResult, DataError> {
        let op = WriteRef {
            collection,
            rkey: Some(rkey),
            value,
            create,
        };
        let mut done = self.write_all(call, &[op], false)?;
        Ok(done.remove(0))
    }

    /// Applies several writes to the calling user's repository as one
    /// signed commit (atproto's `applyWrites`): all of them or none. A
    /// refusal names the write it is about (`writes[N]`).
    pub fn apply_writes(
        &self,
        call: &AppCall,
        writes: &[WriteOp],
    ) -> Result<Vec<WriteResult>, DataError> {
        if writes.is_empty() || writes.len() > MAX_BATCH {
            return Err(DataError::invalid(
                "writes",
                format!("send 1 to {MAX_BATCH} writes, not {}", writes.len()),
            ));
        }
        let writes: Vec<WriteRef<'_>> = writes
            .iter()
            .map(|w| WriteRef {
                collection: &w.collection,
                rkey: w.rkey.as_deref(),
                value: w.value.as_ref(),
                create: w.create,
            })
            .collect();
        self.write_all(call, &writes, true)
    }

    fn write_all(
        &self,
        call: &AppCall,
        writes: &[WriteRef<'_>],
        batch: bool,
    ) -> Result<Vec<WriteResult>, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let mut changes = Vec::with_capacity(writes.len());
        let mut sizes = Vec::with_capacity(writes.len());
        for (n, w) in writes.iter().enumerate() {
            let at = |e: DataError| match e {
                DataError::Invalid { path, message } if batch => DataError::Invalid {
                    path: format!("writes[{n}].{path}"),
                    message,
                },
                other => other,
            };
            let (info, app_use) = may_write(state, call, w.collection)?;
            let rkey = match w.rkey {
                Some(r) => r.to_owned(),
                None if w.create => self.shared.clock.next(),
                None => {
                    return Err(at(DataError::invalid(
                        "rkey",
                        "an update or delete names its record",
                    )))
                }
            };
            syntax::record_key(&rkey).map_err(|e| at(DataError::invalid("rkey", e.to_string())))?;
            let (record, plain_len) = match w.value {
                Some(value) => (
                    Some(
                        model::from_json(value)
                            .map_err(|e| at(DataError::invalid(e.path, e.problem)))?,
                    ),
                    value.to_string().len(),
                ),
                None => (None, 0),
            };
            let (block, indexed) = match &record {
                Some(record) => {
                    let (block, indexed) =
                        prepare_record(state, &call.user, &info, (w.collection, &rkey), record)
                            .map_err(at)?;
                    (Some(block), indexed)
                }
                None => {
                    ensure_account(state, &call.user)?;
                    (None, Vec::new())
                }
            };
            sizes.push(plain_len as u64);
            changes.push(Change {
                path: format!("{}/{rkey}", w.collection),
                block,
                create: w.create,
                class: info.class,
                app: call.app.clone(),
                revision: app_use.revision.clone(),
                sealed_by: None,
                indexed,
            });
        }
        let paths: Vec<String> = changes.iter().map(|c| c.path.clone()).collect();
        let landed = self.commit_changes(state, &call.user, changes)?;
        for (w, bytes) in writes.iter().zip(&sizes) {
            note_access(state, &call.user, &call.app, w.collection, "write", *bytes);
        }
        drop(guard);
        for (w, bytes) in writes.iter().zip(&sizes) {
            self.shared.usage.record(UsageEvent {
                user: call.user.clone(),
                app: call.app.clone(),
                collection: w.collection.to_owned(),
                action: "write",
                bytes: *bytes,
            });
        }
        Ok(paths
            .iter()
            .zip(&landed.cids)
            .map(|(path, cid)| WriteResult {
                uri: format!("at://{}/{path}", landed.did),
                cid: op_cid_string(*cid),
                rev: landed.rev.clone(),
                commit: landed.commit.to_string(),
            })
            .collect())
    }

    /// Commits `changes` to `user`'s repository in one signed commit and
    /// one transaction: the records with their provenance and index, the
    /// new head, and the feed event, which is then broadcast.
    fn commit_changes(
        &self,
        state: &mut State,
        user: &str,
        changes: Vec<Change>,
    ) -> Result<Landed, DataError> {
        let account = ensure_account(state, user)?;
        let writes: Vec<Write> = changes
            .iter()
            .map(|c| match (&c.block, c.create) {
                (Some(record), true) => Write::Create {
                    path: c.path.clone(),
                    record: record.clone(),
                },
                (Some(record), false) => Write::Update {
                    path: c.path.clone(),
                    record: record.clone(),
                },
                (None, _) => Write::Delete {
                    path: c.path.clone(),
                },
            })
            .collect();
        let rev = self.shared.clock.next();
        let committed = account
            .repo
            .commit(&writes, &account.signing, rev.clone())?;
        let did = account.did.clone();
        let now = now_ms();
        let mut tx = state.conn.transaction()?;
        let mut ops = Vec::with_capacity(changes.len());
        for (change, op) in changes.iter().zip(&committed.ops) {
            let (collection, rkey) = change.path.split_once('/').unwrap_or_default();
            if !change.create {
                db::unindex(&mut tx, user, collection, rkey)?;
            }
            match (op.cid, &change.block) {
                (Some(cid), Some(block)) => {
                    db::upsert_record(
                        &mut tx,
                        user,
                        collection,
                        rkey,
                        (&cid, block, change.sealed_by.as_deref()),
                        &change.app,
                        &change.revision,
                        now,
                    )?;
                    for (field, value) in &change.indexed {
                        db::index_value(&mut tx, user, collection, field, value, rkey)?;
                    }
                }
                _ => db::delete_record(&mut tx, user, collection, rkey)?,
            }
            ops.push(FeedOp {
                action: op.action.into(),
                path: change.path.clone(),
                cid: op.cid.map(|c| c.to_string()),
                prev: op.prev.map(|c| c.to_string()),
                class: change.class.name().into(),
                app: change.app.clone(),
                revision: change.revision.clone(),
            });
        }
        db::set_head(&mut tx, user, &committed.cid, &committed.blocks[0].1, &rev)?;
        let car = crate::car::write(
            committed.cid,
            committed.blocks.iter().map(|(c, b)| (*c, &b[..])),
        );
        let mut event = CommitEvent {
            seq: 0,
            time: rfc3339(now),
            repo: did.clone(),
            rev: rev.clone(),
            commit: committed.cid.to_string(),
            ops,
            blocks: feed::encode_blocks(&car),
            proof: true,
            user: user.to_owned(),
        };
        event.seq = db::next_seq(&mut tx)?;
        let body = serde_json::to_vec(&Event::Commit(event.clone()))
            .map_err(|e| DataError::Internal(e.to_string()))?;
        db::insert_event(&mut tx, event.seq, user, now, &body)?;
        tx.commit()?;
        self.after_event(state, Event::Commit(event))?;
        Ok(Landed {
            did,
            rev,
            commit: committed.cid,
            cids: committed.ops.iter().map(|o| o.cid).collect(),
        })
    }

    fn after_event(&self, state: &mut State, event: Event) -> Result<(), DataError> {
        state.events_since_prune += 1;
        if state.events_since_prune >= 1024 {
            state.events_since_prune = 0;
            let (_, newest) = db::event_bounds(&mut state.conn)?;
            db::prune_events(&mut state.conn, newest - self.shared.window)?;
        }
        let seq = event.seq();
        // No receivers is fine: nobody is subscribed.
        let _ = self.shared.feed.send(Arc::new(event));
        if let Some(relay) = self
            .shared
            .relay
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            relay(seq);
        }
        Ok(())
    }

    /// Tells `relay` the sequence number of every feed event committed from
    /// now on, for instances sharing this database (the bus carries it to
    /// them; nothing of the event itself leaves the database).
    pub fn relay_commits(&self, relay: impl Fn(i64) + Send + Sync + 'static) {
        *self.shared.relay.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(relay));
    }

    /// Another instance sharing the database committed feed event `seq`:
    /// read it from there and hand it to this instance's subscribers. An
    /// event already pruned is skipped (subscriptions catch up from the
    /// database when they see a gap).
    pub fn committed_elsewhere(&self, seq: i64) -> Result<(), DataError> {
        let Some((user, body)) = db::event(&mut self.state().conn, seq)? else {
            return Ok(());
        };
        let mut event: Event =
            serde_json::from_slice(&body).map_err(|e| DataError::Internal(e.to_string()))?;
        match &mut event {
            Event::Commit(c) => c.user = user,
            Event::Account(a) => a.user = user,
        }
        let _ = self.shared.feed.send(Arc::new(event));
        Ok(())
    }

    /// Reads one record of `owner` for an app acting for `call.user`.
    pub fn get(
        &self,
        call: &AppCall,
        owner: &str,
        collection: &str,
        rkey: &str,
    ) -> Result<RecordView, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let fields = may_read(state, call, owner, collection)?;
        let view = read_record(state, owner, collection, rkey, fields.as_deref())?
            .ok_or_else(|| DataError::NotFound(format!("{collection}/{rkey}")))?;
        let bytes = view.value.to_string().len() as u64;
        self.served(guard, call, owner, collection, bytes);
        Ok(view)
    }

    /// Logs and meters a read that was served, after releasing the state.
    fn served(
        &self,
        mut guard: MutexGuard<'_, State>,
        call: &AppCall,
        owner: &str,
        collection: &str,
        bytes: u64,
    ) {
        note_access(&mut guard, owner, &call.app, collection, "read", bytes);
        drop(guard);
        self.meter_read(call, collection, bytes);
    }

    fn meter_read(&self, call: &AppCall, collection: &str, bytes: u64) {
        self.shared.usage.record(UsageEvent {
            user: call.user.clone(),
            app: call.app.clone(),
            collection: collection.into(),
            action: "read",
            bytes,
        });
    }

    /// Lists `owner`'s records of a collection in key order, after `cursor`.
    pub fn list(
        &self,
        call: &AppCall,
        owner: &str,
        collection: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let fields = may_read(state, call, owner, collection)?;
        let limit = limit.clamp(1, MAX_PAGE);
        let entries = match state.accounts.get(owner) {
            Some(a) => a.repo.list(collection, cursor, limit)?,
            None if db::account(&mut state.conn, owner)?.is_some() => ensure_account(state, owner)?
                .repo
                .list(collection, cursor, limit)?,
            None => Vec::new(),
        };
        let mut records = Vec::with_capacity(entries.len());
        for (path, _) in &entries {
            let rkey = path.split_once('/').map(|(_, r)| r).unwrap_or_default();
            if let Some(view) = read_record(state, owner, collection, rkey, fields.as_deref())? {
                records.push(view);
            }
        }
        let cursor = (entries.len() == limit)
            .then(|| records.last().map(|r| r.rkey.clone()))
            .flatten();
        let bytes: u64 = records
            .iter()
            .map(|r| r.value.to_string().len() as u64)
            .sum();
        self.served(guard, call, owner, collection, bytes);
        Ok(Page { records, cursor })
    }

    /// `owner`'s records of a collection whose indexed `field` equals `value`.
    pub fn query(
        &self,
        call: &AppCall,
        owner: &str,
        collection: &str,
        field: &str,
        value: &str,
        limit: usize,
    ) -> Result<Page, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let fields = may_read(state, call, owner, collection)?;
        let info = state
            .collections
            .get(collection)
            .cloned()
            .ok_or_else(|| DataError::UnknownCollection(collection.into()))?;
        if !info.indexed.iter().any(|f| f == field) {
            return Err(DataError::invalid(field, format!("{field:?} is not indexed in {collection}; index it in the blueprint's data: section")));
        }
        if let Some(fields) = &fields {
            if !fields.iter().any(|f| f == field) {
                return Err(DataError::Forbidden(format!(
                    "{} may not read the field {field:?}",
                    call.app
                )));
            }
        }
        let needle = if info.class.encrypted() {
            match ensure_existing_account(state, owner)? {
                Some(account) => account.data_key.blind(field, value),
                None => {
                    return Ok(Page {
                        records: Vec::new(),
                        cursor: None,
                    })
                }
            }
        } else {
            value.to_owned()
        };
        let rkeys = db::lookup(
            &mut state.conn,
            owner,
            collection,
            field,
            &needle,
            limit.clamp(1, MAX_PAGE),
        )?;
        let mut records = Vec::new();
        for rkey in rkeys {
            if let Some(view) = read_record(state, owner, collection, &rkey, fields.as_deref())? {
                records.push(view);
            }
        }
        let bytes: u64 = records
            .iter()
            .map(|r| r.value.to_string().len() as u64)
            .sum();
        self.served(guard, call, owner, collection, bytes);
        Ok(Page {
            records,
            cursor: None,
        })
    }

    /// Everything held about `user`, decrypted, with provenance (the
    /// owner's own view: "my data").
    pub fn my_records(&self, user: &str) -> Result<Vec<RecordView>, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        if ensure_existing_account(state, user)?.is_none() {
            return Ok(Vec::new());
        }
        let rows = db::records_of(&mut state.conn, user)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(view) = read_record(state, user, &row.collection, &row.rkey, None)? {
                out.push(view);
            }
        }
        Ok(out)
    }

    /// Which apps read or wrote a user's data, per day.
    pub fn access_log(&self, user: &str) -> Result<Vec<Value>, DataError> {
        let mut state = self.state();
        flush_access(&mut state)?;
        Ok(db::access_log(&mut state.conn, user)?
            .into_iter()
            .map(|(app, collection, action, day, count, bytes, last_ms)| {
                json!({"app": app, "collection": collection, "action": action,
                       "day": rfc3339(day * 86_400_000)[..10], "count": count, "bytes": bytes,
                       "last": rfc3339(last_ms)})
            })
            .collect())
    }

    /// The user's repository as a CAR (sealed records stay sealed).
    pub fn repo_car(&self, user: &str) -> Result<Vec<u8>, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let Some(account) = ensure_existing_account(state, user)? else {
            return Err(DataError::NotFound(format!("the repository of {user}")));
        };
        let Some((head, commit)) = account.repo.head().cloned() else {
            return Err(DataError::NotFound(format!(
                "a commit in the repository of {user}"
            )));
        };
        let tree = account.repo.tree();
        let nodes = account.repo.nodes().clone();
        let entries = account.repo.entries()?;
        let mut blocks: Vec<(Cid, Vec<u8>)> = vec![commit.block()];
        blocks[0].0 = head;
        for cid in tree.node_cids(&nodes)? {
            if let Some(b) = nodes.bytes(&cid) {
                blocks.push((cid, b.to_vec()));
            }
        }
        let stored: HashMap<Cid, Vec<u8>> = db::record_blocks(&mut state.conn, user)?
            .into_iter()
            .collect();
        for (path, cid) in entries {
            let bytes = stored
                .get(&cid)
                .cloned()
                .ok_or(RepoError::MissingRecord { path, cid })?;
            blocks.push((cid, bytes));
        }
        Ok(crate::car::write(
            head,
            blocks.iter().map(|(c, b)| (*c, &b[..])),
        ))
    }

    /// Subscribes to the change feed as `viewer` sees it.
    pub fn subscribe(
        &self,
        viewer: Viewer,
        cursor: Option<i64>,
    ) -> Result<Subscription, DataError> {
        // Listen first, so nothing committed after the replay is missed.
        let live = self.shared.feed.subscribe();
        let mut state = self.state();
        let (oldest, newest) = db::event_bounds(&mut state.conn)?;
        drop(state);
        let start = feed::start(cursor, oldest, newest)?;
        let (info, last, replaying) = match start {
            Start::Live => (None, newest, false),
            Start::After(c) => (None, c, true),
            Start::Outdated { oldest } => (
                Some(Info {
                    kind: "#info",
                    name: "OutdatedCursor",
                    message: format!(
                        "the cursor is older than the retained window; replaying from {oldest}"
                    ),
                }),
                oldest - 1,
                true,
            ),
        };
        Ok(Subscription {
            commons: self.clone(),
            viewer,
            live,
            last,
            replaying,
            pending: info.map(Message::Info).into_iter().collect(),
            page: std::collections::VecDeque::new(),
        })
    }

    /// What a viewer may see of an event: `None` if nothing.
    pub fn view(&self, event: &Event, viewer: &Viewer) -> Option<Arc<Event>> {
        let state = self.state();
        let Event::Commit(commit) = event else {
            return Some(Arc::new(event.clone()));
        };
        let visible: Vec<bool> = commit
            .ops
            .iter()
            .map(|op| {
                let collection = op.path.split_once('/').map(|(c, _)| c).unwrap_or_default();
                op.class == "public"
                    || match viewer {
                        Viewer::Owner(u) => *u == commit.user,
                        Viewer::App(app) => has_grant(
                            &state,
                            &commit.user,
                            &Grantee::App(app.clone()).key(),
                            collection,
                            Action::Read,
                        ),
                        Viewer::Public => false,
                    }
            })
            .collect();
        if !visible.iter().any(|v| *v) {
            return None;
        }
        if visible.iter().all(|v| *v) {
            return Some(Arc::new(event.clone()));
        }
        // Some ops hidden: drop them, their blocks and the tree proof.
        let mut out = commit.clone();
        let keep: Vec<FeedOp> = commit
            .ops
            .iter()
            .zip(&visible)
            .filter(|(_, v)| **v)
            .map(|(o, _)| o.clone())
            .collect();
        let kept_cids: HashSet<String> = keep
            .iter()
            .filter_map(|o| o.cid.clone())
            .chain([commit.commit.clone()])
            .collect();
        if let Some(car) = feed::decode_blocks(&commit.blocks) {
            if let Ok(parsed) = futures_free_read(&car) {
                let root = parsed.roots.first().copied();
                let blocks = parsed
                    .order
                    .iter()
                    .filter(|c| kept_cids.contains(&c.to_string()))
                    .map(|c| (*c, &parsed.blocks[c][..]));
                if let Some(root) = root {
                    out.blocks = feed::encode_blocks(&crate::car::write(root, blocks));
                }
            }
        }
        out.ops = keep;
        out.proof = false;
        Some(Arc::new(Event::Commit(out)))
    }

    /// Exports everything held about `user` as one tar archive: the
    /// repository (`repo.car`), every record decrypted with provenance
    /// (`records.jsonl`), grants, the access log and the user's keys
    /// (`keys.json`, so the archive can be imported elsewhere).
    pub fn export(&self, user: &str) -> Result<Vec<u8>, DataError> {
        if ensure_existing_account(&mut self.state(), user)?.is_none() {
            return Err(DataError::NotFound(format!("data of {user}")));
        }
        // A user with blobs or grants but no record yet has no commit.
        let car = match self.repo_car(user) {
            Ok(car) => car,
            Err(DataError::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        let records = self.my_records(user)?;
        let grants = self.grants(user)?;
        let access = self.access_log(user)?;
        let keys = {
            let mut guard = self.state();
            let account = ensure_existing_account(&mut guard, user)?
                .ok_or_else(|| DataError::NotFound(user.into()))?;
            json!({
                "did": account.did,
                "algorithm": account.signing.algorithm().jwt_name(),
                "signing_key": hex::encode(account.signing.to_bytes()),
                "data_key": hex::encode(account.data_key.expose()),
            })
        };
        let mut jsonl = Vec::new();
        for r in &records {
            serde_json::to_writer(&mut jsonl, r).map_err(|e| DataError::Internal(e.to_string()))?;
            jsonl.push(b'\n');
        }
        let mut access_lines = Vec::new();
        for a in &access {
            serde_json::to_writer(&mut access_lines, a)
                .map_err(|e| DataError::Internal(e.to_string()))?;
            access_lines.push(b'\n');
        }
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("repo.car", car),
            ("records.jsonl", jsonl),
            (
                "grants.json",
                serde_json::to_vec_pretty(&grants).unwrap_or_default(),
            ),
            ("access-log.jsonl", access_lines),
            (
                "keys.json",
                serde_json::to_vec_pretty(&keys).unwrap_or_default(),
            ),
        ];
        let mut files: Vec<(String, Vec<u8>)> = files
            .into_iter()
            .filter(|(n, b)| *n != "repo.car" || !b.is_empty())
            .map(|(n, b)| (n.to_owned(), b))
            .collect();
        let mut manifest = Vec::new();
        {
            let mut guard = self.state();
            let state = &mut *guard;
            let key = ensure_existing_account(state, user)?
                .ok_or_else(|| DataError::NotFound(user.into()))?
                .data_key
                .clone();
            for (cid, collection, mime, size, stored) in db::blobs_of(&mut state.conn, user)? {
                let cid = Cid::try_from(cid.as_slice())
                    .map_err(|e| DataError::Internal(e.to_string()))?;
                let class = state
                    .collections
                    .get(&collection)
                    .map_or(Class::Private, |c| c.class);
                let bytes = if class.encrypted() {
                    let plain = key
                        .open(&stored, b"blob")
                        .map_err(|e| DataError::Internal(e.to_string()))?;
                    // The sealed form too: records name a sealed blob by
                    // the ciphertext's CID, which an import must keep.
                    files.push((format!("sealed/{cid}"), stored));
                    plain
                } else {
                    stored
                };
                serde_json::to_writer(&mut manifest, &json!({"cid": cid.to_string(), "collection": collection, "mimeType": mime, "size": size, "sealed": class.encrypted()}))
                    .map_err(|e| DataError::Internal(e.to_string()))?;
                manifest.push(b'\n');
                files.push((format!("blobs/{cid}"), bytes));
            }
        }
        files.push(("blobs.jsonl".into(), manifest));
        let mut builder = tar::Builder::new(Vec::new());
        for (name, bytes) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o600);
            header.set_mtime((now_ms() / 1000) as u64);
            header.set_cksum();
            builder
                .append_data(&mut header, &name, bytes.as_slice())
                .map_err(|e| DataError::Internal(e.to_string()))?;
        }
        builder
            .into_inner()
            .map_err(|e| DataError::Internal(e.to_string()))
    }

    /// Imports the records of an AT Protocol repository file — a CAR whose
    /// root is a signed commit (its signature checked when its DID is a
    /// did:key) or a bare tree node — into `user`'s repository, as one
    /// commit signed with the user's key. Each record lands in its
    /// collection under that collection's class (sealed for encrypted
    /// ones), validated against its schema; provenance says `import` and
    /// the file's commit. A collection no app declared, or a record that
    /// breaks its schema, refuses the whole file and changes nothing.
    pub fn import_repo(&self, user: &str, bytes: &[u8]) -> Result<RepoImported, DataError> {
        let bad = |e: &dyn std::fmt::Display| DataError::invalid("car", e.to_string());
        let car = crate::car::read_sync(bytes).map_err(|e| bad(&e))?;
        let (verified, entries) = crate::repo::verify_car(&car, None).map_err(|e| bad(&e))?;
        let source = match &verified.commit {
            Some((cid, _)) => cid.to_string(),
            None => verified.data.to_string(),
        };
        let mut guard = self.state();
        let state = &mut *guard;
        let unknown: std::collections::BTreeSet<&str> = entries
            .iter()
            .filter_map(|(path, _)| path.split_once('/').map(|(c, _)| c))
            .filter(|c| !state.collections.contains_key(*c))
            .collect();
        if !unknown.is_empty() {
            return Err(DataError::UnknownCollection(
                unknown.into_iter().collect::<Vec<_>>().join(", "),
            ));
        }
        let mut changes = Vec::with_capacity(entries.len());
        let mut collections = std::collections::BTreeMap::new();
        for (path, cid) in &entries {
            let (collection, rkey) = path.split_once('/').unwrap_or_default();
            let info = state.collections[collection].clone();
            let bytes = car.blocks.get(cid).ok_or_else(|| {
                DataError::invalid(
                    path.clone(),
                    format!("the file lacks the record's block {cid}"),
                )
            })?;
            let record = model::decode(bytes)
                .map_err(|e| DataError::invalid(path.clone(), format!("not DAG-CBOR: {e}")))?;
            let (block, indexed) = prepare_record(state, user, &info, (collection, rkey), &record)
                .map_err(|e| match e {
                    DataError::Invalid {
                        path: field,
                        message,
                    } => DataError::Invalid {
                        path: format!("{path}: {field}"),
                        message,
                    },
                    other => other,
                })?;
            let repo = &ensure_account(state, user)?.repo;
            let exists = repo.tree().get(repo.nodes(), path)?.is_some();
            *collections.entry(collection.to_owned()).or_insert(0) += 1;
            changes.push(Change {
                path: path.clone(),
                block: Some(block),
                create: !exists,
                class: info.class,
                app: "import".into(),
                revision: source.clone(),
                sealed_by: None,
                indexed,
            });
        }
        if changes.is_empty() {
            return Err(DataError::invalid("car", "the repository holds no records"));
        }
        let landed = self.commit_changes(state, user, changes)?;
        Ok(RepoImported {
            source,
            collections,
            commit: landed.commit.to_string(),
            rev: landed.rev,
        })
    }

    /// Imports an archive made by [`DataCommons::export`] as `user` (who
    /// must not exist yet): the same keys, the same repository root, the
    /// same provenance. Returns the repository's root.
    pub fn import(&self, user: &str, archive: &[u8]) -> Result<String, DataError> {
        let mut files: HashMap<String, Vec<u8>> = HashMap::new();
        let mut reader = tar::Archive::new(archive);
        let bad = |m: String| DataError::invalid("archive", m);
        for entry in reader.entries().map_err(|e| bad(e.to_string()))? {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            let name = entry
                .path()
                .map_err(|e| bad(e.to_string()))?
                .to_string_lossy()
                .into_owned();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(|e| bad(e.to_string()))?;
            files.insert(name, bytes);
        }
        let need = |name: &str| {
            files
                .get(name)
                .ok_or_else(|| bad(format!("the archive has no {name}")))
        };
        let keys: Value = serde_json::from_slice(need("keys.json")?)
            .map_err(|e| bad(format!("keys.json: {e}")))?;
        let algorithm = keys["algorithm"]
            .as_str()
            .and_then(Algorithm::from_name)
            .ok_or_else(|| bad("keys.json: unknown algorithm".into()))?;
        let signing = hex::decode(keys["signing_key"].as_str().unwrap_or_default())
            .ok()
            .and_then(|b| Keypair::from_bytes(algorithm, &b).ok())
            .ok_or_else(|| bad("keys.json: bad signing_key".into()))?;
        let data_key = hex::decode(keys["data_key"].as_str().unwrap_or_default())
            .ok()
            .and_then(|b| Key::from_bytes(&b))
            .ok_or_else(|| bad("keys.json: bad data_key".into()))?;
        let car =
            crate::car::read_sync(need("repo.car")?).map_err(|e| bad(format!("repo.car: {e}")))?;
        let loaded = crate::repo::load(&car).map_err(|e| bad(format!("repo.car: {e}")))?;
        let Some((head, commit)) = loaded.commit.clone() else {
            return Err(bad("repo.car has no commit".into()));
        };
        commit
            .verify(&signing.public())
            .map_err(|e| bad(format!("repo.car: {e}")))?;
        let provenance: HashMap<String, Value> = String::from_utf8_lossy(
            files
                .get("records.jsonl")
                .map(Vec::as_slice)
                .unwrap_or_default(),
        )
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some((
                format!("{}/{}", v["collection"].as_str()?, v["rkey"].as_str()?),
                v["provenance"].clone(),
            ))
        })
        .collect();
        let mut guard = self.state();
        let state = &mut *guard;
        if db::account(&mut state.conn, user)?.is_some() {
            return Err(DataError::Conflict(format!("the account {user}")));
        }
        let did = signing.public().did_key();
        if did != commit.did {
            return Err(bad(format!(
                "repo.car is {}'s, not the key's {did}",
                commit.did
            )));
        }
        let row = db::AccountRow {
            did: did.clone(),
            algorithm: algorithm.jwt_name().into(),
            signing_key: Some(state.platform.seal(&signing.to_bytes(), user.as_bytes())),
            data_key: Some(state.platform.seal(data_key.expose(), user.as_bytes())),
            head: None,
            erased_ms: None,
        };
        let now = now_ms();
        db::insert_account(&mut state.conn, user, &row, now)?;
        let entries = loaded.tree.entries(&loaded.nodes)?;
        let mut tx = state.conn.transaction()?;
        for (path, cid) in &entries {
            let bytes = car
                .blocks
                .get(cid)
                .ok_or_else(|| bad(format!("repo.car lacks the record {path}")))?;
            let (collection, rkey) = path.split_once('/').unwrap_or_default();
            let p = provenance.get(path).cloned().unwrap_or(Value::Null);
            let created = p["created_ms"].as_i64().unwrap_or(now);
            db::upsert_record(
                &mut tx,
                user,
                collection,
                rkey,
                (cid, bytes, None),
                p["app"].as_str().unwrap_or("import"),
                p["revision"].as_str().unwrap_or(""),
                created,
            )?;
        }
        for line in String::from_utf8_lossy(
            files
                .get("blobs.jsonl")
                .map(Vec::as_slice)
                .unwrap_or_default(),
        )
        .lines()
        {
            let blob: Value =
                serde_json::from_str(line).map_err(|e| bad(format!("blobs.jsonl: {e}")))?;
            let (Some(cid), Some(collection), Some(mime)) = (
                blob["cid"].as_str(),
                blob["collection"].as_str(),
                blob["mimeType"].as_str(),
            ) else {
                return Err(bad(format!(
                    "blobs.jsonl: {line} lacks cid, collection or mimeType"
                )));
            };
            let plain = need(&format!("blobs/{cid}"))?;
            let stored = match files.get(&format!("sealed/{cid}")) {
                Some(sealed) => {
                    if data_key.open(sealed, b"blob").ok().as_deref() != Some(plain.as_slice()) {
                        return Err(bad(format!("sealed/{cid} does not open to blobs/{cid}")));
                    }
                    sealed
                }
                None => plain,
            };
            let parsed =
                model::parse_cid(cid).map_err(|e| bad(format!("blobs.jsonl: {cid}: {e}")))?;
            if model::cid_of(model::RAW, stored) != parsed {
                return Err(bad(format!("blob {cid} does not hash to its CID")));
            }
            if blob["sealed"].as_bool() == Some(true) && stored == plain {
                return Err(bad(format!("the archive lacks sealed/{cid}")));
            }
            db::put_blob(
                &mut tx,
                user,
                &parsed,
                collection,
                mime,
                plain.len(),
                stored,
                now,
            )?;
        }
        db::set_head(&mut tx, user, &head, &car.blocks[&head], &commit.rev)?;
        tx.commit()?;
        self.shared.clock.observe(&commit.rev);
        state.accounts.remove(user);
        let account = ensure_account(state, user)?;
        // Re-index from the records now that the data key is known.
        let root = account.repo.tree().root.to_string();
        drop(guard);
        self.reindex(user)?;
        Ok(root)
    }

    fn reindex(&self, user: &str) -> Result<(), DataError> {
        let records = self.my_records(user)?;
        let mut guard = self.state();
        let state = &mut *guard;
        let key = ensure_account(state, user)?.data_key.clone();
        let mut tx = state.conn.transaction()?;
        for r in &records {
            let Some(info) = state.collections.get(&r.collection) else {
                continue;
            };
            for field in &info.indexed {
                let Some(v) = r.value.get(field) else {
                    continue;
                };
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let value = if info.class.encrypted() {
                    key.blind(field, &text)
                } else {
                    text
                };
                db::index_value(&mut tx, user, &r.collection, field, &value, &r.rkey)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Erases everything held about `user`: public records get a signed
    /// deletion commit, the data key and signing key are destroyed
    /// (crypto-shredding every sealed copy), the user's earlier feed events
    /// are purged and an account event tells subscribers.
    pub fn erase(&self, user: &str) -> Result<Erased, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let Some(account) = ensure_existing_account(state, user)? else {
            return Err(DataError::NotFound(format!("the account {user}")));
        };
        let did = account.did.clone();
        let entries = account.repo.entries()?;
        let now = now_ms();
        let mut keep = Vec::new();
        let mut public_deleted = 0;
        let tx_events = {
            let deletes: Vec<Write> = entries
                .iter()
                .map(|(path, _)| Write::Delete { path: path.clone() })
                .collect();
            let mut events = Vec::new();
            if !deletes.is_empty() {
                let rev = self.shared.clock.next();
                let committed = account
                    .repo
                    .commit(&deletes, &account.signing, rev.clone())?;
                let ops: Vec<FeedOp> = committed
                    .ops
                    .iter()
                    .map(|op| {
                        let collection =
                            op.path.split_once('/').map(|(c, _)| c).unwrap_or_default();
                        let class = state
                            .collections
                            .get(collection)
                            .map_or(Class::Private, |c| c.class);
                        if class == Class::Public {
                            public_deleted += 1;
                        }
                        FeedOp {
                            action: "delete".into(),
                            path: op.path.clone(),
                            cid: None,
                            prev: None,
                            class: class.name().into(),
                            app: "commons".into(),
                            revision: String::new(),
                        }
                    })
                    .collect();
                // Only the commit: deletions carry no content, and the
                // tree proof would name the erased keys.
                let (commit_cid, commit_bytes) = (committed.cid, committed.blocks[0].1.clone());
                let car = crate::car::write(commit_cid, [(commit_cid, &commit_bytes[..])]);
                events.push(Event::Commit(CommitEvent {
                    seq: 0,
                    time: rfc3339(now),
                    repo: did.clone(),
                    rev,
                    commit: commit_cid.to_string(),
                    ops,
                    blocks: feed::encode_blocks(&car),
                    proof: false,
                    user: user.to_owned(),
                }));
            }
            events.push(Event::Account(AccountEvent {
                seq: 0,
                time: rfc3339(now),
                did: did.clone(),
                active: false,
                status: "deleted".into(),
                user: user.to_owned(),
            }));
            events
        };
        state.pending_access.retain(|k, _| k.0 != user);
        let mut tx = state.conn.transaction()?;
        let mut sent = Vec::new();
        for mut event in tx_events {
            let seq = db::next_seq(&mut tx)?;
            match &mut event {
                Event::Commit(c) => c.seq = seq,
                Event::Account(a) => a.seq = seq,
            }
            db::insert_event(
                &mut tx,
                seq,
                user,
                now,
                &serde_json::to_vec(&event).unwrap_or_default(),
            )?;
            keep.push(seq);
            sent.push(event);
        }
        db::purge_events(&mut tx, user, &keep)?;
        db::erase_user(&mut tx, user, now)?;
        tx.commit()?;
        state.accounts.remove(user);
        state
            .grants
            .retain(|g| g.0 != user && g.1 != format!("user:{user}"));
        db::reclaim(&mut state.conn)?;
        for event in sent {
            self.after_event(state, event)?;
        }
        Ok(Erased {
            did,
            records: entries.len(),
            public_deleted,
        })
    }

    /// Forks `source`'s repository into `target`'s: every public record,
    /// and the personal and private ones `source` shares with `target`.
    /// Sealed copies stay sealed under `source`'s key, so they are readable
    /// only while shared and never after `source` erases them.
    pub fn fork(&self, source: &str, target: &str) -> Result<Merged, DataError> {
        if source == target {
            return Err(DataError::invalid(
                "source",
                "a repository cannot be forked into itself",
            ));
        }
        let mut guard = self.state();
        let state = &mut *guard;
        if db::fork_base(&mut state.conn, target, source)?.is_some() {
            return Err(DataError::Conflict(format!("{target}'s fork of {source}")));
        }
        if ensure_existing_account(state, source)?.is_none() {
            return Err(DataError::NotFound(format!("the repository of {source}")));
        }
        let theirs = visible_entries(state, source, target)?;
        let ours: BTreeMap<String, Cid> = BTreeMap::new();
        let existing: HashSet<String> = ensure_account(state, target)?
            .repo
            .entries()?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        if let Some(clash) = theirs.keys().find(|p| existing.contains(*p)) {
            return Err(DataError::Conflict(clash.clone()));
        }
        let plan = crate::fork::plan(&ours, &ours, &theirs, &BTreeMap::new());
        self.land(state, Landing::Fork, target, source, &plan, &theirs)
    }

    /// Brings `source`'s changes since the fork point (or the last sync)
    /// into `fork_user`'s fork. Keys both changed are conflicts: nothing is
    /// applied until each is resolved (`Ours` keeps the fork's, `Theirs`
    /// takes the origin's).
    pub fn sync(
        &self,
        fork_user: &str,
        source: &str,
        resolved: &BTreeMap<String, crate::fork::Side>,
    ) -> Result<Merged, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let base = fork_base(state, fork_user, source)?;
        // The fork covers the collections it started with and any the
        // origin shares since.
        let theirs = visible_entries(state, source, fork_user)?;
        let scope = collections_of([&base, &theirs]);
        let ours = in_scope(entries_of(state, fork_user)?, &scope);
        let plan = crate::fork::plan(&base, &ours, &theirs, resolved);
        if !plan.conflicts.is_empty() {
            return Ok(Merged {
                applied: 0,
                conflicts: plan.conflicts,
            });
        }
        self.land(state, Landing::Sync, fork_user, source, &plan, &theirs)
    }

    /// Merges `fork_user`'s changes since the fork point (or the last
    /// merge) back into `source`'s repository, as `source` decides: keys
    /// both changed are listed as conflicts and nothing is applied until
    /// each is resolved (`Ours` keeps the origin's, `Theirs` takes the
    /// fork's). Sealed records are sealed again under `source`'s key.
    pub fn merge(
        &self,
        source: &str,
        fork_user: &str,
        resolved: &BTreeMap<String, crate::fork::Side>,
    ) -> Result<Merged, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let base = fork_base(state, fork_user, source)?;
        // Only the origin's collections flow back, never the fork owner's
        // other data.
        let ours = entries_of(state, source)?;
        let scope = collections_of([&base, &ours]);
        let theirs = in_scope(entries_of(state, fork_user)?, &scope);
        let plan = crate::fork::plan(&base, &ours, &theirs, resolved);
        if !plan.conflicts.is_empty() {
            return Ok(Merged {
                applied: 0,
                conflicts: plan.conflicts,
            });
        }
        self.land(state, Landing::Merge, source, fork_user, &plan, &theirs)
    }

    /// Applies a merge plan to `into` with records taken from `from`, and
    /// records the fork's new base.
    fn land(
        &self,
        state: &mut State,
        landing: Landing,
        into: &str,
        from: &str,
        plan: &crate::fork::MergePlan,
        theirs: &BTreeMap<String, Cid>,
    ) -> Result<Merged, DataError> {
        let into_entries: HashSet<String> = ensure_account(state, into)?
            .repo
            .entries()?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        let mut changes = Vec::with_capacity(plan.apply.len());
        for (path, target) in &plan.apply {
            let (collection, rkey) = path.split_once('/').unwrap_or_default();
            let class = state
                .collections
                .get(collection)
                .map_or(Class::Private, |c| c.class);
            let Some(_) = target else {
                changes.push(Change {
                    path: path.clone(),
                    block: None,
                    create: false,
                    class,
                    app: "commons".into(),
                    revision: String::new(),
                    sealed_by: None,
                    indexed: Vec::new(),
                });
                continue;
            };
            let Some((row, _, block)) = db::record(&mut state.conn, from, collection, rkey)? else {
                return Err(DataError::NotFound(path.clone()));
            };
            let (block, sealed_by) = if class.encrypted() {
                let origin = row.sealed_by.clone().unwrap_or_else(|| from.to_owned());
                if origin == into {
                    (block, None)
                } else if landing != Landing::Merge {
                    // Into a fork: the copy stays sealed by its origin.
                    (block, Some(origin))
                } else {
                    // Back into the origin: sealed again under its key.
                    let open_key = ensure_existing_account(state, &origin)?
                        .ok_or_else(|| DataError::Erased(origin.clone()))?
                        .data_key
                        .clone();
                    let plain = seal::open_record(
                        &open_key,
                        path,
                        &model::decode(&block).map_err(DataError::Internal)?,
                    )
                    .map_err(|e| DataError::Internal(e.to_string()))?;
                    let into_key = ensure_account(state, into)?.data_key.clone();
                    (
                        model::encode(&seal::seal_record(&into_key, path, &plain)),
                        None,
                    )
                }
            } else {
                (block, None)
            };
            let indexed = if class.encrypted() {
                Vec::new()
            } else {
                let fields = state
                    .collections
                    .get(collection)
                    .map(|c| c.indexed.clone())
                    .unwrap_or_default();
                match model::decode(&block) {
                    Ok(Ipld::Map(map)) => fields
                        .iter()
                        .filter_map(|f| Some((f.clone(), map.get(f).and_then(index_text)?)))
                        .collect(),
                    _ => Vec::new(),
                }
            };
            changes.push(Change {
                path: path.clone(),
                create: !into_entries.contains(path),
                block: Some(block),
                class,
                app: row.app,
                revision: row.revision,
                sealed_by,
                indexed,
            });
        }
        let applied = changes.len();
        if !changes.is_empty() {
            self.commit_changes(state, into, changes)?;
        }
        // What the fork holds is now the agreed base of both sides.
        let (fork_user, source) = match landing {
            Landing::Fork | Landing::Sync => (into, from),
            Landing::Merge => (from, into),
        };
        save_fork_base(state, fork_user, source, theirs)?;
        Ok(Merged {
            applied,
            conflicts: Vec::new(),
        })
    }

    /// Stores a blob for a record of `collection` in the calling user's
    /// archive: immutable, content-addressed (a raw CID), sealed under the
    /// user's data key for an encrypted class — and then addressed by the
    /// ciphertext, like records. Returns the blob reference a record
    /// carries (`{$type: blob, ref, mimeType, size}`).
    pub fn put_blob(
        &self,
        call: &AppCall,
        collection: &str,
        mime: &str,
        bytes: &[u8],
    ) -> Result<Value, DataError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let (info, _) = may_write(state, call, collection)?;
        let limit = max_blob_bytes(info.class);
        if bytes.len() > limit {
            return Err(DataError::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        let valid_mime = mime.split_once('/').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && mime.len() <= 255
                && mime.bytes().all(|c| c.is_ascii_graphic())
        });
        if !valid_mime {
            return Err(DataError::invalid(
                "mimeType",
                format!("{mime:?} is not a media type like image/png"),
            ));
        }
        let account = ensure_account(state, &call.user)?;
        let stored = if info.class.encrypted() {
            account.data_key.seal(bytes, b"blob")
        } else {
            bytes.to_vec()
        };
        let cid = model::cid_of(model::RAW, &stored);
        db::put_blob(
            &mut state.conn,
            &call.user,
            &cid,
            collection,
            mime,
            bytes.len(),
            &stored,
            now_ms(),
        )?;
        note_access(
            state,
            &call.user,
            &call.app,
            collection,
            "write",
            bytes.len() as u64,
        );
        drop(guard);
        self.shared.usage.record(UsageEvent {
            user: call.user.clone(),
            app: call.app.clone(),
            collection: collection.into(),
            action: "write",
            bytes: bytes.len() as u64,
        });
        Ok(serde_json::json!({
            "$type": "blob",
            "ref": {"$link": cid.to_string()},
            "mimeType": mime,
            "size": bytes.len(),
        }))
    }

    /// A blob of `owner`'s, under the same rules as the records of its
    /// collection: (media type, bytes).
    pub fn get_blob(
        &self,
        call: &AppCall,
        owner: &str,
        collection: &str,
        cid: &str,
    ) -> Result<(String, Vec<u8>), DataError> {
        let cid = model::parse_cid(cid).map_err(|e| DataError::invalid("cid", e))?;
        let mut guard = self.state();
        let state = &mut *guard;
        let Some((stored_in, mime, _, stored)) = db::blob(&mut state.conn, owner, &cid)? else {
            return Err(DataError::NotFound(format!("blob {cid}")));
        };
        // Named by its collection too, so a grant for one collection never
        // reaches another's blobs.
        if stored_in != collection {
            return Err(DataError::NotFound(format!("blob {cid} in {collection}")));
        }
        let collection = stored_in;
        may_read(state, call, owner, &collection)?;
        let class = state
            .collections
            .get(&collection)
            .map_or(Class::Private, |c| c.class);
        let bytes = if class.encrypted() {
            let key = ensure_existing_account(state, owner)?
                .ok_or_else(|| DataError::Erased(owner.into()))?
                .data_key
                .clone();
            key.open(&stored, b"blob")
                .map_err(|e| DataError::Internal(e.to_string()))?
        } else {
            stored
        };
        let n = bytes.len() as u64;
        self.served(guard, call, owner, &collection, n);
        Ok((mime, bytes))
    }

    /// Writes buffered access-log counts to the database.
    pub fn flush(&self) -> Result<(), DataError> {
        flush_access(&mut self.state())
    }
}

/// Who is watching the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// Sees public ops only.
    Public,
    /// Sees public ops and those of collections it holds read grants for.
    App(String),
    /// Sees everything of their own repository and public ops.
    Owner(String),
}

/// A live subscription to the change feed.
pub struct Subscription {
    commons: DataCommons,
    viewer: Viewer,
    live: broadcast::Receiver<Arc<Event>>,
    /// The newest sequence number delivered (or skipped).
    last: i64,
    replaying: bool,
    pending: std::collections::VecDeque<Message>,
    page: std::collections::VecDeque<Arc<Event>>,
}

impl Subscription {
    /// The next message this viewer may see; waits for live events.
    pub async fn next(&mut self) -> Result<Message, DataError> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Ok(m);
            }
            if self.replaying {
                if self.page.is_empty() {
                    let rows = {
                        let mut state = self.commons.state();
                        db::events_after(&mut state.conn, self.last, 512)?
                    };
                    if rows.is_empty() {
                        self.replaying = false;
                        continue;
                    }
                    for (seq, body) in rows {
                        let mut event: Event = serde_json::from_slice(&body)
                            .map_err(|e| DataError::Internal(e.to_string()))?;
                        let user = db_user_of(&self.commons, seq)?;
                        match &mut event {
                            Event::Commit(c) => c.user = user,
                            Event::Account(a) => a.user = user,
                        }
                        self.page.push_back(Arc::new(event));
                    }
                }
                let Some(event) = self.page.pop_front() else {
                    continue;
                };
                self.last = event.seq();
                if let Some(seen) = self.commons.view(&event, &self.viewer) {
                    return Ok(Message::Event(seen));
                }
                continue;
            }
            match self.live.recv().await {
                Ok(event) => {
                    if event.seq() <= self.last {
                        continue;
                    }
                    // One before it has not come (committed by another
                    // instance, its notice still on its way): the database
                    // has both, in order.
                    if event.seq() > self.last + 1 {
                        self.replaying = true;
                        continue;
                    }
                    self.last = event.seq();
                    if let Some(seen) = self.commons.view(&event, &self.viewer) {
                        return Ok(Message::Event(seen));
                    }
                }
                // Too slow for the live stream: catch up from the database.
                Err(broadcast::error::RecvError::Lagged(_)) => self.replaying = true,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(DataError::Internal("the feed closed".into()))
                }
            }
        }
    }

    /// The newest sequence number this subscription has passed.
    pub fn cursor(&self) -> i64 {
        self.last
    }
}

fn db_user_of(commons: &DataCommons, seq: i64) -> Result<String, DataError> {
    let mut state = commons.state();
    db::event_owner(&mut state.conn, seq)?
        .ok_or_else(|| DataError::Internal(format!("event {seq} is gone")))
}

fn futures_free_read(car: &[u8]) -> Result<crate::car::Car, crate::car::CarError> {
    crate::car::read_sync(car)
}

/// Which way records flow in [`DataCommons::land`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landing {
    /// Origin -> a new fork.
    Fork,
    /// Origin -> its fork.
    Sync,
    /// Fork -> its origin.
    Merge,
}

/// What a fork, sync or merge did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Merged {
    pub applied: usize,
    /// Keys both sides changed: nothing was applied; resolve each.
    pub conflicts: Vec<crate::fork::Conflict>,
}

/// Every (path, CID) of `user`'s repository.
fn entries_of(state: &mut State, user: &str) -> Result<BTreeMap<String, Cid>, DataError> {
    Ok(match ensure_existing_account(state, user)? {
        Some(a) => a.repo.entries()?.into_iter().collect(),
        None => BTreeMap::new(),
    })
}

/// What of `owner`'s repository `reader` may copy: public records, and
/// encrypted ones `owner` shares with them.
fn visible_entries(
    state: &mut State,
    owner: &str,
    reader: &str,
) -> Result<BTreeMap<String, Cid>, DataError> {
    let entries = entries_of(state, owner)?;
    Ok(entries
        .into_iter()
        .filter(|(path, _)| {
            let collection = path.split_once('/').map_or("", |(c, _)| c);
            let class = state
                .collections
                .get(collection)
                .map_or(Class::Private, |c| c.class);
            class == Class::Public
                || has_grant(
                    state,
                    owner,
                    &Grantee::Person(reader.into()).key(),
                    collection,
                    Action::Read,
                )
        })
        .collect())
}

/// The collections named by the keys of `maps`.
fn collections_of<const N: usize>(maps: [&BTreeMap<String, Cid>; N]) -> HashSet<String> {
    maps.iter()
        .flat_map(|m| m.keys())
        .filter_map(|p| p.split_once('/').map(|(c, _)| c.to_owned()))
        .collect()
}

/// The entries of the collections a fork covers.
fn in_scope(
    entries: BTreeMap<String, Cid>,
    collections: &HashSet<String>,
) -> BTreeMap<String, Cid> {
    entries
        .into_iter()
        .filter(|(p, _)| {
            p.split_once('/')
                .is_some_and(|(c, _)| collections.contains(c))
        })
        .collect()
}

fn fork_base(
    state: &mut State,
    fork_user: &str,
    source: &str,
) -> Result<BTreeMap<String, Cid>, DataError> {
    let text = db::fork_base(&mut state.conn, fork_user, source)?
        .ok_or_else(|| DataError::NotFound(format!("a fork of {source} by {fork_user}")))?;
    let raw: BTreeMap<String, String> =
        serde_json::from_str(&text).map_err(|e| DataError::Internal(e.to_string()))?;
    raw.into_iter()
        .map(|(p, c)| Ok((p, model::parse_cid(&c).map_err(DataError::Internal)?)))
        .collect()
}

fn save_fork_base(
    state: &mut State,
    fork_user: &str,
    source: &str,
    base: &BTreeMap<String, Cid>,
) -> Result<(), DataError> {
    let raw: BTreeMap<&String, String> = base.iter().map(|(p, c)| (p, c.to_string())).collect();
    db::save_fork(
        &mut state.conn,
        fork_user,
        source,
        &serde_json::to_string(&raw).unwrap_or_default(),
        now_ms(),
    )?;
    Ok(())
}

fn op_cid_string(cid: Option<Cid>) -> String {
    cid.map(|c| c.to_string()).unwrap_or_default()
}

fn index_text(value: &Ipld) -> Option<String> {
    match value {
        Ipld::String(s) => Some(s.clone()),
        Ipld::Integer(i) => Some(i.to_string()),
        Ipld::Bool(b) => Some(b.to_string()),
        Ipld::Link(c) => Some(c.to_string()),
        _ => None,
    }
}

/// The top-level fields a collection's record schema declares.
fn declared_fields(schema: &Value) -> Vec<String> {
    let mut out: Vec<String> = schema
        .pointer("/defs/main/record/properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn has_grant(state: &State, user: &str, grantee: &str, collection: &str, action: Action) -> bool {
    // Avoids allocating: the set is keyed by owned strings, so probe with
    // a borrowed tuple through a small linear fallback only on a miss.
    state.grants.contains(&(
        user.to_owned(),
        grantee.to_owned(),
        collection.to_owned(),
        action,
    ))
}

fn app_may(
    state: &State,
    app: &str,
    collection: &str,
    action: Action,
) -> Result<AppUse, DataError> {
    let app_use = state
        .apps
        .get(&(app.to_owned(), collection.to_owned()))
        .filter(|u| match action {
            Action::Read => u.read,
            Action::Write => u.write,
        })
        .cloned();
    app_use.ok_or_else(|| {
        DataError::Forbidden(format!(
            "{app} did not declare that it {}s {collection}; add it to the blueprint's data: section",
            action.name()
        ))
    })
}

/// Checks a write: the collection is declared, the app declared writing
/// it, and the user granted that.
fn may_write(
    state: &State,
    call: &AppCall,
    collection: &str,
) -> Result<(CollectionInfo, AppUse), DataError> {
    let info = state
        .collections
        .get(collection)
        .cloned()
        .ok_or_else(|| DataError::UnknownCollection(collection.into()))?;
    let app_use = app_may(state, &call.app, collection, Action::Write)?;
    if !has_grant(
        state,
        &call.user,
        &Grantee::App(call.app.clone()).key(),
        collection,
        Action::Write,
    ) {
        return Err(DataError::Forbidden(format!(
            "{} has not allowed {} to write {collection}; ask them on the consent screen",
            call.user, call.app
        )));
    }
    Ok((info, app_use))
}

/// Checks a read and returns the fields the app may see (`None`: all).
fn may_read(
    state: &mut State,
    call: &AppCall,
    owner: &str,
    collection: &str,
) -> Result<Option<Vec<String>>, DataError> {
    let info = state
        .collections
        .get(collection)
        .cloned()
        .ok_or_else(|| DataError::UnknownCollection(collection.into()))?;
    if let Some(row) = db::account(&mut state.conn, owner)? {
        if row.erased_ms.is_some() {
            return Err(DataError::Erased(owner.into()));
        }
    }
    if info.class == Class::Public {
        return Ok(None);
    }
    let app_use = app_may(state, &call.app, collection, Action::Read)?;
    let app_key = Grantee::App(call.app.clone()).key();
    if !has_grant(state, owner, &app_key, collection, Action::Read) {
        return Err(DataError::Forbidden(format!(
            "{owner} has not allowed {} to read {collection}",
            call.app
        )));
    }
    match info.class {
        Class::Private => {
            if call.user != owner {
                return Err(DataError::Forbidden(format!(
                    "{collection} is private to its owner"
                )));
            }
            let fields = app_use.fields.unwrap_or_else(|| info.declared.clone());
            Ok(Some(
                fields
                    .into_iter()
                    .filter(|f| info.declared.contains(f))
                    .collect(),
            ))
        }
        Class::Personal => {
            if call.user != owner
                && !has_grant(
                    state,
                    owner,
                    &Grantee::Person(call.user.clone()).key(),
                    collection,
                    Action::Read,
                )
            {
                return Err(DataError::Forbidden(format!(
                    "{owner} has not shared {collection} with {}",
                    call.user
                )));
            }
            Ok(None)
        }
        Class::Public => Ok(None),
    }
}

fn read_record(
    state: &mut State,
    owner: &str,
    collection: &str,
    rkey: &str,
    fields: Option<&[String]>,
) -> Result<Option<RecordView>, DataError> {
    let info = state.collections.get(collection).cloned();
    let Some(account) = ensure_existing_account(state, owner)? else {
        return Ok(None);
    };
    let path = format!("{collection}/{rkey}");
    let did = account.did.clone();
    let data_key = account.data_key.clone();
    let Some((row, cid, bytes)) = db::record(&mut state.conn, owner, collection, rkey)? else {
        return Ok(None);
    };
    let cid = Cid::try_from(cid.as_slice()).map_err(|e| DataError::Internal(e.to_string()))?;
    let block = model::decode(&bytes).map_err(DataError::Internal)?;
    let class = info.as_ref().map_or(Class::Private, |i| i.class);
    let record = if class.encrypted() {
        let key = match row.sealed_by.as_deref() {
            None => data_key,
            // A fork's copy opens with its origin's key, only while the
            // origin still shares it with this owner — and never once the
            // origin erased it.
            Some(origin) => {
                if !has_grant(
                    state,
                    origin,
                    &Grantee::Person(owner.into()).key(),
                    collection,
                    Action::Read,
                ) {
                    return Ok(None);
                }
                match ensure_existing_account(state, origin)? {
                    Some(a) => a.data_key.clone(),
                    None => return Ok(None),
                }
            }
        };
        let plain = seal::open_record(&key, &path, &block)
            .map_err(|e| DataError::Internal(e.to_string()))?;
        model::decode(&plain).map_err(DataError::Internal)?
    } else {
        block
    };
    let record = match (fields, record) {
        (Some(fields), Ipld::Map(map)) => Ipld::Map(
            map.into_iter()
                .filter(|(k, _)| k == "$type" || fields.iter().any(|f| f == k))
                .collect::<BTreeMap<_, _>>(),
        ),
        (_, record) => record,
    };
    let provenance = Provenance {
        app: row.app,
        revision: row.revision,
        user: owner.into(),
        created_ms: row.created_ms,
        updated_ms: row.updated_ms,
    };
    Ok(Some(RecordView {
        uri: format!("at://{did}/{path}"),
        cid: cid.to_string(),
        collection: collection.into(),
        rkey: rkey.into(),
        class,
        licence: info.and_then(|i| i.licence),
        value: model::to_json(&record),
        provenance,
    }))
}

fn note_access(
    state: &mut State,
    user: &str,
    app: &str,
    collection: &str,
    action: &'static str,
    bytes: u64,
) {
    let entry = state
        .pending_access
        .entry((
            user.to_owned(),
            app.to_owned(),
            collection.to_owned(),
            action,
        ))
        .or_insert((0, 0));
    entry.0 += 1;
    entry.1 += bytes as i64;
    if state.pending_access.len() > 4096 {
        let _ = flush_access(state);
    }
}

fn flush_access(state: &mut State) -> Result<(), DataError> {
    let now = now_ms();
    let pending = std::mem::take(&mut state.pending_access);
    for ((user, app, collection, action), (count, bytes)) in pending {
        db::log_access(
            &mut state.conn,
            (&user, &app, &collection, action),
            count,
            bytes,
            now,
        )?;
    }
    Ok(())
}

/// The account of `user`, loaded, or `None` if they have none (or were erased).
fn ensure_existing_account<'a>(
    state: &'a mut State,
    user: &str,
) -> Result<Option<&'a mut Account>, DataError> {
    if !state.accounts.contains_key(user) {
        match db::account(&mut state.conn, user)? {
            Some(row) if row.erased_ms.is_none() => {}
            _ => return Ok(None),
        }
    }
    ensure_account(state, user).map(Some)
}

/// The account of `user`, created (keys, empty repository) on first use.
/// (field, value) pairs a record is found by.
type IndexValues = Vec<(String, String)>;

/// A record made ready to land in `user`'s repository: validated against
/// its collection's schema, encoded, within the size limit, sealed with the
/// user's data key for encrypted classes, with the values of its indexed
/// fields (blinded for encrypted classes). Nothing is written.
fn prepare_record(
    state: &mut State,
    user: &str,
    info: &CollectionInfo,
    (collection, rkey): (&str, &str),
    record: &Ipld,
) -> Result<(Vec<u8>, IndexValues), DataError> {
    state
        .catalog
        .validate_record(collection, rkey, record)
        .map_err(|e| DataError::invalid(e.path, e.message))?;
    let encoded = model::encode(record);
    if encoded.len() > MAX_RECORD_BYTES {
        return Err(DataError::TooLarge {
            size: encoded.len(),
            limit: MAX_RECORD_BYTES,
        });
    }
    let mut indexed = Vec::new();
    if let Ipld::Map(map) = record {
        for field in &info.indexed {
            if let Some(text) = map.get(field).and_then(index_text) {
                indexed.push((field.clone(), text));
            }
        }
    }
    let account = ensure_account(state, user)?;
    if !info.class.encrypted() {
        return Ok((encoded, indexed));
    }
    let path = format!("{collection}/{rkey}");
    let sealed = model::encode(&seal::seal_record(&account.data_key, &path, &encoded));
    let blinded = indexed
        .into_iter()
        .map(|(f, v)| {
            let v = account.data_key.blind(&f, &v);
            (f, v)
        })
        .collect();
    Ok((sealed, blinded))
}

fn ensure_account<'a>(state: &'a mut State, user: &str) -> Result<&'a mut Account, DataError> {
    if !state.accounts.contains_key(user) {
        let account = match db::account(&mut state.conn, user)? {
            Some(row) if row.erased_ms.is_some() => return Err(DataError::Erased(user.into())),
            Some(row) => load_account(state, user, row)?,
            None => {
                let signing = Keypair::generate(Algorithm::K256);
                let data_key = Key::generate();
                let did = signing.public().did_key();
                let row = db::AccountRow {
                    did: did.clone(),
                    algorithm: Algorithm::K256.jwt_name().into(),
                    signing_key: Some(state.platform.seal(&signing.to_bytes(), user.as_bytes())),
                    data_key: Some(state.platform.seal(data_key.expose(), user.as_bytes())),
                    head: None,
                    erased_ms: None,
                };
                db::insert_account(&mut state.conn, user, &row, now_ms())?;
                let mut nodes = NodeStore::new();
                let tree = Tree::empty(&mut nodes);
                Account {
                    repo: Repo::detached(&did, nodes, tree, None),
                    did,
                    signing,
                    data_key,
                }
            }
        };
        state.accounts.insert(user.to_owned(), account);
    }
    Ok(state.accounts.get_mut(user).expect("inserted above"))
}

fn load_account(state: &mut State, user: &str, row: db::AccountRow) -> Result<Account, DataError> {
    let open = |sealed: Option<Vec<u8>>, what: &str| -> Result<Vec<u8>, DataError> {
        let sealed = sealed.ok_or_else(|| DataError::Erased(user.into()))?;
        state.platform.open(&sealed, user.as_bytes()).map_err(|_| {
            DataError::Internal(format!(
                "the {what} of {user} does not open with the platform key"
            ))
        })
    };
    let algorithm = Algorithm::from_name(&row.algorithm)
        .ok_or_else(|| DataError::Internal(format!("unknown key algorithm {}", row.algorithm)))?;
    let signing = Keypair::from_bytes(algorithm, &open(row.signing_key, "signing key")?)
        .map_err(|e| DataError::Internal(e.to_string()))?;
    let data_key = Key::from_bytes(&open(row.data_key, "data key")?)
        .ok_or_else(|| DataError::Internal("bad data key".into()))?;
    // The tree is rebuilt from the records and must be the one the head
    // commit signed: a database changed behind the platform's back is
    // refused, not served.
    let mut nodes = NodeStore::new();
    let tree = Tree::build(&mut nodes, &db::record_entries(&mut state.conn, user)?)?;
    let head = match row.head {
        Some(head) => {
            let bytes = db::head_block(&mut state.conn, user)?.ok_or_else(|| {
                DataError::Internal(format!("the head commit of {user} is missing"))
            })?;
            let commit = crate::repo::Commit::decode(&bytes)?;
            if commit.data != tree.root {
                return Err(DataError::Internal(format!(
                    "the records of {user} do not match their signed head commit {head}: \
                     the database was changed outside the platform"
                )));
            }
            Some((head, commit))
        }
        None => None,
    };
    Ok(Account {
        repo: Repo::detached(&row.did, nodes, tree, head),
        did: row.did,
        signing,
        data_key,
    })
}
