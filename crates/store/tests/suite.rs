//! One suite, both stores: the embedded SQLite store and PostgreSQL (a real
//! server; `COMMONS_TEST_POSTGRES`, default `host=127.0.0.1 user=postgres dbname=test`).

use commons_store::*;

fn component(name: &str, state: ComponentState) -> ComponentRow {
    ComponentRow {
        name: name.into(),
        kind: "job".into(),
        state,
        hash: "h".into(),
        config: serde_json::json!({"command": "true"}),
        outputs: serde_json::json!({"port": "8080"}),
        handle: serde_json::json!({"pid": 42}),
        depends_on: vec!["x".into()],
        error: None,
        updated_at_ms: 1,
    }
}

fn task(run: i64, component: &str, outcome: &str) -> TaskRow {
    TaskRow {
        run,
        component: component.into(),
        action: "create".into(),
        outcome: outcome.into(),
        attempts: 2,
        error: (outcome != "ok").then(|| "exit 3".into()),
        started_at_ms: 5,
        finished_at_ms: 6,
    }
}

fn suite(s: &dyn StateStore) {
    assert!(s.deployment("d").unwrap().is_none());
    let mut row = DeploymentRow {
        name: "d".into(),
        blueprint: "/x/commons.yaml".into(),
        inputs: serde_json::json!({"a": 1, "b": "two"}),
        status: "running".into(),
        created_at_ms: 1,
        updated_at_ms: 2,
    };
    s.put_deployment(&row).unwrap();
    row.status = "ok".into();
    row.updated_at_ms = 3;
    s.put_deployment(&row).unwrap();
    assert_eq!(s.deployment("d").unwrap().unwrap(), row);
    assert_eq!(s.deployments().unwrap(), [row.clone()]);

    let run = s.begin_run("d", 5).unwrap();
    assert_eq!(run, 1);
    s.apply(
        "d",
        &[
            ComponentChange::Put(component("b", ComponentState::Applying)),
            ComponentChange::Put(component("a", ComponentState::Ready)),
        ],
        &[task(run, "a", "ok")],
    )
    .unwrap();
    let comps = s.components("d").unwrap();
    assert_eq!(
        comps.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(comps[0], component("a", ComponentState::Ready));
    assert_eq!(comps[1].state, ComponentState::Applying);
    // Upsert and delete in one batch.
    s.apply(
        "d",
        &[
            ComponentChange::Put(component("b", ComponentState::Error)),
            ComponentChange::Delete("a".into()),
        ],
        &[task(run, "b", "failed")],
    )
    .unwrap();
    let comps = s.components("d").unwrap();
    assert_eq!(comps.len(), 1);
    assert_eq!(comps[0].state, ComponentState::Error);
    s.finish_run("d", run, "failed", 9).unwrap();
    assert_eq!(
        s.tasks("d", run).unwrap(),
        [task(run, "a", "ok"), task(run, "b", "failed")]
    );
    let run2 = s.begin_run("d", 10).unwrap();
    assert_eq!(run2, 2);
    s.apply("d", &[], &[task(run2, "b", "ok")]).unwrap();
    let last = s.last_tasks("d").unwrap();
    assert_eq!(last, [task(run, "a", "ok"), task(run2, "b", "ok")]);

    s.delete_deployment("d").unwrap();
    assert!(s.deployment("d").unwrap().is_none());
    assert!(s.components("d").unwrap().is_empty());
    assert!(s.last_tasks("d").unwrap().is_empty());
    assert_eq!(
        s.begin_run("d", 11).unwrap(),
        1,
        "runs start again after a delete"
    );
}

#[test]
fn sqlite_store_passes_the_suite() {
    let dir = std::env::temp_dir().join(format!("commons-store-suite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    suite(&SqliteStore::open(&dir.join("state.db")).unwrap());
    suite(&SqliteStore::memory().unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn postgres_store_passes_the_suite() {
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("store_suite_{}", std::process::id());
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
        panic!("PostgreSQL is needed for this test ({url}): {e}; `bash scripts/test` starts it")
    });
    admin
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .unwrap();
    suite(&PgStore::connect(&url, &schema).unwrap());
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}
