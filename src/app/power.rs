//! `pause`, `resume` and `reboot` of a running VM, as QMP `stop`, `cont`
//! and (when the guest does not reboot itself) `system_reset`, through the
//! supervisor.
//!
//! A reboot prefers the guest's own: the guest agent's `guest-shutdown`
//! (mode `reboot`) when an agent answers, else `reboot` over SSH. QEMU's
//! `RESET` event says it happened; events are subscribed to *before* the
//! guest is asked, so the event cannot be missed. A guest that does not
//! reboot within `--timeout` is reset.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::ssh::running_target;
use super::{block_on, ready, Ctx};
use crate::instance::read_json;
use crate::instance::records::{BootPlan, RunRecord};
use crate::machine::reset::Resets;
use crate::machine::{missing_record, Vm};
use crate::qemu::parse::RunState;
use crate::qga::AgentState;
use crate::report::power::{PowerAction, RebootMethod, Rebooted, RunStateChanged};
use crate::ssh::Target;
use crate::supervisor::client;
use crate::timeouts::{AGENT_REBOOT, GUEST_JOB, QMP_QUERY};

pub fn pause(ctx: &Ctx) -> Result<RunStateChanged> {
    set_cpus(ctx, PowerAction::Pause)
}

pub fn resume(ctx: &Ctx) -> Result<RunStateChanged> {
    set_cpus(ctx, PowerAction::Resume)
}

/// QMP `stop` (pause) of a running VM or `cont` (resume) of one that is
/// not; nothing when it already is as asked.
fn set_cpus(ctx: &Ctx, action: PowerAction) -> Result<RunStateChanged> {
    let vm = Vm::running(&ctx.existing()?)?;
    let before = vm.run_state()?;
    let undo = match (action, before == RunState::Running) {
        (PowerAction::Pause, running) => {
            if running {
                vm.run(&qapi::qmp::stop {})?;
            }
            "resume"
        }
        (PowerAction::Resume, running) => {
            if !running {
                vm.run(&qapi::qmp::cont {})?;
            }
            "pause"
        }
    };
    let after = vm.run_state()?;
    Ok(RunStateChanged { name: ctx.name.clone(), action, before, after, undo_command: ctx.command(undo) })
}

#[derive(Debug, Clone)]
pub struct RebootOptions {
    /// How long the guest gets to reboot itself before it is reset.
    pub timeout: Duration,
    /// Reset at once.
    pub force: bool,
    pub no_wait: bool,
    /// How long to wait for SSH afterwards.
    pub ssh_timeout: Duration,
}

pub fn reboot(ctx: &Ctx, opts: &RebootOptions) -> Result<Rebooted> {
    let (inst, t) = running_target(ctx)?;
    let vm = Vm::running(&inst)?;
    let mut notes = vec![];
    // One question for both: is it paused, and does a guest agent answer.
    let live = match block_on(client::status(&inst.control(), QMP_QUERY))?.live {
        Some(crate::supervisor::protocol::Live::Answered(l)) => Some(l),
        _ => None,
    };
    if live.as_ref().is_some_and(|l| l.run_state != RunState::Running) {
        vm.run(&qapi::qmp::cont {})?;
        notes.push("the VM was paused: resumed it first, since a paused guest cannot reboot".into());
    }
    let agent = live.is_some_and(|l| l.guest_agent == AgentState::Answers);
    let started = Instant::now();
    let serial_before = std::fs::metadata(inst.serial_log()).map(|m| m.len()).unwrap_or(0);
    let method = block_on(reset(ctx, &vm, &t, agent, opts, &mut notes))?;
    // The shared SSH connections went with the old boot.
    if let Err(e) = inst.fresh_ssh_mux_dir() {
        tracing::warn!("logins will not share a connection: {e:#}");
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut out = Rebooted { name: ctx.name.clone(), method, seconds, ready_seconds: None, notes };
    if opts.no_wait {
        return Ok(out);
    }
    // A guest without a disk makes a new host key every boot (as at launch).
    let plan: Option<BootPlan> = read_json(&inst.boot_plan())?;
    if plan.is_some_and(|p| p.spec.disk.is_none()) {
        let _ = std::fs::remove_file(inst.known_hosts());
    }
    let run: RunRecord = read_json(&inst.run_record())?.ok_or_else(|| missing_record(&inst, &inst.run_record()))?;
    let watch = ready::Watch {
        auto_kvm: false,
        silence: Duration::MAX,
        serial_before,
        cancel: None,
        stage: ready::BOOTING,
        resumed: None,
        limit_flag: "--ssh-timeout",
    };
    if let Err(r) = ready::wait(&inst, &t, &run.qemu, Instant::now() + opts.ssh_timeout, &watch) {
        bail!("instance '{}' was reset, but {}{}", ctx.name, r.describe(&t, &inst), ready::whole_boot(ctx));
    }
    out.ready_seconds = Some(started.elapsed().as_secs_f64());
    Ok(out)
}

/// Asks the guest to reboot and waits for QEMU's `RESET`; resets the VM
/// when the guest did not within the timeout (or at once with `force`).
async fn reset(
    ctx: &Ctx,
    vm: &Vm,
    t: &Target,
    agent: bool,
    opts: &RebootOptions,
    notes: &mut Vec<String>,
) -> Result<RebootMethod> {
    let mut resets = Resets::subscribe(vm).await?;
    if !opts.force {
        let asked = match agent {
            true => crate::qga::reboot(&vm.inst.guest_agent(), AGENT_REBOOT).await.map(|_| RebootMethod::GuestAgent),
            false => ask_over_ssh(t.clone()).await.map(|()| RebootMethod::Ssh),
        };
        match asked {
            Ok(m) => {
                ctx.progress(&format!(
                    "asked the guest to reboot; waiting up to {}s before resetting it",
                    opts.timeout.as_secs()
                ));
                if let Some(r) = resets.next(opts.timeout).await {
                    return r.map(|()| m);
                }
                notes.push(format!("the guest did not reboot within {}s, so it was reset", opts.timeout.as_secs()));
            }
            Err(e) => notes.push(format!("the guest could not be asked to reboot ({e}), so it was reset")),
        }
    }
    resets.force().await?;
    Ok(RebootMethod::SystemReset)
}

/// `reboot` over SSH, as root or with `sudo -n`. The connection may drop
/// as the guest goes down (ssh's 255): only a refusal from the guest's
/// side (another status) counts as a failure.
async fn ask_over_ssh(t: Target) -> Result<(), String> {
    let (cmd, remote) = match t.user == "root" {
        true => ("reboot", "reboot".to_string()),
        false => ("sudo -n reboot", super::guest::sudo_command("reboot")),
    };
    let limit = crate::ssh::Limit::within(format!("the guest's '{cmd}'"), GUEST_JOB);
    let out = tokio::task::spawn_blocking(move || crate::ssh::capture(&t, &remote, &limit))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    match out.status.code() {
        Some(0) | Some(255) | None => Ok(()),
        Some(c) => Err(format!("'{cmd}' exited with {c}: {}", crate::ssh::last_said(&out.stderr))),
    }
}
