//! Hot device changes and troubleshooting, end to end against real QEMU (TCG)
//! and the busybox test guest: disks, forwards, shares, raw QMP, the event
//! log, the serial console, doctor and the guest agent. One VM at a time (see
//! support::Env). Run with: cargo test --test e2e_devices

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Runs `cmd` in the guest until it succeeds (hot-plug is asynchronous).
fn wait_in_guest(env: &Env, what: &str, cmd: &str) {
    let script = format!("for i in $(seq 100); do {cmd} && exit 0; sleep 0.1; done; exit 1");
    let out = env.ssh("dev", &script);
    assert_eq!(out.code(), 0, "guest never saw {what}:\n{}", out.text());
}

fn count_events(env: &Env, name: &str) -> usize {
    env.events("dev").iter().filter(|e| e["event"] == name).count()
}

fn http_get(port: u16) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    c.read_to_string(&mut body)?;
    Ok(body)
}

#[test]
fn hot_disk_is_seen_by_the_guest_keeps_its_data_across_remove_and_readd_and_comes_back_at_launch() {
    let env = Env::new("hotdisk");
    let boot_disk = guest().disk;
    env.launch(&["--no-share", "--image", path_str(&boot_disk), "--ssh-user", "root"]);

    let (d, out) = env.json(&["disk", "add", "--size", "64M"]);
    out.ok();
    assert_eq!(s(&d, "id"), "disk1");
    assert_eq!(s(&d, "guest_device"), "/dev/vdb", "the boot disk is vda");
    assert_eq!(d["attached"], true);
    assert_eq!(d["created"], true);
    let image = s(&d, "path");
    assert!(image.starts_with(path_str(&env.instance_dir("dev").join("disks"))), "{image}");
    wait_in_guest(&env, "/sys/block/vdb", "test -e /sys/block/vdb");
    env.ssh("dev", "echo qbuf-hot-data | dd of=/dev/vdb bs=512 count=1 conv=sync 2>/dev/null && sync").ok();

    let (st, _) = env.json(&["status"]);
    assert_eq!((st["hotplug_ports_used"].as_u64(), st["hotplug_ports_free"].as_u64()), (Some(1), Some(3)), "{st}");
    let out = env.run(&["status"]);
    assert!(out.stdout().contains("4 PCIe root ports: 1 used, 3 free"), "{}", out.text());
    let (list, _) = env.json(&["disk", "list"]);
    let disks = list["disks"].as_array().unwrap();
    assert!(disks.iter().any(|x| x["id"] == "disk0-dev" && x["boot"] == true), "{list}");
    assert!(disks.iter().any(|x| x["id"] == "disk1" && x["recorded"] == true && x["attached"] == true), "{list}");

    let (r, out) = env.json(&["disk", "remove", "disk1"]);
    out.ok();
    assert_eq!(r["detached"], true);
    assert!(r["seconds"].as_f64().is_some_and(|x| x >= 0.0), "{r}");
    assert!(
        env.events("dev").iter().any(|e| e["event"] == "DEVICE_DELETED" && e["data"]["device"] == "disk1"),
        "DEVICE_DELETED is in the event log"
    );
    env.ssh("dev", "test ! -e /sys/block/vdb").ok();
    assert!(std::path::Path::new(&image).is_file(), "removing a disk keeps its image");
    let (list, _) = env.json(&["disk", "list"]);
    assert_eq!(list["disks"].as_array().unwrap().len(), 1, "{list}");

    // Re-attached from its file: the data is still there.
    let (d, out) = env.json(&["disk", "add", &image]);
    out.ok();
    assert_eq!(s(&d, "id"), "disk1", "an image from the instance's disks dir keeps its name");
    assert_eq!(s(&d, "guest_device"), "/dev/vdb");
    wait_in_guest(&env, "/sys/block/vdb again", "test -e /sys/block/vdb");
    let out = env.ssh("dev", "dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c 13");
    assert_eq!(out.stdout(), "qbuf-hot-data", "{}", out.text());

    // Recorded: attached again by the next launch, on a root port.
    env.run(&["powerdown"]).code_is(0);
    let (list, _) = env.json(&["disk", "list"]);
    assert_eq!(list["running"], false);
    assert_eq!(list["disks"][0]["id"], "disk1");
    env.launch(&[]);
    wait_in_guest(&env, "the recorded disk after relaunch", "test -e /sys/block/vdb");
    let out = env.ssh("dev", "dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c 13");
    assert_eq!(out.stdout(), "qbuf-hot-data", "{}", out.text());
    let (st, _) = env.json(&["status"]);
    assert_eq!(st["hotplug_ports_used"], 1, "{st}");
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn disk_remove_times_out_cleanly_when_the_guest_cannot_release_and_a_retry_finishes() {
    let env = Env::new("stuckremove");
    env.launch(&["--no-share"]);
    env.run(&["disk", "add", "--size", "32M", "--id", "scratch"]).ok();

    // Raw QMP: a paused guest cannot react to the unplug request.
    let out = env.run(&["qmp", "stop"]);
    out.ok();
    assert_eq!(serde_json::from_str::<Value>(&out.stdout()).unwrap(), serde_json::json!({}));
    let out = env.run(&["qmp", "query-status"]);
    out.ok();
    let q: Value = serde_json::from_str(&out.stdout()).unwrap();
    assert_eq!(q["status"], "paused", "raw reply: {q}");

    let t = Instant::now();
    let out = env.run(&["disk", "remove", "scratch", "--timeout", "2"]);
    out.code_is(1);
    assert!(t.elapsed() < Duration::from_secs(8), "the deadline holds: {:?}", t.elapsed());
    let err = out.stderr();
    assert!(err.contains("did not release disk 'scratch' within 2s") && err.contains("Nothing was removed"), "{err}");
    assert!(err.contains("disk remove scratch"), "says how to retry: {err}");
    // Nothing half-removed: still attached, still recorded, block node kept.
    let (list, _) = env.json(&["disk", "list"]);
    let d = &list["disks"][0];
    assert_eq!(
        (d["id"].as_str(), d["attached"].as_bool(), d["recorded"].as_bool()),
        (Some("scratch"), Some(true), Some(true))
    );
    let nodes = env.run(&["qmp", "query-named-block-nodes", r#"{"flat": true}"#]);
    assert!(nodes.stdout().contains("\"scratch\""), "{}", nodes.text());

    env.run(&["qmp", "cont"]).ok();
    let (r, out) = env.json(&["disk", "remove", "scratch"]);
    out.ok();
    assert_eq!(r["detached"], true);
    let (list, _) = env.json(&["disk", "list"]);
    assert!(list["disks"].as_array().unwrap().is_empty(), "{list}");
    let nodes = env.run(&["qmp", "query-named-block-nodes", r#"{"flat": true}"#]);
    assert!(!nodes.stdout().contains("scratch"), "{}", nodes.text());

    // QMP errors and bad arguments.
    let out = env.run(&["qmp", "no-such-command"]);
    out.code_is(1);
    assert!(out.stderr().contains("CommandNotFound"), "{}", out.text());
    let (e, out) = env.json(&["qmp", "device_del", r#"{"id": "nothing"}"#]);
    out.code_is(1);
    assert_eq!(e["detail"]["class"], "DeviceNotFound");
    let out = env.run(&["qmp", "query-status", "{not json"]);
    out.code_is(2);
    assert!(out.stderr().contains("not valid JSON"), "{}", out.text());
    // Only disks are unplugged by `disk remove`.
    let out = env.run(&["disk", "remove", "qga0-port"]);
    out.code_is(1);
    assert!(out.stderr().contains("has no disk 'qga0-port'"), "{}", out.text());
    env.run(&["powerdown"]).code_is(0);
    let out = env.run(&["qmp", "query-status"]);
    out.code_is(1);
    assert!(out.stderr().contains("not running"), "{}", out.text());
}

#[test]
fn raw_image_needs_format_raw_and_a_given_file_survives_destroy() {
    let env = Env::new("rawdestroy");
    env.launch(&["--no-share"]);
    let raw = env.dir.join("user-disk.img");
    std::fs::write(&raw, vec![0u8; 8 << 20]).unwrap();
    let out = env.run(&["disk", "add", path_str(&raw)]);
    out.code_is(1);
    assert!(out.stderr().contains("not a qcow2 image") && out.stderr().contains("--format raw"), "{}", out.text());
    let (d, out) = env.json(&["disk", "add", path_str(&raw), "--format", "raw", "--id", "mine"]);
    out.ok();
    assert_eq!((s(&d, "format").as_str(), d["created"].as_bool()), ("raw", Some(false)));
    let (d, _) = env.json(&["disk", "add", "--size", "16M", "--transient"]);
    assert_eq!(d["recorded"], false);
    let made = s(&d, "path");
    let devices = read_json(&env.instance_dir("dev").join("devices.json"));
    assert_eq!(devices["disks"].as_array().unwrap().len(), 1, "only the non-transient disk is recorded: {devices}");

    let (r, out) = env.json(&["destroy", "--yes"]);
    out.code_is(0);
    assert!(raw.is_file(), "a file given to 'disk add' is never deleted: {r}");
    assert_eq!(std::fs::read(&raw).unwrap().len(), 8 << 20);
    assert!(!std::path::Path::new(&made).exists(), "the image qbuf-qemu made is removed");
    assert!(!env.instance_dir("dev").exists());
}

#[test]
fn forward_reaches_a_guest_server_and_remove_closes_it() {
    let env = Env::new("forward");
    env.launch(&["--no-share"]);
    env.ssh("dev", "mkdir -p /tmp/www && echo hello-from-guest > /tmp/www/index.html && httpd -p 8080 -h /tmp/www")
        .ok();
    let port = qbuf_qemu::host::pick_free_port().unwrap();
    let spec = format!("{port}:8080");
    let (f, out) = env.json(&["forward", "add", &spec]);
    out.ok();
    assert_eq!((f["forward"]["host_addr"].as_str(), f["live"].as_bool()), (Some("127.0.0.1"), Some(true)), "{f}");
    let body = http_get(port).expect("the forward answers");
    assert!(body.contains("hello-from-guest"), "{body}");

    let (list, _) = env.json(&["forward", "list"]);
    let fw = list["forwards"].as_array().unwrap();
    assert!(fw.iter().any(|e| e["ssh"] == true && e["guest_port"] == 22), "{list}");
    assert!(fw.iter().any(|e| e["host_port"] == port && e["guest_port"] == 8080 && e["recorded"] == true), "{list}");

    // HMP reports failures as text: a busy host port is an error for the user.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let out = env.run(&["forward", "add", &format!("{busy_port}:80"), "--transient"]);
    out.code_is(1);
    assert!(out.stderr().contains("Could not set up host forwarding rule"), "{}", out.text());
    let out = env.run(&["forward", "add", "1:2:3:4"]);
    out.code_is(2);

    env.run(&["forward", "remove", &port.to_string()]).ok();
    assert!(http_get(port).is_err(), "the host port is closed after remove");
    let (list, _) = env.json(&["forward", "list"]);
    assert_eq!(list["forwards"].as_array().unwrap().len(), 1, "only SSH is left: {list}");
    let out = env.run(&["forward", "remove", &port.to_string()]);
    out.code_is(1);
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn share_added_while_running_is_recorded_and_mountable_after_the_next_boot() {
    let env = Env::new("shareadd");
    let dir = env.dir.join("extra");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("note.txt"), "from the host\n").unwrap();
    // 9p on purpose (tests/shares.rs covers virtio-fs).
    env.launch(&["--no-share", "--ssh-user", "root", "--share-type", "9p"]);

    let (sh, out) = env.json(&["share", "add", path_str(&dir), "extra", "--ro"]);
    out.ok();
    assert_eq!((sh["added"].as_bool(), sh["running"].as_bool()), (Some(true), Some(true)));
    let out = env.run(&["share", "remove", "nope"]);
    out.code_is(1);
    // Launch's checks, at once: a read-write share of / is warned about, a
    // path QEMU could not be given is refused before it is recorded.
    let out = env.run(&["share", "add", "/", "wide"]);
    out.ok();
    assert!(
        out.stderr().contains("warning: the share / is read-write") && out.stderr().contains("--ro"),
        "{}",
        out.text()
    );
    env.run(&["share", "remove", "wide"]).ok();
    let odd = env.dir.join("new\nline");
    std::fs::create_dir_all(&odd).unwrap();
    let out = env.run(&["share", "add", path_str(&odd), "odd"]);
    out.code_is(1);
    assert!(out.stderr().contains("contains a newline"), "{}", out.text());
    // QEMU cannot hot-add a 9p share: said so, and the guest does not have it yet.
    let out = env.run(&["share", "list"]);
    assert!(out.stdout().contains("next boot"), "{}", out.text());
    let tags = "cat /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag 2>/dev/null | tr -d '\\000'";
    let out = env.ssh("dev", tags);
    out.ok();
    assert!(!out.stdout().contains("extra"), "the running guest has no 9p share 'extra' yet: {}", out.text());

    env.run(&["powerdown"]).code_is(0);
    env.launch(&[]);
    // Control: the same look shows the share once the guest booted with it.
    let out = env.ssh("dev", tags);
    out.ok();
    assert!(out.stdout().contains("extra"), "the next boot has the 9p share 'extra': {}", out.text());
    let out = env.ssh(
        "dev",
        "mkdir -p /mnt/extra && mount -t 9p -o trans=virtio,version=9p2000.L extra /mnt/extra && cat /mnt/extra/note.txt",
    );
    assert_eq!(out.stdout(), "from the host\n", "{}", out.text());
    let out = env.ssh("dev", "touch /mnt/extra/new");
    assert_eq!(out.code(), 1, "--ro is read-only for the guest: touch itself fails:\n{}", out.text());
    let (list, _) = env.json(&["share", "list"]);
    assert_eq!(list["shares"][0]["live"], true, "{list}");

    let (r, out) = env.json(&["share", "remove", "extra"]);
    out.ok();
    assert_eq!(r["running"], true);
    // Unrecorded, but the running VM keeps it until it powers off: said so.
    let (list, _) = env.json(&["share", "list"]);
    assert_eq!(list["shares"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!((list["shares"][0]["removed"].as_bool(), list["shares"][0]["live"].as_bool()), (Some(true), Some(true)));
    assert!(env.run(&["share", "list"]).stdout().contains("removed, still attached until the next boot"));
    env.run(&["powerdown"]).code_is(0);
    let (list, _) = env.json(&["share", "list"]);
    assert!(list["shares"].as_array().unwrap().is_empty(), "{list}");
}

#[test]
fn events_survive_the_vm_and_relaunches_and_status_names_a_sigkill() {
    let env = Env::new("eventlog");
    env.launch(&["--no-share"]);
    let mut follow = env.cmd(&["events", "--follow"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let follow_out = follow.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(follow_out);
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) > 0 {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });

    env.run(&["powerdown"]).code_is(0);
    assert_eq!(count_events(&env, "POWERDOWN"), 1);
    assert_eq!(count_events(&env, "SHUTDOWN"), 1);
    let (ev, out) = env.json(&["events"]);
    out.ok();
    let list = ev["events"].as_array().unwrap();
    let shutdown = list.iter().find(|e| e["event"] == "SHUTDOWN").unwrap();
    assert_eq!(shutdown["data"]["reason"], "guest-shutdown");
    assert!(s(shutdown, "time").ends_with(" UTC"), "{shutdown}");
    let human = env.run(&["events"]).stdout();
    assert!(human.lines().any(|l| l.contains("  POWERDOWN") && l.starts_with("20")), "{human}");
    wait_until("events --follow to print the shutdown", Duration::from_secs(5), || {
        seen.lock().unwrap().contains("SHUTDOWN")
    });
    // --follow ends by itself once the VM is stopped.
    wait_until("events --follow to end with the VM", Duration::from_secs(10), || {
        follow.try_wait().unwrap().is_some_and(|st| st.success())
    });
    let followed = seen.lock().unwrap().clone();
    assert!(followed.lines().count() >= 2, "events --follow printed the powerdown's events: {followed}");

    // The log survives the VM: a relaunch appends to it.
    let first_boot = env.events("dev");
    let v = env.launch(&[]);
    signal(pid_of(&v), nix::sys::signal::Signal::SIGKILL);
    wait_until("the supervisor to record the kill", Duration::from_secs(10), || {
        env.instance_dir("dev").join("stopped.json").exists()
    });
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "crashed");
    assert!(s(&st, "stop_reason").contains("killed by signal 9 (SIGKILL)"), "{st}");
    assert_eq!(count_events(&env, "POWERDOWN"), 1, "the first boot's events are still there");
    let all = env.events("dev");
    assert!(
        all.len() > first_boot.len(),
        "the relaunch added events: {} before, {} after",
        first_boot.len(),
        all.len()
    );
    assert_eq!(
        all[..first_boot.len()],
        first_boot[..],
        "the relaunch appended, keeping the first boot's events as they were"
    );
}

#[test]
fn console_shows_the_guest_prompt_detaches_with_ctrl_bracket_and_restores_the_terminal() {
    use nix::sys::termios::{tcgetattr, LocalFlags};
    let env = Env::new("console");
    env.launch(&["--no-share"]);
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = || Stdio::from(pty.slave.try_clone().unwrap());
    let mut child = env.cmd(&["console"]).stdin(slave()).stdout(slave()).stderr(slave()).spawn().unwrap();
    let mut master = std::fs::File::from(pty.master);
    master.write_all(b"\r").unwrap();
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("qbuf-test# ") && Instant::now() < end {
        let mut fds = [nix::poll::PollFd::new(master.as_fd(), nix::poll::PollFlags::POLLIN)];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16)).unwrap() > 0 {
            let mut buf = [0u8; 4096];
            let n = master.read(&mut buf).unwrap();
            seen.extend_from_slice(&buf[..n]);
        }
    }
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(text.contains("Ctrl-]"), "says how to detach: {text:?}");
    assert!(text.contains("qbuf-test# "), "no guest prompt on the console: {text:?}");
    assert!(!tcgetattr(pty.slave.as_fd()).unwrap().local_flags.contains(LocalFlags::ICANON), "raw mode while attached");
    master.write_all(b"echo console-was-here\r").unwrap();
    // The guest echoes the line, then prints its output: wait for both.
    let end = Instant::now() + Duration::from_secs(20);
    while String::from_utf8_lossy(&seen).matches("console-was-here").count() < 2 && Instant::now() < end {
        let mut fds = [nix::poll::PollFd::new(master.as_fd(), nix::poll::PollFlags::POLLIN)];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16)).unwrap() > 0 {
            let mut buf = [0u8; 4096];
            let n = master.read(&mut buf).unwrap();
            seen.extend_from_slice(&buf[..n]);
        }
    }
    master.write_all(&[0x1d]).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "Ctrl-] did not detach");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    let flags = tcgetattr(pty.slave.as_fd()).unwrap().local_flags;
    assert!(flags.contains(LocalFlags::ICANON | LocalFlags::ECHO), "terminal restored after detaching");
    // QEMU's logfile kept the session, and `logs` prints it.
    let log = env.run(&["logs"]);
    log.ok();
    assert!(log.stdout().contains("console-was-here"), "{}", log.text());
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "state"), "running", "detaching leaves the VM running");
    env.run(&["powerdown"]).code_is(0);
}

#[test]
fn doctor_reports_the_hosts_kvm_and_a_stand_in_that_cannot_run_guests() {
    let stand_in = Env::new("doctorkvm").with_env("QBUF_QEMU_KVM_DEVICE", "/dev/null");
    let (r, out) = stand_in.json(&["doctor"]);
    out.code_is(0);
    let kvm = r["checks"].as_array().unwrap().iter().find(|c| c["name"] == "kvm").cloned().unwrap();
    assert_eq!(kvm["level"], "warn", "{kvm}");
    assert!(s(&kvm, "detail").contains("/dev/null is present but unusable"), "{kvm}");
    assert!(s(&kvm, "fix").contains("--accel tcg"), "{kvm}");
    drop(stand_in);

    let env = Env::new("doctor");
    let (r, out) = env.json(&["doctor"]);
    out.code_is(0);
    let check = |name: &str| {
        r["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap_or_else(|| panic!("{r}"))
    };
    let kvm = check("kvm");
    if !std::path::Path::new("/dev/kvm").exists() {
        assert!(s(&kvm, "detail").contains("does not exist"), "{kvm}");
    } else if kvm["level"] == "warn" {
        // Present but unusable (this CI host): the fix names --accel tcg.
        assert!(s(&kvm, "fix").contains("--accel tcg") || s(&kvm, "fix").contains("group kvm"), "{kvm}");
    } else {
        assert!(s(&kvm, "detail").contains("KVM runs guests"), "{kvm}");
    }
    assert_eq!(check("qemu")["level"], "ok");
    // The default SSH port: free or not on this host, doctor says which.
    let port_free = std::net::TcpListener::bind(("127.0.0.1", 10022)).is_ok();
    assert_eq!(check("ssh-port")["level"], if port_free { "ok" } else { "warn" }, "{}", check("ssh-port"));
    assert_eq!(check("state-dir")["level"], "ok");
    let human = env.run(&["doctor"]);
    human.code_is(0);
    assert!(human.stdout().contains("fix: "), "{}", human.text());
}

#[test]
fn guest_agent_is_reported_and_powers_off_a_guest_that_ignores_acpi() {
    let env = Env::new("guestagent");
    env.launch(&["--no-share", "--ssh-user", "root", "--append", APPEND_DEAF]);
    let t = Instant::now();
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "guest_agent"), "not-running");
    assert!(t.elapsed() < Duration::from_secs(5), "no agent is quick to tell: {:?}", t.elapsed());

    env.start_fake_agent();

    let (p, out) = env.json(&["powerdown", "--timeout", "6"]);
    out.code_is(0);
    assert_eq!(s(&p, "method"), "guest-agent", "{p}");
    assert_eq!(s(&p, "shutdown_reason"), "guest-shutdown");
    assert!(p["seconds"].as_f64().unwrap() < 7.0, "--timeout bounds both graceful steps: {p}");
    // This guest ignores the power button: with an agent that answers, the
    // button gets half of --timeout (3 s of 6), the agent the rest.
    let steps: Vec<&str> = p["steps"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    let button_gave_up = steps
        .iter()
        .find_map(|x| x.strip_prefix("powerdown: QEMU still running after ")?.strip_suffix('s')?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no step says the power button ran out: {p}"));
    assert!((3..=4).contains(&button_gave_up), "the power button had half of --timeout 6, not {button_gave_up}s: {p}");
    assert!(steps.iter().any(|x| x.starts_with("guest-agent: ")), "then the agent's step ran: {p}");
    let (st, _) = env.json(&["status"]);
    assert!(s(&st, "stop_reason").contains("guest-agent"), "{st}");
}

#[test]
fn qemu_7_2_hotplugs_disks_and_forwards_the_same_way() {
    let (bin, fw) = qemu72();
    let env = Env::new("qemu72dev")
        .with_env("QBUF_QEMU_SYSTEM", path_str(&bin))
        .with_env("QBUF_QEMU_FIRMWARE", path_str(&fw));
    env.launch(&["--no-share", "--ssh-user", "root"]);
    let (d, out) = env.json(&["disk", "add", "--size", "32M"]);
    out.ok();
    assert_eq!(s(&d, "guest_device"), "/dev/vda", "no boot disk here");
    wait_in_guest(&env, "/sys/block/vda", "test -e /sys/block/vda");
    let (r, out) = env.json(&["disk", "remove", "disk1"]);
    out.ok();
    assert!(r["seconds"].is_number(), "DEVICE_DELETED on 7.2: {r}");
    env.ssh("dev", "httpd -p 8080 -h /etc").ok();
    let port = qbuf_qemu::host::pick_free_port().unwrap();
    env.run(&["forward", "add", &format!("{port}:8080")]).ok();
    assert!(http_get(port).expect("forward on 7.2").starts_with("HTTP/1."));
    env.run(&["forward", "remove", &port.to_string()]).ok();
    assert!(http_get(port).is_err());
    let (st, _) = env.json(&["status"]);
    assert_eq!(s(&st, "guest_agent"), "not-running");
    env.run(&["powerdown"]).code_is(0);
}
