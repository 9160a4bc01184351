//! Backup → destroy → restore round-trips real data: rows an app wrote to
//! its SQLite file and to its PostgreSQL database, and files in a volume.

mod common;

use common::*;

fn admin_url() -> String {
    std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

fn run(s: &Sandbox, args: &[&str]) -> Run {
    let r = Run(s
        .cmd(args)
        .env("COMMONS_POSTGRES_URL", admin_url())
        .output()
        .unwrap());
    assert_eq!(r.code(), 0, "commons {args:?}:\n{}", r.all());
    r
}

fn pg(db: &str) -> postgres::Client {
    postgres::Client::connect(&format!("{} dbname={db}", admin_url()), postgres::NoTls)
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is needed for this test: {e}; `bash scripts/test` starts it")
        })
}

#[test]
fn backup_destroy_restore_round_trips_real_data() {
    let s = Sandbox::new("backup");
    // What an earlier run may have left on the shared server.
    let mut admin = pg("test");
    for db in ["c_notes_db", "c_notes_copy_db", "c_evil_db"] {
        for sql in [
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            format!("DROP ROLE IF EXISTS {db}"),
        ] {
            admin.batch_execute(&sql).unwrap();
        }
    }
    s.blueprint(
        r#"name: notes
components:
  db: { postgres: {} }
  files: { volume: {} }
  local: { sqlite: {} }
  migrate:
    job: >-
      psql "${components.db.url}" -v ON_ERROR_STOP=1 -qc "CREATE TABLE IF NOT EXISTS notes (body text)" &&
      python3 -c "import sqlite3,sys; sqlite3.connect(sys.argv[1]).execute('CREATE TABLE IF NOT EXISTS notes (body text)')" ${components.local.path}
"#,
    );
    run(&s, &["deploy"]);
    // The app writes while it runs (here: the test, as the app would).
    let sqlite = s.home.join("deployments/notes/data/local.sqlite3");
    let py = format!("import sqlite3; c=sqlite3.connect('{}'); c.execute(\"INSERT INTO notes VALUES ('kept in sqlite')\"); c.commit()", sqlite.display());
    assert!(std::process::Command::new("python3")
        .args(["-c", &py])
        .status()
        .unwrap()
        .success());
    pg("c_notes_db")
        .execute("INSERT INTO notes VALUES ('kept in postgres')", &[])
        .unwrap();
    std::fs::write(
        s.home.join("deployments/notes/volumes/files/upload.txt"),
        "kept in a volume",
    )
    .unwrap();

    // A link the tenant made to a host file it cannot read: archived as a
    // link, never as the file's bytes.
    let secret = s.dir.join("host-secret");
    std::fs::write(&secret, "canary-host-secret-7d1f").unwrap();
    std::os::unix::fs::symlink(&secret, s.home.join("deployments/notes/volumes/files/leak"))
        .unwrap();

    let b = run(&s, &["backup", "notes", "--json"]).json();
    let archive = b["path"].as_str().unwrap().to_string();
    let bytes = std::fs::read(&archive).unwrap();
    assert!(
        !bytes
            .windows(b"canary-host-secret".len())
            .any(|w| w == b"canary-host-secret"),
        "a link in a volume was followed into the backup"
    );
    assert!(
        archive.ends_with(&format!("{}.tar", b["sha256"].as_str().unwrap())),
        "content-addressed: {archive}"
    );
    assert_eq!(b["manifest"]["databases"][0], "db");

    run(&s, &["destroy", "notes"]);
    assert!(!sqlite.exists());

    // A damaged archive is refused.
    let bad = s
        .dir
        .join(std::path::Path::new(&archive).file_name().unwrap());
    let mut bytes = std::fs::read(&archive).unwrap();
    let last = bytes.len() - 600;
    bytes[last] ^= 1;
    std::fs::write(&bad, bytes).unwrap();
    let r = Run(s
        .cmd(&["restore", bad.to_str().unwrap()])
        .env("COMMONS_POSTGRES_URL", admin_url())
        .output()
        .unwrap());
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("damaged"), "{}", r.stderr());

    run(&s, &["restore", &archive, "--as", "notes-copy"]);
    let py = format!(
        "import sqlite3; print(sqlite3.connect('{}').execute('SELECT body FROM notes').fetchall())",
        s.home
            .join("deployments/notes-copy/data/local.sqlite3")
            .display()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &py])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept in sqlite"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let rows = pg("c_notes_copy_db")
        .query("SELECT body FROM notes", &[])
        .unwrap();
    assert_eq!(
        rows.len(),
        1,
        "the migration ran again but the data was loaded once"
    );
    assert_eq!(rows[0].get::<_, String>(0), "kept in postgres");
    assert_eq!(
        std::fs::read_to_string(
            s.home
                .join("deployments/notes-copy/volumes/files/upload.txt")
        )
        .unwrap(),
        "kept in a volume"
    );
    let leak = s.home.join("deployments/notes-copy/volumes/files/leak");
    assert!(leak.is_symlink(), "restored as the link it was");

    // A crafted archive whose dump runs a shell command: the load refuses
    // every backslash command, and nothing runs.
    let crafted = s.dir.join("crafted");
    std::fs::create_dir_all(&crafted).unwrap();
    let tar = |args: &[&str]| {
        let ok = std::process::Command::new("tar")
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "tar {args:?}");
    };
    tar(&["-xf", &archive, "-C", crafted.to_str().unwrap()]);
    let canary = s.dir.join("shell-ran");
    let dump = crafted.join("postgres/db.sql");
    let mut sql = std::fs::read_to_string(&dump).unwrap();
    sql.push_str(&format!("\\! touch {}\n", canary.display()));
    sql.push_str("\\unrestrict guessed\n\\! touch /dev/null\n");
    std::fs::write(&dump, sql).unwrap();
    let evil = s.dir.join("crafted.tar");
    tar(&[
        "-cf",
        evil.to_str().unwrap(),
        "-C",
        crafted.to_str().unwrap(),
        ".",
    ]);
    let r = Run(s
        .cmd(&["restore", evil.to_str().unwrap(), "--as", "evil"])
        .env("COMMONS_POSTGRES_URL", admin_url())
        .output()
        .unwrap());
    assert_ne!(r.code(), 0, "{}", r.all());
    assert!(r.stderr().contains("restricted"), "{}", r.stderr());
    assert!(!canary.exists(), "a dump in an archive ran a shell command");
    // The half-loaded database was not kept: nothing is in the way of
    // another try.
    let left: i64 = pg("test")
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'c_evil_db'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "a failed restore keeps no database");
    run(&s, &["destroy", "notes-copy"]);
}
