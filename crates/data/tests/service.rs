//! DataCommons' rules, end to end, on both back ends — a real SQLite data
//! directory and a real PostgreSQL server (`COMMONS_TEST_POSTGRES`, default
//! `host=127.0.0.1 user=postgres dbname=test`): classes, grants,
//! validation, provenance, the feed's cursors, usage, export and import,
//! and erase (with a canary searched for in every file and in a dump of the
//! database).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commons_data::db::Backend;
use commons_data::feed::{Event, Message};
use commons_data::service::{
    Action, AppCall, AppDecl, Class, CollectionDecl, DataCommons, DataError, Grantee, UsageEvent,
    UsageSink, Viewer,
};
use serde_json::{json, Value};

#[derive(Default)]
struct Usage(Mutex<Vec<UsageEvent>>);

impl UsageSink for Usage {
    fn record(&self, event: UsageEvent) {
        self.0.lock().unwrap().push(event);
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "commons-data-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Which database a test runs on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Sqlite,
    Postgres,
}

/// Where one platform keeps its data: a data directory and, on
/// PostgreSQL, a schema of its own (dropped afterwards).
struct Place {
    dir: PathBuf,
    backend: Backend,
    postgres: Option<(String, String)>,
}

/// Runs administrative SQL on a thread of its own: the synchronous client
/// may not block inside the test's runtime.
fn admin(url: &str, sql: String) -> Result<(), String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).map_err(|e| {
            format!(
                "PostgreSQL is needed for this test ({url}): {e}; `bash scripts/test` starts it"
            )
        })?;
        client.batch_execute(&sql).map_err(|e| e.to_string())
    })
    .join()
    .unwrap()
}

fn place(kind: Kind, name: &str) -> Place {
    let dir = tempdir(name);
    match kind {
        Kind::Sqlite => Place {
            dir,
            backend: Backend::Embedded,
            postgres: None,
        },
        Kind::Postgres => {
            let url = std::env::var("COMMONS_TEST_POSTGRES")
                .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
            let schema = format!("data_{name}_{}", std::process::id());
            admin(&url, format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).unwrap();
            Place {
                dir,
                backend: Backend::Postgres {
                    url: url.clone(),
                    schema: schema.clone(),
                },
                postgres: Some((url, schema)),
            }
        }
    }
}

impl Place {
    /// Whether `needle` is anywhere this platform keeps data: any file in
    /// its data directory (the database, its WAL, keys) and, on
    /// PostgreSQL, a dump of its schema (where bytes columns are hex).
    fn holds(&self, needle: &[u8]) -> bool {
        grep_dir(&self.dir, needle)
            || self.dump().is_some_and(|d| {
                contains(&d, needle) || contains(&d, hex::encode(needle).as_bytes())
            })
    }

    fn dump(&self) -> Option<Vec<u8>> {
        let (url, schema) = self.postgres.as_ref()?;
        let out = std::process::Command::new("pg_dump")
            .args(["--schema", schema, "--dbname", url])
            .output()
            .unwrap_or_else(|e| panic!("pg_dump is needed for this test: {e}"));
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            contains(&out.stdout, b"CREATE TABLE"),
            "the dump holds the tables"
        );
        Some(out.stdout)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some((url, schema)) = &self.postgres {
            let _ = admin(url, format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each test once per back end.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Sqlite).await
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Postgres).await
            })*
        }
    };
}

on_both!(
    classes_grants_and_the_feed_follow_consent,
    bad_input_gets_a_field_path_and_changes_nothing,
    feed_cursors_follow_the_firehose_rules,
    export_then_import_gives_the_same_repository,
    erase_leaves_the_canary_nowhere,
    fork_diverge_and_merge_with_a_conflict_list,
    blobs_follow_their_collections_rules,
    a_repository_file_imports_into_a_users_repository,
    a_batch_of_writes_is_one_commit_or_nothing,
    the_feed_reaches_subscribers_of_another_instance_sharing_the_database,
    an_instance_with_another_platform_key_is_refused,
);

fn schema(nsid: &str, properties: Value, required: &[&str]) -> Value {
    json!({"lexicon": 1, "id": nsid, "defs": {"main": {
        "type": "record", "key": "any",
        "record": {"type": "object", "required": required, "properties": properties}
    }}})
}

fn collection(nsid: &str, class: Class, properties: Value) -> CollectionDecl {
    CollectionDecl {
        nsid: nsid.into(),
        class,
        licence: (class == Class::Public).then(|| "CC-BY-4.0".into()),
        schema: schema(nsid, properties, &[]),
        purpose: format!("to keep your {nsid}"),
        read: true,
        write: true,
        fields: None,
        indexed: Vec::new(),
    }
}

const NOTE: &str = "app.notes.note";
const DIARY: &str = "app.notes.diary";
const HEALTH: &str = "app.notes.health";

/// A notes app with one collection of each class, and a second app.
fn platform(place: &Place) -> (DataCommons, Arc<Usage>) {
    let usage = Arc::new(Usage::default());
    let commons = DataCommons::open_on(&place.backend, &place.dir, usage.clone(), 1000).unwrap();
    let mut note = collection(
        NOTE,
        Class::Public,
        json!({"text": {"type": "string", "maxLength": 3000}, "tag": {"type": "string"}}),
    );
    note.indexed = vec!["tag".into()];
    let diary = collection(DIARY, Class::Personal, json!({"text": {"type": "string"}}));
    let mut health = collection(
        HEALTH,
        Class::Private,
        json!({"weight": {"type": "integer"}, "mood": {"type": "string"}}),
    );
    health.indexed = vec!["mood".into()];
    commons
        .register_app(&AppDecl {
            app: "notes".into(),
            revision: "rev-1".into(),
            collections: vec![note, diary, health.clone()],
        })
        .unwrap();
    // A second app that reads only the weight of the private collection.
    let mut health_reader = health;
    health_reader.write = false;
    health_reader.fields = Some(vec!["weight".into()]);
    commons
        .register_app(&AppDecl {
            app: "coach".into(),
            revision: "c-7".into(),
            collections: vec![health_reader],
        })
        .unwrap();
    (commons, usage)
}

fn call(app: &str, user: &str) -> AppCall {
    AppCall {
        app: app.into(),
        user: user.into(),
    }
}

async fn classes_grants_and_the_feed_follow_consent(kind: Kind) {
    let place = place(kind, "classes");
    let (commons, usage) = platform(&place);
    let notes = call("notes", "alice");
    // No consent yet: 403 on write.
    let err = commons
        .create(&notes, DIARY, None, &json!({"$type": DIARY, "text": "x"}))
        .unwrap_err();
    assert!(matches!(err, DataError::Forbidden(_)), "{err}");
    assert_eq!(err.status(), 403);
    assert_eq!(commons.consent("alice", "notes").unwrap(), 6);

    let mut coach_feed = commons
        .subscribe(Viewer::App("coach".into()), None)
        .unwrap();
    let mut public_feed = commons.subscribe(Viewer::Public, None).unwrap();

    let note = commons
        .create(
            &notes,
            NOTE,
            None,
            &json!({"$type": NOTE, "text": "hello world", "tag": "greeting"}),
        )
        .unwrap();
    commons
        .create(
            &notes,
            DIARY,
            Some("d1"),
            &json!({"$type": DIARY, "text": "dear diary"}),
        )
        .unwrap();
    let health = commons
        .create(
            &notes,
            HEALTH,
            Some("h1"),
            &json!({"$type": HEALTH, "weight": 70, "mood": "calm", "secretNote": "undeclared"}),
        )
        .unwrap();

    // The coach, without a grant, sees the public note and nothing else.
    let first = next_event(&mut coach_feed).await;
    assert_eq!(ops(&first)[0].0, "create");
    assert!(ops(&first)[0].1.starts_with(NOTE));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), coach_feed.next())
            .await
            .is_err(),
        "no events of collections the coach holds no grant for"
    );

    // Public: anyone reads it, with its licence and provenance.
    let stranger = call("coach", "bob");
    let rkey = note.uri.rsplit('/').next().unwrap();
    let seen = commons.get(&stranger, "alice", NOTE, rkey).unwrap();
    assert_eq!(seen.value["text"], "hello world");
    assert_eq!(seen.licence.as_deref(), Some("CC-BY-4.0"));
    assert_eq!(
        (
            seen.provenance.app.as_str(),
            seen.provenance.revision.as_str(),
            seen.provenance.user.as_str()
        ),
        ("notes", "rev-1", "alice")
    );

    // Personal: bob (through an app alice allowed) cannot, until alice shares it with him.
    let bob_via_notes = call("notes", "bob");
    assert!(matches!(
        commons.get(&bob_via_notes, "alice", DIARY, "d1"),
        Err(DataError::Forbidden(_))
    ));
    commons
        .grant("alice", &Grantee::Person("bob".into()), DIARY, Action::Read)
        .unwrap();
    assert_eq!(
        commons
            .get(&bob_via_notes, "alice", DIARY, "d1")
            .unwrap()
            .value["text"],
        "dear diary"
    );

    // Private: the coach has no grant yet -> 403; then only the declared, consented field.
    let coach = call("coach", "alice");
    assert!(matches!(
        commons.get(&coach, "alice", HEALTH, "h1"),
        Err(DataError::Forbidden(_))
    ));
    commons.consent("alice", "coach").unwrap();
    let seen = commons.get(&coach, "alice", HEALTH, "h1").unwrap();
    assert_eq!(seen.value, json!({"$type": HEALTH, "weight": 70}));
    // Even the writing app never gets a field its schema did not declare.
    let own = commons.get(&notes, "alice", HEALTH, "h1").unwrap();
    assert_eq!(
        own.value,
        json!({"$type": HEALTH, "weight": 70, "mood": "calm"})
    );
    // The owner's own view shows everything, with provenance.
    let mine = commons.my_records("alice").unwrap();
    assert_eq!(mine.len(), 3);
    assert!(mine
        .iter()
        .all(|r| r.provenance.app == "notes" && r.provenance.revision == "rev-1"));
    assert_eq!(
        mine.iter().find(|r| r.collection == HEALTH).unwrap().value["secretNote"],
        "undeclared"
    );
    // Private values are not in the repository's blocks in the clear.
    let car = commons.repo_car("alice").unwrap();
    assert!(!contains(&car, b"calm") && !contains(&car, b"dear diary"));
    assert!(
        contains(&car, b"hello world"),
        "public records are plaintext"
    );

    // The coach's feed saw nothing of alice's writes before its grant; the
    // public feed saw only the public note.
    commons
        .update(
            &notes,
            HEALTH,
            "h1",
            &json!({"$type": HEALTH, "weight": 71, "mood": "happy"}),
        )
        .unwrap();
    let next = next_event(&mut coach_feed).await;
    assert_eq!(ops(&next), [("update".to_string(), format!("{HEALTH}/h1"))]);
    assert_eq!(
        health.uri,
        format!("at://{}/{HEALTH}/h1", commons.did("alice").unwrap())
    );
    let first_public = next_event(&mut public_feed).await;
    assert_eq!(ops(&first_public)[0].1, format!("{NOTE}/{rkey}"));
    // A revoked grant stops reads and events.
    commons
        .revoke("alice", &Grantee::App("coach".into()), HEALTH, Action::Read)
        .unwrap();
    assert!(matches!(
        commons.get(&coach, "alice", HEALTH, "h1"),
        Err(DataError::Forbidden(_))
    ));
    commons
        .update(
            &notes,
            HEALTH,
            "h1",
            &json!({"$type": HEALTH, "weight": 72}),
        )
        .unwrap();
    commons
        .create(
            &notes,
            NOTE,
            Some("after"),
            &json!({"$type": NOTE, "text": "public again"}),
        )
        .unwrap();
    let next = next_event(&mut coach_feed).await;
    assert_eq!(
        ops(&next),
        [("create".to_string(), format!("{NOTE}/after"))],
        "the revoked collection's event was not delivered"
    );

    // Usage: one event per read and write, with bytes.
    let usage = usage.0.lock().unwrap();
    let writes = usage.iter().filter(|u| u.action == "write").count();
    let reads = usage.iter().filter(|u| u.action == "read").count();
    assert_eq!(writes, 6);
    assert_eq!(reads, 4, "refused reads are not metered");
    assert!(usage.iter().all(|u| u.bytes > 0));
    commons.flush().unwrap();
    let log = commons.access_log("alice").unwrap();
    assert!(
        log.iter()
            .any(|l| l["app"] == "coach" && l["collection"] == HEALTH && l["count"] == 1),
        "{log:?}"
    );
}

async fn bad_input_gets_a_field_path_and_changes_nothing(kind: Kind) {
    let place = place(kind, "bad");
    let (commons, _) = platform(&place);
    commons.consent("alice", "notes").unwrap();
    let notes = call("notes", "alice");
    let err = commons
        .create(&notes, NOTE, None, &json!({"$type": NOTE, "text": 5}))
        .unwrap_err();
    assert_eq!(
        err,
        DataError::Invalid {
            path: "$.text".into(),
            message: "must be a string (found an integer)".into()
        }
    );
    assert_eq!(err.status(), 422);
    let err = commons
        .create(
            &notes,
            NOTE,
            None,
            &json!({"$type": NOTE, "text": "x".repeat(3001)}),
        )
        .unwrap_err();
    assert!(
        matches!(&err, DataError::Invalid { path, .. } if path == "$.text"),
        "{err}"
    );
    let err = commons
        .create(
            &notes,
            "app.other.thing",
            None,
            &json!({"$type": "app.other.thing"}),
        )
        .unwrap_err();
    assert_eq!(err.status(), 404);
    let huge = "x".repeat(300 * 1024);
    let big = collection(
        "app.notes.big",
        Class::Public,
        json!({"text": {"type": "string"}}),
    );
    commons
        .register_app(&AppDecl {
            app: "notes".into(),
            revision: "rev-2".into(),
            collections: vec![big],
        })
        .unwrap();
    commons.consent("alice", "notes").unwrap();
    let err = commons
        .create(
            &notes,
            "app.notes.big",
            None,
            &json!({"$type": "app.notes.big", "text": huge}),
        )
        .unwrap_err();
    assert_eq!(err.status(), 413);
    let err = commons
        .create(
            &notes,
            NOTE,
            Some("bad/key"),
            &json!({"$type": NOTE, "text": "x"}),
        )
        .unwrap_err();
    assert_eq!(err.status(), 422);
    // Nothing was written by any of these.
    assert!(commons.my_records("alice").unwrap().is_empty());
    // A breaking schema change is refused.
    let mut retyped = collection(
        NOTE,
        Class::Public,
        json!({"text": {"type": "integer"}, "tag": {"type": "string"}}),
    );
    retyped.indexed = vec!["tag".into()];
    let err = commons
        .register_app(&AppDecl {
            app: "notes".into(),
            revision: "rev-3".into(),
            collections: vec![retyped],
        })
        .unwrap_err();
    assert!(err.to_string().contains("new NSID"), "{err}");
    // A class never changes.
    let reclassed = collection(DIARY, Class::Public, json!({"text": {"type": "string"}}));
    let err = commons
        .register_app(&AppDecl {
            app: "notes".into(),
            revision: "rev-3".into(),
            collections: vec![reclassed],
        })
        .unwrap_err();
    assert!(err.to_string().contains("class never changes"), "{err}");
}

async fn feed_cursors_follow_the_firehose_rules(kind: Kind) {
    let place = place(kind, "feed");
    let usage = Arc::new(Usage::default());
    // A window of 1,100 events: after 2,200 writes the oldest are gone.
    let commons = DataCommons::open_on(&place.backend, &place.dir, usage, 1100).unwrap();
    commons
        .register_app(&AppDecl {
            app: "notes".into(),
            revision: "r".into(),
            collections: vec![collection(
                NOTE,
                Class::Public,
                json!({"text": {"type": "string"}}),
            )],
        })
        .unwrap();
    commons.consent("alice", "notes").unwrap();
    let notes = call("notes", "alice");
    for i in 0..2200 {
        commons
            .create(
                &notes,
                NOTE,
                Some(&format!("n{i:05}")),
                &json!({"$type": NOTE, "text": format!("note {i}")}),
            )
            .unwrap();
    }
    // Future cursor: an error.
    let err = commons
        .subscribe(Viewer::Public, Some(1_000_000))
        .err()
        .unwrap();
    assert_eq!(err.status(), 400);
    // Inside the window: replay after it, in order.
    let mut sub = commons.subscribe(Viewer::Public, Some(2190)).unwrap();
    for expected in 2191..=2200 {
        assert_eq!(next_event(&mut sub).await.seq(), expected);
    }
    // Then live.
    commons
        .create(
            &notes,
            NOTE,
            Some("live"),
            &json!({"$type": NOTE, "text": "live"}),
        )
        .unwrap();
    let live = next_event(&mut sub).await;
    assert_eq!(ops(&live)[0].1, format!("{NOTE}/live"));
    // Older than the window: an OutdatedCursor info, then the window from its start.
    let mut old = commons.subscribe(Viewer::Public, Some(3)).unwrap();
    match tokio::time::timeout(Duration::from_secs(5), old.next())
        .await
        .unwrap()
        .unwrap()
    {
        Message::Info(info) => assert_eq!(info.name, "OutdatedCursor"),
        other => panic!("expected OutdatedCursor, got {other:?}"),
    }
    let first = next_event(&mut old).await.seq();
    assert!(
        first > 3 && first <= 2201 - 1000,
        "replay starts at the window's oldest event ({first})"
    );
    // No cursor: live only.
    let mut live_only = commons.subscribe(Viewer::Public, None).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), live_only.next())
            .await
            .is_err()
    );
    // Events carry blocks that check out: the commit and the record.
    let Event::Commit(commit) = &*live else {
        panic!()
    };
    let car = commons_data::feed::decode_blocks(&commit.blocks).unwrap();
    let parsed = commons_data::car::read_sync(&car).unwrap();
    assert_eq!(parsed.roots[0].to_string(), commit.commit);
    assert!(parsed
        .blocks
        .keys()
        .any(|c| Some(c.to_string()) == commit.ops[0].cid));
}

async fn export_then_import_gives_the_same_repository(kind: Kind) {
    let place = place(kind, "export");
    let (commons, _) = platform(&place);
    commons.consent("alice", "notes").unwrap();
    let notes = call("notes", "alice");
    for i in 0..50 {
        commons
            .create(
                &notes,
                NOTE,
                None,
                &json!({"$type": NOTE, "text": format!("public {i}"), "tag": "t"}),
            )
            .unwrap();
        commons
            .create(
                &notes,
                HEALTH,
                Some(&format!("h{i}")),
                &json!({"$type": HEALTH, "weight": i, "mood": "ok"}),
            )
            .unwrap();
    }
    // Blobs of both kinds, referenced from records.
    let sealed_blob = commons
        .put_blob(&notes, HEALTH, "text/plain", b"a sealed attachment")
        .unwrap();
    let public_blob = commons
        .put_blob(&notes, NOTE, "image/png", b"a public picture")
        .unwrap();
    let blob_cid = |b: &Value| b["ref"]["$link"].as_str().unwrap().to_string();
    let archive = commons.export("alice").unwrap();
    let root_before = commons_data::repo::verify(&commons.repo_car("alice").unwrap(), None)
        .await
        .unwrap()
        .data;
    // A fresh platform with the same apps.
    let other = self::place(kind, "import");
    let (fresh, _) = platform(&other);
    let root = fresh.import("alice", &archive).unwrap();
    assert_eq!(root, root_before.to_string());
    assert_eq!(fresh.did("alice").unwrap(), commons.did("alice").unwrap());
    let mine = fresh.my_records("alice").unwrap();
    assert_eq!(mine.len(), 100);
    let health = mine.iter().find(|r| r.rkey == "h7").unwrap();
    assert_eq!(
        health.value["weight"], 7,
        "sealed records open with the imported data key"
    );
    assert_eq!(health.provenance.app, "notes");
    // Queries by an indexed field work on both classes after import.
    fresh.consent("alice", "notes").unwrap();
    let page = fresh
        .query(&notes, "alice", HEALTH, "mood", "ok", 1000)
        .unwrap();
    assert_eq!(page.records.len(), 50);
    assert_eq!(
        fresh
            .query(&notes, "alice", NOTE, "tag", "t", 10)
            .unwrap()
            .records
            .len(),
        10
    );
    // The blobs came along, under the CIDs records name them by.
    let (mime, bytes) = fresh
        .get_blob(&notes, "alice", HEALTH, &blob_cid(&sealed_blob))
        .unwrap();
    assert_eq!(
        (mime.as_str(), bytes.as_slice()),
        ("text/plain", &b"a sealed attachment"[..])
    );
    let (_, bytes) = fresh
        .get_blob(&notes, "alice", NOTE, &blob_cid(&public_blob))
        .unwrap();
    assert_eq!(bytes, b"a public picture");
    assert!(
        !other.holds(b"a sealed attachment"),
        "still sealed after import"
    );
    // Importing over an existing account is refused.
    assert_eq!(fresh.import("alice", &archive).unwrap_err().status(), 409);
    assert!(fresh.import("carol", b"not a tar").is_err());
}

async fn erase_leaves_the_canary_nowhere(kind: Kind) {
    let place = place(kind, "erase");
    let (commons, _) = platform(&place);
    commons.consent("alice", "notes").unwrap();
    commons.consent("bob", "notes").unwrap();
    let notes = call("notes", "alice");
    const CANARY: &str = "CANARY-7f3a9c2e-erase-me";
    commons
        .create(
            &notes,
            NOTE,
            Some("c1"),
            &json!({"$type": NOTE, "text": CANARY, "tag": CANARY}),
        )
        .unwrap();
    commons
        .create(
            &notes,
            DIARY,
            Some("c2"),
            &json!({"$type": DIARY, "text": CANARY}),
        )
        .unwrap();
    commons
        .create(
            &notes,
            HEALTH,
            Some("c3"),
            &json!({"$type": HEALTH, "mood": CANARY}),
        )
        .unwrap();
    commons
        .update(
            &notes,
            NOTE,
            "c1",
            &json!({"$type": NOTE, "text": format!("{CANARY} v2"), "tag": CANARY}),
        )
        .unwrap();
    for i in 0..200 {
        commons
            .create(
                &notes,
                NOTE,
                None,
                &json!({"$type": NOTE, "text": format!("{CANARY} {i}")}),
            )
            .unwrap();
    }
    // Bob's data stays.
    commons
        .create(
            &call("notes", "bob"),
            NOTE,
            Some("b1"),
            &json!({"$type": NOTE, "text": "bob's note"}),
        )
        .unwrap();
    let before = commons
        .get(&call("coach", "x"), "alice", NOTE, "c1")
        .unwrap();
    assert!(before.value["text"].as_str().unwrap().contains(CANARY));
    assert!(
        place.holds(CANARY.as_bytes()),
        "the canary is on disk before the erase (public records are plaintext)"
    );

    let mut watcher = commons.subscribe(Viewer::Public, None).unwrap();
    let erased = commons.erase("alice").unwrap();
    assert_eq!(erased.records, 203);
    assert_eq!(erased.public_deleted, 201);

    // Subscribers are told: a deletion commit without content, then the account event.
    let deletion = next_event(&mut watcher).await;
    let Event::Commit(c) = &*deletion else {
        panic!("expected the deletion commit")
    };
    assert!(c
        .ops
        .iter()
        .all(|o| o.action == "delete" && o.cid.is_none()));
    match next_event(&mut watcher).await.as_ref() {
        Event::Account(a) => assert!(!a.active && a.status == "deleted"),
        other => panic!("expected the account event, got {other:?}"),
    }
    // Nowhere on disk: the database, its WAL, anything in the directory.
    assert!(
        !place.holds(CANARY.as_bytes()),
        "the canary survived the erase on disk"
    );
    // Not in the feed replayed from the start.
    let mut replay = commons
        .subscribe(Viewer::Owner("alice".into()), Some(0))
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), replay.next()).await {
            Ok(Ok(Message::Event(e))) => {
                assert!(!serde_json::to_string(&*e).unwrap().contains(CANARY))
            }
            Ok(Ok(Message::Info(_))) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break,
        }
    }
    // Not in an export made afterwards (there is none to make).
    assert_eq!(commons.export("alice").unwrap_err().status(), 404);
    assert_eq!(
        commons
            .get(&call("coach", "x"), "alice", NOTE, "c1")
            .unwrap_err()
            .status(),
        410
    );
    // Bob is untouched.
    assert_eq!(
        commons
            .get(&call("coach", "x"), "bob", NOTE, "b1")
            .unwrap()
            .value["text"],
        "bob's note"
    );
    // And after a restart, still nothing.
    drop(commons);
    drop(watcher);
    drop(replay);
    let (reopened, _) = platform(&place);
    assert!(reopened.my_records("alice").unwrap().is_empty());
    assert!(!place.holds(CANARY.as_bytes()));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn grep_dir(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|entry| {
        let path = entry.unwrap().path();
        if path.is_dir() {
            grep_dir(&path, needle)
        } else {
            contains(&std::fs::read(&path).unwrap_or_default(), needle)
        }
    })
}

async fn the_feed_reaches_subscribers_of_another_instance_sharing_the_database(kind: Kind) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let place = place(kind, "fanout");
    let (here, _) = platform(&place);
    let (there, _) = platform(&place);
    // What the bus carries between instances: each committed event's
    // sequence number (crates/bus/tests/feed.rs carries it through a real
    // NATS server). `lose` drops one notice, as a lost connection would.
    let lose = Arc::new(AtomicBool::new(false));
    {
        let (here, lose) = (here.clone(), lose.clone());
        there.relay_commits(move |seq| {
            if !lose.swap(false, Ordering::SeqCst) {
                here.committed_elsewhere(seq).unwrap();
            }
        });
    }
    let mut sub = here.subscribe(Viewer::Public, None).unwrap();
    there.consent("alice", "notes").unwrap();
    let notes = call("notes", "alice");
    let write = |key: &str| {
        there
            .create(
                &notes,
                NOTE,
                Some(key),
                &json!({"$type": NOTE, "text": key}),
            )
            .unwrap();
    };
    write("first");
    let mut paths = Vec::new();
    loop {
        let event = next_event(&mut sub).await;
        paths.extend(ops(&event).into_iter().map(|(_, p)| p));
        if paths.iter().any(|p| p.ends_with("/first")) {
            break;
        }
    }
    // The notice of "second" is lost; "third"'s shows the gap, and the
    // subscriber reads both from the database, in order.
    lose.store(true, Ordering::SeqCst);
    write("second");
    write("third");
    let a = next_event(&mut sub).await;
    let b = next_event(&mut sub).await;
    assert_eq!(b.seq(), a.seq() + 1);
    assert_eq!(ops(&a)[0].1, format!("{NOTE}/second"));
    assert_eq!(ops(&b)[0].1, format!("{NOTE}/third"));
}

async fn an_instance_with_another_platform_key_is_refused(kind: Kind) {
    let place = place(kind, "keycheck");
    let (first, _) = platform(&place);
    first.consent("alice", "notes").unwrap();
    drop(first);
    // The same key again: it opens, and alice's account with it.
    let (again, _) = platform(&place);
    again
        .create(
            &call("notes", "alice"),
            NOTE,
            Some("k"),
            &json!({"$type": NOTE, "text": "k"}),
        )
        .unwrap();
    drop(again);
    // An instance that made a key of its own (its data directory without
    // the shared file) is refused before it seals anything with it.
    std::fs::remove_file(place.dir.join("platform.key")).unwrap();
    let usage = Arc::new(Usage::default());
    let err = DataCommons::open_on(&place.backend, &place.dir, usage, 1000)
        .err()
        .expect("another key is refused");
    assert!(
        err.to_string()
            .contains("is not the key this database's accounts are sealed with"),
        "{err}"
    );
}

async fn next_event(sub: &mut commons_data::service::Subscription) -> Arc<Event> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("an event within 5 s")
            .unwrap()
        {
            Message::Event(e) => return e,
            Message::Info(_) => continue,
        }
    }
}

fn ops(event: &Event) -> Vec<(String, String)> {
    match event {
        Event::Commit(c) => c
            .ops
            .iter()
            .map(|o| (o.action.clone(), o.path.clone()))
            .collect(),
        Event::Account(_) => Vec::new(),
    }
}

async fn fork_diverge_and_merge_with_a_conflict_list(kind: Kind) {
    use commons_data::fork::Side;
    use std::collections::BTreeMap;
    let place = place(kind, "fork");
    let (commons, _) = platform(&place);
    commons.consent("alice", "notes").unwrap();
    commons.consent("bob", "notes").unwrap();
    let (alice, bob) = (call("notes", "alice"), call("notes", "bob"));
    let note = |text: &str| json!({"$type": NOTE, "text": text});
    let diary = |text: &str| json!({"$type": DIARY, "text": text});
    for (k, t) in [("n1", "one"), ("n2", "two"), ("n3", "three")] {
        commons.create(&alice, NOTE, Some(k), &note(t)).unwrap();
    }
    for (k, t) in [
        ("d1", "shared diary"),
        ("d2", "secret diary"),
        ("d3", "another shared"),
    ] {
        commons.create(&alice, DIARY, Some(k), &diary(t)).unwrap();
    }
    // Bob forks: the public notes, and the diaries because alice shares
    // that collection with him (grants are per collection).
    assert_eq!(
        commons.fork("alice", "carol").unwrap().applied,
        3,
        "carol gets the public notes only"
    );
    commons
        .grant("alice", &Grantee::Person("bob".into()), DIARY, Action::Read)
        .unwrap();
    let forked = commons.fork("alice", "bob").unwrap();
    assert_eq!(forked.applied, 6);
    assert_eq!(
        commons.get(&bob, "bob", DIARY, "d3").unwrap().value["text"],
        "another shared"
    );
    assert_eq!(
        commons.fork("alice", "bob").unwrap_err().status(),
        409,
        "one fork per pair"
    );

    // Diverge: both edit n2; alice edits n1; bob edits n3, adds n4, edits d1.
    commons
        .update(&alice, NOTE, "n1", &note("one, alice"))
        .unwrap();
    commons
        .update(&alice, NOTE, "n2", &note("two, alice"))
        .unwrap();
    commons.update(&bob, NOTE, "n2", &note("two, bob")).unwrap();
    commons
        .update(&bob, NOTE, "n3", &note("three, bob"))
        .unwrap();
    commons
        .create(&bob, NOTE, Some("n4"), &note("four, bob"))
        .unwrap();
    commons
        .update(&bob, DIARY, "d1", &diary("bob's take"))
        .unwrap();

    // Merging back lists the conflict and changes nothing.
    let before = commons.repo_car("alice").unwrap();
    let merged = commons.merge("alice", "bob", &BTreeMap::new()).unwrap();
    assert_eq!(merged.applied, 0);
    let paths: Vec<&str> = merged.conflicts.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, [format!("{NOTE}/n2")]);
    assert!(
        merged.conflicts[0].base.is_some()
            && merged.conflicts[0].ours != merged.conflicts[0].theirs
    );
    assert_eq!(commons.repo_car("alice").unwrap(), before);

    // Resolved (bob's n2 wins): everything bob changed lands; alice's n1 stays.
    let resolved = BTreeMap::from([(format!("{NOTE}/n2"), Side::Theirs)]);
    let merged = commons.merge("alice", "bob", &resolved).unwrap();
    assert!(merged.conflicts.is_empty());
    assert_eq!(merged.applied, 4);
    let text = |owner: &str, coll: &str, k: &str| {
        commons
            .get(&call("notes", owner), owner, coll, k)
            .unwrap()
            .value["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(text("alice", NOTE, "n1"), "one, alice");
    assert_eq!(text("alice", NOTE, "n2"), "two, bob");
    assert_eq!(text("alice", NOTE, "n4"), "four, bob");
    assert_eq!(
        text("alice", DIARY, "d1"),
        "bob's take",
        "re-sealed under alice's key"
    );
    // Merged records keep the provenance of the app that wrote them.
    let mine = commons.my_records("alice").unwrap();
    assert!(mine.iter().all(|r| r.provenance.app == "notes"));

    // Bob syncs alice's n1 into his fork.
    let synced = commons.sync("bob", "alice", &BTreeMap::new()).unwrap();
    assert!(
        synced.conflicts.is_empty() && synced.applied >= 1,
        "{synced:?}"
    );
    assert_eq!(text("bob", NOTE, "n1"), "one, alice");

    // The fork's copies sealed by alice need her sharing: revoked, bob's
    // copy of d3 no longer opens; what he wrote himself still does.
    commons
        .update(&bob, DIARY, "d1", &diary("bob again"))
        .unwrap();
    commons
        .revoke("alice", &Grantee::Person("bob".into()), DIARY, Action::Read)
        .unwrap();
    assert_eq!(
        commons.get(&bob, "bob", DIARY, "d3").unwrap_err().status(),
        404
    );
    assert_eq!(text("bob", DIARY, "d1"), "bob again");
    // And once alice erases, her sealed copies are gone for good (crypto-shredded).
    commons
        .grant("alice", &Grantee::Person("bob".into()), DIARY, Action::Read)
        .unwrap();
    assert_eq!(text("bob", DIARY, "d3"), "another shared");
    commons.erase("alice").unwrap();
    assert_eq!(
        commons.get(&bob, "bob", DIARY, "d3").unwrap_err().status(),
        404
    );
    assert_eq!(text("bob", DIARY, "d1"), "bob again");
}

async fn blobs_follow_their_collections_rules(kind: Kind) {
    let place = place(kind, "blobs");
    let (commons, usage) = platform(&place);
    commons.consent("alice", "notes").unwrap();
    let notes = call("notes", "alice");
    const SECRET: &[u8] = b"BLOB-CANARY-9c1e a private attachment";
    const PUBLIC: &[u8] = b"BLOB-CANARY-77aa a public picture";
    let private = commons
        .put_blob(&notes, HEALTH, "text/plain", SECRET)
        .unwrap();
    assert_eq!(private["$type"], "blob");
    assert_eq!(private["size"], SECRET.len());
    assert_eq!(private["mimeType"], "text/plain");
    // The reference is a blob as the data model has it.
    commons_data::model::from_json(&json!({"$type": NOTE, "file": private})).unwrap();
    let cid = private["ref"]["$link"].as_str().unwrap();
    assert!(cid.starts_with("bafkrei"), "a raw CID: {cid}");
    // Sealed at rest; addressed by the ciphertext, so not guessable.
    assert!(!place.holds(SECRET));
    let plain_cid = commons_data::model::cid_of(commons_data::model::RAW, SECRET).to_string();
    assert_ne!(cid, plain_cid);
    // The app that holds the grant reads it; one without is refused.
    let (mime, bytes) = commons.get_blob(&notes, "alice", HEALTH, cid).unwrap();
    assert_eq!((mime.as_str(), bytes.as_slice()), ("text/plain", SECRET));
    assert_eq!(
        commons
            .get_blob(&call("coach", "alice"), "alice", HEALTH, cid)
            .unwrap_err()
            .status(),
        403
    );
    // Asked for under another collection (one the caller may read), it is not there.
    assert_eq!(
        commons
            .get_blob(&notes, "alice", NOTE, cid)
            .unwrap_err()
            .status(),
        404
    );
    // Size limits per class; a media type is required.
    let big = vec![7u8; 3 << 20];
    assert_eq!(
        commons
            .put_blob(&notes, HEALTH, "application/octet-stream", &big)
            .unwrap_err()
            .status(),
        413
    );
    commons
        .put_blob(&notes, NOTE, "application/octet-stream", &big)
        .unwrap();
    assert_eq!(
        commons
            .put_blob(&notes, NOTE, "nonsense", b"x")
            .unwrap_err()
            .status(),
        422
    );
    // A public blob is plaintext and anyone's to read.
    let public = commons.put_blob(&notes, NOTE, "image/png", PUBLIC).unwrap();
    let public_cid = public["ref"]["$link"].as_str().unwrap();
    assert_eq!(
        public_cid,
        commons_data::model::cid_of(commons_data::model::RAW, PUBLIC).to_string()
    );
    assert_eq!(
        commons
            .get_blob(&call("coach", "bob"), "alice", NOTE, public_cid)
            .unwrap()
            .1,
        PUBLIC
    );
    assert!(place.holds(PUBLIC));
    // Uploads and reads are metered.
    assert!(usage
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|u| u.action == "write" && u.bytes == SECRET.len() as u64));
    // The export holds them, decrypted; erase leaves neither anywhere.
    let archive = commons.export("alice").unwrap();
    assert!(contains(&archive, SECRET) && contains(&archive, PUBLIC));
    commons.erase("alice").unwrap();
    assert!(!place.holds(SECRET) && !place.holds(PUBLIC));
}

/// A repository written elsewhere (an atproto repository: records in the
/// clear, signed by its own did:key) imports into a user's repository
/// here: each record under its collection's class, with provenance naming
/// the file; a file with a bare tree root imports too; a file with a
/// collection nobody declared, a record breaking its schema, or a broken
/// file changes nothing.
async fn a_repository_file_imports_into_a_users_repository(kind: Kind) {
    use commons_data::keys::{Algorithm, Keypair};
    use commons_data::model;
    use commons_data::repo::{Repo, Write};
    let place = place(kind, "repoimport");
    let (commons, _) = platform(&place);
    let key = Keypair::generate(Algorithm::K256);
    let clock = commons_data::syntax::TidClock::new(0);
    let file = |records: &[(&str, Value)]| {
        let mut repo = Repo::new(&key.public().did_key());
        let writes: Vec<Write> = records
            .iter()
            .map(|(path, value)| Write::Create {
                path: path.to_string(),
                record: model::encode(&model::from_json(value).unwrap()),
            })
            .collect();
        repo.commit(&writes, &key, clock.next()).unwrap();
        repo.export_car().unwrap()
    };
    let good = file(&[
        (
            "app.notes.note/3kabc2222222a",
            json!({"$type": NOTE, "text": "from elsewhere", "tag": "moved"}),
        ),
        (
            "app.notes.health/3kabc2222222b",
            json!({"$type": HEALTH, "weight": 70, "mood": "fine"}),
        ),
    ]);
    let done = commons.import_repo("ada", &good).unwrap();
    assert_eq!(done.collections.values().sum::<usize>(), 2);
    let mine = commons.my_records("ada").unwrap();
    assert_eq!(mine.len(), 2);
    let note = mine.iter().find(|r| r.collection == NOTE).unwrap();
    assert_eq!(note.value["text"], "from elsewhere");
    assert_eq!(note.provenance.app, "import");
    assert_eq!(note.provenance.revision, done.source);
    // The private record is sealed like any other: not in the clear anywhere.
    let health = mine.iter().find(|r| r.collection == HEALTH).unwrap();
    assert_eq!(health.value["mood"], "fine");
    assert!(!place.holds(b"fine"), "a private record imported is sealed");
    // The user's repository is theirs, signed with their key: it verifies.
    let car = commons.repo_car("ada").unwrap();
    let verified = commons_data::repo::verify(&car, None).await.unwrap();
    assert_eq!(verified.records, 2);
    assert_eq!(
        verified.commit.unwrap().1.did,
        commons.did("ada").unwrap(),
        "re-signed by the user, not the file's key"
    );

    // A bare tree root: the same records again (updates), no commit.
    let parsed = commons_data::car::read_sync(&good).unwrap();
    let loaded = commons_data::repo::load(&parsed).unwrap();
    let root = loaded.tree.root;
    let bare = commons_data::car::write(
        root,
        parsed
            .blocks
            .iter()
            .filter(|(cid, _)| **cid != parsed.roots[0])
            .map(|(c, b)| (*c, &b[..])),
    );
    let again = commons.import_repo("ada", &bare).unwrap();
    assert_eq!(again.source, root.to_string());
    assert_eq!(commons.my_records("ada").unwrap().len(), 2);

    // Refused whole, changing nothing.
    let head = commons.repo_car("ada").unwrap();
    let unknown = file(&[
        (
            "app.notes.note/3kabc2222222c",
            json!({"$type": NOTE, "text": "fine"}),
        ),
        (
            "com.example.other/3kabc2222222d",
            json!({"$type": "com.example.other", "x": 1}),
        ),
    ]);
    let err = commons.import_repo("ada", &unknown).unwrap_err();
    assert_eq!(err.status(), 404, "{err}");
    assert!(err.to_string().contains("com.example.other"), "{err}");
    let breaking = file(&[(
        "app.notes.health/3kabc2222222e",
        json!({"$type": HEALTH, "weight": "seventy"}),
    )]);
    let err = commons.import_repo("ada", &breaking).unwrap_err();
    assert_eq!(err.status(), 422, "{err}");
    assert!(
        err.to_string().contains("app.notes.health/3kabc2222222e"),
        "{err}"
    );
    let mut broken = good.clone();
    let at = broken.len() - 5;
    broken[at] ^= 0xff;
    assert_eq!(
        commons.import_repo("ada", &broken).unwrap_err().status(),
        422
    );
    assert_eq!(
        commons
            .import_repo("ada", b"not a car")
            .unwrap_err()
            .status(),
        422
    );
    assert_eq!(commons.repo_car("ada").unwrap(), head, "nothing changed");
}

/// A batch of writes (atproto's applyWrites) lands as one signed commit —
/// one feed event with every op — or, when any write is refused, not at
/// all; a refusal names the write.
async fn a_batch_of_writes_is_one_commit_or_nothing(kind: Kind) {
    use commons_data::service::WriteOp;
    let place = place(kind, "batch");
    let (commons, usage) = platform(&place);
    commons.consent("alice", "notes").unwrap();
    let notes = call("notes", "alice");
    let op = |collection: &str, rkey: Option<&str>, value: Option<Value>, create: bool| WriteOp {
        collection: collection.into(),
        rkey: rkey.map(String::from),
        value,
        create,
    };
    let mut feed = commons
        .subscribe(Viewer::Owner("alice".into()), None)
        .unwrap();
    let before = usage.0.lock().unwrap().len();
    let done = commons
        .apply_writes(
            &notes,
            &[
                op(
                    NOTE,
                    Some("b1"),
                    Some(json!({"$type": NOTE, "text": "one"})),
                    true,
                ),
                op(
                    HEALTH,
                    None,
                    Some(json!({"$type": HEALTH, "weight": 61})),
                    true,
                ),
                op(
                    DIARY,
                    Some("d1"),
                    Some(json!({"$type": DIARY, "text": "dear"})),
                    true,
                ),
            ],
        )
        .unwrap();
    assert_eq!(done.len(), 3);
    assert!(done
        .iter()
        .all(|w| w.commit == done[0].commit && w.rev == done[0].rev));
    assert!(
        done[1].uri.contains("/app.notes.health/"),
        "a TID key was made: {}",
        done[1].uri
    );
    let Event::Commit(c) = &*next_event(&mut feed).await else {
        panic!("expected one commit event")
    };
    assert_eq!(c.ops.len(), 3, "one event with every op");
    assert_eq!(c.commit, done[0].commit);
    assert_eq!(
        usage.0.lock().unwrap().len() - before,
        3,
        "one usage event per write"
    );

    // A refused write refuses the batch, named by its place; nothing lands.
    let head = commons.repo_car("alice").unwrap();
    let err = commons
        .apply_writes(
            &notes,
            &[
                op(
                    NOTE,
                    Some("b2"),
                    Some(json!({"$type": NOTE, "text": "fine"})),
                    true,
                ),
                op(
                    HEALTH,
                    Some("h2"),
                    Some(json!({"$type": HEALTH, "weight": "heavy"})),
                    true,
                ),
            ],
        )
        .unwrap_err();
    assert_eq!(err.status(), 422, "{err}");
    assert!(err.to_string().starts_with("writes[1]."), "{err}");
    let err = commons
        .apply_writes(
            &notes,
            &[
                op(
                    NOTE,
                    Some("b3"),
                    Some(json!({"$type": NOTE, "text": "new"})),
                    true,
                ),
                op(
                    NOTE,
                    Some("b1"),
                    Some(json!({"$type": NOTE, "text": "again"})),
                    true,
                ),
            ],
        )
        .unwrap_err();
    assert!(err.status() >= 400, "{err}");
    let too_many: Vec<WriteOp> = (0..201)
        .map(|i| {
            op(
                NOTE,
                Some(&format!("x{i}")),
                Some(json!({"$type": NOTE, "text": "x"})),
                true,
            )
        })
        .collect();
    assert_eq!(
        commons
            .apply_writes(&notes, &too_many)
            .unwrap_err()
            .status(),
        422
    );
    assert_eq!(commons.apply_writes(&notes, &[]).unwrap_err().status(), 422);
    assert_eq!(commons.repo_car("alice").unwrap(), head, "nothing landed");
    // An app without the grant writes nothing in a batch either.
    let err = commons
        .apply_writes(
            &call("coach", "alice"),
            &[op(
                HEALTH,
                Some("h3"),
                Some(json!({"$type": HEALTH, "weight": 1})),
                true,
            )],
        )
        .unwrap_err();
    assert_eq!(err.status(), 403, "{err}");

    // Updates and deletes batch too.
    let done = commons
        .apply_writes(
            &notes,
            &[
                op(
                    NOTE,
                    Some("b1"),
                    Some(json!({"$type": NOTE, "text": "two"})),
                    false,
                ),
                op(DIARY, Some("d1"), None, false),
            ],
        )
        .unwrap();
    assert_eq!(done.len(), 2);
    let mine = commons.my_records("alice").unwrap();
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert_eq!(
        mine.iter().find(|r| r.rkey == "b1").unwrap().value["text"],
        "two"
    );
}
