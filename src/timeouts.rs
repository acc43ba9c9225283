//! Every wait with a limit, in one table: how long a step may take before
//! the tool gives up on it or moves on, and why that long. Values the user
//! sets (`--timeout`) are not here; neither are poll intervals (how often
//! something is looked at), which stay beside the loop they pace.
//!
//! Most limits are far above what a step takes on a quiet host: they
//! exist so that nothing hangs, and are sized for a guest under TCG on a
//! loaded 2-core CI runner.

use std::time::Duration;

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---- Bringing QEMU up (supervisor/spawn.rs, supervisor/start.rs, daemons.rs)

/// Launch: until QEMU is up (its QMP socket answering) or failed, for a
/// boot with `daemons` virtiofsds: longer than the supervisor's own waits
/// below can add up to, so the supervisor, which can say what went wrong
/// (and stops what it started), always decides first.
pub const fn qemu_up(daemons: u32) -> Duration {
    let own = QMP_SOCKET.as_secs() + QMP_GREETING.as_secs() + QEMU_VERSION_QUERY.as_secs() + KILLED_EXIT.as_secs();
    secs(own + VIRTIOFSD_SOCKET.as_secs() * daemons as u64 + QEMU_UP_MARGIN.as_secs())
}
/// What [`qemu_up`] adds to the supervisor's waits: its own start, and a
/// loaded host.
const QEMU_UP_MARGIN: Duration = secs(15);
/// Supervisor: until QEMU creates its QMP socket (firmware loading and
/// guest RAM allocation come first).
pub const QMP_SOCKET: Duration = secs(60);
/// Supervisor: until QEMU greets on the QMP connection it accepted.
pub const QMP_GREETING: Duration = secs(10);
/// Supervisor: `query-version` right after the greeting.
pub const QEMU_VERSION_QUERY: Duration = secs(5);
/// Supervisor: until a `virtiofsd` creates its socket.
pub const VIRTIOFSD_SOCKET: Duration = secs(10);
/// Supervisor: a `virtiofsd` ends by itself once QEMU's vhost-user
/// connection closes; after this long it is killed.
pub const VIRTIOFSD_EXIT_GRACE: Duration = secs(2);
/// Supervisor: until a child it SIGKILLed is seen exited.
pub const KILLED_EXIT: Duration = secs(5);
/// Doctor and `--accel auto`: the KVM test VM's run to its first vCPU
/// instruction (it takes milliseconds where KVM works; a broken nested
/// setup hangs, which this ends).
pub const KVM_TEST_VM: Duration = secs(5);

// ---- The supervisor at work (supervisor/mod.rs, dispatcher.rs, pump.rs)

/// A client's request line on the control socket.
pub const CONTROL_REQUEST: Duration = secs(10);
/// Answers already decided, on their way to their clients at the end.
pub const ANSWERS_FLUSH: Duration = secs(1);
/// One QMP query of the supervisor's own for `status`: a QEMU that takes
/// longer is reported `unresponsive`.
pub const SUPERVISOR_QUERY: Duration = secs(2);
/// After QEMU's exit, the rest of its QMP output (its last events come
/// before EOF, which follows the exit within milliseconds).
pub const QMP_DRAIN: Duration = secs(2);
/// After QEMU's exit, its last console and stderr output into the logs.
pub const LOG_DRAIN: Duration = secs(2);
/// How long the ladder gives the guest when the host asks the supervisor
/// to go away (SIGTERM, SIGHUP: a logout, a host shutdown).
pub const HOST_SIGNAL_STOP: Duration = secs(45);
/// How long a throwaway VM whose `run` is gone gets to power off: nobody
/// waits for its files, and a CI runner that killed the job may soon
/// start the next one.
pub const OWNER_GONE_STOP: Duration = secs(10);
/// How long the guest's sshd gets to greet when the console showed a
/// panic (a live guest under TCG on a busy host may take a second or two;
/// a dead one costs the stop this long).
pub const SSH_ALIVE: Duration = secs(3);

// ---- The stop ladder (supervisor/ladder.rs, supervisor/orphan.rs)

/// After QMP `quit`, until QEMU is gone.
pub const QUIT_DEADLINE: Duration = secs(10);
/// After each signal, until QEMU is gone.
pub const SIGNAL_DEADLINE: Duration = secs(5);
/// Whether the guest agent answers, asked before the power button.
pub const AGENT_PING: Duration = secs(1);
/// QEMU's last events, after its exit was seen.
pub const EVENTS_AFTER_EXIT: Duration = millis(500);
/// One QMP command or agent request of the ladder.
pub const LADDER_COMMAND: Duration = secs(5);
/// `cont` of a paused VM before its power button (a paused guest hears
/// no button).
pub const RESUME_BEFORE_POWERDOWN: Duration = secs(2);
/// Connecting to an orphaned QEMU's own QMP socket.
pub const ORPHAN_QMP_CONNECT: Duration = secs(3);

// ---- Commands and the supervisor (supervisor/client.rs, machine/, app/)

/// A QMP command a command sends through the supervisor.
pub const QMP_QUERY: Duration = secs(10);
/// Beyond a QMP command's own limit, for the supervisor's relay of it.
pub const RELAY_MARGIN: Duration = secs(2);
/// `status`: longer than [`SUPERVISOR_QUERY`], so a frozen QEMU is
/// reported by the supervisor rather than by a timeout here.
pub const STATUS_ANSWER: Duration = secs(5);
/// The supervisor's `state` (what it knows, answered at once).
pub const STATE_ANSWER: Duration = secs(3);
/// Until the supervisor confirms an event subscription.
pub const SUBSCRIBE: Duration = secs(5);
/// Sending a forced stop to a supervisor already stopping.
pub const FORCE_STOP_SEND: Duration = secs(3);
/// The supervisor's exit after it answered a stop (the lock is free then).
pub const SUPERVISOR_EXIT: Duration = secs(10);
/// A stop's budget beyond the ladder's own steps, for the supervisor's
/// records and exit.
pub const STOP_BUDGET_MARGIN: Duration = secs(15);
/// QEMU's run state asked before `ssh` (a paused guest cannot answer).
pub const RUN_STATE_QUESTION: Duration = secs(5);
/// The last threads of a killed QEMU letting go of the lock (freeing
/// guest RAM on a loaded host) after its main thread ended.
pub const DYING: Duration = secs(5);

// ---- The guest (app/ready.rs, ssh.rs, qga.rs, app/power.rs)

/// One SSH banner probe: the guest's sshd's first line.
pub const BANNER: Duration = secs(1);
/// OpenSSH's `ConnectTimeout` for a login (readiness, `run`'s COMMAND).
pub const SSH_CONNECT: Duration = secs(10);
/// A job in the guest over SSH (reading its /proc/mounts, a share's
/// unmount or mount around a snapshot, asking it to reboot): a login and a
/// small command, seconds even under TCG on a loaded host. The guest is
/// untrusted: a command or shell start-up that never ends (or a session
/// kept open by an answering guest, which keepalives do not end) is
/// stopped after this, and the step named. A login for readiness has the
/// boot's own deadline instead (`--timeout`).
pub const GUEST_JOB: Duration = secs(60);
/// How long a guest's sshd may refuse the key before the boot fails: it
/// may start before the guest installed its authorized keys.
pub const KEY_GRACE: Duration = secs(10);
/// A stop record after QEMU ended during the boot (the supervisor writes
/// it right after it reaped QEMU).
pub const STOP_RECORD: Duration = secs(5);
/// The guest's power-off after a launch found a host key that is not the
/// pinned one (the guest is not trusted with more time).
pub const HOST_KEY_MISMATCH_STOP: Duration = secs(20);
/// The guest's power-off after a launch was cancelled (Ctrl-C, `run`'s
/// deadline).
pub const CANCELLED_STOP: Duration = secs(10);
/// The end of a copy's ssh stderr once that ssh has exited. A shared
/// (ControlMaster) connection holds the session's stderr until the guest
/// closes the session: after an ssh ended by `run`'s deadline, a stalled
/// guest never does (OpenSSH 9.2 closes stdout then, not stderr).
pub const SSH_STDERR_AFTER_EXIT: Duration = secs(2);
/// A guest agent ping.
pub const AGENT_PING_ANSWER: Duration = secs(2);
/// The guest agent's reply to `guest-shutdown` (it may power off before
/// it answers).
pub const AGENT_SHUTDOWN_REPLY: Duration = secs(1);
/// `guest-shutdown` with mode `reboot` sent to the guest agent.
pub const AGENT_REBOOT: Duration = secs(5);

// ---- run and snapshots (app/run.rs, machine/migration.rs)

/// The guest's power-off when a run ends.
pub const RUN_STOP: Duration = secs(30);
/// After COMMAND's ssh failed as at QEMU's death (255) with the SSH
/// forward silent, how long QEMU gets to be seen gone.
pub const QEMU_SEEN_GONE: Duration = secs(2);
/// The banner probe that tells a dead VM from a dropped connection.
pub const BANNER_RECHECK: Duration = millis(500);
/// Saving or loading a VM's state.
pub const MIGRATION: Duration = secs(300);
/// `snapshot load`: until the resumed guest answers SSH.
pub const SNAPSHOT_LOAD_READY: Duration = secs(300);
