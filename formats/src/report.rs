//! How the binaries print an error: its message, then each cause of its chain that the message
//! does not already spell out. Many errors here write their cause into their own message (a
//! path and the OS error, "cannot open x: No such file or directory (os error 2)") and also
//! expose it as their `source`; printing the chain as `{e:#}` would then say the OS error twice.

/// `e` and its causes joined by ": ", each cause once.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        out.push_str(": ");
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn an_os_error_in_the_message_and_the_chain_is_printed_once() {
        let missing = std::path::Path::new("/nonexistent/tessera/config.yaml");
        let e = std::fs::File::open(missing)
            .map_err(crate::fsutil::fs_err("open", missing))
            .context("loading the run")
            .unwrap_err();
        let os = std::io::Error::from(std::io::ErrorKind::NotFound).to_string();
        let printed = error_chain(&e);
        assert!(
            printed.starts_with("loading the run: cannot open"),
            "{printed}"
        );
        let long = format!("{e:#}");
        // The alternate form repeats the OS error (the reason for this function) …
        assert!(long.matches("os error 2").count() == 2, "{long}");
        // … the report says it once.
        assert_eq!(printed.matches("os error 2").count(), 1, "{printed} ({os})");
    }

    #[test]
    fn causes_not_in_the_message_are_kept() {
        let e = anyhow::anyhow!("inner cause").context("outer");
        assert_eq!(error_chain(&e), "outer: inner cause");
    }
}
