//! How results look: text for people, JSON for machines.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use commons_blueprint::Diagnostics;
use commons_engine::records::RecordEntry;
use commons_engine::{Action, DeploymentStatus, Outcome, Plan};
use miette::{Diagnostic, GraphicalReportHandler, NamedSource, SourceSpan};

use crate::Failure;

pub fn json<T: serde::Serialize + ?Sized>(value: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}

/// A problem that did not stop the command.
pub fn warn(msg: &str) {
    eprintln!("warning: {msg}");
}

/// Said when a command waits for a deployment another process holds.
pub fn blocking(deployment: &str) {
    eprintln!(
        "{:>12} waiting for another command working on deployment \"{deployment}\"",
        "Blocking"
    );
}

pub fn error(msg: &str) {
    eprintln!("error: {msg}");
}

#[derive(Debug, thiserror::Error, Diagnostic)]
#[error("{message}")]
struct Report {
    message: String,
    #[source_code]
    code: NamedSource<String>,
    #[label("here")]
    span: SourceSpan,
    #[help]
    help: Option<String>,
}

/// Renders blueprint errors with the source line they point at.
pub fn diagnostics(d: &Diagnostics) {
    let handler = GraphicalReportHandler::new_themed(if crate::interactive() {
        miette::GraphicalTheme::unicode()
    } else {
        miette::GraphicalTheme::unicode_nocolor()
    });
    let mut out = String::new();
    for e in d.iter() {
        let text = std::fs::read_to_string(&e.file).unwrap_or_default();
        // Diagnostics count characters; miette wants bytes.
        let byte = text
            .char_indices()
            .nth(e.offset)
            .map(|(b, _)| b)
            .unwrap_or(text.len());
        let len = text[byte..].chars().next().map(char::len_utf8).unwrap_or(0);
        let report = Report {
            message: format!(
                "{}:{}:{}: {}",
                e.file.display(),
                e.line,
                e.column,
                e.message
            ),
            code: NamedSource::new(e.file.display().to_string(), text),
            span: (byte, len).into(),
            help: e.help.clone(),
        };
        let _ = handler.render_report(&mut out, &report);
        out.push('\n');
    }
    eprint!("{out}");
    eprintln!(
        "error: the blueprint has {} problem{}",
        d.len(),
        if d.len() == 1 { "" } else { "s" }
    );
}

fn sigil(a: Action) -> &'static str {
    match a {
        Action::Create => "+",
        Action::Update => "~",
        Action::Replace => "-/+",
        Action::Delete => "-",
        Action::Unchanged => " ",
    }
}

pub fn plan(plan: &Plan) {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let _ = writeln!(out, "Plan for {}: {}", plan.deployment, plan.summary());
    for c in plan
        .changes
        .iter()
        .filter(|c| c.action != Action::Unchanged)
    {
        let _ = write!(
            out,
            "\n  {} {} ({}, {})",
            sigil(c.action),
            c.component,
            c.kind,
            c.action.as_str()
        );
        if let Some(r) = &c.reason {
            let _ = write!(out, ": {r}");
        }
        let _ = writeln!(out);
        for a in &c.attrs {
            let _ = match (&a.old, &a.new) {
                (Some(o), Some(n)) => writeln!(out, "      {}: {:?} -> {:?}", a.attr, o, n),
                (None, Some(n)) => writeln!(out, "      {} = {:?}", a.attr, n),
                (Some(o), None) => writeln!(out, "      {}: {:?} -> (removed)", a.attr, o),
                (None, None) => Ok(()),
            };
        }
    }
}

pub fn outcome(o: &Outcome, as_json: bool, took: Duration, verb: &str) -> Result<(), Failure> {
    if as_json {
        json(o);
    } else if o.run == 0 {
        eprintln!(
            "{:>12} {}: nothing to do, everything is as recorded",
            "Fresh", o.deployment
        );
    } else if o.ok {
        let record = o
            .record
            .as_deref()
            .map(|r| format!(", record {}", &r[..r.len().min(10)]))
            .unwrap_or_default();
        eprintln!(
            "{:>12} {} in {:.2}s ({}; run {}{record})",
            verb,
            o.deployment,
            took.as_secs_f64(),
            o.plan.summary(),
            o.run
        );
    }
    if o.ok {
        return Ok(());
    }
    let failed: Vec<_> = o
        .tasks
        .iter()
        .filter(|t| t.outcome != "ok" && t.outcome != "blocked")
        .collect();
    let blocked = o.tasks.iter().filter(|t| t.outcome == "blocked").count();
    if !as_json {
        for t in &failed {
            eprintln!(
                "\n{} {} ({}):\n{}",
                t.component,
                t.outcome,
                t.action,
                t.error.as_deref().unwrap_or("")
            );
        }
    }
    Err(Failure::Failed(format!(
        "{} of {} failed ({} task{} failed, {blocked} blocked); see `commons status {}`",
        o.deployment,
        if verb == "Destroyed" {
            "destroy"
        } else {
            "deploy"
        },
        failed.len(),
        if failed.len() == 1 { "" } else { "s" },
        o.deployment
    )))
}

/// The catalog's entries (`{name, summary, project, source}`), one a line.
pub fn catalog(entries: &[serde_json::Value]) {
    let field = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or("").to_string();
    let width = entries
        .iter()
        .map(|e| field(e, "name").len())
        .max()
        .unwrap_or(4);
    for e in entries {
        println!(
            "{:width$}  {} ({}, {})",
            field(e, "name"),
            field(e, "summary"),
            field(e, "project"),
            field(e, "source")
        );
    }
    eprintln!("deploy one with `commons deploy catalog:NAME`");
}

pub fn status(s: &DeploymentStatus) {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let _ = writeln!(
        out,
        "{} ({}, {} hosting) from {}",
        s.name,
        s.status,
        s.hosting.as_str(),
        s.blueprint
    );
    let width = s
        .components
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(9)
        .max(9);
    let _ = writeln!(
        out,
        "{:width$}  {:8}  {:8}  {:>7}  {:>5}  {:>8}  LAST TASK",
        "COMPONENT", "KIND", "STATE", "PID", "PORT", "RESTARTS"
    );
    for c in &s.components {
        let last = c
            .last_task
            .as_ref()
            .map(|t| format!("{} {} (run {})", t.action, t.outcome, t.run))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:width$}  {:8}  {:8}  {:>7}  {:>5}  {:>8}  {last}",
            c.name,
            c.kind,
            c.state,
            c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.restarts,
        );
        if let Some(e) = c.last_exit.as_ref().filter(|_| c.state != "running") {
            let _ = writeln!(out, "{:width$}  last exit: {} at {}", "", e.reason, e.at);
        }
        if let Some(l) = &c.crash_loop {
            let _ = writeln!(
                out,
                "{:width$}  crash loop: restarted {} times in a row, next try at {}",
                "", l.restarts_in_a_row, l.next_restart
            );
        }
        if let Some(e) = &c.error {
            let _ = writeln!(
                out,
                "{:width$}  error: {}",
                "",
                e.lines().next().unwrap_or("")
            );
        }
    }
}

/// This machine's deployments, then the sites it deployed to Kubernetes
/// clusters.
pub fn list(
    rows: &[commons_engine::DeploymentRow],
    clusters: &[commons_kubernetes::Placement],
    as_json: bool,
) -> Result<(), Failure> {
    if as_json {
        let mut all: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::to_value(r).expect("a row serialises"))
            .collect();
        all.extend(clusters.iter().map(|p| {
            serde_json::json!({ "name": p.site, "kubernetes": { "namespace": p.namespace, "kubeconfig": p.kubeconfig } })
        }));
        json(&all);
        return Ok(());
    }
    if rows.is_empty() && clusters.is_empty() {
        eprintln!("no deployments yet; `commons deploy` makes one");
        return Ok(());
    }
    let names = rows.iter().map(|r| r.name.len());
    let width = names
        .chain(clusters.iter().map(|p| p.site.len()))
        .max()
        .unwrap_or(4)
        .max(10);
    println!("{:width$}  {:8}  BLUEPRINT", "DEPLOYMENT", "STATUS");
    for r in rows {
        println!("{:width$}  {:8}  {}", r.name, r.status, r.blueprint);
    }
    for p in clusters {
        println!(
            "{:width$}  {:8}  namespace {} ({})",
            p.site,
            "cluster",
            p.namespace,
            p.kubeconfig.display()
        );
    }
    Ok(())
}

pub fn history(entries: &[RecordEntry]) {
    println!("{:>4}  {:10}  {:20}  SUMMARY", "REV", "COMMIT", "TIME");
    for e in entries {
        println!(
            "{:>4}  {:10}  {:20}  {}",
            e.revision,
            &e.commit[..10],
            e.time,
            e.summary
        );
    }
}

fn tail_lines(path: &Path, n: usize) -> (Vec<String>, u64) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), 0);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    // Read at most the last 1 MiB: enough for any sensible `-n`.
    let start = len.saturating_sub(1 << 20);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let skip = lines.len().saturating_sub(n);
    (lines[skip..].to_vec(), len)
}

/// One line of a component's log: as JSON, prefixed by the component (when
/// several are shown), or bare.
pub fn log_line(out: &mut impl Write, component: &str, line: &str, prefix: bool, as_json: bool) {
    let _ = if as_json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "component": component, "line": line })
        )
    } else if prefix {
        writeln!(out, "{component} | {line}")
    } else {
        writeln!(out, "{line}")
    };
}

pub fn logs(
    files: &[(String, PathBuf)],
    n: usize,
    follow: bool,
    as_json: bool,
) -> Result<(), Failure> {
    let prefix = files.len() > 1;
    let emit = |out: &mut std::io::StdoutLock, name: &str, l: &str| {
        log_line(out, name, l, prefix, as_json);
    };
    let mut offsets = Vec::new();
    let mut out = std::io::stdout().lock();
    for (name, path) in files {
        let (lines, len) = tail_lines(path, n);
        for l in lines {
            emit(&mut out, name, &l);
        }
        offsets.push(len);
    }
    let _ = out.flush();
    drop(out);
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let mut out = std::io::stdout().lock();
        for ((name, path), offset) in files.iter().zip(offsets.iter_mut()) {
            let Ok(mut f) = std::fs::File::open(path) else {
                continue;
            };
            if f.seek(SeekFrom::Start(*offset)).is_err() {
                continue;
            }
            let mut reader = std::io::BufReader::new(&mut f);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if !line.ends_with('\n') {
                    break;
                }
                *offset += line.len() as u64;
                emit(&mut out, name, line.trim_end_matches('\n'));
                line.clear();
            }
        }
        if out.flush().is_err() {
            break;
        }
    }
    Ok(())
}

const TEMPLATE: &str = r#"# A OneCommons blueprint. Reference: `commons schema` prints the JSON Schema.
name: NAME
version: 0.1.0
project: example.org/NAME          # the developer project this code belongs to
depends_on_projects: []            # upstream projects, e.g. { project: python.org/cpython, weight: 1 }

inputs:
  greeting: { type: string, default: "Hello from OneCommons" }

secrets:
  session_key: { generate: 32 }    # made once, kept encrypted, never written to records

components:
  site:
    job: "mkdir -p public && printf '%s\n' \"${inputs.greeting}\" > public/index.html"
  web:
    process: "python3 -m http.server --bind 127.0.0.1 --directory public $PORT"
    after: [site]
    env: { SESSION_KEY: "${secrets.session_key}" }
    health: { http: "/", timeout: 10s }
    route: { host: NAME.localhost }
"#;

pub fn init(dir: &Path, name: Option<&str>, as_json: bool) -> Result<(), Failure> {
    let file = dir.join(commons_blueprint::FILE_NAME);
    if file.exists() {
        return Err(Failure::Input(format!(
            "{} exists already; edit it, or init another directory",
            file.display()
        )));
    }
    let name = match name {
        Some(n) => n.to_string(),
        None => {
            let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            let raw = abs
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            let mut s: String = raw
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            s = s.trim_matches('-').to_string();
            if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
                s = format!("site-{s}").trim_end_matches('-').to_string();
            }
            s
        }
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::Failed(format!("creating {}: {e}", dir.display())))?;
    std::fs::write(&file, TEMPLATE.replace("NAME", &name))
        .map_err(|e| Failure::Failed(format!("writing {}: {e}", file.display())))?;
    if as_json {
        json(&serde_json::json!({ "created": file, "name": name }));
    } else {
        eprintln!("{:>12} {} ({})", "Created", file.display(), name);
    }
    Ok(())
}
