//! Accounts: users, their sessions and API tokens, organisations and their
//! members' roles, the sites each organisation owns, and the audit log.
//!
//! Every change an account makes is stored in the same transaction as the
//! audit entry that says who made it, so the log never misses a change and
//! never records one that did not happen.
//!
//! The SQL is shared by both stores: parameters are `$1`, `$2`, ... in the
//! order they first appear (SQLite binds `$N` by first appearance too).

mod pg;
mod sqlite;

use serde::{Deserialize, Serialize};

use crate::Result;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    password_hash TEXT NOT NULL, platform_admin BOOLEAN NOT NULL, created_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf TEXT NOT NULL, created_ms BIGINT NOT NULL, expires_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS orgs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, created_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    org TEXT NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role TEXT NOT NULL, PRIMARY KEY (org, user_id, role));
CREATE INDEX IF NOT EXISTS members_by_user ON members (user_id);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name TEXT NOT NULL, scopes TEXT NOT NULL, org TEXT,
    created_ms BIGINT NOT NULL, revoked_ms BIGINT);
CREATE INDEX IF NOT EXISTS api_tokens_by_user ON api_tokens (user_id);
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY, org TEXT NOT NULL REFERENCES orgs (id),
    created_by TEXT NOT NULL, created_ms BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS sites_by_org ON sites (org, name);
";

/// Added after [`SCHEMA`]: applications that sign users in.
pub(crate) const OIDC_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS oidc_clients (
    id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, org TEXT NOT NULL REFERENCES orgs (id),
    name TEXT NOT NULL, redirect_uris TEXT NOT NULL, created_ms BIGINT NOT NULL);
";

/// A person with an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    pub id: String,
    /// Lower-cased; unique.
    pub email: String,
    pub name: String,
    /// An argon2 PHC string; never a password.
    #[serde(skip_serializing)]
    pub password_hash: String,
    /// The platform's own administrator (the first account).
    pub platform_admin: bool,
    pub created_ms: i64,
}

/// A signed-in browser. `hash` is the SHA-256 of the cookie's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub hash: String,
    pub user_id: String,
    /// The session's CSRF token, sent back with every form.
    pub csrf: String,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// An organisation: what owns sites and holds roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgRow {
    /// A slug: lower-case letters, digits and dashes.
    pub id: String,
    pub name: String,
    pub created_ms: i64,
}

/// One role one user holds in one organisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRow {
    pub org: String,
    pub user_id: String,
    pub role: String,
}

/// An API token. Only its SHA-256 is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    pub id: String,
    #[serde(skip_serializing)]
    pub hash: String,
    pub user_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// When set, the token acts only within this organisation.
    pub org: Option<String>,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// A site (a deployment) and the organisation that owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRow {
    pub name: String,
    pub org: String,
    pub created_by: String,
    pub created_ms: i64,
}

/// An application that signs its users in with the platform (OpenID Connect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcClientRow {
    pub id: String,
    /// SHA-256 of the client secret.
    #[serde(skip_serializing)]
    pub secret_hash: String,
    /// The organisation that registered it.
    pub org: String,
    /// What the consent screen calls it.
    pub name: String,
    /// Where codes may be sent, compared exactly.
    pub redirect_uris: Vec<String>,
    pub created_ms: i64,
}

/// Who changed what: written with the change it describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// A user id, or `platform` for the local administrator.
    pub actor: String,
    /// The organisation the change belongs to, if any.
    pub org: Option<String>,
    /// What happened: `user.signup`, `org.create`, `token.revoke`, ...
    pub action: String,
    /// What it happened to (an id or a name).
    pub target: String,
    /// Anything else worth keeping (never a secret).
    pub detail: serde_json::Value,
}

/// An audit entry as stored, with its place in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    pub seq: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// Where the control plane keeps accounts. Every method is atomic; every
/// method that changes something takes the audit entry stored with it.
pub trait AccountStore: Send + Sync {
    /// Adds a user; `false` (and nothing stored) when the email is taken.
    fn create_user(&self, user: &UserRow, audit: &AuditEntry) -> Result<bool>;
    fn user(&self, id: &str) -> Result<Option<UserRow>>;
    fn user_by_email(&self, email: &str) -> Result<Option<UserRow>>;
    fn user_count(&self) -> Result<i64>;

    fn put_session(&self, session: &SessionRow) -> Result<()>;
    /// The session, unless it expired by `now_ms`.
    fn session(&self, hash: &str, now_ms: i64) -> Result<Option<SessionRow>>;
    fn delete_session(&self, hash: &str) -> Result<()>;

    /// Creates an organisation with `owner` as its admin; `false` when the
    /// id is taken.
    fn create_org(&self, org: &OrgRow, owner: &str, audit: &AuditEntry) -> Result<bool>;
    fn org(&self, id: &str) -> Result<Option<OrgRow>>;
    /// Every role `user` holds, in every organisation.
    fn memberships(&self, user: &str) -> Result<Vec<MemberRow>>;
    fn members(&self, org: &str) -> Result<Vec<MemberRow>>;
    /// Replaces `user`'s roles in `org` (none removes them from it).
    fn set_roles(&self, org: &str, user: &str, roles: &[String], audit: &AuditEntry) -> Result<()>;

    fn put_token(&self, token: &TokenRow, audit: &AuditEntry) -> Result<()>;
    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>>;
    fn tokens(&self, user: &str) -> Result<Vec<TokenRow>>;
    /// Revokes `user`'s token `id`; `false` when there is no such live token.
    fn revoke_token(&self, user: &str, id: &str, audit: &AuditEntry) -> Result<bool>;

    /// Records that `site.org` owns the site; `false` when the name is taken.
    fn create_site(&self, site: &SiteRow, audit: &AuditEntry) -> Result<bool>;
    fn site(&self, name: &str) -> Result<Option<SiteRow>>;
    /// One page of `org`'s sites by name, those after `after`.
    fn sites(&self, org: &str, after: Option<&str>, limit: u32) -> Result<Vec<SiteRow>>;
    fn delete_site(&self, name: &str, audit: &AuditEntry) -> Result<bool>;

    fn create_oidc_client(&self, client: &OidcClientRow, audit: &AuditEntry) -> Result<()>;
    fn oidc_client(&self, id: &str) -> Result<Option<OidcClientRow>>;

    /// Records something that changed outside the account tables (a deploy).
    fn record(&self, audit: &AuditEntry) -> Result<()>;
    /// Newest first: entries of `org` (every entry when `None`) before `before`.
    fn audit(&self, org: Option<&str>, before: Option<i64>, limit: u32) -> Result<Vec<AuditRow>>;
}

// The statements both stores run.
const USER_COLS: &str = "id, email, name, password_hash, platform_admin, created_ms";
const TOKEN_COLS: &str = "id, hash, user_id, name, scopes, org, created_ms, revoked_ms";
const SITE_COLS: &str = "name, org, created_by, created_ms";
const INSERT_AUDIT: &str =
    "INSERT INTO audit (at_ms, actor, org, action, target, detail) VALUES ($1, $2, $3, $4, $5, $6)";
const INSERT_USER: &str =
    "INSERT INTO users (id, email, name, password_hash, platform_admin, created_ms)
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING";
const INSERT_SESSION: &str =
    "INSERT INTO sessions (hash, user_id, csrf, created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5)";
const SELECT_SESSION: &str = "SELECT hash, user_id, csrf, created_ms, expires_ms FROM sessions
     WHERE hash = $1 AND expires_ms > $2";
const INSERT_ORG: &str =
    "INSERT INTO orgs (id, name, created_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
const INSERT_MEMBER: &str = "INSERT INTO members (org, user_id, role) VALUES ($1, $2, $3)";
const INSERT_TOKEN: &str =
    "INSERT INTO api_tokens (id, hash, user_id, name, scopes, org, created_ms, revoked_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const REVOKE_TOKEN: &str = "UPDATE api_tokens SET revoked_ms = $1
     WHERE user_id = $2 AND id = $3 AND revoked_ms IS NULL";
const INSERT_SITE: &str = "INSERT INTO sites (name, org, created_by, created_ms)
     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";
const OIDC_CLIENT_COLS: &str = "id, secret_hash, org, name, redirect_uris, created_ms";
const INSERT_OIDC_CLIENT: &str =
    "INSERT INTO oidc_clients (id, secret_hash, org, name, redirect_uris, created_ms)
     VALUES ($1, $2, $3, $4, $5, $6)";
const AUDIT_COLS: &str = "seq, at_ms, actor, org, action, target, detail";

/// The audit query for the given filters, with its parameters in order.
fn audit_query(org: bool, before: bool) -> String {
    let mut conds = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    if org {
        conds.push(format!("org = ${}", next()));
    }
    if before {
        conds.push(format!("seq < ${}", next()));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    format!(
        "SELECT {AUDIT_COLS} FROM audit {filter} ORDER BY seq DESC LIMIT ${}",
        next()
    )
}
