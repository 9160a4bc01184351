//! A client of a platform's API over HTTP(S), with the API's own request
//! and response types: what `commons` uses once `commons login` names a
//! remote platform (`local` is the same over the data directory's socket).
//!
//! Plain `http://` is for loopback; the CLI checks that before it keeps a
//! credential.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::app::sites::NewSite;

/// No answer within this long is a failure to reach the platform.
const ANSWER_WITHIN: Duration = Duration::from_secs(120);

/// Why a call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The platform could not be reached, or did not answer in time.
    #[error("cannot reach {base}: {detail}")]
    Unreachable { base: String, detail: String },
    /// The platform does not accept the credential (401).
    #[error("{base} does not accept this login any more ({detail})")]
    Unauthorized { base: String, detail: String },
    /// The platform refused the request (another 4xx): its problem's detail.
    #[error("{detail}")]
    Refused { status: u16, detail: String },
    /// The platform failed (5xx) or answered something unexpected.
    #[error("{0}")]
    Failed(String),
}

use crate::outbound::{https_client, segment, Https};

/// A client of one platform's API.
pub struct ApiClient {
    base: String,
    headers: Vec<(&'static str, String)>,
    http: hyper_util::client::legacy::Client<Https, Full<Bytes>>,
    rt: tokio::runtime::Runtime,
}

/// One answer of the API, whatever its status.
pub struct Reply {
    pub status: u16,
    pub set_cookie: Option<String>,
    pub body: Value,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A token made by [`ApiClient::create_token`]: shown once.
pub struct MadeToken {
    pub token: String,
    pub id: String,
}

impl ApiClient {
    /// A client of the platform at `base` (`https://commons.example.org`),
    /// trusting this machine's certificate authorities.
    pub fn new(base: &str) -> Result<ApiClient, ClientError> {
        Ok(ApiClient {
            base: base.trim_end_matches('/').to_string(),
            headers: Vec::new(),
            http: https_client().map_err(ClientError::Failed)?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ClientError::Failed(format!("starting the async runtime: {e}")))?,
        })
    }

    /// A client that calls with an API token.
    pub fn with_token(base: &str, token: &str) -> Result<ApiClient, ClientError> {
        let mut c = ApiClient::new(base)?;
        c.headers.push(("authorization", format!("Bearer {token}")));
        Ok(c)
    }

    /// Sends one request; any answer (even 4xx) is returned, only failing
    /// to reach the platform is an error.
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("accept", "application/json")
            .header("user-agent", concat!("commons/", env!("CARGO_PKG_VERSION")));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in &self.headers {
            req = req.header(*k, v);
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::Refused {
                status: 400,
                detail: format!("{}{path}: {e}", self.base),
            })?;
        let unreachable = |detail: String| ClientError::Unreachable {
            base: self.base.clone(),
            detail,
        };
        self.rt.block_on(async {
            let res = tokio::time::timeout(ANSWER_WITHIN, self.http.request(req))
                .await
                .map_err(|_| {
                    unreachable(format!("no answer within {} s", ANSWER_WITHIN.as_secs()))
                })?
                .map_err(|e| unreachable(error_chain(&e)))?;
            let status = res.status().as_u16();
            let set_cookie = res
                .headers()
                .get(hyper::header::SET_COOKIE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            let body = serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
            Ok(Reply {
                status,
                set_cookie,
                body,
            })
        })
    }

    /// Sends one request and returns the body of a 2xx answer; any other
    /// answer becomes the error its problem document describes.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let reply = self.send(method, path, body)?;
        if reply.is_success() {
            Ok(reply.body)
        } else {
            Err(self.problem(&reply))
        }
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None)
    }

    /// What a failed answer means.
    pub fn problem(&self, reply: &Reply) -> ClientError {
        let detail = reply.body["detail"]
            .as_str()
            .or(reply.body["title"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| match &reply.body {
                Value::String(s) if !s.trim().is_empty() => s.trim().to_string(),
                _ => StatusCode::from_u16(reply.status)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|_| reply.status.to_string()),
            });
        match reply.status {
            401 => ClientError::Unauthorized {
                base: self.base.clone(),
                detail,
            },
            400..=499 => ClientError::Refused {
                status: reply.status,
                detail,
            },
            _ => ClientError::Failed(format!("{}: {detail}", self.base)),
        }
    }

    /// Logs in with a password; later calls carry the session (and its
    /// CSRF token). The password is not kept.
    pub fn login(&mut self, email: &str, password: &str) -> Result<(), ClientError> {
        let reply = self.send(
            Method::POST,
            "/api/login",
            Some(&json!({ "email": email, "password": password })),
        )?;
        if !reply.is_success() {
            return Err(self.problem(&reply));
        }
        let cookie = reply
            .set_cookie
            .as_deref()
            .and_then(|c| c.split(';').next())
            .map(str::to_string)
            .ok_or_else(|| {
                ClientError::Failed(format!(
                    "{} answered the log-in without a session",
                    self.base
                ))
            })?;
        let csrf = reply.body["csrf"].as_str().unwrap_or_default().to_string();
        self.headers.push(("cookie", cookie));
        self.headers.push(("x-csrf-token", csrf));
        Ok(())
    }

    /// Ends the session [`ApiClient::login`] began (best effort).
    pub fn logout(&self) {
        let _ = self.send(Method::POST, "/api/logout", None);
    }

    /// Makes an API token of the signed-in user.
    pub fn create_token(&self, name: &str, scopes: &[&str]) -> Result<MadeToken, ClientError> {
        let made = self.call(
            Method::POST,
            "/api/tokens",
            Some(&json!({ "name": name, "scopes": scopes })),
        )?;
        let token = made["token"].as_str().unwrap_or_default().to_string();
        let id = made["record"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if token.is_empty() || id.is_empty() {
            return Err(ClientError::Failed(format!(
                "{} made no token: {made}",
                self.base
            )));
        }
        Ok(MadeToken { token, id })
    }

    /// Revokes a token; false when the platform did not.
    pub fn revoke_token(&self, id: &str) -> bool {
        self.send(
            Method::DELETE,
            &format!("/api/tokens/{}", segment(id)),
            None,
        )
        .is_ok_and(|r| r.is_success())
    }

    /// Who the credential belongs to, and their roles.
    pub fn me(&self) -> Result<Value, ClientError> {
        self.get("/api/me")
    }

    /// The catalog's entries.
    pub fn catalog(&self) -> Result<Vec<Value>, ClientError> {
        Ok(self.get("/api/catalog")?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// What deploying `site` into `org` would change.
    pub fn plan(&self, org: &str, site: &NewSite) -> Result<commons_engine::Plan, ClientError> {
        let v = self.call(
            Method::POST,
            &format!("/api/orgs/{}/plan", segment(org)),
            Some(&to_value(site)),
        )?;
        serde_json::from_value(v)
            .map_err(|e| ClientError::Failed(format!("an unexpected plan: {e}")))
    }

    /// A site and its last deploy; `None` when there is no such site.
    pub fn site(&self, name: &str) -> Result<Option<Value>, ClientError> {
        let reply = self.send(Method::GET, &site_path(name), None)?;
        match reply.status {
            200 => Ok(Some(reply.body)),
            404 => Ok(None),
            _ => Err(self.problem(&reply)),
        }
    }

    /// Starts deploying a new site into `org`.
    pub fn create_site(&self, org: &str, site: &NewSite) -> Result<Value, ClientError> {
        self.call(
            Method::POST,
            &format!("/api/orgs/{}/sites", segment(org)),
            Some(&to_value(site)),
        )
    }

    /// Starts deploying an existing site again.
    pub fn redeploy(&self, name: &str, site: &NewSite) -> Result<Value, ClientError> {
        self.call(Method::PUT, &site_path(name), Some(&to_value(site)))
    }

    /// Every site of `org`, page by page.
    pub fn sites(&self, org: &str) -> Result<Vec<Value>, ClientError> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/api/orgs/{}/sites?limit=1000", segment(org));
            if let Some(a) = &after {
                path.push_str(&format!("&after={}", segment(a)));
            }
            let v = self.get(&path)?;
            items.extend(v["items"].as_array().cloned().unwrap_or_default());
            match v["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return Ok(items),
            }
        }
    }

    /// The last `lines` of a site's logs (of one component, or all), with
    /// the offsets to follow them from.
    pub fn logs(
        &self,
        name: &str,
        component: Option<&str>,
        lines: usize,
    ) -> Result<Value, ClientError> {
        let mut path = format!("{}/logs?lines={lines}", site_path(name));
        if let Some(c) = component {
            path.push_str(&format!("&component={}", segment(c)));
        }
        self.get(&path)
    }

    /// A component's log after `offset`.
    pub fn logs_after(
        &self,
        name: &str,
        component: &str,
        offset: u64,
    ) -> Result<Value, ClientError> {
        self.get(&format!(
            "{}/logs?component={}&after={offset}",
            site_path(name),
            segment(component)
        ))
    }

    /// The site's deploy history.
    pub fn history(
        &self,
        name: &str,
    ) -> Result<Vec<commons_engine::records::RecordEntry>, ClientError> {
        let v = self.get(&format!("{}/history", site_path(name)))?;
        serde_json::from_value(v["items"].clone())
            .map_err(|e| ClientError::Failed(format!("an unexpected history: {e}")))
    }

    /// What changed between two records of the site's history.
    pub fn history_diff(&self, name: &str, a: &str, b: &str) -> Result<String, ClientError> {
        let v = self.get(&format!(
            "{}/history/diff?a={}&b={}",
            site_path(name),
            segment(a),
            segment(b)
        ))?;
        Ok(v["diff"].as_str().unwrap_or_default().to_string())
    }

    /// Backs the site up on the platform.
    pub fn backup(&self, name: &str) -> Result<Value, ClientError> {
        self.call(Method::POST, &format!("{}/backups", site_path(name)), None)
    }

    /// Destroys the site.
    pub fn destroy(&self, name: &str) -> Result<Value, ClientError> {
        self.call(Method::DELETE, &site_path(name), None)
    }
}

fn site_path(name: &str) -> String {
    format!("/api/sites/{}", segment(name))
}

fn to_value(site: &NewSite) -> Value {
    serde_json::to_value(site).expect("a new site serialises")
}

/// The platform's address as given, checked and without a trailing slash.
pub fn platform_address(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("\"{url}\" is not a URL: {e}"))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") => {}
        // A password must not cross a network in clear; loopback is this machine.
        Some("http") if is_loopback(host) => {}
        Some("http") => {
            return Err(format!(
                "refusing to send a password to {url} over plain HTTP; use https:// \
                 (plain http:// only for this machine: 127.0.0.1, [::1] or localhost)"
            ))
        }
        _ => {
            return Err(format!(
                "\"{url}\" is not a platform's address; give one like https://commons.example.org"
            ))
        }
    }
    if uri.path().len() > 1 || uri.query().is_some() {
        return Err(format!(
            "give the platform's address alone, without a path: {}://{}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map(|a| a.as_str()).unwrap_or(host)
        ));
    }
    Ok(url.to_string())
}

pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// An error and its causes, on one line (hyper's own message is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
