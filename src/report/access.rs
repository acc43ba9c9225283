//! What `ssh-config` and `copy` report.

use serde::Serialize;

use super::Render;

/// One instance's `Host` block.
#[derive(Debug, Clone, Serialize)]
pub struct SshHost {
    pub name: String,
    /// The `Host` alias, e.g. `qbuf-qemu-dev` (also the pinned host key's alias).
    pub host: String,
    /// `ssh_config` keywords and values, in the block's order.
    pub options: Vec<(String, String)>,
}

/// `ssh-config`: blocks for `~/.ssh/config`; the human form is the file
/// itself (stdout can be redirected into it).
#[derive(Debug, Clone, Serialize)]
pub struct SshConfig {
    pub hosts: Vec<SshHost>,
    /// The command that printed it, for the header comment.
    #[serde(skip)]
    pub generated_by: String,
}

impl Render for SshConfig {
    fn human(&self) -> String {
        let mut s = format!(
            "# OpenSSH settings of qbuf-qemu instances, written by '{}'.\n# Run it again when an instance's SSH port or user changes.\n",
            self.generated_by
        );
        for h in &self.hosts {
            s.push_str(&format!("\nHost {}\n", h.host));
            for (k, v) in &h.options {
                s.push_str(&format!("    {k} {v}\n"));
            }
        }
        s.trim_end().to_string()
    }
}

/// `copy`: what went where.
#[derive(Debug, Clone, Serialize)]
pub struct Copied {
    pub name: String,
    /// True for host → guest, false for guest → host.
    pub to_guest: bool,
    pub sources: Vec<String>,
    pub destination: String,
    pub seconds: f64,
}

impl Render for Copied {
    fn human(&self) -> String {
        let (from, to) = if self.to_guest { ("", "the guest's ") } else { ("the guest's ", "") };
        format!(
            "Copied {from}{} to {to}{} (instance '{}', {:.1}s).",
            self.sources.join(", "),
            self.destination,
            self.name,
            self.seconds
        )
    }
}
