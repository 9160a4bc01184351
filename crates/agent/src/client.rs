//! The control plane as the agent calls it: JSON over HTTP/1.1 over TLS to
//! the pinned CA, with the node's certificate once it has one. The agent
//! always dials out; connections are kept and reused.

use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
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

/// A request's body: JSON in memory, or a file streamed from disk.
type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

/// A control plane at `base` (`https://HOST:PORT`).
pub struct ControlPlane {
    base: String,
    client: Client<Https, Body>,
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
        let kind = body.as_ref().map(|_| "application/json");
        let body = full(body.unwrap_or_default());
        self.send(method, path, kind, body, extra_wait, None).await
    }

    /// Sends a request; its answer's body is returned, or written to `into`
    /// (then nothing is returned) when the call succeeds.
    async fn send(
        &self,
        method: Method,
        path: &str,
        kind: Option<&str>,
        body: Body,
        extra_wait: Duration,
        into: Option<&mut tokio::fs::File>,
    ) -> Result<Bytes, AgentError> {
        let mut req = Request::builder().uri(format!("{}{path}", self.base));
        if let Some(kind) = kind {
            req = req.header("content-type", kind);
        }
        let req = req
            .method(method)
            .body(body)
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
            let failed = |e: &dyn std::fmt::Display| AgentError::Failed(e.to_string());
            let mut body = resp.into_body();
            if let (Some(file), true) = (into, status.is_success()) {
                use tokio::io::AsyncWriteExt;
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| failed(&e))?;
                    if let Ok(data) = frame.into_data() {
                        file.write_all(&data).await.map_err(|e| failed(&e))?;
                    }
                }
                file.flush().await.map_err(|e| failed(&e))?;
                return Ok((status, Bytes::new()));
            }
            let bytes = body.collect().await.map_err(|e| failed(&e))?.to_bytes();
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

    /// Streams the file at `from` as an increment of `site`, on its way to
    /// another node.
    pub async fn upload_increment(
        &self,
        node: &str,
        site: &str,
        from: &std::path::Path,
    ) -> Result<(), AgentError> {
        let path = format!("/agent/v1/nodes/{node}/snapshots/{site}");
        let file = tokio::fs::File::open(from)
            .await
            .map_err(|e| AgentError::Failed(format!("{}: {e}", from.display())))?;
        let frames = futures_util::TryStreamExt::map_ok(
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024),
            hyper::body::Frame::data,
        );
        let body = BodyExt::boxed(StreamBody::new(frames));
        self.send(
            Method::PUT,
            &path,
            Some("application/octet-stream"),
            body,
            Duration::from_secs(3600),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Streams the increment of `site` shipped to this node into `into`.
    pub async fn download_increment(
        &self,
        node: &str,
        site: &str,
        into: &mut tokio::fs::File,
    ) -> Result<(), AgentError> {
        let path = format!("/agent/v1/nodes/{node}/snapshots/{site}");
        self.send(
            Method::GET,
            &path,
            None,
            full(Vec::new()),
            Duration::from_secs(3600),
            Some(into),
        )
        .await
        .map(|_| ())
    }

    pub async fn usage(&self, node: &str, batch: &UsageBatch) -> Result<(), AgentError> {
        self.post::<_, serde_json::Value>(&format!("/agent/v1/nodes/{node}/usage"), batch)
            .await
            .map(|_| ())
    }
}
