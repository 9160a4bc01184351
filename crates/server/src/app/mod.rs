//! The application layer: what the platform does for a caller, as typed
//! operations on organisations, members, tokens and sites, each authorised
//! against the caller's roles (`Accounts::allow`) and audited where it
//! changes something. Every protocol is an adapter over it — the REST API
//! (`api`), the web console (`console`), OpenID Connect (`oidc`) — that
//! extracts a request, calls an operation and renders what it returns or
//! its one error type, [`AppError`]. Nothing here knows of HTTP.

pub mod billing;
pub mod data;
pub mod deploys;
pub mod money;
pub mod nodes;
pub mod orgs;
pub mod sites;
pub mod tokens;

pub use crate::error::{AppError, ErrorKind};

use crate::accounts::{Member, Principal};

/// What an operation answers.
pub type Result<T> = std::result::Result<T, AppError>;

/// One page of a list and the cursor of the next (absent on the last).
#[derive(Debug, serde::Serialize)]
pub struct Page<T, C> {
    pub items: Vec<T>,
    pub next: Option<C>,
}

impl<T, C> Page<T, C> {
    /// The page `items` is when `limit` were asked for: full, it has a next
    /// one, starting after the last item's cursor.
    fn of(items: Vec<T>, limit: u32, cursor: impl Fn(&T) -> C) -> Page<T, C> {
        let next = (items.len() == limit as usize)
            .then(|| items.last().map(cursor))
            .flatten();
        Page { items, next }
    }
}

/// The caller's account; the platform's administrator has none.
pub fn member(who: &Principal) -> Result<&Member> {
    match who {
        Principal::User(m) => Ok(m),
        Principal::Platform => Err(AppError::new(
            ErrorKind::Forbidden,
            "Not a user",
            "the platform's administrator has no account of its own; sign up or log in as a user",
        )),
    }
}

/// A count a caller gave, from 1 to `max`.
pub fn in_range(name: &str, value: u32, max: u32) -> Result<u32> {
    if (1..=max).contains(&value) {
        Ok(value)
    } else {
        Err(AppError::new(
            ErrorKind::Malformed,
            "Invalid query",
            format!("`{name}` is {value}; give 1 to {max}"),
        ))
    }
}

/// The caller's token must carry `scope`.
fn needs_scope(who: &Principal, scope: &str) -> Result<()> {
    if who.has_scope(scope) {
        Ok(())
    } else {
        Err(AppError::new(
            ErrorKind::Forbidden,
            "Not allowed",
            format!("this token lacks the scope {scope}"),
        ))
    }
}
