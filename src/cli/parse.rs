//! Value parsers for the command line: every flag value is checked and
//! bounded here, so a bad value is a usage error (exit 2) before any file
//! is touched or any process started.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use crate::qemu::forward::Forward;
use crate::qemu::value::{DiskFormat, IdKind};

/// The longest timeout any flag takes: one day.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The least memory a VM gets.
pub const MIN_MEMORY_MIB: u64 = 64;
/// The largest disk image: QEMU's qcow2 refuses more than 64 TiB with its
/// default 64 KiB clusters.
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// An instance name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn name(s: &str) -> Result<String, String> {
    crate::instance::validate_name(s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

/// A disk id, share tag or snapshot name, by the one rule of
/// [`crate::qemu::value::validate_id`].
fn id(kind: IdKind, s: &str) -> Result<String, String> {
    crate::qemu::value::validate_id(kind, s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

pub fn disk_id(s: &str) -> Result<String, String> {
    id(IdKind::Disk, s)
}

/// A disk that exists, by its id (`disk remove`, `disk resize`): the
/// form of a disk id, the tool's own (`disk0-dev`, the boot disk) included.
pub fn existing_disk_id(s: &str) -> Result<String, String> {
    crate::qemu::value::validate_id_form(IdKind::Disk, s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

pub fn share_tag(s: &str) -> Result<String, String> {
    id(IdKind::ShareTag, s)
}

pub fn snapshot_name(s: &str) -> Result<String, String> {
    id(IdKind::Snapshot, s)
}

/// A guest user name as Linux tools accept one: a letter or `_`, then
/// letters, digits, `_`, `-` or `.`, at most 32. It becomes ssh's
/// `USER@host` argument and a `User` line of `ssh-config`, so nothing that
/// ssh could read as an option or a second line gets through.
pub fn user(s: &str) -> Result<String, String> {
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if first_ok && rest_ok && s.len() <= 32 {
        Ok(s.to_string())
    } else {
        Err(format!("invalid user name '{s}': use a letter or '_', then letters, digits, '_', '-' or '.' (at most 32)"))
    }
}

/// A size in bytes: `4G`, `512M`, `1.5G`, `4096` (a bare number is MiB),
/// binary units (`G` is GiB), case-insensitive, optional `iB`/`B`. No
/// exponents or signs: `1e3` is more likely a typo than a size.
pub fn size_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let unit = unit.trim();
    let plain = !num.is_empty() && num.matches('.').count() <= 1 && !num.starts_with('.') && !num.ends_with('.');
    if !plain || !unit.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(format!("{s:?} is not a size: write e.g. 4G, 512M, 1.5G or 4096 (MiB)"));
    }
    let cfg = parse_size::Config::new().with_binary().with_default_factor(1 << 20);
    match cfg.parse_size(t) {
        Err(parse_size::Error::PosOverflow) => Err(format!("{s:?} is too large: sizes go up to 16E")),
        Ok(0) | Err(_) => Err(format!("{s:?} is not a size: write e.g. 4G, 512M, 1.5G or 4096 (MiB)")),
        Ok(b) => Ok(b),
    }
}

/// The host's memory in MiB (MemTotal), when it can be read.
pub fn host_memory_mib() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The most memory QEMU's x86_64 machines address (`-m` above it fails).
pub const MAX_MEMORY_MIB: u64 = 4 << 20;

/// `--memory`: at least 64M, at most what QEMU's x86_64 machines take.
/// What this host can give is checked by `launch` ([`fits_host`]).
pub fn memory_mib(s: &str) -> Result<u64, String> {
    let mib = size_bytes(s)?.div_ceil(1 << 20);
    if mib < MIN_MEMORY_MIB {
        return Err(format!("{s:?} is too small: a VM needs at least {MIN_MEMORY_MIB}M"));
    }
    if mib > MAX_MEMORY_MIB {
        return Err(format!("{s:?} is too large: QEMU gives a VM at most 4T"));
    }
    Ok(mib)
}

/// Whether `memory_mib` and `cpus` fit this host: more memory than it has
/// cannot be allocated, and more vCPUs than it has only slow the guest.
pub fn fits_host(memory_mib: Option<u64>, cpus: Option<u32>) -> Result<(), String> {
    if let (Some(m), Some(host)) = (memory_mib, host_memory_mib()) {
        if m > host {
            return Err(format!("--memory {m}M is more than this host's memory ({host}M): give at most {host}M"));
        }
    }
    let host_cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    match cpus {
        Some(n) if n > host_cpus => {
            Err(format!("--cpus {n} is more than this host has ({host_cpus}): give 1-{host_cpus}"))
        }
        _ => Ok(()),
    }
}

/// A new disk's size: at least 1M, at most 64T.
pub fn disk_bytes(s: &str) -> Result<u64, String> {
    let b = size_bytes(s)?;
    if b < 1 << 20 {
        return Err(format!("{s:?} is too small: a disk needs at least 1M"));
    }
    if b > MAX_DISK_BYTES {
        return Err(format!("{s:?} is too large: qcow2 images hold at most 64T"));
    }
    Ok(b)
}

/// The Guix image's size, passed to Guix as given once it is known valid.
pub fn image_size(s: &str) -> Result<String, String> {
    let b = disk_bytes(s)?;
    if b < 2 << 30 {
        return Err(format!("{s:?} is too small for a Guix System image: give at least 2G"));
    }
    Ok(s.trim().to_string())
}

/// The most vCPUs QEMU's q35 machine takes (7.2 and 10.0).
pub const MAX_CPUS: u32 = 288;

/// `--cpus`: 1 to 288 (q35's limit); what this host has is checked by
/// `launch` ([`fits_host`]).
pub fn cpus(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_CPUS).contains(&n) => Ok(n),
        Ok(0) => Err("--cpus must be at least 1".into()),
        _ => Err(format!("{s:?} is not a number of CPUs QEMU takes: give 1-{MAX_CPUS}")),
    }
}

/// A timeout: whole seconds (`90`) or a duration (`90s`, `2m`, `1h`), at
/// most a day.
pub fn timeout(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = match t.parse::<u64>() {
        Ok(n) if n <= MAX_TIMEOUT.as_secs() => Duration::from_secs(n),
        Ok(_) => return Err(format!("{s:?} is too long: give at most {}s (a day)", MAX_TIMEOUT.as_secs())),
        Err(_) => humantime::parse_duration(t)
            .map_err(|_| format!("{s:?} is not a duration: give seconds, e.g. 60, or 2m"))?,
    };
    if d > MAX_TIMEOUT {
        return Err(format!("{s:?} is too long: give at most {}s (a day)", MAX_TIMEOUT.as_secs()));
    }
    Ok(d)
}

/// A wait that must be able to succeed (launch's SSH wait, run's whole
/// deadline, reboot's SSH wait): zero would give up before the VM starts.
/// A stop's `--timeout 0` stays valid (straight to QMP quit).
pub fn wait_timeout(s: &str) -> Result<Duration, String> {
    match timeout(s)? {
        d if d.is_zero() => Err(format!("{s:?} would give up before the VM starts: give a positive time, e.g. 300")),
        d => Ok(d),
    }
}

/// `--copy-out GUEST_PATH:HOST_PATH`: split at the first `:` (guest paths
/// are absolute or relative to the login directory and rarely hold a `:`).
pub fn copy_out(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once(':') {
        Some((g, h)) if !g.is_empty() && !h.is_empty() => Ok((g.to_string(), PathBuf::from(h))),
        _ => Err(format!("{s:?} is not GUEST_PATH:HOST_PATH, e.g. /mnt/build/report.xml:out/report.xml")),
    }
}

/// A path that must be valid UTF-8 (QEMU options and our JSON records are
/// text): refused with the path shown, not serde's bare message.
pub fn utf8_path(s: std::ffi::OsString) -> Result<PathBuf, String> {
    match s.to_str() {
        Some("") => Err("the path is empty".into()),
        Some(t) => Ok(PathBuf::from(t)),
        None => Err(format!("{} is not valid UTF-8: rename or move it", PathBuf::from(s).display())),
    }
}

/// The clap parser for path flags ([`utf8_path`]).
pub fn path() -> impl clap::builder::TypedValueParser<Value = PathBuf> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new().try_map(utf8_path)
}

pub use crate::host::LOOPBACK;

/// The body and the protocol: `Some(true)` for `/udp`, `Some(false)` for
/// `/tcp`, `None` when not given.
fn split_proto(s: &str) -> Result<(&str, Option<bool>), String> {
    match s.rsplit_once('/') {
        Some((rest, "udp")) => Ok((rest, Some(true))),
        Some((rest, "tcp")) => Ok((rest, Some(false))),
        Some((_, p)) => Err(format!("unknown protocol {p:?}: use /tcp (the default) or /udp")),
        None => Ok((s, None)),
    }
}

fn port(what: &str, s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{what} port {s:?} is not a port: give 1-65535")),
    }
}

fn addr(s: &str) -> Result<String, String> {
    s.parse::<Ipv4Addr>()
        .map(|a| a.to_string())
        .map_err(|_| format!("{s:?} is not an IPv4 address to listen on (e.g. 127.0.0.1 or 0.0.0.0)"))
}

/// `[ADDR:]HOST:GUEST[/udp]`, e.g. `8080:80`, `0.0.0.0:8080:80`, `5353:53/udp`.
pub fn parse_forward(s: &str) -> Result<Forward, String> {
    let (body, udp) = split_proto(s)?;
    let parts: Vec<&str> = body.split(':').collect();
    let (host_addr, host, guest) = match parts.as_slice() {
        [h, g] => (LOOPBACK.to_string(), *h, *g),
        [a, h, g] => (addr(a)?, *h, *g),
        _ => return Err(format!("{s:?} is not a forward: write [ADDR:]HOST_PORT:GUEST_PORT[/udp], e.g. 8080:80")),
    };
    Ok(Forward {
        udp: udp.unwrap_or(false),
        host_addr,
        host_port: port("host", host)?,
        guest_port: port("guest", guest)?,
    })
}

/// What `forward remove` names: `[ADDR:]HOST[/tcp|/udp]`; without a
/// protocol, whichever forwards that port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEnd {
    pub udp: Option<bool>,
    pub addr: Option<String>,
    pub port: u16,
}

impl HostEnd {
    pub fn matches(&self, f: &Forward) -> bool {
        self.udp.is_none_or(|u| u == f.udp)
            && f.host_port == self.port
            && self.addr.as_ref().is_none_or(|a| *a == f.host_addr)
    }
}

pub fn parse_host_end(s: &str) -> Result<HostEnd, String> {
    let (body, udp) = split_proto(s)?;
    match body.split(':').collect::<Vec<_>>().as_slice() {
        [p] => Ok(HostEnd { udp, addr: None, port: port("host", p)? }),
        [a, p] => Ok(HostEnd { udp, addr: Some(addr(a)?), port: port("host", p)? }),
        _ => Err(format!("{s:?} is not a host port: write [ADDR:]HOST_PORT[/udp], e.g. 8080")),
    }
}

/// One path of `copy`: on the host, or in a guest as `NAME:PATH` (or
/// `:PATH` for the `--name` instance), as scp writes a remote path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyPath {
    Host(String),
    Guest { name: Option<String>, path: String },
}

/// `NAME:PATH`, `:PATH` or a host path; a host path with a `:` before any
/// `/` needs `./` in front (as with scp).
pub fn copy_path(s: &str) -> Result<CopyPath, String> {
    if s.is_empty() {
        return Err("the path is empty".into());
    }
    if let Some(path) = s.strip_prefix(':') {
        return Ok(CopyPath::Guest { name: None, path: path.into() });
    }
    match s.split_once(':') {
        Some((n, path)) if !n.contains('/') => match crate::instance::validate_name(n) {
            Ok(()) => Ok(CopyPath::Guest { name: Some(n.into()), path: path.into() }),
            Err(_) => Err(format!(
                "{s:?}: '{n}' is not an instance name; write a guest path as NAME:PATH or :PATH, and a host path with ':' as ./{s}"
            )),
        },
        _ => Ok(CopyPath::Host(s.into())),
    }
}

/// `--format qcow2|raw`: the command line's face of a disk format (the
/// type itself sits with QEMU's option values, below the records).
impl clap::ValueEnum for DiskFormat {
    fn value_variants<'a>() -> &'a [Self] {
        &DiskFormat::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_cannot_become_ssh_options_or_lines() {
        for ok in ["dev", "root", "_svc", "a.b-c_1", &"u".repeat(32)] {
            assert_eq!(user(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "-oProxyCommand=x", "a b", "a\nb", "1dev", "dev@host", &"u".repeat(33)] {
            assert!(user(bad).unwrap_err().contains("invalid user name"), "{bad:?}");
        }
    }

    fn fwd(udp: bool, a: &str, h: u16, g: u16) -> Forward {
        Forward { udp, host_addr: a.into(), host_port: h, guest_port: g }
    }

    #[test]
    fn forward_specs_default_to_loopback_and_tcp() {
        assert_eq!(parse_forward("8080:80").unwrap(), fwd(false, "127.0.0.1", 8080, 80));
        assert_eq!(parse_forward("0.0.0.0:8080:80").unwrap(), fwd(false, "0.0.0.0", 8080, 80));
        assert_eq!(parse_forward("5353:53/udp").unwrap(), fwd(true, "127.0.0.1", 5353, 53));
        assert_eq!(parse_forward("10.1.2.3:1:2/tcp").unwrap(), fwd(false, "10.1.2.3", 1, 2));
        for bad in ["8080", "a:80", "8080:0", "8080:80/sctp", "host:1:2", "1:2:3:4", "70000:80", ""] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
        assert!(parse_forward("8080:80/sctp").unwrap_err().contains("/udp"));
        assert_eq!(parse_host_end("8080").unwrap(), HostEnd { udp: None, addr: None, port: 8080 });
        assert_eq!(
            parse_host_end("0.0.0.0:53/udp").unwrap(),
            HostEnd { udp: Some(true), addr: Some("0.0.0.0".into()), port: 53 }
        );
        assert!(parse_host_end("8080:80:1").is_err());
        assert_eq!(fwd(true, "127.0.0.1", 5353, 53).rule(), "udp:127.0.0.1:5353-:53");
    }

    #[test]
    fn sizes_parse_in_common_forms_and_nothing_else() {
        assert_eq!(size_bytes("4G"), Ok(4 << 30));
        assert_eq!(size_bytes("512m"), Ok(512 << 20));
        assert_eq!(size_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(size_bytes("1.5G"), Ok(1536 << 20));
        assert_eq!(size_bytes("4096"), Ok(4096 << 20));
        for bad in ["", "G", "-1G", "four", "1X", "1e3", "1e3G", "+4G", ".5G", "1..5G", "0", "99999999999999999999"] {
            assert!(size_bytes(bad).is_err(), "{bad}");
        }
        assert!(size_bytes("lots").unwrap_err().contains("4G"));
    }

    #[test]
    fn memory_is_bounded_by_qemu_and_the_host() {
        assert_eq!(memory_mib("512M"), Ok(512));
        assert!(memory_mib("10M").unwrap_err().contains("at least 64M"));
        assert!(memory_mib("200000G").unwrap_err().contains("at most 4T"));
        assert!(memory_mib("99999999999999999999").is_err());
        assert!(memory_mib("1e3").is_err());
        let host = host_memory_mib().expect("/proc/meminfo");
        assert!(fits_host(Some(host), Some(1)).is_ok());
        let e = fits_host(Some(host + 1), None).unwrap_err();
        assert!(e.contains("more than this host's memory"), "{e}");
        let cpus = std::thread::available_parallelism().unwrap().get() as u32;
        assert!(fits_host(None, Some(cpus)).is_ok());
        assert!(fits_host(None, Some(cpus + 1)).unwrap_err().contains("more than this host has"));
    }

    #[test]
    fn cpus_timeouts_and_disks_are_bounded() {
        assert_eq!(cpus("1"), Ok(1));
        assert!(cpus("0").is_err());
        assert_eq!(cpus("288"), Ok(288));
        assert!(cpus("999").unwrap_err().contains("1-288"));
        assert!(cpus("4294967295").is_err());
        assert!(cpus("4294967296").is_err());
        assert_eq!(timeout("90"), Ok(Duration::from_secs(90)));
        assert_eq!(timeout("2m"), Ok(Duration::from_secs(120)));
        assert!(timeout("18446744073709551615").unwrap_err().contains("too long"));
        assert!(timeout("2 weeks").is_err());
        assert!(timeout("soon").is_err());
        assert_eq!(disk_bytes("20G"), Ok(20 << 30));
        assert!(disk_bytes("65T").unwrap_err().contains("at most 64T"));
        assert!(disk_bytes("20000000T").unwrap_err().contains("too large"));
        assert!(disk_bytes("100K").is_err());
        assert!(image_size("1G").is_err());
        assert_eq!(image_size("20G"), Ok("20G".into()));
    }

    #[test]
    fn copy_paths_are_guest_paths_only_with_an_instance_name_or_a_colon() {
        let guest = |n: Option<&str>, p: &str| CopyPath::Guest { name: n.map(String::from), path: p.into() };
        assert_eq!(copy_path(":/tmp/x"), Ok(guest(None, "/tmp/x")));
        assert_eq!(copy_path("dev:src"), Ok(guest(Some("dev"), "src")));
        assert_eq!(copy_path("web-2:"), Ok(guest(Some("web-2"), "")));
        assert_eq!(copy_path("./a:b"), Ok(CopyPath::Host("./a:b".into())));
        assert_eq!(copy_path("/x/a:b"), Ok(CopyPath::Host("/x/a:b".into())));
        assert_eq!(copy_path("notes.txt"), Ok(CopyPath::Host("notes.txt".into())));
        assert!(copy_path("Dev:x").unwrap_err().contains("./Dev:x"));
        assert!(copy_path("").is_err());
    }

    #[test]
    fn copy_out_splits_guest_and_host() {
        assert_eq!(copy_out("/g/a:b/c"), Ok(("/g/a".into(), PathBuf::from("b/c"))));
        assert!(copy_out("nocolon").is_err());
        assert!(copy_out(":x").is_err());
    }

    #[test]
    fn names_are_checked_by_the_parser() {
        assert_eq!(name("dev"), Ok("dev".into()));
        assert!(name("../x").unwrap_err().contains("invalid instance name"));
    }

    #[test]
    fn non_utf8_paths_are_refused_with_the_path() {
        use std::os::unix::ffi::OsStrExt;
        let e = utf8_path(std::ffi::OsStr::from_bytes(b"/tmp/\xff.img").to_os_string()).unwrap_err();
        assert!(e.contains("/tmp/") && e.contains("UTF-8"), "{e}");
    }
}
