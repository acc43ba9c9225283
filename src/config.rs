//! Resolved settings: the flags of one `launch` merged with what the instance
//! saved at its first launch. Pure, so every merge rule is unit-tested.

use std::path::{Component, Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    Rw,
    Ro,
}

/// How the share reaches the guest, as asked for: `auto` picks virtio-fs
/// when a usable `virtiofsd` is found at boot, else 9p.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ShareType {
    #[default]
    Auto,
    Virtiofs,
    #[value(name = "9p")]
    #[serde(rename = "9p")]
    NineP,
}

impl ShareType {
    pub fn as_str(self) -> &'static str {
        match self {
            ShareType::Auto => "auto",
            ShareType::Virtiofs => "virtiofs",
            ShareType::NineP => "9p",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChoice {
    Fixed(u16),
    Auto,
}

impl std::str::FromStr for PortChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(PortChoice::Auto);
        }
        match s.parse::<u16>() {
            Ok(p) if p >= 1 => Ok(PortChoice::Fixed(p)),
            _ => Err(format!("{s:?} is not a port: give 1-65535 or 'auto'")),
        }
    }
}

/// Where the boot disk or kernel comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// A qcow2 or raw base under a per-instance overlay.
    Image { path: PathBuf },
    /// Direct kernel boot, with an optional base image as disk.
    Kernel { kernel: PathBuf, initrd: PathBuf, append: Option<String>, image: Option<PathBuf> },
    /// The Guix image built from `guix_dir`.
    Guix { guix_dir: Option<PathBuf>, image_size: String },
}

impl Source {
    /// For messages: where the boot disk or kernel comes from.
    pub fn describe(&self) -> String {
        match self {
            Source::Image { path } => format!("image {}", path.display()),
            Source::Kernel { kernel, initrd, append, image } => {
                let mut s = format!("kernel {} with initrd {}", kernel.display(), initrd.display());
                if let Some(a) = append {
                    s.push_str(&format!(" and command line {a:?}"));
                }
                if let Some(i) = image {
                    s.push_str(&format!(", disk from image {}", i.display()));
                }
                s
            }
            Source::Guix { guix_dir, image_size } => match guix_dir {
                Some(d) => format!("Guix image ({image_size}) from {}", d.display()),
                None => format!("Guix image ({image_size}) from the checkout's guix/"),
            },
        }
    }
}

/// Where a saved setting came from, for `show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Given as a flag to `launch` (this one or an earlier one).
    Flag,
    /// qbuf-qemu's default.
    Default,
    /// The git checkout `launch` first ran in (the share's default).
    Checkout,
    /// `--ssh-port auto`.
    Auto,
}

/// The origin of each saved setting; `None` for one saved before
/// qbuf-qemu recorded origins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Origins {
    pub memory: Option<Origin>,
    pub cpus: Option<Origin>,
    pub ssh_port: Option<Origin>,
    pub share: Option<Origin>,
    pub share_mode: Option<Origin>,
    pub share_type: Option<Origin>,
    pub source: Option<Origin>,
    pub accel: Option<Origin>,
    pub ssh_user: Option<Origin>,
    pub ssh_key: Option<Origin>,
}

/// Each setting's origin after a launch with flags `f` (pure).
fn origins(saved: Option<&Settings>, f: &LaunchFlags, d: &Defaults) -> Origins {
    let keep = |given: bool, old: fn(&Origins) -> Option<Origin>, default: Origin| match (given, saved) {
        (true, _) => Some(Origin::Flag),
        (false, Some(s)) => old(&s.origins),
        (false, None) => Some(default),
    };
    let source_given = f.kernel.is_some() || f.image.is_some() || f.guix_dir.is_some() || f.image_size.is_some();
    let share_default = if d.share.is_some() { Origin::Checkout } else { Origin::Default };
    Origins {
        memory: keep(f.memory.is_some(), |o| o.memory, Origin::Default),
        cpus: keep(f.cpus.is_some(), |o| o.cpus, Origin::Default),
        ssh_port: match f.ssh_port {
            Some(PortChoice::Auto) => Some(Origin::Auto),
            other => keep(other.is_some(), |o| o.ssh_port, Origin::Default),
        },
        share: keep(f.share.is_some() || f.no_share, |o| o.share, share_default),
        share_mode: keep(f.share_mode.is_some(), |o| o.share_mode, Origin::Default),
        share_type: keep(f.share_type.is_some(), |o| o.share_type, Origin::Default),
        source: keep(source_given || f.append.is_some(), |o| o.source, Origin::Default),
        accel: keep(f.accel.is_some(), |o| o.accel, Origin::Default),
        ssh_user: keep(f.ssh_user.is_some(), |o| o.ssh_user, Origin::Default),
        ssh_key: keep(f.ssh_key.is_some(), |o| o.ssh_key, Origin::Default),
    }
}

/// What an instance keeps between launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub memory_mib: u64,
    pub cpus: u32,
    pub ssh_port: u16,
    pub share: Option<PathBuf>,
    pub share_mode: ShareMode,
    /// Saved before virtio-fs existed: `auto`.
    #[serde(default)]
    pub share_type: ShareType,
    pub source: Source,
    pub accel: AccelChoice,
    pub ssh_user: String,
    pub ssh_key: Option<PathBuf>,
    /// Where each came from (not a setting: never reported as a change).
    #[serde(default)]
    pub origins: Origins,
}

/// The launch flags as given (None = not given).
#[derive(Debug, Clone, Default)]
pub struct LaunchFlags {
    /// MiB, bounded by the parser.
    pub memory: Option<u64>,
    pub cpus: Option<u32>,
    pub ssh_port: Option<PortChoice>,
    pub share: Option<PathBuf>,
    pub no_share: bool,
    pub share_mode: Option<ShareMode>,
    pub share_type: Option<ShareType>,
    pub image: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub guix_dir: Option<PathBuf>,
    pub image_size: Option<String>,
    pub accel: Option<AccelChoice>,
    pub ssh_user: Option<String>,
    pub ssh_key: Option<PathBuf>,
}

pub const DEFAULT_MEMORY_MIB: u64 = 4096;
pub const DEFAULT_CPUS: u32 = 2;
pub const DEFAULT_SSH_PORT: u16 = 10022;
pub const DEFAULT_SSH_USER: &str = "dev";
pub const DEFAULT_IMAGE_SIZE: &str = "20G";

/// Makes `p` (absolute) plain: `.` and `..` resolved lexically, without
/// touching the file system, so a path that does not exist yet stays the
/// path the user meant.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// One setting that differs from what the instance saved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub setting: &'static str,
    pub from: String,
    pub to: String,
}

/// Defaults that need the environment (the checkout) resolved by the caller.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub share: Option<PathBuf>,
}

/// Flags that cannot go together, given the saved settings: a usage error
/// for the caller to report before it touches anything.
pub fn check_flags(saved: Option<&Settings>, f: &LaunchFlags) -> Result<(), String> {
    if f.no_share && f.share.is_some() {
        return Err("--share and --no-share contradict each other: give one".into());
    }
    if f.kernel.is_some() != f.initrd.is_some() {
        return Err("--kernel and --initrd go together: give both, or neither".into());
    }
    if f.append.is_some() && f.kernel.is_none() && !matches!(saved.map(|s| &s.source), Some(Source::Kernel { .. })) {
        return Err("--append needs --kernel/--initrd: it is the kernel command line of a direct boot".into());
    }
    Ok(())
}

/// Merges flags over saved settings (or defaults at first launch) and lists
/// what changed. A port `auto` keeps a saved port; a fresh `auto` is left as
/// port 0 for the caller to pick.
pub fn merge(saved: Option<&Settings>, f: &LaunchFlags, d: &Defaults) -> Result<(Settings, Vec<Change>)> {
    check_flags(saved, f).map_err(anyhow::Error::msg)?;
    let memory_mib = f.memory.or(saved.map(|s| s.memory_mib)).unwrap_or(DEFAULT_MEMORY_MIB);
    let cpus = f.cpus.or(saved.map(|s| s.cpus)).unwrap_or(DEFAULT_CPUS);
    let ssh_port = match f.ssh_port {
        Some(PortChoice::Fixed(p)) => p,
        Some(PortChoice::Auto) => saved.map(|s| s.ssh_port).unwrap_or(0),
        None => saved.map(|s| s.ssh_port).unwrap_or(DEFAULT_SSH_PORT),
    };
    let share = if f.no_share {
        None
    } else if let Some(s) = &f.share {
        Some(s.clone())
    } else {
        match saved {
            Some(s) => s.share.clone(),
            None => d.share.clone(),
        }
    };
    let share_mode = f.share_mode.or(saved.map(|s| s.share_mode)).unwrap_or(ShareMode::Rw);
    let image_size = f.image_size.clone();
    let source = if let (Some(kernel), Some(initrd)) = (&f.kernel, &f.initrd) {
        // A new kernel keeps the saved disk and command line unless given.
        let (saved_image, saved_append) = match saved.map(|s| &s.source) {
            Some(Source::Kernel { image, append, .. }) => (image.clone(), append.clone()),
            _ => (None, None),
        };
        let image = f.image.clone().or(saved_image);
        Source::Kernel {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            append: f.append.clone().or(saved_append),
            image,
        }
    } else if let Some(image) = &f.image {
        Source::Image { path: image.clone() }
    } else if f.guix_dir.is_some() || image_size.is_some() {
        // One of the two given: the other stays as saved, like the kernel's
        // disk and command line above.
        let (saved_dir, saved_size) = match saved.map(|s| &s.source) {
            Some(Source::Guix { guix_dir, image_size }) => (guix_dir.clone(), Some(image_size.clone())),
            _ => (None, None),
        };
        Source::Guix {
            guix_dir: f.guix_dir.clone().or(saved_dir),
            image_size: image_size.or(saved_size).unwrap_or_else(|| DEFAULT_IMAGE_SIZE.into()),
        }
    } else {
        match saved.map(|s| s.source.clone()) {
            Some(Source::Kernel { kernel, initrd, image, append }) => {
                Source::Kernel { kernel, initrd, image, append: f.append.clone().or(append) }
            }
            Some(s) => s,
            None => Source::Guix { guix_dir: None, image_size: DEFAULT_IMAGE_SIZE.into() },
        }
    };
    let s = Settings {
        memory_mib,
        cpus,
        ssh_port,
        share,
        share_mode,
        share_type: f.share_type.or(saved.map(|s| s.share_type)).unwrap_or_default(),
        source,
        accel: f.accel.or(saved.map(|s| s.accel)).unwrap_or(AccelChoice::Auto),
        ssh_user: f.ssh_user.clone().or(saved.map(|s| s.ssh_user.clone())).unwrap_or_else(|| DEFAULT_SSH_USER.into()),
        ssh_key: f.ssh_key.clone().or(saved.and_then(|s| s.ssh_key.clone())),
        origins: origins(saved, f, d),
    };
    let changes = saved.map(|old| diff(old, &s)).unwrap_or_default();
    Ok((s, changes))
}

/// A run from another instance's snapshot starts from that instance's
/// settings (its guest is that instance's: the same user and key get in,
/// the same share mode and type are expected); flags given to the run win.
/// Memory and CPUs come from the snapshot itself.
pub fn inherit(f: &mut LaunchFlags, source: &Settings) {
    f.ssh_user.get_or_insert_with(|| source.ssh_user.clone());
    if f.ssh_key.is_none() {
        f.ssh_key = source.ssh_key.clone();
    }
    f.share_mode.get_or_insert(source.share_mode);
    f.share_type.get_or_insert(source.share_type);
}

fn diff(a: &Settings, b: &Settings) -> Vec<Change> {
    let mut v = Vec::new();
    let mut cmp = |setting: &'static str, x: String, y: String| {
        if x != y {
            v.push(Change { setting, from: x, to: y });
        }
    };
    cmp("memory", format!("{}M", a.memory_mib), format!("{}M", b.memory_mib));
    cmp("cpus", a.cpus.to_string(), b.cpus.to_string());
    cmp("ssh port", a.ssh_port.to_string(), b.ssh_port.to_string());
    let share = |s: &Settings| s.share.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into());
    cmp("share", share(a), share(b));
    cmp("share mode", format!("{:?}", a.share_mode).to_lowercase(), format!("{:?}", b.share_mode).to_lowercase());
    cmp("share type", a.share_type.as_str().into(), b.share_type.as_str().into());
    cmp("image", a.source.describe(), b.source.describe());
    cmp("accel", format!("{:?}", a.accel).to_lowercase(), format!("{:?}", b.accel).to_lowercase());
    cmp("ssh user", a.ssh_user.clone(), b.ssh_user.clone());
    let key =
        |s: &Settings| s.ssh_key.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "qbuf-qemu's own".into());
    cmp("ssh key", key(a), key(b));
    v
}

#[cfg(test)]
mod tests;
