//! Readiness: a boot is done when an SSH login with the instance key works
//! (the contract), not when a banner shows. The banner is the cheap probe
//! polled often; a login is tried as soon as one appears.

use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::stop;
use super::Ctx;
use crate::instance::proc::ProcIdentity;
use crate::instance::records::{BootPlan, LaunchFailure, StopOutcome, StopRecord};
use crate::instance::{read_json, Instance};
use crate::report::error::Failure;
use crate::ssh;
use crate::supervisor::ladder::StopOptions;
use crate::timeouts::{
    BANNER, CANCELLED_STOP, HOST_KEY_MISMATCH_STOP, KEY_GRACE, SSH_CONNECT, STATE_ANSWER, STOP_RECORD,
};

/// How often the banner is probed while the guest boots.
const POLL: Duration = Duration::from_millis(20);

/// What else to watch while waiting.
pub struct Watch {
    /// KVM was chosen by qbuf-qemu, so a silent guest blames it.
    pub auto_kvm: bool,
    pub silence: Duration,
    /// Where this boot's serial output starts in serial.log.
    pub serial_before: u64,
    /// Set from outside (a signal, a deadline): stop waiting.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// What the wait is for, as the progress line says it: a booting guest
    /// goes through firmware and its kernel, a resumed one does not.
    pub stage: &'static str,
    /// A resumed guest: what its login runs (its chores ride on it, one
    /// login less), made afresh for each attempt. Its sshd was listening
    /// when its state was saved, so the first login is tried at once,
    /// without a banner probe (which costs the sshd a connection of its
    /// own). `None`: a boot, whose login runs `true`.
    pub resumed: Option<Box<dyn Fn() -> String>>,
    /// The flag that sets this wait's deadline, for the hint when it
    /// passes (`--timeout`, `run --boot-timeout`, `reboot --ssh-timeout`).
    pub limit_flag: &'static str,
}

/// The progress line while a guest boots.
pub const BOOTING: &str = "waiting for the guest: firmware, then its kernel";

/// Why a boot did not become ready.
#[derive(Debug)]
pub enum Readiness {
    Exited(Box<StopRecord>),
    HostKey,
    /// The guest's sshd answered and refused the key for the whole grace.
    KeyRefused {
        said: String,
        secs: u64,
    },
    /// The guest's serial console showed a kernel panic (this line).
    Panicked(String),
    /// Under a KVM qbuf-qemu chose, the guest printed nothing for this long.
    SilentUnderKvm(Duration),
    /// No login worked within the deadline that `flag` sets; what the
    /// last attempt saw.
    TimedOut {
        waited: Duration,
        last: String,
        flag: &'static str,
    },
    Failed(String),
    /// Told to stop waiting (a signal, `run`'s deadline) after `waited`;
    /// what the last attempt saw.
    Cancelled {
        waited: Duration,
        last: String,
    },
}

impl Readiness {
    /// One sentence for a VM that is left running.
    pub fn describe(&self, t: &ssh::Target, inst: &Instance) -> String {
        match self {
            Readiness::Exited(rec) => format!("QEMU stopped: {}", crate::report::stop::stop_reason(rec)),
            Readiness::HostKey => ssh::host_key_mismatch_message(t, inst),
            Readiness::KeyRefused { said, secs } => key_refused_message(t, said, *secs),
            Readiness::Panicked(line) => format!("the guest's kernel panicked: {line}"),
            Readiness::SilentUnderKvm(d) => silent_under_kvm(*d),
            Readiness::TimedOut { waited, last, flag } => timed_out(t, *waited, last, flag),
            Readiness::Failed(m) => m.clone(),
            Readiness::Cancelled { waited, last } => cancelled(*waited, last),
        }
    }
}

/// The pause after a login the guest refused, doubled after each (a guest
/// that installs its keys a moment after its sshd starts is let in at
/// once; one that never does is not asked ten times a second).
const REFUSED_PAUSE: Duration = Duration::from_millis(50);
const REFUSED_PAUSE_MAX: Duration = Duration::from_millis(800);

/// The pause after the guest refused the key for `since`: 50 ms at first,
/// doubling to 800 ms.
fn refused_pause(since: Duration) -> Duration {
    let mut pause = REFUSED_PAUSE;
    while pause < REFUSED_PAUSE_MAX && since > pause * 2 {
        pause *= 2;
    }
    pause
}
/// How often the supervisor is asked whether the console showed a panic.
const PANIC_CHECK: Duration = Duration::from_millis(500);

/// What to check when the guest refuses the key.
fn key_refused_message(t: &ssh::Target, said: &str, secs: u64) -> String {
    let public = format!("{}.pub", t.key.display());
    format!(
        "the guest's SSH server refused the key for user '{user}' for {secs}s ({said}): this is no slow boot. \
         Check that user '{user}' exists in the guest and that its ~/.ssh/authorized_keys (or the image's \
         authorized keys) holds the public key {public} (qbuf-qemu passes it to the guest as fw_cfg \
         opt/org.qbuf/authorized_keys; an image of your own must install it), or give --ssh-user and --ssh-key \
         for a user and key the image accepts",
        user = t.user
    )
}

/// Waits until a login works, QEMU ends, or `deadline`; the output of the
/// login's command.
pub fn wait(
    inst: &Instance,
    t: &ssh::Target,
    qemu: &ProcIdentity,
    deadline: Instant,
    w: &Watch,
) -> Result<std::process::Output, Readiness> {
    let start = Instant::now();
    let mut last = String::from("no SSH banner yet");
    let mut serial_seen = w.serial_before;
    let (mut refused_since, mut next_panic_check) = (None::<Instant>, start);
    crate::progress::stage(w.stage);
    let mut listening = w.resumed.is_some();
    loop {
        if w.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst)) {
            return Err(Readiness::Cancelled { waited: start.elapsed(), last });
        }
        if !qemu.is_running() {
            return Err(exited(inst));
        }
        let serial_now = std::fs::metadata(inst.serial_log()).map(|m| m.len()).unwrap_or(0);
        if serial_now != serial_seen {
            // The status line shows what the guest is doing now.
            serial_seen = serial_now;
            crate::progress::stage("the guest is booting (waiting for SSH)");
            crate::progress::detail(&crate::logs::last_line(&inst.serial_log(), w.serial_before).unwrap_or_default());
        }
        if w.auto_kvm && serial_now == w.serial_before && start.elapsed() > w.silence {
            return Err(Readiness::SilentUnderKvm(w.silence));
        }
        if Instant::now() > deadline {
            let waited = deadline.saturating_duration_since(start).max(start.elapsed());
            return Err(Readiness::TimedOut { waited, last, flag: w.limit_flag });
        }
        if Instant::now() >= next_panic_check {
            next_panic_check = Instant::now() + PANIC_CHECK;
            if let Some(line) = console_panic(inst) {
                return Err(Readiness::Panicked(line));
            }
        }
        if std::mem::take(&mut listening) || ssh::banner(t.port, BANNER).is_some() {
            crate::progress::stage("SSH answered; logging in");
            if !last.starts_with("banner seen") {
                last = "banner seen, logging in".into();
            }
            tracing::info!(
                "SSH on port {} after {:.1}s; logging in as {}",
                t.port,
                start.elapsed().as_secs_f64(),
                t.user
            );
            let remote = w.resumed.as_ref().map(|l| l()).unwrap_or_else(|| "true".into());
            // The login itself ends at the deadline or a cancel too: a
            // guest whose shell never starts would hold it forever.
            let limit = ssh::Limit { step: "the login".into(), deadline, cancel: w.cancel.as_deref() };
            match ssh::try_login(t, &remote, SSH_CONNECT, &limit) {
                Ok(ssh::Login::Ok(out)) => return Ok(out),
                Ok(ssh::Login::HostKeyChanged) => return Err(Readiness::HostKey),
                Ok(ssh::Login::KeyRefused(said)) => {
                    let since = *refused_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= KEY_GRACE {
                        return Err(Readiness::KeyRefused { said, secs: since.elapsed().as_secs() });
                    }
                    tracing::info!("the guest refused the key, trying again for up to {KEY_GRACE:?}: {said}");
                    last = format!("banner seen, the key was refused: {said}");
                    std::thread::sleep(refused_pause(since.elapsed()));
                }
                Ok(ssh::Login::Failed(e)) => {
                    tracing::info!("login failed, trying again: {e}");
                    last = format!("banner seen, login failed: {e}")
                }
                Err(e) => return Err(login_cut(e, start.elapsed(), last, w.limit_flag)),
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Why readiness ends when a login's ssh could not be run or did not end
/// by itself ([`ssh::Overrun`]): a cancel is the wait's own, the deadline
/// the boot's (set by `flag`), after `waited`; `last` is what the attempt
/// before saw.
fn login_cut(e: anyhow::Error, waited: Duration, last: String, flag: &'static str) -> Readiness {
    match e.downcast_ref::<ssh::Overrun>() {
        Some(ssh::Overrun::Cancelled { .. }) => Readiness::Cancelled { waited, last },
        Some(ssh::Overrun::TimedOut { .. }) => Readiness::TimedOut { waited, last: e.to_string(), flag },
        _ => Readiness::Failed(e.to_string()),
    }
}

fn silent_under_kvm(silence: Duration) -> String {
    format!(
        "the guest printed nothing on its serial console for {}s under KVM, which qbuf-qemu chose because /dev/kvm is accessible. \
         KVM that opens but does not run guests is common in broken nested-virtualization setups: relaunch with '--accel tcg'",
        silence.as_secs()
    )
}

/// Said of a wait that was told to stop: how far the boot had got, which
/// is all a throwaway run's user learns of it (its serial log goes with
/// it; the tail follows this).
fn cancelled(waited: Duration, last: &str) -> String {
    format!("stopped waiting for SSH after {:.0}s (cancelled; last: {last})", waited.as_secs_f64())
}

/// The serial log is not named: a throwaway run's goes with it, and each
/// caller shows the console's end or says how to read it.
fn timed_out(t: &ssh::Target, waited: Duration, last: &str, flag: &str) -> String {
    format!(
        "the guest did not accept an SSH login on port {} within {:.0}s (last: {last}); a slow boot needs a longer {flag}",
        t.port,
        waited.as_secs_f64(),
    )
}

/// The kernel panic the supervisor saw on the guest's serial console in
/// this boot, if any (a guest kernel without a pvpanic driver panics
/// without QEMU knowing). The line is the guest's, so its terminal
/// controls are removed before any message quotes it.
pub fn console_panic(inst: &Instance) -> Option<String> {
    let state = super::block_on(crate::supervisor::client::state(&inst.control(), STATE_ANSWER)).ok()?;
    state.guest_kernel.panic.map(|p| crate::logs::guest_text(p.line.as_bytes(), 500))
}

/// QEMU ended during the boot: its stop record, written by the supervisor
/// right after it reaped QEMU.
fn exited(inst: &Instance) -> Readiness {
    let until = Instant::now() + STOP_RECORD;
    loop {
        if let Ok(Some(rec)) = read_json::<StopRecord>(&inst.stop_record()) {
            return Readiness::Exited(Box::new(rec));
        }
        if Instant::now() > until {
            return Readiness::Failed("QEMU exited during boot and left no stop record".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The error a boot that did not become ready ends with; the VM is stopped
/// first, so nothing is left running.
pub fn failed(
    ctx: &Ctx,
    inst: &Instance,
    t: &ssh::Target,
    plan: &BootPlan,
    serial_before: u64,
    hint: Option<String>,
    r: Readiness,
) -> anyhow::Error {
    let serial_tail = || crate::logs::tail(&inst.serial_log(), serial_before, 1500, "(nothing yet in this boot)");
    match r {
        Readiness::Exited(rec) => Failure::LaunchFailed {
            failure: LaunchFailure {
                message: format!(
                    "QEMU stopped while the guest was booting: {}",
                    crate::report::stop::stop_reason(&rec)
                ),
                exit: rec.exit,
                command_line: plan.command_line(),
                stderr_tail: crate::logs::tail(&inst.qemu_stderr(), 0, 2000, ""),
                serial_tail: serial_tail(),
            },
            hint: hint.or_else(|| crash_hint(rec.exit.as_ref())),
        }
        .into(),
        Readiness::HostKey => {
            let _ = stop::stop_running(ctx, inst, &StopOptions { timeout: HOST_KEY_MISMATCH_STOP, force: false });
            anyhow!("{}\nThe VM was powered down.", ssh::host_key_mismatch_message(t, inst))
        }
        Readiness::Cancelled { .. } => {
            // Where the boot was, not the shutdown that follows.
            let tail = serial_tail();
            // Not forced: a guest that was booting fine is let power off.
            let outcome = stop::stop_running(ctx, inst, &StopOptions { timeout: CANCELLED_STOP, force: false });
            with_tail(r.describe(t, inst), outcome, hint, tail)
        }
        Readiness::KeyRefused { said, secs } => {
            stopped_with_tail(ctx, inst, key_refused_message(t, &said, secs), hint, serial_tail())
        }
        Readiness::Panicked(line) => stopped_with_tail(
            ctx,
            inst,
            format!(
                "the guest's kernel panicked while it booted: {line}. Check the image's kernel and its command line \
                 (--append){}",
                whole_boot(ctx)
            ),
            hint,
            serial_tail(),
        ),
        Readiness::SilentUnderKvm(_) | Readiness::TimedOut { .. } | Readiness::Failed(_) => {
            let msg = format!("{}{}", r.describe(t, inst), whole_boot(ctx));
            stopped_with_tail(ctx, inst, msg, hint, serial_tail())
        }
    }
}

/// Where the whole boot can be read, after a message that shows only the
/// console's end; nothing for a throwaway instance, whose log goes with it.
pub fn whole_boot(ctx: &Ctx) -> String {
    match ctx.throwaway {
        true => String::new(),
        false => format!("; '{}' shows the whole boot", ctx.command("logs --boot")),
    }
}

/// Stops the VM at once (the guest cannot help: it is dead, silent or
/// refuses us) and says so after `msg`, with the serial console's end.
fn stopped_with_tail(ctx: &Ctx, inst: &Instance, msg: String, hint: Option<String>, tail: String) -> anyhow::Error {
    let outcome = stop::stop_running(ctx, inst, &StopOptions { timeout: Duration::ZERO, force: true });
    with_tail(msg, outcome, hint, tail)
}

/// `msg`, how the VM was stopped (`outcome`), the serial console's end and
/// `hint`.
fn with_tail(
    msg: String,
    outcome: anyhow::Result<Option<StopOutcome>>,
    hint: Option<String>,
    tail: String,
) -> anyhow::Error {
    let how = outcome.ok().flatten().and_then(|o| o.method).map(|m| m.as_str()).unwrap_or("nothing");
    let mut m = format!("{msg}\nThe VM was stopped ({how}). serial console (last lines):\n{tail}");
    if let Some(h) = hint {
        m.push('\n');
        m.push_str(&h);
    }
    anyhow!(m)
}

/// What to do when QEMU itself crashed (a signal nobody sent: its own
/// assertion or a fault) rather than being stopped. Said for `launch` and
/// `run` alike, so it names no command: such crashes under TCG are races,
/// and a second try usually boots.
fn crash_hint(exit: Option<&crate::instance::proc::ExitInfo>) -> Option<String> {
    use nix::sys::signal::Signal;
    let sig = Signal::try_from(exit?.signal?).ok()?;
    matches!(sig, Signal::SIGABRT | Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE).then(|| {
        format!(
            "QEMU itself crashed ({sig}; 'QEMU said' above shows where), not the guest: try again; \
             if it crashes every time, report those lines to QEMU, or try another QEMU build with QBUF_QEMU_SYSTEM=PATH"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::{crash_hint, login_cut, refused_pause, Readiness};
    use crate::instance::proc::ExitInfo;
    use crate::ssh::Overrun;
    use std::time::Duration;

    #[test]
    fn a_refused_key_is_asked_again_soon_then_less_often() {
        assert_eq!(refused_pause(Duration::ZERO), Duration::from_millis(50));
        assert_eq!(refused_pause(Duration::from_millis(250)), Duration::from_millis(200));
        assert_eq!(refused_pause(Duration::from_secs(9)), Duration::from_millis(800));
    }

    #[test]
    fn a_login_stopped_at_the_deadline_or_by_a_cancel_ends_the_wait_as_such() {
        let waited = Duration::from_secs(30);
        let step = || "the login".to_string();
        let last = || "banner seen, login failed: x".to_string();
        let cut = login_cut(Overrun::Cancelled { step: step() }.into(), waited, last(), "--timeout");
        match cut {
            Readiness::Cancelled { waited: w, last } => {
                assert_eq!(w, waited);
                assert_eq!(last, "banner seen, login failed: x");
            }
            other => panic!("{other:?}"),
        }
        let cut = login_cut(
            Overrun::TimedOut { step: step(), after: Duration::from_secs(28) }.into(),
            waited,
            last(),
            "--boot-timeout",
        );
        match cut {
            Readiness::TimedOut { waited: w, last, flag } => {
                assert_eq!((w, flag), (waited, "--boot-timeout"));
                assert!(last.starts_with("the login did not finish within 28s"), "{last}");
            }
            other => panic!("{other:?}"),
        }
        let cut = login_cut(Overrun::TooMuch { step: step(), stream: "stdout" }.into(), waited, last(), "--timeout");
        assert!(matches!(&cut, Readiness::Failed(m) if m.contains("the guest sent too much")), "{cut:?}");
    }

    #[test]
    fn only_a_crash_of_qemu_itself_gets_the_crash_hint() {
        let by = |signal| ExitInfo { code: None, signal: Some(signal) };
        assert!(crash_hint(Some(&by(6))).unwrap().contains("SIGABRT"));
        assert!(crash_hint(Some(&by(11))).is_some());
        assert_eq!(crash_hint(Some(&by(9))), None, "SIGKILL is sent, not a crash");
        assert_eq!(crash_hint(Some(&ExitInfo { code: Some(1), signal: None })), None);
        assert_eq!(crash_hint(None), None);
    }
}
