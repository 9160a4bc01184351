//! Accounts on PostgreSQL: the same statements as the SQLite store.

use ::postgres::types::ToSql;
use ::postgres::{Row, Transaction};

use super::*;
use crate::pg::pg;
use crate::PgStore;

fn user(r: &Row) -> UserRow {
    UserRow {
        id: r.get(0),
        email: r.get(1),
        name: r.get(2),
        password_hash: r.get(3),
        platform_admin: r.get(4),
        created_ms: r.get(5),
    }
}

fn token(r: &Row) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.get(0),
        hash: r.get(1),
        user_id: r.get(2),
        name: r.get(3),
        scopes: serde_json::from_str(r.get::<_, &str>(4))?,
        org: r.get(5),
        created_ms: r.get(6),
        revoked_ms: r.get(7),
    })
}

fn site(r: &Row) -> SiteRow {
    SiteRow {
        name: r.get(0),
        org: r.get(1),
        created_by: r.get(2),
        created_ms: r.get(3),
    }
}

fn member(r: &Row) -> MemberRow {
    MemberRow {
        org: r.get(0),
        user_id: r.get(1),
        role: r.get(2),
    }
}

impl PgStore {
    /// Runs `f` and the audit entry in one transaction; `f` says whether
    /// anything changed, and nothing is logged (or kept) when it did not.
    fn audited(
        &self,
        audit: &AuditEntry,
        f: impl FnOnce(&mut Transaction) -> Result<bool> + Send + 'static,
    ) -> Result<bool> {
        let a = audit.clone();
        let detail = serde_json::to_string(&a.detail)?;
        self.with(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            if !f(&mut tx)? {
                return Ok(false);
            }
            tx.execute(
                INSERT_AUDIT,
                &[&a.at_ms, &a.actor, &a.org, &a.action, &a.target, &detail],
            )
            .map_err(pg)?;
            tx.commit().map_err(pg)?;
            Ok(true)
        })
    }

    /// Rows of one query with owned parameters.
    fn rows(&self, sql: String, params: Vec<Box<dyn ToSql + Sync + Send>>) -> Result<Vec<Row>> {
        self.with(move |c| {
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            c.query(&sql, &refs).map_err(pg)
        })
    }
}

fn p<T: ToSql + Sync + Send + 'static>(v: T) -> Box<dyn ToSql + Sync + Send> {
    Box::new(v)
}

impl AccountStore for PgStore {
    fn create_user(&self, u: &UserRow, audit: &AuditEntry) -> Result<bool> {
        let u = u.clone();
        self.audited(audit, move |tx| {
            Ok(tx
                .execute(
                    INSERT_USER,
                    &[
                        &u.id,
                        &u.email,
                        &u.name,
                        &u.password_hash,
                        &u.platform_admin,
                        &u.created_ms,
                    ],
                )
                .map_err(pg)?
                == 1)
        })
    }

    fn user(&self, id: &str) -> Result<Option<UserRow>> {
        let rows = self.rows(
            format!("SELECT {USER_COLS} FROM users WHERE id = $1"),
            vec![p(id.to_string())],
        )?;
        Ok(rows.first().map(user))
    }

    fn user_by_email(&self, email: &str) -> Result<Option<UserRow>> {
        let rows = self.rows(
            format!("SELECT {USER_COLS} FROM users WHERE email = $1"),
            vec![p(email.to_string())],
        )?;
        Ok(rows.first().map(user))
    }

    fn user_count(&self) -> Result<i64> {
        let rows = self.rows("SELECT count(*) FROM users".into(), vec![])?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or(0))
    }

    fn put_session(&self, s: &SessionRow) -> Result<()> {
        let s = s.clone();
        self.with(move |c| {
            c.execute(
                "DELETE FROM sessions WHERE expires_ms <= $1",
                &[&s.created_ms],
            )
            .map_err(pg)?;
            c.execute(
                INSERT_SESSION,
                &[&s.hash, &s.user_id, &s.csrf, &s.created_ms, &s.expires_ms],
            )
            .map_err(pg)?;
            Ok(())
        })
    }

    fn session(&self, hash: &str, now_ms: i64) -> Result<Option<SessionRow>> {
        let rows = self.rows(SELECT_SESSION.into(), vec![p(hash.to_string()), p(now_ms)])?;
        Ok(rows.first().map(|r| SessionRow {
            hash: r.get(0),
            user_id: r.get(1),
            csrf: r.get(2),
            created_ms: r.get(3),
            expires_ms: r.get(4),
        }))
    }

    fn delete_session(&self, hash: &str) -> Result<()> {
        self.rows(
            "DELETE FROM sessions WHERE hash = $1".into(),
            vec![p(hash.to_string())],
        )?;
        Ok(())
    }

    fn create_org(&self, org: &OrgRow, owner: &str, audit: &AuditEntry) -> Result<bool> {
        let (org, owner) = (org.clone(), owner.to_string());
        self.audited(audit, move |tx| {
            if tx
                .execute(INSERT_ORG, &[&org.id, &org.name, &org.created_ms])
                .map_err(pg)?
                == 0
            {
                return Ok(false);
            }
            tx.execute(INSERT_MEMBER, &[&org.id, &owner, &"admin"])
                .map_err(pg)?;
            Ok(true)
        })
    }

    fn org(&self, id: &str) -> Result<Option<OrgRow>> {
        let rows = self.rows(
            "SELECT id, name, created_ms FROM orgs WHERE id = $1".into(),
            vec![p(id.to_string())],
        )?;
        Ok(rows.first().map(|r| OrgRow {
            id: r.get(0),
            name: r.get(1),
            created_ms: r.get(2),
        }))
    }

    fn memberships(&self, user: &str) -> Result<Vec<MemberRow>> {
        let rows = self.rows(
            "SELECT org, user_id, role FROM members WHERE user_id = $1 ORDER BY org, role".into(),
            vec![p(user.to_string())],
        )?;
        Ok(rows.iter().map(member).collect())
    }

    fn members(&self, org: &str) -> Result<Vec<MemberRow>> {
        let rows = self.rows(
            "SELECT org, user_id, role FROM members WHERE org = $1 ORDER BY user_id, role".into(),
            vec![p(org.to_string())],
        )?;
        Ok(rows.iter().map(member).collect())
    }

    fn set_roles(&self, org: &str, user: &str, roles: &[String], audit: &AuditEntry) -> Result<()> {
        let (org, user, roles) = (org.to_string(), user.to_string(), roles.to_vec());
        self.audited(audit, move |tx| {
            tx.execute(
                "DELETE FROM members WHERE org = $1 AND user_id = $2",
                &[&org, &user],
            )
            .map_err(pg)?;
            for role in &roles {
                tx.execute(INSERT_MEMBER, &[&org, &user, role])
                    .map_err(pg)?;
            }
            Ok(true)
        })?;
        Ok(())
    }

    fn put_token(&self, t: &TokenRow, audit: &AuditEntry) -> Result<()> {
        let scopes = serde_json::to_string(&t.scopes)?;
        let t = t.clone();
        self.audited(audit, move |tx| {
            tx.execute(
                INSERT_TOKEN,
                &[
                    &t.id,
                    &t.hash,
                    &t.user_id,
                    &t.name,
                    &scopes,
                    &t.org,
                    &t.created_ms,
                    &t.revoked_ms,
                ],
            )
            .map_err(pg)?;
            Ok(true)
        })?;
        Ok(())
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>> {
        let rows = self.rows(
            format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE hash = $1"),
            vec![p(hash.to_string())],
        )?;
        rows.first().map(token).transpose()
    }

    fn tokens(&self, user: &str) -> Result<Vec<TokenRow>> {
        let rows = self.rows(
            format!(
                "SELECT {TOKEN_COLS} FROM api_tokens WHERE user_id = $1 ORDER BY created_ms, id"
            ),
            vec![p(user.to_string())],
        )?;
        rows.iter().map(token).collect()
    }

    fn revoke_token(&self, user: &str, id: &str, audit: &AuditEntry) -> Result<bool> {
        let (at, user, id) = (audit.at_ms, user.to_string(), id.to_string());
        self.audited(audit, move |tx| {
            Ok(tx.execute(REVOKE_TOKEN, &[&at, &user, &id]).map_err(pg)? == 1)
        })
    }

    fn create_site(&self, s: &SiteRow, audit: &AuditEntry) -> Result<bool> {
        let s = s.clone();
        self.audited(audit, move |tx| {
            Ok(tx
                .execute(
                    INSERT_SITE,
                    &[&s.name, &s.org, &s.created_by, &s.created_ms],
                )
                .map_err(pg)?
                == 1)
        })
    }

    fn site(&self, name: &str) -> Result<Option<SiteRow>> {
        let rows = self.rows(
            format!("SELECT {SITE_COLS} FROM sites WHERE name = $1"),
            vec![p(name.to_string())],
        )?;
        Ok(rows.first().map(site))
    }

    fn sites(&self, org: &str, after: Option<&str>, limit: u32) -> Result<Vec<SiteRow>> {
        let rows = self.rows(
            format!(
                "SELECT {SITE_COLS} FROM sites WHERE org = $1 AND name > $2 ORDER BY name LIMIT $3"
            ),
            vec![
                p(org.to_string()),
                p(after.unwrap_or("").to_string()),
                p(i64::from(limit)),
            ],
        )?;
        Ok(rows.iter().map(site).collect())
    }

    fn delete_site(&self, name: &str, audit: &AuditEntry) -> Result<bool> {
        let name = name.to_string();
        self.audited(audit, move |tx| {
            Ok(tx
                .execute("DELETE FROM sites WHERE name = $1", &[&name])
                .map_err(pg)?
                == 1)
        })
    }

    fn create_oidc_client(&self, c: &OidcClientRow, audit: &AuditEntry) -> Result<()> {
        let uris = serde_json::to_string(&c.redirect_uris)?;
        let c = c.clone();
        self.audited(audit, move |tx| {
            tx.execute(
                INSERT_OIDC_CLIENT,
                &[&c.id, &c.secret_hash, &c.org, &c.name, &uris, &c.created_ms],
            )
            .map_err(pg)?;
            Ok(true)
        })?;
        Ok(())
    }

    fn oidc_client(&self, id: &str) -> Result<Option<OidcClientRow>> {
        let rows = self.rows(
            format!("SELECT {OIDC_CLIENT_COLS} FROM oidc_clients WHERE id = $1"),
            vec![p(id.to_string())],
        )?;
        rows.first()
            .map(|r| {
                Ok(OidcClientRow {
                    id: r.get(0),
                    secret_hash: r.get(1),
                    org: r.get(2),
                    name: r.get(3),
                    redirect_uris: serde_json::from_str(r.get::<_, &str>(4))?,
                    created_ms: r.get(5),
                })
            })
            .transpose()
    }

    fn record(&self, audit: &AuditEntry) -> Result<()> {
        self.audited(audit, |_| Ok(true))?;
        Ok(())
    }

    fn audit(&self, org: Option<&str>, before: Option<i64>, limit: u32) -> Result<Vec<AuditRow>> {
        let mut params = Vec::new();
        if let Some(o) = org {
            params.push(p(o.to_string()));
        }
        if let Some(b) = before {
            params.push(p(b));
        }
        params.push(p(i64::from(limit)));
        let rows = self.rows(audit_query(org.is_some(), before.is_some()), params)?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    seq: r.get(0),
                    entry: AuditEntry {
                        at_ms: r.get(1),
                        actor: r.get(2),
                        org: r.get(3),
                        action: r.get(4),
                        target: r.get(5),
                        detail: serde_json::from_str(r.get::<_, &str>(6))?,
                    },
                })
            })
            .collect()
    }
}
