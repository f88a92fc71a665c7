//! Sizes no machine can hold, through the `trainer` binary: a huge batch, width or vocabulary,
//! and the paper's 12-billion-parameter model on the CPU are refused before anything is
//! allocated, with what the run needs and what the machine has: an error and exit status 1,
//! not a SIGABRT from a failed allocation.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

fn config(out: &Path, data: &str) -> String {
    format!(
        "run:\n  name: bounds\n  out_dir: {}\n  seed: 2\n  device: cpu\n\
         model:\n  text_len: 6\n  text_vocab: 30\n  grid: 4\n  image_vocab: 20\n  d_model: 16\n  heads: 2\n  layers: 1\n  conv_kernel: 3\n\
         data:\n{data}\
         train:\n  steps: 2\n  batch_size: 2\n  log_every: 1\n\
         checkpoint:\n  every: 0\n",
        out.display()
    )
}

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .env_remove("TESSERA_SKIP_MEMORY_CHECK")
        .env_remove("LOCAL_WORLD_SIZE")
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Exit status 1 with an error, not a signal (an abort is SIGABRT, no exit code).
fn assert_error_exit(o: &Output, what: &str) {
    assert_eq!(
        o.status.signal(),
        None,
        "{what}: killed by a signal: {}",
        text(o)
    );
    assert_eq!(o.status.code(), Some(1), "{what}: {}", text(o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("error: "),
        "{what}: {}",
        text(o)
    );
}

#[test]
fn sizes_no_machine_holds_are_refused_before_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("c.yaml");
    fs::write(&cfg, config(&out, "  source: synthetic\n")).unwrap();
    for set in [
        "train.batch_size=1000000000000",
        "model.d_model=2000000000",
        "model.text_vocab=1000000000000",
        "model.image_vocab=1000000000000",
    ] {
        let o = trainer(&["train", "--config", cfg.to_str().unwrap(), "--set", set]);
        assert_error_exit(&o, set);
        let e = text(&o);
        assert!(
            e.contains("this run needs about") && e.contains("this machine has"),
            "{set}: {e}"
        );
        assert!(!out.exists(), "{set}: the run directory was created");
    }
}

#[test]
fn the_paper_model_on_the_cpu_is_refused_with_its_need() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/paper-12b.yaml");
    let out = tmp.path().join("run");
    let out_set = format!("run.out_dir={}", out.display());
    let o = trainer(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "run.device=cpu",
        "--set",
        &out_set,
    ]);
    assert_error_exit(&o, "paper-12b on cpu");
    let e = text(&o);
    assert!(
        e.contains("this run needs about") && e.contains("GiB"),
        "{e}"
    );
    assert!(!out.exists());
}
