//! A QEMU whose supervisor died: the same ladder, run by the command that
//! found it, over the user QMP socket and judged by the process's identity;
//! then the stop record the supervisor would have written. What the user
//! sees meanwhile (the steps, Ctrl-C) is the caller's.

use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use super::ladder::{self, ForeignProcess, StopOptions};
use super::protocol::Stopped;
use crate::instance::records::{RunRecord, StopMethod, StopOutcome, StopRecord};
use crate::instance::{write_json, Instance};
use crate::qmp::{Event, Qmp};
use crate::timeouts::ORPHAN_QMP_CONNECT;

/// Runs the ladder on the QEMU of `run`; `on_step` hears each step and
/// `hurried` set to true skips the guest's own steps.
pub async fn stop(
    inst: &Instance,
    run: &RunRecord,
    opts: &StopOptions,
    on_step: &(dyn Fn(StopMethod, Duration) + Sync),
    hurried: watch::Receiver<bool>,
) -> Stopped {
    let proc = ForeignProcess(run.qemu.clone());
    let qmp = Qmp::connect(&inst.qmp_user(), ORPHAN_QMP_CONNECT).await.ok();
    let agent = inst.guest_agent();
    let outcome =
        ladder::stop(qmp.as_ref(), &proc, opts, None, Some(&agent), on_step, hurried, Default::default()).await;
    let record = outcome.method.is_some().then(|| record(inst, &outcome));
    Stopped { outcome, record }
}

/// The stop record of an orphan's stop, written as the supervisor would
/// have; its SHUTDOWN is the one the ladder saw on the user QMP socket.
fn record(inst: &Instance, outcome: &StopOutcome) -> StopRecord {
    let shutdown = outcome.shutdown_reason.as_ref().map(|r| Event {
        event: "SHUTDOWN".into(),
        data: json!({ "guest": outcome.guest, "reason": r }),
        timestamp: crate::clock::now(),
    });
    let cause = super::stop_cause(shutdown.as_ref(), None, None, Some(outcome));
    let rec = StopRecord {
        stopped_at: crate::clock::now(),
        exit: None,
        shutdown,
        outcome: Some(outcome.clone()),
        panicked: None,
        crashed: cause.crashed(),
        cause: Some(cause),
        reason: None,
    };
    if let Err(e) = write_json(&inst.stop_record(), &rec) {
        tracing::warn!("cannot record how the VM stopped: {e:#}");
    }
    inst.clean_stale();
    rec
}
