//! Every kernel under kernels/cuda compiled by NVRTC for sm_80 (A100) and sm_90 (H100), as the
//! CUDA runtime compiles them on a GPU: a compile error, a register spill or static shared
//! memory over 48 KiB fails the test, and ptxas's report (registers, spills, shared memory) is
//! printed for every kernel.
//!
//! No GPU is needed: NVRTC runs on the CPU. Where NVRTC or the CUDA headers are missing the test
//! prints that it is skipped and why, except under `CI=true`, where it fails: CI installs them
//! (scripts/test.sh).

use kernels::gpu::nvrtc::{ptxas_reports, Nvrtc};
use kernels::gpu::{kernel_names, SOURCES};

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];
const STATIC_SHARED_LIMIT: u32 = 48 * 1024;

fn nvrtc() -> Option<&'static Nvrtc> {
    match Nvrtc::load() {
        Ok(n) => Some(n),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") || kernels::gpu::gpu_required() => {
            panic!("CI=true or TESSERA_REQUIRE_GPU=1, and NVRTC is not usable: {e}")
        }
        Err(e) => {
            eprintln!("skipped: NVRTC is not usable here ({e})");
            None
        }
    }
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    let Some(nvrtc) = nvrtc() else { return };
    println!(
        "NVRTC {} (headers: {:?})",
        nvrtc.version_string(),
        nvrtc.include_dirs
    );
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    for (file, src) in SOURCES {
        for arch in ARCHS {
            let compiled = match nvrtc.compile(file, src, arch, &[]) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            assert!(!compiled.cubin.is_empty(), "{file} {arch}: empty cubin");
            let reports = ptxas_reports(&compiled.log);
            assert!(
                !reports.is_empty(),
                "{file} {arch}: no ptxas report in the log:\n{}",
                compiled.log
            );
            for r in reports {
                println!(
                    "{arch} {file:<16} {:<36} {:>3} registers {:>6} B smem {:>3}/{:<3} B spill st/ld",
                    r.kernel, r.registers, r.shared_bytes, r.spill_stores, r.spill_loads
                );
                if r.spill_stores > 0 || r.spill_loads > 0 {
                    problems.push(format!("{arch} {}: register spills ({r:?})", r.kernel));
                }
                if r.shared_bytes > STATIC_SHARED_LIMIT {
                    problems.push(format!(
                        "{arch} {}: {} B static shared memory",
                        r.kernel, r.shared_bytes
                    ));
                }
                seen.push(r.kernel);
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // ptxas reported every kernel the emulator knows, for both architectures.
    for name in kernel_names() {
        let n = seen.iter().filter(|k| k.as_str() == name).count();
        assert_eq!(n, ARCHS.len(), "{name}: reported {n} times");
    }
}

#[test]
fn a_compile_error_names_the_file_and_shows_the_log() {
    let Some(nvrtc) = nvrtc() else { return };
    let src = "#include \"common.cuh\"\nextern \"C\" __global__ void broken_f32(float* x) { x[0] = undeclared; }\n";
    let err = nvrtc
        .compile("broken.cu", src, "sm_90", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kernels/cuda/broken.cu")
            && err.contains("sm_90")
            && err.contains("undeclared"),
        "{err}"
    );
}
