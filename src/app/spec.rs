//! What a launch is asked for and what it builds from it: the options of
//! one launch, the flags made absolute, the defaults that come from where
//! the command runs, QEMU's spec (pure) and the connection info returned.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::restore::Resume;
use super::{absolute_flag, Ctx};
use crate::cli::{LaunchArgs, VmArgs};
use crate::config::{self, Change, LaunchFlags, PortChoice, Settings, ShareType};
use crate::host;
use crate::instance::records::{DevicesRecord, RunOrigin};
use crate::instance::{Instance, StateDir};
use crate::qemu::args::{Accel, Endpoints, KernelBoot, Share, VmSpec, DEFAULT_SHARE_TAG, HOTPLUG_PORTS};
use crate::qemu::virtiofs::{self, Daemon, ShareKind};
use crate::report::launch::Launched;
use crate::ssh;

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub flags: LaunchFlags,
    /// How long the boot may take to a working login.
    pub timeout: Duration,
    /// The flag that sets `timeout`, for the hint when it passes.
    pub timeout_flag: &'static str,
    pub no_wait: bool,
    pub recreate: bool,
    /// `--disk-size`: grow the boot disk to this many bytes first.
    pub disk_size: Option<u64>,
    /// Serial silence after which an automatically chosen KVM is blamed.
    pub silence: Duration,
    /// Start from a saved VM instead of booting.
    pub resume: Option<ResumeFrom>,
    /// Set from outside (a signal, a deadline): stop waiting.
    pub cancel: Option<Arc<AtomicBool>>,
    /// The `run` this VM belongs to (written to run-origin.json before the
    /// supervisor starts, which watches the owner).
    pub run: Option<RunOrigin>,
}

/// Which saved VM a launch starts from.
#[derive(Debug, Clone)]
pub enum ResumeFrom {
    /// One of this instance's snapshots (`launch --resume`).
    Own(String),
    /// A snapshot already checked by `restore::resume_from` (`snapshot load`,
    /// and `run --from-snapshot`, which resumes another instance's under a
    /// fresh overlay).
    Checked(Box<Resume>),
}

impl LaunchOptions {
    /// The flags as given, with every path made absolute against the
    /// current directory (a saved relative path would mean another
    /// directory at the next launch).
    pub fn from_args(a: LaunchArgs) -> Result<LaunchOptions> {
        let mut o = LaunchOptions::plain(a.timeout);
        o.flags = vm_flags(a.vm, a.ssh_port)?;
        o.no_wait = a.no_wait;
        o.recreate = a.recreate;
        o.disk_size = a.disk_size;
        o.resume = a.resume.map(ResumeFrom::Own);
        Ok(o)
    }

    /// A plain `launch`: the saved settings, waiting up to `timeout`.
    pub fn plain(timeout: Duration) -> LaunchOptions {
        let silence = std::env::var("QBUF_QEMU_SERIAL_SILENCE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
        LaunchOptions {
            flags: LaunchFlags::default(),
            timeout,
            timeout_flag: "--timeout",
            no_wait: false,
            recreate: false,
            disk_size: None,
            silence: Duration::from_secs(silence),
            resume: None,
            cancel: None,
            run: None,
        }
    }
}

/// The VM flags as given, with every path made absolute against the current
/// directory (a saved relative path would mean another directory at the
/// next launch).
pub fn vm_flags(a: VmArgs, ssh_port: Option<PortChoice>) -> Result<LaunchFlags> {
    Ok(LaunchFlags {
        memory: a.memory,
        cpus: a.cpus,
        ssh_port,
        share: absolute_flag(a.share)?,
        no_share: a.no_share,
        share_mode: a.share_mode,
        share_type: a.share_type,
        image: absolute_flag(a.image)?,
        kernel: absolute_flag(a.kernel)?,
        initrd: absolute_flag(a.initrd)?,
        append: a.append,
        guix_dir: absolute_flag(a.guix.guix_dir)?,
        image_size: a.guix.image_size,
        accel: a.accel,
        ssh_user: a.ssh_user,
        ssh_key: absolute_flag(a.ssh_key)?,
    })
}

/// The connection info `launch` prints.
#[allow(clippy::too_many_arguments)]
pub fn launched(
    ctx: &Ctx,
    inst: &Instance,
    t: &ssh::Target,
    pid: i32,
    accel: Accel,
    already_running: bool,
    changes: Vec<Change>,
    notes: Vec<String>,
) -> Launched {
    Launched {
        name: ctx.name.clone(),
        pid,
        ssh_port: t.port,
        ssh_user: t.user.clone(),
        qmp_socket: inst.qmp_user(),
        serial_log: inst.serial_log(),
        ready_seconds: None,
        qemu_up_seconds: None,
        already_running,
        accel,
        changes,
        notes,
        ssh_command: shell_words::join(t.command(&[])),
        connect_command: ctx.command("ssh"),
        stop_command: ctx.command("powerdown"),
    }
}

/// A user's file, canonical; a clear error when it does not exist.
pub fn must_exist(p: &std::path::Path, what: &str) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{what} {} does not exist", p.display()))
}

/// The share a launch's settings give (`--share`, mounted at /mnt/qbuf).
pub fn default_share(s: &Settings) -> Option<Share> {
    let readonly = s.share_mode == config::ShareMode::Ro;
    s.share.as_ref().map(|p| Share { path: p.clone(), tag: DEFAULT_SHARE_TAG.into(), readonly })
}

/// Defaults that come from where the command runs: the checkout to share.
pub fn defaults() -> config::Defaults {
    let share = std::env::current_dir().ok().and_then(|d| host::git_toplevel(&d));
    config::Defaults { share }
}

pub fn ssh_key_for(state: &StateDir, s: &Settings) -> Result<PathBuf> {
    match &s.ssh_key {
        Some(k) => Ok(k.clone()),
        None => ssh::ensure_user_key(state),
    }
}

/// Everything QEMU needs, resolved (pure).
pub fn vm_spec(
    inst: &Instance,
    s: &Settings,
    accel: Accel,
    disk: Option<PathBuf>,
    kernel: Option<KernelBoot>,
    devices: &DevicesRecord,
    firmware: Option<PathBuf>,
) -> VmSpec {
    let mut shares: Vec<Share> = default_share(s).into_iter().collect();
    shares.extend(devices.shares.iter().cloned());
    VmSpec {
        name: inst.name.clone(),
        accel,
        memory_mib: s.memory_mib,
        cpus: s.cpus,
        ssh_port: s.ssh_port,
        disk,
        kernel,
        shares,
        share_kind: ShareKind::NineP,
        extra_disks: devices.disks.clone(),
        forwards: devices.forwards.clone(),
        authorized_key: inst.authorized_key(),
        endpoints: Endpoints {
            qmp_supervisor: inst.qmp_supervisor(),
            qmp_user: inst.qmp_user(),
            console: inst.console(),
            // The supervisor reads it into serial.log (supervisor/pump.rs).
            serial_log: inst.serial_fifo(),
            guest_agent: inst.guest_agent(),
            share_sockets: vec![],
        },
        hotplug_ports: HOTPLUG_PORTS,
        firmware,
        incoming: false,
    }
}

/// How this boot's shares reach the guest (`--share-type`, or the saved
/// VM's way for a resume: its devices must be the same), and the
/// `virtiofsd` each needs when that is virtio-fs. `auto` without a usable
/// `virtiofsd` falls back to 9p with one note saying why and what to do.
pub fn share_transport(
    ctx: &Ctx,
    inst: &Instance,
    s: &Settings,
    resumed: Option<ShareKind>,
    spec: &mut VmSpec,
    notes: &mut Vec<String>,
) -> Result<Vec<Daemon>> {
    spec.share_kind = ShareKind::NineP;
    spec.endpoints.share_sockets.clear();
    if spec.shares.is_empty() {
        return Ok(vec![]);
    }
    let asked = match resumed {
        Some(ShareKind::NineP) => ShareType::NineP,
        Some(ShareKind::Virtiofs) => ShareType::Virtiofs,
        None => s.share_type,
    };
    if asked == ShareType::NineP {
        return Ok(vec![]);
    }
    let binary = match (asked, guix_virtiofsd(ctx, inst, s).or_else(|_| virtiofs::find_virtiofsd())) {
        (_, Ok(b)) => b,
        (ShareType::Virtiofs, Err(why)) if resumed.is_some() => anyhow::bail!(
            "the snapshot was saved with a virtio-fs share, and there is no usable virtiofsd ({why}): {}",
            virtiofs::HOW_TO_GET
        ),
        (ShareType::Virtiofs, Err(why)) => anyhow::bail!(
            "--share-type virtiofs, but there is no usable virtiofsd ({why}): {}; or share over 9p with --share-type 9p",
            virtiofs::HOW_TO_GET
        ),
        (_, Err(why)) => {
            notes.push(format!(
                "sharing over 9p, which is much slower for builds than virtio-fs: no usable virtiofsd ({why}); {}",
                virtiofs::HOW_TO_GET
            ));
            return Ok(vec![]);
        }
    };
    crate::instance::paths::private_dir(&inst.virtiofs_dir())?;
    tracing::info!("virtio-fs shares served by {}", binary.display());
    let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
    spec.share_kind = ShareKind::Virtiofs;
    let mut daemons = vec![];
    for (i, share) in spec.shares.iter().enumerate() {
        let socket = inst.share_socket(i);
        daemons.push(Daemon {
            tag: share.tag.clone(),
            binary: binary.clone(),
            argv: virtiofs::daemon_args(&share.path, share.readonly, &socket, uid, gid),
            socket: socket.clone(),
            log: inst.share_daemon_log(i),
        });
        spec.endpoints.share_sockets.push(socket);
    }
    Ok(daemons)
}

/// For a Guix image, the `virtiofsd` of the channels it was built with
/// (the same daemon on every host), when they have one that works; else
/// `Err` and the caller looks on this host. Never the checkout's current
/// channels.scm: see [`crate::guix::image_channels`].
fn guix_virtiofsd(ctx: &Ctx, inst: &Instance, s: &Settings) -> Result<PathBuf, String> {
    if !matches!(s.source, config::Source::Guix { .. }) {
        return Err("not a Guix image".into());
    }
    let image: Option<crate::guix::InstanceImage> = crate::instance::read_json(&inst.guix_image()).ok().flatten();
    let key = image.ok_or("the instance records no Guix image")?.key;
    let channels = crate::guix::image_channels(&ctx.state, &key);
    if !channels.is_file() {
        return Err("its image's channels were not recorded (an image built by an older qbuf-qemu)".into());
    }
    let b = crate::guix::pinned_virtiofsd(&ctx.state, &channels)
        .inspect_err(|why| tracing::info!("no virtiofsd from Guix ({why}): looking on this host"))?;
    virtiofs::usable(&b).map(|()| b)
}

/// The warning for a read-write share of `/` or of a directory holding the
/// user's home (`launch --share`, `share add`): the guest could change the
/// user's SSH keys and shell startup files.
/// `fix` says how to share less, in the command's own flags.
pub fn wide_share_warning(p: &std::path::Path, readonly: bool, fix: &str) -> Option<String> {
    let home = std::env::var_os("HOME").and_then(|h| std::fs::canonicalize(h).ok());
    let wide = p == std::path::Path::new("/") || home.is_some_and(|h| h.starts_with(p));
    (wide && !readonly).then(|| {
        format!(
            "warning: the share {} is read-write, so the guest can change any file under it (your SSH keys and \
             shell startup files too): {fix}",
            p.display()
        )
    })
}
