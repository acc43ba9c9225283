//! Processes as the records know them: an identity that survives pid reuse
//! and reboots, whether it still runs (a zombie does not), and how it ended.

use std::fs;

use serde::{Deserialize, Serialize};

/// A process identity that survives pid reuse and reboots: the pid, its
/// start time in clock ticks since boot, and the boot id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcIdentity {
    pub pid: i32,
    pub start_ticks: u64,
    pub boot_id: String,
}

/// A process's state letter and start time from `/proc/PID/stat`.
pub fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&s)
}

/// Parses `/proc/PID/stat`; the command name may contain spaces and ')'.
pub fn parse_stat(s: &str) -> Option<(char, u64)> {
    let rest = s.get(s.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 (starttime) is index 19 after the state (field 3).
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

impl ProcIdentity {
    pub fn of(pid: i32) -> Option<ProcIdentity> {
        let (_, start_ticks) = proc_stat(pid)?;
        Some(ProcIdentity { pid, start_ticks, boot_id: boot_id() })
    }

    /// Running means: same boot, same start time, and not a zombie (an exited
    /// QEMU stays a zombie until reaped, and `kill(pid, 0)` succeeds on it).
    pub fn is_running(&self) -> bool {
        if self.boot_id != boot_id() {
            return false;
        }
        matches!(proc_stat(self.pid), Some((state, start)) if start == self.start_ticks && state != 'Z' && state != 'X')
    }
}

/// How QEMU's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (_, Some(s)) => {
                let name = nix::sys::signal::Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "killed by signal {s} ({name})")
            }
            (Some(c), None) => write!(f, "exit status {c}"),
            (None, None) => write!(f, "exit status unknown (not QEMU's parent)"),
        }
    }
}

impl From<std::process::ExitStatus> for ExitInfo {
    fn from(s: std::process::ExitStatus) -> ExitInfo {
        use std::os::unix::process::ExitStatusExt;
        ExitInfo { code: s.code(), signal: s.signal() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let line = "1234 (qemu) sys (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 98765 1000 10 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(line), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
        // Found by the property test: nothing after the name.
        assert_eq!(parse_stat("1 (x)"), None);
    }

    #[test]
    fn own_process_is_running_and_a_changed_identity_is_not() {
        let me = ProcIdentity::of(std::process::id() as i32).unwrap();
        assert!(me.is_running());
        let reused = ProcIdentity { start_ticks: me.start_ticks + 1, ..me.clone() };
        assert!(!reused.is_running());
        let rebooted = ProcIdentity { boot_id: "other".into(), ..me };
        assert!(!rebooted.is_running());
    }

    #[test]
    fn zombie_is_not_running() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: it becomes a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while proc_stat(pid).map(|s| s.0) != Some('Z') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let id = ProcIdentity { pid, start_ticks: proc_stat(pid).unwrap().1, boot_id: boot_id() };
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok(),
            "kill(pid,0) succeeds on a zombie"
        );
        assert!(!id.is_running());
        drop(child);
    }

    #[test]
    fn exit_info_names_the_signal() {
        assert_eq!(ExitInfo { code: None, signal: Some(9) }.to_string(), "killed by signal 9 (SIGKILL)");
        assert_eq!(ExitInfo { code: Some(0), signal: None }.to_string(), "exit status 0");
    }
}
