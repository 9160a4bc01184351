//! The web console in a real browser: Debian's headless Chromium driven over
//! WebDriver (chromedriver) by fantoccini. A visitor signs up, previews the
//! plan of a catalog application, deploys it, sees it running, opens it
//! through the gateway, and logs out. Screenshots of the main pages are saved
//! under `target/console-screenshots/` as artefacts; every page is checked
//! for labelled fields and, on a phone-sized window, for no sideways scroll.

mod common;
use common::browser::*;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn a_visitor_signs_up_deploys_a_catalog_app_and_opens_it() {
    let s = Sandbox::new("console");
    let sandbox = if is_root() { "1" } else { "0" };
    let server = s.serve(&[("COMMONS_SANDBOX", sandbox)]);
    let driver = Driver::start(s.dir.join("chromium-profile"));
    let console = format!("http://127.0.0.1:{}/console", server.port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;

        // Not signed in: the console sends us to log in; from there, sign up.
        c.goto(&console).await.unwrap();
        arrive(&c, "Log in").await;
        click(&c, Locator::LinkText("Sign up")).await;
        arrive(&c, "Sign up").await;
        accessible(&c, "sign-up").await;
        shot(&c, "signup").await;
        fill(&c, "name", "Dana").await;
        fill(&c, "email", "dana@example.org").await;
        fill(&c, "password", "a long enough password").await;
        click(&c, Locator::Css("button[type=submit]")).await;
        arrive(&c, "Your sites").await;
        shot(&c, "sites-empty").await;

        // Her organisation: choose a catalog app, preview the plan, deploy.
        click(&c, Locator::LinkText("dana")).await;
        arrive(&c, "Organisation dana").await;
        accessible(&c, "organisation").await;
        fill(&c, "site-name", "notes").await;
        c.find(Locator::Id("catalog"))
            .await
            .unwrap()
            .select_by_value("json-server")
            .await
            .unwrap();
        shot(&c, "deploy-form").await;
        click(&c, Locator::Css("#deploy button[type=submit]")).await;
        arrive(&c, "Plan preview").await;
        let plan = text_of(&c, Locator::Css("table")).await;
        for component in ["install", "seed", "web"] {
            assert!(plan.contains(component), "{plan}");
        }
        assert!(plan.contains("create"), "{plan}");
        shot(&c, "plan").await;
        click(&c, Locator::Css("main form button[type=submit]")).await;
        arrive(&c, "Site notes").await;

        // It installs from npm and starts; the page follows it.
        let site = format!("{console}/sites/notes");
        let started = Instant::now();
        loop {
            c.goto(&site).await.unwrap();
            let source = c.source().await.unwrap();
            if source.contains("id=\"deploy-status\"") {
                let status = text_of(&c, Locator::Id("deploy-status")).await;
                if status == "ok" {
                    break;
                }
                assert_ne!(status, "failed", "{source}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "the site did not deploy: {source}"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let table = text_of(&c, Locator::Css("table")).await;
        assert!(table.contains("running"), "{table}");
        accessible(&c, "site").await;
        shot(&c, "site").await;

        // Open it through the gateway: json-server's own page.
        let open = c.find(Locator::Id("open")).await.unwrap();
        let href = open.attr("href").await.unwrap().unwrap();
        assert_eq!(href, format!("http://notes.localhost:{}/", server.http));
        open.click().await.unwrap();
        let opened = {
            let mut ok = false;
            for _ in 0..30 {
                if c.source().await.unwrap().contains("JSON Server") {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            ok
        };
        assert!(opened, "{}", c.source().await.unwrap());
        shot(&c, "site-through-gateway").await;

        // Tokens: made here, shown once.
        c.goto(&format!("{console}/tokens")).await.unwrap();
        accessible(&c, "tokens").await;
        fill(&c, "token-name", "laptop").await;
        click(&c, Locator::Css("input[value='sites:read']")).await;
        click(&c, Locator::Css("form.stack button[type=submit]")).await;
        let token = c
            .wait()
            .for_element(Locator::Id("new-token"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(token.starts_with("cmnu_"), "{token}");
        shot(&c, "tokens").await;

        // On a phone-sized screen, the site page still fits.
        c.set_window_size(390, 844).await.unwrap();
        c.goto(&site).await.unwrap();
        accessible(&c, "site on a phone").await;
        shot(&c, "site-phone").await;
        c.set_window_size(1280, 1000).await.unwrap();

        // Log out: the console asks to log in again.
        click(&c, Locator::Css("header form button")).await;
        arrive(&c, "Log in").await;
        c.goto(&site).await.unwrap();
        arrive(&c, "Log in").await;
        c.close().await.unwrap();
    });

    // A form posted without the session's CSRF token is refused.
    let (code, head, _) = http_with_head(
        server.port,
        "POST",
        "/console/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"email=dana%40example.org&password=a+long+enough+password",
    )
    .unwrap();
    assert_eq!(code, 303);
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|v| v.split(';').next())
        .unwrap()
        .to_string();
    let (code, body) = http(
        server.port,
        "POST",
        "/console/tokens",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &cookie),
        ],
        b"csrf=forged&name=x&scope=sites%3Aread",
    )
    .unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
}

/// An app that shows who the gateway says the user is.
const WHO_APP: &str = r#"import base64, json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        jwt = self.headers.get("X-Commons-Identity") or ""
        sub = "nobody"
        if jwt:
            part = jwt.split(".")[1]
            sub = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))["sub"]
        body = f"<!doctype html><title>club</title><h1>Members</h1><p id=who>{sub}</p><p id=cookie>{self.headers.get('Cookie')}</p>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// In a real browser: a page that needs login sends the visitor through the
/// console's log-in and back, signed in at that site with a session of its
/// own (the app sees the user, never the platform's cookie); the console's
/// usage page then shows the visit, with its chart.
#[test]
fn a_browser_signs_in_at_a_site_through_the_console() {
    let s = Sandbox::new("console-site-sign-in");
    s.write("app.py", WHO_APP);
    s.blueprint(
        "name: club\ncomponents:\n  web:\n    process: python3 app.py\n    \
         health: { http: \"/\" }\n    route: { login: [/members] }\n",
    );
    s.ok(&["deploy"]);
    let server = s.serve(&[]);
    let user = signup(server.port, "erin@example.org", "Erin");
    let user_id = user["user"]["id"].as_str().unwrap().to_string();
    let driver = Driver::start(s.dir.join("chromium-profile"));
    let members = format!("http://club.localhost:{}/members", server.http);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;
        // To the site's private page: first the console's log-in.
        c.goto(&members).await.unwrap();
        arrive(&c, "Log in").await;
        fill(&c, "email", "erin@example.org").await;
        fill(&c, "password", "a long enough password").await;
        click(&c, Locator::Css("button[type=submit]")).await;
        // Back at the site, signed in there.
        arrive(&c, "Members").await;
        assert_eq!(c.current_url().await.unwrap().as_str(), members);
        assert_eq!(text_of(&c, Locator::Id("who")).await, user_id);
        let cookie = text_of(&c, Locator::Id("cookie")).await;
        assert!(!cookie.contains("commons_session"), "{cookie}");
        shot(&c, "site-signed-in").await;
        // The site's session cookie is its host's alone and not readable
        // by the page.
        let visible = c.execute("return document.cookie", vec![]).await.unwrap();
        assert!(
            !visible.to_string().contains("commons_session"),
            "{visible}"
        );

        // The console shows the visit among this period's usage.
        let usage = format!("http://127.0.0.1:{}/console/usage", server.port);
        reload_until(&c, &usage, "club").await;
        accessible(&c, "usage").await;
        shot(&c, "usage").await;
        c.close().await.unwrap();
    });
}
