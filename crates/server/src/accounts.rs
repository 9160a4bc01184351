//! Accounts: sign-up, log-in and sessions, API tokens of users, organisations
//! and the roles their members hold, and what each role may do.
//!
//! Passwords are hashed with argon2id; session cookies and user tokens are
//! random and only their SHA-256 is stored. Who may do what is decided in one
//! place, [`Accounts::allow`]: the caller's credential must carry the scope of
//! the action (a session carries every scope; a token only its own, and only
//! within its organisation if it names one), and one of the caller's roles in
//! the organisation must permit the action.

use crate::error::ErrorKind;
use commons_clock::now_ms;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use commons_store::accounts::{AuditEntry, MemberRow, OrgRow, SessionRow, TokenRow, UserRow};
use commons_store::AccountStore;

use crate::tokens::{hash, random};
use crate::AppError;

/// The roles a member can hold in an organisation (product.md: operator,
/// provider, developer of a project, custodian; and the organisation's admin).
pub const ROLES: &[&str] = &["admin", "operator", "provider", "developer", "custodian"];

/// Scopes a user's API token can carry.
pub const USER_SCOPES: &[&str] = &[
    "sites:read",
    "sites:write",
    "orgs:read",
    "orgs:write",
    "audit:read",
    "tokens:write",
    "nodes:read",
    "nodes:write",
    "data:read",
    "data:write",
];

/// The cookie a signed-in browser carries.
pub const SESSION_COOKIE: &str = "commons_session";
/// The header an API call made with a session sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts.
pub const SESSION_MS: i64 = 14 * 86_400_000;
/// User tokens start with this; the platform's own tokens with `cmns_`.
pub const USER_TOKEN_PREFIX: &str = "cmnu_";
/// How session cookies' values start.
pub const SESSION_PREFIX: &str = "cmnc_";

/// Failed log-ins allowed per account and address in [`LOGIN_WINDOW_MS`].
const LOGIN_FAILURES: u32 = 5;
const LOGIN_WINDOW_MS: i64 = 15 * 60_000;

/// Something a caller asks to do within an organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ReadSites,
    WriteSites,
    ReadOrg,
    ManageMembers,
    ReadAudit,
    /// See a provider's nodes.
    ReadNodes,
    /// Make join tokens, revoke nodes.
    ManageNodes,
}

impl Action {
    /// The scope a token needs for it.
    pub fn scope(self) -> &'static str {
        match self {
            Action::ReadSites => "sites:read",
            Action::WriteSites => "sites:write",
            Action::ReadOrg => "orgs:read",
            Action::ManageMembers => "orgs:write",
            Action::ReadAudit => "audit:read",
            Action::ReadNodes => "nodes:read",
            Action::ManageNodes => "nodes:write",
        }
    }

    /// Whether holding `role` permits it.
    fn permitted_to(self, role: &str) -> bool {
        match self {
            Action::ReadSites | Action::ReadOrg => ROLES.contains(&role),
            Action::WriteSites => matches!(role, "admin" | "operator"),
            Action::ManageMembers => role == "admin",
            Action::ReadAudit => matches!(role, "admin" | "custodian"),
            Action::ReadNodes => matches!(role, "admin" | "provider" | "operator"),
            Action::ManageNodes => matches!(role, "admin" | "provider"),
        }
    }
}

/// Who is calling, once their credential checked out.
#[derive(Debug, Clone)]
pub enum Principal {
    /// The platform's administrator: the local socket or an `admin` platform token.
    Platform,
    User(Box<Member>),
}

/// A signed-in user and what their credential lets them do.
#[derive(Debug, Clone)]
pub struct Member {
    pub user: UserRow,
    pub roles: Vec<MemberRow>,
    /// Scopes of the token used; `None` for a browser session (every scope).
    pub scopes: Option<Vec<String>>,
    /// The organisation the token is limited to, if any.
    pub token_org: Option<String>,
    /// The session's CSRF token, when signed in by cookie.
    pub csrf: Option<String>,
}

impl Principal {
    /// The audit log's name for the caller.
    pub fn actor(&self) -> String {
        match self {
            Principal::Platform => "platform".into(),
            Principal::User(m) => m.user.id.clone(),
        }
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        match self {
            Principal::Platform => true,
            Principal::User(m) => m
                .scopes
                .as_ref()
                .is_none_or(|s| s.iter().any(|x| x == scope)),
        }
    }
}

/// A name people read (of an account, organisation, token or application):
/// 1 to 100 characters once trimmed.
pub fn valid_display_name(name: &str) -> bool {
    let name = name.trim();
    !name.is_empty() && name.chars().count() <= 100
}

/// A valid organisation id or site name: lower-case letters, digits and
/// dashes, starting with a letter, at most 40 characters.
pub fn valid_slug(s: &str) -> bool {
    (1..=40).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.ends_with('-')
}

/// Accounts over an [`AccountStore`], with the log-in limiter in memory.
pub struct Accounts {
    store: Arc<dyn AccountStore>,
    failures: Mutex<HashMap<String, (u32, i64)>>,
    /// Verified against when the account does not exist, so that a log-in's
    /// time does not tell whether an email has an account.
    decoy: String,
}

impl Accounts {
    pub fn new(store: Arc<dyn AccountStore>) -> Accounts {
        let decoy = hash_password("not a password of anyone");
        Accounts {
            store,
            failures: Mutex::new(HashMap::new()),
            decoy,
        }
    }

    pub fn store(&self) -> &dyn AccountStore {
        self.store.as_ref()
    }

    /// Signs a new user up, with an organisation of their own (its admin).
    /// The first account is the platform's administrator.
    pub fn signup(
        &self,
        email: &str,
        name: &str,
        password: &str,
    ) -> Result<(UserRow, OrgRow), AppError> {
        let email = email.trim().to_lowercase();
        let name = name.trim();
        let bad = |detail: &str| AppError::new(ErrorKind::Invalid, "Invalid sign-up", detail);
        if !valid_email(&email) {
            return Err(bad("give an email address like ann@example.org"));
        }
        if !valid_display_name(name) {
            return Err(bad("give a name of 1 to 100 characters"));
        }
        if password.chars().count() < 10 {
            return Err(bad("choose a password of at least 10 characters"));
        }
        if password.chars().count() > 1024 {
            return Err(bad("choose a password of at most 1,024 characters"));
        }
        let now = now_ms();
        let user = UserRow {
            id: format!("u_{}", random(16)),
            email: email.clone(),
            name: name.to_string(),
            password_hash: hash_password(password),
            platform_admin: self.store.user_count()? == 0,
            created_ms: now,
        };
        let audit = AuditEntry {
            at_ms: now,
            actor: user.id.clone(),
            org: None,
            action: "user.signup".into(),
            target: user.id.clone(),
            detail: serde_json::json!({ "email": email }),
        };
        if !self.store.create_user(&user, &audit)? {
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Email taken",
                "an account with this email exists; log in instead",
            ));
        }
        // Their own organisation, named after the email's local part.
        let base: String = email
            .split('@')
            .next()
            .unwrap_or("me")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let base = base.trim_matches('-').to_string();
        let base = if valid_slug(&base) {
            base
        } else {
            "org".to_string()
        };
        let mut n = 1;
        loop {
            let id = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            if let Some(org) = self.create_org(&user, &id, name)? {
                return Ok((user, org));
            }
            n += 1;
        }
    }

    /// Creates an organisation with `owner` as its admin; `None` when the id is taken.
    pub fn create_org(
        &self,
        owner: &UserRow,
        id: &str,
        name: &str,
    ) -> Result<Option<OrgRow>, AppError> {
        if !valid_slug(id) {
            return Err(AppError::new(
                ErrorKind::Invalid,
                "Invalid organisation id",
                format!("\"{id}\" is not an id: use lower-case letters, digits and '-', starting with a letter"),
            ));
        }
        if !valid_display_name(name) {
            return Err(AppError::new(
                ErrorKind::Invalid,
                "Invalid organisation name",
                "give the organisation a name of 1 to 100 characters",
            ));
        }
        let org = OrgRow {
            id: id.into(),
            name: name.trim().into(),
            created_ms: now_ms(),
        };
        let audit = AuditEntry {
            at_ms: org.created_ms,
            actor: owner.id.clone(),
            org: Some(org.id.clone()),
            action: "org.create".into(),
            target: org.id.clone(),
            detail: serde_json::json!({ "name": org.name }),
        };
        Ok(self
            .store
            .create_org(&org, &owner.id, &audit)?
            .then_some(org))
    }

    /// Checks a password; on success opens a session and returns the
    /// cookie's value (shown only here) and the session.
    pub fn login(
        &self,
        email: &str,
        password: &str,
        address: &str,
    ) -> Result<(String, SessionRow, UserRow), AppError> {
        let email = email.trim().to_lowercase();
        let key = format!("{email}\n{address}");
        let now = now_ms();
        {
            let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(&(count, since)) = failures.get(&key) {
                if count >= LOGIN_FAILURES && now - since < LOGIN_WINDOW_MS {
                    let wait_s = (LOGIN_WINDOW_MS - (now - since)) / 1000 + 1;
                    return Err(AppError::new(
                        ErrorKind::TooMany,
                        "Too many failed log-ins",
                        format!("try again in {wait_s} s, or reset your password"),
                    )
                    .retry_after(wait_s));
                }
            }
        }
        let user = self.store.user_by_email(&email)?;
        let ok = match &user {
            Some(u) => verify_password(password, &u.password_hash),
            None => {
                verify_password(password, &self.decoy);
                false
            }
        };
        let (Some(user), true) = (user, ok) else {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            // Forget windows that ended, so the map does not grow without bound.
            failures.retain(|_, (_, since)| now - *since < LOGIN_WINDOW_MS);
            let entry = failures.entry(key).or_insert((0, now));
            entry.0 += 1;
            return Err(AppError::new(
                ErrorKind::Unauthenticated,
                "Log-in failed",
                "the email or the password is wrong",
            ));
        };
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let cookie = format!("{SESSION_PREFIX}{}", random(40));
        let session = SessionRow {
            hash: hash(&cookie),
            user_id: user.id.clone(),
            csrf: random(32),
            created_ms: now,
            expires_ms: now + SESSION_MS,
        };
        self.store.put_session(&session)?;
        Ok((cookie, session, user))
    }

    pub fn logout(&self, cookie: &str) -> Result<(), AppError> {
        self.store
            .delete_session(&hash(cookie))
            .map_err(AppError::from)
    }

    /// The user of the session whose hash is `session_hash`, if it is live.
    pub fn session_user(&self, session_hash: &str) -> Result<Option<String>, AppError> {
        Ok(self
            .store
            .session(session_hash, now_ms())?
            .map(|s| s.user_id))
    }

    /// The member behind a session cookie, if it is live.
    pub fn by_session(&self, cookie: &str) -> Result<Option<Member>, AppError> {
        let Some(session) = self.store.session(&hash(cookie), now_ms())? else {
            return Ok(None);
        };
        self.member(&session.user_id, None, None, Some(session.csrf))
    }

    /// The member behind a user token, if it is live.
    pub fn by_token(&self, token: &str) -> Result<Option<Member>, AppError> {
        let Some(t) = self
            .store
            .token_by_hash(&hash(token))?
            .filter(|t| t.revoked_ms.is_none())
        else {
            return Ok(None);
        };
        self.member(&t.user_id, Some(t.scopes), t.org, None)
    }

    fn member(
        &self,
        user: &str,
        scopes: Option<Vec<String>>,
        token_org: Option<String>,
        csrf: Option<String>,
    ) -> Result<Option<Member>, AppError> {
        let Some(user) = self.store.user(user)? else {
            return Ok(None);
        };
        let roles = self.store.memberships(&user.id)?;
        Ok(Some(Member {
            user,
            roles,
            scopes,
            token_org,
            csrf,
        }))
    }

    /// Lets `who` do `action` in `org`, or says why not (404 when the caller
    /// is not a member at all, so that other organisations stay unseen).
    pub fn allow(&self, who: &Principal, org: &str, action: Action) -> Result<(), AppError> {
        let Principal::User(m) = who else {
            return Ok(());
        };
        let roles: Vec<&str> = m
            .roles
            .iter()
            .filter(|r| r.org == org)
            .map(|r| r.role.as_str())
            .collect();
        if roles.is_empty() || m.token_org.as_deref().is_some_and(|o| o != org) {
            return Err(AppError::new(
                ErrorKind::NotFound,
                "No such organisation",
                format!("you are not a member of \"{org}\" (or this token is not for it)"),
            ));
        }
        if !who.has_scope(action.scope()) {
            return Err(AppError::new(
                ErrorKind::Forbidden,
                "Not allowed",
                format!("this token lacks the scope {}", action.scope()),
            ));
        }
        if !roles.iter().any(|r| action.permitted_to(r)) {
            return Err(AppError::new(
                ErrorKind::Forbidden,
                "Not allowed",
                format!(
                    "your roles in \"{org}\" ({}) do not permit this; an admin of it can grant one",
                    roles.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Creates a token for `user`; returns it (the only time it is seen) and its record.
    pub fn create_token(
        &self,
        user: &UserRow,
        name: &str,
        scopes: &[String],
        org: Option<&str>,
    ) -> Result<(String, TokenRow), AppError> {
        let bad = |d: String| AppError::new(ErrorKind::Invalid, "Invalid token", d);
        if scopes.is_empty() {
            return Err(bad(format!(
                "give the token at least one scope: {}",
                USER_SCOPES.join(", ")
            )));
        }
        if let Some(s) = scopes.iter().find(|s| !USER_SCOPES.contains(&s.as_str())) {
            return Err(bad(format!(
                "unknown scope \"{s}\"; scopes are {}",
                USER_SCOPES.join(", ")
            )));
        }
        if !valid_display_name(name) {
            return Err(bad("give the token a name of 1 to 100 characters".into()));
        }
        let token = format!("{USER_TOKEN_PREFIX}{}", random(40));
        let row = TokenRow {
            id: format!("t_{}", random(12)),
            hash: hash(&token),
            user_id: user.id.clone(),
            name: name.trim().into(),
            scopes: scopes.to_vec(),
            org: org.map(String::from),
            created_ms: now_ms(),
            revoked_ms: None,
        };
        let audit = AuditEntry {
            at_ms: row.created_ms,
            actor: user.id.clone(),
            org: row.org.clone(),
            action: "token.create".into(),
            target: row.id.clone(),
            detail: serde_json::json!({ "name": row.name, "scopes": row.scopes }),
        };
        self.store.put_token(&row, &audit)?;
        Ok((token, row))
    }

    pub fn revoke_token(&self, user: &UserRow, id: &str) -> Result<bool, AppError> {
        let audit = AuditEntry {
            at_ms: now_ms(),
            actor: user.id.clone(),
            org: None,
            action: "token.revoke".into(),
            target: id.into(),
            detail: serde_json::Value::Null,
        };
        self.store
            .revoke_token(&user.id, id, &audit)
            .map_err(AppError::from)
    }

    /// Gives the user with `email` exactly `roles` in `org` (none removes them).
    pub fn set_roles(
        &self,
        who: &Principal,
        org: &str,
        email: &str,
        roles: &[String],
    ) -> Result<Vec<MemberRow>, AppError> {
        self.allow(who, org, Action::ManageMembers)?;
        if let Some(r) = roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
            return Err(AppError::new(
                ErrorKind::Invalid,
                "Invalid role",
                format!("unknown role \"{r}\"; roles are {}", ROLES.join(", ")),
            ));
        }
        // 422, not 404: the organisation addressed exists; what is wrong is
        // a name in the request.
        let Some(user) = self.store.user_by_email(&email.trim().to_lowercase())? else {
            return Err(AppError::new(
                ErrorKind::Invalid,
                "No such user",
                format!("no account has the email {email}; they sign up first"),
            ));
        };
        let members = self.store.members(org)?;
        let other_admins = members
            .iter()
            .any(|m| m.role == "admin" && m.user_id != user.id);
        if !other_admins && !roles.iter().any(|r| r == "admin") {
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Last admin",
                format!("\"{org}\" would have no admin left; make someone else admin first"),
            ));
        }
        let audit = AuditEntry {
            at_ms: now_ms(),
            actor: who.actor(),
            org: Some(org.into()),
            action: if roles.is_empty() {
                "member.remove"
            } else {
                "member.set"
            }
            .into(),
            target: user.id.clone(),
            detail: serde_json::json!({ "roles": roles }),
        };
        self.store.set_roles(org, &user.id, roles, &audit)?;
        self.store.members(org).map_err(AppError::from)
    }
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn hash_password(password: &str) -> String {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).expect("the OS random number generator works");
    let salt = SaltString::encode_b64(&bytes).expect("16 bytes make a salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashes any password")
        .to_string()
}

fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hashed_with_a_salt_and_verify() {
        let a = hash_password("correct horse battery");
        let b = hash_password("correct horse battery");
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert!(verify_password("correct horse battery", &a));
        assert!(!verify_password("correct horse batterz", &a));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn roles_permit_what_they_should() {
        assert!(Action::WriteSites.permitted_to("operator"));
        assert!(!Action::WriteSites.permitted_to("developer"));
        assert!(Action::ReadSites.permitted_to("developer"));
        assert!(!Action::ManageMembers.permitted_to("operator"));
        assert!(Action::ReadAudit.permitted_to("custodian"));
        assert!(!Action::ReadSites.permitted_to("stranger"));
    }

    #[test]
    fn slugs_and_emails() {
        assert!(valid_slug("acme-2"));
        assert!(
            !valid_slug("Acme") && !valid_slug("2acme") && !valid_slug("a-") && !valid_slug("")
        );
        assert!(valid_email("ann@example.org"));
        assert!(!valid_email("ann") && !valid_email("ann@example") && !valid_email("a b@x.org"));
    }
}
