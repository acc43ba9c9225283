//! qbuf-qemu: one reproducible development VM for qbuf contributors.
//!
//! Layers, lowest first (see docs/architecture.md, whose table
//! tests/layers.rs checks file for file): `clock`, `host`, `config`, `qmp`,
//! `qga`, `instance` (paths, owner, proc, lock), `progress`, `runtime`, `timeouts`;
//! `qemu` as data (value, args, forward, virtiofs, parse, binaries); the records
//! (`instance::records`); `qemu` images, `ssh`, `guest_files`, `guix`,
//! `logs`, `console`; `supervisor` (QEMU's parent); `machine` (a running VM
//! behind its supervisor: typed QMP, disks, migration, forwards); `report`
//! (typed outcomes and their renderers); `cli`; `app`, the command layer
//! (doctor included) that only `main` uses. A module imports only from its
//! own layer or below.

mod app;
pub mod cli;
mod clock;
mod config;
mod console;
mod guest_files;
mod guix;
pub mod host;
mod instance;
mod logs;
mod machine;
mod progress;
mod qemu;
mod qga;
pub mod qmp;
mod report;
mod runtime;
mod ssh;
mod supervisor;
mod timeouts;

pub use app::run;
pub use progress::{finish as finish_progress, Stderr as ProgressStderr};
pub use report::{error_document, exit_code, print_line, StdoutClosed};

#[cfg(test)]
mod fuzz;
