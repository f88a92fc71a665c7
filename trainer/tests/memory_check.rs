//! Sizes no machine can hold, through the `trainer` binary: a huge batch, width or vocabulary,
//! and the paper's 12-billion-parameter model on the CPU are refused before anything is
//! allocated, with what the run needs and what the machine has: an error and exit status 1,
//! not a SIGABRT from a failed allocation.

use std::fs;
use std::path::Path;

mod support;
use support::{
    assert_error_exit, output_text as text, small_run_config as config, trainer_logged as trainer,
};

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
