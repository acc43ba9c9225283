//! What `pause`, `resume` and `reboot` report.

use serde::Serialize;

use super::Render;
use crate::qemu::parse::RunState;

/// What `pause` and `resume` did to the VM's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerAction {
    Pause,
    Resume,
}

/// `pause` or `resume`.
#[derive(Debug, Clone, Serialize)]
pub struct RunStateChanged {
    pub name: String,
    pub action: PowerAction,
    /// QEMU's run state before and after (`running`, `paused`, …).
    pub before: RunState,
    pub after: RunState,
    /// The command that undoes it.
    #[serde(skip)]
    pub undo_command: String,
}

impl Render for RunStateChanged {
    fn human(&self) -> String {
        match (self.action, self.before == self.after) {
            (PowerAction::Pause, true) => format!("Instance '{}' was already paused. Resume it with '{}'.", self.name, self.undo_command),
            (PowerAction::Pause, false) => format!(
                "Instance '{}' is paused: its CPUs are stopped (memory and devices are kept), so SSH and the console do not answer. Resume it with '{}'.",
                self.name, self.undo_command
            ),
            (PowerAction::Resume, true) => format!("Instance '{}' was already running.", self.name),
            (PowerAction::Resume, false) => format!("Instance '{}' runs again (it was {}).", self.name, self.before),
        }
    }
}

/// How a reboot was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootMethod {
    /// The guest agent's `guest-shutdown` with mode `reboot`.
    GuestAgent,
    /// `reboot` run over SSH (with `sudo -n` for a user other than root).
    Ssh,
    /// QMP `system_reset`: the reset button, no clean shutdown.
    SystemReset,
}

impl RebootMethod {
    pub fn describe(self) -> &'static str {
        match self {
            RebootMethod::GuestAgent => "the guest rebooted itself (asked by the guest agent)",
            RebootMethod::Ssh => "the guest rebooted itself ('reboot' over SSH)",
            RebootMethod::SystemReset => "reset by QEMU (system_reset), like the reset button: no clean shutdown",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Rebooted {
    pub name: String,
    pub method: RebootMethod,
    /// Seconds until QEMU reported the reset.
    pub seconds: f64,
    /// Seconds until an SSH login worked again; `None` with `--no-wait`.
    pub ready_seconds: Option<f64>,
    /// What happened on the way (the guest's refusal, a resumed pause, …).
    pub notes: Vec<String>,
}

impl Render for Rebooted {
    fn human(&self) -> String {
        let mut s = String::new();
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s.push_str(&format!(
            "Instance '{}' rebooted: {} after {:.1}s.",
            self.name,
            self.method.describe(),
            self.seconds
        ));
        match self.ready_seconds {
            Some(t) => s.push_str(&format!("\nSSH answered again after {t:.1}s.")),
            None => s.push_str("\nNot waiting for SSH (--no-wait)."),
        }
        s
    }
}
