//! Failures with parts. Most errors are a sentence (anyhow's chain); the
//! ones a script wants to take apart are a [`Failure`], carried inside the
//! anyhow error and shown as fields under `detail` with `--json`.
//!
//! With `--json` every failure prints one document on stdout:
//! `{"error": "<the message>", "exit_code": N, "detail": {...} | null}`;
//! the message goes to stderr too.

use serde::Serialize;
use serde_json::{json, Value};

use crate::instance::records::LaunchFailure;
use crate::machine::Refused;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Failure {
    /// QEMU did not come up, or stopped while the guest was booting.
    LaunchFailed {
        #[serde(flatten)]
        failure: LaunchFailure,
        /// What to do about it.
        hint: Option<String>,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::LaunchFailed { failure: l, hint } => {
                write!(f, "{}", l.message)?;
                if let Some(e) = l.exit {
                    write!(f, "\nQEMU: {e}")?;
                }
                if !l.stderr_tail.is_empty() {
                    write!(f, "\nQEMU said:\n{}", l.stderr_tail)?;
                }
                if !l.serial_tail.is_empty() {
                    write!(f, "\nserial console (last lines):\n{}", l.serial_tail)?;
                }
                write!(f, "\ncommand line:\n{}", shell_words::join(&l.command_line))?;
                if let Some(h) = hint {
                    write!(f, "\n{h}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Failure {}

/// A bad value the parser could not judge alone (it needs the host or the
/// instance): a usage error, exit 2, before anything is touched.
#[derive(Debug, Clone)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A signal ended the command's work: the user stopped waiting (Ctrl-C)
/// for work that goes on without this command (the supervisor finishes a
/// stop), or a copy was cut short. Exit 128+N, as after signal N.
#[derive(Debug, Clone)]
pub struct Interrupted {
    pub signal: nix::sys::signal::Signal,
    pub message: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Interrupted {}

/// `run` could not start its VM before booting it (its source instance or
/// snapshot is missing, its --name is taken): exit 125, as for a VM that
/// failed to boot, and as `timeout(1)` exits when it fails itself.
#[derive(Debug, Clone)]
pub struct RunNotStarted;

impl std::fmt::Display for RunNotStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("run: the VM could not be started")
    }
}

/// The exit status an error ends the process with: 2 for usage, 128+N for
/// [`Interrupted`] by signal N, 125 for [`RunNotStarted`], else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<Usage>().is_some() {
        2
    } else if let Some(i) = e.downcast_ref::<Interrupted>() {
        128 + i.signal as i32
    } else if e.downcast_ref::<RunNotStarted>().is_some() {
        125
    } else {
        1
    }
}

/// The `--json` document for a failure.
pub fn error_document(e: &anyhow::Error, exit_code: i32) -> Value {
    let detail = match (e.downcast_ref::<Failure>(), e.downcast_ref::<Refused>()) {
        (Some(f), _) => Some(serde_json::to_value(f).unwrap_or(Value::Null)),
        // `kind` as a `Failure` would have it: scripts tell details apart by it.
        (None, Some(r)) => serde_json::to_value(r).ok().map(|mut v| {
            v["kind"] = json!("qmp-error");
            v
        }),
        (None, None) => None,
    };
    json!({ "error": format!("{e:#}"), "exit_code": exit_code, "detail": detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interruption_exits_128_plus_its_signal() {
        let by = |signal| exit_code(&Interrupted { signal, message: "x".into() }.into());
        assert_eq!(by(nix::sys::signal::Signal::SIGINT), 130);
        assert_eq!(by(nix::sys::signal::Signal::SIGTERM), 143);
        assert_eq!(exit_code(&anyhow::anyhow!(Usage("x".into()))), 2);
    }

    #[test]
    fn a_launch_failure_keeps_its_parts_as_fields() {
        let f = Failure::LaunchFailed {
            failure: LaunchFailure {
                message: "QEMU exited during start-up (exit status 1)".into(),
                exit: Some(crate::instance::proc::ExitInfo { code: Some(1), signal: None }),
                command_line: vec!["qemu-system-x86_64".into(), "-m".into(), "1T M".into()],
                stderr_tail: "cannot set up guest memory".into(),
                serial_tail: String::new(),
            },
            hint: None,
        };
        let e = anyhow::Error::new(f).context("launching 'dev'");
        let doc = error_document(&e, 1);
        assert_eq!(doc["detail"]["kind"], "launch-failed");
        assert_eq!(doc["detail"]["exit"]["code"], 1);
        assert_eq!(doc["detail"]["command_line"][2], "1T M");
        assert!(doc["error"].as_str().unwrap().contains("'1T M'"), "{doc}");
        let plain = error_document(&anyhow::anyhow!("no instance"), 1);
        assert_eq!(plain["detail"], Value::Null);
    }

    #[test]
    fn a_qmp_refusal_keeps_its_class_as_a_field() {
        let r = Refused {
            command: "device_del".into(),
            class: crate::qmp::ErrorClass::DeviceNotFound,
            desc: "Device 'x' not found".into(),
        };
        let doc = error_document(&anyhow::Error::new(r).context("removing disk 'x'"), 1);
        assert_eq!(doc["detail"]["kind"], "qmp-error");
        assert_eq!(doc["detail"]["class"], "DeviceNotFound");
        assert_eq!(doc["detail"]["command"], "device_del");
        assert!(doc["error"].as_str().unwrap().contains("QEMU refused 'device_del': DeviceNotFound"), "{doc}");
    }
}
