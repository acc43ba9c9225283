//! What ends a run (or a `copy` from the guest) early, watched on a thread
//! of its own (the main one is busy booting, or waiting for COMMAND or the
//! copy): SIGINT, SIGTERM, SIGHUP and, for a run, the `--timeout` deadline
//! and a guest kernel panic the supervisor saw on the console. Each
//! decides the exit status (CONTRACT.md).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{TIMED_OUT, VM_BROKE};
use crate::report::run::{Outcome, RunSummary};
use crate::timeouts::STATE_ANSWER;

/// What ended a run early.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Why {
    /// `--timeout` expired.
    Deadline,
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(nix::sys::signal::Signal),
    /// The guest's kernel panicked (its console said so).
    GuestPanicked,
}

impl Why {
    /// The exit status it ends the run with (CONTRACT.md).
    fn exit_code(self) -> i32 {
        match self {
            Why::Deadline => TIMED_OUT,
            Why::GuestPanicked => VM_BROKE,
            Why::Signal(s) => 128 + s as i32,
        }
    }
}

/// What ended a run early: the deadline, a signal or a dead guest. Set by
/// the watcher thread; the ssh child is killed when it is set.
#[derive(Default)]
pub struct Interrupt {
    pub cancel: Arc<AtomicBool>,
    why: std::sync::Mutex<Option<Why>>,
    /// The running ssh process (COMMAND's, or a `--copy-out`'s), to stop it at once.
    child: AtomicI32,
    /// The running ssh was ended (an interruption, a dead guest): COMMAND's
    /// exit status is ssh's, not COMMAND's; a copy did not finish.
    pub killed: AtomicBool,
    /// The kernel panic the guest's serial console showed (the supervisor
    /// saw it): the guest is dead, and the run ends at once with 125.
    panic: std::sync::Mutex<Option<String>>,
}

impl Interrupt {
    fn set(&self, why: Why) {
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.cancel.store(true, Ordering::SeqCst);
        self.end_command();
    }

    pub fn why(&self) -> Option<Why> {
        *self.why.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest's kernel panicked: COMMAND's ssh waits for a dead guest,
    /// so it is ended. The boot's own wait sees the panic itself.
    fn set_panic(&self, line: String) {
        *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(line);
        self.why.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(Why::GuestPanicked);
        self.end_command();
    }

    /// The ssh that now runs (COMMAND's, a copy's), 0 once it has ended;
    /// one that starts after the interruption is ended at once.
    pub fn track(&self, pid: i32) {
        self.child.store(pid, Ordering::SeqCst);
        self.end_command();
    }

    /// Ends the running ssh, when one runs and the run is interrupted or
    /// its guest dead.
    fn end_command(&self) {
        let pid = self.child.load(Ordering::SeqCst);
        if pid > 0 && self.why().is_some() {
            self.killed.store(true, Ordering::SeqCst);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
    }

    pub fn panic_line(&self) -> Option<String> {
        self.panic.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The exit status an interruption ends the run with, if any.
    pub fn code(&self) -> Option<i32> {
        self.why().map(Why::exit_code)
    }

    /// The run's end, decided once: an interruption at any point (the
    /// cleanup's included) or a dead guest decides the exit status over
    /// what the run found, and the summary says the status the process
    /// exits with.
    pub fn settle(&self, summary: &mut RunSummary, found: i32) -> i32 {
        let outcome = match self.why() {
            Some(Why::Deadline) => Outcome::TimedOut,
            Some(Why::GuestPanicked) => Outcome::GuestPanicked,
            Some(Why::Signal(_)) => Outcome::Interrupted,
            None => summary.outcome,
        };
        let code = self.code().unwrap_or(found);
        summary.outcome = outcome;
        summary.exit_code = code;
        code
    }
}

/// How often the run asks the supervisor whether the guest panicked.
const PANIC_CHECK: Duration = Duration::from_millis(500);

/// Returns the line of the first kernel panic that the supervisor of the
/// instance at `control` saw on the guest's console (it waits until then).
async fn console_panic(control: &Path) -> String {
    loop {
        tokio::time::sleep(PANIC_CHECK).await;
        if let Ok(s) = crate::supervisor::client::state(control, STATE_ANSWER).await {
            if let Some(p) = s.guest_kernel.panic {
                return p.line;
            }
        }
    }
}

/// Watches SIGINT, SIGTERM, SIGHUP, the `deadline` and a guest kernel
/// panic (asking the supervisor at `control`), each when given, on its own
/// thread (the main one is busy booting, or waiting for COMMAND or a copy).
pub fn watch(deadline: Option<Instant>, control: Option<std::path::PathBuf>) -> Arc<Interrupt> {
    let int = Arc::new(Interrupt::default());
    let i = int.clone();
    // Returns once the signals are caught: one that came before would
    // kill the process with its work half done (a copy's directory left).
    let (caught, watching) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let signals =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()));
            drop(caught);
            let (Ok(mut a), Ok(mut b), Ok(mut c)) = signals else {
                return;
            };
            let mut panicked = control.is_none();
            let control = control.unwrap_or_default();
            let wake = deadline.unwrap_or_else(Instant::now);
            let why = loop {
                tokio::select! {
                    _ = a.recv() => break Why::Signal(nix::sys::signal::Signal::SIGINT),
                    _ = b.recv() => break Why::Signal(nix::sys::signal::Signal::SIGTERM),
                    _ = c.recv() => break Why::Signal(nix::sys::signal::Signal::SIGHUP),
                    _ = tokio::time::sleep_until(wake.into()), if deadline.is_some() => break Why::Deadline,
                    line = console_panic(&control), if !panicked => {
                        panicked = true;
                        i.set_panic(line);
                    }
                }
            };
            i.set(why);
        });
    });
    // Ends when the thread dropped its end (or ended, having failed).
    let _ = watching.recv();
    int
}

/// An interruption whose deadline comes after `d`, with no watcher of
/// signals or of the guest (they would stay installed in the test process).
#[cfg(test)]
pub fn expiring_after(d: Duration) -> Arc<Interrupt> {
    let int = Arc::new(Interrupt::default());
    let i = int.clone();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        i.set(Why::Deadline);
    });
    int
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn an_ssh_is_ended_by_the_interruption_even_one_started_after_it() {
        use std::os::unix::process::ExitStatusExt;
        let int = Interrupt::default();
        let mut before = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        int.track(before.id() as i32);
        int.set(Why::Deadline);
        assert_eq!(before.wait().unwrap().signal(), Some(Signal::SIGTERM as i32));
        int.track(0);
        let mut after = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        int.track(after.id() as i32);
        assert_eq!(after.wait().unwrap().signal(), Some(Signal::SIGTERM as i32));
        assert!(int.killed.load(Ordering::SeqCst));
    }

    #[test]
    fn each_interruption_has_its_exit_status_and_outcome() {
        assert_eq!(Why::Deadline.exit_code(), 124);
        assert_eq!(Why::GuestPanicked.exit_code(), 125);
        assert_eq!(Why::Signal(Signal::SIGTERM).exit_code(), 143);
        let settled = |why: Option<Why>, found| {
            let int = Interrupt::default();
            if let Some(w) = why {
                int.set(w);
            }
            let mut s = RunSummary::new("run-1", None, &["true".into()]);
            s.outcome = Outcome::CommandFailed;
            (int.settle(&mut s, found), s.outcome, s.exit_code)
        };
        assert_eq!(settled(None, 3), (3, Outcome::CommandFailed, 3));
        assert_eq!(settled(Some(Why::Deadline), 0), (124, Outcome::TimedOut, 124));
        assert_eq!(settled(Some(Why::Signal(Signal::SIGINT)), 0), (130, Outcome::Interrupted, 130));
        assert_eq!(settled(Some(Why::GuestPanicked), 0), (125, Outcome::GuestPanicked, 125));
    }

    #[test]
    fn a_panic_does_not_replace_an_interruption_already_set() {
        let int = Interrupt::default();
        int.set(Why::Deadline);
        int.set_panic("Kernel panic - not syncing".into());
        assert_eq!(int.why(), Some(Why::Deadline));
        assert_eq!(int.panic_line().as_deref(), Some("Kernel panic - not syncing"));
    }
}
