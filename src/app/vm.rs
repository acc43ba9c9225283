//! A running instance as the device and troubleshooting commands see it:
//! its supervisor's control socket behind a synchronous face.
//!
//! "Running" means the instance lock is held and the supervisor's control
//! socket exists; a command never talks to QEMU's own sockets directly (QMP
//! serves one client per socket and the supervisor holds it).

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::{block_on, Ctx};
use crate::instance::{Instance, Lock};
use crate::qmp::QmpError;
use crate::report::error::Failure;
use crate::supervisor::client;

/// How long a short QMP query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running instance, reached through its supervisor.
#[derive(Debug, Clone)]
pub struct Vm {
    pub inst: Instance,
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
        Ok(Some(Vm { inst }))
    }

    /// The running instance, or an error that says how to start it.
    pub fn running(ctx: &Ctx) -> Result<Vm> {
        Vm::if_running(ctx)?
            .ok_or_else(|| anyhow!("instance '{}' is not running: start it with '{}'", ctx.name, ctx.command("launch")))
    }

    /// A QMP command; QEMU's own refusal is the inner `Err`.
    pub fn call(&self, command: &str, arguments: Value, timeout: Duration) -> Result<Result<Value, QmpError>> {
        block_on(client::qmp(&self.inst.control(), command, arguments, timeout))
    }

    /// A QMP command whose refusal is a failure for the user.
    pub fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.execute_within(command, arguments, QUERY_TIMEOUT)
    }

    /// [`Vm::execute`] with its own deadline.
    pub fn execute_within(&self, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
        match self.call(command, arguments, timeout)? {
            Ok(v) => Ok(v),
            Err(QmpError::Qemu { class, desc }) => {
                Err(Failure::QmpError { command: command.into(), class, desc }.into())
            }
            Err(e) => Err(anyhow!("'{command}' failed: {e}")),
        }
    }

    /// A QMP command as qapi's schema types it: its arguments serialized,
    /// QEMU's answer read back as the command's return type. For commands
    /// whose schema is the same in every QEMU this tool supports; the rest
    /// go through [`Vm::execute`].
    pub fn run<C: qapi::Command>(&self, cmd: &C) -> Result<C::Ok> {
        let v = self.execute(C::NAME, serde_json::to_value(cmd)?)?;
        serde_json::from_value(v).map_err(|e| {
            anyhow!(
                "QEMU's answer to '{}' is not what its schema says ({e}): is this a QEMU qbuf-qemu supports? '{}' checks",
                C::NAME,
                self.inst.command("doctor")
            )
        })
    }

    /// An HMP command line through `human-monitor-command`: QEMU's text,
    /// with `\r\n` made `\n`. HMP reports failures as text, not as QMP
    /// errors (see qmp-fixtures/*/hmp-usernet.jsonl), so the caller judges it.
    pub fn hmp(&self, line: &str) -> Result<String> {
        let v = self.execute("human-monitor-command", json!({ "command-line": line }))?;
        Ok(v.as_str().unwrap_or_default().replace("\r\n", "\n"))
    }

    /// The hot-plug root ports QEMU was started with (from boot.json).
    pub fn hotplug_ports(&self) -> Result<u32> {
        let plan: crate::instance::records::BootPlan = crate::instance::read_json(&self.inst.boot_plan())?
            .ok_or_else(|| missing_record(&self.inst, &self.inst.boot_plan()))?;
        Ok(plan.spec.hotplug_ports)
    }
}

/// A running instance without one of its records (`file`): removed by
/// hand, or a full disk. A fresh boot writes them all again.
pub fn missing_record(inst: &Instance, file: &std::path::Path) -> anyhow::Error {
    anyhow!(
        "instance '{}' runs without {}: stop it with '{}' and launch it again",
        inst.name,
        file.display(),
        inst.command("powerdown")
    )
}
