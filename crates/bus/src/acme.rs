//! ACME HTTP-01 answers in a JetStream key-value bucket (`NAME_ACME`), so
//! that whichever gateway an ACME server reaches answers a challenge that
//! another gateway's order made. An answer is public once asked for (it is
//! served over plain HTTP); it expires from the bucket after ten minutes
//! if the order that made it never removes it.

use std::time::Duration;

use async_nats::jetstream::kv;

use crate::{err, BusError};

/// How long an answer outlives an order that never removed it.
const ANSWER_AGE: Duration = Duration::from_secs(600);

/// The ACME answers of the platform named `name` (see [`crate::valid_name`]).
#[derive(Clone)]
pub struct AcmeAnswers {
    store: kv::Store,
}

impl AcmeAnswers {
    pub async fn connect(url: &str, name: &str) -> Result<AcmeAnswers, BusError> {
        let bucket = format!("{}_ACME", name.to_ascii_uppercase());
        let store = crate::kv_bucket(
            url,
            &bucket,
            "ACME HTTP-01 answers, for every gateway",
            Some(ANSWER_AGE),
            None,
        )
        .await?;
        Ok(AcmeAnswers { store })
    }

    pub async fn put(&self, token: &str, answer: &str) -> Result<(), BusError> {
        self.store
            .put(token, answer.as_bytes().to_vec().into())
            .await
            .map(|_| ())
            .map_err(|e| err("writing an ACME answer")(&e))
    }

    /// The answer for `token`, if an order put one (and it has not expired).
    pub async fn get(&self, token: &str) -> Option<String> {
        let bytes = self.store.get(token).await.ok()??;
        String::from_utf8(bytes.to_vec()).ok()
    }

    pub async fn remove(&self, token: &str) {
        let _ = self.store.purge(token).await;
    }
}
