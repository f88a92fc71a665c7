//! What the integration tests that run the Python cross-checks share.

use std::process::Command;

/// Whether `python3` can import numpy and safetensors (tools/requirements.txt). When it cannot:
/// under CI (`CI` set) this panics, since CI installs them; elsewhere it prints why `check` is
/// skipped and returns false.
pub fn python_ready(check: &str) -> bool {
    let why = match Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .output()
    {
        Err(e) => format!("cannot run python3: {e}"),
        Ok(out) if !out.status.success() => format!(
            "python3 cannot import numpy and safetensors ({}); \
             install them with `python3 -m pip install -r tools/requirements.txt`",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no message")
        ),
        Ok(_) => return true,
    };
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but {check} cannot run: {why}");
    }
    eprintln!("skipped: {check}: {why}");
    false
}
