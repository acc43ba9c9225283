//! `qbuf-qemu run` as a CI runner treats it, end to end against real QEMU
//! and the test guest: a SIGKILLed run leaves nothing running, a SIGTERM
//! during the cleanup hurries it, a deadline during the boot, and what the
//! summary, `list`, `status` and `show` say on each path. One VM at a time
//! (see support::Env).

mod support;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

/// The run's instance (`run-…`), once it exists.
fn run_instance(env: &Env) -> Option<String> {
    std::fs::read_dir(env.state.join("instances")).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let n = e.file_name().to_string_lossy().to_string();
        n.starts_with("run-").then_some(n)
    })
}

/// Processes whose parent is `pid` and whose name is `comm`.
fn children_named(pid: i32, comm: &str) -> Vec<i32> {
    let mut v = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let ppid = stat[close + 1..].split_whitespace().nth(1).and_then(|f| f.parse::<i32>().ok());
        if &stat[open + 1..close] == comm && ppid == Some(pid) {
            v.push(p);
        }
    }
    v
}

#[test]
fn a_sigkilled_run_leaves_no_vm_no_supervisor_no_ssh_and_no_instance() {
    let env = Env::new("runkill");
    let mut child = started_run(&env, &["--no-share"], "echo started; sleep 1000");
    let run_pid = child.id() as i32;
    let name = run_instance(&env).expect("the run's instance");
    // While it runs, the instance says whose it is.
    let (list, _) = env.json(&["list"]);
    let line = list["instances"].as_array().unwrap().iter().find(|i| i["name"] == name.as_str()).unwrap().clone();
    assert_eq!((line["run"]["pid"].as_i64(), line["run"]["throwaway"].as_bool()), (Some(run_pid as i64), Some(true)));
    let out = env.run(&["list"]);
    assert!(out.stdout().contains(&format!("(run pid {run_pid}, removed with it)")), "{}", out.text());
    let (st, _) = env.json(&["--name", &name, "status"]);
    assert!(st["notes"].to_string().contains(&format!("throwaway VM of run pid {run_pid}")), "{st}");

    let supervisor = supervisor_pid(&env, &name);
    let ssh = children_named(run_pid, "ssh");
    assert_eq!(ssh.len(), 1, "COMMAND's ssh: {ssh:?}");
    signal(run_pid, Signal::SIGKILL);
    child.wait().unwrap();
    wait_until("the killed run's VM, supervisor, ssh and instance to go", Duration::from_secs(40), || {
        !pid_running(supervisor) && !pid_running(ssh[0]) && run_instance(&env).is_none()
    });
    nothing_left(&env);
}

#[test]
fn sigterm_during_the_cleanup_hurries_it_and_the_summary_says_interrupted() {
    let env = Env::new("runtermclean");
    let summary = env.dir.join("summary.json");
    // A guest that ignores the power button: the cleanup waits for it.
    let extra = ["--append", APPEND_DEAF, "--summary", path_str(&summary)];
    // No share and no --workdir (the test's directory is no checkout).
    let args = run_args(&extra, &["pwd"]);
    let mut child = env.cmd(&strs(&args)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    wait_until("the cleanup to wait for the guest", Duration::from_secs(120), || {
        run_instance(&env).is_some_and(|n| {
            env.json(&["--name", &n, "status"]).0.get("stopping_step").and_then(Value::as_str) == Some("powerdown")
        })
    });
    let sent = Instant::now();
    signal(pid, Signal::SIGTERM);
    let status = wait_or_kill(&mut child, "run after SIGTERM", Duration::from_secs(60));
    let hurried = sent.elapsed();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let err = err.join().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{err}");
    // The stop went on at QMP quit at once, not after the 30 s the
    // cleanup gives the power button.
    assert!(hurried < Duration::from_secs(20), "SIGTERM did not hurry the cleanup ({hurried:?}): {err}");
    assert!(err.contains("SIGTERM: forcing the stop"), "{err}");
    let s = read_json(&summary);
    assert_eq!((s["outcome"].as_str(), s["exit_code"].as_i64()), (Some("interrupted"), Some(143)), "{s}");
    assert_eq!(s["command_exit"], 0, "COMMAND itself finished: {s}");
    assert_eq!(s["stop_method"], "quit", "{s}");
    // Where COMMAND ran, said when there is no share.
    assert!(err.contains("COMMAND runs in the home directory of guest user"), "{err}");
    assert!(s["workdir"].is_null(), "{s}");
    assert!(out.trim_end().starts_with('/'), "pwd: {out:?}");
    nothing_left(&env);
}

#[test]
fn the_runs_deadline_in_the_boot_exits_124_and_the_boot_limit_125() {
    let env = Env::new("runbootdl");
    // What a run SIGKILLed before its VM's supervisor started leaves: an
    // instance whose run is gone and that no process holds. The next run
    // removes it.
    let orphan = env.instance_dir("run-0rphan00");
    std::fs::create_dir_all(&orphan).unwrap();
    let dead = r#"{"owner": {"pid": 1, "start_ticks": 1, "boot_id": "gone"}, "pid": 1, "from_snapshot": null}"#;
    std::fs::write(orphan.join("run-origin.json"), dead).unwrap();
    std::fs::write(orphan.join("authorized_key.pub"), "key\n").unwrap();
    let summary = env.dir.join("summary.json");
    // A guest that never answers, however fast the host: its init is a
    // shell on the console (no network, no sshd).
    let mute = "console=ttyS0 quiet rdinit=/bin/sh";
    let extra = ["--no-share", "--append", mute, "--timeout", "3", "--summary", path_str(&summary)];
    let out = env.run(&strs(&run_args(&extra, &["true"])));
    out.code_is(124);
    let s = read_json(&summary);
    assert_eq!((s["outcome"].as_str(), s["exit_code"].as_i64()), (Some("timed-out"), Some(124)), "{s}");
    assert!(s["command_exit"].is_null(), "{s}");
    assert!(out.stderr().contains("--timeout expired"), "{}", out.text());
    // The throwaway instance's serial log is gone: the run says how far
    // the boot got and shows the console's end, in the summary too.
    let err = out.stderr();
    assert!(err.contains("run: cut short before COMMAND started: stopped waiting for SSH after"), "{err}");
    assert!(
        err.contains("(cancelled; last: no SSH banner yet)") && err.contains("serial console (last lines):"),
        "{err}"
    );
    let error = s["error"].as_str().unwrap_or_default();
    assert!(error.contains("stopped waiting for SSH") && error.contains("serial console"), "{s}");
    nothing_left(&env);
    // The boot's own limit: a guest that does not answer in time is a VM
    // that could not be reached (125), long before the run's deadline.
    let extra =
        ["--no-share", "--append", mute, "--boot-timeout", "3", "--timeout", "600", "--summary", path_str(&summary)];
    let out = env.run(&strs(&run_args(&extra, &["true"])));
    out.code_is(125);
    let s = read_json(&summary);
    assert_eq!((s["outcome"].as_str(), s["exit_code"].as_i64()), (Some("vm-failed"), Some(125)), "{s}");
    let error = s["error"].as_str().unwrap_or_default();
    assert!(error.contains("within 3s (last: no SSH banner yet); a slow boot needs a longer --boot-timeout"), "{s}");
    assert!(error.contains("serial console (last lines):") && !error.contains("logs --boot"), "{s}");
    assert!(s["phases"]["total"].as_f64().unwrap() < 60.0, "{s}");
    nothing_left(&env);
}

#[test]
fn a_kept_run_from_a_snapshot_says_where_it_came_from_and_outlives_its_run() {
    let env = Env::new("runkeptsnap");
    env.launch(&["--image", path_str(&guest().disk), "--no-share"]);
    env.run(&["snapshot", "save", "ci"]).ok();
    let summary = env.dir.join("summary.json");
    let out = env.run(&["run", "--from-snapshot", "ci", "--keep", "--summary", path_str(&summary), "--", "true"]);
    out.code_is(0);
    let s = read_json(&summary);
    let name = s["name"].as_str().unwrap().to_string();
    assert_eq!(s["kept"], true, "{s}");
    // Its run is gone, and the VM it kept runs on.
    std::thread::sleep(Duration::from_secs(2));
    let (st, _) = env.json(&["--name", &name, "status"]);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["run"]["from_snapshot"]["snapshot"], "ci", "{st}");
    let out = env.run(&["--name", &name, "show"]);
    out.ok();
    assert!(out.stdout().contains("snapshot 'ci' of instance 'dev' (resumed by run"), "{}", out.text());
    assert!(!out.stdout().contains("Guix image"), "{}", out.text());
    let (list, _) = env.json(&["list"]);
    let line = list["instances"].as_array().unwrap().iter().find(|i| i["name"] == name.as_str()).unwrap().clone();
    assert_eq!((line["boot"].as_str(), line["run"]["throwaway"].as_bool()), (Some("snapshot dev/ci"), Some(false)));
    env.run(&["--name", &name, "destroy", "--yes"]).ok();
    env.run(&["destroy", "--yes"]).ok();
}
