//! What the control plane and its node agents say to each other: JSON over
//! HTTP/1.1 over mutual TLS, under `/agent/v1/`.
//!
//! | call | who | what |
//! |---|---|---|
//! | `POST /agent/v1/join` | anyone with a join token (no client certificate) | [`JoinRequest`] → [`Certified`] |
//! | `POST /agent/v1/nodes/ID/renew` | the node ID | [`RenewRequest`] → [`Certified`] |
//! | `POST /agent/v1/nodes/ID/heartbeat` | the node ID | [`Heartbeat`] → 204 |
//! | `GET /agent/v1/nodes/ID/assignments?after=REV&wait=SECS` | the node ID | [`Assignments`] after revision REV, waiting up to SECS for one |
//! | `POST /agent/v1/nodes/ID/operations/OP` | the node ID | [`Report`] of operation OP → 204 |
//! | `POST /agent/v1/nodes/ID/usage` | the node ID | [`UsageBatch`] → 204 |
//! | `PUT /agent/v1/nodes/ID/snapshots/SITE` | the node ID, while it ships SITE away | an increment of SITE's data (`commons_engine::increments`) → 204 |
//! | `GET /agent/v1/nodes/ID/snapshots/SITE` | the node ID, while SITE moves to it | the latest increment shipped |
//! | `POST /agent/v1/nodes/ID/tunnel` (`Upgrade: commons-tunnel/1`) | the node ID | 101, then HTTP/2 with the control plane as the client (`tunnel`) |
//!
//! Every call but `join` is made with the node's certificate; the node in
//! the path must be the certificate's, so a node reads and reports only its
//! own. Operations are a closed set ([`Operation`]): anything else does not
//! decode, and the agent refuses it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The name the control plane's agent listener is certified for, whatever
/// address the agent dials: the pinned CA is what the agent trusts, not DNS.
pub const CONTROL_PLANE_NAME: &str = "control-plane.commons.internal";

/// The prefix of a join token: `cmnj_PIN_SECRET`.
pub const JOIN_TOKEN_PREFIX: &str = "cmnj_";

/// CPU, memory and disk: what a node offers and what a site takes (each 0
/// when not said).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// What a node offers when it joins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeOffer {
    /// Region or jurisdiction, e.g. `eu-west`.
    pub region: String,
    pub capacity: Resources,
    /// CommonCents per month for a small site's resources.
    pub price: u64,
    /// `sandbox`, `postgres`, `volumes`, `images`…
    #[serde(default)]
    pub features: BTreeSet<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    /// A PKCS#10 certificate signing request for the node's key, PEM.
    pub csr: String,
    pub offer: NodeOffer,
    /// The node this machine already is, when its certificate expired (it
    /// was down longer than the certificate lasts): certified again as
    /// that node, with its sites and data, on the provider's new token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr: String,
}

/// A node's certificate: who it is and until when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Certified {
    pub node: String,
    /// PEM.
    pub certificate: String,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// How long a certificate lasts: the agent renews at two thirds of it.
    pub lifetime_secs: i64,
    /// How often to send heartbeats.
    pub heartbeat_secs: u64,
}

/// What runs on the node now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub sites: Vec<SiteState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteState {
    pub site: String,
    pub generation: u64,
    /// `running`, `stopped`, `failed`.
    pub state: String,
}

/// The operations a node accepts: a closed set, each idempotent by its id.
/// There is no remote shell; an operation outside this set does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Operation {
    /// Deploy (or redeploy) a site from its blueprint.
    ApplySite {
        site: String,
        generation: u64,
        /// The blueprint, YAML.
        blueprint: String,
    },
    /// Stop a site's components, keeping its data.
    Stop { site: String },
    /// Remove a site and its data from the node.
    Remove { site: String },
    /// Back a site up on the node.
    Snapshot { site: String },
    /// Restore a site from one of its snapshots on the node (`snapshot`:
    /// its sha256); or, with `increment`, apply that increment of a site
    /// moving here (shipped with this sha256) to the copy the node builds
    /// of it — the site does not start until its cut-over.
    Restore {
        site: String,
        snapshot: String,
        #[serde(default)]
        increment: Option<u64>,
    },
    /// Send the control plane, for node `to`, increment number `increment`
    /// of the site's data: what changed since the increment before (the
    /// first, 0, is everything; so is any increment this node cannot build
    /// on the one before). The site may be serving meanwhile.
    ShipIncrement {
        site: String,
        to: String,
        #[serde(default)]
        increment: u64,
    },
    /// Stop taking writes for a site (before a cut-over): its components
    /// stop, its data stays.
    Freeze { site: String },
    /// Start serving a site: once the last increment of its move (shipped
    /// with this sha256, after the source froze) completes the copy built
    /// here, from that copy; or — without one — from its own data again
    /// (a frozen site resumes).
    CutOver {
        site: String,
        snapshot: Option<String>,
    },
    /// Stop every site: the node is leaving.
    Drain,
}

/// The names of the operations, for errors that list them.
pub const OPERATIONS: &[&str] = &[
    "apply_site",
    "stop",
    "remove",
    "snapshot",
    "restore",
    "ship_increment",
    "freeze",
    "cut_over",
    "drain",
];

impl Operation {
    /// The site it is about (none: the node).
    pub fn site(&self) -> Option<&str> {
        match self {
            Operation::ApplySite { site, .. }
            | Operation::Stop { site }
            | Operation::Remove { site }
            | Operation::Snapshot { site }
            | Operation::Restore { site, .. }
            | Operation::ShipIncrement { site, .. }
            | Operation::Freeze { site }
            | Operation::CutOver { site, .. } => Some(site),
            Operation::Drain => None,
        }
    }
}

/// One operation assigned to a node, at a revision of its assignments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assigned {
    /// Unique; the agent runs an id once, and answers a repeat with the
    /// first run's report.
    pub id: String,
    pub revision: u64,
    /// Kept as JSON until the agent decodes it, so one operation it does not
    /// know is refused on its own, not the whole batch.
    pub operation: serde_json::Value,
}

/// A node's operations after a revision.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Assignments {
    /// The latest revision: ask for what comes after it next.
    pub revision: u64,
    pub operations: Vec<Assigned>,
}

/// How an operation went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `done`, `failed` or `refused` (not an operation this node accepts).
    pub outcome: String,
    pub detail: String,
}

/// Usage the node measured (CloudEvents, as the meter takes them); each
/// names this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UsageBatch {
    pub events: Vec<serde_json::Value>,
}

/// The pin of a CA certificate: the hex SHA-256 of its DER, which binds the
/// CA's key and name together (the CA is made once and kept).
pub fn pin_of(ca_der: &[u8]) -> String {
    let digest = Sha256::digest(ca_der);
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// The hex SHA-256 of a file's bytes, read in pieces.
pub fn sha256_of_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A join token's parts: the CA pin and the secret.
pub fn split_join_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(JOIN_TOKEN_PREFIX)?;
    let (pin, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(pin, 64) && !secret.is_empty()).then_some((pin, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_outside_the_closed_set_do_not_decode() {
        let shell = serde_json::json!({"op": "shell", "command": "cat /etc/shadow"});
        let e = serde_json::from_value::<Operation>(shell).unwrap_err();
        assert!(e.to_string().contains("unknown variant `shell`"), "{e}");
        // A known operation with a field smuggled in is refused too.
        let smuggled = serde_json::json!({"op": "stop", "site": "wiki", "command": "id"});
        assert!(serde_json::from_value::<Operation>(smuggled).is_err());
        for op in OPERATIONS {
            let v = serde_json::json!({"op": op});
            let e = serde_json::from_value::<Operation>(v)
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            assert!(!e.contains("unknown variant"), "{op} is in the set: {e}");
        }
        let drain: Operation = serde_json::from_value(serde_json::json!({"op": "drain"})).unwrap();
        assert_eq!(drain, Operation::Drain);
    }

    #[test]
    fn join_tokens_carry_a_pin() {
        let pin = "ab".repeat(32);
        let token = format!("{JOIN_TOKEN_PREFIX}{pin}_s3cr3t");
        assert_eq!(split_join_token(&token), Some((pin.as_str(), "s3cr3t")));
        assert_eq!(split_join_token("cmnj_abc_s3cr3t"), None);
        assert_eq!(split_join_token(&format!("cmnu_{pin}_x")), None);
        assert_eq!(
            split_join_token(&format!("{JOIN_TOKEN_PREFIX}{pin}_")),
            None
        );
    }
}
