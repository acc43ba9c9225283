//! `run [launch flags] -- COMMAND`: a throwaway VM for one command, the CI
//! verb. It boots (or resumes a snapshot), runs COMMAND over the pinned SSH
//! with its output streamed, copies artifacts out (as untrusted input,
//! see [`crate::guest_files`]), then stops the VM with
//! the ladder and removes everything the run created, on every path:
//! COMMAND failing, Ctrl-C, SIGTERM from a CI runner, `--timeout`, a hung
//! guest, QEMU crashing. Exit status as `timeout(1)` does it: COMMAND's,
//! 124 for the deadline, 125 when the VM could not be started or reached.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::spec::{vm_flags, LaunchOptions, ResumeFrom};
use super::{launch, resume, stop, Ctx};
use crate::cli::RunArgs;
use crate::config::PortChoice;
use crate::guest_files;
use crate::instance::read_json;
use crate::instance::records::RunRecord;
use crate::report::error::{RunNotStarted, Usage};
use crate::report::run::{Outcome, RunSummary};
use crate::ssh::{self, Target};
use crate::supervisor::ladder::StopOptions;

/// Exit status when `--timeout` expired.
pub const TIMED_OUT: i32 = 124;
/// Exit status when the VM could not be started or reached.
pub const VM_BROKE: i32 = 125;
/// How long the guest gets to power off when the run ends.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What ended a run early: the deadline or a signal. Set once, by the
/// watcher thread; the ssh child is killed when it is set.
#[derive(Default)]
struct Interrupt {
    cancel: Arc<AtomicBool>,
    /// 0: none; -1: the deadline; N: signal N.
    why: AtomicI32,
    /// The running COMMAND's ssh process, to stop it at once.
    child: AtomicI32,
}

impl Interrupt {
    fn set(&self, why: i32) {
        self.why.store(why, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
        let pid = self.child.load(Ordering::SeqCst);
        if pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// The exit status an interruption ends the run with, if any.
    fn code(&self) -> Option<i32> {
        match self.why.load(Ordering::SeqCst) {
            0 => None,
            -1 => Some(TIMED_OUT),
            sig => Some(128 + sig),
        }
    }
}

/// Watches SIGINT, SIGTERM, SIGHUP and the deadline on its own thread (the
/// main one is busy booting or waiting for COMMAND).
fn watch(deadline: Instant) -> Arc<Interrupt> {
    let int = Arc::new(Interrupt::default());
    let i = int.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut a), Ok(mut b), Ok(mut c)) =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
            else {
                return;
            };
            let why = tokio::select! {
                _ = a.recv() => nix::sys::signal::Signal::SIGINT as i32,
                _ = b.recv() => nix::sys::signal::Signal::SIGTERM as i32,
                _ = c.recv() => nix::sys::signal::Signal::SIGHUP as i32,
                _ = tokio::time::sleep_until(deadline.into()) => -1,
            };
            i.set(why);
        });
    });
    int
}

/// A name no instance has: `run-` and 8 hex digits.
fn throwaway_name(ctx: &Ctx) -> String {
    loop {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let n = nanos ^ std::process::id().rotate_left(16);
        let name = format!("run-{n:08x}");
        if !ctx.state.instance(&name).exists() {
            return name;
        }
    }
}

/// The run's instance name, and the checked snapshot it starts from.
fn instance_to_run(ctx: &Ctx, from_snapshot: Option<&str>) -> Result<(String, Option<resume::Resume>)> {
    Ok(match from_snapshot {
        Some(snap) => {
            let source = ctx.existing()?;
            (throwaway_name(ctx), Some(resume::resume_from(ctx, &source, snap, true)?))
        }
        None if ctx.named => {
            if ctx.instance().exists() {
                bail!(
                    "instance '{}' exists, and run removes its instance at the end: give run a new --name, or none",
                    ctx.name
                );
            }
            (ctx.name.clone(), None)
        }
        None => (throwaway_name(ctx), None),
    })
}

pub fn run(ctx: &Ctx, a: RunArgs) -> Result<i32> {
    let start = Instant::now();
    let int = watch(start + a.timeout);
    let (name, resume) = instance_to_run(ctx, a.from_snapshot.as_deref()).map_err(|e| e.context(RunNotStarted))?;
    let rctx = Ctx { name, named: true, ..ctx.clone() };
    let mut opts = LaunchOptions::plain(a.timeout);
    opts.flags = vm_flags(a.vm, Some(PortChoice::Auto))?;
    if a.from_snapshot.is_some() {
        if let Some(source) = read_json::<crate::config::Settings>(&ctx.instance().settings())? {
            crate::config::inherit(&mut opts.flags, &source);
        }
    }
    opts.cancel = Some(int.cancel.clone());
    opts.resume = resume.map(|r| ResumeFrom::Checked(Box::new(r)));
    let mut summary = RunSummary::new(&rctx.name, a.from_snapshot.clone(), &a.command);
    let code = match launch::launch(&rctx, &opts) {
        // A bad flag value is the caller's mistake, not a broken VM (exit 2).
        Err(e) if e.is::<Usage>() => return Err(e),
        Err(e) => {
            summary.error = Some(format!("{e:#}"));
            eprintln!("qbuf-qemu: run: the VM could not be started or reached: {e:#}");
            summary.outcome = Outcome::VmFailed;
            int.code().unwrap_or(VM_BROKE)
        }
        Ok(l) => {
            summary.phases.boot = l.ready_seconds;
            command_then_artifacts(&rctx, &a.workdir, &a.command, &a.copy_out, &int, &mut summary)
        }
    };
    summary.exit_code = code;
    let keep = a.keep || (a.keep_on_failure && code != 0);
    finish(&rctx, keep, &mut summary, start);
    report(ctx, &summary, a.summary.as_deref())?;
    Ok(int.code().unwrap_or(code))
}

/// COMMAND, then `--copy-out`; the exit status the run ends with.
fn command_then_artifacts(
    ctx: &Ctx,
    workdir: &Option<String>,
    command: &[String],
    copy_out: &[(String, std::path::PathBuf)],
    int: &Interrupt,
    summary: &mut RunSummary,
) -> i32 {
    let (inst, settings, t) = match super::observe::ssh_target_and_settings(ctx) {
        Ok(found) => found,
        Err(e) => {
            summary.error = Some(format!("{e:#}"));
            summary.outcome = Outcome::VmFailed;
            return VM_BROKE;
        }
    };
    let workdir = workdir.clone().or_else(|| settings.share.is_some().then(|| "/mnt/qbuf".to_string()));
    let t0 = Instant::now();
    let status = run_command(&t, workdir.as_deref(), command, int);
    summary.phases.command = Some(t0.elapsed().as_secs_f64());
    let alive = read_json::<RunRecord>(&inst.run_record()).ok().flatten().is_some_and(|r| r.qemu.is_running());
    let code = match status {
        // Whatever ssh said: the connection went with the VM.
        Ok(_) if !alive && int.code().is_none() => {
            summary.error = Some("QEMU ended while COMMAND ran".into());
            summary.outcome = Outcome::VmFailed;
            VM_BROKE
        }
        Ok(c) => {
            summary.command_exit = Some(c);
            summary.outcome = if c == 0 { Outcome::Ok } else { Outcome::CommandFailed };
            c
        }
        Err(e) => {
            summary.error = Some(format!("{e:#}"));
            summary.outcome = Outcome::VmFailed;
            VM_BROKE
        }
    };
    if let Some(c) = int.code() {
        summary.outcome = if c == TIMED_OUT { Outcome::TimedOut } else { Outcome::Interrupted };
        return c;
    }
    let t1 = Instant::now();
    for (guest, host) in copy_out {
        match guest_files::copy_from_guest(&t, &inst, guest, host) {
            Ok(u) => {
                for line in crate::report::access::left_out(&u) {
                    eprintln!("qbuf-qemu: run: --copy-out {guest}: {line}");
                }
                summary.copy_out.extend(u);
            }
            Err(e) => {
                eprintln!("qbuf-qemu: run: --copy-out {guest}: {e:#}");
                summary.error.get_or_insert_with(|| format!("--copy-out {guest}: {e:#}"));
            }
        }
    }
    if !copy_out.is_empty() {
        summary.phases.copy_out = Some(t1.elapsed().as_secs_f64());
    }
    code
}

/// The guest's shell line for COMMAND: each word quoted (argv semantics:
/// `run -- sh -c 'exit 7'` exits 7), run in `workdir`.
pub fn remote_line(workdir: Option<&str>, command: &[String]) -> String {
    let cmd = shell_words::join(command);
    match workdir {
        Some(d) => format!("cd -- {} && exec {cmd}", shell_words::quote(d)),
        None => format!("exec {cmd}"),
    }
}

/// Runs COMMAND with its output streamed; its exit status (128+N when a
/// signal ended it, as a shell reports it).
fn run_command(t: &Target, workdir: Option<&str>, command: &[String], int: &Interrupt) -> Result<i32> {
    let argv = ssh::streaming_command(t, &remote_line(workdir, command));
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run 'ssh': {}", ssh::SSH_MISSING))?;
    int.child.store(child.id() as i32, Ordering::SeqCst);
    let status = child.wait()?;
    int.child.store(0, Ordering::SeqCst);
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Stops and removes the run's VM, or says how to reach it when kept.
fn finish(ctx: &Ctx, keep: bool, summary: &mut RunSummary, start: Instant) {
    let inst = ctx.instance();
    if keep && inst.exists() {
        summary.kept = true;
        eprintln!(
            "qbuf-qemu: run: kept instance '{}' running: reach it with '{}', remove it with '{}'",
            ctx.name,
            ctx.command("ssh"),
            ctx.command("destroy --yes")
        );
    } else if inst.exists() {
        let t = Instant::now();
        match stop::destroy(ctx, &StopOptions { timeout: STOP_TIMEOUT, force: false }) {
            Ok(d) => summary.stop_method = d.stop.and_then(|s| s.method()),
            Err(e) => {
                eprintln!("qbuf-qemu: run: could not remove instance '{}': {e:#}", ctx.name);
                summary.error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        summary.phases.stop = Some(t.elapsed().as_secs_f64());
    }
    summary.phases.total = start.elapsed().as_secs_f64();
}

/// The summary: one JSON line on stderr with `--json`, a file with
/// `--summary`, one human line otherwise. stdout is COMMAND's alone.
fn report(ctx: &Ctx, s: &RunSummary, file: Option<&Path>) -> Result<()> {
    let json = serde_json::to_string(s)?;
    if let Some(f) = file {
        std::fs::write(f, format!("{json}\n"))
            .with_context(|| format!("cannot write the summary to {}", f.display()))?;
    }
    if ctx.json {
        eprintln!("{json}");
    } else if !ctx.quiet {
        eprintln!("qbuf-qemu: run: {}", crate::report::Render::human(s));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_word_of_the_command_is_quoted() {
        let c: Vec<String> = ["sh", "-c", "exit 7"].iter().map(|s| s.to_string()).collect();
        assert_eq!(remote_line(None, &c), "exec sh -c 'exit 7'");
        assert_eq!(remote_line(Some("/mnt/my dir"), &["true".into()]), "cd -- '/mnt/my dir' && exec true");
    }
}
