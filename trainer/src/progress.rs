//! Progress bars for the trainer's long commands (`train`, `sample`): position, rate and ETA on
//! a terminal; nothing at all when stderr is not one, so logs written to files carry only their
//! plain lines.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// A bar of `len` steps named `what` on stderr, or a hidden one when stderr is not a terminal.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    #[test]
    fn off_a_terminal_the_bar_draws_nothing() {
        use std::io::IsTerminal;
        let bar = super::bar(10, "train");
        assert_eq!(bar.is_hidden(), !std::io::stderr().is_terminal());
    }
}
