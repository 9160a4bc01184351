//! Repository signing keys: P-256 and K-256 ECDSA as atproto uses them.
//!
//! Signatures are over the SHA-256 of the message, 64 bytes `r || s`, and
//! always low-S: a high-S or DER-encoded signature is refused on
//! verification, so every signature has exactly one valid form. Public
//! keys travel as `did:key` (multibase base58btc of a multicodec-prefixed
//! compressed point).

use std::fmt;

use k256::ecdsa::signature::{Signer, Verifier};
use rand_core::OsRng;

/// The two curves atproto accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// NIST P-256 (`ES256`).
    P256,
    /// secp256k1 (`ES256K`).
    K256,
}

impl Algorithm {
    /// The JWT name of the algorithm.
    pub fn jwt_name(self) -> &'static str {
        match self {
            Self::P256 => "ES256",
            Self::K256 => "ES256K",
        }
    }

    /// The multicodec prefix (varint) of a compressed public key.
    fn multicodec(self) -> [u8; 2] {
        match self {
            Self::P256 => [0x80, 0x24],
            Self::K256 => [0xe7, 0x01],
        }
    }

    /// The algorithm named by `ES256` / `ES256K` / `p256` / `k256`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "es256" | "p256" | "p-256" => Some(Self::P256),
            "es256k" | "k256" | "k-256" | "secp256k1" => Some(Self::K256),
            _ => None,
        }
    }
}

/// A key that does not parse or a signature that does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{0:?} is not a did:key of a P-256 or K-256 public key")]
    NotDidKey(String),
    #[error("the private key is not a valid {0:?} scalar")]
    BadPrivateKey(Algorithm),
    #[error("the signature is not 64 bytes r||s (DER and other forms are refused)")]
    SignatureShape,
    #[error("the signature is high-S; atproto accepts only low-S signatures")]
    HighS,
    #[error("the signature does not match the key and message")]
    Mismatch,
}

/// A private signing key.
#[derive(Clone)]
pub enum Keypair {
    P256(p256::ecdsa::SigningKey),
    K256(k256::ecdsa::SigningKey),
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Keypair({})", self.public().did_key())
    }
}

impl Keypair {
    /// A fresh key from the operating system's random source.
    pub fn generate(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::P256 => Self::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            Algorithm::K256 => Self::K256(k256::ecdsa::SigningKey::random(&mut OsRng)),
        }
    }

    /// A key from its 32 secret bytes.
    pub fn from_bytes(algorithm: Algorithm, secret: &[u8]) -> Result<Self, KeyError> {
        let bad = || KeyError::BadPrivateKey(algorithm);
        Ok(match algorithm {
            Algorithm::P256 => {
                Self::P256(p256::ecdsa::SigningKey::from_slice(secret).map_err(|_| bad())?)
            }
            Algorithm::K256 => {
                Self::K256(k256::ecdsa::SigningKey::from_slice(secret).map_err(|_| bad())?)
            }
        })
    }

    /// The 32 secret bytes (to be stored encrypted, never logged).
    pub fn to_bytes(&self) -> [u8; 32] {
        match self {
            Self::P256(k) => k.to_bytes().into(),
            Self::K256(k) => k.to_bytes().into(),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::P256(_) => Algorithm::P256,
            Self::K256(_) => Algorithm::K256,
        }
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        match self {
            Self::P256(k) => PublicKey::P256(*k.verifying_key()),
            Self::K256(k) => PublicKey::K256(*k.verifying_key()),
        }
    }

    /// Signs SHA-256(`message`): 64 bytes, low-S.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        match self {
            Self::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(message);
                let sig = sig.normalize_s().unwrap_or(sig);
                sig.to_bytes().into()
            }
            Self::K256(k) => {
                let sig: k256::ecdsa::Signature = k.sign(message);
                let sig = sig.normalize_s().unwrap_or(sig);
                sig.to_bytes().into()
            }
        }
    }
}

/// A public verification key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicKey {
    P256(p256::ecdsa::VerifyingKey),
    K256(k256::ecdsa::VerifyingKey),
}

impl PublicKey {
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::P256(_) => Algorithm::P256,
            Self::K256(_) => Algorithm::K256,
        }
    }

    /// The compressed SEC1 point (33 bytes).
    pub fn compressed(&self) -> Vec<u8> {
        match self {
            Self::P256(k) => k.to_encoded_point(true).as_bytes().to_vec(),
            Self::K256(k) => k.to_encoded_point(true).as_bytes().to_vec(),
        }
    }

    /// The `did:key:z...` form.
    pub fn did_key(&self) -> String {
        let mut bytes = self.algorithm().multicodec().to_vec();
        bytes.extend(self.compressed());
        format!(
            "did:key:{}",
            multibase::encode(multibase::Base::Base58Btc, bytes)
        )
    }

    /// Parses a `did:key` (or its bare multibase part).
    pub fn from_did_key(did: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::NotDidKey(did.chars().take(120).collect());
        let encoded = did.strip_prefix("did:key:").unwrap_or(did);
        let (base, bytes) = multibase::decode(encoded).map_err(|_| bad())?;
        if base != multibase::Base::Base58Btc || bytes.len() < 3 {
            return Err(bad());
        }
        let (prefix, point) = bytes.split_at(2);
        if prefix == Algorithm::P256.multicodec() {
            p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(Self::P256)
                .map_err(|_| bad())
        } else if prefix == Algorithm::K256.multicodec() {
            k256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(Self::K256)
                .map_err(|_| bad())
        } else {
            Err(bad())
        }
    }

    /// Checks a 64-byte low-S signature over SHA-256(`message`).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        if signature.len() != 64 {
            return Err(KeyError::SignatureShape);
        }
        match self {
            Self::P256(k) => {
                let sig = p256::ecdsa::Signature::from_slice(signature)
                    .map_err(|_| KeyError::SignatureShape)?;
                if sig.normalize_s().is_some() {
                    return Err(KeyError::HighS);
                }
                k.verify(message, &sig).map_err(|_| KeyError::Mismatch)
            }
            Self::K256(k) => {
                let sig = k256::ecdsa::Signature::from_slice(signature)
                    .map_err(|_| KeyError::SignatureShape)?;
                if sig.normalize_s().is_some() {
                    return Err(KeyError::HighS);
                }
                k.verify(message, &sig).map_err(|_| KeyError::Mismatch)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip_on_both_curves() {
        for algorithm in [Algorithm::P256, Algorithm::K256] {
            let key = Keypair::generate(algorithm);
            let again = Keypair::from_bytes(algorithm, &key.to_bytes()).unwrap();
            let public = PublicKey::from_did_key(&again.public().did_key()).unwrap();
            let sig = key.sign(b"hello");
            public.verify(b"hello", &sig).unwrap();
            assert_eq!(public.verify(b"hellO", &sig), Err(KeyError::Mismatch));
            assert!(!format!("{key:?}").contains(&format!("{:?}", key.to_bytes())));
        }
    }
}
