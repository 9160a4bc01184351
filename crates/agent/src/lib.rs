//! The node agent (`commons agent`), milestone 5.
//!
//! A provider's machine joins a control plane once, with a single-use,
//! expiring join token that carries a pin of the control plane's CA key
//! ([`join`]): a man in the middle, with any other CA, is refused before the
//! token is sent. The agent makes its own key, which never leaves the
//! machine, and gets a short-lived client certificate for it; from then on
//! it speaks to the control plane only over mutual TLS, dialing out
//! ([`client`]), so a node behind NAT opens no port. It long-polls its
//! assignments, runs each with the engine on its own data directory
//! ([`ops`]: a closed set of operations, idempotent by operation id — there is
//! no remote shell), and reports heartbeats, results and usage ([`run`]).
//!
//! Requests for its sites come the same way ([`tunnel`]): the agent dials a
//! tunnel, and the control plane's gateway sends each connection to a site
//! through it, so a node serves its sites without opening a port.
//!
//! The wire types both sides speak are in [`protocol`]. [`simulate`] stands
//! for a fleet of nodes that run nothing, for benchmarks of the control
//! planes.

#![forbid(unsafe_code)]

pub mod client;
pub mod join;
pub mod ops;
pub mod protocol;
pub mod run;
pub mod simulate;
pub mod tls;
pub mod tunnel;
pub mod usage;

pub use join::{join, Identity};
pub use run::{run, AgentSettings};

/// Why the agent could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Something the provider can fix: a bad token, a wrong pin, a busy
    /// data directory.
    #[error("{0}")]
    Input(String),
    /// The control plane refused (its problem's detail).
    #[error("the control plane refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}
