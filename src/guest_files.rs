//! Files out of an untrusted guest (`copy` guest → host, `run --copy-out`).
//! The guest's `tar -cf -` comes over the pinned SSH (the guest needs no scp
//! or sftp) and is unpacked here, not by the host's tar: run as root, that
//! one recreates what the guest says, device nodes (the host's disk made
//! world-writable), setuid-root binaries and owners included. Only regular
//! files, directories and symlinks that stay inside the copied tree land,
//! owned by the user running the tool, with permission bits only (no
//! setuid, setgid or sticky) less the user's umask; everything else is
//! skipped and said. What the stream can make the host hold is bounded
//! (`limits`, the lists of what was left out), and so is how long a copy
//! may take when a caller has a deadline (`watch`).

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::instance::Instance;
use crate::ssh::{self, Target};
use crate::timeouts::SSH_STDERR_AFTER_EXIT;

mod limits;

/// Why an entry of the guest's stream was not copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipReason {
    /// A character or block device node.
    Device,
    /// A named pipe.
    Fifo,
    /// A hard link: it may name any file, inside the copy or not.
    HardLink,
    /// A symlink whose target is absolute or leaves the copied tree.
    LinkEscapes,
    /// A path that is absolute, has `..`, or lies outside the copied path.
    PathEscapes,
    /// A path below a symlink or a file: writing it would go through a link.
    ParentNotDirectory,
    /// A non-directory where a directory was already unpacked.
    ReplacesDirectory,
    /// Any other kind of entry (sparse file, socket, …).
    Unsupported,
}

/// One entry the guest sent that did not land on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The path in the guest.
    pub path: String,
    pub reason: SkipReason,
    /// A link's target, for links.
    pub target: Option<String>,
}

/// What a copy out of the guest left out or changed. A hostile stream can
/// send millions of entries: past the first [`LISTED`] of each list they
/// are counted, not kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Unpacked {
    /// Entries not copied.
    pub skipped: Vec<Skipped>,
    /// Paths (in the guest) copied without their setuid/setgid/sticky bits.
    pub mode_bits_dropped: Vec<String>,
    /// Entries not copied beyond those in `skipped`.
    pub skipped_unlisted: u64,
    /// Paths copied without those bits beyond those in `mode_bits_dropped`.
    pub mode_bits_dropped_unlisted: u64,
}

/// How many entries each list of [`Unpacked`] keeps.
pub const LISTED: usize = 1000;

/// The longest path or link target kept for a report, in bytes (Linux's
/// `PATH_MAX`); a longer one is cut and ends in `…`.
const SHOWN_MAX: usize = 4096;

impl Unpacked {
    pub fn extend(&mut self, other: Unpacked) {
        other.skipped.into_iter().for_each(|s| self.skip(s));
        other.mode_bits_dropped.into_iter().for_each(|p| self.bits_dropped(p));
        self.skipped_unlisted += other.skipped_unlisted;
        self.mode_bits_dropped_unlisted += other.mode_bits_dropped_unlisted;
    }

    fn skip(&mut self, s: Skipped) {
        if self.skipped.len() < LISTED {
            self.skipped.push(s);
        } else {
            self.skipped_unlisted += 1;
        }
    }

    fn bits_dropped(&mut self, path: String) {
        if self.mode_bits_dropped.len() < LISTED {
            self.mode_bits_dropped.push(path);
        } else {
            self.mode_bits_dropped_unlisted += 1;
        }
    }

    /// Paths as the guest names them: `under` joined to each stream path.
    fn rooted(mut self, under: &str) -> Unpacked {
        let join = |p: &mut String| *p = Path::new(under).join(&*p).display().to_string();
        self.skipped.iter_mut().for_each(|s| join(&mut s.path));
        self.mode_bits_dropped.iter_mut().for_each(join);
        self
    }
}

/// A path or link target from the stream as a report shows it, cut to [`SHOWN_MAX`].
fn shown(bytes: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(&bytes[..bytes.len().min(SHOWN_MAX)]).into_owned();
    if bytes.len() > SHOWN_MAX {
        s.push('…');
    }
    s
}

/// The most read past the end of the archive (tar pads its stream to a
/// 10 KiB record); draining it lets the guest's tar and ssh exit cleanly.
const TRAILER_LIMIT: u64 = 1 << 20;

/// How many directories get their mode and time at the end (see
/// [`unpack`]); each further one gets its mode at once, with its owner's
/// access kept so that it can be filled, and keeps the time of unpacking.
/// (Small in tests: the filesystem, not the logic, makes 4096 slow.)
const DIRS_KEPT: usize = if cfg!(test) { 64 } else { 4096 };

/// Unpacks the tar stream `from` into `root`, a fresh private directory:
/// only what lies under `root/base` lands, its permission bits less the
/// process's umask (as tar does for a user who is not root). Directories
/// get their modes at the end (deepest first), so a read-only one can
/// still be filled.
pub fn unpack<R: Read>(from: R, root: &Path, base: &str) -> Result<Unpacked> {
    unpack_masked(from, root, base, process_umask())
}

fn unpack_masked<R: Read>(from: R, root: &Path, base: &str, umask: u32) -> Result<Unpacked> {
    let mut archive = tar::Archive::new(limits::Framed::new(from));
    let mut out = Unpacked::default();
    let mut dirs: Vec<(PathBuf, u32, Option<SystemTime>)> = vec![];
    let bad_stream = "the guest sent a broken tar stream";
    for entry in archive.entries().context(bad_stream)? {
        let mut entry = entry.context(bad_stream)?;
        let mode = entry.header().mode().unwrap_or(0o600);
        let kept = mode & 0o777 & !umask;
        match place(&mut entry, root, base, kept)? {
            Placed::Skipped(reason) => {
                let target = entry.link_name_bytes().map(|l| shown(&l));
                out.skip(Skipped { path: shown(&entry.path_bytes()), reason, target });
            }
            Placed::Symlink | Placed::Nothing => {}
            placed => {
                if mode & 0o7000 != 0 {
                    out.bits_dropped(shown(&entry.path_bytes()));
                }
                match placed {
                    Placed::Directory(p) if dirs.len() < DIRS_KEPT => dirs.push((p, kept, mtime(entry.header()))),
                    Placed::Directory(p) => set_mode(&p, kept | 0o700)?,
                    _ => {}
                }
            }
        }
    }
    io::copy(&mut archive.into_inner().take(TRAILER_LIMIT), &mut io::sink()).context(bad_stream)?;
    dirs.sort_by_key(|(p, ..)| std::cmp::Reverse(p.components().count()));
    for (p, mode, time) in dirs {
        if let Some(t) = time {
            let _ = fs::File::open(&p).and_then(|f| f.set_modified(t));
        }
        set_mode(&p, mode)?;
    }
    Ok(out)
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).with_context(|| cannot("set the mode of", p))
}

/// The process's umask, read once. Reading it means setting it: a file
/// another thread makes in that instant gets the stricter 077.
fn process_umask() -> u32 {
    static MASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    // Read, not set and reset: other threads (run's watchers) make files
    // meanwhile. Linux shows it in /proc since 4.7; else the usual 022.
    *MASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"));
        line.and_then(|m| u32::from_str_radix(m.trim(), 8).ok()).unwrap_or(0o022)
    })
}

/// What became of one entry.
enum Placed {
    File,
    Directory(PathBuf),
    Symlink,
    /// A header that only describes other entries.
    Nothing,
    Skipped(SkipReason),
}

/// Lands one entry under `root`, or says why not.
fn place<R: Read>(entry: &mut tar::Entry<R>, root: &Path, base: &str, mode: u32) -> Result<Placed> {
    use tar::EntryType as T;
    let kind = entry.header().entry_type();
    let skip = |r| Ok(Placed::Skipped(r));
    match kind {
        T::Regular | T::Continuous | T::Directory | T::Symlink => {}
        T::Char | T::Block => return skip(SkipReason::Device),
        T::Fifo => return skip(SkipReason::Fifo),
        T::Link => return skip(SkipReason::HardLink),
        // Metadata for other entries (the tar crate applies the local ones).
        T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => return Ok(Placed::Nothing),
        _ => return skip(SkipReason::Unsupported),
    }
    let parts = match entry.path().ok().and_then(|p| inside(&p, base)) {
        Some(parts) => parts,
        None => return skip(SkipReason::PathEscapes),
    };
    let dest = match parent_dirs(root, &parts)? {
        Some(dest) => dest,
        None => return skip(SkipReason::ParentNotDirectory),
    };
    let is_dir = kind == T::Directory;
    if !make_room(&dest, is_dir)? {
        return skip(SkipReason::ReplacesDirectory);
    }
    match kind {
        T::Directory => {
            if fs::symlink_metadata(&dest).is_err() {
                fs::DirBuilder::new().mode(0o700).create(&dest).with_context(|| cannot("create", &dest))?;
            }
            Ok(Placed::Directory(dest))
        }
        T::Symlink => {
            let target = entry.link_name().ok().flatten().map(|l| l.into_owned()).unwrap_or_default();
            // The link's parent sits this many directories below the copy's top.
            match parts.len().checked_sub(2).filter(|depth| link_stays_inside(&target, *depth)) {
                Some(_) => {
                    std::os::unix::fs::symlink(&target, &dest).with_context(|| cannot("create", &dest))?;
                    Ok(Placed::Symlink)
                }
                None => skip(SkipReason::LinkEscapes),
            }
        }
        _ => {
            write_file(entry, &dest, mode)?;
            Ok(Placed::File)
        }
    }
}

fn cannot(what: &str, p: &Path) -> String {
    format!("cannot {what} {}", p.display())
}

/// The entry's path as names below the extraction root, the first being
/// `base`; `None` when it is absolute, has `..` or lies elsewhere.
fn inside(path: &Path, base: &str) -> Option<Vec<OsString>> {
    let mut parts = vec![];
    for c in path.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_os_string()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    (parts.first().is_some_and(|p| p == base)).then_some(parts)
}

/// Whether a symlink target, read from a link whose directory is `depth`
/// levels below the copy's top, stays inside the copy: relative, with its
/// `..` only in front and no more of them than `depth`. A `..` after a
/// name is refused because it would climb from wherever that name leads
/// when it is itself a symlink (`s/../x` with `s -> .` leaves the copy),
/// so every link resolves inside by induction, whatever the others are.
fn link_stays_inside(target: &Path, depth: usize) -> bool {
    let mut up = 0;
    let mut named = false;
    for c in target.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if !named => up += 1,
            Component::Normal(_) => named = true,
            _ => return false,
        }
    }
    !target.as_os_str().is_empty() && up <= depth
}

/// Makes every parent of the entry a real directory (creating missing ones)
/// and returns the entry's full path; `None` when a parent is a symlink or
/// a file, so nothing is ever written through a link.
fn parent_dirs(root: &Path, parts: &[OsString]) -> Result<Option<PathBuf>> {
    let (last, parents) = parts.split_last().expect("inside() has the base");
    let mut at = root.to_path_buf();
    for p in parents {
        at.push(p);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o755).create(&at).with_context(|| cannot("create", &at))?;
            }
            Err(e) => return Err(e).with_context(|| cannot("inspect", &at)),
        }
    }
    Ok(Some(at.join(last)))
}

/// Clears `dest` for a new entry as tar does (a later entry wins), except
/// that only a directory may take a directory's place (`false`): the links
/// already checked rely on directories staying directories.
fn make_room(dest: &Path, is_dir: bool) -> Result<bool> {
    match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| cannot("inspect", dest)),
        Ok(m) if m.is_dir() => Ok(is_dir),
        // A file or a symlink: the name is removed, never what a link names.
        Ok(_) => fs::remove_file(dest).map(|()| true).with_context(|| cannot("replace", dest)),
    }
}

/// A new file (never an existing one, never through a link) with the
/// entry's content, `mode` (permission bits only) and its time.
fn write_file<R: Read>(entry: &mut tar::Entry<R>, dest: &Path, mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .with_context(|| cannot("create", dest))?;
    io::copy(entry, &mut f).with_context(|| cannot("write", dest))?;
    f.set_permissions(fs::Permissions::from_mode(mode)).with_context(|| cannot("chmod", dest))?;
    if let Some(t) = mtime(entry.header()) {
        let _ = f.set_modified(t);
    }
    Ok(())
}

fn mtime(h: &tar::Header) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(h.mtime().ok()?))
}

/// Copies `guest` (a file or a directory) to `host`, like `cp -r`: into
/// `host` when it is a directory, as `host` otherwise. The copy is unpacked
/// in a private directory with an unpredictable name beside its
/// destination, then renamed into place; a directory already there is
/// never merged into. `watch` is told the pid of the copy's ssh once it
/// runs and 0 once it has ended, so that a deadline can end it (a guest
/// that stalls its tar holds the copy for ever otherwise).
pub fn copy_from_guest(t: &Target, inst: &Instance, guest: &str, host: &Path, watch: &dyn Fn(i32)) -> Result<Unpacked> {
    let g = Path::new(guest.trim_end_matches('/'));
    let base = g.file_name().and_then(|b| b.to_str()).context("the guest path names no file")?.to_string();
    let parent = g.parent().map(|p| p.display().to_string()).filter(|p| !p.is_empty()).unwrap_or_else(|| ".".into());
    let dest = if host.is_dir() { host.join(&base) } else { host.to_path_buf() };
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| cannot("create", dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".qbuf-copy-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot make a private directory in {}", dir.display()))?;
    let placed = receive(t, inst, guest, (&parent, &base), tmp.path(), watch).and_then(|u| {
        move_into_place(&tmp.path().join(&base), &dest)?;
        Ok(u)
    });
    if placed.is_err() {
        // The guest's directory modes (0555, say) are on the copy by now:
        // without write access to them a user who is not root could not
        // remove the half-made copy.
        open_up(tmp.path());
    }
    Ok(placed?.rooted(&parent))
}

fn move_into_place(top: &Path, dest: &Path) -> Result<()> {
    if fs::symlink_metadata(top).is_err() {
        return Ok(());
    }
    let full = [nix::errno::Errno::ENOTEMPTY as i32, nix::errno::Errno::EEXIST as i32];
    fs::rename(top, dest).map_err(|e| match e.raw_os_error() {
        Some(c) if full.contains(&c) => anyhow!(
            "{} exists and is not empty: a copy from the guest never merges into a directory; remove it or copy elsewhere",
            dest.display()
        ),
        _ => anyhow!(e).context(format!("cannot move the copy to {}", dest.display())),
    })
}

/// Gives the owner full access to every directory under `root` (symlinks
/// are not followed), so that the tree can be removed.
fn open_up(root: &Path) {
    let Ok(meta) = fs::symlink_metadata(root) else { return };
    if !meta.is_dir() {
        return;
    }
    let _ = fs::set_permissions(root, fs::Permissions::from_mode(meta.permissions().mode() | 0o700));
    for e in fs::read_dir(root).into_iter().flatten().flatten() {
        open_up(&e.path());
    }
}

/// Runs the guest's `tar -cf - -C PARENT BASE` over the pinned SSH and
/// unpacks its output into `root`; ssh's stderr (the guest tar's message
/// for a missing file) is passed through, a changed host key explained.
fn receive(
    t: &Target,
    inst: &Instance,
    guest: &str,
    (parent, base): (&str, &str),
    root: &Path,
    watch: &dyn Fn(i32),
) -> Result<Unpacked> {
    let remote = format!("tar -cf - -C {} {}", shell_words::quote(parent), shell_words::quote(base));
    let argv = ssh::streaming_command(t, &remote);
    let (unpacked, sent, mismatch) = unpack_output(&argv, root, base, watch)?;
    if mismatch {
        eprintln!("qbuf-qemu: {}", ssh::host_key_mismatch_message(t, inst));
    }
    let unpacked = unpacked?;
    if !sent.success() {
        return Err(anyhow!("the guest could not send {guest} (does it exist? the guest's message is above)"));
    }
    Ok(unpacked)
}

/// Runs `argv` (ssh, ending with this process) and unpacks its stdout:
/// what was unpacked, how it ended, whether its stderr said the host key
/// changed. `watch` gets its pid while it runs (see [`copy_from_guest`]).
fn unpack_output(
    argv: &[String],
    root: &Path,
    base: &str,
    watch: &dyn Fn(i32),
) -> Result<(Result<Unpacked>, std::process::ExitStatus, bool)> {
    tracing::info!("running {}", shell_words::join(argv));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    ssh::end_with_this_process(&mut cmd);
    // Out of the terminal's process group: a Ctrl-C reaches this process
    // alone, whose watcher ends the ssh once it has noted why (`watch`),
    // so the cut copy is known as such and removed.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().with_context(|| format!("cannot run 'ssh': {}", ssh::SSH_MISSING))?;
    watch(child.id() as i32);
    let stderr = child.stderr.take().expect("piped");
    let (said, mismatch) = std::sync::mpsc::channel();
    std::thread::spawn(move || said.send(ssh::pass_stderr(stderr, true)));
    let unpacked = unpack(child.stdout.take().expect("piped"), root, base);
    if unpacked.is_err() {
        let _ = child.kill();
    }
    let sent = ssh::wait_then_forget(&mut child, || watch(0));
    // Not waited for past this (the thread goes on, see the limit's why).
    let mismatch = mismatch.recv_timeout(SSH_STDERR_AFTER_EXIT).unwrap_or(false);
    Ok((unpacked, sent?, mismatch))
}

#[cfg(test)]
mod tests;
