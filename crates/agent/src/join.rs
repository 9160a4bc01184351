//! A node's identity: joining a control plane once, keeping the key and
//! certificate it got, and renewing the certificate before it expires.
//!
//! Under the agent's data directory, `agent/` (mode 0700) holds
//! `identity.json` (the node's id, the control plane's address and CA pin,
//! the certificate's expiry) and `node.pem` (0600: the certificate and the
//! key made here, which is never sent; one file, replaced whole, so a crash
//! never leaves a key beside a certificate that does not name it).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::ControlPlane;
use crate::protocol::{split_join_token, Certified, JoinRequest, NodeOffer, RenewRequest};
use crate::tls::ClientCert;
use crate::AgentError;

/// Who this node is to its control plane.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub node: String,
    /// `https://HOST:PORT` of the control plane's agent listener.
    pub control_plane: String,
    /// The control plane's CA pin.
    pub pin: String,
    pub not_after: i64,
    pub lifetime_secs: i64,
    pub heartbeat_secs: u64,
    /// The last revision of assignments seen: the next poll resumes after it.
    #[serde(default)]
    pub revision: u64,
}

pub(crate) fn dir(home: &Path) -> PathBuf {
    commons_runtime::Layout::new(home).agent_dir()
}

fn failed(what: &Path) -> impl Fn(std::io::Error) -> AgentError + '_ {
    move |e| AgentError::Failed(format!("{}: {e}", what.display()))
}

impl Identity {
    /// The identity this node joined with.
    pub fn load(home: &Path) -> Result<Identity, AgentError> {
        let path = dir(home).join("identity.json");
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AgentError::Input(format!(
                    "this machine has not joined a control plane ({} is missing); \
                     `commons agent join URL --token TOKEN` joins one",
                    path.display()
                ))
            } else {
                failed(&path)(e)
            }
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::Failed(format!("{}: {e}", path.display())))
    }

    pub fn save(&self, home: &Path) -> Result<(), AgentError> {
        let path = dir(home).join("identity.json");
        let bytes = serde_json::to_vec_pretty(self).expect("serialisable");
        commons_files::write_durable(&path, &bytes).map_err(failed(&path))
    }

    /// A client of the control plane that presents this node's certificate.
    pub fn client(&self, home: &Path) -> Result<ControlPlane, AgentError> {
        let path = dir(home).join("node.pem");
        let pem = std::fs::read_to_string(&path).map_err(failed(&path))?;
        ControlPlane::new(
            &self.control_plane,
            &self.pin,
            Some(ClientCert {
                certificate_pem: &pem,
                key_pem: &pem,
            }),
        )
    }

    /// Whether the certificate expired by `now_secs`: the control plane
    /// accepts it no more, and only a new join token brings the node back.
    pub fn expired(&self, now_secs: i64) -> bool {
        now_secs >= self.not_after
    }

    /// What to do about an expired certificate.
    pub fn expired_error(&self, now_secs: i64) -> AgentError {
        AgentError::Input(format!(
            "node {}'s certificate expired {} ago (the agent was stopped, or could not reach the \
             control plane, for longer than a certificate lasts), and the control plane accepts it \
             no more; ask the provider for a join token and run `commons agent join {} --token \
             TOKEN` again: this machine comes back as node {}, with its sites",
            self.node,
            humantime::format_duration(std::time::Duration::from_secs(
                (now_secs - self.not_after).max(0) as u64
            )),
            self.control_plane,
            self.node
        ))
    }

    /// Whether the certificate is two thirds through its life.
    pub fn due_for_renewal(&self, now_secs: i64) -> bool {
        now_secs >= self.not_after - self.lifetime_secs / 3
    }

    /// Gets a certificate for a new key, over the current certificate's
    /// connection; the new key and certificate replace the old ones.
    pub async fn renew(&mut self, home: &Path, client: &ControlPlane) -> Result<(), AgentError> {
        let (key_pem, csr) = new_key()?;
        let certified = client.renew(&self.node, &RenewRequest { csr }).await?;
        self.keep(home, &key_pem, &certified)
    }

    fn keep(&mut self, home: &Path, key_pem: &str, c: &Certified) -> Result<(), AgentError> {
        let path = dir(home).join("node.pem");
        let pem = format!("{}{key_pem}", c.certificate);
        commons_files::write_durable(&path, pem.as_bytes()).map_err(failed(&path))?;
        self.node = c.node.clone();
        self.not_after = c.not_after;
        self.lifetime_secs = c.lifetime_secs;
        self.heartbeat_secs = c.heartbeat_secs;
        self.save(home)
    }
}

/// A new key pair for the node and a certificate request for it, PEM.
pub(crate) fn new_key() -> Result<(String, String), AgentError> {
    let e = |e: rcgen::Error| AgentError::Failed(format!("the node's key: {e}"));
    let key = rcgen::KeyPair::generate().map_err(e)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "commons node");
    let csr = params
        .serialize_request(&key)
        .map_err(e)?
        .pem()
        .map_err(e)?;
    Ok((key.serialize_pem(), csr))
}

/// Joins the control plane at `url` with a join token: checks the CA
/// against the token's pin, makes the node's key, and keeps the
/// certificate the control plane signs for it.
pub async fn join(
    home: &Path,
    url: &str,
    token: &str,
    offer: NodeOffer,
) -> Result<Identity, AgentError> {
    let Some((pin, _)) = split_join_token(token) else {
        return Err(AgentError::Input(
            "that is not a join token (they start with cmnj_ and carry the CA's pin); \
             a provider makes one in the console or with `POST /api/orgs/ORG/join-tokens`"
                .into(),
        ));
    };
    let agent_dir = dir(home);
    // A machine that joined already comes back as the same node when its
    // certificate expired (same control plane); otherwise it is told so.
    let known = if agent_dir.join("identity.json").exists() {
        let known = Identity::load(home)?;
        let now = commons_clock::now_secs() as i64;
        if known.pin != pin || !known.expired(now) {
            return Err(AgentError::Input(format!(
                "this machine already joined {} as node {}{}; remove {} to join again",
                known.control_plane,
                known.node,
                if known.pin == pin {
                    " and its certificate is good: `commons agent run` starts it"
                } else {
                    ""
                },
                agent_dir.display()
            )));
        }
        Some(known)
    } else {
        None
    };
    commons_files::private_dir(&agent_dir).map_err(failed(&agent_dir))?;
    let (key_pem, csr) = new_key()?;
    let client = ControlPlane::new(url, pin, None)?;
    let certified = client
        .join(&JoinRequest {
            token: token.to_string(),
            csr,
            offer,
            node: known.as_ref().map(|k| k.node.clone()),
        })
        .await?;
    let mut identity = match known {
        // The assignments resume where they were.
        Some(known) => Identity {
            control_plane: url.trim_end_matches('/').to_string(),
            ..known
        },
        None => Identity {
            node: certified.node.clone(),
            control_plane: url.trim_end_matches('/').to_string(),
            pin: pin.to_string(),
            not_after: 0,
            lifetime_secs: 0,
            heartbeat_secs: 0,
            revision: 0,
        },
    };
    identity.keep(home, &key_pem, &certified)?;
    Ok(identity)
}
