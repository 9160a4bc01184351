//! `postgres: {}` on a real PostgreSQL server: a database and role per
//! component, a URL a real client (psql) uses, no password in records, no
//! way into another site's database, dropped on destroy.

mod common;

use common::*;

fn admin_url() -> String {
    std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

fn with_pg(s: &Sandbox, args: &[&str]) -> Run {
    Run(s
        .cmd(args)
        .env("COMMONS_POSTGRES_URL", admin_url())
        .output()
        .unwrap())
}

fn databases() -> Vec<String> {
    let mut c = postgres::Client::connect(&admin_url(), postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is needed for this test ({}): {e}; `bash scripts/test` starts it",
            admin_url()
        )
    });
    c.query("SELECT datname FROM pg_database", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn a_database_per_component_that_a_real_client_uses() {
    let s = Sandbox::new("postgres");
    s.write(
        "site/commons.yaml",
        r#"name: pgsite
components:
  db: { postgres: {} }
  schema:
    job: >-
      psql "${components.db.url}" -v ON_ERROR_STOP=1 -qc
      "CREATE TABLE IF NOT EXISTS notes (body text); INSERT INTO notes VALUES ('hello from psql')"
  read:
    job: psql "${components.db.url}" -Atc "SELECT body FROM notes" > $COMMONS_DATA_DIR/notes; env > $COMMONS_DATA_DIR/env
    after: [schema]
"#,
    );
    let r = with_pg(&s, &["deploy", "site"]);
    assert_eq!(r.code(), 0, "{}", r.all());
    let notes = std::fs::read_to_string(s.home.join("deployments/pgsite/data/notes")).unwrap();
    assert_eq!(notes.trim(), "hello from psql");
    assert!(databases().contains(&"c_pgsite_db".to_string()));
    // The administrator's connection is the platform's, never a workload's.
    let env = std::fs::read_to_string(s.home.join("deployments/pgsite/data/env")).unwrap();
    assert!(!env.contains("COMMONS_POSTGRES_URL"), "{env}");
    // A redeploy changes nothing: the URL (and so the password) is stable.
    let again = with_pg(&s, &["deploy", "pgsite"]);
    assert!(again.stderr().contains("nothing to do"), "{}", again.all());

    // Another site cannot get into this one's database.
    s.write(
        "other/commons.yaml",
        r#"name: other
components:
  db: { postgres: {} }
  peek:
    job: >-
      if psql "$(echo ${components.db.url} | sed 's#/c_other_db$#/c_pgsite_db#')" -Atc "SELECT body FROM notes" > $COMMONS_DATA_DIR/peek 2>&1;
      then echo GOT-IN; else echo refused; fi > $COMMONS_DATA_DIR/verdict
"#,
    );
    let r = with_pg(&s, &["deploy", "other"]);
    assert_eq!(r.code(), 0, "{}", r.all());
    let verdict = std::fs::read_to_string(s.home.join("deployments/other/data/verdict")).unwrap();
    let peek = std::fs::read_to_string(s.home.join("deployments/other/data/peek")).unwrap();
    assert_eq!(verdict.trim(), "refused", "{peek}");
    assert!(
        peek.contains("permission denied"),
        "refused for another reason: {peek}"
    );

    // No password in the records or the state: URLs are recorded masked.
    let log = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(s.home.join("records/pgsite"))
        .args(["log", "-p", "--all"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.contains("postgres://c_pgsite_db:[sensitive]@"),
        "the record shows the masked URL"
    );
    let leaked = |text: &str| {
        text.match_indices("postgres://c_pgsite_db:").any(|(i, m)| {
            let rest = &text[i + m.len()..];
            rest.len() >= 32 && rest[..32].chars().all(|c| c.is_ascii_hexdigit())
        })
    };
    assert!(!leaked(&log));
    assert!(!leaked(&s.stored_state()));

    // Destroy drops the database and its role.
    let r = with_pg(&s, &["destroy", "pgsite"]);
    assert_eq!(r.code(), 0, "{}", r.all());
    let r = with_pg(&s, &["destroy", "other"]);
    assert_eq!(r.code(), 0, "{}", r.all());
    let dbs = databases();
    assert!(
        !dbs.contains(&"c_pgsite_db".to_string()) && !dbs.contains(&"c_other_db".to_string()),
        "{dbs:?}"
    );
}

#[test]
fn without_a_platform_server_the_deploy_says_what_to_set() {
    let s = Sandbox::new("postgres-missing");
    s.blueprint("name: nopg\ncomponents:\n  db: { postgres: {} }\n");
    let r = Run(s
        .cmd(&["deploy"])
        .env_remove("COMMONS_POSTGRES_URL")
        .output()
        .unwrap());
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("COMMONS_POSTGRES_URL"),
        "{}",
        r.stderr()
    );
}
