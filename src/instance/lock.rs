//! The instance lock, held for the VM's whole life.
//!
//! Liveness comes from the lock, never from a pid file alone: the supervisor
//! and QEMU both inherit the locked file description (an `flock`, which std's
//! `File::lock` is on Linux), so the lock is free exactly when neither runs;
//! pid reuse and reboots cannot fool it. A second QEMU must never start on a
//! held instance: QEMU deletes an existing `-qmp` socket and takes it over.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};

use super::paths::Instance;

/// The instance lock. Dropping it unlocks only if no child inherited it.
pub struct Lock {
    file: File,
}

impl Lock {
    /// Tries once to take the lock; `None` when another process holds it.
    pub fn try_acquire(inst: &Instance) -> Result<Option<Lock>> {
        let path = inst.lock();
        let file = open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lock { file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
    }

    /// Whether some process (supervisor or QEMU) holds the lock now.
    pub fn is_held(inst: &Instance) -> Result<bool> {
        if !inst.lock().exists() {
            return Ok(false);
        }
        Ok(Lock::try_acquire(inst)?.is_none())
    }

    /// Waits until no process holds the lock, up to `limit`; true when it
    /// was let go (or never held). Polls: flock offers no wait with a deadline.
    pub fn wait_released(inst: &Instance, limit: std::time::Duration) -> Result<bool> {
        let until = std::time::Instant::now() + limit;
        loop {
            if !Lock::is_held(inst)? {
                return Ok(true);
            }
            if std::time::Instant::now() >= until {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Lets the lock survive `exec` so the supervisor and QEMU hold it too.
    pub fn inheritable(&self) -> Result<()> {
        nix::fcntl::fcntl(self.file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
        Ok(())
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open lock file {}", path.display()))
}

/// Opens (creating) `path` and waits for an exclusive lock on it; the lock
/// goes with the returned file.
pub fn lock_file(path: &Path) -> Result<File> {
    let file = open_lock_file(path)?;
    file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(file)
}

/// Serialises one instance's device changes: the read-modify-write of
/// devices.json and the choice of a free root port. Released on drop.
pub fn devices_lock(inst: &Instance) -> Result<File> {
    lock_file(&inst.devices_lock())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_excludes_a_second_holder_until_dropped() {
        let dir = std::env::temp_dir().join(format!("qbuf-lock-{}", std::process::id()));
        let inst = Instance { name: "t".into(), dir: dir.clone() };
        inst.ensure_dir().unwrap();
        let l = Lock::try_acquire(&inst).unwrap().expect("free");
        assert!(Lock::try_acquire(&inst).unwrap().is_none());
        assert!(Lock::is_held(&inst).unwrap());
        drop(l);
        assert!(!Lock::is_held(&inst).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
