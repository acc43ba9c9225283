//! Bringing QEMU up: spawn it as our child (its SIGTERM and SIGHUP blocked,
//! so a host-wide signal reaches only the supervisor, which powers the guest
//! down), reap it in a task, and open the supervisor's QMP connection. A
//! failure comes back as a [`LaunchFailure`] with its parts.

use std::fs::File;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::watch;

use super::pump::{self, Pipes, Pumps};
use crate::instance::proc::ExitInfo;
use crate::instance::records::{BootPlan, LaunchFailure};
use crate::instance::Instance;
use crate::qmp::{Qmp, QmpError};
use crate::timeouts::{KILLED_EXIT, QEMU_VERSION_QUERY, QMP_GREETING, QMP_SOCKET};

/// QEMU running, with the supervisor's QMP connection.
pub struct Started {
    pub pid: i32,
    pub qmp: Qmp,
    /// `Some` once the reaper task has collected QEMU's exit status.
    pub exited: watch::Receiver<Option<ExitInfo>>,
    pub version: String,
    /// QEMU's output on its way into the logs; finished after QEMU exited.
    pub pumps: Pumps,
    /// The guest's console output, as it is logged.
    pub console: pump::Console,
}

pub async fn start(inst: &Instance, plan: &BootPlan) -> Result<Started, LaunchFailure> {
    let fail = |message: String, exit: Option<ExitInfo>| LaunchFailure {
        message,
        exit,
        command_line: plan.command_line(),
        stderr_tail: crate::logs::tail(&inst.qemu_stderr(), 0, 4000, ""),
        serial_tail: String::new(),
    };
    let (pipes, console) =
        pump::prepare(inst).map_err(|e| fail(format!("cannot make the pipes for QEMU's output: {e}"), None))?;
    let (pid, exited, pumps) = spawn(inst, plan, pipes).map_err(|m| fail(m, None))?;
    let qmp = match connect(inst, &exited).await {
        Ok(q) => q,
        Err(Early::Exited(e)) => {
            pumps.finish().await;
            return Err(fail(format!("QEMU exited during start-up ({e})"), Some(e)));
        }
        Err(Early::Stuck(m)) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            let mut rx = exited.clone();
            let _ = tokio::time::timeout(KILLED_EXIT, rx.wait_for(|e| e.is_some())).await;
            let exit = *exited.borrow();
            pumps.finish().await;
            return Err(fail(format!("{m}; it was killed"), exit));
        }
    };
    // QEMU opened its chardev logfile before its QMP socket: the FIFO's
    // name is not needed any more.
    let _ = std::fs::remove_file(inst.serial_fifo());
    let version = qmp
        .execute(&qapi::qmp::query_version {}, QEMU_VERSION_QUERY)
        .await
        .map(|v| format!("{}.{}.{}", v.qemu.major, v.qemu.minor, v.qemu.micro))
        .unwrap_or_else(|_| "unknown".into());
    Ok(Started { pid, qmp, exited, version, pumps, console })
}

/// Starts QEMU as our child; a task reaps it and publishes its exit.
#[allow(clippy::type_complexity)]
fn spawn(
    inst: &Instance,
    plan: &BootPlan,
    pipes: Pipes,
) -> Result<(i32, watch::Receiver<Option<ExitInfo>>, Pumps), String> {
    let stderr = File::from(pipes.output_writer.try_clone().map_err(|e| e.to_string())?);
    let stdout = stderr.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(&plan.qemu);
    cmd.args(&plan.argv).stdin(std::process::Stdio::null()).stdout(stdout).stderr(stderr);
    block_host_signals(&mut cmd);
    let child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", plan.qemu.display()))?;
    let (pid, rx) = reap(child, "QEMU")?;
    // Our copy of the write end goes with `pipes`: the pipe ends with QEMU.
    Ok((pid, rx.clone(), pump::start(inst, pipes, &rx)))
}

/// A child of the supervisor (QEMU, a `virtiofsd`) runs with SIGTERM and
/// SIGHUP blocked: a host-wide signal must reach only the supervisor, which
/// powers the guest down, instead of cutting the VM or its share off.
pub fn block_host_signals(cmd: &mut tokio::process::Command) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::signal::{SigSet, SigmaskHow, Signal};
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGHUP);
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(std::io::Error::from)
        });
    }
}

/// Reaps `child` in a task that publishes its exit; returns its pid.
pub fn reap(mut child: tokio::process::Child, what: &str) -> Result<(i32, watch::Receiver<Option<ExitInfo>>), String> {
    let pid = child.id().ok_or_else(|| format!("{what} has no pid"))? as i32;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let info = child.wait().await.map(ExitInfo::from).unwrap_or(ExitInfo { code: None, signal: None });
        let _ = tx.send(Some(info));
    });
    Ok((pid, rx))
}

enum Early {
    Exited(ExitInfo),
    Stuck(String),
}

/// Connects as soon as QEMU has created its socket. A QEMU that accepts
/// but never greets is told apart from one that never opened the socket.
async fn connect(inst: &Instance, exited: &watch::Receiver<Option<ExitInfo>>) -> Result<Qmp, Early> {
    let deadline = tokio::time::Instant::now() + QMP_SOCKET;
    loop {
        if let Some(e) = *exited.borrow() {
            return Err(Early::Exited(e));
        }
        if let Ok(s) = UnixStream::connect(inst.qmp_supervisor()).await {
            return match Qmp::handshake(s, QMP_GREETING).await {
                Ok(q) => Ok(q),
                Err(_) if exited.borrow().is_some() => Err(Early::Exited(exited.borrow().expect("checked"))),
                Err(QmpError::Timeout { .. }) => Err(Early::Stuck(format!(
                    "QEMU opened its QMP socket but never answered on it (no greeting within {}s)",
                    QMP_GREETING.as_secs()
                ))),
                Err(e) => Err(Early::Stuck(format!("QEMU's QMP greeting failed: {e}"))),
            };
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Early::Stuck(format!("QEMU did not open its QMP socket within {}s", QMP_SOCKET.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
