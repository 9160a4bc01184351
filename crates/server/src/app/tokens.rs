//! A user's API tokens: listed without their values, made (the value
//! answered once, stored hashed) and revoked.

use commons_store::accounts::TokenRow;

use super::{member, needs_scope, AppError, ErrorKind, Result};
use crate::accounts::{Member, Principal};
use crate::AppState;

/// A token to make.
#[derive(serde::Deserialize, utoipa::ToSchema)]
pub struct NewToken {
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    pub name: String,
    #[schema(value_type = Vec<crate::schema::Scope>, min_items = 1)]
    pub scopes: Vec<String>,
    /// Only this organisation's sites.
    pub org: Option<String>,
}

/// The caller's tokens; a token limited to an organisation sees only that
/// organisation's.
pub fn list(state: &AppState, who: &Principal) -> Result<Vec<TokenRow>> {
    let m = member(who)?;
    let mut items = state.accounts.store().tokens(&m.user.id)?;
    if let Some(org) = &m.token_org {
        items.retain(|t| t.org.as_ref() == Some(org));
    }
    Ok(items)
}

fn may_manage(who: &Principal) -> Result<&Member> {
    let m = member(who)?;
    needs_scope(who, "tokens:write")?;
    Ok(m)
}

/// Makes a token: its value (shown only now) and its record. A token can
/// be only as narrow as, or narrower than, the one making it.
pub fn create(state: &AppState, who: &Principal, n: &NewToken) -> Result<(String, TokenRow)> {
    let m = may_manage(who)?;
    if let Some(org) = &n.org {
        // A token limited to an organisation makes tokens for it alone.
        let outside_token = m.token_org.as_ref().is_some_and(|t| t != org);
        if !m.roles.iter().any(|r| &r.org == org) || outside_token {
            return Err(AppError::new(
                ErrorKind::NotFound,
                "No such organisation",
                format!("you are not a member of \"{org}\" (or this token is not for it)"),
            ));
        }
    }
    let org = n.org.as_deref().or(m.token_org.as_deref());
    if let Some(s) = n.scopes.iter().find(|s| !who.has_scope(s)) {
        return Err(AppError::new(
            ErrorKind::Forbidden,
            "Not allowed",
            format!("a token cannot grant {s}, which the token making it lacks"),
        ));
    }
    state
        .accounts
        .create_token(&m.user, &n.name, &n.scopes, org)
}

/// Revokes one of the caller's live tokens (for a token limited to an
/// organisation, one of that organisation's).
pub fn revoke(state: &AppState, who: &Principal, id: &str) -> Result<()> {
    let m = may_manage(who)?;
    let in_reach = match &m.token_org {
        None => true,
        Some(org) => state
            .accounts
            .store()
            .tokens(&m.user.id)?
            .iter()
            .any(|t| t.id == id && t.org.as_ref() == Some(org)),
    };
    if in_reach && state.accounts.revoke_token(&m.user, id)? {
        Ok(())
    } else {
        Err(AppError::new(
            ErrorKind::NotFound,
            "No such token",
            format!("you have no live token \"{id}\""),
        ))
    }
}
