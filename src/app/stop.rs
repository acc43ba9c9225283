//! `powerdown` and `destroy`. A running instance is stopped by its
//! supervisor's ladder; a QEMU whose supervisor died is stopped by the same
//! ladder run from here (`supervisor::orphan`), with its steps shown and
//! Ctrl-C passed on.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::{block_on, Ctx};
use crate::instance::records::{RunRecord, StopMethod, StopOutcome, StopRecord};
use crate::instance::{read_json, Instance, Liveness, Lock};
use crate::report::error::Interrupted;
use crate::report::stop::{Destroyed, StopReport};
use crate::supervisor::client;
use crate::supervisor::ladder::StopOptions;
use crate::supervisor::protocol::Stopped;
use crate::timeouts::{QUIT_DEADLINE, SIGNAL_DEADLINE, STATE_ANSWER, STOP_BUDGET_MARGIN, SUPERVISOR_EXIT};

/// What Ctrl-C does while a stop waits. The first always forces it; after
/// that the `powerdown` and `destroy` verbs let the user stop waiting, while
/// a stop another command needs finished (`run`'s cleanup, a cancelled
/// launch) goes on. `run`'s cleanup is forced by SIGTERM and SIGHUP too
/// (its own handlers already catch them): a CI runner's SIGTERM during the
/// cleanup hurries it as a second Ctrl-C does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtrlC {
    Force,
    ForceThenLeave,
    ForceOnAnySignal,
}

/// The signals that force a stop (see [`CtrlC`]).
struct Hurry {
    int: tokio::signal::unix::Signal,
    others: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Hurry {
    fn new(on: CtrlC) -> Result<Hurry> {
        use tokio::signal::unix::{signal, SignalKind};
        let others = match on {
            CtrlC::ForceOnAnySignal => Some((
                signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?,
                signal(SignalKind::hangup()).context("cannot watch for SIGHUP")?,
            )),
            _ => None,
        };
        Ok(Hurry { int: ctrl_c()?, others })
    }

    /// The next signal, as the messages name it.
    async fn recv(&mut self) -> &'static str {
        let Hurry { int, others } = self;
        match others {
            None => {
                int.recv().await;
                "Ctrl-C"
            }
            Some((term, hup)) => tokio::select! {
                _ = int.recv() => "Ctrl-C",
                _ = term.recv() => "SIGTERM",
                _ = hup.recv() => "SIGHUP",
            },
        }
    }
}

/// Stops a running instance; `None` when nothing was running.
pub fn stop_running(ctx: &Ctx, inst: &Instance, opts: &StopOptions) -> Result<Option<StopOutcome>> {
    Ok(stop(ctx, inst, opts, CtrlC::Force)?.map(|s| s.outcome))
}

fn stop(ctx: &Ctx, inst: &Instance, opts: &StopOptions, ctrl_c: CtrlC) -> Result<Option<Stopped>> {
    let stopped = match Liveness::probe(inst)? {
        Liveness::Stopped => return Ok(None),
        Liveness::Orphaned(_) => stop_orphan(ctx, inst, opts)?,
        // A supervisor that serves the VM, or one still starting or
        // finishing: it is asked, and the VM is stopped from here only
        // when it does not answer.
        Liveness::Supervised(_) | Liveness::Busy => {
            let budget = opts.timeout + QUIT_DEADLINE + SIGNAL_DEADLINE * 2 + STOP_BUDGET_MARGIN;
            let shown = block_on(powerdown_showing_steps(ctx, inst, opts, budget, ctrl_c));
            crate::progress::finish();
            match shown {
                Ok(s) => s,
                Err(e) if e.is::<Interrupted>() => return Err(e),
                Err(e) => {
                    if inst.run_record().exists() {
                        tracing::warn!("supervisor unreachable ({e}); stopping QEMU directly");
                    }
                    stop_orphan(ctx, inst, opts)?
                }
            }
        }
    };
    // The supervisor exits right after answering; wait so the lock is free
    // for the next command.
    Lock::wait_released(inst, SUPERVISOR_EXIT)?;
    Ok(Some(stopped))
}

/// What the ladder is doing at `step`, and how long it waits there (as the
/// supervisor's ladder set it).
fn step_message(step: StopMethod, wait_secs: f64) -> String {
    let secs = wait_secs.round();
    match step {
        StopMethod::Powerdown => format!(
            "pressed the power button, waiting up to {secs} s for the guest to power off; then QMP quit and signals (Ctrl-C to force)"
        ),
        StopMethod::GuestAgent => format!("asked the guest agent to shut down, waiting up to {secs} s"),
        StopMethod::Quit => format!("sent QMP quit, waiting up to {secs} s for QEMU to exit"),
        StopMethod::TermSignal => format!("sent QEMU SIGINT, waiting up to {secs} s"),
        StopMethod::Sigkill => format!("sent QEMU SIGKILL, waiting up to {secs} s"),
        StopMethod::AlreadyStopped => "already stopped".into(),
    }
}

/// The supervisor's stop ladder, with the step it is at on the status line:
/// `status` answers while the ladder waits, and names its step. The first
/// Ctrl-C forces the stop (the supervisor goes on at QMP `quit`); the next
/// one stops waiting, and the supervisor finishes the stop alone.
async fn powerdown_showing_steps(
    ctx: &Ctx,
    inst: &Instance,
    opts: &StopOptions,
    budget: Duration,
    on_ctrl_c: CtrlC,
) -> Result<Stopped> {
    let sock = inst.control();
    let mut hurry = Hurry::new(on_ctrl_c)?;
    // The request is sent first (`biased`): a supervisor that is just
    // finishing still answers it, where a question asked before it could
    // find the supervisor gone.
    let stop = client::powerdown(&sock, opts.timeout, opts.force, budget);
    tokio::pin!(stop);
    let mut forced = opts.force;
    let mut tick = Duration::from_millis(100);
    loop {
        tokio::select! {
            biased;
            r = &mut stop => return r,
            sig = hurry.recv() => {
                match (forced, on_ctrl_c) {
                    (true, CtrlC::ForceThenLeave) => {
                        return Err(Interrupted {
                            signal: nix::sys::signal::Signal::SIGINT,
                            message: format!(
                                "stopped waiting: the instance's supervisor goes on stopping the VM; '{}' shows when it is done",
                                ctx.command("status")
                            ),
                        }
                        .into());
                    }
                    (true, _) => continue,
                    (false, _) => forced = true,
                }
                let then = match on_ctrl_c {
                    CtrlC::ForceThenLeave => "; Ctrl-C again stops waiting",
                    CtrlC::Force | CtrlC::ForceOnAnySignal => "",
                };
                // The first request's answer reports how the stop ended.
                match client::force_stop(&sock).await {
                    Ok(()) => ctx.stage(&format!("{sig}: forcing the stop (QMP quit, then signals){then}")),
                    Err(e) => ctx.stage(&format!("{sig}: cannot force the stop ({e:#}){then}")),
                }
            }
            () = tokio::time::sleep(tick) => {
                tick = Duration::from_millis(500);
                // `state`, not `status`: polling must not send QEMU and the
                // guest agent questions while the ladder talks to them.
                if let Ok(s) = client::state(&sock, STATE_ANSWER).await {
                    if let (Some(step), Some(wait)) = (s.stopping, s.stopping_wait_secs) {
                        ctx.stage(&step_message(step, wait));
                    }
                }
            }
        }
    }
}

fn ctrl_c() -> Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("cannot watch for Ctrl-C")
}

/// QEMU whose supervisor died: the supervisor's orphan stop
/// ([`crate::supervisor::orphan`]) run here, the steps shown. The first
/// Ctrl-C hurries it past the guest's own steps; later ones are ignored,
/// as the rest of the ladder is short and only it can stop this QEMU.
fn stop_orphan(ctx: &Ctx, inst: &Instance, opts: &StopOptions) -> Result<Stopped> {
    let Some(run) = read_json::<RunRecord>(&inst.run_record())? else {
        if let Some(done) = supervisor_finishing(inst)? {
            return Ok(done);
        }
        bail!(
            "instance '{}' is locked by another qbuf-qemu command that has not started QEMU (yet): a launch still \
             starting, or a change to the instance. Wait for it to finish ('{}' shows the instance), then try again",
            ctx.name,
            ctx.command("status")
        );
    };
    block_on(async {
        let mut ctrl_c = ctrl_c()?;
        let (hurry, hurried) = tokio::sync::watch::channel(false);
        let show = |m: StopMethod, wait: Duration| ctx.stage(&step_message(m, wait.as_secs_f64()));
        let stop = crate::supervisor::orphan::stop(inst, &run, opts, &show, hurried);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                s = &mut stop => return Ok(s),
                _ = ctrl_c.recv() => {
                    if !*hurry.borrow() {
                        ctx.stage("Ctrl-C: forcing the stop (QMP quit, then signals)");
                    }
                    let _ = hurry.send(true);
                }
            }
        }
    })
}

/// QEMU ended by itself and its supervisor is exiting: it wrote this boot's
/// stop record, then removed its socket and run.json, and still holds the
/// lock for a moment. Waits for it; the VM was already stopped.
fn supervisor_finishing(inst: &Instance) -> Result<Option<Stopped>> {
    let Some(record) = read_json::<StopRecord>(&inst.stop_record())? else { return Ok(None) };
    if !Lock::wait_released(inst, SUPERVISOR_EXIT)? {
        return Ok(None);
    }
    Ok(Some(Stopped { outcome: StopOutcome::already_stopped(Some(&record)), record: Some(record) }))
}

fn report(ctx: &Ctx, s: &Stopped) -> StopReport {
    StopReport::from_outcome(
        &ctx.name,
        &s.outcome,
        s.record.as_ref().map(crate::report::stop::stop_reason),
        ctx.command("status"),
    )
}

pub fn powerdown(ctx: &Ctx, opts: &StopOptions) -> Result<StopReport> {
    let inst = ctx.existing()?;
    match stop(ctx, &inst, opts, CtrlC::ForceThenLeave)? {
        Some(s) => Ok(report(ctx, &s)),
        None => {
            inst.clean_stale();
            Ok(report(ctx, &Stopped { outcome: StopOutcome::already_stopped(None), record: None }))
        }
    }
}

/// `destroy`: asks first on a terminal unless `yes`; without a terminal
/// `--yes` is required (a usage error). Declining does nothing and is no
/// failure.
pub fn destroy_asking(ctx: &Ctx, opts: &StopOptions, yes: bool) -> Result<Destroyed> {
    use std::io::IsTerminal;
    ctx.existing()?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            let m = format!("destroy deletes instance '{}' and its disk; without a terminal pass --yes", ctx.name);
            return Err(crate::report::error::Usage(m).into());
        }
        eprint!("Destroy instance '{}' and delete its disk (guest data is lost)? [y/N] ", ctx.name);
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Ok(Destroyed {
                name: ctx.name.clone(),
                declined: true,
                stop: None,
                removed: vec![],
                kept: vec![],
                kept_dir: None,
            });
        }
    }
    destroy_with(ctx, opts, CtrlC::ForceThenLeave)
}

/// `destroy` for `run`, which must see the removal through: Ctrl-C, SIGTERM
/// or SIGHUP forces the stop but never abandons it.
pub fn destroy(ctx: &Ctx, opts: &StopOptions) -> Result<Destroyed> {
    destroy_with(ctx, opts, CtrlC::ForceOnAnySignal)
}

fn destroy_with(ctx: &Ctx, opts: &StopOptions, ctrl_c: CtrlC) -> Result<Destroyed> {
    let inst = ctx.existing()?;
    let stop = stop(ctx, &inst, opts, ctrl_c)?.map(|s| report(ctx, &s));
    if let Some(st) = &stop {
        if st.method().is_none() {
            bail!("{}\nNothing was removed.", crate::report::Render::human(st));
        }
    }
    // Take the lock so no launch races the removal.
    let lock = Lock::try_acquire(&inst)?
        .ok_or_else(|| anyhow!("instance '{}' is busy (a launch started meanwhile); nothing was removed", ctx.name))?;
    crate::guix::release_root(&ctx.state, &inst);
    let removed = inst.remove_created();
    drop(lock);
    let kept = inst.kept_files();
    if kept.is_empty() {
        std::fs::remove_dir(&inst.dir).with_context(|| format!("cannot remove {}", inst.dir.display()))?;
    }
    let kept_dir = (!kept.is_empty()).then(|| inst.dir.clone());
    Ok(Destroyed { name: ctx.name.clone(), declined: false, stop, removed, kept, kept_dir })
}
