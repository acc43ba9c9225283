//! Starting a VM from a saved state: which snapshot, checked against this
//! host; the VM it needs (the saved VM's devices, this instance's paths);
//! loading the state into a QEMU waiting with `-incoming defer`; and the
//! guest's clock and shares afterwards. See app/snapshot.rs for saving.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::Ctx;
use crate::config::Settings;
use crate::instance::paths::Snapshot;
use crate::instance::records::{DevicesRecord, SnapshotRecord};
use crate::instance::{read_json, write_json, Instance};
use crate::machine::{migration, Vm};
use crate::qemu::args::{Accel, Share, VmSpec, DEFAULT_SHARE_TAG};
use crate::qemu::binaries::QemuBinaries;
use crate::qemu::value::{validate_id, IdKind};

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
    validate_id(IdKind::Snapshot, name)?;
    if !layered {
        // Before anything is stopped or set aside: which disk to keep is
        // the user's to say.
        if let Some(why) = cut_short(inst) {
            return Err(CutShort(why).into());
        }
    }
    let snapshot = inst.snapshot(name);
    let damaged = |why: String| {
        anyhow!(
            "snapshot '{name}' is damaged ({why}), so it cannot be loaded; nothing was touched: delete it ('{}') \
             and save a new one",
            ctx.command(&format!("snapshot delete {name}"))
        )
    };
    let record: SnapshotRecord = match read_json(&snapshot.record()) {
        Ok(Some(r)) => r,
        Ok(None) if snapshot.dir.exists() => {
            return Err(damaged(format!("{} is missing: a save that did not finish", snapshot.record().display())))
        }
        Ok(None) => {
            bail!("instance '{}' has no snapshot '{name}' ('{}' lists them)", inst.name, ctx.command("snapshot list"))
        }
        Err(e) => return Err(damaged(format!("{e:#}"))),
    };
    if let Some(why) = damage(&snapshot, &record) {
        return Err(damaged(why));
    }
    if let Some(base) = &record.base {
        let now = crate::qemu::image::identity(&base.path)
            .with_context(|| format!("snapshot '{name}' was saved on {}", base.path.display()))?;
        let way_out =
            format!("restore the original image, or save the snapshot again ('{}')", ctx.command("snapshot save NAME"));
        crate::qemu::image::compare(base, &now, &way_out)
            .with_context(|| format!("snapshot '{name}' cannot be used"))?;
    }
    let bins = crate::qemu::binaries::qemu_binaries()?;
    let version = crate::qemu::binaries::qemu_version(&bins).unwrap_or_default();
    if !version.contains(&format!("version {}", record.qemu_version)) {
        bail!(
            "snapshot '{name}' was saved by QEMU {}, and this is {version:?}: a saved state loads only into the QEMU that wrote it",
            record.qemu_version
        );
    }
    Ok(Resume { snapshot, record, layered })
}

/// What is wrong with a snapshot's files compared with what the save
/// wrote, if anything. QEMU finds a truncated state only while loading it,
/// when the running VM is already gone; sizes are checked up front instead.
pub fn damage(snap: &Snapshot, r: &SnapshotRecord) -> Option<String> {
    let size = |p: &Path| std::fs::metadata(p).ok().map(|m| m.len());
    match size(&snap.state()) {
        None => return Some("state.bin is missing".into()),
        Some(n) if n != r.state_bytes => {
            return Some(format!("state.bin has {n} bytes, and the save wrote {}", r.state_bytes))
        }
        Some(_) => {}
    }
    match (r.spec.disk.is_some(), size(&snap.disk()), r.disk_bytes) {
        (true, None, _) => Some("disk.qcow2 is missing".into()),
        (true, Some(n), Some(was)) if n != was => Some(format!("disk.qcow2 has {n} bytes, and the save wrote {was}")),
        _ => None,
    }
}

/// Whether `r` can start here: a snapshot has the boot disk only, and a
/// state saved under KVM loads only under KVM.
pub fn check(ctx: &Ctx, devices: &DevicesRecord, bins: &QemuBinaries, r: &Resume) -> Result<()> {
    if let Some(d) = devices.disks.first() {
        bail!(
            "disk '{}' is recorded for this instance, and a snapshot has the boot disk only: remove it first ('{}')",
            d.id,
            ctx.command(&format!("disk remove {}", d.id))
        );
    }
    if r.record.spec.accel == Accel::Kvm {
        crate::qemu::binaries::kvm_runs(bins).map_err(|e| {
            anyhow!("snapshot '{}' was saved under KVM, which cannot run guests here ({e})", r.record.name)
        })?;
    }
    Ok(())
}

/// The boot disk of a resume: a fresh overlay on the snapshot's disk (a
/// run), or a copy of it (the instance's own); none for a diskless VM.
pub fn disk(inst: &Instance, bins: &QemuBinaries, r: &Resume) -> Result<Option<std::path::PathBuf>> {
    Ok(match (&r.record.spec.disk, r.layered) {
        (None, _) => None,
        (Some(_), true) => Some(crate::qemu::image::prepare_on_snapshot(inst, &bins.img, &r.snapshot.disk())?),
        (Some(_), false) => Some(copy_disk(inst, r)?),
    })
}

/// Makes `spec` the saved VM's: the same devices, or its state does not
/// load (the default share may point at another directory: this
/// checkout), and QEMU waiting for the state.
pub fn adapt(spec: &mut VmSpec, s: &Settings, r: &Resume) {
    let saved = &r.record.spec;
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
}

/// The instance's own resume: its disk becomes a copy of the saved one (the
/// snapshot stays as it was for the next resume). The disk it replaces is
/// kept aside until the state loaded ([`loaded`]) and put back if it did
/// not ([`undo`]): what the guest wrote since the save must survive a
/// failed load.
fn copy_disk(inst: &Instance, r: &Resume) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(why) = cut_short(inst) {
        // Checked in `resume_from` already; a second command got here in
        // between. Typed, so that `undo` leaves both disks alone.
        return Err(CutShort(why).into());
    }
    if inst.overlay().exists() {
        std::fs::rename(inst.overlay(), inst.overlay_kept()).context("cannot set the current boot disk aside")?;
        let _ = std::fs::rename(inst.base_identity(), inst.base_kept());
    }
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

/// A load refused because an earlier one was cut short (see [`cut_short`]).
#[derive(Debug)]
struct CutShort(String);

impl std::fmt::Display for CutShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}. Nothing was changed; keep one of the two disks, then load again", self.0)
    }
}

impl std::error::Error for CutShort {}

/// When an earlier load of the instance's own snapshot was cut short (the
/// disk it set aside is still there): what to tell the user, for `launch`'s
/// note and a new load's refusal.
pub fn cut_short(inst: &Instance) -> Option<String> {
    let kept = inst.overlay_kept();
    if !kept.exists() {
        return None;
    }
    let base = if inst.base_kept().exists() {
        format!(" and {} over {}", inst.base_kept().display(), inst.base_identity().display())
    } else {
        String::new()
    };
    Some(format!(
        "an earlier snapshot load was cut short: the boot disk from before it is set aside as {kept}, and the current \
         boot disk {overlay} (the snapshot's disk) may hold work done since. To keep the current disk, delete {kept}; \
         to go back to the disk from before the load, move {kept} over {overlay}{base}",
        kept = kept.display(),
        overlay = inst.overlay().display(),
    ))
}

/// The saved state loaded: the disk set aside for it is not needed.
pub fn loaded(inst: &Instance) {
    let _ = std::fs::remove_file(inst.overlay_kept());
    let _ = std::fs::remove_file(inst.base_kept());
}

/// A resume failed before its state loaded (QEMU is stopped): the boot disk
/// set aside is put back, and `e` says so.
pub fn undo(inst: &Instance, e: anyhow::Error) -> anyhow::Error {
    // A disk set aside by an earlier, cut-short load is not this load's
    // to put back: the current disk may hold work done since.
    if !inst.overlay_kept().exists() || e.is::<CutShort>() {
        return e;
    }
    let back = std::fs::rename(inst.overlay_kept(), inst.overlay());
    let _ = std::fs::remove_file(inst.base_identity());
    let _ = std::fs::rename(inst.base_kept(), inst.base_identity());
    match back {
        Ok(()) => e.context(format!(
            "the instance's disk is as it was before the load, with everything written since the save: \
             '{}' boots it",
            inst.command("launch")
        )),
        Err(b) => e.context(format!(
            "the disk from before the load is kept as {} (it could not be put back: {b})",
            inst.overlay_kept().display()
        )),
    }
}

/// Loads the saved state into a QEMU started with `-incoming defer`, then
/// lets the guest run.
pub fn load_state(inst: &Instance, r: &Resume) -> Result<()> {
    let vm = Vm { inst: inst.clone() };
    migration::load(&vm, &r.snapshot.state()).with_context(|| format!("loading snapshot '{}'", r.record.name))
}

/// QEMU's own words on a failed load, once it is stopped: QEMU exits when
/// an incoming migration fails ("load of migration failed: Input/output
/// error") and says why only on its stderr, which the user never sees.
pub fn qemu_said(inst: &Instance, e: anyhow::Error) -> anyhow::Error {
    let said = crate::logs::tail(&inst.qemu_stderr(), 0, 1500, "");
    if said.is_empty() {
        return e;
    }
    anyhow!("{e:#}\nQEMU said:\n{said}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_short_load_is_told_with_both_disks() {
        let (_root, inst) = crate::instance::paths::scratch_instance("r");
        assert_eq!(cut_short(&inst), None);
        std::fs::write(inst.overlay_kept(), "before the load").unwrap();
        let why = cut_short(&inst).unwrap();
        let (kept, overlay) = (inst.overlay_kept().display().to_string(), inst.overlay().display().to_string());
        assert!(
            why.contains(&format!("delete {kept}")) && why.contains(&format!("move {kept} over {overlay}")),
            "{why}"
        );
        assert!(!why.contains("base.json"), "{why}");
        std::fs::write(inst.base_kept(), "{}").unwrap();
        assert!(cut_short(&inst).unwrap().contains("base.json.kept over"));
        // A refusal for that reason leaves both disks where they are.
        std::fs::write(inst.overlay(), "work since").unwrap();
        let e = undo(&inst, anyhow::Error::from(CutShort(cut_short(&inst).unwrap())).context("loading"));
        assert!(e.to_string().contains("loading") && !format!("{e:#}").contains("as it was before the load"), "{e:#}");
        assert_eq!(std::fs::read_to_string(inst.overlay()).unwrap(), "work since");
        assert!(inst.overlay_kept().exists());
    }
}
