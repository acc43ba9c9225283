//! QEMU on this host: which binaries to run, their version, and whether KVM
//! can really run guests (a test VM, not just an open /dev/kvm).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::host::find_in_path;
use crate::timeouts::KVM_TEST_VM;

/// QEMU's system emulator and its optional firmware dir (`-L`), from
/// `$QBUF_QEMU_SYSTEM` / `$QBUF_QEMU_FIRMWARE` (used to test QEMU 7.2 beside
/// 10.0), else `qemu-system-x86_64` on PATH.
#[derive(Debug, Clone)]
pub struct QemuBinaries {
    pub system: PathBuf,
    pub firmware: Option<PathBuf>,
    pub img: PathBuf,
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

impl Kvm {
    /// Why KVM cannot be used, for the user; `None` when it looks usable.
    pub fn problem(&self) -> Option<String> {
        let dev = kvm_device();
        match self {
            Kvm::Usable => None,
            Kvm::Missing => Some(format!("{} does not exist", dev.display())),
            Kvm::NoAccess(e) => Some(format!("cannot open {}: {e}; add yourself to group kvm", dev.display())),
            Kvm::Broken(e) => Some(e.clone()),
        }
    }
}

/// The KVM device: `/dev/kvm`, or `$QBUF_QEMU_KVM_DEVICE` (a stand-in that
/// keeps the broken-KVM path testable on hosts whose KVM works).
pub fn kvm_device() -> PathBuf {
    std::env::var_os("QBUF_QEMU_KVM_DEVICE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| "/dev/kvm".into())
}

/// Whether guests can run under KVM with the options `launch` uses: the
/// device checks of [`probe_kvm`], then a real test VM ([`vcpu_runs`]).
pub fn kvm_runs(b: &QemuBinaries) -> Result<(), String> {
    if let Some(p) = probe_kvm().problem() {
        return Err(p);
    }
    vcpu_runs(b, &super::args::accel_args(super::args::Accel::Kvm), KVM_TEST_VM)
        .map(|_| ())
        .map_err(|e| format!("{} opens, but {e}", kvm_device().display()))
}

pub fn probe_kvm() -> Kvm {
    use std::os::fd::AsRawFd;
    let f = match std::fs::OpenOptions::new().read(true).write(true).open(kvm_device()) {
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

/// A 64 KiB firmware image that proves a vCPU runs: from the reset vector
/// it loads a GDT, enters 32-bit protected mode and writes 0x42 to
/// `isa-debug-exit` at port 0xf4, which makes QEMU exit with status
/// (0x42 << 1) | 1 = 133. Protected mode matters: on hosts with a broken
/// KVM (seen in nested setups) real-mode code runs but the switch hangs,
/// just like a real guest's boot.
pub fn probe_firmware() -> Vec<u8> {
    #[rustfmt::skip]
    const CODE: [u8; 0x48] = [
        // 0x00 (16-bit, CS base 0xF0000): cli; lgdtl %cs:0x40
        0xfa, 0x2e, 0x66, 0x0f, 0x01, 0x16, 0x40, 0x00,
        // mov %cr0,%eax; or $1,%al; mov %eax,%cr0
        0x0f, 0x20, 0xc0, 0x0c, 0x01, 0x0f, 0x22, 0xc0,
        // ljmpl $0x08, $0xffff0018
        0x66, 0xea, 0x18, 0x00, 0xff, 0xff, 0x08, 0x00,
        // 0x18 (32-bit): mov $0x10,%ax; mov %eax,%ds; mov $0x42,%eax
        0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8, 0xb8, 0x42, 0x00, 0x00, 0x00,
        // out %al,$0xf4; 1: hlt; jmp 1b
        0xe6, 0xf4, 0xf4, 0xeb, 0xfd,
        // 0x28: GDT: null, flat 4 GiB code, flat 4 GiB data
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00,
        0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00,
        // 0x40: GDTR: limit 23, base 0xffff0028
        0x17, 0x00, 0x28, 0x00, 0xff, 0xff, 0x00, 0x00,
    ];
    let mut fw = vec![0xf4; 0x10000]; // hlt everywhere else
    fw[..CODE.len()].copy_from_slice(&CODE);
    // The reset vector (0xFFFFFFF0): ljmp $0xf000, $0x0000.
    fw[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    fw
}

const PROBE_EXIT: i32 = (0x42 << 1) | 1;

/// The probe firmware in a new private file of the temporary directory:
/// created exclusively (never through a name someone else planted there),
/// mode 0600.
fn write_probe_firmware() -> Result<std::path::PathBuf, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let fw = std::env::temp_dir().join(format!("qbuf-qemu-vcpu-probe-{}-{nanos}.bin", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&fw)
        .and_then(|mut f| f.write_all(&probe_firmware()))
        .map_err(|e| {
            format!("cannot write the probe firmware {}: {e} (set TMPDIR to a private directory)", fw.display())
        })?;
    Ok(fw)
}

/// Boots [`probe_firmware`] with `accel_args` and reports how long the vCPU
/// took to reach protected mode, or why it did not within `timeout`.
pub fn vcpu_runs(
    b: &QemuBinaries,
    accel_args: &[&str],
    timeout: std::time::Duration,
) -> Result<std::time::Duration, String> {
    use std::time::Instant;
    let fw = write_probe_firmware()?;
    let mut c = Command::new(&b.system);
    if let Some(f) = &b.firmware {
        c.arg("-L").arg(f);
    }
    c.args(["-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35", "-m", "16"])
        .args(accel_args)
        .arg("-bios")
        .arg(&fw)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let start = Instant::now();
    let child = c.spawn();
    let result = match child {
        Err(e) => Err(format!("cannot run {}: {e}", b.system.display())),
        Ok(mut child) => loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    let said = err.lines().rev().find(|l| !l.contains("warning:")).unwrap_or("").trim();
                    let said = said.trim_end_matches('.');
                    break match st.code() {
                        Some(PROBE_EXIT) => Ok(start.elapsed()),
                        _ => {
                            let exit = crate::instance::proc::ExitInfo::from(st);
                            Err(format!("QEMU ended before the vCPU ran ({exit}): {said}"))
                        }
                    };
                }
                Ok(None) if start.elapsed() < timeout => std::thread::sleep(std::time::Duration::from_millis(20)),
                Ok(None) | Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(format!(
                        "a test VM's vCPU did not get from real mode to protected mode within {}s",
                        timeout.as_secs()
                    ));
                }
            }
        },
    };
    let _ = std::fs::remove_file(&fw);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_firmware_reaches_protected_mode_under_tcg() {
        let fw = probe_firmware();
        assert_eq!(fw.len(), 0x10000, "QEMU wants a firmware size that is a multiple of 64 KiB");
        let b = qemu_binaries().expect("QEMU is installed for the tests");
        let t = vcpu_runs(
            &b,
            &super::super::args::accel_args(super::super::args::Accel::Tcg),
            std::time::Duration::from_secs(10),
        );
        assert!(t.is_ok(), "{t:?}");
    }
}
