//! `launch`: start the instance (or say it runs) and wait until an SSH
//! login works. Data flows one way: flags + saved settings → resolved
//! settings ([`crate::config`]) → QEMU's argv (pure, [`crate::qemu::args`])
//! → the supervisor and QEMU → records in the instance dir.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::boot;
use super::ready;
use super::spec::{self, launched, LaunchOptions};
use super::Ctx;
use crate::config::{self, Settings};
use crate::instance::records::RunRecord;
use crate::instance::{read_json, write_json, Instance, Liveness, Lock};
use crate::qemu::args::Accel;
use crate::report::error::Usage;
use crate::report::launch::Launched;
use crate::ssh;

pub fn launch(ctx: &Ctx, opts: &LaunchOptions) -> Result<Launched> {
    crate::cli::parse::fits_host(opts.flags.memory, opts.flags.cpus).map_err(Usage)?;
    let inst = ctx.instance();
    let saved: Option<Settings> = read_json(&inst.settings()).ok().flatten();
    config::check_flags(saved.as_ref(), &opts.flags).map_err(Usage)?;
    ctx.state.ensure()?;
    // Before anything slow (a Guix build): a launch that must fail does so now.
    inst.check_socket_paths()?;
    // Only a directory this launch made is removed on failure: one that
    // `destroy` left with the user's files keeps them.
    let fresh = !inst.dir.exists();
    inst.ensure_dir()?;
    let lock = match take_lock(ctx, &inst, opts) {
        Ok(Taken::Lock(l)) => l,
        Ok(Taken::Running(r)) => return Ok(*r),
        Err(e) => return Err(e),
    };
    let r = boot::boot(ctx, &inst, lock, opts);
    // The status line ends with the launch: `run` streams COMMAND next.
    crate::progress::finish();
    if r.is_err() && fresh && !Lock::is_held(&inst)? {
        // A first launch that failed leaves no half-made instance behind.
        let _ = std::fs::remove_dir_all(&inst.dir);
    }
    r
}

enum Taken {
    Lock(Lock),
    Running(Box<Launched>),
}

/// The instance lock, or the running instance's connection info when a VM
/// holds it. A lock held by another `launch` that is still starting the VM
/// is waited for.
fn take_lock(ctx: &Ctx, inst: &Instance, opts: &LaunchOptions) -> Result<Taken> {
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut told = false;
    loop {
        if let Some(l) = Lock::try_acquire(inst)? {
            return Ok(Taken::Lock(l));
        }
        if opts.recreate || opts.resume.is_some() {
            let flag = if opts.recreate { "--recreate discards its disk" } else { "--resume replaces its VM" };
            bail!(
                "instance '{}' is running (or starting), and {flag}: stop it first ('{}'), then launch again",
                ctx.name,
                ctx.command("powerdown")
            );
        }
        // Only finding the VM is retried: once it runs, what goes wrong
        // with it (a refused --disk-size, an unreachable guest) is said.
        // The launch that starts it saves its settings once QEMU is up:
        // until then it is still starting.
        if let Some(vm) = running_vm(ctx, inst)?.filter(|_| inst.settings().exists()) {
            return Ok(Taken::Running(Box::new(already_running(ctx, inst, opts, vm)?)));
        }
        if Instant::now() > deadline {
            bail!(
                "instance '{}' is locked by another qbuf-qemu command that did not finish in time: see what it is doing with '{}', then try again",
                ctx.name,
                ctx.command("status")
            );
        }
        if !told && started.elapsed() > Duration::from_secs(1) {
            // Said once, after a second: a wait this long is never silent.
            told = true;
            ctx.progress(&format!(
                "instance '{}' is locked by another qbuf-qemu command (a launch starting it, or a change to it); \
                 waiting up to {} s for it",
                ctx.name,
                deadline.saturating_duration_since(Instant::now()).as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VM that holds the lock: QEMU's pid, its accelerator and a note.
struct RunningVm {
    pid: i32,
    accel: Accel,
    note: Option<String>,
}

/// The running VM (also when QEMU runs on after its supervisor died);
/// `None` while another command is still starting it or finishing with it.
fn running_vm(ctx: &Ctx, inst: &Instance) -> Result<Option<RunningVm>> {
    Ok(match Liveness::probe(inst)? {
        Liveness::Supervised(run) => Some(RunningVm { pid: run.qemu.pid, accel: run.accel, note: None }),
        Liveness::Orphaned(run) => Some(RunningVm {
            pid: run.qemu.pid,
            accel: run.accel,
            note: Some(format!(
                "the instance's supervisor is gone, so events are not recorded; '{}' still stops it",
                ctx.command("powerdown")
            )),
        }),
        Liveness::Stopped | Liveness::Busy => None,
    })
}

/// `launch` on a running instance: the same connection info, and changed
/// flags saved for the next boot.
fn already_running(ctx: &Ctx, inst: &Instance, opts: &LaunchOptions, vm: RunningVm) -> Result<Launched> {
    let RunningVm { pid, accel, note } = vm;
    let mut notes: Vec<String> = note.into_iter().collect();
    let saved: Settings =
        read_json(&inst.settings())?.ok_or_else(|| crate::machine::missing_record(inst, &inst.settings()))?;
    let (mut new, changes) = config::merge(Some(&saved), &opts.flags, &spec::defaults())?;
    if new.ssh_port == 0 {
        new.ssh_port = saved.ssh_port;
    }
    if !changes.is_empty() {
        write_json(&inst.settings(), &new)?;
    }
    if let Some(bytes) = opts.disk_size {
        let grown = super::resize::resize(ctx, crate::qemu::args::BOOT_DISK_DEVICE, bytes)?;
        notes.push(crate::report::Render::human(&grown).replace('\n', " "));
    }
    let key = spec::ssh_key_for(&ctx.state, &saved)?;
    // The user applies at once (logins read it); the key at the next boot.
    let t = ssh::Target::for_instance(inst, saved.ssh_port, &new.ssh_user, &key);
    // Another launch may still be booting it: answer when a login works,
    // as that launch will.
    if let (false, Some(run)) = (opts.no_wait, read_json::<RunRecord>(&inst.run_record())?) {
        let watch = ready::Watch {
            auto_kvm: false,
            silence: opts.silence,
            serial_before: 0,
            cancel: opts.cancel.clone(),
            stage: "waiting for the running guest to answer SSH",
            resumed: None,
            limit_flag: opts.timeout_flag,
        };
        if let Err(r) = ready::wait(inst, &t, &run.qemu, Instant::now() + opts.timeout, &watch) {
            bail!("instance '{}' runs (QEMU pid {pid}), but it is not reachable: {}", ctx.name, r.describe(&t, inst));
        }
    }
    Ok(launched(ctx, inst, &t, pid, accel, true, changes, notes))
}
