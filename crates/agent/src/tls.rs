//! The agent's side of TLS: the control plane is trusted by the pin of its
//! CA, never by DNS or the machine's roots, and the agent proves who it is
//! with its own certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::protocol::{pin_of, CONTROL_PLANE_NAME};
use crate::AgentError;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts a server whose chain carries the pinned CA and whose certificate
/// that CA signed for [`CONTROL_PLANE_NAME`]. Any other CA — a man in the
/// middle's, or the machine's roots — is refused.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refused = || {
            rustls::Error::General(
                "the control plane's CA is not the one the join token pins".into(),
            )
        };
        let ca = intermediates
            .iter()
            .find(|c| pin_of(c) == self.pin)
            .ok_or_else(refused)?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|_| refused())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = ServerName::try_from(CONTROL_PLANE_NAME).expect("a valid DNS name");
        verifier.verify_server_cert(end_entity, &[], &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The node's certificate and key, PEM, as the agent keeps them.
pub struct ClientCert<'a> {
    pub certificate_pem: &'a str,
    pub key_pem: &'a str,
}

/// A TLS client for the control plane whose CA has `pin`; with `cert`, it
/// presents the node's certificate.
pub fn client_config(pin: &str, cert: Option<ClientCert<'_>>) -> Result<ClientConfig, AgentError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Failed(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            pin: pin.to_string(),
            provider,
        }));
    match cert {
        None => Ok(builder.with_no_client_auth()),
        Some(c) => {
            let chain = pem_certificates(c.certificate_pem)?;
            let key = pem_key(c.key_pem)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| AgentError::Failed(format!("the node's certificate: {e}")))
        }
    }
}

fn pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AgentError::Failed(format!("the node's certificate: {e}")))
}

fn pem_key(pem: &str) -> Result<PrivateKeyDer<'static>, AgentError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| AgentError::Failed(format!("the node's key: {e}")))
}
