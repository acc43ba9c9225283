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
//! A ladder can be hurried while it waits for the guest (the user pressed
//! Ctrl-C, or asked again with `--force`): it goes on at `quit` at once.
//!
//! QEMU runs with SIGTERM and SIGHUP blocked so that a host-wide SIGTERM
//! (logout, shutdown) reaches only the supervisor, which then runs this
//! ladder instead of QEMU cutting the guest off. The `sigterm` step therefore
//! sends SIGINT, which QEMU handles exactly like SIGTERM (os-posix.c installs
//! one `termsig_handler` for SIGINT, SIGHUP and SIGTERM).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::instance::proc::{ExitInfo, ProcIdentity};
use crate::instance::records::{StepAction, StopMethod, StopOutcome, StopStep};
use crate::qemu::parse::RunState;
use crate::qmp::{Event, Qmp};
use crate::timeouts::{
    AGENT_PING, EVENTS_AFTER_EXIT, LADDER_COMMAND, QUIT_DEADLINE, RESUME_BEFORE_POWERDOWN, SIGNAL_DEADLINE,
};

/// QEMU's process as the ladder sees it.
pub trait QemuProcess {
    fn pid(&self) -> i32;
    /// True once the process is gone (a zombie counts as gone), by `deadline`.
    fn wait_gone(&self, deadline: Instant) -> impl Future<Output = bool> + Send;
    fn exit_info(&self) -> Option<ExitInfo>;
    /// Sends `sig` to the process.
    fn signal(&self, sig: nix::sys::signal::Signal) -> nix::Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
    }
}

/// How long the steps after the guest's and each QMP command may take.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub quit: Duration,
    pub signal: Duration,
    pub command: Duration,
}

impl Default for Deadlines {
    fn default() -> Deadlines {
        Deadlines { quit: QUIT_DEADLINE, signal: SIGNAL_DEADLINE, command: LADDER_COMMAND }
    }
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
/// supervisor shows it in `status`). `hurry` turning true ends the wait for
/// the guest. `limits` bound the later steps (`Deadlines::default()`; tests
/// make them short).
#[allow(clippy::too_many_arguments)]
pub async fn stop<P: QemuProcess + Sync>(
    qmp: Option<&Qmp>,
    proc: &P,
    opts: &StopOptions,
    known_shutdown: Option<Event>,
    agent: Option<&Path>,
    on_step: &(dyn Fn(StopMethod, Duration) + Sync),
    mut hurry: watch::Receiver<bool>,
    limits: Deadlines,
) -> StopOutcome {
    let start = Instant::now();
    let mut watch =
        Watch { events: qmp.map(|q| q.subscribe()), shutdown: known_shutdown.as_ref().and_then(Event::shutdown) };
    let mut steps = Vec::new();
    let finish = |method: Option<StopMethod>, shutdown: Option<(bool, String)>, steps: Vec<StopStep>| StopOutcome {
        method,
        guest: shutdown.as_ref().is_some_and(|s| s.0),
        shutdown_reason: shutdown.map(|s| s.1),
        seconds: start.elapsed().as_secs_f64(),
        exit: proc.exit_info(),
        steps,
    };
    if proc.wait_gone(Instant::now()).await {
        return finish(Some(StopMethod::AlreadyStopped), watch.shutdown, steps);
    }
    if !opts.force {
        if let Some(action) = resume_if_paused(qmp, limits.command.min(RESUME_BEFORE_POWERDOWN)).await {
            steps.push(StopStep::new(StopMethod::Powerdown, action, start.elapsed()));
        }
    }
    for (method, deadline) in plan(opts, agent, start).await {
        let guests_step = matches!(method, StopMethod::Powerdown | StopMethod::GuestAgent);
        let hurried = *hurry.borrow();
        if guests_step && hurried {
            continue;
        }
        let deadline = match method {
            StopMethod::Powerdown | StopMethod::GuestAgent => deadline,
            StopMethod::Quit => Instant::now() + limits.quit,
            _ => Instant::now() + limits.signal,
        };
        // Told before it is taken: a step can take `limits.command` (a QEMU
        // that does not answer), and `status` shows which one runs.
        on_step(method, deadline.saturating_duration_since(Instant::now()));
        let action = act(qmp, proc, method, agent, limits.command).await;
        tracing::info!(step = method.as_str(), "{action:?}");
        // A step that could not be taken (no QMP connection, no agent) is
        // not waited out: nothing was asked. A refused or unanswered one
        // is, as QEMU may still act on it late.
        let deadline = if action == StepAction::Skipped { Instant::now() } else { deadline };
        steps.push(StopStep::new(method, action, start.elapsed()));
        let gone = tokio::select! {
            gone = watch.until_gone(proc, deadline) => gone,
            // A dropped sender disables this branch; it never hurries.
            true = async { hurry.wait_for(|h| *h).await.is_ok() }, if guests_step => {
                steps.push(StopStep::new(method, StepAction::Forced, start.elapsed()));
                // An exit that raced the request still counts for this step.
                if proc.wait_gone(Instant::now()).await {
                    return finish(Some(method), watch.shutdown, steps);
                }
                continue;
            }
        };
        if gone {
            return finish(Some(method), watch.shutdown, steps);
        }
        steps.push(StopStep::new(method, StepAction::StillRunning, start.elapsed()));
    }
    finish(None, watch.shutdown, steps)
}

/// The steps to try and when each gives up. The guest's own steps share
/// `--timeout` (with an agent that answers, the button gets the first half);
/// the later steps' deadlines start when they do.
async fn plan(opts: &StopOptions, agent: Option<&Path>, start: Instant) -> Vec<(StopMethod, Instant)> {
    let mut ladder = Vec::new();
    if !opts.force {
        let agent_answers = match agent {
            Some(sock) => crate::qga::ping(sock, opts.timeout.min(AGENT_PING)).await.is_ok(),
            None => false,
        };
        let button = power_button_wait(opts.timeout, agent_answers);
        ladder.push((StopMethod::Powerdown, start + button));
        if agent_answers {
            ladder.push((StopMethod::GuestAgent, start + opts.timeout));
        }
    }
    for m in [StopMethod::Quit, StopMethod::TermSignal, StopMethod::Sigkill] {
        ladder.push((m, start));
    }
    ladder
}

/// How long the power button gets: all of `--timeout`, or its first half
/// when a guest agent answers (the agent's shutdown gets the rest).
fn power_button_wait(timeout: Duration, agent_answers: bool) -> Duration {
    if agent_answers {
        timeout / 2
    } else {
        timeout
    }
}

/// A paused guest (QMP `stop`, a debugger) cannot see the power button, so
/// it is resumed first; says so when it did.
async fn resume_if_paused(qmp: Option<&Qmp>, t: Duration) -> Option<StepAction> {
    let q = qmp?;
    // Raw, not qapi's RunState: a state newer than its schema must not fail.
    let status = q.execute_raw("query-status", serde_json::json!({}), t).await.ok()?;
    if RunState::of_query_status(&status) != RunState::Paused {
        // Running needs nothing; guest-panicked or shutdown would not be
        // helped by resuming.
        return None;
    }
    Some(match q.execute(&qapi::qmp::cont {}, t).await {
        Ok(_) => StepAction::ResumedFirst,
        Err(e) => StepAction::ResumeFailed { error: e.to_string() },
    })
}

/// Follows QMP events while waiting for QEMU to exit, keeping the last
/// `SHUTDOWN` (its reason names what ended the VM).
struct Watch {
    events: Option<tokio::sync::broadcast::Receiver<Event>>,
    shutdown: Option<(bool, String)>,
}

impl Watch {
    async fn until_gone<P: QemuProcess + Sync>(&mut self, proc: &P, deadline: Instant) -> bool {
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        loop {
            let Some(rx) = self.events.as_mut() else { return proc.wait_gone(deadline).await };
            tokio::select! {
                gone = proc.wait_gone(deadline) => {
                    // Events QEMU sent just before it exited are queued, or
                    // still on their way: its QMP EOF follows its exit within
                    // milliseconds (a QEMU we are not the parent of is seen
                    // gone by polling, maybe before its last lines are read).
                    let drain = Instant::now() + EVENTS_AFTER_EXIT;
                    loop {
                        match rx.try_recv() {
                            Ok(ev) => note(&mut self.shutdown, &ev),
                            Err(TryRecvError::Lagged(_)) => continue,
                            Err(TryRecvError::Empty) if gone && self.shutdown.is_none() => {
                                match tokio::time::timeout_at(drain, rx.recv()).await {
                                    Ok(Ok(ev)) => note(&mut self.shutdown, &ev),
                                    Ok(Err(RecvError::Lagged(_))) => continue,
                                    _ => break,
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    return gone;
                }
                ev = rx.recv() => match ev {
                    Ok(ev) => note(&mut self.shutdown, &ev),
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => self.events = None,
                },
            }
        }
    }
}

fn note(shutdown: &mut Option<(bool, String)>, ev: &Event) {
    if let Some(s) = ev.shutdown() {
        *shutdown = Some(s);
    }
}

async fn act<P: QemuProcess>(
    qmp: Option<&Qmp>,
    proc: &P,
    method: StopMethod,
    agent: Option<&Path>,
    t: Duration,
) -> StepAction {
    use nix::sys::signal::Signal;
    let failed = |e: &dyn std::fmt::Display| StepAction::Failed { error: e.to_string() };
    match method {
        StopMethod::Powerdown => match qmp {
            Some(q) => {
                q.execute(&qapi::qmp::system_powerdown {}, t).await.map_or_else(|e| failed(&e), |_| StepAction::Sent)
            }
            None => StepAction::Skipped,
        },
        StopMethod::Quit => match qmp {
            Some(q) => match q.execute(&qapi::qmp::quit {}, t).await {
                Ok(_) => StepAction::Sent,
                // After quit, EOF or a reset is QEMU going away, not a failure.
                Err(crate::qmp::QmpError::Disconnected { .. }) => StepAction::QuitClosedQmp,
                Err(e) => failed(&e),
            },
            None => StepAction::Skipped,
        },
        StopMethod::TermSignal => proc.signal(Signal::SIGINT).map_or_else(|e| failed(&e), |()| StepAction::Sent),
        StopMethod::Sigkill => proc.signal(Signal::SIGKILL).map_or_else(|e| failed(&e), |()| StepAction::Sent),
        StopMethod::GuestAgent => match agent {
            Some(sock) => crate::qga::shutdown(sock, t).await.map_or_else(|e| failed(&e), |_| StepAction::Sent),
            None => StepAction::Skipped,
        },
        StopMethod::AlreadyStopped => StepAction::Skipped,
    }
}

/// A QEMU we are not the parent of: gone when not running by its identity
/// (a zombie waiting for a slow PID 1 counts as gone).
pub struct ForeignProcess(pub ProcIdentity);

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
mod tests;
