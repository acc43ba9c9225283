//! The process's one async runtime, for commands that are synchronous
//! otherwise (the supervisor runs its own).

use std::sync::OnceLock;

/// Runs a future on the process's one runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime"))
        .block_on(f)
}
