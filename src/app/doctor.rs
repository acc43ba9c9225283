//! `qbuf-qemu doctor`: checks the host and the instance's state, and says
//! how to fix each problem. It changes nothing; problems are in its report,
//! and it fails only when it cannot run its checks at all.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{Settings, DEFAULT_SSH_PORT};
use crate::host;
use crate::instance::owner::NotOurs;
use crate::instance::{read_json, Instance, Lock, StateDir};
use crate::qemu::args::{accel_args, Accel};
use crate::qemu::binaries::{self, Kvm, QemuBinaries};
use crate::qemu::parse::parse_qemu_version;
use crate::report::doctor::{Check, Level, Report};
use crate::timeouts::KVM_TEST_VM;

/// A Guix image is 20G by default and grows into it.
pub const SPACE_WANTED: u64 = 25 << 30;
/// The oldest QEMU the tests run.
const OLDEST_TESTED: (u32, u32) = (7, 2);

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, level: Level::Ok, detail: detail.into(), fix: None }
}

fn problem(name: &'static str, level: Level, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, level, detail: detail.into(), fix: Some(fix.into()) }
}

/// Runs every check for the instance `inst` (its SSH port) and its state dir.
pub fn run(inst: &Instance) -> Report {
    let state = inst.state();
    let (qemu, bins) = check_qemu();
    let mut checks = vec![qemu];
    checks.push(check_kvm(bins.as_ref()));
    checks.push(check_guix());
    checks.push(check_virtiofsd());
    checks.push(check_ssh_client());
    checks.push(check_ssh_port(inst));
    checks.push(check_stale(&state));
    checks.push(check_state_dir(&state, &inst.name));
    checks.push(check_space(&state.root));
    let problems = checks.iter().filter(|c| c.level != Level::Ok).count();
    Report { checks, problems }
}

fn check_qemu() -> (Check, Option<QemuBinaries>) {
    let bins = match binaries::qemu_binaries() {
        Ok(b) => b,
        Err(e) => {
            return (
                problem(
                    "qemu",
                    Level::Fail,
                    format!("{e:#}"),
                    "install QEMU: apt-get install qemu-system-x86 qemu-utils",
                ),
                None,
            )
        }
    };
    let line = binaries::qemu_version(&bins).unwrap_or_default();
    let c = match parse_qemu_version(&line) {
        Some(v) if v < OLDEST_TESTED => problem(
            "qemu",
            Level::Warn,
            format!("{line} ({}) is older than 7.2, the oldest QEMU qbuf-qemu is tested with", bins.system.display()),
            "install QEMU 7.2 or newer (10.0 is tested too)",
        ),
        Some(_) => ok("qemu", format!("{line} ({}); qbuf-qemu is tested with 7.2 and 10.0", bins.system.display())),
        None => problem(
            "qemu",
            Level::Warn,
            format!("{} --version said {line:?}", bins.system.display()),
            "check that it is qemu-system-x86_64 (QBUF_QEMU_SYSTEM points elsewhere?)",
        ),
    };
    (c, Some(bins))
}

fn check_kvm(bins: Option<&QemuBinaries>) -> Check {
    let tcg = "launch uses TCG software emulation (slow: expect minutes to boot)";
    let dev = binaries::kvm_device().display().to_string();
    match binaries::probe_kvm() {
        Kvm::Missing => problem(
            "kvm",
            Level::Warn,
            format!("{dev} does not exist: {tcg}"),
            "enable virtualization (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd; in a VM, enable nested virtualization",
        ),
        Kvm::NoAccess(e) => problem(
            "kvm",
            Level::Warn,
            format!("{dev} is present but cannot be opened ({e}): {tcg}"),
            "add yourself to group kvm ('sudo usermod -aG kvm $USER') and log in again",
        ),
        Kvm::Broken(e) => problem("kvm", Level::Warn, format!("{dev} is present but unusable ({e}): {tcg}"), "fix the host's KVM, or use --accel tcg"),
        Kvm::Usable => {
            let Some(b) = bins else {
                return problem("kvm", Level::Warn, format!("{dev} opens, but without QEMU a test VM cannot be run"), "install QEMU first");
            };
            let tcg_args = accel_args(Accel::Tcg);
            if let Err(e) = binaries::vcpu_runs(b, &tcg_args, KVM_TEST_VM) {
                return problem("kvm", Level::Warn, format!("could not run the test VM even under TCG: {e}"), "check the QEMU installation");
            }
            match binaries::vcpu_runs(b, &accel_args(Accel::Kvm), KVM_TEST_VM) {
                Ok(t) => ok("kvm", format!("KVM runs guests (a test VM reached protected mode in {:.2}s)", t.as_secs_f64())),
                Err(e) => problem(
                    "kvm",
                    Level::Warn,
                    format!("{dev} is present but unusable: {e}. 'launch' falls back to TCG (slow)"),
                    "common in broken nested virtualization: fix the host's KVM, or pass --accel tcg",
                ),
            }
        }
    }
}

/// virtio-fs needs a `virtiofsd`; without one the share goes over 9p.
fn check_virtiofsd() -> Check {
    match crate::qemu::virtiofs::find_virtiofsd() {
        Ok(p) => ok(
            "virtiofsd",
            format!(
                "{} ({}): the share goes over virtio-fs",
                first_line(&p, "--version").unwrap_or_else(|| "virtiofsd".into()),
                p.display()
            ),
        ),
        Err(why) => problem(
            "virtiofsd",
            Level::Warn,
            format!("no usable virtiofsd ({why}): the share goes over 9p, much slower for builds"),
            crate::qemu::virtiofs::HOW_TO_GET,
        ),
    }
}

fn first_line(cmd: &Path, arg: &str) -> Option<String> {
    let out = Command::new(cmd).arg(arg).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next().map(|l| l.trim().to_string())
}

fn check_guix() -> Check {
    match host::find_in_path("guix") {
        Some(g) => match first_line(&g, "--version") {
            Some(v) if !v.is_empty() => ok("guix", format!("{v} ({})", g.display())),
            _ => problem(
                "guix",
                Level::Warn,
                format!("{} --version failed", g.display()),
                "check the Guix installation ('guix --version')",
            ),
        },
        None => problem(
            "guix",
            Level::Warn,
            "Guix is not installed: it builds the dev VM image (not needed for 'launch --image' or '--kernel')",
            "install Guix: https://guix.gnu.org/manual/en/html_node/Installation.html",
        ),
    }
}

fn check_ssh_client() -> Check {
    match host::find_in_path("ssh") {
        Some(p) => ok("ssh", format!("OpenSSH client at {}", p.display())),
        None => problem(
            "ssh",
            Level::Fail,
            "no ssh on PATH: launch and 'qbuf-qemu ssh' need it",
            "apt-get install openssh-client",
        ),
    }
}

fn check_ssh_port(inst: &Instance) -> Check {
    let saved = read_json::<Settings>(&inst.settings()).ok().flatten().map(|s| s.ssh_port);
    let port = saved.unwrap_or(DEFAULT_SSH_PORT);
    let what = match saved {
        Some(p) => format!("port {p} (SSH of instance '{}')", inst.name),
        None => format!("port {port} (the default SSH port)"),
    };
    if inst.exists() && Lock::is_held(inst).unwrap_or(false) {
        return ok("ssh-port", format!("{what} is in use by the running instance itself"));
    }
    if host::port_free(port) {
        ok("ssh-port", format!("{what} is free on 127.0.0.1"))
    } else {
        problem(
            "ssh-port",
            Level::Warn,
            format!("{what} is in use on 127.0.0.1 by another program: launch would fail"),
            "stop that program, or launch with --ssh-port auto (or another --ssh-port N)",
        )
    }
}

fn check_stale(state: &StateDir) -> Check {
    let mut stale = vec![];
    for name in state.instance_names() {
        let inst = state.instance(&name);
        if Lock::is_held(&inst).unwrap_or(true) {
            continue;
        }
        let left: Vec<String> = inst
            .runtime_files()
            .iter()
            .filter(|p| std::fs::symlink_metadata(p).is_ok())
            .filter_map(|p| p.file_name()?.to_str().map(String::from))
            .collect();
        if !left.is_empty() {
            stale.push((name, left));
        }
    }
    if stale.is_empty() {
        return ok("stale", "no instance has runtime files left by a crash");
    }
    let detail = stale.iter().map(|(n, f)| format!("'{n}' ({})", f.join(", "))).collect::<Vec<_>>().join("; ");
    let commands = stale.iter().map(|(n, _)| format!("'{}'", state.command(n, "status"))).collect::<Vec<_>>();
    problem(
        "stale",
        Level::Warn,
        format!("stopped instances with sockets or run records left by a crash: {detail}"),
        format!("{} removes them (launch does too)", commands.join(", ")),
    )
}

/// The state dir: refused by every other command when it is not the
/// user's (the one check, [`StateDir::check_owned`]), so a failure here;
/// a loose mode is a warning (`launch` tightens it).
fn check_state_dir(state: &StateDir, name: &str) -> Check {
    if let Err(e) = state.check_owned(name) {
        return match e.downcast_ref::<NotOurs>() {
            Some(n) => problem("state-dir", Level::Fail, n.reason(), n.fix()),
            None => problem("state-dir", Level::Fail, format!("{e:#}"), "check that the state dir is readable"),
        };
    }
    let mut loose = vec![];
    for dir in [state.root.clone(), state.root.join("instances")] {
        let Ok(m) = std::fs::metadata(&dir) else { continue };
        if m.permissions().mode() & 0o077 != 0 {
            loose.push(format!("{} (mode {:o})", dir.display(), m.permissions().mode() & 0o777));
        }
    }
    if !state.root.exists() {
        return ok("state-dir", format!("{} does not exist yet; it is created private (0700)", state.root.display()));
    }
    if loose.is_empty() {
        return ok("state-dir", format!("{} is private to you (0700)", state.root.display()));
    }
    problem(
        "state-dir",
        Level::Warn,
        format!("not private (it holds SSH keys and VM sockets): {}", loose.join(", ")),
        format!("chmod 700 {0} {0}/instances (launch does it too)", state.root.display()),
    )
}

/// The nearest existing directory at or above `p`.
fn existing_ancestor(p: &Path) -> PathBuf {
    p.ancestors().find(|a| a.is_dir()).unwrap_or(Path::new("/")).to_path_buf()
}

fn check_space(root: &Path) -> Check {
    let at = existing_ancestor(root);
    match nix::sys::statvfs::statvfs(&at) {
        Ok(v) => {
            let free = v.blocks_available() * v.fragment_size();
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            if free < SPACE_WANTED {
                problem(
                    "disk-space",
                    Level::Warn,
                    format!(
                        "{:.1} GiB free at {}: a 20G VM image needs about {:.0} GiB",
                        gib(free),
                        at.display(),
                        gib(SPACE_WANTED)
                    ),
                    "free space there, or use --state-dir (or QBUF_QEMU_STATE_DIR) on a larger file system",
                )
            } else {
                ok("disk-space", format!("{:.1} GiB free at {}", gib(free), at.display()))
            }
        }
        Err(e) => problem(
            "disk-space",
            Level::Warn,
            format!("cannot check free space at {}: {e}", at.display()),
            "check that the state dir is readable",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_parse() {
        assert_eq!(parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"), Some((10, 0)));
        assert_eq!(parse_qemu_version("QEMU emulator version 7.2.22"), Some((7, 2)));
        assert_eq!(parse_qemu_version("garbage"), None);
        assert!((7, 1) < OLDEST_TESTED && (10, 0) >= OLDEST_TESTED);
    }

    #[test]
    fn loose_state_dir_and_stale_files_are_reported_with_the_fix() {
        let root = std::env::temp_dir().join(format!("qbuf-doctor-{}", std::process::id()));
        let state = StateDir::new(root.clone());
        assert_eq!(check_state_dir(&state, "x").level, Level::Ok, "a missing dir is fine");
        state.ensure().unwrap();
        assert_eq!(check_state_dir(&state, "x").level, Level::Ok);
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = check_state_dir(&state, "x");
        assert_eq!(c.level, Level::Warn);
        assert!(c.fix.unwrap().contains("chmod 700"));
        let inst = state.instance("x");
        inst.ensure_dir().unwrap();
        assert_eq!(check_stale(&state).level, Level::Ok);
        std::fs::write(inst.run_record(), "{}").unwrap();
        let c = check_stale(&state);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("'x' (run.json)"), "{}", c.detail);
        assert_eq!(existing_ancestor(&root.join("a/b")), root);
        std::fs::remove_dir_all(&root).unwrap();
        // What every other command refuses is a failure here, with the fix.
        std::os::unix::fs::symlink("/nonexistent/qbuf", &root).unwrap();
        let c = check_state_dir(&state, "x");
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("which does not exist") && c.fix.unwrap().contains("--state-dir"), "{}", c.detail);
        std::fs::remove_file(root).unwrap();
    }
}
