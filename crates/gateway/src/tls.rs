//! TLS: the certificate store and SNI.
//!
//! Certificates come from ACME (see `acme`) or, for `localhost` and
//! `*.localhost` (development), are self-signed on first use. The resolver
//! picks the certificate by SNI; a handshake for a name with no certificate
//! fails (no default certificate leaks another site's name).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// A certificate the gateway can serve.
#[derive(Debug, Clone)]
pub struct Cert {
    pub key: Arc<CertifiedKey>,
    /// Validity, in seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// Issued through ACME (as opposed to self-signed for development).
    pub acme: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Pem(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("self-signed certificate: {0}")]
    SelfSigned(String),
}

impl Cert {
    /// Parses a PEM chain and a PEM private key.
    pub fn from_pem(chain: &str, key: &str, acme: bool) -> Result<Cert, TlsError> {
        let certs = CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let leaf = certs
            .first()
            .ok_or_else(|| TlsError::Pem("no certificate in the chain".into()))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::Pem(e.to_string()))?;
        let not_before = parsed.validity().not_before.timestamp();
        let not_after = parsed.validity().not_after.timestamp();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| TlsError::Key(e.to_string()))?;
        Ok(Cert {
            key: Arc::new(CertifiedKey::new(certs, signer)),
            not_before,
            not_after,
            acme,
        })
    }

    /// True when less than a third of the validity is left at `now_s`: the
    /// point where it is renewed (60 days into a 90-day certificate).
    pub fn due_for_renewal(&self, now_s: i64) -> bool {
        let life = (self.not_after - self.not_before).max(1);
        self.not_after - now_s < life / 3
    }
}

/// True for names the gateway self-signs (development only).
pub fn is_local(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

/// A self-signed certificate for `host`.
pub fn self_signed(host: &str) -> Result<Cert, TlsError> {
    let e = |e: rcgen::Error| TlsError::SelfSigned(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(e)?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(e)?;
    // From the start of this year to the end of the next (not rcgen's
    // default of year 4096); made again once a third of that is left.
    let year = 1970 + (commons_clock::now_secs() / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let cert = params.self_signed(&key).map_err(e)?;
    Cert::from_pem(&cert.pem(), &key.serialize_pem(), false)
}

/// Certificates by host name; the SNI resolver reads it.
#[derive(Default, Debug)]
pub struct CertStore {
    certs: RwLock<HashMap<String, Cert>>,
}

impl CertStore {
    pub fn insert(&self, host: &str, cert: Cert) {
        self.certs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_ascii_lowercase(), cert);
    }

    pub fn get(&self, host: &str) -> Option<Cert> {
        self.certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .cloned()
    }

    /// Every (host, certificate), for renewal and metrics.
    pub fn all(&self) -> Vec<(String, Cert)> {
        let mut v: Vec<_> = self
            .certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(h, c)| (h.clone(), c.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// True when `host` has a certificate from ACME: plain HTTP for it
    /// redirects to HTTPS.
    pub fn has_acme(&self, host: &str) -> bool {
        self.get(host).is_some_and(|c| c.acme)
    }

    /// The certificate for `host`, self-signing one for a local name.
    pub fn resolve_host(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let now = commons_clock::now_secs() as i64;
        match self.get(host) {
            // A self-signed one is simply made again when due.
            Some(c) if c.acme || !c.due_for_renewal(now) => return Some(c.key),
            _ => {}
        }
        if is_local(host) {
            let cert = self_signed(host).ok()?;
            self.insert(host, cert.clone());
            return Some(cert.key);
        }
        None
    }
}

/// rustls' view of the store.
#[derive(Debug)]
pub struct SniResolver(pub Arc<CertStore>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = hello.server_name()?.to_ascii_lowercase();
        self.0.resolve_host(&host)
    }
}

/// The server configuration: TLS 1.2 and 1.3, ALPN h2 then http/1.1.
/// The configuration of a TLS-ALPN-01 validation handshake (RFC 8737):
/// the challenge certificate, and `acme-tls/1` as the only protocol.
pub fn challenge_config(key: Arc<CertifiedKey>) -> Arc<rustls::ServerConfig> {
    #[derive(Debug)]
    struct One(Arc<CertifiedKey>);
    impl ResolvesServerCert for One {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(One(key)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Arc::new(config)
}

pub fn server_config(store: Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("TLS 1.2 and 1.3 are supported")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver(store)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_get_a_self_signed_certificate_and_others_none() {
        let store = CertStore::default();
        assert!(store.resolve_host("blog.localhost").is_some());
        let cert = store.get("blog.localhost").unwrap();
        assert!(!cert.acme);
        let now = commons_clock::now_secs() as i64;
        assert!(cert.not_before < now && now < cert.not_after);
        assert!(
            cert.not_after - now < 800 * 86_400,
            "two years at most, not forever"
        );
        assert!(!cert.due_for_renewal(now));
        assert!(store.resolve_host("example.com").is_none());
    }

    #[test]
    fn renewal_is_due_in_the_last_third() {
        let mut c = self_signed("a.localhost").unwrap();
        c.not_before = 0;
        c.not_after = 90;
        assert!(!c.due_for_renewal(59));
        assert!(c.due_for_renewal(61));
    }
}
