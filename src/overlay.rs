//! The instance's boot disk: a qcow2 overlay on a base that is never written.
//! The overlay records the base's identity; a changed base would silently
//! corrupt the guest's view of its disk, so booting on one is refused.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::instance::{read_json, write_json, Instance};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
    pub format: String,
}

impl BaseIdentity {
    pub fn of(path: &Path) -> Result<BaseIdentity> {
        let meta = std::fs::metadata(path).with_context(|| format!("image {} does not exist", path.display()))?;
        if !meta.is_file() {
            bail!("image {} is not a file", path.display());
        }
        Ok(BaseIdentity {
            path: path.to_path_buf(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            format: detect_format(path)?.to_string(),
        })
    }
}

/// `qcow2` when the file starts with qcow2's magic, else `raw`. The format is
/// always given to QEMU explicitly so it never probes a raw image (whose
/// first bytes a guest controls).
pub fn detect_format(path: &Path) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let n = f.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" { "qcow2" } else { "raw" })
}

/// What to say when the recorded base and the given one differ.
pub fn compare(recorded: &BaseIdentity, now: &BaseIdentity) -> Result<()> {
    if recorded.path != now.path {
        bail!(
            "this instance's disk is an overlay on {}, not {}: to boot the new image discard the guest's disk with 'launch --recreate', or use another --name",
            recorded.path.display(),
            now.path.display()
        );
    }
    if recorded.size != now.size || recorded.mtime_ns != now.mtime_ns {
        bail!(
            "base image {} changed since this instance's overlay was made on it (size or modification time differ); booting would corrupt the guest's disk. Restore the original image, or discard the guest's disk with 'launch --recreate'",
            now.path.display()
        );
    }
    Ok(())
}

/// Returns the overlay, creating it on first use; refuses a changed base.
pub fn prepare(inst: &Instance, qemu_img: &Path, base: &Path) -> Result<PathBuf> {
    let base = std::fs::canonicalize(base).with_context(|| format!("image {} does not exist", base.display()))?;
    let id = BaseIdentity::of(&base)?;
    let overlay = inst.overlay();
    if overlay.exists() {
        match read_json::<BaseIdentity>(&inst.base_identity())? {
            Some(rec) => compare(&rec, &id)?,
            None => bail!(
                "{} exists but its base is not recorded: run 'qbuf-qemu --name {} launch --recreate' to make it again",
                overlay.display(),
                inst.name
            ),
        }
        return Ok(overlay);
    }
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", &id.format, "-b"])
        .arg(&base)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_comes_from_the_header() {
        let d = std::env::temp_dir().join(format!("qbuf-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a"), b"QFI\xfb\0\0\0\x03").unwrap();
        std::fs::write(d.join("b"), b"\xeb\x3c\x90mkfs").unwrap();
        assert_eq!(detect_format(&d.join("a")).unwrap(), "qcow2");
        assert_eq!(detect_format(&d.join("b")).unwrap(), "raw");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_changed_base_is_refused_with_the_way_out() {
        let a = BaseIdentity { path: "/img".into(), size: 10, mtime_ns: 5, format: "qcow2".into() };
        assert!(compare(&a, &a.clone()).is_ok());
        let e = compare(&a, &BaseIdentity { size: 11, ..a.clone() }).unwrap_err().to_string();
        assert!(e.contains("changed") && e.contains("--recreate"), "{e}");
        let e = compare(&a, &BaseIdentity { path: "/other".into(), ..a.clone() }).unwrap_err().to_string();
        assert!(e.contains("/other") && e.contains("--recreate"), "{e}");
    }
}
