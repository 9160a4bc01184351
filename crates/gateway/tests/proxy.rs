//! The gateway in front of real HTTP servers on loopback: routing, header
//! hygiene, identity, HTTP/2, WebSocket, limits, slow clients, wake-up,
//! passive health, graceful shutdown and the usage tap.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use commons_gateway::{identity, Config, User};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_longest_path_prefix() {
    let gw = gateway(Config::default()).await;
    let (blog, api, shop) = (
        upstream("blog").await,
        upstream("api").await,
        upstream("shop").await,
    );
    gw.gateway.set_routes(vec![
        route("blog.localhost", "/", "blog", &[blog]),
        route("blog.localhost", "/api", "blog-api", &[api]),
        route("shop.localhost", "/", "shop", &[shop]),
    ]);
    let server = |g: &Got| g.json()["server"].as_str().unwrap().to_string();
    assert_eq!(
        server(&get(gw.http, "blog.localhost", "/post/1").await),
        "blog"
    );
    assert_eq!(
        server(&get(gw.http, "blog.localhost", "/api/users").await),
        "api"
    );
    assert_eq!(
        server(&get(gw.http, "blog.localhost", "/apiary").await),
        "blog"
    );
    assert_eq!(
        server(&get(gw.http, "Shop.Localhost:8080", "/").await),
        "shop"
    );
    let missing = get(gw.http, "nobody.localhost", "/").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.headers["content-type"], "application/problem+json");
    assert!(missing.json()["detail"]
        .as_str()
        .unwrap()
        .contains("nobody.localhost"));
    // The path and query reach the app as sent.
    let q = get(gw.http, "blog.localhost", "/search?q=a%20b").await;
    assert_eq!(q.json()["path"], "/search");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_are_stripped_and_forwarding_is_stated() {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    gw.gateway
        .set_routes(vec![route("app.localhost", "/", "app", &[app])]);
    let got = request(
        gw.http,
        "GET",
        "app.localhost",
        "/",
        &[
            (
                "x-commons-identity",
                "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
            ),
            ("x-commons-user", "admin"),
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("cookie", "theme=dark; commons_session=not-a-session"),
            ("authorization", "Bearer app-own-token"),
        ],
        Bytes::new(),
    )
    .await;
    let h = &got.json()["headers"];
    assert!(h.get("x-commons-identity").is_none(), "{h}");
    assert!(h.get("x-commons-user").is_none(), "{h}");
    assert!(h.get("x-real-ip").is_none(), "{h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "app.localhost");
    assert_eq!(
        h["forwarded"],
        "for=127.0.0.1;proto=http;host=\"app.localhost\""
    );
    // The platform cookie never reaches the app; its own cookie and token do.
    assert_eq!(h["cookie"], "theme=dark");
    assert_eq!(h["authorization"], "Bearer app-own-token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_yields_an_assertion_the_app_verifies_with_the_jwks() {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    let mut admin_route = route("app.localhost", "/admin", "app", &[app]);
    admin_route.login = vec!["/admin".into()];
    gw.gateway.set_routes(vec![
        route("app.localhost", "/", "app", &[app]),
        admin_route,
    ]);
    gw.hooks.sessions.lock().unwrap().insert(
        "sess-123".into(),
        User {
            id: "user-7".into(),
            tier: "supporter".into(),
            only_host: None,
        },
    );
    // The app fetches the key the way any JWT library would.
    let jwks = get(gw.http, "app.localhost", identity::JWKS_PATH)
        .await
        .json();
    let x = jwks["keys"][0]["x"].as_str().unwrap();
    use base64::Engine as _;
    let x: [u8; 32] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(x)
        .unwrap()
        .try_into()
        .unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&x).unwrap();
    let now = commons_clock::now_secs();

    let got = request(
        gw.http,
        "GET",
        "app.localhost",
        "/admin/settings",
        &[("cookie", "commons_session=sess-123; lang=en")],
        Bytes::new(),
    )
    .await;
    assert_eq!(got.status, 200);
    let h = &got.json()["headers"];
    assert_eq!(h["cookie"], "lang=en");
    let claims = identity::verify(&key, h["x-commons-identity"].as_str().unwrap(), now).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.tier.as_str()),
        ("user-7", "supporter")
    );
    assert_eq!(claims.aud, "app");
    assert!(claims.exp > now && claims.exp <= now + 61);

    // A platform bearer token works too, and does not reach the app.
    let by_token = request(
        gw.http,
        "GET",
        "app.localhost",
        "/",
        &[("authorization", "Bearer sess-123")],
        Bytes::new(),
    )
    .await
    .json();
    assert!(by_token["headers"].get("authorization").is_none());
    assert!(by_token["headers"].get("x-commons-identity").is_some());

    // Anonymous: no assertion, and login-only paths answer 401.
    let anon = get(gw.http, "app.localhost", "/").await.json();
    assert!(anon["headers"].get("x-commons-identity").is_none());
    let denied = get(gw.http, "app.localhost", "/admin").await;
    assert_eq!(denied.status, 401);
    assert!(denied.headers.contains_key("www-authenticate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosted_service_calling_another_carries_the_user_as_indirect_usage() {
    let gw = gateway(Config::default()).await;
    let (a, b) = (upstream("a").await, upstream("b").await);
    gw.gateway.set_routes(vec![
        route("a.localhost", "/", "site-a", &[a]),
        route("b.localhost", "/", "site-b", &[b]),
    ]);
    gw.hooks.sessions.lock().unwrap().insert(
        "s".into(),
        User {
            id: "u1".into(),
            tier: "free".into(),
            only_host: None,
        },
    );
    let at_a = request(
        gw.http,
        "GET",
        "a.localhost",
        "/",
        &[("cookie", "commons_session=s")],
        Bytes::new(),
    )
    .await
    .json();
    let assertion = at_a["headers"]["x-commons-identity"]
        .as_str()
        .unwrap()
        .to_string();
    gw.hooks
        .services
        .lock()
        .unwrap()
        .insert("svc-a".into(), "site-a".into());
    // Site A calls site B with the assertion it was given, proving it is A.
    let at_b = request(
        gw.http,
        "GET",
        "b.localhost",
        "/",
        &[
            ("x-commons-identity", &assertion),
            ("x-commons-service", "svc-a"),
        ],
        Bytes::new(),
    )
    .await
    .json();
    let now = commons_clock::now_secs();
    let claims = gw
        .gateway
        .signer
        .verify(at_b["headers"]["x-commons-identity"].as_str().unwrap(), now)
        .unwrap();
    assert_eq!((claims.sub.as_str(), claims.aud.as_str()), ("u1", "site-b"));
    assert_eq!(claims.via.as_deref(), Some("site-a"));
    gw.events.wait_for(2).await;
    let events = gw.events.0.lock().unwrap().clone();
    let b_event = events.iter().find(|e| e.data["site"] == "site-b").unwrap();
    assert_eq!(b_event.data["user"], "u1");
    assert_eq!(b_event.data["via"], "site-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_reaches_an_http1_app() {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    gw.gateway
        .set_routes(vec![route("app.localhost", "/", "app", &[app])]);
    let cert = gw.gateway.certs.resolve_host("app.localhost").unwrap().cert[0].clone();
    let tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
    let tls = tls_client(std::slice::from_ref(&cert), &[b"h2", b"http/1.1"])
        .connect("app.localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Several streams at once on the one connection.
    let mut pending = Vec::new();
    for i in 0..5 {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("https://app.localhost/upload/{i}"))
            .body(Full::new(Bytes::from(vec![b'x'; 1000 * (i + 1)])))
            .unwrap();
        pending.push(sender.send_request(req));
    }
    for (i, p) in pending.into_iter().enumerate() {
        let resp = p.await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["path"], format!("/upload/{i}"));
        assert_eq!(json["body_len"], 1000 * (i + 1));
        assert_eq!(json["headers"]["host"], "app.localhost");
        assert_eq!(json["headers"]["x-forwarded-proto"], "https");
    }
    // A name with no certificate gets no handshake (nothing leaks).
    let tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
    let refused = tls_client(std::slice::from_ref(&cert), &[b"h2"])
        .connect("example.com".try_into().unwrap(), tcp)
        .await;
    assert!(refused.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through_both_ways() {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    gw.gateway
        .set_routes(vec![route("app.localhost", "/", "app", &[app])]);
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    let mut sent = 0;
    for msg in [&b"hello"[..], &b"\x81\x05frame"[..], &[0u8; 4096][..]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
        sent += msg.len() as u64;
    }
    // Once the tunnel closes, its traffic is the request's usage, each way.
    drop(s);
    assert_eq!(gw.events.wait_for(1).await, 1);
    let events = gw.events.0.lock().unwrap().clone();
    assert_eq!(events[0].data["status"], 101, "{events:?}");
    assert_eq!(events[0].data["bytes_in"], sent, "{events:?}");
    assert_eq!(events[0].data["bytes_out"], sent, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_refused_and_large_ones_stream() {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    let mut small = route("small.localhost", "/", "small", &[app]);
    small.max_body = Some(1000);
    gw.gateway
        .set_routes(vec![small, route("app.localhost", "/", "app", &[app])]);
    let big = Bytes::from(vec![b'x'; 2000]);
    let refused = request(gw.http, "POST", "small.localhost", "/", &[], big.clone()).await;
    assert_eq!(refused.status, 413);
    assert!(refused.json()["detail"]
        .as_str()
        .unwrap()
        .contains("1000 bytes"));
    // Chunked (no length up front): cut off at the limit too.
    let stream = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let chunks = futures_stream(vec![Bytes::from(vec![b'y'; 600]); 4]);
    let req = http::Request::builder()
        .method("POST")
        .uri("/")
        .header("host", "small.localhost")
        .body(chunks)
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    // 8 MiB streams through.
    let large = Bytes::from(vec![b'z'; 8 << 20]);
    let ok = request(gw.http, "POST", "app.localhost", "/", &[], large).await;
    assert_eq!(ok.json()["body_len"], 8 << 20);
}

/// A body sent as separate chunks with no Content-Length.
fn futures_stream(chunks: Vec<Bytes>) -> http_body_util::StreamBody<tokio_stream_like::Chunks> {
    http_body_util::StreamBody::new(tokio_stream_like::Chunks(chunks.into()))
}

mod tokio_stream_like {
    use bytes::Bytes;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct Chunks(pub VecDeque<Bytes>);

    impl futures_core::Stream for Chunks {
        type Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_cannot_hold_the_gateway() {
    let gw = gateway_with_app(Config {
        header_timeout: Duration::from_millis(500),
        ..Config::default()
    })
    .await;
    // Many slowloris connections: a request head, or a body, trickling in.
    let mut slow = Vec::new();
    for i in 0..50 {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        let start: &[u8] = if i % 2 == 0 {
            b"GET / HTTP/1.1\r\nHost: app.localhost\r\nX-A: "
        } else {
            b"POST / HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 100\r\n\r\nabc"
        };
        s.write_all(start).await.unwrap();
        slow.push(s);
    }
    // Others are served meanwhile.
    let t = Instant::now();
    assert_eq!(get(gw.http, "app.localhost", "/").await.status, 200);
    assert!(t.elapsed() < Duration::from_millis(400));
    // And the slow ones are cut off once the head is overdue.
    for mut s in slow {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                let _ = s.write_all(b"a").await;
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a slow client kept its connection");
    }
    // A request whose body never came whole is usage too: 408.
    gw.events.wait_for(26).await;
    assert_eq!(gw.events.requests_by_status().get(&408), Some(&25));
    assert_eq!(
        gw.gateway
            .metrics
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_site_is_woken_and_the_request_held_until_it_is_healthy() {
    let gw = gateway(Config {
        wake_timeout: Duration::from_secs(5),
        ..Config::default()
    })
    .await;
    let mut idle = route("sleepy.localhost", "/", "sleepy", &[]);
    idle.idle = true;
    gw.gateway.set_routes(vec![idle]);
    let gw_ref = gw.gateway.clone();
    *gw.hooks.wake.lock().unwrap() = Some(Arc::new(move |_site: String| {
        let gw_ref = gw_ref.clone();
        Box::pin(async move {
            // Starting takes a while, as a real process does.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let addr = upstream("sleepy").await;
            gw_ref.set_routes(vec![route("sleepy.localhost", "/", "sleepy", &[addr])]);
            Ok(())
        })
    }));
    // Several requests arrive while it sleeps: one wake, all served.
    let mut all = Vec::new();
    for _ in 0..5 {
        all.push(tokio::spawn(get(gw.http, "sleepy.localhost", "/")));
    }
    for r in all {
        let got = r.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.json()["server"], "sleepy");
    }
    assert_eq!(gw.hooks.wakes.lock().unwrap().len(), 1);

    // A site that does not come up in time: 503 with Retry-After.
    let gw2 = gateway(Config {
        wake_timeout: Duration::from_millis(300),
        ..Config::default()
    })
    .await;
    let mut stuck = route("stuck.localhost", "/", "stuck", &[]);
    stuck.idle = true;
    gw2.gateway.set_routes(vec![stuck]);
    *gw2.hooks.wake.lock().unwrap() = Some(Arc::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
    }));
    let t = Instant::now();
    let got = get(gw2.http, "stuck.localhost", "/").await;
    assert_eq!(got.status, 503);
    assert!(got.headers.contains_key("retry-after"));
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_load_and_a_dead_one_is_skipped() {
    let gw = gateway(Config::default()).await;
    let (a, b) = (upstream("a").await, upstream("b").await);
    // A port nobody listens on: a replica that died.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    gw.gateway
        .set_routes(vec![route("app.localhost", "/", "app", &[a, dead, b])]);
    let mut seen = std::collections::HashMap::new();
    for _ in 0..30 {
        let got = get(gw.http, "app.localhost", "/").await;
        assert_eq!(got.status, 200, "{:?}", got.body);
        *seen
            .entry(got.json()["server"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert!(seen["a"] >= 10 && seen["b"] >= 10, "{seen:?}");
    let errors = gw
        .gateway
        .metrics
        .upstream_connect_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (1..=3).contains(&errors),
        "the dead replica was tried {errors} times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests() {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    gw.gateway
        .set_routes(vec![route("app.localhost", "/", "app", &[app])]);
    let slow = tokio::spawn(get(gw.http, "app.localhost", "/sleep/500"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.gateway.shutdown();
    let got = slow.await.unwrap();
    assert_eq!(got.status, 200);
    // New connections are no longer accepted.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio::net::TcpStream::connect(gw.http).await;
    assert!(refused.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_yields_exactly_one_usage_event() {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    let mut r = route("app.localhost", "/", "app", &[app]);
    r.max_body = Some(10);
    gw.gateway.set_routes(vec![r]);
    let mut sent = 0u64;
    for i in 0..200 {
        let body = if i % 10 == 0 {
            Bytes::from_static(b"far too long a body")
        } else {
            Bytes::new()
        };
        request(gw.http, "POST", "app.localhost", "/", &[], body).await;
        sent += 1;
    }
    // Requests to unknown hosts are not any site's usage.
    get(gw.http, "nobody.localhost", "/").await;
    assert_eq!(gw.events.wait_for(sent).await, sent);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let by_status = gw.events.requests_by_status();
    assert_eq!(by_status.get(&200), Some(&180));
    assert_eq!(by_status.get(&413), Some(&20));
    let events = gw.events.0.lock().unwrap().clone();
    let e = &events[0];
    assert_eq!(e.kind, "request");
    for field in [
        "site",
        "operator",
        "node",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
    ] {
        assert!(
            e.data.contains_key(field),
            "{field} missing from {:?}",
            e.data
        );
    }
    assert_eq!(e.data["operator"], "op-1");
    let ids: std::collections::HashSet<_> = events.iter().map(|e| &e.id).collect();
    assert_eq!(ids.len(), events.len(), "event ids are unique");
    // The metrics agree.
    let metrics = get(gw.admin, "admin", "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("commons_gateway_site_requests_total{site=\"app\"} 200"),
        "{text}"
    );
    assert!(
        text.contains("commons_gateway_usage_lost_total 0"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_app_does_not_close_client_connections() {
    let gw = gateway(Config::default()).await;
    // An HTTP/1.0 server: answers, then closes, as python's http.server does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let old = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    gw.gateway
        .set_routes(vec![route("old.localhost", "/", "old", &[old])]);
    let stream = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        sender
            .ready()
            .await
            .expect("the client connection stays open");
        let req = http::Request::builder()
            .uri("/")
            .header("host", "old.localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_11);
        assert!(resp.headers().get("connection").is_none());
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
    }
    assert_eq!(
        gw.gateway
            .metrics
            .connections_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_whose_upstream_vanished_is_woken_and_the_request_served() {
    let gw = gateway(Config::default()).await;
    // The table still names an instance that was just stopped.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    gw.gateway
        .set_routes(vec![route("lazy.localhost", "/", "lazy", &[gone])]);
    let gw_ref = gw.gateway.clone();
    *gw.hooks.wake.lock().unwrap() = Some(Arc::new(move |_site: String| {
        let gw_ref = gw_ref.clone();
        Box::pin(async move {
            let addr = upstream("lazy").await;
            gw_ref.set_routes(vec![route("lazy.localhost", "/", "lazy", &[addr])]);
            Ok(())
        })
    }));
    let got = get(gw.http, "lazy.localhost", "/").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.json()["server"], "lazy");
    assert_eq!(gw.hooks.wakes.lock().unwrap().len(), 1);
}

/// An HTTP/1.1 app written by hand, so every framing is exercised exactly:
/// chunked, by length, none (HEAD, 204), and a connection it closes after
/// each answer. Counts the connections it accepted.
/// 300,000 bytes, each a function of its position: a byte lost, doubled or
/// moved shows.
fn big_body() -> Vec<u8> {
    (0..300_000u32).map(|i| (i % 251) as u8).collect()
}

fn big_answer() -> Vec<u8> {
    let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n".to_vec();
    answer.extend_from_slice(&big_body());
    answer
}

async fn framing_app() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut pending = Vec::new();
                loop {
                    let mut buf = [0u8; 4096];
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&pending[..end]).to_string();
                        pending.drain(..end + 4);
                        let line = head.lines().next().unwrap_or("");
                        let path = line.split(' ').nth(1).unwrap_or("/");
                        let big = big_answer();
                        let answer: &[u8] = match path {
                            // Far more than one read of the gateway's.
                            "/big" => &big,
                            // Chunks split across writes, with an extension and a trailer.
                            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n7\r\n, world\r\n0\r\nX-T: 1\r\n\r\n",
                            "/length" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                            "/none" => b"HTTP/1.1 204 No Content\r\n\r\n",
                            "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                            "/close" => b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye",
                            // Closes without saying so (a keep-alive timeout).
                            "/drop" => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngone",
                            _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                        };
                        // A HEAD answer has the head only.
                        let answer = if line.starts_with("HEAD ") {
                            let end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                            &answer[..end + 4]
                        } else {
                            answer
                        };
                        let (first, rest) = answer.split_at(answer.len() / 2);
                        if s.write_all(first).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        if s.write_all(rest).await.is_err() || path == "/close" || path == "/drop" {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_requests_keep_every_framing_and_reuse_upstream_connections() {
    let gw = gateway(Config::default()).await;
    let (app, accepted) = framing_app().await;
    gw.gateway
        .set_routes(vec![route("frames.localhost", "/", "frames", &[app])]);
    for _ in 0..20 {
        let got = get(gw.http, "frames.localhost", "/chunked").await;
        assert_eq!(
            (got.status, std::str::from_utf8(&got.body).unwrap()),
            (200, "hello, world")
        );
        let got = get(gw.http, "frames.localhost", "/length").await;
        assert_eq!(
            (got.status, std::str::from_utf8(&got.body).unwrap()),
            (200, "hello")
        );
        let got = get(gw.http, "frames.localhost", "/none").await;
        assert_eq!(
            (got.status, std::str::from_utf8(&got.body).unwrap()),
            (204, "")
        );
        let got = get(gw.http, "frames.localhost", "/early").await;
        assert_eq!(
            (got.status, std::str::from_utf8(&got.body).unwrap()),
            (200, "ok")
        );
    }
    let got = get(gw.http, "frames.localhost", "/big").await;
    assert_eq!(got.status, 200);
    assert!(
        got.body[..] == big_body()[..],
        "the large body arrived altered"
    );
    // Sequential requests share one upstream connection.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

    // HEAD: the length is told, no body follows, the connection is reused.
    let got = request(
        gw.http,
        "HEAD",
        "frames.localhost",
        "/length",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers.get("content-length").unwrap(), "5");
    assert!(got.body.is_empty());
    assert_eq!(
        &get(gw.http, "frames.localhost", "/length").await.body[..],
        b"hello"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

    // An app that closes after answering: the pooled connection is found
    // closed and a new one made, without a failed request.
    for _ in 0..5 {
        let got = get(gw.http, "frames.localhost", "/close").await;
        assert_eq!(
            (got.status, std::str::from_utf8(&got.body).unwrap()),
            (200, "bye")
        );
    }
    let got = get(gw.http, "frames.localhost", "/length").await;
    assert_eq!(
        (got.status, std::str::from_utf8(&got.body).unwrap()),
        (200, "hello")
    );
    // The first `/close` went on the pooled connection, the other four and
    // the last request each on a new one: none was reused after a close.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 6);

    // Closed while pooled, unannounced: found stale (or, if the close is
    // not seen yet, sent again on a new connection), never a failure.
    for _ in 0..10 {
        let got = get(gw.http, "frames.localhost", "/drop").await;
        assert_eq!(
            (got.status, std::str::from_utf8(&got.body).unwrap()),
            (200, "gone")
        );
        let got = get(gw.http, "frames.localhost", "/length").await;
        assert_eq!(
            (got.status, std::str::from_utf8(&got.body).unwrap()),
            (200, "hello")
        );
    }
}

/// Reads one response off a raw connection (framed by Content-Length; no
/// body for HEAD): status, head, body. What is read past it stays in `buf`.
async fn read_response(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> (u16, String, Vec<u8>) {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole head: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let length = if head_request { 0 } else { length };
    while buf.len() < end + length {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[end..end + length].to_vec();
    buf.drain(..end + length);
    (status, head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_serves_pipelined_requests_and_small_bodies_and_hands_over_to_hyper_for_large_ones(
) {
    let gw = gateway_with_app(Config {
        max_header_bytes: 8192,
        ..Config::default()
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let mut buf = Vec::new();
    // Two requests in one write: the gateway's own server takes both.
    s.write_all(
        b"GET /a?x=1 HTTP/1.1\r\nHost: app.localhost\r\n\
          Cookie: a=1; commons_session=not-a-session; b=2\r\nX-Commons-User: mallory\r\n\
          Connection: keep-alive, x-hop\r\nX-Hop: 1\r\n\r\n\
          HEAD /b HTTP/1.1\r\nHost: App.Localhost:80\r\n\r\n",
    )
    .await
    .unwrap();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["path"], "/a");
    let headers = &seen["headers"];
    assert_eq!(headers["cookie"], "a=1; b=2", "{headers}");
    assert!(headers.get("x-commons-user").is_none(), "{headers}");
    assert!(headers.get("x-hop").is_none(), "{headers}");
    assert!(headers.get("x-commons-identity").is_none(), "{headers}");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    let (status, head, body) = read_response(&mut s, &mut buf, true).await;
    assert_eq!(status, 200, "{head}");
    assert!(body.is_empty());
    assert!(
        head.to_ascii_lowercase().contains("content-length:"),
        "{head}"
    );
    let metric = |m: &std::sync::atomic::AtomicU64| m.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(metric(&gw.gateway.metrics.connections_handed_over), 0);
    // Small bodies are read whole and served here too, whether they come
    // with their head or after it, in pieces.
    s.write_all(b"POST /c HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (seen["method"].as_str(), seen["body_sum"].as_u64()),
        (Some("POST"), Some(body_sum(b"hello")))
    );
    // A client that waits for `100 Continue` gets it from the gateway; the
    // app gets the body whole and is not asked.
    s.write_all(
        b"POST /g HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 7\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let (status, _, _) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 100);
    s.write_all(b"go on!!").await.unwrap();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body_sum"].as_u64(), Some(body_sum(b"go on!!")));
    assert!(seen["headers"].get("expect").is_none(), "{seen}");
    let whole: Vec<u8> = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
    s.write_all(
        format!(
            "PUT /e HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: {}\r\n\r\n",
            whole.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for piece in whole.chunks(5000) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(piece).await.unwrap();
    }
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (seen["method"].as_str(), seen["body_len"].as_u64()),
        (Some("PUT"), Some(whole.len() as u64))
    );
    assert_eq!(seen["body_sum"].as_u64(), Some(body_sum(&whole)));
    assert_eq!(metric(&gw.gateway.metrics.connections_handed_over), 0);
    // A larger body: hyper streams it, and serves the connection from here
    // on.
    let larger = [whole.as_slice(), b"!"].concat();
    s.write_all(
        format!(
            "POST /f HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: {}\r\n\r\n",
            larger.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&larger).await.unwrap();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body_sum"].as_u64(), Some(body_sum(&larger)));
    s.write_all(b"GET /d HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["path"],
        "/d"
    );
    let connections = || {
        gw.gateway
            .metrics
            .connections_total
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(connections(), 1);
    assert_eq!(metric(&gw.gateway.metrics.connections_handed_over), 1);
    // Each request's body is its usage in.
    assert_eq!(gw.events.wait_for(7).await, 7);
    let bytes_in: u64 = gw
        .events
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.data["bytes_in"].as_u64().unwrap())
        .sum();
    assert_eq!(bytes_in, 5 + 7 + whole.len() as u64 + larger.len() as u64);

    // `Connection: close` is honoured: the answer says so, then the
    // connection ends.
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest))
        .await
        .expect("the gateway closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // A head over the limit is refused (431), whoever serves it.
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let mut buf = Vec::new();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: app.localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let (status, _, _) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 431);
    // Also when it arrives whole, in one read.
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let mut buf = Vec::new();
    let whole = format!(
        "GET / HTTP/1.1\r\nHost: app.localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8200)
    );
    let _ = s.write_all(whole.as_bytes()).await;
    let (status, _, _) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 431);

    // Every request above was metered once (the 431 never reached a site).
    assert_eq!(gw.events.wait_for(8).await, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_gets_a_504_and_the_connection_goes_on() {
    let gw = gateway_with_app(Config {
        upstream_timeout: Duration::from_millis(300),
        ..Config::default()
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let mut buf = Vec::new();
    // Quick answers first, so the connection's deadline has moved on a few
    // times before one is reached.
    for _ in 0..3 {
        s.write_all(b"GET /sleep/100 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut s, &mut buf, false).await.0, 200);
    }
    let t = Instant::now();
    s.write_all(b"GET /sleep/2000 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500),
        "answered after {waited:?}"
    );
    // The client's connection is still good.
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.0, 200);
    assert_eq!(
        gw.gateway
            .metrics
            .upstream_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_may_have_been_acted_on_is_not_sent_twice() {
    // An upstream that reads each request and closes without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).await.unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let line = String::from_utf8_lossy(&head);
                log.lock()
                    .unwrap()
                    .push(line.split(' ').next().unwrap_or("").to_string());
            });
        }
    });
    let gw = gateway(Config::default()).await;
    gw.gateway
        .set_routes(vec![route("app.localhost", "/", "app", &[app])]);
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"POST / HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut s, &mut buf, false).await;
    assert_eq!(status, 502);
    assert_eq!(*seen.lock().unwrap(), ["POST"], "sent once only");
    // A GET may be repeated: it is tried again before the gateway gives up.
    seen.lock().unwrap().clear();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut s, &mut buf, false).await;
    assert!(status >= 500, "{status}");
    let gets = seen.lock().unwrap().len();
    assert!(gets > 1, "a GET was tried {gets} time(s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_sets_its_own_header_limit_and_response_time() {
    let gw = gateway(Config::default()).await;
    let app = upstream("app").await;
    let mut strict = route("strict.localhost", "/", "strict", &[app]);
    strict.max_header = Some(1024);
    strict.response_timeout_ms = Some(200);
    gw.gateway
        .set_routes(vec![strict, route("app.localhost", "/", "app", &[app])]);
    let big = "b".repeat(2000);
    let got = request(
        gw.http,
        "GET",
        "strict.localhost",
        "/",
        &[("x-big", &big)],
        Bytes::new(),
    )
    .await;
    assert_eq!(got.status, 431);
    assert!(got.json()["detail"]
        .as_str()
        .unwrap()
        .contains("1024 bytes"));
    let got = request(
        gw.http,
        "GET",
        "app.localhost",
        "/",
        &[("x-big", &big)],
        Bytes::new(),
    )
    .await;
    assert_eq!(got.status, 200, "the gateway's own limit is higher");
    // Bodiless, and with a body streamed by hyper: 504 at the site's limit.
    let large = Bytes::from(vec![b'x'; 64 << 10]);
    for (method, body) in [("GET", Bytes::new()), ("POST", large.clone())] {
        let t = Instant::now();
        let got = request(
            gw.http,
            method,
            "strict.localhost",
            "/sleep/1500",
            &[],
            body,
        )
        .await;
        assert_eq!(got.status, 504, "{method}");
        assert!(t.elapsed() < Duration::from_millis(1200), "{method}");
    }
    let got = request(gw.http, "POST", "app.localhost", "/sleep/500", &[], large).await;
    assert_eq!(got.status, 200, "other sites keep the gateway's timeout");
}

/// A platform slow to recognise one credential does not hold up anyone
/// else: the look-up runs off the event loop (here the only thread).
#[tokio::test(flavor = "current_thread")]
async fn a_slow_credential_lookup_delays_nobody_else() {
    let gw = gateway_with_app(Config::default()).await;
    gw.hooks.sessions.lock().unwrap().insert(
        "fast".into(),
        User {
            id: "ann".into(),
            tier: "free".into(),
            only_host: None,
        },
    );
    let signed_in = || {
        request(
            gw.http,
            "GET",
            "app.localhost",
            "/",
            &[("cookie", "commons_session=fast")],
            Bytes::new(),
        )
    };
    assert_eq!(signed_in().await.status, 200);
    let slow = tokio::spawn(request(
        gw.http,
        "GET",
        "app.localhost",
        "/",
        &[("cookie", "commons_session=slow-1")],
        Bytes::new(),
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(signed_in().await.status, 200);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1000), "others waited {took:?}");
    assert!(!slow.is_finished(), "the slow look-up was not slow");
    assert_eq!(slow.await.unwrap().status, 200);
}
