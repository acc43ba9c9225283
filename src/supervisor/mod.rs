//! The per-instance supervisor: a detached `qbuf-qemu __supervise` process
//! that is QEMU's parent for the VM's whole life.
//!
//! It exists because QEMU outlives `launch` and somebody must (a) hold a QMP
//! connection to record every event, (b) reap QEMU and record its exit status
//! (a zombie is not "running", and this host's PID 1 reaps late), (c) serve
//! many commands at once over one QMP connection, and (d) turn a host
//! SIGTERM/SIGHUP into a graceful powerdown. It inherits the instance lock
//! from `launch` and passes it on to QEMU, so the lock is held until both
//! are gone.
//!
//! [`start`] brings QEMU up; [`dispatcher`] owns the state from then on;
//! [`protocol`] is what clients and the supervisor say; [`client`] is the
//! commands' side of it; [`ladder`] is the stop ladder; [`daemons`] are the
//! `virtiofsd`s of virtio-fs shares, started before QEMU and stopped after;
//! [`pump`] writes QEMU's console and output into bounded logs; [`orphan`]
//! stops a QEMU whose supervisor died and records it as the supervisor would.

pub mod client;
pub mod daemons;
pub mod dispatcher;
pub mod ladder;
pub mod orphan;
pub mod protocol;
pub mod pump;
pub mod spawn;
pub mod start;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::instance::proc::{ExitInfo, ProcIdentity};
use crate::instance::records::{read_json, write_json, BootPlan, RunRecord, StopCause, StopKind, StopOutcome};
use crate::instance::Instance;
use crate::qmp::{Event, Qmp};
use crate::timeouts::{ANSWERS_FLUSH, CONTROL_REQUEST};
use dispatcher::{Afterwards, Dispatcher, Msg};
use protocol::{Request, Response, VmState};

/// Entry point of `qbuf-qemu __supervise`.
pub fn run(inst: Instance) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(supervise(inst))
}

async fn supervise(inst: Instance) -> Result<i32> {
    // QEMU inherits this: its sockets and logs are the user's alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let plan: BootPlan = read_json(&inst.boot_plan())?.context("boot.json is missing")?;
    for p in inst.runtime_files() {
        let _ = std::fs::remove_file(p);
    }
    let daemons = match daemons::start(&plan.daemons).await {
        Ok(d) => d,
        Err(failure) => return launch_failed(&inst, &failure),
    };
    tracing::info!("starting {}", shell_words::join(plan.command_line()));
    let started = match start::start(&inst, &plan).await {
        Ok(s) => s,
        Err(failure) => {
            daemons::stop(daemons, Duration::ZERO).await;
            return launch_failed(&inst, &failure);
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    // Subscribed before anything else: no event of the VM's life is missed.
    forward_events(&started.qmp, tx.clone());
    forward_exit(started.exited.clone(), tx.clone());
    forward_host_signals(tx.clone());
    daemons::forward_exits(&daemons, tx.clone());
    watch_instance_dir(inst.dir.clone(), tx.clone());
    watch_console(started.console, tx.clone());
    watch_owner(inst.clone(), tx.clone());
    pump::cap_own_log(&inst);

    let listener = UnixListener::bind(inst.control()).context("cannot create the control socket")?;
    for s in inst.sockets() {
        let _ = std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o600));
    }
    let me = std::process::id() as i32;
    let mut state =
        VmState::new(started.pid, crate::clock::now(), plan.spec.accel, &started.version, plan.spec.hotplug_ports);
    let pids: Vec<_> = daemons.iter().map(|d| (&d.daemon, d.pid)).collect();
    state.shares = protocol::ShareState::of_boot(&plan.spec, &pids);
    let record = RunRecord {
        qemu: ProcIdentity::of(started.pid).unwrap_or(ProcIdentity {
            pid: started.pid,
            start_ticks: 0,
            boot_id: crate::instance::proc::boot_id(),
        }),
        supervisor: ProcIdentity::of(me).context("cannot read own /proc entry")?,
        started_at: state.started_at,
        accel: plan.spec.accel,
        qemu_version: started.version.clone(),
        argv: plan.argv.clone(),
    };
    // `launch` waits for run.json: the control socket is ready by then.
    write_json(&inst.run_record(), &record)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let acceptor = tokio::spawn(accept(listener, tx.clone(), started.qmp.clone(), stop_rx));
    let afterwards = Dispatcher::new(inst.clone(), started.qmp, started.exited, tx, state)
        .with_ssh_port(plan.spec.ssh_port)
        .run(rx)
        .await;
    started.pumps.finish().await;
    daemons::stop_after_qemu(daemons).await;
    let _ = stop_tx.send(true);
    let _ = acceptor.await;
    if afterwards == Afterwards::Remove {
        remove_throwaway(&inst);
    }
    Ok(0)
}

/// Removes a throwaway instance whose `run` is gone, as `destroy` would;
/// the caller holds the lock and no QEMU runs.
pub fn remove_throwaway(inst: &Instance) {
    crate::guix::release_root(&inst.state(), inst);
    let removed = inst.remove_created();
    tracing::info!("removed {} files of the throwaway instance", removed.len());
    if inst.kept_files().is_empty() {
        let _ = std::fs::remove_dir(&inst.dir);
    }
}

fn launch_failed(inst: &Instance, failure: &crate::instance::records::LaunchFailure) -> Result<i32> {
    tracing::error!("{}", failure.message);
    write_json(&inst.launch_failure(), failure)?;
    Ok(1)
}

/// QMP events in the order QEMU sent them, then `QmpClosed` once the
/// connection ended (QEMU sends its last events before EOF).
fn forward_events(qmp: &Qmp, tx: mpsc::UnboundedSender<Msg>) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let mut events = qmp.subscribe();
    let qmp = qmp.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                ev = events.recv() => match ev {
                    Ok(ev) => { let _ = tx.send(Msg::Event(ev)); }
                    Err(RecvError::Lagged(n)) => { let _ = tx.send(Msg::EventsLost(n)); }
                    Err(RecvError::Closed) => break,
                },
                _ = qmp.closed() => {
                    loop {
                        match events.try_recv() {
                            Ok(ev) => { let _ = tx.send(Msg::Event(ev)); }
                            Err(TryRecvError::Lagged(n)) => { let _ = tx.send(Msg::EventsLost(n)); }
                            Err(_) => break,
                        }
                    }
                    break;
                }
            }
        }
        let _ = tx.send(Msg::QmpClosed);
    });
}

fn forward_exit(mut exited: watch::Receiver<Option<ExitInfo>>, tx: mpsc::UnboundedSender<Msg>) {
    tokio::spawn(async move {
        if let Ok(e) = exited.wait_for(|e| e.is_some()).await {
            let _ = tx.send(Msg::Exited(e.expect("waited for Some")));
        }
    });
}

/// The host asks us to go away (logout, shutdown): power the guest down
/// rather than cut it off.
fn forward_host_signals(tx: mpsc::UnboundedSender<Msg>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup), Ok(mut int)) =
            (signal(SignalKind::terminate()), signal(SignalKind::hangup()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        loop {
            tokio::select! { _ = term.recv() => {}, _ = hup.recv() => {}, _ = int.recv() => {} }
            if tx.send(Msg::HostSignal).is_err() {
                return;
            }
        }
    });
}

/// How often a throwaway VM's supervisor looks for its `run`.
const OWNER_POLL: Duration = Duration::from_millis(200);

/// Tells the dispatcher when the `run` that owns this throwaway VM is gone
/// (run-origin.json names it by its identity; a SIGKILLed run cannot say
/// so itself). A run that keeps its VM clears the owner before it exits,
/// so an owner found gone is read once more before it counts.
fn watch_owner(inst: Instance, tx: mpsc::UnboundedSender<Msg>) {
    use crate::instance::records::RunOrigin;
    let owner = move || read_json::<RunOrigin>(&inst.run_origin()).ok().flatten().filter(|o| o.owner.is_some());
    let Some(mut origin) = owner() else { return };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(OWNER_POLL);
        // The record is read again only when its owner looks gone.
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let Some(gone) = origin.owner_gone() else { continue };
            match owner() {
                None => return,
                Some(now) if now.owner_gone() == Some(gone) => {
                    let _ = tx.send(Msg::OwnerGone(gone));
                    return;
                }
                Some(now) => origin = now,
            }
        }
    });
}

/// Tells the dispatcher when the instance's directory is deleted under the
/// running VM (checked once a second: nothing else would notice).
fn watch_instance_dir(dir: std::path::PathBuf, tx: mpsc::UnboundedSender<Msg>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if !dir.is_dir() {
                let _ = tx.send(Msg::InstanceGone);
                return;
            }
            if tx.is_closed() {
                return;
            }
        }
    });
}

/// Looks at what the guest prints on its serial console for the kernel's
/// panic and banner lines ([`crate::console::sign`]): a guest kernel
/// without a pvpanic driver panics without QEMU knowing.
fn watch_console(mut console: pump::Console, tx: mpsc::UnboundedSender<Msg>) {
    tokio::spawn(async move {
        let mut partial = Vec::<u8>::new();
        while let Some(chunk) = console.recv().await {
            partial.extend_from_slice(&chunk);
            let done = partial.iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
            for line in String::from_utf8_lossy(&partial[..done]).lines() {
                if let Some(sign) = crate::console::sign(line) {
                    let _ = tx.send(Msg::Console(sign, line.to_string()));
                }
            }
            partial.drain(..done);
            // A line longer than this is no kernel message.
            if partial.len() > 4096 {
                partial.clear();
            }
        }
    });
}

/// Serves control connections until told to stop, then gives answers
/// already decided a moment to go out.
async fn accept(listener: UnixListener, tx: mpsc::UnboundedSender<Msg>, qmp: Qmp, mut stop: watch::Receiver<bool>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            c = listener.accept() => match c {
                Ok((conn, _)) => { conns.spawn(serve(conn, tx.clone(), qmp.clone())); }
                Err(e) => { tracing::warn!("control socket: {e}"); break; }
            },
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(ANSWERS_FLUSH, async { while conns.join_next().await.is_some() {} }).await;
    conns.abort_all();
}

async fn serve(conn: UnixStream, tx: mpsc::UnboundedSender<Msg>, qmp: Qmp) {
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    match tokio::time::timeout(CONTROL_REQUEST, r.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    let send = |resp: &Response| {
        let mut s = serde_json::to_string(resp).expect("protocol types serialize");
        s.push('\n');
        s
    };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = w.write_all(send(&Response::Failed(format!("bad request: {e}"))).as_bytes()).await;
            return;
        }
    };
    if req == Request::Subscribe {
        let mut rx = qmp.subscribe();
        if w.write_all(send(&Response::Subscribed).as_bytes()).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => if w.write_all(send(&Response::Event(ev)).as_bytes()).await.is_err() { return },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
                _ = qmp.closed() => return,
            }
        }
    }
    let (reply, answer) = oneshot::channel();
    let resp = match tx.send(Msg::Request(req, reply)) {
        Ok(()) => answer.await.unwrap_or_else(|_| Response::Failed("the supervisor is exiting".into())),
        Err(_) => Response::Failed("the supervisor is exiting: QEMU has stopped".into()),
    };
    let _ = w.write_all(send(&resp).as_bytes()).await;
    let _ = w.flush().await;
}

/// Why QEMU ended, from a guest panic, the last SHUTDOWN and the exit
/// status. Every cause gets a kind: guest shutdown, guest panic, a signal
/// from the host, QMP quit, or a crash with its exit code or signal.
pub fn stop_cause(
    shutdown: Option<&Event>,
    panicked: Option<&Event>,
    exit: Option<ExitInfo>,
    outcome: Option<&StopOutcome>,
) -> StopCause {
    let by = outcome.and_then(|o| o.method);
    StopCause { kind: stop_kind(shutdown, panicked, exit, outcome), by }
}

fn stop_kind(
    shutdown: Option<&Event>,
    panicked: Option<&Event>,
    exit: Option<ExitInfo>,
    outcome: Option<&StopOutcome>,
) -> StopKind {
    let reason = shutdown.and_then(Event::shutdown);
    if let Some(p) = panicked.filter(|p| p.event == dispatcher::PANIC_EVENT) {
        let line = p.data.get("line").and_then(serde_json::Value::as_str).unwrap_or("").trim();
        return StopKind::ConsolePanic { line: line.into() };
    }
    if panicked.is_some() || reason.as_ref().is_some_and(|(_, r)| r == "guest-panic") {
        return StopKind::GuestPanicked;
    }
    match (reason, exit) {
        (Some((true, r)), _) => StopKind::GuestShutdown { reason: r },
        (Some((false, r)), _) if r == "host-signal" => StopKind::HostSignal,
        (Some((false, r)), _) if r == "host-qmp-quit" => StopKind::QmpQuit,
        (Some((false, r)), _) => StopKind::HostRequest { reason: r },
        (None, Some(exit)) if outcome.is_some() => StopKind::Exited { exit },
        (None, Some(exit)) => StopKind::Crashed { exit },
        (None, None) if outcome.is_some_and(|o| o.method.is_some()) => StopKind::Stopped,
        (None, None) => StopKind::Unknown,
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
    fn stop_causes_are_told_apart() {
        let exit0 = Some(ExitInfo { code: Some(0), signal: None });
        let kind = |sh: Option<&Event>, exit| stop_cause(sh, None, exit, None).kind;
        let k = kind(Some(&ev(true, "guest-shutdown")), exit0);
        assert_eq!(k, StopKind::GuestShutdown { reason: "guest-shutdown".into() });
        let kill = ExitInfo { code: None, signal: Some(9) };
        assert_eq!(kind(None, Some(kill)), StopKind::Crashed { exit: kill });
        assert!(stop_cause(None, None, Some(kill), None).crashed());
        assert_eq!(kind(Some(&ev(true, "guest-panic")), None), StopKind::GuestPanicked);
        assert_eq!(kind(Some(&ev(false, "host-signal")), exit0), StopKind::HostSignal);
        assert!(!stop_cause(Some(&ev(false, "host-signal")), None, exit0, None).crashed());
        assert_eq!(kind(Some(&ev(false, "host-qmp-quit")), exit0), StopKind::QmpQuit);
        assert_eq!(kind(None, None), StopKind::Unknown);
    }

    #[test]
    fn a_panic_paused_vm_stopped_later_still_names_the_panic() {
        let panic = Event { event: "GUEST_PANICKED".into(), data: json!({"action": "pause"}), timestamp: 1.0 };
        let o = StopOutcome {
            method: Some(crate::instance::records::StopMethod::Quit),
            shutdown_reason: Some("host-qmp-quit".into()),
            guest: false,
            seconds: 1.0,
            exit: None,
            steps: vec![],
        };
        let c = stop_cause(Some(&ev(false, "host-qmp-quit")), Some(&panic), None, Some(&o));
        assert_eq!(
            c,
            StopCause { kind: StopKind::GuestPanicked, by: Some(crate::instance::records::StopMethod::Quit) }
        );
        assert!(c.crashed());
        // No pvpanic driver: the console's line is the evidence.
        let line = "[ 23.9] Kernel panic - not syncing: sysrq triggered crash";
        let seen = Event { event: dispatcher::PANIC_EVENT.into(), data: json!({ "line": line }), timestamp: 1.0 };
        let c = stop_cause(Some(&ev(false, "host-qmp-quit")), Some(&seen), None, Some(&o));
        assert_eq!(c.kind, StopKind::ConsolePanic { line: line.into() });
        assert!(c.crashed());
    }
}
