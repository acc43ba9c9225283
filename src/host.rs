//! Probing the host: programs on PATH, free loopback ports, the git checkout.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

/// Where forwards listen unless an address is given, and where every
/// instance's SSH port is.
pub const LOOPBACK: &str = "127.0.0.1";

/// An executable `name` on PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    })
}

/// Whether 127.0.0.1:port can be bound now.
pub fn port_free(port: u16) -> bool {
    TcpListener::bind((LOOPBACK, port)).is_ok()
}

/// Whether `addr:port` can be bound now, for TCP or UDP (a forward's host
/// end, which QEMU would fail to bind otherwise).
pub fn addr_free(addr: &str, port: u16, udp: bool) -> bool {
    let Ok(ip) = addr.parse::<std::net::Ipv4Addr>() else { return false };
    if udp {
        std::net::UdpSocket::bind((ip, port)).is_ok()
    } else {
        TcpListener::bind((ip, port)).is_ok()
    }
}

/// A free loopback port chosen by the kernel.
pub fn pick_free_port() -> Result<u16> {
    Ok(TcpListener::bind((LOOPBACK, 0))?.local_addr()?.port())
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
        let l = TcpListener::bind((LOOPBACK, 0)).unwrap();
        let p = l.local_addr().unwrap().port();
        assert!(!port_free(p));
        let q = pick_free_port().unwrap();
        assert!(port_free(q));
        assert!(!addr_free("127.0.0.1", p, false));
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(!addr_free("127.0.0.1", u.local_addr().unwrap().port(), true));
        assert!(!addr_free("not an address", q, false));
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
