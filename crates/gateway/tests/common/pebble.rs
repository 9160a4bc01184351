//! Debian's `pebble` (a real ACME server), with `pebble-challtestsrv` as
//! its DNS: every name resolves to 127.0.0.1, so pebble validates HTTP-01
//! and TLS-ALPN-01 against the ports it is given on loopback. Shared by
//! the gateway's ACME tests and the platform's.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Pebble {
    children: Vec<Child>,
    pub directory: String,
    pub management: SocketAddr,
    /// The CA that signed pebble's own HTTPS certificate.
    pub ca: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn require(binary: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(binary).exists()));
    assert!(
        found,
        "{binary} is not installed: the ACME tests need Debian's pebble \
         (apt-get install pebble; scripts/test installs it)"
    );
}

/// Starts pebble, validating HTTP-01 on `http_port` and TLS-ALPN-01 on
/// `tls_port`. Its own ports are picked free, but another test may take
/// one before pebble binds it: then it is started again on new ones.
pub fn pebble(dir: &Path, http_port: u16, tls_port: u16) -> Pebble {
    for _ in 0..3 {
        if let Some(p) = pebble_once(dir, free_port(), http_port, tls_port) {
            return p;
        }
    }
    panic!("pebble did not start three times; see {}", dir.display());
}

/// Starts pebble with its directory on port `listen` (chosen beforehand, so
/// that a platform can be told where it is before pebble runs): at
/// `https://127.0.0.1:LISTEN/dir`, its own CA in `DIR/ca.pem`.
pub fn pebble_once(dir: &Path, listen: u16, http_port: u16, tls_port: u16) -> Option<Pebble> {
    require("pebble");
    require("pebble-challtestsrv");
    std::fs::create_dir_all(dir).unwrap();
    // Pebble's own HTTPS certificate, from a CA made for this run.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA for pebble");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();

    let (management, dns, dns_mgmt) = (free_port(), free_port(), free_port());
    let config = serde_json::json!({ "pebble": {
        "listenAddress": format!("127.0.0.1:{listen}"),
        "managementListenAddress": format!("127.0.0.1:{management}"),
        "certificate": dir.join("cert.pem"),
        "privateKey": dir.join("key.pem"),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    }});
    std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
    let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
    let challtestsrv = Command::new("pebble-challtestsrv")
        .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
        .args(["-dns01", &format!("127.0.0.1:{dns}")])
        .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
        .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
        .stdout(log("challtestsrv.log"))
        .stderr(log("challtestsrv.err"))
        .spawn()
        .expect("pebble-challtestsrv starts");
    let server = Command::new("pebble")
        .arg("-config")
        .arg(dir.join("pebble.json"))
        .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdout(log("pebble.log"))
        .stderr(log("pebble.err"))
        .spawn()
        .expect("pebble starts");
    let p = Pebble {
        children: vec![challtestsrv, server],
        directory: format!("https://127.0.0.1:{listen}/dir"),
        management: SocketAddr::from(([127, 0, 0, 1], management)),
        ca: dir.join("ca.pem"),
    };
    let mut p = p;
    for port in [listen, management, dns_mgmt] {
        let up = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            // A child that exited (its port was taken) will not come up.
            let exited = p
                .children
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(Some(_))));
            !exited && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !up {
            eprintln!(
                "pebble did not start (see {}); trying new ports",
                dir.display()
            );
            return None;
        }
    }
    Some(p)
}
