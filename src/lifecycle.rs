//! Launch, status, powerdown and destroy as the user runs them. Data flows one
//! way: flags + saved settings → resolved spec → QEMU argv (pure) → the
//! supervisor and QEMU → records in the instance dir.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{self, AccelChoice, Change, LaunchFlags, Settings, Source};
use crate::control;
use crate::host;
use crate::instance::{read_json, write_json, Instance, Lock, RunRecord, StateDir};
use crate::powerdown::{self, ForeignProcess, StopOptions, StopOutcome};
use crate::qemu::{self, Accel, Endpoints, KernelBoot, Share, VmSpec};
use crate::ssh;
use crate::supervisor::{BootPlan, LaunchFailure, StopRecord};

/// What every command knows: where state lives and which instance.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub state: StateDir,
    pub name: String,
}

impl Ctx {
    /// A qbuf-qemu command line for the user to copy: with this run's
    /// `--state-dir` and `--name` unless they are the defaults.
    pub fn command(&self, rest: &str) -> String {
        let mut words = vec!["qbuf-qemu".to_string()];
        let default = std::env::var_os("QBUF_QEMU_STATE_DIR")
            .map(PathBuf::from)
            .map(Ok)
            .unwrap_or_else(crate::instance::default_state_dir);
        if default.ok().as_deref() != Some(self.state.root.as_path()) {
            words.push("--state-dir".into());
            words.push(self.state.root.display().to_string());
        }
        if self.name != "dev" {
            words.push("--name".into());
            words.push(self.name.clone());
        }
        let mut c = qemu::shell_words(&words);
        if !rest.is_empty() {
            c.push(' ');
            c.push_str(rest);
        }
        c
    }

    pub fn instance(&self) -> Instance {
        self.state.instance(&self.name)
    }

    /// The instance, or a clear error when it was never launched.
    pub fn existing(&self) -> Result<Instance> {
        let inst = self.instance();
        if !inst.exists() {
            bail!(
                "no instance named '{}' in {}: create it with '{}'",
                self.name,
                self.state.root.display(),
                self.command("launch")
            );
        }
        Ok(inst)
    }
}

const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

const KVM_HINT: &str =
    "QEMU ran with KVM because /dev/kvm is accessible (--accel auto), and KVM looks broken on this host \
(common with nested virtualization): relaunch with '--accel tcg' (slower, always works), and see 'qbuf-qemu doctor'";

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub flags: LaunchFlags,
    pub timeout: Duration,
    pub no_wait: bool,
    pub recreate: bool,
    /// Serial silence after which an automatically chosen KVM is blamed.
    pub silence: Duration,
    /// No progress on stderr (for --json and -q).
    pub quiet: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Launched {
    pub name: String,
    pub pid: i32,
    pub ssh_port: u16,
    pub ssh_user: String,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pub ready_seconds: Option<f64>,
    pub already_running: bool,
    pub accel: Accel,
    pub changes: Vec<Change>,
    /// Said to the user once (stale files cleaned, KVM fallback, …).
    pub notes: Vec<String>,
    pub ssh_command: String,
    /// How to reach and stop it with qbuf-qemu (same state dir and name).
    pub connect_command: String,
    pub stop_command: String,
}

impl Launched {
    #[allow(clippy::too_many_arguments)]
    fn new(
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
            already_running,
            accel,
            changes,
            notes,
            ssh_command: qemu::shell_words(&t.command(&[])),
            connect_command: ctx.command("ssh"),
            stop_command: ctx.command("powerdown"),
        }
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        if self.already_running {
            s.push_str(&format!("Instance '{}' is already running (QEMU pid {}).\n", self.name, self.pid));
            for c in &self.changes {
                s.push_str(&format!(
                    "{} changed from {} to {}: saved, applies at the next boot ({}, then launch)\n",
                    c.setting, c.from, c.to, self.stop_command
                ));
            }
        } else {
            for c in &self.changes {
                s.push_str(&format!("{} changed from {} to {}: applied to this boot\n", c.setting, c.from, c.to));
            }
            match self.ready_seconds {
                Some(t) => s.push_str(&format!(
                    "Instance '{}' is up: SSH answered after {t:.1}s ({}, QEMU pid {}).\n",
                    self.name,
                    self.accel.as_str(),
                    self.pid
                )),
                None => s.push_str(&format!(
                    "Instance '{}' started (QEMU pid {}); not waiting for SSH (--no-wait).\n",
                    self.name, self.pid
                )),
            }
        }
        s.push_str(&format!("  connect:     {}\n", self.connect_command));
        s.push_str(&format!("  or:          {}\n", self.ssh_command));
        s.push_str(&format!("  serial log:  {}\n", self.serial_log.display()));
        s.push_str(&format!("  QMP socket:  {}\n", self.qmp_socket.display()));
        s.push_str(&format!("  stop:        {}", self.stop_command));
        s
    }
}

/// The Guix image an instance boots: its own while guix/ is unchanged, the
/// old one (said so) when it changed, a fresh build at first launch or with
/// `--recreate`.
fn guix_image(
    ctx: &Ctx,
    inst: &Instance,
    dir: Option<&Path>,
    image_size: &str,
    pubkey: &str,
    opts: &LaunchOptions,
    notes: &mut Vec<String>,
) -> Result<PathBuf> {
    use crate::guix::{self, Choice, InstanceImage};
    let req = guix::Request {
        guix_dir: guix::resolve_dir(dir, &ctx.state)?,
        image_size: image_size.to_string(),
        pubkey: pubkey.to_string(),
    };
    let key = req.key()?;
    let recorded: Option<InstanceImage> = read_json(&inst.guix_image())?;
    let rooted = match &recorded {
        Some(r) => guix::cached(&ctx.state, &r.key)?.is_some(),
        None => false,
    };
    match guix::choose(recorded.clone(), &key, opts.recreate, rooted) {
        Choice::Current(r) => Ok(r.store_path),
        Choice::Outdated { keep, .. } => {
            notes.push(format!(
                "{} (or the SSH key or image size) changed since this instance's image was built. It keeps booting its image, \
                 which stays protected from 'guix gc'. To move to the new image run '{} launch --recreate': \
                 that discards the guest's disk, so guest-local state is lost",
                req.guix_dir.display(),
                ctx.command("")
            ));
            Ok(keep.store_path)
        }
        Choice::Build => {
            let built = guix::ensure(&ctx.state, &req, opts.quiet)?;
            if let Some(old) = recorded.filter(|r| r.key != built.key) {
                guix::release_root(&ctx.state, inst);
                tracing::info!(old = %old.store_path.display(), "instance moved to a new image");
            }
            write_json(&inst.guix_image(), &InstanceImage { key: built.key, store_path: built.store_path.clone() })?;
            Ok(built.store_path)
        }
    }
}

pub fn launch(ctx: &Ctx, opts: &LaunchOptions) -> Result<Launched> {
    ctx.state.ensure()?;
    let inst = ctx.instance();
    inst.ensure_dir()?;
    let deadline = Instant::now() + opts.timeout;
    let lock = loop {
        if let Some(l) = Lock::try_acquire(&inst)? {
            break l;
        }
        // Held: a VM runs (or another launch is starting one).
        if opts.recreate {
            bail!(
                "instance '{}' is running (or starting), and --recreate discards its disk: stop it first ('{}'), then launch --recreate",
                ctx.name,
                ctx.command("powerdown")
            );
        }
        if let Ok(r) = already_running(ctx, &inst, opts) {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!(
                "instance '{}' is locked by another qbuf-qemu command that did not finish in time: see what it is doing with '{}', then try again",
                ctx.name,
                ctx.command("status")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let fresh = read_json::<Settings>(&inst.settings())?.is_none();
    let r = boot(ctx, &inst, lock, opts);
    if r.is_err() && fresh && !Lock::is_held(&inst)? {
        // A first launch that failed leaves no half-made instance behind.
        let _ = std::fs::remove_dir_all(&inst.dir);
    }
    r
}

fn already_running(ctx: &Ctx, inst: &Instance, opts: &LaunchOptions) -> Result<Launched> {
    let mut notes = vec![];
    let (pid, accel) = match block_on(control::info(&inst.control(), CONTROL_TIMEOUT)) {
        Ok(info) => (info.qemu_pid, info.accel),
        Err(e) => {
            // QEMU may run on after its supervisor died; it still holds the lock.
            let run: RunRecord = read_json(&inst.run_record())?.filter(|r: &RunRecord| r.qemu.is_running()).ok_or(e)?;
            notes.push(format!(
                "the instance's supervisor is gone, so events are not recorded; '{}' still stops it",
                ctx.command("powerdown")
            ));
            (run.qemu.pid, run.accel)
        }
    };
    let saved: Settings = read_json(&inst.settings())?.context("settings.json is missing")?;
    let (mut new, changes) = config::merge(Some(&saved), &opts.flags, &defaults())?;
    if new.ssh_port == 0 {
        new.ssh_port = saved.ssh_port;
    }
    if !changes.is_empty() {
        write_json(&inst.settings(), &new)?;
    }
    let key = ssh_key_for(&ctx.state, &saved)?;
    let t = ssh::Target::for_instance(inst, saved.ssh_port, &saved.ssh_user, &key);
    Ok(Launched::new(ctx, inst, &t, pid, accel, true, changes, notes))
}

fn defaults() -> config::Defaults {
    let share = std::env::current_dir().ok().and_then(|d| host::git_toplevel(&d));
    config::Defaults { share }
}

fn ssh_key_for(state: &StateDir, s: &Settings) -> Result<PathBuf> {
    match &s.ssh_key {
        Some(k) => Ok(k.clone()),
        None => ssh::ensure_user_key(state),
    }
}

fn absolute(p: &Path, what: &str) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{what} {} does not exist", p.display()))
}

fn boot(ctx: &Ctx, inst: &Instance, lock: Lock, opts: &LaunchOptions) -> Result<Launched> {
    let started = Instant::now();
    let mut notes = Vec::new();
    let stale = inst.clean_stale();
    if !stale.is_empty() {
        let names: Vec<_> = stale.iter().filter_map(|p| p.file_name()?.to_str().map(String::from)).collect();
        notes.push(format!("removed stale files left by an earlier crash: {}", names.join(", ")));
    }
    let saved: Option<Settings> = read_json(&inst.settings())?;
    let (mut s, changes) = config::merge(saved.as_ref(), &opts.flags, &defaults())?;

    // Make user paths absolute now: the supervisor runs elsewhere.
    if let Some(sh) = &s.share {
        let p = absolute(sh, "share directory")?;
        if !p.is_dir() {
            bail!("share {} is not a directory: give a directory with --share, or --no-share", p.display());
        }
        s.share = Some(p);
    }
    if let Some(k) = &s.ssh_key {
        let k = absolute(k, "SSH key")?;
        ssh::check_private_key(&k)?;
        s.ssh_key = Some(k);
    }
    s.source = match s.source {
        Source::Image { path } => Source::Image { path: absolute(&path, "image")? },
        Source::Kernel { kernel, initrd, append, image } => Source::Kernel {
            kernel: absolute(&kernel, "kernel")?,
            initrd: absolute(&initrd, "initrd")?,
            append,
            image: image.map(|i| absolute(&i, "image")).transpose()?,
        },
        g @ Source::Guix { .. } => g,
    };
    if s.ssh_port == 0 {
        s.ssh_port = host::pick_free_port()?;
        notes.push(format!("picked free port {} for SSH; it is kept for this instance", s.ssh_port));
    } else if !host::port_free(s.ssh_port) && opts.flags.ssh_port == Some(config::PortChoice::Auto) {
        let busy = s.ssh_port;
        s.ssh_port = host::pick_free_port()?;
        notes.push(format!("the saved SSH port {busy} is in use now; picked free port {} and kept it", s.ssh_port));
    } else if !host::port_free(s.ssh_port) {
        bail!(
            "port {} on 127.0.0.1 is already in use (another VM or program): choose another with --ssh-port N, or let qbuf-qemu pick one with --ssh-port auto",
            s.ssh_port
        );
    }

    let bins = host::qemu_binaries()?;
    let key = ssh_key_for(&ctx.state, &s)?;
    let pubkey = ssh::public_key_line(&key)?;
    std::fs::write(inst.authorized_key(), format!("{pubkey}\n"))?;

    if opts.recreate {
        let gone = crate::overlay::discard(inst);
        if !gone.is_empty() {
            notes.push("discarded the guest's disk (--recreate): guest-local state is gone".into());
        }
    }
    let (disk, kernel) = match &s.source {
        Source::Image { path } => (Some(crate::overlay::prepare(inst, &bins.img, path)?), None),
        Source::Kernel { kernel, initrd, append, image } => (
            image.as_ref().map(|i| crate::overlay::prepare(inst, &bins.img, i)).transpose()?,
            Some(KernelBoot { kernel: kernel.clone(), initrd: initrd.clone(), append: append.clone() }),
        ),
        Source::Guix { guix_dir, image_size } => {
            let base = guix_image(ctx, inst, guix_dir.as_deref(), image_size, &pubkey, opts, &mut notes)?;
            (Some(crate::overlay::prepare(inst, &bins.img, &base)?), None)
        }
    };

    if disk.is_none() {
        // A diskless guest has no place to keep a host key: it makes a new
        // one every boot, so the pin can only hold for one boot.
        let _ = std::fs::remove_file(inst.known_hosts());
    }
    let (accel, auto_kvm) = match s.accel {
        AccelChoice::Tcg => (Accel::Tcg, false),
        AccelChoice::Kvm => match host::kvm_runs(&bins) {
            Ok(()) => (Accel::Kvm, false),
            Err(e) => bail!("--accel kvm, but KVM cannot run guests here ({e}): use --accel tcg (slower) or fix KVM"),
        },
        AccelChoice::Auto => match host::kvm_runs(&bins) {
            Ok(()) => (Accel::Kvm, true),
            Err(e) => {
                let warning = format!("KVM is not usable ({e}); using TCG software emulation, which is much slower");
                if !opts.quiet {
                    eprintln!("qbuf-qemu: warning: {warning}");
                }
                notes.push(warning);
                (Accel::Tcg, false)
            }
        },
    };

    let devices = crate::devices::Recorded::load(inst)?;
    if let Some(d) = devices.disks.iter().find(|d| !d.path.is_file()) {
        bail!(
            "disk '{}' recorded for this instance is missing ({}): restore it, or stop attaching it with 'qbuf-qemu --name {} disk remove {}'",
            d.id,
            d.path.display(),
            ctx.name,
            d.id
        );
    }
    let mut shares: Vec<Share> = s
        .share
        .iter()
        .map(|p| Share { path: p.clone(), tag: "qbuf".into(), readonly: s.share_mode == config::ShareMode::Ro })
        .collect();
    shares.extend(devices.shares.iter().cloned());
    let spec = VmSpec {
        name: ctx.name.clone(),
        accel,
        memory_mib: s.memory_mib,
        cpus: s.cpus,
        ssh_port: s.ssh_port,
        disk,
        kernel,
        shares,
        extra_disks: devices.disks.clone(),
        forwards: devices.forwards.clone(),
        authorized_key: inst.authorized_key(),
        endpoints: Endpoints {
            qmp_supervisor: inst.qmp_supervisor(),
            qmp_user: inst.qmp_user(),
            console: inst.console(),
            serial_log: inst.serial_log(),
            guest_agent: inst.guest_agent(),
        },
        hotplug_ports: crate::devices::HOTPLUG_PORTS,
    };
    let mut argv = Vec::new();
    if let Some(fw) = &bins.firmware {
        argv.push("-L".to_string());
        argv.push(fw.to_str().context("QBUF_QEMU_FIRMWARE is not UTF-8")?.to_string());
    }
    argv.extend(qemu::build_args(&spec)?);
    write_json(&inst.settings(), &s)?;
    write_json(&inst.boot_plan(), &BootPlan { qemu: bins.system.clone(), argv, spec: spec.clone() })?;
    let serial_before = std::fs::metadata(inst.serial_log()).map(|m| m.len()).unwrap_or(0);

    // Said with every failure of a KVM boot that qbuf-qemu chose by itself.
    let hint = |e: anyhow::Error| if auto_kvm { anyhow!("{e}\n{KVM_HINT}") } else { e };
    let mut sup = spawn_supervisor(ctx, inst, &lock)?;
    drop(lock); // the supervisor and QEMU hold it now

    // Wait for QEMU to be up (run.json) or to fail.
    let up_deadline = Instant::now() + Duration::from_secs(90);
    let run: RunRecord = loop {
        if let Some(f) = read_json::<LaunchFailure>(&inst.launch_failure())? {
            let _ = sup.wait();
            return Err(hint(launch_error(&f)));
        }
        if let Some(st) = sup.try_wait()? {
            if let Some(f) = read_json::<LaunchFailure>(&inst.launch_failure())? {
                return Err(hint(launch_error(&f)));
            }
            bail!(
                "the instance supervisor exited ({st}) before QEMU came up; its log:\n{}",
                crate::logs::tail(&inst.supervisor_log(), 0, 3000, "(empty)")
            );
        }
        if let Some(r) = read_json::<RunRecord>(&inst.run_record())? {
            break r;
        }
        if Instant::now() > up_deadline {
            bail!("QEMU did not come up within 90s; see {}", inst.supervisor_log().display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Reap the supervisor later without blocking: it is detached (setsid).
    std::thread::spawn(move || sup.wait());

    let t = ssh::Target::for_instance(inst, s.ssh_port, &s.ssh_user, &key);
    let mut result = Launched::new(ctx, inst, &t, run.qemu.pid, accel, false, changes, notes);
    if opts.no_wait {
        return Ok(result);
    }
    if !opts.quiet {
        eprintln!(
            "qbuf-qemu: QEMU {} runs ({}); waiting up to {}s for SSH on 127.0.0.1:{} (serial log: {})",
            run.qemu.pid,
            accel.as_str(),
            opts.timeout.as_secs(),
            s.ssh_port,
            inst.serial_log().display()
        );
    }
    match wait_ready(inst, &t, &run, started + opts.timeout, auto_kvm, opts.silence, serial_before) {
        Ok(()) => {
            result.ready_seconds = Some(started.elapsed().as_secs_f64());
            Ok(result)
        }
        Err(Readiness::Exited(rec)) => Err(hint(anyhow!(
            "QEMU stopped while the guest was booting: {}\nQEMU's output:\n{}\nserial console (last lines):\n{}",
            rec.reason,
            crate::logs::tail(&inst.qemu_stderr(), 0, 2000, "(nothing)"),
            crate::logs::tail(&inst.serial_log(), serial_before, 1500, "(nothing yet in this boot)")
        ))),
        Err(Readiness::HostKey) => {
            let _ = stop_running(inst, &StopOptions { timeout: Duration::from_secs(20), force: false });
            Err(anyhow!("{}\nThe VM was powered down.", ssh::host_key_mismatch_message(&t, &ctx.name)))
        }
        Err(Readiness::Failed(msg)) => {
            // Leave no process behind.
            let outcome = stop_running(inst, &StopOptions { timeout: Duration::ZERO, force: true });
            let how = outcome.ok().flatten().and_then(|o| o.method).map(|m| m.as_str()).unwrap_or("nothing");
            Err(anyhow!(
                "{msg}\nThe VM was stopped ({how}). serial console (last lines):\n{}",
                crate::logs::tail(&inst.serial_log(), serial_before, 1500, "(nothing yet in this boot)")
            ))
        }
    }
}

fn launch_error(f: &LaunchFailure) -> anyhow::Error {
    let mut m = f.message.clone();
    if let Some(e) = f.exit {
        m.push_str(&format!("\nQEMU: {e}"));
    }
    if !f.stderr_tail.is_empty() {
        m.push_str(&format!("\nQEMU said:\n{}", f.stderr_tail));
    }
    m.push_str(&format!("\ncommand line:\n{}", f.command_line));
    anyhow!(m)
}

fn spawn_supervisor(ctx: &Ctx, inst: &Instance, lock: &Lock) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let fd = lock.inheritable()?;
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(inst.supervisor_log())?
    };
    let exe = std::env::current_exe().context("cannot find the qbuf-qemu binary to start the supervisor")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--state-dir")
        .arg(&ctx.state.root)
        .arg("--name")
        .arg(&ctx.name)
        .arg("__supervise")
        .env("QBUF_QEMU_LOCK_FD", fd.to_string())
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe. Own session: the user's terminal
    // closing must not signal the VM.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    cmd.spawn().context("cannot start the instance supervisor")
}

enum Readiness {
    Exited(Box<StopRecord>),
    HostKey,
    Failed(String),
}

fn wait_ready(
    inst: &Instance,
    t: &ssh::Target,
    run: &RunRecord,
    deadline: Instant,
    auto_kvm: bool,
    silence: Duration,
    serial_before: u64,
) -> Result<(), Readiness> {
    let start = Instant::now();
    let mut last = String::from("no SSH banner yet");
    loop {
        if !run.qemu.is_running() {
            // The supervisor writes stopped.json right after reaping QEMU.
            let until = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(rec)) = read_json::<StopRecord>(&inst.stop_record()) {
                    return Err(Readiness::Exited(Box::new(rec)));
                }
                if Instant::now() > until {
                    return Err(Readiness::Failed("QEMU exited during boot and left no stop record".into()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let serial_now = std::fs::metadata(inst.serial_log()).map(|m| m.len()).unwrap_or(0);
        if auto_kvm && serial_now == serial_before && start.elapsed() > silence {
            return Err(Readiness::Failed(format!(
                "the guest printed nothing on its serial console for {}s under KVM, which qbuf-qemu chose because /dev/kvm is accessible. \
                 KVM that opens but does not run guests is common in broken nested-virtualization setups: relaunch with '--accel tcg'",
                silence.as_secs()
            )));
        }
        if Instant::now() > deadline {
            return Err(Readiness::Failed(format!(
                "the guest did not accept an SSH login on port {} within {}s (last: {last}); raise --timeout, or look at the serial log {}",
                t.port,
                deadline.saturating_duration_since(start).as_secs().max(start.elapsed().as_secs()),
                inst.serial_log().display()
            )));
        }
        if ssh::banner(t.port, Duration::from_secs(2)).is_some() {
            match ssh::try_login(t, Duration::from_secs(10)) {
                Ok(ssh::Login::Ok) => return Ok(()),
                Ok(ssh::Login::HostKeyChanged) => return Err(Readiness::HostKey),
                Ok(ssh::Login::Failed(e)) => last = format!("banner seen, login failed: {e}"),
                Err(e) => return Err(Readiness::Failed(e.to_string())),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs a future on a small runtime; commands are synchronous otherwise.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime").block_on(f)
}

// ---------------------------------------------------------------- status

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    /// running, paused, stopping, unresponsive, stopped, crashed.
    pub state: String,
    pub qemu_status: Option<String>,
    pub pid: Option<i32>,
    pub ssh_port: Option<u16>,
    pub ssh_user: Option<String>,
    pub uptime_seconds: Option<f64>,
    pub accel: Option<Accel>,
    pub qemu_version: Option<String>,
    pub memory_mib: Option<u64>,
    pub cpus: Option<u32>,
    pub disks: Vec<Value>,
    /// Reserved PCIe root ports, and how many carry a device now.
    pub hotplug_ports: Option<u32>,
    pub hotplug_ports_used: Option<u32>,
    pub hotplug_ports_free: Option<u32>,
    pub guest_agent: Option<crate::agent::AgentState>,
    pub stopping_step: Option<String>,
    /// For a stopped instance: why it stopped.
    pub stop_reason: Option<String>,
    pub last_shutdown: Option<Value>,
    pub exit: Option<powerdown::ExitInfo>,
    pub notes: Vec<String>,
}

pub fn status(ctx: &Ctx) -> Result<Status> {
    let inst = ctx.existing()?;
    let settings: Option<Settings> = read_json(&inst.settings())?;
    let mut st = Status {
        name: ctx.name.clone(),
        state: "stopped".into(),
        qemu_status: None,
        pid: None,
        ssh_port: settings.as_ref().map(|s| s.ssh_port),
        ssh_user: settings.as_ref().map(|s| s.ssh_user.clone()),
        uptime_seconds: None,
        accel: None,
        qemu_version: None,
        memory_mib: settings.as_ref().map(|s| s.memory_mib),
        cpus: settings.as_ref().map(|s| s.cpus),
        disks: vec![],
        hotplug_ports: None,
        hotplug_ports_used: None,
        hotplug_ports_free: None,
        guest_agent: None,
        stopping_step: None,
        stop_reason: None,
        last_shutdown: None,
        exit: None,
        notes: vec![],
    };
    if Lock::is_held(&inst)? && !inst.control().exists() && inst.stop_record().exists() {
        // QEMU is gone and its supervisor is finishing (it answers waiting
        // commands, then exits): report the stop, not a half-state.
        let until = Instant::now() + Duration::from_secs(3);
        while Lock::is_held(&inst)? && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if !Lock::is_held(&inst)? {
        let stale = inst.clean_stale();
        if !stale.is_empty() {
            st.notes.push("removed stale runtime files left by a crash".into());
        }
        if let Some(rec) = read_json::<StopRecord>(&inst.stop_record())? {
            st.state = if rec.crashed { "crashed".into() } else { "stopped".into() };
            st.stop_reason = Some(rec.reason);
            st.last_shutdown = rec.shutdown.map(|e| serde_json::to_value(e).unwrap_or(Value::Null));
            st.exit = rec.exit;
        } else {
            st.stop_reason = Some("never started, or stopped before qbuf-qemu recorded why".into());
        }
        return Ok(st);
    }
    let sock = inst.control();
    match block_on(control::info(&sock, Duration::from_secs(3))) {
        Ok(info) => {
            st.pid = Some(info.qemu_pid);
            st.accel = Some(info.accel);
            st.qemu_version = Some(info.qemu_version);
            st.uptime_seconds = Some((crate::supervisor::now() - info.started_at).max(0.0));
            st.hotplug_ports = Some(info.hotplug_ports);
            st.stopping_step = info.stopping.clone();
            st.last_shutdown = info.last_shutdown.map(|e| serde_json::to_value(e).unwrap_or(Value::Null));
            let q = |cmd: &str| block_on(control::qmp(&sock, cmd, json!({}), Duration::from_secs(3)));
            match q("query-status") {
                Ok(Ok(v)) => {
                    let s = v.get("status").and_then(Value::as_str).unwrap_or("unknown").to_string();
                    st.state = match (info.stopping.is_some(), s.as_str()) {
                        (true, _) => "stopping".into(),
                        (_, "running") => "running".into(),
                        (_, "guest-panicked") => "crashed".into(),
                        (_, "shutdown") => "stopping".into(),
                        _ => "paused".into(),
                    };
                    st.qemu_status = Some(s);
                }
                _ => st.state = "unresponsive".into(),
            }
            if let Ok(Ok(v)) = q("query-memory-size-summary") {
                st.memory_mib = v.get("base-memory").and_then(Value::as_u64).map(|b| b / (1024 * 1024));
            }
            if let Ok(Ok(Value::Array(cpus))) = q("query-cpus-fast") {
                st.cpus = Some(cpus.len() as u32);
            }
            if let Ok(Ok(Value::Array(blocks))) = q("query-block") {
                st.disks = blocks.into_iter().map(|b| crate::devices::summarize_block(&b)).collect();
            }
            let vm = crate::vm::Vm { inst: inst.clone(), name: ctx.name.clone() };
            if let Ok(used) = crate::devices::used_ports(&vm, info.hotplug_ports) {
                let n = used.iter().filter(|u| **u).count() as u32;
                st.hotplug_ports_used = Some(n);
                st.hotplug_ports_free = Some(info.hotplug_ports.saturating_sub(n));
            }
            // The guest opens the agent's port only when an agent runs, so an
            // agent-less guest costs no wait here.
            st.guest_agent = Some(if !info.agent_port_open {
                crate::agent::AgentState::NotRunning
            } else if block_on(crate::agent::ping(&inst.guest_agent(), crate::agent::PING_TIMEOUT)).is_ok() {
                crate::agent::AgentState::Answers
            } else {
                crate::agent::AgentState::NoAnswer
            });
            if info.panicked.is_some() {
                st.notes.push(format!(
                    "the guest kernel panicked; QEMU keeps the VM paused for inspection ('qbuf-qemu --name {n} console', \
                     'qbuf-qemu --name {n} qmp …'); 'qbuf-qemu --name {n} powerdown' stops it",
                    n = ctx.name
                ));
            }
        }
        Err(e) => {
            // The supervisor is gone but the lock is held: QEMU runs orphaned.
            let run: Option<RunRecord> = read_json(&inst.run_record())?;
            match run.filter(|r| r.qemu.is_running()) {
                Some(r) => {
                    st.state = "unresponsive".into();
                    st.pid = Some(r.qemu.pid);
                    st.accel = Some(r.accel);
                    st.notes.push(format!(
                        "QEMU runs but its supervisor does not answer ({e}); 'qbuf-qemu --name {} powerdown' still stops it",
                        ctx.name
                    ));
                }
                None => {
                    st.state = "starting".into();
                    st.notes.push("another qbuf-qemu command holds the instance (starting or stopping)".into());
                }
            }
        }
    }
    Ok(st)
}

impl Status {
    pub fn human(&self) -> String {
        let mut s = format!("instance:   {}\nstate:      {}", self.name, self.state);
        if let Some(q) = &self.qemu_status {
            s.push_str(&format!(" (QEMU: {q})"));
        }
        s.push('\n');
        if let Some(step) = &self.stopping_step {
            s.push_str(&format!("stopping:   at step '{step}'\n"));
        }
        if let Some(p) = self.pid {
            s.push_str(&format!("pid:        {p}\n"));
        }
        if let Some(u) = self.uptime_seconds {
            s.push_str(&format!("uptime:     {}\n", human_duration(u)));
        }
        if let Some(a) = self.accel {
            s.push_str(&format!("accel:      {}\n", a.as_str()));
        }
        if let Some(v) = &self.qemu_version {
            s.push_str(&format!("QEMU:       {v}\n"));
        }
        if let (Some(m), Some(c)) = (self.memory_mib, self.cpus) {
            s.push_str(&format!("resources:  {m} MiB, {c} CPUs\n"));
        }
        if let Some(p) = self.ssh_port {
            s.push_str(&format!("ssh:        {}@127.0.0.1 port {p}\n", self.ssh_user.clone().unwrap_or_default()));
        }
        for d in &self.disks {
            s.push_str(&format!("disk:       {}\n", d.get("summary").and_then(Value::as_str).unwrap_or("?")));
        }
        match (self.hotplug_ports, self.hotplug_ports_used, self.hotplug_ports_free) {
            (Some(h), Some(u), Some(f)) => {
                s.push_str(&format!("hot-plug:   {h} PCIe root ports: {u} used, {f} free\n"))
            }
            (Some(h), _, _) => s.push_str(&format!("hot-plug:   {h} PCIe root ports reserved\n")),
            _ => {}
        }
        if let Some(a) = self.guest_agent {
            s.push_str(&format!("agent:      {}\n", a.human()));
        }
        if let Some(r) = &self.stop_reason {
            s.push_str(&format!("stopped:    {r}\n"));
        }
        if let Some(e) = &self.exit {
            s.push_str(&format!("QEMU exit:  {e}\n"));
        }
        for n in &self.notes {
            s.push_str(&format!("note:       {n}\n"));
        }
        s.trim_end().to_string()
    }
}

fn human_duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

// ---------------------------------------------------------------- powerdown

#[derive(Debug, Clone, Serialize)]
pub struct Stopped {
    pub name: String,
    pub method: Option<&'static str>,
    pub shutdown_reason: Option<String>,
    pub guest: bool,
    pub seconds: f64,
    pub exit: Option<powerdown::ExitInfo>,
    pub steps: Vec<String>,
    #[serde(skip)]
    pub code: i32,
}

impl Stopped {
    fn from_outcome(name: &str, o: &StopOutcome) -> Stopped {
        Stopped {
            name: name.into(),
            method: o.method.map(|m| m.as_str()),
            shutdown_reason: o.shutdown_reason.clone(),
            guest: o.guest,
            seconds: o.seconds,
            exit: o.exit,
            steps: o.steps.clone(),
            code: o.exit_code(),
        }
    }

    pub fn human(&self) -> String {
        let reason = self.shutdown_reason.clone().unwrap_or_else(|| "no SHUTDOWN event".into());
        match self.method {
            Some("already-stopped") => format!("Instance '{}' is already stopped.", self.name),
            Some("powerdown") | Some("guest-agent") => format!(
                "Instance '{}' powered off by itself after {} ({reason}) in {:.1}s.",
                self.name,
                if self.method == Some("powerdown") { "the ACPI power button" } else { "the guest agent's shutdown" },
                self.seconds
            ),
            Some(m) if !self.steps.iter().any(|s| s.starts_with("powerdown:")) => format!(
                "Instance '{}' stopped by '{m}' ({reason}) after {:.1}s; --force skipped the guest's own shutdown.\nsteps:\n  {}",
                self.name,
                self.seconds,
                self.steps.join("\n  ")
            ),
            Some(m) => format!(
                "Instance '{}' did not power off by itself; stopped by '{m}' ({reason}) after {:.1}s.\nsteps:\n  {}",
                self.name,
                self.seconds,
                self.steps.join("\n  ")
            ),
            None => format!(
                "Instance '{}' could NOT be stopped; QEMU is still running.\nsteps:\n  {}\nKill it yourself (kill -9 PID, see 'qbuf-qemu status').",
                self.name,
                self.steps.join("\n  ")
            ),
        }
    }
}

/// Stops a running instance; `None` when nothing was running.
fn stop_running(inst: &Instance, opts: &StopOptions) -> Result<Option<StopOutcome>> {
    if !Lock::is_held(inst)? {
        return Ok(None);
    }
    let budget = opts.timeout + powerdown::QUIT_DEADLINE + powerdown::SIGNAL_DEADLINE * 2 + Duration::from_secs(15);
    let req = control::Request::Powerdown { timeout_secs: opts.timeout.as_secs_f64(), force: opts.force };
    let outcome = match block_on(control::call(&inst.control(), &req, budget)) {
        Ok(control::Response::Stopped(o)) => o,
        Ok(other) => bail!("unexpected answer from the supervisor: {other:?}"),
        Err(e) => {
            tracing::warn!("supervisor unreachable ({e}); stopping QEMU directly");
            stop_orphan(inst, opts)?
        }
    };
    // The supervisor exits right after answering; wait so the lock is free
    // for the next command.
    let until = Instant::now() + Duration::from_secs(10);
    while Lock::is_held(inst)? && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(outcome))
}

/// QEMU whose supervisor died: run the ladder over the user QMP socket and
/// judge the process by its identity.
fn stop_orphan(inst: &Instance, opts: &StopOptions) -> Result<StopOutcome> {
    let run: RunRecord = read_json(&inst.run_record())?.ok_or_else(|| {
        anyhow!("the instance is locked but has no run record: another qbuf-qemu command is using it; try again")
    })?;
    let proc = ForeignProcess(run.qemu.clone());
    let outcome = block_on(async {
        let qmp = crate::qmp::Qmp::connect(&inst.qmp_user(), Duration::from_secs(3)).await.ok();
        let agent = inst.guest_agent();
        powerdown::stop(qmp.as_ref(), &proc, opts, None, Some(&agent), &|_| {}).await
    });
    if outcome.method.is_some() {
        // The SHUTDOWN event the ladder saw on the user QMP socket.
        let shutdown = outcome.shutdown_reason.as_ref().map(|r| crate::qmp::Event {
            event: "SHUTDOWN".into(),
            data: json!({ "guest": outcome.guest, "reason": r }),
            timestamp: crate::supervisor::now(),
        });
        let (crashed, reason) = crate::supervisor::describe_stop(shutdown.as_ref(), None, None, Some(&outcome));
        let rec = StopRecord {
            stopped_at: crate::supervisor::now(),
            exit: None,
            shutdown,
            outcome: Some(outcome.clone()),
            panicked: None,
            crashed,
            reason,
        };
        write_json(&inst.stop_record(), &rec)?;
        inst.clean_stale();
    }
    Ok(outcome)
}

pub fn powerdown(ctx: &Ctx, opts: &StopOptions) -> Result<Stopped> {
    let inst = ctx.existing()?;
    match stop_running(&inst, opts)? {
        Some(o) => Ok(Stopped::from_outcome(&ctx.name, &o)),
        None => {
            inst.clean_stale();
            Ok(Stopped {
                name: ctx.name.clone(),
                method: Some("already-stopped"),
                shutdown_reason: None,
                guest: false,
                seconds: 0.0,
                exit: None,
                steps: vec![],
                code: 0,
            })
        }
    }
}

// ---------------------------------------------------------------- destroy

#[derive(Debug, Clone, Serialize)]
pub struct Destroyed {
    pub name: String,
    pub stop: Option<Stopped>,
    pub removed: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
}

impl Destroyed {
    pub fn human(&self) -> String {
        let mut s = String::new();
        if let Some(st) = &self.stop {
            s.push_str(&st.human());
            s.push('\n');
        }
        s.push_str(&format!("Instance '{}' destroyed ({} files removed).", self.name, self.removed.len()));
        for k in &self.kept {
            s.push_str(&format!("\nkept (not created by qbuf-qemu): {}", k.display()));
        }
        s
    }
}

pub fn destroy(ctx: &Ctx, opts: &StopOptions) -> Result<Destroyed> {
    let inst = ctx.existing()?;
    let stop = stop_running(&inst, opts)?.map(|o| Stopped::from_outcome(&ctx.name, &o));
    if let Some(st) = &stop {
        if st.method.is_none() {
            bail!("{}\nNothing was removed.", st.human());
        }
    }
    // Take the lock so no launch races the removal.
    let lock = Lock::try_acquire(&inst)?
        .ok_or_else(|| anyhow!("instance '{}' is busy (a launch started meanwhile); nothing was removed", ctx.name))?;
    let mut removed = Vec::new();
    crate::guix::release_root(&ctx.state, &inst);
    let disks = inst.disks_dir();
    if disks.is_dir() {
        for d in crate::devices::Recorded::load(&inst)?.created_files(&inst) {
            if std::fs::remove_file(&d).is_ok() {
                removed.push(d);
            }
        }
        let _ = std::fs::remove_dir(&disks);
    }
    for name in crate::instance::INSTANCE_FILES {
        let p = inst.dir.join(name);
        if name == &"lock" || name == &"disks" {
            continue;
        }
        if std::fs::symlink_metadata(&p).is_ok() && std::fs::remove_file(&p).is_ok() {
            removed.push(p);
        }
    }
    for tmp in ["settings.tmp", "base.tmp", "boot.tmp", "run.tmp", "stopped.tmp", "devices.tmp"] {
        let _ = std::fs::remove_file(inst.dir.join(tmp));
    }
    std::fs::remove_file(inst.lock()).ok();
    drop(lock);
    let kept: Vec<PathBuf> =
        std::fs::read_dir(&inst.dir).map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect()).unwrap_or_default();
    if kept.is_empty() {
        std::fs::remove_dir(&inst.dir).with_context(|| format!("cannot remove {}", inst.dir.display()))?;
    }
    Ok(Destroyed { name: ctx.name.clone(), stop, removed, kept })
}
