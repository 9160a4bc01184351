//! The control plane as the agent calls it: JSON over HTTP/1.1 over TLS to
//! the pinned CA, with the node's certificate once it has one. The agent
//! always dials out; connections are kept and reused.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{
    Assignments, Certified, Heartbeat, JoinRequest, RenewRequest, Report, UsageBatch,
};
use crate::tls::{client_config, ClientCert};
use crate::AgentError;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A control plane at `base` (`https://HOST:PORT`).
pub struct ControlPlane {
    base: String,
    client: Client<Https, Full<Bytes>>,
}

/// How long a call may take beyond the wait it asked for.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

impl ControlPlane {
    pub fn new(base: &str, pin: &str, cert: Option<ClientCert<'_>>) -> Result<Self, AgentError> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("https://") {
            return Err(AgentError::Input(format!(
                "the control plane's agent address must be https:// (got \"{base}\")"
            )));
        }
        let tls = client_config(pin, cert)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(ControlPlane { base, client })
    }

    async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        extra_wait: Duration,
    ) -> Result<Option<R>, AgentError> {
        let bytes = self.raw(method, path, body, extra_wait).await?;
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AgentError::Failed(format!("the control plane's answer: {e}")))
    }

    /// A call's body, when it succeeded (a problem's detail when not).
    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        extra_wait: Duration,
    ) -> Result<Bytes, AgentError> {
        let mut req = Request::builder().uri(format!("{}{path}", self.base));
        if body.is_some() {
            let kind = if method == Method::PUT {
                "application/x-tar"
            } else {
                "application/json"
            };
            req = req.header("content-type", kind);
        }
        let req = req
            .method(method)
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| AgentError::Failed(e.to_string()))?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| {
                // The TLS refusal (a wrong pin) is the source of the source.
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text = format!("{text}: {s}");
                    source = s.source();
                }
                AgentError::Failed(format!("cannot reach the control plane: {text}"))
            })?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| AgentError::Failed(e.to_string()))?
                .to_bytes();
            Ok::<_, AgentError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(CALL_TIMEOUT + extra_wait, call)
            .await
            .map_err(|_| AgentError::Failed("the control plane did not answer in time".into()))??;
        if status == StatusCode::NO_CONTENT {
            return Ok(Bytes::new());
        }
        if !status.is_success() {
            let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|p| p["detail"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(AgentError::Refused(format!("{status}: {detail}")));
        }
        Ok(bytes)
    }

    async fn post<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<Option<R>, AgentError> {
        let body = serde_json::to_vec(body).map_err(|e| AgentError::Failed(e.to_string()))?;
        self.call(Method::POST, path, Some(body), Duration::ZERO)
            .await
    }

    fn answer<R>(r: Option<R>) -> Result<R, AgentError> {
        r.ok_or_else(|| AgentError::Failed("the control plane answered nothing".into()))
    }

    pub async fn join(&self, req: &JoinRequest) -> Result<Certified, AgentError> {
        Self::answer(self.post("/agent/v1/join", req).await?)
    }

    pub async fn renew(&self, node: &str, req: &RenewRequest) -> Result<Certified, AgentError> {
        Self::answer(
            self.post(&format!("/agent/v1/nodes/{node}/renew"), req)
                .await?,
        )
    }

    pub async fn heartbeat(&self, node: &str, hb: &Heartbeat) -> Result<(), AgentError> {
        self.post::<_, serde_json::Value>(&format!("/agent/v1/nodes/{node}/heartbeat"), hb)
            .await
            .map(|_| ())
    }

    /// The node's operations after `after`, waiting up to `wait` for one.
    pub async fn assignments(
        &self,
        node: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Assignments, AgentError> {
        let path = format!(
            "/agent/v1/nodes/{node}/assignments?after={after}&wait={}",
            wait.as_secs()
        );
        Self::answer(self.call(Method::GET, &path, None, wait).await?)
    }

    pub async fn report(&self, node: &str, op: &str, report: &Report) -> Result<(), AgentError> {
        self.post::<_, serde_json::Value>(
            &format!("/agent/v1/nodes/{node}/operations/{op}"),
            report,
        )
        .await
        .map(|_| ())
    }

    /// Sends `bytes` as `site`'s snapshot, on its way to another node.
    pub async fn upload_snapshot(
        &self,
        node: &str,
        site: &str,
        bytes: Vec<u8>,
    ) -> Result<(), AgentError> {
        let path = format!("/agent/v1/nodes/{node}/snapshots/{site}");
        self.call::<serde_json::Value>(Method::PUT, &path, Some(bytes), Duration::from_secs(600))
            .await
            .map(|_| ())
    }

    /// The snapshot of `site` shipped to this node.
    pub async fn download_snapshot(&self, node: &str, site: &str) -> Result<Vec<u8>, AgentError> {
        let path = format!("/agent/v1/nodes/{node}/snapshots/{site}");
        self.raw(Method::GET, &path, None, Duration::from_secs(600))
            .await
            .map(|b| b.to_vec())
    }

    pub async fn usage(&self, node: &str, batch: &UsageBatch) -> Result<(), AgentError> {
        self.post::<_, serde_json::Value>(&format!("/agent/v1/nodes/{node}/usage"), batch)
            .await
            .map(|_| ())
    }
}
