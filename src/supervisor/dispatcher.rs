//! The supervisor's one task that owns the VM's state. Everything that
//! happens reaches it as a typed [`Msg`] on one channel (QMP events, QEMU's
//! exit, requests from clients, the ladder's progress, host signals), in
//! the order it happened; it decides, and spawns the slow parts (QMP
//! queries, the stop ladder) so that no request waits behind another. This
//! is the shape of nextest's runner dispatcher: no shared mutable state, no
//! sleeps standing in for joins.

use crate::logs::Capped;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

use super::ladder::{self, ChildProcess, StopOptions};
use super::protocol::{Ended, Live, LiveState, Request, Response, Stopped, VmState};
use super::stop_cause;
use crate::instance::proc::ExitInfo;
use crate::instance::records::{write_json, StopMethod, StopOutcome, StopRecord};
use crate::instance::Instance;
use crate::qemu::args::GUEST_AGENT_PORT_ID;
use crate::qemu::parse::RunState;
use crate::qmp::{Event, Qmp};
use crate::timeouts::{AGENT_PING_ANSWER, HOST_SIGNAL_STOP, OWNER_GONE_STOP, QMP_DRAIN, SSH_ALIVE, SUPERVISOR_QUERY};

/// The event a kernel panic seen on the serial console is logged as (and
/// recorded as, in stopped.json, when QEMU had no GUEST_PANICKED).
pub const PANIC_EVENT: &str = "QBUF_GUEST_PANIC";

/// Everything the dispatcher hears about.
#[derive(Debug)]
pub enum Msg {
    Event(Event),
    EventsLost(u64),
    QmpClosed,
    Exited(ExitInfo),
    Request(Request, oneshot::Sender<Response>),
    LadderStep(StopMethod, Duration),
    LadderDone(StopOutcome),
    HostSignal,
    /// The instance's directory was deleted under the running VM.
    InstanceGone,
    /// A line of the guest's serial console that tells of its kernel.
    Console(crate::console::Sign, String),
    /// The `run` that owns this throwaway VM (pid) is gone: stop, remove.
    OwnerGone(i32),
    /// A virtio-fs share's `virtiofsd` ended.
    ShareDaemonExited {
        tag: String,
        exit: ExitInfo,
        stderr_tail: String,
    },
}

/// What the supervisor does once QEMU is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Afterwards {
    /// Leave the instance for the next launch.
    Keep,
    /// Remove the instance as `destroy` does: its `run` is gone.
    Remove,
}

enum Ladder {
    Idle,
    /// Sending true hurries it past the guest's own steps.
    Running(watch::Sender<bool>),
    Done(StopOutcome),
}

pub struct Dispatcher {
    inst: Instance,
    qmp: Qmp,
    exited: watch::Receiver<Option<ExitInfo>>,
    tx: mpsc::UnboundedSender<Msg>,
    state: VmState,
    events_log: Option<Capped>,
    ladder: Ladder,
    waiters: Vec<oneshot::Sender<Response>>,
    qmp_closed: bool,
    afterwards: Afterwards,
    /// The host port forwarded to the guest's sshd.
    ssh_port: Option<u16>,
}

impl Dispatcher {
    pub fn new(
        inst: Instance,
        qmp: Qmp,
        exited: watch::Receiver<Option<ExitInfo>>,
        tx: mpsc::UnboundedSender<Msg>,
        state: VmState,
    ) -> Dispatcher {
        let events_log = open_events_log(&inst);
        Dispatcher {
            inst,
            qmp,
            exited,
            tx,
            state,
            events_log,
            ladder: Ladder::Idle,
            waiters: vec![],
            qmp_closed: false,
            afterwards: Afterwards::Keep,
            ssh_port: None,
        }
    }

    pub fn with_ssh_port(mut self, port: u16) -> Dispatcher {
        self.ssh_port = Some(port);
        self
    }

    /// Runs until QEMU is gone and everything it said is recorded; then
    /// answers whoever waits and returns what is left to do.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) -> Afterwards {
        let mut drain_until: Option<tokio::time::Instant> = None;
        while !self.finished() {
            let msg = match drain_until {
                None => rx.recv().await,
                Some(t) => match tokio::time::timeout_at(t, rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        tracing::warn!(
                            "QMP did not close within {QMP_DRAIN:?} of QEMU's exit; recording what is known"
                        );
                        break;
                    }
                },
            };
            let Some(msg) = msg else { break };
            self.handle(msg);
            if self.state.ended.is_some() && drain_until.is_none() {
                drain_until = Some(tokio::time::Instant::now() + QMP_DRAIN);
            }
        }
        self.finish(&mut rx);
        self.afterwards
    }

    fn finished(&self) -> bool {
        self.state.ended.is_some() && self.qmp_closed && !matches!(self.ladder, Ladder::Running(_))
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Event(ev) => self.note_event(ev),
            Msg::EventsLost(n) => self.log_event(&Event {
                event: "QBUF_EVENTS_LOST".into(),
                data: json!({ "count": n }),
                timestamp: crate::clock::now(),
            }),
            Msg::QmpClosed => self.qmp_closed = true,
            Msg::Exited(e) => {
                tracing::info!("QEMU exited: {e}");
                self.state.ended = Some(Ended { exit: e, record: None });
            }
            Msg::Request(req, reply) => self.request(req, reply),
            Msg::LadderStep(m, wait) => {
                self.state.stopping = Some(m);
                self.state.stopping_wait_secs = Some(wait.as_secs_f64());
            }
            Msg::LadderDone(o) => self.ladder = Ladder::Done(o),
            Msg::HostSignal => {
                tracing::info!("host signal received: powering the guest down");
                self.start_ladder(StopOptions { timeout: HOST_SIGNAL_STOP, force: false });
            }
            Msg::ShareDaemonExited { tag, exit, stderr_tail } => self.share_daemon_exited(tag, exit, stderr_tail),
            Msg::Console(sign, line) => self.console(sign, &line),
            Msg::InstanceGone => {
                // No command can reach this VM any more (its sockets and lock
                // file are gone): power it down rather than leave an orphan.
                tracing::warn!("the instance directory was deleted: powering the guest down");
                self.start_ladder(StopOptions { timeout: HOST_SIGNAL_STOP, force: false });
            }
            Msg::OwnerGone(pid) => {
                // A stop already under way (the run's own cleanup) goes on.
                tracing::warn!("run {pid}, which owns this throwaway VM, is gone: stopping the VM and removing it");
                self.afterwards = Afterwards::Remove;
                self.start_ladder(StopOptions { timeout: OWNER_GONE_STOP, force: false });
            }
        }
    }

    /// While QEMU runs, a `virtiofsd` that ends has taken the share from
    /// under the guest: `status` and `events` say so. After QEMU, it is
    /// the daemon's normal end.
    fn share_daemon_exited(&mut self, tag: String, exit: ExitInfo, stderr_tail: String) {
        if self.state.ended.is_some() {
            return;
        }
        tracing::warn!("virtiofsd for share '{tag}' ended under the running VM: {exit}");
        if let Some(s) = self.state.shares.iter_mut().find(|s| s.tag == tag) {
            s.daemon_exit = Some(exit);
            s.daemon_stderr = Some(stderr_tail.clone());
        }
        self.log_event(&Event {
            event: "QBUF_VIRTIOFSD_EXITED".into(),
            data: json!({ "tag": tag, "exit": exit.to_string(), "stderr_tail": stderr_tail }),
            timestamp: crate::clock::now(),
        });
    }

    fn note_event(&mut self, ev: Event) {
        note_event(&mut self.state, &ev);
        self.log_event(&ev);
        if ev.event == "RESET" && self.state.guest_kernel.boot_sign(true, ev.timestamp) {
            self.new_boot();
        }
    }

    /// The serial console told of the guest's kernel: a panic QEMU may
    /// never hear of (no pvpanic driver), or a new boot. Each goes to
    /// events.jsonl as a `QBUF_GUEST_*` event.
    fn console(&mut self, sign: crate::console::Sign, line: &str) {
        let now = crate::clock::now();
        match sign {
            crate::console::Sign::KernelPanic => {
                if self.state.ended.is_some() || !self.state.guest_kernel.panicked(line, now) {
                    return;
                }
                tracing::warn!("the guest's kernel panicked (serial console): {}", line.trim());
                let panics = self.state.guest_kernel.panics;
                self.log_event(&Event {
                    event: PANIC_EVENT.into(),
                    data: json!({ "line": line.trim(), "source": "serial-console", "panics": panics }),
                    timestamp: now,
                });
            }
            crate::console::Sign::KernelStart => {
                if self.state.guest_kernel.boot_sign(false, now) {
                    self.new_boot();
                }
            }
        }
    }

    fn new_boot(&mut self) {
        let k = &self.state.guest_kernel;
        let data = json!({ "boot": k.boots, "panics": k.panics, "reboot_loop": k.reboot_loop() });
        if k.reboot_loop() {
            tracing::warn!("the guest has booted {} times in this QEMU run: a reboot loop?", k.boots);
        }
        self.log_event(&Event { event: "QBUF_GUEST_BOOT".into(), data, timestamp: crate::clock::now() });
    }

    /// Every event of the VM's life goes to events.jsonl. A write that fails
    /// (a full disk) loses that line, never the VM's supervision.
    fn log_event(&mut self, ev: &Event) {
        if let (Some(f), Ok(line)) = (self.events_log.as_mut(), serde_json::to_string(ev)) {
            if let Err(e) = f.write(format!("{line}\n").as_bytes()) {
                tracing::warn!("cannot append to events.jsonl: {e}");
            }
        }
    }

    fn request(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        match req {
            // What the supervisor knows, without a question to QEMU.
            Request::State => {
                let _ = reply.send(Response::Status(Box::new(self.state.clone())));
            }
            // QEMU has exited, or is exiting (its QMP connection closed).
            Request::Status if self.state.ended.is_some() || self.qmp_closed => {
                let _ = reply.send(Response::Status(Box::new(self.state.clone())));
            }
            Request::Status => {
                let mut state = self.state.clone();
                let (qmp, agent) = (self.qmp.clone(), self.agent_socket());
                tokio::spawn(async move {
                    state.live = live(&qmp, agent).await;
                    let _ = reply.send(Response::Status(Box::new(state)));
                });
            }
            Request::Qmp { .. } if self.state.ended.is_some() => {
                let _ = reply.send(Response::Failed("QEMU has exited: the VM is stopping".into()));
            }
            Request::Qmp { command, arguments, timeout_ms } => {
                let qmp = self.qmp.clone();
                tokio::spawn(async move {
                    let answer = match qmp.execute_raw(&command, arguments, Duration::from_millis(timeout_ms)).await {
                        Ok(v) => Response::Return(v),
                        Err(crate::qmp::QmpError::Qemu { class, desc }) => Response::QmpError { class, desc },
                        Err(e) => Response::Failed(e.to_string()),
                    };
                    let _ = reply.send(answer);
                });
            }
            Request::Powerdown { timeout_secs, force } => {
                let timeout = Duration::try_from_secs_f64(timeout_secs).unwrap_or(Duration::ZERO);
                match &self.ladder {
                    // A stop already waiting for the guest: `--force` (or
                    // the Ctrl-C of the command that asked) hurries it.
                    Ladder::Running(hurry) if force => {
                        tracing::info!("stop forced on request: going on at quit");
                        let _ = hurry.send(true);
                    }
                    _ => self.start_ladder(StopOptions { timeout, force }),
                }
                self.waiters.push(reply);
            }
            Request::Subscribe => {
                let _ = reply.send(Response::Failed("subscriptions are served by the connection".into()));
            }
        }
    }

    /// The guest agent's socket when the guest opened the agent's port.
    fn agent_socket(&self) -> Option<PathBuf> {
        self.state.agent_port_open.then(|| self.inst.guest_agent())
    }

    fn start_ladder(&mut self, mut opts: StopOptions) {
        if !matches!(self.ladder, Ladder::Idle) {
            return;
        }
        // A dead kernel cannot answer the power button or the agent. A
        // panic line on the console may be the guest's own output, though
        // (anyone who may write /dev/console): a guest whose sshd still
        // greets is alive and gets the button after all.
        let console_panic = self.state.guest_kernel.panic.is_some() && !opts.force;
        if console_panic {
            tracing::info!("the guest's kernel panicked: going on at quit");
            opts.force = true;
        }
        let port = self.ssh_port.filter(|_| console_panic);
        let (hurry, hurried) = watch::channel(false);
        self.ladder = Ladder::Running(hurry);
        let qmp = self.qmp.clone();
        let proc = ChildProcess { pid: self.state.qemu_pid, exited: self.exited.clone() };
        let (known, agent, tx) = (self.state.last_shutdown.clone(), self.agent_socket(), self.tx.clone());
        tokio::spawn(async move {
            if let Some(port) = port {
                let greets = tokio::task::spawn_blocking(move || crate::ssh::banner(port, SSH_ALIVE));
                if greets.await.ok().flatten().is_some() {
                    tracing::warn!(
                        "the console showed a kernel panic, but the guest's sshd answers: pressing the button"
                    );
                    opts.force = false;
                }
            }
            let step_tx = tx.clone();
            let on_step = move |m: StopMethod, wait: Duration| {
                let _ = step_tx.send(Msg::LadderStep(m, wait));
            };
            let limits = ladder::Deadlines::default();
            let o = ladder::stop(Some(&qmp), &proc, &opts, known, agent.as_deref(), &on_step, hurried, limits).await;
            let _ = tx.send(Msg::LadderDone(o));
        });
    }

    /// Records how the VM ended and answers everyone who waits, including
    /// requests still queued. A record that cannot be written (a full disk)
    /// is logged; the answer carries it all the same.
    fn finish(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>) {
        let exit = self.state.ended.as_ref().map(|e| e.exit);
        let outcome = match &self.ladder {
            Ladder::Done(o) => Some(o.clone()),
            _ => None,
        };
        // QEMU's GUEST_PANICKED, else the panic the console showed.
        let panicked = self.state.panicked.clone().or_else(|| {
            let p = self.state.guest_kernel.panic.as_ref()?;
            Some(Event { event: PANIC_EVENT.into(), data: json!({ "line": p.line }), timestamp: p.at })
        });
        let cause = stop_cause(self.state.last_shutdown.as_ref(), panicked.as_ref(), exit, outcome.as_ref());
        tracing::info!("QEMU is gone: {cause:?}");
        let record = StopRecord {
            stopped_at: crate::clock::now(),
            exit,
            shutdown: self.state.last_shutdown.clone(),
            outcome: outcome.clone(),
            panicked,
            crashed: cause.crashed(),
            cause: Some(cause),
            reason: None,
        };
        if let Err(e) = write_json(&self.inst.stop_record(), &record) {
            tracing::error!("cannot record how the VM stopped: {e:#}");
        }
        for p in self.inst.runtime_files() {
            let _ = std::fs::remove_file(p);
        }
        self.state.ended =
            Some(Ended { exit: exit.unwrap_or(ExitInfo { code: None, signal: None }), record: Some(record.clone()) });
        self.state.stopping = None;
        self.state.stopping_wait_secs = None;
        let stopped = Stopped {
            outcome: outcome.unwrap_or_else(|| StopOutcome::already_stopped(Some(&record))),
            record: Some(record),
        };
        for w in self.waiters.drain(..) {
            let _ = w.send(Response::Stopped(Box::new(stopped.clone())));
        }
        rx.close();
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Request(req, reply) = msg {
                let answer = match req {
                    Request::Powerdown { .. } => Response::Stopped(Box::new(stopped.clone())),
                    Request::Status | Request::State => Response::Status(Box::new(self.state.clone())),
                    _ => Response::Failed("QEMU has exited".into()),
                };
                let _ = reply.send(answer);
            }
        }
    }
}

/// events.jsonl, bounded: past its cap the older events go to events.jsonl.1.
fn open_events_log(inst: &Instance) -> Option<Capped> {
    Capped::open(&inst.events_log(), &inst.events_log_old(), crate::logs::SMALL_CAP)
        .map_err(|e| tracing::warn!("cannot open events.jsonl: {e}"))
        .ok()
}

/// Keeps what `status` reports about the guest up to date.
pub fn note_event(state: &mut VmState, ev: &Event) {
    match ev.event.as_str() {
        "SHUTDOWN" => state.last_shutdown = Some(ev.clone()),
        "GUEST_PANICKED" => state.panicked = Some(ev.clone()),
        "VSERPORT_CHANGE" if ev.data.get("id").and_then(Value::as_str) == Some(GUEST_AGENT_PORT_ID) => {
            state.agent_port_open = ev.data.get("open").and_then(Value::as_bool).unwrap_or(false);
        }
        _ => {}
    }
}

/// QEMU's answers for `status`. `query-status` decides: a QEMU that does
/// not answer it (frozen, SIGSTOPped) is reported as unresponsive.
/// `None` when QEMU is exiting.
async fn live(qmp: &Qmp, agent: Option<PathBuf>) -> Option<Live> {
    let q = |cmd: &'static str, args: Value| qmp.execute_raw(cmd, args, SUPERVISOR_QUERY);
    let agent_state = async {
        match agent {
            None => crate::qga::AgentState::NotRunning,
            Some(sock) => match crate::qga::ping(&sock, AGENT_PING_ANSWER).await {
                Ok(()) => crate::qga::AgentState::Answers,
                Err(_) => crate::qga::AgentState::NoAnswer,
            },
        }
    };
    // All in flight at once: one round trip, and a frozen QEMU costs one
    // deadline, not one per question.
    let (status, mem, cpus, blocks, guest_agent) = tokio::join!(
        q("query-status", json!({})),
        q("query-memory-size-summary", json!({})),
        q("query-cpus-fast", json!({})),
        q("query-block", json!({})),
        agent_state
    );
    let disks = blocks.map(|b| crate::qemu::parse::parse_query_block(&b)).ok();
    let run_state = match status {
        Ok(v) => RunState::of_query_status(&v),
        // The connection ended under the question: QEMU is exiting.
        Err(crate::qmp::QmpError::Disconnected { .. }) => return None,
        Err(e) => return Some(Live::Unresponsive { reason: e.to_string() }),
    };
    Some(Live::Answered(LiveState {
        run_state,
        memory_mib: mem.ok().and_then(|v| v.get("base-memory")?.as_u64()).map(|b| b / (1024 * 1024)),
        cpus: cpus.ok().and_then(|v| v.as_array().map(|a| a.len() as u32)),
        // Only disks go on the reserved root ports (disk add), one each:
        // counting them spares QEMU a QOM question per port.
        hotplug_ports_used: disks.as_ref().map(|d| d.iter().filter(|d| !d.is_boot()).count() as u32),
        disks: disks.unwrap_or_default(),
        guest_agent,
    }))
}

#[cfg(test)]
mod tests;
