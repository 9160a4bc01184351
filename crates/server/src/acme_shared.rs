//! What the gateways of instances sharing one PostgreSQL share of ACME
//! ([`commons_gateway::acme::SharedAcme`]): certificates in the state
//! store's shared entries, sealed with the platform's key (instances
//! sharing a database share it; the engine refuses one that does not);
//! the right to order a host's certificate as a lease on the database (held
//! by one instance, lost with its connection); HTTP-01 answers in the bus's
//! key-value bucket when there is a bus, else in the shared entries.

use std::sync::Arc;
use std::time::Duration;

use commons_bus::acme::AcmeAnswers;
use commons_gateway::acme::{SharedAcme, SharedCert};
use commons_gateway::BoxFuture;
use commons_store::Leased;

use crate::AppState;

/// The kinds of the state store's shared entries used here.
const CERTIFICATE: &str = "gateway-certificate";
const ANSWER: &str = "acme-answer";
/// What certificates are sealed for (a key of their own, derived).
const SEALED_FOR: &str = "gateway-certificate";

pub struct SharedStoreAcme {
    state: Arc<AppState>,
    answers: Option<Arc<Answers>>,
}

/// The bus's answers' bucket, connected on first use.
struct Answers {
    bus: commons_bus::RelayConfig,
    bucket: tokio::sync::OnceCell<AcmeAnswers>,
}

impl Answers {
    async fn get(&self) -> Result<&AcmeAnswers, String> {
        self.bucket
            .get_or_try_init(|| AcmeAnswers::connect(&self.bus.url, &self.bus.name))
            .await
            .map_err(|e| e.to_string())
    }
}

impl SharedStoreAcme {
    /// `bus`: the platform's NATS server and name, when it has one.
    pub fn new(state: Arc<AppState>, bus: Option<commons_bus::RelayConfig>) -> SharedStoreAcme {
        SharedStoreAcme {
            state,
            answers: bus.map(|bus| {
                Arc::new(Answers {
                    bus,
                    bucket: tokio::sync::OnceCell::new(),
                })
            }),
        }
    }

    /// Runs `f` on the state store off the event loop.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AppState) -> Result<T, String> + Send + 'static,
    ) -> BoxFuture<Result<T, String>> {
        let state = self.state.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&state))
                .await
                .map_err(|e| e.to_string())?
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Sealed {
    chain: String,
    key: String,
}

fn open(state: &AppState, host: &str, body: &[u8]) -> Result<(String, String), String> {
    let plain = state.engine.open_sealed(SEALED_FOR, body).ok_or_else(|| {
        format!("the certificate of {host} does not open with this platform's key")
    })?;
    let sealed: Sealed = serde_json::from_slice(&plain).map_err(|e| e.to_string())?;
    Ok((sealed.chain, sealed.key))
}

impl SharedAcme for SharedStoreAcme {
    fn certificate(&self, host: &str) -> BoxFuture<Result<Option<(String, String)>, String>> {
        let host = host.to_string();
        self.blocking(move |state| {
            let body = state
                .engine
                .store()
                .shared(CERTIFICATE, &host)
                .map_err(|e| e.to_string())?;
            body.map(|b| open(state, &host, &b)).transpose()
        })
    }

    fn save_certificate(
        &self,
        host: &str,
        chain: &str,
        key: &str,
    ) -> BoxFuture<Result<(), String>> {
        let (host, sealed) = (
            host.to_string(),
            serde_json::to_vec(&Sealed {
                chain: chain.to_string(),
                key: key.to_string(),
            })
            .expect("strings serialise"),
        );
        self.blocking(move |state| {
            let body = state.engine.seal(SEALED_FOR, &sealed);
            state
                .engine
                .store()
                .put_shared(CERTIFICATE, &host, &body)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn certificates_since(&self, after: i64) -> BoxFuture<Result<(Vec<SharedCert>, i64), String>> {
        self.blocking(move |state| {
            let entries = state
                .engine
                .store()
                .shared_since(CERTIFICATE, after)
                .map_err(|e| e.to_string())?;
            let next = entries.last().map_or(after, |e| e.seq);
            let mut certs = Vec::new();
            for e in entries {
                match open(state, &e.name, &e.body) {
                    Ok((chain, key)) => certs.push((e.name, chain, key)),
                    Err(why) => tracing::warn!(host = %e.name, error = %why, "skipping a shared certificate"),
                }
            }
            Ok((certs, next))
        })
    }

    fn lease(&self, host: &str) -> BoxFuture<Result<Option<Box<dyn Send>>, String>> {
        let what = format!("acme:{host}");
        self.blocking(move |state| {
            match state
                .engine
                .store_config()
                .lease(&what, Duration::ZERO)
                .map_err(|e| e.to_string())?
            {
                Leased::Held(lease) => Ok(Some(Box::new(lease) as Box<dyn Send>)),
                Leased::Taken => Ok(None),
            }
        })
    }

    fn put_answer(&self, token: &str, key_authorization: &str) -> BoxFuture<Result<(), String>> {
        let (token, answer) = (token.to_string(), key_authorization.to_string());
        if let Some(answers) = &self.answers {
            let answers = answers.clone();
            return Box::pin(async move {
                answers
                    .get()
                    .await?
                    .put(&token, &answer)
                    .await
                    .map_err(|e| e.to_string())
            });
        }
        self.blocking(move |state| {
            state
                .engine
                .store()
                .put_shared(ANSWER, &token, answer.as_bytes())
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn answer(&self, token: &str) -> BoxFuture<Option<String>> {
        let token = token.to_string();
        if let Some(answers) = &self.answers {
            let answers = answers.clone();
            return Box::pin(async move { answers.get().await.ok()?.get(&token).await });
        }
        let asked = self.blocking(move |state| {
            state
                .engine
                .store()
                .shared(ANSWER, &token)
                .map_err(|e| e.to_string())
        });
        Box::pin(async move {
            let body = asked.await.ok()??;
            String::from_utf8(body).ok()
        })
    }

    fn remove_answer(&self, token: &str) -> BoxFuture<()> {
        let token = token.to_string();
        if let Some(answers) = &self.answers {
            let answers = answers.clone();
            return Box::pin(async move {
                if let Ok(bucket) = answers.get().await {
                    bucket.remove(&token).await
                }
            });
        }
        let removed = self.blocking(move |state| {
            state
                .engine
                .store()
                .delete_shared(ANSWER, &token)
                .map_err(|e| e.to_string())
        });
        Box::pin(async move {
            let _ = removed.await;
        })
    }
}
