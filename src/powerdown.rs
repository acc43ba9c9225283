//! The stop ladder: ask the guest, then QEMU, then the kernel, and verify each
//! step by the process being gone, not by a command being accepted.
//!
//! 1. `system_powerdown` (ACPI power button), waiting up to `--timeout` for
//!    QEMU to exit, ideally after `SHUTDOWN` with `guest: true`;
//!    then, only if the guest agent answered a ping when the ladder started,
//!    its `guest-shutdown`. The two share `--timeout`: with an agent the
//!    power button gets the first half and the agent the rest;
//! 2. QMP `quit`, [`QUIT_DEADLINE`];
//! 3. a termination signal, [`SIGNAL_DEADLINE`];
//! 4. SIGKILL, [`SIGNAL_DEADLINE`].
//!
//! QEMU runs with SIGTERM and SIGHUP blocked so that a host-wide SIGTERM
//! (logout, shutdown) reaches only the supervisor, which then runs this
//! ladder instead of QEMU cutting the guest off. The `sigterm` step therefore
//! sends SIGINT, which QEMU handles exactly like SIGTERM (os-posix.c installs
//! one `termsig_handler` for SIGINT, SIGHUP and SIGTERM).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::qmp::{Event, Qmp};

pub const QUIT_DEADLINE: Duration = Duration::from_secs(10);
pub const SIGNAL_DEADLINE: Duration = Duration::from_secs(5);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the ladder asks whether the guest agent answers.
const AGENT_PING: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopMethod {
    Powerdown,
    GuestAgent,
    Quit,
    Sigterm,
    Sigkill,
    AlreadyStopped,
}

impl StopMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            StopMethod::Powerdown => "powerdown",
            StopMethod::GuestAgent => "guest-agent",
            StopMethod::Quit => "quit",
            StopMethod::Sigterm => "sigterm",
            StopMethod::Sigkill => "sigkill",
            StopMethod::AlreadyStopped => "already-stopped",
        }
    }

    /// The guest shut itself down (or nothing had to be done).
    pub fn graceful(self) -> bool {
        matches!(self, StopMethod::Powerdown | StopMethod::GuestAgent | StopMethod::AlreadyStopped)
    }
}

/// How QEMU's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (_, Some(s)) => {
                let name = nix::sys::signal::Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "killed by signal {s} ({name})")
            }
            (Some(c), None) => write!(f, "exit status {c}"),
            (None, None) => write!(f, "exit status unknown (not QEMU's parent)"),
        }
    }
}

/// The result of a stop, as the user sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopOutcome {
    /// The step that stopped the VM; `None` if nothing could.
    pub method: Option<StopMethod>,
    /// The last `SHUTDOWN` reason QEMU reported, e.g. `guest-shutdown`.
    pub shutdown_reason: Option<String>,
    /// `SHUTDOWN`'s `guest` flag: the guest powered itself off.
    pub guest: bool,
    pub seconds: f64,
    pub exit: Option<ExitInfo>,
    /// What happened at each step, for the log and the user.
    pub steps: Vec<String>,
}

impl StopOutcome {
    /// 0 graceful, 3 escalated but stopped, 1 still running.
    pub fn exit_code(&self) -> i32 {
        match self.method {
            Some(m) if m.graceful() => 0,
            Some(_) => 3,
            None => 1,
        }
    }
}

/// QEMU's process as the ladder sees it.
pub trait QemuProcess {
    fn pid(&self) -> i32;
    /// True once the process is gone (a zombie counts as gone), by `deadline`.
    fn wait_gone(&self, deadline: Instant) -> impl Future<Output = bool> + Send;
    fn exit_info(&self) -> Option<ExitInfo>;
}

#[derive(Debug, Clone)]
pub struct StopOptions {
    pub timeout: Duration,
    /// Start at `quit`.
    pub force: bool,
}

/// Runs the ladder. `known_shutdown` is a `SHUTDOWN` seen before the call.
/// `agent` is the guest agent's socket when an agent may run (the guest
/// opened its port). `on_step` is told each step as it starts (the
/// supervisor shows it in `status`).
pub async fn stop<P: QemuProcess + Sync>(
    qmp: Option<&Qmp>,
    proc: &P,
    opts: &StopOptions,
    known_shutdown: Option<Event>,
    agent: Option<&Path>,
    on_step: &(dyn Fn(StopMethod) + Sync),
) -> StopOutcome {
    let start = Instant::now();
    let mut events = qmp.map(|q| q.subscribe());
    let mut shutdown = known_shutdown.as_ref().and_then(Event::shutdown);
    let mut steps = Vec::new();
    let finish = |method: Option<StopMethod>, shutdown: Option<(bool, String)>, steps: Vec<String>| StopOutcome {
        method,
        guest: shutdown.as_ref().is_some_and(|s| s.0),
        shutdown_reason: shutdown.map(|s| s.1),
        seconds: start.elapsed().as_secs_f64(),
        exit: proc.exit_info(),
        steps,
    };
    if proc.wait_gone(Instant::now()).await {
        return finish(Some(StopMethod::AlreadyStopped), shutdown, steps);
    }

    let mut ladder: Vec<(StopMethod, Instant)> = Vec::new();
    if !opts.force {
        let agent_answers = match agent {
            Some(sock) => crate::agent::ping(sock, opts.timeout.min(AGENT_PING)).await.is_ok(),
            None => false,
        };
        if agent_answers {
            ladder.push((StopMethod::Powerdown, start + opts.timeout / 2));
            ladder.push((StopMethod::GuestAgent, start + opts.timeout));
        } else {
            ladder.push((StopMethod::Powerdown, start + opts.timeout));
        }
    }
    ladder.push((StopMethod::Quit, Instant::now()));
    ladder.push((StopMethod::Sigterm, Instant::now()));
    ladder.push((StopMethod::Sigkill, Instant::now()));

    for (method, deadline) in ladder {
        on_step(method);
        let deadline = match method {
            StopMethod::Powerdown | StopMethod::GuestAgent => deadline,
            StopMethod::Quit => Instant::now() + QUIT_DEADLINE,
            _ => Instant::now() + SIGNAL_DEADLINE,
        };
        let note = act(qmp, proc, method, agent).await;
        tracing::info!(step = method.as_str(), "{note}");
        steps.push(format!("{}: {note}", method.as_str()));
        loop {
            let gone = match events.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        g = proc.wait_gone(deadline) => g,
                        ev = rx.recv() => {
                            if let Ok(ev) = ev { if let Some(s) = ev.shutdown() { shutdown = Some(s); } }
                            else { events = None; }
                            continue;
                        }
                    }
                }
                None => proc.wait_gone(deadline).await,
            };
            if gone {
                if let Some(rx) = events.as_mut() {
                    while let Ok(ev) = rx.try_recv() {
                        if let Some(s) = ev.shutdown() {
                            shutdown = Some(s);
                        }
                    }
                }
                return finish(Some(method), shutdown, steps);
            }
            steps.push(format!("{}: QEMU still running after {:.0}s", method.as_str(), start.elapsed().as_secs_f64()));
            break;
        }
    }
    finish(None, shutdown, steps)
}

async fn act<P: QemuProcess>(qmp: Option<&Qmp>, proc: &P, method: StopMethod, agent: Option<&Path>) -> String {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(proc.pid());
    let t = Duration::from_secs(5);
    match method {
        StopMethod::Powerdown => match qmp {
            Some(q) => match q.execute(&qapi::qmp::system_powerdown {}, t).await {
                Ok(_) => "pressed the ACPI power button (system_powerdown)".into(),
                Err(e) => format!("system_powerdown failed: {e}"),
            },
            None => "no QMP connection; skipped".into(),
        },
        StopMethod::Quit => match qmp {
            Some(q) => match q.execute(&qapi::qmp::quit {}, t).await {
                Ok(_) => "QEMU accepted quit".into(),
                // After quit, EOF or a reset is QEMU going away, not a failure.
                Err(crate::qmp::QmpError::Disconnected { .. }) => "QEMU accepted quit and closed QMP".into(),
                Err(e) => format!("quit failed: {e}"),
            },
            None => "no QMP connection; skipped".into(),
        },
        StopMethod::Sigterm => match kill(pid, Signal::SIGINT) {
            Ok(()) => "sent QEMU its termination signal (SIGINT; SIGTERM is blocked in QEMU)".into(),
            Err(e) => format!("signal failed: {e}"),
        },
        StopMethod::Sigkill => match kill(pid, Signal::SIGKILL) {
            Ok(()) => "sent SIGKILL".into(),
            Err(e) => format!("SIGKILL failed: {e}"),
        },
        StopMethod::GuestAgent => match agent {
            Some(sock) => crate::agent::shutdown(sock, t).await.unwrap_or_else(|e| e),
            None => "no guest agent; skipped".into(),
        },
        StopMethod::AlreadyStopped => String::new(),
    }
}

/// A QEMU we are not the parent of: gone when not running by its identity
/// (a zombie waiting for a slow PID 1 counts as gone).
pub struct ForeignProcess(pub crate::instance::ProcIdentity);

impl QemuProcess for ForeignProcess {
    fn pid(&self) -> i32 {
        self.0.pid
    }
    async fn wait_gone(&self, deadline: Instant) -> bool {
        loop {
            if !self.0.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    fn exit_info(&self) -> Option<ExitInfo> {
        None
    }
}

/// QEMU as our child: the exit status arrives on a watch channel from the
/// task that reaps it.
pub struct ChildProcess {
    pub pid: i32,
    pub exited: tokio::sync::watch::Receiver<Option<ExitInfo>>,
}

impl QemuProcess for ChildProcess {
    fn pid(&self) -> i32 {
        self.pid
    }
    async fn wait_gone(&self, deadline: Instant) -> bool {
        let mut rx = self.exited.clone();
        if rx.borrow().is_some() {
            return true;
        }
        let gone = tokio::time::timeout_at(deadline, rx.wait_for(|e| e.is_some())).await.is_ok();
        gone
    }
    fn exit_info(&self) -> Option<ExitInfo> {
        *self.exited.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        let o =
            |m| StopOutcome { method: m, shutdown_reason: None, guest: false, seconds: 0.0, exit: None, steps: vec![] };
        assert_eq!(o(Some(StopMethod::Powerdown)).exit_code(), 0);
        assert_eq!(o(Some(StopMethod::GuestAgent)).exit_code(), 0);
        assert_eq!(o(Some(StopMethod::AlreadyStopped)).exit_code(), 0);
        assert_eq!(o(Some(StopMethod::Quit)).exit_code(), 3);
        assert_eq!(o(Some(StopMethod::Sigkill)).exit_code(), 3);
        assert_eq!(o(None).exit_code(), 1);
    }

    #[test]
    fn method_names_are_the_documented_ones() {
        let names: Vec<_> = [
            StopMethod::Powerdown,
            StopMethod::GuestAgent,
            StopMethod::Quit,
            StopMethod::Sigterm,
            StopMethod::Sigkill,
            StopMethod::AlreadyStopped,
        ]
        .iter()
        .map(|m| serde_json::to_value(m).unwrap().as_str().unwrap().to_string())
        .collect();
        assert_eq!(names, ["powerdown", "guest-agent", "quit", "sigterm", "sigkill", "already-stopped"]);
    }

    #[test]
    fn exit_info_names_the_signal() {
        assert_eq!(ExitInfo { code: None, signal: Some(9) }.to_string(), "killed by signal 9 (SIGKILL)");
        assert_eq!(ExitInfo { code: Some(0), signal: None }.to_string(), "exit status 0");
    }
}
