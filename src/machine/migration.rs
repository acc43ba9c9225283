//! A VM's state to and from a file through QMP migration: how a snapshot
//! is saved (`stop`, then `migrate` to `exec:cat > FILE`) and loaded into a
//! QEMU started with `-incoming defer` (`migrate-incoming`, then `cont`).
//! `exec:` works on QEMU 7.2 and 10.0 alike.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use super::Vm;
use crate::qemu::parse::{MigrationProgress, MigrationStatus};
use crate::timeouts::MIGRATION;

/// How often a migration's status is asked for: a saved state of a small
/// VM is written in tens of milliseconds.
const MIGRATION_POLL: Duration = Duration::from_millis(5);

/// No bandwidth cap: the VM is paused, the file is local.
const UNLIMITED: u64 = 1 << 40;

/// The QMP `exec:` URI that reads or writes `path` (quoted for the shell
/// QEMU runs it with).
pub fn exec_uri(write: bool, path: &Path) -> String {
    let p = shell_words::quote(&path.display().to_string()).into_owned();
    if write {
        format!("exec:cat > {p}")
    } else {
        format!("exec:cat {p}")
    }
}

/// Pauses the VM and writes its state to `path`. QEMU flushes and lets go
/// of its disks when the migration completes; the VM stays paused.
pub fn save(vm: &Vm, path: &Path) -> Result<()> {
    vm.run(&qapi::qmp::stop {})?;
    // Best effort: an older QEMU without the parameter saves more slowly.
    let _ = vm.query("migrate-set-parameters", json!({ "max-bandwidth": UNLIMITED }));
    vm.run(&qapi::qmp::migrate { uri: Some(exec_uri(true, path)), channels: None, detach: None, resume: None })?;
    wait(vm)
}

/// Loads the state in `path` into a QEMU started with `-incoming defer`,
/// then lets the guest run.
pub fn load(vm: &Vm, path: &Path) -> Result<()> {
    vm.run(&qapi::qmp::migrate_incoming { uri: Some(exec_uri(false, path)), channels: None, exit_on_error: None })?;
    wait(vm)?;
    vm.run(&qapi::qmp::cont {})?;
    Ok(())
}

/// Waits for QEMU's migration to end; its error when it failed.
fn wait(vm: &Vm) -> Result<()> {
    let start = Instant::now();
    loop {
        let p = MigrationProgress::of_query_migrate(&vm.query("query-migrate", json!({}))?);
        match p.status {
            MigrationStatus::Completed => return Ok(()),
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                bail!("QEMU's migration failed: {}", p.error.as_deref().unwrap_or("no reason given"))
            }
            _ if start.elapsed() > MIGRATION => {
                bail!("QEMU's migration did not end within {MIGRATION:?}")
            }
            _ => std::thread::sleep(MIGRATION_POLL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_uris_quote_the_path_for_qemus_shell() {
        assert_eq!(exec_uri(true, Path::new("/s/a b/state.bin")), "exec:cat > '/s/a b/state.bin'");
        assert_eq!(exec_uri(false, Path::new("/s/x")), "exec:cat /s/x");
    }
}
