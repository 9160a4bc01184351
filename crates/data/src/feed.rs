//! The change feed: events as subscribers see them, and the cursor rules
//! of the atproto firehose.
//!
//! - no cursor: live events only;
//! - a cursor past the newest event: [`FeedError::FutureCursor`];
//! - a cursor inside the retained window: replay after it, then live;
//! - a cursor older than the window: an `OutdatedCursor` info, then the
//!   whole window, then live.

use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// One feed event as stored: a commit or an account change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "$type")]
pub enum Event {
    /// A signed commit and its ops.
    #[serde(rename = "#commit")]
    Commit(CommitEvent),
    /// An account was erased (`active: false`, `status: "deleted"`).
    #[serde(rename = "#account")]
    Account(AccountEvent),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitEvent {
    pub seq: i64,
    pub time: String,
    /// The repository's DID.
    pub repo: String,
    pub rev: String,
    /// The commit's CID.
    pub commit: String,
    pub ops: Vec<FeedOp>,
    /// A CAR (base64) of the commit, the new records and the tree nodes
    /// proving each op — enough to check and invert it.
    pub blocks: String,
    /// Whether `blocks` holds the tree proof (left out when some ops are
    /// hidden from the viewer, since tree nodes name neighbouring keys).
    #[serde(default)]
    pub proof: bool,
    #[serde(skip)]
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedOp {
    pub action: String,
    pub path: String,
    pub cid: Option<String>,
    pub prev: Option<String>,
    pub class: String,
    /// Provenance: the deployment and blueprint revision that wrote it.
    pub app: String,
    pub revision: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountEvent {
    pub seq: i64,
    pub time: String,
    pub did: String,
    pub active: bool,
    pub status: String,
    #[serde(skip)]
    pub user: String,
}

impl Event {
    pub fn seq(&self) -> i64 {
        match self {
            Self::Commit(c) => c.seq,
            Self::Account(a) => a.seq,
        }
    }

    pub fn user(&self) -> &str {
        match self {
            Self::Commit(c) => &c.user,
            Self::Account(a) => &a.user,
        }
    }
}

/// A message on a subscription.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Message {
    Event(Arc<Event>),
    /// `{"$type": "#info", "name": "OutdatedCursor", ...}`
    Info(Info),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Info {
    #[serde(rename = "$type")]
    pub kind: &'static str,
    pub name: &'static str,
    pub message: String,
}

/// A subscription that cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error("cursor {cursor} is in the future: the newest event is {newest}")]
    FutureCursor { cursor: i64, newest: i64 },
}

/// Where a subscription starts, from its cursor and the retained window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Live only.
    Live,
    /// Replay events after this sequence number, then live.
    After(i64),
    /// The cursor fell out of the window: say so, replay it all.
    Outdated { oldest: i64 },
}

/// Applies the firehose's cursor rules.
pub fn start(cursor: Option<i64>, oldest: i64, newest: i64) -> Result<Start, FeedError> {
    let Some(cursor) = cursor else {
        return Ok(Start::Live);
    };
    if cursor > newest {
        return Err(FeedError::FutureCursor { cursor, newest });
    }
    if oldest > 0 && cursor < oldest - 1 {
        return Ok(Start::Outdated { oldest });
    }
    Ok(Start::After(cursor))
}

/// Base64 (standard, padded) of a CAR for JSON transport.
pub fn encode_blocks(car: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(car)
}

pub fn decode_blocks(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_rules() {
        assert_eq!(start(None, 10, 20), Ok(Start::Live));
        assert_eq!(start(Some(15), 10, 20), Ok(Start::After(15)));
        assert_eq!(start(Some(9), 10, 20), Ok(Start::After(9)));
        assert_eq!(start(Some(3), 10, 20), Ok(Start::Outdated { oldest: 10 }));
        assert_eq!(start(Some(0), 1, 20), Ok(Start::After(0)));
        assert!(matches!(
            start(Some(21), 10, 20),
            Err(FeedError::FutureCursor { .. })
        ));
        assert_eq!(start(Some(0), 0, 0), Ok(Start::After(0)));
    }
}
