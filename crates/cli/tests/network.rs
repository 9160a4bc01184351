//! Per-site networks (sandboxed, as root, on a real PostgreSQL server):
//! from inside a site, every way around the gateway is tried — another
//! site's port, the platform's API, the PostgreSQL server without a
//! database there, another site's database, a forged user header — and
//! each must be refused or time out, while the same site through the
//! gateway answers.

mod common;

use common::*;
use commons_images::testing::{busybox_layer, push_with, scratch, start_registry};

fn root() {
    assert!(
        is_root(),
        "per-site networks need root (network namespaces, veth links, nftables); run the tests as root"
    );
}

fn admin_url() -> String {
    std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

/// Deploys as the platform would: sandboxed, with the PostgreSQL server.
fn deploy(s: &Sandbox, args: &[&str]) -> Run {
    let r = Run(s
        .cmd(args)
        .env("COMMONS_SANDBOX", "1")
        .env("COMMONS_POSTGRES_URL", admin_url())
        .output()
        .unwrap());
    assert_eq!(r.code(), 0, "{}", r.all());
    r
}

/// A site that tells whom it was told the user is (`X-Remote-User`).
const WHO_IS_IT: &str = r#"import http.server, os
class Who(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("user=" + str(self.headers.get("X-Remote-User"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Who).serve_forever()
"#;

/// Tries each target of `argv[1]` (name → [host, port]; HOST is the site's
/// gateway, the host's end of its link) and its own process at port
/// `argv[2]`, with a request that forges the user header; writes name →
/// outcome to probes.json.
const PROBE: &str = r#"import json, os, socket, struct, sys
def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[1] == "00000000":
            return socket.inet_ntoa(struct.pack("<L", int(f[2], 16)))
def attempt(host, port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\nX-Remote-User: victim-user\r\n\r\n")
        return "CONNECTED " + s.recv(300).decode(errors="replace")
    except socket.timeout:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "unreachable " + str(e)
    finally:
        s.close()
host = gateway()
targets = json.loads(sys.argv[1])
targets["own"] = ["127.0.0.1", int(sys.argv[2])]
out = {"host_address": host}
for name, (where, port) in targets.items():
    out[name] = attempt(host if where == "HOST" else where, port)
json.dump(out, open(os.path.join(os.environ["COMMONS_DATA_DIR"], "probes.json"), "w"))
"#;

/// The network namespace of site `name` (from the host's registry).
fn netns_of(s: &Sandbox, name: &str) -> String {
    let index = commons_runtime::net::site_index(&s.home, name)
        .unwrap_or_else(|| panic!("{name} has no network"));
    format!("commons-{index}")
}

#[test]
fn a_sandboxed_site_reaches_nothing_around_the_gateway() {
    root();
    let s = Sandbox::new("network");
    let server = s.serve(&[
        ("COMMONS_SANDBOX", "1"),
        ("COMMONS_POSTGRES_URL", &admin_url()),
    ]);
    // Images (a victim and an attacker) come from a registry on loopback.
    let images = scratch("network");
    let registry = start_registry(&images);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(push_with(
        registry.port,
        "apps/www:1",
        &[busybox_layer(&[
            ("srv/www", None),
            ("srv/www/index.html", Some(b"the image victim")),
        ])],
        serde_json::json!({
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"],
            "Env": ["PATH=/bin"],
        }),
    ));
    let pulled_from = format!("127.0.0.1:{}", registry.port);
    let with_images = |args: &[&str]| {
        let r = Run(s
            .cmd(args)
            .env("COMMONS_SANDBOX", "1")
            .env("COMMONS_INSECURE_REGISTRIES", &pulled_from)
            .output()
            .unwrap());
        assert_eq!(r.code(), 0, "{}", r.all());
    };
    // The victim: a user_header site with a database of its own.
    s.write("victim/who.py", WHO_IS_IT);
    s.write(
        "victim/commons.yaml",
        r#"name: victim
components:
  db: { postgres: {} }
  web:
    process: python3 who.py
    route: { user_header: X-Remote-User }
    health: { http: "/" }
"#,
    );
    deploy(&s, &["deploy", "victim"]);
    let web = s.component("victim", "web");
    let victim = component_addr(&web);
    assert!(
        !victim.ip().is_loopback(),
        "a sandboxed site listens in a network of its own: {web}"
    );
    // Through the gateway, the site answers (and the forged header is dropped).
    let mut through = (0, String::new());
    assert!(wait_for(std::time::Duration::from_secs(10), || {
        through = http(
            server.http,
            "GET",
            "/",
            &[
                ("Host", "victim.localhost"),
                ("X-Remote-User", "victim-user"),
            ],
            b"",
        )
        .unwrap_or_default();
        through.0 == 200
    }));
    assert_eq!(
        through.1, "user=None",
        "the gateway drops a client's user header"
    );
    // From the host (the gateway's side), the site's address answers.
    assert_eq!(component_get(&web, "/").unwrap(), (200, "user=None".into()));

    // A victim that is an image.
    s.write(
        "pictures/commons.yaml",
        &format!(
            "name: pictures\ncomponents:\n  web:\n    image: {pulled_from}/apps/www:1\n    \
             port: 8080\n    health: {{ http: \"/\" }}\n"
        ),
    );
    with_images(&["deploy", "pictures"]);
    let pictures = s.component("pictures", "web");
    let image_victim = component_addr(&pictures);
    let image_instance = pictures["outputs"]["host"].as_str().unwrap().to_string();
    assert_eq!(
        component_get(&pictures, "/").unwrap(),
        (200, "the image victim".into()),
        "the host reaches an image site at its address"
    );

    // Where the attacker's egress is tried: the package registry (the only
    // outside address this machine reaches).
    let registry_ip = std::net::ToSocketAddrs::to_socket_addrs(&("pypi.org", 443))
        .expect("the tests need DNS and pypi.org (the package registry) from this host")
        .find(|a| a.is_ipv4())
        .expect("an IPv4 address for pypi.org")
        .ip();
    // The attacker: no database; a process of its own, which it must reach.
    s.write("attacker/probe.py", PROBE);
    let targets = serde_json::json!({
        "victim_site": [victim.ip().to_string(), victim.port()],
        "victim_on_loopback": ["127.0.0.1", victim.port()],
        "image_site": [image_victim.ip().to_string(), image_victim.port()],
        "image_instance": [image_instance, 8080],
        "api_on_loopback": ["127.0.0.1", server.port],
        "api_on_host": ["HOST", server.port],
        "gateway_admin_on_host": ["HOST", server.admin],
        "postgres_on_loopback": ["127.0.0.1", 5432],
        "postgres_on_host": ["HOST", 5432],
        "data_api_on_loopback": ["127.0.0.1", server.data],
        "data_api_on_host": ["HOST", commons_runtime::net::SITE_DATA_PORT],
        "data_listener_port_on_host": ["HOST", server.data],
        "registry": [registry_ip.to_string(), 443],
    })
    .to_string();
    s.write(
        "attacker/commons.yaml",
        &format!(
            r#"name: attacker
components:
  own:
    process: python3 -m http.server --bind 127.0.0.1 $PORT
    health: {{ http: "/" }}
  probe:
    job: python3 probe.py '{targets}' ${{components.own.port}}
    after: [own]
"#
        ),
    );
    deploy(&s, &["deploy", "attacker"]);
    let probes: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.home.join("deployments/attacker/data/probes.json")).unwrap(),
    )
    .unwrap();
    let outcome = |name: &str| probes[name].as_str().unwrap_or_default().to_string();
    // The victim's side of the host: the site's address less one.
    let victim_host = match victim.ip() {
        std::net::IpAddr::V4(v4) => std::net::Ipv4Addr::from(u32::from(v4) - 1).to_string(),
        other => panic!("{other}"),
    };
    // The probe works: the site reaches its own process.
    assert!(
        outcome("own").starts_with("CONNECTED HTTP/1.0 200"),
        "{probes}"
    );
    for attack in [
        "victim_site",
        "victim_on_loopback",
        "image_site",
        "image_instance",
        "api_on_loopback",
        "api_on_host",
        "gateway_admin_on_host",
        "postgres_on_loopback",
        "postgres_on_host",
        "data_api_on_loopback",
        "data_api_on_host",
        "data_listener_port_on_host",
    ] {
        let o = outcome(attack);
        assert!(
            o == "refused" || o == "timeout",
            "{attack} must be refused or time out, got {o:?}: {probes}"
        );
    }

    // An attacker that is an image: its container, behind its site, tries
    // the same ways around the gateway (busybox nc, 3 s each).
    let victims = [
        ("victim_site", format!("{} {}", victim.ip(), victim.port())),
        (
            "image_site",
            format!("{} {}", image_victim.ip(), image_victim.port()),
        ),
        // (Not the victim's instance address: instances are numbered
        // alike in every site, so that one is the raider's own.)
        ("api_on_loopback", format!("127.0.0.1 {}", server.port)),
    ];
    let tries: String = std::iter::once(&("own", "127.0.0.1 8080".to_string()))
        .chain(&victims)
        .map(|(name, at)| {
            format!(
                "if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 3 {at} 2>>/var/out/errors \
                 | /bin/busybox grep -q HTTP/; then echo {name} CONNECTED; else echo {name} blocked; fi; "
            )
        })
        .collect();
    s.write(
        "raider/commons.yaml",
        &format!(
            r#"name: raider
components:
  out: {{ volume: {{}} }}
  web:
    image: {pulled_from}/apps/www:1
    port: 8080
    command: ["/bin/busybox", "sh", "-c", "/bin/busybox httpd -p 8080 -h /srv/www; /bin/busybox sleep 1; {{ {tries}}} > /var/out/probes.tmp; /bin/busybox mv /var/out/probes.tmp /var/out/probes; exec /bin/busybox sleep 86400"]
    volumes: {{ /var/out: "${{components.out.path}}" }}
"#
        ),
    );
    with_images(&["deploy", "raider"]);
    let out = std::path::PathBuf::from(
        s.component("raider", "out")["outputs"]["path"]
            .as_str()
            .unwrap(),
    )
    .join("probes");
    assert!(
        wait_for(std::time::Duration::from_secs(30), || out.exists()),
        "the image's probes never finished"
    );
    let said = std::fs::read_to_string(&out).unwrap();
    assert!(
        said.lines().any(|l| l == "own CONNECTED"),
        "the probe works: the image reaches its own server: {said}\n{}",
        std::fs::read_to_string(out.with_file_name("errors")).unwrap_or_default()
    );
    for (name, _) in victims {
        assert!(
            said.lines().any(|l| l == format!("{name} blocked")),
            "from an image, {name} must be out of reach: {said}"
        );
    }
    with_images(&["destroy", "raider"]);

    // Egress: the attacker (by default) reaches a package registry; a site
    // that says `network: { egress: false }` reaches neither it nor DNS,
    // until its blueprint says otherwise (a change of no component).
    assert!(
        outcome("registry").starts_with("CONNECTED"),
        "a site reaches the internet by default: {probes}"
    );
    s.write(
        "sealed/egress.py",
        &format!(
            r#"import os, socket
out = []
try:
    socket.getaddrinfo("pypi.org", 443)
    out.append("resolved")
except OSError:
    out.append("no-dns")
s = socket.socket()
s.settimeout(3)
try:
    s.connect(("{registry_ip}", 443))
    out.append("CONNECTED")
except OSError as e:
    out.append("blocked")
open(os.path.join(os.environ["COMMONS_DATA_DIR"], "egress"), "w").write(" ".join(out))
"#
        ),
    );
    // Where the probe, run in the site's namespace as nobody, writes.
    let out = s.dir.join("egress");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let sealed = |egress: bool| {
        s.write(
            "sealed/commons.yaml",
            &format!(
                "name: sealed\nnetwork: {{ egress: {egress} }}\ncomponents:\n  \
                 web:\n    process: python3 -m http.server --bind 127.0.0.1 $PORT\n    \
                 health: {{ http: \"/\" }}\n"
            ),
        );
        deploy(&s, &["deploy", "sealed"]);
        let web = s.component("sealed", "web");
        // The process is untouched by a change of egress alone.
        let pid = web["pid"].as_i64().unwrap();
        let r = Run(std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns_of(&s, "sealed"),
                "setpriv",
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "/usr/bin/python3",
            ])
            .arg(s.app().join("sealed/egress.py"))
            .env("COMMONS_DATA_DIR", &out)
            .output()
            .unwrap());
        assert_eq!(r.code(), 0, "{}", r.all());
        (pid, std::fs::read_to_string(out.join("egress")).unwrap())
    };
    let (pid, said) = sealed(false);
    assert_eq!(said, "no-dns blocked", "egress: false holds");
    let (again, said) = sealed(true);
    assert_eq!(said, "resolved CONNECTED", "egress: true opens it");
    assert_eq!(pid, again, "no component was replaced for it");
    deploy(&s, &["destroy", "sealed"]);

    // A site that declares a `data:` section reaches the data API at its
    // host address — its listener, which serves the data API alone — and
    // still nothing else of the platform's.
    s.write(
        "keeper/schemas/n.json",
        r#"{"lexicon": 1, "id": "org.example.keeper.n", "defs": {"main": {"type": "record", "key": "tid", "record": {"type": "object", "properties": {"t": {"type": "string"}}}}}}"#,
    );
    s.write("keeper/probe.py", PROBE);
    // Another platform on the same host, with a data API of its own: a
    // tenant of this one must not reach it (nor this platform's listener at
    // any port but the one sites are given).
    let neighbour = Sandbox::new("network-neighbour");
    let other = neighbour.serve(&[("COMMONS_SANDBOX", "1")]);
    let keeper_targets = serde_json::json!({
        "data_api_on_host": ["HOST", commons_runtime::net::SITE_DATA_PORT],
        "data_listener_port_on_host": ["HOST", server.data],
        "other_platforms_data_api_on_host": ["HOST", other.data],
        "api_on_host": ["HOST", server.port],
        "gateway_admin_on_host": ["HOST", server.admin],
        "postgres_on_host": ["HOST", 5432],
    })
    .to_string();
    s.write(
        "keeper/commons.yaml",
        &format!(
            r#"name: keeper
components:
  own:
    process: python3 -m http.server --bind 127.0.0.1 $PORT
    health: {{ http: "/" }}
  probe:
    job: python3 probe.py '{keeper_targets}' ${{components.own.port}}; echo "$COMMONS_DATA_URL" > $COMMONS_DATA_DIR/data_url
    after: [own]
data:
  org.example.keeper.n:
    class: private
    schema: schemas/n.json
    purpose: to test the way to the data API
"#
        ),
    );
    deploy(&s, &["deploy", "keeper"]);
    let keeper_dir = s.home.join("deployments/keeper/data");
    let keeper: serde_json::Value =
        serde_json::from_slice(&std::fs::read(keeper_dir.join("probes.json")).unwrap()).unwrap();
    let host = keeper["host_address"].as_str().unwrap().to_string();
    assert_eq!(
        std::fs::read_to_string(keeper_dir.join("data_url"))
            .unwrap()
            .trim(),
        format!("http://{host}:{}", commons_runtime::net::SITE_DATA_PORT),
        "the site is told where the data API is, as it reaches it"
    );
    let reached = keeper["data_api_on_host"].as_str().unwrap_or_default();
    assert!(
        reached.starts_with("CONNECTED HTTP/1.0 404") && reached.contains("serves the data API"),
        "the data API's own listener answers, and serves nothing but the data API: {keeper}"
    );
    for attack in [
        "data_listener_port_on_host",
        "other_platforms_data_api_on_host",
        "api_on_host",
        "gateway_admin_on_host",
        "postgres_on_host",
    ] {
        let o = keeper[attack].as_str().unwrap_or_default();
        assert!(
            o == "refused" || o == "timeout",
            "{attack} stays out of reach of a data site, got {o:?}: {keeper}"
        );
    }
    deploy(&s, &["destroy", "keeper"]);

    // A tenant with a database of its own reaches it — and nothing else there.
    s.write(
        "tenant/commons.yaml",
        r#"name: tenant
components:
  db: { postgres: {} }
  web:
    process: python3 -m http.server --bind 127.0.0.1 $PORT
    health: { http: "/" }
  try:
    job: >-
      psql "${components.db.url}" -Atc "SELECT 'own database'" > $COMMONS_DATA_DIR/own 2>&1;
      echo "${components.db.url}" > $COMMONS_DATA_DIR/url;
      psql "$(echo ${components.db.url} | sed 's#/c_tenant_db$#/c_victim_db#')" -Atc "SELECT 1" > $COMMONS_DATA_DIR/victim 2>&1 && echo GOT-IN >> $COMMONS_DATA_DIR/victim;
      psql "$(echo ${components.db.url} | sed 's#//c_tenant_db:[^@]*@#//c_victim_db:guess@#; s#/c_tenant_db$#/c_victim_db#')" -Atc "SELECT 1" > $COMMONS_DATA_DIR/guess 2>&1 && echo GOT-IN >> $COMMONS_DATA_DIR/guess;
      psql "$(echo ${components.db.url} | sed 's#//c_tenant_db:[^@]*@#//postgres@#; s#/c_tenant_db$#/postgres#')" -Atc "SELECT 1" > $COMMONS_DATA_DIR/superuser 2>&1 && echo GOT-IN >> $COMMONS_DATA_DIR/superuser;
      true
"#,
    );
    deploy(&s, &["deploy", "tenant"]);
    let said =
        |f: &str| std::fs::read_to_string(s.home.join("deployments/tenant/data").join(f)).unwrap();
    assert_eq!(said("own").trim(), "own database", "{}", said("own"));
    for attack in ["victim", "guess", "superuser"] {
        let o = said(attack);
        assert!(
            !o.contains("GOT-IN") && (o.contains("FATAL") || o.contains("failed")),
            "{attack}: {o}"
        );
    }

    // Another platform on the host, without a PostgreSQL server, deploys a
    // sandboxed site of its own (writing the host's rules as it does): the
    // tenant's way to its own platform's server stays.
    neighbour.write(
        "plain/commons.yaml",
        "name: plain\ncomponents:\n  web:\n    process: python3 -m http.server --bind 127.0.0.1 $PORT\n    health: { http: \"/\" }\n",
    );
    let r = Run(neighbour
        .cmd(&["deploy", "plain"])
        .env("COMMONS_SANDBOX", "1")
        .env_remove("COMMONS_POSTGRES_URL")
        .output()
        .unwrap());
    assert_eq!(r.code(), 0, "{}", r.all());
    // The tenant's own database, asked from inside its network, answers
    // `word`; else `why` it did not.
    let own_database_answers = |word: &str, why: &str| {
        let r = Run(std::process::Command::new("ip")
            .args(["netns", "exec", &netns_of(&s, "tenant"), "psql"])
            .arg(said("url").trim())
            .args(["-Atc", &format!("SELECT '{word}'")])
            .output()
            .unwrap());
        assert_eq!(r.stdout().trim(), word, "{why}: {}", r.all());
    };
    own_database_answers(
        "still there",
        "another platform's deploy took the tenant's way to its database",
    );
    let r = Run(neighbour
        .cmd(&["destroy", "plain"])
        .env("COMMONS_SANDBOX", "1")
        .output()
        .unwrap());
    assert_eq!(r.code(), 0, "{}", r.all());
    drop(other);

    // The host restarts: its namespaces and rules go, the site's data stays.
    // The tenant's network, made again when its process starts again, has
    // its way to its database back (no deploy of the database gives it).
    let tenant_ns = netns_of(&s, "tenant");
    let web_pid = s.component("tenant", "web")["pid"].as_i64().unwrap();
    for lost in [
        vec!["nft", "flush", "map", "inet", "commons", "postgres_server"],
        vec!["ip", "netns", "del", tenant_ns.as_str()],
        vec!["kill", "-KILL", &web_pid.to_string()],
    ] {
        let r = Run(std::process::Command::new(lost[0])
            .args(&lost[1..])
            .output()
            .unwrap());
        assert_eq!(r.code(), 0, "{lost:?}: {}", r.all());
    }
    deploy(&s, &["deploy", "tenant"]);
    let web = s.component("tenant", "web");
    assert_ne!(
        web["pid"].as_i64(),
        Some(web_pid),
        "the process was started again"
    );
    own_database_answers(
        "back",
        "the site's network was made again without its way to its database",
    );

    // Gone with its site: the namespace, the link and its place in the
    // host's registry of site networks.
    let index = commons_runtime::net::site_index(&s.home, "victim").unwrap();
    assert!(std::path::Path::new(&format!("/run/netns/commons-{index}")).exists());
    for site in ["victim", "attacker", "tenant", "pictures"] {
        deploy(&s, &["destroy", site]);
    }
    assert_eq!(commons_runtime::net::site_index(&s.home, "victim"), None);
    assert!(!std::path::Path::new(&format!("/run/netns/commons-{index}")).exists());
    assert!(!std::path::Path::new(&format!("/sys/class/net/cmsite{index}")).exists());
    assert!(
        component_get(&web, "/").is_err(),
        "the destroyed site's address answers no more"
    );
    // The next site on the victim's former address inherits none of its
    // rights (it had a database, so a way to the server).
    std::fs::remove_file(s.home.join("deployments/attacker/data/probes.json")).ok();
    deploy(&s, &["deploy", "attacker"]);
    let probes: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.home.join("deployments/attacker/data/probes.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        probes["host_address"].as_str().unwrap(),
        victim_host.as_str(),
        "the attacker took the victim's link"
    );
    let o = probes["postgres_on_host"].as_str().unwrap();
    assert!(o == "refused" || o == "timeout", "{probes}");
    deploy(&s, &["destroy", "attacker"]);
    drop(server);
    let _ = std::fs::remove_dir_all(&images);
}
