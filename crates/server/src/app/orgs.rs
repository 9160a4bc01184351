//! Organisations, their members and their audit log.

use std::collections::BTreeMap;

use commons_store::accounts::{AuditRow, MemberRow, OrgRow};

use super::{member, needs_scope, AppError, ErrorKind, Page, Result};
use crate::accounts::{Action, Principal};
use crate::AppState;

/// An organisation the caller belongs to, and their roles in it.
#[derive(Debug, serde::Serialize)]
pub struct Membership {
    pub id: String,
    pub name: Option<String>,
    pub roles: Vec<String>,
}

/// A member of an organisation and their roles.
#[derive(Debug, serde::Serialize)]
pub struct MemberView {
    pub user_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub roles: Vec<String>,
}

/// The organisation exists (else a 404-kind error naming it).
pub fn known(state: &AppState, org: &str) -> Result<()> {
    match state.accounts.store().org(org)? {
        Some(_) => Ok(()),
        None => Err(AppError::new(
            ErrorKind::NotFound,
            "No such organisation",
            format!("there is no organisation \"{org}\""),
        )),
    }
}

/// The organisations the caller belongs to (only the token's, for a token
/// limited to one), with their roles in each.
pub fn of_caller(state: &AppState, who: &Principal) -> Result<Vec<Membership>> {
    let m = member(who)?;
    let mut by_org: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in &m.roles {
        if m.token_org.as_deref().is_none_or(|o| o == r.org) {
            by_org.entry(&r.org).or_default().push(r.role.clone());
        }
    }
    let mut out = Vec::new();
    for (id, roles) in by_org {
        let org = state.accounts.store().org(id)?;
        out.push(Membership {
            id: id.to_string(),
            name: org.map(|o| o.name),
            roles,
        });
    }
    Ok(out)
}

/// Creates an organisation; the caller becomes its admin.
pub fn create(state: &AppState, who: &Principal, id: &str, name: &str) -> Result<OrgRow> {
    let m = member(who)?;
    needs_scope(who, "orgs:write")?;
    match state.accounts.create_org(&m.user, id, name)? {
        Some(org) => Ok(org),
        None => Err(AppError::new(
            ErrorKind::Conflict,
            "Organisation id taken",
            format!("\"{id}\" is taken; choose another id"),
        )),
    }
}

/// The organisation's members and their roles.
pub fn members(state: &AppState, who: &Principal, org: &str) -> Result<Vec<MemberView>> {
    known(state, org)?;
    state.accounts.allow(who, org, Action::ReadOrg)?;
    let rows = state.accounts.store().members(org)?;
    views(state, rows)
}

/// Gives the user with `email` exactly `roles` in the organisation (none
/// removes them); answers the members now.
pub fn set_roles(
    state: &AppState,
    who: &Principal,
    org: &str,
    email: &str,
    roles: &[String],
) -> Result<Vec<MemberView>> {
    known(state, org)?;
    state.accounts.allow(who, org, Action::ManageMembers)?;
    let rows = state.accounts.set_roles(who, org, email, roles)?;
    views(state, rows)
}

fn views(state: &AppState, rows: Vec<MemberRow>) -> Result<Vec<MemberView>> {
    let mut by_user: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in rows {
        by_user.entry(r.user_id).or_default().push(r.role);
    }
    let mut out = Vec::new();
    for (id, roles) in by_user {
        let user = state.accounts.store().user(&id)?;
        out.push(MemberView {
            email: user.as_ref().map(|u| u.email.clone()),
            name: user.map(|u| u.name),
            user_id: id,
            roles,
        });
    }
    Ok(out)
}

/// The organisation's audit log, newest first: `limit` entries older than
/// sequence number `before`.
pub fn audit(
    state: &AppState,
    who: &Principal,
    org: &str,
    before: Option<i64>,
    limit: u32,
) -> Result<Page<AuditRow, i64>> {
    known(state, org)?;
    state.accounts.allow(who, org, Action::ReadAudit)?;
    let limit = super::in_range("limit", limit, 500)?;
    let items = state.accounts.store().audit(Some(org), before, limit)?;
    Ok(Page::of(items, limit, |a: &AuditRow| a.seq))
}
