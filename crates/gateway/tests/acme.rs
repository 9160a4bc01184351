//! Certificates from a real ACME server: Debian's `pebble`, with
//! `pebble-challtestsrv` as its DNS (every name resolves to 127.0.0.1, so
//! pebble validates HTTP-01 against the gateway's plain-HTTP listener).

mod common;
#[path = "common/pebble.rs"]
mod pebble;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use commons_gateway::acme::{Acme, AcmeConfig, Challenge};
use commons_gateway::Config;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use pebble::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// GET over HTTPS, verifying the server against `roots`; also returns the
/// certificate chain it presented.
async fn https_get(
    addr: SocketAddr,
    name: &str,
    roots: &[CertificateDer<'static>],
    path: &str,
) -> Result<(u16, Bytes, Vec<CertificateDer<'static>>), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tls_client(roots, &[b"http/1.1"])
        .connect(name.to_string().try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .to_vec();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(path)
        .header("host", name)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, body, chain))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_issued_on_demand_by_a_real_acme_server_and_renewed() {
    let tmp = std::env::temp_dir().join(format!("commons-acme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let gw_config = |https: Option<u16>| Config {
        https_port: https,
        ..Config::default()
    };
    let gw = gateway(gw_config(None)).await;
    let pebble = pebble(&tmp.join("pebble"), gw.http.port(), free_port());
    let acme_config = AcmeConfig {
        directory: pebble.directory.clone(),
        root: Some(pebble.ca.clone()),
        contact: Some("ops@example.test".into()),
        dir: tmp.join("acme"),
        challenge: Challenge::Http01,
    };
    let acme = Acme::new(acme_config.clone());
    gw.gateway.enable_acme(acme.clone());
    let shop = upstream("shop").await;
    gw.gateway
        .set_routes(vec![route("shop.example.test", "/", "shop", &[shop])]);

    // Pebble's root, to verify what the gateway serves.
    let ca = CertificateDer::from_pem_file(&pebble.ca).unwrap();
    let (status, root_pem, _) = https_get(pebble.management, "localhost", &[ca], "/roots/0")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let pebble_root = vec![CertificateDer::from_pem_slice(&root_pem).unwrap()];

    // The first handshake for the host gets it a certificate.
    let (status, body, chain) = https_get(gw.https, "shop.example.test", &pebble_root, "/")
        .await
        .expect("a certificate pebble issued, valid for the name");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"server\":\"shop\""));
    let key_file = tmp.join("acme/certs/shop.example.test.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let issued = gw.gateway.certs.get("shop.example.test").unwrap();
    assert!(issued.acme);
    assert_eq!(chain[0], issued.key.cert[0]);
    assert!(chain.len() >= 2, "the chain includes pebble's intermediate");

    // Plain HTTP now redirects, except for ACME challenges.
    let plain = get(gw.http, "shop.example.test", "/cart?x=1").await;
    assert_eq!(plain.status, 308);
    assert_eq!(
        plain.headers["location"],
        "https://shop.example.test/cart?x=1"
    );
    let challenge = get(
        gw.http,
        "shop.example.test",
        "/.well-known/acme-challenge/nope",
    )
    .await;
    assert_eq!(challenge.status, 404);

    // A name no site serves gets no certificate.
    let refused = https_get(gw.https, "other.example.test", &pebble_root, "/").await;
    assert!(refused.is_err());
    assert!(!tmp.join("acme/certs/other.example.test.crt").exists());
    assert!(gw.gateway.certs.get("other.example.test").is_none());

    // Renewal: not due now, due once two thirds of the validity have passed.
    let now = commons_clock::now_secs() as i64;
    assert!(acme.renew_due(&gw.gateway, now).await.is_empty());
    let later = issued.not_after - (issued.not_after - issued.not_before) / 4;
    let renewed = acme.renew_due(&gw.gateway, later).await;
    assert_eq!(renewed.len(), 1);
    assert!(renewed[0].1.is_ok(), "{:?}", renewed[0].1);
    let fresh = gw.gateway.certs.get("shop.example.test").unwrap();
    assert_ne!(fresh.key.cert[0], issued.key.cert[0]);
    let (_, _, served) = https_get(gw.https, "shop.example.test", &pebble_root, "/")
        .await
        .unwrap();
    assert_eq!(
        served[0], fresh.key.cert[0],
        "the renewed certificate is served"
    );

    // A restarted gateway serves the kept certificate without a new order.
    let gw2 = gateway(gw_config(None)).await;
    let acme2 = Acme::new(acme_config);
    assert_eq!(acme2.load(&gw2.gateway).unwrap(), 1);
    gw2.gateway.enable_acme(acme2);
    gw2.gateway
        .set_routes(vec![route("shop.example.test", "/", "shop", &[shop])]);
    let (_, _, served) = https_get(gw2.https, "shop.example.test", &pebble_root, "/")
        .await
        .unwrap();
    assert_eq!(served[0], fresh.key.cert[0]);
    drop(pebble);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_issues_certificates_when_port_80_is_closed() {
    let tmp = std::env::temp_dir().join(format!("commons-acme-alpn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let gw = gateway(Config::default()).await;
    // Pebble's HTTP-01 port answers nothing: only the TLS-ALPN-01 handshake
    // on the gateway's HTTPS listener can prove the name.
    let pebble = pebble(&tmp.join("pebble"), free_port(), gw.https.port());
    let acme = Acme::new(AcmeConfig {
        directory: pebble.directory.clone(),
        root: Some(pebble.ca.clone()),
        contact: None,
        dir: tmp.join("acme"),
        challenge: Challenge::TlsAlpn01,
    });
    gw.gateway.enable_acme(acme);
    let blog = upstream("blog").await;
    gw.gateway
        .set_routes(vec![route("blog.example.test", "/", "blog", &[blog])]);
    let ca = CertificateDer::from_pem_file(&pebble.ca).unwrap();
    let (_, root_pem, _) = https_get(pebble.management, "localhost", &[ca], "/roots/0")
        .await
        .unwrap();
    let pebble_root = vec![CertificateDer::from_pem_slice(&root_pem).unwrap()];

    let (status, body, chain) = https_get(gw.https, "blog.example.test", &pebble_root, "/")
        .await
        .expect("a certificate pebble issued after a TLS-ALPN-01 validation");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"server\":\"blog\""));
    let issued = gw.gateway.certs.get("blog.example.test").unwrap();
    assert!(issued.acme);
    assert_eq!(chain[0], issued.key.cert[0]);
    // The validation certificate is gone once the order is done: an
    // `acme-tls/1` handshake now gets nothing.
    let tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnything))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let refused = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("blog.example.test".try_into().unwrap(), tcp)
        .await;
    assert!(refused.is_err(), "no challenge certificate is left");
    drop(pebble);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Accepts any server certificate: only to see whether a handshake happens.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
