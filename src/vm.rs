//! A running instance as the device and troubleshooting commands see it: its
//! supervisor's control socket behind a synchronous face, and `qbuf-qemu
//! qmp`, the raw QMP escape hatch.
//!
//! "Running" means the instance lock is held and the supervisor's control
//! socket exists; a command never talks to QEMU's own sockets directly (QMP
//! serves one client per socket and the supervisor holds it).

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::control;
use crate::instance::{Instance, Lock};
use crate::lifecycle::{block_on, Ctx};

/// How long a short QMP query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running instance, reached through its supervisor.
#[derive(Debug, Clone)]
pub struct Vm {
    pub inst: Instance,
    pub name: String,
}

impl Vm {
    /// The instance if it runs now; `None` if it is stopped. An instance
    /// that is starting or stopping (locked, no control socket) is an error:
    /// a device change then would race the boot or the shutdown.
    pub fn if_running(ctx: &Ctx) -> Result<Option<Vm>> {
        let inst = ctx.existing()?;
        if !Lock::is_held(&inst)? {
            return Ok(None);
        }
        if !inst.control().exists() {
            bail!(
                "instance '{}' is starting or stopping (or its supervisor died): try again in a moment, or see '{}'",
                ctx.name,
                ctx.command("status")
            );
        }
        Ok(Some(Vm { inst, name: ctx.name.clone() }))
    }

    /// The running instance, or an error that says how to start it.
    pub fn running(ctx: &Ctx) -> Result<Vm> {
        Vm::if_running(ctx)?
            .ok_or_else(|| anyhow!("instance '{}' is not running: start it with '{}'", ctx.name, ctx.command("launch")))
    }

    /// A QMP command; QEMU's own error comes back as `Err((class, desc))`.
    pub fn call(&self, command: &str, arguments: Value, timeout: Duration) -> Result<Result<Value, (String, String)>> {
        block_on(control::qmp(&self.inst.control(), command, arguments, timeout))
    }

    /// A QMP command whose error is a failure for the user.
    pub fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.call(command, arguments, QUERY_TIMEOUT)?
            .map_err(|(class, desc)| anyhow!("QEMU refused '{command}': {class}: {desc}"))
    }

    /// An HMP command line through `human-monitor-command`: QEMU's text,
    /// with `\r\n` made `\n`. HMP reports failures as text, not as QMP
    /// errors (see qmp-fixtures/*/hmp-usernet.jsonl), so the caller judges it.
    pub fn hmp(&self, line: &str) -> Result<String> {
        let v = self.execute("human-monitor-command", json!({ "command-line": line }))?;
        Ok(v.as_str().unwrap_or_default().replace("\r\n", "\n"))
    }

    pub fn info(&self) -> Result<control::Info> {
        block_on(control::info(&self.inst.control(), Duration::from_secs(3)))
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

/// QEMU's answer to a raw command.
pub type RawReply = Result<Value, (String, String)>;

/// Runs any QMP command on the running instance.
pub fn raw(ctx: &Ctx, command: &str, arguments: Value, timeout: Duration) -> Result<RawReply> {
    Vm::running(ctx)?.call(command, arguments, timeout)
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
