//! [`NcclComm`]: the GPU collectives, NCCL through `cudarc`, one process per GPU.
//!
//! Each worker drives the GPU numbered by its `LOCAL_RANK` (among those `CUDA_VISIBLE_DEVICES`
//! shows it), rank 0 creates NCCL's unique id and publishes it through the rendezvous store, and
//! every rank joins the communicator with `ncclCommInitRank`.
//!
//! The [`Collectives`] seam takes host buffers: until the CUDA backend keeps gradients on the
//! GPU, each collective copies the buffer to a device buffer (kept and grown as needed), runs the
//! NCCL operation there and copies it back. NCCL gives every rank the same bytes, and for a
//! fixed world size, topology and NCCL version the same bytes run after run.
//!
//! No wait is unbounded: after enqueueing an operation the worker polls an event recorded behind
//! it, NCCL's asynchronous error, the heartbeat's abort flag and `distributed.collective_timeout_s`;
//! on an error or the timeout it aborts the communicator (`ncclCommAbort`, which makes the
//! peers' operations fail too) and returns an error naming the operation. The launcher then
//! restarts the gang.

use super::ring::Abort;
use crate::collectives::{CollectiveError, Collectives};
use crate::cuda_libs;
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut};
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
    format!("{:?}", e.0)
}

/// A communicator handle; aborted unless it was healthy to the end.
struct RawComm {
    comm: sys::ncclComm_t,
    failed: bool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `NcclComm`
// owns it exclusively.
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return; // already aborted
        }
        // SAFETY: `comm` came from a successful ncclCommInitRank and is released once.
        let r = unsafe {
            if self.failed {
                nccl::comm_abort(self.comm)
            } else {
                nccl::comm_destroy(self.comm)
            }
        };
        if let Err(e) = r {
            tracing::warn!("releasing the NCCL communicator: {}", nccl_msg(e));
        }
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
    /// `ctx`; blocks until every rank has joined (NCCL's own rendezvous).
    pub fn init(
        ctx: Arc<CudaContext>,
        rank: usize,
        world_size: usize,
        unique_id: [std::ffi::c_char; 128],
        op_timeout: Duration,
        abort: Arc<Abort>,
        progress: Arc<AtomicU64>,
    ) -> Result<NcclComm, NcclError> {
        let ordinal = ctx.ordinal();
        let cuda = |e: cudarc::driver::DriverError| NcclError::Cuda {
            ordinal,
            msg: e.to_string(),
        };
        ctx.bind_to_thread().map_err(cuda)?;
        let stream = ctx.new_stream().map_err(cuda)?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let id = sys::ncclUniqueId {
            internal: unique_id,
        };
        // SAFETY: `comm` is a valid out-pointer; the id came from ncclGetUniqueId on rank 0.
        unsafe { nccl::comm_init_rank(&mut comm, world_size as i32, id, rank as i32) }.map_err(
            |e| NcclError::Nccl {
                op: "ncclCommInitRank",
                msg: nccl_msg(e),
            },
        )?;
        Ok(NcclComm {
            comm: RawComm {
                comm,
                failed: false,
            },
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
        self.comm.failed = true;
        // SAFETY: a valid communicator; abort makes outstanding operations (ours and the
        // peers' on it) return, and the handle is not used for collectives again.
        if let Err(e) = unsafe { nccl::comm_abort(self.comm.comm) } {
            tracing::warn!("aborting the NCCL communicator: {}", nccl_msg(e));
        }
        // The handle is gone: the Drop must not release it a second time.
        self.comm.comm = std::ptr::null_mut();
        CollectiveError::Failed { op, msg }
    }

    fn check_usable(&self, op: &'static str) -> Result<(), CollectiveError> {
        if self.comm.failed {
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

    /// Waits for the work enqueued so far, watching NCCL's asynchronous error, the abort flag
    /// and the timeout.
    fn wait(&mut self, op: &'static str) -> Result<(), CollectiveError> {
        let event = match self.stream.record_event(None) {
            Ok(e) => e,
            Err(e) => return Err(self.fail(op, format!("recording an event: {e}"))),
        };
        let start = Instant::now();
        let mut pause = Duration::from_micros(5);
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(op, format!("CUDA error: {e}"))),
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a valid communicator and out-pointer.
            let query = unsafe { sys::ncclCommGetAsyncError(self.comm.comm, &mut async_err) };
            for r in [query, async_err] {
                if !matches!(
                    r,
                    sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
                ) {
                    return Err(self.fail(op, format!("NCCL reported {r:?} (a peer failed?)")));
                }
            }
            if let Some(reason) = self.abort.reason() {
                return Err(self.fail(op, format!("aborted: {reason}")));
            }
            if start.elapsed() > self.op_timeout {
                return Err(self.fail(
                    op,
                    format!(
                        "no completion after {:.0} s (distributed.collective_timeout_s); a peer \
                         is dead or stuck",
                        self.op_timeout.as_secs_f64()
                    ),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_micros(500));
        }
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

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [0.0f32];
        self.all_reduce_sum(&mut one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
