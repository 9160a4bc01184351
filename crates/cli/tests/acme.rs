//! Certificates shared by the gateways of two `commons serve` instances on
//! one PostgreSQL (as on two machines behind one address), from a real
//! ACME server (Debian's `pebble`). A host's certificate is ordered once,
//! by the instance holding its lease, whichever instance the first
//! handshake reached; the ACME server's HTTP-01 check may reach the other
//! instance, which answers it from the shared store (the bus's key-value
//! bucket in the scale-out pass, the database otherwise); both serve the
//! same certificate; and it is kept sealed, in the database only. Both
//! sign sites' identity assertions, and ID tokens, with one key each.

mod common;
#[path = "../../gateway/tests/common/pebble.rs"]
mod pebble;

use std::path::Path;
use std::process::Command;

use common::*;

const SITE: &str = r#"name: shop
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    route: { host: shop.example.test }
  wiki:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    route: { host: wiki.example.test }
"#;

/// The leaf certificate (PEM) `https_port` serves for `host`, verified
/// against `root`, by curl.
fn served_leaf(https_port: u16, host: &str, root: &Path) -> Result<String, String> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "90",
            "-w",
            "%{certs}",
        ])
        .arg("--resolve")
        .arg(format!("{host}:{https_port}:127.0.0.1"))
        .arg("--cacert")
        .arg(root)
        .arg(format!("https://{host}:{https_port}/"))
        .output()
        .expect("curl runs (scripts/test installs it)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .ok_or_else(|| format!("curl showed no certificate: {text}"))?;
    let end = text[start..]
        .find("-----END CERTIFICATE-----")
        .ok_or("a cut certificate")?;
    Ok(text[start..start + end].to_string())
}

#[test]
fn two_instances_order_a_hosts_certificate_once_and_both_serve_it_and_sign_alike() {
    pebble::require("pebble");
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("acme_shared_{}", std::process::id());
    let (one, two) = (Sandbox::new("acme-one"), Sandbox::new("acme-two"));
    let pebble_dir = one.dir.join("pebble");
    let directory_port = free_port();
    let directory = format!("https://127.0.0.1:{directory_port}/dir");
    let ca = pebble_dir.join("ca.pem");
    let env = [
        ("COMMONS_DATABASE_URL", url.as_str()),
        ("COMMONS_DATABASE_SCHEMA", schema.as_str()),
        // One bus name for both (used when the suite gives them a bus).
        ("COMMONS_BUS_NAME", schema.as_str()),
        ("COMMONS_ACME_DIRECTORY", directory.as_str()),
        ("COMMONS_ACME_ROOT", ca.to_str().unwrap()),
    ];
    one.blueprint(SITE);
    let mut deploy = one.cmd(&["deploy"]);
    for (k, v) in env {
        deploy.env(k, v);
    }
    run_ok(&mut deploy);
    let first = one.serve(&env);
    one.share_keys(&two);
    let second = two.serve(&env);
    // Pebble checks HTTP-01 at the second instance's gateway only.
    let pebble = (0..3)
        .find_map(|_| pebble::pebble_once(&pebble_dir, directory_port, second.http, free_port()))
        .expect("pebble starts");
    let root = pebble_dir.join("root.pem");
    let fetched = Command::new("curl")
        .args(["-sSf", "-o"])
        .arg(&root)
        .arg("--cacert")
        .arg(&pebble.ca)
        .arg(format!("https://{}/roots/0", pebble.management))
        .status()
        .unwrap();
    assert!(fetched.success(), "pebble's root");

    // The first handshake reaches the first instance: it orders, and the
    // second answers pebble's check with what the first put in the store.
    let at_one = served_leaf(first.https, "shop.example.test", &root)
        .expect("the first instance serves a certificate pebble issued");
    let at_two = served_leaf(second.https, "shop.example.test", &root)
        .expect("the second instance serves it too");
    assert_eq!(at_one, at_two, "one certificate, taken from the store");

    // Handshakes at both at once for another host: one order between them.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| served_leaf(first.https, "wiki.example.test", &root));
        let b = s.spawn(|| served_leaf(second.https, "wiki.example.test", &root));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (a.expect("at the first"), b.expect("at the second"));
    assert_eq!(a, b, "both serve the one certificate ordered");
    assert_ne!(a, at_one);

    // One identity key: an app verifying assertions with the keys either
    // gateway publishes accepts both gateways' assertions.
    let jwks = |port: u16| {
        let (code, body) = http(
            port,
            "GET",
            "/.well-known/commons/jwks.json",
            &[("Host", "shop.localhost")],
            b"",
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        body
    };
    assert_eq!(jwks(first.http), jwks(second.http));
    // The same for ID tokens, whichever instance's API signed them.
    let oidc = |port: u16| {
        let (code, body) = http(port, "GET", "/oidc/jwks.json", &[], b"").unwrap();
        assert_eq!(code, 200, "{body}");
        body
    };
    let (a, b) = std::thread::scope(|s| {
        // Both make a key at once: one is kept, the other instance takes it.
        let a = s.spawn(|| oidc(first.port));
        let b = s.spawn(|| oidc(second.port));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a, b);
    assert_eq!(oidc(first.port), oidc(second.port));
    assert_eq!(
        std::fs::read(one.home.join("gateway/identity.key")).ok(),
        std::fs::read(two.home.join("gateway/identity.key")).ok(),
        "the second took the first's key"
    );

    // Kept sealed in the database, nowhere in either data directory.
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let rows = db
        .query(
            &format!(
                "SELECT name, body FROM {schema}.shared WHERE kind = 'gateway-certificate' ORDER BY name"
            ),
            &[],
        )
        .unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["shop.example.test", "wiki.example.test"]);
    for r in &rows {
        let body: Vec<u8> = r.get(1);
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("BEGIN") && !text.contains("PRIVATE"),
            "a certificate is sealed at rest"
        );
    }
    for s in [&one, &two] {
        assert!(
            !s.home.join("gateway/acme/certs").exists(),
            "no certificate or key in {}",
            s.home.display()
        );
    }
    let answers: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM {schema}.shared WHERE kind = 'acme-answer'"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(answers, 0, "answers are removed once their order ends");
    destroy_on(&one, &env, "shop");
    drop((first, second, pebble));
    drop_platform_schemas(&url, &schema);
}
