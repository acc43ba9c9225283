//! One instance on disk: its directory and every file name in it, the lock
//! held for the VM's whole life, and the records that survive QEMU.
//!
//! Liveness comes from the lock, never from a pid file alone: the supervisor
//! and QEMU both inherit the locked file description, so the lock is free
//! exactly when neither runs (pid reuse and reboots cannot fool it).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// `[a-z0-9][a-z0-9_-]{0,62}`: checked before any file is touched.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        bail!(
            "invalid instance name {name:?}: use 1-63 characters from a-z, 0-9, '_' and '-', starting with a letter or digit"
        );
    }
    Ok(())
}

/// The state dir: `--state-dir`, else `$QBUF_QEMU_STATE_DIR`, else
/// `$XDG_STATE_HOME/qbuf-qemu`, else `~/.local/state/qbuf-qemu`.
pub fn default_state_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("qbuf-qemu"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_STATE_HOME nor HOME is set: pass --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/qbuf-qemu"))
}

/// Creates `dir` (and parents) private to the user; tightens an existing one.
pub fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let meta = fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (chmod 700)", dir.display()))?;
    }
    Ok(())
}

/// The state dir's shared parts.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: PathBuf) -> StateDir {
        StateDir { root }
    }
    pub fn ensure(&self) -> Result<()> {
        private_dir(&self.root)?;
        private_dir(&self.root.join("instances"))
    }
    pub fn ssh_dir(&self) -> PathBuf {
        self.root.join("ssh")
    }
    pub fn user_key(&self) -> PathBuf {
        self.ssh_dir().join("id_ed25519")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn instance(&self, name: &str) -> Instance {
        Instance { name: name.to_string(), dir: self.root.join("instances").join(name) }
    }
    pub fn instance_names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join("instances"))
            .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// One instance's directory. All per-instance file names live here.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    pub dir: PathBuf,
}

macro_rules! files {
    ($($(#[$m:meta])* $f:ident => $n:literal;)*) => {
        impl Instance { $( $(#[$m])* pub fn $f(&self) -> PathBuf { self.dir.join($n) } )* }
        /// Every file name the tool may create in an instance dir; destroy
        /// removes these and nothing else.
        pub const INSTANCE_FILES: &[&str] = &[$($n),*];
    };
}

files! {
    /// flock()ed for the VM's whole life.
    lock => "lock";
    /// Settings saved at first launch and reused by a plain `launch`.
    settings => "settings.json";
    overlay => "overlay.qcow2";
    /// The base image's identity, recorded when the overlay was made.
    base_identity => "base.json";
    /// What the supervisor runs: the resolved spec and argv.
    boot_plan => "boot.json";
    /// Written by the supervisor once QEMU is up: pids and identities.
    run_record => "run.json";
    /// Written when QEMU is gone: how and why it stopped.
    stop_record => "stopped.json";
    /// Written by the supervisor when QEMU failed to start.
    launch_failure => "launch-failure.json";
    events_log => "events.jsonl";
    qmp_supervisor => "qmp-sup.sock";
    qmp_user => "qmp.sock";
    control => "control.sock";
    console => "console.sock";
    guest_agent => "qga.sock";
    serial_log => "serial.log";
    qemu_stderr => "qemu.log";
    supervisor_log => "supervisor.log";
    known_hosts => "known_hosts";
    authorized_key => "authorized_key.pub";
    /// Images and disks created for this instance by `disk add --size`.
    disks_dir => "disks";
    /// Devices and forwards recorded at runtime, restored at launch.
    devices => "devices.json";
    /// flock()ed while a command changes devices (devices.json, root ports).
    devices_lock => "devices.lock";
    /// Which Guix image this instance boots (its key and store path).
    guix_image => "guix-image.json";
}

impl Instance {
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    pub fn ensure_dir(&self) -> Result<()> {
        private_dir(&self.dir)
    }

    /// Sockets and run records a crashed supervisor may leave behind.
    pub fn runtime_files(&self) -> [PathBuf; 6] {
        [self.qmp_supervisor(), self.qmp_user(), self.control(), self.console(), self.guest_agent(), self.run_record()]
    }

    /// Removes runtime leftovers; returns the ones that existed.
    pub fn clean_stale(&self) -> Vec<PathBuf> {
        self.runtime_files().into_iter().filter(|p| fs::remove_file(p).is_ok()).collect()
    }
}

/// The instance lock. Dropping it unlocks only if no child inherited it.
pub struct Lock {
    pub file: File,
}

impl Lock {
    /// Tries once to take the lock; `None` when another process holds it.
    pub fn try_acquire(inst: &Instance) -> Result<Option<Lock>> {
        let file = open_lock_file(&inst.lock())?;
        // nix's newer `Flock` owns the File; the raw call keeps the fd ours to
        // pass on to the supervisor and QEMU.
        #[allow(deprecated)]
        let r = nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock);
        match r {
            Ok(()) => Ok(Some(Lock { file })),
            Err(nix::errno::Errno::EWOULDBLOCK) => Ok(None),
            Err(e) => bail!("cannot lock {}: {e}", inst.lock().display()),
        }
    }

    /// Whether some process (supervisor or QEMU) holds the lock now.
    pub fn is_held(inst: &Instance) -> Result<bool> {
        if !inst.lock().exists() {
            return Ok(false);
        }
        Ok(Lock::try_acquire(inst)?.is_none())
    }

    /// Lets the lock survive `exec` so the supervisor and QEMU hold it too.
    pub fn inheritable(&self) -> Result<i32> {
        let fd = self.file.as_raw_fd();
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
        Ok(fd)
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

/// Opens (creating) `path` and waits for an exclusive flock on it; the lock
/// goes with the returned file.
pub fn lock_file(path: &Path) -> Result<File> {
    let file = open_lock_file(path)?;
    #[allow(deprecated)]
    nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockExclusive)
        .with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(file)
}

/// Writes JSON atomically (temp file + rename), private to the user.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        serde_json::to_writer_pretty(&mut f, value)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a JSON record; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b)
                .with_context(|| format!("{} is damaged: remove it or run 'qbuf-qemu destroy'", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// A process identity that survives pid reuse and reboots: the pid, its
/// start time in clock ticks since boot, and the boot id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcIdentity {
    pub pid: i32,
    pub start_ticks: u64,
    pub boot_id: String,
}

/// A process's state letter and start time from `/proc/PID/stat`.
pub fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&s)
}

/// Parses `/proc/PID/stat`; the command name may contain spaces and ')'.
pub fn parse_stat(s: &str) -> Option<(char, u64)> {
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 (starttime) is index 19 after the state (field 3).
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

impl ProcIdentity {
    pub fn of(pid: i32) -> Option<ProcIdentity> {
        let (_, start_ticks) = proc_stat(pid)?;
        Some(ProcIdentity { pid, start_ticks, boot_id: boot_id() })
    }

    /// Running means: same boot, same start time, and not a zombie (an exited
    /// QEMU stays a zombie until reaped, and `kill(pid, 0)` succeeds on it).
    pub fn is_running(&self) -> bool {
        if self.boot_id != boot_id() {
            return false;
        }
        matches!(proc_stat(self.pid), Some((state, start)) if start == self.start_ticks && state != 'Z' && state != 'X')
    }
}

/// Written by the supervisor when QEMU is up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub qemu: ProcIdentity,
    pub supervisor: ProcIdentity,
    /// Unix time QEMU started.
    pub started_at: f64,
    pub accel: crate::qemu::Accel,
    pub qemu_version: String,
    pub argv: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        for ok in ["dev", "a", "0", "x_y-z", &"a".repeat(63)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Dev", "-a", "_a", "a/b", "..", "a b", "a.b", &"a".repeat(64), "é"] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains("invalid instance name"), "{bad}: {e}");
        }
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let line = "1234 (qemu) sys (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 98765 1000 10 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(line), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_running_and_a_changed_identity_is_not() {
        let me = ProcIdentity::of(std::process::id() as i32).unwrap();
        assert!(me.is_running());
        let reused = ProcIdentity { start_ticks: me.start_ticks + 1, ..me.clone() };
        assert!(!reused.is_running());
        let rebooted = ProcIdentity { boot_id: "other".into(), ..me };
        assert!(!rebooted.is_running());
    }

    #[test]
    fn zombie_is_not_running() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: it becomes a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while proc_stat(pid).map(|s| s.0) != Some('Z') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let id = ProcIdentity { pid, start_ticks: proc_stat(pid).unwrap().1, boot_id: boot_id() };
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok(),
            "kill(pid,0) succeeds on a zombie"
        );
        assert!(!id.is_running());
        drop(child);
    }

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
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn private_dir_tightens_permissions() {
        let dir = std::env::temp_dir().join(format!("qbuf-priv-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        fs::remove_dir_all(dir).unwrap();
    }
}
