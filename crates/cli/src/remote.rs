//! A remote platform: `commons login URL` keeps an API token for it in the
//! data directory, and the site commands (catalog, plan, deploy, list,
//! status, logs, history, backup, destroy) then act there through its REST
//! API instead of on this machine. `commons logout` revokes the token and
//! forgets it.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{output, Command, Failure, TargetArgs};

/// How long `commons deploy` waits for a remote deploy to finish.
const DEPLOY_WAIT: Duration = Duration::from_secs(30 * 60);

/// The platform this data directory's CLI drives, and how it signs in.
#[derive(Serialize, Deserialize, Clone)]
pub struct Remote {
    /// Its address, without a trailing slash: `https://commons.example.org`.
    pub url: String,
    pub email: String,
    /// The organisation new sites go to.
    pub org: String,
    /// The token's id, when `commons login` made it (and so revokes it).
    pub token_id: Option<String>,
    pub token: String,
}

fn remote_file(home: &Path) -> PathBuf {
    commons_runtime::Layout::new(home).remote_file()
}

/// The remote platform of `home`, if `commons login` named one.
pub fn load(home: &Path) -> Result<Option<Remote>, Failure> {
    let path = remote_file(home);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Failure::Failed(format!(
                "{} is damaged ({e}); `commons logout` removes it",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::Failed(format!("reading {}: {e}", path.display()))),
    }
}

fn save(home: &Path, remote: &Remote) -> Result<(), Failure> {
    commons_server::private_dir(home)
        .map_err(|e| Failure::Failed(format!("creating {}: {e}", home.display())))?;
    let bytes = serde_json::to_vec_pretty(remote).expect("serialises");
    // Mode 0600: the token is a credential.
    commons_runtime::layout::write_whole(&remote_file(home), &bytes)
        .map_err(|e| Failure::Failed(format!("writing {}: {e}", remote_file(home).display())))
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A client of one platform's API.
struct Client {
    base: String,
    headers: Vec<(&'static str, String)>,
    http: hyper_util::client::legacy::Client<Https, Full<Bytes>>,
    rt: tokio::runtime::Runtime,
}

/// One answer of the API.
struct Reply {
    status: StatusCode,
    set_cookie: Option<String>,
    body: Value,
}

impl Client {
    fn new(base: &str) -> Result<Client, Failure> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| {
                Failure::Failed(format!(
                    "no trusted certificate authorities on this machine ({e}); \
                     install ca-certificates or set SSL_CERT_FILE"
                ))
            })?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Client {
            base: base.to_string(),
            headers: Vec::new(),
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https),
            rt: crate::runtime(),
        })
    }

    fn with_token(base: &str, token: &str) -> Result<Client, Failure> {
        let mut c = Client::new(base)?;
        c.headers.push(("authorization", format!("Bearer {token}")));
        Ok(c)
    }

    /// Sends one request; any answer (even 4xx) is returned, only failing
    /// to reach the platform is an error.
    fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Reply, Failure> {
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
            .map_err(|e| Failure::Input(format!("{}{path}: {e}", self.base)))?;
        let unreachable =
            |e: &dyn std::fmt::Display| Failure::Failed(format!("cannot reach {}: {e}", self.base));
        self.rt.block_on(async {
            let res = tokio::time::timeout(Duration::from_secs(120), self.http.request(req))
                .await
                .map_err(|_| unreachable(&"no answer within 120 s"))?
                .map_err(|e| unreachable(&error_chain(&e)))?;
            let status = res.status();
            let set_cookie = res
                .headers()
                .get(hyper::header::SET_COOKIE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(&e))?
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
    /// answer becomes the failure its problem document describes.
    fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let reply = self.send(method, path, body)?;
        if reply.status.is_success() {
            Ok(reply.body)
        } else {
            Err(self.problem(&reply))
        }
    }

    fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(Method::GET, path, None)
    }

    /// What a failed answer means, for people.
    fn problem(&self, reply: &Reply) -> Failure {
        let detail = reply.body["detail"]
            .as_str()
            .or(reply.body["title"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| match &reply.body {
                Value::String(s) if !s.trim().is_empty() => s.trim().to_string(),
                _ => reply.status.to_string(),
            });
        match reply.status {
            StatusCode::UNAUTHORIZED => Failure::Input(format!(
                "{} does not accept this login any more ({detail}); run `commons login {}` again",
                self.base, self.base
            )),
            s if s.is_client_error() => Failure::Input(detail),
            _ => Failure::Failed(format!("{}: {detail}", self.base)),
        }
    }
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

/// The platform's address as given, checked and without a trailing slash.
fn platform_url(url: &str) -> Result<String, Failure> {
    let url = url.trim().trim_end_matches('/');
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| Failure::Input(format!("\"{url}\" is not a URL: {e}")))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") => {}
        // A password must not cross a network in clear; loopback is this machine.
        Some("http") if is_loopback(host) => {}
        Some("http") => {
            return Err(Failure::Input(format!(
                "refusing to send a password to {url} over plain HTTP; use https:// \
                 (plain http:// only for this machine: 127.0.0.1, [::1] or localhost)"
            )))
        }
        _ => {
            return Err(Failure::Input(format!(
                "\"{url}\" is not a platform's address; give one like https://commons.example.org"
            )))
        }
    }
    if uri.path().len() > 1 || uri.query().is_some() {
        return Err(Failure::Input(format!(
            "give the platform's address alone, without a path: {}://{}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map(|a| a.as_str()).unwrap_or(host)
        )));
    }
    Ok(url.to_string())
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// One line from standard input, or an error naming what was expected.
fn read_line(what: &str) -> Result<String, Failure> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Failure::Failed(format!("reading the {what}: {e}")))?;
    let line = line.trim_end_matches(['\r', '\n']).to_string();
    if line.is_empty() {
        return Err(Failure::Input(format!("no {what} given")));
    }
    Ok(line)
}

/// What `commons login` was asked.
pub struct LoginArgs {
    pub url: String,
    pub email: Option<String>,
    pub org: Option<String>,
    pub token_stdin: bool,
}

/// Signs in to a platform and keeps a token for it: with a password (asked
/// on the terminal, or one line of standard input), which makes a token of
/// the CLI's own, or with an existing token read from standard input.
pub fn login(home: &Path, args: LoginArgs, as_json: bool) -> Result<(), Failure> {
    let url = platform_url(&args.url)?;
    let (token, token_id) = if args.token_stdin {
        (read_line("token")?, None)
    } else {
        let (token, id) = token_from_password(&url, args.email.as_deref())?;
        (token, Some(id))
    };
    let client = Client::with_token(&url, &token)?;
    let me = client.get("/api/me")?;
    let email = me["user"]["email"].as_str().unwrap_or_default().to_string();
    let org = match args.org {
        Some(org) => {
            let member = me["roles"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["org"] == org.as_str());
            if !member {
                return Err(Failure::Input(format!(
                    "{email} is not a member of the organisation \"{org}\" on {url}"
                )));
            }
            org
        }
        None => deploying_org(&me).ok_or_else(|| {
            Failure::Input(format!(
                "{email} may deploy in no organisation on {url}: ask an organisation's \
                 admin to make you an operator, then `commons login {url} --org ORG`"
            ))
        })?,
    };
    let remote = Remote {
        url: url.clone(),
        email: email.clone(),
        org: org.clone(),
        token_id,
        token,
    };
    // A previous login's token is revoked rather than left behind.
    if let Some(old) = load(home)? {
        revoke(&old);
    }
    save(home, &remote)?;
    if as_json {
        output::json(&json!({ "url": url, "email": email, "org": org }));
    } else {
        eprintln!(
            "{:>12} to {url} as {email}; new sites go to the organisation \"{org}\"",
            "Logged in"
        );
        eprintln!("site commands now act there; `commons logout` returns them to this machine");
    }
    Ok(())
}

/// The first organisation the account may deploy in.
fn deploying_org(me: &Value) -> Option<String> {
    me["roles"]
        .as_array()?
        .iter()
        .find(|r| r["role"] == "admin" || r["role"] == "operator")
        .and_then(|r| r["org"].as_str())
        .map(str::to_string)
}

/// Logs in with a password, makes a token with every scope (everything the
/// CLI does, revoking that token at `commons logout` included), and ends
/// the session: only the token is kept.
fn token_from_password(url: &str, email: Option<&str>) -> Result<(String, String), Failure> {
    let interactive = std::io::stdin().is_terminal();
    let email = match email {
        Some(e) => e.to_string(),
        None => {
            if interactive {
                eprint!("Email: ");
            }
            read_line("email")?
        }
    };
    let password = if interactive {
        rpassword::prompt_password("Password: ")
            .map_err(|e| Failure::Failed(format!("reading the password: {e}")))?
    } else {
        read_line("password")?
    };
    let mut client = Client::new(url)?;
    let reply = client.send(
        Method::POST,
        "/api/login",
        Some(&json!({ "email": email, "password": password })),
    )?;
    drop(password);
    if !reply.status.is_success() {
        return Err(match reply.status {
            StatusCode::UNAUTHORIZED => Failure::Input(format!(
                "{url} refused the email or password; sign up in its console ({url}/console/signup) \
                 if you have no account"
            )),
            _ => client.problem(&reply),
        });
    }
    let cookie = reply
        .set_cookie
        .as_deref()
        .and_then(|c| c.split(';').next())
        .map(str::to_string)
        .ok_or_else(|| Failure::Failed(format!("{url} answered the log-in without a session")))?;
    let csrf = reply.body["csrf"].as_str().unwrap_or_default().to_string();
    client.headers.push(("cookie", cookie));
    client.headers.push(("x-csrf-token", csrf));
    let host = commons_server::host_name().unwrap_or_else(|| "this machine".into());
    let made = client.call(
        Method::POST,
        "/api/tokens",
        Some(&json!({ "name": format!("commons CLI on {host}"), "scopes": commons_server::accounts::USER_SCOPES })),
    );
    // The session is not needed any more, whatever happened.
    let _ = client.send(Method::POST, "/api/logout", None);
    let made = made?;
    let token = made["token"].as_str().unwrap_or_default().to_string();
    let id = made["record"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if token.is_empty() || id.is_empty() {
        return Err(Failure::Failed(format!("{url} made no token: {made}")));
    }
    Ok((token, id))
}

/// Revokes the token `commons login` made (best effort: the platform may be
/// gone, or the token already revoked).
fn revoke(remote: &Remote) -> bool {
    let Some(id) = &remote.token_id else {
        return false;
    };
    Client::with_token(&remote.url, &remote.token)
        .and_then(|c| c.send(Method::DELETE, &format!("/api/tokens/{id}"), None))
        .map(|r| r.status.is_success())
        .unwrap_or(false)
}

/// Forgets the remote platform (revoking the token `commons login` made).
pub fn logout(home: &Path, as_json: bool) -> Result<(), Failure> {
    let Some(remote) = load(home)? else {
        if !as_json {
            eprintln!("not logged in to any platform; commands act on this machine");
        } else {
            output::json(&json!({ "logged_out": null }));
        }
        return Ok(());
    };
    let revoked = revoke(&remote);
    std::fs::remove_file(remote_file(home))
        .map_err(|e| Failure::Failed(format!("removing {}: {e}", remote_file(home).display())))?;
    if as_json {
        output::json(&json!({ "logged_out": remote.url, "token_revoked": revoked }));
    } else {
        eprintln!("{:>12} of {}", "Logged out", remote.url);
        if remote.token_id.is_some() && !revoked {
            output::warn(&format!(
                "could not revoke the token \"{}\"; revoke it in {}/console/tokens",
                remote.token_id.as_deref().unwrap_or_default(),
                remote.url
            ));
        }
    }
    Ok(())
}

/// Runs `command` on the remote platform; `None` for the commands that act
/// on this machine whatever the login (blueprints, the platform daemon, the
/// ledger...).
pub fn run(remote: &Remote, command: &Command, as_json: bool) -> Option<Result<(), Failure>> {
    let client = match Client::with_token(&remote.url, &remote.token) {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    let r = Remotely {
        remote,
        client,
        json: as_json,
    };
    Some(match command {
        Command::Catalog => r.catalog(),
        Command::Plan(t) => r.plan(t),
        Command::Deploy {
            target, hosting, ..
        } => r.deploy(target, hosting.map(Into::into)),
        Command::List => r.list(),
        Command::Status { name } => match name {
            Some(n) => r.status(n),
            None if Path::new(commons_blueprint::FILE_NAME).exists() => {
                crate::name_or_local(None).and_then(|n| r.status(&n))
            }
            None => r.list(),
        },
        Command::Logs {
            name,
            component,
            follow,
            lines,
        } => crate::name_or_local(name.clone())
            .and_then(|n| r.logs(&n, component.as_deref(), *lines, *follow)),
        Command::History { name, diff } => {
            crate::name_or_local(name.clone()).and_then(|n| r.history(&n, diff.as_deref()))
        }
        Command::Backup { name } => crate::name_or_local(name.clone()).and_then(|n| r.backup(&n)),
        Command::Destroy { name, .. } => {
            crate::name_or_local(name.clone()).and_then(|n| r.destroy(&n))
        }
        Command::Wake { .. } | Command::Restore { .. } | Command::Clone { .. } => {
            Err(Failure::Input(format!(
                "this command acts on this machine's deployments, and site commands act on {} \
                 (logged in as {}); `commons logout` first to use it here",
                remote.url, remote.email
            )))
        }
        _ => return None,
    })
}

/// The site commands, through the API.
struct Remotely<'a> {
    remote: &'a Remote,
    client: Client,
    json: bool,
}

/// Everything but letters, digits, `-`, `_` and `.` is escaped.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

/// A path segment or query value as the URL must carry it (site and
/// component names are slugs; anything else is escaped rather than trusted).
fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

impl Remotely<'_> {
    fn catalog(&self) -> Result<(), Failure> {
        let v = self.client.get("/api/catalog")?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        if self.json {
            output::json(&items);
        } else {
            output::catalog(&items);
        }
        Ok(())
    }

    /// The body of a deploy or plan: a catalog entry, or the blueprint
    /// with every file it needs.
    fn new_site(
        &self,
        t: &TargetArgs,
        hosting: Option<commons_engine::Hosting>,
    ) -> Result<(String, Value), Failure> {
        let inputs: serde_json::Map<String, Value> = t
            .inputs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let mut body = json!({ "inputs": inputs, "hosting": hosting });
        let name = match t
            .target
            .as_deref()
            .and_then(|t| t.strip_prefix(commons_server::catalog::PREFIX))
        {
            Some(entry) => {
                body["catalog"] = entry.into();
                t.name.clone().unwrap_or_else(|| entry.to_string())
            }
            None => {
                let mut path = PathBuf::from(t.target.as_deref().unwrap_or("."));
                if path.is_dir() {
                    path = path.join(commons_blueprint::FILE_NAME);
                }
                // Checked here, so mistakes show with this machine's file names.
                let bp = commons_blueprint::load(&path, &commons_blueprint::FileSystem)
                    .map_err(commons_engine::EngineError::Blueprint)?;
                let (files, root) = commons_engine::source_files(&bp)?;
                let files: serde_json::Map<String, Value> = files
                    .into_iter()
                    .map(|(p, bytes)| {
                        (
                            p,
                            base64::engine::general_purpose::STANDARD
                                .encode(bytes)
                                .into(),
                        )
                    })
                    .collect();
                body["source"] = json!({ "root": root, "files": files });
                t.name.clone().unwrap_or(bp.name)
            }
        };
        body["name"] = name.clone().into();
        Ok((name, body))
    }

    fn plan(&self, t: &TargetArgs) -> Result<(), Failure> {
        let (_, body) = self.new_site(t, None)?;
        let path = format!("/api/orgs/{}/plan", segment(&self.remote.org));
        let v = self.client.call(Method::POST, &path, Some(&body))?;
        if self.json {
            output::json(&v);
        } else {
            let plan: commons_engine::Plan = serde_json::from_value(v)
                .map_err(|e| Failure::Failed(format!("an unexpected plan: {e}")))?;
            output::plan(&plan);
        }
        Ok(())
    }

    /// Deploys (a new site, or the site again), then follows the deploy
    /// until it ends.
    fn deploy(
        &self,
        t: &TargetArgs,
        hosting: Option<commons_engine::Hosting>,
    ) -> Result<(), Failure> {
        let started = Instant::now();
        let (name, body) = self.new_site(t, hosting)?;
        let site = format!("/api/sites/{}", segment(&name));
        let exists = self.client.send(Method::GET, &site, None)?;
        let accepted = match exists.status {
            StatusCode::OK => self.client.call(Method::PUT, &site, Some(&body))?,
            StatusCode::NOT_FOUND => {
                let path = format!("/api/orgs/{}/sites", segment(&self.remote.org));
                self.client.call(Method::POST, &path, Some(&body))?
            }
            _ => return Err(self.client.problem(&exists)),
        };
        let id = accepted["deploy"].as_u64();
        let spinner = spinner(self.json, &format!("{name} on {}", self.remote.url));
        let deadline = Instant::now() + DEPLOY_WAIT;
        let run = loop {
            let v = self.client.get(&site)?;
            let run = &v["deploy"];
            let ours = id.is_none() || run["id"].as_u64() == id;
            if !ours {
                spinner.finish_and_clear();
                return Err(Failure::Failed(format!(
                    "another deploy of {name} started meanwhile; see `commons status {name}`"
                )));
            }
            if run["state"] != "running" {
                break run.clone();
            }
            if Instant::now() > deadline {
                spinner.finish_and_clear();
                return Err(Failure::Failed(format!(
                    "{name} is still deploying after {} minutes; see `commons status {name}`",
                    DEPLOY_WAIT.as_secs() / 60
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        spinner.finish_and_clear();
        if run["outcome"].is_null() {
            return Err(Failure::Failed(format!(
                "the deploy of {name} did not run: {}",
                run["error"].as_str().unwrap_or("no reason given")
            )));
        }
        let outcome: commons_engine::Outcome = serde_json::from_value(run["outcome"].clone())
            .map_err(|e| Failure::Failed(format!("an unexpected deploy outcome: {e}")))?;
        output::outcome(&outcome, self.json, started.elapsed(), "Deployed")
    }

    fn list(&self) -> Result<(), Failure> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/api/orgs/{}/sites?limit=1000", segment(&self.remote.org));
            if let Some(a) = &after {
                path.push_str(&format!("&after={}", segment(a)));
            }
            let v = self.client.get(&path)?;
            items.extend(v["items"].as_array().cloned().unwrap_or_default());
            match v["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => break,
            }
        }
        if self.json {
            output::json(&items);
            return Ok(());
        }
        if items.is_empty() {
            eprintln!(
                "no sites in \"{}\" on {} yet; `commons deploy` makes one",
                self.remote.org, self.remote.url
            );
            return Ok(());
        }
        let width = items
            .iter()
            .filter_map(|i| i["name"].as_str())
            .map(str::len)
            .max()
            .unwrap_or(4)
            .max(4);
        println!("{:width$}  {:9}  CREATED BY", "SITE", "STATUS");
        for i in &items {
            println!(
                "{:width$}  {:9}  {}",
                i["name"].as_str().unwrap_or(""),
                i["status"].as_str().unwrap_or("deploying"),
                i["created_by"].as_str().unwrap_or("")
            );
        }
        Ok(())
    }

    fn status(&self, name: &str) -> Result<(), Failure> {
        let v = self.client.get(&format!("/api/sites/{}", segment(name)))?;
        if self.json {
            output::json(&v["status"]);
            return Ok(());
        }
        match serde_json::from_value::<commons_engine::DeploymentStatus>(v["status"].clone()) {
            Ok(s) => output::status(&s),
            Err(_) => println!("{name} (deploying: nothing recorded yet)"),
        }
        if v["deploy"]["state"] == "running" {
            eprintln!("note: a deploy of {name} is running");
        }
        Ok(())
    }

    fn logs(
        &self,
        name: &str,
        component: Option<&str>,
        lines: usize,
        follow: bool,
    ) -> Result<(), Failure> {
        let base = format!("/api/sites/{}/logs", segment(name));
        let mut path = format!("{base}?lines={lines}");
        if let Some(c) = component {
            path.push_str(&format!("&component={}", segment(c)));
        }
        let v = self.client.get(&path)?;
        let components = v["components"].as_object().cloned().unwrap_or_default();
        let prefix = components.len() > 1;
        let mut out = std::io::stdout().lock();
        for (c, lines) in &components {
            self.print_lines(&mut out, c, lines, prefix);
        }
        if !follow {
            return Ok(());
        }
        drop(out);
        // Following: each component's log from where the last answer ended.
        let mut offsets: Vec<(String, u64)> = v["offsets"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(c, o)| (c.clone(), o.as_u64().unwrap_or(0)))
            .collect();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            for (c, offset) in &mut offsets {
                let v = self
                    .client
                    .get(&format!("{base}?component={}&after={offset}", segment(c)))?;
                let mut out = std::io::stdout().lock();
                self.print_lines(&mut out, c, &v["components"][c.as_str()], prefix);
                let _ = std::io::Write::flush(&mut out);
                *offset = v["offsets"][c.as_str()].as_u64().unwrap_or(*offset);
            }
        }
    }

    /// One component's lines, as `commons logs` shows them.
    fn print_lines(
        &self,
        out: &mut impl std::io::Write,
        component: &str,
        lines: &Value,
        prefix: bool,
    ) {
        for l in lines.as_array().into_iter().flatten() {
            output::log_line(out, component, l.as_str().unwrap_or(""), prefix, self.json);
        }
    }

    fn history(&self, name: &str, diff: Option<&[String]>) -> Result<(), Failure> {
        let site = format!("/api/sites/{}", segment(name));
        match diff {
            Some([a, b]) => {
                let v = self.client.get(&format!(
                    "{site}/history/diff?a={}&b={}",
                    segment(a),
                    segment(b)
                ))?;
                if self.json {
                    output::json(&v);
                } else {
                    print!("{}", v["diff"].as_str().unwrap_or(""));
                }
            }
            _ => {
                let v = self.client.get(&format!("{site}/history"))?;
                let entries: Vec<commons_engine::records::RecordEntry> =
                    serde_json::from_value(v["items"].clone())
                        .map_err(|e| Failure::Failed(format!("an unexpected history: {e}")))?;
                if self.json {
                    output::json(&entries);
                } else {
                    output::history(&entries);
                }
            }
        }
        Ok(())
    }

    fn backup(&self, name: &str) -> Result<(), Failure> {
        let v = self.client.call(
            Method::POST,
            &format!("/api/sites/{}/backups", segment(name)),
            None,
        )?;
        if self.json {
            output::json(&v);
        } else {
            println!("{}", v["sha256"].as_str().unwrap_or(""));
            eprintln!(
                "{:>12} {name} on {} ({} bytes)",
                "Backed up",
                self.remote.url,
                v["bytes"].as_u64().unwrap_or(0)
            );
        }
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<(), Failure> {
        let started = Instant::now();
        let spinner = spinner(self.json, &format!("{name} on {}", self.remote.url));
        let v = self.client.call(
            Method::DELETE,
            &format!("/api/sites/{}", segment(name)),
            None,
        );
        spinner.finish_and_clear();
        let v = v?;
        match serde_json::from_value::<commons_engine::Outcome>(v.clone()) {
            Ok(outcome) => output::outcome(&outcome, self.json, started.elapsed(), "Destroyed"),
            // A site that never deployed has no outcome to show.
            Err(_) if self.json => {
                output::json(&v);
                Ok(())
            }
            Err(_) => {
                eprintln!("{:>12} {name}", "Destroyed");
                Ok(())
            }
        }
    }
}

/// A spinner on a terminal while the platform works; nothing otherwise.
fn spinner(as_json: bool, what: &str) -> indicatif::ProgressBar {
    if as_json || !crate::interactive() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner:.cyan} {msg} ({elapsed})")
            .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}
