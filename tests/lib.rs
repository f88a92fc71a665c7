//! Shared helpers for the cross-crate integration tests live in the test files themselves.
