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
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::spec::{vm_flags, LaunchOptions, ResumeFrom};
use super::{launch, restore, stop, Ctx};
use crate::cli::RunArgs;
use crate::config::PortChoice;
use crate::guest_files;
use crate::instance::proc::ProcIdentity;
use crate::instance::records::{RunOrigin, SnapshotOrigin};
use crate::instance::{read_json, write_json, Liveness};
use crate::report::error::{RunNotStarted, Usage};
use crate::report::run::{Outcome, RunSummary};
use crate::ssh::{self, Target};
use crate::supervisor::ladder::StopOptions;
use crate::timeouts::{BANNER_RECHECK, QEMU_SEEN_GONE, RUN_STOP};
use interrupt::{watch, Interrupt, Why};

pub(super) mod interrupt;

/// Exit status when `--timeout` expired.
pub const TIMED_OUT: i32 = 124;
/// Exit status when the VM could not be started or reached.
pub const VM_BROKE: i32 = 125;

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
fn instance_to_run(ctx: &Ctx, from_snapshot: Option<&str>) -> Result<(String, Option<restore::Resume>)> {
    Ok(match from_snapshot {
        Some(snap) => {
            let source = ctx.existing()?;
            (throwaway_name(ctx), Some(restore::resume_from(ctx, &source, snap, true)?))
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

/// Removes what runs SIGKILLed before their VM's supervisor started left
/// (no supervisor could remove it): instances whose run is gone and that
/// no process holds. A kept run's instance has no owner and stays.
fn sweep_orphans(ctx: &Ctx) {
    for name in ctx.state.instance_names() {
        let inst = ctx.state.instance(&name);
        let orphan = read_json::<RunOrigin>(&inst.run_origin()).ok().flatten().and_then(|o| o.owner_gone());
        let Some(pid) = orphan else { continue };
        if let Ok(Some(_lock)) = crate::instance::Lock::try_acquire(&inst) {
            tracing::info!("removing instance '{name}', left by run {pid}, which was killed before its VM started");
            crate::supervisor::remove_throwaway(&inst);
        }
    }
}

pub fn run(ctx: &Ctx, a: RunArgs) -> Result<i32> {
    let start = Instant::now();
    sweep_orphans(ctx);
    check_outputs(a.summary.as_deref(), &a.copy_out).map_err(|e| e.context(RunNotStarted))?;
    let (name, resume) = instance_to_run(ctx, a.from_snapshot.as_deref()).map_err(|e| e.context(RunNotStarted))?;
    let int = watch(Some(start + a.timeout), Some(ctx.state.instance(&name).control()));
    let rctx = Ctx { name, named: true, throwaway: !a.keep, ..ctx.clone() };
    // A guest that never answers is a broken VM (125) after the boot's
    // own limit, not a run that holds its CI job for the whole deadline.
    let mut opts = LaunchOptions::plain(a.boot_timeout.min(a.timeout));
    opts.timeout_flag = "--boot-timeout";
    opts.flags = vm_flags(a.vm, Some(PortChoice::Auto))?;
    if a.from_snapshot.is_some() {
        let saved = read_json::<crate::config::Settings>(&ctx.instance().settings());
        if let Some(source) = saved.map_err(|e| e.context(RunNotStarted))? {
            crate::config::inherit(&mut opts.flags, &source);
        }
    }
    opts.cancel = Some(int.cancel.clone());
    opts.resume = resume.map(|r| ResumeFrom::Checked(Box::new(r)));
    opts.run = Some(origin(ctx, a.keep, a.from_snapshot.as_deref()));
    let mut summary = RunSummary::new(&rctx.name, a.from_snapshot.clone(), &a.command);
    // A boot that fails removes the instance even with --keep: its hints
    // must not send the user to it.
    let found = match launch::launch(&Ctx { throwaway: true, ..rctx.clone() }, &opts) {
        // A bad flag value is the caller's mistake, not a broken VM (exit 2).
        Err(e) if e.is::<Usage>() => return Err(e),
        Err(e) => {
            summary.error = Some(format!("{e:#}"));
            match int.why() {
                None | Some(Why::GuestPanicked) => {
                    eprintln!("qbuf-qemu: run: the VM could not be started or reached: {e:#}")
                }
                // How far the boot got, and the guest's console: all that
                // is left of a throwaway instance (its logs go with it).
                Some(_) if !ctx.quiet => eprintln!("qbuf-qemu: run: cut short before COMMAND started: {e:#}"),
                Some(_) => {}
            }
            summary.outcome = Outcome::VmFailed;
            VM_BROKE
        }
        Ok(l) => {
            // The launch's own clock starts after the run's checks.
            let before = start.elapsed().as_secs_f64() - l.ready_seconds.unwrap_or(0.0);
            summary.phases.qemu_up = l.qemu_up_seconds.map(|u| before + u);
            summary.phases.boot = l.ready_seconds.map(|r| before + r);
            command_then_artifacts(&rctx, &a.workdir, &a.command, &a.copy_out, &int, &mut summary)
        }
    };
    // The contract: after 124 the VM is stopped and removed, after 125
    // nothing is left behind, whatever --keep or --keep-on-failure asked.
    let removed_anyway = int.why() == Some(Why::Deadline) || found == VM_BROKE;
    let keep = !removed_anyway && (a.keep || (a.keep_on_failure && (found != 0 || int.code().is_some())));
    finish(&rctx, keep, &mut summary, start);
    let code = int.settle(&mut summary, found);
    report(ctx, &summary, a.summary.as_deref())?;
    Ok(code)
}

/// Who owns the run's VM: this process, whose end (a SIGKILL included)
/// makes the supervisor stop and remove the VM; nobody with `--keep`.
fn origin(ctx: &Ctx, keep: bool, from_snapshot: Option<&str>) -> RunOrigin {
    let pid = std::process::id() as i32;
    RunOrigin {
        owner: if keep { None } else { ProcIdentity::of(pid) },
        pid,
        from_snapshot: from_snapshot.map(|s| SnapshotOrigin { instance: ctx.name.clone(), snapshot: s.into() }),
    }
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
    let (inst, settings, t) = match super::ssh::ssh_target_and_settings(ctx) {
        Ok(found) => found,
        // Its hint ("start it with launch") would name an instance
        // that is removed with the run.
        Err(_) if ctx.throwaway && !ctx.instance().run_record().exists() => {
            summary.error = Some(
                "QEMU ended before COMMAND started (its instance goes with the run): try again, and if it recurs launch an instance with the same flags (qbuf-qemu --name NAME launch …) and look at its logs"
                    .into(),
            );
            summary.outcome = Outcome::VmFailed;
            return VM_BROKE;
        }
        Err(e) => {
            summary.error = Some(format!("{e:#}"));
            summary.outcome = Outcome::VmFailed;
            return VM_BROKE;
        }
    };
    let workdir = workdir.clone().or_else(|| settings.share.is_some().then(|| "/mnt/qbuf".to_string()));
    if workdir.is_none() && !ctx.quiet {
        eprintln!(
            "qbuf-qemu: run: no share (--no-share, or run outside a git checkout): COMMAND runs in the home directory of guest user '{}'; choose with --share DIR or --workdir DIR",
            settings.ssh_user
        );
    }
    summary.workdir = workdir.clone();
    let t0 = Instant::now();
    let status = run_command(&t, workdir.as_deref(), command, int);
    summary.phases.command = Some(t0.elapsed().as_secs_f64());
    let alive = vm_alive_after(&inst, &t, &status);
    let code = match status {
        // Whatever ssh said: the connection went with the VM.
        // ssh was stopped: the guest's kernel is dead (said below).
        Ok(_) if int.panic_line().is_some() => VM_BROKE,
        Ok(_) if !alive && int.code().is_none() => {
            summary.error = Some("QEMU ended while COMMAND ran".into());
            summary.outcome = Outcome::VmFailed;
            VM_BROKE
        }
        // The interruption ended ssh: COMMAND did not finish (its status
        // stays unknown; `settle` names the interruption).
        Ok(c) if int.killed.load(Ordering::SeqCst) => c,
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
    if let Some(line) = int.panic_line() {
        let tail = crate::logs::tail(&inst.serial_log(), 0, 1500, "(empty)");
        eprintln!("qbuf-qemu: run: the guest's kernel panicked: {line}\nserial console (last lines):\n{tail}");
        summary.error = Some(format!("the guest's kernel panicked: {line}"));
    }
    if let Some(c) = int.code() {
        return c;
    }
    copy_artifacts(copy_out, int, summary, |guest, host, watch| {
        guest_files::copy_from_guest(&t, &inst, guest, host, watch)
    });
    code
}

/// Whether QEMU still runs after COMMAND's ssh ended. A QEMU that is being
/// killed closes its sockets (and so ends the SSH connection: ssh's 255)
/// a moment before it is seen gone: when ssh failed so and the SSH forward
/// no longer answers, QEMU gets up to 2 s to be seen gone.
fn vm_alive_after(inst: &crate::instance::Instance, t: &crate::ssh::Target, status: &Result<i32>) -> bool {
    let running = || Liveness::probe(inst).is_ok_and(|l| l.running().is_some());
    let alive = running();
    if !alive || !matches!(status, Ok(255)) || crate::ssh::banner(t.port, BANNER_RECHECK).is_some() {
        return alive;
    }
    let deadline = Instant::now() + QEMU_SEEN_GONE;
    while running() {
        if Instant::now() > deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `--copy-out`: each artifact through the untrusted-guest unpacker
/// (`copy` is [`guest_files::copy_from_guest`], a stand-in in tests); what was left
/// out, or could not be copied, is said and summed up. The copy's ssh is
/// ended like COMMAND's by the deadline or a signal, and the run then ends
/// as an interrupted one (`settle`); the cut copy does not land.
fn copy_artifacts<F>(copy_out: &[(String, std::path::PathBuf)], int: &Interrupt, summary: &mut RunSummary, copy: F)
where
    F: Fn(&str, &Path, &dyn Fn(i32)) -> Result<guest_files::Unpacked>,
{
    let t1 = Instant::now();
    for (guest, host) in copy_out {
        match copy(guest, host, &|pid| int.track(pid)) {
            // The run's end is said once, by `settle`.
            Err(_) if int.code().is_some() => {
                eprintln!("qbuf-qemu: run: --copy-out {guest}: not copied, the run was cut short")
            }
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
        if int.code().is_some() {
            break;
        }
    }
    if !copy_out.is_empty() {
        summary.phases.copy_out = Some(t1.elapsed().as_secs_f64());
    }
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
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null());
    // ssh ends with this process, even a SIGKILLed one (the supervisor then
    // stops the VM, which would end ssh too, only later).
    ssh::end_with_this_process(&mut cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot run 'ssh': {}", ssh::SSH_MISSING))?;
    int.track(child.id() as i32);
    let status = ssh::wait_then_forget(&mut child, || int.track(0))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Stops and removes the run's VM, or says how to reach it when kept.
fn finish(ctx: &Ctx, keep: bool, summary: &mut RunSummary, start: Instant) {
    let inst = ctx.instance();
    let keep = keep && inst.exists() && keep_vm(&inst);
    if keep {
        summary.kept = true;
        eprintln!(
            "qbuf-qemu: run: kept instance '{}' running: reach it with '{}', remove it with '{}'",
            ctx.name,
            ctx.command("ssh"),
            ctx.command("destroy --yes")
        );
    } else if inst.exists() {
        let t = Instant::now();
        match stop::destroy(ctx, &StopOptions { timeout: RUN_STOP, force: false }) {
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

/// Lets go of a VM the run keeps (its supervisor no longer removes it when
/// this process ends); false when that could not be recorded, so the VM is
/// removed now rather than by surprise later.
fn keep_vm(inst: &crate::instance::Instance) -> bool {
    let released = read_json::<RunOrigin>(&inst.run_origin()).and_then(|o| match o {
        // `--keep`: it never had an owner.
        Some(o) if o.owner.is_none() => Ok(()),
        Some(o) => write_json(&inst.run_origin(), &RunOrigin { owner: None, ..o }),
        None => Ok(()),
    });
    if let Err(e) = &released {
        eprintln!("qbuf-qemu: run: cannot keep instance '{}' ({e:#}); removing it", inst.name);
    }
    released.is_ok()
}

/// Where the run's results go on the host, checked before the VM boots: a
/// job of an hour must not learn at its end that they cannot land.
fn check_outputs(summary: Option<&Path>, copy_out: &[(String, std::path::PathBuf)]) -> Result<()> {
    let dir_of = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let writable_dir = |d: &Path| d.is_dir() && nix::unistd::access(d, nix::unistd::AccessFlags::W_OK).is_ok();
    if let Some(f) = summary {
        if f.is_dir() {
            bail!("--summary {} is a directory: give a file name", f.display());
        }
        let writable = match std::fs::metadata(f) {
            Ok(_) => nix::unistd::access(f, nix::unistd::AccessFlags::W_OK).is_ok(),
            Err(_) => writable_dir(&dir_of(f)),
        };
        if !writable {
            bail!("--summary {}: cannot write there (no such directory, or no permission): give a file in a directory you can write", f.display());
        }
    }
    for (guest, host) in copy_out {
        // The copy makes missing directories (`create_dir_all`): what must
        // be writable is the nearest one that exists.
        let dir = if host.is_dir() { host.clone() } else { dir_of(host) };
        let target = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new(".")).to_path_buf();
        if !writable_dir(&target) {
            bail!(
                "--copy-out {guest}:{}: {} is not a directory you can write: give a destination in one",
                host.display(),
                target.display()
            );
        }
    }
    Ok(())
}

/// The summary: one JSON line on stderr with `--json`, a file with
/// `--summary`, one human line otherwise. stdout is COMMAND's alone, and a
/// summary file that cannot be written changes neither it nor the exit
/// status (the run is over; the line on stderr still says how it went).
fn report(ctx: &Ctx, s: &RunSummary, file: Option<&Path>) -> Result<()> {
    let json = serde_json::to_string(s)?;
    if let Some(f) = file {
        if let Err(e) = std::fs::write(f, format!("{json}\n")) {
            eprintln!("qbuf-qemu: run: cannot write the summary to {}: {e}", f.display());
        }
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
    fn a_copy_out_into_directories_not_made_yet_is_accepted() {
        let t = tempfile::tempdir().unwrap();
        let deep = [("/out".to_string(), t.path().join("new/deeper/out"))];
        check_outputs(Some(&t.path().join("summary.json")), &deep).unwrap();
        let under_a_file = [("/out".to_string(), std::path::PathBuf::from("/etc/hostname/out"))];
        assert!(check_outputs(None, &under_a_file).is_err());
    }

    #[test]
    fn each_word_of_the_command_is_quoted() {
        let c: Vec<String> = ["sh", "-c", "exit 7"].iter().map(|s| s.to_string()).collect();
        assert_eq!(remote_line(None, &c), "exec sh -c 'exit 7'");
        assert_eq!(remote_line(Some("/mnt/my dir"), &["true".into()]), "cd -- '/mnt/my dir' && exec true");
    }

    /// A guest that stalls its tar: the copy's ssh waits for ever (its
    /// keepalives are answered) until the deadline ends it.
    #[test]
    fn a_deadline_ends_a_stalled_copy_out_and_the_run_times_out() {
        let int = interrupt::expiring_after(Duration::from_millis(200));
        let copy_out = [("/tmp/a".to_string(), "a".into()), ("/tmp/b".to_string(), "b".into())];
        let mut s = RunSummary::new("run-1", None, &["true".into()]);
        (s.command_exit, s.outcome) = (Some(0), Outcome::Ok);
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let start = Instant::now();
        copy_artifacts(&copy_out, &int, &mut s, |_, _, watch| {
            tries.fetch_add(1, Ordering::SeqCst);
            let mut ssh = Command::new("sleep").arg("30").spawn()?;
            watch(ssh.id() as i32);
            let sent = ssh.wait()?;
            watch(0);
            if !sent.success() {
                bail!("the guest could not send it");
            }
            Ok(guest_files::Unpacked::default())
        });
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        assert_eq!(tries.load(Ordering::SeqCst), 1, "nothing more is copied after the deadline");
        assert_eq!(s.error, None, "the deadline is the run's end, not a failed copy");
        assert_eq!((int.settle(&mut s, 0), s.outcome, s.command_exit), (124, Outcome::TimedOut, Some(0)));
    }
}
