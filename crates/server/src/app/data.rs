//! DataCommons operations: what a hosted app does with its users' data
//! (acting for the user its identity assertion names), what a user does
//! with their own (see it all, consent, revoke, export, erase), and what
//! the platform's administrator may do for a user (the same, by id).

use commons_data::service::{
    Action, AppCall, Erased, GrantView, Grantee, Merged, Page, RecordView, Request, WriteResult,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Result;
use crate::accounts::Principal;
use crate::data::to_app_error;
use crate::error::{AppError, ErrorKind};
use crate::AppState;

/// A hosted app acting for a user: its site (from its service token) and
/// the user (from the identity assertion it passed on) — or an application
/// outside the platform holding a user's OpenID Connect access token.
#[derive(Debug, Clone)]
pub struct AppCaller {
    pub site: String,
    pub user: String,
    /// For an OpenID Connect application: the data scopes its access token
    /// carries (each also a grant the user made); none for a site.
    pub scopes: Option<Vec<String>>,
}

/// The OpenID Connect scope that mirrors a grant of `action` on `collection`.
pub fn data_scope(collection: &str, action: Action) -> String {
    format!("data:{collection}:{}", action.name())
}

/// A data scope's collection and action (`data:NSID:read|write`).
pub fn parse_data_scope(scope: &str) -> Option<(&str, Action)> {
    let (collection, action) = scope.strip_prefix("data:")?.rsplit_once(':')?;
    Some((collection, Action::parse(action)?))
}

/// The app an OpenID Connect client is to DataCommons (its grants' grantee).
pub fn client_app(client_id: &str) -> String {
    format!("oidc:{client_id}")
}

impl AppCaller {
    fn call(&self) -> AppCall {
        AppCall {
            app: self.site.clone(),
            user: self.user.clone(),
        }
    }
}

/// A new record: its key (a TID is made when absent) and value.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewRecord {
    pub rkey: Option<String>,
    /// The record: a JSON object whose `$type` is the collection.
    #[schema(value_type = Object)]
    pub value: Value,
}

/// Several writes as one commit (atproto's `applyWrites`): all or none.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct Batch {
    /// Each `{collection, rkey?, value?, create}`: a create (a TID key when
    /// none is given), an update, or — without a value — a delete.
    #[schema(value_type = Vec<Object>)]
    pub writes: Vec<commons_data::service::WriteOp>,
}

pub fn apply_writes(
    state: &AppState,
    caller: &AppCaller,
    batch: &Batch,
) -> Result<Vec<WriteResult>> {
    let mut checked = std::collections::BTreeSet::new();
    for w in &batch.writes {
        if checked.insert(w.collection.as_str()) {
            registered(state, caller, &w.collection, Action::Write)?;
        }
    }
    state
        .data
        .commons
        .apply_writes(&caller.call(), &batch.writes)
        .map_err(|e| refused(state, &caller.site, e))
}

/// Stores a blob (media, attachments) for records of `collection`.
pub fn put_blob(
    state: &AppState,
    caller: &AppCaller,
    collection: &str,
    mime: &str,
    bytes: &[u8],
) -> Result<Value> {
    registered(state, caller, collection, Action::Write)?;
    state
        .data
        .commons
        .put_blob(&caller.call(), collection, mime, bytes)
        .map_err(|e| refused(state, &caller.site, e))
}

/// A blob of `owner`'s (the caller's own by default): (media type, bytes).
pub fn get_blob(
    state: &AppState,
    caller: &AppCaller,
    owner: Option<&str>,
    collection: &str,
    cid: &str,
) -> Result<(String, Vec<u8>)> {
    registered(state, caller, collection, Action::Read)?;
    let owner = owner.unwrap_or(&caller.user);
    state
        .data
        .commons
        .get_blob(&caller.call(), owner, collection, cid)
        .map_err(|e| refused(state, &caller.site, e))
}

/// Whose repository a read is of (the caller's own by default).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct ReadQuery {
    /// The owner's user id; default: the user the app acts for.
    pub owner: Option<String>,
    /// Lists: the rkey to continue after.
    pub cursor: Option<String>,
    /// Lists and queries: at most this many (1–1000, default 100).
    pub limit: Option<usize>,
    /// Queries: the indexed field and the value it must equal.
    pub field: Option<String>,
    pub value: Option<String>,
}

/// Adds where to ask for consent to a refusal for want of a grant.
fn refused(state: &AppState, site: &str, e: commons_data::service::DataError) -> AppError {
    let forbidden = matches!(e, commons_data::service::DataError::Forbidden(_));
    let mut err = to_app_error(e);
    if forbidden {
        err.detail = format!(
            "{}; the user grants it at {}/console/data/consent/{site}",
            err.detail,
            state.public_base()
        );
    }
    err
}

/// A site's `data:` section registered (as last deployed); an OpenID
/// Connect application's token checked for the scope this call needs.
fn registered(
    state: &AppState,
    caller: &AppCaller,
    collection: &str,
    action: Action,
) -> Result<()> {
    let Some(scopes) = &caller.scopes else {
        return state.data.ensure_app(&state.engine, &caller.site);
    };
    let wanted = data_scope(collection, action);
    if scopes.contains(&wanted) {
        return Ok(());
    }
    Err(AppError::new(
        ErrorKind::Forbidden,
        "Outside the token's scope",
        format!("the access token was not given {wanted}; sign the user in again asking for it"),
    ))
}

pub fn create(
    state: &AppState,
    caller: &AppCaller,
    collection: &str,
    new: &NewRecord,
) -> Result<WriteResult> {
    registered(state, caller, collection, Action::Write)?;
    state
        .data
        .commons
        .create(&caller.call(), collection, new.rkey.as_deref(), &new.value)
        .map_err(|e| refused(state, &caller.site, e))
}

pub fn update(
    state: &AppState,
    caller: &AppCaller,
    collection: &str,
    rkey: &str,
    value: &Value,
) -> Result<WriteResult> {
    registered(state, caller, collection, Action::Write)?;
    state
        .data
        .commons
        .update(&caller.call(), collection, rkey, value)
        .map_err(|e| refused(state, &caller.site, e))
}

pub fn delete(state: &AppState, caller: &AppCaller, collection: &str, rkey: &str) -> Result<()> {
    registered(state, caller, collection, Action::Write)?;
    state
        .data
        .commons
        .delete(&caller.call(), collection, rkey)
        .map(drop)
        .map_err(|e| refused(state, &caller.site, e))
}

pub fn get(
    state: &AppState,
    caller: &AppCaller,
    collection: &str,
    rkey: &str,
    q: &ReadQuery,
) -> Result<RecordView> {
    registered(state, caller, collection, Action::Read)?;
    let owner = q.owner.as_deref().unwrap_or(&caller.user);
    state
        .data
        .commons
        .get(&caller.call(), owner, collection, rkey)
        .map_err(|e| refused(state, &caller.site, e))
}

pub fn list(state: &AppState, caller: &AppCaller, collection: &str, q: &ReadQuery) -> Result<Page> {
    registered(state, caller, collection, Action::Read)?;
    let owner = q.owner.as_deref().unwrap_or(&caller.user);
    let commons = &state.data.commons;
    let limit = q.limit.unwrap_or(100);
    let page = match (&q.field, &q.value) {
        (Some(field), Some(value)) => {
            commons.query(&caller.call(), owner, collection, field, value, limit)
        }
        (None, None) => commons.list(
            &caller.call(),
            owner,
            collection,
            q.cursor.as_deref(),
            limit,
        ),
        _ => {
            return Err(AppError::new(
                ErrorKind::Malformed,
                "Incomplete query",
                "a query names both `field` and `value`",
            ))
        }
    };
    page.map_err(|e| refused(state, &caller.site, e))
}

/// The user a data operation on someone's own data is for: a signed-in
/// user acts for themselves (a token needs `data:read` or `data:write`);
/// the platform's administrator for anyone.
fn subject(who: &Principal, user: Option<&str>, scope: &str) -> Result<String> {
    if !who.has_scope(scope) {
        return Err(AppError::new(
            ErrorKind::Forbidden,
            "Token lacks a scope",
            format!("this token lacks {scope}; make one with it (or use the console)"),
        ));
    }
    match (who, user) {
        (Principal::User(m), None) => Ok(m.user.id.clone()),
        (Principal::User(m), Some(u)) if u == m.user.id => Ok(u.to_owned()),
        (Principal::User(_), Some(_)) => Err(AppError::new(
            ErrorKind::Forbidden,
            "Not your data",
            "a user sees, exports and erases only their own data",
        )),
        (Principal::Platform, Some(u)) => Ok(u.to_owned()),
        (Principal::Platform, None) => Err(AppError::new(
            ErrorKind::Malformed,
            "Whose data?",
            "name the user whose data this is",
        )),
    }
}

/// Everything held about a user, as they see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MyData {
    pub user: String,
    /// Their repository's DID.
    pub did: String,
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<RecordView>,
    #[schema(value_type = Vec<Object>)]
    pub grants: Vec<GrantView>,
    /// Which apps read or wrote what, per day.
    #[schema(value_type = Vec<Object>)]
    pub access_log: Vec<Value>,
    /// Forks they made, and forks others made of their repository.
    #[schema(value_type = Vec<Object>)]
    pub forks: Vec<commons_data::service::ForkView>,
}

pub fn my_data(state: &AppState, who: &Principal, user: Option<&str>) -> Result<MyData> {
    let user = subject(who, user, "data:read")?;
    let commons = &state.data.commons;
    if matches!(who, Principal::Platform) && !commons.has_account(&user).map_err(to_app_error)? {
        return Err(AppError::new(
            ErrorKind::NotFound,
            "No data",
            format!("no app has stored data for {user}"),
        ));
    }
    Ok(MyData {
        did: commons.did(&user).map_err(to_app_error)?,
        records: commons.my_records(&user).map_err(to_app_error)?,
        grants: commons.grants(&user).map_err(to_app_error)?,
        access_log: commons.access_log(&user).map_err(to_app_error)?,
        forks: commons.forks(&user).map_err(to_app_error)?,
        user,
    })
}

/// A repository named by its user's id or its DID: the user.
fn repository_owner(state: &AppState, name: &str) -> Result<String> {
    if !name.starts_with("did:") {
        return Ok(name.to_owned());
    }
    state
        .data
        .commons
        .owner_of_did(name)
        .map_err(to_app_error)?
        .ok_or_else(|| {
            AppError::new(
                ErrorKind::NotFound,
                "No such repository",
                format!("no repository here is {name}"),
            )
        })
}

/// What `site` asks of the signed-in user (its consent screen).
pub fn requests(state: &AppState, who: &Principal, site: &str) -> Result<Vec<Request>> {
    subject(who, None, "data:read")?;
    state.data.ensure_app(&state.engine, site)?;
    Ok(state.data.commons.requests(site))
}

/// The signed-in user allows `site` everything it asks for.
pub fn consent(state: &AppState, who: &Principal, site: &str) -> Result<usize> {
    let user = subject(who, None, "data:write")?;
    state.data.ensure_app(&state.engine, site)?;
    state
        .data
        .commons
        .consent(&user, site)
        .map_err(to_app_error)
}

/// A grant to revoke (or give to a person).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct GrantChange {
    /// `app:SITE` or `user:ID`.
    pub grantee: String,
    pub collection: String,
    /// `read` or `write`.
    pub action: String,
}

fn parse_grant(g: &GrantChange) -> Result<(Grantee, Action)> {
    let grantee = Grantee::parse(&g.grantee).ok_or_else(|| {
        AppError::new(
            ErrorKind::Invalid,
            "Bad grantee",
            "a grantee is `app:SITE` or `user:ID`",
        )
    })?;
    let action = Action::parse(&g.action).ok_or_else(|| {
        AppError::new(
            ErrorKind::Invalid,
            "Bad action",
            "an action is `read` or `write`",
        )
    })?;
    Ok((grantee, action))
}

pub fn revoke(state: &AppState, who: &Principal, g: &GrantChange) -> Result<bool> {
    let user = subject(who, None, "data:write")?;
    let (grantee, action) = parse_grant(g)?;
    state
        .data
        .commons
        .revoke(&user, &grantee, &g.collection, action)
        .map_err(to_app_error)
}

pub fn grant(state: &AppState, who: &Principal, g: &GrantChange) -> Result<()> {
    let user = subject(who, None, "data:write")?;
    let (grantee, action) = parse_grant(g)?;
    state
        .data
        .commons
        .grant(&user, &grantee, &g.collection, action)
        .map_err(to_app_error)
}

/// One archive of everything held about the user.
pub fn export(state: &AppState, who: &Principal, user: Option<&str>) -> Result<(String, Vec<u8>)> {
    let user = subject(who, user, "data:read")?;
    let archive = state.data.commons.export(&user).map_err(to_app_error)?;
    Ok((user, archive))
}

/// Erases everything held about the user.
pub fn erase(state: &AppState, who: &Principal, user: Option<&str>) -> Result<Erased> {
    let user = subject(who, user, "data:write")?;
    state.data.commons.erase(&user).map_err(to_app_error)
}

/// Imports an AT Protocol repository file (CAR) into a user's repository:
/// the signed-in user's own, or any user's for the platform's
/// administrator.
pub fn import_repo(
    state: &AppState,
    who: &Principal,
    user: Option<&str>,
    car: &[u8],
) -> Result<commons_data::service::RepoImported> {
    let user = subject(who, user, "data:write")?;
    state
        .data
        .commons
        .import_repo(&user, car)
        .map_err(to_app_error)
}

/// Which version of a key both sides changed is kept.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// The repository merged into keeps its own.
    Ours,
    /// The incoming version wins.
    Theirs,
}

/// How to settle the keys both sides changed: `path -> ours | theirs`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct Resolutions {
    #[serde(default)]
    pub resolve: std::collections::BTreeMap<String, Choice>,
}

impl Resolutions {
    fn sides(&self) -> std::collections::BTreeMap<String, commons_data::fork::Side> {
        self.resolve
            .iter()
            .map(|(path, c)| {
                let side = match c {
                    Choice::Ours => commons_data::fork::Side::Ours,
                    Choice::Theirs => commons_data::fork::Side::Theirs,
                };
                (path.clone(), side)
            })
            .collect()
    }
}

/// The signed-in user forks `source`'s repository (its user's id or its
/// DID) into their own.
pub fn fork(state: &AppState, who: &Principal, source: &str) -> Result<Merged> {
    let user = subject(who, None, "data:write")?;
    let source = repository_owner(state, source)?;
    state
        .data
        .commons
        .fork(&source, &user)
        .map_err(to_app_error)
}

/// The signed-in user brings `source`'s changes into their fork of it.
pub fn sync(state: &AppState, who: &Principal, source: &str, r: &Resolutions) -> Result<Merged> {
    let user = subject(who, None, "data:write")?;
    state
        .data
        .commons
        .sync(&user, source, &r.sides())
        .map_err(to_app_error)
}

/// The signed-in user merges `fork_user`'s fork of their repository back.
pub fn merge(
    state: &AppState,
    who: &Principal,
    fork_user: &str,
    r: &Resolutions,
) -> Result<Merged> {
    let user = subject(who, None, "data:write")?;
    state
        .data
        .commons
        .merge(&user, fork_user, &r.sides())
        .map_err(to_app_error)
}

/// Imports an archive made by an export as `user`'s data (the platform's
/// administrator): the same keys, DID, repository root and provenance.
pub fn import(state: &AppState, who: &Principal, user: &str, archive: &[u8]) -> Result<String> {
    if !matches!(who, Principal::Platform) {
        return Err(AppError::new(
            ErrorKind::Forbidden,
            "Not allowed",
            "only the platform's administrator imports a user's data",
        ));
    }
    state
        .data
        .commons
        .import(user, archive)
        .map_err(to_app_error)
}
