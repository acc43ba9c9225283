//! A running VM as the commands see it: its supervisor's control socket
//! behind a synchronous face, QMP typed where QEMU's schema is the same in
//! every supported QEMU, and the device, migration and user-network jobs
//! that take several QMP (or HMP) exchanges, each judged here so the
//! command layer only orchestrates.
//!
//! "Running" means the instance lock is held and the supervisor's control
//! socket exists; nothing here talks to QEMU's own sockets directly (QMP
//! serves one client per socket and the supervisor holds it).

pub mod disks;
pub mod migration;
pub mod reset;
pub mod usernet;

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::instance::records::BootPlan;
use crate::instance::{Instance, Liveness};
use crate::qemu::parse::RunState;
use crate::qmp::{ErrorClass, QmpError};
use crate::runtime::block_on;
use crate::supervisor::client;
use crate::timeouts::QMP_QUERY;

/// QEMU refused a QMP command: its error class and words.
#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    pub command: String,
    pub class: ErrorClass,
    pub desc: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QEMU refused '{}': {}: {}", self.command, self.class, self.desc)
    }
}

impl std::error::Error for Refused {}

/// A running instance, reached through its supervisor.
#[derive(Debug, Clone)]
pub struct Vm {
    pub inst: Instance,
}

impl Vm {
    /// The instance if it runs now; `None` if it is stopped. An instance
    /// that is starting or stopping is an error (a device change then
    /// would race the boot or the shutdown), and so is a QEMU whose
    /// supervisor died (nothing holds its QMP for a command to use).
    pub fn if_running(inst: &Instance) -> Result<Option<Vm>> {
        match Liveness::probe(inst)? {
            Liveness::Stopped => Ok(None),
            Liveness::Supervised(_) => Ok(Some(Vm { inst: inst.clone() })),
            Liveness::Orphaned(run) => bail!(
                "instance '{}' runs (QEMU pid {}), but its supervisor died, so it takes no commands: stop it \
                 with '{}' and launch it again",
                inst.name,
                run.qemu.pid,
                inst.command("powerdown")
            ),
            Liveness::Busy => bail!(
                "instance '{}' is starting or stopping: try again in a moment, or see '{}'",
                inst.name,
                inst.command("status")
            ),
        }
    }

    /// The running instance, or an error that says how to start it.
    pub fn running(inst: &Instance) -> Result<Vm> {
        Vm::if_running(inst)?.ok_or_else(|| {
            anyhow!("instance '{}' is not running: start it with '{}'", inst.name, inst.command("launch"))
        })
    }

    /// A QMP command by name; QEMU's own refusal is the inner `Err`.
    fn call(&self, command: &str, arguments: Value, timeout: Duration) -> Result<Result<Value, QmpError>> {
        block_on(client::qmp(&self.inst.control(), command, arguments, timeout))
    }

    /// A QMP command by name (the `qmp` verb's, or one whose schema differs
    /// between the QEMUs supported); its refusal is a [`Refused`].
    pub fn execute_raw(&self, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
        match self.call(command, arguments, timeout)? {
            Ok(v) => Ok(v),
            Err(QmpError::Qemu { class, desc }) => Err(Refused { command: command.into(), class, desc }.into()),
            Err(e) => Err(anyhow!("'{command}' failed: {e}")),
        }
    }

    /// [`Vm::execute_raw`] within [`QMP_QUERY`].
    fn query(&self, command: &str, arguments: Value) -> Result<Value> {
        self.execute_raw(command, arguments, QMP_QUERY)
    }

    /// A QMP command as qapi's schema types it: its arguments serialized,
    /// QEMU's answer read back as the command's return type. For commands
    /// whose schema is the same in every QEMU this tool supports.
    pub fn run<C: qapi::Command>(&self, cmd: &C) -> Result<C::Ok> {
        let v = self.query(C::NAME, serde_json::to_value(cmd)?)?;
        serde_json::from_value(v).map_err(|e| {
            anyhow!(
                "QEMU's answer to '{}' is not what its schema says ({e}): is this a QEMU qbuf-qemu supports? '{}' checks",
                C::NAME,
                self.inst.command("doctor")
            )
        })
    }

    /// QEMU's run state (`running`, `paused`, …), within `timeout`.
    pub fn run_state_within(&self, timeout: Duration) -> Result<RunState> {
        Ok(RunState::of_query_status(&self.execute_raw("query-status", json!({}), timeout)?))
    }

    /// QEMU's run state.
    pub fn run_state(&self) -> Result<RunState> {
        self.run_state_within(QMP_QUERY)
    }

    /// An HMP command line through `human-monitor-command`: QEMU's text,
    /// with `\r\n` made `\n`. HMP reports failures as text, not as QMP
    /// errors (see qmp-fixtures/*/hmp-usernet.jsonl), so the caller judges it.
    fn hmp(&self, line: &str) -> Result<String> {
        let out = self.run(&qapi::qmp::human_monitor_command { command_line: line.into(), cpu_index: None })?;
        Ok(out.replace("\r\n", "\n"))
    }

    /// The hot-plug root ports QEMU was started with (from boot.json).
    pub fn hotplug_ports(&self) -> Result<u32> {
        let plan: BootPlan = crate::instance::read_json(&self.inst.boot_plan())?
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
