//! The command line's contract without a VM: global flags anywhere, names
//! refused before any file is touched, exit codes, JSON on stdout only.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn state(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qbuf-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qbuf-qemu"))
        .args(args)
        .env_remove("QBUF_QEMU_STATE_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn bad_instance_names_are_refused_before_any_file_is_touched() {
    let s = state("names");
    for bad in ["../x", "a/b", "A", "a b", "-x", ".."] {
        let name = format!("--name={bad}");
        let o = run(&["--state-dir", s.to_str().unwrap(), &name, "launch", "--image", "/nonexistent"]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
        assert!(stderr(&o).contains("invalid instance name"), "{bad}: {}", stderr(&o));
        assert!(!s.exists(), "{bad}: the state dir was created");
    }
}

#[test]
fn global_flags_go_before_or_after_the_subcommand() {
    let s = state("global");
    let sd = s.to_str().unwrap();
    for args in [
        vec!["--state-dir", sd, "--name", "x", "--json", "status"],
        vec!["status", "--state-dir", sd, "--name", "x", "--json"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).contains("no instance named 'x'"), "{args:?}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json: one JSON document, errors too");
        assert!(v["error"].as_str().unwrap().contains("no instance named 'x'"), "{v}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let o = run(&["launch", "--ssh-port", "seventy"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("auto"), "{}", stderr(&o));
    let o = run(&["no-such-command"]);
    assert_eq!(o.status.code(), Some(2));
    // ssh's stdout is the remote command's: it cannot also be one JSON document.
    let o = run(&["--json", "ssh", "--", "true"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--json does not apply"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
}

#[test]
fn destroy_without_a_terminal_needs_yes() {
    let s = state("destroy");
    let inst = s.join("instances").join("dev");
    std::fs::create_dir_all(&inst).unwrap();
    let o = run(&["--state-dir", s.to_str().unwrap(), "destroy"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--yes"));
    assert!(inst.exists(), "nothing removed without --yes");
    let o = run(&["--state-dir", s.to_str().unwrap(), "--json", "destroy", "--yes"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(v["name"], "dev");
    assert!(!inst.exists());
    std::fs::remove_dir_all(&s).unwrap();
}

#[test]
fn powerdown_of_a_stopped_instance_is_already_stopped_exit_0() {
    let s = state("stopped");
    std::fs::create_dir_all(s.join("instances").join("dev")).unwrap();
    let o = run(&["--state-dir", s.to_str().unwrap(), "powerdown", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["method"], "already-stopped");
    std::fs::remove_dir_all(&s).unwrap();
}

#[test]
fn launch_without_guix_or_image_says_what_to_do() {
    let s = state("noguix");
    let empty = state("noguix-path");
    std::fs::create_dir_all(&empty).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_qbuf-qemu"))
        .args(["--state-dir", s.to_str().unwrap(), "launch", "--no-share", "--accel", "tcg"])
        .env("PATH", "/usr/bin:/bin")
        .current_dir(&empty)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("Guix is not installed") && e.contains("--image"), "{e}");
    assert!(!s.join("instances/dev").exists(), "no half-made instance");
    let _ = std::fs::remove_dir_all(&s);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn out_of_range_values_are_usage_errors_and_touch_nothing() {
    use std::os::unix::ffi::OsStrExt;
    let s = state("values");
    let sd = s.to_str().unwrap();
    let host_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap()
        / 1024;
    let too_much = format!("{}M", host_mib + 1024);
    let cases: Vec<Vec<&str>> = vec![
        vec!["launch", "--timeout", "18446744073709551615"],
        vec!["powerdown", "--timeout", "18446744073709551615"],
        vec!["disk", "add", "--size", "20000000T"],
        vec!["launch", "--cpus", "999"],
        vec!["launch", "--cpus", "4294967295"],
        vec!["launch", "--memory", "99999999999999999999"],
        vec!["launch", "--memory", "1e3"],
        vec!["launch", "--memory", "200000G"],
        vec!["launch", "--kernel", "/k", "--initrd", "/i", "--memory", &too_much],
        vec!["run", "--timeout", "1e9", "--", "true"],
    ];
    for args in cases {
        let mut a = vec!["--state-dir", sd];
        a.extend(args.iter().copied());
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
        assert!(!s.exists(), "{args:?}: the state dir was created");
    }
    // A path that is not UTF-8 is named in the message.
    let bad = std::ffi::OsStr::from_bytes(b"/tmp/disk-\xff.qcow2");
    let o = Command::new(env!("CARGO_BIN_EXE_qbuf-qemu"))
        .arg("--state-dir")
        .arg(&s)
        .arg("launch")
        .arg("--image")
        .arg(bad)
        .env_remove("QBUF_QEMU_STATE_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/tmp/disk-") && stderr(&o).contains("UTF-8"), "{}", stderr(&o));
    assert!(!s.exists());
}
