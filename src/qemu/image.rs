//! Disk images: what a file's header says (one qcow2 parser for the boot
//! base and for `disk add`), the instance's boot overlay on a base that is
//! never written, and new images made with `qemu-img`.
//!
//! The overlay records the base's identity; a changed base would silently
//! corrupt the guest's view of its disk, so booting on one is refused. The
//! format always goes to QEMU explicitly, so QEMU never probes a raw image
//! (whose first bytes a guest controls).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::instance::records::BaseIdentity;
use crate::instance::{read_json, write_json, Instance};
pub use crate::qemu::value::DiskFormat;

/// What an image's first bytes say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// qcow2, with the host files its header names besides itself.
    Qcow2 {
        backing: Option<Backing>,
        /// The "external data file" extension: the file that holds the
        /// guest's data instead of this one.
        data_file: Option<String>,
    },
    Other,
}

/// A qcow2 header's backing file: its name as written (None when it lies
/// past the bytes read) and its format when recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub name: Option<String>,
    pub format: Option<String>,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// qcow2 header extension "backing file format name".
const QCOW2_EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// qcow2 header extension "external data file name".
const QCOW2_EXT_DATA_FILE: u32 = 0x4441_5441;

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// `len` bytes at `at` as text, when they are all in `b`.
fn text(b: &[u8], at: usize, len: usize) -> Option<String> {
    b.get(at..at.checked_add(len)?).map(|d| String::from_utf8_lossy(d).into_owned())
}

/// Reads a qcow2 header (docs/interop/qcow2.txt in QEMU): magic, version,
/// the backing file's name (offset 8, length at 16) and the extensions
/// that name host files: the backing file's format and an external data
/// file.
pub fn inspect_header(b: &[u8]) -> Header {
    if b.len() < 4 || &b[..4] != QCOW2_MAGIC {
        return Header::Other;
    }
    // Version 2 headers are 72 bytes; version 3 states its length at 100.
    let mut at = match be32(b, 4) {
        Some(2) => 72,
        _ => be32(b, 100).unwrap_or(104) as usize,
    };
    let (mut format, mut data_file) = (None, None);
    while let (Some(kind), Some(len)) = (be32(b, at), be32(b, at + 4)) {
        if kind == 0 {
            break;
        }
        let data = at + 8;
        match kind {
            QCOW2_EXT_BACKING_FORMAT => format = text(b, data, len as usize),
            QCOW2_EXT_DATA_FILE => data_file = Some(text(b, data, len as usize).unwrap_or_default()),
            _ => {}
        }
        at = data + (len as usize).div_ceil(8) * 8;
    }
    // Version 3's incompatible feature bit 2: an external data file. QEMU
    // reads extensions up to a whole cluster (2 MiB), past the bytes read
    // here, so the bit decides, not finding the name.
    const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    if data_file.is_none() && be32(b, 4) != Some(2) && be64(b, 72).unwrap_or(0) & EXTERNAL_DATA_FILE != 0 {
        data_file = Some("a file (its name lies past the header's first 64 KiB)".into());
    }
    let backing = match be64(b, 8).unwrap_or(0) {
        0 => None,
        offset => {
            let name = usize::try_from(offset).ok().and_then(|o| text(b, o, be32(b, 16).unwrap_or(0) as usize));
            Some(Backing { name, format })
        }
    };
    Header::Qcow2 { backing, data_file }
}

/// Refuses an image QEMU would misread or that would open other host
/// files: a non-qcow2 file given as qcow2 (the default), a qcow2 given as
/// raw (the guest would see the container), or a qcow2 whose header names
/// a backing file or an external data file. Such a header may name any
/// file the user can read (`~/.ssh/id_ed25519` as raw) and QEMU would
/// open it and show it to the guest; a base without its backing format
/// would also be probed. The one check of every image a user gives: a
/// `--image` base ([`prepare`]) and a `disk add` file. The tool's own
/// overlays (and a snapshot's disk) have backing files by design and are
/// never checked here.
pub fn check_image(path: &Path, format: DiskFormat) -> Result<()> {
    let flatten = |names: &str| {
        format!(
            "{} names {names}, which QEMU would open as well and show to the guest: qbuf-qemu takes only \
             self-contained images. Make one with 'qemu-img convert -O qcow2 {} FLAT.qcow2' and give FLAT.qcow2",
            path.display(),
            shell_words::quote(&path.display().to_string())
        )
    };
    let head = read_head(path)?;
    match (format, inspect_header(&head)) {
        (DiskFormat::Qcow2, Header::Other) => bail!(
            "{} is not a qcow2 image (no qcow2 header); if it is a raw disk image, pass --format raw",
            path.display()
        ),
        (DiskFormat::Raw, Header::Qcow2 { .. }) => bail!(
            "{} is a qcow2 image, not raw: drop --format raw (the guest would see the qcow2 container as its disk)",
            path.display()
        ),
        (DiskFormat::Qcow2, Header::Qcow2 { backing: Some(b), .. }) => bail!(flatten(&format!(
            "{} as its backing file ({})",
            b.name.as_deref().unwrap_or("a file (its name lies past the header's first 64 KiB)"),
            b.format.map_or("format not recorded, so QEMU would guess it".into(), |f| format!("format {f}"))
        ))),
        (DiskFormat::Qcow2, Header::Qcow2 { data_file: Some(d), .. }) => {
            bail!(flatten(&format!("{d} as its external data file")))
        }
        // Not even one sector: an empty file (a failed download, a `touch`)
        // would boot to nothing and leave `launch` waiting for its timeout.
        // (The head read is the whole file below 64 KiB.)
        (DiskFormat::Raw, Header::Other) if head.len() < 512 => bail!(
            "{} is not a disk image: it holds {} bytes, less than one 512-byte sector; give the image itself \
             (a download cut short leaves such a file)",
            path.display(),
            head.len()
        ),
        _ => Ok(()),
    }
}

/// The identity of a base image now.
pub fn identity(path: &Path) -> Result<BaseIdentity> {
    let meta = std::fs::metadata(path).with_context(|| format!("image {} does not exist", path.display()))?;
    if !meta.is_file() {
        bail!("image {} is not a file", path.display());
    }
    Ok(BaseIdentity {
        path: path.to_path_buf(),
        size: meta.size(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        format: detect_format(path)?.as_str().to_string(),
    })
}

/// The first 64 KiB of an image: enough for a qcow2 header and its
/// extensions.
fn read_head(path: &Path) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    File::open(path)
        .with_context(|| format!("cannot read disk image {}", path.display()))?
        .take(64 * 1024)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// `qcow2` when the header says so, else `raw`.
pub fn detect_format(path: &Path) -> Result<DiskFormat> {
    Ok(match inspect_header(&read_head(path)?) {
        Header::Qcow2 { .. } => DiskFormat::Qcow2,
        Header::Other => DiskFormat::Raw,
    })
}

/// What to say when the recorded base and the given one differ; `way_out`
/// is the caller's fix, said after the cause.
pub fn compare(recorded: &BaseIdentity, now: &BaseIdentity, way_out: &str) -> Result<()> {
    if recorded.path != now.path {
        bail!("this disk is an overlay on {}, not {}: {way_out}", recorded.path.display(), now.path.display());
    }
    if recorded.size != now.size || recorded.mtime_ns != now.mtime_ns {
        bail!(
            "base image {} changed since the overlay was made on it (size or modification time differ); booting would corrupt the guest's disk: {way_out}",
            now.path.display()
        );
    }
    Ok(())
}

/// Returns the overlay on a base from outside the instance (`--image`, a
/// Guix build), creating it on first use; refuses a changed base, and on
/// every launch a base whose header names other files ([`check_image`]).
pub fn prepare(inst: &Instance, qemu_img: &Path, base: &Path) -> Result<PathBuf> {
    let base = std::fs::canonicalize(base).with_context(|| format!("image {} does not exist", base.display()))?;
    check_image(&base, detect_format(&base)?)?;
    overlay_on(inst, qemu_img, &base)
}

/// Returns the overlay on a snapshot's disk (`run --from-snapshot`). That
/// disk is the tool's own, made in the private instance dir, and its
/// backing file is the instance's base by design (checked when that
/// instance launched), so it is not [`check_image`]d.
pub fn prepare_on_snapshot(inst: &Instance, qemu_img: &Path, disk: &Path) -> Result<PathBuf> {
    let disk =
        std::fs::canonicalize(disk).with_context(|| format!("snapshot disk {} does not exist", disk.display()))?;
    overlay_on(inst, qemu_img, &disk)
}

/// The overlay on `base` (canonical): made on first use, else its recorded
/// base compared with `base` now.
fn overlay_on(inst: &Instance, qemu_img: &Path, base: &Path) -> Result<PathBuf> {
    let id = identity(base)?;
    let overlay = inst.overlay();
    if overlay.exists() {
        match read_json::<BaseIdentity>(&inst.base_identity())? {
            Some(rec) => compare(
                &rec,
                &id,
                &format!(
                    "restore the original image, or discard the guest's disk with '{}', or use another --name",
                    inst.command("launch --recreate")
                ),
            )?,
            None => bail!(
                "{} exists but its base is not recorded: run '{}' to make it again",
                overlay.display(),
                inst.command("launch --recreate")
            ),
        }
        return Ok(overlay);
    }
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", &id.format, "-b"])
        .arg(base)
        .arg(&overlay)
        .output()
        .with_context(|| format!("cannot run {}", qemu_img.display()))?;
    if !out.status.success() {
        bail!(
            "qemu-img could not create the overlay on {}: {}",
            base.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&overlay, std::fs::Permissions::from_mode(0o600))?;
    write_json(&inst.base_identity(), &id)?;
    Ok(overlay)
}

/// Drops the overlay (guest-local state) and what depends on it.
pub fn discard(inst: &Instance) -> Vec<PathBuf> {
    [inst.overlay(), inst.base_identity(), inst.known_hosts()]
        .into_iter()
        .filter(|p| std::fs::remove_file(p).is_ok())
        .collect()
}

/// Makes a new, empty image of `bytes` at `path` (private to the user).
pub fn create(qemu_img: &Path, path: &Path, format: DiskFormat, bytes: u64) -> Result<()> {
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", format.as_str()])
        .arg(path)
        .arg(bytes.to_string())
        .output()
        .with_context(|| format!("cannot run {}", qemu_img.display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        bail!("qemu-img could not create {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The size the guest sees of image `path` (`qemu-img info`, the format
/// given so nothing is probed).
pub fn virtual_size(qemu_img: &Path, path: &Path, format: DiskFormat) -> Result<u64> {
    let out = Command::new(qemu_img)
        .args(["info", "--output=json", "-f", format.as_str()])
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {}", qemu_img.display()))?;
    if !out.status.success() {
        bail!("qemu-img cannot read {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["virtual-size"].as_u64().with_context(|| format!("qemu-img info of {} has no virtual-size", path.display()))
}

/// Grows image `path` to `bytes` with `qemu-img resize` (never shrinks:
/// the caller compared sizes). The image must not be open in a VM.
pub fn grow(qemu_img: &Path, path: &Path, format: DiskFormat, bytes: u64) -> Result<()> {
    tracing::info!("qemu-img resize -f {} {} {bytes}", format.as_str(), path.display());
    let out = Command::new(qemu_img)
        .args(["resize", "-q", "-f", format.as_str()])
        .arg(path)
        .arg(bytes.to_string())
        .output()
        .with_context(|| format!("cannot run {}", qemu_img.display()))?;
    if !out.status.success() {
        bail!("qemu-img could not resize {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qbuf-img-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn qemu_img(args: &[&str]) {
        let ok = std::process::Command::new("qemu-img").args(args).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "qemu-img {args:?} failed (is qemu-utils installed?)");
    }

    #[test]
    fn qcow2_is_the_default_and_a_raw_file_is_refused_without_format_raw() {
        let d = tmp("fmt");
        let raw = d.join("a.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let e = check_image(&raw, DiskFormat::Qcow2).unwrap_err().to_string();
        assert!(e.contains("not a qcow2 image") && e.contains("--format raw"), "{e}");
        check_image(&raw, DiskFormat::Raw).unwrap();
        let q = d.join("b.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"]);
        check_image(&q, DiskFormat::Qcow2).unwrap();
        let e = check_image(&q, DiskFormat::Raw).unwrap_err().to_string();
        assert!(e.contains("drop --format raw"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    /// A qcow2 on `base` (raw) made by qemu-img, as a download might be.
    fn on_backing(d: &Path, name: &str, base: &Path) -> PathBuf {
        let top = d.join(name);
        qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", base.to_str().unwrap(), top.to_str().unwrap()]);
        top
    }

    #[test]
    fn an_image_naming_another_host_file_is_refused_with_how_to_flatten_it() {
        let d = tmp("backing");
        // The review's attack: a host secret as the raw backing file.
        let secret = d.join("id_ed25519");
        std::fs::write(&secret, vec![b'k'; 4096]).unwrap();
        let top = on_backing(&d, "top.qcow2", &secret);
        let name = Some(secret.display().to_string());
        let backing = Some(Backing { name, format: Some("raw".into()) });
        assert_eq!(inspect_header(&std::fs::read(&top).unwrap()), Header::Qcow2 { backing, data_file: None });
        let e = check_image(&top, DiskFormat::Qcow2).unwrap_err().to_string();
        let said = format!("{} names {} as its backing file (format raw)", top.display(), secret.display());
        assert!(e.starts_with(&said), "{e}");
        assert!(e.contains(&format!("'qemu-img convert -O qcow2 {} FLAT.qcow2'", top.display())), "{e}");
        // An external data file names a host file just the same.
        let data = d.join("data.qcow2");
        let opt = format!("data_file={}", secret.display());
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opt, data.to_str().unwrap(), "4K"]);
        let e = check_image(&data, DiskFormat::Qcow2).unwrap_err().to_string();
        assert!(e.contains(&format!("names {} as its external data file", secret.display())), "{e}");
        // A version 2 header naming a backing file but no format extension.
        let mut v2 = vec![0u8; 512];
        v2[..4].copy_from_slice(QCOW2_MAGIC);
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        v2[8..16].copy_from_slice(&200u64.to_be_bytes());
        v2[16..20].copy_from_slice(&4u32.to_be_bytes());
        v2[200..204].copy_from_slice(b"base");
        let backing = Some(Backing { name: Some("base".into()), format: None });
        assert_eq!(inspect_header(&v2), Header::Qcow2 { backing, data_file: None });
        // The feature bit alone marks a data file whose name is not read.
        let mut v3 = vec![0u8; 112];
        v3[..4].copy_from_slice(b"QFI\xfb");
        v3[4..8].copy_from_slice(&3u32.to_be_bytes());
        v3[72..80].copy_from_slice(&4u64.to_be_bytes());
        v3[100..104].copy_from_slice(&104u32.to_be_bytes());
        assert!(matches!(inspect_header(&v3), Header::Qcow2 { data_file: Some(_), .. }));
        let old = d.join("old.qcow2");
        std::fs::write(&old, &v2).unwrap();
        let e = check_image(&old, DiskFormat::Qcow2).unwrap_err().to_string();
        assert!(e.contains("names base as its backing file (format not recorded, so QEMU would guess it)"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_base_with_a_backing_file_gets_no_overlay_but_a_snapshot_disk_does() {
        let d = tmp("prepare");
        let inst = crate::instance::StateDir::new(d.join("state")).instance("dev");
        std::fs::create_dir_all(&inst.dir).unwrap();
        let raw = d.join("base.img");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let top = on_backing(&d, "top.qcow2", &raw);
        let e = prepare(&inst, Path::new("qemu-img"), &top).unwrap_err().to_string();
        assert!(e.contains("as its backing file") && e.contains("qemu-img convert -O qcow2"), "{e}");
        assert!(!inst.overlay().exists(), "an overlay was made on a refused base");
        // The tool's own layering: a snapshot's disk is a backing file.
        let overlay = prepare_on_snapshot(&inst, Path::new("qemu-img"), &top).unwrap();
        assert!(matches!(inspect_header(&read_head(&overlay).unwrap()), Header::Qcow2 { backing: Some(_), .. }));
        // A self-contained base is fine.
        std::fs::remove_file(&overlay).unwrap();
        prepare(&inst, Path::new("qemu-img"), &raw).unwrap();
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn images_grow_and_report_their_size() {
        let d = tmp("grow");
        let img = Path::new("qemu-img");
        for (format, name) in [(DiskFormat::Qcow2, "a.qcow2"), (DiskFormat::Raw, "a.img")] {
            let p = d.join(name);
            qemu_img(&["create", "-q", "-f", format.as_str(), p.to_str().unwrap(), "1M"]);
            assert_eq!(virtual_size(img, &p, format).unwrap(), 1 << 20);
            grow(img, &p, format, 3 << 20).unwrap();
            assert_eq!(virtual_size(img, &p, format).unwrap(), 3 << 20, "{format:?}");
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn format_comes_from_the_header() {
        let d = std::env::temp_dir().join(format!("qbuf-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a"), b"QFI\xfb\0\0\0\x03").unwrap();
        std::fs::write(d.join("b"), b"\xeb\x3c\x90mkfs").unwrap();
        assert_eq!(detect_format(&d.join("a")).unwrap(), DiskFormat::Qcow2);
        assert_eq!(detect_format(&d.join("b")).unwrap(), DiskFormat::Raw);
        std::fs::write(d.join("empty"), b"").unwrap();
        let e = check_image(&d.join("empty"), DiskFormat::Raw).unwrap_err().to_string();
        assert!(e.contains("not a disk image") && e.contains("0 bytes"), "{e}");
        std::fs::write(d.join("sector"), [0u8; 512]).unwrap();
        check_image(&d.join("sector"), DiskFormat::Raw).unwrap();
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_changed_base_is_refused_with_the_way_out() {
        let a = BaseIdentity { path: "/img".into(), size: 10, mtime_ns: 5, format: "qcow2".into() };
        assert!(compare(&a, &a.clone(), "fix").is_ok());
        let e = compare(&a, &BaseIdentity { size: 11, ..a.clone() }, "fix").unwrap_err().to_string();
        assert!(e.contains("changed") && e.ends_with(": fix"), "{e}");
        let e = compare(&a, &BaseIdentity { path: "/other".into(), ..a.clone() }, "fix").unwrap_err().to_string();
        assert!(e.contains("/other") && e.ends_with(": fix"), "{e}");
    }
}
