//! Probing the host: QEMU binaries, KVM, free ports, the git checkout.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// QEMU's system emulator and its optional firmware dir (`-L`), from
/// `$QBUF_QEMU_SYSTEM` / `$QBUF_QEMU_FIRMWARE` (used to test QEMU 7.2 beside
/// 10.0), else `qemu-system-x86_64` on PATH.
#[derive(Debug, Clone)]
pub struct QemuBinaries {
    pub system: PathBuf,
    pub firmware: Option<PathBuf>,
    pub img: PathBuf,
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    })
}

pub fn qemu_binaries() -> Result<QemuBinaries> {
    let system = match std::env::var_os("QBUF_QEMU_SYSTEM").filter(|v| !v.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                bail!("QBUF_QEMU_SYSTEM={} does not exist: point it at a qemu-system-x86_64 binary or unset it", p.display());
            }
            p
        }
        None => find_in_path("qemu-system-x86_64").context(
            "QEMU is not installed (no qemu-system-x86_64 on PATH): install it, e.g. 'apt-get install qemu-system-x86 qemu-utils'",
        )?,
    };
    let firmware = std::env::var_os("QBUF_QEMU_FIRMWARE").filter(|v| !v.is_empty()).map(PathBuf::from);
    let img =
        find_in_path("qemu-img").context("qemu-img is not installed: install it, e.g. 'apt-get install qemu-utils'")?;
    Ok(QemuBinaries { system, firmware, img })
}

/// First line of `qemu-system-x86_64 --version`.
pub fn qemu_version(b: &QemuBinaries) -> Result<String> {
    let mut c = Command::new(&b.system);
    if let Some(f) = &b.firmware {
        c.arg("-L").arg(f);
    }
    let out = c.arg("--version").output().with_context(|| format!("cannot run {}", b.system.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string())
}

/// Whether KVM can be used: the device opens read-write, speaks API 12 and
/// creates a VM. A host can pass all of this and still hang guests (broken
/// nested setups); launch watches the serial console for that.
#[derive(Debug, Clone, PartialEq)]
pub enum Kvm {
    Usable,
    Missing,
    NoAccess(String),
    Broken(String),
}

pub fn probe_kvm() -> Kvm {
    use std::os::fd::AsRawFd;
    let f = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Kvm::Missing,
        Err(e) => return Kvm::NoAccess(e.to_string()),
    };
    // KVM_GET_API_VERSION = _IO(0xAE, 0x00), KVM_CREATE_VM = _IO(0xAE, 0x01).
    nix::ioctl_none!(kvm_get_api_version, 0xAE, 0x00);
    nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(0xAE, 0x01));
    match unsafe { kvm_get_api_version(f.as_raw_fd()) } {
        Ok(12) => {}
        Ok(v) => return Kvm::Broken(format!("unexpected KVM API version {v}")),
        Err(e) => return Kvm::Broken(format!("KVM_GET_API_VERSION failed: {e}")),
    }
    match unsafe { kvm_create_vm(f.as_raw_fd(), 0) } {
        Ok(fd) => {
            let _ = nix::unistd::close(fd);
            Kvm::Usable
        }
        Err(e) => Kvm::Broken(format!("KVM_CREATE_VM failed: {e}")),
    }
}

/// Whether 127.0.0.1:port can be bound now.
pub fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free loopback port chosen by the kernel.
pub fn pick_free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The git top level of `dir`, if it is in a checkout.
pub fn git_toplevel(dir: &Path) -> Option<PathBuf> {
    let out = Command::new("git").arg("-C").arg(dir).args(["rev-parse", "--show-toplevel"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_port_is_not_free_and_a_picked_one_is() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        assert!(!port_free(p));
        let q = pick_free_port().unwrap();
        assert!(port_free(q));
    }

    #[test]
    fn git_toplevel_finds_this_checkout_or_nothing() {
        let here = std::env::current_dir().unwrap();
        if let Some(top) = git_toplevel(&here) {
            assert!(top.join("Cargo.toml").exists());
        }
        assert_eq!(git_toplevel(Path::new("/")), None);
    }
}
