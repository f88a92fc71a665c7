//! [`NcclComm`]: the GPU collectives, NCCL through `cudarc`, one process per GPU.
//!
//! Each worker drives the GPU numbered by its `LOCAL_RANK` (among those `CUDA_VISIBLE_DEVICES`
//! shows it), rank 0 creates NCCL's unique id and publishes it through the rendezvous store, and
//! every rank joins the communicator with `ncclCommInitRankConfig`, non-blocking.
//!
//! The [`Collectives`] seam takes host buffers: until the CUDA backend keeps gradients on the
//! GPU, each collective copies the buffer to a device buffer (kept and grown as needed), runs the
//! NCCL operation there and copies it back. NCCL gives every rank the same bytes, and for a
//! fixed world size, topology and NCCL version the same bytes run after run.
//!
//! No wait is unbounded. The communicator is non-blocking, so no NCCL call waits for a peer:
//! `ncclCommInitRankConfig` and each collective may return `ncclInProgress` (NCCL ≥ 2.22
//! connects peers inside the first collective of each kind), and the worker then polls
//! `ncclCommGetAsyncError` until NCCL has finished joining or enqueueing ([`wait_joined`],
//! [`wait_done`]); only then does it record an event behind the operation and poll that. Every
//! poll also watches the heartbeat's abort flag and a deadline (`distributed.rendezvous_timeout_s`
//! for joining, `distributed.collective_timeout_s` for an operation and for finalizing). On an
//! error or the deadline it aborts the communicator (`ncclCommAbort`) and returns an error naming
//! the operation with NCCL's own text (`ncclGetLastError`). The abort is local: peers are not
//! told, and end through their own error or deadline (docs/cluster.md); the launcher then stops
//! and restarts the gang. `NCCL_COMM_BLOCKING` other than 0 would make NCCL block again and is
//! refused ([`check_env`]).

use super::ring::Abort;
use crate::collectives::{CollectiveError, Collectives};
use cuda_libs;
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The store key under which rank 0 publishes the unique id (hex, 256 characters).
pub const UNIQUE_ID_KEY: &str = "nccl_unique_id";

/// Errors of setting NCCL up, each naming what to do.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error("distributed.collectives = nccl: {what} does not load in this process: {hint}")]
    Library { what: &'static str, hint: String },
    #[error(
        "LOCAL_RANK {local_rank} has no GPU: {count} visible (CUDA_VISIBLE_DEVICES={visible}); \
         start at most one worker per GPU (--procs-per-node)"
    )]
    NoGpu {
        local_rank: usize,
        count: usize,
        visible: String,
    },
    #[error("CUDA on GPU {ordinal}: {msg}")]
    Cuda { ordinal: usize, msg: String },
    #[error("NCCL {op}: {msg}")]
    Nccl { op: &'static str, msg: String },
    #[error("NCCL unique id from the store: {0}")]
    UniqueId(String),
    #[error("{var}={value}: {why}")]
    Env {
        var: &'static str,
        value: String,
        why: &'static str,
    },
}

/// A fresh unique id (rank 0 creates it; the others read it from the store).
pub fn new_unique_id() -> Result<[std::ffi::c_char; 128], NcclError> {
    nccl::get_uniqueid()
        .map(|id| id.internal)
        .map_err(|e| NcclError::Nccl {
            op: "ncclGetUniqueId",
            msg: nccl_msg(e),
        })
}

/// Hex of the 128-byte unique id, as the store carries it.
pub fn encode_unique_id(id: &[std::ffi::c_char; 128]) -> String {
    id.iter().map(|b| format!("{:02x}", *b as u8)).collect()
}

/// The inverse of [`encode_unique_id`]; an error says what is wrong with `text`.
pub fn decode_unique_id(text: &str) -> Result<[std::ffi::c_char; 128], String> {
    let bytes = text.as_bytes();
    if bytes.len() != 256 {
        return Err(format!(
            "expected 256 hex digits, got {} characters",
            bytes.len()
        ));
    }
    let mut id = [0 as std::ffi::c_char; 128];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| "not hex".to_string())?;
        let v = u8::from_str_radix(s, 16).map_err(|_| format!("not hex at offset {}", 2 * i))?;
        id[i] = v as std::ffi::c_char;
    }
    Ok(id)
}

/// Checks that the driver and NCCL load in this process; the error says where NCCL was found
/// (if anywhere) and what to set.
pub fn check_libraries() -> Result<(), NcclError> {
    for lib in [cuda_libs::DRIVER, cuda_libs::NCCL] {
        if cuda_libs::loadable(&lib) {
            continue;
        }
        let r = cuda_libs::Resolution::from_env();
        let hint = match r.require(&lib) {
            Ok(f) => format!(
                "It is at {} (found through {}), not under a name on the search path: start \
                 workers with `launcher`, which sets their LD_LIBRARY_PATH, or run `trainer \
                 cuda-libs --link-dir DIR` and start them with the LD_LIBRARY_PATH it prints",
                f.path().display(),
                f.source
            ),
            Err(e) => e.to_string(),
        };
        return Err(NcclError::Library {
            what: lib.what,
            hint,
        });
    }
    Ok(())
}

/// The GPU `local_rank` drives, checked against the visible devices.
pub fn open_device(local_rank: usize) -> Result<Arc<CudaContext>, NcclError> {
    let cuda = |e: cudarc::driver::DriverError| NcclError::Cuda {
        ordinal: local_rank,
        msg: e.to_string(),
    };
    let count = CudaContext::device_count().map_err(cuda)? as usize;
    if local_rank >= count {
        return Err(NcclError::NoGpu {
            local_rank,
            count,
            visible: std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into()),
        });
    }
    CudaContext::new(local_rank).map_err(cuda)
}

fn nccl_msg(e: nccl::NcclError) -> String {
    with_last_error(format!("{:?}", e.0), std::ptr::null_mut())
}

/// `msg` followed by NCCL's own description of its last error on `comm` (or, with a null
/// `comm`, of the last error in this process), when it has one.
fn with_last_error(msg: String, comm: sys::ncclComm_t) -> String {
    match last_error(comm) {
        Some(text) => format!("{msg}: {text}"),
        None => msg,
    }
}

/// `ncclGetLastError`: NCCL's text for the last error (on `comm`, or in the process for null).
fn last_error(comm: sys::ncclComm_t) -> Option<String> {
    // SAFETY: NCCL returns a NUL-terminated string it owns (or null); it is copied at once.
    let p = unsafe { sys::ncclGetLastError(comm) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated, per NCCL's API.
    let text = unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .trim()
        .to_string();
    (!text.is_empty()).then_some(text)
}

/// NCCL's variables that Tessera cannot work with, checked before NCCL is first called (`get`
/// reads the environment). `NCCL_COMM_BLOCKING` other than 0 overrides the non-blocking
/// communicators below and would put NCCL's calls outside every timeout.
pub fn check_env(get: &dyn Fn(&str) -> Option<String>) -> Result<(), NcclError> {
    if let Some(v) = get("NCCL_COMM_BLOCKING") {
        if v.trim() != "0" {
            return Err(NcclError::Env {
                var: "NCCL_COMM_BLOCKING",
                value: v,
                why: "Tessera creates non-blocking communicators so that every NCCL wait is \
                      bounded by its timeouts; a blocking one can hang a worker forever. Unset it \
                      (or set it to 0)",
            });
        }
    }
    Ok(())
}

/// Where a communicator stands, as `ncclCommGetAsyncError` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommState {
    /// No operation is being set up and no error happened.
    Ready,
    /// `ncclInProgress`: the communicator, or the operation last enqueued, is still being set
    /// up (peers connecting); nothing may be assumed enqueued yet.
    InProgress,
    /// An error (the query's or the communicator's), with NCCL's text.
    Failed(String),
}

/// The calls that waiting on a communicator makes: NCCL's and CUDA's in a worker ([`Live`]),
/// a stand-in in the tests, so that the waits below run the same code in both.
pub trait Communicator {
    /// `ncclCommGetAsyncError`.
    fn state(&mut self) -> CommState;
    /// Records an event behind the work enqueued so far on the communicator's stream.
    fn record_event(&mut self) -> Result<(), String>;
    /// Whether the event last recorded has completed.
    fn event_done(&mut self) -> Result<bool, String>;
    /// `ncclCommAbort`: releases the communicator; no call above is made after it.
    fn abort(&mut self);
}

/// How long a wait may take, which setting says so, and the flag that ends it early.
#[derive(Clone, Copy)]
pub struct Limits<'a> {
    pub timeout: Duration,
    /// The config field of `timeout`, for the message (`distributed.collective_timeout_s`).
    pub setting: &'static str,
    pub abort: &'a Abort,
}

/// Polls `step` until it says done, failing on its error, the abort flag, or when `started`
/// is more than the timeout ago (`waiting_for` says what did not happen, for the message).
fn poll(
    limits: Limits<'_>,
    started: Instant,
    waiting_for: &str,
    mut step: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let mut pause = Duration::from_micros(5);
    loop {
        if step()? {
            return Ok(());
        }
        if let Some(reason) = limits.abort.reason() {
            return Err(format!("aborted while {waiting_for}: {reason}"));
        }
        if started.elapsed() > limits.timeout {
            return Err(format!(
                "no progress after {:.1} s ({}) while {waiting_for}; a peer is dead, stuck or \
                 never joined",
                limits.timeout.as_secs_f64(),
                limits.setting
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_micros(500));
    }
}

/// Waits until the communicator has left `ncclInProgress` (after init, an enqueue or a
/// finalize).
fn settle(
    c: &mut impl Communicator,
    limits: Limits<'_>,
    started: Instant,
    waiting_for: &str,
) -> Result<(), String> {
    poll(limits, started, waiting_for, || match c.state() {
        CommState::Ready => Ok(true),
        CommState::InProgress => Ok(false),
        CommState::Failed(e) => Err(format!("NCCL reported {e} while {waiting_for}")),
    })
}

/// Waits for the communicator to finish joining (`ncclCommInitRankConfig` returned); on any
/// failure aborts it and says so.
pub fn wait_joined(c: &mut impl Communicator, limits: Limits<'_>) -> Result<(), NcclError> {
    let started = Instant::now();
    settle(c, limits, started, "joining the communicator").map_err(|msg| {
        c.abort();
        NcclError::Nccl {
            op: "ncclCommInitRankConfig",
            msg,
        }
    })
}

/// Waits for the operation `op` just enqueued: first until NCCL has really enqueued it (the
/// communicator out of `ncclInProgress`: until then the stream holds only the upload), then for
/// an event recorded behind it, watching NCCL's asynchronous error throughout. On any failure it
/// aborts the communicator and returns an error naming `op`.
pub fn wait_done(
    c: &mut impl Communicator,
    op: &'static str,
    limits: Limits<'_>,
) -> Result<(), CollectiveError> {
    let started = Instant::now();
    let r = (|| {
        settle(c, limits, started, "NCCL enqueued it")?;
        c.record_event()
            .map_err(|e| format!("recording an event: {e}"))?;
        poll(limits, started, "the GPU ran it", || {
            if c.event_done().map_err(|e| format!("CUDA error: {e}"))? {
                return Ok(true);
            }
            match c.state() {
                CommState::Failed(e) => Err(format!("NCCL reported {e} (a peer failed?)")),
                _ => Ok(false),
            }
        })
    })();
    r.map_err(|msg| {
        c.abort();
        CollectiveError::Failed { op, msg }
    })
}

/// A communicator handle; null once released.
struct RawComm {
    comm: sys::ncclComm_t,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `NcclComm`
// owns it exclusively.
unsafe impl Send for RawComm {}

impl RawComm {
    /// `ncclCommAbort`, once. Local: it frees this rank's resources and ends its outstanding
    /// operations; peers learn of it only through their own transports (see docs/cluster.md).
    fn abort(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // SAFETY: a live communicator from ncclCommInitRankConfig, released once.
        if let Err(e) = unsafe { nccl::comm_abort(self.comm) } {
            tracing::warn!("aborting the NCCL communicator: {}", nccl_msg(e));
        }
        self.comm = std::ptr::null_mut();
    }

    fn state(&self) -> CommState {
        if self.comm.is_null() {
            return CommState::Failed("the communicator was aborted".into());
        }
        let mut async_err = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid out-pointer.
        let query = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
        for r in [query, async_err] {
            match r {
                sys::ncclResult_t::ncclSuccess => {}
                sys::ncclResult_t::ncclInProgress => return CommState::InProgress,
                e => return CommState::Failed(with_last_error(format!("{e:?}"), self.comm)),
            }
        }
        CommState::Ready
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        // NcclComm's Drop finalizes and destroys a healthy communicator; anything left is
        // released the way that cannot wait.
        self.abort();
    }
}

/// A communicator and its stream, as the waits see them.
struct Live<'a> {
    comm: &'a mut RawComm,
    stream: &'a CudaStream,
    event: Option<CudaEvent>,
}

impl Communicator for Live<'_> {
    fn state(&mut self) -> CommState {
        self.comm.state()
    }
    fn record_event(&mut self) -> Result<(), String> {
        self.event = Some(self.stream.record_event(None).map_err(|e| e.to_string())?);
        Ok(())
    }
    fn event_done(&mut self) -> Result<bool, String> {
        match &self.event {
            Some(e) => e.try_is_complete().map_err(|e| e.to_string()),
            None => Err("no event recorded".into()),
        }
    }
    fn abort(&mut self) {
        self.comm.abort();
    }
}

/// NCCL collectives over host buffers, staged through one device buffer.
pub struct NcclComm {
    // Field order is drop order: the communicator before the stream and context it uses.
    comm: RawComm,
    staging: Option<CudaSlice<f32>>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    rank: usize,
    world_size: usize,
    op_timeout: Duration,
    abort: Arc<Abort>,
    /// Completed operations, reported by the heartbeat thread.
    progress: Arc<AtomicU64>,
    attached: Vec<Box<dyn Send>>,
}

impl NcclComm {
    /// Joins the communicator of `world_size` ranks identified by `unique_id` on the GPU
    /// `ctx`, non-blocking: waits for every rank to join (NCCL's own rendezvous) for at most
    /// `init_timeout` (`distributed.rendezvous_timeout_s`), watching `abort`; aborts the
    /// communicator on failure.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        ctx: Arc<CudaContext>,
        rank: usize,
        world_size: usize,
        unique_id: [std::ffi::c_char; 128],
        init_timeout: Duration,
        op_timeout: Duration,
        abort: Arc<Abort>,
        progress: Arc<AtomicU64>,
    ) -> Result<NcclComm, NcclError> {
        check_env(&|k| std::env::var(k).ok())?;
        let ordinal = ctx.ordinal();
        let cuda = |e: cudarc::driver::DriverError| NcclError::Cuda {
            ordinal,
            msg: e.to_string(),
        };
        ctx.bind_to_thread().map_err(cuda)?;
        let stream = ctx.new_stream().map_err(cuda)?;
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        let id = sys::ncclUniqueId {
            internal: unique_id,
        };
        let mut config = non_blocking_config();
        // SAFETY: `raw` is a valid out-pointer; the id came from ncclGetUniqueId on rank 0; the
        // config is initialised as NCCL_CONFIG_INITIALIZER does and outlives the call.
        let r = unsafe {
            sys::ncclCommInitRankConfig(&mut raw, world_size as i32, id, rank as i32, &mut config)
        };
        let mut comm = RawComm { comm: raw };
        if !matches!(
            r,
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
        ) {
            let msg = with_last_error(format!("{r:?}"), comm.comm);
            comm.abort();
            return Err(NcclError::Nccl {
                op: "ncclCommInitRankConfig",
                msg,
            });
        }
        let limits = Limits {
            timeout: init_timeout,
            setting: "distributed.rendezvous_timeout_s",
            abort: &abort,
        };
        wait_joined(
            &mut Live {
                comm: &mut comm,
                stream: &stream,
                event: None,
            },
            limits,
        )?;
        Ok(NcclComm {
            comm,
            staging: None,
            stream,
            ctx,
            rank,
            world_size,
            op_timeout,
            abort,
            progress,
            attached: Vec::new(),
        })
    }

    /// Keeps `thing` alive as long as the communicator (the store connection and heartbeat).
    pub fn attach(&mut self, thing: Box<dyn Send>) {
        self.attached.push(thing);
    }

    /// NCCL's version as `major.minor.patch`.
    pub fn version() -> Result<String, NcclError> {
        let v = nccl::get_nccl_version().map_err(|e| NcclError::Nccl {
            op: "ncclGetVersion",
            msg: nccl_msg(e),
        })?;
        Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
    }

    fn fail(&mut self, op: &'static str, msg: String) -> CollectiveError {
        self.comm.abort();
        CollectiveError::Failed { op, msg }
    }

    fn check_usable(&self, op: &'static str) -> Result<(), CollectiveError> {
        if self.comm.comm.is_null() {
            return Err(CollectiveError::Failed {
                op,
                msg: "the NCCL communicator was aborted after an earlier failure".into(),
            });
        }
        Ok(())
    }

    /// A device buffer of at least `n` elements.
    fn staging(&mut self, n: usize) -> Result<&mut CudaSlice<f32>, String> {
        if self.staging.as_ref().is_none_or(|s| s.len() < n) {
            self.staging = None;
            let s = self
                .stream
                .alloc_zeros::<f32>(n)
                .map_err(|e| format!("allocating {n} floats on the GPU: {e}"))?;
            self.staging = Some(s);
        }
        Ok(self.staging.as_mut().expect("just allocated"))
    }

    /// Waits for `op`, just enqueued on the communicator's stream ([`wait_done`], bounded by
    /// `distributed.collective_timeout_s`).
    fn wait(&mut self, op: &'static str) -> Result<(), CollectiveError> {
        let limits = Limits {
            timeout: self.op_timeout,
            setting: "distributed.collective_timeout_s",
            abort: &self.abort,
        };
        let live = &mut Live {
            comm: &mut self.comm,
            stream: &self.stream,
            event: None,
        };
        wait_done(live, op, limits)
    }

    /// Copies `buf` to the GPU, runs `launch` on the device copy, waits, copies back.
    fn staged(
        &mut self,
        op: &'static str,
        buf: &mut [f32],
        launch: impl FnOnce(CUdeviceptr, usize, sys::ncclComm_t, CUstream) -> Result<(), String>,
    ) -> Result<(), CollectiveError> {
        self.check_usable(op)?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        let (stream, comm) = (self.stream.clone(), self.comm.comm);
        let enqueued = (|| -> Result<(), String> {
            self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
            let staging = self.staging(n)?;
            let mut view = staging.slice_mut(0..n);
            stream
                .memcpy_htod(&*buf, &mut view)
                .map_err(|e| format!("copy to the GPU: {e}"))?;
            let (ptr, _record) = view.device_ptr_mut(&stream);
            launch(ptr, n, comm, stream.cu_stream())
        })();
        // NCCL's own text is already in an NCCL error (`launched`); a CUDA copy error gets none.
        if let Err(msg) = enqueued {
            return Err(self.fail(op, msg));
        }
        self.wait(op)?;
        let copied = (|| -> Result<(), String> {
            let staging = self.staging.as_ref().expect("allocated above");
            stream
                .memcpy_dtoh(&staging.slice(0..n), buf)
                .map_err(|e| format!("copy from the GPU: {e}"))?;
            stream.synchronize().map_err(|e| e.to_string())
        })();
        copied.map_err(|msg| self.fail(op, msg))?;
        self.progress.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for NcclComm {
    /// A healthy communicator is finalized (bounded like a collective, then destroyed); one
    /// that does not finalize in time, or failed before, is aborted.
    fn drop(&mut self) {
        if self.comm.comm.is_null() {
            return;
        }
        // SAFETY: a live communicator; finalize is called once, before destroy.
        let r = unsafe { sys::ncclCommFinalize(self.comm.comm) };
        let limits = Limits {
            timeout: self.op_timeout,
            setting: "distributed.collective_timeout_s",
            abort: &self.abort,
        };
        let finalized = match r {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => settle(
                &mut Live {
                    comm: &mut self.comm,
                    stream: &self.stream,
                    event: None,
                },
                limits,
                Instant::now(),
                "finalizing the communicator",
            ),
            e => Err(with_last_error(format!("{e:?}"), self.comm.comm)),
        };
        match finalized {
            Ok(()) => {
                // SAFETY: finalized; destroyed once, then forgotten.
                if let Err(e) = unsafe { nccl::comm_destroy(self.comm.comm) } {
                    tracing::warn!("destroying the NCCL communicator: {}", nccl_msg(e));
                }
                self.comm.comm = std::ptr::null_mut();
            }
            Err(msg) => {
                tracing::warn!("NCCL ncclCommFinalize: {msg}; aborting the communicator");
                self.comm.abort();
            }
        }
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every field NCCL_CONFIG_UNDEF_* (NCCL's
/// default) except the size, magic and version that tell NCCL which layout it reads (cudarc's
/// `ncclConfig_t` is NCCL 2.30's; an older NCCL reads the fields it knows).
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF_INT: i32 = i32::MIN;
    const API_MAGIC: u32 = 0xcafe_beef;
    const LAYOUT_VERSION: u32 = 23000; // NCCL_VERSION(2, 30, 0)
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: API_MAGIC,
        version: LAYOUT_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}

fn launched(r: Result<nccl::NcclStatus, nccl::NcclError>) -> Result<(), String> {
    r.map(|_| ()).map_err(nccl_msg)
}

impl Collectives for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.staged("all-reduce", buf, |ptr, n, comm, stream| {
            // SAFETY: `ptr` holds `n` floats on this communicator's GPU; in place is allowed.
            launched(unsafe {
                nccl::all_reduce(
                    ptr as *const _,
                    ptr as *mut _,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream as _,
                )
            })
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::Failed {
                op: "broadcast",
                msg: format!(
                    "root {root} does not exist in a world of size {}",
                    self.world_size
                ),
            });
        }
        self.staged("broadcast", buf, |ptr, n, comm, stream| {
            // SAFETY: as for the all-reduce.
            launched(unsafe {
                nccl::broadcast(
                    ptr as *const _,
                    ptr as *mut _,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    root as i32,
                    comm,
                    stream as _,
                )
            })
        })
    }

    unsafe fn all_reduce_mean_device(
        &mut self,
        bufs: &[(u64, usize)],
    ) -> Result<bool, CollectiveError> {
        const OP: &str = "all-reduce (device buffers)";
        self.check_usable(OP)?;
        let bufs: Vec<(u64, usize)> = bufs.iter().copied().filter(|&(_, n)| n > 0).collect();
        if bufs.is_empty() {
            return Ok(true);
        }
        let (stream, comm) = (self.stream.clone(), self.comm.comm);
        let enqueued = (|| -> Result<(), String> {
            self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
            // One group: NCCL fuses the buffers' reductions into one launch.
            launched(nccl::group_start())?;
            let mut r = Ok(());
            for &(ptr, n) in &bufs {
                // SAFETY: the caller's contract: `ptr` holds `n` floats on this
                // communicator's GPU, nothing pending on them; in place is allowed.
                r = launched(unsafe {
                    nccl::all_reduce(
                        ptr as *const _,
                        ptr as *mut _,
                        n,
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclAvg,
                        comm,
                        stream.cu_stream() as _,
                    )
                });
                if r.is_err() {
                    break;
                }
            }
            // The group is closed whatever happened inside it.
            let end = launched(nccl::group_end());
            r.and(end)
        })();
        if let Err(msg) = enqueued {
            return Err(self.fail(OP, msg));
        }
        self.wait(OP)?;
        self.progress.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [0.0f32];
        self.all_reduce_sum(&mut one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A communicator that answers from a script: `states` in turn (the last one forever),
    /// an event that completes after `event_polls` polls (never with `None`); it logs the calls.
    struct Fake {
        states: Vec<CommState>,
        event_polls: Option<usize>,
        calls: Vec<&'static str>,
    }

    impl Fake {
        fn new(states: &[CommState], event_polls: Option<usize>) -> Fake {
            Fake {
                states: states.to_vec(),
                event_polls,
                calls: Vec::new(),
            }
        }
    }

    impl Communicator for Fake {
        fn state(&mut self) -> CommState {
            assert!(!self.calls.contains(&"abort"), "used after the abort");
            self.calls.push("state");
            if self.states.len() > 1 {
                self.states.remove(0)
            } else {
                self.states[0].clone()
            }
        }
        fn record_event(&mut self) -> Result<(), String> {
            self.calls.push("record");
            Ok(())
        }
        fn event_done(&mut self) -> Result<bool, String> {
            self.calls.push("event");
            match &mut self.event_polls {
                Some(0) => Ok(true),
                Some(n) => {
                    *n -= 1;
                    Ok(false)
                }
                None => Ok(false),
            }
        }
        fn abort(&mut self) {
            self.calls.push("abort");
        }
    }

    fn limits(abort: &Abort, ms: u64) -> Limits<'_> {
        Limits {
            timeout: Duration::from_millis(ms),
            setting: "distributed.collective_timeout_s",
            abort,
        }
    }

    use CommState::{Failed, InProgress, Ready};

    #[test]
    fn the_event_is_recorded_only_once_nccl_has_left_in_progress() {
        let abort = Abort::default();
        let mut c = Fake::new(&[InProgress, InProgress, InProgress, Ready], Some(2));
        wait_done(&mut c, "all-reduce", limits(&abort, 10_000)).unwrap();
        let record = c.calls.iter().position(|c| *c == "record").unwrap();
        assert_eq!(c.calls[..record], ["state"; 4], "{:?}", c.calls);
        assert_eq!(c.calls.iter().filter(|c| **c == "record").count(), 1);
        assert_eq!(c.calls.iter().filter(|c| **c == "event").count(), 3);
        assert!(!c.calls.contains(&"abort"));
    }

    /// Every wait ends within its timeout with an error naming the operation and what it waited
    /// for, and aborts the communicator: stuck in progress after the enqueue (a peer that never
    /// connects), an event that never completes (a peer that never sends), and joining that never
    /// finishes (a peer that never calls init).
    #[test]
    fn every_wait_is_bounded_aborts_and_names_the_operation() {
        let abort = Abort::default();
        let cases: [(Fake, &str); 2] = [
            (Fake::new(&[InProgress], Some(0)), "while NCCL enqueued it"),
            (Fake::new(&[Ready], None), "while the GPU ran it"),
        ];
        for (mut c, stage) in cases {
            let t = Instant::now();
            let e = wait_done(&mut c, "broadcast", limits(&abort, 200)).unwrap_err();
            let took = t.elapsed();
            assert!(
                took >= Duration::from_millis(200) && took < Duration::from_secs(5),
                "{took:?}"
            );
            let e = e.to_string();
            for want in [
                "collective broadcast",
                stage,
                "0.2 s (distributed.collective_timeout_s)",
            ] {
                assert!(e.contains(want), "{want:?} missing from: {e}");
            }
            assert_eq!(c.calls.last(), Some(&"abort"), "{:?}", c.calls);
            if stage.contains("enqueued") {
                assert!(
                    !c.calls.contains(&"record"),
                    "recorded before NCCL enqueued"
                );
            }
        }

        let mut c = Fake::new(&[InProgress], None);
        let t = Instant::now();
        let e = wait_joined(
            &mut c,
            Limits {
                timeout: Duration::from_millis(200),
                setting: "distributed.rendezvous_timeout_s",
                abort: &abort,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(t.elapsed() < Duration::from_secs(5));
        for want in [
            "NCCL ncclCommInitRankConfig",
            "while joining the communicator",
            "distributed.rendezvous_timeout_s",
        ] {
            assert!(e.contains(want), "{want:?} missing from: {e}");
        }
        assert_eq!(c.calls.last(), Some(&"abort"));
    }

    #[test]
    fn an_nccl_error_or_the_abort_flag_ends_the_wait_at_once() {
        // An asynchronous error while enqueueing, and while running.
        let abort = Abort::default();
        let remote = Failed("ncclRemoteError: peer closed the connection".into());
        for states in [
            vec![InProgress, remote.clone()],
            vec![Ready, remote.clone()],
        ] {
            let mut c = Fake::new(&states, None);
            let t = Instant::now();
            let e = wait_done(&mut c, "all-reduce", limits(&abort, 60_000))
                .unwrap_err()
                .to_string();
            assert!(t.elapsed() < Duration::from_secs(5));
            assert!(
                e.contains("collective all-reduce") && e.contains("peer closed the connection"),
                "{e}"
            );
            assert_eq!(c.calls.last(), Some(&"abort"));
        }
        // The heartbeat's stop, raised from another thread while the operation is stuck.
        let abort = Arc::new(Abort::default());
        let raise = {
            let abort = abort.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                abort.set("the launcher stopped the gang".into());
            })
        };
        let mut c = Fake::new(&[InProgress], None);
        let t = Instant::now();
        let e = wait_done(&mut c, "barrier", limits(&abort, 60_000))
            .unwrap_err()
            .to_string();
        raise.join().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(
            e.contains("collective barrier") && e.contains("the launcher stopped the gang"),
            "{e}"
        );
        assert_eq!(c.calls.last(), Some(&"abort"));
    }

    #[test]
    fn a_blocking_communicator_forced_through_the_environment_is_refused() {
        let get = |v: &'static str| move |k: &str| (k == "NCCL_COMM_BLOCKING").then(|| v.into());
        assert!(check_env(&|_| None).is_ok());
        assert!(check_env(&get("0")).is_ok());
        for bad in ["1", "yes", ""] {
            let e = check_env(&get(bad)).unwrap_err().to_string();
            assert!(e.starts_with(&format!("NCCL_COMM_BLOCKING={bad}:")), "{e}");
            assert!(e.contains("non-blocking"), "{e}");
        }
    }

    #[test]
    fn unique_ids_round_trip_through_hex_and_bad_text_is_refused() {
        let mut id = [0 as std::ffi::c_char; 128];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) as std::ffi::c_char;
        }
        let text = encode_unique_id(&id);
        assert_eq!(text.len(), 256);
        assert_eq!(decode_unique_id(&text).unwrap(), id);
        assert!(decode_unique_id(&text[..254])
            .unwrap_err()
            .contains("256 hex digits"));
        let bad = format!("zz{}", &text[2..]);
        assert!(decode_unique_id(&bad).unwrap_err().contains("offset 0"));
    }
}
