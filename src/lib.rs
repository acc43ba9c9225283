//! qbuf-qemu: one reproducible development VM for qbuf contributors.
//!
//! Data flows one way: `cli` → `config` (resolved settings) → `qemu` (pure
//! argv) → `supervisor` (process + `qmp`) → records in `instance`. Commands
//! reach a running VM through `control`; `powerdown` is the stop ladder.

pub mod agent;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod devices;
pub mod doctor;
pub mod forwards;
pub mod guix;
pub mod host;
pub mod instance;
pub mod lifecycle;
pub mod logs;
pub mod overlay;
pub mod powerdown;
pub mod qemu;
pub mod qmp;
pub mod ssh;
pub mod supervisor;
pub mod vm;
