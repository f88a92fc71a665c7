//! A blocking client of the rendezvous store, used by workers (register, keys, heartbeats) and by
//! launchers (join, node reports). One request, one response, on one TCP connection; every call
//! has a socket timeout a little above the wait it asks the store for. A connection opens with
//! the handshake of [`super::auth`]; every later frame is tagged with its session, and an answer
//! whose tag does not verify is an error.

use super::auth::{self, Credentials, Role, Session};
use super::protocol::{
    decode, read_raw, to_json, write_raw, Frame, FrameError, GangView, NodeEvent, RefusalKind,
    Reply, Request, Response, NO_TAG,
};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Added to a request's own wait to give its socket timeout (the network and a busy store).
const SLACK: Duration = Duration::from_secs(10);

/// Errors of talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot reach the rendezvous store at {addr} within {secs:.1} s: {last} \
         (is node 0's launcher running, and MASTER_ADDR/MASTER_PORT right?)"
    )]
    Unreachable {
        addr: String,
        secs: f64,
        last: String,
    },
    #[error("rendezvous store at {addr}, {op}: {cause}")]
    Io {
        addr: String,
        op: &'static str,
        cause: FrameError,
    },
    #[error("rendezvous store at {addr} refused {op}: {message}")]
    Refused {
        addr: String,
        op: &'static str,
        kind: RefusalKind,
        message: String,
    },
    #[error(
        "rendezvous store at {addr}, {op}: its answer is not authenticated with this run's \
         secret (another run's store, or a different {}/{} on this node?)",
        auth::SECRET_FILE_ENV,
        auth::SECRET_ENV
    )]
    Unauthenticated { addr: String, op: &'static str },
    #[error("rendezvous store at {addr}, {op}: unexpected answer {answer}")]
    Unexpected {
        addr: String,
        op: &'static str,
        answer: String,
    },
}

impl StoreError {
    /// The refusal's kind, when the store refused.
    pub fn refusal_kind(&self) -> Option<RefusalKind> {
        match self {
            StoreError::Refused { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// A connection to the store of one run.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
    run_id: String,
    session: Session,
}

/// What a worker tells the store when it registers.
#[derive(Clone, Debug)]
pub struct Registration {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub generation: u64,
    pub config_hash: String,
    pub pid: u32,
    pub host: String,
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl StoreClient {
    /// Connects to `addr` (`host:port`) and opens a session with `creds`, retrying every 100 ms
    /// until `timeout` has passed (node 0's launcher may start after the others). A refusal of the
    /// handshake (another run's store) is returned at once.
    pub fn connect(
        addr: &str,
        creds: &Credentials,
        timeout: Duration,
    ) -> Result<StoreClient, StoreError> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let last = match try_connect(addr, deadline) {
                Ok(stream) => match handshake(stream, addr, creds) {
                    Ok(client) => return Ok(client),
                    Err(e @ (StoreError::Refused { .. } | StoreError::Unexpected { .. })) => {
                        return Err(e)
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(StoreError::Unreachable {
                    addr: addr.to_string(),
                    secs: started.elapsed().as_secs_f64(),
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The store's address as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// This end's IP address on the connection: the interface that reaches the store, which is
    /// the one ring neighbours on other nodes can reach too.
    pub fn local_ip(&self) -> io::Result<IpAddr> {
        Ok(self.stream.local_addr()?.ip())
    }

    /// Sends one request and reads its response; `wait` is how long the store may take.
    pub fn call(
        &mut self,
        op: &'static str,
        body: Request,
        wait: Duration,
    ) -> Result<Reply, StoreError> {
        let io_err = |cause| StoreError::Io {
            addr: self.addr.clone(),
            op,
            cause,
        };
        self.stream
            .set_read_timeout(Some(wait + SLACK))
            .map_err(|e| io_err(e.into()))?;
        self.stream
            .set_write_timeout(Some(SLACK))
            .map_err(|e| io_err(e.into()))?;
        let frame = Frame {
            run_id: self.run_id.clone(),
            body,
        };
        let json = to_json(&frame).map_err(io_err)?;
        let tag = self.session.seal(&json);
        write_raw(&mut self.stream, &tag, &json).map_err(io_err)?;
        let (tag, json) = read_raw(&mut self.stream).map_err(io_err)?;
        let verified = self.session.open(&tag, &json).is_ok();
        let answer: Frame<Response> = decode(&json).map_err(io_err)?;
        // A refusal is reported whatever run it names (a wrong run id is refused by the store's),
        // and even untagged: the store refuses a frame it cannot authenticate without a tag, and a
        // forged refusal can do no more than end this call, as a dropped connection would.
        // Anything else must verify.
        if !verified && !matches!(answer.body, Response::Err(_)) {
            return Err(StoreError::Unauthenticated {
                addr: self.addr.clone(),
                op,
            });
        }
        let reply = match answer.body {
            Response::Ok(reply) => reply,
            Response::Err(r) => {
                return Err(StoreError::Refused {
                    addr: self.addr.clone(),
                    op,
                    kind: r.kind,
                    message: r.message,
                })
            }
        };
        if answer.run_id != self.run_id {
            return Err(StoreError::Unexpected {
                addr: self.addr.clone(),
                op,
                answer: format!(
                    "from run '{}', expected run '{}'",
                    answer.run_id, self.run_id
                ),
            });
        }
        Ok(reply)
    }

    fn unexpected(&self, op: &'static str, reply: Reply) -> StoreError {
        StoreError::Unexpected {
            addr: self.addr.clone(),
            op,
            answer: format!("{reply:?}"),
        }
    }

    /// Registers a worker and waits (up to `timeout`) until every rank has: the rendezvous.
    /// Returns the world size the store agreed on.
    pub fn register(&mut self, r: &Registration, timeout: Duration) -> Result<usize, StoreError> {
        let body = Request::Register {
            rank: r.rank,
            world_size: r.world_size,
            local_rank: r.local_rank,
            generation: r.generation,
            config_hash: r.config_hash.clone(),
            pid: r.pid,
            host: r.host.clone(),
            timeout_ms: millis(timeout),
        };
        match self.call("register", body, timeout)? {
            Reply::Registered { world_size } => Ok(world_size),
            other => Err(self.unexpected("register", other)),
        }
    }

    pub fn set(&mut self, generation: u64, key: &str, value: &str) -> Result<(), StoreError> {
        let body = Request::Set {
            generation,
            key: key.into(),
            value: value.into(),
        };
        match self.call("set", body, Duration::ZERO)? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected("set", other)),
        }
    }

    /// The value of `key`, waiting up to `timeout` for it to be set.
    pub fn get(
        &mut self,
        generation: u64,
        key: &str,
        timeout: Duration,
    ) -> Result<String, StoreError> {
        let body = Request::Get {
            generation,
            key: key.into(),
            timeout_ms: millis(timeout),
        };
        match self.call("get", body, timeout)? {
            Reply::Value { value } => Ok(value),
            other => Err(self.unexpected("get", other)),
        }
    }

    /// Waits until every rank of `generation` has entered the barrier `name`.
    pub fn barrier(
        &mut self,
        generation: u64,
        rank: usize,
        name: &str,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        let body = Request::Barrier {
            generation,
            rank,
            name: name.into(),
            timeout_ms: millis(timeout),
        };
        match self.call("barrier", body, timeout)? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected("barrier", other)),
        }
    }

    /// Sends a heartbeat; returns the store's abort reason when the gang is being stopped.
    pub fn heartbeat(
        &mut self,
        generation: u64,
        rank: usize,
        progress: u64,
    ) -> Result<Option<String>, StoreError> {
        let body = Request::Heartbeat {
            generation,
            rank,
            progress,
        };
        match self.call("heartbeat", body, Duration::ZERO)? {
            Reply::Alive { abort } => Ok(abort),
            other => Err(self.unexpected("heartbeat", other)),
        }
    }

    pub fn deregister(&mut self, generation: u64, rank: usize) -> Result<(), StoreError> {
        match self.call(
            "deregister",
            Request::Deregister { generation, rank },
            Duration::ZERO,
        )? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected("deregister", other)),
        }
    }

    /// A launcher joins as `node_rank` of `nodes`; returns the generation to start once every
    /// node has joined (waits up to `timeout`).
    pub fn join_node(
        &mut self,
        node_rank: usize,
        nodes: usize,
        procs_per_node: usize,
        max_restarts: u32,
        timeout: Duration,
    ) -> Result<u64, StoreError> {
        let body = Request::JoinNode {
            node_rank,
            nodes,
            procs_per_node,
            max_restarts,
            timeout_ms: millis(timeout),
        };
        match self.call("join", body, timeout)? {
            Reply::Joined { generation } => Ok(generation),
            other => Err(self.unexpected("join", other)),
        }
    }

    /// A launcher's report; returns the gang's state.
    pub fn node_update(
        &mut self,
        node_rank: usize,
        generation: u64,
        event: Option<NodeEvent>,
    ) -> Result<GangView, StoreError> {
        let body = Request::NodeUpdate {
            node_rank,
            generation,
            event,
        };
        match self.call("node update", body, Duration::ZERO)? {
            Reply::Gang(view) => Ok(view),
            other => Err(self.unexpected("node update", other)),
        }
    }
}

/// The handshake: `hello` with our nonce, the store's nonce back, the session key.
fn handshake(
    mut stream: TcpStream,
    addr: &str,
    creds: &Credentials,
) -> Result<StoreClient, StoreError> {
    let op = "hello";
    let io_err = |cause| StoreError::Io {
        addr: addr.to_string(),
        op,
        cause,
    };
    stream
        .set_read_timeout(Some(SLACK))
        .map_err(|e| io_err(e.into()))?;
    stream
        .set_write_timeout(Some(SLACK))
        .map_err(|e| io_err(e.into()))?;
    let ours = auth::nonce().map_err(|e| io_err(e.into()))?;
    let hello = Frame {
        run_id: creds.run_id.clone(),
        body: Request::Hello {
            version: auth::VERSION,
            nonce: auth::hex(&ours),
        },
    };
    write_raw(&mut stream, &NO_TAG, &to_json(&hello).map_err(io_err)?).map_err(io_err)?;
    let (_, json) = read_raw(&mut stream).map_err(io_err)?;
    let answer: Frame<Response> = decode(&json).map_err(io_err)?;
    let unexpected = |answer: String| StoreError::Unexpected {
        addr: addr.to_string(),
        op,
        answer,
    };
    let theirs = match answer.body {
        Response::Ok(Reply::Challenge { nonce }) => auth::parse_nonce(&nonce).ok_or_else(|| {
            unexpected(format!(
                "a challenge nonce '{nonce}' that is not 32 bytes of hex"
            ))
        })?,
        Response::Ok(other) => return Err(unexpected(format!("{other:?}"))),
        Response::Err(r) => {
            return Err(StoreError::Refused {
                addr: addr.to_string(),
                op,
                kind: r.kind,
                message: r.message,
            })
        }
    };
    Ok(StoreClient {
        stream,
        addr: addr.to_string(),
        run_id: creds.run_id.clone(),
        session: Session::new(&creds.secret, &creds.run_id, &ours, &theirs, Role::Client),
    })
}

fn try_connect(addr: &str, deadline: Instant) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{addr} resolves to nothing"),
    );
    for a in addrs {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}
