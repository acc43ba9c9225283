//! The dispatcher against a fake QEMU: a QMP peer over a socketpair that
//! greets with QEMU 10.0's recorded greeting, and, where a stop needs a
//! process to end, a real child (`sleep`) standing in for QEMU's. No QEMU
//! runs; tests/e2e.rs and tests/faults.rs prove the same wiring against it.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::*;
use crate::instance::records::{StopCause, StopKind};
use crate::qemu::args::Accel;

/// QEMU 10.0's greeting, as recorded (qmp-fixtures/).
fn greeting() -> String {
    let t = include_str!("../../../qmp-fixtures/qemu-10.0/greeting-negotiation.jsonl");
    let line: Value = serde_json::from_str(t.lines().nth(1).unwrap()).unwrap();
    line["s"].as_str().unwrap().to_string()
}

fn event(name: &str, data: Value) -> Event {
    Event { event: name.into(), data, timestamp: 1.0 }
}

/// QEMU's side: answers every command with `{}` (`query-status`: running);
/// at `system_powerdown` its guest powers off: SHUTDOWN, then `power_off`
/// (which ends the stand-in process), then the socket closes.
async fn serve(stream: UnixStream, power_off: Option<tokio::sync::oneshot::Sender<()>>) {
    let (r, mut w) = stream.into_split();
    let _ = w.write_all(greeting().as_bytes()).await;
    let mut lines = BufReader::new(r).lines();
    let mut power_off = power_off;
    while let Ok(Some(line)) = lines.next_line().await {
        let v: Value = serde_json::from_str(&line).unwrap();
        let cmd = v["execute"].as_str().unwrap().to_string();
        let ret = if cmd == "query-status" { json!({"status": "running", "running": true}) } else { json!({}) };
        let _ = w.write_all((json!({"return": ret, "id": v["id"]}).to_string() + "\r\n").as_bytes()).await;
        if cmd == "system_powerdown" {
            let ev = json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"},
                            "timestamp": {"seconds": 2, "microseconds": 0}});
            let _ = w.write_all((ev.to_string() + "\r\n").as_bytes()).await;
            if let Some(p) = power_off.take() {
                let _ = p.send(());
            }
            return;
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    inst: Instance,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    dispatcher: Dispatcher,
}

/// A dispatcher over a fake QMP peer; `pid` and `exited` are QEMU's.
async fn fixture(
    pid: i32,
    exited: watch::Receiver<Option<ExitInfo>>,
    power_off: Option<tokio::sync::oneshot::Sender<()>>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let inst = Instance { name: "t".into(), dir: dir.path().to_path_buf() };
    let (client, server) = UnixStream::pair().unwrap();
    tokio::spawn(serve(server, power_off));
    let qmp = Qmp::handshake(client, Duration::from_secs(5)).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    super::super::forward_events(&qmp, tx.clone());
    super::super::forward_exit(exited.clone(), tx.clone());
    let state = VmState::new(pid, 0.0, Accel::Tcg, "10.0.2", 0);
    let dispatcher = Dispatcher::new(inst.clone(), qmp, exited, tx.clone(), state);
    Fixture { _dir: dir, inst, tx, rx, dispatcher }
}

fn ask(tx: &mpsc::UnboundedSender<Msg>, req: Request) -> oneshot::Receiver<Response> {
    let (reply, answer) = oneshot::channel();
    tx.send(Msg::Request(req, reply)).unwrap();
    answer
}

fn logged_events(inst: &Instance) -> Vec<String> {
    let text = std::fs::read_to_string(inst.events_log()).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].as_str().unwrap().to_string()).collect()
}

fn exited(code: i32) -> ExitInfo {
    ExitInfo { code: Some(code), signal: None }
}

#[tokio::test]
async fn events_are_logged_in_order_and_the_stop_is_recorded_once_qemu_and_qmp_are_gone() {
    let (_exit_tx, exit_rx) = watch::channel(None);
    let f = fixture(1, exit_rx, None).await;
    for name in ["STOP", "RESUME"] {
        f.tx.send(Msg::Event(event(name, json!({})))).unwrap();
    }
    f.tx.send(Msg::Event(event("SHUTDOWN", json!({"guest": true, "reason": "guest-shutdown"})))).unwrap();
    let state = ask(&f.tx, Request::State);
    f.tx.send(Msg::Exited(exited(0))).unwrap();
    f.tx.send(Msg::QmpClosed).unwrap();
    let after = f.dispatcher.run(f.rx).await;
    assert_eq!(after, Afterwards::Keep);
    assert_eq!(logged_events(&f.inst), ["STOP", "RESUME", "SHUTDOWN"]);
    match state.await.unwrap() {
        Response::Status(s) => assert_eq!(s.last_shutdown.map(|e| e.event), Some("SHUTDOWN".into())),
        other => panic!("{other:?}"),
    }
    let rec: StopRecord = crate::instance::read_json(&f.inst.stop_record()).unwrap().unwrap();
    let guest_shutdown = StopKind::GuestShutdown { reason: "guest-shutdown".into() };
    assert!(!rec.crashed && rec.cause.as_ref().map(|c| &c.kind) == Some(&guest_shutdown), "{rec:?}");
}

#[tokio::test]
async fn an_exit_whose_qmp_never_closes_is_recorded_after_the_drain() {
    let (_exit_tx, exit_rx) = watch::channel(None);
    let f = fixture(1, exit_rx, None).await;
    f.tx.send(Msg::Exited(exited(1))).unwrap();
    let started = tokio::time::Instant::now();
    f.dispatcher.run(f.rx).await;
    assert!(started.elapsed() >= QMP_DRAIN, "it waited for QEMU's last output");
    let rec: StopRecord = crate::instance::read_json(&f.inst.stop_record()).unwrap().unwrap();
    assert_eq!(rec.exit, Some(exited(1)));
}

#[tokio::test]
async fn requests_during_a_stop_are_answered_and_the_ones_after_it_too() {
    // A real process stands in for QEMU: the ladder waits for it to end.
    let mut cmd = tokio::process::Command::new("sleep");
    cmd.arg("30").kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let (pid, exit_rx) = crate::supervisor::start::reap(child, "sleep").unwrap();
    let (power_off, powered_off) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if powered_off.await.is_ok() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    });
    let f = fixture(pid, exit_rx, Some(power_off)).await;
    let first = ask(&f.tx, Request::Powerdown { timeout_secs: 10.0, force: false });
    let second = ask(&f.tx, Request::Powerdown { timeout_secs: 10.0, force: false });
    let run = tokio::spawn(f.dispatcher.run(f.rx));
    for answer in [first.await.unwrap(), second.await.unwrap()] {
        match answer {
            Response::Stopped(s) => {
                assert_eq!(s.outcome.method, Some(StopMethod::Powerdown), "{s:?}");
                assert!(s.outcome.guest, "{s:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(run.await.unwrap(), Afterwards::Keep);
    assert_eq!(logged_events(&f.inst).last().map(String::as_str), Some("SHUTDOWN"));
}

#[tokio::test]
async fn a_qmp_command_after_qemu_exited_fails_at_once() {
    let (_exit_tx, exit_rx) = watch::channel(None);
    let f = fixture(1, exit_rx, None).await;
    f.tx.send(Msg::Exited(exited(0))).unwrap();
    let answer = ask(&f.tx, Request::Qmp { command: "query-status".into(), arguments: json!({}), timeout_ms: 1000 });
    f.tx.send(Msg::QmpClosed).unwrap();
    f.dispatcher.run(f.rx).await;
    match answer.await.unwrap() {
        Response::Failed(m) => assert!(m.contains("exited"), "{m}"),
        other => panic!("{other:?}"),
    }
}

fn state() -> VmState {
    VmState::new(1, 0.0, crate::qemu::args::Accel::Tcg, "10.0.2", 4)
}

#[test]
fn agent_port_and_panic_are_tracked_from_events() {
    let mut s = state();
    let e = |name: &str, data| Event { event: name.into(), data, timestamp: 1.0 };
    note_event(&mut s, &e("VSERPORT_CHANGE", json!({"id": "other", "open": true})));
    assert!(!s.agent_port_open);
    note_event(&mut s, &e("VSERPORT_CHANGE", json!({"id": GUEST_AGENT_PORT_ID, "open": true})));
    assert!(s.agent_port_open);
    note_event(&mut s, &e("VSERPORT_CHANGE", json!({"id": GUEST_AGENT_PORT_ID, "open": false})));
    assert!(!s.agent_port_open);
    note_event(&mut s, &e("GUEST_PANICKED", json!({"action": "pause"})));
    assert!(s.panicked.is_some());
}

#[test]
fn a_powerdown_after_the_end_reports_already_stopped_with_the_reason() {
    let rec = StopRecord {
        stopped_at: 1.0,
        exit: Some(ExitInfo { code: Some(0), signal: None }),
        shutdown: Some(Event {
            event: "SHUTDOWN".into(),
            data: json!({"guest": true, "reason": "guest-shutdown"}),
            timestamp: 1.0,
        }),
        outcome: None,
        panicked: None,
        crashed: false,
        cause: Some(StopCause { kind: StopKind::GuestShutdown { reason: "guest-shutdown".into() }, by: None }),
        reason: None,
    };
    let o = StopOutcome::already_stopped(Some(&rec));
    assert_eq!(o.method, Some(StopMethod::AlreadyStopped));
    assert_eq!(o.shutdown_reason.as_deref(), Some("guest-shutdown"));
    assert!(o.guest);
}
