//! Accounts through a running `commons serve`: sign-up, log-in and
//! log-out, sessions and CSRF, the log-in limiter, organisations and roles,
//! scoped tokens, sites deployed and managed through the API, and the audit
//! log — and, above all, that nobody reaches another organisation's sites.

mod common;
use common::*;
use std::time::Duration;

use serde_json::{json, Value};

const SITE: &str = r#"name: web
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
"#;

#[test]
fn accounts_roles_tokens_and_sites_through_the_api() {
    let s = Sandbox::new("accounts");
    let server = s.serve(&[]);
    let port = server.port;
    let anon = Api::anonymous(port);

    // Sign-up: the first account is the platform's administrator; each
    // gets an organisation of its own.
    let ann = signup(port, "Ann@Example.org", "Ann");
    assert_eq!(ann["user"]["email"], "ann@example.org");
    assert_eq!(ann["user"]["platform_admin"], true);
    assert_eq!(ann["org"]["id"], "ann");
    assert!(ann["user"].get("password_hash").is_none(), "{ann}");
    let bob = signup(port, "bob@example.org", "Bob");
    assert_eq!(bob["user"]["platform_admin"], false);
    let (code, v) = anon.post(
        "/api/signup",
        json!({ "email": "ann@example.org", "name": "Ann again", "password": "a long enough password" }),
    );
    assert_eq!(code, 409, "{v}");
    let (code, v) = anon.post(
        "/api/signup",
        json!({ "email": "carol@example.org", "name": "Carol", "password": "short" }),
    );
    assert_eq!(code, 422, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("10 characters"),
        "{v}"
    );
    // PostgreSQL keeps no NUL character in text: scaled out, a name with
    // one is the caller's to fix (422, saying so), not a store failure.
    let (code, v) = anon.post(
        "/api/signup",
        json!({ "email": "nul@example.org", "name": "Ca\u{0}rol", "password": "a long enough password" }),
    );
    if s.scale_out.is_some() {
        assert_eq!(code, 422, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("NUL"), "{v}");
    } else {
        assert_eq!(code, 201, "{v}");
    }
    // Passwords are stored as argon2 hashes only (in the database or its WAL).
    let stored = || s.stored_state();
    let db = stored();
    assert!(!db.contains("a long enough password"));
    assert!(db.contains("$argon2id$"));

    // Log-in: wrong passwords are refused, and after five the account is
    // locked for this address even with the right one.
    signup(port, "carol@example.org", "Carol");
    for _ in 0..5 {
        let (code, v) = anon.post(
            "/api/login",
            json!({ "email": "carol@example.org", "password": "wrong password!" }),
        );
        assert_eq!(code, 401, "{v}");
    }
    let (code, head, body) = anon.raw(
        "POST",
        "/api/login",
        Some(json!({ "email": "carol@example.org", "password": "a long enough password" })),
    );
    assert_eq!(code, 429, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let (code, _) = anon.post(
        "/api/login",
        json!({ "email": "nobody@example.org", "password": "a long enough password" }),
    );
    assert_eq!(code, 401);

    // Sessions: reads need the cookie; changes need the CSRF token too.
    let (code, v) = anon.get("/api/me");
    assert_eq!(code, 401, "{v}");
    let ann_no_csrf = login(port, "ann@example.org", false);
    let (code, me) = ann_no_csrf.get("/api/me");
    assert_eq!(code, 200, "{me}");
    assert_eq!(me["user"]["email"], "ann@example.org");
    let (code, v) = ann_no_csrf.post("/api/orgs", json!({ "id": "acme", "name": "Acme" }));
    assert_eq!(code, 403, "a change without the CSRF token is refused: {v}");
    assert!(v["title"].as_str().unwrap().contains("CSRF"), "{v}");
    let ann_web = login(port, "ann@example.org", true);
    let (code, v) = ann_web.post("/api/orgs", json!({ "id": "acme", "name": "Acme" }));
    assert_eq!(code, 201, "{v}");
    let (code, v) = ann_web.post("/api/orgs", json!({ "id": "acme", "name": "Acme" }));
    assert_eq!(code, 409, "{v}");
    let (_, orgs) = ann_web.get("/api/orgs");
    let ids: Vec<&str> = orgs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "ann"]);

    // Tokens: shown once, listed without their value, scoped.
    let ann_token = make_token(&ann_web, &["sites:read", "sites:write", "audit:read"], None);
    assert!(ann_token.starts_with("cmnu_"));
    let (_, list) = ann_web.get("/api/tokens");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&ann_token));
    assert!(list["items"][0].get("hash").is_none());
    assert!(!stored().contains(&ann_token));
    let (code, v) = ann_web.post(
        "/api/tokens",
        json!({ "name": "x", "scopes": ["everything"] }),
    );
    assert_eq!(code, 422, "{v}");
    let ann_api = Api::token(port, &ann_token);
    let ann_reader = make_token(&ann_web, &["sites:read"], Some("acme"));
    let reader = Api::token(port, &ann_reader);

    // Ann deploys a site in acme with her token.
    let (code, v) = ann_api.post(
        "/api/orgs/acme/sites",
        json!({ "name": "shop", "blueprint": SITE }),
    );
    assert_eq!(code, 202, "{v}");
    let (code, v) = ann_api.post(
        "/api/orgs/acme/sites",
        json!({ "name": "shop", "blueprint": SITE }),
    );
    assert_eq!(code, 409, "{v}");
    let (code, v) = ann_api.post(
        "/api/orgs/acme/sites",
        json!({ "name": "broken", "blueprint": "name: x\ncomponents:\n  web:\n    procss: true\n" }),
    );
    assert_eq!(code, 422, "a bad blueprint is refused with why: {v}");
    assert!(v["detail"].as_str().unwrap().contains("procss"), "{v}");
    let running = wait_for(Duration::from_secs(60), || {
        let (_, v) = ann_api.get("/api/sites/shop");
        v["status"]["components"][0]["state"] == "running"
    });
    assert!(running, "{}", ann_api.get("/api/sites/shop").1);

    // A read-only token reads, and cannot change anything.
    let (code, v) = reader.get("/api/orgs/acme/sites");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["items"][0]["name"], "shop");
    assert_eq!(v["items"][0]["status"], "ok");
    let (code, v) = reader.post(
        "/api/orgs/acme/sites",
        json!({ "name": "other", "blueprint": SITE }),
    );
    assert_eq!(code, 403, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("sites:write"), "{v}");
    let (code, v) = reader.call("DELETE", "/api/sites/shop", None);
    assert_eq!(code, 403, "{v}");
    // It is limited to acme.
    let (code, v) = reader.get("/api/orgs/ann/sites");
    assert_eq!(code, 404, "{v}");

    // Bob, an operator of his own organisation, cannot see or touch acme's sites.
    let bob_web = login(port, "bob@example.org", true);
    let bob_token = make_token(&bob_web, &["sites:read", "sites:write"], None);
    let bob_api = Api::token(port, &bob_token);
    for (method, path, body) in [
        ("GET", "/api/orgs/acme/sites", None),
        (
            "POST",
            "/api/orgs/acme/sites",
            Some(json!({ "name": "mine", "blueprint": SITE })),
        ),
        (
            "POST",
            "/api/orgs/acme/plan",
            Some(json!({ "name": "mine", "blueprint": SITE })),
        ),
        ("GET", "/api/sites/shop", None),
        ("GET", "/api/sites/shop/logs", None),
        ("GET", "/api/sites/shop/history", None),
        ("POST", "/api/sites/shop/backups", None),
        ("DELETE", "/api/sites/shop", None),
        ("GET", "/api/orgs/acme/audit", None),
        ("GET", "/api/orgs/acme/members", None),
    ] {
        let (code, v) = bob_api.call(method, path, body);
        assert!(
            code == 404 || code == 403,
            "{method} {path} answered {code} to another organisation: {v}"
        );
        assert!(!v.to_string().contains("python3"), "{v}");
    }
    let (_, v) = ann_api.get("/api/sites/shop");
    assert_eq!(v["status"]["components"][0]["state"], "running");

    // Made a developer of acme, Bob reads its sites but cannot deploy;
    // made an operator, he can.
    let (code, v) = ann_web.call(
        "PUT",
        "/api/orgs/acme/members",
        Some(json!({ "email": "bob@example.org", "roles": ["developer"] })),
    );
    assert_eq!(code, 200, "{v}");
    let (code, _) = bob_api.get("/api/orgs/acme/sites");
    assert_eq!(code, 200);
    let (code, v) = bob_api.post(
        "/api/orgs/acme/plan",
        json!({ "name": "mine", "blueprint": SITE }),
    );
    assert_eq!(code, 403, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("developer"), "{v}");
    let (code, v) = bob_web.call(
        "PUT",
        "/api/orgs/acme/members",
        Some(json!({ "email": "bob@example.org", "roles": ["admin"] })),
    );
    assert_eq!(code, 403, "a developer cannot make himself admin: {v}");
    let (code, _) = ann_web.call(
        "PUT",
        "/api/orgs/acme/members",
        Some(json!({ "email": "bob@example.org", "roles": ["operator"] })),
    );
    assert_eq!(code, 200);
    let (code, plan) = bob_api.post(
        "/api/orgs/acme/plan",
        json!({ "name": "mine", "blueprint": SITE }),
    );
    assert_eq!(code, 200, "{plan}");
    assert!(plan.to_string().contains("create"), "{plan}");
    // A member must have an account: the organisation is there, the
    // request names nobody (422, not 404).
    let (code, v) = ann_web.call(
        "PUT",
        "/api/orgs/acme/members",
        Some(json!({ "email": "nobody@example.org", "roles": ["developer"] })),
    );
    assert_eq!(code, 422, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("sign up first"),
        "{v}"
    );
    // The last admin cannot leave.
    let (code, v) = ann_web.call(
        "PUT",
        "/api/orgs/acme/members",
        Some(json!({ "email": "ann@example.org", "roles": [] })),
    );
    assert_eq!(code, 409, "{v}");

    // Logs, history and backups of the running site.
    let (code, v) = ann_api.get("/api/sites/shop/logs?lines=50");
    assert_eq!(code, 200, "{v}");
    assert!(v["components"]["web"].is_array(), "{v}");
    let (code, v) = ann_api.get("/api/sites/shop/history");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
    // A redeploy with another blueprint: the history says what changed.
    let changed = format!("{SITE}  greet:\n    job: \"true\"\n");
    let (code, v) = ann_api.call(
        "PUT",
        "/api/sites/shop",
        Some(json!({ "blueprint": changed })),
    );
    assert_eq!(code, 202, "{v}");
    let redeployed = wait_for(Duration::from_secs(60), || {
        ann_api.get("/api/sites/shop/history").1["items"]
            .as_array()
            .is_some_and(|i| i.len() == 2)
    });
    assert!(redeployed, "{}", ann_api.get("/api/sites/shop").1);
    let (code, v) = ann_api.get("/api/sites/shop/history/diff?a=1&b=2");
    assert_eq!(code, 200, "{v}");
    assert!(v["diff"].as_str().unwrap().contains("greet"), "{v}");
    let (code, v) = reader.call("PUT", "/api/sites/shop", Some(json!({ "blueprint": SITE })));
    assert_eq!(code, 403, "{v}");
    let (code, v) = ann_api.call("POST", "/api/sites/shop/backups", None);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64, "{v}");

    // Revoked tokens stop working; a logged-out session too.
    let (_, list) = ann_web.get("/api/tokens");
    let reader_id = list["items"][1]["id"].as_str().unwrap().to_string();
    let (code, _) = ann_web.call("DELETE", &format!("/api/tokens/{reader_id}"), None);
    assert_eq!(code, 204);
    let (code, v) = reader.get("/api/orgs/acme/sites");
    assert_eq!(code, 401, "{v}");
    let (code, _) = ann_no_csrf.call("POST", "/api/logout", None);
    assert_eq!(code, 204);
    let (code, _) = ann_no_csrf.get("/api/me");
    assert_eq!(code, 401, "a logged-out session is gone");
    let (code, _) = ann_web.get("/api/me");
    assert_eq!(code, 200, "other sessions stay");

    // Destroy, then it is gone.
    let (code, v) = bob_api.call("DELETE", "/api/sites/shop", None);
    assert_eq!(code, 200, "an operator of acme may remove its site: {v}");
    let (code, _) = ann_api.get("/api/sites/shop");
    assert_eq!(code, 404);

    // The audit log says who changed what; only admins and custodians read it.
    let (code, v) = bob_api.get("/api/orgs/acme/audit");
    assert_eq!(code, 403, "{v}");
    let (code, audit) = ann_api.get("/api/orgs/acme/audit");
    assert_eq!(code, 200, "{audit}");
    let entries: Vec<(String, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["actor"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let ann_id = ann["user"]["id"].as_str().unwrap();
    let bob_id = bob["user"]["id"].as_str().unwrap();
    for expected in [
        ("org.create", ann_id),
        ("site.create", ann_id),
        ("site.deploy", ann_id),
        ("member.set", ann_id),
        ("site.backup", ann_id),
        ("site.delete", bob_id),
    ] {
        assert!(
            entries
                .iter()
                .any(|(a, u)| a == expected.0 && u == expected.1),
            "{expected:?} missing from {entries:?}"
        );
    }
    assert!(!audit.to_string().contains("password"), "{audit}");
}

#[test]
fn listing_sites_paginates() {
    let s = Sandbox::new("accounts-pages");
    let server = s.serve(&[]);
    signup(server.port, "ann@example.org", "Ann");
    let web = login(server.port, "ann@example.org", true);
    // Ownership rows alone (no deploy) are enough to page through: the
    // plan endpoint does not make any, so deploy a blueprint that fails fast.
    let failing = "name: x\ncomponents:\n  job:\n    job: \"false\"\n";
    for i in 0..7 {
        let (code, v) = web.post(
            "/api/orgs/ann/sites",
            json!({ "name": format!("s{i}"), "blueprint": failing }),
        );
        assert_eq!(code, 202, "{v}");
    }
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &next {
            Some(after) => format!("/api/orgs/ann/sites?limit=3&after={after}"),
            None => "/api/orgs/ann/sites?limit=3".to_string(),
        };
        let (code, v) = web.get(&path);
        assert_eq!(code, 200, "{v}");
        pages += 1;
        for item in v["items"].as_array().unwrap() {
            seen.push(item["name"].as_str().unwrap().to_string());
        }
        match v["next"].as_str() {
            Some(n) => next = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);
    assert_eq!(pages, 3);
}

/// One login for every hosted site: an application signs a user in with the
/// platform through a real OpenID Connect client library (Authlib).
#[test]
fn a_real_oidc_client_signs_a_user_in() {
    let s = Sandbox::new("accounts-oidc");
    let server = s.serve(&[]);
    let port = server.port;
    let ann = signup(port, "ann@example.org", "Ann");
    signup(port, "bob@example.org", "Bob");
    let ann_web = login(port, "ann@example.org", true);
    let app = json!({ "name": "Wiki", "redirect_uris": ["http://app.localhost/callback"] });
    // Only the organisation's admins and operators register applications.
    let bob_web = login(port, "bob@example.org", true);
    let (code, v) = bob_web.post("/api/orgs/ann/oidc-clients", app.clone());
    assert_eq!(code, 404, "{v}");
    let (code, v) = ann_web.post(
        "/api/orgs/ann/oidc-clients",
        json!({ "name": "Bad", "redirect_uris": ["javascript:alert(1)"] }),
    );
    assert_eq!(code, 422, "{v}");
    let (code, client) = ann_web.post("/api/orgs/ann/oidc-clients", app);
    assert_eq!(code, 201, "{client}");
    let (id, secret) = (
        client["client_id"].as_str().unwrap(),
        client["client_secret"].as_str().unwrap(),
    );

    // Discovery says where everything is.
    let (code, conf) = Api::anonymous(port).get("/.well-known/openid-configuration");
    assert_eq!(code, 200, "{conf}");
    let issuer = format!("http://127.0.0.1:{port}");
    assert_eq!(conf["issuer"], issuer.as_str());
    assert_eq!(conf["code_challenge_methods_supported"], json!(["S256"]));

    // An unknown application or return address is not redirected to.
    let (code, _, _) = Api::anonymous(port).raw(
        "GET",
        "/oidc/authorize?response_type=code&client_id=nobody&redirect_uri=http://evil.example/&scope=openid",
        None,
    );
    assert_eq!(code, 400);

    let python = python_venv(
        &s.dir.join("venv"),
        &["authlib==1.*", "requests==2.*", "cryptography"],
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc_client.py");
    let out = run_ok(std::process::Command::new(python).arg(script).args([
        &issuer,
        id,
        secret,
        "ann@example.org",
        "a long enough password",
    ]));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();

    // The consent screen said who asks for what.
    let consent = seen["consent_page"].as_str().unwrap();
    for said in ["Wiki", "your name", "your email address", "ann@example.org"] {
        assert!(consent.contains(said), "{said} missing from {consent}");
    }
    // The ID token, verified by the library against the JWKS.
    let claims = &seen["claims"];
    assert_eq!(seen["header_alg"], "RS256");
    assert_eq!(claims["sub"], ann["user"]["id"]);
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(claims["aud"], id);
    assert_eq!(claims["email"], "ann@example.org");
    assert_eq!(claims["name"], "Ann");
    assert_eq!(seen["userinfo"]["sub"], ann["user"]["id"]);
    assert_eq!(seen["userinfo"]["email"], "ann@example.org");
    // A code works once, only with its verifier; a refusal goes back as such.
    assert_eq!(seen["reused"][0], 400, "{seen}");
    assert_eq!(seen["reused"][1]["error"], "invalid_grant");
    assert_eq!(seen["wrong_verifier"][0], 400, "{seen}");
    assert_eq!(seen["wrong_verifier"][1]["error"], "invalid_grant");
    assert_eq!(seen["denied"]["error"], "access_denied", "{seen}");
    assert_eq!(seen["denied_state_ok"], true);
}

#[test]
fn a_console_session_signs_its_user_in_at_sites_that_need_login() {
    let s = Sandbox::new("site-sign-in");
    s.write("app.py", ECHO_APP);
    s.blueprint(
        r#"name: club
components:
  web:
    process: python3 app.py
    health: { http: "/" }
    route: { host: club.localhost, login: [/members] }
"#,
    );
    s.ok(&["deploy"]);
    let server = s.serve(&[]);
    let ann = signup(server.port, "ann@example.org", "Ann");
    let ann_id = ann["user"]["id"].as_str().unwrap().to_string();
    let console = login(server.port, "ann@example.org", false);
    let site_host = format!("club.localhost:{}", server.http);
    let page = [("Host", site_host.as_str()), ("Accept", "text/html")];

    // A program gets a 401; a browser is sent to the platform's sign-in,
    // with a state cookie for the way back.
    let (code, _) = http(
        server.http,
        "GET",
        "/members/list",
        &[("Host", site_host.as_str())],
        b"",
    )
    .unwrap();
    assert_eq!(code, 401);
    let (code, head, _) = http_with_head(server.http, "GET", "/members/list", &page, b"").unwrap();
    assert_eq!(code, 303, "{head}");
    let (to_platform, cookies) = location_and_cookies(&head);
    let api = format!("http://127.0.0.1:{}/console/site-sign-in?", server.port);
    assert!(to_platform.starts_with(&api), "{to_platform}");
    let state_cookie = cookies
        .iter()
        .find(|c| c.starts_with("commons_sign_in="))
        .expect("a state cookie")
        .clone();
    assert!(state_cookie.contains("HttpOnly"), "{state_cookie}");
    let state_pair = state_cookie.split(';').next().unwrap().to_string();

    // Not signed in at the platform: to its log-in page, then back here.
    let (code, head, _) =
        http_with_head(server.port, "GET", &path_of(&to_platform), &[], b"").unwrap();
    assert_eq!(code, 303, "{head}");
    assert!(
        location_and_cookies(&head)
            .0
            .starts_with("/console/login?next=%2Fconsole%2Fsite-sign-in"),
        "{head}"
    );
    // Signed in: back to the site with a one-time code.
    let (code, head, _) = console.raw("GET", &path_of(&to_platform), None);
    assert_eq!(code, 303, "{head}");
    let (to_site, _) = location_and_cookies(&head);
    assert!(
        to_site.starts_with(&format!("http://{site_host}/.commons/sign-in?code=")),
        "{to_site}"
    );
    let finish = path_of(&to_site);

    // Without the state cookie (a link someone else sent): refused.
    let (code, body) = http(
        server.http,
        "GET",
        &finish,
        &[("Host", site_host.as_str())],
        b"",
    )
    .unwrap();
    assert_eq!(code, 400, "{body}");
    // With it: the session cookie of this host, and on to the page.
    let with_state = [
        ("Host", site_host.as_str()),
        ("Cookie", state_pair.as_str()),
    ];
    let (code, head, _) = http_with_head(server.http, "GET", &finish, &with_state, b"").unwrap();
    assert_eq!(code, 303, "{head}");
    let (back, cookies) = location_and_cookies(&head);
    assert_eq!(back, "/members/list");
    let session = cookies
        .iter()
        .find(|c| c.starts_with("commons_session=cmst_"))
        .expect("the session cookie")
        .clone();
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Lax"),
        "{session}"
    );
    // A code works once.
    let (code, _) = http(server.http, "GET", &finish, &with_state, b"").unwrap();
    assert_eq!(code, 400);

    // Signed in at the site: the app gets the user's identity, never the
    // platform's cookie.
    let session_pair = session.split(';').next().unwrap().to_string();
    let cookie = format!("theme=dark; {session_pair}");
    let signed_in = [("Host", site_host.as_str()), ("Cookie", cookie.as_str())];
    let (code, body) = http(server.http, "GET", "/members/list", &signed_in, b"").unwrap();
    assert_eq!(code, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["cookie"], "theme=dark", "{seen}");
    let jwt = seen["identity"].as_str().expect("an identity assertion");
    use base64::Engine as _;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], ann_id.as_str(), "{claims}");
    assert_eq!(claims["aud"], "club", "{claims}");
    // An app cannot set the platform's cookie.
    let (_, head, _) =
        http_with_head(server.http, "GET", "/members/grab", &signed_in, b"").unwrap();
    let (_, cookies) = location_and_cookies(&head);
    assert!(cookies.iter().any(|c| c.starts_with("theme=")), "{head}");
    assert!(
        !cookies.iter().any(|c| c.starts_with("commons_session")),
        "{head}"
    );

    // The platform sends sessions only to the sites it serves.
    let evil = "/console/site-sign-in?to=http%3A%2F%2Fevil.example%2F&state=x";
    let (code, _, body) = console.raw("GET", evil, None);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("evil.example"), "{body}");
}
