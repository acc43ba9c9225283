//! Values in QEMU's option strings. QEMU's option parsers (QemuOpts and
//! keyval) split values on `,`; a literal `,` must be doubled. An unescaped
//! one can be silently misparsed: a path ending in `,snapshot` or
//! `,readonly` starts fine with a different meaning.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_are_doubled_and_unsafe_paths_refused() {
        assert_eq!(escape_value("a,b,,c"), "a,,b,,,,c");
        assert_eq!(path_value("x", Path::new("/a,b")).unwrap(), "/a,,b");
        assert!(path_value("x", Path::new("/a\nb")).is_err());
        let long = format!("/{}", "s".repeat(crate::instance::paths::MAX_SOCKET_PATH));
        assert!(socket_value("QMP", Path::new(&long)).unwrap_err().to_string().contains("shorter --state-dir"));
    }
}
