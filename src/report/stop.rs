//! What `powerdown` and `destroy` report.

use std::path::PathBuf;

use serde::Serialize;

use super::Render;
use crate::instance::records::{StopMethod, StopOutcome};

#[derive(Debug, Clone, Serialize)]
pub struct StopReport {
    pub name: String,
    /// What the ladder did: `method` (the step that stopped the VM; `None`
    /// when nothing could), `shutdown_reason`, `guest`, `seconds`, `exit`,
    /// `steps`.
    #[serde(flatten)]
    pub outcome: StopOutcome,
    /// Why QEMU ended, in one sentence (from the stop record).
    pub reason: Option<String>,
    /// The command that stops it by hand when nothing could.
    #[serde(skip)]
    pub status_command: String,
}

impl StopReport {
    pub fn from_outcome(name: &str, o: &StopOutcome, reason: Option<String>, status_command: String) -> StopReport {
        StopReport { name: name.into(), outcome: o.clone(), reason, status_command }
    }

    /// The step that stopped the VM.
    pub fn method(&self) -> Option<StopMethod> {
        self.outcome.method
    }

    /// The contract's exit code: 0 graceful or already stopped, 3
    /// escalated but stopped, 1 still running.
    pub fn exit_code(&self) -> i32 {
        match self.outcome.method {
            Some(m) if m.graceful() => 0,
            Some(_) => 3,
            None => 1,
        }
    }
}

impl Render for StopReport {
    fn human(&self) -> String {
        let o = &self.outcome;
        let reason = o.shutdown_reason.clone().unwrap_or_else(|| "no SHUTDOWN event".into());
        let steps = || o.steps.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ");
        match o.method {
            Some(StopMethod::AlreadyStopped) => format!("Instance '{}' is already stopped.", self.name),
            Some(m @ (StopMethod::Powerdown | StopMethod::GuestAgent)) => format!(
                "Instance '{}' powered off by itself after {} ({reason}) in {:.1}s.",
                self.name,
                if m == StopMethod::Powerdown { "the ACPI power button" } else { "the guest agent's shutdown" },
                o.seconds
            ),
            Some(m) if !o.steps.iter().any(|s| s.method == Some(StopMethod::Powerdown)) => format!(
                "Instance '{}' stopped by '{}' ({reason}) after {:.1}s; --force skipped the guest's own shutdown.\nsteps:\n  {}",
                self.name,
                m.as_str(),
                o.seconds,
                steps()
            ),
            Some(m) => format!(
                "Instance '{}' did not power off by itself; stopped by '{}' ({reason}) after {:.1}s.\nsteps:\n  {}",
                self.name,
                m.as_str(),
                o.seconds,
                steps()
            ),
            None => format!(
                "Instance '{}' could NOT be stopped; QEMU is still running.\nsteps:\n  {}\nKill it yourself (kill -9 PID, see '{}').",
                self.name,
                steps(),
                self.status_command
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Destroyed {
    pub name: String,
    /// The user answered no at the prompt: nothing was done (exit 0).
    pub declined: bool,
    pub stop: Option<StopReport>,
    pub removed: Vec<PathBuf>,
    /// Files in the instance directory that qbuf-qemu did not create.
    pub kept: Vec<PathBuf>,
    /// The instance directory, when it stays because of `kept`; it is no
    /// instance any more (`list` and `status` do not show it).
    pub kept_dir: Option<PathBuf>,
}

impl Destroyed {
    /// The stop's exit code (the contract's 0 or 3; 3 when the guest's own
    /// shutdown was skipped or ignored, `--force` included); 0 when nothing
    /// had to be stopped or the user declined.
    pub fn exit_code(&self) -> i32 {
        self.stop.as_ref().map(StopReport::exit_code).unwrap_or(0)
    }
}

impl Render for Destroyed {
    fn human(&self) -> String {
        if self.declined {
            return format!("Nothing was done: instance '{}' is kept.", self.name);
        }
        let mut s = String::new();
        if let Some(st) = &self.stop {
            s.push_str(&st.human());
            s.push('\n');
        }
        s.push_str(&format!("Instance '{}' destroyed ({} files removed).", self.name, self.removed.len()));
        if let Some(dir) = &self.kept_dir {
            let names: Vec<String> =
                self.kept.iter().map(|k| k.file_name().unwrap_or(k.as_os_str()).to_string_lossy().into()).collect();
            s.push_str(&format!(
                "\nKept {} because it holds files qbuf-qemu did not create: {}. They are yours: remove them when you no longer need them.",
                dir.display(),
                names.join(", ")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        let o = |method| {
            let outcome =
                StopOutcome { method, shutdown_reason: None, guest: false, seconds: 0.0, exit: None, steps: vec![] };
            StopReport::from_outcome("dev", &outcome, None, String::new()).exit_code()
        };
        assert_eq!(o(Some(StopMethod::Powerdown)), 0);
        assert_eq!(o(Some(StopMethod::GuestAgent)), 0);
        assert_eq!(o(Some(StopMethod::AlreadyStopped)), 0);
        assert_eq!(o(Some(StopMethod::Quit)), 3);
        assert_eq!(o(Some(StopMethod::Sigkill)), 3);
        assert_eq!(o(None), 1);
    }
}
