//! The OpenID provider's RSA key. ID tokens are signed RS256 because it is
//! the one algorithm every OpenID Connect client must accept (Discovery
//! §3 requires providers to offer it); the gateway's identity assertions
//! keep the platform's Ed25519 key.
//!
//! The key is made once (2048-bit, by the `rsa` crate) and kept as PKCS#8
//! DER, mode 0600; signing uses `ring`, whose RSA is constant-time.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use sha2::{Digest, Sha256};

pub struct RsaSigner {
    pair: RsaKeyPair,
    kid: String,
    /// The public key as a JWK.
    jwk: serde_json::Value,
}

impl RsaSigner {
    /// Loads the key at `path`, making it the first time.
    pub fn open(path: &Path) -> Result<RsaSigner, String> {
        let der = match std::fs::read(path) {
            Ok(der) => der,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let der = generate()?;
                if let Some(dir) = path.parent() {
                    crate::private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                commons_runtime::layout::write_whole(path, &der)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                der
            }
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        RsaSigner::from_pkcs8(&der).map_err(|e| {
            format!(
                "{} is not an RSA key ({e}); remove it to make a new one",
                path.display()
            )
        })
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<RsaSigner, String> {
        let pair = RsaKeyPair::from_pkcs8(der).map_err(|e| e.to_string())?;
        let public: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
        let kid = B64.encode(&Sha256::digest(&public.n)[..12]);
        let jwk = serde_json::json!({
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
            "n": B64.encode(&public.n), "e": B64.encode(&public.e),
        });
        Ok(RsaSigner { pair, kid, jwk })
    }

    /// The public key, as one JWK of a JWKS.
    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// A JWT of `claims`, signed RS256.
    pub fn sign(&self, claims: &impl serde::Serialize) -> String {
        let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": self.kid });
        let mut jwt = B64.encode(serde_json::to_vec(&header).expect("json"));
        jwt.push('.');
        jwt.push_str(&B64.encode(serde_json::to_vec(claims).expect("json")));
        let mut sig = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                jwt.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing with a valid key does not fail");
        jwt.push('.');
        jwt.push_str(&B64.encode(sig));
        jwt
    }
}

/// A new 2048-bit RSA key, PKCS#8 DER.
fn generate() -> Result<Vec<u8>, String> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
        .map_err(|e| format!("making an RSA key: {e}"))?;
    Ok(key
        .to_pkcs8_der()
        .map_err(|e| format!("encoding the RSA key: {e}"))?
        .as_bytes()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_with_the_published_key_and_not_after_tampering() {
        let signer = RsaSigner::from_pkcs8(&generate().unwrap()).unwrap();
        let jwt = signer.sign(&serde_json::json!({ "sub": "u_1" }));
        let (signed, sig) = jwt.rsplit_once('.').unwrap();
        let jwk = signer.jwk();
        let n = B64.decode(jwk["n"].as_str().unwrap()).unwrap();
        let e = B64.decode(jwk["e"].as_str().unwrap()).unwrap();
        let public = ring::signature::RsaPublicKeyComponents { n: &n, e: &e };
        let sig = B64.decode(sig).unwrap();
        public
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                signed.as_bytes(),
                &sig,
            )
            .unwrap();
        let forged = signed.replace(&signed[signed.len() - 2..], "AA");
        assert!(public
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                forged.as_bytes(),
                &sig
            )
            .is_err());
        assert_eq!(jwk["alg"], "RS256");
        assert_eq!(jwk["kty"], "RSA");
    }
}
