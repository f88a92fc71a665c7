//! Run-time compilation of the kernels with NVRTC, to a cubin for one architecture.
//!
//! A cubin, not PTX: the GPUs we reach run driver 580 (CUDA 13.0), which cannot JIT PTX made by
//! a newer NVRTC, while a cubin for the device's own architecture needs no JIT. NVRTC and the
//! CUDA headers (`cuda_fp16.h`; CUDA 13 keeps `nv/target` in CCCL) come from a CUDA install or
//! NVIDIA's wheels (`nvidia-cuda-nvrtc`, `nvidia-cuda-runtime`, `nvidia-cuda-crt`,
//! `nvidia-cuda-cccl`), found by [`cuda_libs`]. `cudarc` opens NVRTC by name only, so
//! [`Nvrtc::load`] first opens the found file by its path; the dynamic loader then hands
//! `cudarc` that library for its name.
//!
//! Compiled cubins are cached on disk ([`cache_dir`]) under a key of the source, the header, the
//! options, NVRTC's version and the architecture.

use crate::error::{KernelError, Result};
use cuda_libs::{self, Resolution};
use cudarc::nvrtc::sys;
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// NVRTC, loaded, with the CUDA header directories it compiles against.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    pub version: (i32, i32),
    /// The library file, when it was found by the search rather than by the loader's own path.
    pub library: Option<PathBuf>,
    pub include_dirs: Vec<PathBuf>,
}

/// A compiled kernel file.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// NVRTC's log: warnings, and ptxas's report of registers, spills and shared memory.
    pub log: String,
}

/// How to install what is missing.
const INSTALL: &str = "install the CUDA toolkit, or `pip install \"nvidia-cuda-nvrtc==13.0.*\" \
     \"nvidia-cuda-runtime==13.0.*\" \"nvidia-cuda-crt==13.0.*\" \"nvidia-cuda-cccl==13.0.*\"`, or \
     set TESSERA_CUDA_LIB_PATH to the directory that holds libnvrtc";

impl Nvrtc {
    /// Finds and loads NVRTC and the CUDA headers (once per process).
    pub fn load() -> Result<&'static Nvrtc> {
        static LOADED: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
        LOADED
            .get_or_init(load_uncached)
            .as_ref()
            .map_err(|e| KernelError::Cuda(e.clone()))
    }

    /// `major.minor`, for cache keys and reports.
    pub fn version_string(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }

    /// Compiles one kernel file for `arch` (`sm_90`), or returns the cached cubin. `extra` options
    /// are added after Tessera's own (`-std=c++17`, the include paths, `--ptxas-options=-v`).
    pub fn compile(&self, file: &str, src: &str, arch: &str, extra: &[&str]) -> Result<Compiled> {
        let mut opts: Vec<String> = vec![
            format!("--gpu-architecture={arch}"),
            "-std=c++17".into(),
            "--ptxas-options=-v".into(),
            "-lineinfo".into(),
        ];
        for d in &self.include_dirs {
            opts.push(format!("--include-path={}", d.display()));
        }
        opts.extend(extra.iter().map(|s| s.to_string()));
        let key = cache_key(file, src, &opts, &self.version_string());
        let cached = cache_dir().map(|d| d.join(format!("{key}.cubin")));
        if let Some(path) = &cached {
            if let (Ok(cubin), Ok(log)) = (
                std::fs::read(path),
                std::fs::read_to_string(path.with_extension("log")),
            ) {
                return Ok(Compiled { cubin, log });
            }
        }
        let compiled = compile_uncached(file, src, arch, &opts)?;
        if let Some(path) = &cached {
            // The cache is an optimisation: a failed write costs a recompile next time.
            let _ = write_atomic(&path.with_extension("log"), compiled.log.as_bytes());
            let _ = write_atomic(path, &compiled.cubin);
        }
        Ok(compiled)
    }
}

fn load_uncached() -> std::result::Result<Nvrtc, String> {
    let res = Resolution::from_env();
    // NVRTC opens its builtins library by name at compile time: open it first from the same
    // directory, then NVRTC itself.
    if let Some(found) = res.get(&cuda_libs::NVRTC) {
        if let Ok(entries) = std::fs::read_dir(&found.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("libnvrtc-builtins.so") && !name.contains(".alt.") {
                    // SAFETY: NVRTC's libraries have benign initialisers.
                    unsafe { dlopen_global(&e.path()) };
                }
            }
        }
    }
    let library = super::preload(&cuda_libs::NVRTC, &res);
    if !cuda_libs::loadable(&cuda_libs::NVRTC) && library.is_none() {
        return Err(match res.require(&cuda_libs::NVRTC) {
            Err(e) => e.to_string(),
            Ok(f) => format!("NVRTC at {} does not load; {INSTALL}", f.path().display()),
        });
    }
    // SAFETY: NVRTC is loaded (by path above, or through the loader's search).
    let present = unsafe { sys::is_culib_present() };
    if !present {
        return Err(format!("NVRTC does not load through cudarc; {INSTALL}"));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
    let include_dirs = header_dirs(&res, library.as_deref());
    if include_dirs.is_empty() {
        return Err(format!(
            "the CUDA headers (cuda_fp16.h) were not found beside NVRTC, in $CUDA_HOME/include or \
             /usr/local/cuda/include; {INSTALL}"
        ));
    }
    Ok(Nvrtc {
        version: (major, minor),
        library,
        include_dirs,
    })
}

/// Directories holding `cuda_fp16.h` (and CCCL's `nv/target` where CUDA 13 keeps it apart).
fn header_dirs(res: &Resolution, library: Option<&Path>) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(lib) = library.and_then(|l| l.parent()) {
        roots.push(lib.join("../include"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Ok(v) = std::env::var(var) {
            roots.push(PathBuf::from(v).join("include"));
        }
    }
    for s in &res.searched {
        roots.push(s.dir.join("../include"));
    }
    roots.push("/usr/local/cuda/include".into());
    let mut dirs = Vec::new();
    for r in roots {
        if r.join("cuda_fp16.h").is_file() {
            let r = r.canonicalize().unwrap_or(r);
            dirs.push(r.clone());
            if r.join("cccl/nv/target").exists() {
                dirs.push(r.join("cccl"));
            }
            break;
        }
    }
    dirs
}

/// Opens `path` with RTLD_GLOBAL and keeps it open; true if it loaded.
///
/// # Safety
/// Runs the library's initialisers.
unsafe fn dlopen_global(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: the caller accepts the initialisers; the handle is leaked on purpose.
    !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
}

fn compile_uncached(file: &str, src: &str, arch: &str, opts: &[String]) -> Result<Compiled> {
    let err = |what: &str, r: sys::nvrtcResult| KernelError::Compile {
        file: file.to_string(),
        arch: arch.to_string(),
        log: format!("{what}: {r:?}"),
    };
    let c_src =
        CString::new(src).map_err(|_| KernelError::Cuda(format!("{file}: NUL in source")))?;
    let c_name = CString::new(file).unwrap_or_default();
    let header = CString::new(super::COMMON_HEADER).expect("common.cuh has no NUL");
    let header_name = CString::new("common.cuh").unwrap();
    let headers = [header.as_ptr()];
    let header_names = [header_name.as_ptr()];
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a live NUL-terminated string; `prog` is an out-parameter.
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            c_src.as_ptr(),
            c_name.as_ptr(),
            1,
            headers.as_ptr(),
            header_names.as_ptr(),
        )
    };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(err("nvrtcCreateProgram", r));
    }
    let c_opts: Vec<CString> = opts
        .iter()
        .map(|o| CString::new(o.as_str()).unwrap_or_default())
        .collect();
    let opt_ptrs: Vec<_> = c_opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: `prog` is live; the options outlive the call.
    let rc = unsafe { sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    // SAFETY: `prog` is live for the rest of this function and destroyed at its end.
    let log = unsafe { program_log(prog) };
    let out = if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        Err(KernelError::Compile {
            file: file.to_string(),
            arch: arch.to_string(),
            log,
        })
    } else {
        let mut size = 0usize;
        // SAFETY: `prog` compiled; the buffer has the size NVRTC reported.
        // (Errors are values here, not early returns: the program is destroyed below.)
        unsafe {
            let r = sys::nvrtcGetCUBINSize(prog, &mut size);
            if r != sys::nvrtcResult::NVRTC_SUCCESS {
                Err(err("nvrtcGetCUBINSize", r))
            } else {
                let mut cubin = vec![0u8; size];
                let r = sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast());
                if r != sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(err("nvrtcGetCUBIN", r))
                } else {
                    Ok(Compiled { cubin, log })
                }
            }
        }
    };
    // SAFETY: destroys the program made above, once.
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    out
}

/// # Safety
/// `prog` must be a live program.
unsafe fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: the caller's contract; the buffer has the size NVRTC reported.
    unsafe {
        if sys::nvrtcGetProgramLogSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS {
            return String::new();
        }
        let mut buf = vec![0u8; size.max(1)];
        if sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr().cast()) != sys::nvrtcResult::NVRTC_SUCCESS
        {
            return String::new();
        }
        CStr::from_bytes_until_nul(&buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn cache_key(file: &str, src: &str, opts: &[String], version: &str) -> String {
    let mut h = Sha256::new();
    for part in [file, src, super::COMMON_HEADER, version] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for o in opts {
        h.update((o.len() as u64).to_le_bytes());
        h.update(o.as_bytes());
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Where compiled cubins are kept: `$TESSERA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/tessera/kernels`,
/// else `~/.cache/tessera/kernels`; `None` (no caching) when `TESSERA_KERNEL_CACHE` is empty or
/// no directory can be made.
pub fn cache_dir() -> Option<PathBuf> {
    let dir = match std::env::var("TESSERA_KERNEL_CACHE") {
        Ok(v) if v.is_empty() => return None,
        Ok(v) => PathBuf::from(v),
        Err(_) => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?
            .join("tessera/kernels"),
    };
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// What ptxas reported for one kernel: registers, spill bytes, static shared memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxasReport {
    pub kernel: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
}

/// Parses ptxas's `-v` lines from an NVRTC log:
/// `ptxas info    : Compiling entry function 'k' for 'sm_90'`, then
/// `ptxas info    : Used 32 registers, used 0 barriers, 1024 bytes smem, …` and
/// `… 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads`.
pub fn ptxas_reports(log: &str) -> Vec<PtxasReport> {
    let mut out: Vec<PtxasReport> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(PtxasReport {
                kernel: name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                shared_bytes: 0,
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        let num_before = |key: &str| -> Option<u32> {
            let idx = line.find(key)?;
            line[..idx].split_whitespace().last()?.parse().ok()
        };
        if let Some(v) = num_before(" registers") {
            cur.registers = v;
        }
        if let Some(v) = num_before(" bytes smem") {
            cur.shared_bytes = v;
        }
        if let Some(v) = num_before(" bytes spill stores") {
            cur.spill_stores = v;
        }
        if let Some(v) = num_before(" bytes spill loads") {
            cur.spill_loads = v;
        }
    }
    out
}
