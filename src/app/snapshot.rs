//! `snapshot save|load|list|delete`, `launch --resume` and the start of
//! `run --from-snapshot`: a VM saved and resumed without booting.
//!
//! Layout (see docs/architecture.md, "Snapshots"): QEMU's internal qcow2
//! snapshots live inside the image that holds them, so a fresh overlay on
//! top could not load them and a run would write into the saved state.
//! Instead the paused VM's state goes to a file through QMP `migrate`
//! (`exec:` works on QEMU 7.2 and 10.0 alike), and the boot disk at that
//! instant is copied beside it. A resume starts QEMU with `-incoming defer`
//! on a disk that is either a copy of that one (`launch --resume`) or a
//! fresh overlay on it (`run`), so the snapshot is never written.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::vm::Vm;
use super::{guest, Ctx};
use crate::config::Settings;
use crate::instance::paths::Snapshot;
use crate::instance::records::{BootPlan, DevicesRecord, RunRecord, SnapshotRecord};
use crate::instance::{read_json, write_json, Instance};
use crate::qemu::args::{validate_id, Accel, Share, VmSpec, DEFAULT_SHARE_TAG};
use crate::qemu::host::QemuBinaries;
use crate::report::snapshot::{SnapshotDone, SnapshotEntry, SnapshotList};
use crate::ssh;

/// How long saving or loading the state may take.
const MIGRATION_DEADLINE: Duration = Duration::from_secs(300);
/// No bandwidth cap: the VM is paused, the file is local.
const UNLIMITED: u64 = 1 << 40;

/// A saved VM to start from, checked against this host.
#[derive(Debug, Clone)]
pub struct Resume {
    pub snapshot: Snapshot,
    pub record: SnapshotRecord,
    /// The boot disk is a fresh overlay on the snapshot's disk (a throwaway
    /// run), not a copy of it (the instance's own resume).
    pub layered: bool,
}

/// Snapshot `name` of `inst`, ready to resume: it exists, its base image is
/// unchanged, and this host's QEMU is the one that saved it.
pub fn resume_from(ctx: &Ctx, inst: &Instance, name: &str, layered: bool) -> Result<Resume> {
    validate_id("snapshot name", name)?;
    let snapshot = inst.snapshot(name);
    let record: SnapshotRecord = read_json(&snapshot.record())?.ok_or_else(|| {
        anyhow!("instance '{}' has no snapshot '{name}' ('{}' lists them)", inst.name, ctx.command("snapshot list"))
    })?;
    if let Some(base) = &record.base {
        let now = crate::qemu::image::identity(&base.path)
            .with_context(|| format!("snapshot '{name}' was saved on {}", base.path.display()))?;
        crate::qemu::image::compare(base, &now)
            .with_context(|| format!("snapshot '{name}' cannot be used: its base image changed; save it again"))?;
    }
    let bins = crate::qemu::host::qemu_binaries()?;
    let version = crate::qemu::host::qemu_version(&bins).unwrap_or_default();
    if !version.contains(&format!("version {}", record.qemu_version)) {
        bail!(
            "snapshot '{name}' was saved by QEMU {}, and this is {version:?}: a saved state loads only into the QEMU that wrote it",
            record.qemu_version
        );
    }
    Ok(Resume { snapshot, record, layered })
}

/// The VM a resume starts: the saved VM's devices and resources, this
/// instance's paths and port, a boot disk that holds the saved disk, and
/// QEMU waiting for the saved state.
pub fn resume_spec(
    ctx: &Ctx,
    inst: &Instance,
    s: &Settings,
    bins: &QemuBinaries,
    devices: &DevicesRecord,
    r: &Resume,
) -> Result<VmSpec> {
    if let Some(d) = devices.disks.first() {
        bail!(
            "disk '{}' is recorded for this instance, and a snapshot has the boot disk only: remove it first ('{}')",
            d.id,
            ctx.command(&format!("disk remove {}", d.id))
        );
    }
    let saved = &r.record.spec;
    let disk = match (&saved.disk, r.layered) {
        (None, _) => None,
        (Some(_), true) => Some(crate::qemu::image::prepare(inst, &bins.img, &r.snapshot.disk())?),
        (Some(_), false) => Some(copy_disk(inst, r)?),
    };
    if saved.accel == Accel::Kvm {
        crate::qemu::host::kvm_runs(bins).map_err(|e| {
            anyhow!("snapshot '{}' was saved under KVM, which cannot run guests here ({e})", r.record.name)
        })?;
    }
    let mut spec =
        super::boot::vm_spec(inst, s, saved.accel, disk, saved.kernel.clone(), devices, bins.firmware.clone());
    // The same devices as the saved VM, or its state does not load; the
    // default share may point at another directory (this checkout).
    spec.shares = saved
        .shares
        .iter()
        .map(|sh| match (&s.share, sh.tag == DEFAULT_SHARE_TAG) {
            (Some(p), true) => Share { path: p.clone(), ..sh.clone() },
            _ => sh.clone(),
        })
        .collect();
    spec.hotplug_ports = saved.hotplug_ports;
    spec.incoming = true;
    Ok(spec)
}

/// The instance's own resume: its disk becomes a copy of the saved one (the
/// snapshot stays as it was for the next resume).
fn copy_disk(inst: &Instance, r: &Resume) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(inst.overlay());
    std::fs::copy(r.snapshot.disk(), inst.overlay()).context("cannot copy the snapshot's disk")?;
    std::fs::set_permissions(inst.overlay(), std::fs::Permissions::from_mode(0o600))?;
    match &r.record.base {
        Some(b) => write_json(&inst.base_identity(), b)?,
        None => {
            let _ = std::fs::remove_file(inst.base_identity());
        }
    }
    Ok(inst.overlay())
}

/// The QMP `exec:` URI that reads or writes `path` (quoted for the shell
/// QEMU runs it with).
fn exec_uri(write: bool, path: &Path) -> String {
    let p = shell_words::quote(&path.display().to_string()).into_owned();
    if write {
        format!("exec:cat > {p}")
    } else {
        format!("exec:cat {p}")
    }
}

/// Waits for QEMU's migration to end; its error when it failed.
fn wait_migration(vm: &Vm) -> Result<()> {
    let start = Instant::now();
    loop {
        let v = vm.execute("query-migrate", json!({}))?;
        match v.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = v.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                bail!("QEMU's migration failed: {why}");
            }
            _ if start.elapsed() > MIGRATION_DEADLINE => {
                bail!("QEMU's migration did not end within {MIGRATION_DEADLINE:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Loads the saved state into a QEMU started with `-incoming defer`, then
/// lets the guest run.
pub fn load_state(ctx: &Ctx, inst: &Instance, r: &Resume) -> Result<()> {
    let vm = Vm { inst: inst.clone(), name: ctx.name.clone() };
    vm.execute("migrate-incoming", json!({ "uri": exec_uri(false, &r.snapshot.state()) }))?;
    wait_migration(&vm).with_context(|| format!("loading snapshot '{}'", r.record.name))?;
    vm.execute("cont", json!({}))?;
    Ok(())
}

/// After a resume: the clock set, the shares mounted again. What could not
/// be done is a note, not a failure: the VM runs.
pub fn after_resume(t: &ssh::Target, r: &Resume, notes: &mut Vec<String>) {
    if let Err(e) = guest::set_clock(t) {
        notes.push(format!("could not set the resumed guest's clock ({e}); it stands where it was saved"));
    }
    if let Err(e) = guest::mount_shares(t, &r.record.mounts) {
        notes.push(format!("{e}; mount it in the guest yourself"));
    }
}

/// `snapshot save NAME`.
pub fn save(ctx: &Ctx, name: &str) -> Result<SnapshotDone> {
    validate_id("snapshot name", name)?;
    let vm = Vm::running(ctx)?;
    let inst = vm.inst.clone();
    let snap = inst.snapshot(name);
    if snap.dir.exists() {
        bail!(
            "instance '{}' already has a snapshot '{name}': delete it first ('{}')",
            ctx.name,
            ctx.command(&format!("snapshot delete {name}"))
        );
    }
    let plan: BootPlan = read_json(&inst.boot_plan())?.context("boot.json is missing")?;
    let live = crate::qemu::parse::parse_query_block(&vm.execute("query-block", json!({}))?);
    if let Some(d) = live.iter().find(|d| !d.is_boot()) {
        bail!(
            "disk '{}' is attached: snapshots cover the boot disk only; remove it first ('{}')",
            d.id,
            ctx.command(&format!("disk remove {}", d.id))
        );
    }
    let t = target(ctx, &inst)?;
    let mounts = guest::mounted_shares(&t)?;
    guest::unmount_shares(&t, &mounts)?;
    ctx.progress(&format!("saving instance '{}' as snapshot '{name}' (the VM pauses meanwhile)", ctx.name));
    let start = Instant::now();
    crate::instance::private_dir(&snap.dir)?;
    let saved = freeze(&vm, &inst, &snap, &plan);
    let resumed = vm.execute("cont", json!({}));
    let remounted = guest::mount_shares(&t, &mounts);
    if let Err(e) = saved {
        let _ = std::fs::remove_dir_all(&snap.dir);
        return Err(e.context(format!("saving snapshot '{name}' (nothing was kept; the VM runs on)")));
    }
    resumed?;
    let record = SnapshotRecord {
        name: name.into(),
        created_at: crate::clock::now(),
        qemu_version: read_json::<RunRecord>(&inst.run_record())?.map(|r| r.qemu_version).unwrap_or_default(),
        spec: plan.spec,
        base: read_json(&inst.base_identity())?,
        state_bytes: std::fs::metadata(snap.state()).map(|m| m.len()).unwrap_or(0),
        seconds: start.elapsed().as_secs_f64(),
        mounts,
    };
    write_json(&snap.record(), &record)?;
    let mut notes = vec![];
    if let Err(e) = remounted {
        notes.push(format!("{e}; mount it in the guest yourself"));
    }
    Ok(done(ctx, "saved", record, notes))
}

/// Pauses the VM, writes its state and copies its boot disk. QEMU flushes
/// and lets go of the disk when the migration completes, so the copy is the
/// disk at that instant.
fn freeze(vm: &Vm, inst: &Instance, snap: &Snapshot, plan: &BootPlan) -> Result<()> {
    vm.execute("stop", json!({}))?;
    let _ = vm.execute("migrate-set-parameters", json!({ "max-bandwidth": UNLIMITED }));
    vm.execute("migrate", json!({ "uri": exec_uri(true, &snap.state()) }))?;
    wait_migration(vm)?;
    if plan.spec.disk.is_some() {
        std::fs::copy(inst.overlay(), snap.disk()).context("cannot copy the boot disk into the snapshot")?;
    }
    Ok(())
}

fn target(ctx: &Ctx, inst: &Instance) -> Result<ssh::Target> {
    let s: Settings = read_json(&inst.settings())?.context("settings.json is missing")?;
    let key = super::boot::ssh_key_for(&ctx.state, &s)?;
    Ok(ssh::Target::for_instance(inst, s.ssh_port, &s.ssh_user, &key))
}

fn done(ctx: &Ctx, what: &'static str, record: SnapshotRecord, notes: Vec<String>) -> SnapshotDone {
    SnapshotDone {
        instance: ctx.name.clone(),
        what,
        snapshot: entry(&record),
        notes,
        load_command: ctx.command(&format!("snapshot load {}", record.name)),
        run_command: ctx.command(&format!("run --from-snapshot {} -- COMMAND", record.name)),
    }
}

fn entry(r: &SnapshotRecord) -> SnapshotEntry {
    SnapshotEntry {
        name: r.name.clone(),
        created_at: r.created_at,
        qemu_version: r.qemu_version.clone(),
        state_bytes: r.state_bytes,
        seconds: r.seconds,
        shares: r.mounts.iter().map(|m| m.tag.clone()).collect(),
    }
}

/// `snapshot load NAME`: the running VM (if any) is replaced.
pub fn load(ctx: &Ctx, name: &str, timeout: Duration) -> Result<crate::report::launch::Launched> {
    let inst = ctx.existing()?;
    resume_from(ctx, &inst, name, false)?;
    super::stop::stop_running(
        ctx,
        &inst,
        &crate::supervisor::ladder::StopOptions { timeout: Duration::ZERO, force: true },
    )?;
    let mut opts = super::boot::LaunchOptions::plain(timeout);
    opts.resume = Some(super::boot::ResumeFrom::Own(name.to_string()));
    super::launch::launch(ctx, &opts)
}

pub fn list(ctx: &Ctx) -> Result<SnapshotList> {
    let inst = ctx.existing()?;
    let mut snapshots: Vec<SnapshotEntry> = std::fs::read_dir(inst.snapshots_dir())
        .map(|rd| {
            rd.filter_map(|e| {
                read_json::<SnapshotRecord>(&inst.snapshot(e.ok()?.file_name().to_str()?).record()).ok()?
            })
            .map(|r| entry(&r))
            .collect()
        })
        .unwrap_or_default();
    snapshots.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
    Ok(SnapshotList { instance: ctx.name.clone(), snapshots })
}

pub fn delete(ctx: &Ctx, name: &str) -> Result<SnapshotDone> {
    validate_id("snapshot name", name)?;
    let inst = ctx.existing()?;
    let snap = inst.snapshot(name);
    let record: SnapshotRecord = read_json(&snap.record())?.ok_or_else(|| {
        anyhow!("instance '{}' has no snapshot '{name}' ('{}' lists them)", ctx.name, ctx.command("snapshot list"))
    })?;
    std::fs::remove_dir_all(&snap.dir).with_context(|| format!("cannot remove {}", snap.dir.display()))?;
    Ok(done(ctx, "deleted", record, vec![]))
}
