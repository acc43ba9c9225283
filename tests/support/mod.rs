//! Shared test machinery: the test guest, a private state dir per test, and
//! running the real `qbuf-qemu` binary. End-to-end tests need real QEMU and
//! the test guest; when either is missing they fail loudly, never skip.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

macro_rules! base_append {
    () => {
        "console=ttyS0 quiet no_timer_check"
    };
}
/// The test guest's kernel command line (tests/guest/README.md): its init
/// on the console, and no IO-APIC timer check, which a loaded TCG host can
/// fail.
pub const APPEND: &str = base_append!();
/// [`APPEND`] for a guest that ignores the power button (no acpid).
pub const APPEND_DEAF: &str = concat!(base_append!(), " qbuf.ignore_power=1");

/// TCG on two cores: one VM at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qbuf-qemu"))
}

/// The busybox test guest built by `tests/guest/build.sh`.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

pub fn guest() -> Guest {
    let dir =
        std::env::var_os("QBUF_TEST_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("tests/guest/out"));
    // The uncompressed kernel saves the guest ~3.5 s of unpacking under TCG.
    let g = Guest { kernel: dir.join("vmlinux"), initrd: dir.join("initrd.img"), disk: dir.join("disk.qcow2") };
    for p in [&g.kernel, &g.initrd, &g.disk] {
        assert!(
            p.is_file(),
            "test guest file {} is missing: run 'tests/guest/build.sh' (or .ci/run) first",
            p.display()
        );
    }
    g
}

/// QEMU 7.2 unpacked beside the system's QEMU by tests/support/install-host-qemu.sh.
pub fn qemu72() -> (PathBuf, PathBuf) {
    let dir = std::env::var_os("QBUF_TEST_QEMU72")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/qbuf-qemu-test/qemu-7.2".into());
    let bin = dir.join("usr/bin/qemu-system-x86_64");
    assert!(bin.is_file(), "QEMU 7.2 is missing at {}: run 'tests/support/install-host-qemu.sh'", bin.display());
    (bin, dir.join("usr/share/qemu"))
}

pub fn require_qemu() {
    let ok = Command::new("qemu-system-x86_64").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "qemu-system-x86_64 is not installed: run 'tests/support/install-host-qemu.sh' (or .ci/run)");
}

/// One test's world: its own state dir and a lock that keeps VMs serial.
pub struct Env {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub envs: Vec<(String, String)>,
    _serial: MutexGuard<'static, ()>,
}

impl Env {
    pub fn new(test: &str) -> Env {
        require_qemu();
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // Short paths: unix socket names are limited to 107 bytes.
        let dir = PathBuf::from(format!("/tmp/qbq-{}-{}", std::process::id(), &test[..test.len().min(12)]));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("s");
        Env { dir, state, envs: vec![], _serial: serial }
    }

    pub fn with_env(mut self, k: &str, v: &str) -> Env {
        self.envs.push((k.into(), v.into()));
        self
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--state-dir").arg(&self.state).args(args).current_dir(&self.dir).stdin(Stdio::null());
        c.env_remove("QBUF_QEMU_SYSTEM").env_remove("QBUF_QEMU_FIRMWARE").env_remove("QBUF_QEMU_STATE_DIR");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    /// Runs qbuf-qemu once; once more when a boot this command made failed
    /// for a race of the test setup that no test is about, reported as it
    /// should be (the VM stopped, the cause named): QEMU 10.0's
    /// multi-threaded TCG aborting on its own assertion
    /// ([`qemu_tcg_aborted`]), or the busybox guest's kernel stalling
    /// under TCG on a loaded 2-core host before its sshd answered
    /// ([`guest_kernel_stalled`]). Every retry counts ([`retrying`]).
    pub fn run(&self, args: &[&str]) -> Out {
        let once = || Out(self.cmd(args).output().expect("run qbuf-qemu"), args.join(" "));
        let out = once();
        let why = if qemu_tcg_aborted(&out) {
            "QEMU aborted under TCG (a QEMU race)"
        } else if guest_kernel_stalled(&out) {
            "the test guest's kernel stalled under TCG (RCU stall) before its sshd answered"
        } else {
            return out;
        };
        retrying(why, &out);
        once()
    }

    /// `--json` output parsed.
    pub fn json(&self, args: &[&str]) -> (Value, Out) {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        let v = serde_json::from_slice(&out.0.stdout)
            .unwrap_or_else(|e| panic!("{}: stdout is not one JSON document ({e}):\n{}", out.1, out.text()));
        (v, out)
    }

    /// Direct kernel boot of the test guest (see [`vm_args`]).
    pub fn launch_args(&self, extra: &[&str]) -> Vec<String> {
        let g = guest();
        let mut boot = vec!["--kernel", path_str(&g.kernel), "--initrd", path_str(&g.initrd)];
        if !extra.contains(&"--append") {
            boot.extend(["--append", APPEND]);
        }
        vm_args(&boot, extra)
    }

    pub fn launch(&self, extra: &[&str]) -> Value {
        let args = self.launch_args(extra);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (v, out) = self.json(&a);
        out.ok();
        v
    }

    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.state.join("instances").join(name)
    }

    /// Every QMP event recorded for instance `name` (its events.jsonl).
    pub fn events(&self, name: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(self.instance_dir(name).join("events.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    pub fn ssh(&self, name: &str, cmd: &str) -> Out {
        self.run(&["--name", name, "ssh", "--", cmd])
    }

    /// QEMU pids this test's state dir started and that still run.
    pub fn qemu_pids(&self) -> Vec<i32> {
        let needle = self.state.to_str().unwrap().to_string();
        let mut v = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd);
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = state.rsplit(')').next().map(|r| r.trim_start().starts_with('Z')).unwrap_or(true);
            if cmd.contains("qemu-system") && cmd.contains(&needle) && !zombie {
                v.push(pid);
            }
        }
        v
    }
}

impl Env {
    /// Starts [`FAKE_AGENT`] in instance `dev`'s guest, as root like
    /// qemu-ga (the agent's port is root's; `sudo -n` serves root and dev
    /// alike), and waits until `status` says the agent answers.
    pub fn start_fake_agent(&self) {
        use std::io::Write;
        let mut put = self.cmd(&["ssh", "--", "cat > /tmp/agent.sh"]).stdin(Stdio::piped()).spawn().unwrap();
        put.stdin.take().unwrap().write_all(FAKE_AGENT.as_bytes()).unwrap();
        assert!(put.wait().unwrap().success());
        self.ssh("dev", "sudo -n setsid sh /tmp/agent.sh </dev/null >/dev/null 2>&1 &").ok();
        wait_until("the agent to answer", Duration::from_secs(10), || {
            self.json(&["status"]).0["guest_agent"] == "answers"
        });
    }
}

/// A stand-in for qemu-ga in the busybox guest: answers the resync and
/// guest-ping on the agent's virtio-serial port and powers off (or reboots)
/// on guest-shutdown. The port stays open (reads end while no host is
/// connected), as qemu-ga keeps it.
const FAKE_AGENT: &str = r#"p=$(grep -l org.qemu.guest_agent.0 /sys/class/virtio-ports/*/name | head -n1)
exec 3<>/dev/$(basename $(dirname $p))
while :; do
  while IFS= read -r line <&3; do
    case "$line" in
      *guest-sync-delimited*) id=$(echo "$line" | sed 's/.*"id": *\([0-9-]*\).*/\1/'); printf '\377{"return": %s}\n' "$id" >&3 ;;
      *guest-ping*) printf '{"return": {}}\n' >&3 ;;
      *'"reboot"'*) reboot -f ;;
      *guest-shutdown*) poweroff -f ;;
    esac
  done
  sleep 0.2
done
"#;

impl Drop for Env {
    fn drop(&mut self) {
        for pid in self.qemu_pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        // Supervisors exit once their QEMU is gone.
        std::thread::sleep(Duration::from_millis(300));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `launch` + `boot` + test defaults (TCG, small memory, a free port, a
/// generous timeout) + `extra`; a flag in `extra` replaces its default.
pub fn vm_args(boot: &[&str], extra: &[&str]) -> Vec<String> {
    let defaults = [("--accel", "tcg"), ("--memory", "512M"), ("--ssh-port", "auto"), ("--timeout", "120")];
    let mut v: Vec<String> = std::iter::once("launch").chain(boot.iter().copied()).map(String::from).collect();
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.extend([flag.to_string(), value.to_string()]);
        }
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// `Vec<String>` → `Vec<&str>` for [`Env::run`].
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub struct Out(pub Output, pub String);

impl Out {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).to_string()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).to_string()
    }
    pub fn text(&self) -> String {
        format!("exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code(), self.stdout(), self.stderr())
    }
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code(), 0, "qbuf-qemu {} failed:\n{}", self.1, self.text());
        self
    }
    pub fn code_is(&self, c: i32) -> &Self {
        assert_eq!(self.code(), c, "qbuf-qemu {}: expected exit {c}:\n{}", self.1, self.text());
        self
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Waits up to `timeout` for `child` to exit; kills it (and fails) if it
/// does not, so a hung child never outlives the test.
pub fn wait_or_kill(child: &mut Child, what: &str, timeout: Duration) -> ExitStatus {
    let end = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {timeout:?} waiting for {what}: killed it");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `sig` to `pid`, which must exist.
pub fn signal(pid: i32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("{sig} to {pid}: {e}"));
}

/// The `pid` member of a JSON value (QEMU's, in launch and status output).
pub fn pid_of(v: &Value) -> i32 {
    v["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {v}")) as i32
}

/// A JSON file, parsed.
pub fn read_json(p: &Path) -> Value {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// The supervisor's pid from instance `name`'s run record.
pub fn supervisor_pid(env: &Env, name: &str) -> i32 {
    let run = read_json(&env.instance_dir(name).join("run.json"));
    run["supervisor"]["pid"].as_i64().unwrap_or_else(|| panic!("no supervisor pid in {run}")) as i32
}

pub fn pid_running(pid: i32) -> bool {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !s.is_empty() && !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z')
}

/// A string member of a JSON value, or a panic that shows the value.
pub fn s(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or_else(|| panic!("no string {k:?} in {v}")).to_string()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A content hash of a file (FNV-1a), to prove it was not written.
pub fn file_hash(p: &Path) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for b in std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Whether a failed command's output shows QEMU's TCG aborting on its own
/// assertion (`iotlb_to_section`, seen with QEMU 10.0.2 early in boots), a
/// QEMU bug. A command that succeeded is never retried.
pub fn qemu_tcg_aborted(out: &Out) -> bool {
    let text = out.text();
    out.code() != 0 && text.contains("killed by signal 6 (SIGABRT)") && text.contains("iotlb_to_section: Assertion")
}

/// Whether a failed boot (`launch`, or `run` up to its deadline) shows
/// the test guest's kernel stalling (RCU) before its sshd ever answered:
/// a banner seen, or a login that failed, is qbuf-qemu's business and
/// gets no second try.
pub fn guest_kernel_stalled(out: &Out) -> bool {
    let text = out.text();
    out.code() != 0
        && (text.contains("did not accept an SSH login") || text.contains("stopped waiting for SSH after"))
        && text.contains("last: no SSH banner yet)")
        && text.contains("rcu_preempt detected stalls")
}

/// Retries of a QEMU or guest-kernel race in this test binary's run: each
/// is printed past the test harness's capture (so CI logs show it even
/// when the test passes), and more than [`MAX_RETRIES`] fail the run:
/// that many is no race.
static RETRIES: AtomicUsize = AtomicUsize::new(0);
pub const MAX_RETRIES: usize = 2;

/// Counts and prints one retry (see [`RETRIES`]); panics past the limit.
pub fn retrying(why: &str, out: &Out) {
    count_retry(&RETRIES, why, out)
}

/// [`retrying`] with its counter given (tests of the limit use their own).
pub fn count_retry(count: &AtomicUsize, why: &str, out: &Out) {
    use std::io::Write;
    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
    let _ = writeln!(
        std::io::stderr(),
        "RETRY {n} of at most {MAX_RETRIES} in this run: {why}; qbuf-qemu {} once more. It said:\n{}",
        out.1,
        out.text()
    );
    assert!(n <= MAX_RETRIES, "{n} retries in one run (at most {MAX_RETRIES}): no longer a race, a bug");
}

/// `name` on PATH, as a shell finds it.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `run` with the test guest's kernel boot and the test defaults.
pub fn run_args(extra: &[&str], command: &[&str]) -> Vec<String> {
    let g = guest();
    let mut v: Vec<String> = ["run", "--kernel", path_str(&g.kernel), "--initrd", path_str(&g.initrd)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !extra.contains(&"--append") {
        v.extend(["--append".into(), APPEND.into()]);
    }
    // --timeout bounds the whole run (an hour by default): a test guest
    // whose kernel stalls under TCG at boot (see [`guest_kernel_stalled`])
    // then fails the test in minutes instead of holding CI for the hour.
    for (flag, value) in [("--accel", "tcg"), ("--memory", "512M"), ("--timeout", "300")] {
        if !extra.contains(&flag) {
            v.extend([flag.to_string(), value.to_string()]);
        }
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push("--".into());
    v.extend(command.iter().map(|s| s.to_string()));
    v
}

/// Nothing of a throwaway run is left: no instance, no QEMU.
pub fn nothing_left(env: &Env) {
    let left: Vec<_> = std::fs::read_dir(env.state.join("instances"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let left: Vec<_> = left.into_iter().filter(|n| n.to_string_lossy().starts_with("run-")).collect();
    assert!(left.is_empty(), "run left instances behind: {left:?}");
    let qemus: Vec<i32> = env
        .qemu_pids()
        .into_iter()
        .filter(|p| {
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default())
                .contains("instances/run-")
        })
        .collect();
    assert!(qemus.is_empty(), "run left QEMU running: {qemus:?}");
}

/// Starts a run of `command` and returns it once the guest printed `started`.
pub fn started_run(env: &Env, extra: &[&str], command: &str) -> std::process::Child {
    let args = run_args(extra, &["sh", "-c", command]);
    let mut child = env.cmd(&strs(&args)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    match lines.next() {
        Some(Ok(l)) if l == "started" => {}
        other => {
            // run ended without COMMAND's first line: say what run said.
            let _ = child.kill();
            let status = child.wait();
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("COMMAND did not start: {other:?}; run: {status:?}, its stderr:\n{err}");
        }
    }
    // Keep draining stdout so the guest never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}
