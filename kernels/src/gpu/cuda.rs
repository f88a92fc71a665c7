//! The CUDA runtime: one GPU through cudarc, kernels compiled by NVRTC for its architecture,
//! modules loaded once per `.cu` file and kept, one stream.
//!
//! Buffers are cudarc's `CudaSlice`s; a launch queues on the stream and returns, and
//! [`Runtime::download`] waits for the stream. Allocation failures name the buffer and its size.

use super::nvrtc::Nvrtc;
use super::{Args, LaunchCfg, Runtime};
use crate::device::Elem;
use crate::error::{KernelError, Result};
use cuda_libs;
use cudarc::cublas::{sys as blas, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One CUDA device and a stream on it.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    name: String,
    nvrtc: &'static Nvrtc,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// cuBLAS on the stream, opened at the first product.
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
    /// Launchers' scratch buffers between calls, by key ([`Runtime::take_scratch`]).
    scratch: Mutex<HashMap<&'static str, Box<dyn std::any::Any + Send>>>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("name", &self.name)
            .field("arch", &self.arch)
            .finish()
    }
}

fn driver_err(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda(format!("{what}: {e:?}"))
}

impl Cuda {
    /// Opens device `ordinal`: checks the driver and NVRTC first, with errors that name what is
    /// missing and how to install it.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        if !cuda_libs::loadable(&cuda_libs::DRIVER) {
            return Err(KernelError::Cuda(format!(
                "the CUDA driver (libcuda.so.1) does not load: no GPU driver on this machine, or \
                 not on the loader's path (see `trainer cuda-libs`). Searched: {}",
                cuda_libs::Resolution::from_env()
                    .require(&cuda_libs::DRIVER)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "found, but it does not load".into())
            )));
        }
        let nvrtc = Nvrtc::load()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("cuInit / device", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_err("compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "?".into());
        let stream = ctx.default_stream();
        Ok(Cuda {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            name: format!("CUDA device {ordinal} ({name})"),
            nvrtc,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            scratch: Mutex::new(HashMap::new()),
        })
    }

    fn blas(&self) -> Result<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                let res = cuda_libs::Resolution::from_env();
                // cuBLAS needs cuBLASLt; both are opened by path where the search found them.
                super::preload(&cuda_libs::CUBLASLT, &res);
                super::preload(&cuda_libs::CUBLAS, &res);
                if !cuda_libs::loadable(&cuda_libs::CUBLAS) && res.get(&cuda_libs::CUBLAS).is_none()
                {
                    return Err(res
                        .require(&cuda_libs::CUBLAS)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default());
                }
                CudaBlas::new(self.stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))
            })
            .as_ref()
            .map_err(|e| KernelError::Cuda(e.clone()))
    }

    /// `sm_90` for an H100.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The memory's peak bandwidth in GB/s (2 transfers per clock × bus width), for
    /// benchmarks to report the fraction they reach.
    pub fn peak_bandwidth_gbs(&self) -> Option<f64> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let khz = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
            .ok()? as f64;
        let bits = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
            .ok()? as f64;
        Some(2.0 * khz * 1e3 * bits / 8.0 / 1e9)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for everything queued.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("stream synchronize", e))
    }

    fn function(&self, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let file = super::kernel_file(name).ok_or_else(|| KernelError::Launch {
            kernel: name,
            message: "no such kernel in kernels/cuda".into(),
        })?;
        let module = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(file) {
                Some(m) => m.clone(),
                None => {
                    let src = super::SOURCES
                        .iter()
                        .find(|(f, _)| *f == file)
                        .map(|(_, s)| *s)
                        .expect("every kernel's file is in SOURCES");
                    let compiled = self.nvrtc.compile(file, src, &self.arch, &[])?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin))
                        .map_err(|e| driver_err(&format!("loading kernels/cuda/{file}"), e))?;
                    modules.insert(file, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| driver_err(&format!("kernel {name} in kernels/cuda/{file}"), e))?;
        self.functions.lock().unwrap().insert(name, f.clone());
        Ok(f)
    }
}

impl Runtime for Cuda {
    type Buf<T: Elem> = CudaSlice<T>;

    fn name(&self) -> String {
        self.name.clone()
    }
    fn zeros<T: Elem>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(|e| KernelError::Alloc {
                device: self.name.clone(),
                what: format!("{len} × {}", T::DTYPE),
                bytes: len * std::mem::size_of::<T>(),
                message: format!("{e:?}"),
            })
    }
    fn take_scratch<T: Elem>(&self, key: &'static str, len: usize) -> Result<CudaSlice<T>> {
        let kept = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(Ok(buf)) = kept.map(|b| b.downcast::<CudaSlice<T>>()) {
            if buf.len() == len {
                return Ok(*buf);
            }
        }
        self.zeros(len)
    }
    fn put_scratch<T: Elem>(&self, key: &'static str, buf: CudaSlice<T>) {
        self.scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Box::new(buf));
    }
    fn upload<T: Elem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| KernelError::Alloc {
                device: self.name.clone(),
                what: format!("upload of {} × {}", host.len(), T::DTYPE),
                bytes: std::mem::size_of_val(host),
                message: format!("{e:?}"),
            })
    }
    fn download<T: Elem>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(buf)
            .map_err(|e| driver_err("download", e))
    }
    fn len<T: Elem>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }
    fn fill_zero<T: Elem>(&self, buf: &mut CudaSlice<T>) -> Result<()> {
        self.stream
            .memset_zeros(buf)
            .map_err(|e| driver_err("memset", e))
    }
    fn collective_addr(&self, buf: &mut CudaSlice<f32>) -> Result<Option<u64>> {
        // NCCL runs on its own stream: everything queued here must be done first.
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronize before a collective", e))?;
        Ok(Some(self.addr_mut(buf)))
    }
    fn addr<T: Elem>(&self, buf: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = buf.device_ptr(&self.stream);
        ptr
    }
    fn addr_mut<T: Elem>(&self, buf: &mut CudaSlice<T>) -> u64 {
        let (ptr, _sync) = buf.device_ptr_mut(&self.stream);
        ptr
    }

    fn gemm<T: Elem>(
        &self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        spec: &crate::linear::GemmSpec,
    ) -> Result<()> {
        let crate::linear::GemmSpec {
            m, n, k, a_t, b_t, ..
        } = *spec;
        if m == 0 || n == 0 || spec.batch == 0 {
            return Ok(());
        }
        let blas = self.blas()?;
        let dtype = match T::DTYPE {
            "f16" => blas::cudaDataType_t::CUDA_R_16F,
            _ => blas::cudaDataType_t::CUDA_R_32F,
        };
        // Row-major C[m, n] is column-major Cᵀ[n, m] = op(b)ᵀ · op(a)ᵀ: cuBLAS's first operand is
        // `b` (column-major [n, k] as stored when not transposed) and its second is `a`.
        let op = |t: bool| {
            if t {
                blas::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Leading dimensions of at least 1 (cuBLAS rejects 0 even when k = 0).
        let [lda, ldb, ldc] = spec.leading_dims().map(|ld| ld.max(1));
        let (alpha, beta) = (1.0f32, if spec.accumulate { 1.0f32 } else { 0.0 });
        let size = std::mem::size_of::<T>() as u64;
        let pa = self.addr(a) + spec.offsets[0] as u64 * size;
        let pb = self.addr(b) + spec.offsets[1] as u64 * size;
        let pc = self.addr_mut(c) + spec.offsets[2] as u64 * 4;
        // SAFETY: `spec` was checked against the buffers' lengths by the caller; the pointers
        // are live device buffers on this stream; alpha and beta are host scalars.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                op(b_t),
                op(a_t),
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                pb as *const std::ffi::c_void,
                dtype,
                ldb as i32,
                spec.strides[1] as i64,
                pa as *const std::ffi::c_void,
                dtype,
                lda as i32,
                spec.strides[0] as i64,
                (&beta as *const f32).cast(),
                pc as *mut std::ffi::c_void,
                blas::cudaDataType_t::CUDA_R_32F,
                ldc as i32,
                spec.strides[2] as i64,
                spec.batch as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Launch {
            kernel: "matmul (cublasGemmStridedBatchedEx)",
            message: format!("{e:?} for {spec:?}"),
        })
    }

    unsafe fn launch(&self, name: &'static str, cfg: LaunchCfg, args: &Args) -> Result<()> {
        let f = self.function(name)?;
        let mut b = self.stream.launch_builder(&f);
        for slot in args.slots() {
            b.arg(slot);
        }
        let cfg = LaunchConfig {
            grid_dim: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
            block_dim: (cfg.block[0], cfg.block[1], cfg.block[2]),
            shared_mem_bytes: cfg.shared_bytes,
        };
        // SAFETY: the caller's contract (arguments match the kernel, addresses are live).
        unsafe { b.launch(cfg) }.map_err(|e| KernelError::Launch {
            kernel: name,
            message: format!("{e:?}"),
        })?;
        Ok(())
    }
}
