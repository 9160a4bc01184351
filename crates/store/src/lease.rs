//! Work that only one platform instance may do at a time, when several
//! share one PostgreSQL (deploying one site, closing a period): a session-level
//! advisory lock on a connection of its own, held while the work runs and
//! released when the holder is dropped — or, if its process dies, when
//! PostgreSQL sees the connection close. The embedded store has one
//! machine, where the engine's file locks already do this.

use crate::{Result, StoreConfig, StoreError};

/// A held lease; dropping it lets another instance take it.
pub struct Lease {
    /// Dropped, it tells the thread holding the lock's connection to close
    /// it (the blocking client lives on a thread of its own, since callers
    /// may be inside an async runtime).
    _release: Option<std::sync::mpsc::Sender<()>>,
}

/// What trying a lease found.
pub enum Leased {
    /// Ours, until dropped.
    Held(Lease),
    /// Another instance holds it now.
    Taken,
}

impl StoreConfig {
    /// Takes the lease named `what` (e.g. `deploy:wiki`), waiting up to
    /// `wait` (zero: not at all) for the instance that holds it, in
    /// PostgreSQL's queue for the lock; [`Leased::Taken`] if it still holds
    /// it then. With the embedded store there is nobody else: always held.
    pub fn lease(&self, what: &str, wait: std::time::Duration) -> Result<Leased> {
        let StoreConfig::Postgres { url, schema } = self else {
            return Ok(Leased::Held(Lease { _release: None }));
        };
        let (url, schema, what) = (url.clone(), schema.clone(), what.to_string());
        let (answer_tx, answer) = std::sync::mpsc::channel::<Result<bool>>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("commons-lease".into())
            .spawn(move || {
                let pg = |e: postgres::Error| StoreError::Postgres(e.to_string());
                let taken = postgres::Client::connect(&url, postgres::NoTls)
                    .map_err(pg)
                    .and_then(|mut client| {
                        // Two 32-bit keys: the schema (one platform) and the name in it.
                        if wait.is_zero() {
                            let got: bool = client
                                .query_one(
                                    "SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))",
                                    &[&schema, &what],
                                )
                                .map_err(pg)?
                                .get(0);
                            return Ok((got, client));
                        }
                        client
                            .batch_execute(&format!(
                                "SET lock_timeout = {}",
                                wait.as_millis().max(1)
                            ))
                            .map_err(pg)?;
                        match client.execute(
                            "SELECT pg_advisory_lock(hashtext($1), hashtext($2))",
                            &[&schema, &what],
                        ) {
                            Ok(_) => Ok((true, client)),
                            Err(e)
                                if e.code()
                                    == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                            {
                                Ok((false, client))
                            }
                            Err(e) => Err(pg(e)),
                        }
                    });
                match taken {
                    Ok((got, client)) => {
                        let _ = answer_tx.send(Ok(got));
                        if got {
                            // Held until the lease is dropped; closing the
                            // connection releases the lock.
                            let _ = released.recv();
                        }
                        drop(client);
                    }
                    Err(e) => {
                        let _ = answer_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::Postgres(format!("starting the lease's thread: {e}")))?;
        let got = answer
            .recv()
            .map_err(|_| StoreError::Postgres("the lease's thread stopped".into()))??;
        Ok(if got {
            Leased::Held(Lease {
                _release: Some(release),
            })
        } else {
            Leased::Taken
        })
    }
}
