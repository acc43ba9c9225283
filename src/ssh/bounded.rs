//! An ssh whose output is captured, bounded in time and in size: the guest
//! is untrusted, and its remote command (or its shell's start-up) may never
//! end, or stream without end. OpenSSH's `ConnectTimeout` covers only the
//! connection and its keepalives only a guest that stopped answering; a
//! guest that answers forever is stopped here. Every ssh the tool starts
//! ends with it ([`end_with_this_process`]), and one whose pid is tracked
//! for a signal is forgotten before it is reaped ([`wait_then_forget`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What is kept of each of ssh's stdout and stderr: far above what a job
/// of the tool's prints (a guest's /proc/mounts, a line of `sudo`), far
/// below what would strain the host's memory.
pub const OUTPUT_CAP: usize = 1 << 20;

/// How often the child and the cancel flag are looked at.
const POLL: Duration = Duration::from_millis(10);

/// How long one ssh may take, and what else ends it.
pub struct Limit<'a> {
    /// What the ssh is for, as errors name it ("the login", "reading the
    /// guest's /proc/mounts").
    pub step: String,
    pub deadline: Instant,
    /// Set from outside (a signal, `run`'s deadline): stop at once.
    pub cancel: Option<&'a AtomicBool>,
}

impl Limit<'static> {
    /// `step`, given `d` from now and no cancel flag.
    pub fn within(step: impl Into<String>, d: Duration) -> Self {
        Limit { step: step.into(), deadline: Instant::now() + d, cancel: None }
    }
}

/// Why an ssh was stopped, or its output not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overrun {
    /// The deadline came first.
    TimedOut { step: String, after: Duration },
    /// The cancel flag was set.
    Cancelled { step: String },
    /// The guest sent more than [`OUTPUT_CAP`] on one stream.
    TooMuch { step: String, stream: &'static str },
}

impl std::fmt::Display for Overrun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overrun::TimedOut { step, after } => write!(
                f,
                "{step} did not finish within {}s (the guest is slow, or its command or shell start-up never ends); \
                 its ssh was stopped",
                after.as_secs_f64().ceil()
            ),
            Overrun::Cancelled { step } => write!(f, "{step} was cancelled; its ssh was stopped"),
            Overrun::TooMuch { step, stream } => write!(
                f,
                "the guest sent too much during {step}: more than {} MiB on ssh's {stream}; its ssh was stopped and \
                 its output not used",
                OUTPUT_CAP >> 20
            ),
        }
    }
}

impl std::error::Error for Overrun {}

/// Runs `argv` (an ssh) with stdin closed and its output captured, at most
/// [`OUTPUT_CAP`] of each stream, until it ends or `limit` says stop; the
/// child is then killed and reaped, and the error is an [`Overrun`].
pub fn output(argv: &[String], limit: &Limit) -> Result<Output> {
    output_capped(argv, limit, OUTPUT_CAP)
}

fn output_capped(argv: &[String], limit: &Limit, cap: usize) -> Result<Output> {
    tracing::debug!("running {}", shell_words::join(argv));
    let start = Instant::now();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // This thread reaps or kills the child before it returns, so the
    // signal can only come when this process is gone.
    end_with_this_process(&mut cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot run '{}': {}", argv[0], super::SSH_MISSING))?;
    let stdout = Reader::start(child.stdout.take().expect("piped"), cap);
    let stderr = Reader::start(child.stderr.take().expect("piped"), cap);
    let mut status = None;
    loop {
        if status.is_none() {
            status = child.try_wait().context("cannot wait for ssh")?;
        }
        // Both streams at their end too: a process ssh left behind (none
        // should: a shared connection's master closes its stdio) could
        // hold them, and is bounded by the same limit. Looked at before
        // the caps, so a reader that ended past its cap is seen.
        let finished = status.is_some() && stdout.done() && stderr.done();
        let too_much = [(&stdout, "stdout"), (&stderr, "stderr")].into_iter().find(|(r, _)| r.over());
        if let Some((_, stream)) = too_much {
            stop(&mut child, status);
            return Err(Overrun::TooMuch { step: limit.step.clone(), stream }.into());
        }
        if let (Some(status), true) = (status, finished) {
            return Ok(Output { status, stdout: stdout.join(), stderr: stderr.join() });
        }
        if limit.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            stop(&mut child, status);
            return Err(Overrun::Cancelled { step: limit.step.clone() }.into());
        }
        if Instant::now() >= limit.deadline {
            stop(&mut child, status);
            let after = limit.deadline.saturating_duration_since(start);
            return Err(Overrun::TimedOut { step: limit.step.clone(), after }.into());
        }
        std::thread::sleep(POLL);
    }
}

/// Kills and reaps `child` unless it has exited already. Its readers are
/// left to end by themselves, as the pipes close.
fn stop(child: &mut Child, status: Option<std::process::ExitStatus>) {
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A thread reading one of ssh's streams to its end: the first `cap`
/// bytes kept, the rest read and dropped, so ssh never blocks on a full
/// pipe.
struct Reader {
    thread: JoinHandle<Vec<u8>>,
    over: Arc<AtomicBool>,
}

impl Reader {
    fn start(mut from: impl Read + Send + 'static, cap: usize) -> Reader {
        let over = Arc::new(AtomicBool::new(false));
        let flag = over.clone();
        let thread = std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let room = cap - kept.len();
                        kept.extend_from_slice(&buf[..n.min(room)]);
                        if n > room {
                            flag.store(true, Ordering::SeqCst);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            kept
        });
        Reader { thread, over }
    }

    fn over(&self) -> bool {
        self.over.load(Ordering::SeqCst)
    }

    fn done(&self) -> bool {
        self.thread.is_finished()
    }

    fn join(self) -> Vec<u8> {
        self.thread.join().unwrap_or_default()
    }
}

/// The longest piece of a line [`pass_stderr`] holds: the guest's own
/// stderr comes through ssh's, and a line of gigabytes must not be kept.
const STDERR_PIECE: u64 = 64 * 1024;

/// Copies OpenSSH's stderr `from` to ours line by line (a longer line in
/// pieces); whether it said the guest's host key changed (the caller then
/// explains, see [`super::host_key_mismatch_message`]). `clean` drops the guest's
/// terminal controls: for what the tool runs in the guest on its own (a
/// copy's `tar`), not for what the user asked to run there (`ssh`).
pub fn pass_stderr(from: impl Read, clean: bool) -> bool {
    let mut mismatch = false;
    let mut out = std::io::stderr();
    let mut r = BufReader::new(from);
    let mut line = Vec::new();
    let mut filter = crate::logs::TerminalFilter::default();
    let mut shown = Vec::new();
    while (&mut r).take(STDERR_PIECE).read_until(b'\n', &mut line).unwrap_or(0) > 0 {
        mismatch |= String::from_utf8_lossy(&line).contains(super::HOST_KEY_CHANGED);
        if clean {
            shown.clear();
            filter.push(&line, &mut shown);
            let _ = out.write_all(&shown);
        } else {
            let _ = out.write_all(&line);
        }
        line.clear();
    }
    mismatch
}

/// Waits for `child` to end, calls `untrack` (which forgets its pid), and
/// only then reaps it: until reaped, a child's pid is not given to another
/// process, so whoever signals the tracked pid can never reach a stranger.
pub fn wait_then_forget(child: &mut Child, untrack: impl FnOnce()) -> std::io::Result<std::process::ExitStatus> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Ended (still unreaped), or no longer waitable: either way on.
    while let Err(nix::errno::Errno::EINTR) = waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {}
    untrack();
    child.wait()
}

/// Makes the ssh that `cmd` starts end (SIGTERM) when this process does,
/// even a SIGKILLed one: a guest that stalls would otherwise keep it
/// (and its connection, which keepalives hold open) for ever. The signal
/// comes when the *thread* that spawns ends: spawn on a thread that
/// outlives the child (the main thread, or one that reaps it).
pub fn end_with_this_process(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: prctl and getppid are async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("qbuf-qemu ended before ssh started"));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tracked_child_is_forgotten_while_its_pid_is_still_its_own() {
        let mut child = std::process::Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let pid = child.id();
        let mut state = String::new();
        let status = super::wait_then_forget(&mut child, || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            state = stat.rsplit(')').next().unwrap_or("").split_whitespace().next().unwrap_or("").to_string();
        })
        .unwrap();
        assert_eq!(state, "Z", "ended but not reaped when forgotten");
        assert_eq!(status.code(), Some(3));
    }

    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn a_command_that_ends_gives_its_output_and_status() {
        let out =
            output(&sh("echo out; echo err >&2; exit 3"), &Limit::within("the job", Duration::from_secs(20))).unwrap();
        assert_eq!((out.status.code(), &out.stdout[..], &out.stderr[..]), (Some(3), &b"out\n"[..], &b"err\n"[..]));
    }

    #[test]
    fn a_command_that_never_ends_is_killed_and_reaped_at_the_deadline() {
        let pid_file = tempfile::NamedTempFile::new().unwrap();
        let script = format!("echo $$ > {}; exec sleep 600", pid_file.path().display());
        let start = Instant::now();
        let e = output(&sh(&script), &Limit::within("the login", Duration::from_millis(500))).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        let o = e.downcast_ref::<Overrun>().expect("an overrun");
        assert!(matches!(o, Overrun::TimedOut { .. }), "{o:?}");
        assert!(e.to_string().starts_with("the login did not finish within 1s"), "{e}");
        let pid: i32 = std::fs::read_to_string(pid_file.path()).unwrap().trim().parse().unwrap();
        // Killed and reaped: no process, not even a zombie, has its pid.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "ssh {pid} is still there");
    }

    #[test]
    fn a_cancel_stops_it_before_the_deadline() {
        let cancel = AtomicBool::new(false);
        let limit = Limit {
            step: "the readiness login".into(),
            deadline: Instant::now() + Duration::from_secs(60),
            cancel: Some(&cancel),
        };
        let start = Instant::now();
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                cancel.store(true, Ordering::SeqCst);
            });
            output(&sh("exec sleep 600"), &limit).unwrap_err()
        });
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        assert_eq!(e.downcast_ref::<Overrun>(), Some(&Overrun::Cancelled { step: "the readiness login".into() }));
    }

    #[test]
    fn a_guest_that_floods_is_stopped_and_its_output_refused() {
        let limit = Limit::within("reading the guest's /proc/mounts", Duration::from_secs(60));
        let start = Instant::now();
        // Endless output: stopped once past the cap, not at the deadline.
        let e = output_capped(&sh("exec yes"), &limit, 64 * 1024).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
        let o = e.downcast_ref::<Overrun>().unwrap();
        assert_eq!(o, &Overrun::TooMuch { step: "reading the guest's /proc/mounts".into(), stream: "stdout" });
        assert!(e.to_string().contains("the guest sent too much during reading the guest's /proc/mounts"), "{e}");
        let e = output_capped(&sh("head -c 100000 /dev/zero >&2"), &limit, 64 * 1024).unwrap_err();
        assert!(e.to_string().contains("ssh's stderr"), "{e}");
        // Up to the cap is fine.
        let out = output_capped(&sh("head -c 65536 /dev/zero"), &limit, 64 * 1024).unwrap();
        assert_eq!(out.stdout.len(), 65536);
    }
}
