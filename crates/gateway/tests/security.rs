//! The gateway under attack: each test performs one attack a red-team pass
//! found (issue 21's numbers in brackets) against a real gateway on
//! loopback, over raw HTTP/1.1 (its own server and hyper's) and HTTP/2, and
//! asserts that it fails. The platform-level attacks (sign-in, hosts,
//! tokens, the API) are in `crates/cli/tests/security.rs`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use commons_gateway::{identity, Config, User};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` as is on a new connection and reads until the gateway
/// closes it: (status, head, body).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

fn user(id: &str) -> User {
    User {
        id: id.into(),
        tier: "free".into(),
        only_host: None,
    }
}

/// A gateway with `app.localhost` whose `/private` needs login, in front of
/// the echoing upstream.
async fn private_site() -> Running {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    let mut r = route("app.localhost", "/", "app", &[app]);
    r.login = vec!["/private".into()];
    gw.gateway.set_routes(vec![r]);
    gw
}

/// [4] Every spelling of a login path needs login, or is refused: over the
/// gateway's own HTTP/1.1 server, over hyper's (a chunked body hands the
/// connection over), and over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_paths_hold_however_the_path_is_spelled() {
    let gw = private_site().await;
    let spellings = [
        "/private",
        "/%70rivate",
        "/./private",
        "//private",
        "/private%2f",
        "/public/../private",
        "/x/..%2fprivate",
        "/%2e/private",
        "/private;x",
        "/PRIVATE/../private",
        "/%2E%2E/private",
        "/private%2Fx",
        "/priv%61te/",
    ];
    for path in spellings {
        for body in [false, true] {
            let request = if body {
                format!(
                    "POST {path} HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\
                     Connection: close\r\n\r\n1\r\nx\r\n0\r\n\r\n"
                )
            } else {
                format!("GET {path} HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n")
            };
            let (status, _, answer) = raw(gw.http, request.as_bytes()).await;
            assert!(
                status == 401 || status == 400,
                "{path} (body: {body}) reached the app: {status} {answer}"
            );
        }
    }
    // Over HTTP/2.
    let cert = gw.gateway.certs.resolve_host("app.localhost").unwrap().cert[0].clone();
    let tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
    let tls = tls_client(std::slice::from_ref(&cert), &[b"h2"])
        .connect("app.localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for path in spellings {
        let req = http::Request::builder()
            .uri(format!("https://app.localhost{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let status = sender.send_request(req).await.unwrap().status();
        assert!(
            status == 401 || status == 400,
            "{path} over HTTP/2 reached the app: {status}"
        );
    }
    // The plain path still reaches the app, and the app reads the
    // canonical path it was routed by.
    let ok = get(gw.http, "app.localhost", "/public/../open/%7Euser").await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["path"], "/open/~user");
}

/// [3] An assertion is not a credential a client can bring: replayed at
/// another site it signs nobody in; only the service it was made for, proving
/// who it is, may call on the user's behalf, and never for longer than the
/// assertion it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_assertions_cannot_be_replayed_or_renewed() {
    let gw = gateway(Config::default()).await;
    let (a, b) = (upstream("a").await, upstream("b").await);
    let mut private_b = route("b.localhost", "/private", "site-b", &[b]);
    private_b.login = vec!["/private".into()];
    gw.gateway.set_routes(vec![
        route("a.localhost", "/", "site-a", &[a]),
        route("b.localhost", "/", "site-b", &[b]),
        private_b,
    ]);
    gw.hooks
        .sessions
        .lock()
        .unwrap()
        .insert("bob-session".into(), user("bob"));
    {
        let mut services = gw.hooks.services.lock().unwrap();
        services.insert("svc-a".into(), "site-a".into());
        services.insert("svc-b".into(), "site-b".into());
    }
    let at_a = request(
        gw.http,
        "GET",
        "a.localhost",
        "/",
        &[("cookie", "commons_session=bob-session")],
        Bytes::new(),
    )
    .await
    .json();
    let assertion = at_a["headers"]["x-commons-identity"]
        .as_str()
        .unwrap()
        .to_string();
    let now = commons_clock::now_secs();
    let original = gw.gateway.signer.verify(&assertion, now).unwrap();

    // A client replays it at B: nobody is signed in, and B never sees it.
    for extra in [None, Some("not-a-service"), Some("svc-b")] {
        let mut headers = vec![("x-commons-identity", assertion.as_str())];
        if let Some(s) = extra {
            headers.push(("x-commons-service", s));
        }
        let denied = request(
            gw.http,
            "GET",
            "b.localhost",
            "/private",
            &headers,
            Bytes::new(),
        )
        .await;
        assert_eq!(denied.status, 401, "with service {extra:?}");
        let open = request(gw.http, "GET", "b.localhost", "/", &headers, Bytes::new())
            .await
            .json();
        assert!(
            open["headers"].get("x-commons-identity").is_none(),
            "{open}"
        );
        assert!(open["headers"].get("x-commons-service").is_none(), "{open}");
    }
    // Spelled with underscores, it is dropped as well.
    let open = request(
        gw.http,
        "GET",
        "b.localhost",
        "/",
        &[("x_commons_identity", assertion.as_str())],
        Bytes::new(),
    )
    .await
    .json();
    assert!(
        open["headers"].get("x_commons_identity").is_none(),
        "{open}"
    );

    // A itself, with its service credential, calls B for bob.
    let delegated = request(
        gw.http,
        "GET",
        "b.localhost",
        "/private",
        &[
            ("x-commons-identity", assertion.as_str()),
            ("x-commons-service", "svc-a"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(delegated.status, 200);
    let at_b = delegated.json();
    let claims = gw
        .gateway
        .signer
        .verify(at_b["headers"]["x-commons-identity"].as_str().unwrap(), now)
        .unwrap();
    assert_eq!(
        (
            claims.sub.as_str(),
            claims.aud.as_str(),
            claims.via.as_deref()
        ),
        ("bob", "site-b", Some("site-a"))
    );
    // B sends that assertion back to A, as A would have: it is B's, and
    // B's credential does not make it A's. Nor does the chain outlive
    // the assertion it started from.
    assert!(
        claims.exp <= original.exp,
        "{claims:?} outlives {original:?}"
    );
    let bounced = request(
        gw.http,
        "GET",
        "a.localhost",
        "/",
        &[
            (
                "x-commons-identity",
                at_b["headers"]["x-commons-identity"].as_str().unwrap(),
            ),
            ("x-commons-service", "svc-a"),
        ],
        Bytes::new(),
    )
    .await
    .json();
    assert!(
        bounced["headers"].get("x-commons-identity").is_none(),
        "{bounced}"
    );

    // Bob's session ends: within the time the gateway trusts a credential
    // it looked up (30 s), the chain made from it ends too.
    gw.hooks.sessions.lock().unwrap().remove("bob-session");
    let delegated = || async {
        request(
            gw.http,
            "GET",
            "b.localhost",
            "/private",
            &[
                ("x-commons-identity", assertion.as_str()),
                ("x-commons-service", "svc-a"),
            ],
            Bytes::new(),
        )
        .await
        .status
    };
    let mut ended = false;
    for _ in 0..40 {
        if delegated().await == 401 {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(ended, "the chain outlived bob's session");

    // A forged assertion (another key) is nothing.
    let forged = identity::Signer::from_seed([1; 32]).sign(&original);
    let denied = request(
        gw.http,
        "GET",
        "b.localhost",
        "/private",
        &[
            ("x-commons-identity", forged.as_str()),
            ("x-commons-service", "svc-a"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(denied.status, 401);
}

/// [1] The gateway finishes only sign-ins it started: a `state` the
/// attacker made up is refused before any code is redeemed, and `to` never
/// leads off the site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_state_is_the_gateways_own_and_bound_to_the_host() {
    let gw = private_site().await;
    *gw.hooks.sign_in_at.lock().unwrap() = Some("http://console.test/site-sign-in".into());
    // A browser asking for the page is sent to sign in, with a state
    // cookie the gateway made.
    let (status, head, _) = raw(
        gw.http,
        b"GET /private HTTP/1.1\r\nHost: app.localhost\r\nAccept: text/html\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 303, "{head}");
    let state = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: commons_sign_in="))
        .and_then(|v| v.split(';').next())
        .expect("a state cookie")
        .to_string();

    let finish = |code: &str, state: &str, cookie: &str, to: &str| {
        format!(
            "GET /.commons/sign-in?code={code}&state={state}&to={to} HTTP/1.1\r\n\
             Host: app.localhost\r\nCookie: commons_sign_in={cookie}\r\nConnection: close\r\n\r\n"
        )
    };
    // The attacker's own state, in the cookie and the link alike.
    gw.hooks.codes.lock().unwrap().insert(
        "c1".into(),
        ("app.localhost".into(), "attacker".into(), "victim".into()),
    );
    let (status, head, _) = raw(
        gw.http,
        finish("c1", "attacker", "attacker", "/").as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{head}");
    assert!(!head.contains("commons_session="), "{head}");
    assert!(
        gw.hooks.codes.lock().unwrap().contains_key("c1"),
        "a made-up state must not spend the code"
    );
    // A state made for another host.
    let other = raw(
        gw.http,
        finish("c1", &state, &state, "/")
            .replace("app.localhost", "b.localhost")
            .as_bytes(),
    )
    .await;
    assert_ne!(other.0, 303);
    // `to` leading elsewhere, however it is spelled.
    for to in [
        "//evil.example",
        "/%09/evil.example",
        "/\\evil.example",
        "https://evil.example",
    ] {
        gw.hooks.codes.lock().unwrap().insert(
            "c2".into(),
            ("app.localhost".into(), state.clone(), "victim".into()),
        );
        let target = to.replace('\t', "%09");
        let (status, head, _) =
            raw(gw.http, finish("c2", &state, &state, &target).as_bytes()).await;
        assert_eq!(status, 400, "{to}: {head}");
    }
    // The real one works, once.
    gw.hooks.codes.lock().unwrap().insert(
        "c3".into(),
        ("app.localhost".into(), state.clone(), "site-cred".into()),
    );
    let (status, head, _) = raw(gw.http, finish("c3", &state, &state, "/private").as_bytes()).await;
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("commons_session=site-cred"), "{head}");
}

/// [7] A header spelled with underscores where dashes are expected does
/// not reach a CGI or WSGI app as the trusted user header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_header_cannot_be_spoofed_with_underscores() {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    let mut r = route("app.localhost", "/", "app", &[app]);
    r.user_header = Some("X-Remote-User".into());
    gw.gateway.set_routes(vec![r]);
    gw.hooks
        .sessions
        .lock()
        .unwrap()
        .insert("alice-session".into(), user("alice"));
    for spelling in ["X_Remote_User", "x_remote-user", "X-Remote_User"] {
        for body in [false, true] {
            let request = format!(
                "{} / HTTP/1.1\r\nHost: app.localhost\r\n{spelling}: admin\r\n\
                 Cookie: commons_session=alice-session\r\n{}Connection: close\r\n\r\n{}",
                if body { "POST" } else { "GET" },
                if body {
                    "Transfer-Encoding: chunked\r\n"
                } else {
                    ""
                },
                if body { "1\r\nx\r\n0\r\n\r\n" } else { "" },
            );
            let (status, _, answer) = raw(gw.http, request.as_bytes()).await;
            assert_eq!(status, 200, "{answer}");
            let seen: serde_json::Value =
                serde_json::from_str(answer.trim()).unwrap_or_else(|_| {
                    // A chunked answer: the JSON is the first chunk.
                    serde_json::from_str(answer.lines().nth(1).unwrap_or("")).unwrap()
                });
            let headers = seen["headers"].as_object().unwrap();
            assert_eq!(headers["x-remote-user"], "alice", "{spelling}: {seen}");
            assert!(
                !headers.keys().any(|k| k.contains('_')),
                "{spelling} reached the app: {seen}"
            );
        }
    }
}

/// An upstream that sets the cookies a test asks for in `?set=`.
async fn cookie_setter() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let query = req.uri().query().unwrap_or("").to_string();
                        let mut b = http::Response::builder();
                        for (k, v) in form_urlencoded_pairs(&query) {
                            if k == "set" {
                                b = b.header("set-cookie", v);
                            }
                        }
                        b = b.header("set-cookie", "theme=dark; Path=/");
                        Ok::<_, std::convert::Infallible>(
                            b.body(Full::new(Bytes::from("ok"))).unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            let v = v
                .replace("%20", " ")
                .replace("%3B", ";")
                .replace("%3D", "=");
            (k.to_string(), v)
        })
        .collect()
}

/// [8] An app cannot set the platform's cookies, however it spells them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_cannot_set_platform_cookies_by_any_spelling() {
    let gw = gateway(Config::default()).await;
    let app = cookie_setter().await;
    gw.gateway
        .set_routes(vec![route("app.localhost", "/", "app", &[app])]);
    for cookie in [
        "commons_session=x",
        "commons_session%20=x",
        "%20commons_session=x",
        "Commons_Session=x",
        "commons_session=x%3B%20Domain=localhost",
        "__Host-commons_session=x",
        "__Secure-commons_session=x",
        "commons_sign_in=x",
        "commons_sign_in%20%20=x",
    ] {
        for body in [false, true] {
            let request = format!(
                "{} /?set={cookie} HTTP/1.1\r\nHost: app.localhost\r\n{}Connection: close\r\n\r\n{}",
                if body { "POST" } else { "GET" },
                if body { "Content-Length: 1\r\n" } else { "" },
                if body { "x" } else { "" },
            );
            let (status, head, _) = raw(gw.http, request.as_bytes()).await;
            assert_eq!(status, 200, "{head}");
            let set: Vec<&str> = head
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
                .collect();
            assert!(
                set.iter().any(|l| l.contains("theme=dark")),
                "the app's own cookie goes through: {head}"
            );
            assert!(
                !set.iter()
                    .any(|l| l.to_ascii_lowercase().contains("commons_")),
                "{cookie} got through: {head}"
            );
        }
    }
}

/// [13] The upstream is told the host the request was routed by: never
/// the `Host` an absolute-form target overrides, never a malformed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_are_routed_and_stated_canonically() {
    let gw = gateway(Config::default()).await;
    let app = upstream("other").await;
    gw.gateway
        .set_routes(vec![route("other.localhost", "/", "other", &[app])]);
    let (status, _, body) = raw(
        gw.http,
        b"GET http://other.localhost/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    let h = &seen["headers"];
    assert_eq!(h["host"], "other.localhost", "{seen}");
    assert_eq!(h["x-forwarded-host"], "other.localhost", "{seen}");
    assert!(!h["forwarded"].as_str().unwrap().contains("evil"), "{seen}");
    assert_eq!(seen["path"], "/x");
    // Case and a trailing dot are the same host.
    let (status, _, body) = raw(
        gw.http,
        b"GET / HTTP/1.1\r\nHost: OTHER.localhost.\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["headers"]["host"], "other.localhost");
    // Over HTTP/2, `:authority` is the host, whatever `Host` says.
    let cert = gw
        .gateway
        .certs
        .resolve_host("other.localhost")
        .unwrap()
        .cert[0]
        .clone();
    let tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
    let tls = tls_client(std::slice::from_ref(&cert), &[b"h2"])
        .connect("other.localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("https://other.localhost/h2")
        .header("host", "evil.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["headers"]["host"], "other.localhost", "{seen}");
    assert_eq!(
        seen["headers"]["x-forwarded-host"], "other.localhost",
        "{seen}"
    );
    for host in [
        "other.localhost:@evil.example",
        "other.localhost:80x",
        "other.localhost evil",
    ] {
        let (status, _, body) = raw(
            gw.http,
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status, 400, "{host}: {body}");
    }
}

/// [14] The request head limit holds whatever the head's size beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_the_limit_are_refused_at_every_size() {
    let gw = gateway_with_app(Config::default()).await;
    for kib in [65, 80, 100, 119, 130] {
        let pad = "p".repeat(kib * 1024 - 200);
        let request = format!(
            "GET / HTTP/1.1\r\nHost: app.localhost\r\nX-Pad: {pad}\r\nConnection: close\r\n\r\n"
        );
        let (status, head, _) = raw(gw.http, request.as_bytes()).await;
        assert_eq!(status, 431, "{kib} KiB head: {head}");
    }
    // Just under it is fine.
    let pad = "p".repeat(60 * 1024);
    let request = format!(
        "GET / HTTP/1.1\r\nHost: app.localhost\r\nX-Pad: {pad}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw(gw.http, request.as_bytes()).await.0, 200);
}

/// [15] A malformed chunked body is the client's error (400), not the
/// site's (no 502, no site error counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_bodies_are_the_clients_error() {
    let gw = gateway_with_app(Config::default()).await;
    for chunk in [
        "FFFFFFFFFFFFFFFFF1\r\nx\r\n",
        "-5\r\nhello\r\n",
        "5\nhello\r\n0\r\n\r\n",
    ] {
        let request = format!(
            "POST / HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n{chunk}"
        );
        let (status, head, _) = raw(gw.http, request.as_bytes()).await;
        assert_eq!(status, 400, "{chunk:?} answered {status}: {head}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let metrics = request(gw.admin, "GET", "admin", "/metrics", &[], Bytes::new()).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("commons_gateway_site_errors_total{site=\"app\"} 0"),
        "{text}"
    );
}

/// [10] Made-up bearer tokens cost one platform look-up each, and one
/// repeated costs nothing more: the look-up is cached, negative answers
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_credentials_are_looked_up_once() {
    let gw = gateway_with_app(Config::default()).await;
    for _ in 0..50 {
        let r = request(
            gw.http,
            "GET",
            "app.localhost",
            "/",
            &[("authorization", "Bearer made-up")],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(gw.hooks.lookups.load(Ordering::Relaxed), 1);
    for i in 0..200 {
        let token = format!("Bearer random-{i}");
        request(
            gw.http,
            "GET",
            "app.localhost",
            "/",
            &[("authorization", &token)],
            Bytes::new(),
        )
        .await;
    }
    assert_eq!(gw.hooks.lookups.load(Ordering::Relaxed), 201);
}
