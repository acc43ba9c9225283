//! Values in QEMU's option strings. QEMU's option parsers (QemuOpts and
//! keyval) split values on `,`; a literal `,` must be doubled. An unescaped
//! one can be silently misparsed: a path ending in `,snapshot` or
//! `,readonly` starts fine with a different meaning. Ids the user gives
//! (disks, share tags, snapshots) are checked here before they become
//! QEMU ids.

use std::path::Path;

use anyhow::{bail, Result};

/// Doubles every `,` so a value survives QEMU's option parser.
pub fn escape_value(v: &str) -> String {
    v.replace(',', ",,")
}

/// A path as a QEMU option value: UTF-8 only (QEMU's parsers are byte
/// strings, but our own records are JSON), commas doubled.
pub fn path_value(what: &str, p: &Path) -> Result<String> {
    let Some(s) = p.to_str() else {
        bail!("{what} path {} is not valid UTF-8; QEMU cannot be given it safely: rename or move it", p.display())
    };
    if s.contains('\n') || s.contains('\0') {
        bail!("{what} path {s:?} contains a newline; choose a path without one");
    }
    Ok(escape_value(s))
}

/// A unix socket path must fit `sun_path` (108 bytes with the NUL).
pub fn socket_value(what: &str, p: &Path) -> Result<String> {
    let v = path_value(what, p)?;
    if p.as_os_str().len() > crate::instance::paths::MAX_SOCKET_PATH {
        bail!(
            "{what} socket path {} is {} bytes, over the {} a unix socket allows: use a shorter --state-dir",
            p.display(),
            p.as_os_str().len(),
            crate::instance::paths::MAX_SOCKET_PATH
        );
    }
    Ok(v)
}

/// What a user-given id names; each becomes a QEMU id or node name, or
/// a directory name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Disk,
    ShareTag,
    Snapshot,
}

impl IdKind {
    fn label(self) -> &'static str {
        match self {
            IdKind::Disk => "disk id",
            IdKind::ShareTag => "share tag",
            IdKind::Snapshot => "snapshot name",
        }
    }
}

/// Disk and share ids become QEMU ids and node names: a letter, then
/// letters, digits, '-' and '_'; at most 31 characters. A disk id must not
/// be one of the tool's own devices' ids.
pub fn validate_id(kind: IdKind, id: &str) -> Result<()> {
    validate_id_form(kind, id)?;
    if kind == IdKind::Disk && (id.starts_with("disk0") || id.ends_with("-file") || id.starts_with("hp")) {
        bail!("disk id {id:?} is reserved for qbuf-qemu's own devices: choose another, e.g. 'data'");
    }
    Ok(())
}

/// The form of [`validate_id`] alone, for an id that names something that
/// exists (`disk resize disk0-dev`: the tool's own ids included).
pub fn validate_id_form(kind: IdKind, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 31
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        bail!("invalid {} {id:?}: use 1-31 letters, digits, '-' and '_', starting with a letter", kind.label());
    }
    Ok(())
}

/// The disk image formats this tool creates and attaches (QEMU's
/// `driver=` of the image's node; `format` in the records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub const ALL: [DiskFormat; 2] = [DiskFormat::Qcow2, DiskFormat::Raw];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }

    /// A format QEMU names (`query-block`'s `drv`); `None` for another.
    pub fn parse(s: &str) -> Option<DiskFormat> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_plain_and_ours_are_reserved() {
        for ok in ["data", "disk1", "scratch_2", "a-b"] {
            validate_id(IdKind::Disk, ok).unwrap();
        }
        for bad in ["", "1disk", "a b", "a,b", "disk0", "x-file", "hp0", &"a".repeat(32)] {
            assert!(validate_id(IdKind::Disk, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commas_are_doubled_and_unsafe_paths_refused() {
        assert_eq!(escape_value("a,b,,c"), "a,,b,,,,c");
        assert_eq!(path_value("x", Path::new("/a,b")).unwrap(), "/a,,b");
        assert!(path_value("x", Path::new("/a\nb")).is_err());
        let long = format!("/{}", "s".repeat(crate::instance::paths::MAX_SOCKET_PATH));
        assert!(socket_value("QMP", Path::new(&long)).unwrap_err().to_string().contains("shorter --state-dir"));
    }
}
