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

use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use super::restore::resume_from;
use super::{guest, Ctx};
use crate::instance::paths::Snapshot;
use crate::instance::records::{BootPlan, RunRecord, SnapshotRecord};
use crate::instance::{read_json, write_json, Instance};
use crate::machine::{disks, migration, missing_record, Vm};
use crate::qemu::args::ShareKind;
use crate::qemu::value::{validate_id, IdKind};
use crate::report::snapshot::{SnapshotAction, SnapshotDone, SnapshotEntry, SnapshotList};

/// `snapshot save NAME`.
pub fn save(ctx: &Ctx, name: &str) -> Result<SnapshotDone> {
    validate_id(IdKind::Snapshot, name)?;
    let inst = ctx.existing()?;
    let vm = Vm::running(&inst)?;
    let snap = inst.snapshot(name);
    if snap.dir.exists() {
        bail!(
            "instance '{}' already has a snapshot '{name}': delete it first ('{}')",
            ctx.name,
            ctx.command(&format!("snapshot delete {name}"))
        );
    }
    let plan: BootPlan = read_json(&inst.boot_plan())?.ok_or_else(|| missing_record(&inst, &inst.boot_plan()))?;
    let live = disks::live(&vm)?;
    if let Some(d) = live.iter().find(|d| !d.is_boot()) {
        bail!(
            "disk '{}' is attached: snapshots cover the boot disk only; remove it first ('{}')",
            d.id,
            ctx.command(&format!("disk remove {}", d.id))
        );
    }
    let (_, t) = super::ssh::ssh_target(ctx)?;
    let mounts = guest::mounted_shares(&t)?;
    // Made before the shares are unmounted, so a refusal leaves them be.
    crate::instance::private_dir(&snap.dir).inspect_err(|_| {
        let _ = std::fs::remove_dir(&snap.dir);
    })?;
    kept_or_removed(&snap, || guest::unmount_shares(&t, &mounts))?;
    ctx.progress(&format!("saving instance '{}' as snapshot '{name}' (the VM pauses meanwhile)", ctx.name));
    let start = Instant::now();
    let saved = freeze(&vm, &inst, &snap, &plan);
    let resumed = vm.run(&qapi::qmp::cont {});
    let remounted = guest::mount_shares(&t, &mounts);
    let runs_on = if resumed.is_ok() { "; the VM runs on" } else { "" };
    // From here on the directory is this save's: any error removes it (and
    // its GB-sized state.bin), so no snapshot without a record is left.
    let record = kept_or_removed(&snap, || {
        saved.map_err(|e| unsaved(&inst, &snap, &plan, e))?;
        resumed?;
        let record = SnapshotRecord {
            name: name.into(),
            created_at: crate::clock::now(),
            qemu_version: read_json::<RunRecord>(&inst.run_record())?.map(|r| r.qemu_version).unwrap_or_default(),
            spec: plan.spec.clone(),
            base: read_json(&inst.base_identity())?,
            state_bytes: std::fs::metadata(snap.state()).map(|m| m.len()).unwrap_or(0),
            disk_bytes: std::fs::metadata(snap.disk()).ok().map(|m| m.len()),
            seconds: start.elapsed().as_secs_f64(),
            mounts,
        };
        write_json(&snap.record(), &record)?;
        Ok(record)
    })
    .with_context(|| format!("saving snapshot '{name}' (nothing was kept{runs_on})"))?;
    let mut notes = vec![];
    if let Err(e) = remounted {
        notes.push(format!("{e}; mount it in the guest yourself"));
    }
    Ok(done(ctx, SnapshotAction::Saved, entry(&record, None), notes))
}

/// `keep`'s outcome; on any error the snapshot's directory is removed.
fn kept_or_removed<T>(snap: &Snapshot, keep: impl FnOnce() -> Result<T>) -> Result<T> {
    let kept = keep();
    if kept.is_err() {
        let _ = std::fs::remove_dir_all(&snap.dir);
    }
    kept
}

/// Why QEMU's save failed, in words that say what to do.
fn unsaved(inst: &Instance, snap: &Snapshot, plan: &BootPlan, e: anyhow::Error) -> anyhow::Error {
    let e = full_disk(inst, snap, e);
    let e = match plan.spec.share_kind {
        // QEMU 7.2 refuses ("State blocked by non-migratable device
        // '…/vhost-user-fs'"); 10.0 saves and resumes it.
        ShareKind::Virtiofs if format!("{e:#}").contains("vhost-user-fs") => e.context(
            "this QEMU cannot save a VM with a virtio-fs share (QEMU 10 can): relaunch with \
             '--share-type 9p' to take snapshots with this QEMU, or use a newer QEMU",
        ),
        _ => e,
    };
    e
}

/// Pauses the VM, writes its state and copies its boot disk. QEMU flushes
/// and lets go of the disk when the migration completes, so the copy is the
/// disk at that instant.
fn freeze(vm: &Vm, inst: &Instance, snap: &Snapshot, plan: &BootPlan) -> Result<()> {
    migration::save(vm, &snap.state())?;
    if plan.spec.disk.is_some() {
        std::fs::copy(inst.overlay(), snap.disk()).context("cannot copy the boot disk into the snapshot")?;
    }
    Ok(())
}

/// A save that failed on a full disk says so. QEMU says only "Broken pipe":
/// its `cat` died of ENOSPC, which only its stderr (qemu.log) shows.
fn full_disk(inst: &Instance, snap: &Snapshot, e: anyhow::Error) -> anyhow::Error {
    let enospc = |t: &str| t.contains("No space left on device");
    let free = nix::sys::statvfs::statvfs(&snap.dir).map(|v| v.blocks_available() * v.fragment_size());
    let full = enospc(&crate::logs::tail(&inst.qemu_stderr(), 0, 2000, ""))
        || enospc(&format!("{e:#}"))
        || free.is_ok_and(|b| b < 1 << 20);
    if !full {
        return e;
    }
    e.context(format!(
        "no space left on the disk that holds {}: free some (a snapshot takes about the VM's memory plus its \
         disk's changes since boot) and save again",
        inst.snapshots_dir().display()
    ))
}

fn done(ctx: &Ctx, what: SnapshotAction, snapshot: SnapshotEntry, notes: Vec<String>) -> SnapshotDone {
    SnapshotDone {
        instance: ctx.name.clone(),
        what,
        load_command: ctx.command(&format!("snapshot load {}", snapshot.name)),
        run_command: ctx.command(&format!("run --from-snapshot {} -- COMMAND", snapshot.name)),
        snapshot,
        notes,
    }
}

fn entry(r: &SnapshotRecord, damaged: Option<String>) -> SnapshotEntry {
    SnapshotEntry {
        damaged,
        recorded: true,
        name: r.name.clone(),
        created_at: r.created_at,
        qemu_version: r.qemu_version.clone(),
        state_bytes: r.state_bytes,
        seconds: r.seconds,
        shares: r.mounts.iter().map(|m| m.tag.clone()).collect(),
    }
}

/// Snapshot directory `name` as `list` and `delete` see it: its record,
/// or, when that is missing (a save cut short) or unreadable, a damaged
/// entry that says so and how to remove it.
fn read_entry(ctx: &Ctx, inst: &Instance, name: &str) -> SnapshotEntry {
    let snap = inst.snapshot(name);
    let why = match read_json::<SnapshotRecord>(&snap.record()) {
        Ok(Some(r)) => return entry(&r, super::restore::damage(&snap, &r)),
        Ok(None) => format!(
            "{} is missing (a save that did not finish): '{}' removes it",
            snap.record().display(),
            ctx.command(&format!("snapshot delete {name}"))
        ),
        Err(e) => format!("{e:#}"),
    };
    let size = |p: &std::path::Path| std::fs::metadata(p).ok();
    let mtime = size(&snap.dir).and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(UNIX_EPOCH).ok());
    SnapshotEntry {
        damaged: Some(why),
        recorded: false,
        name: name.into(),
        created_at: mtime.map_or(0.0, |d| d.as_secs_f64()),
        qemu_version: String::new(),
        state_bytes: size(&snap.state()).map_or(0, |m| m.len()),
        seconds: 0.0,
        shares: vec![],
    }
}

/// `snapshot load NAME`: the running VM (if any) is replaced.
pub fn load(ctx: &Ctx, name: &str, timeout: Duration) -> Result<crate::report::launch::Launched> {
    let inst = ctx.existing()?;
    // Checked before the running VM is stopped, and only once.
    let resume = resume_from(ctx, &inst, name, false)?;
    super::stop::stop_running(
        ctx,
        &inst,
        &crate::supervisor::ladder::StopOptions { timeout: Duration::ZERO, force: true },
    )?;
    let mut opts = super::spec::LaunchOptions::plain(timeout);
    opts.resume = Some(super::spec::ResumeFrom::Checked(Box::new(resume)));
    super::launch::launch(ctx, &opts)
}

/// `snapshot list`: every snapshot directory, the damaged ones marked.
pub fn list(ctx: &Ctx) -> Result<SnapshotList> {
    let inst = ctx.existing()?;
    let mut snapshots: Vec<SnapshotEntry> = std::fs::read_dir(inst.snapshots_dir())
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok().filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))?;
                Some(read_entry(ctx, &inst, &e.file_name().to_string_lossy()))
            })
            .collect()
        })
        .unwrap_or_default();
    snapshots.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
    Ok(SnapshotList { instance: ctx.name.clone(), snapshots })
}

/// `snapshot delete NAME`: a damaged one too (no record, or one that
/// cannot be read), so a save cut short is never a dead end.
pub fn delete(ctx: &Ctx, name: &str) -> Result<SnapshotDone> {
    validate_id(IdKind::Snapshot, name)?;
    let inst = ctx.existing()?;
    let snap = inst.snapshot(name);
    if !snap.dir.is_dir() {
        bail!("instance '{}' has no snapshot '{name}' ('{}' lists them)", ctx.name, ctx.command("snapshot list"));
    }
    let gone = read_entry(ctx, &inst, name);
    std::fs::remove_dir_all(&snap.dir).with_context(|| format!("cannot remove {}", snap.dir.display()))?;
    Ok(done(ctx, SnapshotAction::Deleted, gone, vec![]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_save_that_fails_after_its_directory_was_made_leaves_nothing() {
        let (_root, inst) = crate::instance::paths::scratch_instance("x");
        let snap = inst.snapshot("s");
        std::fs::create_dir_all(&snap.dir).unwrap();
        std::fs::write(snap.state(), [0; 4096]).unwrap();
        // As a full disk fails the record's write after QEMU wrote the state.
        let failed = kept_or_removed(&snap, || -> Result<()> {
            write_json(&snap.record(), &1)?;
            anyhow::bail!("No space left on device")
        });
        assert!(failed.is_err());
        assert!(!snap.dir.exists(), "the partial snapshot stayed");
        std::fs::create_dir_all(&snap.dir).unwrap();
        assert_eq!(kept_or_removed(&snap, || Ok(7)).unwrap(), 7);
        assert!(snap.dir.exists(), "a save that worked lost its directory");
    }
}
