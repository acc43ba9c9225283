//! Everyday use, end to end against real QEMU (TCG) and the busybox test
//! guest: list, ssh-config with a real scp, copy both ways, disk resize seen
//! by the guest, pause/resume/reboot, logs, the progress line, completions.
//! One VM at a time (see support::Env). Run with: cargo test --test everyday

mod support;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Reads `r` to its end on a thread of its own.
fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// A copy from the guest cut short by a signal (SIGTERM, as a script's
/// timeout sends) exits 128+N and leaves nothing of itself: no half-made
/// copy, no private directory beside DEST. The guest's tar is stopped
/// (SIGSTOP), so the copy is under way when the signal comes, however fast
/// the host.
fn copy_cut_by_a_signal_leaves_nothing(env: &Env) {
    let stall = "command -v killall >/dev/null || exit 3; \
                 dd of=/tmp/big bs=1M seek=300 count=0 2>/dev/null || exit 1; \
                 setsid sh -c 'while [ ! -e /tmp/unstall ]; do killall -STOP tar 2>/dev/null; sleep 0.01; done' \
                 </dev/null >/dev/null 2>&1 &";
    env.ssh("dev", stall).ok();
    let cut = env.dir.join("cut");
    std::fs::create_dir(&cut).unwrap();
    let child = env.cmd(&["copy", ":/tmp/big", path_str(&cut)]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn();
    let child = child.unwrap();
    // Its private directory is made just before its ssh starts.
    let entries = || std::fs::read_dir(&cut).unwrap().flatten().map(|e| e.file_name()).collect::<Vec<_>>();
    wait_until("the copy to start", Duration::from_secs(30), || !entries().is_empty());
    std::thread::sleep(Duration::from_secs(1));
    signal(child.id() as i32, Signal::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 15), "{err}");
    assert!(err.contains("SIGTERM ended the copy of /tmp/big: nothing of it was kept"), "{err}");
    assert!(entries().is_empty(), "left behind: {:?}", entries());
    env.ssh("dev", "touch /tmp/unstall; killall -CONT tar; rm -f /tmp/big").ok();

    // `ssh` that gets a SIGTERM of its own (a CI job's timeout) takes its
    // OpenSSH child with it.
    let mut child = env.cmd(&["ssh", "--", "sleep 1000"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let parent = child.id() as i32;
    let mut ssh = None;
    wait_until("qbuf-qemu ssh to start OpenSSH", Duration::from_secs(20), || {
        ssh = child_of(parent);
        ssh.is_some()
    });
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", ssh.unwrap())).unwrap_or_default();
    assert_eq!(comm.trim(), "ssh", "the child is OpenSSH");
    signal(parent, Signal::SIGTERM);
    child.wait().unwrap();
    let ssh = ssh.unwrap();
    wait_until("its ssh to end", Duration::from_secs(5), || !pid_running(ssh));
}

/// A child process of `parent`, if one runs.
fn child_of(parent: i32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: i32 = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent).then_some(pid)
    })
}

#[test]
fn copy_goes_both_ways_and_ssh_config_serves_a_real_scp_and_list_shows_two_instances() {
    let env = Env::new("copy");
    env.launch(&["--no-share"]);
    let up = env.dir.join("up");
    std::fs::create_dir_all(up.join("sub")).unwrap();
    std::fs::write(up.join("sub/b.txt"), "from the host\n").unwrap();
    std::fs::write(env.dir.join("my file.txt"), "spaced\n").unwrap();

    // Host → guest, recursive, and a name with a blank.
    let (c, out) = env.json(&["copy", path_str(&up), "my file.txt", ":/tmp/"]);
    out.ok();
    assert_eq!((c["to_guest"].as_bool(), c["name"].as_str()), (Some(true), Some("dev")), "{c}");
    assert_eq!(env.ssh("dev", "cat /tmp/up/sub/b.txt").stdout(), "from the host\n");
    assert_eq!(env.ssh("dev", "cat '/tmp/my file.txt'").stdout(), "spaced\n");

    // Guest → host, recursive, with the instance named.
    env.ssh("dev", "mkdir -p /tmp/made/deep && echo from-the-guest > /tmp/made/deep/g.txt").ok();
    let down = env.dir.join("down");
    let out = env.run(&["copy", "dev:/tmp/made", path_str(&down)]);
    out.ok();
    assert!(out.stdout().contains("Copied the guest's dev:/tmp/made"), "{}", out.text());
    assert_eq!(read(&down.join("deep/g.txt")), "from-the-guest\n");
    let out = env.run(&["copy", ":/tmp/no-such-file", path_str(&env.dir)]);
    out.code_is(1);
    assert!(out.stderr().contains("no-such-file"), "scp's own message is shown: {}", out.text());
    env.run(&["copy", "a", "b"]).code_is(2);
    copy_cut_by_a_signal_leaves_nothing(&env);

    // ssh-config: a real scp with only that file, through the pinned host key.
    let kh = env.instance_dir("dev").join("known_hosts");
    let pinned = read(&kh);
    let cfg = env.dir.join("ssh_config");
    let out = env.run(&["ssh-config"]);
    out.ok();
    std::fs::write(&cfg, out.stdout()).unwrap();
    assert!(out.stdout().contains("Host qbuf-qemu-dev\n"), "{}", out.stdout());
    let scp = std::process::Command::new("scp")
        .args(["-F", path_str(&cfg), "-q", path_str(&up.join("sub/b.txt")), "qbuf-qemu-dev:/tmp/via-config"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(scp.status.success(), "scp -F failed: {}", String::from_utf8_lossy(&scp.stderr));
    assert_eq!(env.ssh("dev", "cat /tmp/via-config").stdout(), "from the host\n");
    assert_eq!(read(&kh), pinned, "the pinned key was used, nothing new recorded");
    let (j, out) = env.json(&["ssh-config", "dev"]);
    out.ok();
    assert_eq!(j["hosts"][0]["host"], "qbuf-qemu-dev", "{j}");

    // show: the saved settings and where each came from.
    let (sh, out) = env.json(&["show"]);
    out.ok();
    let origin = |name: &str| {
        let row = sh["settings"].as_array().unwrap().iter().find(|r| r["setting"] == name).cloned();
        row.unwrap_or_else(|| panic!("no {name} in {sh}"))["origin"].as_str().unwrap().to_string()
    };
    assert_eq!(
        [origin("memory"), origin("cpus"), origin("ssh"), origin("share"), origin("boot"), origin("qemu")],
        ["flag", "default", "auto", "flag", "flag", "path"],
        "{sh}"
    );
    assert!(env.run(&["show"]).stdout().contains("flag (given to launch)"));

    // A second instance: list shows both, running, on their own ports.
    env.launch(&["--no-share", "--name", "two"]);
    let (l, out) = env.json(&["list"]);
    out.ok();
    let rows = l["instances"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["dev", "two"], "{l}");
    for r in rows {
        assert_eq!(r["state"], "running", "{r}");
        assert!(r["pid"].as_i64().is_some() && r["uptime_seconds"].as_f64().is_some(), "{r}");
        assert!(s(r, "boot").starts_with("kernel vmlinux"), "{r}");
        assert!(r["disk_bytes"].as_u64().unwrap() > 0, "{r}");
    }
    assert_ne!(rows[0]["ssh_port"], rows[1]["ssh_port"]);
    let all = env.run(&["ssh-config", "--all"]);
    assert!(all.stdout().contains("Host qbuf-qemu-two\n") && all.stdout().contains("Host qbuf-qemu-dev\n"));
    env.run(&["--name", "two", "powerdown"]).code_is(0);
    let table = env.run(&["ls"]);
    table.ok();
    let two = table.stdout().lines().find(|l| l.starts_with("two ")).map(String::from).unwrap_or_default();
    assert!(two.contains("stopped"), "{}", table.stdout());
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn pause_resume_and_reboot_by_the_guest_or_by_a_reset() {
    let env = Env::new("power");
    env.launch(&["--no-share"]);
    let (p, out) = env.json(&["pause"]);
    out.ok();
    assert_eq!((s(&p, "before").as_str(), s(&p, "after").as_str()), ("running", "paused"), "{p}");
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "paused", "{st}");
    assert!(st["notes"].to_string().contains("resume"), "{st}");
    // -vv shows every request to the supervisor and its answer (QMP's here).
    let again = env.run(&["-vv", "pause"]);
    assert!(again.stdout().contains("already paused"), "{}", again.text());
    let err = again.stderr();
    assert!(err.contains("→ supervisor") && err.contains("query-status") && err.contains("← supervisor"), "{err}");
    let (r, out) = env.json(&["resume"]);
    out.ok();
    assert_eq!(s(&r, "after"), "running");
    env.ssh("dev", "true").ok();

    // The guest's own reboot, asked by its guest agent: QEMU reports a guest reset.
    env.start_fake_agent();
    env.ssh("dev", "touch /tmp/before-reboot").ok();
    let (b, out) = env.json(&["reboot"]);
    out.ok();
    assert_eq!(s(&b, "method"), "guest-agent", "{b}");
    assert!(b["ready_seconds"].as_f64().is_some(), "{b}");
    let out = env.ssh("dev", "test -e /tmp/before-reboot");
    assert_eq!(out.code(), 1, "the guest booted again (its /tmp is new):\n{}", out.text());
    assert!(env.events("dev").iter().any(|e| e["event"] == "RESET" && e["data"]["guest"] == true), "a guest reset");

    // Without an agent, 'reboot' over SSH (as dev, through sudo -n): the
    // guest reboots itself, so QEMU reports a guest reset, not one asked over
    // QMP. (The fake agent did not survive the first reboot.)
    env.ssh("dev", "touch /tmp/before-reboot").ok();
    let resets = env.events("dev").iter().filter(|e| e["event"] == "RESET").count();
    let (b, out) = env.json(&["reboot"]);
    out.ok();
    assert_eq!(s(&b, "method"), "ssh", "{b}");
    let out = env.ssh("dev", "test -e /tmp/before-reboot");
    assert_eq!(out.code(), 1, "the guest booted again (its /tmp is new):\n{}", out.text());
    let new: Vec<Value> = env.events("dev").into_iter().filter(|e| e["event"] == "RESET").skip(resets).collect();
    assert!(new.iter().all(|e| e["data"]["guest"] == true) && !new.is_empty(), "{new:?}");
    let out = env.run(&["reboot", "--force", "--no-wait"]);
    out.ok();
    assert!(out.stdout().contains("system_reset"), "{}", out.text());
    let by_qemu = |e: &Value| e["event"] == "RESET" && e["data"]["reason"] == "host-qmp-system-reset";
    // QEMU's RESET event reaches events.jsonl just after its reply to
    // system_reset, which ends the command.
    wait_until("QEMU's reset in the events", Duration::from_secs(10), || env.events("dev").iter().any(&by_qemu));
    assert_eq!(env.events("dev").iter().filter(|e| by_qemu(e)).count(), 1, "one reset by QEMU, the forced one");
    // --force skips the guest's shutdown: stopped, and exit 3 says how.
    env.run(&["powerdown", "--force"]).code_is(3);
}

#[test]
fn disk_resize_is_seen_by_the_guest_live_and_offline_and_launch_grows_the_boot_disk() {
    let env = Env::new("resize");
    let boot = guest().disk;
    env.launch(&["--no-share", "--image", path_str(&boot), "--ssh-user", "root"]);
    env.run(&["disk", "add", "--size", "32M"]).ok();
    let sectors = |dev: &str| -> u64 {
        let out = env.ssh(
            "dev",
            &format!(
                "for i in $(seq 50); do test -e /sys/block/{dev} && break; sleep 0.1; done; cat /sys/block/{dev}/size"
            ),
        );
        out.stdout().trim().parse().unwrap_or_else(|_| panic!("{}", out.text()))
    };
    assert_eq!(sectors("vdb"), 32 << 11);
    let (r, out) = env.json(&["disk", "resize", "disk1", "48M"]);
    out.ok();
    assert_eq!((r["live"].as_bool(), r["from_bytes"].as_u64()), (Some(true), Some(32 << 20)), "{r}");
    assert_eq!(sectors("vdb"), 48 << 11, "the guest sees the new size at once");
    let out = env.run(&["disk", "resize", "disk1", "16M"]);
    out.code_is(2);
    assert!(out.stderr().contains("only grow"), "{}", out.text());
    let vda = sectors("vda");

    env.run(&["powerdown"]).code_is(0);
    let (r, out) = env.json(&["disk", "resize", "disk1", "64M"]);
    out.ok();
    assert_eq!(r["live"], false, "{r}");
    let grown = (vda * 512 + (16 << 20)).to_string();
    let out = env.run(&["launch", "--disk-size", &format!("{grown}B")]);
    out.ok();
    assert!(out.stdout().contains("boot disk grew") && out.stdout().contains("resize2fs"), "{}", out.text());
    assert_eq!(sectors("vdb"), 64 << 11);
    assert_eq!(sectors("vda"), vda + (16 << 11));
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn logs_hide_guest_escapes_show_the_last_lines_or_this_boot_and_follow_ends_with_the_vm() {
    let env = Env::new("logs");
    env.launch(&["--no-share", "--ssh-user", "root"]);
    env.ssh("dev", r"printf 'esc-test \033[6n \033]0;title\007done\n' > /dev/ttyS0").ok();
    let serial = env.instance_dir("dev").join("serial.log");
    wait_until("the guest's line in serial.log", Duration::from_secs(10), || read(&serial).contains("esc-test"));
    assert!(read(&serial).contains("\x1b[6n"), "the guest did print the escape");
    let out = env.run(&["logs"]);
    out.ok();
    assert!(out.stdout().contains("esc-test  done"), "{}", out.text());
    assert!(!out.stdout().contains('\x1b') && !out.stdout().contains('\x07'), "no raw escapes reach the terminal");
    let last = env.run(&["logs", "-n", "2"]).stdout();
    assert!((1..=2).contains(&last.lines().count()), "{last:?}");
    assert!(out.stdout().ends_with(&last), "the last lines of all: {last:?}");

    // Rough edges from issue 11, on the same VM.
    let port = qbuf_qemu::host::pick_free_port().unwrap().to_string();
    env.run(&["forward", "add", &format!("{port}:53/udp")]).ok();
    let out = env.run(&["forward", "remove", &port]);
    out.ok();
    assert!(out.stdout().contains("/udp"), "a bare port removes the UDP forward: {}", out.text());
    let raw = env.dir.join("raw.img");
    std::fs::write(&raw, vec![0u8; 8 << 20]).unwrap();
    let (d, out) = env.json(&["disk", "add", path_str(&raw), "--format", "raw"]);
    out.ok();
    let out = env.run(&["disk", "remove", &s(&d, "id")]);
    out.ok();
    assert!(out.stdout().contains("--format raw"), "the re-attach hint keeps the format: {}", out.text());
    let (d, out) = env.json(&["disk", "add", "--size", "8M", "--id", "gone"]);
    out.ok();
    env.run(&["powerdown"]).code_is(0);
    std::fs::remove_file(s(&d, "path")).unwrap();
    let out = env.run(&["disk", "remove", "gone"]);
    out.ok();
    assert!(out.stdout().contains("no longer exists") && !out.stdout().contains("stays at"), "{}", out.text());

    // This boot only; --follow ends by itself when the VM stops.
    env.launch(&[]);
    let out = env.run(&["logs", "--boot"]);
    assert!(!out.stdout().contains("esc-test") && out.stdout().contains("qbuf-test-guest: ready"), "{}", out.text());
    let mut follow =
        env.cmd(&["logs", "--follow", "--boot"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Drained while it runs, so a full pipe never holds it up.
    let stdout = drain(follow.stdout.take().unwrap());
    let stderr = drain(follow.stderr.take().unwrap());
    env.ssh("dev", "echo follow-me > /dev/ttyS0").ok();
    std::thread::sleep(Duration::from_millis(500));
    env.run(&["powerdown"]).code_is(0);
    let t = Instant::now();
    let status = wait_or_kill(&mut follow, "logs --follow to end after the VM stopped", Duration::from_secs(20));
    assert!(t.elapsed() < Duration::from_secs(20), "--follow ended after the VM stopped");
    let (text, err) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(status.success(), "{status}: {err}");
    assert!(text.contains("follow-me") && !text.contains("esc-test"), "{text}");
    assert!(err.contains("stopped"), "{err}");
    let out = env.run(&["events", "--follow"]);
    out.ok();
    assert!(out.stdout().contains("SHUTDOWN"), "a stopped VM's events, and the end: {}", out.text());
}

/// The most memory (KiB) `qbuf-qemu ARGS` took, by GNU time.
fn max_rss_kib(env: &Env, args: &[&str]) -> u64 {
    let c = env.cmd(args);
    let mut t = std::process::Command::new("/usr/bin/time");
    t.args(["-f", "maxrss=%M"]).arg(c.get_program()).args(c.get_args()).current_dir(&env.dir);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    let out =
        t.stdout(Stdio::null()).output().unwrap_or_else(|e| panic!("/usr/bin/time (tests/setup.sh installs it): {e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {err}");
    err.lines().find_map(|l| l.strip_prefix("maxrss=")).and_then(|v| v.trim().parse().ok()).expect("maxrss")
}

#[test]
fn a_guest_flooding_its_console_keeps_its_logs_capped_and_logs_streams_them() {
    const CAP: u64 = 2 << 20; // logs::SERIAL_CAP
    let env = Env::new("flood");
    env.launch(&["--no-share", "--ssh-user", "root"]);
    // About 180 KB a second under TCG here: 30 s is well past the cap.
    let line = "0123456789abcdefghijklmnopqrstuvwxyz".repeat(2);
    env.ssh("dev", &format!("timeout 30 sh -c 'yes {line} > /dev/console'; echo flood-over > /dev/console")).ok();
    let dir = env.instance_dir("dev");
    let serial = dir.join("serial.log");
    wait_until("the flood's end in serial.log", Duration::from_secs(20), || read(&serial).contains("flood-over"));
    let sizes =
        || (std::fs::metadata(&serial).unwrap().len(), std::fs::metadata(dir.join("serial.log.1")).map(|m| m.len()));
    let (now, older) = sizes();
    assert!(now <= CAP, "serial.log has {now} bytes, over the {CAP} cap");
    assert!(older.as_ref().is_ok_and(|o| *o <= CAP && *o > CAP / 2), "serial.log.1: {older:?}");
    // `logs` says where the older lines went, and streams: reading all of
    // it takes no more memory than reading one line.
    let out = env.run(&["logs", "-n", "3"]);
    assert!(out.stdout().trim_end().ends_with("flood-over"), "{}", out.text());
    let (v, out) = env.json(&["logs"]);
    out.ok();
    assert!(s(&v, "note").contains("serial.log.1") && s(&v, "older_path").ends_with("serial.log.1"), "{v:?}");
    assert!(s(&v, "text").len() as u64 > CAP, "the older file is read first");
    assert!(out.stderr().contains("serial.log.1"), "{}", out.stderr());
    let one = max_rss_kib(&env, &["--json", "logs", "-n", "1"]);
    let all = max_rss_kib(&env, &["--json", "logs"]);
    assert!(all < one + 1024, "logs --json took {all} KiB, one line {one} KiB");
    let (events, _) = env.json(&["events"]);
    assert!(!events["events"].as_array().unwrap().is_empty());
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn rough_edges_a_wide_share_a_user_without_sudo_a_paused_guest_and_a_deleted_share() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("edges");
    // The home directory, shared read-write over 9p as nosudo (uid 1001,
    // which cannot write it): warned about, and its mode left as it is.
    let home = env.dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = env.with_env("HOME", path_str(&home));
    let v = env.launch(&["--share", path_str(&home), "--share-type", "9p", "--ssh-user", "nosudo"]);
    let notes = v["notes"].to_string();
    assert!(notes.contains("warning: the share") && notes.contains("--share-mode ro"), "{v}");
    assert_eq!(std::fs::metadata(&home).unwrap().permissions().mode() & 0o7777, 0o755, "the guest chmodded the share");
    // nosudo's sudo wants a password (Debian's sudo, no NOPASSWD rule): said
    // so with the fix, not "stop what uses it".
    let out = env.run(&["snapshot", "save", "s"]);
    out.code_is(1);
    let err = out.stderr();
    assert!(err.contains("'nosudo' is not root") && err.contains("sudo: a password is required"), "{}", out.text());
    assert!(err.contains("--ssh-user root") && err.contains("give 'nosudo' passwordless sudo"), "{}", out.text());
    assert!(!err.contains("stop what uses it"), "{}", out.text());
    assert_eq!(env.ssh("dev", "cat /proc/mounts").stdout().matches(" 9p ").count(), 1, "the share is still mounted");
    // A new SSH user applies at once, and says so.
    let out = env.run(&["launch", "--ssh-user", "root"]);
    out.ok();
    assert!(out.stdout().contains("ssh user changed from nosudo to root: saved, applies now"), "{}", out.text());
    assert_eq!(env.ssh("dev", "id -u").stdout(), "0\n");
    // ssh into a paused guest is refused at once, not left hanging.
    env.run(&["pause"]).ok();
    let mut ssh = env.cmd(&["ssh", "--", "true"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let err = drain(ssh.stderr.take().unwrap());
    let status = wait_or_kill(&mut ssh, "ssh into a paused guest", Duration::from_secs(20));
    let err = err.join().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("is paused") && err.contains("resume"), "{err}");
    env.run(&["resume"]).ok();
    env.run(&["powerdown"]).code_is(0);
    // The saved share is gone: the way out is named.
    std::fs::remove_dir_all(&home).unwrap();
    let out = env.run(&["launch"]);
    out.code_is(1);
    assert!(out.stderr().contains("--share DIR") && out.stderr().contains("--no-share"), "{}", out.text());
}

/// Runs qbuf-qemu with stdin and stderr on a new terminal (120 columns)
/// and stdout piped, typing `input`; returns its exit code, its stdout and
/// everything the terminal showed.
fn on_pty(env: &Env, args: &[&str], input: &[u8]) -> (i32, String, String) {
    use std::io::Write;
    let size = nix::pty::Winsize { ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    // Not inherited by the VM's supervisor, or the terminal would never end.
    for fd in [&pty.master, &pty.slave] {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
    }
    let slave = || Stdio::from(pty.slave.try_clone().unwrap());
    let child = env.cmd(args).stdin(slave()).stderr(slave()).stdout(Stdio::piped()).spawn().unwrap();
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    master.write_all(input).unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the child, the last holder of the terminal, is gone.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let out = child.wait_with_output().unwrap();
    let tty = reader.join().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), tty)
}

#[test]
fn progress_is_one_updating_line_on_a_terminal_and_plain_lines_in_a_pipe() {
    let env = Env::new("progress");
    // The guest ignores the power button, so the ladder waits at that step
    // for its whole --timeout: the line is shown however fast a guest
    // would power off (one did in 0.1 s, before the first 100 ms poll).
    let deaf = ["--append", APPEND_DEAF];
    let args = env.launch_args(&[&["--no-share"][..], &deaf].concat());
    let (code, stdout, tty) = on_pty(&env, &strs(&args), b"");
    assert_eq!(code, 0, "{stdout}\n{tty}");
    assert!(stdout.contains("is up") && !stdout.contains("starting QEMU"), "only the result on stdout: {stdout}");
    for stage in ["starting QEMU", "waiting for the guest", "logging in"] {
        assert!(tty.contains(stage), "stage {stage:?} not shown: {tty:?}");
    }
    assert!(tty.contains("\r") && tty.contains("\x1b["), "the line is redrawn in place: {tty:?}");
    let (code, _, tty) = on_pty(&env, &["powerdown", "--timeout", "3"], b"");
    assert_eq!(code, 3, "the guest ignored the button; QMP quit stopped the VM: {tty}");
    assert!(tty.contains("pressed the power button, waiting up to 3 s"), "{tty:?}");

    // In a pipe: each stage once, as a plain line; nothing redrawn.
    let out = env.run(&strs(&env.launch_args(&deaf)));
    out.ok();
    let err = out.stderr();
    assert_eq!(err.matches("qbuf-qemu: starting QEMU\n").count(), 1, "{err}");
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    assert!(!out.stdout().contains("starting QEMU"));
    let out = env.run(&["powerdown", "--timeout", "3"]);
    out.code_is(3);
    assert!(out.stderr().contains("qbuf-qemu: pressed the power button, waiting up to 3 s"), "{}", out.text());
    let quiet = env.run(&["-q", "status"]);
    assert!(quiet.stderr().is_empty(), "{}", quiet.text());

    // destroy asks on a terminal; no is no failure, and nothing is removed.
    let (code, stdout, tty) = on_pty(&env, &["destroy"], b"n\n");
    assert_eq!(code, 0, "{stdout}\n{tty}");
    assert!(tty.contains("[y/N]") && stdout.contains("Nothing was done"), "{stdout}\n{tty}");
    assert!(env.instance_dir("dev").join("settings.json").is_file());
}
