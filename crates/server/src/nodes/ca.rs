//! The control plane's certificate authority for nodes: made once, kept in
//! `nodes/` (the key 0600), it signs each node's short-lived client
//! certificate and the agent listener's own certificate. Agents trust it by
//! its pin (in every join token), never by DNS.

use std::path::Path;
use std::sync::Arc;

use commons_agent::protocol::{pin_of, CONTROL_PLANE_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// A certificate the CA signed for a node.
pub struct Signed {
    pub pem: String,
    /// The hex SHA-256 of its DER: how the listener knows the certificate a
    /// connection presents.
    pub fingerprint: String,
    pub not_after: i64,
}

pub struct NodeCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
}

fn failed(e: impl std::fmt::Display) -> String {
    format!("the node CA: {e}")
}

fn at(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).expect("the system's random source");
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

impl NodeCa {
    /// The CA kept in `dir`, made on first use.
    pub fn open(dir: &Path) -> Result<NodeCa, String> {
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.pem");
        if key_path.exists() && cert_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path).map_err(failed)?;
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(failed)?;
            let key = KeyPair::from_pem(&key_pem).map_err(failed)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(failed)?;
            use rustls::pki_types::pem::PemObject;
            let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(failed)?;
            return Ok(NodeCa { issuer, cert_der });
        }
        crate::private_dir(dir).map_err(failed)?;
        let key = KeyPair::generate().map_err(failed)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "OneCommons node CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = commons_clock::now_secs() as i64;
        params.not_before = at(now - 3600);
        params.not_after = at(now + 20 * 365 * 86_400);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(failed)?;
        commons_files::write_durable(&key_path, key.serialize_pem().as_bytes()).map_err(failed)?;
        commons_files::write_durable(&cert_path, cert.pem().as_bytes()).map_err(failed)?;
        Ok(NodeCa {
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// What join tokens carry: the hex SHA-256 of the CA's certificate.
    pub fn pin(&self) -> String {
        pin_of(&self.cert_der)
    }

    /// Signs the key of `csr_pem` (the request's own names and extensions
    /// are ignored: the CA says who the node is) as `node`'s client
    /// certificate for `lifetime_secs`.
    pub fn sign_node(
        &self,
        csr_pem: &str,
        node: &str,
        lifetime_secs: i64,
    ) -> Result<Signed, String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("the certificate request does not parse or verify: {e}"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, node);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = commons_clock::now_secs() as i64;
        params.not_before = at(now - 60);
        params.not_after = at(now + lifetime_secs);
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(failed)?;
        Ok(Signed {
            fingerprint: pin_of(cert.der()),
            pem: cert.pem(),
            not_after: now + lifetime_secs,
        })
    }

    /// The agent listener's TLS: a certificate for [`CONTROL_PLANE_NAME`]
    /// sent with the CA (the agent checks the CA against its pin); client
    /// certificates the CA signed are verified, and a connection without
    /// one may only join.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let key = KeyPair::generate().map_err(failed)?;
        let mut params =
            CertificateParams::new(vec![CONTROL_PLANE_NAME.to_string()]).map_err(failed)?;
        params
            .distinguished_name
            .push(DnType::CommonName, CONTROL_PLANE_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = commons_clock::now_secs() as i64;
        params.not_before = at(now - 3600);
        params.not_after = at(now + 90 * 86_400);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer).map_err(failed)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der.clone()).map_err(failed)?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(failed)?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(failed)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone(), self.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(failed)?;
        Ok(Arc::new(config))
    }
}
