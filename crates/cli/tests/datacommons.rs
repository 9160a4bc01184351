//! DataCommons through the platform: a notes app declares a collection in
//! its blueprint's `data:` section and stores its users' notes through the
//! data API, reached through the gateway with the user's identity; the user
//! consents, sees their data with provenance, exports it, and erases it —
//! after which the note's text is nowhere in the data directory.

mod common;

use common::browser::*;
use common::*;
use serde_json::{json, Value};

const NOTES_APP: &str = r#"import json, os, urllib.request, urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
API = os.environ["COMMONS_DATA_URL"]
TOKEN = os.environ["COMMONS_SERVICE_TOKEN"]
NSID = "org.example.notes.note"

def call(method, path, identity, body=None):
    headers = {"X-Commons-Service": TOKEN, "Content-Type": "application/json"}
    if identity:
        headers["X-Commons-Identity"] = identity
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(API + path, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")

class H(BaseHTTPRequestHandler):
    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/health":
            return self.reply(200, {"ok": True})
        code, body = call("GET", "/data/v1/records/" + NSID, self.headers.get("X-Commons-Identity"))
        self.reply(code, body)
    def do_POST(self):
        text = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        code, body = call("POST", "/data/v1/records/" + NSID, self.headers.get("X-Commons-Identity"),
                          {"value": {"$type": NSID, "text": text}})
        self.reply(code, body)
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

const NOTE_SCHEMA: &str = r#"{"lexicon": 1, "id": "org.example.notes.note", "defs": {"main": {
  "type": "record", "key": "tid",
  "record": {"type": "object", "required": ["text"], "properties": {
    "text": {"type": "string", "maxLength": 1000}}}}}}"#;

const NOTES_BLUEPRINT: &str = r#"name: notes
components:
  web:
    process: python3 app.py
    health: { http: /health }
data:
  org.example.notes.note:
    class: private
    schema: schemas/note.json
    purpose: Keep your notes so you can read them here and in any app you allow
"#;

fn gateway(port: u16, method: &str, path: &str, cookie: &str, body: &[u8]) -> (u16, Value) {
    let (code, text) = http(
        port,
        method,
        path,
        &[("Host", "notes.localhost"), ("Cookie", cookie)],
        body,
    )
    .unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn grep_dir(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            hits.extend(grep_dir(&path, needle));
        } else if std::fs::read(&path)
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            hits.push(path);
        }
    }
    hits
}

/// A platform serving the notes app, and a user with a session at it.
fn notes_platform(test: &str, email: &str) -> (Sandbox, Server, String, String) {
    let s = Sandbox::new(test);
    s.write("app.py", NOTES_APP);
    s.write("schemas/note.json", NOTE_SCHEMA);
    s.blueprint(NOTES_BLUEPRINT);
    let server = s.serve(&[]);
    // The platform tells the app where its data API is (COMMONS_DATA_URL).
    s.ok(&["deploy"]);
    let user = signup(server.port, email, "Nora")["user"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = s
        .ok(&["token", "create", &user, "--scope", "session"])
        .stdout()
        .trim()
        .to_string();
    // The gateway picks the new site up from the platform's state.
    assert!(
        wait_for(std::time::Duration::from_secs(10), || {
            gateway(server.http, "GET", "/health", "", b"").0 == 200
        }),
        "notes.localhost is served"
    );
    (s, server, user, format!("commons_session={token}"))
}

#[test]
fn an_app_stores_notes_in_its_users_repositories_with_consent() {
    let (s, server, user, cookie) = notes_platform("datacommons", "nora@example.org");

    // Without the user's consent the app is refused, and told where to ask.
    let (code, body) = gateway(server.http, "POST", "/", &cookie, b"first");
    assert_eq!(code, 403, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("/console/data/consent/notes"),
        "{body}"
    );
    // No user at all (nobody signed in): 401 from the data API.
    let (code, body) = gateway(server.http, "POST", "/", "", b"anonymous");
    assert_eq!(code, 401, "{body}");

    // The consent screen lists what the app declared; the user allows it.
    let nora = login(server.port, "nora@example.org", true);
    let (code, asks) = nora.get("/api/data/consent/notes");
    assert_eq!(code, 200, "{asks}");
    assert_eq!(asks["items"][0]["collection"], "org.example.notes.note");
    assert_eq!(asks["items"][0]["class"], "private");
    assert!(asks["items"][0]["purpose"]
        .as_str()
        .unwrap()
        .contains("Keep your notes"));
    let (code, granted) = nora.post("/api/data/consent/notes", json!({}));
    assert_eq!(code, 200, "{granted}");

    const CANARY: &str = "canary-2f9d-nora-note";
    let (code, made) = gateway(server.http, "POST", "/", &cookie, CANARY.as_bytes());
    assert_eq!(code, 201, "{made}");
    assert!(
        made["uri"].as_str().unwrap().starts_with("at://did:key:"),
        "{made}"
    );
    let (code, listed) = gateway(server.http, "GET", "/", &cookie, b"");
    assert_eq!(code, 200, "{listed}");
    assert_eq!(listed["records"][0]["value"]["text"], CANARY);
    // A record that breaks the schema: 422 with the field's path.
    let long = "x".repeat(1001);
    let (code, body) = gateway(server.http, "POST", "/", &cookie, long.as_bytes());
    assert_eq!(code, 422, "{body}");
    assert!(
        body["detail"].as_str().unwrap().starts_with("$.text"),
        "{body}"
    );

    // The user sees it, with provenance; so does the administrator's CLI.
    let (code, mine) = nora.get("/api/data/me");
    assert_eq!(code, 200, "{mine}");
    assert_eq!(mine["records"][0]["provenance"]["app"], "notes");
    assert!(!mine["records"][0]["provenance"]["revision"]
        .as_str()
        .unwrap()
        .is_empty());
    let ls = s.ok(&["--json", "data", "ls", &user]).json();
    assert_eq!(ls["records"].as_array().unwrap().len(), 1);
    assert_eq!(ls["records"][0]["value"]["text"], CANARY);

    // A repository written elsewhere (an atproto CAR, its own did:key)
    // joins another user's repository through `commons data repo import`.
    let elsewhere_key = commons_data::keys::Keypair::generate(commons_data::keys::Algorithm::P256);
    let mut foreign = commons_data::repo::Repo::new(&elsewhere_key.public().did_key());
    foreign
        .commit(
            &[commons_data::repo::Write::Create {
                path: "org.example.notes.note/3kimport22222".into(),
                record: commons_data::model::encode(
                    &commons_data::model::from_json(
                        &json!({"$type": "org.example.notes.note", "text": "brought along"}),
                    )
                    .unwrap(),
                ),
            }],
            &elsewhere_key,
            commons_data::syntax::TidClock::new(0).next(),
        )
        .unwrap();
    let car_file = s.dir.join("elsewhere.car");
    std::fs::write(&car_file, foreign.export_car().unwrap()).unwrap();
    let imported = s
        .ok(&[
            "--json",
            "data",
            "repo",
            "import",
            car_file.to_str().unwrap(),
            "--user",
            "ivy",
        ])
        .json();
    assert_eq!(
        imported["collections"]["org.example.notes.note"], 1,
        "{imported}"
    );
    let ivy = s.ok(&["--json", "data", "ls", "ivy"]).json();
    assert_eq!(ivy["records"][0]["value"]["text"], "brought along");
    assert_eq!(ivy["records"][0]["provenance"]["app"], "import");
    std::fs::write(&car_file, b"not a repository").unwrap();
    let refused = s.run(&[
        "data",
        "repo",
        "import",
        car_file.to_str().unwrap(),
        "--user",
        "ivy",
    ]);
    assert_ne!(refused.code(), 0);
    assert!(refused.stderr().contains("not a CAR"), "{}", refused.all());

    // The private note is not in the database in the clear.
    let data_dir = s.home.join("datacommons");
    assert!(grep_dir(&data_dir, CANARY.as_bytes()).is_empty());

    // Revoking stops the app at once.
    let (code, _) = nora.call(
        "DELETE",
        "/api/data/grants",
        Some(json!({"grantee": "app:notes", "collection": "org.example.notes.note", "action": "read"})),
    );
    assert_eq!(code, 204);
    let (code, body) = gateway(server.http, "GET", "/", &cookie, b"");
    assert_eq!(code, 403, "{body}");

    // Export, then erase: the archive holds the note; afterwards nothing does.
    let archive = s.dir.join("nora.tar");
    s.ok(&["data", "export", &user, "-o", archive.to_str().unwrap()]);
    let tar = std::fs::read(&archive).unwrap();
    assert!(tar.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()));
    let refused = s.run(&["data", "erase", &user]);
    assert_eq!(refused.code(), 2, "erase needs --yes");
    s.ok(&["data", "erase", &user, "--yes"]);
    assert!(grep_dir(&data_dir, CANARY.as_bytes()).is_empty());
    let (code, _) = nora.get("/api/data/me/export");
    assert_eq!(code, 404, "nothing left to export");

    // The archive taken before the erase imports into another platform:
    // the same DID, the note decrypted with the keys it carries.
    let elsewhere = Sandbox::new("datacommons-import");
    let _other = elsewhere.serve(&[]);
    let said = elsewhere
        .ok(&[
            "--json",
            "data",
            "import",
            "nora",
            archive.to_str().unwrap(),
        ])
        .json();
    assert!(
        said["root"].as_str().unwrap().starts_with("bafyrei"),
        "{said}"
    );
    let there = elsewhere.ok(&["--json", "data", "ls", "nora"]).json();
    assert_eq!(there["did"], ls["did"]);
    assert_eq!(there["records"][0]["value"]["text"], CANARY);
    let again = elsewhere.run(&["data", "import", "nora", archive.to_str().unwrap()]);
    assert_eq!(again.code(), 2, "the user already has data there");
}

/// In a real browser: the consent screen an app sends its user to, "my
/// data" with the record's provenance and the chart of what each app did,
/// revoking, and erasing with a typed confirmation.
#[test]
fn a_user_consents_sees_and_erases_their_data_in_the_console() {
    let (s, server, _user, cookie) = notes_platform("datacommons-console", "ona@example.org");
    let driver = Driver::start(s.dir.join("chromium-profile"));
    let base = format!("http://127.0.0.1:{}", server.port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&format!("{base}/console/data/consent/notes"))
            .await
            .unwrap();
        arrive(&c, "Log in").await;
        fill(&c, "email", "ona@example.org").await;
        fill(&c, "password", "a long enough password").await;
        click(&c, Locator::Css("button[type=submit]")).await;
        arrive(&c, "Your sites").await;
        c.goto(&format!("{base}/console/data/consent/notes"))
            .await
            .unwrap();
        arrive(&c, "notes asks for your data").await;
        let asks = text_of(&c, Locator::Id("requests")).await;
        assert!(
            asks.contains("org.example.notes.note") && asks.contains("private"),
            "{asks}"
        );
        assert!(asks.contains("Keep your notes"), "{asks}");
        accessible(&c, "consent").await;
        shot(&c, "data-consent").await;
        click(&c, Locator::Css("main form button[type=submit]")).await;
        arrive(&c, "My data").await;

        // The app writes a note for her, then reads it back.
        let (code, made) = gateway(
            server.http,
            "POST",
            "/",
            &cookie,
            b"a note from the browser test",
        );
        assert_eq!(code, 201, "{made}");
        assert_eq!(gateway(server.http, "GET", "/", &cookie, b"").0, 200);
        c.goto(&format!("{base}/console/data")).await.unwrap();
        arrive(&c, "My data").await;
        let records = text_of(&c, Locator::Id("records")).await;
        assert!(
            records.contains("a note from the browser test"),
            "{records}"
        );
        assert!(records.contains("notes"), "provenance: {records}");
        let chart = text_of(&c, Locator::Id("access-chart")).await;
        assert!(
            chart.contains("notes") && chart.contains("1 reads, 1 writes"),
            "{chart}"
        );
        accessible(&c, "my data").await;
        shot(&c, "data-mine").await;

        // Revoke the first grant (reading, in grantee/collection/action
        // order): the app is refused.
        let grants = text_of(&c, Locator::Id("grants")).await;
        assert!(grants.contains("app:notes"), "{grants}");
        click(&c, Locator::Css("#grants tbody tr:first-child button")).await;
        arrive(&c, "My data").await;
        assert_eq!(gateway(server.http, "GET", "/", &cookie, b"").0, 403);

        // Erase needs the typed confirmation.
        fill(&c, "confirm", "yes").await;
        click(&c, Locator::Css("#erase button")).await;
        arrive(&c, "Not confirmed").await;
        c.goto(&format!("{base}/console/data")).await.unwrap();
        arrive(&c, "My data").await;
        fill(&c, "confirm", "erase my data").await;
        click(&c, Locator::Css("#erase button")).await;
        arrive(&c, "Your data was erased").await;
        let said = text_of(&c, Locator::Id("erased")).await;
        assert!(said.starts_with("1 records erased"), "{said}");
        shot(&c, "data-erased").await;
        c.close().await.unwrap();
    });
}

/// Opens a WebSocket at `path` of the API; returns the stream and the
/// answer's head (a client written out: the handshake and text frames are
/// all the feed needs).
fn ws_open(port: u16, path: &str, headers: &[(&str, &str)]) -> (std::net::TcpStream, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// The next text message from the server (pings and the like skipped).
fn ws_text(s: &mut std::net::TcpStream) -> Value {
    use std::io::Read;
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).expect("a frame within 10 s");
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let mut e = [0u8; 2];
            s.read_exact(&mut e).unwrap();
            len = u64::from(u16::from_be_bytes(e));
        } else if len == 127 {
            let mut e = [0u8; 8];
            s.read_exact(&mut e).unwrap();
            len = u64::from_be_bytes(e);
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).unwrap();
        if h[0] & 0x0f == 1 {
            return serde_json::from_slice(&payload).unwrap();
        }
    }
}

/// The change feed over WebSocket, as the app's service token sees it:
/// live, replayed from a cursor, refused from a cursor in the future, and
/// only of collections users granted the app.
#[test]
fn the_change_feed_reaches_the_app_over_a_websocket() {
    let (s, server, _user, cookie) = notes_platform("datacommons-feed", "fay@example.org");
    let pid = s.component("notes", "web")["pid"].as_i64().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let token = environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"COMMONS_SERVICE_TOKEN="))
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .expect("the app has its service token");
    let service = ("X-Commons-Service", token.as_str());

    // Without the service token: refused before any upgrade.
    let (_, head) = ws_open(server.port, "/data/v1/subscribe", &[]);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // Live: the user consents, the app writes, the event arrives.
    let (mut live, head) = ws_open(server.port, "/data/v1/subscribe", &[service]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let fay = login(server.port, "fay@example.org", true);
    assert_eq!(fay.post("/api/data/consent/notes", json!({})).0, 200);
    let (code, made) = gateway(server.http, "POST", "/", &cookie, b"fed");
    assert_eq!(code, 201, "{made}");
    let event = ws_text(&mut live);
    assert_eq!(event["$type"], "#commit");
    assert_eq!(event["ops"][0]["action"], "create");
    assert_eq!(event["ops"][0]["app"], "notes");
    assert_eq!(event["ops"][0]["cid"], made["cid"]);
    let seq = event["seq"].as_i64().unwrap();
    // From a cursor: the same event replayed.
    let (mut replay, _) = ws_open(
        server.port,
        &format!("/data/v1/subscribe?cursor={}", seq - 1),
        &[service],
    );
    assert_eq!(ws_text(&mut replay)["seq"], seq);
    // A cursor in the future: a 400 problem, no upgrade.
    let (_, head) = ws_open(
        server.port,
        &format!("/data/v1/subscribe?cursor={}", seq + 100),
        &[service],
    );
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

/// Forks through the API: a user forks another's repository; a private
/// note comes along only because its owner shared the collection with
/// them, and stops opening when she stops sharing it.
#[test]
fn a_user_forks_another_users_repository_through_the_api() {
    let (_s, server, nora_id, cookie) = notes_platform("datacommons-fork", "nia@example.org");
    let nia = login(server.port, "nia@example.org", true);
    assert_eq!(nia.post("/api/data/consent/notes", json!({})).0, 200);
    let (code, _) = gateway(server.http, "POST", "/", &cookie, b"a note to share");
    assert_eq!(code, 201);
    let bo_id = signup(server.port, "bo@example.org", "Bo")["user"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bo = login(server.port, "bo@example.org", true);
    // Not shared: the private note does not come along.
    let (code, forked) = bo.post(&format!("/api/data/forks/{nora_id}"), json!({}));
    assert_eq!(code, 200, "{forked}");
    assert_eq!(forked["applied"], 0);
    let (code, again) = bo.post(&format!("/api/data/forks/{nora_id}"), json!({}));
    assert_eq!(code, 409, "{again}");
    // Shared, then synced: it arrives, and opens for Bo.
    let share = json!({"grantee": format!("user:{bo_id}"), "collection": "org.example.notes.note", "action": "read"});
    let (code, body) = nia.post("/api/data/grants", share.clone());
    assert_eq!(code, 204, "{body}");
    let (code, synced) = bo.post(&format!("/api/data/forks/{nora_id}/sync"), json!({}));
    assert_eq!(code, 200, "{synced}");
    assert_eq!(synced["applied"], 1, "{synced}");
    let (_, mine) = bo.get("/api/data/me");
    assert_eq!(
        mine["records"][0]["value"]["text"], "a note to share",
        "{mine}"
    );
    // No longer shared: Bo's copy, sealed under Nia's key, no longer opens.
    let (code, _) = nia.call("DELETE", "/api/data/grants", Some(share.clone()));
    assert_eq!(code, 204);
    let (_, mine) = bo.get("/api/data/me");
    assert_eq!(mine["records"].as_array().unwrap().len(), 0, "{mine}");

    // The same in the console (plain forms): shared again, a new note of
    // Nia's comes into Bo's fork when he brings her changes in.
    let (code, body) = nia.post("/api/data/grants", share);
    assert_eq!(code, 204, "{body}");
    let (code, _) = gateway(server.http, "POST", "/", &cookie, b"a second note");
    assert_eq!(code, 201);
    let (code, page) = console_post(
        &server,
        &bo,
        &format!("/console/data/forks/{nora_id}/sync"),
        "",
    );
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("1 changes brought in"), "{page}");
    let (code, mine) = console_get(&server, &bo, "/console/data");
    assert_eq!(code, 200);
    assert!(
        mine.contains("Your fork of") && mine.contains("a second note"),
        "{mine}"
    );
    let (_, hers) = console_get(&server, &nia, "/console/data");
    assert!(
        hers.contains(&format!("{bo_id}</code>'s fork of yours")),
        "{hers}"
    );
    // Someone else forks her repository by its DID (nothing shared with them).
    signup(server.port, "cy@example.org", "Cy");
    let cy = login(server.port, "cy@example.org", true);
    let (_, me) = nia.get("/api/data/me");
    let did = me["did"].as_str().unwrap();
    let (code, page) = console_post(
        &server,
        &cy,
        "/console/data/forks",
        &format!("source={did}"),
    );
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("0 records copied from"), "{page}");
    let (code, page) = console_post(
        &server,
        &cy,
        "/console/data/forks",
        "source=did:key:zNobody",
    );
    assert_eq!(code, 404, "{page}");
}

fn console_session(api: &Api) -> (String, String) {
    let header = |name: &str| {
        api.headers
            .iter()
            .find(|(k, _)| k == name)
            .unwrap()
            .1
            .clone()
    };
    (header("Cookie"), header("X-CSRF-Token"))
}

/// A console form posted as `api`'s user (session cookie and CSRF field).
fn console_post(server: &Server, api: &Api, path: &str, form: &str) -> (u16, String) {
    let (cookie, csrf) = console_session(api);
    let body = if form.is_empty() {
        format!("csrf={csrf}")
    } else {
        format!("csrf={csrf}&{form}")
    };
    http(
        server.port,
        "POST",
        path,
        &[
            ("Cookie", &cookie),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        body.as_bytes(),
    )
    .unwrap()
}

fn console_get(server: &Server, api: &Api, path: &str) -> (u16, String) {
    let (cookie, _) = console_session(api);
    http(server.port, "GET", path, &[("Cookie", &cookie)], b"").unwrap()
}

/// An application outside the platform signs a user in with OpenID
/// Connect and asks, in the scope, to read their notes: the consent screen
/// lists the collection and its class; allowing it grants the application
/// exactly that, and its access token then reads the notes through the
/// data API — and nothing more: not writing, not after the user revokes
/// the grant, not a collection nobody declared.
#[test]
fn an_oidc_application_reads_notes_within_its_scope_and_grant() {
    use base64::Engine as _;
    use sha2::Digest as _;
    let (_s, server, user, cookie) = notes_platform("datacommons-oidc", "nia@example.org");
    let nia = login(server.port, "nia@example.org", true);
    nia.post("/api/data/consent/notes", json!({}));
    let (code, made) = gateway(server.http, "POST", "/", &cookie, b"read me elsewhere");
    assert_eq!(code, 201, "{made}");

    let (code, client) = nia.post(
        "/api/orgs/nia/oidc-clients",
        json!({"name": "Notebook", "redirect_uris": ["http://notebook.example/cb"]}),
    );
    assert_eq!(code, 201, "{client}");
    let (id, secret) = (
        client["client_id"].as_str().unwrap().to_string(),
        client["client_secret"].as_str().unwrap().to_string(),
    );
    let verifier = "a-verifier-of-more-than-forty-three-characters-0123456789";
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    let (session, csrf) = console_session(&nia);
    let params = |scope: &str| {
        serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", id.as_str()),
            ("redirect_uri", "http://notebook.example/cb"),
            ("scope", scope),
            ("state", "s1"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .unwrap()
    };

    // A collection nobody declared goes back as an invalid scope.
    let (code, head, _) = http_with_head(
        server.port,
        "GET",
        &format!(
            "/oidc/authorize?{}",
            params("openid data:com.example.nothing:read")
        ),
        &[("Cookie", &session)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 303, "{head}");
    assert!(
        location_and_cookies(&head)
            .0
            .contains("error=invalid_scope"),
        "{head}"
    );

    let scope = "openid data:org.example.notes.note:read";
    let (code, page) = http(
        server.port,
        "GET",
        &format!("/oidc/authorize?{}", params(scope)),
        &[("Cookie", &session)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("to read your org.example.notes.note records (private"),
        "the consent screen names the collection and its class: {page}"
    );
    let form = format!("decision=allow&csrf={csrf}&{}&nonce=", params(scope));
    let (code, head, _) = http_with_head(
        server.port,
        "POST",
        "/oidc/authorize",
        &[
            ("Cookie", &session),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        form.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 303, "{head}");
    let back = location_and_cookies(&head).0;
    let code_param = back
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("code="))
        .unwrap_or_else(|| panic!("no code in {back}"))
        .to_string();
    let token_form = serde_urlencoded::to_string([
        ("grant_type", "authorization_code"),
        ("code", code_param.as_str()),
        ("redirect_uri", "http://notebook.example/cb"),
        ("code_verifier", verifier),
        ("client_id", id.as_str()),
        ("client_secret", secret.as_str()),
    ])
    .unwrap();
    let (code, tokens) = http(
        server.port,
        "POST",
        "/oidc/token",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        token_form.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 200, "{tokens}");
    let tokens: Value = serde_json::from_str(&tokens).unwrap();
    let bearer = format!("Bearer {}", tokens["access_token"].as_str().unwrap());

    // The grant it made is the user's to see.
    let (code, grants) = nia.get("/api/data/me");
    assert_eq!(code, 200, "{grants}");
    let app = format!("app:oidc:{id}");
    assert!(
        grants["grants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["grantee"] == app.as_str() && g["action"] == "read"),
        "{grants}"
    );

    // Reading works; writing is outside the scope.
    let records = "/data/v1/records/org.example.notes.note";
    let (code, listed) = http(
        server.port,
        "GET",
        records,
        &[("Authorization", &bearer)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200, "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["records"][0]["value"]["text"], "read me elsewhere");
    assert_eq!(listed["records"][0]["provenance"]["user"], user.as_str());
    let (code, body) = http(
        server.port,
        "POST",
        records,
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        br#"{"value": {"$type": "org.example.notes.note", "text": "sneaky"}}"#,
    )
    .unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("data:org.example.notes.note:write"), "{body}");
    // A made-up token is nobody.
    let (code, _) = http(
        server.port,
        "GET",
        records,
        &[("Authorization", "Bearer nope")],
        b"",
    )
    .unwrap();
    assert_eq!(code, 401);

    // Revoked under "My data": refused at once, the token notwithstanding.
    let (code, _) = nia.call(
        "DELETE",
        "/api/data/grants",
        Some(json!({"grantee": app, "collection": "org.example.notes.note", "action": "read"})),
    );
    assert_eq!(code, 204);
    let (code, body) = http(
        server.port,
        "GET",
        records,
        &[("Authorization", &bearer)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 403, "{body}");
}
