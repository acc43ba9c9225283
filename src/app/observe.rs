//! Reaching into a VM to look and poke: `ssh`, `qmp`, `events`, `logs`,
//! `console` and `doctor`.

use std::io::Write;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::vm::Vm;
use super::{done, Ctx};
use crate::cli::Command;
use crate::config::Settings;
use crate::instance::{read_json, Lock};
use crate::report::error::Failure;
use crate::report::events::{EventLine, Events, SerialLog};
use crate::report::{print_line, write_stdout};

pub fn run(ctx: &Ctx, command: Command) -> Result<i32> {
    match command {
        Command::Ssh { .. } if ctx.json => {
            usage("ssh passes the remote command's output through as it is; --json does not apply (drop it)")
        }
        Command::Ssh { args } => ssh(ctx, &args),
        Command::Qmp { command, arguments, timeout } => qmp(ctx, &command, arguments.as_deref(), timeout),
        Command::Events { follow: true } => follow_events(ctx),
        Command::Events { follow: false } => {
            let inst = ctx.existing()?;
            done(ctx, &Events { name: ctx.name.clone(), events: read_events(&inst.events_log())? })
        }
        Command::Console | Command::Logs { follow: true } if ctx.json => {
            usage("this command streams the guest's console as text; --json does not apply")
        }
        Command::Console => {
            let vm = Vm::running(ctx)?;
            crate::console::attach(&vm.inst.console(), &ctx.name)?;
            Ok(0)
        }
        Command::Logs { follow: true } => {
            let path = ctx.existing()?.serial_log();
            crate::logs::follow(&path, 0, write_stdout)?;
            Ok(0)
        }
        Command::Logs { follow: false } => {
            let log = serial_log(ctx)?;
            if ctx.json {
                done(ctx, &log)
            } else {
                write_stdout(log.text.as_bytes())?;
                Ok(0)
            }
        }
        Command::Doctor => done(ctx, &crate::doctor::run(&ctx.instance())),
        other => unreachable!("{other:?} is dispatched by app::run"),
    }
}

/// `--json` given to a command whose stdout is a stream of text: refused
/// as a usage error with stdout left empty (no document could describe it).
fn usage(msg: &str) -> Result<i32> {
    eprintln!("qbuf-qemu: error: {msg}");
    Ok(2)
}

/// `ssh -- ARGS…`: OpenSSH with the instance's key and pinned host key.
fn ssh(ctx: &Ctx, args: &[String]) -> Result<i32> {
    let inst = ctx.existing()?;
    let s: Settings = read_json(&inst.settings())?
        .ok_or_else(|| anyhow::anyhow!("instance '{}' has no settings: launch it first", ctx.name))?;
    if !Lock::is_held(&inst)? {
        anyhow::bail!("instance '{}' is not running: start it with '{}'", ctx.name, ctx.command("launch"));
    }
    let key = match &s.ssh_key {
        Some(k) => k.clone(),
        None => crate::ssh::ensure_user_key(&ctx.state)?,
    };
    let t = crate::ssh::Target::for_instance(&inst, s.ssh_port, &s.ssh_user, &key);
    crate::ssh::run_interactive(&t, &inst, args)
}

/// `qmp COMMAND [JSON]`: QEMU's raw reply; a refusal is a typed failure.
fn qmp(ctx: &Ctx, command: &str, arguments: Option<&str>, timeout: std::time::Duration) -> Result<i32> {
    let args = match parse_arguments(arguments) {
        Ok(v) => v,
        Err(m) => return usage(&m),
    };
    let vm = Vm::running(ctx)?;
    match vm.call(command, args, timeout)? {
        Ok(reply) => {
            print_line(&serde_json::to_string_pretty(&reply)?)?;
            Ok(0)
        }
        Err(crate::qmp::QmpError::Qemu { class, desc }) => {
            Err(Failure::QmpError { command: command.into(), class, desc }.into())
        }
        Err(e) => Err(anyhow::anyhow!("'{command}' failed: {e}")),
    }
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

/// Every event recorded so far.
fn read_events(path: &std::path::Path) -> Result<Vec<EventLine>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.lines().filter_map(EventLine::parse).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `events --follow`: what was recorded, then each new event as it comes;
/// with `--json`, one JSON object per line (JSON Lines).
fn follow_events(ctx: &Ctx) -> Result<i32> {
    let path = ctx.existing()?.events_log();
    let mut partial = Vec::new();
    crate::logs::follow(&path, 0, |chunk| {
        partial.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            if let Some(ev) = EventLine::parse(&String::from_utf8_lossy(&line)) {
                let text = if ctx.json { serde_json::to_string(&ev)? } else { ev.human() };
                writeln!(out, "{text}")?;
            }
        }
        write_stdout(&out)
    })?;
    Ok(0)
}

fn serial_log(ctx: &Ctx) -> Result<SerialLog> {
    let path = ctx.existing()?.serial_log();
    let text = match std::fs::read(&path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(SerialLog { name: ctx.name.clone(), path, text })
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
