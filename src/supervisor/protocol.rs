//! The supervisor's control protocol on `control.sock`: a client sends one
//! JSON request line and reads one JSON answer line; a `Subscribe` stream
//! goes on with one line per QMP event. Both ends are typed here, and both
//! are serde: no JSON is built by hand.
//!
//! QMP serves one client per socket, so commands never talk to QEMU's own
//! socket: the supervisor holds the one QMP connection and answers many
//! clients at once, so `status` answers while a `powerdown` waits.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::instance::proc::ExitInfo;
use crate::instance::records::{StopMethod, StopOutcome, StopRecord};
use crate::qemu::args::ShareKind;
use crate::qemu::args::{Accel, VmSpec};
use crate::qemu::parse::{LiveDisk, RunState};
use crate::qemu::virtiofs::Daemon;
use crate::qga::AgentState;
use crate::qmp::Event;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// A QMP command forwarded as is.
    Qmp {
        command: String,
        #[serde(default)]
        arguments: Value,
        timeout_ms: u64,
    },
    /// Everything `status` shows, in one answer (QEMU is asked).
    Status,
    /// What the supervisor knows without asking QEMU or the guest agent
    /// (a `status` answer with no `live` part): for callers that poll.
    State,
    /// Run the stop ladder; answered once QEMU is gone.
    Powerdown { timeout_secs: f64, force: bool },
    /// Stream every QMP event from now on. The first answer is `Subscribed`,
    /// sent once the subscription is in place: a command sent after it
    /// cannot produce an event the stream misses.
    Subscribe,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", content = "body", rename_all = "kebab-case")]
pub enum Response {
    /// A QMP command's return value.
    Return(Value),
    /// QEMU's error for a QMP command.
    QmpError {
        class: crate::qmp::ErrorClass,
        desc: String,
    },
    /// The supervisor could not do what was asked.
    Failed(String),
    Status(Box<VmState>),
    Stopped(Box<Stopped>),
    Subscribed,
    Event(Event),
}

/// The supervisor's view of its VM, with QEMU's own answers while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    pub qemu_pid: i32,
    pub started_at: f64,
    pub accel: Accel,
    pub qemu_version: String,
    pub hotplug_ports: u32,
    /// The stop ladder's current step while it runs.
    pub stopping: Option<StopMethod>,
    /// How long that step waits at most, in seconds (as the ladder set it).
    #[serde(default)]
    pub stopping_wait_secs: Option<f64>,
    /// The last SHUTDOWN event seen, if any.
    pub last_shutdown: Option<Event>,
    /// GUEST_PANICKED, if the guest panicked during this boot.
    pub panicked: Option<Event>,
    /// Whether the guest has the guest agent's virtio-serial port open (from
    /// `VSERPORT_CHANGE`): no agent can answer while it is closed.
    pub agent_port_open: bool,
    /// Set once QEMU has exited: how, and why once the supervisor knows.
    pub ended: Option<Ended>,
    /// The shares this boot has, and how each reaches the guest.
    #[serde(default)]
    pub shares: Vec<ShareState>,
    /// What the serial console and QEMU's resets say about the guest's
    /// kernel: a panic QEMU never heard of, how many times it booted.
    #[serde(default)]
    pub guest_kernel: GuestKernel,
    /// QEMU's answers; `None` once it has exited.
    pub live: Option<Live>,
}

impl VmState {
    /// A VM that just came up: nothing has happened to it yet.
    pub fn new(qemu_pid: i32, started_at: f64, accel: Accel, version: &str, ports: u32) -> VmState {
        VmState {
            qemu_pid,
            started_at,
            accel,
            qemu_version: version.into(),
            hotplug_ports: ports,
            stopping: None,
            stopping_wait_secs: None,
            last_shutdown: None,
            panicked: None,
            agent_port_open: false,
            ended: None,
            shares: vec![],
            guest_kernel: GuestKernel::new(started_at),
            live: None,
        }
    }
}

/// A kernel panic as the guest's serial console showed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsolePanic {
    /// When the supervisor read it (Unix seconds).
    pub at: f64,
    /// The kernel's line, e.g. `[ 23.9] Kernel panic - not syncing: …`.
    pub line: String,
}

/// The guest's kernel over one QEMU run: a guest whose kernel has no
/// pvpanic driver panics without QEMU knowing (it reports "running"), and a
/// kernel that reboots after a panic (`panic=N`) loops without anyone
/// seeing it; the serial console and QEMU's `RESET` events show both.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GuestKernel {
    /// A panic in the current boot (a later boot clears it).
    pub panic: Option<ConsolePanic>,
    /// Panics seen in this QEMU run, all boots.
    pub panics: u32,
    /// Boots in this QEMU run, the first included.
    pub boots: u32,
    /// When the last few boots started (Unix seconds), oldest first.
    pub recent_boots: Vec<f64>,
    /// Whether this boot's kernel banner was seen (a second one is a new
    /// kernel without a reset: kexec).
    #[serde(default)]
    pub banner_seen: bool,
}

/// How many boot times are kept, and how close together that many boots
/// must be to be called a reboot loop.
const LOOP_BOOTS: usize = 3;
const LOOP_WINDOW_SECS: f64 = 300.0;
/// Resets this close to a boot's start belong to it.
const SAME_BOOT_SECS: f64 = 3.0;

impl GuestKernel {
    pub fn new(started_at: f64) -> GuestKernel {
        GuestKernel { boots: 1, recent_boots: vec![started_at], ..GuestKernel::default() }
    }

    /// The console showed a panic; `true` when it is news (the first of
    /// this boot).
    pub fn panicked(&mut self, line: &str, now: f64) -> bool {
        if self.panic.is_some() {
            return false;
        }
        self.panics += 1;
        // Guest output: no terminal control characters reach the user, and
        // a bounded length.
        let line: String = line.trim().chars().filter(|c| !c.is_control()).take(300).collect();
        self.panic = Some(ConsolePanic { at: now, line });
        true
    }

    /// A `RESET` event (`reset: true`) or a kernel banner; `true` when a
    /// new boot started. One reboot can make two resets within a second
    /// (QEMU 10, the test guest's panic=1): resets closer than
    /// [`SAME_BOOT_SECS`] to the boot's start are that boot. A banner is
    /// its boot's first sign under `quiet`-less kernels, after the reset.
    pub fn boot_sign(&mut self, reset: bool, now: f64) -> bool {
        let since = now - self.recent_boots.last().copied().unwrap_or(f64::MIN);
        let new = if reset { since >= SAME_BOOT_SECS } else { std::mem::replace(&mut self.banner_seen, true) };
        if !new {
            return false;
        }
        self.banner_seen = !reset;
        self.boots += 1;
        self.panic = None;
        self.recent_boots.push(now);
        if self.recent_boots.len() > LOOP_BOOTS {
            self.recent_boots.remove(0);
        }
        true
    }

    /// Whether the guest keeps rebooting: the last [`LOOP_BOOTS`] boots
    /// started within [`LOOP_WINDOW_SECS`].
    pub fn reboot_loop(&self) -> bool {
        self.recent_boots.len() >= LOOP_BOOTS
            && self.recent_boots[self.recent_boots.len() - 1] - self.recent_boots[0] < LOOP_WINDOW_SECS
    }
}

/// One share of the running VM, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareState {
    pub tag: String,
    pub path: std::path::PathBuf,
    pub readonly: bool,
    /// `9p` or `virtiofs`.
    pub kind: ShareKind,
    /// The share's `virtiofsd` (virtio-fs only), and which binary it is.
    pub daemon_pid: Option<i32>,
    #[serde(default)]
    pub daemon_binary: Option<std::path::PathBuf>,
    /// Set when that `virtiofsd` ended while QEMU ran: the guest lost the share.
    pub daemon_exit: Option<ExitInfo>,
    /// The end of its stderr, when it ended.
    pub daemon_stderr: Option<String>,
}

impl ShareState {
    /// The shares of a boot, with the started `virtiofsd`s and their pids.
    pub fn of_boot(spec: &VmSpec, daemons: &[(&Daemon, i32)]) -> Vec<ShareState> {
        let daemon = |s: &crate::qemu::args::Share| daemons.iter().find(|(d, _)| d.tag == s.tag);
        spec.shares
            .iter()
            .map(|s| ShareState {
                tag: s.tag.clone(),
                path: s.path.clone(),
                readonly: s.readonly,
                kind: spec.share_kind,
                daemon_pid: daemon(s).map(|(_, pid)| *pid),
                daemon_binary: daemon(s).map(|(d, _)| d.binary.clone()),
                daemon_exit: None,
                daemon_stderr: None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ended {
    pub exit: ExitInfo,
    /// The stop record, once written (or composed when it could not be).
    pub record: Option<StopRecord>,
}

/// What QEMU itself says while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Live {
    Answered(LiveState),
    /// `query-status` got no answer: QEMU is frozen or overloaded.
    Unresponsive {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveState {
    /// QEMU's run state (`running`, `paused`, `guest-panicked`, …); a state
    /// newer than this tool still reaches the user as QEMU spelled it.
    pub run_state: RunState,
    pub memory_mib: Option<u64>,
    pub cpus: Option<u32>,
    pub disks: Vec<LiveDisk>,
    /// How many reserved root ports carry a device now.
    pub hotplug_ports_used: Option<u32>,
    pub guest_agent: AgentState,
}

/// The answer to `Powerdown`: what the ladder did, and why QEMU ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stopped {
    pub outcome: StopOutcome,
    pub record: Option<StopRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_kept_until_the_next_boot_and_quick_reboots_are_a_loop() {
        let mut k = GuestKernel::new(100.0);
        assert!(!k.boot_sign(false, 101.0), "the first boot's banner is that boot");
        assert!(k.panicked("[ 9.1] Kernel panic - not syncing: x", 110.0));
        assert!(!k.panicked("Kernel panic - not syncing: again", 111.0), "one panic a boot");
        assert_eq!(k.panic.as_ref().unwrap().line, "[ 9.1] Kernel panic - not syncing: x");
        // A reboot shows as a reset (or two) and a banner: one boot.
        assert!(k.boot_sign(true, 120.0));
        assert!(!k.boot_sign(true, 120.7), "a second reset of the same reboot");
        assert!(!k.boot_sign(false, 121.0));
        assert_eq!((k.boots, k.panic.clone()), (2, None));
        assert!(!k.reboot_loop());
        k.panicked("Kernel panic - not syncing: y", 130.0);
        assert!(k.boot_sign(true, 140.0), "a quiet kernel: resets alone count");
        assert_eq!((k.boots, k.panics), (3, 2));
        assert!(k.reboot_loop());
        assert!(!k.boot_sign(false, 142.0));
        assert!(k.boot_sign(false, 150.0), "a second banner without a reset: kexec");
        let mut slow = GuestKernel::new(0.0);
        slow.boot_sign(true, 1000.0);
        slow.boot_sign(true, 2000.0);
        assert!(!slow.reboot_loop(), "reboots an hour apart are no loop");
    }

    #[test]
    fn requests_and_answers_survive_a_round_trip() {
        let reqs = [
            Request::Qmp { command: "query-status".into(), arguments: serde_json::json!({}), timeout_ms: 5 },
            Request::Status,
            Request::State,
            Request::Powerdown { timeout_secs: 1.5, force: true },
            Request::Subscribe,
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        }
        let answers = [
            Response::Return(serde_json::json!({"a": 1})),
            Response::QmpError { class: crate::qmp::ErrorClass::GenericError, desc: "x \"quoted\"\n".into() },
            Response::Failed("no".into()),
            Response::Subscribed,
        ];
        for a in answers {
            let line = serde_json::to_string(&a).unwrap();
            assert!(!line.contains('\n'), "one line: {line}");
            assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), a);
        }
    }
}
