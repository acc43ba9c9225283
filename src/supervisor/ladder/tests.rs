//! The ladder against a fake QEMU: a process that ends when told to (or
//! not), and a QMP peer over a socketpair that greets with QEMU 10.0's
//! recorded greeting and answers, or stays silent, as a real QEMU would.
//! Every step runs in milliseconds; tests/faults.rs proves the same wiring
//! against real QEMU.

use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::*;

/// What the fake QEMU and its guest do.
#[derive(Clone, Copy)]
struct Behaviour {
    /// QEMU answers QMP (a frozen one does not).
    answers: bool,
    /// The guest powers off at the ACPI power button.
    obeys_button: bool,
    quits: bool,
    dies_on_sigint: bool,
    dies_on_sigkill: bool,
    paused: bool,
    gone: bool,
    /// Its last events reach the socket after its exit is seen (a QEMU
    /// we are not the parent of is seen gone by polling).
    late_events: bool,
}

const QEMU: Behaviour = Behaviour {
    answers: true,
    obeys_button: true,
    quits: true,
    dies_on_sigint: true,
    dies_on_sigkill: true,
    paused: false,
    gone: false,
    late_events: false,
};

struct FakeQemu {
    gone: Arc<watch::Sender<bool>>,
    behaviour: Behaviour,
    /// Every QMP command and signal it received, in order.
    heard: Arc<Mutex<Vec<String>>>,
}

impl QemuProcess for FakeQemu {
    fn pid(&self) -> i32 {
        0
    }
    async fn wait_gone(&self, deadline: Instant) -> bool {
        let mut rx = self.gone.subscribe();
        let gone = tokio::time::timeout_at(deadline, rx.wait_for(|g| *g)).await.is_ok();
        gone
    }
    fn exit_info(&self) -> Option<ExitInfo> {
        None
    }
    fn signal(&self, sig: Signal) -> nix::Result<()> {
        self.heard.lock().unwrap().push(sig.as_str().into());
        let b = self.behaviour;
        if (sig == Signal::SIGINT && b.dies_on_sigint) || (sig == Signal::SIGKILL && b.dies_on_sigkill) {
            self.gone.send_replace(true);
        }
        Ok(())
    }
}

/// QEMU 10.0's greeting, as recorded (qmp-fixtures/).
fn greeting() -> String {
    let t = include_str!("../../../qmp-fixtures/qemu-10.0/greeting-negotiation.jsonl");
    let line: Value = serde_json::from_str(t.lines().nth(1).unwrap()).unwrap();
    line["s"].as_str().unwrap().to_string()
}

fn event(name: &str, data: Value) -> String {
    json!({"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 0}}).to_string() + "\r\n"
}

/// QEMU's side of the socket: answers commands per `b`, powers off or quits.
async fn serve(stream: UnixStream, b: Behaviour, gone: Arc<watch::Sender<bool>>, heard: Arc<Mutex<Vec<String>>>) {
    let (r, mut w) = stream.into_split();
    let _ = w.write_all(greeting().as_bytes()).await;
    let mut lines = BufReader::new(r).lines();
    let mut paused = b.paused;
    while let Ok(Some(line)) = lines.next_line().await {
        let v: Value = serde_json::from_str(&line).unwrap();
        let cmd = v["execute"].as_str().unwrap().to_string();
        heard.lock().unwrap().push(cmd.clone());
        if cmd != "qmp_capabilities" && !b.answers {
            continue;
        }
        let ret = match cmd.as_str() {
            "query-status" => json!({"status": if paused { "paused" } else { "running" }, "running": !paused}),
            _ => json!({}),
        };
        let _ = w.write_all((json!({"return": ret, "id": v["id"]}).to_string() + "\r\n").as_bytes()).await;
        let shutdown = match cmd.as_str() {
            "cont" => {
                paused = false;
                None
            }
            "system_powerdown" if b.obeys_button && !paused => Some(json!({"guest": true, "reason": "guest-shutdown"})),
            "quit" if b.quits => Some(json!({"guest": false, "reason": "host-qmp-quit"})),
            _ => None,
        };
        if let Some(data) = shutdown {
            if b.late_events {
                gone.send_replace(true);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = w.write_all(event("SHUTDOWN", data).as_bytes()).await;
            gone.send_replace(true);
            return;
        }
    }
}

const SHORT: Deadlines = Deadlines {
    quit: Duration::from_millis(300),
    signal: Duration::from_millis(300),
    command: Duration::from_millis(300),
};

/// Runs the ladder against a fake QEMU behaving as `b`; returns the outcome
/// and what the fake heard. `hurry_after` presses Ctrl-C that much later.
async fn ladder(b: Behaviour, opts: StopOptions, hurry_after: Option<Duration>) -> (StopOutcome, Vec<String>) {
    let (gone, _) = watch::channel(b.gone);
    let gone = Arc::new(gone);
    let heard = Arc::new(Mutex::new(vec![]));
    let (client, server) = UnixStream::pair().unwrap();
    tokio::spawn(serve(server, b, gone.clone(), heard.clone()));
    let qmp = Qmp::handshake(client, Duration::from_secs(5)).await.unwrap();
    let proc = FakeQemu { gone, behaviour: b, heard: heard.clone() };
    let (hurry, hurried) = watch::channel(false);
    if let Some(after) = hurry_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = hurry.send(true);
            hurry.closed().await;
        });
    }
    let o = stop(Some(&qmp), &proc, &opts, None, None, &|_, _| {}, hurried, SHORT).await;
    let heard = heard.lock().unwrap().iter().filter(|c| *c != "qmp_capabilities").cloned().collect();
    (o, heard)
}

fn opts(timeout_ms: u64) -> StopOptions {
    StopOptions { timeout: Duration::from_millis(timeout_ms), force: false }
}

#[tokio::test]
async fn a_guest_that_obeys_the_button_stops_at_powerdown() {
    let (o, heard) = ladder(QEMU, opts(5000), None).await;
    assert_eq!(o.method, Some(StopMethod::Powerdown));
    assert!(o.guest);
    assert_eq!(o.shutdown_reason.as_deref(), Some("guest-shutdown"));
    assert_eq!(heard, ["query-status", "system_powerdown"]);
}

#[tokio::test]
async fn a_shutdown_event_read_after_the_exit_still_names_the_cause() {
    let (o, _) = ladder(Behaviour { late_events: true, ..QEMU }, opts(5000), None).await;
    assert_eq!(o.method, Some(StopMethod::Powerdown));
    assert_eq!((o.guest, o.shutdown_reason.as_deref()), (true, Some("guest-shutdown")));
}

#[tokio::test]
async fn a_paused_guest_is_resumed_before_the_button() {
    let (o, heard) = ladder(Behaviour { paused: true, ..QEMU }, opts(5000), None).await;
    assert_eq!(o.method, Some(StopMethod::Powerdown));
    assert_eq!(heard, ["query-status", "cont", "system_powerdown"]);
    assert_eq!((o.steps[0].method, &o.steps[0].action), (Some(StopMethod::Powerdown), &StepAction::ResumedFirst));
}

#[tokio::test]
async fn a_guest_that_ignores_the_button_is_stopped_by_quit_after_timeout() {
    let (o, heard) = ladder(Behaviour { obeys_button: false, ..QEMU }, opts(200), None).await;
    assert_eq!(o.method, Some(StopMethod::Quit));
    assert!(!o.guest);
    assert_eq!(o.shutdown_reason.as_deref(), Some("host-qmp-quit"));
    assert_eq!(heard, ["query-status", "system_powerdown", "quit"]);
    let still = |s: &StopStep| s.method == Some(StopMethod::Powerdown) && s.action == StepAction::StillRunning;
    assert!(o.steps.iter().any(still), "{:?}", o.steps);
}

#[tokio::test]
async fn a_frozen_qemu_is_ended_by_its_termination_signal() {
    let (o, heard) = ladder(Behaviour { answers: false, ..QEMU }, opts(200), None).await;
    assert_eq!(o.method, Some(StopMethod::TermSignal));
    assert_eq!(heard, ["query-status", "system_powerdown", "quit", "SIGINT"], "SIGINT: QEMU's SIGTERM is blocked");
    assert!(
        o.steps.iter().any(|s| s.method == Some(StopMethod::Quit) && matches!(s.action, StepAction::Failed { .. })),
        "{:?}",
        o.steps
    );
}

#[tokio::test]
async fn a_qemu_deaf_to_sigint_gets_sigkill_and_one_deaf_to_that_is_not_called_stopped() {
    let deaf = Behaviour { answers: false, dies_on_sigint: false, ..QEMU };
    let (o, heard) = ladder(deaf, opts(200), None).await;
    assert_eq!(o.method, Some(StopMethod::Sigkill));
    assert_eq!(heard.last().map(String::as_str), Some("SIGKILL"));
    let (o, _) = ladder(Behaviour { dies_on_sigkill: false, ..deaf }, opts(200), None).await;
    assert_eq!(o.method, None, "nothing stopped it: {:?}", o.steps);
}

#[tokio::test]
async fn a_qemu_already_gone_is_already_stopped_and_told_nothing() {
    let (o, heard) = ladder(Behaviour { gone: true, ..QEMU }, opts(5000), None).await;
    assert_eq!(o.method, Some(StopMethod::AlreadyStopped));
    assert!(heard.is_empty(), "{heard:?}");
}

#[tokio::test]
async fn a_hurried_ladder_stops_waiting_for_the_guest_and_goes_on_at_quit() {
    let started = Instant::now();
    let (o, heard) =
        ladder(Behaviour { obeys_button: false, ..QEMU }, opts(60_000), Some(Duration::from_millis(100))).await;
    assert_eq!(o.method, Some(StopMethod::Quit));
    assert!(started.elapsed() < Duration::from_secs(10), "the 60 s wait for the guest was cut short");
    assert!(o.steps.iter().any(|s| s.action == StepAction::Forced), "{:?}", o.steps);
    assert_eq!(heard, ["query-status", "system_powerdown", "quit"]);
}

#[tokio::test]
async fn a_forced_stop_starts_at_quit() {
    let (o, heard) = ladder(QEMU, StopOptions { timeout: Duration::from_secs(60), force: true }, None).await;
    assert_eq!(o.method, Some(StopMethod::Quit));
    assert_eq!(heard, ["quit"], "no power button, no resume");
}

#[tokio::test]
async fn without_qmp_the_guests_step_is_skipped_not_waited_out() {
    let (gone, _) = watch::channel(false);
    let heard = Arc::new(Mutex::new(vec![]));
    let proc = FakeQemu { gone: Arc::new(gone), behaviour: QEMU, heard: heard.clone() };
    let (_hurry, hurried) = watch::channel(false);
    let t = std::time::Instant::now();
    let o = stop(None, &proc, &opts(60_000), None, None, &|_, _| {}, hurried, SHORT).await;
    assert!(t.elapsed() < Duration::from_secs(10), "waited out --timeout for a button never pressed: {:?}", o.steps);
    assert_eq!(o.method, Some(StopMethod::TermSignal), "{:?}", o.steps);
    let skipped = |s: &StopStep| s.method == Some(StopMethod::Powerdown) && s.action == StepAction::Skipped;
    assert!(o.steps.iter().any(skipped), "{:?}", o.steps);
    assert_eq!(*heard.lock().unwrap(), ["SIGINT"]);
}
