//! What `launch` reports.

use std::path::PathBuf;

use serde::Serialize;

use super::Render;
use crate::config::Change;
use crate::qemu::args::Accel;

#[derive(Debug, Clone, Serialize)]
pub struct Launched {
    pub name: String,
    pub pid: i32,
    pub ssh_port: u16,
    pub ssh_user: String,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pub ready_seconds: Option<f64>,
    /// From the launch starting to QEMU up (and, for a resume, its saved
    /// state loaded): the rest of `ready_seconds` is the guest's.
    pub qemu_up_seconds: Option<f64>,
    pub already_running: bool,
    pub accel: Accel,
    pub changes: Vec<Change>,
    /// Said to the user once (stale files cleaned, KVM fallback, …).
    pub notes: Vec<String>,
    pub ssh_command: String,
    /// How to reach and stop it with qbuf-qemu (same state dir and name).
    pub connect_command: String,
    pub stop_command: String,
}

/// Settings read at each login rather than at boot: a change to one on a
/// running VM applies at once (the next `ssh` logs in as the new user).
const LIVE_SETTINGS: &[&str] = &["ssh user"];

impl Render for Launched {
    fn human(&self) -> String {
        let mut s = String::new();
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        if self.already_running {
            s.push_str(&format!("Instance '{}' is already running (QEMU pid {}).\n", self.name, self.pid));
            for c in &self.changes {
                if LIVE_SETTINGS.contains(&c.setting) {
                    s.push_str(&format!("{} changed from {} to {}: saved, applies now\n", c.setting, c.from, c.to));
                    continue;
                }
                s.push_str(&format!(
                    "{} changed from {} to {}: saved, applies at the next boot ({}, then launch)\n",
                    c.setting, c.from, c.to, self.stop_command
                ));
            }
        } else {
            for c in &self.changes {
                s.push_str(&format!("{} changed from {} to {}: applied to this boot\n", c.setting, c.from, c.to));
            }
            match self.ready_seconds {
                Some(t) => s.push_str(&format!(
                    "Instance '{}' is up: SSH answered after {t:.1}s ({}, QEMU pid {}).\n",
                    self.name,
                    self.accel.as_str(),
                    self.pid
                )),
                None => s.push_str(&format!(
                    "Instance '{}' started (QEMU pid {}); not waiting for SSH (--no-wait).\n",
                    self.name, self.pid
                )),
            }
        }
        s.push_str(&format!("  connect:     {}\n", self.connect_command));
        s.push_str(&format!("  or:          {}\n", self.ssh_command));
        s.push_str(&format!("  serial log:  {}\n", self.serial_log.display()));
        s.push_str(&format!("  QMP socket:  {}\n", self.qmp_socket.display()));
        s.push_str(&format!("  stop:        {}", self.stop_command));
        s
    }
}
