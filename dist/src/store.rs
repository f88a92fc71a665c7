//! The rendezvous store: a small TCP server (tokio) that node 0's launcher hosts for one run.
//!
//! It speaks [`crate::protocol`] and keeps, for the run:
//!
//! - the nodes: every launcher joins with its node rank, the node count, procs per node and
//!   max restarts; all must agree, and the gang starts once all have joined;
//! - the gang: its generation (0, then +1 per restart) and [`Phase`]. A launcher reports a failed
//!   worker or an interrupt; the store also declares a failure itself when a registered worker
//!   or a launcher stops sending heartbeats, or the rendezvous does not complete in time. Every
//!   launcher then stops its workers and reports `Stopped`; when all have, the store restarts the
//!   gang (a new generation) if restarts remain and the cause allows it, or ends the run;
//! - the workers of the current generation: registration (rank, world size, config hash,
//!   checked), a key-value space (ring addresses; later the NCCL unique id), named barriers,
//!   heartbeats.
//!
//! Every connection opens with the handshake of [`crate::auth`] and every later frame
//! must carry the tag of its connection's session, checked before the frame is parsed: a frame
//! without the run's secret is refused, logged (with the peer's address, never a secret) and the
//! connection closed, so it can neither register, report, interrupt nor write a key.
//!
//! Bad input is refused with a [`Refusal`] naming what was wrong: frames over the cap, malformed,
//! unauthenticated or carrying another run id get an answer and a closed connection (the run goes
//! on: a stray client must not kill it); a duplicate rank, a world size or config that disagrees, or nodes
//! that disagree end the run as `Refused` (a restart would not fix them), and every waiting
//! participant is told why. Every wait has a timeout that the request carries.

use crate::auth::{self, Role, Secret, Session};
use crate::protocol::{
    self, check_len, decode, encode, split, to_json, Frame, FrameError, GangView, NodeEvent, Phase,
    Refusal, RefusalKind, Reply, Request, Response, StopCause, NO_TAG,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreParams {
    pub run_id: String,
    /// The run's secret: every frame but the handshake's must carry a tag made with it.
    pub secret: Secret,
    /// A worker or launcher silent this long is declared dead.
    pub heartbeat_timeout: Duration,
    /// Every rank of a generation must register within this time of its start.
    pub rendezvous_timeout: Duration,
}

/// Errors of starting a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreStartError {
    #[error(
        "the rendezvous store cannot listen on {addr}: the port is already in use (another run's \
         launcher?); choose another --master-port"
    )]
    PortTaken { addr: SocketAddr },
    #[error("the rendezvous store cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the rendezvous store's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// A running store; dropping it shuts the server down.
pub struct StoreServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Binds `addr` (port 0: any free port) and serves on a thread of its own.
    pub fn start(addr: SocketAddr, params: StoreParams) -> Result<StoreServer, StoreStartError> {
        let listener = std::net::TcpListener::bind(addr).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                StoreStartError::PortTaken { addr }
            } else {
                StoreStartError::Bind { addr, source }
            }
        })?;
        let local = listener
            .local_addr()
            .map_err(|source| StoreStartError::Bind { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| StoreStartError::Bind { addr, source })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store")
            .enable_all()
            .build()
            .map_err(StoreStartError::Runtime)?;
        let (tx, rx) = oneshot::channel();
        let shared = Arc::new(Shared::new(params));
        let thread = std::thread::Builder::new()
            .name("store-main".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("[store] cannot serve: {e}");
                            return;
                        }
                    };
                    tokio::spawn(watchdog(shared.clone()));
                    let accept = async {
                        loop {
                            match listener.accept().await {
                                Ok((stream, _)) => {
                                    let _ = stream.set_nodelay(true);
                                    tokio::spawn(serve_connection(shared.clone(), stream));
                                }
                                Err(e) => {
                                    eprintln!("[store] accept: {e}");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .map_err(StoreStartError::Runtime)?;
        Ok(StoreServer {
            addr: local,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The node layout all launchers agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    nodes: usize,
    procs_per_node: usize,
    max_restarts: u32,
}

#[derive(Debug)]
struct NodeInfo {
    last_seen: Instant,
    lost: bool,
}

#[derive(Debug)]
struct RankInfo {
    pid: u32,
    host: String,
    last_beat: Instant,
    progress: u64,
    left: bool,
}

/// Everything the store knows; one lock, never held across an await.
#[derive(Debug)]
struct State {
    params: StoreParams,
    layout: Option<Layout>,
    nodes: BTreeMap<usize, NodeInfo>,
    all_joined: bool,
    generation: u64,
    restarts: u32,
    phase: Phase,
    generation_started: Instant,
    stopped_nodes: BTreeSet<usize>,
    done_nodes: BTreeSet<usize>,
    /// Nodes told the final phase.
    informed: BTreeSet<usize>,
    // The workers of the current generation.
    world_size: Option<usize>,
    config_hash: Option<(usize, String)>,
    ranks: BTreeMap<usize, RankInfo>,
    rendezvous_done: bool,
    kv: HashMap<String, String>,
    barriers: HashMap<String, BTreeSet<usize>>,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

fn refusal(kind: RefusalKind, message: impl Into<String>) -> Refusal {
    Refusal {
        kind,
        message: message.into(),
    }
}

/// Precedence of stop causes: a stronger one replaces a weaker one.
fn strength(c: StopCause) -> u8 {
    match c {
        StopCause::Failure => 0,
        StopCause::Interrupt => 1,
        StopCause::NodeLost => 2,
        StopCause::Refused => 3,
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl State {
    fn view(&self) -> GangView {
        GangView {
            generation: self.generation,
            restarts: self.restarts,
            max_restarts: self.layout.map(|l| l.max_restarts).unwrap_or(0),
            phase: self.phase.clone(),
            informed: self.informed.len(),
        }
    }

    /// Asks every launcher to stop the gang (or upgrades the cause of a stop in progress).
    fn stop(&mut self, cause: StopCause, reason: String) {
        match &self.phase {
            Phase::Running => {
                eprintln!("[store] stopping generation {}: {reason}", self.generation);
                self.phase = Phase::Stopping { cause, reason };
            }
            Phase::Stopping { cause: old, .. } if strength(cause) > strength(*old) => {
                eprintln!("[store] stopping generation {}: {reason}", self.generation);
                self.phase = Phase::Stopping { cause, reason };
            }
            _ => {}
        }
        self.resolve();
    }

    /// Ends the run at once (nothing is running yet, or a misconfiguration).
    fn refuse_run(&mut self, reason: String) {
        if self.phase == Phase::Running && !self.all_joined {
            self.phase = Phase::Refused { reason };
        } else {
            self.stop(StopCause::Refused, reason);
        }
    }

    fn live_nodes(&self) -> BTreeSet<usize> {
        self.nodes
            .iter()
            .filter(|(_, n)| !n.lost)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Moves on once every live launcher has stopped its workers, or finished.
    fn resolve(&mut self) {
        let Some(layout) = self.layout else { return };
        let live = self.live_nodes();
        match self.phase.clone() {
            Phase::Stopping { cause, reason } if live.is_subset(&self.stopped_nodes) => {
                self.phase = match cause {
                    StopCause::Failure if self.restarts < layout.max_restarts => {
                        self.restarts += 1;
                        self.next_generation();
                        eprintln!(
                            "[store] restart {} of {}: generation {}",
                            self.restarts, layout.max_restarts, self.generation
                        );
                        Phase::Running
                    }
                    StopCause::Failure => Phase::Failed {
                        reason: format!(
                            "{reason} (no restarts left: {} of --max-restarts {} used)",
                            self.restarts, layout.max_restarts
                        ),
                    },
                    StopCause::NodeLost => Phase::Failed { reason },
                    StopCause::Interrupt => Phase::Interrupted { reason },
                    StopCause::Refused => Phase::Refused { reason },
                };
            }
            Phase::Running
                if self.all_joined && self.done_nodes.len() == layout.nodes && !live.is_empty() =>
            {
                self.phase = Phase::Finished;
            }
            _ => {}
        }
    }

    fn next_generation(&mut self) {
        self.generation += 1;
        self.generation_started = Instant::now();
        self.stopped_nodes.clear();
        self.done_nodes.clear();
        self.world_size = None;
        self.config_hash = None;
        self.ranks.clear();
        self.rendezvous_done = false;
        self.kv.clear();
        self.barriers.clear();
    }

    /// Refuses a worker request that is not for the current, running generation.
    fn check_generation(&self, generation: u64) -> Result<(), Refusal> {
        if generation != self.generation {
            return Err(refusal(
                RefusalKind::StaleGeneration,
                format!(
                    "generation {generation} is not the gang's current generation {}",
                    self.generation
                ),
            ));
        }
        match &self.phase {
            Phase::Running => Ok(()),
            p => Err(refusal(
                RefusalKind::Stopping,
                format!("the gang is not running: {}", describe(p)),
            )),
        }
    }

    fn missing_ranks(&self, world: usize) -> Vec<usize> {
        (0..world).filter(|r| !self.ranks.contains_key(r)).collect()
    }

    /// The checks of a registration; a misconfiguration ends the run.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        rank: usize,
        world_size: usize,
        generation: u64,
        config_hash: &str,
        pid: u32,
        host: &str,
    ) -> Result<(), Refusal> {
        self.check_generation(generation)?;
        let expected = self
            .layout
            .map(|l| l.nodes * l.procs_per_node)
            .or(self.world_size)
            .unwrap_or(world_size);
        let fatal = |st: &mut State, kind, message: String| {
            st.refuse_run(message.clone());
            Err(refusal(kind, message))
        };
        if world_size != expected {
            let how = match self.layout {
                Some(l) => format!("{} nodes × {} procs per node", l.nodes, l.procs_per_node),
                None => "as the first rank to register said".into(),
            };
            return fatal(
                self,
                RefusalKind::WorldSizeMismatch,
                format!(
                    "rank {rank} (pid {pid} on {host}) has WORLD_SIZE = {world_size}, but the gang \
                     has {expected} ranks ({how})"
                ),
            );
        }
        if rank >= world_size {
            return fatal(
                self,
                RefusalKind::BadRequest,
                format!("rank {rank} (pid {pid} on {host}) is not below WORLD_SIZE = {world_size}"),
            );
        }
        if let Some(old) = self.ranks.get(&rank) {
            let message = format!(
                "rank {rank} registered twice: pid {} on {} and pid {pid} on {host} (two \
                 launchers with the same --node-rank?)",
                old.pid, old.host
            );
            return fatal(self, RefusalKind::DuplicateRank, message);
        }
        if let Some((first, hash)) = &self.config_hash {
            if hash != config_hash {
                let message = format!(
                    "rank {rank}'s config (sha256 {}…) differs from rank {first}'s (sha256 {}…); \
                     every rank must load the same config with the same --set overrides",
                    &config_hash[..config_hash.len().min(12)],
                    &hash[..hash.len().min(12)]
                );
                return fatal(self, RefusalKind::ConfigMismatch, message);
            }
        } else {
            self.config_hash = Some((rank, config_hash.to_string()));
        }
        self.world_size = Some(world_size);
        self.ranks.insert(
            rank,
            RankInfo {
                pid,
                host: host.to_string(),
                last_beat: Instant::now(),
                progress: 0,
                left: false,
            },
        );
        if self.ranks.len() == world_size {
            self.rendezvous_done = true;
            // Heartbeats start after the rendezvous: the wait for late ranks does not count.
            let now = Instant::now();
            self.ranks.values_mut().for_each(|r| r.last_beat = now);
        }
        Ok(())
    }

    fn join_node(&mut self, node_rank: usize, layout: Layout) -> Result<(), Refusal> {
        if self.nodes.contains_key(&node_rank) {
            let message = format!(
                "node rank {node_rank} joined twice (two launchers with the same --node-rank)"
            );
            self.refuse_run(message.clone());
            return Err(refusal(RefusalKind::DuplicateRank, message));
        }
        if self.phase != Phase::Running || self.all_joined {
            let state = if self.all_joined {
                "started with every node".to_string()
            } else {
                describe(&self.phase)
            };
            return Err(refusal(
                RefusalKind::Stopping,
                format!("node {node_rank} is too late: the run has already {state}"),
            ));
        }
        if let Some(l) = self.layout {
            if l != layout {
                let message = format!(
                    "node {node_rank} was started with --nodes {} --procs-per-node {} \
                     --max-restarts {}, but an earlier node with --nodes {} --procs-per-node {} \
                     --max-restarts {}; every launcher must agree (world sizes differ otherwise)",
                    layout.nodes,
                    layout.procs_per_node,
                    layout.max_restarts,
                    l.nodes,
                    l.procs_per_node,
                    l.max_restarts
                );
                self.refuse_run(message.clone());
                return Err(refusal(RefusalKind::NodeMismatch, message));
            }
        }
        if node_rank >= layout.nodes {
            let message = format!(
                "node rank {node_rank} is not below --nodes {}",
                layout.nodes
            );
            self.refuse_run(message.clone());
            return Err(refusal(RefusalKind::BadRequest, message));
        }
        self.layout = Some(layout);
        self.nodes.insert(
            node_rank,
            NodeInfo {
                last_seen: Instant::now(),
                lost: false,
            },
        );
        if self.nodes.len() == layout.nodes {
            self.all_joined = true;
            self.generation_started = Instant::now();
            // Launchers report once joined: the wait for late nodes does not count as silence.
            let now = Instant::now();
            self.nodes.values_mut().for_each(|n| n.last_seen = now);
            eprintln!(
                "[store] every node has joined: {} × {} workers",
                layout.nodes, layout.procs_per_node
            );
        }
        Ok(())
    }

    fn node_update(
        &mut self,
        node_rank: usize,
        generation: u64,
        event: Option<NodeEvent>,
    ) -> Result<GangView, Refusal> {
        let Some(node) = self.nodes.get_mut(&node_rank) else {
            return Err(refusal(
                RefusalKind::BadRequest,
                format!("node {node_rank} has not joined"),
            ));
        };
        node.last_seen = Instant::now();
        if node.lost {
            return Err(refusal(
                RefusalKind::Stopping,
                format!("node {node_rank} was declared lost"),
            ));
        }
        let current = generation == self.generation;
        match event {
            Some(NodeEvent::WorkerFailed { reason }) if current => {
                self.stop(StopCause::Failure, reason);
            }
            Some(NodeEvent::Interrupted { reason }) if !self.phase.is_over() => {
                self.stop(StopCause::Interrupt, reason);
            }
            Some(NodeEvent::Stopped) if current => {
                self.stopped_nodes.insert(node_rank);
                self.resolve();
            }
            Some(NodeEvent::Done) if current => {
                self.done_nodes.insert(node_rank);
                self.resolve();
            }
            // News about an earlier generation, or none.
            _ => {}
        }
        if self.phase.is_over() {
            self.informed.insert(node_rank);
        }
        Ok(self.view())
    }

    /// The periodic checks: silent launchers, silent workers, a rendezvous that takes too long.
    fn watch(&mut self) {
        let now = Instant::now();
        let timeout = self.params.heartbeat_timeout;
        let mut lost = Vec::new();
        for (k, n) in self.nodes.iter_mut() {
            if self.all_joined
                && !n.lost
                && now.duration_since(n.last_seen) > timeout
                && !self.phase.is_over()
            {
                n.lost = true;
                lost.push(*k);
            }
        }
        for k in lost {
            self.stop(
                StopCause::NodeLost,
                format!(
                    "node {k}'s launcher sent nothing for {} (distributed.heartbeat_timeout_s)",
                    secs(timeout)
                ),
            );
            self.resolve();
        }
        // Worker heartbeats count from the end of the rendezvous (its own timeout covers before).
        if self.phase != Phase::Running || !self.rendezvous_done {
            return;
        }
        let silent = self
            .ranks
            .iter()
            .find(|(_, r)| !r.left && now.duration_since(r.last_beat) > timeout);
        if let Some((rank, r)) = silent {
            let reason = format!(
                "rank {rank} (pid {} on {}) sent no heartbeat for {} \
                 (distributed.heartbeat_timeout_s; it had done {} collectives): hung, stopped or gone",
                r.pid,
                r.host,
                secs(now.duration_since(r.last_beat)),
                r.progress
            );
            self.stop(StopCause::Failure, reason);
            return;
        }
        if self.all_joined
            && !self.rendezvous_done
            && now.duration_since(self.generation_started) > self.params.rendezvous_timeout
        {
            let world = self.layout.map(|l| l.nodes * l.procs_per_node).unwrap_or(0);
            let reason = format!(
                "rendezvous of generation {} timed out after {}: ranks {:?} of {world} never \
                 registered",
                self.generation,
                secs(self.params.rendezvous_timeout),
                self.missing_ranks(world)
            );
            self.stop(StopCause::Failure, reason);
        }
    }
}

fn describe(p: &Phase) -> String {
    match p {
        Phase::Running => "running".into(),
        Phase::Stopping { reason, .. } => format!("stopping ({reason})"),
        Phase::Finished => "finished".into(),
        Phase::Failed { reason } => format!("failed ({reason})"),
        Phase::Refused { reason } => format!("refused ({reason})"),
        Phase::Interrupted { reason } => format!("interrupted ({reason})"),
    }
}

impl Shared {
    fn new(params: StoreParams) -> Shared {
        let now = Instant::now();
        Shared {
            state: Mutex::new(State {
                params,
                layout: None,
                nodes: BTreeMap::new(),
                all_joined: false,
                generation: 0,
                restarts: 0,
                phase: Phase::Running,
                generation_started: now,
                stopped_nodes: BTreeSet::new(),
                done_nodes: BTreeSet::new(),
                informed: BTreeSet::new(),
                world_size: None,
                config_hash: None,
                ranks: BTreeMap::new(),
                rendezvous_done: false,
                kv: HashMap::new(),
                barriers: HashMap::new(),
            }),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; keep serving what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Runs `f` under the lock, then wakes every waiter.
    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.notify();
        out
    }

    /// Re-runs `check` after every change until it gives an answer or `timeout` passes
    /// (then `on_timeout` gives the answer).
    async fn wait<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&State) -> Option<Result<T, Refusal>>,
        on_timeout: impl FnOnce(&State) -> Refusal,
    ) -> Result<T, Refusal> {
        let mut rx = self.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(answer) = check(&self.lock()) {
                return answer;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    if let Some(answer) = check(&self.lock()) {
                        return answer;
                    }
                    return Err(on_timeout(&self.lock()));
                }
            }
        }
    }

    async fn handle(&self, req: Request) -> Result<Reply, Refusal> {
        match req {
            Request::Hello { .. } => Err(refusal(
                RefusalKind::BadRequest,
                "hello a second time on one connection",
            )),
            Request::Register {
                rank,
                world_size,
                local_rank: _,
                generation,
                config_hash,
                pid,
                host,
                timeout_ms,
            } => {
                self.update(|st| {
                    st.register(
                        rank,
                        world_size,
                        generation,
                        &config_hash,
                        pid,
                        host.as_str(),
                    )
                })?;
                let timeout = Duration::from_millis(timeout_ms);
                self.wait(
                    timeout,
                    |st| {
                        if let Err(r) = st.check_generation(generation) {
                            return Some(Err(r));
                        }
                        st.rendezvous_done
                            .then_some(Ok(Reply::Registered { world_size }))
                    },
                    |st| {
                        refusal(
                            RefusalKind::Timeout,
                            format!(
                                "rendezvous timed out after {}: ranks {:?} of {world_size} have not \
                                 registered",
                                secs(timeout),
                                st.missing_ranks(world_size)
                            ),
                        )
                    },
                )
                .await
            }
            Request::Set {
                generation,
                key,
                value,
            } => self.update(|st| {
                st.check_generation(generation)?;
                st.kv.insert(key, value);
                Ok(Reply::Done)
            }),
            Request::Get {
                generation,
                key,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms);
                self.wait(
                    timeout,
                    |st| {
                        if let Err(r) = st.check_generation(generation) {
                            return Some(Err(r));
                        }
                        st.kv
                            .get(&key)
                            .map(|v| Ok(Reply::Value { value: v.clone() }))
                    },
                    |_| {
                        refusal(
                            RefusalKind::Timeout,
                            format!("key '{key}' was not set within {}", secs(timeout)),
                        )
                    },
                )
                .await
            }
            Request::Barrier {
                generation,
                rank,
                name,
                timeout_ms,
            } => {
                self.update(|st| {
                    st.check_generation(generation)?;
                    if !st.ranks.contains_key(&rank) {
                        return Err(refusal(
                            RefusalKind::BadRequest,
                            format!("rank {rank} entered barrier '{name}' without registering"),
                        ));
                    }
                    st.barriers.entry(name.clone()).or_default().insert(rank);
                    Ok(())
                })?;
                let timeout = Duration::from_millis(timeout_ms);
                self.wait(
                    timeout,
                    |st| {
                        if let Err(r) = st.check_generation(generation) {
                            return Some(Err(r));
                        }
                        let world = st.world_size?;
                        let n = st.barriers.get(&name).map_or(0, |b| b.len());
                        (n == world).then_some(Ok(Reply::Done))
                    },
                    |st| {
                        let world = st.world_size.unwrap_or(0);
                        let inside = st.barriers.get(&name).cloned().unwrap_or_default();
                        let missing: Vec<usize> =
                            (0..world).filter(|r| !inside.contains(r)).collect();
                        refusal(
                            RefusalKind::Timeout,
                            format!(
                                "barrier '{name}' timed out after {}: ranks {missing:?} did not arrive",
                                secs(timeout)
                            ),
                        )
                    },
                )
                .await
            }
            Request::Heartbeat {
                generation,
                rank,
                progress,
            } => Ok(self.update(|st| {
                if generation != st.generation {
                    return Reply::Alive {
                        abort: Some(format!(
                            "generation {generation} is over (the gang is at {})",
                            st.generation
                        )),
                    };
                }
                if let Some(r) = st.ranks.get_mut(&rank) {
                    r.last_beat = Instant::now();
                    r.progress = progress;
                }
                let abort = match &st.phase {
                    Phase::Running => None,
                    Phase::Stopping {
                        cause: StopCause::Interrupt,
                        ..
                    } => None,
                    p => Some(describe(p)),
                };
                Reply::Alive { abort }
            })),
            Request::Deregister { generation, rank } => Ok(self.update(|st| {
                if generation == st.generation {
                    if let Some(r) = st.ranks.get_mut(&rank) {
                        r.left = true;
                    }
                }
                Reply::Done
            })),
            Request::JoinNode {
                node_rank,
                nodes,
                procs_per_node,
                max_restarts,
                timeout_ms,
            } => {
                let layout = Layout {
                    nodes,
                    procs_per_node,
                    max_restarts,
                };
                self.update(|st| st.join_node(node_rank, layout))?;
                let timeout = Duration::from_millis(timeout_ms);
                self.wait(
                    timeout,
                    |st| {
                        if let p @ (Phase::Refused { .. } | Phase::Failed { .. }) = &st.phase {
                            return Some(Err(refusal(RefusalKind::Stopping, describe(p))));
                        }
                        st.all_joined.then_some(Ok(Reply::Joined {
                            generation: st.generation,
                        }))
                    },
                    |st| {
                        let missing: Vec<usize> =
                            (0..nodes).filter(|k| !st.nodes.contains_key(k)).collect();
                        refusal(
                            RefusalKind::Timeout,
                            format!(
                                "nodes {missing:?} of {nodes} did not join within {} \
                                 (distributed.rendezvous_timeout_s); is a launcher running on \
                                 every node with the same --master-addr/--master-port and --run-id?",
                                secs(timeout)
                            ),
                        )
                    },
                )
                .await
            }
            Request::NodeUpdate {
                node_rank,
                generation,
                event,
            } => self
                .update(|st| st.node_update(node_rank, generation, event))
                .map(Reply::Gang),
        }
    }
}

/// The periodic checks, every tenth of the heartbeat timeout (at most 200 ms apart).
async fn watchdog(shared: Arc<Shared>) {
    let every = {
        let st = shared.lock();
        (st.params.heartbeat_timeout / 10)
            .clamp(Duration::from_millis(10), Duration::from_millis(200))
    };
    loop {
        tokio::time::sleep(every).await;
        shared.update(|st| st.watch());
    }
}

/// The store's answer to a connection's first frame: the challenge and the session, or a refusal.
fn open_session(
    frame: Result<Frame<Request>, FrameError>,
    run_id: &str,
    secret: &Secret,
) -> Result<(Reply, Session), Refusal> {
    let f = frame.map_err(|e| {
        e.refusal()
            .unwrap_or_else(|| refusal(RefusalKind::Malformed, e.to_string()))
    })?;
    if f.run_id != run_id {
        return Err(refusal(
            RefusalKind::WrongRunId,
            format!(
                "run id '{}' does not match this store's run '{run_id}'",
                f.run_id
            ),
        ));
    }
    let Request::Hello { version, nonce } = f.body else {
        return Err(refusal(
            RefusalKind::Unauthenticated,
            "a connection must open with hello (the handshake that authenticates it)",
        ));
    };
    if version != auth::VERSION {
        return Err(refusal(
            RefusalKind::Unauthenticated,
            format!(
                "protocol version {version}, this store speaks {}; use the same Tessera build \
                 on every node",
                auth::VERSION
            ),
        ));
    }
    let theirs = auth::parse_nonce(&nonce).ok_or_else(|| {
        refusal(
            RefusalKind::Unauthenticated,
            "the hello's nonce is not 32 bytes of hex",
        )
    })?;
    let ours = auth::nonce().map_err(|e| refusal(RefusalKind::Malformed, e.to_string()))?;
    let session = Session::new(secret, run_id, &theirs, &ours, Role::Store);
    Ok((
        Reply::Challenge {
            nonce: auth::hex(&ours),
        },
        session,
    ))
}

/// Reads requests and answers them until the client closes the connection or sends bad input.
async fn serve_connection(shared: Arc<Shared>, mut stream: tokio::net::TcpStream) {
    let (run_id, secret) = {
        let st = shared.lock();
        (st.params.run_id.clone(), st.params.secret.clone())
    };
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
    let mut session: Option<Session> = None;
    loop {
        let mut prefix = [0u8; 4];
        if stream.read_exact(&mut prefix).await.is_err() {
            return;
        }
        let body = async {
            let len = check_len(prefix)?;
            let mut body = vec![0u8; len];
            match tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut body)).await
            {
                Ok(r) => r?,
                Err(_) => {
                    return Err(FrameError::Malformed(format!(
                        "the {len}-byte body did not arrive within 30 s"
                    )))
                }
            };
            Ok(split(body))
        }
        .await;
        let (answer, close) = match (body, session.as_mut()) {
            (Err(FrameError::Io(_)), _) => return,
            (Err(e), _) => {
                eprintln!("[store] refused a frame from {peer}: {e}");
                (
                    Err(e
                        .refusal()
                        .unwrap_or_else(|| refusal(RefusalKind::Malformed, e.to_string()))),
                    true,
                )
            }
            (Ok((_, json)), None) => match open_session(decode::<Request>(&json), &run_id, &secret)
            {
                Ok((challenge, s)) => {
                    session = Some(s);
                    // The challenge itself goes out untagged: the client has no key before it.
                    if !send(&mut stream, &run_id, Ok(challenge), None).await {
                        return;
                    }
                    continue;
                }
                Err(r) => {
                    eprintln!("[store] refused a connection from {peer}: {}", r.message);
                    (Err(r), true)
                }
            },
            (Ok((tag, json)), Some(s)) => match s.open(&tag, &json) {
                Err(bad) => {
                    // Not parsed, not echoed: the frame is nobody's until its tag verifies.
                    let message = format!(
                        "{bad} (an outsider, or a launcher or worker given another {} or {})",
                        auth::SECRET_FILE_ENV,
                        auth::SECRET_ENV
                    );
                    eprintln!("[store] refused a frame from {peer}: {message}");
                    (Err(refusal(RefusalKind::Unauthenticated, message)), true)
                }
                Ok(()) => match decode::<Request>(&json) {
                    Err(e) => {
                        eprintln!("[store] refused a frame from {peer}: {e}");
                        (
                            Err(e
                                .refusal()
                                .unwrap_or_else(|| refusal(RefusalKind::Malformed, e.to_string()))),
                            true,
                        )
                    }
                    Ok(f) if f.run_id != run_id => {
                        let message = format!(
                            "run id '{}' does not match this store's run '{run_id}'",
                            f.run_id
                        );
                        eprintln!("[store] refused a frame from {peer}: {message}");
                        (Err(refusal(RefusalKind::WrongRunId, message)), true)
                    }
                    Ok(f) => (shared.handle(f.body).await, false),
                },
            },
        };
        // Answers inside a session are tagged; a refusal outside one (or of a frame whose tag
        // did not verify) goes out untagged.
        let tagged = if close { None } else { session.as_mut() };
        if !send(&mut stream, &run_id, answer, tagged).await {
            return;
        }
        if close {
            // Let the refusal arrive: stop writing, then drain what the client still sends
            // (closing with unread input would reset the connection and lose the answer).
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 8192];
            let drain = async {
                let mut total = 0usize;
                while let Ok(n) = stream.read(&mut sink).await {
                    total += n;
                    if n == 0 || total > 2 * protocol::MAX_FRAME {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            return;
        }
    }
}

/// Writes one answer, tagged by `session` when there is one; false when the connection is gone.
async fn send(
    stream: &mut tokio::net::TcpStream,
    run_id: &str,
    answer: Result<Reply, Refusal>,
    session: Option<&mut Session>,
) -> bool {
    let body = match answer {
        Ok(reply) => Response::Ok(reply),
        Err(r) => Response::Err(r),
    };
    let json = match to_json(&Frame {
        run_id: run_id.to_string(),
        body,
    }) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("[store] cannot encode an answer: {e}");
            return false;
        }
    };
    let tag = session.map_or(NO_TAG, |s| s.seal(&json));
    stream.write_all(&encode(&tag, &json)).await.is_ok()
}

#[cfg(test)]
mod tests;
