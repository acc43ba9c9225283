//! What an instance recorded about its life, printed or followed: the QMP
//! event log (events.jsonl, written by the supervisor, appended across
//! relaunches) and the serial console log (serial.log, written by QEMU's
//! chardev logfile). Both are plain files, so they can be read and followed
//! whether or not the VM runs.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::lifecycle::Ctx;
use crate::qmp::Event;

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
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

pub fn utc_time(ts: f64) -> String {
    let ms = (ts * 1000.0).round() as i64;
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let s = ms_of_day / 1000;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC", s / 3600, s / 60 % 60, s % 60, ms_of_day % 1000)
}

/// One event as `events` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct EventLine {
    #[serde(flatten)]
    pub event: Event,
    /// `timestamp`, readable.
    pub time: String,
}

impl EventLine {
    pub fn parse(line: &str) -> Option<EventLine> {
        let event: Event = serde_json::from_str(line.trim()).ok()?;
        Some(EventLine { time: utc_time(event.timestamp), event })
    }

    pub fn human(&self) -> String {
        match &self.event.data {
            Value::Null => format!("{}  {}", self.time, self.event.event),
            Value::Object(m) if m.is_empty() => format!("{}  {}", self.time, self.event.event),
            d => format!("{}  {}  {d}", self.time, self.event.event),
        }
    }
}

/// Every event recorded so far.
pub fn read_events(path: &Path) -> Result<Vec<EventLine>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.lines().filter_map(EventLine::parse).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `events` without `--follow`.
#[derive(Debug, Clone, Serialize)]
pub struct Events {
    pub name: String,
    pub events: Vec<EventLine>,
}

impl Events {
    pub fn human(&self) -> String {
        if self.events.is_empty() {
            return format!("(no events recorded for instance '{}')", self.name);
        }
        self.events.iter().map(EventLine::human).collect::<Vec<_>>().join("\n")
    }
}

pub fn events(ctx: &Ctx) -> Result<Events> {
    let inst = ctx.existing()?;
    Ok(Events { name: ctx.name.clone(), events: read_events(&inst.events_log())? })
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

/// `events --follow`: what was recorded, then each new event as it comes;
/// with `json`, one JSON object per line (JSON Lines).
pub fn follow_events(ctx: &Ctx, json: bool) -> Result<()> {
    let path = ctx.existing()?.events_log();
    let mut out = std::io::stdout();
    let mut partial = Vec::new();
    follow(&path, 0, |chunk| {
        partial.extend_from_slice(chunk);
        while let Some(end) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            if let Some(ev) = EventLine::parse(&String::from_utf8_lossy(&line)) {
                let text = if json { serde_json::to_string(&ev)? } else { ev.human() };
                writeln!(out, "{text}")?;
            }
        }
        Ok(out.flush()?)
    })
}

/// `logs`: the serial console log as the guest wrote it.
#[derive(Debug, Clone, Serialize)]
pub struct SerialLog {
    pub name: String,
    pub path: std::path::PathBuf,
    pub text: String,
}

pub fn serial_log(ctx: &Ctx) -> Result<SerialLog> {
    let path = ctx.existing()?.serial_log();
    let text = match std::fs::read(&path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(SerialLog { name: ctx.name.clone(), path, text })
}

/// `logs --follow`: the log so far, then whatever the guest prints.
pub fn follow_serial_log(ctx: &Ctx) -> Result<()> {
    let path = ctx.existing()?.serial_log();
    let mut out = std::io::stdout();
    follow(&path, 0, |chunk| {
        out.write_all(chunk)?;
        Ok(out.flush()?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_read_as_utc() {
        assert_eq!(utc_time(0.0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc_time(1_764_093_781.123_4), "2025-11-25 18:03:01.123 UTC");
        assert_eq!(utc_time(951_782_400.0), "2000-02-29 00:00:00.000 UTC");
        assert_eq!(utc_time(4_107_542_399.999), "2100-02-28 23:59:59.999 UTC");
    }

    #[test]
    fn event_lines_parse_and_render() {
        let e = EventLine::parse(
            r#"{"event":"SHUTDOWN","data":{"guest":true,"reason":"guest-shutdown"},"timestamp":1764093781.5}"#,
        )
        .unwrap();
        assert_eq!(e.human(), r#"2025-11-25 18:03:01.500 UTC  SHUTDOWN  {"guest":true,"reason":"guest-shutdown"}"#);
        let p = EventLine::parse(r#"{"event":"POWERDOWN","data":null,"timestamp":1.0}"#).unwrap();
        assert_eq!(p.human(), "1970-01-01 00:00:01.000 UTC  POWERDOWN");
        assert!(EventLine::parse("not json").is_none());
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "SHUTDOWN");
        assert_eq!(v["time"], "2025-11-25 18:03:01.500 UTC");
        assert_eq!(v["timestamp"], 1764093781.5);
    }

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
