//! `ssh`, and the SSH target of an instance that `copy`, `ssh-config`,
//! `reboot`, `snapshot save` and `run` use.

use anyhow::Result;

use super::{usage, Ctx};
use crate::config::Settings;
use crate::instance::{read_json, Instance, Liveness};
use crate::machine::Vm;
use crate::qemu::parse::RunState;
use crate::ssh::Target;
use crate::timeouts::{BANNER, RUN_STATE_QUESTION};

/// `ssh -- ARGS…`: OpenSSH with the instance's key and pinned host key.
pub fn ssh(ctx: &Ctx, args: &[String]) -> Result<i32> {
    if ctx.json {
        return usage("ssh passes the remote command's output through as it is; --json does not apply (drop it)");
    }
    let (inst, t) = running_target(ctx)?;
    // A dead guest would only time out (keepalives end a session that was
    // open when it died). The console is the guest's own output: a line
    // that merely looks like a panic does not lock the user out while its
    // sshd still greets.
    let panic = super::ready::console_panic(&inst).filter(|_| crate::ssh::banner(t.port, BANNER).is_none());
    if let Some(line) = panic {
        anyhow::bail!(
            "the guest's kernel panicked ({line}): SSH cannot answer; '{}' shows its console, '{}' stops the VM",
            ctx.command("logs"),
            ctx.command("powerdown")
        );
    }
    refuse_stopped_guest(ctx)?;
    crate::ssh::run_interactive(&t, &inst, args)
}

/// A paused (or stopped) guest cannot answer, and ssh would wait for it in silence:
/// said at once instead. (Nothing is said when QEMU cannot be asked: ssh
/// then finds out for itself.)
fn refuse_stopped_guest(ctx: &Ctx) -> Result<()> {
    let Ok(Some(vm)) = ctx.existing().and_then(|i| Vm::if_running(&i)) else { return Ok(()) };
    let Ok(state) = vm.run_state_within(RUN_STATE_QUESTION) else { return Ok(()) };
    match state {
        RunState::Paused | RunState::Suspended => anyhow::bail!(
            "instance '{}' is {state}, so its guest cannot answer SSH: resume it with '{}'",
            ctx.name,
            ctx.command("resume")
        ),
        RunState::GuestPanicked | RunState::InternalError | RunState::IoError | RunState::Shutdown => anyhow::bail!(
            "instance '{}' does not run its guest (QEMU's state: {state}), so it cannot answer SSH: see '{}'",
            ctx.name,
            ctx.command("status")
        ),
        // Running, or a moment of a snapshot's save or load.
        _ => Ok(()),
    }
}

/// How OpenSSH reaches the instance, from its saved settings (it need not
/// run).
pub fn ssh_target(ctx: &Ctx) -> Result<(Instance, Target)> {
    ssh_target_and_settings(ctx).map(|(inst, _, t)| (inst, t))
}

/// [`ssh_target`] and the saved settings it came from.
pub fn ssh_target_and_settings(ctx: &Ctx) -> Result<(Instance, Settings, Target)> {
    let inst = ctx.existing()?;
    let s: Settings = read_json(&inst.settings())?.ok_or_else(|| {
        anyhow::anyhow!("instance '{}' has no settings yet: launch it first ('{}')", ctx.name, ctx.command("launch"))
    })?;
    let key = super::spec::ssh_key_for(&ctx.state, &s)?;
    let t = Target::for_instance(&inst, s.ssh_port, &s.ssh_user, &key);
    Ok((inst, s, t))
}

/// [`ssh_target`] of an instance that runs now.
pub fn running_target(ctx: &Ctx) -> Result<(Instance, Target)> {
    let (inst, t) = ssh_target(ctx)?;
    if Liveness::probe(&inst)?.is_stopped() {
        anyhow::bail!("instance '{}' is not running: start it with '{}'", ctx.name, ctx.command("launch"));
    }
    Ok((inst, t))
}
