//! What `status` reports, and how the supervisor's answer becomes it.

use serde::Serialize;

use super::Render;
use crate::clock::human_duration;
use crate::instance::proc::ExitInfo;
use crate::instance::records::{RunOrigin, SnapshotOrigin, StopMethod, StopRecord};
use crate::qemu::args::Accel;
use crate::qemu::parse::{LiveDisk, RunState};
use crate::qga::AgentState;
use crate::qmp::Event;
use crate::supervisor::protocol::{ConsolePanic, GuestKernel, Live, ShareState, VmState};

/// The instance's state as the user sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum State {
    Running,
    Paused,
    /// Locked by a command that is starting (or stopping) it.
    Starting,
    Stopping,
    /// QEMU runs but does not answer QMP (frozen, or its supervisor died).
    Unresponsive,
    Stopped,
    Crashed,
    /// A record of the instance cannot be read, so its state is unknown
    /// (`list` shows it so rather than failing as a whole).
    Damaged,
    /// QEMU's vCPUs stopped for a reason none of the above names
    /// (`internal-error`, `io-error`, `suspended`, `inmigrate`, a state
    /// newer than this tool): shown as QEMU says it.
    Qemu(RunState),
}

impl From<State> for String {
    fn from(s: State) -> String {
        s.as_str().into()
    }
}

impl State {
    pub fn as_str(&self) -> &str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Starting => "starting",
            State::Stopping => "stopping",
            State::Unresponsive => "unresponsive",
            State::Stopped => "stopped",
            State::Crashed => "crashed",
            State::Damaged => "damaged",
            State::Qemu(r) => r.as_str(),
        }
    }

    /// From QEMU's run state while no stop is under way.
    pub fn of_run_state(run_state: &RunState) -> State {
        match run_state {
            RunState::Running => State::Running,
            RunState::Paused => State::Paused,
            RunState::GuestPanicked => State::Crashed,
            RunState::Shutdown => State::Stopping,
            other => State::Qemu(other.clone()),
        }
    }

    pub fn of_record(rec: &StopRecord) -> State {
        if rec.crashed {
            State::Crashed
        } else {
            State::Stopped
        }
    }
}

/// An instance that `run` started, as `status`, `list` and `show` mark it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunMark {
    /// The run's pid.
    pub pid: i32,
    /// The run owns the VM, which is stopped and removed when that run ends;
    /// false once the run kept it (`--keep`, `--keep-on-failure`).
    pub throwaway: bool,
    /// The snapshot the run started from.
    pub from_snapshot: Option<SnapshotOrigin>,
}

impl RunMark {
    pub fn of(o: &RunOrigin) -> RunMark {
        RunMark { pid: o.pid, throwaway: o.owner.is_some(), from_snapshot: o.from_snapshot.clone() }
    }

    /// What the instance is, in a few words.
    pub fn describe(&self) -> String {
        let from = self.from_snapshot.as_ref().map(|s| format!(", started from {s}")).unwrap_or_default();
        match self.throwaway {
            true => format!("throwaway VM of run pid {}{from}: stopped and removed when that run ends", self.pid),
            false => format!("kept by run pid {}{from}", self.pid),
        }
    }
}

/// One disk line of `status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskLine {
    pub device: String,
    pub node: String,
    pub file: String,
    pub format: String,
    pub summary: String,
}

impl From<&LiveDisk> for DiskLine {
    fn from(d: &LiveDisk) -> DiskLine {
        DiskLine {
            device: d.id.clone(),
            node: d.node.clone(),
            file: d.file.clone(),
            format: d.format.clone(),
            summary: d.summary(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub state: State,
    /// QEMU's own run state, e.g. `running`, `paused`, `guest-panicked`.
    pub qemu_status: Option<RunState>,
    pub pid: Option<i32>,
    pub ssh_port: Option<u16>,
    pub ssh_user: Option<String>,
    pub uptime_seconds: Option<f64>,
    pub accel: Option<Accel>,
    pub qemu_version: Option<String>,
    pub memory_mib: Option<u64>,
    pub cpus: Option<u32>,
    pub disks: Vec<DiskLine>,
    /// The running VM's shares and how each reaches the guest (`kind`:
    /// `9p` or `virtiofs`).
    pub shares: Vec<ShareState>,
    /// Reserved PCIe root ports, and how many carry a device now.
    pub hotplug_ports: Option<u32>,
    pub hotplug_ports_used: Option<u32>,
    pub hotplug_ports_free: Option<u32>,
    pub guest_agent: Option<AgentState>,
    /// A kernel panic the guest's serial console showed in this boot (a
    /// kernel without a pvpanic driver: QEMU itself says `running`).
    pub guest_panic: Option<ConsolePanic>,
    /// Boots of the guest in this QEMU run, the first included.
    pub guest_boots: Option<u32>,
    pub stopping_step: Option<StopMethod>,
    /// For a stopped instance: why it stopped.
    pub stop_reason: Option<String>,
    pub last_shutdown: Option<Event>,
    pub exit: Option<ExitInfo>,
    /// Set when `run` started the instance.
    pub run: Option<RunMark>,
    pub notes: Vec<String>,
}

impl Status {
    /// A stopped instance, as its records tell it.
    pub fn apply_record(&mut self, rec: Option<StopRecord>) {
        match rec {
            Some(rec) => {
                self.state = State::of_record(&rec);
                self.stop_reason = Some(super::stop::stop_reason(&rec));
                self.last_shutdown = rec.shutdown;
                self.exit = rec.exit;
            }
            None => {
                self.state = State::Stopped;
                self.stop_reason = Some("never started, or stopped before qbuf-qemu recorded why".into());
            }
        }
    }

    /// A running (or just ended) instance, as its supervisor answered.
    pub fn apply_vm(&mut self, vm: VmState, now: f64) {
        self.pid = Some(vm.qemu_pid);
        self.accel = Some(vm.accel);
        self.qemu_version = Some(vm.qemu_version);
        self.hotplug_ports = Some(vm.hotplug_ports);
        self.stopping_step = vm.stopping;
        self.last_shutdown = vm.last_shutdown;
        for sh in vm.shares.iter().filter(|s| s.daemon_exit.is_some()) {
            self.notes.push(share_lost(sh));
        }
        self.shares = vm.shares;
        self.guest_boots = Some(vm.guest_kernel.boots);
        if let Some(note) = reboot_note(&vm.guest_kernel) {
            self.notes.push(note);
        }
        if let Some(ended) = vm.ended {
            // QEMU has exited; the supervisor is finishing its records.
            self.exit = Some(ended.exit);
            match ended.record {
                Some(rec) => self.apply_record(Some(rec)),
                None => self.state = State::Stopping,
            }
            return;
        }
        self.uptime_seconds = Some((now - vm.started_at).max(0.0));
        match vm.live {
            Some(Live::Answered(l)) => {
                self.state = if vm.stopping.is_some() { State::Stopping } else { State::of_run_state(&l.run_state) };
                self.qemu_status = Some(l.run_state);
                self.memory_mib = l.memory_mib.or(self.memory_mib);
                self.cpus = l.cpus.or(self.cpus);
                self.disks = l.disks.iter().map(DiskLine::from).collect();
                self.hotplug_ports_used = l.hotplug_ports_used;
                self.hotplug_ports_free = l.hotplug_ports_used.map(|u| vm.hotplug_ports.saturating_sub(u));
                self.guest_agent = Some(l.guest_agent);
            }
            Some(Live::Unresponsive { reason }) => {
                self.state = if vm.stopping.is_some() { State::Stopping } else { State::Unresponsive };
                self.notes.push(format!("QEMU does not answer QMP ({reason}); it may be frozen or overloaded"));
            }
            None => self.state = State::Stopping,
        }
        // QEMU says running; the guest's console said its kernel died.
        if let (Some(p), None) = (vm.guest_kernel.panic, vm.stopping) {
            self.state = State::Crashed;
            self.guest_panic = Some(p);
        }
    }
}

/// The note for a guest that keeps rebooting.
fn reboot_note(k: &GuestKernel) -> Option<String> {
    k.reboot_loop().then(|| {
        let panics = match k.panics {
            0 => String::new(),
            n => format!(", {n} kernel panic{} on its console", if n == 1 { "" } else { "s" }),
        };
        format!(
            "the guest has booted {} times in this QEMU run{panics}, the last {} within minutes: a reboot loop? \
             its serial console ('logs') shows why",
            k.boots,
            k.recent_boots.len()
        )
    })
}

/// The note for a share whose `virtiofsd` ended under the running VM.
fn share_lost(sh: &ShareState) -> String {
    let exit = sh.daemon_exit.map(|e| e.to_string()).unwrap_or_default();
    // Its last line that is not routine chatter ("INFO ... Client connected").
    let said = sh
        .daemon_stderr
        .as_deref()
        .and_then(|t| t.lines().rev().find(|l| !l.contains(" INFO ") && !l.trim().is_empty()));
    format!(
        "virtiofsd of share '{}' ended ({exit}): the guest cannot use {} until the next boot (powerdown, then launch){}",
        sh.tag,
        if sh.tag == crate::qemu::args::DEFAULT_SHARE_TAG { "/mnt/qbuf".to_string() } else { format!("share '{}'", sh.tag) },
        said.map(|l| format!("; it said: {}", l.trim())).unwrap_or_default()
    )
}

/// One share line of `status`.
fn share_human(sh: &ShareState) -> String {
    let mode = if sh.readonly { "read-only" } else { "read-write" };
    let at = if sh.tag == crate::qemu::args::DEFAULT_SHARE_TAG { " at /mnt/qbuf".to_string() } else { String::new() };
    let daemon = match (sh.daemon_pid, sh.daemon_exit) {
        (_, Some(_)) => ", its virtiofsd has ended".to_string(),
        (Some(p), None) => match &sh.daemon_binary {
            Some(b) => format!(", virtiofsd pid {p}: {}", b.display()),
            None => format!(", virtiofsd pid {p}"),
        },
        _ => String::new(),
    };
    format!("{} {}{at} over {} ({mode}{daemon})", sh.tag, sh.path.display(), sh.kind.as_str())
}

fn agent_human(a: AgentState) -> &'static str {
    match a {
        AgentState::Answers => "answers (guest-ping)",
        AgentState::NotRunning => "not running in the guest",
        AgentState::NoAnswer => "its port is open but it did not answer guest-ping",
    }
}

impl Render for Status {
    fn human(&self) -> String {
        let mut s = format!("instance:   {}\nstate:      {}", self.name, self.state.as_str());
        if let Some(q) = &self.qemu_status {
            s.push_str(&format!(" (QEMU: {q})"));
        }
        s.push('\n');
        let mut line = |label: &str, value: String| s.push_str(&format!("{label:<11} {value}\n"));
        if let Some(step) = self.stopping_step {
            line("stopping:", format!("at step '{}'", step.as_str()));
        }
        if let Some(p) = self.pid {
            line("pid:", p.to_string());
        }
        if let Some(u) = self.uptime_seconds {
            line("uptime:", human_duration(u));
        }
        if let Some(a) = self.accel {
            line("accel:", a.as_str().into());
        }
        if let Some(v) = &self.qemu_version {
            line("QEMU:", v.clone());
        }
        if let (Some(m), Some(c)) = (self.memory_mib, self.cpus) {
            line("resources:", format!("{m} MiB, {c} CPUs"));
        }
        if let Some(p) = self.ssh_port {
            line("ssh:", format!("{}@127.0.0.1 port {p}", self.ssh_user.clone().unwrap_or_default()));
        }
        for d in &self.disks {
            line("disk:", d.summary.clone());
        }
        for sh in &self.shares {
            line("share:", share_human(sh));
        }
        match (self.hotplug_ports, self.hotplug_ports_used, self.hotplug_ports_free) {
            (Some(h), Some(u), Some(f)) => line("hot-plug:", format!("{h} PCIe root ports: {u} used, {f} free")),
            (Some(h), _, _) if self.state != State::Stopped => {
                line("hot-plug:", format!("{h} PCIe root ports reserved"))
            }
            _ => {}
        }
        if let Some(a) = self.guest_agent {
            line("agent:", agent_human(a).into());
        }
        if let Some(p) = &self.guest_panic {
            line("panic:", format!("the guest's kernel panicked at {}: {}", crate::clock::utc_time(p.at), p.line));
        }
        if let Some(r) = &self.stop_reason {
            line("stopped:", r.clone());
        }
        if let Some(e) = &self.exit {
            line("QEMU exit:", e.to_string());
        }
        for n in &self.notes {
            line("note:", n.clone());
        }
        s.trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_vcpu_is_shown_as_qemu_says_not_as_paused() {
        let of = |s: &str| State::of_run_state(&RunState::parse(s));
        assert_eq!(of("running"), State::Running);
        assert_eq!(of("paused"), State::Paused);
        assert_eq!(of("guest-panicked"), State::Crashed);
        for s in ["internal-error", "io-error", "suspended", "inmigrate", "some-future-state"] {
            assert_eq!(of(s).as_str(), s);
            assert_eq!(serde_json::to_value(of(s)).unwrap(), s);
        }
    }
}
