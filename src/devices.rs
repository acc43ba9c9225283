//! Devices beyond the boot disk: disks hot-plugged over QMP onto the PCIe
//! root ports reserved at launch, extra 9p shares, and what was recorded in
//! devices.json to come back on the next launch.
//!
//! Disk changes follow Lima's hotplug: each QMP conversation is short, a
//! removal subscribes to events *before* `device_del` and then waits for the
//! guest's `DEVICE_DELETED` with a deadline. Until the guest has released a
//! device nothing else is undone, so a timeout leaves no half-removed disk.
//!
//! 9p shares cannot be hot-added: a `virtio-9p-pci` device needs an fsdev,
//! and fsdevs exist only from `-fsdev`/`-virtfs` at start-up. Neither QMP nor
//! HMP has `fsdev_add` (checked on QEMU 7.2 and 10.0: `device_add
//! virtio-9p-pci` answers "9pfs device couldn't find fsdev", HMP answers
//! "unknown command: 'fsdev_add'"). So `share add` records the share and it
//! appears at the next boot.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::control;
use crate::instance::{read_json, write_json, Instance};
use crate::lifecycle::{block_on, Ctx};
use crate::qemu::{ExtraDisk, Forward, Share};
use crate::vm::{Vm, QUERY_TIMEOUT};

/// PCIe root ports reserved at launch for hot-plugged disks (q35 cannot
/// hot-plug onto its root bus).
pub const HOTPLUG_PORTS: u32 = 4;

/// The boot disk's device id (its node is `disk0`).
const BOOT_DISK_DEVICE: &str = "disk0-dev";

/// devices.json: runtime additions that persist across launches.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Recorded {
    #[serde(default)]
    pub disks: Vec<ExtraDisk>,
    #[serde(default)]
    pub shares: Vec<Share>,
    #[serde(default)]
    pub forwards: Vec<Forward>,
}

impl Recorded {
    pub fn load(inst: &Instance) -> Result<Recorded> {
        Ok(read_json(&inst.devices())?.unwrap_or_default())
    }

    pub fn save(&self, inst: &Instance) -> Result<()> {
        write_json(&inst.devices(), self)
    }

    /// Disk images the tool created (under the instance's disks dir); a file
    /// the user gave to `disk add FILE` is never among them.
    pub fn created_files(&self, inst: &Instance) -> Vec<PathBuf> {
        let dir = inst.disks_dir();
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).filter(|p| p.starts_with(&dir)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Serialises one instance's device changes: the read-modify-write of
/// devices.json and the choice of a free root port. Released on drop.
pub fn edit_lock(inst: &Instance) -> Result<File> {
    crate::instance::lock_file(&inst.devices_lock())
}

// ---------------------------------------------------------------- pure parts

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// What an image's first bytes say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// qcow2; `backing` is its backing file's format when it has one
    /// (`Some(None)`: a backing file without a recorded format).
    Qcow2 {
        backing: Option<Option<String>>,
    },
    Other,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// qcow2 header extension "backing file format name".
const QCOW2_EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Reads a qcow2 header (docs/interop/qcow2.txt in QEMU): magic, version,
/// backing file offset, and for a backing file the format extension that
/// spares QEMU from probing it.
pub fn inspect_header(b: &[u8]) -> Header {
    if b.len() < 4 || &b[..4] != QCOW2_MAGIC {
        return Header::Other;
    }
    if be64(b, 8).unwrap_or(0) == 0 {
        return Header::Qcow2 { backing: None };
    }
    // Version 2 headers are 72 bytes; version 3 states its length at 100.
    let mut at = match be32(b, 4) {
        Some(2) => 72,
        _ => be32(b, 100).unwrap_or(104) as usize,
    };
    let mut format = None;
    while let (Some(kind), Some(len)) = (be32(b, at), be32(b, at + 4)) {
        if kind == 0 {
            break;
        }
        let data = at + 8;
        if kind == QCOW2_EXT_BACKING_FORMAT {
            format = b.get(data..data + len as usize).map(|d| String::from_utf8_lossy(d).into_owned());
        }
        at = data + (len as usize).div_ceil(8) * 8;
    }
    Header::Qcow2 { backing: Some(format) }
}

/// Refuses an image QEMU would misread: a non-qcow2 file given as qcow2
/// (the default), a qcow2 given as raw (the guest would see the container),
/// or a qcow2 whose backing file QEMU would have to probe.
pub fn check_image(path: &Path, format: DiskFormat) -> Result<()> {
    let mut head = Vec::new();
    File::open(path)
        .with_context(|| format!("cannot read disk image {}", path.display()))?
        .take(64 * 1024)
        .read_to_end(&mut head)?;
    match (format, inspect_header(&head)) {
        (DiskFormat::Qcow2, Header::Other) => bail!(
            "{} is not a qcow2 image (no qcow2 header); if it is a raw disk image, pass --format raw",
            path.display()
        ),
        (DiskFormat::Qcow2, Header::Qcow2 { backing: Some(None) }) => bail!(
            "{} has a backing file but does not record its format, so QEMU would have to guess it; record it with \
             'qemu-img rebase -u -F FORMAT -b BACKING {}'",
            path.display(),
            path.display()
        ),
        (DiskFormat::Raw, Header::Qcow2 { .. }) => bail!(
            "{} is a qcow2 image, not raw: drop --format raw (the guest would see the qcow2 container as its disk)",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Disk and share ids become QEMU ids and node names: a letter, then
/// letters, digits, '-' and '_'; at most 31 characters.
pub fn validate_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 31
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        bail!("invalid {what} {id:?}: use 1-31 letters, digits, '-' and '_', starting with a letter");
    }
    if what == "disk id" && (id.starts_with("disk0") || id.ends_with("-file") || id.starts_with("hp")) {
        bail!("disk id {id:?} is reserved for qbuf-qemu's own devices: choose another, e.g. 'data'");
    }
    Ok(())
}

/// `20G`, `512M`, `1T`, `100K`: a new disk's size in bytes. A bare number is
/// MiB, as for `--memory`.
pub fn parse_disk_size(s: &str) -> Result<u64> {
    let mib = crate::config::parse_mib(s).with_context(|| format!("--size {s:?}"))?;
    if mib == 0 {
        bail!("--size {s:?} is too small: a disk needs at least 1M");
    }
    Ok(mib * 1024 * 1024)
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

/// One disk QEMU has, from `query-block`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveDisk {
    /// The device id (`disk0-dev` is the boot disk).
    pub id: String,
    pub node: String,
    pub file: String,
    pub format: String,
    pub read_only: bool,
}

/// `query-block` entries with a medium; the id comes from the qdev path
/// (`/machine/peripheral/ID/virtio-backend`).
pub fn parse_query_block(blocks: &Value) -> Vec<LiveDisk> {
    let Some(list) = blocks.as_array() else { return vec![] };
    list.iter()
        .filter_map(|b| {
            let ins = b.get("inserted")?;
            let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
            let qdev = s(b.get("qdev"));
            let id = qdev
                .strip_prefix("/machine/peripheral/")
                .map(|r| r.split('/').next().unwrap_or(r).to_string())
                .unwrap_or_else(|| if qdev.is_empty() { s(b.get("device")) } else { qdev.clone() });
            Some(LiveDisk {
                id,
                node: s(ins.get("node-name")),
                file: s(ins.get("file")),
                format: s(ins.get("drv")),
                read_only: ins.get("ro").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect()
}

/// One `query-block` entry as `{device, node, file, format, summary}` for `status`.
pub fn summarize_block(b: &Value) -> Value {
    let Some(d) = parse_query_block(&Value::Array(vec![b.clone()])).pop() else {
        return json!({ "device": "?", "node": "-", "file": "(empty)", "format": "-", "summary": "(empty)" });
    };
    json!({
        "device": d.id,
        "node": d.node,
        "file": d.file,
        "format": d.format,
        "summary": format!("{} ({}) {} [{}]", d.node, d.format, d.file, d.id),
    })
}

// ---------------------------------------------------------------- live state

/// The disks QEMU has now.
pub fn live_disks(vm: &Vm) -> Result<Vec<LiveDisk>> {
    Ok(parse_query_block(&vm.execute("query-block", json!({}))?))
}

/// For each reserved root port `hpN`, whether a device sits on it. QOM is
/// asked rather than `query-pci`, which lists a bridge's devices only once
/// the guest has numbered its buses.
pub fn used_ports(vm: &Vm, ports: u32) -> Result<Vec<bool>> {
    (0..ports)
        .map(|i| {
            let props = vm.execute("qom-list", json!({ "path": format!("/machine/peripheral/hp{i}/hp{i}") }))?;
            Ok(props.as_array().is_some_and(|a| {
                a.iter().any(|p| p.get("name").and_then(Value::as_str).is_some_and(|n| n.starts_with("child[")))
            }))
        })
        .collect()
}

fn block_nodes(vm: &Vm) -> Result<Vec<String>> {
    let v = vm.execute("query-named-block-nodes", json!({ "flat": true }))?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|n| n.get("node-name")?.as_str().map(String::from)).collect())
        .unwrap_or_default())
}

fn peripherals(vm: &Vm) -> Result<Vec<String>> {
    let v = vm.execute("qom-list", json!({ "path": "/machine/peripheral" }))?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p.get("type").and_then(Value::as_str).is_some_and(|t| t.starts_with("child<")))
                .filter_map(|p| p.get("name")?.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

// ---------------------------------------------------------------- disk add

#[derive(Debug, Clone)]
pub struct DiskAdd {
    pub file: Option<PathBuf>,
    pub size: Option<String>,
    pub id: Option<String>,
    pub format: Option<DiskFormat>,
    pub transient: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskAdded {
    pub name: String,
    pub id: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    /// Made by `--size` in the instance's disks dir (destroy deletes it).
    pub created: bool,
    /// Attached to the running VM now.
    pub attached: bool,
    pub port: Option<String>,
    /// Where the guest probably sees it.
    pub guest_device: Option<String>,
    /// In devices.json: attached again at every launch.
    pub recorded: bool,
}

impl DiskAdded {
    pub fn human(&self) -> String {
        let mut s = if self.attached {
            format!(
                "Disk '{}' attached: {} ({}) on hot-plug port {}.\nIn the guest it is probably {} (virtio disks are named in order; check with lsblk).",
                self.id,
                self.path.display(),
                self.format.as_str(),
                self.port.as_deref().unwrap_or("?"),
                self.guest_device.as_deref().unwrap_or("the next virtio disk")
            )
        } else {
            format!(
                "Disk '{}' recorded: {} ({}); instance '{}' is not running, it is attached at the next launch.",
                self.id,
                self.path.display(),
                self.format.as_str(),
                self.name
            )
        };
        if self.created {
            s.push_str(&format!("\nCreated {} (deleted by 'qbuf-qemu destroy').", self.path.display()));
        }
        if self.attached {
            s.push_str(if self.recorded {
                "\nRecorded: it is attached again at the next launch."
            } else {
                "\n--transient: it is not attached again at the next launch."
            });
        }
        s.push_str(&format!("\nRemove it with: qbuf-qemu --name {} disk remove {}", self.name, self.id));
        s
    }
}

pub fn add_disk(ctx: &Ctx, req: &DiskAdd) -> Result<DiskAdded> {
    let vm = Vm::if_running(ctx)?;
    let inst = ctx.existing()?;
    if vm.is_none() && req.transient {
        bail!(
            "instance '{}' is not running, and a --transient disk is never recorded: launch it first, or drop --transient",
            ctx.name
        );
    }
    let _lock = edit_lock(&inst)?;
    let mut rec = Recorded::load(&inst)?;
    let live = vm.as_ref().map(live_disks).transpose()?.unwrap_or_default();
    let mut taken: Vec<String> =
        rec.disks.iter().map(|d| d.id.clone()).chain(live.iter().map(|d| d.id.clone())).collect();
    if let Some(vm) = &vm {
        taken.extend(peripherals(vm)?);
        taken.extend(block_nodes(vm)?);
    }
    let id = match &req.id {
        Some(id) => {
            validate_id("disk id", id)?;
            if taken.contains(id) {
                bail!(
                    "there is already a disk or device '{id}': choose another --id ('qbuf-qemu disk list' shows them)"
                );
            }
            id.clone()
        }
        None => {
            // A `--size` image is named after its id, so its id skips the
            // names of images there; an image from there keeps its name.
            let stem = |p: &Path| p.file_stem()?.to_str().map(String::from);
            let existing: Vec<String> = std::fs::read_dir(inst.disks_dir())
                .map(|rd| rd.filter_map(|e| stem(&e.ok()?.path())).collect())
                .unwrap_or_default();
            let own = req
                .file
                .as_deref()
                .and_then(|f| std::fs::canonicalize(f).ok())
                .filter(|f| f.starts_with(inst.disks_dir()));
            match own.as_deref().and_then(stem) {
                Some(name) if validate_id("disk id", &name).is_ok() && !taken.contains(&name) => name,
                _ => next_disk_id(&[taken.clone(), existing].concat()),
            }
        }
    };
    if vm.is_none() && rec.disks.len() as u32 >= HOTPLUG_PORTS {
        bail!(
            "instance '{}' already has {HOTPLUG_PORTS} recorded disks, one per hot-plug port: remove one first",
            ctx.name
        );
    }

    let format = req.format.unwrap_or(DiskFormat::Qcow2);
    let (path, created) = match (&req.file, &req.size) {
        (Some(f), None) => {
            let p = std::fs::canonicalize(f).with_context(|| format!("disk image {} does not exist", f.display()))?;
            if !p.is_file() {
                bail!("{} is not a file: give a disk image", p.display());
            }
            check_image(&p, format)?;
            let in_use = p == inst.overlay()
                || rec.disks.iter().any(|d| d.path == p)
                || live.iter().any(|d| Path::new(&d.file) == p);
            if in_use {
                bail!(
                    "{} is already attached to instance '{}' ('qbuf-qemu disk list' shows it)",
                    p.display(),
                    ctx.name
                );
            }
            (p, false)
        }
        (None, Some(size)) => (create_image(&inst, &id, format, parse_disk_size(size)?)?, true),
        _ => bail!("give either an image FILE or --size SIZE for a new disk"),
    };
    let undo_file = || {
        if created {
            let _ = std::fs::remove_file(&path);
        }
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
    };
    if let Some(vm) = &vm {
        match hotplug(vm, &id, &path, format) {
            Ok(port) => {
                out.attached = true;
                out.port = Some(port);
                out.guest_device = Some(guest_device_hint(live.len()));
            }
            Err(e) => {
                undo_file();
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

fn create_image(inst: &Instance, id: &str, format: DiskFormat, bytes: u64) -> Result<PathBuf> {
    crate::instance::private_dir(&inst.disks_dir())?;
    let ext = if format == DiskFormat::Qcow2 { "qcow2" } else { "img" };
    let path = inst.disks_dir().join(format!("{id}.{ext}"));
    if path.exists() {
        bail!(
            "{} already exists: attach it with 'qbuf-qemu disk add {}', or choose another --id",
            path.display(),
            path.display()
        );
    }
    let img = crate::host::qemu_binaries()?.img;
    let out = std::process::Command::new(&img)
        .args(["create", "-q", "-f", format.as_str()])
        .arg(&path)
        .arg(bytes.to_string())
        .output()
        .with_context(|| format!("cannot run {}", img.display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&path);
        bail!("qemu-img could not create {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// `blockdev-add` (format given, never probed) then `device_add` on the first
/// free root port; undoes the first when the second fails.
fn hotplug(vm: &Vm, id: &str, path: &Path, format: DiskFormat) -> Result<String> {
    let info = vm.info()?;
    let used = used_ports(vm, info.hotplug_ports)?;
    let Some(free) = used.iter().position(|u| !u) else {
        bail!(
            "all {} hot-plug ports of instance '{}' are in use: remove a disk first ('qbuf-qemu disk list', 'qbuf-qemu disk remove ID')",
            used.len(),
            vm.name
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
        let _ = vm.execute("blockdev-del", json!({ "node-name": id }));
        return Err(e);
    }
    Ok(port)
}

// ---------------------------------------------------------------- disk remove

#[derive(Debug, Clone, Serialize)]
pub struct DiskRemoved {
    pub name: String,
    pub id: String,
    /// The guest released it now (`DEVICE_DELETED`), or it was already gone.
    pub detached: bool,
    /// Seconds the guest took to release it.
    pub seconds: Option<f64>,
    /// Dropped from devices.json.
    pub unrecorded: bool,
    /// The image, which is never deleted here.
    pub path: Option<PathBuf>,
}

impl DiskRemoved {
    pub fn human(&self) -> String {
        let mut s = match (self.detached, self.seconds) {
            (true, Some(t)) => format!("Disk '{}' detached: the guest released it after {t:.1}s.", self.id),
            (true, None) => format!("Disk '{}' detached.", self.id),
            (false, _) => format!("Disk '{}' removed from the record; it was not attached.", self.id),
        };
        if self.unrecorded && self.detached {
            s.push_str(" It is no longer attached at launch.");
        }
        if let Some(p) = &self.path {
            s.push_str(&format!(
                "\nIts image stays at {} ('qbuf-qemu disk add {}' attaches it again).",
                p.display(),
                p.display()
            ));
        }
        s
    }
}

/// How a `device_del` ended.
enum Unplug {
    Released(Duration),
    AlreadyGone,
    TimedOut,
}

pub fn remove_disk(ctx: &Ctx, id: &str, timeout: Duration) -> Result<DiskRemoved> {
    if id == BOOT_DISK_DEVICE || id == "disk0" {
        bail!("'{id}' is the boot disk; it cannot be removed");
    }
    let vm = Vm::if_running(ctx)?;
    let inst = ctx.existing()?;
    let _lock = edit_lock(&inst)?;
    let mut rec = Recorded::load(&inst)?;
    let recorded = rec.disks.iter().find(|d| d.id == id).cloned();
    let mut out = DiskRemoved {
        name: ctx.name.clone(),
        id: id.into(),
        detached: false,
        seconds: None,
        unrecorded: false,
        path: None,
    };
    if let Some(vm) = &vm {
        let live = live_disks(vm)?.into_iter().find(|d| d.id == id);
        out.path = live.as_ref().map(|d| PathBuf::from(&d.file));
        let has_node = block_nodes(vm)?.iter().any(|n| n == id);
        // Only a disk's device: never unplug another device by its id.
        let is_disk = live.is_some() || has_node || recorded.is_some();
        let has_device = is_disk && peripherals(vm)?.iter().any(|p| p == id);
        if !is_disk {
            bail!("instance '{}' has no disk '{id}' ('qbuf-qemu disk list' shows its disks)", ctx.name);
        }
        if has_device {
            match block_on(unplug(&vm.inst, id, timeout))? {
                Unplug::Released(t) => out.seconds = Some(t.as_secs_f64()),
                Unplug::AlreadyGone => {}
                Unplug::TimedOut => bail!(
                    "the guest did not release disk '{id}' within {}s (it may still be in use in the guest, or the guest \
                     ignores unplug requests). Nothing was removed: the disk stays attached and recorded, and QEMU keeps \
                     its image open. The guest may still release it later; unmount it in the guest and run \
                     'qbuf-qemu --name {} disk remove {id}' again (a larger --timeout waits longer)",
                    timeout.as_secs(),
                    ctx.name
                ),
            }
        }
        if has_node {
            vm.call("blockdev-del", json!({ "node-name": id }), QUERY_TIMEOUT)?.map_err(|(class, desc)| {
                anyhow!(
                    "the guest released disk '{id}', but QEMU kept its image open ({class}: {desc}); it stays recorded: \
                     run 'qbuf-qemu --name {} disk remove {id}' again",
                    ctx.name
                )
            })?;
        }
        out.detached = has_device || has_node;
    } else if recorded.is_none() {
        bail!("instance '{}' has no recorded disk '{id}' ('qbuf-qemu disk list' shows its disks)", ctx.name);
    }
    if let Some(r) = recorded {
        rec.disks.retain(|d| d.id != id);
        rec.save(&inst)?;
        out.unrecorded = true;
        out.path = Some(r.path);
    }
    Ok(out)
}

/// Subscribes first, then `device_del`, then waits for the guest's
/// `DEVICE_DELETED` for this id (QEMU also sends one for the virtio backend,
/// without `device`).
async fn unplug(inst: &Instance, id: &str, timeout: Duration) -> Result<Unplug> {
    let sock = inst.control();
    let mut events = control::subscribe(&sock).await?;
    let start = tokio::time::Instant::now();
    match control::qmp(&sock, "device_del", json!({ "id": id }), QUERY_TIMEOUT).await? {
        Ok(_) => {}
        Err((class, _)) if class == "DeviceNotFound" => return Ok(Unplug::AlreadyGone),
        Err((class, desc)) => bail!("QEMU refused to unplug '{id}': {class}: {desc}"),
    }
    let released = async {
        while let Some(ev) = control::next_event(&mut events).await {
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

// ---------------------------------------------------------------- disk list

#[derive(Debug, Clone, Serialize)]
pub struct DiskEntry {
    pub id: String,
    pub file: String,
    pub format: String,
    pub node: Option<String>,
    pub read_only: bool,
    pub boot: bool,
    /// In devices.json (attached at launch).
    pub recorded: bool,
    /// Attached to the running VM now.
    pub attached: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskList {
    pub name: String,
    pub running: bool,
    pub disks: Vec<DiskEntry>,
}

impl DiskList {
    pub fn human(&self) -> String {
        let mut s = String::new();
        if !self.running {
            s.push_str(&format!("Instance '{}' is not running; disks recorded for its next launch:\n", self.name));
        }
        if self.disks.is_empty() {
            s.push_str("(no disks)");
        }
        for d in &self.disks {
            let what = match (d.boot, d.recorded, d.attached) {
                (true, _, _) => "boot disk",
                (_, true, true) => "attached, recorded",
                (_, false, true) => "attached, transient",
                (_, true, false) => "recorded, attached at next launch",
                _ => "",
            };
            let ro = if d.read_only { ", read-only" } else { "" };
            s.push_str(&format!("{:<12} {:<6} {}  [{what}{ro}]\n", d.id, d.format, d.file));
        }
        s.trim_end().to_string()
    }
}

pub fn list_disks(ctx: &Ctx) -> Result<DiskList> {
    let vm = Vm::if_running(ctx)?;
    let inst = ctx.existing()?;
    let rec = Recorded::load(&inst)?;
    let live = vm.as_ref().map(live_disks).transpose()?.unwrap_or_default();
    let mut disks: Vec<DiskEntry> = live
        .iter()
        .map(|d| DiskEntry {
            id: d.id.clone(),
            file: d.file.clone(),
            format: d.format.clone(),
            node: Some(d.node.clone()),
            read_only: d.read_only,
            boot: d.id == BOOT_DISK_DEVICE,
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

// ---------------------------------------------------------------- shares

/// What `share add`/`share remove` did.
#[derive(Debug, Clone, Serialize)]
pub struct ShareChanged {
    pub name: String,
    pub tag: String,
    pub path: PathBuf,
    pub readonly: bool,
    pub added: bool,
    /// The VM runs now; the change applies at its next boot.
    pub running: bool,
}

impl ShareChanged {
    pub fn human(&self) -> String {
        let ro = if self.readonly { ", read-only" } else { "" };
        if self.added {
            let when = if self.running {
                format!(
                    "QEMU cannot add a 9p share to a running VM (no fsdev_add in QMP or HMP), so it appears at the next boot: \
                     qbuf-qemu --name {} powerdown && qbuf-qemu --name {} launch",
                    self.name, self.name
                )
            } else {
                "It appears at the next launch.".into()
            };
            format!(
                "Share '{}' recorded: {}{ro}.\n{when}\nIn the guest: sudo mkdir -p /mnt/{} && sudo mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 {} /mnt/{}",
                self.tag,
                self.path.display(),
                self.tag,
                self.tag,
                self.tag
            )
        } else if self.running {
            format!(
                "Share '{}' ({}) removed from the record; the running VM keeps it until it powers off.",
                self.tag,
                self.path.display()
            )
        } else {
            format!("Share '{}' ({}) removed; it is not shared at the next launch.", self.tag, self.path.display())
        }
    }
}

/// The default share's tag (mounted at /mnt/qbuf by the guest).
const DEFAULT_SHARE_TAG: &str = "qbuf";

/// Records a share for the next boot. There is no `--transient`: a share
/// that is not recorded would never appear (see the module comment).
pub fn add_share(ctx: &Ctx, dir: &Path, tag: &str, readonly: bool) -> Result<ShareChanged> {
    validate_id("share tag", tag)?;
    if tag == DEFAULT_SHARE_TAG {
        bail!(
            "tag '{DEFAULT_SHARE_TAG}' is the default share's (set it with 'launch --share DIR'): choose another tag"
        );
    }
    let running = Vm::if_running(ctx)?.is_some();
    let inst = ctx.existing()?;
    let path =
        std::fs::canonicalize(dir).with_context(|| format!("share directory {} does not exist", dir.display()))?;
    if !path.is_dir() {
        bail!("{} is not a directory: give a directory to share", path.display());
    }
    let _lock = edit_lock(&inst)?;
    let mut rec = Recorded::load(&inst)?;
    if rec.shares.iter().any(|s| s.tag == tag) {
        bail!("instance '{}' already has a share tagged '{tag}': remove it first, or choose another tag", ctx.name);
    }
    rec.shares.push(Share { path: path.clone(), tag: tag.into(), readonly });
    rec.save(&inst)?;
    Ok(ShareChanged { name: ctx.name.clone(), tag: tag.into(), path, readonly, added: true, running })
}

pub fn remove_share(ctx: &Ctx, tag: &str) -> Result<ShareChanged> {
    if tag == DEFAULT_SHARE_TAG {
        bail!("'{DEFAULT_SHARE_TAG}' is the default share: stop sharing it with 'launch --no-share'");
    }
    let running = Vm::if_running(ctx)?.is_some();
    let inst = ctx.existing()?;
    let _lock = edit_lock(&inst)?;
    let mut rec = Recorded::load(&inst)?;
    let Some(i) = rec.shares.iter().position(|s| s.tag == tag) else {
        bail!("instance '{}' has no share tagged '{tag}' ('qbuf-qemu share list' shows them)", ctx.name);
    };
    let s = rec.shares.remove(i);
    rec.save(&inst)?;
    Ok(ShareChanged { name: ctx.name.clone(), tag: s.tag, path: s.path, readonly: s.readonly, added: false, running })
}

#[derive(Debug, Clone, Serialize)]
pub struct ShareEntry {
    pub tag: String,
    pub path: PathBuf,
    pub readonly: bool,
    /// The default share (`launch --share`), not in devices.json.
    pub default: bool,
    /// Shared with the running VM now (it was in its boot).
    pub live: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShareList {
    pub name: String,
    pub running: bool,
    pub shares: Vec<ShareEntry>,
}

impl ShareList {
    pub fn human(&self) -> String {
        if self.shares.is_empty() {
            return "(no shares)".into();
        }
        self.shares
            .iter()
            .map(|s| {
                let mut flags = vec![if s.readonly { "ro" } else { "rw" }];
                if s.default {
                    flags.push("default");
                }
                if self.running {
                    flags.push(if s.live { "live" } else { "next boot" });
                }
                format!("{:<12} {}  [{}]", s.tag, s.path.display(), flags.join(", "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub fn list_shares(ctx: &Ctx) -> Result<ShareList> {
    let running = Vm::if_running(ctx)?.is_some();
    let inst = ctx.existing()?;
    let settings: Option<crate::config::Settings> = read_json(&inst.settings())?;
    let booted: Vec<Share> = if running {
        read_json::<crate::supervisor::BootPlan>(&inst.boot_plan())?.map(|p| p.spec.shares).unwrap_or_default()
    } else {
        vec![]
    };
    let mut shares = Vec::new();
    if let Some(p) = settings.as_ref().and_then(|s| s.share.clone()) {
        let readonly = settings.as_ref().is_some_and(|s| s.share_mode == crate::config::ShareMode::Ro);
        shares.push(ShareEntry { tag: DEFAULT_SHARE_TAG.into(), path: p, readonly, default: true, live: false });
    }
    for s in Recorded::load(&inst)?.shares {
        shares.push(ShareEntry { tag: s.tag, path: s.path, readonly: s.readonly, default: false, live: false });
    }
    for s in &mut shares {
        s.live = booted.iter().any(|b| b.tag == s.tag && b.path == s.path && b.readonly == s.readonly);
    }
    Ok(ShareList { name: ctx.name.clone(), running, shares })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qbuf-dev-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn qemu_img(args: &[&str]) {
        let ok = std::process::Command::new("qemu-img").args(args).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "qemu-img {args:?} failed (is qemu-utils installed?)");
    }

    #[test]
    fn qcow2_is_the_default_and_a_raw_file_is_refused_without_format_raw() {
        let d = tmp("fmt");
        let raw = d.join("a.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let e = check_image(&raw, DiskFormat::Qcow2).unwrap_err().to_string();
        assert!(e.contains("not a qcow2 image") && e.contains("--format raw"), "{e}");
        check_image(&raw, DiskFormat::Raw).unwrap();
        let q = d.join("b.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"]);
        check_image(&q, DiskFormat::Qcow2).unwrap();
        let e = check_image(&q, DiskFormat::Raw).unwrap_err().to_string();
        assert!(e.contains("drop --format raw"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_backing_file_needs_its_format_recorded() {
        let d = tmp("backing");
        let base = d.join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let top = d.join("top.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", base.to_str().unwrap(), top.to_str().unwrap()]);
        let head = std::fs::read(&top).unwrap();
        assert_eq!(inspect_header(&head), Header::Qcow2 { backing: Some(Some("raw".into())) });
        check_image(&top, DiskFormat::Qcow2).unwrap();
        // A version 2 header naming a backing file but no format extension.
        let mut v2 = vec![0u8; 512];
        v2[..4].copy_from_slice(QCOW2_MAGIC);
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        v2[8..16].copy_from_slice(&200u64.to_be_bytes());
        assert_eq!(inspect_header(&v2), Header::Qcow2 { backing: Some(None) });
        let old = d.join("old.qcow2");
        std::fs::write(&old, &v2).unwrap();
        let e = check_image(&old, DiskFormat::Qcow2).unwrap_err().to_string();
        assert!(e.contains("qemu-img rebase -u -F"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn sizes_ids_and_hints() {
        assert_eq!(parse_disk_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_disk_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_disk_size("100").unwrap(), 100 << 20);
        assert!(parse_disk_size("lots").is_err());
        assert!(parse_disk_size("0").is_err());
        for ok in ["data", "disk1", "scratch_2", "a-b"] {
            validate_id("disk id", ok).unwrap();
        }
        for bad in ["", "1disk", "a b", "a,b", "disk0", "x-file", "hp0", &"a".repeat(32)] {
            assert!(validate_id("disk id", bad).is_err(), "{bad}");
        }
        assert_eq!(next_disk_id(&["disk1".into(), "disk3".into()]), "disk2");
        assert_eq!(guest_device_hint(1), "/dev/vdb");
        assert_eq!(guest_device_hint(0), "/dev/vda");
        assert_eq!(guest_device_hint(30), "the next virtio disk");
    }

    #[test]
    fn query_block_names_disks_by_device_id() {
        let v: Value = serde_json::from_str(
            r#"[{"device": "", "qdev": "/machine/peripheral/disk0-dev/virtio-backend",
                 "inserted": {"node-name": "disk0", "file": "/s/overlay.qcow2", "drv": "qcow2", "ro": false}},
                {"device": "", "qdev": "/machine/peripheral/data/virtio-backend",
                 "inserted": {"node-name": "data", "file": "/d/x.img", "drv": "raw", "ro": true}},
                {"device": "cd0", "qdev": "", "locked": false}]"#,
        )
        .unwrap();
        let d = parse_query_block(&v);
        assert_eq!(d.len(), 2, "an empty drive is not a disk");
        assert_eq!(d[0].id, BOOT_DISK_DEVICE);
        assert_eq!(
            d[1],
            LiveDisk {
                id: "data".into(),
                node: "data".into(),
                file: "/d/x.img".into(),
                format: "raw".into(),
                read_only: true
            }
        );
        assert_eq!(summarize_block(&v[1])["summary"], "data (raw) /d/x.img [data]");
    }
}
