//! What the gateway remembers about credentials: who a credential stands
//! for (a bounded cache, unknown ones included, so a flood of made-up
//! tokens costs one platform look-up each and never a scan), which
//! credential an identity assertion was made from (so a service's call on a
//! user's behalf ends when that credential is revoked), and the signed
//! `state` of a browser's sign-in.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::hmac;

/// A map of at most about `2 * capacity` entries: when the current
/// generation is full it becomes the previous one and the one before is
/// dropped whole. Every operation is O(1); the lock is held for a map
/// operation only.
pub(crate) struct Generations<K, V> {
    capacity: usize,
    maps: Mutex<(HashMap<K, V>, HashMap<K, V>)>,
}

impl<K: Eq + Hash, V: Clone> Generations<K, V> {
    pub(crate) fn new(capacity: usize) -> Generations<K, V> {
        Generations {
            capacity,
            maps: Mutex::new((HashMap::new(), HashMap::new())),
        }
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.0.get(key).or_else(|| maps.1.get(key)).cloned()
    }

    pub(crate) fn insert(&self, key: K, value: V) {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        if maps.0.len() >= self.capacity {
            let current = std::mem::take(&mut maps.0);
            maps.1 = current;
        }
        maps.0.insert(key, value);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.0.len() + maps.1.len()
    }
}

/// Credentials recognised per generation (so at most twice this many are
/// held, about 200 bytes each).
pub(crate) const CACHE_GENERATION: usize = 50_000;
/// How long a recognised credential is trusted without asking again.
pub(crate) const KNOWN_FOR: Duration = Duration::from_secs(30);
/// How long an unknown credential is remembered as unknown: long enough
/// that repeating one costs nothing, short enough that a token just made
/// works at once.
pub(crate) const UNKNOWN_FOR: Duration = Duration::from_secs(5);

/// A credential's identity (None: not recognised) and until when it holds.
pub(crate) type Entry<I> = (Option<Arc<I>>, Instant);

/// The signed `state` of a browser's sign-in: made by the gateway for one
/// host, good for ten minutes, checked with a key that never leaves the
/// gateway. A platform page cannot be handed a state the gateway did not
/// make.
pub(crate) struct SignInStates {
    key: hmac::Key,
}

/// How long a browser has to come back from signing in.
pub(crate) const SIGN_IN_FOR_S: u64 = 600;

impl SignInStates {
    pub(crate) fn new() -> SignInStates {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).expect("the OS random number generator works");
        SignInStates {
            key: hmac::Key::new(hmac::HMAC_SHA256, &seed),
        }
    }

    /// A fresh state for a sign-in that comes back to `host`.
    pub(crate) fn mint(&self, host: &str, now_s: u64) -> String {
        let mut nonce = [0u8; 16];
        getrandom::getrandom(&mut nonce).expect("the OS random number generator works");
        let body = format!("{}.{}", to_hex(&nonce), now_s + SIGN_IN_FOR_S);
        let tag = hmac::sign(&self.key, &sign_input(host, &body));
        format!("{body}.{}", to_hex(tag.as_ref()))
    }

    /// True when `state` was made by this gateway for `host` and has not
    /// expired.
    pub(crate) fn check(&self, state: &str, host: &str, now_s: u64) -> bool {
        let Some((body, tag)) = state.rsplit_once('.') else {
            return false;
        };
        let Some(expiry) = body
            .split_once('.')
            .and_then(|(_, e)| e.parse::<u64>().ok())
        else {
            return false;
        };
        let Some(tag) = from_hex(tag) else {
            return false;
        };
        expiry > now_s && hmac::verify(&self.key, &sign_input(host, body), &tag).is_ok()
    }
}

fn sign_input(host: &str, body: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(host.len() + 1 + body.len());
    v.extend_from_slice(host.as_bytes());
    v.push(b'\n');
    v.extend_from_slice(body.as_bytes());
    v
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The reference an assertion carries to the credential it was made from
/// (`sid`): a hash, so the assertion reveals nothing usable.
pub(crate) fn session_ref(credential: &str) -> Arc<str> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(credential.as_bytes());
    Arc::from(to_hex(&digest[..16]).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_holds_for_its_host_until_it_expires() {
        let states = SignInStates::new();
        let s = states.mint("a.test", 1000);
        assert!(states.check(&s, "a.test", 1000));
        assert!(!states.check(&s, "b.test", 1000));
        assert!(!states.check(&s, "a.test", 1000 + SIGN_IN_FOR_S));
        // Made up, or changed: refused.
        let (body, _) = s.rsplit_once('.').unwrap();
        assert!(!states.check(&format!("{body}.00"), "a.test", 1000));
        let forged = s.replacen(&(1000 + SIGN_IN_FOR_S).to_string(), "99999999", 1);
        assert!(!states.check(&forged, "a.test", 1000));
        assert!(!states.check("x", "a.test", 1000));
        assert!(!SignInStates::new().check(&s, "a.test", 1000));
    }

    #[test]
    fn generations_stay_bounded() {
        let g = Generations::new(10);
        for i in 0..1000 {
            g.insert(i, i);
        }
        assert!(g.len() <= 20);
        assert_eq!(g.get(&999), Some(999));
        assert_eq!(g.get(&0), None);
    }
}
