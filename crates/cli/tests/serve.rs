//! `commons serve`: the usage batch API and the Stripe webhook over real HTTP.

mod common;

use common::*;
use commons_ledger::payments::Stripe;

const SECRET: &str = "whsec_serve_test_91b2";

fn event(id: &str, bytes: u64) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "gateway/node-1", "type": "request",
        "time": commons_meter::format_time(now),
        "data": { "user": "alice", "site": "wiki", "operator": "acme", "provider": "p1", "bytes_out": bytes }
    })
}

#[test]
fn usage_batches_need_a_scoped_token_and_conflicts_are_409() {
    let s = Sandbox::new("serve-usage");
    let writer = s
        .ok(&["token", "create", "gateway", "--scope", "usage:write"])
        .stdout()
        .trim()
        .to_string();
    let reader = s
        .ok(&["token", "create", "dash", "--scope", "billing:read"])
        .stdout()
        .trim()
        .to_string();
    // Only hashes are kept.
    let stored = s.stored_tokens();
    assert!(!stored.contains(&writer));
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(writer.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(stored.contains(&hash), "{stored}");
    let server = s.serve(&[]);
    let body = serde_json::to_vec(&vec![event("e1", 10), event("e2", 20)]).unwrap();
    let (code, out) = http(server.port, "POST", "/api/usage/events", &[], &body).unwrap();
    assert_eq!(code, 401, "{out}");
    let auth = format!("Bearer {reader}");
    let (code, _) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 403, "a token without usage:write");
    let auth = format!("Bearer {writer}");
    let (code, out) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["accepted"], 2);
    // The same batch again: duplicates, still 200.
    let (code, out) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["duplicates"],
        2
    );
    // Same id, other payload: 409 with an RFC 9457 problem listing outcomes.
    let changed = serde_json::to_vec(&vec![event("e1", 99)]).unwrap();
    let (code, out) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &changed,
    )
    .unwrap();
    assert_eq!(code, 409, "{out}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["status"], 409);
    assert!(p["outcomes"][0]["rejected"]["reason"] == "conflict", "{p}");
    let (code, out) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        b"{not json",
    )
    .unwrap();
    assert_eq!(code, 400, "{out}");
    assert!(out.contains("\"title\""));
    // Revoked tokens stop working.
    let id = s.ok(&["token", "list", "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.ok(&["token", "revoke", &id]);
    let (code, _) = http(
        server.port,
        "POST",
        "/api/usage/events",
        &[("Authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 403);
}

#[test]
fn stripe_webhooks_subscribe_and_bad_signatures_are_refused() {
    let s = Sandbox::new("serve-stripe");
    s.ok(&[
        "ledger",
        "bootstrap",
        "--cash",
        "100000",
        "--tokens",
        "100000",
    ]);
    let reader = s
        .ok(&["token", "create", "gateway", "--scope", "billing:read"])
        .stdout()
        .trim()
        .to_string();
    let server = s.serve(&[("COMMONS_STRIPE_WEBHOOK_SECRET", SECRET)]);
    let alice = signup(server.port, "alice@example.org", "Alice")["user"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let paid_by = |user: &str| {
        serde_json::to_vec(&serde_json::json!({
            "id": "evt_100", "type": "invoice.paid",
            "data": { "object": { "id": "in_100", "amount_paid": 500, "billing_reason": "subscription_create",
                "charge": { "balance_transaction": { "fee": 45 } },
                "subscription_details": { "metadata": { "user": user, "tier": "member" } } } }
        }))
        .unwrap()
    };
    let body = paid_by(&alice);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let hook = "/api/payments/stripe/webhook";
    let forged = Stripe::sign("whsec_wrong", now, &body);
    assert_eq!(
        http(
            server.port,
            "POST",
            hook,
            &[("Stripe-Signature", &forged)],
            &body
        )
        .unwrap()
        .0,
        400
    );
    let stale = Stripe::sign(SECRET, now - 3600, &body);
    let (code, out) = http(
        server.port,
        "POST",
        hook,
        &[("Stripe-Signature", &stale)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 400);
    assert!(out.contains("tolerance"), "{out}");
    // A payment for someone with no account here is refused, and changes nothing.
    let stranger = paid_by("no-such-user");
    let (code, out) = http(
        server.port,
        "POST",
        hook,
        &[("Stripe-Signature", &Stripe::sign(SECRET, now, &stranger))],
        &stranger,
    )
    .unwrap();
    assert_eq!(code, 422, "{out}");
    assert!(out.contains("Unknown customer"), "{out}");
    let good = Stripe::sign(SECRET, now, &body);
    let (code, out) = http(
        server.port,
        "POST",
        hook,
        &[("Stripe-Signature", &good)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    // Applied, not a duplicate: the refused event with the same id left no trace.
    assert!(out.contains("applied"), "{out}");
    // Stripe redelivers: acknowledged, nothing moves.
    let (code, out) = http(
        server.port,
        "POST",
        hook,
        &[("Stripe-Signature", &good)],
        &body,
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(out.contains("duplicate"), "{out}");
    let auth = format!("Bearer {reader}");
    let (code, out) = http(
        server.port,
        "GET",
        &format!("/api/users/{alice}/tier"),
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    assert!(out.contains("\"member\""), "{out}");
    drop(server);
    // The payment minted 455 tokens (500 less Stripe's 45) into alice's escrow, once.
    let b = s
        .ok(&[
            "ledger",
            "balance",
            &format!("tokens:escrow:{alice}"),
            "--json",
        ])
        .json();
    assert_eq!(b[0]["balance"]["credits_posted"], 455);
}

/// Starts `commons serve` with `env`, returns it and what it said up to its
/// API address.
fn start_serve(s: &Sandbox, env: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut cmd = s.cmd(&["serve"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        said.push_str(&line);
        if line.contains("(gateway)") && said.matches("(gateway)").count() == 3 {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    (child, said)
}

#[test]
fn serve_reads_its_configuration_file_and_makes_an_administrator_once() {
    let s = Sandbox::new("serve-config");
    std::fs::create_dir_all(&s.home).unwrap();
    // A mistake is located: file, line, column.
    std::fs::write(
        s.home.join("commons.toml"),
        "[gateway]\nhttp = \"127.0.0.1:0\"\nhtps = \"off\"\n",
    )
    .unwrap();
    let r = s.run(&["serve"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("commons.toml:3:1:"), "{}", r.all());
    assert!(r.stderr().contains("unknown field `htps`"), "{}", r.all());

    let port = free_port();
    std::fs::write(
        s.home.join("commons.toml"),
        format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\n[gateway]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    let (mut child, said) = start_serve(&s, &[]);
    assert!(said.contains(&format!("http://127.0.0.1:{port}")), "{said}");
    // The first start makes the administrator; not being a terminal, it is
    // left in a private file rather than printed.
    let file = s.home.join("secrets/admin.token");
    assert!(said.contains("admin.token"), "{said}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let admin = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(!said.contains(&admin), "the token is not in the output");
    let auth = format!("Bearer {admin}");
    let (code, body) = http(
        port,
        "GET",
        "/api/deployments/nothing",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 404, "the administrator may ask: {body}");
    let (code, _) = http(port, "GET", "/api/deployments/nothing", &[], b"").unwrap();
    assert_eq!(code, 401);
    let (code, body) = http_get(port, "/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["ready"],
        true
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // Started again, with the environment overriding the file: no second
    // administrator.
    let other = free_port();
    let listen = format!("127.0.0.1:{other}");
    let (mut child, said) = start_serve(&s, &[("COMMONS_LISTEN", &listen)]);
    assert!(said.contains(&format!("http://{listen}")), "{said}");
    assert!(!said.contains("Admin"), "{said}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn the_openapi_document_validates_and_every_route_answers_as_documented() {
    let s = Sandbox::new("serve-openapi");
    let server = s.serve(&[]);
    let (code, body) = http_get(server.port, "/api/openapi.json").unwrap();
    assert_eq!(code, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");

    // A real validator, from PyPI (and schemathesis, for below).
    let path = s.dir.join("openapi.json");
    std::fs::write(&path, &body).unwrap();
    let python = python_venv(
        &s.dir.join("venv"),
        &["openapi-spec-validator==0.7.*", "schemathesis==4.*"],
    );
    let st = python.with_file_name("schemathesis");
    run_ok(std::process::Command::new(python)
        .args([
            "-c",
            "import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1])))",
        ])
        .arg(&path));

    // Every documented operation answers, unauthenticated, with one of the
    // statuses it documents (and problems as problem documents).
    let mut operations = 0;
    for (route, methods) in doc["paths"].as_object().unwrap() {
        let url = route
            .replace("{user}", "nobody")
            .replace("{name}", "nothing")
            .replace("{org}", "nobody")
            .replace("{id}", "nothing");
        for (method, op) in methods.as_object().unwrap() {
            operations += 1;
            let body: &[u8] = if method == "post" { b"[]" } else { b"" };
            let (code, answer) = http(
                server.port,
                &method.to_uppercase(),
                &url,
                &[("Content-Type", "application/json")],
                body,
            )
            .unwrap();
            let documented = &op["responses"][code.to_string()];
            assert!(
                documented.is_object(),
                "{method} {route} answered {code}, which it does not document: {answer}"
            );
            if documented["content"]
                .get("application/problem+json")
                .is_some()
            {
                let p: serde_json::Value = serde_json::from_str(&answer).unwrap();
                assert_eq!(p["status"], code, "{method} {route}: {answer}");
                assert!(p["detail"].is_string(), "{method} {route}: {answer}");
            }
        }
    }
    assert!(operations >= 9, "{operations} operations documented");

    // Then every operation, fuzzed from the document by schemathesis (from
    // PyPI): as a user of an organisation, and the platform's routes as its
    // administrator. Any answer the document does not describe — a status,
    // a content type, a body, a 5xx, a documented-valid request refused or
    // an invalid one accepted — fails the run.
    let token = user_token(server.port);
    let admin = std::fs::read_to_string(s.home.join("secrets/admin.token")).unwrap();
    let config = s.dir.join("schemathesis.toml");
    std::fs::write(&config, SCHEMATHESIS_CONFIG).unwrap();
    let url = format!("http://127.0.0.1:{}/api/openapi.json", server.port);
    let platform_routes = "^/api/(daemon|deployments|users|usage|payments|periods)";
    for (bearer, filter) in [
        (token.as_str(), "--exclude-path-regex"),
        (admin.trim(), "--include-path-regex"),
    ] {
        let out = std::process::Command::new(&st)
            // Its cache (crashes it replays first) stays with this run.
            .current_dir(&s.dir)
            .arg("--config-file")
            .arg(&config)
            .args(["run", &url, filter, platform_routes])
            .args(["--header", &format!("Authorization: Bearer {bearer}")])
            .args([
                "--max-examples",
                "40",
                // One worker: with the seed, the same cases in the same order.
                "--workers",
                "1",
                "--seed",
                "20261126",
            ])
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis found answers the document does not describe ({filter} {platform_routes}):\n{said}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains(" passed"), "{said}");
    }
}

/// What schemathesis must know besides the document: the organisation to
/// act in, and the refusals that rest on rules no schema can state.
const SCHEMATHESIS_CONFIG: &str = r#"
[parameters]
"path.org" = "ann"

# No text may hold a NUL character (PostgreSQL keeps none; the scaled-out
# platform answers 422, as the API's description says).
[generation]
allow-x00 = false

# Deploying checks that the catalog entry exists and that the blueprint is
# valid YAML of a valid blueprint.
[[operations]]
include-path-regex = "^/api/(orgs/\\{org\\}/(sites|plan)|sites/\\{name\\})$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]

# A placement's blueprint must load; a site there on the control plane's
# machine keeps its name.
[[operations]]
include-path = "/api/placements"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]

# A member is named by the email of an account that exists.
[[operations]]
include-path = "/api/orgs/{org}/members"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]

# The tiers are the platform's configuration: a name it does not offer is
# refused, as is the free one; changing needs a running subscription.
[[operations]]
include-path-regex = "^/api/me/subscription(/checkout)?$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "503"]

# A payment by hand names a paid tier and an account that exist, in whole
# cents (JSON Schema counts 5.0 as an integer; the API takes 5); a refund,
# a payment that was made.
[[operations]]
include-path-regex = "^/api/payments/(manual|\\{id\\}/refund)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "422", "503"]

# The meter refuses events of a closed period, and times before 1970.
[[operations]]
include-path = "/api/usage/events"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "409", "422"]
"#;

/// Signs Ann up, logs her in and makes her a token with every scope.
fn user_token(port: u16) -> String {
    let json = [("Content-Type", "application/json")];
    let (code, body) = http(
        port,
        "POST",
        "/api/signup",
        &json,
        br#"{"email":"ann@example.org","name":"Ann","password":"a long enough password"}"#,
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
    let (code, head, body) = http_with_head(
        port,
        "POST",
        "/api/login",
        &json,
        br#"{"email":"ann@example.org","password":"a long enough password"}"#,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let cookie = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or(l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_string();
    let csrf = serde_json::from_str::<serde_json::Value>(&body).unwrap()["csrf"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, body) = http(
        port,
        "POST",
        "/api/tokens",
        &[
            ("Content-Type", "application/json"),
            ("Cookie", &cookie),
            ("X-CSRF-Token", &csrf),
        ],
        br#"{"name":"schemathesis","scopes":["sites:read","sites:write","orgs:read","orgs:write","audit:read","tokens:write","nodes:read","nodes:write"]}"#,
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A daemon whose data directory is removed stops, and frees its ports
/// for the next platform on this machine.
#[test]
fn the_daemon_stops_when_its_data_directory_is_removed() {
    let s = Sandbox::new("orphaned");
    let mut server = s.serve(&[]);
    // The daemon may be writing a file into it at that moment.
    let removed = wait_for(std::time::Duration::from_secs(5), || {
        std::fs::remove_dir_all(&s.home).is_ok() || !s.home.exists()
    });
    assert!(removed);
    let stopped = wait_for(std::time::Duration::from_secs(15), || {
        matches!(server.child.try_wait(), Ok(Some(_)))
    });
    assert!(stopped, "the daemon outlived its data directory");
    for port in [server.port, server.http] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is still held"
        );
    }
}
