//! virtio-fs shares as data: which transport a boot's shares use, and the
//! `virtiofsd` command line for one share (pure). Finding and judging a
//! `virtiofsd` on this host is the one place here that does I/O.
//!
//! Why virtio-fs at all: a C++ build is mostly stat/open/read of headers,
//! and 9p pays 20-40x the guest's own disk on exactly those (see
//! docs/benchmarks.md); virtio-fs with `--cache=auto` closes most of that gap
//! and still shows host edits at once (`--cache=always` did not).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::host::find_in_path;

/// How this boot's shares reach the guest (resolved: `auto` is decided by
/// the time a boot is planned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ShareKind {
    /// A boot planned before virtio-fs existed used 9p.
    #[default]
    #[serde(rename = "9p")]
    NineP,
    #[serde(rename = "virtiofs")]
    Virtiofs,
}

impl ShareKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ShareKind::NineP => "9p",
            ShareKind::Virtiofs => "virtio-fs",
        }
    }
}

/// QEMU's options for one virtio-fs share: its vhost-user socket and the
/// device that carries the tag; both values come escaped (commas doubled).
pub fn device_args(index: usize, tag: &str, socket: &str) -> [String; 4] {
    [
        "-chardev".into(),
        format!("socket,id=vfs{index},path={socket}"),
        "-device".into(),
        format!("vhost-user-fs-pci,chardev=vfs{index},tag={tag},id=share{index},queue-size=1024"),
    ]
}

/// One `virtiofsd` the supervisor starts before QEMU (its child, like QEMU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Daemon {
    /// The share's tag, which names it in messages and events.
    pub tag: String,
    pub binary: PathBuf,
    pub argv: Vec<String>,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Daemon {
    pub fn command_line(&self) -> Vec<String> {
        std::iter::once(self.binary.display().to_string()).chain(self.argv.iter().cloned()).collect()
    }
}

/// The uid `dev` has in the guest: the host user's when it is a regular
/// user's (the Guix image is built so, see `guix::dev_uid`), else 1000 (the
/// first user account of Guix and of the test guest).
pub fn guest_dev_uid(host_uid: u32) -> u32 {
    if host_uid >= 1000 {
        host_uid
    } else {
        1000
    }
}

/// `virtiofsd`'s arguments for one share (pure).
///
/// Owners: everything the guest creates belongs to the host user who
/// launched (`squash-guest`: any guest uid or gid becomes theirs), and the
/// host user's files look like `dev`'s in the guest (`host:UID:DEV:1`), so
/// `dev` can write the checkout even when the host user is root. virtiofsd
/// does this itself, privileged or not (checked with 1.14 as root and as
/// an unprivileged user with `--sandbox=namespace`).
///
/// `--cache=auto`: a host edit is seen by the guest at once
/// (`--cache=always` served stale content in a trial).
pub fn daemon_args(dir: &Path, readonly: bool, socket: &Path, host_uid: u32, host_gid: u32) -> Vec<String> {
    const ALL: u32 = u32::MAX;
    let dev = guest_dev_uid(host_uid);
    let mut a = vec![
        format!("--socket-path={}", socket.display()),
        format!("--shared-dir={}", dir.display()),
        "--cache=auto".into(),
        "--sandbox=namespace".into(),
        "--log-level=warn".into(),
        format!("--translate-uid=squash-guest:0:{host_uid}:{ALL}"),
        format!("--translate-uid=host:{host_uid}:{dev}:1"),
        format!("--translate-gid=squash-guest:0:{host_gid}:{ALL}"),
    ];
    if readonly {
        a.push("--readonly".into());
    }
    a
}

/// Where a `virtiofsd` is looked for, in order: `$QBUF_QEMU_VIRTIOFSD`,
/// PATH, then where distributions and `cargo install` put it.
const USUAL_PLACES: &[&str] =
    &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "/usr/lib/virtiofsd", "/usr/local/libexec/virtiofsd"];

/// A `virtiofsd` this host can use, or why there is none (for the note
/// that says how to get one).
pub fn find_virtiofsd() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("QBUF_QEMU_VIRTIOFSD").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return usable(&p).map(|()| p.clone()).map_err(|e| format!("QBUF_QEMU_VIRTIOFSD={}: {e}", p.display()));
    }
    let cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd"));
    let candidates = find_in_path("virtiofsd")
        .into_iter()
        .chain(USUAL_PLACES.iter().map(PathBuf::from))
        .chain(cargo)
        .filter(|p| p.is_file());
    let mut why = None;
    for p in candidates {
        match usable(&p) {
            Ok(()) => return Ok(p),
            Err(e) => why = Some(format!("{}: {e}", p.display())),
        }
    }
    Err(why.unwrap_or_else(|| "no virtiofsd on PATH or in /usr/libexec".into()))
}

/// A `virtiofsd` that runs and has the options [`daemon_args`] gives
/// (the Rust virtiofsd, 1.11 or newer; QEMU's old C one has none of them).
pub fn usable(p: &Path) -> Result<(), String> {
    let out = Command::new(p).arg("--help").output().map_err(|e| format!("cannot run it: {e}"))?;
    let help = String::from_utf8_lossy(&out.stdout);
    if !help.contains("--translate-uid") || !help.contains("--sandbox") {
        return Err("too old (it lacks --translate-uid): install virtiofsd 1.11 or newer".into());
    }
    Ok(())
}

/// How to get virtio-fs, for the note a 9p fallback prints.
pub const HOW_TO_GET: &str = "install virtiofsd (e.g. 'apt-get install virtiofsd' on Debian 13, \
or 'cargo install virtiofsd' with libseccomp-dev and libcap-ng-dev) or point QBUF_QEMU_VIRTIOFSD at one";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_maps_every_guest_owner_to_the_host_user() {
        let a = daemon_args(Path::new("/home/u/my,qbuf"), false, Path::new("/s/vfs/0.sock"), 0, 0);
        assert!(a.contains(&"--socket-path=/s/vfs/0.sock".to_string()));
        assert!(a.contains(&"--shared-dir=/home/u/my,qbuf".to_string()), "not a QEMU option: no escaping");
        assert!(a.contains(&"--translate-uid=squash-guest:0:0:4294967295".to_string()));
        assert!(a.contains(&"--translate-uid=host:0:1000:1".to_string()), "root's files are dev's in the guest");
        assert!(a.contains(&"--cache=auto".to_string()), "host edits must be seen at once");
        assert!(!a.contains(&"--readonly".to_string()));
        let a = daemon_args(Path::new("/home/u/my,qbuf"), true, Path::new("/s"), 1234, 100);
        assert!(a.contains(&"--translate-uid=host:1234:1234:1".to_string()));
        assert!(a.contains(&"--translate-gid=squash-guest:0:100:4294967295".to_string()));
        assert!(a.contains(&"--readonly".to_string()));
    }

    #[test]
    fn the_device_carries_the_tag() {
        let a = device_args(1, "a,,b", "/x,,y.sock");
        assert_eq!(a[1], "socket,id=vfs1,path=/x,,y.sock");
        assert_eq!(a[3], "vhost-user-fs-pci,chardev=vfs1,tag=a,,b,id=share1,queue-size=1024");
    }
}
