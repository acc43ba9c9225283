//! The logs an instance keeps, read as files: the end of one for an error
//! message, or everything appended to one as it comes (`--follow`). They are
//! plain files (serial.log from QEMU's chardev logfile, events.jsonl from the
//! supervisor), so they can be read whether or not the VM runs.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

/// The last `max` bytes of a log file from byte `from` on, trimmed, or
/// `when_empty`: what error messages quote of QEMU's output, the supervisor
/// log and the serial console (which is appended across boots, so a boot
/// quotes only from where it started).
pub fn tail(path: &Path, from: u64, max: usize, when_empty: &str) -> String {
    let b = std::fs::read(path).unwrap_or_default();
    let part = &b[(from as usize).min(b.len())..];
    let s = String::from_utf8_lossy(&part[part.len().saturating_sub(max)..]).trim().to_string();
    if s.is_empty() {
        when_empty.to_string()
    } else {
        s
    }
}

/// Calls `emit` with each chunk appended to `path` from `offset` on, forever
/// (until the process is interrupted or `emit` fails). A file that does not
/// exist yet is waited for; one that was replaced or shrank (destroyed and
/// made again) is read from its start.
pub fn follow(path: &Path, mut offset: u64, mut emit: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |m: &std::fs::Metadata| (m.dev(), m.ino());
    let mut buf = vec![0u8; 64 * 1024];
    // The file is kept open, so its inode cannot be reused by a new file at
    // the same path: a different inode there means the file was replaced.
    let mut open: Option<(File, (u64, u64))> = None;
    loop {
        let at_path = std::fs::metadata(path).ok().map(|m| id(&m));
        if at_path.is_some() && at_path != open.as_ref().map(|o| o.1) {
            if let Ok(f) = File::open(path) {
                if open.is_some() {
                    offset = 0;
                }
                let fid = id(&f.metadata()?);
                open = Some((f, fid));
            }
        }
        if let Some((f, _)) = open.as_mut() {
            let len = f.metadata()?.len();
            if len < offset {
                offset = 0; // truncated
            }
            if len > offset {
                f.seek(SeekFrom::Start(offset))?;
                let n = f.read(&mut buf)?;
                offset += n as u64;
                emit(&buf[..n])?;
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn follow_sees_appends_and_a_recreated_file() {
        let dir = std::env::temp_dir().join(format!("qbuf-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log");
        std::fs::write(&p, "one\n").unwrap();
        let p2 = p.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::OpenOptions::new().append(true).open(&p2).unwrap().write_all(b"two\n").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            std::fs::remove_file(&p2).unwrap();
            std::fs::write(&p2, "three, replaced\n").unwrap();
        });
        let mut seen = Vec::new();
        let r = follow(&p, 0, |c| {
            seen.extend_from_slice(c);
            if seen.ends_with(b"three, replaced\n") {
                anyhow::bail!("done")
            }
            Ok(())
        });
        writer.join().unwrap();
        assert_eq!(r.unwrap_err().to_string(), "done");
        assert_eq!(String::from_utf8(seen).unwrap(), "one\ntwo\nthree, replaced\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tail_quotes_only_this_boot_and_only_the_end() {
        let dir = std::env::temp_dir().join(format!("qbuf-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("serial.log");
        std::fs::write(&f, "old boot\n  new boot line 1\nline 2\n").unwrap();
        assert_eq!(tail(&f, 9, 1000, "-"), "new boot line 1\nline 2");
        assert_eq!(tail(&f, 0, 7, "-"), "line 2");
        assert_eq!(tail(&f, 1000, 10, "(nothing)"), "(nothing)");
        assert_eq!(tail(&dir.join("missing"), 0, 10, "(none)"), "(none)");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
