//! Truth under failure: each test breaks something on purpose (a process
//! killed or frozen, a full disk, a stale file, a hostile client, a fake
//! QEMU) and checks what `status` says, the exit code, that no process is
//! left behind and that the instance can be launched again. Real QEMU and
//! the test guest, one VM at a time (see support::Env).

mod support;

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

fn settings(env: &Env) -> Value {
    read_json(&env.instance_dir("dev").join("settings.json"))
}

/// Ends the test's VM and checks the instance can be destroyed without a
/// trace.
fn destroy_leaves_nothing(env: &Env) {
    let out = env.run(&["destroy", "--yes"]);
    assert!([0, 3].contains(&out.code()), "{}", out.text());
    assert!(!env.instance_dir("dev").exists(), "destroy left the instance dir");
    assert!(env.qemu_pids().is_empty(), "destroy left QEMU running");
}

#[test]
fn a_good_launch_after_a_failed_one_returns_once_ssh_answers_and_keeps_the_settings_that_booted() {
    let env = Env::new("afterfail");
    let first = env.launch(&["--no-share"]);
    env.run(&["powerdown"]).ok();
    let good = settings(&env);
    // A kernel QEMU refuses: the launch fails, and its settings are not kept.
    let bad = env.dir.join("not-a-kernel");
    std::fs::write(&bad, vec![0u8; 8192]).unwrap();
    let out = env.run(&["launch", "--kernel", path_str(&bad), "--initrd", path_str(&bad), "--timeout", "60"]);
    out.code_is(1);
    assert!(out.stderr().contains("QEMU said:"), "{}", out.text());
    assert_eq!(settings(&env), good, "a setting QEMU refused was saved");
    let (st, _) = env.json(&["status"]);
    assert_ne!(s(&st, "state"), "running");
    // The plain launch boots the saved kernel, returns once SSH answers,
    // and is not confused by the failed launch's records.
    let (v, out) = env.json(&["launch", "--timeout", "120"]);
    out.ok();
    assert!(v["ready_seconds"].as_f64().is_some(), "{v}");
    assert_ne!(pid_of(&v), pid_of(&first));
    env.ssh("dev", "true").ok();
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "running");
    destroy_leaves_nothing(&env);
}

#[test]
fn status_tells_the_end_at_once_when_qemu_exits_never_unresponsive() {
    let env = Env::new("exitstatus");
    let v = env.launch(&["--no-share", "--ssh-user", "root"]);
    let pid = pid_of(&v);
    signal(pid, Signal::SIGKILL);
    // From the kill on, every answer is the truth: stopping or crashed.
    let until = Instant::now() + Duration::from_secs(3);
    let mut last = String::new();
    while Instant::now() < until {
        let (st, out) = env.json(&["status"]);
        out.ok();
        last = s(&st, "state");
        assert!(["stopping", "crashed"].contains(&last.as_str()), "status said {last} after QEMU died: {st}");
        if last == "crashed" {
            assert!(s(&st, "stop_reason").contains("SIGKILL"), "{st}");
            break;
        }
    }
    assert_eq!(last, "crashed");
    // A clean poweroff from inside the guest: never unresponsive either.
    let v = env.launch(&[]);
    let pid = pid_of(&v);
    let _ = env.ssh("dev", "sync; poweroff -f");
    wait_until("the guest to power off", Duration::from_secs(30), || {
        let (st, _) = env.json(&["status"]);
        let state = s(&st, "state");
        assert_ne!(state, "unresponsive", "{st}");
        if state == "stopped" {
            assert!(s(&st, "stop_reason").contains("guest shut down"), "{st}");
        }
        state == "stopped"
    });
    assert!(!pid_running(pid));
    destroy_leaves_nothing(&env);
}

#[test]
fn status_of_a_frozen_qemu_answers_quickly_and_powerdown_reaches_sigkill() {
    let env = Env::new("frozen");
    let v = env.launch(&["--no-share"]);
    let pid = pid_of(&v);
    signal(pid, Signal::SIGSTOP);
    let t = Instant::now();
    let (st, out) = env.json(&["status"]);
    out.ok();
    assert_eq!(s(&st, "state"), "unresponsive", "{st}");
    assert!(t.elapsed() < Duration::from_secs(8), "status took {:?} on a frozen QEMU", t.elapsed());
    // The ladder: nothing answers, nothing but SIGKILL ends a stopped process.
    let (p, out) = env.json(&["powerdown", "--timeout", "2"]);
    out.code_is(3);
    assert_eq!(s(&p, "method"), "sigkill", "{p}");
    assert!(!pid_running(pid));
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "stopped", "{st}");
    assert!(s(&st, "stop_reason").contains("sigkill"), "{st}");
    env.launch(&[]);
    destroy_leaves_nothing(&env);
}

#[test]
fn powerdown_of_a_paused_vm_resumes_it_so_the_guest_powers_itself_off() {
    let env = Env::new("paused");
    env.launch(&["--no-share"]);
    env.run(&["qmp", "stop"]).ok();
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "paused");
    let (p, out) = env.json(&["powerdown", "--timeout", "60"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "powerdown", "{p}");
    assert!(p["steps"].to_string().contains("was paused"), "the user is told: {p}");
    destroy_leaves_nothing(&env);
}

#[test]
fn flags_given_to_a_running_instance_are_saved_as_absolute_paths() {
    let env = Env::new("relpaths");
    let checkout = env.dir.join("checkout");
    std::fs::create_dir_all(checkout.join("docs")).unwrap();
    std::fs::create_dir_all(checkout.join("src")).unwrap();
    env.launch(&["--share", path_str(&checkout)]);
    let out = env.cmd(&["launch", "--share", "."]).current_dir(checkout.join("docs")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(settings(&env)["share"], path_str(&checkout.join("docs")));
    // Launched again from elsewhere, it still means docs/.
    let out = env.cmd(&["launch"]).current_dir(checkout.join("src")).output().unwrap();
    assert!(out.status.success());
    assert_eq!(settings(&env)["share"], path_str(&checkout.join("docs")));
    destroy_leaves_nothing(&env);
}

#[test]
fn switching_the_boot_source_pins_the_new_guests_host_key_with_a_note() {
    let env = Env::new("newsource");
    env.launch(&["--no-share"]);
    env.ssh("dev", "true").ok();
    env.run(&["powerdown"]).ok();
    let t = Instant::now();
    let (v, out) = env.json(&["launch", "--image", path_str(&guest().disk)]);
    out.ok();
    assert!(v["notes"].to_string().contains("pinned anew"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(100), "took {:?}", t.elapsed());
    env.ssh("dev", "true").ok();
    destroy_leaves_nothing(&env);
}

/// A pipe whose reading end is closed: writing to it fails with EPIPE.
fn closed_pipe() -> OwnedFd {
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    w
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_not_with_a_panic() {
    let env = Env::new("pipes");
    env.launch(&["--no-share"]);
    for args in [&["status"][..], &["--json", "events"], &["qmp", "query-block"], &["-q", "launch"], &["logs"]] {
        let out = env.cmd(args).stdout(Stdio::from(closed_pipe())).stderr(Stdio::piped()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
    destroy_leaves_nothing(&env);
}

#[test]
fn a_saved_forward_whose_port_is_taken_is_refused_before_qemu_starts() {
    let env = Env::new("fwdbusy");
    env.launch(&["--no-share"]);
    let port = qbuf_qemu::host::pick_free_port().unwrap().to_string();
    env.run(&["forward", "add", &format!("{port}:80")]).ok();
    env.run(&["powerdown"]).ok();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
    let out = env.run(&["launch"]);
    out.code_is(1);
    assert!(out.stderr().contains(&port) && out.stderr().contains("forward remove"), "{}", out.text());
    assert!(env.qemu_pids().is_empty());
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "stopped", "no crash happened: {st}");
    env.run(&["forward", "remove", &port]).ok();
    env.launch(&[]);
    destroy_leaves_nothing(&env);
}

#[test]
fn both_processes_killed_then_a_relaunch_works() {
    let env = Env::new("bothkilled");
    let v = env.launch(&["--no-share"]);
    let sup = supervisor_pid(&env, "dev");
    signal(sup, Signal::SIGKILL);
    signal(pid_of(&v), Signal::SIGKILL);
    wait_until("QEMU to go", Duration::from_secs(10), || !pid_running(pid_of(&v)));
    let (st, out) = env.json(&["status"]);
    out.ok();
    assert!(["stopped", "crashed"].contains(&s(&st, "state").as_str()), "{st}");
    let v2 = env.launch(&[]);
    assert!(pid_running(pid_of(&v2)));
    destroy_leaves_nothing(&env);
}

#[test]
fn a_lock_held_a_moment_longer_by_a_dead_boots_last_threads_is_no_start() {
    // After `kill -9` of supervisor and QEMU, QEMU's main thread is gone
    // (status reads it as not running) while its other threads still hold
    // the inherited instance lock: stand in for them with a short-lived holder.
    let env = Env::new("dyinglock");
    let dir = env.instance_dir("dev");
    std::fs::create_dir_all(&dir).unwrap();
    let dead = serde_json::json!({"pid": 1, "start_ticks": 0, "boot_id": "an-earlier-boot"});
    let run = serde_json::json!({"qemu": dead, "supervisor": dead, "started_at": 1.0, "accel": "tcg",
                                 "qemu_version": "10.0.2", "argv": []});
    std::fs::write(dir.join("run.json"), run.to_string()).unwrap();
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock")).unwrap();
    lock.lock().unwrap();
    let holder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(lock);
    });
    let (st, out) = env.json(&["status"]);
    out.ok();
    holder.join().unwrap();
    assert_eq!(s(&st, "state"), "stopped", "{st}");
    assert!(!dir.join("run.json").exists(), "the stale run record is cleaned up");
}

#[test]
fn stale_run_record_and_sockets_do_not_fool_status_or_launch() {
    let env = Env::new("stale");
    env.launch(&["--no-share"]);
    env.run(&["powerdown"]).ok();
    let dir = env.instance_dir("dev");
    // A run record naming a process that runs (this test) and old sockets.
    let me = std::process::id();
    let stat = std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
    let start: u64 = stat.rsplit(')').next().unwrap().split_whitespace().nth(19).unwrap().parse().unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let ident = serde_json::json!({"pid": me, "start_ticks": start, "boot_id": boot.trim()});
    let run = serde_json::json!({"qemu": ident, "supervisor": ident, "started_at": 1.0, "accel": "tcg",
                                 "qemu_version": "10.0.2", "argv": []});
    std::fs::write(dir.join("run.json"), run.to_string()).unwrap();
    for sock in ["qmp.sock", "control.sock", "qmp-sup.sock", "console.sock"] {
        std::fs::write(dir.join(sock), "").unwrap();
    }
    let (st, out) = env.json(&["status"]);
    out.ok();
    assert_eq!(s(&st, "state"), "stopped", "{st}");
    let v = env.launch(&[]);
    assert!(pid_running(pid_of(&v)));
    env.ssh("dev", "true").ok();
    destroy_leaves_nothing(&env);
}

#[test]
fn deleting_the_instance_dir_under_a_running_vm_powers_it_down() {
    let env = Env::new("dirgone");
    let v = env.launch(&["--no-share"]);
    let pid = pid_of(&v);
    std::fs::remove_dir_all(env.instance_dir("dev")).unwrap();
    wait_until("QEMU to be powered down", Duration::from_secs(60), || !pid_running(pid));
    let out = env.run(&["status"]);
    out.code_is(1);
    assert!(out.stderr().contains("no instance named 'dev'"), "{}", out.text());
    let v = env.launch(&["--no-share"]);
    assert!(pid_running(pid_of(&v)));
    destroy_leaves_nothing(&env);
}

#[test]
fn a_client_that_holds_the_user_qmp_socket_and_never_reads_blocks_nothing() {
    let env = Env::new("hogqmp");
    env.launch(&["--no-share"]);
    let hog = std::os::unix::net::UnixStream::connect(env.instance_dir("dev").join("qmp.sock")).unwrap();
    let (st, out) = env.json(&["status"]);
    out.ok();
    assert_eq!(s(&st, "state"), "running");
    let (p, out) = env.json(&["powerdown"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "powerdown");
    drop(hog);
    env.launch(&[]);
    destroy_leaves_nothing(&env);
}

/// A "QEMU" that opens its QMP socket and never says a word.
const SILENT_QEMU: &str = r#"#!/usr/bin/env python3
import socket, sys, time
if "--version" in sys.argv:
    print("QEMU emulator version 10.0.2"); sys.exit(0)
path = next(a for a in sys.argv if a.startswith("socket,id=qmp-sup,")).split("path=")[1].split(",")[0]
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(4)
conns = []
while True:
    c, _ = s.accept(); conns.append(c)
"#;

#[test]
fn a_qemu_that_never_greets_on_qmp_is_named_as_such_and_killed() {
    let env = Env::new("silentqemu");
    let fake = env.dir.join("silent-qemu");
    std::fs::write(&fake, SILENT_QEMU).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = env.with_env("QBUF_QEMU_SYSTEM", path_str(&fake));
    let (e, out) = env.json(&strs(&env.launch_args(&["--no-share"])));
    out.code_is(1);
    assert!(out.stderr().contains("never answered"), "{}", out.text());
    assert!(!out.stderr().contains("did not open"), "{}", out.text());
    assert_eq!(e["detail"]["kind"], "launch-failed", "{e}");
    let left: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(path_str(&fake))
                && pid_running(e.file_name().to_string_lossy().parse().unwrap_or(0))
        })
        .collect();
    assert!(left.is_empty(), "the fake QEMU was left running");
    assert!(!env.instance_dir("dev").exists(), "a failed first launch leaves no instance");
}

/// Whether this host lets the test mount a small tmpfs (root, as in CI).
fn can_mount() -> bool {
    nix::unistd::geteuid().is_root()
}

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn new(at: std::path::PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs at {}", at.display());
        Tmpfs(at)
    }

    /// Fills the file system; the returned file frees it when removed.
    fn fill(&self) -> std::path::PathBuf {
        let f = (0..).map(|i| self.0.join(format!("filler{i}"))).find(|f| !f.exists()).unwrap();
        // dd ends with "No space left on device" (exit 1): the probe below
        // is what says the file system is full.
        std::process::Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", f.display()))
            .args(["bs=1M"])
            .stderr(Stdio::null())
            .status()
            .expect("run dd");
        let probe = self.0.join("probe");
        let wrote = std::fs::write(&probe, [0u8; 4096]);
        let _ = std::fs::remove_file(&probe);
        assert!(
            wrote.as_ref().is_err_and(|e| e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32)),
            "the tmpfs at {} is not full after dd: writing 4096 bytes there gave {wrote:?}, not ENOSPC",
            self.0.display()
        );
        f
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_state_dir_neither_fails_a_clean_stop_nor_loses_its_reason() {
    assert!(
        can_mount(),
        "a_full_state_dir_neither_fails_a_clean_stop_nor_loses_its_reason needs root to mount a tmpfs (CI runs as \
         root): run the tests as root, or skip this one with `cargo test -- --skip a_full_state_dir`"
    );
    let env = Env::new("fullstate");
    let fs = Tmpfs::new(env.state.clone(), "32M");
    let v = env.launch(&["--no-share"]);
    let filler = fs.fill();
    let (p, out) = env.json(&["powerdown"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "powerdown", "{p}");
    assert!(s(&p, "reason").contains("guest shut down"), "the reason reached the command: {p}");
    assert!(!pid_running(pid_of(&v)));
    // Full before a launch: a clear failure, nothing left running.
    let filler2 = fs.fill();
    let out = env.run(&["launch"]);
    out.code_is(1);
    assert!(out.stderr().contains("No space left on device"), "the cause is named: {}", out.text());
    assert!(env.qemu_pids().is_empty());
    std::fs::remove_file(filler).unwrap();
    std::fs::remove_file(filler2).unwrap();
    env.launch(&[]);
    destroy_leaves_nothing(&env);
}

#[test]
fn a_snapshot_save_on_a_full_disk_says_no_space_left_and_the_vm_runs_on() {
    assert!(can_mount(), "this test mounts a small tmpfs: run it as root (CI does)");
    let env = Env::new("snapfull");
    env.launch(&["--no-share"]);
    let snaps = env.instance_dir("dev").join("snapshots");
    let _fs = Tmpfs::new(snaps.clone(), "4M");
    let out = env.run(&["snapshot", "save", "s"]);
    out.code_is(1);
    assert!(out.stderr().contains("no space left on the disk that holds"), "{}", out.text());
    assert!(!snaps.join("s").exists(), "a partial snapshot was kept");
    env.ssh("dev", "true").ok();
    env.run(&["powerdown"]).code_is(0);
}

/// Writes a marker to the scratch disk /dev/vdb that stays in the guest's
/// page cache: a process holds the device open, so `dd`'s close does not
/// flush it.
const UNSYNCED_WRITE: &str = "sleep 1000 < /dev/vdb > /dev/null 2>&1 & \
    sleep 0.2; echo qbuf-unsynced-marker | dd of=/dev/vdb bs=512 count=1 conv=sync 2>/dev/null; echo written";

fn marker_on_disk(env: &Env) -> bool {
    let out = env.ssh("dev", "dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c 20");
    out.ok();
    out.stdout().contains("qbuf-unsynced-marker")
}

#[test]
fn unsynced_guest_writes_survive_powerdown_and_a_kill_loses_them() {
    let env = Env::new("datasafety");
    env.launch(&["--no-share", "--image", path_str(&guest().disk), "--ssh-user", "root"]);
    env.run(&["disk", "add", "--size", "16M", "--id", "scratch"]).ok();
    // Each trial: an unsynced write, the ladder's powerdown, a fresh boot.
    for trial in 0..3 {
        env.ssh("dev", "dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null").ok();
        assert!(env.ssh("dev", UNSYNCED_WRITE).stdout().contains("written"));
        let (p, out) = env.json(&["powerdown"]);
        out.code_is(0);
        env.launch(&[]);
        assert!(marker_on_disk(&env), "trial {trial}: the write was lost by powerdown: {p}");
    }
    // Control: the same write, then QEMU killed, loses it.
    env.ssh("dev", "dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null").ok();
    assert!(env.ssh("dev", UNSYNCED_WRITE).stdout().contains("written"));
    let (st, _) = env.json(&["status"]);
    signal(pid_of(&st), Signal::SIGKILL);
    wait_until("the kill to be recorded", Duration::from_secs(10), || {
        env.instance_dir("dev").join("stopped.json").exists()
    });
    env.launch(&[]);
    assert!(!marker_on_disk(&env), "the control write survived a kill: the test cannot tell");
    destroy_leaves_nothing(&env);
}

/// A `powerdown` waiting for the guest, and the status it shows.
fn powerdown_waiting(env: &Env) -> std::process::Child {
    let child = env
        .cmd(&["--json", "powerdown", "--timeout", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the ladder to press the power button", Duration::from_secs(20), || {
        env.json(&["status"]).0.get("stopping_step").and_then(Value::as_str) == Some("powerdown")
    });
    child
}

#[test]
fn ctrl_c_during_powerdown_forces_the_stop_and_a_second_one_stops_waiting() {
    let env = Env::new("ctrlc");
    let ignore = ["--no-share", "--append", APPEND_DEAF];
    env.launch(&ignore);
    let t = Instant::now();
    let child = powerdown_waiting(&env);
    signal(child.id() as i32, Signal::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "went past the guest's shutdown: {err}");
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s(&p, "method"), "quit", "{p}");
    assert!(p["steps"].to_string().contains("forced on request"), "{p}");
    assert!(err.contains("Ctrl-C: forcing the stop"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(100), "did not wait out --timeout 120");
    assert_eq!(s(&env.json(&["status"]).0, "state"), "stopped");

    // A second Ctrl-C leaves the stop to the supervisor, which finishes it.
    // A frozen QEMU keeps the forced stop busy (quit goes unanswered) long
    // enough to press Ctrl-C again.
    let v = env.launch(&ignore);
    signal(pid_of(&v), Signal::SIGSTOP);
    let child = powerdown_waiting(&env);
    signal(child.id() as i32, Signal::SIGINT);
    wait_until("the stop to be forced to quit", Duration::from_secs(30), || {
        env.json(&["status"]).0.get("stopping_step").and_then(Value::as_str) == Some("quit")
    });
    signal(child.id() as i32, Signal::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("stopped waiting") && err.contains("status"), "{err}");
    wait_until("the supervisor to finish the stop", Duration::from_secs(60), || {
        s(&env.json(&["status"]).0, "state") == "stopped"
    });
    let (st, _) = env.json(&["status"]);
    assert!(st["stop_reason"].to_string().contains("sigkill"), "{st}");
    destroy_leaves_nothing(&env);
}
