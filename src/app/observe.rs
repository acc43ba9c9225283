//! Reaching into a VM to look and poke: `ssh` (and the SSH target that
//! `copy`, `ssh-config` and `reboot` use), `qmp` and `console`.

use anyhow::Result;
use serde_json::{json, Value};

use super::Ctx;
use crate::config::Settings;
use crate::instance::{read_json, Instance, Liveness};
use crate::machine::Vm;
use crate::qemu::parse::RunState;
use crate::report::print_line;
use crate::ssh::Target;

/// `console`: the terminal attached to the guest's serial console.
pub fn console(ctx: &Ctx) -> Result<i32> {
    if ctx.json {
        return usage("this command streams the guest's console as text; --json does not apply");
    }
    let vm = Vm::running(&ctx.existing()?)?;
    crate::console::attach(&vm.inst.console(), &ctx.name)?;
    Ok(0)
}

/// `--json` given to a command whose stdout is a stream of text: refused
/// as a usage error with stdout left empty (no document could describe it).
pub fn usage(msg: &str) -> Result<i32> {
    eprintln!("qbuf-qemu: error: {msg}");
    Ok(2)
}

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
    let panic = super::ready::console_panic(&inst)
        .filter(|_| crate::ssh::banner(t.port, std::time::Duration::from_secs(1)).is_none());
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
    let Ok(state) = vm.run_state_within(std::time::Duration::from_secs(5)) else { return Ok(()) };
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

/// `qmp COMMAND [JSON]`: QEMU's raw reply; a refusal is a typed failure.
pub fn qmp(ctx: &Ctx, command: &str, arguments: Option<&str>, timeout: std::time::Duration) -> Result<i32> {
    let args = parse_arguments(arguments).map_err(crate::report::error::Usage)?;
    let reply = Vm::running(&ctx.existing()?)?.execute_raw(command, args, timeout)?;
    print_line(&serde_json::to_string_pretty(&reply)?)?;
    Ok(0)
}

/// `qbuf-qemu qmp COMMAND [ARGS]`'s argument: a JSON object, or nothing.
pub fn parse_arguments(text: Option<&str>) -> Result<Value, String> {
    let Some(text) = text else { return Ok(json!({})) };
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(other) => Err(format!(
            "QMP arguments must be a JSON object, not {other}: e.g. '{{\"id\": \"disk1\"}}' (quote it for the shell)"
        )),
        Err(e) => Err(format!(
            "QMP arguments are not valid JSON ({e}): e.g. '{{\"id\": \"disk1\"}}' (quote it for the shell)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_must_be_a_json_object() {
        assert_eq!(parse_arguments(None).unwrap(), json!({}));
        assert_eq!(parse_arguments(Some(r#"{"id": "d1"}"#)).unwrap(), json!({"id": "d1"}));
        let e = parse_arguments(Some("{id: d1}")).unwrap_err();
        assert!(e.contains("not valid JSON") && e.contains("quote it"), "{e}");
        let e = parse_arguments(Some("[1]")).unwrap_err();
        assert!(e.contains("must be a JSON object"), "{e}");
    }
}
