//! What the `data-prep` integration tests share: running the binary and reading its output.
//! (Not every test file uses every helper.)
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `data-prep ARGS` to its end.
pub fn data_prep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_data-prep"))
        .args(args)
        .output()
        .expect("running data-prep")
}

/// Its stdout and stderr, for assertion messages and searches.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts that it succeeded; returns [`text`].
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}
