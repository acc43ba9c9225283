//! `qbuf-qemu run` and snapshots, end to end against real QEMU and the test
//! guest: exit statuses, streaming, artifacts, cleanup on every path, and
//! resuming saved VMs. One VM at a time (see support::Env).

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

#[test]
fn run_true_exits_0_and_leaves_nothing() {
    let env = Env::new("runtrue");
    let out = env.run(&strs(&run_args(&["--no-share"], &["true"])));
    out.code_is(0);
    assert!(out.stderr().contains("COMMAND exited 0"), "{}", out.text());
    nothing_left(&env);
}

#[test]
fn run_exits_with_the_commands_status_and_streams_its_output_in_order() {
    let env = Env::new("runexit7");
    let args = run_args(&["--no-share", "--json"], &["sh", "-c", "echo one; echo two >&2; echo three; exit 7"]);
    let out = env.run(&strs(&args));
    out.code_is(7);
    assert_eq!(out.stdout(), "one\nthree\n", "stdout is COMMAND's alone:\n{}", out.text());
    let err = out.stderr();
    assert!(err.contains("two"), "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(err.lines().last().unwrap()).expect("--json summary on stderr");
    assert_eq!(summary["command_exit"], 7);
    assert_eq!(summary["outcome"], "command-failed");
    assert_eq!(summary["stop_method"], "powerdown");
    assert!(summary["phases"]["boot"].as_f64().unwrap() > 0.0, "{summary}");
    nothing_left(&env);
}

#[test]
fn copy_out_brings_guest_files_home_without_a_share() {
    let env = Env::new("copyout");
    let dest = env.dir.join("artifacts");
    let summary = env.dir.join("summary.json");
    let copy = format!("/tmp/out:{}", path_str(&dest));
    let args = run_args(
        &["--no-share", "--copy-out", &copy, "--summary", path_str(&summary)],
        &["sh", "-c", "mkdir -p /tmp/out/sub && echo built > /tmp/out/sub/report.txt"],
    );
    env.run(&strs(&args)).code_is(0);
    assert_eq!(std::fs::read_to_string(dest.join("sub/report.txt")).unwrap(), "built\n");
    let s = read_json(&summary);
    assert_eq!(s["exit_code"], 0);
    nothing_left(&env);
}

/// What an untrusted guest leaves in /tmp/evil for the host: a device node
/// of each kind (the host's disk, /dev/mem), a setuid-root program, a fifo,
/// symlinks out of the tree, a hard link pair, and plain files.
const EVIL: &str = "set -e; mkdir -p /tmp/evil/sub; cd /tmp/evil; echo plain > a.txt; echo deep > sub/deep.txt; \
     mknod sda b 8 0; mknod mem c 1 1; chmod 666 sda mem; mkfifo pipe; \
     echo '#!/bin/sh' > suid; chown 0:0 suid; chmod 6755 suid; chmod 2775 sub; \
     ln -s /etc/passwd passwd; ln -s ../../x sub/out; ln -s ../a.txt sub/in; \
     echo h > h1; ln h1 h2; chown 1234:1234 a.txt";

/// Asserts that `dest` holds only what may come out of a guest, owned by
/// the running user, and that `skipped` (a JSON list) names the rest.
fn only_plain_files_landed(dest: &std::path::Path, skipped: &Value) {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let meta = |p: &str| std::fs::symlink_metadata(dest.join(p));
    for gone in ["sda", "mem", "pipe", "passwd", "sub/out"] {
        assert!(meta(gone).is_err(), "{gone} came out of the guest into {}", dest.display());
    }
    assert_eq!(std::fs::read_to_string(dest.join("sub/in")).unwrap(), "plain\n", "an inner link is kept");
    assert_eq!(std::fs::read_to_string(dest.join("sub/deep.txt")).unwrap(), "deep\n");
    for p in ["", "a.txt", "suid", "sub", "sub/in"] {
        let m = meta(p).unwrap();
        assert_eq!(m.uid(), me, "{p} is owned by uid {}, not the running user", m.uid());
        assert_eq!(m.mode() & 0o7000, 0, "{p} kept mode {:o}", m.mode());
    }
    assert_eq!(meta("suid").unwrap().mode() & 0o777, 0o755);
    let hard = ["h1", "h2"].iter().filter(|h| meta(h).is_err()).count();
    assert_eq!(hard, 1, "one of a hard-linked pair is the file, the other a skipped link");
    let reason = |p: &str| {
        let e = skipped.as_array().unwrap().iter().find(|s| s["path"].as_str().unwrap().ends_with(p));
        e.map(|e| e["reason"].as_str().unwrap().to_string()).unwrap_or_else(|| panic!("{p} not in {skipped}"))
    };
    for (p, why) in [
        ("/tmp/evil/sda", "device"),
        ("/tmp/evil/mem", "device"),
        ("/tmp/evil/pipe", "fifo"),
        ("/tmp/evil/passwd", "link-escapes"),
        ("/tmp/evil/sub/out", "link-escapes"),
    ] {
        assert_eq!(reason(p), why, "{p}");
    }
    assert!(skipped.as_array().unwrap().iter().any(|s| s["reason"] == "hard-link"), "{skipped}");
}

#[test]
fn files_out_of_an_untrusted_guest_land_as_plain_files_owned_by_the_user() {
    let env = Env::new("untrusted");
    let (art, summary) = (env.dir.join("art"), env.dir.join("summary.json"));
    let copy = format!("/tmp/evil:{}", path_str(&art));
    let extra = ["--no-share", "--ssh-user", "root", "--name", "evil", "--keep", "--summary", path_str(&summary)];
    let mut extra: Vec<&str> = extra.to_vec();
    extra.extend(["--copy-out", &copy]);
    let out = env.run(&strs(&run_args(&extra, &["sh", "-c", EVIL])));
    out.code_is(0);
    assert!(out.stderr().contains("skipped /tmp/evil/sda: a device node"), "{}", out.text());
    assert!(out.stderr().contains("copied /tmp/evil/suid without its setuid/setgid/sticky bits"), "{}", out.text());
    let s = read_json(&summary);
    only_plain_files_landed(&art, &s["skipped"]);
    assert!(s["mode_bits_dropped"].to_string().contains("/tmp/evil/suid"), "{s}");
    let temps: Vec<_> = std::fs::read_dir(&env.dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!temps.iter().any(|n| n.to_string_lossy().starts_with(".qbuf-copy")), "{temps:?}");

    // `copy` guest → host obeys the same rule, into an existing directory.
    let down = env.dir.join("down");
    std::fs::create_dir(&down).unwrap();
    let (c, out) = env.json(&["copy", "evil:/tmp/evil", path_str(&down)]);
    out.ok();
    only_plain_files_landed(&down.join("evil"), &c["skipped"]);
    let out = env.run(&["copy", "evil:/tmp/evil", path_str(&down)]);
    out.code_is(1);
    assert!(out.stderr().contains("never merges into a directory"), "{}", out.text());
    env.run(&["--name", "evil", "destroy", "--yes"]).ok();
}

#[test]
fn the_checkout_is_the_working_directory() {
    let env = Env::new("runshare");
    let checkout = env.dir.join("checkout");
    std::fs::create_dir_all(&checkout).unwrap();
    std::fs::write(checkout.join("Makefile"), "all:\n").unwrap();
    let args = run_args(&["--share", path_str(&checkout)], &["sh", "-c", "ls; pwd; echo out > result.txt"]);
    let out = env.run(&strs(&args));
    out.code_is(0);
    assert!(out.stdout().contains("Makefile") && out.stdout().contains("/mnt/qbuf"), "{}", out.text());
    assert_eq!(std::fs::read_to_string(checkout.join("result.txt")).unwrap(), "out\n");
    nothing_left(&env);
}

#[test]
fn sigterm_to_run_mid_command_stops_the_vm_and_leaves_nothing() {
    let env = Env::new("runsigterm");
    let mut child = started_run(&env, &["--no-share"], "echo started; sleep 1000");
    signal(child.id() as i32, Signal::SIGTERM);
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(128 + 15), "SIGTERM: 128+15");
    nothing_left(&env);
}

#[test]
fn ctrl_c_stops_a_run_and_another_forces_its_cleanup_which_still_removes_everything() {
    let env = Env::new("runctrlc");
    let summary = env.dir.join("summary.json");
    let ignore = ["--no-share", "--append", APPEND_DEAF];
    let extra: Vec<&str> = ignore.iter().copied().chain(["--summary", path_str(&summary)]).collect();
    let child = started_run(&env, &extra, "echo started; sleep 1000");
    let pid = child.id() as i32;
    signal(pid, Signal::SIGINT);
    // The cleanup presses the power button, which this guest ignores.
    let name = || {
        std::fs::read_dir(env.state.join("instances")).ok()?.filter_map(|e| e.ok()).find_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with("run-").then_some(n)
        })
    };
    wait_until("the cleanup to wait for the guest", Duration::from_secs(30), || {
        name().is_some_and(|n| {
            env.json(&["--name", &n, "status"]).0.get("stopping_step").and_then(Value::as_str) == Some("powerdown")
        })
    });
    signal(pid, Signal::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 2), "SIGINT: 128+2: {err}");
    assert!(err.contains("Ctrl-C: forcing the stop") && !err.contains("stops waiting"), "{err}");
    let sum = read_json(&summary);
    assert_eq!(sum["stop_method"], "quit", "forced past the ignored power button: {sum}");
    nothing_left(&env);
}

#[test]
fn an_expired_timeout_exits_124_and_leaves_nothing() {
    let env = Env::new("runtimeout");
    let summary = env.dir.join("summary.json");
    let extra = ["--no-share", "--timeout", "90", "--summary", path_str(&summary)];
    let out = env.run(&strs(&run_args(&extra, &["sh", "-c", "echo started; sleep 1000"])));
    out.code_is(124);
    assert!(out.stdout().contains("started"), "{}", out.text());
    assert!(out.stderr().contains("--timeout expired"), "{}", out.text());
    // COMMAND did not finish on its own: no exit status of its (ssh's 255
    // is not COMMAND's).
    let s = read_json(&summary);
    assert_eq!((s["outcome"].as_str(), s["exit_code"].as_i64()), (Some("timed-out"), Some(124)), "{s}");
    assert!(s["command_exit"].is_null(), "{s}");
    nothing_left(&env);
}

/// A guest that stalls its `tar` under `--copy-out` (ssh's keepalives hold
/// the connection open): `--timeout` still ends the run with 124, the VM
/// stopped and removed, and nothing of the cut copy lands.
#[test]
fn a_copy_out_that_stalls_is_cut_off_by_the_timeout() {
    let env = Env::new("runcopystall");
    let (art, summary) = (env.dir.join("art"), env.dir.join("summary.json"));
    let copy = format!("/tmp/big:{}", path_str(&art));
    // A 300 MiB file (a hole: no guest memory) and a process, left behind
    // by COMMAND, that stops the guest's tar as soon as it runs. (ssh's
    // connection is shared: a changed login shell would not be used.) The
    // test guest has no pkill (an earlier version of this test called it
    // and passed only because the copy was slow): without killall COMMAND
    // fails, and so does the test.
    let stall = "command -v killall >/dev/null || exit 3; \
                 mkdir /tmp/big && dd of=/tmp/big/f bs=1M seek=300 count=0 2>/dev/null || exit 1; \
                 setsid sh -c 'while :; do killall -STOP tar 2>/dev/null; sleep 0.01; done' \
                 </dev/null >/dev/null 2>&1 &";
    // Room for a slow boot and COMMAND before the copy starts (a loaded
    // 2-core CI host once took over 45 s to boot the test guest); and long
    // enough that a tar the loop failed to stop would finish the copy
    // (300 MiB) and fail the test, instead of being cut short anyway.
    let extra = ["--no-share", "--timeout", "90", "--copy-out", &copy, "--summary", path_str(&summary)];
    let out = env.run(&strs(&run_args(&extra, &["sh", "-c", stall])));
    out.code_is(124);
    assert!(out.stderr().contains("not copied, the run was cut short"), "{}", out.text());
    let s = read_json(&summary);
    // COMMAND finished: the deadline came during the copy.
    assert_eq!((s["outcome"].as_str(), s["command_exit"].as_i64()), (Some("timed-out"), Some(0)), "{s}");
    assert!(!art.exists(), "the cut copy landed");
    nothing_left(&env);
}

#[test]
fn qemu_killed_mid_run_exits_125_and_leaves_nothing() {
    let env = Env::new("runqemukill");
    let mut child = started_run(&env, &["--no-share"], "echo started; sleep 1000");
    for pid in env.qemu_pids() {
        signal(pid, Signal::SIGKILL);
    }
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(125), "the VM broke, whatever ssh said");
    nothing_left(&env);
}

#[test]
fn keep_on_failure_leaves_the_vm_and_says_how_to_remove_it() {
    let env = Env::new("runkeep");
    let out = env.run(&strs(&run_args(&["--no-share", "--name", "kept", "--keep-on-failure"], &["false"])));
    out.code_is(1);
    assert!(out.stderr().contains("destroy --yes"), "{}", out.text());
    env.ssh("kept", "true").ok();
    env.run(&["--name", "kept", "destroy", "--yes"]).ok();
    assert!(env.qemu_pids().is_empty());
}

/// The test guest with its data disk, as its default user dev: unmounting
/// shares for a save, and the clock and the mounts after a resume, go
/// through dev's passwordless sudo, as in the real dev VM.
fn launch_with_disk(env: &Env, extra: &[&str]) {
    let disk = guest().disk;
    let mut a = vec!["--image", path_str(&disk)];
    a.extend_from_slice(extra);
    env.launch(&a);
}

#[test]
fn a_loaded_snapshot_forgets_what_came_after_it() {
    let env = Env::new("snapload");
    launch_with_disk(&env, &["--no-share"]);
    env.ssh("dev", "echo before > /data/marker && sync").ok();
    let (s, out) = env.json(&["snapshot", "save", "s1"]);
    out.ok();
    assert_eq!(s["snapshot"]["name"], "s1");
    env.ssh("dev", "echo after > /data/marker && sync").ok();
    let (v, out) = env.json(&["snapshot", "load", "s1"]);
    out.ok();
    assert!(v["ready_seconds"].as_f64().is_some(), "{v}");
    // A resumed guest does not boot: its progress says so.
    assert!(
        out.stderr().contains("waiting for the resumed guest") && !out.stderr().contains("firmware"),
        "{}",
        out.text()
    );
    assert_eq!(env.ssh("dev", "cat /data/marker").stdout(), "before\n");
    // The clock was set: not the saved instant.
    let guest_now: i64 = env.ssh("dev", "date +%s").stdout().trim().parse().unwrap();
    let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((guest_now - host_now).abs() < 30, "guest clock {guest_now} vs host {host_now}");
    let (list, _) = env.json(&["snapshot", "list"]);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1);
    env.run(&["powerdown"]).ok();
    // launch --resume reaches SSH from the saved state.
    let (v, out) = env.json(&["launch", "--resume", "s1"]);
    out.ok();
    env.ssh("dev", "test \"$(cat /data/marker)\" = before").ok();
    assert!(v["ready_seconds"].as_f64().is_some());
    env.run(&["snapshot", "delete", "s1"]).ok();
    let (list, _) = env.json(&["snapshot", "list"]);
    assert!(list["snapshots"].as_array().unwrap().is_empty());
    env.run(&["destroy", "--yes"]).ok();
}

#[test]
fn a_damaged_snapshot_is_refused_before_the_vm_is_touched_and_a_failed_load_keeps_the_disk() {
    let env = Env::new("snapbad");
    launch_with_disk(&env, &["--no-share"]);
    env.ssh("dev", "echo before > /data/marker && sync").ok();
    env.run(&["snapshot", "save", "cut"]).ok();
    env.run(&["snapshot", "save", "garbled"]).ok();
    env.ssh("dev", "echo after > /data/marker && sync").ok();
    let snaps = env.instance_dir("dev").join("snapshots");
    // Truncated (a full disk during a copy, a crash): found before anything stops.
    let state = snaps.join("cut/state.bin");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&state).unwrap().set_len(len / 2).unwrap();
    let (list, _) = env.json(&["snapshot", "list"]);
    let damaged = |name: &str| {
        list["snapshots"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["damaged"].clone()
    };
    assert!(damaged("cut").as_str().is_some_and(|d| d.contains("state.bin")), "{list}");
    assert!(damaged("garbled").is_null(), "{list}");
    assert!(env.run(&["snapshot", "list"]).stdout().contains("DAMAGED"));
    let out = env.run(&["snapshot", "load", "cut"]);
    out.code_is(1);
    assert!(out.stderr().contains("damaged") && out.stderr().contains("nothing was touched"), "{}", out.text());
    assert_eq!(env.ssh("dev", "cat /data/marker").stdout(), "after\n", "the running VM was touched");
    // The same size but not a migration stream: QEMU finds it while loading.
    // Its reason is shown, and the disk with what came after the save is back.
    let garbled = snaps.join("garbled/state.bin");
    let mut bytes = std::fs::read(&garbled).unwrap();
    bytes[..16].fill(0);
    std::fs::write(&garbled, bytes).unwrap();
    let out = env.run(&["snapshot", "load", "garbled"]);
    out.code_is(1);
    assert!(out.stderr().contains("QEMU said:"), "{}", out.text());
    assert!(out.stderr().contains("as it was before the load"), "{}", out.text());
    assert!(!env.instance_dir("dev").join("overlay.qcow2.kept").exists());
    env.json(&["launch"]).1.ok();
    assert_eq!(env.ssh("dev", "cat /data/marker").stdout(), "after\n", "the disk from before the load is gone");
    env.run(&["destroy", "--yes"]).ok();
}

#[test]
fn a_run_from_a_snapshot_leaves_the_snapshot_unchanged_for_the_next_run() {
    let env = Env::new("snaprun");
    launch_with_disk(&env, &["--no-share"]);
    env.ssh("dev", "echo saved > /data/marker && sync").ok();
    env.run(&["snapshot", "save", "ci"]).ok();
    let snap = env.instance_dir("dev").join("snapshots/ci");
    let hashes = || (file_hash(&snap.join("disk.qcow2")), file_hash(&snap.join("state.bin")));
    let before = hashes();
    let out = env.run(&[
        "run",
        "--from-snapshot",
        "ci",
        "--",
        "sh",
        "-c",
        "cat /data/marker; echo changed > /data/marker; sync",
    ]);
    out.code_is(0);
    assert_eq!(out.stdout(), "saved\n", "{}", out.text());
    let out = env.run(&["run", "--from-snapshot", "ci", "--", "cat", "/data/marker"]);
    out.code_is(0);
    assert_eq!(out.stdout(), "saved\n", "the first run wrote into the snapshot: {}", out.text());
    assert_eq!(hashes(), before, "the snapshot's files changed");
    env.ssh("dev", "test \"$(cat /data/marker)\" = saved").ok();
    nothing_left(&env);
    env.run(&["destroy", "--yes"]).ok();
}

#[test]
fn saving_with_the_share_mounted_unmounts_and_mounts_it_again() {
    let env = Env::new("snapshare");
    let checkout = env.dir.join("checkout");
    std::fs::create_dir_all(&checkout).unwrap();
    std::fs::write(checkout.join("file.txt"), "from the host\n").unwrap();
    // 9p on purpose (tests/shares.rs covers virtio-fs), and as dev: the
    // unmount and the mounts again are sudo's.
    launch_with_disk(&env, &["--share", path_str(&checkout), "--share-type", "9p"]);
    assert_eq!(env.ssh("dev", "id -un; cat /mnt/qbuf/file.txt").stdout(), "dev\nfrom the host\n");
    let (s, out) = env.json(&["snapshot", "save", "withshare"]);
    out.ok();
    assert_eq!(s["snapshot"]["shares"][0], "qbuf", "{s}");
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/file.txt").stdout(), "from the host\n", "mounted again after the save");
    std::fs::write(checkout.join("after.txt"), "written after the save\n").unwrap();
    let out = env.run(&["run", "--from-snapshot", "withshare", "--", "sh", "-c", "id -un; cat /mnt/qbuf/after.txt"]);
    out.ok();
    assert_eq!(out.stdout(), "dev\nwritten after the save\n", "the run mounts the share again: {}", out.text());
    env.run(&["snapshot", "load", "withshare"]).ok();
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/file.txt").stdout(), "from the host\n", "mounted again after a load");
    env.run(&["powerdown"]).ok();
    env.json(&["launch", "--resume", "withshare"]).1.ok();
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/after.txt").stdout(), "written after the save\n", "after launch --resume");
    env.run(&["destroy", "--yes"]).ok();
}

#[test]
fn qemu_7_2_saves_and_loads_snapshots_too() {
    let (bin, fw) = qemu72();
    let env =
        Env::new("snap72").with_env("QBUF_QEMU_SYSTEM", path_str(&bin)).with_env("QBUF_QEMU_FIRMWARE", path_str(&fw));
    launch_with_disk(&env, &["--no-share"]);
    env.ssh("dev", "echo before > /data/marker && sync").ok();
    env.run(&["snapshot", "save", "s"]).ok();
    env.ssh("dev", "echo after > /data/marker && sync").ok();
    env.run(&["snapshot", "load", "s"]).ok();
    assert_eq!(env.ssh("dev", "cat /data/marker").stdout(), "before\n");
    env.run(&["destroy", "--yes"]).ok();
}

#[test]
fn bad_run_values_are_usage_errors_before_anything_starts() {
    let env = Env::new("runusage");
    let out = env.run(&["run", "--timeout", "forever", "--", "true"]);
    out.code_is(2);
    let out = env.run(&["run", "--copy-out", "nocolon", "--", "true"]);
    out.code_is(2);
    // A missing source is the tool's own failure to start a VM: 125, never
    // a code COMMAND could have returned.
    let out = env.run(&["run", "--from-snapshot", "none", "--", "true"]);
    out.code_is(125);
    assert!(out.stderr().contains("no instance named 'dev'"), "{}", out.text());
    env.run(&[
        "launch",
        "--kernel",
        path_str(&guest().kernel),
        "--initrd",
        path_str(&guest().initrd),
        "--no-wait",
        "--accel",
        "tcg",
        "--memory",
        "256M",
        "--ssh-port",
        "auto",
        "--no-share",
    ])
    .ok();
    env.run(&["powerdown", "--force"]);
    let out = env.run(&["--name", "dev", "run", "--", "true"]);
    out.code_is(125);
    assert!(out.stderr().contains("run removes its instance"), "{}", out.text());
    assert!(env.qemu_pids().is_empty());
}
