//! What `run` reports, on stderr or in `--summary FILE` (its stdout is
//! COMMAND's).

use serde::Serialize;

use super::Render;
use crate::guest_files::Unpacked;
use crate::instance::records::StopMethod;

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Ok,
    CommandFailed,
    /// `--timeout` expired (exit 124).
    TimedOut,
    /// A signal ended the run (exit 128+N).
    Interrupted,
    /// The VM could not be started or reached (exit 125).
    VmFailed,
    /// The guest's kernel panicked (its serial console said so; exit 125).
    GuestPanicked,
}

/// Seconds each phase took; `None` for a phase that did not run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// From `run` starting to QEMU up (from a snapshot: its state loaded).
    pub qemu_up: Option<f64>,
    /// From `run` starting to an SSH login working (boot or resume; from a
    /// snapshot, the guest's clock set and its shares mounted again too).
    pub boot: Option<f64>,
    pub command: Option<f64>,
    pub copy_out: Option<f64>,
    /// Stopping the VM and removing the instance.
    pub stop: Option<f64>,
    pub total: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub command: Vec<String>,
    pub from_snapshot: Option<String>,
    pub outcome: Outcome,
    /// The run's exit status.
    pub exit_code: i32,
    /// COMMAND's own exit status, when it ran to its end (null when it
    /// did not finish on its own: the deadline or a signal ended it).
    pub command_exit: Option<i32>,
    /// Where COMMAND ran in the guest; null: the SSH user's home directory.
    pub workdir: Option<String>,
    pub phases: Phases,
    /// The stop ladder's step that stopped the VM.
    pub stop_method: Option<StopMethod>,
    /// The VM was left running (`--keep`, `--keep-on-failure`).
    pub kept: bool,
    pub error: Option<String>,
    /// What `--copy-out` left out of the guest's files (`skipped`) or
    /// copied without setuid/setgid/sticky bits.
    #[serde(flatten)]
    pub copy_out: Unpacked,
}

impl RunSummary {
    pub fn new(name: &str, from_snapshot: Option<String>, command: &[String]) -> RunSummary {
        RunSummary {
            name: name.into(),
            command: command.to_vec(),
            from_snapshot,
            outcome: Outcome::VmFailed,
            exit_code: 0,
            command_exit: None,
            workdir: None,
            phases: Phases::default(),
            stop_method: None,
            kept: false,
            error: None,
            copy_out: Unpacked::default(),
        }
    }
}

impl Render for RunSummary {
    fn human(&self) -> String {
        let what = match (self.outcome, self.command_exit) {
            (Outcome::TimedOut, _) => "--timeout expired".to_string(),
            (Outcome::Interrupted, _) => format!("interrupted by a signal (exit {})", self.exit_code),
            (Outcome::VmFailed, _) => "the VM could not be started or reached".to_string(),
            (Outcome::GuestPanicked, _) => "the guest's kernel panicked (exit 125)".to_string(),
            (_, Some(c)) => format!("COMMAND exited {c}"),
            (_, None) => "COMMAND did not finish".to_string(),
        };
        let vm = match (self.kept, self.stop_method) {
            (true, _) => "VM kept running".to_string(),
            (false, Some(m)) => format!("VM stopped by {} and removed", m.as_str()),
            (false, None) => "nothing left running".to_string(),
        };
        let boot = self.phases.boot.map(|b| format!(", up in {b:.1}s")).unwrap_or_default();
        let skipped = match self.copy_out.skipped.len() as u64 + self.copy_out.skipped_unlisted {
            0 => String::new(),
            n if self.copy_out.skipped_unlisted > 0 => format!(
                "; --copy-out skipped {n} of the guest's entries (the first {} listed above)",
                self.copy_out.skipped.len()
            ),
            n => format!("; --copy-out skipped {n} of the guest's entries (listed above)"),
        };
        format!("{what}; {vm}{skipped} (total {:.1}s{boot})", self.phases.total)
    }
}
