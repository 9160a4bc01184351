//! Names and labels on the cluster: every object the platform makes is
//! named by a DNS label and labelled with its site and component, so it can
//! be listed back (for status and for pruning) without a record of its own.

use sha2::{Digest, Sha256};

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "commons";

/// Label: who manages the object.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label: the site (deployment) an object belongs to.
pub const SITE: &str = "onecommons.org/site";
/// Label: the component (its Kubernetes name) an object belongs to.
pub const COMPONENT: &str = "onecommons.org/component";

/// The label selector of everything the platform made for `site`.
pub fn site_selector(site: &str) -> String {
    format!("{MANAGED_BY}={FIELD_MANAGER},{SITE}={site}")
}

/// `raw` as a DNS label (RFC 1123, at most 63 characters, starting with a
/// letter): lower case, anything but letters, digits and `-` turned into
/// `-`. A name that had to be cut keeps a hash of the whole, so two long
/// names that share their first 54 characters still differ.
pub fn dns_label(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        s.insert(0, 'x');
    }
    if s.len() > 63 {
        let hash = Sha256::digest(raw.as_bytes());
        let hex: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
        s.truncate(54);
        s = format!("{}-{hex}", s.trim_end_matches('-'));
    }
    while s.ends_with('-') {
        s.pop();
    }
    s
}

/// The first `n` hex digits of the SHA-256 of `bytes`.
pub fn short_hash(bytes: &[u8], n: usize) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..n]
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_dns_labels() {
        assert_eq!(dns_label("web"), "web");
        assert_eq!(dns_label("inc.web"), "inc-web");
        assert_eq!(dns_label("2fa"), "x2fa");
        assert_eq!(dns_label("Web_UI."), "web-ui");
        let long = "a".repeat(80);
        let cut = dns_label(&long);
        assert_eq!(cut.len(), 63);
        assert_ne!(cut, dns_label(&format!("{}b", "a".repeat(79))));
        for name in [&long, "inc.web", "x", "commons-my-site"] {
            let l = dns_label(name);
            assert!(l.len() <= 63 && l.starts_with(|c: char| c.is_ascii_lowercase()));
            assert!(l
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        }
    }
}
