//! A remote platform: `commons login URL` keeps an API token for it in the
//! data directory, and the site commands (catalog, plan, deploy, list,
//! status, logs, history, backup, destroy) then act there through its REST
//! API instead of on this machine. `commons logout` revokes the token and
//! forgets it.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use commons_server::app::sites::{NewSite, Source};
use commons_server::client::{ApiClient, ClientError};
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

/// The failure a call's error is, for people.
fn failure(e: ClientError) -> Failure {
    match e {
        ClientError::Unauthorized { base, detail } => Failure::Input(format!(
            "{base} does not accept this login any more ({detail}); run `commons login {base}` again"
        )),
        ClientError::Refused { detail, .. } => Failure::Input(detail),
        e @ (ClientError::Unreachable { .. } | ClientError::Failed(_)) => {
            Failure::Failed(e.to_string())
        }
    }
}

fn client(url: &str, token: &str) -> Result<ApiClient, Failure> {
    ApiClient::with_token(url, token).map_err(failure)
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
    let url = commons_server::client::platform_address(&args.url).map_err(Failure::Input)?;
    let (token, token_id) = if args.token_stdin {
        (read_line("token")?, None)
    } else {
        let (token, id) = token_from_password(&url, args.email.as_deref())?;
        (token, Some(id))
    };
    let me = client(&url, &token)?.me().map_err(failure)?;
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
    let mut client = ApiClient::new(url).map_err(failure)?;
    let signed_in = client.login(&email, &password);
    drop(password);
    match signed_in {
        Ok(()) => {}
        Err(ClientError::Unauthorized { .. }) => {
            return Err(Failure::Input(format!(
            "{url} refused the email or password; sign up in its console ({url}/console/signup) \
                 if you have no account"
        )))
        }
        Err(e) => return Err(failure(e)),
    }
    let host = commons_server::host_name().unwrap_or_else(|| "this machine".into());
    let made = client.create_token(
        &format!("commons CLI on {host}"),
        commons_server::accounts::USER_SCOPES,
    );
    // The session is not needed any more, whatever happened.
    client.logout();
    let made = made.map_err(failure)?;
    Ok((made.token, made.id))
}

/// Revokes the token `commons login` made (best effort: the platform may be
/// gone, or the token already revoked).
fn revoke(remote: &Remote) -> bool {
    let Some(id) = &remote.token_id else {
        return false;
    };
    ApiClient::with_token(&remote.url, &remote.token).is_ok_and(|c| c.revoke_token(id))
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
    let client = match client(&remote.url, &remote.token) {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    let r = Remotely {
        remote,
        client,
        json: as_json,
    };
    Some(match command {
        Command::Plan { cluster, .. } | Command::Deploy { cluster, .. }
            if cluster.kubeconfig.is_some() =>
        {
            Err(Failure::Input(format!(
                "a Kubernetes cluster is deployed to from this machine, and site commands act on \
                 {} (logged in as {}); `commons logout` first",
                remote.url, remote.email
            )))
        }
        Command::Catalog => r.catalog(),
        Command::Plan { target: t, .. } => r.plan(t),
        Command::Deploy {
            target, hosting, ..
        } => r.deploy(target, hosting.map(Into::into)),
        Command::List => r.list(),
        Command::Status { name, .. } => match name {
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
    client: ApiClient,
    json: bool,
}

impl Remotely<'_> {
    fn catalog(&self) -> Result<(), Failure> {
        let items = self.client.catalog().map_err(failure)?;
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
    ) -> Result<(String, NewSite), Failure> {
        let mut body = NewSite {
            inputs: t.inputs.iter().cloned().collect(),
            hosting,
            ..Default::default()
        };
        let name = match t
            .target
            .as_deref()
            .and_then(|t| t.strip_prefix(commons_server::catalog::PREFIX))
        {
            Some(entry) => {
                body.catalog = Some(entry.to_string());
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
                let files = files
                    .into_iter()
                    .map(|(p, bytes)| (p, base64::engine::general_purpose::STANDARD.encode(bytes)))
                    .collect();
                body.source = Some(Source { root, files });
                t.name.clone().unwrap_or(bp.name)
            }
        };
        body.name = name.clone();
        Ok((name, body))
    }

    fn plan(&self, t: &TargetArgs) -> Result<(), Failure> {
        let (_, body) = self.new_site(t, None)?;
        let plan = self.client.plan(&self.remote.org, &body).map_err(failure)?;
        if self.json {
            output::json(&plan);
        } else {
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
        let accepted = match self.client.site(&name).map_err(failure)? {
            Some(_) => self.client.redeploy(&name, &body),
            None => self.client.create_site(&self.remote.org, &body),
        }
        .map_err(failure)?;
        let id = accepted["deploy"].as_u64();
        let spinner = spinner(self.json, &format!("{name} on {}", self.remote.url));
        let deadline = Instant::now() + DEPLOY_WAIT;
        let run = loop {
            let v = self.client.site(&name).map_err(failure)?.ok_or_else(|| {
                Failure::Failed(format!("{name} was destroyed while it deployed"))
            })?;
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
        let items = self.client.sites(&self.remote.org).map_err(failure)?;
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
        let v =
            self.client.site(name).map_err(failure)?.ok_or_else(|| {
                Failure::Input(format!("no site \"{name}\" on {}", self.remote.url))
            })?;
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
        let v = self.client.logs(name, component, lines).map_err(failure)?;
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
                let v = self.client.logs_after(name, c, *offset).map_err(failure)?;
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
        match diff {
            Some([a, b]) => {
                let diff = self.client.history_diff(name, a, b).map_err(failure)?;
                if self.json {
                    output::json(&json!({ "diff": diff }));
                } else {
                    print!("{diff}");
                }
            }
            _ => {
                let entries = self.client.history(name).map_err(failure)?;
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
        let v = self.client.backup(name).map_err(failure)?;
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
        let v = self.client.destroy(name);
        spinner.finish_and_clear();
        let v = v.map_err(failure)?;
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
