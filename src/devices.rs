//! Devices beyond the boot disk: what was hot-plugged and recorded to come
//! back on the next launch, and how QEMU's block list reads for the user.

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::instance::{read_json, Instance};
use crate::qemu::{ExtraDisk, Forward, Share};

/// PCIe root ports reserved at launch for hot-plugged disks and shares (q35
/// cannot hot-plug onto its root bus).
pub const HOTPLUG_PORTS: u32 = 4;

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

/// One `query-block` entry as `{id, file, format, summary}`.
pub fn summarize_block(b: &Value) -> Value {
    let dev = b.get("qdev").and_then(Value::as_str).or_else(|| b.get("device").and_then(Value::as_str)).unwrap_or("?");
    let ins = b.get("inserted");
    let file = ins.and_then(|i| i.get("file")).and_then(Value::as_str).unwrap_or("(empty)");
    let fmt = ins.and_then(|i| i.get("drv")).and_then(Value::as_str).unwrap_or("-");
    let node = ins.and_then(|i| i.get("node-name")).and_then(Value::as_str).unwrap_or("-");
    serde_json::json!({
        "device": dev,
        "node": node,
        "file": file,
        "format": fmt,
        "summary": format!("{node} ({fmt}) {file} [{dev}]"),
    })
}
