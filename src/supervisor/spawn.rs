//! The launching side of the supervisor's start protocol: the supervisor
//! is started as `qbuf-qemu __supervise`, detached in its own session and
//! holding the inherited instance lock, and the launch waits until it
//! wrote `run.json` (QEMU is up) or `launch-failure.json` (QEMU did not
//! come up, with its exit, command line and stderr), or it died.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::instance::records::{read_json, LaunchFailure, RunRecord};
use crate::instance::{Instance, Lock};
use crate::timeouts::qemu_up;

/// How often the records are looked for: QEMU comes up in tens of
/// milliseconds when it does quickly.
const UP_POLL: Duration = Duration::from_millis(10);

/// Starts the supervisor of `inst` (state dir `state_root`), which starts
/// QEMU, and waits until QEMU is up or failed. The lock passes to the
/// supervisor (and QEMU). Records of an earlier boot go first, so they
/// cannot be mistaken for this boot's. The inner `Err` is QEMU's own
/// failure to start; the outer one a supervisor that died or hung.
/// `daemons`: the boot plan's virtiofsds, which lengthen the wait.
pub fn start(
    state_root: &Path,
    inst: &Instance,
    lock: Lock,
    daemons: usize,
) -> Result<Result<RunRecord, LaunchFailure>> {
    for old in [inst.launch_failure(), inst.stop_record(), inst.run_record()] {
        let _ = std::fs::remove_file(old);
    }
    let mut sup = spawn(state_root, inst, &lock)?;
    drop(lock); // the supervisor and QEMU hold it now
    let up = qemu_up(u32::try_from(daemons).unwrap_or(u32::MAX));
    let deadline = Instant::now() + up;
    loop {
        if let Some(r) = read_json::<RunRecord>(&inst.run_record())? {
            // Reap the supervisor later without blocking: it is detached (setsid).
            std::thread::spawn(move || sup.wait());
            return Ok(Ok(r));
        }
        if let Some(f) = read_json::<LaunchFailure>(&inst.launch_failure())? {
            let _ = sup.wait();
            return Ok(Err(f));
        }
        if let Some(st) = sup.try_wait()? {
            if let Some(f) = read_json::<LaunchFailure>(&inst.launch_failure())? {
                return Ok(Err(f));
            }
            bail!(
                "the instance supervisor exited ({st}) before QEMU came up; its log:\n{}",
                crate::logs::tail(&inst.supervisor_log(), 0, 3000, "(empty)")
            );
        }
        if Instant::now() > deadline {
            bail!("QEMU did not come up within {}s; see {}", up.as_secs(), inst.supervisor_log().display());
        }
        std::thread::sleep(UP_POLL);
    }
}

fn spawn(state_root: &Path, inst: &Instance, lock: &Lock) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    lock.inheritable()?;
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(inst.supervisor_log())
            .with_context(|| format!("cannot create {}", inst.supervisor_log().display()))?
    };
    let exe = std::env::current_exe().context("cannot find the qbuf-qemu binary to start the supervisor")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--state-dir")
        .arg(state_root)
        .arg("--name")
        .arg(&inst.name)
        .arg("__supervise")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe. Own session: the user's terminal
    // closing must not signal the VM.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    cmd.spawn().context("cannot start the instance supervisor")
}
