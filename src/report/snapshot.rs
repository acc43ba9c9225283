//! What the `snapshot` verbs report.

use serde::Serialize;

use super::Render;

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotEntry {
    pub name: String,
    pub created_at: f64,
    pub qemu_version: String,
    /// The size of the saved memory and device state.
    pub state_bytes: u64,
    /// How long the save took.
    pub seconds: f64,
    /// The shares (9p or virtio-fs) unmounted for the save and mounted again on resume.
    pub shares: Vec<String>,
    /// Why the snapshot cannot be loaded (its files differ from what the
    /// save wrote, or its record is missing or unreadable), or null.
    pub damaged: Option<String>,
    /// Whether the fields above come from its record (snapshot.json); a
    /// directory without a readable one shows only its name and damage.
    #[serde(skip)]
    pub recorded: bool,
}

impl SnapshotEntry {
    fn line(&self) -> String {
        if !self.recorded {
            let why = self.damaged.as_deref().unwrap_or_default();
            return format!("{:<16} DAMAGED: {why}", self.name);
        }
        let mut l = format!(
            "{:<16} {}  {:>5.0} MiB state, saved in {:.2}s, QEMU {}",
            self.name,
            crate::clock::utc_time(self.created_at),
            self.state_bytes as f64 / (1 << 20) as f64,
            self.seconds,
            self.qemu_version
        );
        if let Some(why) = &self.damaged {
            l.push_str(&format!("  DAMAGED: {why}"));
        }
        l
    }
}

/// What a `snapshot` verb did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotAction {
    Saved,
    Deleted,
}

impl SnapshotAction {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotAction::Saved => "saved",
            SnapshotAction::Deleted => "deleted",
        }
    }
}

/// `snapshot save` and `snapshot delete`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotDone {
    pub instance: String,
    /// `saved` or `deleted`.
    pub what: SnapshotAction,
    pub snapshot: SnapshotEntry,
    pub notes: Vec<String>,
    #[serde(skip)]
    pub load_command: String,
    #[serde(skip)]
    pub run_command: String,
}

impl Render for SnapshotDone {
    fn human(&self) -> String {
        let mut s =
            format!("Snapshot '{}' of instance '{}' {}.", self.snapshot.name, self.instance, self.what.as_str());
        if self.what == SnapshotAction::Saved {
            s.push_str(&format!("\n  {}", self.snapshot.line()));
            if !self.snapshot.shares.is_empty() {
                s.push_str(&format!(
                    "\n  the guest's shares ({}) were unmounted for the save and mounted again",
                    self.snapshot.shares.join(", ")
                ));
            }
            s.push_str(&format!("\n  resume it:   {}\n  run from it: {}", self.load_command, self.run_command));
        }
        for n in &self.notes {
            s.push_str(&format!("\nnote: {n}"));
        }
        s
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotList {
    pub instance: String,
    pub snapshots: Vec<SnapshotEntry>,
}

impl Render for SnapshotList {
    fn human(&self) -> String {
        if self.snapshots.is_empty() {
            return format!("(instance '{}' has no snapshots)", self.instance);
        }
        self.snapshots.iter().map(SnapshotEntry::line).collect::<Vec<_>>().join("\n")
    }
}
