//! What the device commands report: `disk`, `share` and `forward`.

use std::path::PathBuf;

use serde::Serialize;

use super::Render;
use crate::qemu::forward::Forward;
use crate::qemu::image::DiskFormat;

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
    #[serde(skip)]
    pub remove_command: String,
    #[serde(skip)]
    pub destroy_command: String,
}

impl Render for DiskAdded {
    fn human(&self) -> String {
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
            s.push_str(&format!("\nCreated {} (deleted by '{}').", self.path.display(), self.destroy_command));
        }
        if self.attached {
            s.push_str(if self.recorded {
                "\nRecorded: it is attached again at the next launch."
            } else {
                "\n--transient: it is not attached again at the next launch."
            });
        }
        s.push_str(&format!("\nRemove it with: {}", self.remove_command));
        s
    }
}

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
    /// How to attach it again; `None` when its file is gone.
    #[serde(skip)]
    pub attach_command: Option<String>,
}

impl Render for DiskRemoved {
    fn human(&self) -> String {
        let mut s = match (self.detached, self.seconds) {
            (true, Some(t)) => format!("Disk '{}' detached: the guest released it after {t:.1}s.", self.id),
            (true, None) => format!("Disk '{}' detached.", self.id),
            (false, _) => format!("Disk '{}' removed from the record; it was not attached.", self.id),
        };
        if self.unrecorded && self.detached {
            s.push_str(" It is no longer attached at launch.");
        }
        match (&self.path, &self.attach_command) {
            (Some(p), Some(c)) => {
                s.push_str(&format!("\nIts image stays at {} ('{c}' attaches it again).", p.display()))
            }
            (Some(p), None) => s.push_str(&format!("\nIts image {} no longer exists.", p.display())),
            _ => {}
        }
        s
    }
}

/// What the guest does after its boot disk grew: the partition table and
/// the root file system still have their old size.
pub const GROW_IN_GUEST_BOOT: &str = "in the guest, grow the root partition and its file system into the new space \
(the Guix image: 'sudo parted /dev/vda resizepart 2 100%' then 'sudo resize2fs /dev/vda2'; \
a guest with cloud-utils: 'sudo growpart /dev/vda 2')";

/// `disk resize`: a disk that grew (or already had the size).
#[derive(Debug, Clone, Serialize)]
pub struct DiskResized {
    pub name: String,
    pub id: String,
    pub path: PathBuf,
    pub from_bytes: u64,
    pub to_bytes: u64,
    /// Grown in the running VM (`block_resize`): the guest sees it now.
    pub live: bool,
    /// The boot disk (the instance's overlay).
    pub boot: bool,
}

impl Render for DiskResized {
    fn human(&self) -> String {
        use super::list::human_bytes;
        if self.from_bytes == self.to_bytes {
            return format!("Disk '{}' is already {}; nothing changed.", self.id, human_bytes(self.to_bytes));
        }
        let when = if self.live { "the guest sees the new size now" } else { "the guest sees it at the next boot" };
        let guest = if self.boot {
            GROW_IN_GUEST_BOOT.to_string()
        } else {
            "in the guest, grow what is on it: a file system on the whole disk with e.g. 'sudo resize2fs /dev/vdX', \
a partition first with 'sudo parted /dev/vdX resizepart N 100%'"
                .to_string()
        };
        format!(
            "Disk '{}' ({}) grew from {} to {}: {when}.\nOnly the disk grew: {guest}.",
            self.id,
            self.path.display(),
            human_bytes(self.from_bytes),
            human_bytes(self.to_bytes)
        )
    }
}

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

impl Render for DiskList {
    fn human(&self) -> String {
        let rows = self.disks.iter().map(|d| {
            let what = match (d.boot, d.recorded, d.attached) {
                (true, _, _) => "boot disk",
                (_, true, true) => "attached, recorded",
                (_, false, true) => "attached, transient",
                (_, true, false) => "recorded, attached at next launch",
                _ => "",
            };
            let ro = if d.read_only { ", read-only" } else { "" };
            format!("{:<12} {:<6} {}  [{what}{ro}]", d.id, d.format, d.file)
        });
        device_list(&self.name, self.running, "disks", "recorded for its next launch", rows)
    }
}

/// The frame every device list shares: a header when the VM is stopped
/// (the list is then what its next launch sets up), `(no NOUN)` when empty,
/// then one row per device.
fn device_list(
    name: &str,
    running: bool,
    noun: &str,
    when_stopped: &str,
    rows: impl Iterator<Item = String>,
) -> String {
    let mut lines = Vec::new();
    if !running {
        lines.push(format!("Instance '{name}' is not running; {noun} {when_stopped}:"));
    }
    let before = lines.len();
    lines.extend(rows);
    if lines.len() == before {
        lines.push(format!("(no {noun})"));
    }
    lines.join("\n")
}

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
    /// Powers it off and boots it again, for a change that needs a boot.
    #[serde(skip)]
    pub relaunch_command: String,
}

impl Render for ShareChanged {
    fn human(&self) -> String {
        let ro = if self.readonly { ", read-only" } else { "" };
        if self.added {
            let when = if self.running {
                format!(
                    "A share is added at boot (QEMU cannot add a 9p share to a running VM: no fsdev_add in QMP or HMP), so it appears at the next boot: {}",
                    self.relaunch_command
                )
            } else {
                "It appears at the next launch.".into()
            };
            format!(
                "Share '{tag}' recorded: {}{ro}.\n{when}\nIn the guest, over virtio-fs: sudo mkdir -p /mnt/{tag} && sudo mount -t virtiofs {tag} /mnt/{tag}\n\
                 or over 9p (--share-type 9p, or no virtiofsd): sudo mkdir -p /mnt/{tag} && sudo mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 {tag} /mnt/{tag}",
                self.path.display(),
                tag = self.tag,
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

#[derive(Debug, Clone, Serialize)]
pub struct ShareEntry {
    pub tag: String,
    pub path: PathBuf,
    pub readonly: bool,
    /// The default share (`launch --share`), not in devices.json.
    pub default: bool,
    /// Shared with the running VM now (it was in its boot).
    pub live: bool,
    /// No longer recorded, but the running VM keeps it until it powers off.
    pub removed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShareList {
    pub name: String,
    pub running: bool,
    pub shares: Vec<ShareEntry>,
}

impl Render for ShareList {
    fn human(&self) -> String {
        let rows = self.shares.iter().map(|s| {
            let mut flags = vec![if s.readonly { "ro" } else { "rw" }];
            if s.default {
                flags.push("default");
            }
            if s.removed {
                flags.push("removed, still attached until the next boot");
            } else if self.running {
                flags.push(if s.live { "live" } else { "next boot" });
            }
            format!("{:<12} {}  [{}]", s.tag, s.path.display(), flags.join(", "))
        });
        device_list(&self.name, self.running, "shares", "mounted at its next launch", rows)
    }
}

pub fn describe(f: &Forward) -> String {
    format!("{}:{} -> guest port {}/{}", f.host_addr, f.host_port, f.guest_port, f.proto())
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardChanged {
    pub name: String,
    pub forward: Forward,
    pub added: bool,
    /// Changed in the running VM now.
    pub live: bool,
    /// In devices.json (set up at every launch), after this change.
    pub recorded: bool,
}

impl Render for ForwardChanged {
    fn human(&self) -> String {
        let f = describe(&self.forward);
        match (self.added, self.live) {
            (true, true) if self.recorded => format!("Forwarding {f}. Recorded: set up again at the next launch."),
            (true, true) => format!("Forwarding {f} (--transient: not set up again at the next launch)."),
            (true, false) => {
                format!(
                    "Forward {f} recorded; instance '{}' is not running, it is set up at the next launch.",
                    self.name
                )
            }
            (false, true) => format!("Stopped forwarding {f}."),
            (false, false) => format!("Forward {f} removed from the record."),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardEntry {
    #[serde(flatten)]
    pub forward: Forward,
    /// The instance's own SSH forward.
    pub ssh: bool,
    pub recorded: bool,
    /// Set up in the running VM now.
    pub live: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardList {
    pub name: String,
    pub running: bool,
    pub forwards: Vec<ForwardEntry>,
}

impl Render for ForwardList {
    fn human(&self) -> String {
        let rows = self.forwards.iter().map(|e| {
            let what = match (e.ssh, e.recorded, e.live) {
                (true, _, _) => "ssh",
                (_, true, _) => "recorded",
                (_, false, true) => "transient",
                _ => "",
            };
            format!("{:<24} [{what}]", describe(&e.forward))
        });
        device_list(&self.name, self.running, "forwards", "set up at its next launch", rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_share_one_frame() {
        let stopped = ForwardList { name: "dev".into(), running: false, forwards: vec![] }.human();
        assert_eq!(stopped, "Instance 'dev' is not running; forwards set up at its next launch:\n(no forwards)");
        let running = ShareList { name: "dev".into(), running: true, shares: vec![] }.human();
        assert_eq!(running, "(no shares)");
    }
}
