//! End to end against real QEMU (TCG) and the busybox test guest. One VM at a
//! time (see support::Env). Run with: cargo test --test e2e

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

#[test]
fn launch_ssh_share_powerdown_relaunch_keeps_data_then_destroy_leaves_nothing() {
    let env = Env::new("lifecycle");
    let share = env.dir.join("checkout");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("from-host.txt"), "written on the host\n").unwrap();
    let disk = guest().disk;
    let base_hash = file_hash(&disk);

    let v = env.launch(&["--image", path_str(&disk), "--share", path_str(&share)]);
    for k in ["name", "pid", "ssh_port", "ssh_user", "qmp_socket", "serial_log", "ready_seconds"] {
        assert!(v.get(k).is_some_and(|x| !x.is_null()), "launch --json lacks {k}: {v}");
    }
    assert_eq!(s(&v, "ssh_user"), "dev");
    let pid = pid_of(&v);
    assert!(pid_running(pid));

    // ssh runs a command, exit code is the remote one, args joined like OpenSSH.
    let out = env.ssh("dev", "cat /mnt/qbuf/from-host.txt && echo from-guest > /mnt/qbuf/from-guest.txt && echo data-v1 > /data/marker && sync");
    out.ok();
    assert!(out.stdout().contains("written on the host"), "{}", out.text());
    assert_eq!(std::fs::read_to_string(share.join("from-guest.txt")).unwrap(), "from-guest\n");
    env.run(&["ssh", "--", "exit", "7"]).code_is(7);

    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "running");
    assert_eq!(s(&st, "qemu_status"), "running");
    assert_eq!(pid_of(&st), pid);

    let (p, out) = env.json(&["powerdown"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "powerdown");
    assert_eq!(s(&p, "shutdown_reason"), "guest-shutdown");
    assert!(!pid_running(pid), "QEMU {pid} still runs after powerdown");
    let (st, out) = env.json(&["status"]);
    out.code_is(0);
    assert_eq!(s(&st, "state"), "stopped");
    assert!(s(&st, "stop_reason").contains("guest-shutdown"), "{st}");

    // A plain launch reuses the saved settings and the overlay.
    let (v2, out) = env.json(&["launch", "--timeout", "120"]);
    out.ok();
    assert_ne!(v2["pid"], v["pid"]);
    assert_eq!(v2["ssh_port"], v["ssh_port"], "the auto port is kept");
    let out = env.ssh("dev", "cat /data/marker");
    out.ok();
    assert_eq!(out.stdout().trim(), "data-v1", "guest data lost across relaunch");
    // The base image was never written.
    assert_eq!(file_hash(&disk), base_hash, "the base image changed");

    let (d, out) = env.json(&["destroy", "--yes"]);
    out.code_is(0);
    assert_eq!(d["stop"]["method"], "powerdown");
    assert!(!env.instance_dir("dev").exists(), "instance dir survives destroy");
    assert!(env.qemu_pids().is_empty());
    assert!(std::fs::read_to_string(share.join("from-host.txt")).is_ok(), "the share is the user's: never removed");
    env.run(&["status"]).code_is(1);
}

#[test]
fn boots_from_a_bootable_qcow2_disk_and_powers_off() {
    let env = Env::new("diskboot");
    let g = guest();
    let (v, out) = env.json(&strs(&vm_args(&["--image", path_str(&g.disk), "--no-share"], &[])));
    out.ok();
    assert!(v["ready_seconds"].as_f64().unwrap() > 0.0);
    env.ssh("dev", "test -b /dev/vda").ok();
    let (p, out) = env.json(&["powerdown"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "powerdown");
    assert_eq!(s(&p, "shutdown_reason"), "guest-shutdown");
}

#[test]
fn guest_ignoring_the_power_button_is_stopped_by_quit_with_exit_3() {
    let env = Env::new("ignorepower");
    let append = &format!("{APPEND_DEAF} qbuf.ignore_reboot=1");
    let args = env.launch_args(&["--no-share", "--ssh-user", "root", "--append", append]);
    let a = strs(&args);
    env.run(&a).ok();
    // The same guest ignores a reboot asked over SSH: reset after --timeout.
    let (b, out) = env.json(&["reboot", "--timeout", "3"]);
    out.ok();
    assert_eq!(s(&b, "method"), "system-reset", "{b}");
    assert!(b["notes"].to_string().contains("did not reboot within 3s"), "{b}");
    env.ssh("dev", "true").ok();
    let t = Instant::now();
    let (p, out) = env.json(&["powerdown", "--timeout", "3"]);
    out.code_is(3);
    assert_eq!(s(&p, "method"), "quit");
    assert_eq!(s(&p, "shutdown_reason"), "host-qmp-quit");
    assert!(t.elapsed() >= Duration::from_secs(3));
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "stopped");
}

#[test]
fn status_answers_while_a_powerdown_waits() {
    let env = Env::new("concurrent");
    let args = env.launch_args(&["--no-share", "--append", APPEND_DEAF]);
    let a = strs(&args);
    env.run(&a).ok();
    let mut pd =
        env.cmd(&["--json", "powerdown", "--timeout", "8"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // The power button has been pressed once QEMU reports it.
    wait_until("the POWERDOWN event", Duration::from_secs(10), || {
        std::fs::read_to_string(env.instance_dir("dev").join("events.jsonl"))
            .unwrap_or_default()
            .contains("\"POWERDOWN\"")
    });
    let t = Instant::now();
    let (st, out) = env.json(&["status"]);
    out.ok();
    assert!(t.elapsed() < Duration::from_secs(4), "status took {:?} behind a powerdown", t.elapsed());
    assert_eq!(s(&st, "state"), "stopping");
    assert_eq!(s(&st, "stopping_step"), "powerdown");
    let st = pd.wait().unwrap();
    assert_eq!(st.code(), Some(3));
}

#[test]
fn qemu_killed_behind_our_back_is_reported_and_relaunch_works() {
    let env = Env::new("killed");
    let v = env.launch(&["--no-share"]);
    signal(pid_of(&v), Signal::SIGKILL);
    wait_until("the supervisor to record the crash", Duration::from_secs(10), || {
        env.instance_dir("dev").join("stopped.json").exists()
    });
    let (st, out) = env.json(&["status"]);
    out.code_is(0);
    assert_eq!(s(&st, "state"), "crashed");
    assert!(s(&st, "stop_reason").contains("SIGKILL"), "{st}");
    assert_eq!(st["exit"]["signal"], 9);
    let (p, out) = env.json(&["powerdown"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "already-stopped");
    let v2 = env.launch(&[]);
    assert!(pid_running(pid_of(&v2)));
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn host_sigterm_to_qemu_or_supervisor_powers_the_guest_down() {
    let env = Env::new("sigterm");
    let v = env.launch(&["--no-share"]);
    let pid = pid_of(&v);
    // QEMU itself ignores the host's SIGTERM (blocked) ...
    signal(pid, Signal::SIGTERM);
    std::thread::sleep(Duration::from_secs(1));
    assert!(pid_running(pid), "SIGTERM cut QEMU off");
    // ... and the supervisor turns it into a powerdown.
    signal(supervisor_pid(&env, "dev"), Signal::SIGTERM);
    wait_until("QEMU to power off", Duration::from_secs(30), || !pid_running(pid));
    wait_until("the stop record", Duration::from_secs(10), || env.instance_dir("dev").join("stopped.json").exists());
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "stopped");
    assert!(s(&st, "stop_reason").contains("guest-shutdown"), "{st}");
}

#[test]
fn busy_port_is_a_clear_error_that_suggests_auto() {
    let env = Env::new("busyport");
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    let args = env.launch_args(&["--no-share", "--ssh-port", &port]);
    let a = strs(&args);
    let out = env.run(&a);
    out.code_is(1);
    assert!(out.stderr().contains(&port) && out.stderr().contains("--ssh-port auto"), "{}", out.text());
    assert!(env.qemu_pids().is_empty());
}

#[test]
fn two_concurrent_launches_start_one_qemu() {
    let env = Env::new("twolaunch");
    let args = env.launch_args(&["--no-share"]);
    let a = strs(&args);
    let mut json = vec!["--json"];
    json.extend(a.iter());
    let c1 = env.cmd(&json).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let c2 = env.cmd(&json).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let o1 = c1.wait_with_output().unwrap();
    let o2 = c2.wait_with_output().unwrap();
    assert!(o1.status.success(), "{}", String::from_utf8_lossy(&o1.stderr));
    assert!(o2.status.success(), "{}", String::from_utf8_lossy(&o2.stderr));
    let v1: Value = serde_json::from_slice(&o1.stdout).unwrap();
    let v2: Value = serde_json::from_slice(&o2.stdout).unwrap();
    assert_eq!(v1["pid"], v2["pid"], "both report the one QEMU");
    assert!(
        v1["already_running"].as_bool().unwrap() ^ v2["already_running"].as_bool().unwrap(),
        "exactly one launch started QEMU"
    );
    assert_eq!(env.qemu_pids().len(), 1);
    // Both returned once SSH answered, the one that found the VM starting too.
    env.ssh("dev", "true").ok();
    // A plain launch on the running instance says so, exit 0, and saves a change for the next boot.
    let (v3, out) = env.json(&["launch", "--cpus", "1"]);
    out.code_is(0);
    assert_eq!(v3["already_running"], true);
    assert_eq!(v3["changes"][0]["setting"], "cpus");
    let out = env.run(&["launch", "--cpus", "1"]);
    assert!(out.stdout().contains("already running"), "{}", out.text());
    let out = env.run(&["launch", "--recreate"]);
    out.code_is(1);
    assert!(out.stderr().contains("stop it first"), "{}", out.text());
    env.run(&["powerdown"]).code_is(0);

    // The saved port is taken by something else now: 'auto' moves the instance.
    let saved = v1["ssh_port"].as_u64().unwrap() as u16;
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", saved)).unwrap();
    env.run(&["launch"]).code_is(1);
    let (v4, out) = env.json(&["launch", "--ssh-port", "auto"]);
    out.ok();
    assert_ne!(v4["ssh_port"].as_u64().unwrap() as u16, saved);
    assert!(v4["notes"][0].as_str().unwrap().contains("in use"), "{v4}");
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn failed_launch_shows_qemu_output_and_command_line_and_leaves_nothing_running() {
    let env = Env::new("failing");
    // A kernel QEMU refuses to load: QEMU itself fails at start-up.
    let bad = env.dir.join("not-a-kernel");
    std::fs::write(&bad, vec![0u8; 8192]).unwrap();
    let args = vm_args(&["--kernel", path_str(&bad), "--initrd", path_str(&bad)], &["--no-share"]);
    let a = strs(&args);
    let out = env.run(&a);
    out.code_is(1);
    let err = out.stderr();
    assert!(err.contains("QEMU said:"), "{err}");
    assert!(err.contains("command line:") && err.contains("qemu-system-x86_64"), "{err}");
    assert!(err.contains("exit status 1"), "{err}");
    assert!(env.qemu_pids().is_empty());
    // A first launch that failed leaves no half-made instance.
    let out = env.run(&["status"]);
    out.code_is(1);
    assert!(out.stderr().contains("no instance named 'dev'"), "{}", out.text());
}

#[test]
fn qemu_7_2_runs_the_same_lifecycle() {
    let (bin, fw) = qemu72();
    let env =
        Env::new("qemu72").with_env("QBUF_QEMU_SYSTEM", path_str(&bin)).with_env("QBUF_QEMU_FIRMWARE", path_str(&fw));
    let v = env.launch(&["--no-share", "--image", path_str(&guest().disk)]);
    let (st, _) = env.json(&["status"]);
    assert!(s(&st, "qemu_version").starts_with("7.2"), "{st}");
    env.ssh("dev", "true").ok();
    let (p, out) = env.json(&["powerdown"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "powerdown");
    assert_eq!(s(&p, "shutdown_reason"), "guest-shutdown");
    assert!(!pid_running(pid_of(&v)));
    // 7.2's quit path too.
    let args = env.launch_args(&["--append", APPEND_DEAF]);
    let a = strs(&args);
    env.run(&a).ok();
    let (p, out) = env.json(&["powerdown", "--force"]);
    out.code_is(3);
    assert_eq!(s(&p, "method"), "quit");
}

/// A KVM device that opens but cannot run guests (broken nested setups;
/// this CI host's /dev/kvm is one) must never cost a silent hang:
/// `--accel auto` finds out with its test VM and boots under TCG with a
/// warning; `--accel kvm` refuses clearly. `/dev/null` stands in for such a
/// device, so the path is tested on every host.
#[test]
fn auto_accel_falls_back_to_tcg_when_kvm_cannot_run_guests_and_explicit_kvm_is_refused() {
    let env = Env::new("autokvm").with_env("QBUF_QEMU_KVM_DEVICE", "/dev/null");
    let args = env.launch_args(&["--no-share", "--name", "kvm", "--accel", "kvm"]);
    let out = env.run(&strs(&args));
    out.code_is(1);
    assert!(out.stderr().contains("KVM") && out.stderr().contains("--accel tcg"), "{}", out.text());
    assert!(env.qemu_pids().is_empty());

    let args = env.launch_args(&["--no-share", "--accel", "auto"]);
    let (v, out) = env.json(&strs(&args));
    out.ok();
    assert_eq!(v["accel"], "tcg");
    // Said once, short, with where to look.
    assert_eq!(out.stderr().matches("KVM is not usable").count(), 1, "{}", out.text());
    assert!(out.stderr().contains("warning: KVM is not usable") && out.stderr().contains("doctor"), "{}", out.text());
    assert!(!v["notes"].to_string().contains("KVM"), "not again in the result: {v}");
    env.run(&["powerdown"]).code_is(0);
}

/// The host's own KVM: `--accel auto` uses it exactly when doctor's test VM
/// runs under it (on this CI host it does not; on a laptop it usually does).
#[test]
fn auto_accel_on_this_host_follows_what_a_kvm_test_vm_shows() {
    let env = Env::new("hostkvm");
    let (r, out) = env.json(&["doctor"]);
    out.code_is(0);
    let kvm = r["checks"].as_array().unwrap().iter().find(|c| c["name"] == "kvm").cloned().unwrap();
    let works = kvm["level"] == "ok";
    let args = env.launch_args(&["--no-share", "--accel", "auto"]);
    let (v, out) = env.json(&strs(&args));
    out.ok();
    assert_eq!(v["accel"], if works { "kvm" } else { "tcg" }, "doctor said {kvm}");
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn a_given_ssh_key_is_used_and_a_changed_host_key_is_refused() {
    let env = Env::new("sshkey");
    let key = env.dir.join("mykey");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "mine", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    // Kernel boot with the disk: the guest keeps its host key on /data.
    env.launch(&["--no-share", "--image", path_str(&guest().disk), "--ssh-key", path_str(&key)]);
    env.ssh("dev", "true").ok();
    assert!(!env.state.join("ssh/id_ed25519").exists(), "qbuf-qemu made its own key although --ssh-key was given");
    let inst = env.instance_dir("dev");
    for f in ["qmp.sock", "control.sock", "console.sock"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(inst.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{f} is {mode:o}: sockets must be private to the user");
    }
    env.run(&["powerdown"]).code_is(0);

    // Pin a different key for the guest: the next launch must refuse it.
    let kh = inst.join("known_hosts");
    let other = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let blob = other.split_whitespace().nth(1).unwrap();
    let text = std::fs::read_to_string(&kh).unwrap();
    let forged: String =
        text.lines().map(|l| format!("{} ssh-ed25519 {blob}\n", l.split_whitespace().next().unwrap())).collect();
    std::fs::write(&kh, forged).unwrap();
    let out = env.run(&["launch", "--timeout", "120"]);
    out.code_is(1);
    assert!(out.stderr().contains("differs from the one pinned"), "{}", out.text());
    assert!(env.qemu_pids().is_empty(), "the VM was left running");
}

#[test]
fn a_vm_whose_supervisor_died_is_still_reported_and_powered_down() {
    let env = Env::new("orphan");
    let v = env.launch(&["--no-share"]);
    let pid = pid_of(&v);
    let sup = supervisor_pid(&env, "dev");
    signal(sup, Signal::SIGKILL);
    wait_until("the supervisor to die", Duration::from_secs(5), || !pid_running(sup));
    assert!(pid_running(pid), "QEMU must outlive its supervisor");

    let (st, out) = env.json(&["status"]);
    out.code_is(0);
    assert_eq!(s(&st, "state"), "unresponsive");
    assert_eq!(pid_of(&st), pid);
    // A second launch must not start another QEMU on the same sockets.
    let (l, out) = env.json(&["launch", "--timeout", "5"]);
    out.code_is(0);
    assert_eq!(l["already_running"], true);
    assert_eq!(env.qemu_pids(), vec![pid]);

    // QEMU is now PID 1's child, reaped late: a zombie must count as gone.
    let (p, out) = env.json(&["powerdown"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "powerdown");
    assert!(!pid_running(pid));
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "stopped");
    env.launch(&[]);
    env.run(&["powerdown"]).code_is(0);
}
