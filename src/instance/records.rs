//! The JSON records an instance keeps, and how they are read and written:
//! atomically (temp file + rename), private to the user, and with a message
//! that names the file when one is damaged.
//!
//! Who writes what: `launch` writes settings.json and boot.json; the
//! supervisor writes run.json once QEMU is up, launch-failure.json when it
//! is not, and stopped.json when QEMU is gone; device commands write
//! devices.json.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::paths::Instance;
use super::proc::{ExitInfo, ProcIdentity};
use crate::qemu::args::ShareKind;
use crate::qemu::args::{Accel, ExtraDisk, Share, VmSpec};
use crate::qemu::forward::Forward;
use crate::qemu::virtiofs::Daemon;

pub use super::stops::{StepAction, StopCause, StopKind, StopMethod, StopOutcome, StopRecord, StopStep};

/// Writes JSON atomically (temp file + rename), private to the user. A
/// write that fails (a full disk) leaves the old record and no temp file.
/// Each write has a temp file of its own ([`temp_path`]): two commands
/// writing one record at once (two `launch --memory …` on a running
/// instance take no lock) must not write into one inode. The directory is
/// synced after the rename, so the new name survives a crash.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, |f| {
        serde_json::to_writer_pretty(&mut *f, value)?;
        Ok(f.write_all(b"\n")?)
    })
}

/// Writes `path` the way [`write_json`] does, its content from `fill`.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut fs::File) -> Result<()>) -> Result<()> {
    let (tmp, mut f) = temp_file(path)?;
    let written = (|| -> Result<()> {
        fill(&mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write {}", path.display()))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {} after writing {}", dir.display(), path.display()))
}

/// A write's own temp file beside `path` (mode 0600, made anew).
fn temp_file(path: &Path) -> Result<(PathBuf, fs::File)> {
    loop {
        let tmp = temp_path(path);
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            // Left by a dead process that had this pid: never ours to reuse.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot write {}", tmp.display())),
        }
    }
}

/// `NAME.tmp.PID.N` for record `NAME.json`: unique to this process and
/// write, and found by its `NAME.tmp.` prefix (`Instance::temp_files`).
pub fn temp_path(path: &Path) -> PathBuf {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let mut name = path.with_extension("tmp").into_os_string();
    name.push(format!(".{}.{n}", std::process::id()));
    PathBuf::from(name)
}

/// Reads a JSON record; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("{} is damaged: {}", path.display(), way_out(path)))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// What to do about a damaged record, by where it sits: a snapshot's
/// (STATE/instances/NAME/snapshots/SNAP/FILE) goes with that snapshot, an
/// instance's (STATE/instances/NAME/FILE) with the instance; anything else
/// (the Guix image cache) can only be removed.
fn way_out(record: &Path) -> String {
    let name = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(String::from);
    let up = |n: usize| record.ancestors().nth(n);
    let is = |n: usize, dir: &str| up(n).and_then(name).as_deref() == Some(dir);
    let state = |n: usize| super::paths::StateDir::new(up(n).unwrap_or(Path::new("/")).to_path_buf());
    if is(2, "snapshots") && is(4, "instances") {
        if let (Some(inst), Some(snap)) = (up(3).and_then(name), up(1).and_then(name)) {
            return format!(
                "delete that snapshot with '{}'",
                state(5).command(&inst, &format!("snapshot delete {snap}"))
            );
        }
    }
    match up(1).and_then(name) {
        Some(inst) if is(2, "instances") => {
            format!("remove it, or start the instance over with '{}'", state(3).command(&inst, "destroy"))
        }
        _ => "remove it".into(),
    }
}

/// What `launch` hands the supervisor (boot.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootPlan {
    pub qemu: PathBuf,
    pub argv: Vec<String>,
    pub spec: VmSpec,
    /// Where this boot's output starts in serial.log (appended across
    /// boots), for `logs --boot`.
    #[serde(default)]
    pub serial_start: u64,
    /// serial.log's inode then: once the log passed its cap and was renamed
    /// serial.log.1, this boot's start is found there by it.
    #[serde(default)]
    pub serial_inode: Option<u64>,
    /// The `virtiofsd`s to start before QEMU, one per virtio-fs share.
    #[serde(default)]
    pub daemons: Vec<Daemon>,
}

impl BootPlan {
    /// QEMU's whole command line, binary first.
    pub fn command_line(&self) -> Vec<String> {
        std::iter::once(self.qemu.display().to_string()).chain(self.argv.iter().cloned()).collect()
    }
}

/// Written by the supervisor when QEMU is up (run.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub qemu: ProcIdentity,
    pub supervisor: ProcIdentity,
    /// Unix time QEMU started.
    pub started_at: f64,
    pub accel: Accel,
    pub qemu_version: String,
    pub argv: Vec<String>,
}

/// A VM that `run` started (run-origin.json), written before its
/// supervisor starts and kept until the instance is removed: `list`,
/// `status` and `show` say where the instance came from, and the
/// supervisor stops and removes a throwaway VM whose `run` is gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOrigin {
    /// The `run` that owns the VM: once this process is gone (a SIGKILLed
    /// run included), the supervisor stops the VM and removes the
    /// instance. `None` when the run keeps the VM (`--keep`, or
    /// `--keep-on-failure` after a failure).
    pub owner: Option<ProcIdentity>,
    /// The run's pid, for messages, also once it let go of the VM.
    pub pid: i32,
    /// The snapshot the run started from (`run --from-snapshot`).
    pub from_snapshot: Option<SnapshotOrigin>,
}

/// Snapshot `snapshot` of instance `instance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOrigin {
    pub instance: String,
    pub snapshot: String,
}

impl RunOrigin {
    /// The owner, when this record still names one that is gone.
    pub fn owner_gone(&self) -> Option<i32> {
        self.owner.as_ref().filter(|o| !o.is_running()).map(|o| o.pid)
    }
}

impl std::fmt::Display for SnapshotOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "snapshot '{}' of instance '{}'", self.snapshot, self.instance)
    }
}

/// Why QEMU did not come up (launch-failure.json), in parts, as QEMU's own
/// `machine.py` keeps a `VMLaunchFailure`: what happened, how QEMU ended,
/// its command line and its output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchFailure {
    pub message: String,
    pub exit: Option<ExitInfo>,
    /// QEMU's argv, binary first.
    pub command_line: Vec<String>,
    /// The end of what QEMU wrote to stderr.
    pub stderr_tail: String,
    /// The end of what this boot printed on the serial console.
    #[serde(default)]
    pub serial_tail: String,
}

/// base.json: the identity of the image under the boot overlay (a base
/// that changed would silently corrupt the guest's view of its disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
    pub format: String,
}

/// snapshots/NAME/snapshot.json: a saved VM (its paused state in
/// `state.bin`, its boot disk frozen in `disk.qcow2`) and what a VM must be
/// like to load it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    pub created_at: f64,
    /// QEMU's version at save time: the state loads only into the same one.
    pub qemu_version: String,
    /// The saved VM's devices and resources; a loading VM gets the same.
    pub spec: VmSpec,
    /// The image under the frozen disk, which must not change.
    pub base: Option<BaseIdentity>,
    pub state_bytes: u64,
    /// disk.qcow2's size at the save (none for a diskless VM or a snapshot
    /// saved before it was recorded): a size that changed means damage.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Seconds the save took (state and disk).
    pub seconds: f64,
    /// The 9p shares the guest had mounted: unmounted for the save (QEMU
    /// refuses to migrate while one is mounted), mounted again on resume.
    #[serde(default)]
    pub mounts: Vec<GuestMount>,
}

/// A 9p share mounted in the guest: its tag and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMount {
    pub tag: String,
    pub path: String,
    /// How it was mounted (snapshots saved before virtio-fs: 9p).
    #[serde(default)]
    pub kind: ShareKind,
}

/// devices.json: runtime additions that persist across launches.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DevicesRecord {
    #[serde(default)]
    pub disks: Vec<ExtraDisk>,
    #[serde(default)]
    pub shares: Vec<Share>,
    #[serde(default)]
    pub forwards: Vec<Forward>,
}

impl DevicesRecord {
    pub fn load(inst: &Instance) -> Result<DevicesRecord> {
        Ok(read_json(&inst.devices())?.unwrap_or_default())
    }

    pub fn save(&self, inst: &Instance) -> Result<()> {
        write_json(&inst.devices(), self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_record_names_itself_and_the_way_out() {
        let dir = std::env::temp_dir().join(format!("qbuf-dmg-{}/instances/web", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("settings.json");
        fs::write(&p, "{not json").unwrap();
        let e = format!("{:#}", read_json::<i32>(&p).unwrap_err());
        assert!(e.contains("settings.json is damaged") && e.contains("--name web destroy"), "{e}");
        let root = dir.parent().unwrap().parent().unwrap();
        assert!(e.contains(&format!("--state-dir {} --name web destroy", root.display())), "{e}");
        fs::remove_dir_all(dir.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn a_damaged_snapshot_record_points_at_that_snapshot() {
        let root = std::env::temp_dir().join(format!("qbuf-dmgs-{}", std::process::id()));
        let dir = root.join("instances/x/snapshots/bad");
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("snapshot.json");
        fs::write(&p, r#"{"name":"bad""#).unwrap();
        let e = format!("{:#}", read_json::<i32>(&p).unwrap_err());
        let delete = format!("--state-dir {} --name x snapshot delete bad'", root.display());
        assert!(e.contains("snapshot.json is damaged: delete that snapshot") && e.contains(&delete), "{e}");
        assert!(!e.contains("destroy"), "{e}");
        // Outside an instance (the Guix image cache) there is no command to give.
        let cache = root.join("images/k/build.json");
        fs::create_dir_all(cache.parent().unwrap()).unwrap();
        fs::write(&cache, "{").unwrap();
        let e = format!("{:#}", read_json::<i32>(&cache).unwrap_err());
        assert!(e.contains("build.json is damaged: remove it:"), "{e}");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_failed_write_keeps_the_old_record_and_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("r.json");
        write_json(&p, &1).unwrap();
        assert_eq!(read_json::<i32>(&p).unwrap(), Some(1));
        // A value serde cannot write fails after the temp file was opened.
        let bad: std::collections::HashMap<(i32, i32), i32> = [((1, 2), 3)].into();
        assert!(write_json(&p, &bad).is_err());
        assert_eq!(read_json::<i32>(&p).unwrap(), Some(1));
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1, "a temp file was left");
    }

    #[test]
    fn concurrent_writers_of_one_record_never_garble_it() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("settings.json");
        let values: Vec<String> = (0..6).map(|i| "x".repeat(1 + i * 3000)).collect();
        std::thread::scope(|s| {
            for v in &values {
                let p = &p;
                s.spawn(move || (0..40).for_each(|_| write_json(p, v).expect("a concurrent write failed")));
            }
        });
        let last: String = read_json(&p).unwrap().unwrap();
        assert!(values.contains(&last), "garbled: {} bytes", last.len());
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["settings.json"], "temp files were left");
        let (a, b) = (temp_path(&p), temp_path(&p));
        assert_ne!(a, b);
        assert!(a.file_name().unwrap().to_str().unwrap().starts_with("settings.tmp."), "{}", a.display());
    }
}
