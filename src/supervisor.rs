//! The per-instance supervisor: a detached `qbuf-qemu` process that is QEMU's
//! parent for the VM's whole life.
//!
//! It exists because QEMU outlives `launch` and somebody must (a) hold a QMP
//! connection to record every event, (b) reap QEMU and record its exit status
//! (a zombie is not "running", and this host's PID 1 reaps late), (c) serve
//! many commands at once over one QMP connection, and (d) turn a host
//! SIGTERM/SIGHUP into a graceful powerdown. It inherits the instance lock
//! from `launch` and passes it on to QEMU, so the lock is held until both
//! are gone.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::control::{Info, Request, Response};
use crate::instance::{write_json, Instance, ProcIdentity, RunRecord};
use crate::powerdown::{self, ChildProcess, ExitInfo, StopMethod, StopOptions, StopOutcome};
use crate::qemu::VmSpec;
use crate::qmp::{Event, Qmp};

/// What `launch` hands the supervisor (boot.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootPlan {
    pub qemu: PathBuf,
    pub argv: Vec<String>,
    pub spec: VmSpec,
}

/// Why QEMU did not come up (launch-failure.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchFailure {
    pub message: String,
    pub exit: Option<ExitInfo>,
    pub stderr_tail: String,
    pub command_line: String,
}

/// How the VM ended (stopped.json); `status` reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// One sentence for humans.
    pub reason: String,
}

pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Summarises why QEMU ended, from a guest panic, the last SHUTDOWN and the
/// exit status. Every cause gets a name: guest shutdown, guest panic, a
/// signal from the host, QMP quit, or a crash with its exit code or signal.
pub fn describe_stop(
    shutdown: Option<&Event>,
    panicked: Option<&Event>,
    exit: Option<ExitInfo>,
    outcome: Option<&StopOutcome>,
) -> (bool, String) {
    let reason = shutdown.and_then(Event::shutdown);
    let by =
        outcome.and_then(|o| o.method).map(|m| format!(" (stopped by qbuf-qemu: {})", m.as_str())).unwrap_or_default();
    if panicked.is_some() || reason.as_ref().is_some_and(|(_, r)| r == "guest-panic") {
        return (true, format!("the guest kernel panicked (GUEST_PANICKED){by}"));
    }
    match (reason, exit) {
        (Some((true, r)), _) => (false, format!("the guest shut down ({r}){by}")),
        (Some((false, r)), _) if r == "host-signal" => {
            (false, format!("QEMU got a termination signal from the host (host-signal){by}"))
        }
        (Some((false, r)), _) if r == "host-qmp-quit" => {
            (false, format!("QEMU was told to quit over QMP (host-qmp-quit){by}"))
        }
        (Some((false, r)), _) => (false, format!("QEMU was told to stop ({r}){by}")),
        (None, Some(e)) if outcome.is_some() => (false, format!("QEMU ended, {e}{by}")),
        (None, Some(e)) => (true, format!("QEMU crashed or was killed: {e}, without a shutdown event")),
        (None, None) => (true, "QEMU ended unexpectedly; its exit status is unknown".into()),
    }
}

struct Shared {
    qmp: Qmp,
    pid: i32,
    exited: watch::Receiver<Option<ExitInfo>>,
    info: Mutex<Info>,
    /// The ladder's outcome once it ran; stop requests wait on it.
    outcome: watch::Sender<Option<StopOutcome>>,
    ladder_started: Mutex<bool>,
    /// Set once stopped.json is written: answers can go out.
    done: watch::Sender<bool>,
    /// The guest agent's socket (qga.sock).
    agent_sock: PathBuf,
}

/// Entry point of `qbuf-qemu __supervise`.
pub fn run(inst: Instance) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(supervise(inst))
}

async fn supervise(inst: Instance) -> Result<i32> {
    // QEMU inherits this: its sockets and logs are the user's alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let plan: BootPlan = crate::instance::read_json(&inst.boot_plan())?.context("boot.json is missing")?;
    let _ = std::fs::remove_file(inst.launch_failure());
    let _ = std::fs::remove_file(inst.stop_record());
    for p in inst.runtime_files() {
        let _ = std::fs::remove_file(p);
    }
    let stderr = File::create(inst.qemu_stderr()).context("cannot create qemu.log")?;
    let command_line = format!("{} {}", plan.qemu.display(), crate::qemu::shell_words(&plan.argv));
    tracing::info!("starting {command_line}");

    let mut cmd = tokio::process::Command::new(&plan.qemu);
    cmd.args(&plan.argv).stdin(std::process::Stdio::null()).stdout(stderr.try_clone()?).stderr(stderr);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::signal::{SigSet, SigmaskHow, Signal};
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGHUP);
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(std::io::Error::from)
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let f = LaunchFailure {
                message: format!("cannot run {}: {e}", plan.qemu.display()),
                exit: None,
                stderr_tail: String::new(),
                command_line,
            };
            write_json(&inst.launch_failure(), &f)?;
            return Ok(1);
        }
    };
    let pid = child.id().context("QEMU has no pid")? as i32;
    let (exit_tx, exited) = watch::channel(None);
    tokio::spawn(async move {
        let st = child.wait().await;
        let info = match st {
            Ok(s) => ExitInfo { code: s.code(), signal: s.signal() },
            Err(_) => ExitInfo { code: None, signal: None },
        };
        let _ = exit_tx.send(Some(info));
    });

    // QEMU creates its sockets during start-up; connect as soon as it does.
    let qmp = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(e) = *exited.borrow() {
                let f = LaunchFailure {
                    message: format!("QEMU exited during start-up ({e})"),
                    exit: Some(e),
                    stderr_tail: crate::logs::tail(&inst.qemu_stderr(), 0, 4000, ""),
                    command_line,
                };
                write_json(&inst.launch_failure(), &f)?;
                return Ok(1);
            }
            if let Ok(s) = UnixStream::connect(inst.qmp_supervisor()).await {
                match Qmp::handshake(s, Duration::from_secs(10)).await {
                    Ok(q) => break q,
                    Err(e) => tracing::warn!("QMP handshake failed: {e}"),
                }
            }
            if tokio::time::Instant::now() > deadline {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                let f = LaunchFailure {
                    message: "QEMU did not open its QMP socket within 60s; it was killed".into(),
                    exit: None,
                    stderr_tail: crate::logs::tail(&inst.qemu_stderr(), 0, 4000, ""),
                    command_line,
                };
                write_json(&inst.launch_failure(), &f)?;
                return Ok(1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut events = qmp.subscribe();
    let version = qmp
        .execute(&qapi::qmp::query_version {}, Duration::from_secs(5))
        .await
        .map(|v| format!("{}.{}.{}", v.qemu.major, v.qemu.minor, v.qemu.micro))
        .unwrap_or_else(|_| "unknown".into());
    let started_at = now();
    let me = std::process::id() as i32;
    let record = RunRecord {
        qemu: ProcIdentity::of(pid).unwrap_or(ProcIdentity {
            pid,
            start_ticks: 0,
            boot_id: crate::instance::boot_id(),
        }),
        supervisor: ProcIdentity::of(me).context("cannot read own /proc entry")?,
        started_at,
        accel: plan.spec.accel,
        qemu_version: version.clone(),
        argv: plan.argv.clone(),
    };
    let (outcome, _) = watch::channel(None);
    let (done, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        qmp: qmp.clone(),
        pid,
        exited: exited.clone(),
        info: Mutex::new(Info {
            qemu_pid: pid,
            supervisor_pid: me,
            started_at,
            accel: plan.spec.accel,
            qemu_version: version,
            hotplug_ports: plan.spec.hotplug_ports,
            stopping: None,
            last_shutdown: None,
            panicked: None,
            agent_port_open: false,
        }),
        outcome,
        ladder_started: Mutex::new(false),
        done,
        agent_sock: inst.guest_agent(),
    });

    // Every event of the VM's life goes to events.jsonl, even with no
    // command running.
    let mut log = OpenOptions::new().create(true).append(true).mode(0o600).open(inst.events_log())?;
    let sh = shared.clone();
    let event_task = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) => {
                    note_event(&mut sh.info.lock().unwrap(), &ev);
                    if let Ok(line) = serde_json::to_string(&ev) {
                        let _ = writeln!(log, "{line}");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let _ = writeln!(
                        log,
                        "{{\"event\":\"QBUF_EVENTS_LOST\",\"data\":{{\"count\":{n}}},\"timestamp\":{}}}",
                        now()
                    );
                }
                Err(_) => break,
            }
        }
    });

    let listener = UnixListener::bind(inst.control()).context("cannot create the control socket")?;
    std::fs::set_permissions(inst.control(), std::fs::Permissions::from_mode(0o600))?;
    for s in [inst.qmp_user(), inst.qmp_supervisor(), inst.console(), inst.guest_agent()] {
        let _ = std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o600));
    }
    write_json(&inst.run_record(), &record)?;

    let sh = shared.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve(sh.clone(), conn));
        }
    });

    // The host asks us to go away: power the guest down rather than cut it off.
    let sh = shared.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup), Ok(mut int)) =
            (signal(SignalKind::terminate()), signal(SignalKind::hangup()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = hup.recv() => {}, _ = int.recv() => {} }
        tracing::info!("host signal received: powering the guest down");
        start_ladder(&sh, StopOptions { timeout: Duration::from_secs(45), force: false });
    });

    let mut exited_rx = exited.clone();
    let _ = exited_rx.wait_for(|e| e.is_some()).await;
    let exit = *exited.borrow();
    // QEMU sends SHUTDOWN before exiting; let the reader deliver what is left.
    let _ = tokio::time::timeout(Duration::from_secs(2), qmp.closed()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ladder_ran = *shared.ladder_started.lock().unwrap();
    let outcome = if ladder_ran {
        let mut rx = shared.outcome.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|o| o.is_some())).await;
        let o = rx.borrow().clone();
        o
    } else {
        None
    };
    let (shutdown, panicked) = {
        let info = shared.info.lock().unwrap();
        (info.last_shutdown.clone(), info.panicked.clone())
    };
    let (crashed, reason) = describe_stop(shutdown.as_ref(), panicked.as_ref(), exit, outcome.as_ref());
    let rec = StopRecord { stopped_at: now(), exit, shutdown, outcome, panicked, crashed, reason: reason.clone() };
    tracing::info!("QEMU is gone: {reason}");
    write_json(&inst.stop_record(), &rec)?;
    for p in inst.runtime_files() {
        let _ = std::fs::remove_file(p);
    }
    event_task.abort();
    shared.done.send_replace(true);
    // Give waiting `powerdown` commands a moment to receive their answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(0)
}

/// Keeps what `Info` reports about the guest up to date.
fn note_event(info: &mut Info, ev: &Event) {
    match ev.event.as_str() {
        "SHUTDOWN" => info.last_shutdown = Some(ev.clone()),
        "GUEST_PANICKED" => info.panicked = Some(ev.clone()),
        "VSERPORT_CHANGE" if ev.data.get("id").and_then(Value::as_str) == Some(crate::qemu::GUEST_AGENT_PORT_ID) => {
            info.agent_port_open = ev.data.get("open").and_then(Value::as_bool).unwrap_or(false);
        }
        _ => {}
    }
}

fn start_ladder(sh: &Arc<Shared>, opts: StopOptions) {
    {
        let mut started = sh.ladder_started.lock().unwrap();
        if *started {
            return;
        }
        *started = true;
    }
    let sh = sh.clone();
    tokio::spawn(async move {
        let proc = ChildProcess { pid: sh.pid, exited: sh.exited.clone() };
        let known = sh.info.lock().unwrap().last_shutdown.clone();
        let sh2 = sh.clone();
        let on_step = move |m: StopMethod| {
            sh2.info.lock().unwrap().stopping = Some(m.as_str().to_string());
        };
        let agent = sh.info.lock().unwrap().agent_port_open.then(|| sh.agent_sock.clone());
        let o = powerdown::stop(Some(&sh.qmp), &proc, &opts, known, agent.as_deref(), &on_step).await;
        sh.outcome.send_replace(Some(o));
    });
}

async fn serve(sh: Arc<Shared>, conn: UnixStream) {
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let send = |resp: Response| {
        let mut s = serde_json::to_string(&resp).unwrap_or_else(|e| format!("{{\"failed\":\"{e}\"}}"));
        s.push('\n');
        s
    };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = w.write_all(send(Response::Failed(format!("bad request: {e}"))).as_bytes()).await;
            return;
        }
    };
    match req {
        Request::Info => {
            let info = sh.info.lock().unwrap().clone();
            let _ = w.write_all(send(Response::Ok(serde_json::to_value(info).unwrap_or(Value::Null))).as_bytes()).await;
        }
        Request::Qmp { command, arguments, timeout_ms } => {
            let resp = match sh.qmp.execute_raw(&command, arguments, Duration::from_millis(timeout_ms)).await {
                Ok(v) => Response::Ok(v),
                Err(crate::qmp::QmpError::Qemu { class, desc }) => Response::QmpError { class, desc },
                Err(e) => Response::Failed(e.to_string()),
            };
            let _ = w.write_all(send(resp).as_bytes()).await;
        }
        Request::Subscribe => {
            let mut rx = sh.qmp.subscribe();
            if w.write_all(send(Response::Ok(Value::Null)).as_bytes()).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Ok(ev) => if w.write_all(send(Response::Event(ev)).as_bytes()).await.is_err() { return },
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    },
                    _ = sh.qmp.closed() => return,
                }
            }
        }
        Request::Powerdown { timeout_secs, force } => {
            start_ladder(&sh, StopOptions { timeout: Duration::from_secs_f64(timeout_secs.max(0.0)), force });
            let mut done = sh.done.subscribe();
            let _ = done.wait_for(|d| *d).await;
            let outcome = sh.outcome.borrow().clone();
            let resp = match outcome {
                Some(o) => Response::Stopped(o),
                None => Response::Failed("the stop ladder did not report".into()),
            };
            let _ = w.write_all(send(resp).as_bytes()).await;
            let _ = w.flush().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(guest: bool, reason: &str) -> Event {
        Event { event: "SHUTDOWN".into(), data: json!({"guest": guest, "reason": reason}), timestamp: 1.0 }
    }

    #[test]
    fn stop_reasons_name_the_cause() {
        let exit0 = Some(ExitInfo { code: Some(0), signal: None });
        let (c, r) = describe_stop(Some(&ev(true, "guest-shutdown")), None, exit0, None);
        assert!(!c);
        assert!(r.contains("guest shut down (guest-shutdown)"), "{r}");
        let (c, r) = describe_stop(None, None, Some(ExitInfo { code: None, signal: Some(9) }), None);
        assert!(c);
        assert!(r.contains("SIGKILL") && r.contains("crashed or was killed"), "{r}");
        let (c, r) = describe_stop(None, None, Some(ExitInfo { code: Some(1), signal: None }), None);
        assert!(c);
        assert!(r.contains("exit status 1"), "{r}");
        let (c, r) = describe_stop(Some(&ev(true, "guest-panic")), None, None, None);
        assert!(c);
        assert!(r.contains("panicked"));
        let (c, r) = describe_stop(Some(&ev(false, "host-signal")), None, exit0, None);
        assert!(!c);
        assert!(r.contains("signal from the host (host-signal)"), "{r}");
        let (_, r) = describe_stop(Some(&ev(false, "host-qmp-quit")), None, exit0, None);
        assert!(r.contains("quit over QMP"), "{r}");
    }

    #[test]
    fn a_panic_paused_vm_stopped_later_still_names_the_panic() {
        let panic = Event { event: "GUEST_PANICKED".into(), data: json!({"action": "pause"}), timestamp: 1.0 };
        let o = StopOutcome {
            method: Some(crate::powerdown::StopMethod::Quit),
            shutdown_reason: Some("host-qmp-quit".into()),
            guest: false,
            seconds: 1.0,
            exit: None,
            steps: vec![],
        };
        let (c, r) = describe_stop(Some(&ev(false, "host-qmp-quit")), Some(&panic), None, Some(&o));
        assert!(c);
        assert!(r.contains("panicked (GUEST_PANICKED)") && r.contains("stopped by qbuf-qemu: quit"), "{r}");
    }

    #[test]
    fn agent_port_and_panic_are_tracked_from_events() {
        let mut info = Info {
            qemu_pid: 1,
            supervisor_pid: 2,
            started_at: 0.0,
            accel: crate::qemu::Accel::Tcg,
            qemu_version: "10.0.2".into(),
            hotplug_ports: 4,
            stopping: None,
            last_shutdown: None,
            panicked: None,
            agent_port_open: false,
        };
        let e = |name: &str, data| Event { event: name.into(), data, timestamp: 1.0 };
        note_event(&mut info, &e("VSERPORT_CHANGE", json!({"id": "other", "open": true})));
        assert!(!info.agent_port_open);
        note_event(&mut info, &e("VSERPORT_CHANGE", json!({"id": crate::qemu::GUEST_AGENT_PORT_ID, "open": true})));
        assert!(info.agent_port_open);
        note_event(&mut info, &e("VSERPORT_CHANGE", json!({"id": crate::qemu::GUEST_AGENT_PORT_ID, "open": false})));
        assert!(!info.agent_port_open);
        note_event(&mut info, &e("GUEST_PANICKED", json!({"action": "pause"})));
        assert!(info.panicked.is_some());
    }
}
