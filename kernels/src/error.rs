//! The error type every launcher returns.

/// An op was called with arguments it cannot run on.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A buffer's length does not match the dimensions the op was given.
    #[error("{op}: buffer `{buffer}` has {got} elements, expected {expected}")]
    BufferLen {
        op: &'static str,
        buffer: &'static str,
        expected: usize,
        got: usize,
    },
    /// Dimensions that are inconsistent with each other or out of range.
    #[error("{op}: {what}")]
    Shape { op: &'static str, what: String },
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// Checks that `buf` holds exactly `expected` elements.
pub fn check_len(
    op: &'static str,
    buffer: &'static str,
    got: usize,
    expected: usize,
) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::BufferLen {
            op,
            buffer,
            expected,
            got,
        })
    }
}
