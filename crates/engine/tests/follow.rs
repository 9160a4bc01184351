//! A PostgreSQL database carried by its changes while a move's copy is
//! built, against the suite's real server: the base, then inserts,
//! updates, deletes and sequences; a change of schema starts again from a
//! new base; a copy that drifted from its source is refused; a table
//! without a key makes the database go as a dump; nothing is left behind.

use std::path::{Path, PathBuf};

use commons_engine::apply::Quiet;
use commons_engine::increments::{apply_increment, Shipped, Stats};
use commons_engine::{Engine, StoreConfig};

fn admin_url() -> String {
    std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

fn pg(db: &str) -> postgres::Client {
    postgres::Client::connect(&format!("{} dbname={db}", admin_url()), postgres::NoTls)
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is needed for this test: {e}; `bash scripts/test` starts it")
        })
}

/// Runs `f` with a client of `db` on a thread of its own (the synchronous
/// client cannot block inside the test's runtime).
fn sql<T: Send>(db: &str, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(|| f(&mut pg(db))).join().unwrap())
}

fn rows(db: &str) -> String {
    sql(db, |c| {
        c.query_one(
            "SELECT coalesce(string_agg(to_jsonb(n)::text, ',' ORDER BY id), '') FROM notes n",
            &[],
        )
        .unwrap()
        .get(0)
    })
}

fn slots(db: &str) -> i64 {
    let db = db.to_string();
    sql("postgres", move |c| {
        c.query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
            &[&db],
        )
        .unwrap()
        .get(0)
    })
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("commons-follow-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Ships one increment of `fsrc` from `a` into `copy`, and lets `b` follow it.
async fn step(
    a: &Engine,
    b: &Engine,
    shipped: &mut Shipped,
    copy: &Path,
    state: &Path,
) -> (Stats, Result<String, String>) {
    let fresh = shipped.is_empty();
    let mut wire = Vec::new();
    let stats =
        tokio::task::block_in_place(|| a.write_increment("fsrc", shipped, &mut wire)).unwrap();
    apply_increment(copy, &mut wire.as_slice(), fresh).unwrap();
    let followed = b
        .follow_copy("fdst", copy, state)
        .await
        .map_err(|e| e.to_string());
    (stats, followed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_database_reaches_the_copy_by_its_changes() {
    let mut settings = commons_runtime::RuntimeSettings::from_env();
    settings.postgres_admin_url = Some(admin_url());
    settings.sandboxed = false;
    assert!(
        settings.install().is_ok(),
        "the first to set this process's settings"
    );
    let wal: String = sql("postgres", |c| {
        c.query_one("SHOW wal_level", &[]).unwrap().get(0)
    });
    assert_eq!(
        wal, "logical",
        "the suite's server must have wal_level=logical (scripts/test sets it)"
    );
    sql("postgres", |c| {
        for db in ["c_fsrc_pg", "c_fdst_pg"] {
            for statement in [
                format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{db}'"),
                format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
                format!("DROP ROLE IF EXISTS {db}"),
            ] {
                c.batch_execute(&statement).unwrap();
            }
        }
    });

    let dir = temp("engines");
    let a = Engine::open(&dir.join("a"), &StoreConfig::Embedded).unwrap();
    let b = Engine::open(&dir.join("b"), &StoreConfig::Embedded).unwrap();
    let blueprint = dir.join("commons.yaml");
    std::fs::write(
        &blueprint,
        "name: fsrc\ncomponents:\n  pg: { postgres: {} }\n",
    )
    .unwrap();
    let target = a
        .target(Some(blueprint.to_str().unwrap()), Some("fsrc"), &[])
        .unwrap();
    a.deploy(&target, 2, &Quiet).await.unwrap();
    sql("c_fsrc_pg", |c| {
        c.batch_execute(
            "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL, big text); \
             INSERT INTO notes (body, big) SELECT 'note ' || g, \
             (SELECT string_agg(md5(random()::text || g || h), '') FROM generate_series(1, 300) h) \
             FROM generate_series(1, 50) g",
        )
        .unwrap()
    });

    let (copy, state) = (dir.join("copy"), dir.join("caught"));
    let mut shipped = Shipped::default();
    let (stats, followed) = step(&a, &b, &mut shipped, &copy, &state).await;
    assert!(stats.dumped.is_empty(), "{stats:?}");
    assert_eq!(followed.unwrap(), "pg: base loaded");
    assert_eq!(rows("c_fdst_pg"), rows("c_fsrc_pg"));
    assert_eq!(slots("c_fsrc_pg"), 1, "a slot follows the database");

    // Changes while it serves: each kind, a value too large to be sent
    // again, a quote in a value, a sequence's steps.
    sql("c_fsrc_pg", |c| {
        c.batch_execute(
            "INSERT INTO notes (body) VALUES ('it''s new'), ('another'); \
             UPDATE notes SET body = 'edited' WHERE id = 3; \
             DELETE FROM notes WHERE id = 4; \
             SELECT nextval('notes_id_seq'); SELECT nextval('notes_id_seq')",
        )
        .unwrap()
    });
    let (stats, followed) = step(&a, &b, &mut shipped, &copy, &state).await;
    assert_eq!(stats.changes, 4, "{stats:?}");
    assert_eq!(followed.unwrap(), "pg: 4 changes applied");
    assert_eq!(rows("c_fdst_pg"), rows("c_fsrc_pg"));
    let seq = |db: &str| -> i64 {
        sql(db, |c| {
            c.query_one("SELECT last_value FROM notes_id_seq", &[])
                .unwrap()
                .get(0)
        })
    };
    assert_eq!(seq("c_fdst_pg"), seq("c_fsrc_pg"));
    // The copy's tables are the site's role's, as a restore makes them.
    let owner: String = sql("c_fdst_pg", |c| {
        c.query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'notes'",
            &[],
        )
        .unwrap()
        .get(0)
    });
    assert_eq!(owner, "c_fdst_pg");

    // A change of schema: following starts again from a new base.
    sql("c_fsrc_pg", |c| {
        c.batch_execute(
            "ALTER TABLE notes ADD COLUMN tag text; UPDATE notes SET tag = 't' WHERE id = 2",
        )
        .unwrap()
    });
    let (_, followed) = step(&a, &b, &mut shipped, &copy, &state).await;
    assert_eq!(followed.unwrap(), "pg: base loaded");
    assert_eq!(rows("c_fdst_pg"), rows("c_fsrc_pg"));
    assert_eq!(
        slots("c_fsrc_pg"),
        1,
        "the old slot went, a new one follows"
    );

    // A copy that drifted from its source is refused, not patched over.
    sql("c_fdst_pg", |c| {
        c.batch_execute("DELETE FROM notes WHERE id = 5").unwrap()
    });
    sql("c_fsrc_pg", |c| {
        c.batch_execute("UPDATE notes SET body = 'lost' WHERE id = 5")
            .unwrap()
    });
    let (_, followed) = step(&a, &b, &mut shipped, &copy, &state).await;
    let err = followed.unwrap_err();
    assert!(err.contains("differs from its source"), "{err}");

    // A table without a key cannot be followed: the database goes as a
    // dump, the copy's database is dropped for the cut-over to make anew.
    sql("c_fsrc_pg", |c| {
        c.batch_execute("CREATE TABLE loose (v text)").unwrap()
    });
    let (stats, followed) = step(&a, &b, &mut shipped, &copy, &state).await;
    followed.unwrap();
    assert!(
        stats
            .dumped
            .iter()
            .any(|d| d.contains("public.loose has no primary key")),
        "{stats:?}"
    );
    assert_eq!(slots("c_fsrc_pg"), 0, "nothing follows it any more");
    assert!(copy.join("postgres/pg.sql").exists());
    let dst_exists = || -> i64 {
        sql("postgres", |c| {
            c.query_one(
                "SELECT count(*) FROM pg_database WHERE datname = 'c_fdst_pg'",
                &[],
            )
            .unwrap()
            .get(0)
        })
    };
    assert_eq!(dst_exists(), 0);

    // The shipping process stops mid-move (its memory of the move gone):
    // started again, it drops the slot left behind.
    sql("c_fsrc_pg", |c| {
        c.batch_execute("DROP TABLE loose").unwrap()
    });
    let mut lost = Shipped::default();
    let (_, followed) = step(&a, &b, &mut lost, &copy, &state).await;
    assert_eq!(followed.unwrap(), "pg: base loaded");
    assert_eq!(slots("c_fsrc_pg"), 1);
    drop(lost);
    assert_eq!(
        slots("c_fsrc_pg"),
        1,
        "a slot outlives the process's memory"
    );
    let forgot = tokio::task::block_in_place(|| a.forget_moves()).unwrap();
    assert_eq!(forgot, 1);
    assert_eq!(slots("c_fsrc_pg"), 0, "dropped as the process starts again");

    // Followed again, then given up: the slot and the copy's database go.
    let (_, followed) = step(&a, &b, &mut shipped, &copy, &state).await;
    assert_eq!(followed.unwrap(), "pg: base loaded");
    assert_eq!(slots("c_fsrc_pg"), 1);
    tokio::task::block_in_place(|| shipped.stop_following());
    assert_eq!(slots("c_fsrc_pg"), 0, "the move's slot was dropped");
    b.drop_copy_databases("fdst", &state).await.unwrap();
    assert_eq!(dst_exists(), 0, "the copy's database was dropped");

    // Moving back onto a node that keeps a stopped copy of the site under
    // the same names: the changes wait beside the copy, and the cut-over
    // loads the base and applies them in order.
    let kept = dir.join("kept.yaml");
    std::fs::write(&kept, "name: fdst\ncomponents:\n  pg: { postgres: {} }\n").unwrap();
    let old = b
        .target(Some(kept.to_str().unwrap()), Some("fdst"), &[])
        .unwrap();
    b.deploy(&old, 2, &Quiet).await.unwrap();
    let (copy, state) = (dir.join("copy2"), dir.join("caught2"));
    let mut shipped = Shipped::default();
    let (_, followed) = step(&a, &b, &mut shipped, &copy, &state).await;
    assert_eq!(
        followed.unwrap(),
        "",
        "nothing is loaded over the kept copy"
    );
    for round in 0..2 {
        sql("c_fsrc_pg", move |c| {
            c.batch_execute(&format!(
                "INSERT INTO notes (body) VALUES ('round {round}'); UPDATE notes SET body = 'again' WHERE id = 1"
            ))
            .unwrap()
        });
        let (stats, followed) = step(&a, &b, &mut shipped, &copy, &state).await;
        assert_eq!(stats.changes, 2, "{stats:?}");
        assert_eq!(followed.unwrap(), "");
    }
    let tables: i64 = sql("c_fdst_pg", |c| {
        c.query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'notes'",
            &[],
        )
        .unwrap()
        .get(0)
    });
    assert_eq!(tables, 0, "the kept copy's database was left as it was");
    // The cut-over: the kept copy goes, the copy stands up in its place.
    b.destroy("fdst", 2, &Quiet).await.unwrap();
    b.restore_copy(&copy, Some(&state), Some("fdst"), 2, &Quiet)
        .await
        .unwrap();
    assert_eq!(rows("c_fdst_pg"), rows("c_fsrc_pg"));
    tokio::task::block_in_place(|| shipped.stop_following());
    assert_eq!(slots("c_fsrc_pg"), 0);
    b.destroy("fdst", 2, &Quiet).await.unwrap();
    a.destroy("fsrc", 2, &Quiet).await.unwrap();
}
