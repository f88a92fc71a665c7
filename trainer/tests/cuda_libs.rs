//! Finding and loading the CUDA libraries through the real dynamic loader, on any machine:
//!
//! - a library shipped only under its soname inside a Python environment (NVIDIA's wheels put
//!   `libnccl.so.2` in `site-packages/nvidia/nccl/lib`) is found, cannot be loaded by the names
//!   `cudarc` tries, and loads once `trainer cuda-libs --link-dir` has made its link and the
//!   process starts with the `LD_LIBRARY_PATH` it printed. A copy of the C maths library stands
//!   in for NCCL: only whether `dlopen` succeeds is at stake;
//! - a worker asked for NCCL collectives on a machine without the libraries stops at once with
//!   an error naming the library, before any rendezvous.
//!
//! Both are skipped, saying why, where a real NCCL already loads (nothing to show there).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;

fn trainer() -> Command {
    let mut cmd = support::trainer_command();
    // Nothing of the host's own CUDA setup may leak in.
    for var in cuda_libs::SEARCH_VARS.iter().chain(&["RANK", "WORLD_SIZE"]) {
        cmd.env_remove(var);
    }
    cmd.env("TESSERA_PYTHON", "/nonexistent/python3");
    cmd
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn real_nccl_present() -> bool {
    let present = cuda_libs::loadable(&cuda_libs::NCCL);
    if present {
        eprintln!("skipped: a real NCCL loads on this machine; the stand-in cannot be told apart");
    }
    present
}

/// A shared library that exists on every glibc system.
fn stand_in() -> Option<PathBuf> {
    [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
        "/usr/lib64/libm.so.6",
        "/lib64/libm.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

fn nccl_line(stdout: &str, suffix: &str) -> bool {
    stdout
        .lines()
        .any(|l| l.starts_with("NCCL ") && l.ends_with(suffix))
}

#[test]
fn a_wheel_installed_nccl_loads_once_linked_under_a_name_cudarc_tries() {
    if real_nccl_present() {
        return;
    }
    let Some(libm) = stand_in() else {
        eprintln!("skipped: no libm.so.6 found to stand in for NCCL");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let venv = t.path().join("venv");
    let lib_dir = venv.join("lib/python3.12/site-packages/nvidia/nccl/lib");
    std::fs::create_dir_all(&lib_dir).unwrap();
    std::fs::copy(&libm, lib_dir.join("libnccl.so.2")).unwrap();

    // Found, but not loadable by cudarc's names.
    let o = trainer()
        .arg("cuda-libs")
        .env("VIRTUAL_ENV", &venv)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let want = format!(
        "{} (from $VIRTUAL_ENV site-packages; loadable once linked as libnccl.so)",
        lib_dir.join("libnccl.so.2").display()
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("NCCL") && l.ends_with(&want)),
        "{}",
        text(&o)
    );
    assert!(
        nccl_line(&out, "not loadable in this process"),
        "{}",
        text(&o)
    );

    // The links and the search path.
    let links = t.path().join("links");
    let o = trainer()
        .args(["cuda-libs", "--link-dir"])
        .arg(&links)
        .env("VIRTUAL_ENV", &venv)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let path = out
        .lines()
        .find_map(|l| l.strip_prefix("export LD_LIBRARY_PATH="))
        .unwrap_or_else(|| panic!("no export line:\n{}", text(&o)))
        .to_string();
    assert_eq!(path.split(':').next(), Some(links.to_str().unwrap()));
    assert_eq!(
        std::fs::read_link(links.join("libnccl.so")).unwrap(),
        lib_dir.join("libnccl.so.2")
    );

    // A process started with that path loads it through cudarc's own check.
    let o = trainer()
        .arg("cuda-libs")
        .env("LD_LIBRARY_PATH", &path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        nccl_line(&out, "loadable in this process")
            && !nccl_line(&out, "not loadable in this process"),
        "{}",
        text(&o)
    );
}

fn write_config(dir: &Path) -> PathBuf {
    let yaml = format!(
        "run:\n  name: nccl\n  out_dir: {}\n  device: cpu\n\
         model:\n  text_len: 8\n  text_vocab: 40\n  grid: 4\n  image_vocab: 24\n  d_model: 32\n  heads: 2\n  layers: 2\n\
         data:\n  source: synthetic\n  min_caption_tokens: 3\n\
         train:\n  steps: 2\n  batch_size: 2\n\
         distributed:\n  collectives: nccl\n  rendezvous_timeout_s: 60\n",
        dir.join("run").display()
    );
    let path = dir.join("nccl.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn a_worker_asked_for_nccl_without_the_libraries_names_what_is_missing() {
    if real_nccl_present() || cuda_libs::loadable(&cuda_libs::DRIVER) {
        eprintln!("skipped: the CUDA libraries load on this machine");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let config = write_config(t.path());
    // A worker of a 2-rank run; no store listens on the port, and none is reached.
    let started = std::time::Instant::now();
    let o = trainer()
        .args(["train", "--config"])
        .arg(&config)
        .env("RANK", "1")
        .env("LOCAL_RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "9")
        .env("TESSERA_RUN_ID", "nccl-test")
        // The store's secret (docs/cluster.md), so that the worker gets as far as NCCL.
        .env("TESSERA_STORE_SECRET", "5e".repeat(32))
        .env_remove("TESSERA_STORE_SECRET_FILE")
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        "distributed.collectives = nccl",
        "the CUDA driver",
        "libcuda.so",
        "TESSERA_CUDA_LIB_PATH",
    ] {
        assert!(err.contains(want), "{want:?} missing:\n{}", text(&o));
    }
    assert!(
        started.elapsed().as_secs() < 30,
        "it waited for the store: {}",
        text(&o)
    );
}
