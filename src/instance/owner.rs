//! Whose the state dir is: the one check, made before a command reads or
//! writes there (`app::run`) and when a directory is made (`private_dir`).
//! The state dir holds the SSH key every guest trusts and the VMs' control
//! sockets, so it and everything under it must belong to the user running
//! the tool: a state dir another user owns (or swapped `ssh/` in) would
//! have `launch` put *their* public key into this user's VM (issue 15).
//!
//! Rules, per path (checked with `lstat`): a path that does not exist is
//! fine (it is made private); one that exists must belong to the running
//! user (effective uid). A symlink is followed only when the link belongs
//! to the user or to root, and what it names exists, belongs to the user,
//! and sits in a directory of the user's or root's: a link into someone
//! else's directory is refused, since they could swap what it names.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Why a path under the state dir is not the running user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// It belongs to that uid.
    Owner(u32),
    /// It is a symlink that belongs to that uid.
    LinkOwner(u32),
    /// It is a symlink to this path, which belongs to that uid.
    Target(PathBuf, u32),
    /// It is a symlink to this path, in a directory that belongs to that uid.
    TargetDir(PathBuf, u32),
    /// It is a symlink to this path, which does not exist.
    Dangling(PathBuf),
}

/// A refused path: what it is for, and why it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotOurs {
    /// "state dir", "SSH key", …
    pub what: &'static str,
    pub path: PathBuf,
    pub why: Why,
}

/// `uid 65534 (nobody)`, or `uid N` when no user has that uid.
pub fn describe_uid(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

impl NotOurs {
    pub fn reason(&self) -> String {
        let (what, path) = (self.what, self.path.display());
        let me = describe_uid(nix::unistd::geteuid().as_raw());
        match &self.why {
            Why::Owner(u) => format!("{what} {path} belongs to {}, not to you ({me})", describe_uid(*u)),
            Why::LinkOwner(u) => format!("{what} {path} is a symlink owned by {}, not by you ({me})", describe_uid(*u)),
            Why::Target(t, u) => format!(
                "{what} {path} is a symlink to {}, which belongs to {}, not to you ({me})",
                t.display(),
                describe_uid(*u)
            ),
            Why::TargetDir(t, u) => format!(
                "{what} {path} is a symlink to {}, in a directory that belongs to {} (at or above it), not to you ({me})",
                t.display(),
                describe_uid(*u)
            ),
            Why::Dangling(t) => format!("{what} {path} is a symlink to {}, which does not exist", t.display()),
        }
    }

    pub fn fix(&self) -> String {
        format!(
            "qbuf-qemu keeps the SSH key your VMs trust and their control sockets there, so it uses only a state dir \
             of your own: remove {} (or have its owner do so), or pass --state-dir DIR (or set QBUF_QEMU_STATE_DIR) \
             for a directory of yours",
            self.path.display()
        )
    }
}

impl fmt::Display for NotOurs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason(), self.fix())
    }
}

impl std::error::Error for NotOurs {}

/// Checks `path` by the rules above; a [`NotOurs`] in the error chain when
/// it is refused.
pub fn check(path: &Path, what: &'static str) -> Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |why| Err(NotOurs { what, path: path.to_path_buf(), why }.into());
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {what} {}", path.display())),
    };
    if !meta.file_type().is_symlink() {
        return if meta.uid() == me { Ok(()) } else { refuse(Why::Owner(meta.uid())) };
    }
    if meta.uid() != me && meta.uid() != 0 {
        return refuse(Why::LinkOwner(meta.uid()));
    }
    let target = match fs::canonicalize(path) {
        Ok(t) => t,
        Err(_) => return refuse(Why::Dangling(fs::read_link(path).unwrap_or_default())),
    };
    let t = fs::metadata(&target).with_context(|| format!("cannot inspect {}", target.display()))?;
    if t.uid() != me {
        return refuse(Why::Target(target, t.uid()));
    }
    // Every directory above the target, not only its parent: whoever owns
    // any of them can rename what is below and put their own in its place.
    // One that cannot be inspected is refused, not taken for root's.
    for dir in target.ancestors().skip(1) {
        let owner = fs::metadata(dir).map(|m| m.uid()).unwrap_or(u32::MAX);
        if owner != me && owner != 0 {
            return refuse(Why::TargetDir(target.clone(), owner));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_own_paths_pass_and_links_to_them_too() {
        let d = tempfile::tempdir().unwrap();
        check(&d.path().join("missing"), "state dir").unwrap();
        check(d.path(), "state dir").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        check(&link, "state dir").unwrap();
        let dangling = d.path().join("dangling");
        std::os::unix::fs::symlink("nowhere", &dangling).unwrap();
        let e = check(&dangling, "state dir").unwrap_err();
        let n = e.downcast_ref::<NotOurs>().expect("a NotOurs");
        assert_eq!(n.why, Why::Dangling("nowhere".into()));
        assert!(e.to_string().contains("which does not exist: qbuf-qemu keeps"), "{e}");
    }

    #[test]
    fn reasons_name_the_owner_and_the_fix() {
        let n = NotOurs { what: "state dir", path: "/s".into(), why: Why::Owner(65534) };
        let m = n.to_string();
        assert!(m.starts_with("state dir /s belongs to uid 65534"), "{m}");
        assert!(m.contains("--state-dir DIR") && m.contains("remove /s"), "{m}");
        let t = NotOurs { what: "SSH key dir", path: "/s/ssh".into(), why: Why::Target("/home/x".into(), 4321) };
        assert!(t.reason().starts_with("SSH key dir /s/ssh is a symlink to /home/x, which belongs to uid 4321"));
        assert_eq!(describe_uid(0), "uid 0 (root)");
    }
}
