//! The command line's contract without a VM: global flags anywhere, names
//! refused before any file is touched, exit codes, JSON on stdout only.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn state(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qbuf-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A stopped instance as far as the tool can tell: its directory with a
/// file qbuf-qemu makes (a bare directory is not an instance).
fn stopped_instance(s: &std::path::Path, name: &str) -> PathBuf {
    let inst = s.join("instances").join(name);
    std::fs::create_dir_all(&inst).unwrap();
    std::fs::write(inst.join("serial.log"), "booted once\n").unwrap();
    inst
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
    // A value clap refuses still gets the one JSON document with --json.
    let o = run(&["--json", "launch", "--memory", "1e3"]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(v["exit_code"], 2, "{v}");
    assert!(v["error"].as_str().unwrap().contains("1e3"), "{v}");
    // The whole of clap's message, not its first line: it names what is missing.
    let o = run(&["--json", "launch", "--kernel", "/x"]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    let error = v["error"].as_str().unwrap();
    assert!(error.starts_with("the following required arguments were not provided:"), "{v}");
    assert!(error.contains("--initrd <FILE>") && !error.contains('\u{1b}'), "{v}");
    // A missing subcommand: one line naming them, not clap's whole help
    // (which stderr still has).
    let o = run(&["--json", "--name", "disk", "snapshot"]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    let error = v["error"].as_str().unwrap();
    assert!(error.starts_with("'qbuf-qemu snapshot' needs a subcommand: one of save, load, list, delete;"), "{v}");
    assert!(!error.contains('\n') && stderr(&o).contains("Usage: qbuf-qemu snapshot"), "{v}");
    // The same with the global flag after the command (clap's other kind
    // of this error).
    let o = run(&["snapshot", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert!(v["error"].as_str().unwrap().starts_with("'qbuf-qemu snapshot' needs a subcommand"), "{v}");
    let o = run(&["--json", "ssh", "--", "true"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--json does not apply"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
}

#[test]
fn destroy_without_a_terminal_needs_yes() {
    let s = state("destroy");
    let inst = stopped_instance(&s, "dev");
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
    stopped_instance(&s, "dev");
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
    assert!(e.contains("--kernel FILE --initrd FILE") && e.contains("tests/guest/out/vmlinux"), "{e}");
    assert!(!s.join("instances/dev").exists(), "no half-made instance");
    let _ = std::fs::remove_dir_all(&s);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn destroy_says_what_it_kept_and_leaves_no_ghost_instance() {
    let s = state("ghost");
    let sd = s.to_str().unwrap();
    let inst = stopped_instance(&s, "dev");
    std::fs::write(inst.join("my-notes.txt"), "mine").unwrap();
    let o = run(&["--state-dir", sd, "destroy", "--yes"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Kept") && out.contains("my-notes.txt") && out.contains("did not create"), "{out}");
    assert!(inst.join("my-notes.txt").is_file(), "the user's file stays");
    // The directory that stays is no instance: not listed, no stopped ghost.
    let o = run(&["--state-dir", sd, "--json", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["instances"], serde_json::json!([]), "{v}");
    let o = run(&["--state-dir", sd, "status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no instance named 'dev'") && stderr(&o).contains("destroy kept them"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&s).unwrap();
}

#[test]
fn an_unknown_name_lists_the_instances_and_suggests_the_closest() {
    let s = state("didyoumean");
    let sd = s.to_str().unwrap();
    stopped_instance(&s, "review");
    stopped_instance(&s, "dev");
    let o = run(&["--state-dir", sd, "--name", "reveiw", "status"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("did you mean 'review'?") && e.contains("Instances: dev, review"), "{e}");
    let o = run(&["--state-dir", sd, "--name", "zzzzzz", "logs"]);
    assert!(!stderr(&o).contains("did you mean"), "{}", stderr(&o));
    let o = run(&["--state-dir", sd, "ls"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("NAME") && out.contains("\ndev ") && out.contains("\nreview "), "{out}");
    std::fs::remove_dir_all(&s).unwrap();
}

#[test]
fn every_command_flag_and_argument_is_described_and_global_options_are_grouped() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let p = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() {
                missing.push(format!("{p}: no description"));
            }
            for a in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{p}: {id} has no description"));
                }
                if a.is_global_set() && a.get_help_heading() != Some(qbuf_qemu::cli::GLOBAL) {
                    missing.push(format!("{p}: global {id} is not under '{}'", qbuf_qemu::cli::GLOBAL));
                }
            }
            walk(sub, &p, missing);
        }
    }
    let mut cmd = qbuf_qemu::cli::Cli::command();
    cmd.build();
    let mut missing = vec![];
    walk(&cmd, "qbuf-qemu", &mut missing);
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    let help = String::from_utf8_lossy(&run(&["status", "--help"]).stdout).to_string();
    let (own, global) = help.split_once("Global options:").expect(&help);
    assert!(global.contains("--state-dir") && !own.contains("--state-dir"), "{help}");
}

#[test]
fn usage_lines_do_not_change_when_the_state_dir_variable_is_set() {
    let plain = run(&["share", "add"]);
    let with_env = Command::new(env!("CARGO_BIN_EXE_qbuf-qemu"))
        .args(["share", "add"])
        .env("QBUF_QEMU_STATE_DIR", "/tmp/qbuf-cli-env")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(plain.status.code(), Some(2));
    assert_eq!(stderr(&plain), stderr(&with_env));
    assert!(stderr(&plain).contains("Usage: qbuf-qemu share add <DIR> <TAG>"), "{}", stderr(&plain));
}

#[test]
fn bash_loads_the_generated_completions_and_completes_subcommands_and_values() {
    let script = run(&["completions", "bash"]);
    assert_eq!(script.status.code(), Some(0));
    let dir = state("completions");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("qbuf-qemu.bash");
    std::fs::write(&file, &script.stdout).unwrap();
    // COMP_WORDS as bash sets them for "qbuf-qemu <words> <TAB>", and the
    // function bash would call.
    let complete = |words: &str| -> String {
        let test = format!(
            r#"source "$1" || exit 9
complete -p qbuf-qemu >/dev/null || exit 8
COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
fn=$(complete -p qbuf-qemu | sed 's/.* -F \([^ ]*\) .*/\1/')
"$fn" qbuf-qemu "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
echo "${{COMPREPLY[*]}}""#
        );
        let o = Command::new("bash").args(["-c", &test, "bash", file.to_str().unwrap()]).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(complete("qbuf-qemu co"), "copy console completions");
    assert_eq!(complete("qbuf-qemu disk re"), "remove resize", "after a subcommand (clap-rs/clap#6421)");
    assert_eq!(complete("qbuf-qemu launch --accel ''"), "auto kvm tcg");
    for shell in ["zsh", "fish"] {
        let o = run(&["completions", shell]);
        assert_eq!(o.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&o.stdout).contains("ssh-config"), "{shell}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_man_page_is_generated_with_a_page_per_command() {
    let page = run(&["man"]);
    assert_eq!(page.status.code(), Some(0));
    let text = String::from_utf8_lossy(&page.stdout);
    assert!(text.starts_with(".ie") && text.contains(".TH qbuf-qemu 1"), "{}", &text[..200.min(text.len())]);
    let dir = state("man");
    let o = run(&["man", "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for page in ["qbuf-qemu.1", "qbuf-qemu-copy.1", "qbuf-qemu-disk-resize.1", "qbuf-qemu-ssh-config.1"] {
        assert!(dir.join(page).is_file(), "{page} missing");
    }
    let o = run(&["--json", "man"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
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
        vec!["launch", "--ssh-user=-oProxyCommand=x"],
        vec!["launch", "--share", "/tmp", "--no-share"],
        vec!["launch", "--kernel", "/k"],
        vec!["launch", "--append", "quiet"],
        vec!["launch", "--resume", "a,b"],
        vec!["disk", "add", "--size", "1M", "--id", "disk0"],
        vec!["share", "add", "/tmp", "a,b"],
        vec!["snapshot", "save", "../x"],
        vec!["run", "--from-snapshot", "a b", "--", "true"],
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

/// Whether this test may give directories to another user (root, as in
/// CI); when not, says so (and fails under CI, where it must run).
fn as_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{test} needs root, and CI runs as root");
        eprintln!("{test}: not run: it needs root to give a directory to another user (CI runs it as root)");
    }
    root
}

/// `uid 65534 (nobody)` as the tool names that user.
fn nobody() -> (nix::unistd::Uid, String) {
    let uid = nix::unistd::Uid::from_raw(65534);
    let name = nix::unistd::User::from_uid(uid).ok().flatten().map(|u| format!(" ({})", u.name));
    (uid, format!("uid 65534{}", name.unwrap_or_default()))
}

/// Runs `args` with state dir `s`; asserts exit 1 with `said` in the message.
fn refused(s: &std::path::Path, args: &[&str], said: &str) {
    let mut a = vec!["--state-dir", s.to_str().unwrap()];
    a.extend_from_slice(args);
    let o = run(&a);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
    assert!(stderr(&o).contains(said), "{args:?}: expected {said:?} in: {}", stderr(&o));
    assert!(stderr(&o).contains("--state-dir DIR"), "{args:?}: the fix is named: {}", stderr(&o));
}

#[test]
fn a_state_dir_another_user_owns_is_refused_before_anything_is_written() {
    if !as_root("a_state_dir_another_user_owns_is_refused_before_anything_is_written") {
        return;
    }
    let (uid, owner) = nobody();
    let theirs = state("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(uid), None).unwrap();
    let said = format!("state dir {} belongs to {owner}, not to you (uid 0", theirs.display());
    for args in [&["launch", "--image", "/nonexistent"][..], &["status"], &["list"], &["ssh-config"]] {
        refused(&theirs, args, &said);
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0, "{args:?} wrote into their state dir");
    }

    // The issue's attack: their ssh/ in a state dir of ours.
    let ours = state("ssh-swap");
    std::fs::create_dir_all(ours.join("ssh")).unwrap();
    std::fs::write(ours.join("ssh/id_ed25519.pub"), "ssh-ed25519 AAAA their-key\n").unwrap();
    nix::unistd::chown(&ours.join("ssh"), Some(uid), None).unwrap();
    refused(
        &ours,
        &["launch", "--image", "/nonexistent"],
        &format!("SSH key dir {}/ssh belongs to {owner}", ours.display()),
    );
    assert!(!ours.join("instances").exists(), "launch went on");

    // A symlink into their directory, or to a directory of theirs.
    let link = state("link");
    std::os::unix::fs::symlink(&theirs, &link).unwrap();
    refused(
        &link,
        &["launch", "--image", "/nonexistent"],
        &format!("is a symlink to {}, which belongs to {owner}", theirs.display()),
    );
    let inside = theirs.join("mine");
    std::fs::create_dir(&inside).unwrap();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&inside, &link).unwrap();
    refused(&link, &["list"], &format!("which is reached through {} (owned by {owner}", theirs.display()));

    // A symlink to a directory of the user's own is fine.
    let mine = state("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&mine, &link).unwrap();
    let o = run(&["--state-dir", link.to_str().unwrap(), "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for d in [theirs, ours, link, mine] {
        let _ = std::fs::remove_file(&d);
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// The review's case, as a user who is not root: uid 1000 (by `setpriv`)
/// with a state dir of its own inside another user's directory (sticky
/// and world-writable, like their own `/tmp`) or behind their symlink.
#[test]
fn a_state_dir_inside_another_users_directory_is_refused_for_a_plain_user() {
    if !as_root("a_state_dir_inside_another_users_directory_is_refused_for_a_plain_user") {
        return;
    }
    let (alice, (bob, bobs)) = (1000, nobody());
    let give = |p: &std::path::Path, uid: u32, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(p).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
    };
    let base = state("setpriv");
    give(&base, 0, 0o755);
    // A copy uid 1000 can run whatever the checkout's modes (a clone under
    // /root is 0700).
    let bin = base.join("qbuf-qemu");
    std::fs::copy(env!("CARGO_BIN_EXE_qbuf-qemu"), &bin).unwrap();
    let (theirs, mine) = (base.join("bob-tmp"), base.join("alice"));
    give(&theirs, bob.as_raw(), 0o1777);
    give(&theirs.join("state"), alice, 0o700);
    give(&mine, alice, 0o755);
    give(&mine.join("state"), alice, 0o700);
    let link = base.join("bob-link");
    std::os::unix::fs::symlink(&mine, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(bob.as_raw()), None).unwrap();
    let as_alice = |s: &std::path::Path| {
        Command::new("setpriv")
            .args(["--reuid=1000", "--regid=1000", "--clear-groups"])
            .arg(&bin)
            .arg("--state-dir")
            .arg(s)
            .arg("list")
            .env_remove("QBUF_QEMU_STATE_DIR")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = as_alice(&theirs.join("state"));
    let said = format!("is reached through {} (owned by {bobs}, mode 1777)", theirs.display());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&said) && stderr(&o).contains("under your home"), "{}", stderr(&o));
    let o = as_alice(&link.join("state"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("{}, a symlink owned by {bobs}", link.display())), "{}", stderr(&o));
    // Their own state dir, reached through root's and their own directories.
    let o = as_alice(&mine.join("state"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn names_given_as_arguments_are_usage_errors_like_the_same_names_as_flags() {
    let s = state("positional-names");
    let sd = s.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["snapshot", "delete", "../x"], "invalid snapshot name \"../x\""),
        (&["snapshot", "load", "../../y"], "invalid snapshot name \"../../y\""),
        (&["launch", "--resume", "../x"], "invalid snapshot name \"../x\""),
        (&["disk", "remove", "a/b"], "invalid disk id \"a/b\""),
        (&["disk", "resize", "../d", "1G"], "invalid disk id \"../d\""),
        (&["share", "remove", "a,b"], "invalid share tag \"a,b\""),
    ];
    for (args, message) in cases {
        let o = run(&[&["--state-dir", sd], args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(message), "{args:?}: {}", stderr(&o));
        assert!(!s.exists(), "{args:?}: the state dir was created");
    }
    // The tool's own disk ids still name a disk: past the parser they meet
    // the missing instance (exit 1), not a usage error.
    for args in [&["disk", "resize", "disk0-dev", "40G"][..], &["disk", "remove", "disk0"]] {
        let o = run(&[&["--state-dir", sd], args].concat());
        assert_ne!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

/// A run's results must be able to land before its VM boots: a bad
/// --summary or --copy-out destination is said at once, nothing started.
#[test]
fn run_checks_where_its_results_go_before_it_boots() {
    let s = state("run-outputs");
    let sd = s.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--summary", "/nonexistent-dir/s.json"], "--summary /nonexistent-dir/s.json: cannot write there"),
        (&["--summary", "/tmp"], "--summary /tmp is a directory"),
        (&["--copy-out", "/out:/etc/hostname/sub/out"], "/etc/hostname is not a directory you can write"),
    ];
    for (flags, said) in cases {
        let o = run(&[&["--state-dir", sd, "run"], flags, &["--", "true"]].concat());
        assert_eq!(o.status.code(), Some(125), "{flags:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(said), "{flags:?}: {}", stderr(&o));
        assert!(!s.join("instances").exists(), "{flags:?}: no instance was made");
    }
}

#[test]
fn a_zero_wait_is_refused_where_it_could_never_succeed() {
    let s = state("zero-wait");
    let sd = s.to_str().unwrap();
    for args in [
        &["launch", "--timeout", "0"][..],
        &["run", "--timeout", "0s", "--", "true"],
        &["run", "--boot-timeout", "0", "--", "true"],
        &["reboot", "--ssh-timeout", "0"],
    ] {
        let o = run(&[&["--state-dir", sd], args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("would give up before the VM starts"), "{args:?}: {}", stderr(&o));
    }
    // A stop's zero is a choice: straight to QMP quit (here: no such VM).
    let o = run(&["--state-dir", sd, "powerdown", "--timeout", "0"]);
    assert_ne!(o.status.code(), Some(2), "{}", stderr(&o));
}
