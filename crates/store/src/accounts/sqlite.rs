//! Accounts in the embedded SQLite store.

use rusqlite::{params, OptionalExtension, Transaction};

use super::*;
use crate::SqliteStore;

fn user(r: &rusqlite::Row) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        id: r.get(0)?,
        email: r.get(1)?,
        name: r.get(2)?,
        password_hash: r.get(3)?,
        platform_admin: r.get(4)?,
        created_ms: r.get(5)?,
    })
}

fn token(r: &rusqlite::Row) -> rusqlite::Result<(TokenRow, String)> {
    Ok((
        TokenRow {
            id: r.get(0)?,
            hash: r.get(1)?,
            user_id: r.get(2)?,
            name: r.get(3)?,
            scopes: Vec::new(),
            org: r.get(5)?,
            created_ms: r.get(6)?,
            revoked_ms: r.get(7)?,
        },
        r.get(4)?,
    ))
}

fn with_scopes((mut t, scopes): (TokenRow, String)) -> Result<TokenRow> {
    t.scopes = serde_json::from_str(&scopes)?;
    Ok(t)
}

fn site(r: &rusqlite::Row) -> rusqlite::Result<SiteRow> {
    Ok(SiteRow {
        name: r.get(0)?,
        org: r.get(1)?,
        created_by: r.get(2)?,
        created_ms: r.get(3)?,
    })
}

fn member(r: &rusqlite::Row) -> rusqlite::Result<MemberRow> {
    Ok(MemberRow {
        org: r.get(0)?,
        user_id: r.get(1)?,
        role: r.get(2)?,
    })
}

fn log(tx: &Transaction, a: &AuditEntry) -> Result<()> {
    tx.execute(
        INSERT_AUDIT,
        params![
            a.at_ms,
            a.actor,
            a.org,
            a.action,
            a.target,
            serde_json::to_string(&a.detail)?
        ],
    )?;
    Ok(())
}

impl SqliteStore {
    /// Runs `f` and the audit entry in one transaction; `f` says whether
    /// anything changed, and nothing is logged (or kept) when it did not.
    fn audited(
        &self,
        audit: &AuditEntry,
        f: impl FnOnce(&Transaction) -> Result<bool>,
    ) -> Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            if !f(&tx)? {
                return Ok(false);
            }
            log(&tx, audit)?;
            tx.commit()?;
            Ok(true)
        })
    }
}

impl AccountStore for SqliteStore {
    fn create_user(&self, u: &UserRow, audit: &AuditEntry) -> Result<bool> {
        self.audited(audit, |tx| {
            Ok(tx.execute(
                INSERT_USER,
                params![
                    u.id,
                    u.email,
                    u.name,
                    u.password_hash,
                    u.platform_admin,
                    u.created_ms
                ],
            )? == 1)
        })
    }

    fn user(&self, id: &str) -> Result<Option<UserRow>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE id = $1"),
                [id],
                user,
            )
            .optional()?)
        })
    }

    fn user_by_email(&self, email: &str) -> Result<Option<UserRow>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE email = $1"),
                [email],
                user,
            )
            .optional()?)
        })
    }

    fn user_count(&self) -> Result<i64> {
        self.with(|c| Ok(c.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?))
    }

    fn put_session(&self, s: &SessionRow) -> Result<()> {
        self.with(|c| {
            // Expired sessions go as new ones come.
            c.execute(
                "DELETE FROM sessions WHERE expires_ms <= $1",
                [s.created_ms],
            )?;
            c.execute(
                INSERT_SESSION,
                params![s.hash, s.user_id, s.csrf, s.created_ms, s.expires_ms],
            )?;
            Ok(())
        })
    }

    fn session(&self, hash: &str, now_ms: i64) -> Result<Option<SessionRow>> {
        self.with(|c| {
            Ok(c.query_row(SELECT_SESSION, params![hash, now_ms], |r| {
                Ok(SessionRow {
                    hash: r.get(0)?,
                    user_id: r.get(1)?,
                    csrf: r.get(2)?,
                    created_ms: r.get(3)?,
                    expires_ms: r.get(4)?,
                })
            })
            .optional()?)
        })
    }

    fn delete_session(&self, hash: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM sessions WHERE hash = $1", [hash])?;
            Ok(())
        })
    }

    fn create_org(&self, org: &OrgRow, owner: &str, audit: &AuditEntry) -> Result<bool> {
        self.audited(audit, |tx| {
            if tx.execute(INSERT_ORG, params![org.id, org.name, org.created_ms])? == 0 {
                return Ok(false);
            }
            tx.execute(INSERT_MEMBER, params![org.id, owner, "admin"])?;
            Ok(true)
        })
    }

    fn org(&self, id: &str) -> Result<Option<OrgRow>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT id, name, created_ms FROM orgs WHERE id = $1",
                [id],
                |r| {
                    Ok(OrgRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_ms: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
    }

    fn memberships(&self, user: &str) -> Result<Vec<MemberRow>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT org, user_id, role FROM members WHERE user_id = $1 ORDER BY org, role",
            )?;
            let rows = stmt.query_map([user], member)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn members(&self, org: &str) -> Result<Vec<MemberRow>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT org, user_id, role FROM members WHERE org = $1 ORDER BY user_id, role",
            )?;
            let rows = stmt.query_map([org], member)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn set_roles(&self, org: &str, user: &str, roles: &[String], audit: &AuditEntry) -> Result<()> {
        self.audited(audit, |tx| {
            tx.execute(
                "DELETE FROM members WHERE org = $1 AND user_id = $2",
                [org, user],
            )?;
            for role in roles {
                tx.execute(INSERT_MEMBER, params![org, user, role])?;
            }
            Ok(true)
        })?;
        Ok(())
    }

    fn put_token(&self, t: &TokenRow, audit: &AuditEntry) -> Result<()> {
        let scopes = serde_json::to_string(&t.scopes)?;
        self.audited(audit, |tx| {
            tx.execute(
                INSERT_TOKEN,
                params![
                    t.id,
                    t.hash,
                    t.user_id,
                    t.name,
                    scopes,
                    t.org,
                    t.created_ms,
                    t.revoked_ms
                ],
            )?;
            Ok(true)
        })?;
        Ok(())
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE hash = $1"),
                [hash],
                token,
            )
            .optional()?
            .map(with_scopes)
            .transpose()
        })
    }

    fn tokens(&self, user: &str) -> Result<Vec<TokenRow>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TOKEN_COLS} FROM api_tokens WHERE user_id = $1 ORDER BY created_ms, id"
            ))?;
            let rows = stmt
                .query_map([user], token)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(with_scopes).collect()
        })
    }

    fn revoke_token(&self, user: &str, id: &str, audit: &AuditEntry) -> Result<bool> {
        self.audited(audit, |tx| {
            Ok(tx.execute(REVOKE_TOKEN, params![audit.at_ms, user, id])? == 1)
        })
    }

    fn create_site(&self, s: &SiteRow, audit: &AuditEntry) -> Result<bool> {
        self.audited(audit, |tx| {
            Ok(tx.execute(
                INSERT_SITE,
                params![s.name, s.org, s.created_by, s.created_ms],
            )? == 1)
        })
    }

    fn site(&self, name: &str) -> Result<Option<SiteRow>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {SITE_COLS} FROM sites WHERE name = $1"),
                [name],
                site,
            )
            .optional()?)
        })
    }

    fn sites(&self, org: &str, after: Option<&str>, limit: u32) -> Result<Vec<SiteRow>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SITE_COLS} FROM sites WHERE org = $1 AND name > $2 ORDER BY name LIMIT $3"
            ))?;
            let rows = stmt
                .query_map(params![org, after.unwrap_or(""), limit], site)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn delete_site(&self, name: &str, audit: &AuditEntry) -> Result<bool> {
        self.audited(audit, |tx| {
            Ok(tx.execute("DELETE FROM sites WHERE name = $1", [name])? == 1)
        })
    }

    fn create_oidc_client(&self, c: &OidcClientRow, audit: &AuditEntry) -> Result<()> {
        let uris = serde_json::to_string(&c.redirect_uris)?;
        self.audited(audit, |tx| {
            tx.execute(
                INSERT_OIDC_CLIENT,
                params![c.id, c.secret_hash, c.org, c.name, uris, c.created_ms],
            )?;
            Ok(true)
        })?;
        Ok(())
    }

    fn oidc_client(&self, id: &str) -> Result<Option<OidcClientRow>> {
        self.with(|c| {
            let row = c
                .query_row(
                    &format!("SELECT {OIDC_CLIENT_COLS} FROM oidc_clients WHERE id = $1"),
                    [id],
                    |r| {
                        Ok((
                            OidcClientRow {
                                id: r.get(0)?,
                                secret_hash: r.get(1)?,
                                org: r.get(2)?,
                                name: r.get(3)?,
                                redirect_uris: Vec::new(),
                                created_ms: r.get(5)?,
                            },
                            r.get::<_, String>(4)?,
                        ))
                    },
                )
                .optional()?;
            row.map(|(mut client, uris)| {
                client.redirect_uris = serde_json::from_str(&uris)?;
                Ok(client)
            })
            .transpose()
        })
    }

    fn record(&self, audit: &AuditEntry) -> Result<()> {
        self.audited(audit, |_| Ok(true))?;
        Ok(())
    }

    fn audit(&self, org: Option<&str>, before: Option<i64>, limit: u32) -> Result<Vec<AuditRow>> {
        let sql = audit_query(org.is_some(), before.is_some());
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(o) = org {
            values.push(o.to_string().into());
        }
        if let Some(b) = before {
            values.push(b.into());
        }
        values.push(i64::from(limit).into());
        self.with(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let raw = stmt
                .query_map(rusqlite::params_from_iter(values), |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            raw.into_iter()
                .map(|(seq, at_ms, actor, org, action, target, detail)| {
                    Ok(AuditRow {
                        seq,
                        entry: AuditEntry {
                            at_ms,
                            actor,
                            org,
                            action,
                            target,
                            detail: serde_json::from_str(&detail)?,
                        },
                    })
                })
                .collect()
        })
    }
}
