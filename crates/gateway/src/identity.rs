//! Identity assertions: the signed statement of who the user is that the
//! gateway hands every app (`X-Commons-Identity`), so apps need no login of
//! their own.
//!
//! An assertion is a JWT (RFC 7519) signed with the platform's Ed25519 key
//! (`alg: EdDSA`, RFC 8037); the public key is published as a JWKS at
//! [`JWKS_PATH`] on every host. Claims: `iss` ([`ISSUER`]), `sub` (user id),
//! `tier`, `aud` (the site it was issued for), `iat`, `exp` (one minute
//! later) and, for a request a hosted service made on a user's behalf, `via`
//! (the site that made it).

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The header apps read the assertion from.
pub const HEADER: &str = "x-commons-identity";
/// Where the platform's public keys are published.
pub const JWKS_PATH: &str = "/.well-known/commons/jwks.json";
pub const ISSUER: &str = "commons";
/// How long an assertion is valid, in seconds.
pub const LIFETIME_S: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub tier: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Refers to the credential the assertion was made from, so the
    /// gateway can tell whether it still holds when a service passes the
    /// assertion back (an opaque hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

/// The platform's signing key.
pub struct Signer {
    key: SigningKey,
    kid: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write the identity key {path}: {source}")]
    Key {
        path: String,
        source: std::io::Error,
    },
    #[error("the identity key {0} is not 32 bytes; remove it to make a new one")]
    BadKey(String),
    #[error("invalid assertion: {0}")]
    Invalid(&'static str),
}

impl Signer {
    /// Loads the key at `path`, creating it (mode 0600) the first time.
    pub fn open(path: &Path) -> Result<Signer, IdentityError> {
        let io = |source| IdentityError::Key {
            path: path.display().to_string(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::getrandom(&mut seed).expect("the OS random number generator works");
                write_private_file(path, &seed).map_err(io)?;
                seed.to_vec()
            }
            Err(e) => return Err(io(e)),
        };
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| IdentityError::BadKey(path.display().to_string()))?;
        Ok(Signer::from_seed(seed))
    }

    pub fn from_seed(seed: [u8; 32]) -> Signer {
        let key = SigningKey::from_bytes(&seed);
        let kid = B64.encode(&Sha256::digest(key.verifying_key().as_bytes())[..12]);
        Signer { key, kid }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A signed JWT of `claims`.
    pub fn sign(&self, claims: &impl Serialize) -> String {
        let header = serde_json::json!({ "alg": "EdDSA", "typ": "JWT", "kid": self.kid });
        let mut jwt = B64.encode(serde_json::to_vec(&header).expect("json"));
        jwt.push('.');
        jwt.push_str(&B64.encode(serde_json::to_vec(claims).expect("json")));
        let sig = self.key.sign(jwt.as_bytes());
        jwt.push('.');
        jwt.push_str(&B64.encode(sig.to_bytes()));
        jwt
    }

    /// The JWKS document apps verify assertions with.
    pub fn jwks(&self) -> serde_json::Value {
        jwks(&self.verifying_key(), &self.kid)
    }

    /// The claims of `jwt` if this key signed it and it has not expired.
    pub fn verify(&self, jwt: &str, now_s: u64) -> Result<Claims, IdentityError> {
        verify(&self.verifying_key(), jwt, now_s)
    }
}

/// A JWKS with one Ed25519 key.
pub fn jwks(key: &VerifyingKey, kid: &str) -> serde_json::Value {
    serde_json::json!({ "keys": [{
        "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
        "kid": kid, "x": B64.encode(key.as_bytes()),
    }]})
}

/// Verifies `jwt` against `key`, as an app would with the published JWKS.
pub fn verify(key: &VerifyingKey, jwt: &str, now_s: u64) -> Result<Claims, IdentityError> {
    let (signed, sig) = jwt
        .rsplit_once('.')
        .ok_or(IdentityError::Invalid("not a JWT"))?;
    let (header, payload) = signed
        .split_once('.')
        .ok_or(IdentityError::Invalid("not a JWT"))?;
    let header: serde_json::Value = B64
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or(IdentityError::Invalid("bad header"))?;
    if header["alg"] != "EdDSA" {
        return Err(IdentityError::Invalid("algorithm is not EdDSA"));
    }
    let sig: [u8; 64] = B64
        .decode(sig)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or(IdentityError::Invalid("bad signature encoding"))?;
    key.verify(signed.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| IdentityError::Invalid("signature does not verify"))?;
    let claims: Claims = B64
        .decode(payload)
        .ok()
        .and_then(|p| serde_json::from_slice(&p).ok())
        .ok_or(IdentityError::Invalid("bad claims"))?;
    if claims.iss != ISSUER {
        return Err(IdentityError::Invalid("wrong issuer"));
    }
    if claims.exp <= now_s {
        return Err(IdentityError::Invalid("expired"));
    }
    Ok(claims)
}

/// Writes `bytes` to `path` atomically, readable only by the platform.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    commons_files::write_durable(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "u1".into(),
            tier: "free".into(),
            aud: "blog".into(),
            iat: 100,
            exp,
            via: None,
            sid: None,
        }
    }

    #[test]
    fn signed_assertions_verify_and_tampering_is_caught() {
        let s = Signer::from_seed([7; 32]);
        let jwt = s.sign(&claims(200));
        assert_eq!(s.verify(&jwt, 150).unwrap(), claims(200));
        assert!(s.verify(&jwt, 200).is_err(), "expired");
        let other = Signer::from_seed([8; 32]);
        assert!(other.verify(&jwt, 150).is_err(), "another key");
        let mut parts: Vec<&str> = jwt.split('.').collect();
        let forged = B64.encode(
            serde_json::to_vec(&Claims {
                sub: "admin".into(),
                ..claims(200)
            })
            .unwrap(),
        );
        parts[1] = &forged;
        assert!(s.verify(&parts.join("."), 150).is_err(), "forged claims");
    }

    #[test]
    fn the_key_persists_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("commons-id-{}", std::process::id()));
        let path = dir.join("identity.key");
        let a = Signer::open(&path).unwrap();
        let b = Signer::open(&path).unwrap();
        assert_eq!(a.kid(), b.kid());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
