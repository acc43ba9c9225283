//! Where state lives: the state dir, one instance's directory, and every
//! file name in it (one table, so `destroy` knows exactly what the tool
//! created and a socket path that is too long is caught before anything
//! slow runs).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::owner;

/// The instance a command means when `--name` is not given.
pub const DEFAULT_NAME: &str = "dev";

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

/// The state dir when `--state-dir` is not given: `$QBUF_QEMU_STATE_DIR`,
/// else `$XDG_STATE_HOME/qbuf-qemu`, else `~/.local/state/qbuf-qemu`. The
/// variable is read here rather than by clap, whose usage lines would
/// otherwise change when it is set.
pub fn default_state_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("QBUF_QEMU_STATE_DIR").filter(|v| !v.is_empty()) {
        let d = d.into_string().map_err(|d| {
            anyhow::anyhow!(
                "QBUF_QEMU_STATE_DIR ({}) is not valid UTF-8: rename the directory",
                PathBuf::from(d).display()
            )
        })?;
        return Ok(PathBuf::from(d));
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("qbuf-qemu"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_STATE_HOME nor HOME is set: pass --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/qbuf-qemu"))
}

/// Creates `dir` (and parents) private to the user; tightens an existing
/// one. One that belongs to someone else is refused, never tightened
/// (see [`owner`]): checked before, and again once made, so a directory
/// another user put there in between is refused too.
pub fn private_dir(dir: &Path) -> Result<()> {
    owner::check(dir, "directory")?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    owner::check(dir, "directory")?;
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
    /// The one ownership check ([`owner`]) of what every command relies
    /// on: the state dir, `instances/`, the instance `name`'s directory,
    /// `ssh/` and the user key. Run before a command reads or writes there,
    /// so a refusal comes before any file is written.
    pub fn check_owned(&self, name: &str) -> Result<()> {
        let key = self.user_key();
        let checks = [
            (self.root.clone(), "state dir"),
            (self.root.join("instances"), "instances dir"),
            (self.instance(name).dir, "instance dir"),
            (self.ssh_dir(), "SSH key dir"),
            (key.with_extension("pub"), "SSH public key"),
            (key, "SSH key"),
        ];
        checks.iter().try_for_each(|(path, what)| owner::check(path, what))
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

    /// The one builder of the command lines hints show: `qbuf-qemu` with
    /// this state dir unless it is the default, `--name` unless it is
    /// `dev`, then `rest` (already shell-quoted where it needs to be).
    pub fn command(&self, name: &str, rest: &str) -> String {
        let mut words = vec!["qbuf-qemu".to_string()];
        if default_state_dir().ok().as_deref() != Some(self.root.as_path()) {
            words.push("--state-dir".into());
            words.push(self.root.display().to_string());
        }
        if name != DEFAULT_NAME {
            words.push("--name".into());
            words.push(name.to_string());
        }
        let mut c = shell_words::join(&words);
        if !rest.is_empty() {
            c.push(' ');
            c.push_str(rest);
        }
        c
    }
    /// The instances that exist, sorted. A directory that holds only files
    /// qbuf-qemu did not create (kept by `destroy`) is not an instance.
    pub fn instance_names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join("instances"))
            .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        v.retain(|n| validate_name(n).is_ok() && self.instance(n).exists());
        v.sort();
        v
    }
}

/// The longest path a unix socket address holds.
pub const MAX_SOCKET_PATH: usize = 107;

/// A fresh instance `name`, its directory made, in a state dir of its own
/// that goes when the guard drops (for unit tests).
#[cfg(test)]
pub fn scratch_instance(name: &str) -> (tempfile::TempDir, Instance) {
    let root = tempfile::tempdir().expect("a temporary directory");
    let inst = StateDir::new(root.path().to_path_buf()).instance(name);
    std::fs::create_dir_all(&inst.dir).expect("the instance directory");
    (root, inst)
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
    /// The boot disk as it was before `snapshot load` or `launch --resume`
    /// replaced it: kept until the saved state loaded, put back if it did not.
    overlay_kept => "overlay.qcow2.kept";
    /// The base identity that goes with `overlay_kept`.
    base_kept => "base.json.kept";
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
    /// Written by `run` for the VM it starts: the run that owns it, and
    /// the snapshot it came from.
    run_origin => "run-origin.json";
    events_log => "events.jsonl";
    /// The older events once events.jsonl passed its cap (see `logs::Capped`).
    events_log_old => "events.jsonl.1";
    qmp_supervisor => "qmp-sup.sock";
    qmp_user => "qmp.sock";
    control => "control.sock";
    console => "console.sock";
    guest_agent => "qga.sock";
    serial_log => "serial.log";
    /// The older console output once serial.log passed its cap.
    serial_log_old => "serial.log.1";
    /// QEMU's chardev logfile: a FIFO the supervisor reads into serial.log
    /// (QEMU would keep writing to a renamed file, so it never holds the log).
    serial_fifo => "serial.fifo";
    qemu_stderr => "qemu.log";
    /// QEMU's older output once qemu.log passed its cap.
    qemu_stderr_old => "qemu.log.1";
    supervisor_log => "supervisor.log";
    /// The supervisor's older log lines once supervisor.log passed its cap.
    supervisor_log_old => "supervisor.log.1";
    known_hosts => "known_hosts";
    /// OpenSSH's control sockets, one per guest user (`USER.sock`): a
    /// boot's first login as a user becomes a master connection that later
    /// `ssh`, `scp` and `run` COMMANDs as that user share (a login costs a
    /// key exchange, about 0.15 s under TCG; a shared one 10–20 ms). A
    /// master ends with the guest's connection.
    ssh_mux_dir => "ssh-mux";
    authorized_key => "authorized_key.pub";
    /// Images and disks created for this instance by `disk add --size`.
    disks_dir => "disks";
    /// Devices and forwards recorded at runtime, restored at launch.
    devices => "devices.json";
    /// flock()ed while a command changes devices (devices.json, root ports).
    devices_lock => "devices.lock";
    /// Which Guix image this instance boots (its key and store path).
    guix_image => "guix-image.json";
    /// Saved VMs (`snapshot save`), one directory each.
    snapshots_dir => "snapshots";
    /// virtio-fs shares' vhost-user sockets and `virtiofsd` logs.
    virtiofs_dir => "virtiofs";
}

/// A saved VM: its files, all made by `snapshot save`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
}

impl Snapshot {
    /// The paused VM's state, as QEMU's migration wrote it.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.bin")
    }
    /// The boot disk at the moment of the save; only ever a backing file.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("snapshot.json")
    }
}

impl Instance {
    /// One saved VM's directory.
    pub fn snapshot(&self, name: &str) -> Snapshot {
        Snapshot { dir: self.snapshots_dir().join(name) }
    }

    /// The state dir this instance lives in.
    pub fn state(&self) -> StateDir {
        let root = self.dir.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
        StateDir::new(root.to_path_buf())
    }

    /// A `qbuf-qemu` command line for this instance (see [`StateDir::command`]).
    pub fn command(&self, rest: &str) -> String {
        self.state().command(&self.name, rest)
    }

    /// Whether the instance exists: its directory holds a file qbuf-qemu
    /// made. A directory left with only the user's files (which `destroy`
    /// keeps) is not an instance, so it is never listed as a stopped one.
    pub fn exists(&self) -> bool {
        INSTANCE_FILES.iter().any(|n| fs::symlink_metadata(self.dir.join(n)).is_ok())
    }

    /// The user's files in an instance directory that is not an instance
    /// (see [`Instance::exists`]), as `destroy` left them.
    pub fn kept_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> =
            fs::read_dir(&self.dir).map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect()).unwrap_or_default();
        v.sort();
        v
    }

    pub fn ensure_dir(&self) -> Result<()> {
        private_dir(&self.dir)
    }

    /// A new boot's ssh-mux/, empty: the masters of an earlier boot are
    /// ending with their connections (a reset guest may not even close
    /// them), and this boot's first login makes new ones.
    pub fn fresh_ssh_mux_dir(&self) -> Result<()> {
        let _ = fs::remove_dir_all(self.ssh_mux_dir());
        private_dir(&self.ssh_mux_dir())
    }

    /// Share number `index`'s vhost-user socket (virtio-fs).
    pub fn share_socket(&self, index: usize) -> PathBuf {
        self.virtiofs_dir().join(format!("{index}.sock"))
    }

    /// What share number `index`'s `virtiofsd` wrote to stderr.
    pub fn share_daemon_log(&self, index: usize) -> PathBuf {
        self.virtiofs_dir().join(format!("{index}.log"))
    }

    /// The unix sockets QEMU and the supervisor create.
    pub fn sockets(&self) -> [PathBuf; 5] {
        [self.qmp_supervisor(), self.qmp_user(), self.control(), self.console(), self.guest_agent()]
    }

    /// Sockets and run records a crashed supervisor may leave behind.
    pub fn runtime_files(&self) -> Vec<PathBuf> {
        let mut v = self.sockets().to_vec();
        v.push(self.run_record());
        v.push(self.serial_fifo());
        v
    }

    /// Refuses a state dir whose socket paths do not fit a unix socket
    /// address (`sun_path`: 108 bytes with the NUL). Checked before anything
    /// slow runs, so a Guix build is not wasted on a launch that must fail.
    pub fn check_socket_paths(&self) -> Result<()> {
        // A virtio-fs share's socket (one digit for the first ten) is the longest.
        let all = self.sockets().into_iter().chain([self.share_socket(9)]);
        let longest = all.max_by_key(|p| p.as_os_str().len()).expect("six sockets");
        let len = longest.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            bail!(
                "socket path {} is {len} bytes, over the {MAX_SOCKET_PATH} a unix socket allows: use a shorter --state-dir",
                longest.display()
            );
        }
        Ok(())
    }

    /// Temp files an interrupted record write may leave: `NAME.tmp` of an
    /// older build, `NAME.tmp.PID.N` of `write_atomic` now.
    pub fn temp_files(&self) -> Vec<PathBuf> {
        // Every record `write_atomic` writes: the JSON ones, and the key.
        let stems: Vec<String> = INSTANCE_FILES
            .iter()
            .filter(|n| n.ends_with(".json") || n.ends_with(".pub"))
            .filter_map(|n| Some(Path::new(n).with_extension("tmp").to_str()?.to_string()))
            .collect();
        let Ok(entries) = fs::read_dir(&self.dir) else { return vec![] };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| stems.iter().any(|t| n == t || n.strip_prefix(t.as_str()).is_some_and(|r| r.starts_with('.'))))
            .map(|n| self.dir.join(n))
            .collect()
    }

    /// Removes what the tool created for the instance, and nothing else:
    /// the files in the instance table and the images `disk add --size`
    /// made (a file given to `disk add FILE` lives elsewhere). The one
    /// removal, for `destroy` and for the supervisor of a throwaway VM
    /// whose `run` is gone; the caller holds the lock.
    pub fn remove_created(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let disks = self.disks_dir();
        // Never through a symlink: only the tool's own directory's files go.
        if fs::symlink_metadata(&disks).is_ok_and(|m| m.is_dir()) {
            let mut images: Vec<PathBuf> = fs::read_dir(&disks)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            images.sort();
            removed.extend(images.into_iter().filter(|d| fs::remove_file(d).is_ok()));
            let _ = fs::remove_dir(&disks);
        }
        // Every file under snapshots/ is made by `snapshot save`, every one
        // under virtiofs/ by the supervisor (sockets, virtiofsd's logs), and
        // under ssh-mux/ by the OpenSSH masters the tool's logins started.
        let made_dirs = [self.snapshots_dir(), self.virtiofs_dir(), self.ssh_mux_dir()];
        for dir in &made_dirs {
            if dir.is_dir() && fs::remove_dir_all(dir).is_ok() {
                removed.push(dir.clone());
            }
        }
        for name in INSTANCE_FILES {
            let p = self.dir.join(name);
            if p == self.lock() || p == disks || made_dirs.contains(&p) {
                continue;
            }
            if fs::symlink_metadata(&p).is_ok() && fs::remove_file(&p).is_ok() {
                removed.push(p);
            }
        }
        for tmp in self.temp_files() {
            let _ = fs::remove_file(tmp);
        }
        let _ = fs::remove_file(self.lock());
        removed
    }

    /// Removes runtime leftovers; returns the ones that existed.
    pub fn clean_stale(&self) -> Vec<PathBuf> {
        self.runtime_files().into_iter().filter(|p| fs::remove_file(p).is_ok()).collect()
    }
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
    fn hints_keep_the_state_dir_and_the_name() {
        let i = StateDir::new("/tmp/my state".into()).instance("web");
        assert_eq!(i.command("status"), "qbuf-qemu --state-dir '/tmp/my state' --name web status");
        assert_eq!(i.state().root, PathBuf::from("/tmp/my state"));
        let d = StateDir::new("/tmp/s".into()).instance(DEFAULT_NAME);
        assert_eq!(d.command(""), "qbuf-qemu --state-dir /tmp/s");
    }

    #[test]
    fn a_state_dir_too_deep_for_sockets_is_refused_up_front() {
        let short = StateDir::new("/tmp/s".into()).instance("dev");
        short.check_socket_paths().unwrap();
        let deep = StateDir::new(format!("/tmp/{}", "d".repeat(90)).into()).instance("dev");
        let e = deep.check_socket_paths().unwrap_err().to_string();
        assert!(e.contains("shorter --state-dir") && e.contains("virtiofs/9.sock is 125 bytes"), "{e}");
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

    #[test]
    fn removal_takes_the_tools_files_and_never_goes_through_a_symlink() {
        let root = std::env::temp_dir().join(format!("qbuf-rm-{}", std::process::id()));
        let inst = StateDir::new(root.join("s")).instance("x");
        let elsewhere = root.join("user-images");
        fs::create_dir_all(&elsewhere).unwrap();
        fs::write(elsewhere.join("thesis.txt"), "mine").unwrap();
        fs::create_dir_all(&inst.dir).unwrap();
        std::os::unix::fs::symlink(&elsewhere, inst.disks_dir()).unwrap();
        fs::write(inst.overlay(), "overlay").unwrap();
        for leftover in ["settings.tmp", "settings.tmp.123.0", "run.tmp.9.1", "authorized_key.tmp.5.0"] {
            fs::write(inst.dir.join(leftover), "").unwrap();
        }
        fs::write(inst.dir.join("settings.tmpx"), "not ours").unwrap();
        let removed = inst.remove_created();
        for leftover in ["settings.tmp", "settings.tmp.123.0", "run.tmp.9.1", "authorized_key.tmp.5.0"] {
            assert!(!inst.dir.join(leftover).exists(), "{leftover}");
        }
        assert!(inst.dir.join("settings.tmpx").exists());
        fs::remove_file(inst.dir.join("settings.tmpx")).unwrap();
        assert!(elsewhere.join("thesis.txt").exists(), "a linked disks/ is not followed: {removed:?}");
        assert!(removed.contains(&inst.overlay()) && !inst.overlay().exists(), "{removed:?}");
        fs::remove_file(inst.disks_dir()).unwrap();
        fs::create_dir_all(inst.disks_dir().join("sub")).unwrap();
        fs::write(inst.disks_dir().join("disk1.qcow2"), "made by disk add --size").unwrap();
        assert_eq!(inst.remove_created(), vec![inst.disks_dir().join("disk1.qcow2")]);
        fs::remove_dir_all(root).unwrap();
    }
}
