//! `disk add|remove|list`: virtio disks hot-plugged onto the PCIe root ports
//! reserved at launch (`machine::disks`), and recorded in devices.json to
//! come back at the next launch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use super::Ctx;
use crate::instance::lock::devices_lock;
use crate::instance::records::DevicesRecord;
use crate::instance::Instance;
use crate::machine::{disks, Vm};
use crate::qemu::args::{ExtraDisk, BOOT_DISK_DEVICE, HOTPLUG_PORTS};
use crate::qemu::image::{self, DiskFormat};
use crate::qemu::parse::LiveDisk;
use crate::qemu::value::{validate_id, IdKind};
use crate::report::devices::{DiskAdded, DiskEntry, DiskList, DiskRemoved};

#[derive(Debug, Clone)]
pub struct DiskAdd {
    pub file: Option<PathBuf>,
    /// The size of a new image, in bytes (bounded by the parser).
    pub size: Option<u64>,
    pub id: Option<String>,
    pub format: Option<DiskFormat>,
    pub transient: bool,
}

/// The guest's name for the next virtio disk: Linux gives virtio-blk disks
/// the lowest free index, so with `present` disks attached it is the next
/// letter, as long as the guest released every disk removed earlier.
pub fn guest_device_hint(present: usize) -> String {
    match u8::try_from(present).ok().filter(|n| *n < 26) {
        Some(n) => format!("/dev/vd{}", (b'a' + n) as char),
        None => "the next virtio disk".into(),
    }
}

/// `disk1`, `disk2`, … : the first not in `taken`.
pub fn next_disk_id(taken: &[String]) -> String {
    (1..).map(|n| format!("disk{n}")).find(|id| !taken.contains(id)).expect("an unused id")
}

/// The command that attaches `path` again, with its format when not qcow2.
fn attach_command(ctx: &Ctx, path: &Path, format: DiskFormat) -> String {
    let file = shell_words::quote(&path.display().to_string()).into_owned();
    match format {
        DiskFormat::Raw => ctx.command(&format!("disk add {file} --format raw")),
        DiskFormat::Qcow2 => ctx.command(&format!("disk add {file}")),
    }
}

pub fn add(ctx: &Ctx, req: &DiskAdd) -> Result<DiskAdded> {
    let inst = ctx.existing()?;
    let vm = Vm::if_running(&inst)?;
    if vm.is_none() && req.transient {
        bail!(
            "instance '{}' is not running, and a --transient disk is never recorded: launch it first, or drop --transient",
            ctx.name
        );
    }
    let _lock = devices_lock(&inst)?;
    let mut rec = DevicesRecord::load(&inst)?;
    let live = vm.as_ref().map(disks::live).transpose()?.unwrap_or_default();
    let id = choose_id(ctx, &inst, vm.as_ref(), &rec, &live, req)?;
    if vm.is_none() && rec.disks.len() as u32 >= HOTPLUG_PORTS {
        bail!(
            "instance '{}' already has {HOTPLUG_PORTS} recorded disks, one per hot-plug port: remove one first",
            ctx.name
        );
    }
    let format = req.format.unwrap_or(DiskFormat::Qcow2);
    let (path, created) = match (&req.file, req.size) {
        (Some(f), None) => (existing_image(ctx, &inst, &rec, &live, f, format)?, false),
        (None, Some(bytes)) => (create_image(ctx, &inst, &id, format, bytes)?, true),
        _ => bail!("give either an image FILE or --size SIZE for a new disk"),
    };
    let mut out = DiskAdded {
        name: ctx.name.clone(),
        id: id.clone(),
        path: path.clone(),
        format,
        created,
        attached: false,
        port: None,
        guest_device: None,
        recorded: !req.transient,
        remove_command: ctx.command(&format!("disk remove {id}")),
        destroy_command: ctx.command("destroy"),
    };
    if let Some(vm) = &vm {
        match disks::hotplug(vm, &id, &path, format) {
            Ok(port) => {
                out.attached = true;
                out.port = Some(port);
                out.guest_device = Some(guest_device_hint(live.len()));
            }
            Err(e) => {
                if created {
                    let _ = std::fs::remove_file(&path);
                }
                return Err(e);
            }
        }
    }
    if out.recorded {
        rec.disks.push(ExtraDisk { id, path, format });
        rec.save(&inst)?;
    }
    Ok(out)
}

/// `--id`, checked against every id QEMU and the record have; else the
/// name of an image from the instance's disks dir, else `diskN`.
fn choose_id(
    ctx: &Ctx,
    inst: &Instance,
    vm: Option<&Vm>,
    rec: &DevicesRecord,
    live: &[LiveDisk],
    req: &DiskAdd,
) -> Result<String> {
    let mut taken: Vec<String> =
        rec.disks.iter().map(|d| d.id.clone()).chain(live.iter().map(|d| d.id.clone())).collect();
    if let Some(vm) = vm {
        taken.extend(disks::peripherals(vm)?);
        taken.extend(disks::block_nodes(vm)?);
    }
    if let Some(id) = &req.id {
        validate_id(IdKind::Disk, id)?;
        if taken.contains(id) {
            bail!(
                "there is already a disk or device '{id}': choose another --id ('{}' shows them)",
                ctx.command("disk list")
            );
        }
        return Ok(id.clone());
    }
    // A `--size` image is named after its id, so its id skips the names of
    // images there; an image from there keeps its name.
    let stem = |p: &Path| p.file_stem()?.to_str().map(String::from);
    let existing: Vec<String> = std::fs::read_dir(inst.disks_dir())
        .map(|rd| rd.filter_map(|e| stem(&e.ok()?.path())).collect())
        .unwrap_or_default();
    let own =
        req.file.as_deref().and_then(|f| std::fs::canonicalize(f).ok()).filter(|f| f.starts_with(inst.disks_dir()));
    Ok(match own.as_deref().and_then(stem) {
        Some(name) if validate_id(IdKind::Disk, &name).is_ok() && !taken.contains(&name) => name,
        _ => next_disk_id(&[taken, existing].concat()),
    })
}

/// A user's image: it exists, its header matches `format`, and it is not
/// attached already.
fn existing_image(
    ctx: &Ctx,
    inst: &Instance,
    rec: &DevicesRecord,
    live: &[LiveDisk],
    f: &Path,
    format: DiskFormat,
) -> Result<PathBuf> {
    let p = super::spec::must_exist(f, "disk image")?;
    if !p.is_file() {
        bail!("{} is not a file: give a disk image", p.display());
    }
    image::check_image(&p, format)?;
    let in_use =
        p == inst.overlay() || rec.disks.iter().any(|d| d.path == p) || live.iter().any(|d| Path::new(&d.file) == p);
    if in_use {
        bail!(
            "{} is already attached to instance '{}' ('{}' shows it)",
            p.display(),
            ctx.name,
            ctx.command("disk list")
        );
    }
    Ok(p)
}

fn create_image(ctx: &Ctx, inst: &Instance, id: &str, format: DiskFormat, bytes: u64) -> Result<PathBuf> {
    crate::instance::private_dir(&inst.disks_dir())?;
    let ext = if format == DiskFormat::Qcow2 { "qcow2" } else { "img" };
    let path = inst.disks_dir().join(format!("{id}.{ext}"));
    if path.exists() {
        bail!(
            "{} already exists: attach it with '{}', or choose another --id",
            path.display(),
            attach_command(ctx, &path, format)
        );
    }
    let img = crate::qemu::binaries::qemu_binaries()?.img;
    image::create(&img, &path, format, bytes)?;
    Ok(path)
}

pub fn remove(ctx: &Ctx, id: &str, timeout: Duration) -> Result<DiskRemoved> {
    if id == BOOT_DISK_DEVICE || id == "disk0" {
        bail!("'{id}' is the boot disk; it cannot be removed");
    }
    let inst = ctx.existing()?;
    let vm = Vm::if_running(&inst)?;
    let _lock = devices_lock(&inst)?;
    let mut rec = DevicesRecord::load(&inst)?;
    let recorded = rec.disks.iter().find(|d| d.id == id).cloned();
    let mut out = DiskRemoved {
        name: ctx.name.clone(),
        id: id.into(),
        detached: false,
        seconds: None,
        unrecorded: false,
        path: None,
        attach_command: None,
    };
    let mut format = recorded.as_ref().map_or(DiskFormat::Qcow2, |r| r.format);
    if let Some(vm) = &vm {
        let live = disks::live(vm)?.into_iter().find(|d| d.id == id);
        if let Some(l) = &live {
            out.path = Some(PathBuf::from(&l.file));
            format = DiskFormat::parse(&l.format).unwrap_or(format);
        }
        let d = disks::detach(vm, id, live.is_some() || recorded.is_some(), timeout)?;
        out.seconds = d.released_after.map(|t| t.as_secs_f64());
        out.detached = d.detached;
    } else if recorded.is_none() {
        bail!("instance '{}' has no recorded disk '{id}' ('{}' shows its disks)", ctx.name, ctx.command("disk list"));
    }
    if let Some(r) = recorded {
        rec.disks.retain(|d| d.id != id);
        rec.save(&inst)?;
        out.unrecorded = true;
        out.path = Some(r.path);
    }
    out.attach_command = out.path.as_deref().filter(|p| p.is_file()).map(|p| attach_command(ctx, p, format));
    Ok(out)
}

pub fn list(ctx: &Ctx) -> Result<DiskList> {
    let inst = ctx.existing()?;
    let vm = Vm::if_running(&inst)?;
    let rec = DevicesRecord::load(&inst)?;
    let live = vm.as_ref().map(disks::live).transpose()?.unwrap_or_default();
    let mut disks: Vec<DiskEntry> = live
        .iter()
        .map(|d| DiskEntry {
            id: d.id.clone(),
            file: d.file.clone(),
            format: d.format.clone(),
            node: Some(d.node.clone()),
            read_only: d.read_only,
            boot: d.is_boot(),
            recorded: rec.disks.iter().any(|r| r.id == d.id),
            attached: true,
        })
        .collect();
    for r in rec.disks.iter().filter(|r| !live.iter().any(|d| d.id == r.id)) {
        disks.push(DiskEntry {
            id: r.id.clone(),
            file: r.path.display().to_string(),
            format: r.format.as_str().into(),
            node: None,
            read_only: false,
            boot: false,
            recorded: true,
            attached: false,
        });
    }
    Ok(DiskList { name: ctx.name.clone(), running: vm.is_some(), disks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_guest_names() {
        assert_eq!(next_disk_id(&["disk1".into(), "disk3".into()]), "disk2");
        assert_eq!(guest_device_hint(1), "/dev/vdb");
        assert_eq!(guest_device_hint(0), "/dev/vda");
        assert_eq!(guest_device_hint(30), "the next virtio disk");
    }
}
