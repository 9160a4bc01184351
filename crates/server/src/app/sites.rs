//! Sites: what a new site is made from, and the operations on one —
//! list, plan, deploy, redeploy, status, logs, history, back up, destroy.
//! A site belongs to an organisation; anyone outside it is told no more
//! than of a site that does not exist.

use std::collections::BTreeMap;
use std::sync::Arc;

use commons_store::accounts::{AuditEntry, SiteRow};

use super::deploys::{self, DeployRun, Started};
use super::{in_range, AppError, ErrorKind, Page, Result};
use crate::accounts::{valid_slug, Action, Principal};
use crate::{catalog, AppState};
use commons_clock::now_ms;

/// What to deploy as a new site.
#[derive(serde::Deserialize, serde::Serialize, Default, utoipa::ToSchema)]
pub struct NewSite {
    /// Required for a new site; a redeploy takes it from the path.
    #[serde(default)]
    #[schema(pattern = "^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")]
    pub name: String,
    /// A catalog entry's name...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog: Option<String>,
    /// ...or a blueprint's YAML...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blueprint: Option<String>,
    /// ...or a blueprint with the files it needs (its includes, what its
    /// static components serve).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The blueprint's inputs, by name.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    #[schema(value_type = Option<crate::schema::Hosting>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosting: Option<commons_engine::Hosting>,
}

/// A blueprint's files, as `commons deploy` sends them to a remote platform.
#[derive(serde::Deserialize, serde::Serialize, Default, utoipa::ToSchema)]
pub struct Source {
    /// The root blueprint file, one of `files`.
    pub root: String,
    /// Relative path (`/`-separated, no `..`) → content, base64.
    pub files: BTreeMap<String, String>,
}

/// A blueprint sent through the API could not be written down.
fn cannot_store(e: std::io::Error) -> AppError {
    AppError::new(
        ErrorKind::Internal,
        "Cannot store the blueprint",
        e.to_string(),
    )
}

/// Writes `source` under `dir` (emptied first); returns the root file's path.
fn unpack_source(dir: &std::path::Path, source: &Source) -> Result<std::path::PathBuf> {
    use base64::Engine as _;
    let bad = |detail: String| AppError::new(ErrorKind::Invalid, "Invalid source", detail);
    // Every path stays inside `dir`: plain names only, no `..`, no root.
    let safe = |rel: &str| -> Result<std::path::PathBuf> {
        let p = std::path::Path::new(rel);
        // What a filesystem takes: names of up to 255 bytes, no NUL.
        if rel.len() > 1024 || rel.contains('\0') || rel.split('/').any(|n| n.len() > 255) {
            return Err(bad(format!(
                "\"{}\" is not a file name this platform can store: names are at most 255 bytes \
                 (paths 1024), without NUL",
                rel.chars().take(80).collect::<String>().escape_default()
            )));
        }
        let plain = !rel.is_empty()
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if plain {
            Ok(dir.join(p))
        } else {
            Err(bad(format!(
                "\"{rel}\" is not a relative path inside the blueprint's directory"
            )))
        }
    };
    if !source.files.contains_key(&source.root) {
        return Err(bad(format!(
            "the root \"{}\" is not one of the files sent",
            source.root
        )));
    }
    let mut decoded = Vec::with_capacity(source.files.len());
    for (rel, b64) in &source.files {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| bad(format!("\"{rel}\" is not base64: {e}")))?;
        decoded.push((safe(rel)?, bytes));
    }
    let _ = std::fs::remove_dir_all(dir);
    crate::private_dir(dir).map_err(cannot_store)?;
    for (path, bytes) in decoded {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(cannot_store)?;
        }
        std::fs::write(&path, bytes).map_err(cannot_store)?;
    }
    safe(&source.root)
}

/// Finds the blueprint a request names and settles its inputs.
fn site_target(state: &AppState, n: &NewSite) -> Result<commons_engine::Target> {
    if !valid_slug(&n.name) {
        return Err(AppError::new(
            ErrorKind::Invalid,
            "Invalid site name",
            format!("\"{}\" is not a site name: use lower-case letters, digits and '-', starting with a letter", n.name),
        ));
    }
    let uploads = state.engine.layout.upload_dir(&n.name);
    let path = match (&n.catalog, &n.blueprint, &n.source) {
        (Some(c), None, None) => catalog::materialize(&state.home, c)
            .map_err(|e| AppError::new(ErrorKind::Invalid, "Unknown catalog entry", e))?,
        (None, Some(yaml), None) => {
            let _ = std::fs::remove_dir_all(&uploads);
            crate::private_dir(&uploads).map_err(cannot_store)?;
            let path = uploads.join(commons_blueprint::FILE_NAME);
            commons_runtime::layout::write_whole(&path, yaml.as_bytes()).map_err(cannot_store)?;
            path
        }
        (None, None, Some(source)) => unpack_source(&uploads, source)?,
        _ => {
            return Err(AppError::new(
                ErrorKind::Invalid,
                "What to deploy",
                "give one of `catalog` (an entry of GET /api/catalog), `blueprint` (its YAML) \
                 or `source` (`{root, files}`: a blueprint and the files it needs)",
            ))
        }
    };
    let inputs: Vec<(String, String)> = n.inputs.clone().into_iter().collect();
    // A blueprint someone sent reads nothing outside what they sent.
    if n.catalog.is_none() {
        // Sandboxed, the site's own user reads its files, and no other.
        if commons_runtime::sandbox::enabled() {
            use commons_runtime::sandbox;
            sandbox::uid_for(&state.home, &n.name)
                .and_then(|uid| sandbox::give_tree(&uploads, uid))
                .and_then(|_| match uploads.parent() {
                    // Up to it, passable; the site's directory itself stays
                    // its user's alone (0700).
                    Some(parent) => sandbox::traversable(&state.home, parent),
                    None => Ok(()),
                })
                .map_err(cannot_store)?;
        }
        return state
            .engine
            .target_confined(&path, &uploads, Some(&n.name), &inputs)
            .map_err(AppError::from);
    }
    state
        .engine
        .target(Some(&path.to_string_lossy()), Some(&n.name), &inputs)
        .map_err(AppError::from)
}

/// A site of an organisation's list, with its last deploy's status.
#[derive(Debug, serde::Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub site: SiteRow,
    pub status: Option<String>,
}

/// One page of the organisation's sites, by name, after `after`.
pub fn list(
    state: &AppState,
    who: &Principal,
    org: &str,
    after: Option<&str>,
    limit: u32,
) -> Result<Page<Listed, String>> {
    super::orgs::known(state, org)?;
    state.accounts.allow(who, org, Action::ReadSites)?;
    let limit = in_range("limit", limit, 1000)?;
    let rows = state.accounts.store().sites(org, after, limit)?;
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let mut statuses = state.engine.store().statuses(&names)?;
    let items = rows
        .into_iter()
        .map(|site| Listed {
            status: statuses.remove(&site.name),
            site,
        })
        .collect();
    Ok(Page::of(items, limit, |l: &Listed| l.site.name.clone()))
}

/// Sites that come from users run sandboxed: unsandboxed, a workload runs
/// as the platform's own user and could read its keys. Only the platform's
/// administrator deploys then, unless the platform is explicitly one
/// person's (`COMMONS_SINGLE_USER=1`).
fn may_run_code_of(who: &Principal) -> Result<()> {
    let sandboxed = commons_runtime::sandbox::enabled();
    if sandboxed || commons_runtime::sandbox::single_user() || matches!(who, Principal::Platform) {
        return Ok(());
    }
    Err(AppError::new(
        ErrorKind::Forbidden,
        "Sandbox required",
        "this platform runs workloads unsandboxed, so it takes sites from its administrator \
         only; run `commons serve` as root with COMMONS_SANDBOX=1 (or, on your own machine, \
         COMMONS_SINGLE_USER=1)",
    ))
}

/// Deploys `n` as a new site of `org`, if `who` may: the site is recorded
/// at once, the deploy runs in the background (`deploys::last` follows it).
pub fn create(state: &Arc<AppState>, who: &Principal, org: &str, n: &NewSite) -> Result<Started> {
    super::orgs::known(state, org)?;
    state.accounts.allow(who, org, Action::WriteSites)?;
    may_run_code_of(who)?;
    let taken = || {
        AppError::new(
            ErrorKind::Conflict,
            "Site name taken",
            format!("a site named \"{}\" exists; choose another name", n.name),
        )
    };
    if state.engine.store().deployment(&n.name)?.is_some() {
        return Err(taken());
    }
    let target = site_target(state, n)?;
    crate::hosts::check(state, org, &target)?;
    let now = now_ms();
    let site = SiteRow {
        name: n.name.clone(),
        org: org.into(),
        created_by: who.actor(),
        created_ms: now,
    };
    let entry = AuditEntry {
        at_ms: now,
        actor: who.actor(),
        org: Some(org.into()),
        action: "site.create".into(),
        target: n.name.clone(),
        detail: serde_json::json!({ "catalog": n.catalog, "inputs": n.inputs }),
    };
    if !state.accounts.store().create_site(&site, &entry)? {
        return Err(taken());
    }
    Ok(deploys::start(state, who, org, target, n.hosting, site))
}

/// Deploys the site `name` again from `n` (its secrets and data kept).
pub fn redeploy(state: &Arc<AppState>, who: &Principal, name: &str, n: NewSite) -> Result<Started> {
    let Some(site) = site_for(state, who, name, Action::WriteSites)? else {
        return Err(AppError::new(
            ErrorKind::NotFound,
            "No such site",
            format!("\"{name}\" belongs to no organisation; deploy it with `commons deploy`"),
        ));
    };
    may_run_code_of(who)?;
    let n = NewSite {
        name: name.to_string(),
        ..n
    };
    let target = site_target(state, &n)?;
    let org = site.org.clone();
    crate::hosts::check(state, &org, &target)?;
    Ok(deploys::start(state, who, &org, target, n.hosting, site))
}

/// What deploying `n` in `org` would do, if `who` may deploy there.
pub fn plan(
    state: &AppState,
    who: &Principal,
    org: &str,
    n: &NewSite,
) -> Result<commons_engine::plan::Plan> {
    super::orgs::known(state, org)?;
    state.accounts.allow(who, org, Action::WriteSites)?;
    if let Some(site) = state.accounts.store().site(&n.name)? {
        if site.org != org {
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Site name taken",
                format!("a site named \"{}\" exists; choose another name", n.name),
            ));
        }
    }
    let target = site_target(state, n)?;
    crate::hosts::check(state, org, &target)?;
    Ok(state.engine.plan(&target)?)
}

/// The site, if the caller may `action` it: not found for anyone outside
/// its organisation, so other organisations' sites stay unseen. `None` is a
/// deployment of the platform's own (made with the CLI), which only the
/// platform's administrator reaches.
pub fn site_for(
    state: &AppState,
    who: &Principal,
    name: &str,
    action: Action,
) -> Result<Option<SiteRow>> {
    let site = state.accounts.store().site(name)?;
    let unseen = || {
        AppError::new(
            ErrorKind::NotFound,
            "No such site",
            format!("there is no site \"{name}\" in your organisations"),
        )
    };
    match (&site, who) {
        // An outsider learns no more than of a site that does not exist.
        (Some(s), _) => state.accounts.allow(who, &s.org, action).map_err(|p| {
            if p.kind == ErrorKind::NotFound {
                unseen()
            } else {
                p
            }
        })?,
        (None, Principal::Platform) => {}
        (None, Principal::User(_)) => return Err(unseen()),
    }
    Ok(site)
}

/// What a site looks like now: deployed, or owned and not deployed yet.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Now {
    Deployed(Box<commons_engine::DeploymentStatus>),
    /// The deploy has not recorded anything yet.
    Deploying {
        status: &'static str,
    },
}

/// A site, its components' states, and the last deploy started of it.
#[derive(Debug)]
pub struct SiteStatus {
    pub site: Option<SiteRow>,
    pub now: Now,
    pub deploy: Option<DeployRun>,
}

/// The site's owner, its components' states, and its last deploy.
pub fn status(state: &AppState, who: &Principal, name: &str) -> Result<SiteStatus> {
    let site = site_for(state, who, name, Action::ReadSites)?;
    let now = match state.engine.status(name) {
        Ok(s) => Now::Deployed(Box::new(s)),
        Err(e) if e.is_bad_input() && site.is_some() => Now::Deploying {
            status: "deploying",
        },
        Err(e) if e.is_bad_input() => {
            return Err(AppError::new(
                ErrorKind::NotFound,
                "No such site",
                e.to_string(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(SiteStatus {
        site,
        now,
        deploy: deploys::last(state, name),
    })
}

/// What destroying a site did.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Destroyed {
    Ran(Box<commons_engine::Outcome>),
    /// Never deployed (or already gone): only the ownership was left.
    NothingDeployed {
        deployment: String,
        ok: bool,
        tasks: [(); 0],
    },
}

/// Stops and removes the site and everything it holds; the site is
/// forgotten once that succeeded.
pub async fn destroy(state: &AppState, who: &Principal, name: &str) -> Result<Destroyed> {
    let site = site_for(state, who, name, Action::WriteSites)?;
    let outcome = state
        .engine
        .destroy(name, 4, &commons_engine::apply::Quiet)
        .await;
    let (ok, destroyed) = match outcome {
        Ok(o) => (o.ok, Destroyed::Ran(Box::new(o))),
        Err(e) if e.is_bad_input() && site.is_some() => (
            true,
            Destroyed::NothingDeployed {
                deployment: name.to_string(),
                ok: true,
                tasks: [],
            },
        ),
        Err(e) if e.is_bad_input() => {
            return Err(AppError::new(
                ErrorKind::NotFound,
                "No such site",
                e.to_string(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let entry = AuditEntry {
        at_ms: now_ms(),
        actor: who.actor(),
        org: site.as_ref().map(|s| s.org.clone()),
        action: "site.delete".into(),
        target: name.to_string(),
        detail: serde_json::json!({ "ok": ok }),
    };
    if ok {
        deploys::forget(state, name);
        state.accounts.store().delete_site(name, &entry)?;
    } else {
        state.accounts.store().record(&entry)?;
    }
    Ok(destroyed)
}

/// Lines of each component's log, and where each log goes on from.
#[derive(Debug, Default, serde::Serialize)]
pub struct Logs {
    pub components: BTreeMap<String, Vec<String>>,
    pub offsets: BTreeMap<String, u64>,
}

/// What each component (or `component` alone) printed: its last `lines`,
/// or, with `after`, the lines written after that offset of its log.
pub fn logs(
    state: &AppState,
    who: &Principal,
    name: &str,
    component: Option<&str>,
    lines: u32,
    after: Option<u64>,
) -> Result<Logs> {
    site_for(state, who, name, Action::ReadSites)?;
    let n = in_range("lines", lines, 10_000)? as usize;
    if after.is_some() && component.is_none() {
        return Err(AppError::new(
            ErrorKind::Malformed,
            "Invalid query",
            "`after` is an offset in one component's log: give `component` too",
        ));
    }
    let files = state
        .engine
        .log_files(name, component)
        .map_err(|e| not_found_or(e, name))?;
    let mut out = Logs::default();
    for (component, path) in files {
        let (lines, next) = log_lines(&path, n, after);
        out.components.insert(component.clone(), lines);
        out.offsets.insert(component, next);
    }
    Ok(out)
}

/// A bad-input engine error about a missing deployment is not found;
/// others as usual.
fn not_found_or(e: commons_engine::EngineError, name: &str) -> AppError {
    if e.is_bad_input()
        && e.to_string()
            .contains(&format!("no deployment named \"{name}\""))
    {
        AppError::new(ErrorKind::NotFound, "No such site", e.to_string())
    } else {
        e.into()
    }
}

/// The site's deployment record, one entry per deploy, oldest first.
pub fn history(
    state: &AppState,
    who: &Principal,
    name: &str,
) -> Result<Vec<commons_engine::records::RecordEntry>> {
    site_for(state, who, name, Action::ReadSites)?;
    state
        .engine
        .history(name)
        .map_err(|e| not_found_or(e, name))
}

/// What changed between deploys `a` and `b` of the site: a unified diff of
/// their records.
pub fn history_diff(
    state: &AppState,
    who: &Principal,
    name: &str,
    a: &str,
    b: &str,
) -> Result<String> {
    site_for(state, who, name, Action::ReadSites)?;
    state
        .engine
        .history_diff(name, a, b)
        .map_err(|e| not_found_or(e, name))
}

/// Backs the site up (data, volumes, databases, record) into the archive.
pub async fn backup(
    state: &Arc<AppState>,
    who: &Principal,
    name: &str,
) -> Result<commons_engine::backup::Backup> {
    let site = site_for(state, who, name, Action::WriteSites)?;
    let (state2, name2) = (state.clone(), name.to_string());
    let b = tokio::task::spawn_blocking(move || state2.engine.backup(&name2))
        .await
        .map_err(|_| {
            AppError::new(
                ErrorKind::Internal,
                "Backup failed",
                "the backup task stopped",
            )
        })?
        .map_err(|e| not_found_or(e, name))?;
    state.accounts.store().record(&AuditEntry {
        at_ms: now_ms(),
        actor: who.actor(),
        org: site.map(|s| s.org),
        action: "site.backup".into(),
        target: name.to_string(),
        detail: serde_json::json!({ "sha256": b.sha256, "bytes": b.bytes }),
    })?;
    Ok(b)
}

/// The most of a log one answer reads.
const LOG_WINDOW: u64 = 1 << 20;

/// Lines of the log at `path`: the last `n` (from its last MiB), or, with
/// `after`, the complete lines written after that byte offset (a MiB of
/// them at most; from the start again if the log was cut shorter). Also the
/// offset just past the last complete line read: where to go on from.
fn log_lines(path: &std::path::Path, n: usize, after: Option<u64>) -> (Vec<String>, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return (Vec::new(), 0);
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = match after {
        Some(a) if a <= len => a,
        Some(_) => 0,
        None => len.saturating_sub(LOG_WINDOW),
    };
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err()
        || (&mut file).take(LOG_WINDOW).read_to_end(&mut buf).is_err()
    {
        return (Vec::new(), start);
    }
    let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let next = start + complete as u64;
    let shown = if after.is_some() {
        &buf[..complete]
    } else {
        &buf[..]
    };
    let text = String::from_utf8_lossy(shown);
    let mut lines: Vec<&str> = text.lines().collect();
    // A window that starts mid-file starts mid-line.
    if after.is_none() && start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let keep = if after.is_some() { lines.len() } else { n };
    let tail = &lines[lines.len().saturating_sub(keep)..];
    (tail.iter().map(|l| l.to_string()).collect(), next)
}

#[cfg(test)]
mod log_tests {
    use super::log_lines;

    #[test]
    fn tails_then_follows_complete_lines_only() {
        let dir = std::env::temp_dir().join(format!("commons-log-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("web.log");
        std::fs::write(&path, "one\ntwo\nthree\npart").unwrap();
        let (tail, next) = log_lines(&path, 2, None);
        assert_eq!(tail, ["three", "part"]);
        assert_eq!(next, 14, "just past the last complete line");
        // Following: nothing new until the partial line is complete.
        assert_eq!(log_lines(&path, 2, Some(next)), (vec![], 14));
        std::fs::write(&path, "one\ntwo\nthree\npartial\nfive\n").unwrap();
        assert_eq!(
            log_lines(&path, 2, Some(next)),
            (vec!["partial".to_string(), "five".to_string()], 27)
        );
        // A log cut shorter is followed from its start again.
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(log_lines(&path, 2, Some(27)), (vec!["new".to_string()], 4));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
