//! What `ssh-config` and `copy` report.

use serde::Serialize;

use super::Render;
use crate::guest_files::{SkipReason, Unpacked};

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
            one_line(&self.generated_by)
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

/// `s` with its control characters escaped (`\n` as the two characters
/// `\` `n`): a newline in a comment (a `--state-dir` in the command line
/// it quotes) would end the comment and start an ssh config directive.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c.is_control() {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    out
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
    /// Guest → host: what the guest sent that was not copied
    /// (`skipped`), and what lost its setuid/setgid/sticky bits.
    #[serde(flatten)]
    pub left_out: Unpacked,
}

impl Render for Copied {
    fn human(&self) -> String {
        let (from, to) = if self.to_guest { ("", "the guest's ") } else { ("the guest's ", "") };
        let mut s = format!(
            "Copied {from}{} to {to}{} (instance '{}', {:.1}s).",
            self.sources.join(", "),
            self.destination,
            self.name,
            self.seconds
        );
        for line in left_out(&self.left_out) {
            s.push_str(&format!("\n{line}"));
        }
        s
    }
}

impl SkipReason {
    fn describe(self) -> &'static str {
        match self {
            SkipReason::Device => "a device node",
            SkipReason::Fifo => "a named pipe",
            SkipReason::HardLink => "a hard link",
            SkipReason::LinkEscapes => "a symlink out of the copied tree",
            SkipReason::PathEscapes => "a path out of the copied tree",
            SkipReason::ParentNotDirectory => "below a symlink or a file",
            SkipReason::ReplacesDirectory => "would replace a directory",
            SkipReason::Unsupported => "not a file, directory or symlink",
        }
    }
}

/// One line per entry a copy out of the guest left out or changed (the
/// guest is untrusted: see `crate::guest_files`).
pub fn left_out(u: &Unpacked) -> Vec<String> {
    let mut v: Vec<String> = u
        .skipped
        .iter()
        .map(|s| {
            let to = s.target.as_ref().map(|t| format!(" -> {t}")).unwrap_or_default();
            format!("skipped {}{to}: {}", s.path, s.reason.describe())
        })
        .collect();
    if u.skipped_unlisted > 0 {
        v.push(format!("skipped {} more entries (not listed)", u.skipped_unlisted));
    }
    v.extend(u.mode_bits_dropped.iter().map(|p| format!("copied {p} without its setuid/setgid/sticky bits")));
    if u.mode_bits_dropped_unlisted > 0 {
        v.push(format!(
            "copied {} more paths without their setuid/setgid/sticky bits (not listed)",
            u.mode_bits_dropped_unlisted
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_files::Skipped;

    #[test]
    fn the_header_comment_stays_one_comment_line_whatever_the_state_dir() {
        let c = SshConfig {
            hosts: vec![],
            generated_by: "qbuf-qemu --state-dir '/tmp/x\nProxyCommand evil\r\x1b[6n' ssh-config".into(),
        };
        let h = c.human();
        assert_eq!(h.lines().count(), 2, "{h}");
        assert!(h.lines().all(|l| l.starts_with("# ")), "{h}");
        assert!(h.contains(r"/tmp/x\nProxyCommand evil\r\u{1b}[6n"), "{h}");
    }

    #[test]
    fn a_copy_says_what_it_left_out() {
        let c = Copied {
            name: "dev".into(),
            to_guest: false,
            sources: vec!["dev:/tmp/out".into()],
            destination: "art".into(),
            seconds: 1.0,
            left_out: Unpacked {
                skipped: vec![Skipped {
                    path: "/tmp/out/pw".into(),
                    reason: SkipReason::LinkEscapes,
                    target: Some("/etc/passwd".into()),
                }],
                mode_bits_dropped: vec!["/tmp/out/suid".into()],
                ..Unpacked::default()
            },
        };
        let h = c.human();
        assert!(h.contains("\nskipped /tmp/out/pw -> /etc/passwd: a symlink out of the copied tree\n"), "{h}");
        assert!(h.ends_with("copied /tmp/out/suid without its setuid/setgid/sticky bits"), "{h}");
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["skipped"][0]["reason"], "link-escapes", "{j}");
        assert_eq!(j["mode_bits_dropped"][0], "/tmp/out/suid", "{j}");
        assert_eq!((j["skipped_unlisted"].as_u64(), j["mode_bits_dropped_unlisted"].as_u64()), (Some(0), Some(0)));
    }

    #[test]
    fn what_is_past_the_lists_is_counted() {
        let u = Unpacked { skipped_unlisted: 7, mode_bits_dropped_unlisted: 2, ..Unpacked::default() };
        assert_eq!(
            left_out(&u),
            [
                "skipped 7 more entries (not listed)",
                "copied 2 more paths without their setuid/setgid/sticky bits (not listed)"
            ]
        );
    }
}
