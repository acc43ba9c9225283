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
//! to the user or to root, and what it names exists and belongs to the
//! user.
//!
//! And the way there: whoever can rename an entry of a directory above the
//! path can swap the state dir for their own mid-command, so every
//! directory above it, both as written (each prefix `lstat`ed) and as it
//! really is (the canonical path's ancestors, for a prefix that is a
//! symlink), must be the user's or root's and writable by no one else,
//! unless it is sticky and the user's or root's (`/tmp`: others may not
//! rename what they do not own there). A symlink on the way must be the
//! user's or root's. This is OpenSSH's `StrictModes` walk, with sticky
//! directories allowed.

use std::fmt;
use std::fs;
use std::io;
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
    /// It is a symlink to this path, which does not exist.
    Dangling(PathBuf),
    /// It is reached (when a symlink: its target, the path here) through
    /// a directory or symlink that someone else can change.
    Through(Option<PathBuf>, Hop),
}

/// A directory or symlink above a path that someone other than the user
/// and root can change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub path: PathBuf,
    pub owner: u32,
    /// Permission bits, sticky bit included (`0o1777` for `/tmp`).
    pub mode: u32,
    pub fault: Fault,
}

/// What makes a [`Hop`] changeable by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A symlink that belongs to another user.
    Link,
    /// A directory that belongs to another user (sticky or not: its owner
    /// may rename anything in it).
    Owner,
    /// A directory others may write, without the sticky bit: they may
    /// rename what is in it.
    Writable,
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

impl Hop {
    /// `/tmp/bob (owned by uid 1001 (bob), mode 1777), a directory that
    /// belongs to another user: …`
    fn describe(&self, me: &str) -> String {
        let (path, owner, mode) = (self.path.display(), describe_uid(self.owner), self.mode);
        match self.fault {
            Fault::Link => format!("{path}, a symlink owned by {owner}, not by you ({me}) or root"),
            Fault::Owner => format!(
                "{path} (owned by {owner}, mode {mode:04o}), a directory that belongs to another user: \
                 they can rename what is in it and put their own in its place"
            ),
            Fault::Writable => format!(
                "{path} (owned by {owner}, mode {mode:04o}), a directory others may write that has no sticky bit: \
                 they can rename what is in it and put their own in its place"
            ),
        }
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
            Why::Dangling(t) => format!("{what} {path} is a symlink to {}, which does not exist", t.display()),
            Why::Through(None, hop) => format!("{what} {path} is reached through {}", hop.describe(&me)),
            Why::Through(Some(t), hop) => {
                format!("{what} {path} is a symlink to {}, which is reached through {}", t.display(), hop.describe(&me))
            }
        }
    }

    pub fn fix(&self) -> String {
        let keeps =
            "qbuf-qemu keeps the SSH key your VMs trust and their control sockets there, so it uses only a state dir";
        let Why::Through(_, hop) = &self.why else {
            return format!(
                "{keeps} of your own: remove {} (or have its owner do so), or pass --state-dir DIR (or set \
                 QBUF_QEMU_STATE_DIR) for a directory of yours",
                self.path.display()
            );
        };
        let mine = hop.fault == Fault::Writable && hop.owner == nix::unistd::geteuid().as_raw();
        let chmod = if mine {
            format!("make {} yours alone ('chmod go-w {0}'), or ", hop.path.display())
        } else {
            String::new()
        };
        format!(
            "{keeps} that no one else can swap: {chmod}choose a state dir under your home with --state-dir DIR (or \
             QBUF_QEMU_STATE_DIR), e.g. ~/.local/state/qbuf-qemu (the default)"
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
    let path = std::path::absolute(path).with_context(|| format!("cannot make {what} {} absolute", path.display()))?;
    let refuse = |why| Err(NotOurs { what, path: path.clone(), why }.into());
    let above = || format!("cannot inspect the directories above {what} {}", path.display());
    if let Some(hop) = route(&path, me).with_context(above)? {
        return refuse(Why::Through(None, hop));
    }
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {what} {}", path.display())),
    };
    if !meta.file_type().is_symlink() {
        return if meta.uid() == me { Ok(()) } else { refuse(Why::Owner(meta.uid())) };
    }
    if meta.uid() != me && meta.uid() != 0 {
        return refuse(Why::LinkOwner(meta.uid()));
    }
    let target = match fs::canonicalize(&path) {
        Ok(t) => t,
        Err(_) => return refuse(Why::Dangling(fs::read_link(&path).unwrap_or_default())),
    };
    let t = fs::metadata(&target).with_context(|| format!("cannot inspect {}", target.display()))?;
    if t.uid() != me {
        return refuse(Why::Target(target, t.uid()));
    }
    match route(&target, me).with_context(above)? {
        Some(hop) => refuse(Why::Through(Some(target), hop)),
        None => Ok(()),
    }
}

/// The first directory or symlink above `path` (absolute) that someone
/// other than `me` and root can change: each prefix as written, `lstat`ed
/// from `/` down, then the real directories the deepest existing one
/// resolves to (a prefix that is a symlink of the user's or root's may
/// lead into someone else's directory). A prefix that does not exist ends
/// the walk: what is below it will be made private.
fn route(path: &Path, me: u32) -> io::Result<Option<Hop>> {
    let prefixes: Vec<&Path> = path.ancestors().skip(1).collect();
    let mut deepest = None;
    for p in prefixes.into_iter().rev() {
        let m = match fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        };
        if let Some(hop) = judge(p, &m, me) {
            return Ok(Some(hop));
        }
        // Where a link on the way leads is on the way too: a later link
        // below it could lead back out, and the deepest prefix's real path
        // alone would never show what was passed.
        if m.file_type().is_symlink() {
            if let Some(hop) = real_route(p, me)? {
                return Ok(Some(hop));
            }
        }
        deepest = Some(p);
    }
    match deepest {
        Some(d) => real_route(d, me),
        None => Ok(None),
    }
}

/// The first directory above or at `p`'s real path that someone other
/// than `me` and root can change.
fn real_route(p: &Path, me: u32) -> io::Result<Option<Hop>> {
    for a in fs::canonicalize(p)?.ancestors() {
        if let Some(hop) = judge(a, &fs::symlink_metadata(a)?, me) {
            return Ok(Some(hop));
        }
    }
    Ok(None)
}

/// Whether `p` (its `lstat` `m`) lets someone other than `me` and root
/// change what is below it.
fn judge(p: &Path, m: &fs::Metadata, me: u32) -> Option<Hop> {
    let (kind, mode) = (m.file_type(), m.mode() & 0o7777);
    let theirs = m.uid() != me && m.uid() != 0;
    let fault = if kind.is_symlink() {
        theirs.then_some(Fault::Link)
    } else if !kind.is_dir() {
        None
    } else if theirs {
        Some(Fault::Owner)
    } else if mode & 0o1000 == 0 && (mode & 0o002 != 0 || (mode & 0o020 != 0 && !private_group(m.gid(), me))) {
        Some(Fault::Writable)
    } else {
        None
    };
    fault.map(|fault| Hop { path: p.to_path_buf(), owner: m.uid(), mode, fault })
}

/// Whether `gid` is `uid`'s own group (a user private group: same name,
/// no other member), whose write bit lets no one else in: umask 002 makes
/// `~/.local` 0775 on such systems, and OpenSSH's StrictModes allows it.
fn private_group(gid: u32, uid: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    let (Ok(Some(user)), Ok(Some(group))) = (User::from_uid(Uid::from_raw(uid)), Group::from_gid(Gid::from_raw(gid)))
    else {
        return false;
    };
    user.gid.as_raw() == gid && group.name == user.name && group.mem.iter().all(|m| *m == user.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn missing_and_own_paths_pass_and_links_to_them_too() {
        let d = tempfile::tempdir().unwrap();
        check(&d.path().join("missing"), "state dir").unwrap();
        check(&d.path().join("missing/below"), "state dir").unwrap();
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
        let hop = Hop { path: "/tmp/bob".into(), owner: 4321, mode: 0o1777, fault: Fault::Owner };
        let m = NotOurs { what: "state dir", path: "/tmp/bob/s".into(), why: Why::Through(None, hop) }.to_string();
        assert!(
            m.starts_with("state dir /tmp/bob/s is reached through /tmp/bob (owned by uid 4321, mode 1777)"),
            "{m}"
        );
        assert!(m.contains("choose a state dir under your home with --state-dir DIR"), "{m}");
    }

    /// Whether this test may give files to another user (root, as in CI);
    /// when not, says so (and fails under CI, where it must run).
    fn as_root(test: &str) -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{test} needs root, and CI runs as root");
            eprintln!("{test}: not run: it needs root to give a directory to another user (CI runs it as root)");
        }
        root
    }

    const BOB: u32 = 65534;

    /// `parent/name`, a directory of `uid` with `mode`.
    fn dir(parent: &Path, name: &str, uid: u32, mode: u32) -> PathBuf {
        let d = parent.join(name);
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&d, Some(uid), None).unwrap();
        d
    }

    /// The hop `path` is refused for (and the whole message), or panics.
    fn hop(path: &Path) -> (Hop, String) {
        let e = check(path, "state dir").expect_err("refused");
        match &e.downcast_ref::<NotOurs>().expect("a NotOurs").why {
            Why::Through(_, hop) => (hop.clone(), e.to_string()),
            other => panic!("{path:?}: refused for {other:?}, not for the way there"),
        }
    }

    #[test]
    fn a_state_dir_reached_through_a_directory_others_can_change_is_refused() {
        if !as_root("a_state_dir_reached_through_a_directory_others_can_change_is_refused") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        // The review's case: bob's sticky, world-writable directory; and
        // bob's plain one, a root one anyone may write, /tmp's shape.
        let cases = [
            ("bob-sticky", BOB, 0o1777, Some(Fault::Owner)),
            ("bob", BOB, 0o755, Some(Fault::Owner)),
            ("open", me, 0o777, Some(Fault::Writable)),
            // Group-writable: refused unless the group is the user's own
            // private group (as root here: group root, no other member).
            ("group", me, 0o770, (!private_group(nix::unistd::getegid().as_raw(), me)).then_some(Fault::Writable)),
            ("like-tmp", 0, 0o1777, None),
            ("plain", me, 0o755, None),
        ];
        for (name, uid, mode, fault) in cases {
            let parent = dir(t.path(), name, uid, mode);
            let state = dir(&parent, "state", me, 0o700);
            for path in [state.clone(), state.join("instances"), parent.join("not-yet")] {
                match fault {
                    None => check(&path, "state dir").unwrap(),
                    Some(f) => {
                        let (h, said) = hop(&path);
                        assert_eq!(h, Hop { path: parent.clone(), owner: uid, mode, fault: f }, "{path:?}");
                        let shown = format!("{} (owned by {}, mode {mode:04o})", parent.display(), describe_uid(uid));
                        assert!(said.contains(&shown) && said.contains("under your home"), "{said}");
                    }
                }
            }
        }
        // A symlink of bob's on the way, even to a directory of the user's.
        let bobs_link = t.path().join("bobs-link");
        std::os::unix::fs::symlink(t.path().join("plain"), &bobs_link).unwrap();
        std::os::unix::fs::lchown(&bobs_link, Some(BOB), None).unwrap();
        let (h, said) = hop(&bobs_link.join("state"));
        assert_eq!((h.path, h.owner, h.fault), (bobs_link.clone(), BOB, Fault::Link));
        assert!(said.contains("a symlink owned by uid 65534"), "{said}");
        // The user's own symlink into bob's directory: judged where it leads.
        let my_link = t.path().join("my-link");
        std::os::unix::fs::symlink(t.path().join("bob"), &my_link).unwrap();
        assert_eq!(hop(&my_link.join("state")).0.path, t.path().join("bob"));
        // The state dir itself a link (of the user's) to a dir inside bob's.
        let state_link = t.path().join("state-link");
        std::os::unix::fs::symlink(t.path().join("bob-sticky/state"), &state_link).unwrap();
        let (h, said) = hop(&state_link);
        assert_eq!(h.path, t.path().join("bob-sticky"));
        assert!(said.contains("is a symlink to") && said.contains("which is reached through"), "{said}");
        // And into a sticky directory of root's: fine.
        std::os::unix::fs::symlink(t.path().join("like-tmp/state"), t.path().join("tmp-link")).unwrap();
        check(&t.path().join("tmp-link"), "state dir").unwrap();
    }

    /// A link of the user's into another user's directory, and there a
    /// link (also the user's) back home: the way still passes through the
    /// other user's directory, though the real path never shows it.
    #[test]
    fn a_chain_of_links_through_someone_elses_directory_is_refused() {
        if !as_root("a_chain_of_links_through_someone_elses_directory_is_refused") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let bobs = dir(&dir(t.path(), "bob", BOB, 0o755), "d", BOB, 0o755);
        let mine = dir(t.path(), "mine", me, 0o755);
        let real = dir(&mine, "real", me, 0o700);
        std::os::unix::fs::symlink(&bobs, mine.join("s")).unwrap();
        std::os::unix::fs::symlink(&real, bobs.join("l")).unwrap();
        let (h, said) = hop(&mine.join("s/l/state"));
        assert_eq!((h.path, h.fault), (bobs, Fault::Owner), "{said}");
    }

    #[test]
    fn a_writable_directory_of_the_users_own_says_how_to_close_it() {
        let t = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let open = dir(t.path(), "open", me, 0o777);
        let (h, said) = hop(&open.join("state"));
        assert_eq!(h.fault, Fault::Writable);
        assert!(said.contains(&format!("'chmod go-w {}'", open.display())), "{said}");
        // Group-writable is fine when the group is the user's own alone.
        let shared = dir(t.path(), "grp", me, 0o775);
        let gid = fs::metadata(&shared).unwrap().gid();
        match private_group(gid, me) {
            true => check(&shared.join("state"), "state dir").unwrap(),
            false => assert_eq!(hop(&shared.join("state")).0.fault, Fault::Writable),
        }
    }
}
