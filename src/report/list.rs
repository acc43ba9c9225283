//! What `list` reports: every instance in one table, like `limactl list`.

use std::path::PathBuf;

use serde::Serialize;

use super::status::{RunMark, State};
use super::Render;
use crate::clock::human_duration;
use crate::config::Source;

/// How an instance boots, in a few words for a table (`status` and `show`
/// give the whole path).
pub fn boot_summary(s: &Source) -> String {
    let file = |p: &std::path::Path| p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    match s {
        Source::Image { path } => format!("image {}", file(path)),
        Source::Kernel { kernel, image: Some(i), .. } => format!("kernel {} + image {}", file(kernel), file(i)),
        Source::Kernel { kernel, .. } => format!("kernel {}", file(kernel)),
        Source::Guix { image_size, .. } => format!("guix ({image_size})"),
    }
}

/// Bytes for people: `512 B`, `3.4 MiB`, `1.2 GiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceLine {
    pub name: String,
    pub state: State,
    /// QEMU's pid while it runs.
    pub pid: Option<i32>,
    pub ssh_port: Option<u16>,
    /// How it boots (`boot_summary`, or the snapshot a run started it
    /// from); `None` before its first launch saved settings.
    pub boot: Option<String>,
    /// Set when `run` started the instance.
    pub run: Option<RunMark>,
    pub uptime_seconds: Option<f64>,
    /// Bytes the instance's files take on the host (allocated, so a sparse
    /// overlay counts what it really uses), its created disks included.
    pub disk_bytes: u64,
    /// Why the instance's state cannot be told (a record that cannot be
    /// read: which, and what to do), or null.
    pub damaged: Option<String>,
}

impl InstanceLine {
    /// An instance whose records cannot be read: `why` names the file.
    pub fn damaged(name: String, why: String, disk_bytes: u64) -> InstanceLine {
        InstanceLine {
            name,
            state: super::status::State::Damaged,
            pid: None,
            ssh_port: None,
            boot: None,
            run: None,
            uptime_seconds: None,
            disk_bytes,
            damaged: Some(why),
        }
    }
}

/// The BOOT cell: how it boots, and a run's instance marked as such.
fn boot_cell(i: &InstanceLine) -> String {
    let boot = i.boot.clone().unwrap_or_else(|| "-".into());
    match &i.run {
        Some(r) if r.throwaway => format!("{boot} (run pid {}, removed with it)", r.pid),
        Some(r) => format!("{boot} (kept by run pid {})", r.pid),
        None => boot,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceList {
    pub state_dir: PathBuf,
    pub instances: Vec<InstanceLine>,
    /// How to make one, when there is none.
    #[serde(skip)]
    pub launch_command: String,
}

impl Render for InstanceList {
    fn human(&self) -> String {
        if self.instances.is_empty() {
            return format!("No instances in {}. Create one with '{}'.", self.state_dir.display(), self.launch_command);
        }
        let dash = || "-".to_string();
        let rows: Vec<[String; 7]> = self
            .instances
            .iter()
            .map(|i| {
                [
                    i.name.clone(),
                    i.state.as_str().to_string(),
                    i.pid.map(|p| p.to_string()).unwrap_or_else(dash),
                    i.ssh_port.map(|p| p.to_string()).unwrap_or_else(dash),
                    i.uptime_seconds.map(human_duration).unwrap_or_else(dash),
                    human_bytes(i.disk_bytes),
                    boot_cell(i),
                ]
            })
            .collect();
        let header = ["NAME", "STATE", "PID", "SSH", "UPTIME", "DISK", "BOOT"].map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let table = std::iter::once(&header).chain(&rows).map(|r| {
            let cells: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            cells.join("  ").trim_end().to_string()
        });
        let damage = self.instances.iter().filter_map(|i| Some(format!("{}: {}", i.name, i.damaged.as_ref()?)));
        table.chain(damage).collect::<Vec<_>>().join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_boot_sources_read_short() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes((1 << 30) + (1 << 29)), "1.5 GiB");
        let k = Source::Kernel { kernel: "/g/vmlinux".into(), initrd: "/g/i".into(), append: None, image: None };
        assert_eq!(boot_summary(&k), "kernel vmlinux");
        assert_eq!(boot_summary(&Source::Image { path: "/x/disk.qcow2".into() }), "image disk.qcow2");
    }

    #[test]
    fn the_table_lines_up_and_an_empty_list_says_how_to_start() {
        let line = |name: &str, state| InstanceLine {
            name: name.into(),
            state,
            pid: None,
            ssh_port: Some(10022),
            boot: None,
            run: None,
            uptime_seconds: None,
            disk_bytes: 0,
            damaged: None,
        };
        let l = InstanceList {
            state_dir: "/s".into(),
            instances: vec![line("dev", State::Stopped), line("review-2", State::Running)],
            launch_command: "qbuf-qemu launch".into(),
        };
        let text = l.human();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME      STATE"), "{text}");
        assert!(lines[2].starts_with("review-2  running  -    10022"), "{text}");
        let empty = InstanceList { instances: vec![], ..l };
        assert!(empty.human().contains("qbuf-qemu launch"));
    }

    #[test]
    fn a_runs_instance_is_marked_with_its_run_and_snapshot() {
        use crate::instance::records::SnapshotOrigin;
        let from = SnapshotOrigin { instance: "dev".into(), snapshot: "ci".into() };
        let mut line = InstanceLine {
            name: "run-1".into(),
            state: State::Running,
            pid: None,
            ssh_port: None,
            boot: Some("snapshot dev/ci".into()),
            run: Some(RunMark { pid: 42, throwaway: true, from_snapshot: Some(from) }),
            uptime_seconds: None,
            disk_bytes: 0,
            damaged: None,
        };
        assert_eq!(boot_cell(&line), "snapshot dev/ci (run pid 42, removed with it)");
        let mark = line.run.as_mut().unwrap();
        mark.throwaway = false;
        assert!(mark.describe().starts_with("kept by run pid 42, started from snapshot 'ci' of instance 'dev'"));
        assert_eq!(boot_cell(&line), "snapshot dev/ci (kept by run pid 42)");
    }
}
