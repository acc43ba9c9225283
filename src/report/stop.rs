//! What `powerdown` and `destroy` report.

use std::path::PathBuf;

use serde::Serialize;

use super::Render;
use crate::instance::proc::ExitInfo;
use crate::instance::records::{StepAction, StopCause, StopKind, StopMethod, StopOutcome, StopRecord, StopStep};

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

/// One step of a stop in words: `METHOD: what happened`.
pub fn describe_step(s: &StopStep) -> String {
    use StopMethod as M;
    let words = match (&s.action, s.method) {
        (StepAction::Sent, Some(M::Powerdown)) => "pressed the ACPI power button (system_powerdown)".into(),
        (StepAction::Sent, Some(M::GuestAgent)) => "asked the guest agent to power off (guest-shutdown)".into(),
        (StepAction::Sent, Some(M::Quit)) => "QEMU accepted quit".into(),
        (StepAction::Sent, Some(M::TermSignal)) => {
            "sent QEMU its termination signal (SIGINT; SIGTERM is blocked in QEMU)".into()
        }
        (StepAction::Sent, Some(M::Sigkill)) => "sent SIGKILL".into(),
        (StepAction::Sent, _) => "done".into(),
        (StepAction::QuitClosedQmp, _) => "QEMU accepted quit and closed QMP".into(),
        (StepAction::Skipped, Some(M::GuestAgent)) => "no guest agent; skipped".into(),
        (StepAction::Skipped, _) => "no QMP connection; skipped".into(),
        (StepAction::Failed { error }, Some(M::Powerdown)) => format!("system_powerdown failed: {error}"),
        (StepAction::Failed { error }, Some(M::Quit)) => format!("quit failed: {error}"),
        (StepAction::Failed { error }, Some(M::TermSignal)) => format!("signal failed: {error}"),
        (StepAction::Failed { error }, Some(M::Sigkill)) => format!("SIGKILL failed: {error}"),
        (StepAction::Failed { error }, _) => error.clone(),
        (StepAction::ResumedFirst, _) => {
            "the VM was paused, where the guest cannot see the power button: resumed it (cont) first".into()
        }
        (StepAction::ResumeFailed { error }, _) => {
            format!("the VM is paused and could not be resumed ({error}): the guest cannot see the power button")
        }
        (StepAction::Forced, _) => format!("forced on request after {:.0}s: going on at quit", s.after_seconds),
        (StepAction::StillRunning, _) => format!("QEMU still running after {:.0}s", s.after_seconds),
        (StepAction::Note { text }, _) => text.clone(),
    };
    match s.method {
        Some(m) => format!("{}: {words}", m.as_str()),
        None => words,
    }
}

/// What `powerdown` (and `destroy`'s stop) report. The JSON has the
/// ladder's outcome's fields, with `steps` in words as before and the same
/// steps as data in `step_details`.
#[derive(Debug, Clone, Serialize)]
pub struct StopReport {
    pub name: String,
    /// The step that stopped the VM; `None` when nothing could.
    pub method: Option<StopMethod>,
    pub shutdown_reason: Option<String>,
    pub guest: bool,
    pub seconds: f64,
    pub exit: Option<ExitInfo>,
    /// What happened at each step, in words (`METHOD: …`).
    pub steps: Vec<String>,
    /// The same steps as data: `method`, `action` (with `error` when it
    /// failed), `after_seconds`.
    pub step_details: Vec<StopStep>,
    /// Why QEMU ended, in one sentence (from the stop record).
    pub reason: Option<String>,
    /// The command that stops it by hand when nothing could.
    #[serde(skip)]
    pub status_command: String,
}

impl StopReport {
    pub fn from_outcome(name: &str, o: &StopOutcome, reason: Option<String>, status_command: String) -> StopReport {
        StopReport {
            name: name.into(),
            method: o.method,
            shutdown_reason: o.shutdown_reason.clone(),
            guest: o.guest,
            seconds: o.seconds,
            exit: o.exit,
            steps: o.steps.iter().map(describe_step).collect(),
            step_details: o.steps.clone(),
            reason,
            status_command,
        }
    }

    /// The step that stopped the VM.
    pub fn method(&self) -> Option<StopMethod> {
        self.method
    }

    /// The contract's exit code: 0 graceful or already stopped, 3
    /// escalated but stopped, 1 still running.
    pub fn exit_code(&self) -> i32 {
        match self.method {
            Some(m) if m.graceful() => 0,
            Some(_) => 3,
            None => 1,
        }
    }
}

impl Render for StopReport {
    fn human(&self) -> String {
        let reason = self.shutdown_reason.clone().unwrap_or_else(|| "no SHUTDOWN event".into());
        let steps = || self.steps.join("\n  ");
        match self.method {
            Some(StopMethod::AlreadyStopped) => format!("Instance '{}' is already stopped.", self.name),
            Some(m @ (StopMethod::Powerdown | StopMethod::GuestAgent)) => format!(
                "Instance '{}' powered off by itself after {} ({reason}) in {:.1}s.",
                self.name,
                if m == StopMethod::Powerdown { "the ACPI power button" } else { "the guest agent's shutdown" },
                self.seconds
            ),
            Some(m) if !self.step_details.iter().any(|s| s.method == Some(StopMethod::Powerdown)) => format!(
                "Instance '{}' stopped by '{}' ({reason}) after {:.1}s; --force skipped the guest's own shutdown.\nsteps:\n  {}",
                self.name,
                m.as_str(),
                self.seconds,
                steps()
            ),
            Some(m) => format!(
                "Instance '{}' did not power off by itself; stopped by '{}' ({reason}) after {:.1}s.\nsteps:\n  {}",
                self.name,
                m.as_str(),
                self.seconds,
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

    #[test]
    fn steps_are_data_in_step_details_and_words_in_steps() {
        use std::time::Duration;
        let steps = vec![
            StopStep::new(StopMethod::Powerdown, StepAction::ResumedFirst, Duration::ZERO),
            StopStep::new(StopMethod::Powerdown, StepAction::StillRunning, Duration::from_secs(30)),
            StopStep::new(StopMethod::Quit, StepAction::Failed { error: "timed out".into() }, Duration::from_secs(35)),
            StopStep::new(StopMethod::TermSignal, StepAction::Sent, Duration::from_secs(35)),
        ];
        let o = StopOutcome {
            method: Some(StopMethod::TermSignal),
            shutdown_reason: None,
            guest: false,
            seconds: 36.0,
            exit: None,
            steps,
        };
        let v = serde_json::to_value(StopReport::from_outcome("dev", &o, None, String::new())).unwrap();
        assert_eq!(v["method"], "sigterm");
        assert_eq!(v["steps"][1], "powerdown: QEMU still running after 30s");
        assert_eq!(v["steps"][2], "quit: quit failed: timed out");
        assert!(v["steps"][0].as_str().unwrap().contains("resumed it (cont) first"), "{v}");
        assert!(
            v["steps"][3].as_str().unwrap().starts_with("sigterm: sent QEMU its termination signal (SIGINT"),
            "{v}"
        );
        assert_eq!(
            v["step_details"][2],
            serde_json::json!({"method": "quit", "action": "failed", "error": "timed out", "after_seconds": 35.0})
        );
    }
}
