//! [`TcpRing`]: the collectives between CPU processes, over TCP, in a ring.
//!
//! Rank r listens on an ephemeral port, publishes `ip:port` through the store (an
//! [`AddressBook`]), connects to rank r+1 and accepts rank r−1; both ends check a hello (run id,
//! generation, world size, rank). Every message on the ring is a 20-byte header (op sequence
//! number, op kind, message index, payload length) and the payload, so ranks that call different
//! collectives, or the same one with different lengths, fail with an error instead of mixing data.
//!
//! All-reduce is reduce-scatter then all-gather over W chunks of the buffer (chunk c is elements
//! [c·n/W, (c+1)·n/W), empty when n < W), streamed in pieces of [`PIECE`] elements so that sending
//! one piece overlaps receiving the next. Chunk c is summed in a fixed order —
//! ((x_c + x_{c+1}) + x_{c+2}) + … + x_{c−1}, ranks mod W — whatever the timing, so the same world
//! size gives the same bytes on every rank and in every run (bit-exact restarts rely on this).
//! Sends go through one sender thread per ring, so a rank never blocks sending while its
//! neighbour blocks sending too.
//!
//! Every blocking read and write polls, every 100 ms, the op's deadline (`op_timeout`) and the
//! shared [`Abort`] flag (set by the heartbeat thread when the store says the gang is stopping),
//! so no collective waits forever. After a failed op the ring is broken and every later op fails.

use crate::collectives::{CollectiveError, Collectives};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Elements per message of the pipelined all-reduce and broadcast (256 KiB of f32).
pub const PIECE: usize = 1 << 16;
/// How often blocked reads and writes look at the deadline and the abort flag.
const POLL: Duration = Duration::from_millis(100);
const HEADER: usize = 20;
const HELLO_MAGIC: &[u8; 8] = b"TSSRING1";

/// Where ranks publish their listening addresses and find their neighbour's.
pub trait AddressBook {
    fn publish(&mut self, key: &str, value: &str) -> Result<(), String>;
    /// Waits up to `timeout` for `key` to be published.
    fn lookup(&mut self, key: &str, timeout: Duration) -> Result<String, String>;
}

/// A reason to give up every collective, shared between the ring and the heartbeat thread.
#[derive(Debug, Default)]
pub struct Abort {
    flag: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Abort {
    /// Records `reason` (the first one wins) and raises the flag.
    pub fn set(&self, reason: String) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(reason);
        }
        self.flag.store(true, Ordering::SeqCst);
    }

    pub fn reason(&self) -> Option<String> {
        if !self.flag.load(Ordering::SeqCst) {
            return None;
        }
        Some(
            self.reason
                .lock()
                .ok()
                .and_then(|r| r.clone())
                .unwrap_or_else(|| "aborted".into()),
        )
    }
}

/// How a ring is built and how long its operations may take.
#[derive(Clone, Debug)]
pub struct RingOptions {
    pub run_id: String,
    pub generation: u64,
    /// The address to listen on (the interface the neighbours reach).
    pub bind_ip: IpAddr,
    /// Longest wait for the neighbours while building the ring.
    pub connect_timeout: Duration,
    /// Longest wait of one collective.
    pub op_timeout: Duration,
}

/// The collective ops, as written in message headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum OpKind {
    AllReduce = 1,
    Broadcast = 2,
    Barrier = 3,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce_sum",
            OpKind::Broadcast => "broadcast",
            OpKind::Barrier => "barrier",
        }
    }
}

/// The send side: a thread that writes queued messages to rank r+1 in order.
struct SendQueue {
    jobs: Option<mpsc::Sender<Vec<u8>>>,
    /// Each job comes back here (its buffer, for reuse) or as the error that ended the sending.
    done: mpsc::Receiver<Result<Vec<u8>, String>>,
    pending: usize,
    free: Vec<Vec<u8>>,
    stream: TcpStream,
    thread: Option<JoinHandle<()>>,
}

impl SendQueue {
    fn start(stream: TcpStream, abort: Arc<Abort>, stall: Duration) -> io::Result<SendQueue> {
        stream.set_write_timeout(Some(POLL))?;
        let mut writer = stream.try_clone()?;
        let (jobs_tx, jobs_rx) = mpsc::channel::<Vec<u8>>();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ring-send".into())
            .spawn(move || {
                let mut failed: Option<String> = None;
                for job in jobs_rx {
                    if failed.is_none() {
                        if let Err(e) = write_all_polling(&mut writer, &job, &abort, stall) {
                            failed = Some(e);
                        }
                    }
                    let report = match &failed {
                        None => Ok(job),
                        Some(e) => Err(e.clone()),
                    };
                    if done_tx.send(report).is_err() {
                        break;
                    }
                }
            })?;
        Ok(SendQueue {
            jobs: Some(jobs_tx),
            done: done_rx,
            pending: 0,
            free: Vec::new(),
            stream,
            thread: Some(thread),
        })
    }

    fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.free.pop().unwrap_or_default();
        b.clear();
        b
    }

    fn push(&mut self, msg: Vec<u8>) -> Result<(), String> {
        let jobs = self.jobs.as_ref().ok_or("the sender is shut down")?;
        jobs.send(msg)
            .map_err(|_| "the sender thread has stopped")?;
        self.pending += 1;
        // Collect what has already gone out, for buffer reuse and early errors.
        while let Ok(r) = self.done.try_recv() {
            self.pending -= 1;
            self.free.push(r?);
        }
        Ok(())
    }

    /// Waits until every queued message is written.
    fn flush(&mut self, deadline: Instant, abort: &Abort) -> Result<(), String> {
        while self.pending > 0 {
            match self.done.recv_timeout(POLL) {
                Ok(r) => {
                    self.pending -= 1;
                    self.free.push(r?);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => check_wait(deadline, abort, "sending")?,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the sender thread has stopped".into())
                }
            }
        }
        Ok(())
    }
}

impl Drop for SendQueue {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fails when the deadline has passed or the abort flag is up.
fn check_wait(deadline: Instant, abort: &Abort, what: &str) -> Result<(), String> {
    if let Some(r) = abort.reason() {
        return Err(format!("aborted while {what}: {r}"));
    }
    if Instant::now() >= deadline {
        return Err(format!("timed out while {what}"));
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// `write_all` on a stream with a short write timeout; fails after `stall` without progress or
/// when the abort flag is up.
fn write_all_polling(
    w: &mut TcpStream,
    mut buf: &[u8],
    abort: &Abort,
    stall: Duration,
) -> Result<(), String> {
    let mut last_progress = Instant::now();
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Err("connection to the next rank closed".into()),
            Ok(n) => {
                buf = &buf[n..];
                last_progress = Instant::now();
            }
            Err(e) if is_timeout(&e) => {
                check_wait(last_progress + stall, abort, "sending to the next rank")?
            }
            Err(e) => return Err(format!("sending to the next rank: {e}")),
        }
    }
    Ok(())
}

/// `read_exact` on a stream with a short read timeout, until `deadline`.
fn read_exact_polling(
    r: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
    abort: &Abort,
    from: usize,
) -> Result<(), String> {
    while !buf.is_empty() {
        match r.read(buf) {
            Ok(0) => return Err(format!("rank {from} closed the connection (did it exit?)")),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if is_timeout(&e) => {
                check_wait(deadline, abort, &format!("waiting for rank {from}"))?
            }
            Err(e) => return Err(format!("receiving from rank {from}: {e}")),
        }
    }
    Ok(())
}

/// The sockets of a ring of two or more ranks.
struct Links {
    send: SendQueue,
    recv: TcpStream,
}

/// Ring collectives between processes over TCP (see the module doc).
pub struct TcpRing {
    rank: usize,
    world: usize,
    links: Option<Links>,
    op_timeout: Duration,
    op_seq: u64,
    abort: Arc<Abort>,
    /// Collectives completed (heartbeats report it).
    progress: Arc<AtomicU64>,
    broken: Option<String>,
    scratch: Vec<u8>,
    /// Things that live as long as the ring (the heartbeat thread, the store connection),
    /// dropped after the sockets close.
    attachments: Vec<Box<dyn Send>>,
}

fn hello(opts: &RingOptions, rank: usize, world: usize) -> Vec<u8> {
    let mut h = HELLO_MAGIC.to_vec();
    h.extend_from_slice(&(opts.run_id.len() as u16).to_le_bytes());
    h.extend_from_slice(opts.run_id.as_bytes());
    h.extend_from_slice(&opts.generation.to_le_bytes());
    h.extend_from_slice(&(world as u32).to_le_bytes());
    h.extend_from_slice(&(rank as u32).to_le_bytes());
    h
}

/// Reads a peer's hello; `Err` says why it is not the expected neighbour.
fn read_hello(
    s: &mut TcpStream,
    opts: &RingOptions,
    world: usize,
    expect_rank: usize,
) -> Result<(), String> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic)
        .map_err(|e| format!("reading the hello: {e}"))?;
    if &magic != HELLO_MAGIC {
        return Err("not a Tessera ring connection (bad magic)".into());
    }
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u16::from_le_bytes(len) as usize;
    if len > super::env::MAX_RUN_ID_LEN {
        return Err(format!("run id of {len} bytes is too long"));
    }
    let mut id = vec![0u8; len];
    s.read_exact(&mut id).map_err(|e| e.to_string())?;
    let mut rest = [0u8; 16];
    s.read_exact(&mut rest).map_err(|e| e.to_string())?;
    let generation = u64::from_le_bytes(rest[0..8].try_into().unwrap_or_default());
    let their_world = u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default()) as usize;
    let their_rank = u32::from_le_bytes(rest[12..16].try_into().unwrap_or_default()) as usize;
    let id = String::from_utf8_lossy(&id);
    if id != opts.run_id {
        return Err(format!("run id '{id}', expected '{}'", opts.run_id));
    }
    if generation != opts.generation {
        return Err(format!(
            "generation {generation}, expected {}",
            opts.generation
        ));
    }
    if their_world != world || their_rank != expect_rank {
        return Err(format!(
            "rank {their_rank} of {their_world}, expected rank {expect_rank} of {world}"
        ));
    }
    Ok(())
}

fn ring_err(op: &'static str, msg: impl Into<String>) -> CollectiveError {
    CollectiveError::Failed {
        op,
        msg: msg.into(),
    }
}

impl TcpRing {
    /// Builds the ring of `world` ranks as `rank`: publish this rank's address, connect to the
    /// next rank, accept the previous one. Collectives give up when `abort` is raised, and count
    /// themselves in `progress`.
    pub fn connect(
        book: &mut dyn AddressBook,
        rank: usize,
        world: usize,
        opts: &RingOptions,
        abort: Arc<Abort>,
        progress: Arc<AtomicU64>,
    ) -> Result<TcpRing, CollectiveError> {
        let err = |m: String| ring_err("ring setup", format!("rank {rank} of {world}: {m}"));
        if world == 0 || rank >= world {
            return Err(err("rank out of range".into()));
        }
        let mut ring = TcpRing {
            rank,
            world,
            links: None,
            op_timeout: opts.op_timeout,
            op_seq: 0,
            abort: abort.clone(),
            progress,
            broken: None,
            scratch: Vec::new(),
            attachments: Vec::new(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + opts.connect_timeout;
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let listener = TcpListener::bind(SocketAddr::new(opts.bind_ip, 0))
            .map_err(|e| err(format!("listening on {}: {e}", opts.bind_ip)))?;
        let me = listener
            .local_addr()
            .map_err(|e| err(format!("listening address: {e}")))?;
        book.publish(&format!("ring/addr/{rank}"), &me.to_string())
            .map_err(|e| err(format!("publishing the ring address: {e}")))?;
        let next_addr = book
            .lookup(&format!("ring/addr/{next}"), opts.connect_timeout)
            .map_err(|e| err(format!("looking up rank {next}'s address: {e}")))?;
        let next_addr: SocketAddr = next_addr
            .parse()
            .map_err(|e| err(format!("rank {next} published '{next_addr}': {e}")))?;

        // Connect to the next rank (its listener exists before its address is published).
        let mut out = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&next_addr, left.max(Duration::from_millis(10))) {
                Ok(s) => break s,
                Err(e) => {
                    check_wait(
                        deadline,
                        &abort,
                        &format!("connecting to rank {next} at {next_addr}"),
                    )
                    .map_err(|w| err(format!("{w}: {e}")))?;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        out.set_nodelay(true).map_err(|e| err(e.to_string()))?;
        out.write_all(&hello(opts, rank, world))
            .map_err(|e| err(format!("greeting rank {next}: {e}")))?;

        // Accept the previous rank, ignoring anything else that connects.
        listener
            .set_nonblocking(true)
            .map_err(|e| err(e.to_string()))?;
        let recv = loop {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
                    match read_hello(&mut s, opts, world, prev) {
                        Ok(()) => break s,
                        Err(why) => tracing::warn!(%from, "ring: refused a connection: {why}"),
                    }
                }
                Err(e) if is_timeout(&e) => {
                    check_wait(
                        deadline,
                        &abort,
                        &format!("waiting for rank {prev} to connect"),
                    )
                    .map_err(err)?;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(err(format!("accepting rank {prev}: {e}"))),
            }
        };
        recv.set_nodelay(true).map_err(|e| err(e.to_string()))?;
        recv.set_read_timeout(Some(POLL))
            .map_err(|e| err(e.to_string()))?;
        let send = SendQueue::start(out, abort, opts.op_timeout)
            .map_err(|e| err(format!("starting the sender thread: {e}")))?;
        ring.links = Some(Links { send, recv });
        Ok(ring)
    }

    /// Keeps `thing` alive as long as the ring (dropped after the sockets close).
    pub fn attach(&mut self, thing: Box<dyn Send>) {
        self.attachments.push(thing);
    }

    /// Runs one op: checks the ring is usable, numbers the op, marks the ring broken on failure.
    fn run_op(
        &mut self,
        kind: OpKind,
        body: impl FnOnce(&mut OpCtx<'_>) -> Result<(), String>,
    ) -> Result<(), CollectiveError> {
        let op = kind.name();
        if let Some(b) = &self.broken {
            return Err(ring_err(
                op,
                format!("the ring is broken by an earlier error: {b}"),
            ));
        }
        if let Some(r) = self.abort.reason() {
            return Err(ring_err(op, format!("aborted: {r}")));
        }
        self.op_seq += 1;
        let Some(links) = self.links.as_mut() else {
            self.progress.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let deadline = Instant::now() + self.op_timeout;
        let mut ctx = OpCtx {
            links,
            kind,
            seq: self.op_seq,
            sent: 0,
            received: 0,
            deadline,
            abort: &self.abort,
            prev: (self.rank + self.world - 1) % self.world,
            scratch: &mut self.scratch,
        };
        let mut result = body(&mut ctx);
        if result.is_ok() {
            result = ctx.links.send.flush(deadline, ctx.abort);
        }
        match result {
            Ok(()) => {
                self.progress.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let msg = format!(
                    "rank {} of {} (op #{}): {e} (timeout {:.1} s)",
                    self.rank,
                    self.world,
                    self.op_seq,
                    self.op_timeout.as_secs_f64()
                );
                self.broken = Some(msg.clone());
                Err(ring_err(op, msg))
            }
        }
    }
}

/// The state of one op in flight: message numbering both ways, deadline, buffers.
struct OpCtx<'a> {
    links: &'a mut Links,
    kind: OpKind,
    seq: u64,
    sent: u32,
    received: u32,
    deadline: Instant,
    abort: &'a Abort,
    prev: usize,
    scratch: &'a mut Vec<u8>,
}

impl OpCtx<'_> {
    /// Queues `values` (little-endian f32) for the next rank.
    fn send(&mut self, values: &[f32]) -> Result<(), String> {
        let mut msg = self.links.send.buffer();
        msg.reserve(HEADER + 4 * values.len());
        msg.extend_from_slice(&self.seq.to_le_bytes());
        msg.extend_from_slice(&[self.kind as u8, 0, 0, 0]);
        msg.extend_from_slice(&self.sent.to_le_bytes());
        msg.extend_from_slice(&((4 * values.len()) as u32).to_le_bytes());
        msg.resize(HEADER + 4 * values.len(), 0);
        for (dst, v) in msg[HEADER..].chunks_exact_mut(4).zip(values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        self.sent += 1;
        self.links.send.push(msg)
    }

    /// Receives the next message from the previous rank, which must hold `len` values; returns
    /// its payload bytes.
    fn recv(&mut self, len: usize) -> Result<&[u8], String> {
        let mut header = [0u8; HEADER];
        read_exact_polling(
            &mut self.links.recv,
            &mut header,
            self.deadline,
            self.abort,
            self.prev,
        )?;
        let seq = u64::from_le_bytes(header[0..8].try_into().unwrap_or_default());
        let kind = header[8];
        let index = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default());
        let bytes = u32::from_le_bytes(header[16..20].try_into().unwrap_or_default()) as usize;
        if (seq, kind, index, bytes) != (self.seq, self.kind as u8, self.received, 4 * len) {
            return Err(format!(
                "rank {} is out of step: got message {index} of op #{seq} (kind {kind}) with {bytes} \
                 bytes, expected message {} of op #{} ({}) with {} bytes; every rank must call the \
                 same collectives with the same lengths",
                self.prev,
                self.received,
                self.seq,
                self.kind.name(),
                4 * len
            ));
        }
        self.received += 1;
        self.scratch.resize(bytes, 0);
        read_exact_polling(
            &mut self.links.recv,
            self.scratch,
            self.deadline,
            self.abort,
            self.prev,
        )?;
        Ok(&self.scratch[..])
    }
}

/// Chunk `c` of `n` elements split `world` ways.
fn chunk(n: usize, world: usize, c: usize) -> std::ops::Range<usize> {
    c * n / world..(c + 1) * n / world
}

/// The pieces of a range, each at most [`PIECE`] long; one empty piece for an empty range.
fn pieces(r: std::ops::Range<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    let count = r.len().div_ceil(PIECE).max(1);
    (0..count).map(move |i| {
        let s = r.start + i * PIECE;
        s..(s + PIECE).min(r.end)
    })
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Collectives for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (w, r, n) = (self.world, self.rank, buf.len());
        self.run_op(OpKind::AllReduce, |ctx| {
            // Reduce-scatter: step s sends chunk r−s and receives chunk r−s−1, which it adds to
            // and sends on at step s+1 (piece by piece). After W−1 steps chunk r+1 is complete.
            for p in pieces(chunk(n, w, r)) {
                ctx.send(&buf[p])?;
            }
            for s in 0..w - 1 {
                let c = (r + 2 * w - s - 1) % w;
                for p in pieces(chunk(n, w, c)) {
                    let got = ctx.recv(p.len())?;
                    for (x, y) in buf[p.clone()].iter_mut().zip(f32s(got)) {
                        // (partial sum of ranks c..r−1) + x_r; f32 `+` is commutative.
                        *x += y;
                    }
                    // At the last step this is the first send of the all-gather.
                    ctx.send(&buf[p])?;
                }
            }
            // All-gather: step s receives the complete chunk r−s and forwards it at step s+1.
            for s in 0..w - 1 {
                let c = (r + w - s) % w;
                for p in pieces(chunk(n, w, c)) {
                    let got = ctx.recv(p.len())?;
                    for (x, y) in buf[p.clone()].iter_mut().zip(f32s(got)) {
                        *x = y;
                    }
                    if s + 2 < w {
                        ctx.send(&buf[p])?;
                    }
                }
            }
            Ok(())
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(ring_err(
                "broadcast",
                format!(
                    "root {root} does not exist in a world of size {}",
                    self.world
                ),
            ));
        }
        let (w, r) = (self.world, self.rank);
        let next = (r + 1) % w;
        self.run_op(OpKind::Broadcast, |ctx| {
            for p in pieces(0..buf.len()) {
                if r == root {
                    ctx.send(&buf[p])?;
                } else {
                    let got = ctx.recv(p.len())?;
                    for (x, y) in buf[p.clone()].iter_mut().zip(f32s(got)) {
                        *x = y;
                    }
                    if next != root {
                        ctx.send(&buf[p])?;
                    }
                }
            }
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // W−1 rounds of an empty message around the ring: a rank leaves only after hearing,
        // through its predecessors, from every rank.
        let w = self.world;
        self.run_op(OpKind::Barrier, |ctx| {
            for _ in 0..w.saturating_sub(1) {
                ctx.send(&[])?;
                ctx.recv(0)?;
            }
            Ok(())
        })
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        if let Some(links) = self.links.take() {
            let _ = links.recv.shutdown(std::net::Shutdown::Both);
            drop(links);
        }
        // Attachments last, in reverse order of attaching.
        while let Some(a) = self.attachments.pop() {
            drop(a);
        }
    }
}

/// An in-process [`AddressBook`] (tests, the benchmark).
#[derive(Clone, Default)]
pub struct LocalBook {
    inner: Arc<(
        Mutex<std::collections::HashMap<String, String>>,
        std::sync::Condvar,
    )>,
}

impl AddressBook for LocalBook {
    fn publish(&mut self, key: &str, value: &str) -> Result<(), String> {
        let (map, cv) = &*self.inner;
        map.lock()
            .map_err(|_| "poisoned")?
            .insert(key.into(), value.into());
        cv.notify_all();
        Ok(())
    }

    fn lookup(&mut self, key: &str, timeout: Duration) -> Result<String, String> {
        let (map, cv) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut m = map.lock().map_err(|_| "poisoned")?;
        loop {
            if let Some(v) = m.get(key) {
                return Ok(v.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("'{key}' was not published within {timeout:?}"));
            }
            m = cv.wait_timeout(m, left).map_err(|_| "poisoned")?.0;
        }
    }
}

/// Builds `world` rings on loopback, one per thread, and runs `f(rank, ring)` on each; returns
/// the results in rank order (tests and the benchmark). Panics when a ring cannot be built.
pub fn with_local_rings<T: Send>(
    world: usize,
    op_timeout: Duration,
    f: impl Fn(usize, &mut TcpRing) -> T + Sync,
) -> Vec<T> {
    let book = LocalBook::default();
    let opts = RingOptions {
        run_id: "local".into(),
        generation: 0,
        bind_ip: IpAddr::from([127, 0, 0, 1]),
        connect_timeout: Duration::from_secs(20),
        op_timeout,
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (mut book, opts, f) = (book.clone(), opts.clone(), &f);
                scope.spawn(move || {
                    let mut ring = TcpRing::connect(
                        &mut book,
                        rank,
                        world,
                        &opts,
                        Arc::default(),
                        Arc::default(),
                    )
                    .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    f(rank, &mut ring)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank r's value at i: distinct, non-trivial bits, so a wrong order of sums shows.
    fn value(rank: usize, i: usize) -> f32 {
        ((rank * 7919 + i * 104729) % 1000) as f32 * 0.001 + 0.1 / (1 + rank) as f32
    }

    /// The sum in the ring's documented order: ((x_c + x_{c+1}) + …) for the chunk c holding i.
    fn reference(world: usize, n: usize, i: usize) -> f32 {
        let c = (0..world)
            .find(|&c| chunk(n, world, c).contains(&i))
            .unwrap();
        let mut acc = value(c, i);
        for k in 1..world {
            acc += value((c + k) % world, i);
        }
        acc
    }

    #[test]
    fn all_reduce_is_exact_in_the_documented_order_for_every_shape() {
        for world in 1..=4 {
            for n in [0, 1, 2, 3, 5, 7, 1000, 2 * PIECE + 3] {
                let out = with_local_rings(world, Duration::from_secs(20), |rank, ring| {
                    let mut buf: Vec<f32> = (0..n).map(|i| value(rank, i)).collect();
                    ring.all_reduce_sum(&mut buf).unwrap();
                    // A second op on the same ring, to check the numbering carries on.
                    ring.barrier().unwrap();
                    buf
                });
                for (rank, buf) in out.iter().enumerate() {
                    for (i, x) in buf.iter().enumerate() {
                        assert_eq!(
                            x.to_bits(),
                            reference(world, n, i).to_bits(),
                            "world {world} n {n} rank {rank} element {i}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn broadcast_copies_the_roots_buffer_from_any_root() {
        for world in 1..=4 {
            for root in 0..world {
                let out = with_local_rings(world, Duration::from_secs(20), |rank, ring| {
                    let mut buf: Vec<f32> = (0..PIECE + 5).map(|i| value(rank, i)).collect();
                    ring.broadcast(&mut buf, root).unwrap();
                    let mut flag = [rank as f32];
                    ring.broadcast(&mut flag, root).unwrap();
                    (buf, flag[0])
                });
                for (buf, flag) in &out {
                    assert_eq!(*flag, root as f32);
                    assert!(buf.iter().enumerate().all(|(i, x)| *x == value(root, i)));
                }
            }
        }
        with_local_rings(2, Duration::from_secs(5), |_, ring| {
            assert!(ring.broadcast(&mut [0.0], 2).is_err());
        });
    }

    #[test]
    fn mismatched_collectives_fail_with_an_error_instead_of_mixing_data() {
        let out = with_local_rings(2, Duration::from_secs(5), |rank, ring| {
            let mut buf = vec![1.0f32; 4 + rank];
            let first = ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string());
            let later = ring.barrier().map_err(|e| e.to_string());
            (first, later)
        });
        let (first, later) = &out[0];
        let e = first.as_ref().unwrap_err();
        assert!(e.contains("out of step"), "{e}");
        assert!(later.as_ref().unwrap_err().contains("broken"), "{later:?}");
    }

    #[test]
    fn a_silent_peer_times_out_and_an_abort_stops_the_wait() {
        let started = Instant::now();
        let out = with_local_rings(2, Duration::from_millis(500), |rank, ring| {
            if rank == 0 {
                ring.all_reduce_sum(&mut [1.0]).map_err(|e| e.to_string())
            } else {
                std::thread::sleep(Duration::from_millis(900));
                Ok(())
            }
        });
        let e = out[0].as_ref().unwrap_err();
        assert!(e.contains("timed out while waiting for rank 1"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));

        let abort = Arc::new(Abort::default());
        let mut ring = TcpRing::connect(
            &mut LocalBook::default(),
            0,
            1,
            &RingOptions {
                run_id: "x".into(),
                generation: 0,
                bind_ip: IpAddr::from([127, 0, 0, 1]),
                connect_timeout: Duration::from_secs(1),
                op_timeout: Duration::from_secs(1),
            },
            abort.clone(),
            Arc::default(),
        )
        .unwrap();
        ring.barrier().unwrap();
        abort.set("the gang is stopping".into());
        let e = ring.barrier().unwrap_err().to_string();
        assert!(e.contains("the gang is stopping"), "{e}");
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes_every_time() {
        let run = || {
            with_local_rings(3, Duration::from_secs(20), |rank, ring| {
                let mut buf: Vec<f32> = (0..10_001).map(|i| value(rank, i) * 1e-3).collect();
                for _ in 0..3 {
                    ring.all_reduce_sum(&mut buf).unwrap();
                }
                buf.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            })
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert!(a.iter().all(|r| r == &a[0]));
    }
}
