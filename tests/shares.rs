//! The share at /mnt/qbuf over virtio-fs, end to end against real QEMU, a
//! real `virtiofsd` and the test guest: both ways, host edits seen, owners,
//! read-only, the fallback to 9p, a `virtiofsd` that dies under the VM, and
//! snapshots. One VM at a time (see support::Env).

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use support::*;

/// The `virtiofsd` tests/setup.sh installs: these tests fail, not skip,
/// without it.
fn require_virtiofsd() {
    assert!(which("virtiofsd").is_some(), "virtiofsd is not on PATH: run tests/setup.sh (it builds and installs it)");
}

fn checkout(env: &Env) -> std::path::PathBuf {
    let c = env.dir.join("checkout");
    std::fs::create_dir_all(c.join("src")).unwrap();
    std::fs::write(c.join("src/main.cc"), "int main() { return 0; }\n").unwrap();
    c
}

/// The shares `status --json` reports.
fn shares(env: &Env) -> Vec<serde_json::Value> {
    let (st, out) = env.json(&["status"]);
    out.ok();
    st["shares"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_virtiofs_share_goes_both_ways_sees_host_edits_and_guest_files_are_the_host_users() {
    require_virtiofsd();
    let env = Env::new("vfsboth");
    let c = checkout(&env);
    // The share root is the host user's, mode 0755: dev (uid 1000 in the
    // guest) writes it because the host user is shown as dev, not because
    // the directory is open to everyone.
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.launch(&["--share", path_str(&c), "--share-type", "virtiofs"]);
    let sh = shares(&env);
    assert_eq!(
        (sh.len(), sh[0]["kind"].as_str(), sh[0]["tag"].as_str()),
        (1, Some("virtiofs"), Some("qbuf")),
        "{sh:?}"
    );
    assert!(sh[0]["daemon_pid"].as_i64().is_some_and(|p| pid_running(p as i32)), "{sh:?}");
    let out = env.ssh("dev", "mount | grep ' /mnt/qbuf '");
    assert!(out.stdout().contains("type virtiofs"), "{}", out.text());
    let out = env.run(&["status"]);
    assert!(out.stdout().contains("over virtio-fs"), "{}", out.text());
    let out = env.run(&["show"]);
    assert!(out.stdout().contains("the last boot shared over virtio-fs"), "{}", out.text());

    // Host to guest, and guest to host as dev.
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/src/main.cc").stdout(), "int main() { return 0; }\n");
    env.ssh("dev", "echo built > /mnt/qbuf/out.o && mkdir /mnt/qbuf/build && id -u > /mnt/qbuf/build/uid").ok();
    assert_eq!(std::fs::read_to_string(c.join("out.o")).unwrap(), "built\n");
    let me = nix::unistd::geteuid().as_raw();
    for f in ["out.o", "build", "build/uid"] {
        let m = std::fs::metadata(c.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (me, nix::unistd::getegid().as_raw()), "{f} belongs to the host user");
    }
    assert_eq!(std::fs::read_to_string(c.join("build/uid")).unwrap(), "1000\n", "written by dev");
    assert_eq!(std::fs::metadata(&c).unwrap().permissions().mode() & 0o777, 0o755, "the share root was not opened up");

    // A host edit is seen by a guest that had the file cached: virtiofsd's
    // cache=auto revalidates after at most 1 s.
    std::fs::write(c.join("src/main.cc"), "int main() { return 1; }\n").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/src/main.cc").stdout(), "int main() { return 1; }\n");

    // Unsynced guest writes on the share survive a powerdown.
    env.ssh("dev", "dd if=/dev/zero of=/mnt/qbuf/big bs=1M count=8 2>/dev/null; echo last > /mnt/qbuf/last").ok();
    let (p, out) = env.json(&["powerdown"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "powerdown");
    assert_eq!(std::fs::metadata(c.join("big")).unwrap().len(), 8 << 20);
    assert_eq!(std::fs::read_to_string(c.join("last")).unwrap(), "last\n");
    wait_until("virtiofsd to be gone", Duration::from_secs(5), || {
        !sh[0]["daemon_pid"].as_i64().is_some_and(|p| pid_running(p as i32))
    });
    env.run(&["destroy", "--yes"]).ok();
    assert!(!env.instance_dir("dev").exists(), "destroy removes the virtiofs dir too");
}

#[test]
fn a_read_only_virtiofs_share_refuses_writes_even_from_root() {
    require_virtiofsd();
    let env = Env::new("vfsro");
    let c = checkout(&env);
    env.launch(&["--share", path_str(&c), "--share-type", "virtiofs", "--share-mode", "ro", "--ssh-user", "root"]);
    assert_eq!(shares(&env)[0]["readonly"], true);
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/src/main.cc").stdout(), "int main() { return 0; }\n");
    let out = env.ssh("dev", "touch /mnt/qbuf/x; echo $?; rm -f /mnt/qbuf/src/main.cc; echo $?");
    out.ok();
    let stdout = out.stdout();
    let codes: Vec<&str> = stdout.lines().collect();
    assert!(codes.len() == 2 && codes.iter().all(|l| *l != "0"), "writes must fail: {}", out.text());
    assert!(!c.join("x").exists() && c.join("src/main.cc").exists());
    env.run(&["powerdown"]).code_is(0);
}

/// A `virtiofsd` without the options qbuf-qemu needs, as an old one is.
fn old_virtiofsd(env: &Env) -> std::path::PathBuf {
    let p = env.dir.join("old-virtiofsd");
    std::fs::write(&p, "#!/bin/sh\necho 'Usage: virtiofsd [options]'\necho '  --socket-path PATH'\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn without_a_usable_virtiofsd_auto_falls_back_to_9p_and_virtiofs_is_refused() {
    let env = Env::new("vfsfallback");
    let c = checkout(&env);
    let old = old_virtiofsd(&env);
    let env = env.with_env("QBUF_QEMU_VIRTIOFSD", path_str(&old));
    let mut args = env.launch_args(&["--share", path_str(&c), "--share-type", "virtiofs"]);
    let out = env.run(&strs(&args));
    out.code_is(1);
    assert!(out.stderr().contains("no usable virtiofsd") && out.stderr().contains("--share-type 9p"), "{}", out.text());
    assert!(env.qemu_pids().is_empty(), "nothing was started");

    args.retain(|a| a != "--share-type" && a != "virtiofs");
    let (v, out) = env.json(&strs(&args));
    out.ok();
    let notes = v["notes"].to_string();
    assert!(notes.contains("sharing over 9p") && notes.contains("too old"), "the fallback says why: {v}");
    assert_eq!(shares(&env)[0]["kind"], "9p");
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/src/main.cc").stdout(), "int main() { return 0; }\n");
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn a_virtiofsd_killed_under_the_vm_is_reported_and_the_stop_is_still_verified() {
    require_virtiofsd();
    let env = Env::new("vfskill");
    let c = checkout(&env);
    let v = env.launch(&["--share", path_str(&c), "--share-type", "virtiofs"]);
    let qemu = pid_of(&v);
    let daemon = shares(&env)[0]["daemon_pid"].as_i64().unwrap() as i32;
    signal(daemon, nix::sys::signal::Signal::SIGKILL);
    wait_until("status to report the lost share", Duration::from_secs(10), || {
        shares(&env)[0]["daemon_exit"].is_object()
    });
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "running", "QEMU still runs: {st}");
    assert!(st["notes"].to_string().contains("virtiofsd of share 'qbuf' ended"), "{st}");
    assert!(
        env.events("dev").iter().any(|e| e["event"] == "QBUF_VIRTIOFSD_EXITED" && e["data"]["tag"] == "qbuf"),
        "events record it"
    );
    // The guest may hang unmounting a share whose daemon is gone: the
    // ladder escalates, and says so, and QEMU is gone either way.
    let (p, out) = env.json(&["powerdown", "--timeout", "15"]);
    assert!([0, 3].contains(&out.code()), "{}", out.text());
    assert!(["powerdown", "quit"].contains(&s(&p, "method").as_str()), "{p}");
    assert!(!pid_running(qemu), "QEMU {qemu} still runs");
}

#[test]
fn snapshots_and_runs_from_them_keep_a_virtiofs_share() {
    require_virtiofsd();
    let env = Env::new("vfssnap");
    let c = checkout(&env);
    let disk = guest().disk;
    // As dev: the unmount for the save and the mounts after a resume are sudo's.
    env.launch(&["--image", path_str(&disk), "--share", path_str(&c), "--share-type", "virtiofs"]);
    assert_eq!(env.ssh("dev", "id -un").stdout(), "dev\n");
    let (s1, out) = env.json(&["snapshot", "save", "s1"]);
    out.ok();
    assert_eq!(s1["snapshot"]["shares"][0], "qbuf", "{s1}");
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/src/main.cc").stdout(), "int main() { return 0; }\n", "mounted again");
    std::fs::write(c.join("after.txt"), "written after the save\n").unwrap();
    let out = env.run(&[
        "run",
        "--from-snapshot",
        "s1",
        "--",
        "sh",
        "-c",
        "cat /mnt/qbuf/after.txt; mount | grep -c virtiofs",
    ]);
    out.ok();
    assert_eq!(out.stdout(), "written after the save\n1\n", "the run sees the checkout as it is now: {}", out.text());
    env.run(&["snapshot", "load", "s1"]).ok();
    assert_eq!(shares(&env)[0]["kind"], "virtiofs");
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/after.txt").stdout(), "written after the save\n");
    env.run(&["powerdown"]).ok();
    env.json(&["launch", "--resume", "s1"]).1.ok();
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/after.txt").stdout(), "written after the save\n", "after launch --resume");
    env.run(&["destroy", "--yes"]).ok();
}

#[test]
fn qemu_7_2_runs_a_virtiofs_share_and_says_why_it_cannot_snapshot_it() {
    require_virtiofsd();
    let (bin, fw) = qemu72();
    let env =
        Env::new("vfs72").with_env("QBUF_QEMU_SYSTEM", path_str(&bin)).with_env("QBUF_QEMU_FIRMWARE", path_str(&fw));
    let c = checkout(&env);
    env.launch(&["--share", path_str(&c), "--share-type", "virtiofs"]);
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/src/main.cc").stdout(), "int main() { return 0; }\n");
    let out = env.run(&["snapshot", "save", "s"]);
    out.code_is(1);
    assert!(out.stderr().contains("--share-type 9p"), "{}", out.text());
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/src/main.cc").stdout(), "int main() { return 0; }\n", "the VM runs on");
    env.run(&["powerdown"]).code_is(0);
}
