//! Virtio disks on a running VM: what QEMU has attached, hot-plug onto the
//! PCIe root ports reserved at launch, and unplug once the guest let go.
//!
//! Disk changes follow Lima's hotplug: each QMP conversation is short, a
//! removal subscribes to events *before* `device_del` and then waits for the
//! guest's `DEVICE_DELETED` with a deadline. Until the guest has released a
//! device nothing else is undone, so a timeout leaves no half-removed disk.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::Vm;
use crate::qemu::image::DiskFormat;
use crate::qemu::parse::{self, LiveDisk};
use crate::qmp::{ErrorClass, QmpError};
use crate::runtime::block_on;
use crate::supervisor::client;
use crate::timeouts::QMP_QUERY;

/// The disks QEMU has now.
pub fn live(vm: &Vm) -> Result<Vec<LiveDisk>> {
    Ok(parse::parse_query_block(&vm.query("query-block", json!({}))?))
}

/// The names of QEMU's block nodes.
pub fn block_nodes(vm: &Vm) -> Result<Vec<String>> {
    Ok(parse::block_node_names(&vm.query("query-named-block-nodes", json!({ "flat": true }))?))
}

/// The ids of the devices added by id (`-device …,id=` or `device_add`).
pub fn peripherals(vm: &Vm) -> Result<Vec<String>> {
    Ok(parse::peripheral_ids(&vm.query("qom-list", json!({ "path": "/machine/peripheral" }))?))
}

/// For each reserved root port `hpN`, whether a device sits on it.
fn used_ports(vm: &Vm, ports: u32) -> Result<Vec<bool>> {
    (0..ports)
        .map(|i| {
            let v = vm.query("qom-list", json!({ "path": format!("/machine/peripheral/hp{i}/hp{i}") }))?;
            Ok(parse::port_has_device(&v))
        })
        .collect()
}

/// `blockdev-add` (format given, never probed) then `device_add` on the first
/// free root port, whose name is returned; undoes the first when the second
/// fails.
pub fn hotplug(vm: &Vm, id: &str, path: &Path, format: DiskFormat) -> Result<String> {
    let used = used_ports(vm, vm.hotplug_ports()?)?;
    let Some(free) = used.iter().position(|u| !u) else {
        bail!(
            "all {} hot-plug ports of instance '{}' are in use: remove a disk first ('{}', '{}')",
            used.len(),
            vm.inst.name,
            vm.inst.command("disk list"),
            vm.inst.command("disk remove ID")
        );
    };
    let port = format!("hp{free}");
    let filename = path.to_str().ok_or_else(|| anyhow!("{} is not valid UTF-8: rename it", path.display()))?;
    // blockdev-add's options are a union whose members grew between QEMU
    // 7.2 and 10.0; only these fields are sent, and they are in both.
    vm.query(
        "blockdev-add",
        json!({
            "driver": format.as_str(),
            "node-name": id,
            "file": { "driver": "file", "filename": filename, "node-name": format!("{id}-file") },
        }),
    )?;
    let added = vm.run(&qapi::qmp::device_add {
        driver: "virtio-blk-pci".into(),
        id: Some(id.into()),
        bus: Some(port.clone()),
        arguments: [("drive".to_string(), json!(id))].into_iter().collect(),
    });
    if let Err(e) = added {
        let _ = vm.run(&qapi::qmp::blockdev_del { node_name: id.to_string() });
        return Err(e);
    }
    Ok(port)
}

/// How a disk's removal from a running VM ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detached {
    /// How long the guest took to release its device (none if it had none).
    pub released_after: Option<Duration>,
    /// Whether QEMU had a device or a block node by that id.
    pub detached: bool,
}

/// Unplugs disk `id` from the running VM once the guest released it, then
/// drops its block node. `known`: the id is a disk the caller knows of (in
/// the record, or in `query-block`); else only a block node makes it one.
pub fn detach(vm: &Vm, id: &str, known: bool, timeout: Duration) -> Result<Detached> {
    let has_node = block_nodes(vm)?.iter().any(|n| n == id);
    // Only a disk's device: never unplug another device by its id.
    if !known && !has_node {
        bail!("instance '{}' has no disk '{id}' ('{}' shows its disks)", vm.inst.name, vm.inst.command("disk list"));
    }
    let has_device = peripherals(vm)?.iter().any(|p| p == id);
    let again = vm.inst.command(&format!("disk remove {id}"));
    let mut released_after = None;
    if has_device {
        match block_on(unplug(vm, id, timeout))? {
            Unplug::Released(t) => released_after = Some(t),
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
        vm.run(&qapi::qmp::blockdev_del { node_name: id.into() }).map_err(|e| {
            anyhow!(
                "the guest released disk '{id}', but QEMU kept its image open ({e:#}); it stays recorded: run '{again}' again"
            )
        })?;
    }
    Ok(Detached { released_after, detached: has_device || has_node })
}

/// How a `device_del` ended.
enum Unplug {
    Released(Duration),
    AlreadyGone,
    TimedOut,
}

/// Subscribes first, then `device_del`, then waits for the guest's
/// `DEVICE_DELETED` for this id (QEMU also sends one for the virtio backend,
/// without `device`).
async fn unplug(vm: &Vm, id: &str, timeout: Duration) -> Result<Unplug> {
    let sock = vm.inst.control();
    let mut events = client::subscribe(&sock).await?;
    let start = tokio::time::Instant::now();
    match client::qmp(&sock, "device_del", json!({ "id": id }), QMP_QUERY).await? {
        Ok(_) => {}
        Err(QmpError::Qemu { class: ErrorClass::DeviceNotFound, .. }) => return Ok(Unplug::AlreadyGone),
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
