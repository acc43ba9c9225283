//! How a VM stopped, as data: the stop ladder's steps (`StopMethod`,
//! `StopStep`, `StepAction`), its outcome, the stop record (stopped.json)
//! and why QEMU ended (`StopCause`). `report::stop` words them.

use serde::{Deserialize, Serialize};

use super::proc::ExitInfo;
use crate::qmp::Event;

/// The step of the stop ladder that ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopMethod {
    Powerdown,
    GuestAgent,
    Quit,
    /// The contract's `sigterm` step: QEMU told to terminate by a signal.
    /// The signal is SIGINT, which QEMU handles like SIGTERM: QEMU runs
    /// with SIGTERM blocked, so that only its supervisor hears the host's.
    #[serde(rename = "sigterm")]
    TermSignal,
    Sigkill,
    AlreadyStopped,
}

impl StopMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            StopMethod::Powerdown => "powerdown",
            StopMethod::GuestAgent => "guest-agent",
            StopMethod::Quit => "quit",
            StopMethod::TermSignal => "sigterm",
            StopMethod::Sigkill => "sigkill",
            StopMethod::AlreadyStopped => "already-stopped",
        }
    }

    /// The guest shut itself down (or nothing had to be done).
    pub fn graceful(self) -> bool {
        matches!(self, StopMethod::Powerdown | StopMethod::GuestAgent | StopMethod::AlreadyStopped)
    }

    pub fn parse(s: &str) -> Option<StopMethod> {
        use StopMethod::*;
        [Powerdown, GuestAgent, Quit, TermSignal, Sigkill, AlreadyStopped].into_iter().find(|m| m.as_str() == s)
    }
}

/// What one step of a stop did, when (seconds since the stop began).
/// `report::stop` words it; stopped.json keeps it as data. A record of an
/// older qbuf-qemu has `METHOD: NOTE` strings, read as [`StepAction::Note`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StepWire")]
pub struct StopStep {
    /// The ladder step it belongs to; `None` for a line without one.
    pub method: Option<StopMethod>,
    #[serde(flatten)]
    pub action: StepAction,
    pub after_seconds: f64,
}

/// What a step of the ladder did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum StepAction {
    /// The step's request went out: the power button pressed, the agent
    /// asked, `quit` accepted, the signal sent.
    Sent,
    /// QEMU accepted `quit` and closed QMP at once.
    QuitClosedQmp,
    /// The step could not be taken: no QMP connection, no guest agent.
    Skipped,
    /// QEMU, the agent or the OS refused the step, in their words.
    Failed { error: String },
    /// The VM was paused (no power button reaches a paused guest): resumed
    /// first.
    ResumedFirst,
    /// The VM was paused and `cont` failed, in QEMU's words.
    ResumeFailed { error: String },
    /// The user forced the stop while the guest's step waited.
    Forced,
    /// QEMU still ran when the step's wait ended.
    StillRunning,
    /// A step recorded as text by an older qbuf-qemu.
    Note { text: String },
}

impl StopStep {
    pub fn new(method: StopMethod, action: StepAction, after: std::time::Duration) -> StopStep {
        StopStep { method: Some(method), action, after_seconds: after.as_secs_f64() }
    }
}

/// A step as stored: typed, or an older build's `METHOD: NOTE` line.
#[derive(Deserialize)]
#[serde(untagged)]
enum StepWire {
    Typed {
        method: Option<StopMethod>,
        #[serde(flatten)]
        action: StepAction,
        #[serde(default)]
        after_seconds: f64,
    },
    Line(String),
}

impl From<StepWire> for StopStep {
    fn from(w: StepWire) -> StopStep {
        match w {
            StepWire::Typed { method, action, after_seconds } => StopStep { method, action, after_seconds },
            StepWire::Line(text) => {
                let (method, text) = match text.split_once(": ").and_then(|(m, n)| Some((StopMethod::parse(m)?, n))) {
                    Some((m, note)) => (Some(m), note.to_string()),
                    None => (None, text),
                };
                StopStep { method, action: StepAction::Note { text }, after_seconds: 0.0 }
            }
        }
    }
}

/// The result of a stop, as the user sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopOutcome {
    /// The step that stopped the VM; `None` if nothing could.
    pub method: Option<StopMethod>,
    /// The last `SHUTDOWN` reason QEMU reported, e.g. `guest-shutdown`.
    pub shutdown_reason: Option<String>,
    /// `SHUTDOWN`'s `guest` flag: the guest powered itself off.
    pub guest: bool,
    pub seconds: f64,
    pub exit: Option<ExitInfo>,
    /// What happened at each step, for the log and the user.
    pub steps: Vec<StopStep>,
}

impl StopOutcome {
    /// What a stop that found QEMU already gone reports, with how it ended
    /// when that was recorded.
    pub fn already_stopped(record: Option<&StopRecord>) -> StopOutcome {
        let shutdown = record.and_then(|r| r.shutdown.as_ref()).and_then(Event::shutdown);
        StopOutcome {
            method: Some(StopMethod::AlreadyStopped),
            guest: shutdown.as_ref().is_some_and(|s| s.0),
            shutdown_reason: shutdown.map(|s| s.1),
            seconds: 0.0,
            exit: record.and_then(|r| r.exit),
            steps: vec![],
        }
    }
}

/// How the VM ended (stopped.json); `status` reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopRecord {
    pub stopped_at: f64,
    pub exit: Option<ExitInfo>,
    pub shutdown: Option<Event>,
    /// Set when the stop ladder ended it.
    pub outcome: Option<StopOutcome>,
    /// GUEST_PANICKED, when the guest panicked before the end.
    #[serde(default)]
    pub panicked: Option<Event>,
    pub crashed: bool,
    /// Why QEMU ended; `None` in a record of an older qbuf-qemu, which
    /// wrote only `reason`.
    #[serde(default)]
    pub cause: Option<StopCause>,
    /// The sentence an older qbuf-qemu wrote instead of `cause` (kept to
    /// read its records; `report::stop` words a `cause` itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why QEMU ended, judged from a guest panic, its last `SHUTDOWN` and its
/// exit status; `by` is the ladder step of qbuf-qemu's that ended it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopCause {
    pub kind: StopKind,
    pub by: Option<StopMethod>,
}

/// The kinds of [`StopCause`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StopKind {
    /// The serial console showed the kernel's panic (a guest kernel
    /// without a pvpanic driver, which QEMU never hears of).
    ConsolePanic { line: String },
    /// QEMU's `GUEST_PANICKED`, or a `SHUTDOWN` for a guest panic.
    GuestPanicked,
    /// The guest shut itself down (`SHUTDOWN` with `guest: true`).
    GuestShutdown { reason: String },
    /// A termination signal from the host (`host-signal`).
    HostSignal,
    /// QMP `quit` (`host-qmp-quit`).
    QmpQuit,
    /// Another stop the host asked for, by QEMU's reason.
    HostRequest { reason: String },
    /// QEMU exited without a `SHUTDOWN` while qbuf-qemu stopped it.
    Exited { exit: ExitInfo },
    /// QEMU exited without a `SHUTDOWN`, and nobody was stopping it.
    Crashed { exit: ExitInfo },
    /// A ladder step ended a QEMU this process is not the parent of: no
    /// exit status, and its `SHUTDOWN` may not have been read.
    Stopped,
    /// Nothing tells: no exit status, no event, no stop.
    Unknown,
}

impl StopCause {
    /// A crash: the guest's kernel or QEMU died, nobody stopped them.
    pub fn crashed(&self) -> bool {
        matches!(
            self.kind,
            StopKind::ConsolePanic { .. } | StopKind::GuestPanicked | StopKind::Crashed { .. } | StopKind::Unknown
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_stop_step_reads_back_as_it_was_written_and_an_older_line_as_a_note() {
        let step =
            StopStep::new(StopMethod::Quit, StepAction::Failed { error: "no".into() }, Duration::from_millis(1500));
        let v = serde_json::to_value(&step).unwrap();
        assert_eq!(v, serde_json::json!({"method": "quit", "action": "failed", "error": "no", "after_seconds": 1.5}));
        assert_eq!(serde_json::from_value::<StopStep>(v).unwrap(), step);
        let old: StopStep = serde_json::from_str("\"guest-agent: asked: guest-shutdown\"").unwrap();
        let note = StepAction::Note { text: "asked: guest-shutdown".into() };
        assert_eq!(old, StopStep { method: Some(StopMethod::GuestAgent), action: note, after_seconds: 0.0 });
        let odd: StopStep = serde_json::from_str("\"no method here\"").unwrap();
        assert_eq!(odd.method, None);
    }

    #[test]
    fn method_names_are_the_documented_ones() {
        let names: Vec<_> = [
            StopMethod::Powerdown,
            StopMethod::GuestAgent,
            StopMethod::Quit,
            StopMethod::TermSignal,
            StopMethod::Sigkill,
            StopMethod::AlreadyStopped,
        ]
        .iter()
        .map(|m| serde_json::to_value(m).unwrap().as_str().unwrap().to_string())
        .collect();
        assert_eq!(names, ["powerdown", "guest-agent", "quit", "sigterm", "sigkill", "already-stopped"]);
    }
}
