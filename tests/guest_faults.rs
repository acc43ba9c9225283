//! A guest that is broken, not slow: its sshd refuses the key, or its
//! kernel panics without a pvpanic driver (QEMU never hears of it) or keeps
//! rebooting. Each ends a launch or a `run` at once with the reason, and
//! `status` and `events` say what happened. Real QEMU and the test guest
//! (`qbuf.nokey=1`, `qbuf.panic_after=N`; see tests/guest/README.md). Also
//! the tests' own retry rules (support::Env::run, Env::boot).

mod support;

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// `run` of the test guest with `append` on its kernel command line.
fn run_args(append: &str, extra: &[&str], command: &[&str]) -> Vec<String> {
    let g = guest();
    let mut v: Vec<String> = ["run", "--kernel", path_str(&g.kernel), "--initrd", path_str(&g.initrd)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(["--append".into(), format!("{APPEND} {append}")]);
    v.extend(["--accel", "tcg", "--memory", "512M", "--no-share"].map(String::from));
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push("--".into());
    v.extend(command.iter().map(|s| s.to_string()));
    v
}

fn no_instances_left(env: &Env) {
    let left: Vec<_> = std::fs::read_dir(env.state.join("instances"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run left instances behind: {left:?}");
    assert!(env.qemu_pids().is_empty(), "QEMU left running: {:?}", env.qemu_pids());
}

#[test]
fn a_refused_key_fails_launch_within_the_grace_naming_the_user_and_the_key() {
    let env = Env::new("nokey");
    let args = env.launch_args(&["--no-share", "--timeout", "300", "--append", &format!("{APPEND} qbuf.nokey=1")]);
    let t = Instant::now();
    let out = env.run(&strs(&args));
    let took = t.elapsed();
    assert_eq!(out.code(), 1, "{}", out.text());
    let err = out.stderr();
    // Boot (up to ~30 s on a loaded host) + 10 s of grace + the stop; far
    // from --timeout's 300 s, which a refused key used to wait out.
    assert!(took < Duration::from_secs(90), "took {took:?}:\n{err}");
    let key = env.state.join("ssh/id_ed25519.pub");
    assert!(err.contains("refused the key for user 'dev'"), "{err}");
    assert!(err.contains(&key.display().to_string()) && err.contains("authorized_keys"), "{err}");
    assert!(err.contains("Permission denied (publickey)"), "OpenSSH's words: {err}");
    assert!(!err.contains("a slow boot needs"), "no slow boot: {err}");
    assert!(err.contains("qbuf.nokey=1: no authorized key installed"), "the serial tail: {err}");
    assert!(env.qemu_pids().is_empty(), "the VM was stopped");
}

#[test]
fn run_with_a_refused_key_exits_125_and_leaves_nothing() {
    let env = Env::new("runnokey");
    let t = Instant::now();
    let out = env.run(&strs(&run_args("qbuf.nokey=1", &["--timeout", "300"], &["true"])));
    out.code_is(125);
    assert!(t.elapsed() < Duration::from_secs(90), "took {:?}", t.elapsed());
    assert!(out.stderr().contains("refused the key for user 'dev'"), "{}", out.text());
    no_instances_left(&env);
}

/// Crashes the guest's kernel as root (the test guest has no pvpanic
/// module: QEMU never hears of it). The ssh session dies with the guest.
fn panic_the_guest(env: &Env) {
    let mut ssh = env.cmd(&["ssh", "--", "echo c > /proc/sysrq-trigger"]).stdout(Stdio::null()).spawn().unwrap();
    // SSH keepalives end it (15 s), or it sees the connection drop.
    let st = wait_or_kill(&mut ssh, "ssh into a panicking guest to end", Duration::from_secs(40));
    assert!(!st.success(), "the session ended with the guest: {st:?}");
}

#[test]
fn a_guest_panic_qemu_never_hears_of_is_reported_and_stops_at_once() {
    let env = Env::new("panic");
    env.launch(&["--no-share", "--ssh-user", "root"]);
    panic_the_guest(&env);
    let mut st = Value::Null;
    wait_until("status to say crashed", Duration::from_secs(10), || {
        st = env.json(&["status"]).0;
        st["state"] == "crashed"
    });
    assert_eq!(st["qemu_status"], "running", "QEMU does not know: {st}");
    let line = s(&st["guest_panic"], "line");
    assert!(line.contains("Kernel panic - not syncing: sysrq triggered crash"), "{st}");
    assert!(st["notes"].to_string().contains("panicked"), "{st}");
    let human = env.run(&["status"]);
    assert!(human.stdout().contains("state:      crashed"), "{}", human.text());
    let ev = env.events("dev");
    let p = ev.iter().find(|e| e["event"] == "QBUF_GUEST_PANIC").unwrap_or_else(|| panic!("no panic event: {ev:?}"));
    assert_eq!(p["data"]["line"].as_str(), Some(line.as_str()));
    // ssh into the dead guest says so at once instead of hanging.
    let t = Instant::now();
    let out = env.ssh("dev", "true");
    assert_ne!(out.code(), 0);
    assert!(out.stderr().contains("kernel panicked") && t.elapsed() < Duration::from_secs(5), "{}", out.text());
    // A dead guest cannot press its power button: no 60 s wait for it.
    let t = Instant::now();
    let out = env.run(&["powerdown"]);
    out.code_is(3);
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}: {}", t.elapsed(), out.text());
    let st = env.json(&["status"]).0;
    assert_eq!(st["state"], "crashed", "{st}");
    assert!(s(&st, "stop_reason").contains("Kernel panic - not syncing"), "{st}");
}

/// The console is the guest's own output: a line that only looks like a
/// panic (root may write /dev/console) marks the status, but a guest whose
/// sshd still greets gets its power button, and its unsynced writes a clean
/// shutdown.
#[test]
fn a_panic_line_the_guest_prints_itself_does_not_cost_it_the_power_button() {
    let env = Env::new("fakepanic");
    env.launch(&["--no-share", "--ssh-user", "root"]);
    // A line of its own: the console's shell prompt may stand before it.
    env.ssh("dev", "printf '\\nKernel panic - not syncing: only words\\n' > /dev/console").ok();
    wait_until("the console's panic line to be seen", Duration::from_secs(10), || {
        env.json(&["status"]).0["guest_panic"]["line"].as_str().is_some_and(|l| l.contains("only words"))
    });
    let (p, out) = env.json(&["powerdown"]);
    out.ok();
    assert_eq!(s(&p, "method"), "powerdown", "the guest's sshd answered, so the button was pressed: {p}");
    assert_eq!(p["guest"], true, "{p}");
}

#[test]
fn run_ends_at_once_with_125_when_the_guests_kernel_panics() {
    let env = Env::new("runpanic");
    let t = Instant::now();
    let cmd = ["sh", "-c", "echo started; echo c > /proc/sysrq-trigger; sleep 1000"];
    let out = env.run(&strs(&run_args("", &["--ssh-user", "root", "--timeout", "600"], &cmd)));
    out.code_is(125);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(90), "took {took:?}, not --timeout's 600 s: {}", out.text());
    let err = out.stderr();
    assert!(err.contains("the guest's kernel panicked"), "{err}");
    assert!(err.contains("serial console (last lines)") && err.contains("end Kernel panic"), "the tail: {err}");
    assert!(out.stdout().contains("started"), "COMMAND ran: {}", out.text());
    assert!(err.contains("qbuf-qemu: run: the guest's kernel panicked (exit 125); VM stopped by quit"), "{err}");
    no_instances_left(&env);
}

#[test]
fn a_reboot_loop_shows_in_status_and_events() {
    let env = Env::new("reboots");
    // Each boot panics 6 s after its sshd is up, and the kernel reboots
    // 1 s after a panic.
    env.launch(&["--no-share", "--append", &format!("{APPEND} panic=1 qbuf.panic_after=6")]);
    let mut st = Value::Null;
    wait_until("status to name a reboot loop", Duration::from_secs(150), || {
        st = env.json(&["status"]).0;
        st["notes"].to_string().contains("reboot loop")
    });
    assert!(st["guest_boots"].as_u64().unwrap() >= 3, "{st}");
    assert!(st["notes"].to_string().contains("kernel panic"), "{st}");
    let ev = env.events("dev");
    let boots = ev.iter().filter(|e| e["event"] == "QBUF_GUEST_BOOT").count();
    let panics = ev.iter().filter(|e| e["event"] == "QBUF_GUEST_PANIC").count();
    assert!(boots >= 2 && panics >= 2, "{boots} boots, {panics} panics: {ev:?}");
    env.run(&["powerdown"]);
}

fn out(code: i32, stderr: &str) -> Out {
    let o = Output { status: ExitStatus::from_raw(code << 8), stdout: vec![], stderr: stderr.as_bytes().to_vec() };
    Out(o, "launch".into())
}

#[test]
fn only_a_stall_before_any_ssh_banner_and_a_failed_qemu_abort_get_a_retry() {
    let rcu = "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:";
    let stalled =
        format!("the guest did not accept an SSH login on port 1 within 120s (last: no SSH banner yet); {rcu}");
    assert!(guest_kernel_stalled(&out(1, &stalled)));
    let login_bug = format!(
        "the guest did not accept an SSH login on port 1 within 120s (last: banner seen, login failed: x); {rcu}"
    );
    assert!(!guest_kernel_stalled(&out(1, &login_bug)), "a login bug gets no free retry");
    // `run` whose deadline came while the guest stalled.
    let run_cut = format!("run: cut short before COMMAND started: stopped waiting for SSH after 45s (cancelled; last: no SSH banner yet)\nThe VM was stopped (quit). serial console (last lines):\n{rcu}");
    assert!(guest_kernel_stalled(&out(124, &run_cut)));
    let abort = "QEMU crashed or was killed: killed by signal 6 (SIGABRT)\niotlb_to_section: Assertion failed";
    assert!(qemu_tcg_aborted(&out(1, abort)));
    assert!(!qemu_tcg_aborted(&out(0, abort)), "a command that succeeded is not run again");
}

#[test]
fn more_than_two_retries_in_one_run_fail_it() {
    let o = out(1, "x");
    // A counter of its own: the e2e tests here share the binary's.
    let count = std::sync::atomic::AtomicUsize::new(0);
    for _ in 0..MAX_RETRIES {
        count_retry(&count, "a test of the limit", &o);
    }
    let r = std::panic::catch_unwind(|| count_retry(&count, "a test of the limit", &o));
    let msg = r.expect_err("the third retry fails the run");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("retries in one run"), "{msg}");
}
