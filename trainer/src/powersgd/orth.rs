//! Orthonormalisation of the low-rank factor P: the reference lives in `kernels` beside its CUDA
//! kernel (`kernels::powersgd`), and is re-exported here unchanged.

pub use kernels::powersgd::orthonormalize;
