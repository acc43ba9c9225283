//! What `powerdown` and `destroy` report.

use std::path::PathBuf;

use serde::Serialize;

use super::Render;
use crate::instance::records::{StopCause, StopKind, StopMethod, StopOutcome, StopRecord};

/// Why QEMU ended, in one sentence: the record's cause worded, or the
/// sentence an older qbuf-qemu wrote.
pub fn stop_reason(rec: &StopRecord) -> String {
    match (&rec.cause, &rec.reason) {
        (Some(c), _) => describe_cause(c),
        (None, Some(r)) => r.clone(),
        (None, None) => "QEMU ended; this record does not say why".into(),
    }
}

/// A [`StopCause`] in words, naming QEMU's own reason where it gave one.
pub fn describe_cause(c: &StopCause) -> String {
    let by = c.by.map(|m| format!(" (stopped by qbuf-qemu: {})", m.as_str())).unwrap_or_default();
    match &c.kind {
        StopKind::ConsolePanic { line } => format!("the guest kernel panicked (its serial console: {line}){by}"),
        StopKind::GuestPanicked => format!("the guest kernel panicked (GUEST_PANICKED){by}"),
        StopKind::GuestShutdown { reason } => format!("the guest shut down ({reason}){by}"),
        StopKind::HostSignal => format!("QEMU got a termination signal from the host (host-signal){by}"),
        StopKind::QmpQuit => format!("QEMU was told to quit over QMP (host-qmp-quit){by}"),
        StopKind::HostRequest { reason } => format!("QEMU was told to stop ({reason}){by}"),
        StopKind::Exited { exit } => format!("QEMU ended, {exit}{by}"),
        StopKind::Crashed { exit } => format!("QEMU crashed or was killed: {exit}, without a shutdown event"),
        StopKind::Stopped => format!("QEMU ended{by}"),
        StopKind::Unknown => "QEMU ended unexpectedly; its exit status is unknown".into(),
    }
}

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

    #[test]
    fn causes_are_worded_with_qemus_reason_and_the_step_that_ended_them() {
        use crate::instance::proc::ExitInfo;
        let c = |kind, by| describe_cause(&StopCause { kind, by });
        let r = c(StopKind::GuestShutdown { reason: "guest-shutdown".into() }, None);
        assert_eq!(r, "the guest shut down (guest-shutdown)");
        let r = c(StopKind::Crashed { exit: ExitInfo { code: None, signal: Some(9) } }, None);
        assert!(r.contains("SIGKILL") && r.contains("crashed or was killed"), "{r}");
        let r = c(StopKind::Crashed { exit: ExitInfo { code: Some(1), signal: None } }, None);
        assert!(r.contains("exit status 1"), "{r}");
        let r = c(StopKind::HostSignal, None);
        assert!(r.contains("signal from the host (host-signal)"), "{r}");
        let r = c(StopKind::GuestPanicked, Some(StopMethod::Quit));
        assert!(r.contains("panicked (GUEST_PANICKED)") && r.contains("stopped by qbuf-qemu: quit"), "{r}");
        let line = "[ 23.9] Kernel panic - not syncing: sysrq triggered crash";
        let r = c(StopKind::ConsolePanic { line: line.into() }, Some(StopMethod::Quit));
        assert!(r.contains(&format!("panicked (its serial console: {line})")), "{r}");
    }

    #[test]
    fn a_record_of_an_older_build_keeps_its_sentence() {
        let rec: StopRecord = serde_json::from_value(serde_json::json!({
            "stopped_at": 1.0, "exit": null, "shutdown": null, "outcome": null, "crashed": false,
            "reason": "the guest shut down (guest-shutdown)"
        }))
        .unwrap();
        assert_eq!(stop_reason(&rec), "the guest shut down (guest-shutdown)");
    }
}
