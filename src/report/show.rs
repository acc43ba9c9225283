//! What `show` reports: an instance's saved settings, where each came from,
//! and the devices recorded for its next launch.

use std::path::PathBuf;

use serde::Serialize;

use super::Render;

/// Where a value came from, as `show` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShownOrigin {
    /// A flag given to `launch` (and saved since).
    Flag,
    Default,
    /// The git checkout `launch` first ran in.
    Checkout,
    /// Picked by `--ssh-port auto`.
    Auto,
    /// Saved before qbuf-qemu recorded where settings come from.
    Saved,
    /// An environment variable (`QBUF_QEMU_SYSTEM`, `QBUF_QEMU_FIRMWARE`).
    Environment,
    /// Found on `PATH`.
    Path,
    /// Recorded by `disk add`, `share add` or `forward add`.
    Recorded,
    /// Set by the `run` that started the instance.
    Run,
}

impl ShownOrigin {
    pub fn describe(self) -> &'static str {
        match self {
            ShownOrigin::Flag => "flag (given to launch)",
            ShownOrigin::Default => "default",
            ShownOrigin::Checkout => "default (the checkout launch ran in)",
            ShownOrigin::Auto => "--ssh-port auto",
            ShownOrigin::Saved => "saved",
            ShownOrigin::Environment => "environment",
            ShownOrigin::Path => "PATH",
            ShownOrigin::Recorded => "recorded",
            ShownOrigin::Run => "run",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    pub setting: &'static str,
    pub value: String,
    pub origin: ShownOrigin,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShowReport {
    pub name: String,
    pub settings_file: PathBuf,
    pub settings: Vec<Shown>,
    /// Disks, shares and forwards recorded for every launch (devices.json).
    pub devices: Vec<Shown>,
    /// How to change a setting.
    #[serde(skip)]
    pub change_hint: String,
}

impl Render for ShowReport {
    fn human(&self) -> String {
        let width = self.settings.iter().chain(&self.devices).map(|s| s.value.chars().count()).max().unwrap_or(0);
        let row = |s: &Shown| format!("  {:<10} {:<width$}  {}\n", s.setting, s.value, s.origin.describe());
        let mut out = format!("Instance '{}' ({}):\n", self.name, self.settings_file.display());
        self.settings.iter().for_each(|s| out.push_str(&row(s)));
        if !self.devices.is_empty() {
            out.push_str("Recorded for every launch:\n");
            self.devices.iter().for_each(|s| out.push_str(&row(s)));
        }
        out.push_str(&self.change_hint);
        out
    }
}
