//! Running PostgreSQL's client tools (`pg_dump`, `psql`) safely.
//!
//! - A connection's password goes to the tool in its environment
//!   (`PGPASSWORD`), never in its arguments, which every user of the
//!   machine can read in the process table.
//! - SQL from elsewhere — a backup archive, a move's copy from another
//!   node — is loaded by `psql` in restricted mode (`\restrict` with a key
//!   made here and never shown): its backslash commands, `\!` among them,
//!   are refused, so a crafted dump cannot run a shell on this machine.

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};

use postgres::config::Host;

use crate::EngineError;

/// A connection string split into what may be shown (a libpq key=value
/// string, no password) and the password.
pub(crate) struct Conn {
    pub(crate) info: String,
    password: Option<String>,
}

impl Conn {
    pub(crate) fn parse(url: &str) -> Result<Conn, EngineError> {
        let config: postgres::Config = url
            .parse()
            .map_err(|e| EngineError::Input(format!("not a PostgreSQL connection string: {e}")))?;
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut info = Vec::new();
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(h) => h.clone(),
                Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        if !hosts.is_empty() {
            info.push(format!("host={}", quote(&hosts.join(","))));
        }
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        if !ports.is_empty() {
            info.push(format!("port={}", ports.join(",")));
        }
        if let Some(user) = config.get_user() {
            info.push(format!("user={}", quote(user)));
        }
        if let Some(db) = config.get_dbname() {
            info.push(format!("dbname={}", quote(db)));
        }
        let sslmode = match config.get_ssl_mode() {
            postgres::config::SslMode::Disable => "disable",
            postgres::config::SslMode::Require => "require",
            _ => "prefer",
        };
        info.push(format!("sslmode={sslmode}"));
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        Ok(Conn {
            info: info.join(" "),
            password,
        })
    }

    /// A tool to run against this connection, its password in its
    /// environment.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env_remove("PGPASSWORD");
        if let Some(p) = &self.password {
            c.env("PGPASSWORD", p);
        }
        c
    }
}

fn not_run(program: &str) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |e| {
        EngineError::Internal(format!(
            "cannot run {program} (install postgresql-client): {e}"
        ))
    }
}

/// Runs `program` against `conn` (given as `--dbname`), failing with what
/// it printed; answers what it wrote.
pub(crate) fn output(program: &str, conn: &Conn, args: &[&str]) -> Result<Vec<u8>, EngineError> {
    let out = conn
        .command(program)
        .args(args)
        .args(["--dbname", &conn.info])
        .stdin(Stdio::null())
        .output()
        .map_err(not_run(program))?;
    if !out.status.success() {
        return Err(EngineError::Internal(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// Loads the SQL in `dump` (a `pg_dump` in plain format, from wherever)
/// into `conn` with `psql`, in restricted mode: any backslash command in it
/// is refused and the load stops there. The dump's own `\restrict` and
/// `\unrestrict` lines (pg_dump writes them) are left out.
pub(crate) fn load(conn: &Conn, dump: &std::path::Path) -> Result<(), EngineError> {
    let file = std::fs::File::open(dump)
        .map_err(EngineError::io(format!("reading {}", dump.display())))?;
    let mut child = conn
        .command("psql")
        .args(["--quiet", "--no-psqlrc", "-v", "ON_ERROR_STOP=1"])
        .args(["--dbname", &conn.info, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(not_run("psql"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let fed = (|| -> std::io::Result<()> {
        let mut stdin = std::io::BufWriter::with_capacity(1 << 20, &mut stdin);
        let key = crate::secrets::token();
        writeln!(stdin, "\\restrict {key}")?;
        let mut input = std::io::BufReader::with_capacity(1 << 20, file);
        let mut own_key: Option<Vec<u8>> = None;
        let mut line = Vec::new();
        loop {
            line.clear();
            if input.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if let Some(k) = restrict_line(&line, b"\\restrict ") {
                if own_key.is_none() {
                    own_key = Some(k.to_vec());
                    continue;
                }
            }
            if let (Some(k), Some(own)) = (restrict_line(&line, b"\\unrestrict "), &own_key) {
                if k == own.as_slice() {
                    continue;
                }
            }
            stdin.write_all(&line)?;
        }
        stdin.flush()
    })();
    drop(stdin);
    let out = child.wait_with_output().map_err(not_run("psql"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(EngineError::Internal(format!(
            "loading {} failed: {}",
            dump.display(),
            stderr.trim()
        )));
    }
    fed.map_err(EngineError::io("feeding psql"))?;
    Ok(())
}

/// The key of a `\restrict KEY` (or `\unrestrict KEY`) line.
fn restrict_line<'a>(line: &'a [u8], command: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(command)?;
    let key = rest.strip_suffix(b"\n").unwrap_or(rest);
    (!key.is_empty() && key.iter().all(u8::is_ascii_alphanumeric)).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_stays_out_of_the_shown_connection() {
        for url in [
            "host=127.0.0.1 user=postgres password=s3cret dbname=test",
            "postgres://postgres:s3cret@127.0.0.1:5432/test",
        ] {
            let c = Conn::parse(url).unwrap();
            assert!(!c.info.contains("s3cret"), "{}", c.info);
            assert!(c.info.contains("dbname='test'"), "{}", c.info);
            assert_eq!(c.password.as_deref(), Some("s3cret"));
            let cmd = c.command("psql");
            let env: Vec<_> = cmd.get_envs().collect();
            assert!(env
                .iter()
                .any(|(k, v)| *k == "PGPASSWORD" && v.is_some_and(|v| v == "s3cret")));
        }
    }

    #[test]
    fn only_a_dumps_own_restrict_lines_are_recognised() {
        assert_eq!(
            restrict_line(b"\\restrict abc123\n", b"\\restrict "),
            Some(&b"abc123"[..])
        );
        assert_eq!(restrict_line(b"\\restrict abc 1\n", b"\\restrict "), None);
        assert_eq!(restrict_line(b"\\! touch x\n", b"\\restrict "), None);
    }
}
