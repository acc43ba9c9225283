//! `disk add|remove|list`: virtio disks hot-plugged over QMP onto the PCIe
//! root ports reserved at launch, and recorded in devices.json to come back
//! at the next launch.
//!
//! Disk changes follow Lima's hotplug: each QMP conversation is short, a
//! removal subscribes to events *before* `device_del` and then waits for the
//! guest's `DEVICE_DELETED` with a deadline. Until the guest has released a
//! device nothing else is undone, so a timeout leaves no half-removed disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::vm::{Vm, QUERY_TIMEOUT};
use super::{block_on, Ctx};
use crate::instance::lock::devices_lock;
use crate::instance::records::DevicesRecord;
use crate::instance::Instance;
use crate::qemu::args::{validate_id, ExtraDisk, BOOT_DISK_DEVICE, HOTPLUG_PORTS};
use crate::qemu::image::{self, DiskFormat};
use crate::qemu::parse::{self, LiveDisk};
use crate::report::devices::{DiskAdded, DiskEntry, DiskList, DiskRemoved};
use crate::supervisor::client;

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

/// The disks QEMU has now.
fn live_disks(vm: &Vm) -> Result<Vec<LiveDisk>> {
    Ok(parse::parse_query_block(&vm.execute("query-block", json!({}))?))
}

fn block_nodes(vm: &Vm) -> Result<Vec<String>> {
    Ok(parse::block_node_names(&vm.execute("query-named-block-nodes", json!({ "flat": true }))?))
}

fn peripherals(vm: &Vm) -> Result<Vec<String>> {
    Ok(parse::peripheral_ids(&vm.execute("qom-list", json!({ "path": "/machine/peripheral" }))?))
}

/// For each reserved root port `hpN`, whether a device sits on it.
fn used_ports(vm: &Vm, ports: u32) -> Result<Vec<bool>> {
    (0..ports)
        .map(|i| {
            let v = vm.execute("qom-list", json!({ "path": format!("/machine/peripheral/hp{i}/hp{i}") }))?;
            Ok(parse::port_has_device(&v))
        })
        .collect()
}

/// The command that attaches `path` again, with its format when not qcow2.
fn attach_command(ctx: &Ctx, path: &Path, format: &str) -> String {
    let file = shell_words::quote(&path.display().to_string()).into_owned();
    match format {
        "raw" => ctx.command(&format!("disk add {file} --format raw")),
        _ => ctx.command(&format!("disk add {file}")),
    }
}

pub fn add(ctx: &Ctx, req: &DiskAdd) -> Result<DiskAdded> {
    let vm = Vm::if_running(ctx)?;
    let inst = ctx.existing()?;
    if vm.is_none() && req.transient {
        bail!(
            "instance '{}' is not running, and a --transient disk is never recorded: launch it first, or drop --transient",
            ctx.name
        );
    }
    let _lock = devices_lock(&inst)?;
    let mut rec = DevicesRecord::load(&inst)?;
    let live = vm.as_ref().map(live_disks).transpose()?.unwrap_or_default();
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
        match hotplug(ctx, vm, &id, &path, format) {
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
        rec.disks.push(ExtraDisk { id, path, format: format.as_str().into() });
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
        taken.extend(peripherals(vm)?);
        taken.extend(block_nodes(vm)?);
    }
    if let Some(id) = &req.id {
        validate_id("disk id", id)?;
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
        Some(name) if validate_id("disk id", &name).is_ok() && !taken.contains(&name) => name,
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
            attach_command(ctx, &path, format.as_str())
        );
    }
    let img = crate::qemu::host::qemu_binaries()?.img;
    image::create(&img, &path, format, bytes)?;
    Ok(path)
}

/// `blockdev-add` (format given, never probed) then `device_add` on the first
/// free root port; undoes the first when the second fails.
fn hotplug(ctx: &Ctx, vm: &Vm, id: &str, path: &Path, format: DiskFormat) -> Result<String> {
    let used = used_ports(vm, vm.hotplug_ports()?)?;
    let Some(free) = used.iter().position(|u| !u) else {
        bail!(
            "all {} hot-plug ports of instance '{}' are in use: remove a disk first ('{}', '{}')",
            used.len(),
            vm.inst.name,
            ctx.command("disk list"),
            ctx.command("disk remove ID")
        );
    };
    let port = format!("hp{free}");
    let filename = path.to_str().ok_or_else(|| anyhow!("{} is not valid UTF-8: rename it", path.display()))?;
    vm.execute(
        "blockdev-add",
        json!({
            "driver": format.as_str(),
            "node-name": id,
            "file": { "driver": "file", "filename": filename, "node-name": format!("{id}-file") },
        }),
    )?;
    let added = vm.execute("device_add", json!({ "driver": "virtio-blk-pci", "drive": id, "id": id, "bus": port }));
    if let Err(e) = added {
        let _ = vm.run(&qapi::qmp::blockdev_del { node_name: id.to_string() });
        return Err(e);
    }
    Ok(port)
}

/// How a `device_del` ended.
enum Unplug {
    Released(Duration),
    AlreadyGone,
    TimedOut,
}

pub fn remove(ctx: &Ctx, id: &str, timeout: Duration) -> Result<DiskRemoved> {
    if id == BOOT_DISK_DEVICE || id == "disk0" {
        bail!("'{id}' is the boot disk; it cannot be removed");
    }
    let vm = Vm::if_running(ctx)?;
    let inst = ctx.existing()?;
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
    let mut format = recorded.as_ref().map(|r| r.format.clone()).unwrap_or_else(|| "qcow2".into());
    if let Some(vm) = &vm {
        let live = live_disks(vm)?.into_iter().find(|d| d.id == id);
        if let Some(l) = &live {
            out.path = Some(PathBuf::from(&l.file));
            format = l.format.clone();
        }
        detach(ctx, vm, id, live.is_some() || recorded.is_some(), timeout, &mut out)?;
    } else if recorded.is_none() {
        bail!("instance '{}' has no recorded disk '{id}' ('{}' shows its disks)", ctx.name, ctx.command("disk list"));
    }
    if let Some(r) = recorded {
        rec.disks.retain(|d| d.id != id);
        rec.save(&inst)?;
        out.unrecorded = true;
        out.path = Some(r.path);
    }
    out.attach_command = out.path.as_deref().filter(|p| p.is_file()).map(|p| attach_command(ctx, p, &format));
    Ok(out)
}

/// Unplugs disk `id` from the running VM once the guest released it, then
/// drops its block node.
fn detach(ctx: &Ctx, vm: &Vm, id: &str, known: bool, timeout: Duration, out: &mut DiskRemoved) -> Result<()> {
    let has_node = block_nodes(vm)?.iter().any(|n| n == id);
    // Only a disk's device: never unplug another device by its id.
    let is_disk = known || has_node;
    if !is_disk {
        bail!("instance '{}' has no disk '{id}' ('{}' shows its disks)", ctx.name, ctx.command("disk list"));
    }
    let has_device = peripherals(vm)?.iter().any(|p| p == id);
    let again = ctx.command(&format!("disk remove {id}"));
    if has_device {
        match block_on(unplug(&vm.inst, id, timeout))? {
            Unplug::Released(t) => out.seconds = Some(t.as_secs_f64()),
            Unplug::AlreadyGone => {}
            Unplug::TimedOut => bail!(
                "the guest did not release disk '{id}' within {}s (it may still be in use in the guest, or the guest \
                 ignores unplug requests). Nothing was removed: the disk stays attached and recorded, and QEMU keeps \
                 its image open. The guest may still release it later; unmount it in the guest and run \
                 '{again}' again (a larger --timeout waits longer)",
                timeout.as_secs()
            ),
        }
    }
    if has_node {
        vm.call("blockdev-del", json!({ "node-name": id }), QUERY_TIMEOUT)?.map_err(|e| {
            anyhow!(
                "the guest released disk '{id}', but QEMU kept its image open ({e}); it stays recorded: run '{again}' again"
            )
        })?;
    }
    out.detached = has_device || has_node;
    Ok(())
}

/// Subscribes first, then `device_del`, then waits for the guest's
/// `DEVICE_DELETED` for this id (QEMU also sends one for the virtio backend,
/// without `device`).
async fn unplug(inst: &Instance, id: &str, timeout: Duration) -> Result<Unplug> {
    let sock = inst.control();
    let mut events = client::subscribe(&sock).await?;
    let start = tokio::time::Instant::now();
    match client::qmp(&sock, "device_del", json!({ "id": id }), QUERY_TIMEOUT).await? {
        Ok(_) => {}
        Err(crate::qmp::QmpError::Qemu { class: crate::qmp::ErrorClass::DeviceNotFound, .. }) => {
            return Ok(Unplug::AlreadyGone)
        }
        Err(e) => bail!("QEMU refused to unplug '{id}': {e}"),
    }
    let released = async {
        while let Some(ev) = events.next().await {
            if ev.event == "DEVICE_DELETED" && ev.data.get("device").and_then(Value::as_str) == Some(id) {
                return true;
            }
        }
        false
    };
    match tokio::time::timeout(timeout, released).await {
        Ok(true) => Ok(Unplug::Released(start.elapsed())),
        Ok(false) => bail!("the VM stopped while waiting for the guest to release disk '{id}'"),
        Err(_) => Ok(Unplug::TimedOut),
    }
}

pub fn list(ctx: &Ctx) -> Result<DiskList> {
    let vm = Vm::if_running(ctx)?;
    let inst = ctx.existing()?;
    let rec = DevicesRecord::load(&inst)?;
    let live = vm.as_ref().map(live_disks).transpose()?.unwrap_or_default();
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
            format: r.format.clone(),
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
