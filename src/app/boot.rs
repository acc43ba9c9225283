//! One boot, step by step: resolve the settings, make the boot disk, choose
//! the accelerator, build QEMU's argv (pure), start the supervisor and wait
//! for QEMU to be up, then wait for SSH ([`super::ready`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::ready;
use super::restore::{self, Resume};
use super::spec::{defaults, launched, must_exist, share_transport, ssh_key_for, vm_spec, LaunchOptions, ResumeFrom};
use super::Ctx;
use crate::config::{self, AccelChoice, Change, PortChoice, Settings, Source};
use crate::host;
use crate::instance::records::{BootPlan, DevicesRecord, RunRecord};
use crate::instance::{read_json, write_json, Instance, Lock};
use crate::qemu::args::{Accel, KernelBoot};
use crate::qemu::binaries::{kvm_runs, qemu_binaries, QemuBinaries};
use crate::report::error::Failure;
use crate::report::launch::Launched;
use crate::ssh;
use crate::supervisor::ladder::StopOptions;
use crate::supervisor::spawn;

/// Said with every failure of a KVM boot that qbuf-qemu chose by itself.
fn kvm_hint(ctx: &Ctx) -> String {
    format!(
        "QEMU ran with KVM because /dev/kvm is accessible (--accel auto), and KVM looks broken on this host \
         (common with nested virtualization): relaunch with '--accel tcg' (slower, always works), and see '{}'",
        ctx.host_command("doctor")
    )
}

pub fn boot(ctx: &Ctx, inst: &Instance, lock: Lock, opts: &LaunchOptions) -> Result<Launched> {
    let started = Instant::now();
    let mut notes = Vec::new();
    let stale = inst.clean_stale();
    if !stale.is_empty() {
        let names: Vec<_> = stale.iter().filter_map(|p| p.file_name()?.to_str().map(String::from)).collect();
        notes.push(format!("removed stale files left by an earlier crash: {}", names.join(", ")));
    }
    let resume = match &opts.resume {
        Some(ResumeFrom::Own(name)) => Some(restore::resume_from(ctx, inst, name, false)?),
        Some(ResumeFrom::Checked(r)) => Some((**r).clone()),
        None => None,
    };
    let (s, changes) = settings(ctx, inst, opts, resume.as_ref(), &mut notes)?;
    let bins = qemu_binaries()?;
    let key = ssh_key_for(&ctx.state, &s)?;
    let pubkey = ssh::public_key_line(&key)?;
    crate::instance::write_atomic(&inst.authorized_key(), |f| {
        Ok(std::io::Write::write_all(f, format!("{pubkey}\n").as_bytes())?)
    })?;
    // A resume that fails before its state loaded puts back the disk it replaced.
    let undo = |e: anyhow::Error| if resume.is_some() { restore::undo(inst, e) } else { e };
    let (plan, auto_kvm) = plan(ctx, inst, &s, opts, &bins, &pubkey, resume.as_ref(), &mut notes).map_err(undo)?;
    let serial_before = plan.serial_start;
    let hint = auto_kvm.then(|| kvm_hint(ctx));
    if let Some(origin) = &opts.run {
        write_json(&inst.run_origin(), origin).map_err(undo)?;
    }
    ctx.stage("starting QEMU");
    let run = start_and_load(ctx, inst, lock, &plan, hint.clone(), resume.as_ref()).map_err(undo)?;
    // The wait for SSH is counted from here: an image build or a disk
    // copy before QEMU started is not the guest's boot.
    let up = Instant::now();
    let qemu_up = started.elapsed().as_secs_f64();
    // Before the settings: a launch that finds this VM running waits for
    // them, and then logs in through this boot's ssh-mux/.
    if let Err(e) = inst.fresh_ssh_mux_dir() {
        tracing::warn!("logins will not share a connection: {e:#}");
    }
    // Saved once QEMU came up with them: a setting QEMU refuses is not kept.
    if let Err(e) = write_json(&inst.settings(), &s) {
        let _ = super::stop::stop_running(ctx, inst, &StopOptions { timeout: Duration::ZERO, force: true });
        return Err(e.context("the VM was stopped: its settings could not be saved"));
    }

    let t = ssh::Target::for_instance(inst, s.ssh_port, &s.ssh_user, &key);
    let mut result = launched(ctx, inst, &t, run.qemu.pid, plan.spec.accel, false, changes, notes);
    result.qemu_up_seconds = Some(qemu_up);
    if opts.no_wait {
        return Ok(result);
    }
    ctx.progress(&format!(
        "QEMU {} runs ({}); waiting up to {}s for SSH on 127.0.0.1:{} (serial log: {})",
        run.qemu.pid,
        plan.spec.accel.as_str(),
        opts.timeout.as_secs(),
        s.ssh_port,
        inst.serial_log().display()
    ));
    let watch = watch_for(opts, auto_kvm, serial_before, resume.as_ref());
    match ready::wait(inst, &t, &run.qemu, up + opts.timeout, &watch) {
        Ok(out) => {
            if let Some(r) = &resume {
                result.notes.extend(super::guest::after_resume_notes(&t, out, &r.record.mounts));
            }
            result.ready_seconds = Some(started.elapsed().as_secs_f64());
            Ok(result)
        }
        Err(r) => Err(ready::failed(ctx, inst, &t, &plan, serial_before, hint, r)),
    }
}

/// What the wait for this boot's login watches besides SSH.
fn watch_for(opts: &LaunchOptions, auto_kvm: bool, serial_before: u64, resume: Option<&Resume>) -> ready::Watch {
    let stage = if resume.is_some() { "waiting for the resumed guest to answer SSH" } else { ready::BOOTING };
    let resumed = resume.map(|r| {
        let mounts = r.record.mounts.clone();
        Box::new(move || super::guest::after_resume_login(&mounts)) as Box<dyn Fn() -> String>
    });
    ready::Watch {
        auto_kvm,
        silence: opts.silence,
        serial_before,
        cancel: opts.cancel.clone(),
        stage,
        resumed,
        limit_flag: opts.timeout_flag,
    }
}

/// The settings of this boot: the flags over the saved ones, checked; a
/// resumed VM keeps the saved VM's resources.
fn settings(
    ctx: &Ctx,
    inst: &Instance,
    opts: &LaunchOptions,
    resume: Option<&Resume>,
    notes: &mut Vec<String>,
) -> Result<(Settings, Vec<Change>)> {
    let saved: Option<Settings> = read_json(&inst.settings())?;
    let (mut s, changes) = config::merge(saved.as_ref(), &opts.flags, &defaults())?;
    if let Some(r) = resume {
        s.memory_mib = r.record.spec.memory_mib;
        s.cpus = r.record.spec.cpus;
    }
    check_paths(&mut s)?;
    notes.extend(wide_share(&s));
    choose_port(&mut s, opts, notes)?;
    check_devices(ctx, &s, &DevicesRecord::load(inst)?)?;
    if saved.as_ref().is_some_and(|old| old.source != s.source) && std::fs::remove_file(inst.known_hosts()).is_ok() {
        notes.push("the boot source changed, so this is a new guest: its SSH host key is pinned anew".into());
    }
    Ok((s, changes))
}

/// What QEMU runs (boot.json): the boot disk made, the accelerator chosen,
/// the argv built. Also whether qbuf-qemu chose KVM by itself.
#[allow(clippy::too_many_arguments)]
fn plan(
    ctx: &Ctx,
    inst: &Instance,
    s: &Settings,
    opts: &LaunchOptions,
    bins: &QemuBinaries,
    pubkey: &str,
    resume: Option<&Resume>,
    notes: &mut Vec<String>,
) -> Result<(BootPlan, bool)> {
    let devices = DevicesRecord::load(inst)?;
    let (mut spec, auto_kvm) = match resume {
        Some(r) => {
            restore::check(ctx, &devices, bins, r)?;
            let disk = restore::disk(inst, bins, r)?;
            let saved = &r.record.spec;
            let mut spec = vm_spec(inst, s, saved.accel, disk, saved.kernel.clone(), &devices, bins.firmware.clone());
            restore::adapt(&mut spec, s, r);
            (spec, false)
        }
        None => {
            notes.extend(restore::cut_short(inst));
            let (disk, kernel) = boot_disk(ctx, inst, s, opts, bins, pubkey, notes)?;
            if let Some(bytes) = opts.disk_size {
                let d = disk
                    .as_deref()
                    .ok_or_else(|| anyhow!("--disk-size grows the boot disk, and this boot has none"))?;
                notes.extend(super::resize::grow_before_boot(&bins.img, d, bytes)?);
            }
            if disk.is_none() {
                // A diskless guest has no place to keep a host key: it makes a
                // new one every boot, so the pin can only hold for one boot.
                let _ = std::fs::remove_file(inst.known_hosts());
            }
            if s.accel != AccelChoice::Tcg {
                ctx.stage("testing KVM with a tiny VM");
            }
            let (accel, auto_kvm) = choose_accel(ctx, s, bins)?;
            (vm_spec(inst, s, accel, disk, kernel, &devices, bins.firmware.clone()), auto_kvm)
        }
    };
    let daemons = share_transport(ctx, inst, s, resume.map(|r| r.record.spec.share_kind), &mut spec, notes)?;
    let argv = crate::qemu::args::build_args(&spec)?;
    let (serial_start, serial_inode) = serial_start(inst);
    let plan = BootPlan { qemu: bins.system.clone(), argv, spec, serial_start, serial_inode, daemons };
    write_json(&inst.boot_plan(), &plan)?;
    Ok((plan, auto_kvm))
}

/// Where this boot's console output will start: serial.log's size and
/// inode (the file is made now if it is not there yet).
fn serial_start(inst: &Instance) -> (u64, Option<u64>) {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(inst.serial_log());
    match f.and_then(|f| f.metadata()) {
        Ok(m) => (m.len(), Some(m.ino())),
        Err(_) => (0, None),
    }
}

/// User paths must exist and be what they claim; they are absolute already
/// (the flags were made so), canonical from here on.
fn check_paths(s: &mut Settings) -> Result<()> {
    if let Some(sh) = &s.share {
        // Saved at the first launch, it may be gone since.
        let p = std::fs::canonicalize(sh).with_context(|| {
            format!(
                "share directory {} does not exist: share another with '--share DIR', or launch without one \
                 with '--no-share'",
                sh.display()
            )
        })?;
        if !p.is_dir() {
            bail!("share {} is not a directory: give a directory with --share, or --no-share", p.display());
        }
        s.share = Some(p);
    }
    if let Some(k) = &s.ssh_key {
        let k = must_exist(k, "SSH key")?;
        ssh::check_private_key(&k)?;
        s.ssh_key = Some(k);
    }
    s.source = match s.source.clone() {
        Source::Image { path } => Source::Image { path: must_exist(&path, "image")? },
        Source::Kernel { kernel, initrd, append, image } => Source::Kernel {
            kernel: must_exist(&kernel, "kernel")?,
            initrd: must_exist(&initrd, "initrd")?,
            append,
            image: image.map(|i| must_exist(&i, "image")).transpose()?,
        },
        g @ Source::Guix { .. } => g,
    };
    Ok(())
}

/// A warning when the share hands the guest far more than a checkout: `/`,
/// the home directory or one above it, read-write (the guest could change
/// the user's SSH keys and shell startup files).
fn wide_share(s: &Settings) -> Option<String> {
    super::spec::wide_share_warning(
        s.share.as_deref()?,
        s.share_mode == config::ShareMode::Ro,
        "share a project directory with '--share DIR', or add '--share-mode ro'",
    )
}

/// The SSH port: the saved or given one when it is free, a free one picked
/// for `--ssh-port auto`.
fn choose_port(s: &mut Settings, opts: &LaunchOptions, notes: &mut Vec<String>) -> Result<()> {
    if s.ssh_port == 0 {
        s.ssh_port = host::pick_free_port()?;
        notes.push(format!("picked free port {} for SSH; it is kept for this instance", s.ssh_port));
    } else if !host::port_free(s.ssh_port) && opts.flags.ssh_port == Some(PortChoice::Auto) {
        let busy = s.ssh_port;
        s.ssh_port = host::pick_free_port()?;
        notes.push(format!("the saved SSH port {busy} is in use now; picked free port {} and kept it", s.ssh_port));
    } else if !host::port_free(s.ssh_port) {
        bail!(
            "port {} on 127.0.0.1 is already in use (another VM or program): choose another with --ssh-port N, or let qbuf-qemu pick one with --ssh-port auto",
            s.ssh_port
        );
    }
    Ok(())
}

/// Recorded disks must exist and recorded forwards' host ports be free, as
/// for the SSH port: QEMU would fail on either with a raw message. A
/// recorded disk's header is checked again, as `disk add` did (it may have
/// changed, or been added before that check refused backing files).
fn check_devices(ctx: &Ctx, s: &Settings, devices: &DevicesRecord) -> Result<()> {
    for d in &devices.disks {
        let detach = ctx.command(&format!("disk remove {}", d.id));
        if !d.path.is_file() {
            bail!(
                "disk '{}' recorded for this instance is missing ({}): restore it, or stop attaching it with '{detach}'",
                d.id,
                d.path.display(),
            );
        }
        // A raw disk's first bytes are the guest's to write (QEMU opens it
        // as raw, never probed): only a qcow2's header is checked again.
        if d.format == crate::qemu::value::DiskFormat::Qcow2 {
            crate::qemu::image::check_image(&d.path, d.format).with_context(|| {
                format!("disk '{}' recorded for this instance is refused (stop attaching it with '{detach}')", d.id)
            })?;
        }
    }
    for f in &devices.forwards {
        let proto = f.proto();
        if (!f.udp && f.host_port == s.ssh_port) || !host::addr_free(&f.host_addr, f.host_port, f.udp) {
            bail!(
                "host port {}:{}/{proto}, recorded as a forward to guest port {}, is in use by another program: free it, or stop forwarding it with '{}'",
                f.host_addr,
                f.host_port,
                f.guest_port,
                ctx.command(&format!("forward remove {}:{}/{proto}", f.host_addr, f.host_port))
            );
        }
    }
    Ok(())
}

fn boot_disk(
    ctx: &Ctx,
    inst: &Instance,
    s: &Settings,
    opts: &LaunchOptions,
    bins: &QemuBinaries,
    pubkey: &str,
    notes: &mut Vec<String>,
) -> Result<(Option<PathBuf>, Option<KernelBoot>)> {
    use crate::qemu::image;
    if opts.recreate && !image::discard(inst).is_empty() {
        notes.push("discarded the guest's disk (--recreate): guest-local state is gone".into());
    }
    Ok(match &s.source {
        Source::Image { path } => (Some(image::prepare(inst, &bins.img, path)?), None),
        Source::Kernel { kernel, initrd, append, image } => (
            image.as_ref().map(|i| image::prepare(inst, &bins.img, i)).transpose()?,
            Some(KernelBoot { kernel: kernel.clone(), initrd: initrd.clone(), append: append.clone() }),
        ),
        Source::Guix { guix_dir, image_size } => {
            let base =
                super::build::instance_image(ctx, inst, guix_dir.as_deref(), image_size, pubkey, opts.recreate, notes)?;
            (Some(image::prepare(inst, &bins.img, &base)?), None)
        }
    })
}

/// The accelerator, and whether qbuf-qemu chose KVM by itself (then a
/// failure says KVM may be to blame).
fn choose_accel(ctx: &Ctx, s: &Settings, bins: &QemuBinaries) -> Result<(Accel, bool)> {
    Ok(match s.accel {
        AccelChoice::Tcg => (Accel::Tcg, false),
        AccelChoice::Kvm => match kvm_runs(bins) {
            Ok(()) => (Accel::Kvm, false),
            Err(e) => bail!("--accel kvm, but KVM cannot run guests here ({e}): use --accel tcg (slower) or fix KVM"),
        },
        AccelChoice::Auto => match kvm_runs(bins) {
            Ok(()) => (Accel::Kvm, true),
            Err(e) => {
                // Said once, short; the reason is doctor's (and -v's).
                tracing::info!("KVM cannot run guests here: {e}");
                ctx.progress(&format!(
                    "warning: KVM is not usable here, so the VM runs under TCG (much slower); '{}' says why",
                    ctx.host_command("doctor")
                ));
                (Accel::Tcg, false)
            }
        },
    })
}

/// QEMU started and, for a resume, the saved state loaded into it (QEMU is
/// stopped again when it does not load, with QEMU's reason).
fn start_and_load(
    ctx: &Ctx,
    inst: &Instance,
    lock: Lock,
    plan: &BootPlan,
    hint: Option<String>,
    resume: Option<&Resume>,
) -> Result<RunRecord> {
    let run = start(ctx, inst, lock, plan, hint)?;
    if let Some(r) = resume {
        if let Err(e) = restore::load_state(inst, r) {
            let _ = super::stop::stop_running(ctx, inst, &StopOptions { timeout: Duration::ZERO, force: true });
            return Err(restore::qemu_said(inst, e).context("the VM was stopped"));
        }
        restore::loaded(inst);
    }
    Ok(run)
}

/// Starts the supervisor (which starts QEMU) and waits until QEMU is up;
/// a QEMU that failed to start is a [`Failure::LaunchFailed`] with the
/// console's tail and `hint`.
fn start(ctx: &Ctx, inst: &Instance, lock: Lock, plan: &BootPlan, hint: Option<String>) -> Result<RunRecord> {
    match spawn::start(&ctx.state.root, inst, lock, plan.daemons.len())? {
        Ok(run) => Ok(run),
        Err(mut f) => {
            f.serial_tail = crate::logs::tail(&inst.serial_log(), plan.serial_start, 1500, "");
            Err(Failure::LaunchFailed { failure: f, hint }.into())
        }
    }
}
