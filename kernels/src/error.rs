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
    /// A kernel failed to launch or run (the emulator's barrier checks, a CUDA launch error).
    #[error("kernel {kernel}: {message}")]
    Launch {
        kernel: &'static str,
        message: String,
    },
    /// A device allocation failed.
    #[error("{device}: cannot allocate {what} ({bytes} bytes): {message}")]
    Alloc {
        device: String,
        what: String,
        bytes: usize,
        message: String,
    },
    /// A CUDA library, header or device is missing or failed (the message says which, where the
    /// search looked and how to install it).
    #[error("{0}")]
    Cuda(String),
    /// NVRTC rejected a kernel source.
    #[error("NVRTC failed to compile kernels/cuda/{file} for {arch}:\n{log}")]
    Compile {
        file: String,
        arch: String,
        log: String,
    },
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
