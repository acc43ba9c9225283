//! Unpacking the guest's tar stream: what lands, what is skipped and why.
use super::*;
use std::os::unix::fs::MetadataExt;
use tar::EntryType as T;

/// A tar stream of `(kind, path, link target, mode, content)`, names
/// written raw: the tar crate's own setters refuse `..` and `/`.
fn stream(entries: &[(T, &str, &str, u32, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (kind, path, link, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn unpacked(entries: &[(T, &str, &str, u32, &str)]) -> (tempfile::TempDir, Unpacked) {
    let root = tempfile::tempdir().unwrap();
    let u = unpack_masked(&stream(entries)[..], root.path(), "out", 0o022).unwrap();
    (root, u)
}

fn reasons(u: &Unpacked) -> Vec<(&str, SkipReason)> {
    u.skipped.iter().map(|s| (s.path.as_str(), s.reason)).collect()
}

#[test]
fn files_directories_and_inner_links_land_without_special_bits() {
    let (root, u) = unpacked(&[
        (T::Directory, "out/", "", 0o1755, ""),
        (T::Regular, "out/a.txt", "", 0o644, "hello"),
        (T::Regular, "out/suid", "", 0o4755, "#!/bin/sh"),
        (T::Regular, "out/sub/deep.txt", "", 0o2640, "deep"),
        (T::Symlink, "out/sub/up", "../a.txt", 0o777, ""),
        (T::Symlink, "out/here", "./sub", 0o777, ""),
    ]);
    let out = root.path().join("out");
    assert_eq!(fs::read_to_string(out.join("sub/up")).unwrap(), "hello");
    assert_eq!(fs::read_to_string(out.join("here/deep.txt")).unwrap(), "deep");
    let mode = |p: &str| fs::symlink_metadata(out.join(p)).unwrap().mode() & 0o7777;
    assert_eq!((mode(""), mode("suid"), mode("sub/deep.txt"), mode("a.txt")), (0o755, 0o755, 0o640, 0o644));
    let me = nix::unistd::geteuid().as_raw();
    assert_eq!(fs::metadata(out.join("suid")).unwrap().uid(), me, "owned by the user, not the header's");
    assert_eq!(fs::metadata(out.join("a.txt")).unwrap().mtime(), 1_600_000_000);
    assert!(u.skipped.is_empty(), "{u:?}");
    assert_eq!(u.mode_bits_dropped, ["out/", "out/suid", "out/sub/deep.txt"]);
}

#[test]
fn devices_fifos_and_hard_links_are_skipped_and_named() {
    let (root, u) = unpacked(&[
        (T::Directory, "out/", "", 0o755, ""),
        (T::Block, "out/sda", "", 0o666, ""),
        (T::Char, "out/mem", "", 0o666, ""),
        (T::Fifo, "out/pipe", "", 0o666, ""),
        (T::Link, "out/shadow", "/etc/shadow", 0o644, ""),
        (T::Regular, "out/ok", "", 0o644, "ok"),
    ]);
    use SkipReason::*;
    let want = [("out/sda", Device), ("out/mem", Device), ("out/pipe", Fifo), ("out/shadow", HardLink)];
    assert_eq!(reasons(&u), want);
    assert_eq!(u.skipped[3].target.as_deref(), Some("/etc/shadow"));
    let left: Vec<_> = fs::read_dir(root.path().join("out")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["ok"]);
}

#[test]
fn paths_that_leave_the_copy_are_skipped() {
    let (root, u) = unpacked(&[
        (T::Regular, "out/../escaped", "", 0o644, "x"),
        (T::Regular, "/tmp/absolute", "", 0o644, "x"),
        (T::Regular, "other/file", "", 0o644, "x"),
        (T::Regular, "out/ok", "", 0o644, "ok"),
    ]);
    let want = ["out/../escaped", "/tmp/absolute", "other/file"].map(|p| (p, SkipReason::PathEscapes));
    assert_eq!(reasons(&u), want);
    let left: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["out"]);
    assert!(!Path::new("/tmp/absolute").exists() || fs::read("/tmp/absolute").unwrap() != b"x");
}

#[test]
fn links_that_leave_the_copy_are_skipped() {
    let (root, u) = unpacked(&[
        (T::Directory, "out/", "", 0o755, ""),
        (T::Symlink, "out/passwd", "/etc/passwd", 0o777, ""),
        (T::Symlink, "out/up", "../x", 0o777, ""),
        (T::Symlink, "out/d/upup", "../../x", 0o777, ""),
        (T::Symlink, "out/self", ".", 0o777, ""),
        // Inside by its letters, outside once `self` is followed.
        (T::Symlink, "out/sneaky", "self/../x", 0o777, ""),
        (T::Symlink, "out/empty", "", 0o777, ""),
        (T::Symlink, "out", "out2", 0o777, ""),
    ]);
    let r = reasons(&u);
    let escaped: Vec<&str> = r.iter().filter(|(_, why)| *why == SkipReason::LinkEscapes).map(|(p, _)| *p).collect();
    assert_eq!(escaped, ["out/passwd", "out/up", "out/d/upup", "out/sneaky", "out/empty"]);
    assert_eq!(r.last(), Some(&("out", SkipReason::ReplacesDirectory)));
    assert_eq!(u.skipped[0].target.as_deref(), Some("/etc/passwd"));
    assert!(fs::symlink_metadata(root.path().join("out/self")).unwrap().file_type().is_symlink());
    assert!(link_stays_inside(Path::new("../../a/b"), 2) && !link_stays_inside(Path::new("a/../b"), 5));
}

#[test]
fn nothing_is_written_through_an_unpacked_symlink() {
    let outside = tempfile::tempdir().unwrap();
    let (root, u) = unpacked(&[
        (T::Directory, "out/", "", 0o755, ""),
        (T::Directory, "out/real/", "", 0o755, ""),
        (T::Symlink, "out/link", "real", 0o777, ""),
        (T::Regular, "out/link/through", "", 0o644, "x"),
        (T::Regular, "out/file", "", 0o644, "x"),
        (T::Regular, "out/file/below", "", 0o644, "x"),
        // A later entry replaces a link by its name, not what it names.
        (T::Symlink, "out/again", "real", 0o777, ""),
        (T::Regular, "out/again", "", 0o600, "replaced"),
    ]);
    use SkipReason::ParentNotDirectory;
    assert_eq!(reasons(&u), [("out/link/through", ParentNotDirectory), ("out/file/below", ParentNotDirectory)]);
    let out = root.path().join("out");
    assert!(fs::read_dir(out.join("real")).unwrap().next().is_none(), "nothing landed through the link");
    assert_eq!(fs::read_to_string(out.join("again")).unwrap(), "replaced");
    assert!(fs::symlink_metadata(out.join("again")).unwrap().is_file());
    assert!(fs::read_dir(outside.path()).unwrap().next().is_none());
}

#[test]
fn a_read_only_directory_is_filled_then_closed() {
    let (root, _) = unpacked(&[(T::Directory, "out/", "", 0o555, ""), (T::Regular, "out/f", "", 0o444, "f")]);
    let out = root.path().join("out");
    assert_eq!(fs::read_to_string(out.join("f")).unwrap(), "f");
    assert_eq!(fs::metadata(&out).unwrap().mode() & 0o777, 0o555);
    fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_failed_copy_can_be_removed_by_its_owner() {
    let (dir, _) = unpacked(&[(T::Directory, "out/", "", 0o555, ""), (T::Directory, "out/sub/", "", 0o500, "")]);
    open_up(dir.path());
    for d in [dir.path().join("out"), dir.path().join("out/sub")] {
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o700, 0o700, "{}", d.display());
    }
}

#[test]
fn garbage_is_an_error_and_guest_paths_are_rooted() {
    let root = tempfile::tempdir().unwrap();
    assert!(unpack(&[7u8; 1024][..], root.path(), "out").is_err());
    let u = Unpacked {
        skipped: vec![Skipped { path: "out/sda".into(), reason: SkipReason::Device, target: None }],
        mode_bits_dropped: vec!["out/suid".into()],
        ..Unpacked::default()
    };
    let r = u.rooted("/tmp");
    assert_eq!((r.skipped[0].path.as_str(), r.mode_bits_dropped[0].as_str()), ("/tmp/out/sda", "/tmp/out/suid"));
}

#[test]
fn the_users_umask_applies_to_what_lands() {
    let root = tempfile::tempdir().unwrap();
    let entries = [
        (T::Directory, "out/", "", 0o777, ""),
        (T::Regular, "out/world-writable", "", 0o666, "x"),
        (T::Regular, "out/tool", "", 0o4777, "x"),
        (T::Directory, "out/shut/", "", 0o500, ""),
    ];
    unpack_masked(&stream(&entries)[..], root.path(), "out", 0o027).unwrap();
    let mode = |p: &str| fs::symlink_metadata(root.path().join("out").join(p)).unwrap().mode() & 0o7777;
    assert_eq!([mode(""), mode("world-writable"), mode("tool"), mode("shut")], [0o750, 0o640, 0o750, 0o500]);
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap();
    assert_eq!(process_umask(), u32::from_str_radix(line.trim(), 8).unwrap());
}

#[test]
fn a_flood_of_left_out_entries_is_counted_past_the_list() {
    let mut entries = vec![(T::Directory, "out/", "", 0o755, "")];
    let names: Vec<String> = (0..LISTED + 5).map(|i| format!("out/{i}")).collect();
    entries.extend(names.iter().map(|n| (T::Fifo, n.as_str(), "", 0o644, "")));
    let suid: Vec<String> = (0..LISTED + 3).map(|i| format!("out/s{i}")).collect();
    entries.extend(suid.iter().map(|n| (T::Regular, n.as_str(), "", 0o4755, "")));
    let (_root, u) = unpacked(&entries);
    assert_eq!((u.skipped.len(), u.skipped_unlisted), (LISTED, 5));
    assert_eq!((u.mode_bits_dropped.len(), u.mode_bits_dropped_unlisted), (LISTED, 3));
    let mut all = u.clone();
    all.extend(u);
    assert_eq!((all.skipped.len(), all.skipped_unlisted), (LISTED, LISTED as u64 + 10));
}

#[test]
fn directories_past_those_kept_for_the_end_get_their_modes_at_once() {
    let names: Vec<String> = (0..DIRS_KEPT + 2).map(|i| format!("out/d{i}/")).collect();
    let mut entries = vec![(T::Directory, "out/", "", 0o755, "")];
    entries.extend(names.iter().map(|n| (T::Directory, n.as_str(), "", 0o775, "")));
    let last = format!("out/d{}/", DIRS_KEPT + 2);
    entries.push((T::Directory, last.as_str(), "", 0o555, ""));
    entries.push((T::Regular, "out/d0/f", "", 0o644, "f"));
    let (root, _) = unpacked(&entries);
    let mode = |p: &str| fs::metadata(root.path().join(p)).unwrap().mode() & 0o777;
    assert_eq!((mode("out/d0"), mode(&names[DIRS_KEPT + 1])), (0o755, 0o755));
    assert_eq!(mode(&last), 0o755, "past the list: its owner keeps access, the others get the guest's");
    assert_eq!(fs::metadata(root.path().join("out/d0")).unwrap().mtime(), 1_600_000_000);
}

#[test]
fn a_long_path_in_a_report_is_cut() {
    let long = "x".repeat(SHOWN_MAX + 10);
    assert_eq!(shown(long.as_bytes()).len(), SHOWN_MAX + '…'.len_utf8());
    assert_eq!(shown(b"out/a"), "out/a");
}

/// A guest that stalls its tar: what ends the copy's ssh (run's deadline)
/// learns its pid, and the copy then ends, though ssh's stderr stays open
/// (a ControlMaster holds it until the stalled session closes).
#[test]
fn a_stalled_copy_ends_when_its_ssh_is_ended() {
    use std::os::unix::process::ExitStatusExt;
    let root = tempfile::tempdir().unwrap();
    let seen = std::sync::Mutex::new(vec![]);
    let watch = |pid: i32| {
        seen.lock().unwrap().push(pid);
        if pid > 0 {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            });
        }
    };
    let ssh = ["sh", "-c", "(exec sleep 8 >/dev/null) & exec sleep 30"].map(String::from);
    let start = std::time::Instant::now();
    let (unpacked, sent, _) = unpack_output(&ssh, root.path(), "out", &watch).unwrap();
    assert!(start.elapsed() < Duration::from_secs(6), "{:?}", start.elapsed());
    assert_eq!(sent.signal(), Some(nix::sys::signal::Signal::SIGTERM as i32));
    assert_eq!(unpacked.unwrap(), Unpacked::default(), "nothing came");
    let seen = seen.lock().unwrap();
    assert!(seen.len() == 2 && seen[0] > 0 && seen[1] == 0, "{seen:?}");
}
