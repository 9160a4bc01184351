//! The platform under attack: each test performs an attack a red-team pass
//! found (issue 21's numbers in brackets) against a real `commons serve`
//! with real sites, and asserts that it fails. The gateway's own attacks
//! (path spellings, assertions, headers, cookies, framing) are in
//! `crates/gateway/tests/security.rs`.

mod common;
use common::*;
use std::time::Duration;

use serde_json::{json, Value};

fn b64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A site of `name` sent with its files: the echo app behind `route`.
fn echo_site(name: &str, route: &str) -> Value {
    let yaml = format!(
        "name: {name}\ncomponents:\n  web:\n    process: python3 app.py\n    \
         health: {{ http: \"/\" }}\n    route: {route}\n"
    );
    json!({ "name": name, "source": { "root": "commons.yaml", "files": {
        "commons.yaml": b64(&yaml), "app.py": b64(ECHO_APP) } } })
}

/// Waits until the API's last deploy of `site` ended; returns its state.
fn deployed(api: &Api, site: &str) -> String {
    let mut state = String::new();
    wait_for(Duration::from_secs(90), || {
        let (_, v) = api.get(&format!("/api/sites/{site}"));
        state = v["deploy"]["state"].as_str().unwrap_or("").to_string();
        state == "ok" || state == "failed"
    });
    state
}

/// `Set-Cookie` of `name` in a response head, as `name=value`.
fn set_cookie(head: &str, name: &str) -> Option<String> {
    location_and_cookies(head)
        .1
        .into_iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(|c| c.split(';').next().unwrap().to_string())
}

/// [1] The console's site sign-in hands a code only to the gateway's own
/// address, binds it to the gateway's state, and what the site gets is a
/// session of that host alone — never the console session.
#[test]
fn a_site_sign_in_never_yields_the_console_session() {
    let s = Sandbox::new("sec-sign-in");
    s.write("app.py", ECHO_APP);
    s.write(
        "other/commons.yaml",
        "name: other\ncomponents:\n  web:\n    process: python3 ../app.py\n    \
         health: { http: \"/\" }\n    route: { login: [/x] }\n",
    );
    s.blueprint(
        "name: club\ncomponents:\n  web:\n    process: python3 app.py\n    \
         health: { http: \"/\" }\n    route: { host: club.localhost, login: [/members] }\n",
    );
    s.ok(&["deploy"]);
    s.ok(&["deploy", "other"]);
    let server = s.serve(&[]);
    signup(server.port, "ann@example.org", "Ann");
    let console = login(server.port, "ann@example.org", true);
    let console_cookie = console.headers[1].1.clone();
    let site_host = format!("club.localhost:{}", server.http);
    let sign_in = |to: &str, state: &str| {
        let q = serde_urlencoded_pair(&[("to", to), ("state", state)]);
        console.raw("GET", &format!("/console/site-sign-in?{q}"), None)
    };

    // The code is never sent to another listener on the site's name, nor
    // over the other scheme.
    let attacker = free_port();
    for to in [
        format!("http://club.localhost:{attacker}/x"),
        "http://club.localhost/x".to_string(),
        format!("https://club.localhost:{}/x", server.http),
    ] {
        let (code, head, body) = sign_in(&to, "s");
        assert_eq!(code, 400, "{to}: {head}\n{body}");
        assert!(!head.contains("code="), "{head}");
    }

    // A state the attacker made up: the console hands out a code, but the
    // gateway does not finish a sign-in it did not start.
    let (code, head, _) = sign_in(&format!("http://{site_host}/members"), "attacker-state");
    assert_eq!(code, 303, "{head}");
    let finish = path_of(&location_and_cookies(&head).0);
    let state_cookie = "commons_sign_in=attacker-state";
    let (code, head, _) = http_with_head(
        server.http,
        "GET",
        &finish,
        &[("Host", site_host.as_str()), ("Cookie", state_cookie)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 400, "{head}");
    assert!(set_cookie(&head, "commons_session").is_none(), "{head}");

    // The real flow: the gateway's state, the console's code, a site
    // session of this host.
    let page = [("Host", site_host.as_str()), ("Accept", "text/html")];
    let (_, head, _) = http_with_head(server.http, "GET", "/members", &page, b"").unwrap();
    let state_pair = set_cookie(&head, "commons_sign_in").expect("a state cookie");
    let state = state_pair.split_once('=').unwrap().1.to_string();
    let (code, head, _) = sign_in(&format!("http://{site_host}/members"), &state);
    assert_eq!(code, 303, "{head}");
    let finish = path_of(&location_and_cookies(&head).0);
    let (code, head, _) = http_with_head(
        server.http,
        "GET",
        &finish,
        &[
            ("Host", site_host.as_str()),
            ("Cookie", state_pair.as_str()),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(code, 303, "{head}");
    let site_session = set_cookie(&head, "commons_session").expect("a site session");
    assert_ne!(site_session, console_cookie);
    assert!(!site_session.contains("cmnc_"), "{site_session}");
    let at = |host: &str, path: &str, cookie: &str| {
        http(
            server.http,
            "GET",
            path,
            &[("Host", host), ("Cookie", cookie)],
            b"",
        )
        .unwrap()
        .0
    };
    assert_eq!(at(&site_host, "/members", &site_session), 200);
    // Good at this host only: not at another site, not at the API.
    let other_host = format!("other.localhost:{}", server.http);
    assert_eq!(at(&other_host, "/x", &site_session), 401);
    let (code, _) = http(
        server.port,
        "GET",
        "/api/me",
        &[("Cookie", &site_session)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 401);
    // The console session itself signs nobody in at a site.
    assert_eq!(at(&site_host, "/members", &console_cookie), 401);

    // Logging out of the console ends the site session too (once the
    // gateway asks again, within its 30 s cache).
    let (code, head, _) = console.raw("POST", "/api/logout", None);
    assert!(code == 200 || code == 204, "{head}");
    let ended = wait_for(Duration::from_secs(40), || {
        at(&site_host, "/members", &site_session) == 401
    });
    assert!(ended, "the site session outlived the console session");
}

/// `a=b&c=d`, form-encoded.
fn serde_urlencoded_pair(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    b => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// [2] [5] A tenant can neither route another tenant's host or path nor
/// read another tenant's blueprint through its own.
#[test]
fn no_tenant_routes_or_reads_another_tenants_site() {
    let s = Sandbox::new("sec-hosts");
    let server = s.serve(&[]);
    signup(server.port, "ann@example.org", "Ann");
    signup(server.port, "bob@example.org", "Bob");
    let ann = login(server.port, "ann@example.org", true);
    let bob = login(server.port, "bob@example.org", true);
    let (code, v) = bob.post(
        "/api/orgs/bob/sites",
        echo_site("bsite", "{ host: bsite.localhost, login: [/private] }"),
    );
    assert_eq!(code, 202, "{v}");
    assert_eq!(deployed(&bob, "bsite"), "ok");

    for (route, status) in [
        ("{ host: bsite.localhost, path: / }", 409),
        ("{ host: bsite.localhost, path: /admin }", 409),
        ("{ host: BSite.LocalHost, path: /private }", 409),
        ("{ host: bsite.localhost., path: /private }", 422),
        ("{ host: web.bsite.localhost }", 409),
        ("{ host: echo.example, path: /private }", 403),
    ] {
        let site = echo_site("asite", route);
        let (code, v) = ann.post("/api/orgs/ann/plan", site.clone());
        assert_eq!(code, status, "plan {route}: {v}");
        let detail = v["detail"].as_str().unwrap_or("");
        if status == 409 {
            assert!(detail.contains("another organisation"), "{route}: {detail}");
            assert!(!detail.contains("bob"), "names the owner: {detail}");
        }
        let (code, v) = ann.post("/api/orgs/ann/sites", site);
        assert_eq!(code, status, "deploy {route}: {v}");
    }
    // A domain the administrator verified for ann is hers, and only hers;
    // two of her sites share it by distinct paths.
    s.ok(&["domains", "add", "Echo.Example", "--org", "ann"]);
    let (code, v) = ann.post(
        "/api/orgs/ann/sites",
        echo_site("adocs", "{ host: www.echo.example, path: /docs }"),
    );
    assert_eq!(code, 202, "{v}");
    assert_eq!(deployed(&ann, "adocs"), "ok");
    let (code, v) = ann.post(
        "/api/orgs/ann/plan",
        echo_site("asite", "{ host: www.echo.example, path: /docs/ }"),
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("adocs"), "{v}");
    let (code, v) = ann.post(
        "/api/orgs/ann/plan",
        echo_site("asite", "{ host: www.echo.example }"),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = bob.post(
        "/api/orgs/bob/plan",
        echo_site("bsite", "{ host: echo.example }"),
    );
    assert_eq!(code, 409, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("another organisation"),
        "{v}"
    );
    // Its own names are its own.
    let (code, v) = ann.post(
        "/api/orgs/ann/plan",
        echo_site("asite", "{ host: api.asite.localhost, path: /v1 }"),
    );
    assert_eq!(code, 200, "{v}");
    // Bob's site is still bob's, login and all.
    let host = format!("bsite.localhost:{}", server.http);
    let get = |path: &str| {
        http(server.http, "GET", path, &[("Host", &host)], b"")
            .unwrap()
            .0
    };
    assert!(wait_for(Duration::from_secs(10), || get("/") == 200));
    assert_eq!(get("/private"), 401);

    // [5] Bob's blueprint, by a relative or an absolute path, as an include
    // or a static directory: refused, and nothing of it is shown.
    let bob_dir = s.home.join("uploads/bsite");
    for component in [
        "{ blueprint: ../bsite }".to_string(),
        format!("{{ blueprint: {} }}", bob_dir.display()),
        "{ static: ../bsite }".to_string(),
        format!("{{ static: {} }}", bob_dir.display()),
    ] {
        let yaml = format!("name: peek\ncomponents:\n  other: {component}\n");
        let (code, v) = ann.post(
            "/api/orgs/ann/plan",
            json!({ "name": "peek", "blueprint": yaml }),
        );
        assert_eq!(code, 422, "{component}: {v}");
        let text = v.to_string();
        assert!(text.contains("outside the blueprint's directory"), "{text}");
        assert!(!text.contains("app.py"), "{text}");
    }
}

/// [6] A token limited to one organisation acts there alone, on tokens
/// as on sites.
#[test]
fn an_organisation_token_stays_in_its_organisation() {
    let s = Sandbox::new("sec-tokens");
    let server = s.serve(&[]);
    signup(server.port, "ann@example.org", "Ann");
    let ann = login(server.port, "ann@example.org", true);
    let (code, v) = ann.post("/api/orgs", json!({ "id": "ann2", "name": "Ann's other" }));
    assert_eq!(code, 201, "{v}");
    let other = make_token(&ann, &["sites:read"], Some("ann2"));
    let limited = Api::token(
        server.port,
        &make_token(
            &ann,
            &["tokens:write", "sites:read", "sites:write"],
            Some("ann"),
        ),
    );
    let (code, v) = limited.post(
        "/api/tokens",
        json!({ "name": "escape", "scopes": ["sites:write"], "org": "ann2" }),
    );
    assert_eq!(code, 404, "{v}");
    let (code, v) = limited.get("/api/tokens");
    assert_eq!(code, 200);
    let orgs: Vec<&Value> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["org"])
        .collect();
    assert!(orgs.iter().all(|o| *o == "ann"), "{v}");
    // The other organisation's token is out of its reach.
    let (_, all) = ann.get("/api/tokens");
    let other_id = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["org"] == "ann2")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, _) = limited.call("DELETE", &format!("/api/tokens/{other_id}"), None);
    assert_eq!(code, 404);
    let (code, _) = Api::token(server.port, &other).get("/api/orgs/ann2/sites");
    assert_eq!(code, 200, "the other token still works");
}

/// [9] [12] [16] The console's log-in: the limiter believes no forwarded
/// address, `next` never leaves the platform, and no page can be framed.
#[test]
fn the_console_login_holds_against_spoofing_and_redirects() {
    let s = Sandbox::new("sec-console");
    let server = s.serve(&[]);
    signup(server.port, "ann@example.org", "Ann");
    let form = |password: &str, next: &str, forwarded: &str| {
        let body = format!(
            "email=ann%40example.org&password={password}&next={}",
            serde_urlencoded_pair(&[("n", next)]).trim_start_matches("n=")
        );
        http_with_head(
            server.port,
            "POST",
            "/console/login",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("X-Forwarded-For", forwarded),
            ],
            body.as_bytes(),
        )
        .unwrap()
    };
    // [12] Back to the console, not to another site.
    for next in [
        "/\t/evil.example",
        "//evil.example",
        "/\\evil.example",
        "https://evil.example",
    ] {
        let (code, head, _) = form("a%20long%20enough%20password", next, "1.1.1.1");
        assert_eq!(code, 303, "{head}");
        assert_eq!(location_and_cookies(&head).0, "/console", "{next}: {head}");
    }
    // [9] A new X-Forwarded-For each time does not buy more attempts.
    let mut limited = false;
    for i in 0..8 {
        let (code, _, _) = form("wrong", "/console", &format!("10.0.0.{i}"));
        if code == 429 {
            limited = true;
            break;
        }
        assert_eq!(code, 401);
    }
    assert!(limited, "rotating X-Forwarded-For gave unlimited attempts");
    // The password is right, but this client used up its attempts.
    let (code, _, _) = form("a%20long%20enough%20password", "/console", "10.9.9.9");
    assert_eq!(code, 429);
    drop(server);

    // Behind a trusted proxy, the address it forwards is the client's: one
    // client's failures do not lock out another.
    let s = Sandbox::new("sec-console-proxy");
    let server = s.serve(&[("COMMONS_TRUSTED_PROXIES", "127.0.0.1")]);
    signup(server.port, "ann@example.org", "Ann");
    let attempt = |password: &str, forwarded: &str| {
        let body = format!("email=ann%40example.org&password={password}&next=%2Fconsole");
        http(
            server.port,
            "POST",
            "/console/login",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("X-Forwarded-For", forwarded),
            ],
            body.as_bytes(),
        )
        .unwrap()
        .0
    };
    let codes: Vec<u16> = (0..6).map(|_| attempt("wrong", "192.0.2.7")).collect();
    assert_eq!(codes.last(), Some(&429), "{codes:?}");
    // A client that wrote its own X-Forwarded-For before the proxy's is the
    // proxy's rightmost entry: still the locked-out one.
    assert_eq!(attempt("wrong", "198.51.100.1, 192.0.2.7"), 429);
    assert_eq!(attempt("a%20long%20enough%20password", "192.0.2.8"), 303);
    // [16] No page may be framed.
    let (code, head, _) = http_with_head(server.port, "GET", "/console/login", &[], b"").unwrap();
    assert_eq!(code, 200);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("x-frame-options: deny"), "{head}");
    assert!(head.contains("frame-ancestors 'none'"), "{head}");
}

/// [11] [16] The API's listener: no idle or half-sent connection outlives
/// the header timeout, unauthenticated bodies are small, and file names a
/// filesystem cannot take are the client's error.
#[test]
fn the_api_listener_sheds_slow_clients_and_large_bodies() {
    use std::io::{Read, Write};
    let s = Sandbox::new("sec-api");
    let server = s.serve(&[]);
    let mut idle = Vec::new();
    for i in 0..12 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        if i % 2 == 0 {
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
        }
        idle.push(c);
    }
    // A 200 KiB sign-up is refused with a problem document.
    let big = format!(
        "{{\"email\":\"a@b.c\",\"name\":\"{}\",\"password\":\"x\"}}",
        "n".repeat(200 << 10)
    );
    let (code, head, body) = http_with_head(
        server.port,
        "POST",
        "/api/signup",
        &[("Content-Type", "application/json")],
        big.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 413, "{head}");
    assert!(head.contains("application/problem+json"), "{head}\n{body}");
    // [16] A 300-byte file name, or a NUL in one: 422.
    signup(server.port, "ann@example.org", "Ann");
    let ann = login(server.port, "ann@example.org", true);
    for name in ["n".repeat(300), "a\u{0}b".to_string()] {
        let (code, v) = ann.post(
            "/api/orgs/ann/plan",
            json!({ "name": "files", "source": { "root": "commons.yaml", "files": {
                "commons.yaml": b64("name: files\ncomponents:\n  j: { job: \"true\" }\n"),
                name.clone(): b64("x") } } }),
        );
        assert_eq!(code, 422, "{v}");
    }
    // Every idle and half-sent connection is closed by the server.
    std::thread::sleep(Duration::from_secs(32));
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).unwrap_or(0);
        // Closed (0), or told so first (a 408) and then closed.
        if n > 0 {
            assert!(
                String::from_utf8_lossy(&buf[..n]).contains(" 408 "),
                "{}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
}

/// [Default configuration] Unsandboxed, the platform takes no site from a
/// user: a workload would run as the platform's own user, beside its keys.
#[test]
fn an_unsandboxed_platform_runs_no_users_code() {
    let s = Sandbox::new("sec-default");
    let server = s.serve(&[("COMMONS_SINGLE_USER", "0"), ("COMMONS_SANDBOX", "0")]);
    signup(server.port, "ann@example.org", "Ann");
    let ann = login(server.port, "ann@example.org", true);
    let thief = json!({ "name": "thief", "blueprint":
        "name: thief\ncomponents:\n  j: { job: \"cat ../../gateway/identity.key ../../secrets/admin.token\" }\n" });
    let (code, v) = ann.post("/api/orgs/ann/sites", thief);
    assert_eq!(code, 403, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("COMMONS_SANDBOX"),
        "{v}"
    );
    let (code, v) = ann.call(
        "PUT",
        "/api/sites/thief",
        Some(json!({ "blueprint": "name: thief\ncomponents: {}\n" })),
    );
    assert!(code == 403 || code == 404, "{v}");
    assert!(!s.home.join("deployments/thief").exists());
}

/// [Default configuration] Sandboxed, a site sent with its files runs as
/// its own user, who alone can read them.
#[test]
fn a_sandboxed_site_reads_its_own_files_and_no_one_elses() {
    assert!(
        is_root(),
        "sandboxing needs root (a user of its own per site); run the tests as root"
    );
    let s = Sandbox::new("sec-sandboxed");
    let server = s.serve(&[("COMMONS_SINGLE_USER", "0"), ("COMMONS_SANDBOX", "1")]);
    signup(server.port, "ann@example.org", "Ann");
    signup(server.port, "bob@example.org", "Bob");
    let ann = login(server.port, "ann@example.org", true);
    let bob = login(server.port, "bob@example.org", true);
    let (code, v) = bob.post("/api/orgs/bob/sites", echo_site("bsite", "{ login: [/x] }"));
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        deployed(&bob, "bsite"),
        "ok",
        "{:?}",
        bob.get("/api/sites/bsite")
    );
    let host = format!("bsite.localhost:{}", server.http);
    assert!(wait_for(Duration::from_secs(10), || {
        http(server.http, "GET", "/", &[("Host", &host)], b"")
            .unwrap()
            .0
            == 200
    }));
    // Ann's job tries to read bob's upload and the platform's keys.
    let peek = "name: peek\ncomponents:\n  j:\n    job: >-\n      \
        for f in ../bsite/app.py ../../gateway/identity.key ../../secrets/admin.token; \
        do cat $f > /dev/null 2>&1 && echo READ $f; done; echo checked > $COMMONS_DATA_DIR/out\n";
    let (code, v) = ann.post(
        "/api/orgs/ann/sites",
        json!({ "name": "peek", "source": { "root": "commons.yaml", "files": {
            "commons.yaml": b64(peek) } } }),
    );
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        deployed(&ann, "peek"),
        "ok",
        "{:?}",
        ann.get("/api/sites/peek")
    );
    let out = std::fs::read_to_string(s.home.join("deployments/peek/data/out")).unwrap();
    assert_eq!(out.trim(), "checked");
    let (_, logs) = ann.get("/api/sites/peek/logs");
    assert!(!logs.to_string().contains("READ"), "{logs}");
}
