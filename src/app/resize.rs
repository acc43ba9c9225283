//! `disk resize ID SIZE` and `launch --disk-size`: a disk grows, never
//! shrinks (the end of the disk would be cut off under the guest's file
//! system). An attached disk grows live with QMP `block_resize`, and the
//! guest sees the new size at once; a detached one, or a stopped
//! instance's, with `qemu-img resize`. Only the disk grows: the guest grows
//! its partition and file system itself, and the outcome says how.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use super::Ctx;
use crate::instance::lock::devices_lock;
use crate::instance::records::DevicesRecord;
use crate::instance::{Instance, Lock};
use crate::machine::{disks, Vm};
use crate::qemu::args::BOOT_DISK_DEVICE;
use crate::qemu::value::DiskFormat;
use crate::report::devices::DiskResized;
use crate::report::list::human_bytes;

/// QEMU sizes disks in 512-byte sectors: a size is rounded up to one.
fn sectors(bytes: u64) -> u64 {
    bytes.div_ceil(512) * 512
}

/// Refuses a shrink; `Ok(false)` when the disk already has that size.
fn must_grow(id: &str, from: u64, to: u64) -> Result<bool> {
    if to < from {
        let m = format!(
            "disk '{id}' is {} and disks only grow (shrinking would cut off the end of its file system): give more than {}",
            human_bytes(from),
            human_bytes(from)
        );
        return Err(crate::report::error::Usage(m).into());
    }
    Ok(to > from)
}

pub fn resize(ctx: &Ctx, id: &str, bytes: u64) -> Result<DiskResized> {
    let bytes = sectors(bytes);
    let inst = ctx.existing()?;
    let vm = Vm::if_running(&inst)?;
    let _devices = devices_lock(&inst)?;
    let mut out = DiskResized {
        name: ctx.name.clone(),
        id: id.into(),
        path: PathBuf::new(),
        from_bytes: 0,
        to_bytes: bytes,
        live: false,
        boot: id == BOOT_DISK_DEVICE,
    };
    if let Some(vm) = &vm {
        if let Some(d) = disks::live(vm)?.into_iter().find(|d| d.id == id) {
            out.path = PathBuf::from(&d.file);
            out.from_bytes = d.virtual_size.ok_or_else(|| {
                anyhow!(
                    "QEMU did not say the size of '{id}': look at '{}', or detach the disk and resize it offline",
                    ctx.command("qmp query-block")
                )
            })?;
            out.live = true;
            if must_grow(id, out.from_bytes, bytes)? {
                let size = i64::try_from(bytes)
                    .map_err(|_| anyhow!("{bytes} bytes is more than QEMU can address: give a smaller SIZE"))?;
                vm.run(&qapi::qmp::block_resize { device: None, node_name: Some(d.node), size })?;
            }
            return Ok(out);
        }
    }
    // Not attached: the image is not open, so qemu-img may change it; a
    // stopped instance is locked so no launch opens it meanwhile.
    let _lock = match vm {
        Some(_) => None,
        None => Some(Lock::try_acquire(&inst)?.ok_or_else(|| {
            anyhow!(
                "instance '{}' is starting or stopping: try again when '{}' says it is stopped",
                ctx.name,
                ctx.command("status")
            )
        })?),
    };
    let (path, format) = image_of(ctx, &inst, id)?;
    let img = crate::qemu::binaries::qemu_binaries()?.img;
    out.from_bytes = crate::qemu::image::virtual_size(&img, &path, format)?;
    out.path = path;
    if must_grow(id, out.from_bytes, bytes)? {
        crate::qemu::image::grow(&img, &out.path, format, bytes)?;
    }
    Ok(out)
}

/// The image file and format of a disk that is not attached now.
fn image_of(ctx: &Ctx, inst: &Instance, id: &str) -> Result<(PathBuf, DiskFormat)> {
    if id == BOOT_DISK_DEVICE {
        let overlay = inst.overlay();
        if !overlay.is_file() {
            bail!("instance '{}' has no boot disk image (it boots a kernel without a disk, or never booted)", ctx.name);
        }
        return Ok((overlay, DiskFormat::Qcow2));
    }
    let rec = DevicesRecord::load(inst)?;
    let d = rec.disks.into_iter().find(|d| d.id == id).ok_or_else(|| {
        anyhow!("instance '{}' has no disk '{id}' ('{}' shows its disks)", ctx.name, ctx.command("disk list"))
    })?;
    Ok((d.path, d.format))
}

/// `launch --disk-size`: grows the boot overlay before QEMU opens it;
/// returns what to tell the user.
pub fn grow_before_boot(qemu_img: &Path, overlay: &Path, bytes: u64) -> Result<Option<String>> {
    let bytes = sectors(bytes);
    let from = crate::qemu::image::virtual_size(qemu_img, overlay, DiskFormat::Qcow2)?;
    if !must_grow(BOOT_DISK_DEVICE, from, bytes)? {
        return Ok(None);
    }
    crate::qemu::image::grow(qemu_img, overlay, DiskFormat::Qcow2, bytes)?;
    Ok(Some(format!(
        "the boot disk grew from {} to {} (--disk-size); {}",
        human_bytes(from),
        human_bytes(bytes),
        crate::report::devices::GROW_IN_GUEST_BOOT
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_only_grow_in_whole_sectors() {
        assert_eq!(sectors(1), 512);
        assert_eq!(sectors(1 << 20), 1 << 20);
        assert!(must_grow("d", 2 << 20, 3 << 20).unwrap());
        assert!(!must_grow("d", 2 << 20, 2 << 20).unwrap());
        let e = must_grow("d", 2 << 20, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("only grow") && e.contains("2.0 MiB"), "{e}");
    }
}
