//! The rendezvous store's wire protocol, shared by the store (the launcher's `store` module),
//! the workers and the launchers.
//!
//! A frame is a big-endian `u32` length, then that many bytes: a 32-byte tag and JSON, at most
//! [`MAX_FRAME`] bytes in all. The JSON is a [`Frame`]: the run id and a body, a [`Request`] from
//! a client or a [`Response`] from the store. The tag authenticates the frame
//! ([`super::auth::Session`]): a connection opens with [`Request::Hello`] and the store's
//! [`Reply::Challenge`] (both untagged: zeros), and every later frame, both ways, carries the
//! HMAC of its connection's session. The store answers every request with exactly one response
//! on the same connection, in order. A frame that is too long, is not such JSON, carries another
//! run id or a tag that does not verify is answered with a [`Refusal`] naming what was wrong, and
//! the connection is closed.
//!
//! Every request that waits carries its own timeout (`timeout_ms`), set from the run config;
//! the store never waits longer, and clients put a socket timeout a little above it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{self, Read, Write};

pub use super::auth::TAG_LEN;

/// The hard cap on a frame's length in bytes (the length prefix excluded, the tag included).
pub const MAX_FRAME: usize = 1 << 20;

/// The tag of the handshake's frames, which no session covers yet.
pub const NO_TAG: [u8; TAG_LEN] = [0; TAG_LEN];

/// One message: the run id and a body.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Frame<T> {
    pub run_id: String,
    pub body: T,
}

/// What a client asks the store. Workers register, exchange keys, pass barriers and send
/// heartbeats; launchers join as nodes and report what happens to their workers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The first frame of every connection: the protocol version and the client's nonce (hex),
    /// answered with [`Reply::Challenge`].
    Hello { version: u32, nonce: String },
    /// A worker joins the gang of `generation`; answered once every rank has registered (the
    /// rendezvous), or with a refusal.
    Register {
        rank: usize,
        world_size: usize,
        local_rank: usize,
        generation: u64,
        /// sha256 of the resolved config (the trainer's `RunConfig::hash`).
        config_hash: String,
        pid: u32,
        host: String,
        timeout_ms: u64,
    },
    /// Stores `value` under `key` for this generation (a key is written once).
    Set {
        generation: u64,
        key: String,
        value: String,
    },
    /// The value of `key`, waiting up to `timeout_ms` for some rank to set it.
    Get {
        generation: u64,
        key: String,
        timeout_ms: u64,
    },
    /// Returns when every rank of the generation has entered the barrier `name`.
    Barrier {
        generation: u64,
        rank: usize,
        name: String,
        timeout_ms: u64,
    },
    /// "Still alive", from a worker's heartbeat thread. `progress` counts its collectives.
    Heartbeat {
        generation: u64,
        rank: usize,
        progress: u64,
    },
    /// The worker is leaving (finished, or failing on its own): stop watching its heartbeats.
    Deregister { generation: u64, rank: usize },
    /// A node's launcher joins; answered once all `nodes` have joined.
    JoinNode {
        node_rank: usize,
        nodes: usize,
        procs_per_node: usize,
        max_restarts: u32,
        timeout_ms: u64,
    },
    /// A launcher's periodic report (also its heartbeat); answered with the gang's state.
    NodeUpdate {
        node_rank: usize,
        generation: u64,
        event: Option<NodeEvent>,
    },
}

/// What a launcher tells the store about its node's workers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeEvent {
    /// A worker exited non-zero (or could not start): stop and restart the gang.
    WorkerFailed { reason: String },
    /// The launcher got SIGINT/SIGTERM: workers should checkpoint and exit; no restart.
    Interrupted { reason: String },
    /// Every worker of this node for this generation has exited (after a stop).
    Stopped,
    /// Every worker of this node exited 0.
    Done,
}

/// The store's answer: a reply, or a refusal naming what was wrong.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Ok(Reply),
    Err(Refusal),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// The store's nonce (hex), answering [`Request::Hello`]: the connection's session key is now
    /// known to both ends.
    Challenge {
        nonce: String,
    },
    /// The rendezvous is complete.
    Registered {
        world_size: usize,
    },
    /// Set, barrier or deregister done.
    Done,
    Value {
        value: String,
    },
    /// Heartbeat received. `abort`: the gang is being stopped after a failure; collectives should
    /// give up (an interrupt, which wants a checkpoint, does not set it).
    Alive {
        abort: Option<String>,
    },
    /// Every node has joined; workers of `generation` may start.
    Joined {
        generation: u64,
    },
    Gang(GangView),
}

/// Why the store refused a request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    WrongRunId,
    /// The frame's tag does not verify with the run's secret, or the handshake was wrong.
    Unauthenticated,
    Oversized,
    Malformed,
    DuplicateRank,
    WorldSizeMismatch,
    ConfigMismatch,
    NodeMismatch,
    BadRequest,
    StaleGeneration,
    Timeout,
    /// The gang is stopping or over; the request is moot.
    Stopping,
}

/// The gang as the store sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GangView {
    /// The current generation (0, then one more per restart).
    pub generation: u64,
    pub restarts: u32,
    pub max_restarts: u32,
    pub phase: Phase,
    /// How many nodes have been answered with the final phase (node 0's launcher keeps the
    /// store up until all have, so none mistakes the end for a lost store).
    pub informed: usize,
}

/// Where the gang stands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Phase {
    /// Workers of the current generation run.
    Running,
    /// Every launcher must stop its workers (SIGTERM, grace, SIGKILL) and report `Stopped`.
    Stopping {
        cause: StopCause,
        reason: String,
    },
    /// Terminal states.
    Finished,
    Failed {
        reason: String,
    },
    /// A misconfiguration that a restart cannot fix (config or world size disagreement, ...).
    Refused {
        reason: String,
    },
    Interrupted {
        reason: String,
    },
}

impl Phase {
    pub fn is_over(&self) -> bool {
        matches!(
            self,
            Phase::Finished
                | Phase::Failed { .. }
                | Phase::Refused { .. }
                | Phase::Interrupted { .. }
        )
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StopCause {
    /// A worker died or went silent: restart if restarts remain.
    Failure,
    /// A launcher was asked to stop: workers checkpoint; no restart.
    Interrupt,
    /// A misconfiguration: no restart.
    Refused,
    /// A node's launcher went silent: its workers cannot be restarted; no restart.
    NodeLost,
}

/// Errors of reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the cap of {MAX_FRAME} bytes")]
    Oversized { len: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    /// The refusal a store sends back for this error (`None` for I/O errors, which end the
    /// connection without an answer).
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            FrameError::Io(_) => None,
            FrameError::Oversized { .. } => Some(Refusal {
                kind: RefusalKind::Oversized,
                message: self.to_string(),
            }),
            FrameError::Malformed(_) => Some(Refusal {
                kind: RefusalKind::Malformed,
                message: self.to_string(),
            }),
        }
    }
}

/// The JSON of a frame, checked against the cap.
pub fn to_json<T: Serialize>(frame: &Frame<T>) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if TAG_LEN + json.len() > MAX_FRAME {
        return Err(FrameError::Oversized {
            len: TAG_LEN + json.len(),
        });
    }
    Ok(json)
}

/// The bytes on the wire: length prefix, tag, JSON.
pub fn encode(tag: &[u8; TAG_LEN], json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + TAG_LEN + json.len());
    out.extend_from_slice(&((TAG_LEN + json.len()) as u32).to_be_bytes());
    out.extend_from_slice(tag);
    out.extend_from_slice(json);
    out
}

/// Checks a length prefix against the cap and the tag's length.
pub fn check_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::Oversized { len });
    }
    if len == 0 {
        return Err(FrameError::Malformed("empty frame".into()));
    }
    if len <= TAG_LEN {
        return Err(FrameError::Malformed(format!(
            "a frame of {len} bytes has no room for its {TAG_LEN}-byte tag and a body"
        )));
    }
    Ok(len)
}

/// Splits a frame's bytes (after the length prefix) into its tag and JSON.
pub fn split(mut body: Vec<u8>) -> ([u8; TAG_LEN], Vec<u8>) {
    let json = body.split_off(TAG_LEN.min(body.len()));
    let mut tag = NO_TAG;
    tag[..body.len()].copy_from_slice(&body);
    (tag, json)
}

/// Parses a frame's JSON.
pub fn decode<T: DeserializeOwned>(json: &[u8]) -> Result<Frame<T>, FrameError> {
    serde_json::from_slice(json).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Writes one frame with `tag`.
pub fn write_raw(w: &mut impl Write, tag: &[u8; TAG_LEN], json: &[u8]) -> Result<(), FrameError> {
    w.write_all(&encode(tag, json))?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's tag and JSON (blocking, subject to the stream's read timeout).
pub fn read_raw(r: &mut impl Read) -> Result<([u8; TAG_LEN], Vec<u8>), FrameError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let len = check_len(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(split(body))
}

/// Reads one frame and parses it without looking at its tag (tests, and refusals).
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<Frame<T>, FrameError> {
    decode(&read_raw(r)?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_the_cap_holds_both_ways() {
        let f = Frame {
            run_id: "r1".into(),
            body: Request::Get {
                generation: 2,
                key: "ring/addr/1".into(),
                timeout_ms: 10,
            },
        };
        let bytes = encode(&[7; TAG_LEN], &to_json(&f).unwrap());
        let (tag, json) = read_raw(&mut &bytes[..]).unwrap();
        assert_eq!(tag, [7; TAG_LEN]);
        assert_eq!(decode::<Request>(&json).unwrap(), f);

        let big = Frame {
            run_id: "r1".into(),
            body: Request::Set {
                generation: 0,
                key: "k".into(),
                value: "x".repeat(MAX_FRAME),
            },
        };
        assert!(matches!(to_json(&big), Err(FrameError::Oversized { .. })));
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let e = read_frame::<Request>(&mut &huge[..]).unwrap_err();
        assert!(e.to_string().contains("exceeds the cap"), "{e}");
    }

    #[test]
    fn malformed_frames_say_what_is_wrong() {
        let mut bad = (TAG_LEN as u32 + 5).to_be_bytes().to_vec();
        bad.extend_from_slice(&NO_TAG);
        bad.extend_from_slice(b"hello");
        let e = read_frame::<Request>(&mut &bad[..]).unwrap_err();
        assert!(matches!(e, FrameError::Malformed(_)), "{e}");
        // A frame without a run id.
        let json = br#"{"body":{"deregister":{"generation":0,"rank":0}}}"#;
        let e = decode::<Request>(json).unwrap_err();
        assert!(e.to_string().contains("run_id"), "{e}");
        let e = read_frame::<Request>(&mut &[0u8, 0, 0, 0][..]).unwrap_err();
        assert!(e.to_string().contains("empty frame"), "{e}");
        let e = read_frame::<Request>(&mut &[0u8, 0, 0, 9][..]).unwrap_err();
        assert!(e.to_string().contains("no room for its 32-byte tag"), "{e}");
    }
}
