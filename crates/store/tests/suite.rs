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
    let statuses = s.statuses(&["d".into(), "missing".into()]).unwrap();
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses["d"], "ok");

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

    // Every write is in the outbox, in order; a consumer resumes from the
    // last revision it saw and misses nothing.
    let before_delete = s.revision().unwrap();
    s.delete_deployment("d").unwrap();
    assert!(s.deployment("d").unwrap().is_none());
    assert!(s.components("d").unwrap().is_empty());
    assert!(s.last_tasks("d").unwrap().is_empty());
    let all = s.changes_since(0, 100).unwrap();
    let kinds: Vec<&str> = all.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "deployment.put",
            "deployment.put",
            "components.apply",
            "components.apply",
            "run.finish",
            "components.apply",
            "deployment.delete"
        ]
    );
    assert!(all.iter().all(|c| c.key == "d"));
    assert!(all.windows(2).all(|w| w[0].rev < w[1].rev));
    assert_eq!(s.revision().unwrap(), all.last().unwrap().rev);
    let after = s.changes_since(before_delete, 100).unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].kind, "deployment.delete");
    assert_eq!(s.changes_since(all[1].rev, 2).unwrap(), all[2..4].to_vec());
    let applied: serde_json::Value = serde_json::from_str(&all[3].payload).unwrap();
    assert_eq!(applied["put"], serde_json::json!(["b"]));
    assert_eq!(applied["deleted"], serde_json::json!(["a"]));
    assert_eq!(
        s.begin_run("d", 11).unwrap(),
        1,
        "runs start again after a delete"
    );

    // What instances keep for one another: the first writer of a check wins.
    let rev = s.revision().unwrap();
    assert_eq!(s.keep_first("check", "k", b"one").unwrap(), b"one");
    assert_eq!(s.keep_first("check", "k", b"two").unwrap(), b"one");
    assert_eq!(
        s.shared("check", "k").unwrap().as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(s.shared("check", "nope").unwrap(), None);
    let first = s.put_shared("cert", "a.example", b"a1").unwrap();
    let second = s.put_shared("cert", "b.example", b"b1").unwrap();
    let third = s.put_shared("cert", "a.example", b"a2").unwrap();
    assert!(first < second && second < third);
    let since = s.shared_since("cert", first).unwrap();
    assert_eq!(
        since
            .iter()
            .map(|e| (e.name.as_str(), e.body.as_slice()))
            .collect::<Vec<_>>(),
        [("b.example", &b"b1"[..]), ("a.example", &b"a2"[..])]
    );
    assert!(s.shared_since("cert", third).unwrap().is_empty());
    assert!(
        s.shared_since("check", 0).unwrap().len() == 1,
        "kinds are apart"
    );
    assert_eq!(
        s.take_shared("cert", "b.example").unwrap().as_deref(),
        Some(&b"b1"[..])
    );
    assert_eq!(
        s.take_shared("cert", "b.example").unwrap(),
        None,
        "taken once"
    );
    s.delete_shared("cert", "a.example").unwrap();
    assert_eq!(s.shared("cert", "a.example").unwrap(), None);
    assert_eq!(s.revision().unwrap(), rev, "not part of the outbox");
}

fn entry(action: &str, target: &str, org: Option<&str>) -> accounts::AuditEntry {
    accounts::AuditEntry {
        at_ms: 100,
        actor: "u_ann".into(),
        org: org.map(String::from),
        action: action.into(),
        target: target.into(),
        detail: serde_json::json!({"why": "test"}),
    }
}

fn accounts_suite<S: StateStore + AccountStore>(s: &S) {
    use accounts::*;
    let ann = UserRow {
        id: "u_ann".into(),
        email: "ann@example.org".into(),
        name: "Ann".into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$salt$hash".into(),
        platform_admin: true,
        created_ms: 1,
    };
    assert_eq!(s.user_count().unwrap(), 0);
    assert!(s
        .create_user(&ann, &entry("user.signup", "u_ann", None))
        .unwrap());
    let mut twin = ann.clone();
    twin.id = "u_twin".into();
    assert!(
        !s.create_user(&twin, &entry("user.signup", "u_twin", None))
            .unwrap(),
        "an email is taken once"
    );
    let bob = UserRow {
        id: "u_bob".into(),
        email: "bob@example.org".into(),
        platform_admin: false,
        ..ann.clone()
    };
    assert!(s
        .create_user(&bob, &entry("user.signup", "u_bob", None))
        .unwrap());
    assert_eq!(s.user_count().unwrap(), 2);
    assert_eq!(s.user("u_ann").unwrap().unwrap(), ann);
    assert_eq!(s.user_by_email("bob@example.org").unwrap().unwrap(), bob);
    assert!(s.user("u_twin").unwrap().is_none());

    // Sessions expire.
    let session = SessionRow {
        hash: "h1".into(),
        user_id: "u_ann".into(),
        csrf: "c1".into(),
        created_ms: 10,
        expires_ms: 20,
    };
    s.put_session(&session).unwrap();
    assert_eq!(s.session("h1", 19).unwrap().unwrap(), session);
    assert!(s.session("h1", 20).unwrap().is_none());
    s.delete_session("h1").unwrap();
    assert!(s.session("h1", 11).unwrap().is_none());

    // Organisations: the creator is their admin; roles are replaced whole.
    let org = OrgRow {
        id: "acme".into(),
        name: "Acme".into(),
        created_ms: 2,
    };
    assert!(s
        .create_org(&org, "u_ann", &entry("org.create", "acme", Some("acme")))
        .unwrap());
    assert!(!s
        .create_org(&org, "u_bob", &entry("org.create", "acme", Some("acme")))
        .unwrap());
    assert_eq!(s.org("acme").unwrap().unwrap(), org);
    s.set_roles(
        "acme",
        "u_bob",
        &["operator".into(), "developer".into()],
        &entry("member.set", "u_bob", Some("acme")),
    )
    .unwrap();
    let roles = |user: &str| -> Vec<String> {
        s.memberships(user)
            .unwrap()
            .into_iter()
            .map(|m| format!("{}:{}", m.org, m.role))
            .collect()
    };
    assert_eq!(roles("u_ann"), ["acme:admin"]);
    assert_eq!(roles("u_bob"), ["acme:developer", "acme:operator"]);
    assert_eq!(s.members("acme").unwrap().len(), 3);
    s.set_roles(
        "acme",
        "u_bob",
        &[],
        &entry("member.remove", "u_bob", Some("acme")),
    )
    .unwrap();
    assert!(roles("u_bob").is_empty());

    // Tokens: found by hash, revoked once.
    let token = TokenRow {
        id: "t1".into(),
        hash: "th1".into(),
        user_id: "u_ann".into(),
        name: "ci".into(),
        scopes: vec!["sites:read".into(), "sites:write".into()],
        org: Some("acme".into()),
        created_ms: 3,
        revoked_ms: None,
    };
    s.put_token(&token, &entry("token.create", "t1", None))
        .unwrap();
    assert_eq!(s.token_by_hash("th1").unwrap().unwrap(), token);
    assert_eq!(s.tokens("u_ann").unwrap(), std::slice::from_ref(&token));
    assert!(
        !s.revoke_token("u_bob", "t1", &entry("token.revoke", "t1", None))
            .unwrap(),
        "only its owner revokes a token"
    );
    assert!(s
        .revoke_token("u_ann", "t1", &entry("token.revoke", "t1", None))
        .unwrap());
    assert!(!s
        .revoke_token("u_ann", "t1", &entry("token.revoke", "t1", None))
        .unwrap());
    assert_eq!(
        s.token_by_hash("th1").unwrap().unwrap().revoked_ms,
        Some(100)
    );

    // Sites page by name.
    for i in 0..5 {
        let site = SiteRow {
            name: format!("site-{i}"),
            org: "acme".into(),
            created_by: "u_ann".into(),
            created_ms: 4,
        };
        assert!(s
            .create_site(&site, &entry("site.create", &site.name, Some("acme")))
            .unwrap());
    }
    let taken = SiteRow {
        name: "site-0".into(),
        org: "acme".into(),
        created_by: "u_bob".into(),
        created_ms: 5,
    };
    assert!(!s
        .create_site(&taken, &entry("site.create", "site-0", Some("acme")))
        .unwrap());
    assert_eq!(s.site("site-0").unwrap().unwrap().created_by, "u_ann");
    let page: Vec<String> = s
        .sites("acme", Some("site-1"), 2)
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(page, ["site-2", "site-3"]);
    assert_eq!(s.sites("acme", None, 100).unwrap().len(), 5);
    assert!(s.sites("other", None, 100).unwrap().is_empty());
    assert!(s
        .delete_site("site-4", &entry("site.delete", "site-4", Some("acme")))
        .unwrap());
    assert!(!s
        .delete_site("site-4", &entry("site.delete", "site-4", Some("acme")))
        .unwrap());

    // Applications signing users in.
    let client = OidcClientRow {
        id: "c1".into(),
        secret_hash: "sh".into(),
        org: "acme".into(),
        name: "Wiki".into(),
        redirect_uris: vec!["https://wiki.example.org/cb".into()],
        created_ms: 6,
    };
    s.create_oidc_client(&client, &entry("oidc.client", "c1", Some("acme")))
        .unwrap();
    assert_eq!(s.oidc_client("c1").unwrap().unwrap(), client);
    assert!(s.oidc_client("c2").unwrap().is_none());

    // The audit log holds exactly the changes that happened, newest first.
    s.record(&entry("site.deploy", "site-0", Some("acme")))
        .unwrap();
    let all = s.audit(None, None, 1000).unwrap();
    let actions: Vec<&str> = all.iter().map(|a| a.entry.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "site.deploy",
            "oidc.client",
            "site.delete",
            "site.create",
            "site.create",
            "site.create",
            "site.create",
            "site.create",
            "token.revoke",
            "token.create",
            "member.remove",
            "member.set",
            "org.create",
            "user.signup",
            "user.signup"
        ]
    );
    assert!(all.windows(2).all(|w| w[0].seq > w[1].seq));
    assert_eq!(all[0].entry, entry("site.deploy", "site-0", Some("acme")));
    let acme = s.audit(Some("acme"), Some(all[1].seq), 3).unwrap();
    assert_eq!(acme.len(), 3);
    assert!(acme
        .iter()
        .all(|a| a.entry.org.as_deref() == Some("acme") && a.seq < all[1].seq));
}

#[test]
fn sqlite_store_passes_the_suite() {
    let dir = std::env::temp_dir().join(format!("commons-store-suite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    suite(&SqliteStore::open(&dir.join("state.db")).unwrap());
    suite(&SqliteStore::memory().unwrap());
    accounts_suite(&SqliteStore::open(&dir.join("state.db")).unwrap());
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
    accounts_suite(&PgStore::connect(&url, &schema).unwrap());
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}

/// A lease held by one instance: another trying at once is told it is
/// taken; one that waits gets it as soon as the holder lets go, and not
/// before; a holder that dies (its connection closes) lets go too.
#[test]
fn a_lease_is_waited_for_and_passes_on_release() {
    use commons_store::{Leased, StoreConfig};
    use std::time::{Duration, Instant};
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let store = StoreConfig::Postgres {
        url,
        schema: format!("lease_{}", std::process::id()),
    };
    let Leased::Held(first) = store.lease("deploy:wiki", Duration::ZERO).unwrap() else {
        panic!("nobody held it");
    };
    assert!(matches!(
        store.lease("deploy:wiki", Duration::ZERO).unwrap(),
        Leased::Taken
    ));
    // Another name is free.
    assert!(matches!(
        store.lease("deploy:blog", Duration::ZERO).unwrap(),
        Leased::Held(_)
    ));
    let started = Instant::now();
    assert!(matches!(
        store
            .lease("deploy:wiki", Duration::from_millis(300))
            .unwrap(),
        Leased::Taken
    ));
    assert!(started.elapsed() >= Duration::from_millis(300));
    let waiter = {
        let store = store.clone();
        std::thread::spawn(move || {
            let asked = Instant::now();
            let got = store.lease("deploy:wiki", Duration::from_secs(30)).unwrap();
            (matches!(got, Leased::Held(_)), asked.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    drop(first);
    let (held, waited) = waiter.join().unwrap();
    assert!(held, "the waiter got the lease");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}
