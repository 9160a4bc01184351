//! The catalog: every application deploys with one command
//! (`commons deploy catalog:NAME`, sandboxed when the tests run as root),
//! installs from its real package registry (PyPI, npm), and is exercised
//! through the gateway as a user would: a query answered, an event stored,
//! a page and its search index served, a record created and read back.

mod common;

use common::*;

/// Deploys `catalog:NAME` and starts the platform in front of it.
fn deployed(s: &Sandbox, name: &str) -> Server {
    let sandbox = if is_root() { "1" } else { "0" };
    let r = Run(s
        .cmd(&["deploy", &format!("catalog:{name}")])
        .env("COMMONS_SANDBOX", sandbox)
        .output()
        .unwrap());
    assert_eq!(r.code(), 0, "{}", r.all());
    assert_eq!(s.component(name, "web")["state"], "running");
    s.serve(&[])
}

/// One request to the site `NAME.localhost` through the gateway.
fn through(
    server: &Server,
    site: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let host = format!("{site}.localhost");
    let mut all = vec![("Host", host.as_str())];
    all.extend_from_slice(headers);
    http(server.http, method, path, &all, body.as_bytes()).unwrap()
}

#[test]
fn the_catalog_lists_every_application_with_its_project() {
    let s = Sandbox::new("catalog-list");
    let list = s.ok(&["catalog", "--json"]).json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "datasette",
            "json-server",
            "mkdocs",
            "notes",
            "prometheus",
            "radicale",
            "rclone"
        ]
    );
    for e in list.as_array().unwrap() {
        assert!(!e["project"].as_str().unwrap().is_empty(), "{e}");
    }
    let plan = s.ok(&["plan", "catalog:mkdocs", "--json"]).json();
    assert_eq!(plan["deployment"], "mkdocs", "{plan}");
    let r = s.run(&["deploy", "catalog:nothing"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(
        r.stderr().contains("the catalog has no \"nothing\""),
        "{}",
        r.all()
    );
}

#[test]
fn datasette_answers_a_sql_query_as_json() {
    let s = Sandbox::new("catalog-datasette");
    let server = deployed(&s, "datasette");
    let q = "/db.json?sql=select+name+from+birds+where+wingspan_cm+%3E+40+order+by+wingspan_cm+desc&_shape=array";
    let (code, body) = through(&server, "datasette", "GET", q, &[], "");
    assert_eq!(code, 200, "{body}");
    let rows: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        rows,
        serde_json::json!([{ "name": "albatross" }, { "name": "swift" }])
    );
}

#[test]
fn radicale_stores_a_calendar_event_for_the_signed_in_user_only() {
    let s = Sandbox::new("catalog-radicale");
    let server = deployed(&s, "radicale");
    let token = |user: &str| {
        s.ok(&["token", "create", user, "--scope", "session"])
            .stdout()
            .trim()
            .to_string()
    };
    let (alice, bob) = (
        format!("Bearer {}", token("alice")),
        format!("Bearer {}", token("bob")),
    );
    let as_alice = [("Authorization", alice.as_str())];
    let (code, body) = through(
        &server,
        "radicale",
        "MKCALENDAR",
        "/alice/cal/",
        &as_alice,
        "",
    );
    assert_eq!(code, 201, "{body}");
    let event = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//commons//test//EN\r\n\
        BEGIN:VEVENT\r\nUID:launch@commons\r\nDTSTAMP:20261125T120000Z\r\n\
        DTSTART:20261201T100000Z\r\nDTEND:20261201T110000Z\r\nSUMMARY:Launch party\r\n\
        END:VEVENT\r\nEND:VCALENDAR\r\n";
    let mut put = as_alice.to_vec();
    put.push(("Content-Type", "text/calendar"));
    let (code, body) = through(
        &server,
        "radicale",
        "PUT",
        "/alice/cal/launch.ics",
        &put,
        event,
    );
    assert_eq!(code, 201, "{body}");
    // Read back, and found by a CalDAV query over the calendar.
    let (code, body) = through(
        &server,
        "radicale",
        "GET",
        "/alice/cal/launch.ics",
        &as_alice,
        "",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("SUMMARY:Launch party"), "{body}");
    let report = r#"<?xml version="1.0"?><C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop><C:calendar-data/></D:prop><C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter></C:filter></C:calendar-query>"#;
    let mut rep = as_alice.to_vec();
    rep.extend([("Depth", "1"), ("Content-Type", "application/xml")]);
    let (code, body) = through(&server, "radicale", "REPORT", "/alice/cal/", &rep, report);
    assert_eq!(code, 207, "{body}");
    assert!(body.contains("Launch party"), "{body}");

    // Nobody else reaches it: not another user, not someone without a
    // session, not someone claiming to be alice in the app's header.
    for headers in [
        vec![("Authorization", bob.as_str())],
        vec![],
        vec![("X-Remote-User", "alice")],
    ] {
        let (code, body) = through(
            &server,
            "radicale",
            "GET",
            "/alice/cal/launch.ics",
            &headers,
            "",
        );
        assert!(!(200..300).contains(&code), "{headers:?}: {code} {body}");
        assert!(!body.contains("Launch party"), "{headers:?}: {body}");
    }
}

#[test]
fn mkdocs_serves_the_built_site_and_its_search_index() {
    let s = Sandbox::new("catalog-mkdocs");
    let server = deployed(&s, "mkdocs");
    let (code, body) = through(&server, "mkdocs", "GET", "/", &[], "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("<title>Our documentation"), "{body}");
    let (code, body) = through(
        &server,
        "mkdocs",
        "GET",
        "/search/search_index.json",
        &[],
        "",
    );
    assert_eq!(code, 200, "{body}");
    let index: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        index["docs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["text"].as_str().unwrap_or("").contains("mkdocs")),
        "{index}"
    );
}

#[test]
fn json_server_creates_and_reads_back_a_record() {
    let s = Sandbox::new("catalog-json-server");
    let server = deployed(&s, "json-server");
    let json = [("Content-Type", "application/json")];
    let (code, body) = through(
        &server,
        "json-server",
        "POST",
        "/notes",
        &json,
        r#"{"text": "hello from the commons"}"#,
    );
    assert_eq!(code, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = created["id"].as_u64().expect("an id");
    let (code, body) = through(
        &server,
        "json-server",
        "GET",
        &format!("/notes/{id}"),
        &[],
        "",
    );
    assert_eq!(code, 200, "{body}");
    let read: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(read["text"], "hello from the commons");
    // Kept in the site's data directory, so it survives a restart
    // (json-server writes its file after it has answered).
    let db = s.home.join("deployments/json-server/data/db.json");
    let kept = wait_for(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&db).is_ok_and(|t| t.contains("hello from the commons"))
    });
    assert!(kept, "{} does not hold the record", db.display());
}

/// Notes keeps each user's notes in their own DataCommons repository: from
/// its sandbox (as root) it reaches the data API by the one path the
/// platform opens for sites with a `data:` section. Before the user allows
/// it, it sends them to the consent screen; afterwards their notes are
/// theirs — listed with provenance under their data, invisible to others.
#[test]
fn notes_keeps_each_users_notes_in_their_own_repository() {
    let s = Sandbox::new("catalog-notes");
    let server = deployed(&s, "notes");
    if is_root() {
        let web = s.component("notes", "web");
        assert!(
            !component_addr(&web).ip().is_loopback(),
            "as root the app runs in a network of its own: {web}"
        );
    }
    let people: Vec<(String, String, Api)> = ["nia@example.org", "obi@example.org"]
        .iter()
        .map(|email| {
            let id = signup(server.port, email, "Someone")["user"]["id"]
                .as_str()
                .unwrap()
                .to_string();
            let bearer = format!(
                "Bearer {}",
                s.ok(&["token", "create", &id, "--scope", "session"])
                    .stdout()
                    .trim()
            );
            (id, bearer, login(server.port, email, true))
        })
        .collect();
    let (nia, obi) = (&people[0], &people[1]);
    let call = |who: &(String, String, Api), method: &str, path: &str, body: &str| {
        let mut headers = vec![("Authorization", who.1.as_str())];
        if body.starts_with('{') || body.starts_with('[') {
            headers.push(("Content-Type", "application/json"));
        } else if !body.is_empty() {
            headers.push(("Content-Type", "application/x-www-form-urlencoded"));
        }
        through(&server, "notes", method, path, &headers, body)
    };

    // Nobody signed in: the gateway asks for a sign-in.
    let (code, _) = through(&server, "notes", "GET", "/", &[], "");
    assert!(matches!(code, 302 | 303 | 401), "{code}");
    // Signed in, before consenting: the app sends the user to the consent screen.
    let (code, body) = call(nia, "GET", "/", "");
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("/console/data/consent/notes"),
        "a link to the consent screen: {body}"
    );
    let (code, asks) = nia.2.get("/api/data/consent/notes");
    assert_eq!(code, 200, "{asks}");
    assert_eq!(asks["items"][0]["collection"], "org.onecommons.notes.note");
    assert_eq!(asks["items"][0]["class"], "private");
    let (code, granted) = nia.2.post("/api/data/consent/notes", serde_json::json!({}));
    assert_eq!(code, 200, "{granted}");

    // Two notes, one from the form, one as JSON.
    let (code, body) = call(
        nia,
        "POST",
        "/notes",
        "title=Groceries&text=oat+milk%2C+lentils",
    );
    assert_eq!(code, 303, "{body}");
    let (code, body) = call(
        nia,
        "POST",
        "/api/notes",
        r#"{"title": "Ideas", "text": "a garden on the roof"}"#,
    );
    assert_eq!(code, 201, "{body}");
    // Several at once: one commit through the data API's batch, all or none.
    let (code, body) = call(
        nia,
        "POST",
        "/api/notes",
        r#"[{"text": "first of two"}, {"text": "second of two"}]"#,
    );
    assert_eq!(code, 201, "{body}");
    let results: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(results.as_array().unwrap().len(), 2, "{results}");
    assert_eq!(results[0]["commit"], results[1]["commit"], "one commit");
    let long = "x".repeat(20_001);
    let (code, body) = call(
        nia,
        "POST",
        "/api/notes",
        &format!(r#"[{{"text": "fine"}}, {{"text": "{long}"}}]"#),
    );
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("writes[1]"), "{body}");
    let (code, page) = call(nia, "GET", "/", "");
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("Groceries") && page.contains("a garden on the roof"),
        "{page}"
    );
    assert!(
        page.contains("second of two") && !page.contains(">fine<"),
        "{page}"
    );
    let (code, listed) = call(nia, "GET", "/api/notes", "");
    assert_eq!(code, 200, "{listed}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4, "{listed}");
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["provenance"]["app"] == "notes" && n["provenance"]["user"] == nia.0.as_str()));

    // They are in her repository, with provenance, and nowhere in the app.
    let (code, mine) = nia.2.get("/api/data/me");
    assert_eq!(code, 200, "{mine}");
    assert_eq!(mine["records"].as_array().unwrap().len(), 4, "{mine}");
    let app_dir = s.home.join("deployments/notes/data");
    for entry in walk(&app_dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(6).any(|w| w == b"lentil"),
            "the app keeps nothing of its own: {}",
            entry.display()
        );
    }

    // Another user, having consented, sees only their own (none).
    obi.2.post("/api/data/consent/notes", serde_json::json!({}));
    let (code, theirs) = call(obi, "GET", "/api/notes", "");
    assert_eq!((code, theirs.as_str()), (200, "[]"));

    // Deleting one leaves the other.
    let rkey = listed[0]["rkey"].as_str().unwrap();
    let (code, body) = call(nia, "POST", &format!("/api/notes/{rkey}/delete"), "");
    assert_eq!(code, 200, "{body}");
    let (_, left) = call(nia, "GET", "/api/notes", "");
    let left: serde_json::Value = serde_json::from_str(&left).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 3, "{left}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
