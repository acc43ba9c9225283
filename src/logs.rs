//! The logs an instance keeps, read as files: the end of one for an error
//! message, or everything appended to one as it comes (`--follow`). They are
//! plain files (serial.log and qemu.log, which the supervisor writes from
//! QEMU's output, and events.jsonl), so they can be read whether or not the
//! VM runs. Each is bounded ([`Capped`]): past its cap it becomes `NAME.1`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

mod filter;
pub use filter::{guest_text, TerminalFilter};

/// The cap of serial.log (and of serial.log.1): a guest that floods its
/// console (measured: 15 MB a minute) keeps at most twice this on disk.
pub const SERIAL_CAP: u64 = 2 << 20;
/// The cap of qemu.log and of events.jsonl (and of their `.1` files).
pub const SMALL_CAP: u64 = 1 << 20;

/// A log file that never grows past `cap` bytes: a write that would take it
/// past the cap renames it to `old` (replacing the one before) and goes on
/// in a fresh file, so at most twice the cap is kept and the newest lines
/// always are. Cut at a line end when the chunk has one.
pub struct Capped {
    path: std::path::PathBuf,
    old: std::path::PathBuf,
    cap: u64,
    file: File,
    len: u64,
}

impl Capped {
    /// Opens `path` for appending (created 0600).
    pub fn open(path: &Path, old: &Path, cap: u64) -> std::io::Result<Capped> {
        let file = Self::create(path)?;
        let len = file.metadata()?.len();
        Ok(Capped { path: path.into(), old: old.into(), cap: cap.max(1), file, len })
    }

    fn create(path: &Path) -> std::io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
    }

    pub fn write(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        while !buf.is_empty() {
            let room = self.cap.saturating_sub(self.len) as usize;
            if room == 0 {
                std::fs::rename(&self.path, &self.old)?;
                self.file = Self::create(&self.path)?;
                self.len = 0;
                continue;
            }
            let n = match buf[..room.min(buf.len())].iter().rposition(|b| *b == b'\n') {
                _ if buf.len() <= room => buf.len(),
                Some(i) => i + 1,
                // Rather a fresh file than a line cut in two.
                None if self.len > 0 => 0,
                None => room,
            };
            if n == 0 {
                self.len = self.cap;
                continue;
            }
            self.file.write_all(&buf[..n])?;
            self.len += n as u64;
            // What did not fit starts the next file.
            if n < buf.len() {
                self.len = self.cap;
            }
            buf = &buf[n..];
        }
        Ok(())
    }
}

/// The last `max` bytes of a log file from byte `from` on, trimmed, or
/// `when_empty`: what error messages quote of QEMU's output, the supervisor
/// log and the serial console (which is appended across boots, so a boot
/// quotes only from where it started). The guest wrote much of it, so its
/// terminal controls are removed ([`TerminalFilter`]).
pub fn tail(path: &Path, from: u64, max: usize, when_empty: &str) -> String {
    let b = read_end(path, from, max).unwrap_or_default();
    let s = guest_text(&b, usize::MAX);
    if s.is_empty() {
        when_empty.to_string()
    } else {
        s
    }
}

/// At most the last `max` bytes of `path` after byte `from`, read from the
/// file's end only (a serial log grows to megabytes over many boots).
fn read_end(path: &Path, from: u64, max: usize) -> Option<Vec<u8>> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    // Past the end: the file was rotated (see [`Capped`]) since `from` was taken.
    let from = if from > len { 0 } else { from };
    f.seek(SeekFrom::Start(from.max(len.saturating_sub(max as u64)))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// The last line of `path` after byte `from`, without terminal control
/// sequences; `None` when there is none yet.
pub fn last_line(path: &Path, from: u64) -> Option<String> {
    let buf = read_end(path, from, 1024)?;
    let clean = String::from_utf8_lossy(&TerminalFilter::clean(&buf)).into_owned();
    clean.lines().map(str::trim).rfind(|l| !l.is_empty()).map(String::from)
}

/// Calls `emit` with each chunk appended to `path` from `offset` on, while
/// `alive()` says the writer is there: once it says no, what was written
/// until then is read and `follow` returns (or earlier, when `emit` fails).
/// A file that does not exist yet is waited for; one that was replaced or
/// shrank (destroyed and made again) is read from its start.
pub fn follow(
    path: &Path,
    mut offset: u64,
    mut alive: impl FnMut() -> bool,
    mut emit: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |m: &std::fs::Metadata| (m.dev(), m.ino());
    let mut buf = vec![0u8; 64 * 1024];
    // The file is kept open, so its inode cannot be reused by a new file at
    // the same path: a different inode there means the file was replaced.
    let mut open: Option<(File, (u64, u64))> = None;
    let mut last_look = false;
    loop {
        let at_path = std::fs::metadata(path).ok().map(|m| id(&m));
        // A file rotated away (see [`Capped`]) is read to its end first.
        let unread = match open.as_ref() {
            Some((f, _)) => f.metadata()?.len() > offset,
            None => false,
        };
        if at_path.is_some() && at_path != open.as_ref().map(|o| o.1) && !unread {
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
        if last_look {
            return Ok(());
        }
        // The writer's last words are in before it lets go: one more read.
        last_look = !alive();
        if !last_look {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Calls `emit` with what `pieces` (files, each from an offset) hold, in
/// order and in chunks, so a log of any size streams in bounded memory. A
/// missing file is skipped. Returns where the last piece ended (a
/// `--follow` goes on from there).
pub fn read_pieces(pieces: &[(PathBuf, u64)], mut emit: impl FnMut(&[u8]) -> Result<()>) -> Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = 0;
    for (path, from) in pieces {
        end = 0;
        let Ok(mut f) = File::open(path) else { continue };
        end = f.seek(SeekFrom::Start(*from))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            end += n as u64;
            emit(&buf[..n])?;
        }
    }
    Ok(end)
}

/// Where the last `n` lines of `pieces` start: the piece's index and the
/// offset in its file (a final line without a newline counts, as `tail`
/// counts). Read backwards from the end, in blocks.
pub fn last_lines_of(pieces: &[(PathBuf, u64)], n: usize) -> Result<Option<(usize, u64)>> {
    let mut found = 0;
    let mut at_end = true;
    let mut buf = vec![0u8; 64 * 1024];
    for (i, (path, from)) in pieces.iter().enumerate().rev() {
        let Ok(mut f) = File::open(path) else { continue };
        let mut pos = f.metadata()?.len();
        if n == 0 {
            return Ok(Some((i, pos)));
        }
        while pos > *from {
            let len = (pos - from).min(buf.len() as u64) as usize;
            f.seek(SeekFrom::Start(pos - len as u64))?;
            f.read_exact(&mut buf[..len])?;
            for j in (0..len).rev() {
                let last = std::mem::replace(&mut at_end, false);
                if buf[j] == b'\n' && !last {
                    found += 1;
                    if found == n {
                        let at = pos - len as u64 + j as u64 + 1;
                        // The end of one file is the start of the next.
                        return Ok(Some(match pieces.get(i + 1) {
                            Some(next) if at == f.metadata()?.len() => (i + 1, next.1),
                            _ => (i, at),
                        }));
                    }
                }
            }
            pos -= len as u64;
        }
    }
    Ok(pieces.first().map(|p| (0, p.1)))
}

/// How much of `b` is whole UTF-8 characters: a character cut at the end
/// of a chunk waits for the next one.
pub fn utf8_boundary(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let c = b[b.len() - back];
        if c >= 0xf8 {
            return b.len(); // never valid: passed on, to be replaced
        }
        if c & 0xc0 == 0xc0 {
            let need = if c >= 0xf0 {
                4
            } else if c >= 0xe0 {
                3
            } else {
                2
            };
            return if need > back { b.len() - back } else { b.len() };
        }
        if c & 0xc0 != 0x80 {
            return b.len();
        }
    }
    b.len()
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
        let r = follow(
            &p,
            0,
            || true,
            |c| {
                seen.extend_from_slice(c);
                if seen.ends_with(b"three, replaced\n") {
                    anyhow::bail!("done")
                }
                Ok(())
            },
        );
        writer.join().unwrap();
        assert_eq!(r.unwrap_err().to_string(), "done");
        assert_eq!(String::from_utf8(seen).unwrap(), "one\ntwo\nthree, replaced\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn follow_ends_once_the_writer_is_gone_with_its_last_words() {
        let dir = std::env::temp_dir().join(format!("qbuf-follow-end-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log");
        std::fs::write(&p, "one\n").unwrap();
        let mut seen = Vec::new();
        let mut checks = 0;
        follow(
            &p,
            0,
            || {
                checks += 1;
                // The writer's last line lands between its last check and its exit.
                std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"last\n").unwrap();
                checks < 2
            },
            |c| {
                seen.extend_from_slice(c);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(String::from_utf8(seen).unwrap(), "one\nlast\nlast\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_last_line_is_clean_and_from_this_boot() {
        let dir = std::env::temp_dir().join(format!("qbuf-last-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("serial.log");
        std::fs::write(&p, "old boot\n").unwrap();
        assert_eq!(last_line(&p, 9), None);
        std::fs::write(&p, "old boot\n[ 1.0] virtio\r\n\x1b[6nlogin: \r\n\r\n").unwrap();
        assert_eq!(last_line(&p, 9).as_deref(), Some("login:"));
        assert_eq!(last_line(&dir.join("none"), 0), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_last_lines_start_where_tail_would_across_the_rotated_file() {
        let dir = std::env::temp_dir().join(format!("qbuf-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (old, cur) = (dir.join("log.1"), dir.join("log"));
        std::fs::write(&old, "a\nb\n").unwrap();
        std::fs::write(&cur, "c\nd\n").unwrap();
        let p = vec![(old.clone(), 0), (cur.clone(), 0)];
        assert_eq!(last_lines_of(&p, 1).unwrap(), Some((1, 2)));
        assert_eq!(last_lines_of(&p, 2).unwrap(), Some((1, 0)));
        assert_eq!(last_lines_of(&p, 3).unwrap(), Some((0, 2)));
        assert_eq!(last_lines_of(&p, 9).unwrap(), Some((0, 0)));
        assert_eq!(last_lines_of(&p, 0).unwrap(), Some((1, 4)));
        std::fs::write(&cur, "c\nd").unwrap();
        assert_eq!(last_lines_of(&p, 1).unwrap(), Some((1, 2)));
        assert_eq!(last_lines_of(&[(cur.clone(), 2)], 5).unwrap(), Some((0, 2)));
        let mut seen = vec![];
        let end = read_pieces(&[(old, 2), (cur, 0), (dir.join("none"), 0)], |c| {
            seen.extend_from_slice(c);
            Ok(())
        })
        .unwrap();
        assert_eq!((seen.as_slice(), end), (&b"b\nc\nd"[..], 0));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_capped_log_keeps_the_newest_lines_and_never_passes_its_cap() {
        let dir = std::env::temp_dir().join(format!("qbuf-capped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cur, old) = (dir.join("log"), dir.join("log.1"));
        let mut log = Capped::open(&cur, &old, 10).unwrap();
        for line in ["one\n", "two\n", "three\n", "a long line past the cap\n", "end\n"] {
            log.write(line.as_bytes()).unwrap();
            assert!(std::fs::metadata(&cur).unwrap().len() <= 10);
        }
        assert_eq!(std::fs::read_to_string(&cur).unwrap(), " cap\nend\n");
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "e past the");
        // Reopened, it goes on where it was.
        let mut log = Capped::open(&cur, &old, 10).unwrap();
        log.write(b"xy\n").unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), " cap\nend\n");
        assert_eq!(std::fs::read_to_string(&cur).unwrap(), "xy\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn utf8_cut_at_a_chunk_end_waits_for_the_rest() {
        let e = "é".as_bytes(); // c3 a9
        assert_eq!(utf8_boundary(b"ab"), 2);
        assert_eq!(utf8_boundary(&[b'a', e[0]]), 1);
        assert_eq!(utf8_boundary(&[b'a', e[0], e[1]]), 3);
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(utf8_boundary(&euro[..2]), 0);
        assert_eq!(utf8_boundary(euro), 3);
        assert_eq!(utf8_boundary(&[0xff]), 1);
    }

    #[test]
    fn tail_quotes_only_this_boot_and_only_the_end() {
        let dir = std::env::temp_dir().join(format!("qbuf-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("serial.log");
        std::fs::write(&f, "old boot\n  new boot line 1\nline 2\n").unwrap();
        assert_eq!(tail(&f, 9, 1000, "-"), "new boot line 1\nline 2");
        assert_eq!(tail(&f, 0, 7, "-"), "line 2");
        assert_eq!(tail(&f, 34, 10, "(nothing)"), "(nothing)");
        // Past the end: the file was rotated since, so it is all new.
        assert_eq!(tail(&f, 1000, 7, "(nothing)"), "line 2");
        assert_eq!(tail(&dir.join("missing"), 0, 10, "(none)"), "(none)");
        std::fs::write(&f, "Kernel panic - not syncing: \x1b]0;title\x07x\x1b[6n\n").unwrap();
        assert_eq!(tail(&f, 0, 1000, "-"), "Kernel panic - not syncing: x", "the guest's escapes are dropped");
        // The guest's terminal controls are not quoted.
        std::fs::write(&f, b"boot\n\x1b]0;owned\x07login:\x9b2J\rgone\n").unwrap();
        assert_eq!(tail(&f, 0, 1000, "-"), "boot\nlogin:\ngone");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
