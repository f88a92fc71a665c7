//! What the `trainer` binary prints: an OS error once (not once in the message and again as
//! its cause), and log lines without colour escapes when stderr is not a terminal (a launcher's
//! `rank_N.log`, a redirect).

use std::fs;

mod support;
use support::{
    assert_error_exit, output_text as text, small_run_config as config, trainer_logged as trainer,
};

#[test]
fn an_os_error_is_printed_once_and_logs_to_a_file_have_no_colour() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.yaml");
    let o = trainer(&["train", "--config", missing.to_str().unwrap()]);
    assert_error_exit(&o, "missing config");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("missing.yaml"), "{e}");
    assert_eq!(e.matches("os error 2").count(), 1, "{e}");

    // A short run with its stderr going to a pipe, as a launcher's rank_N.log does: the log
    // lines are there, and no ANSI escape is.
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("c.yaml");
    fs::write(&cfg, config(&out, "  source: synthetic\n")).unwrap();
    let o = trainer(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stderr.contains(&b'\n'), "no log lines: {}", text(&o));
    assert!(!o.stderr.contains(&0x1b), "{}", text(&o));
}
