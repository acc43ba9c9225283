//! qbuf-qemu: one reproducible development VM for qbuf contributors.
//!
//! Layers, lowest first (see docs/architecture.md): `clock`, `host`,
//! `instance`, `qmp`, `qga`, `config`; `qemu` (pure argv, images, parsers,
//! binaries); `ssh`, `guest_files`, `guix`, `logs`, `console`; `supervisor` (QEMU's
//! parent: start, dispatcher, protocol, client, ladder); `report` (typed
//! outcomes and their renderers); `cli`, `doctor`; `app`, the command layer
//! that only `main` uses. A module imports only from its own layer or below.

mod app;
pub mod cli;
mod clock;
mod config;
mod console;
mod doctor;
mod guest_files;
mod guix;
pub mod host;
mod instance;
mod logs;
mod progress;
mod qemu;
mod qga;
pub mod qmp;
mod report;
mod ssh;
mod supervisor;

pub use app::run;
pub use progress::{finish as finish_progress, Stderr as ProgressStderr};
pub use report::{error_document, exit_code, print_line, StdoutClosed};

#[cfg(test)]
mod fuzz;
