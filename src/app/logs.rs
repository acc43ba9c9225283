//! `logs` and `events`: the serial console log and the QMP event log, as
//! files (they outlive the VM), whole or from the end, and `--follow`ed
//! while the VM runs. What the guest printed reaches the terminal without
//! its control sequences ([`TerminalFilter`]): a guest must not be able to
//! move the user's cursor or make the terminal type (`ESC[6n`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::usage;
use super::{done, Ctx};
use crate::cli::LogsArgs;
use crate::instance::records::BootPlan;
use crate::instance::{read_json, Instance, Liveness, Lock};
use crate::logs::TerminalFilter;
use crate::report::events::{EventLine, Events, SerialLog};
use crate::report::write_stdout;

/// Whether the VM is there to write more (its supervisor holds the lock).
fn alive(inst: &Instance) -> impl FnMut() -> bool + '_ {
    move || Lock::is_held(inst).unwrap_or(false)
}

pub fn logs(ctx: &Ctx, a: &LogsArgs) -> Result<i32> {
    if a.follow && ctx.json {
        return usage("logs --follow streams the guest's console as text; --json does not apply");
    }
    let inst = ctx.existing()?;
    let path = inst.serial_log();
    let (mut pieces, mut note) = serial_pieces(&inst, a.boot)?;
    if let Some(n) = a.lines {
        if let Some((i, at)) = crate::logs::last_lines_of(&pieces, n)? {
            if i > 0 || at > pieces[0].1 {
                note = None; // the lines asked for are all there
            }
            pieces = [&[(pieces[i].0.clone(), at)], &pieces[i + 1..]].concat();
        }
    }
    if let Some(n) = &note {
        ctx.progress(&format!("note: {n}"));
    }
    if ctx.json {
        let older_path = pieces.iter().map(|p| &p.0).find(|p| **p != path).cloned();
        let head = SerialLog { name: ctx.name.clone(), path: path.clone(), older_path, note };
        stream_json(&head, &pieces)?;
        return Ok(0);
    }
    let mut filter = TerminalFilter::default();
    let mut out = Vec::new();
    let end = crate::logs::read_pieces(&pieces, |chunk| {
        out.clear();
        filter.push(chunk, &mut out);
        write_stdout(&out)
    })?;
    if a.follow {
        follow_to_end(ctx, &inst, &path, end, |chunk| {
            out.clear();
            filter.push(chunk, &mut out);
            write_stdout(&out)
        })?;
    }
    Ok(0)
}

/// Files of console output, oldest first, each with the offset to read from.
type Pieces = Vec<(PathBuf, u64)>;

/// The files that hold the console output asked for; and where older
/// output went, when the serial log reached its cap (serial.log.1 holds the
/// part before serial.log, and what came before that was dropped).
fn serial_pieces(inst: &Instance, boot: bool) -> Result<(Pieces, Option<String>)> {
    use std::os::unix::fs::MetadataExt;
    let (old, cur) = (inst.serial_log_old(), inst.serial_log());
    let ino = |p: &Path| std::fs::metadata(p).ok().map(|m| m.ino());
    let cap = crate::logs::SERIAL_CAP >> 20;
    let rotated = format!(
        "the console log reached its cap of {cap} MiB: the output before {} is in {} (shown first), \
         and anything older was dropped",
        cur.display(),
        old.display()
    );
    let all = || match ino(&old) {
        Some(_) => (vec![(old.clone(), 0), (cur.clone(), 0)], Some(rotated.clone())),
        None => (vec![(cur.clone(), 0)], None),
    };
    if !boot {
        return Ok(all());
    }
    let plan = read_json::<BootPlan>(&inst.boot_plan())?;
    let (start, boot_ino) = plan.map(|p| (p.serial_start, p.serial_inode)).unwrap_or((0, None));
    Ok(match boot_ino {
        Some(i) if ino(&cur) == Some(i) => (vec![(cur, start)], None),
        Some(i) if ino(&old) == Some(i) => (vec![(old, start), (cur, 0)], None),
        Some(_) => {
            let (v, _) = all();
            let n =
                format!("the start of this boot's console output was dropped (the log keeps the last {} MiB)", 2 * cap);
            (v, Some(n))
        }
        None => (vec![(cur, start)], None),
    })
}

/// `logs --json`, streamed: the document's fields, then the text as it is
/// read, so a large log never sits in memory.
fn stream_json(head: &SerialLog, pieces: &[(PathBuf, u64)]) -> Result<()> {
    let mut doc = serde_json::to_string(head)?;
    doc.pop(); // the closing brace
    doc.push_str(",\"text\":\"");
    write_stdout(doc.as_bytes())?;
    let mut carry = Vec::new();
    crate::logs::read_pieces(pieces, |chunk| {
        carry.extend_from_slice(chunk);
        let cut = crate::logs::utf8_boundary(&carry);
        let text = json_string_body(&String::from_utf8_lossy(&carry[..cut]))?;
        carry.drain(..cut);
        write_stdout(text.as_bytes())
    })?;
    let mut tail = json_string_body(&String::from_utf8_lossy(&carry))?;
    tail.push_str("\"}\n");
    write_stdout(tail.as_bytes())
}

/// `s` as JSON string contents, without the quotes.
fn json_string_body(s: &str) -> Result<String> {
    let q = serde_json::to_string(s)?;
    Ok(q[1..q.len() - 1].to_string())
}

/// Follows `path` from `offset` until the VM stops, then says so.
fn follow_to_end(
    ctx: &Ctx,
    inst: &Instance,
    path: &Path,
    offset: u64,
    emit: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    if Liveness::probe(inst)?.is_stopped() {
        ctx.progress(&format!("instance '{}' is not running: nothing more will come", ctx.name));
        return Ok(());
    }
    crate::logs::follow(path, offset, alive(inst), emit)?;
    ctx.progress(&format!("instance '{}' stopped: nothing more will come", ctx.name));
    Ok(())
}

/// `events`: every recorded event; with `--follow`, then each new one as
/// it comes until the VM stops (with `--json`, one JSON object per line).
pub fn events(ctx: &Ctx, follow: bool) -> Result<i32> {
    let inst = ctx.existing()?;
    if !follow {
        let (events, skipped) = read_events(&inst)?;
        if skipped > 0 {
            let log = inst.events_log();
            ctx.progress(&format!("note: skipped {skipped} damaged line(s) of {} that are no event", log.display()));
        }
        return done(ctx, &Events { name: ctx.name.clone(), events });
    }
    let mut partial = Vec::new();
    let mut print = |chunk: &[u8]| -> Result<()> {
        partial.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            if let Some(ev) = EventLine::parse(&String::from_utf8_lossy(&line)) {
                let text = if ctx.json { serde_json::to_string(&ev)? } else { ev.human() };
                writeln!(out, "{text}")?;
            }
        }
        write_stdout(&out)
    };
    let pieces: Vec<(PathBuf, u64)> =
        [inst.events_log_old(), inst.events_log()].into_iter().filter(|p| p.exists()).map(|p| (p, 0)).collect();
    let end = crate::logs::read_pieces(&pieces, &mut print)?;
    follow_to_end(ctx, &inst, &inst.events_log(), end, print)?;
    Ok(0)
}

/// Every event recorded so far (events.jsonl.1, then events.jsonl: both
/// are capped, so this is bounded), read as `--follow` reads them: a byte
/// that is not UTF-8 becomes U+FFFD, and a line that is no event (a
/// damaged one) is skipped; how many were is returned too.
fn read_events(inst: &Instance) -> Result<(Vec<EventLine>, usize)> {
    let (mut v, mut skipped) = (vec![], 0);
    for path in [inst.events_log_old(), inst.events_log()] {
        match std::fs::read(&path) {
            Ok(b) => {
                for line in String::from_utf8_lossy(&b).lines().filter(|l| !l.trim().is_empty()) {
                    match EventLine::parse(line) {
                        Some(e) => v.push(e),
                        None => skipped += 1,
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    Ok((v, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_that_is_not_utf8_costs_one_line_at_most_not_the_log() {
        let (_root, inst) = crate::instance::paths::scratch_instance("x");
        let mut log = br#"{"event":"RESUME","data":{},"timestamp":1.5}"#.to_vec();
        log.extend_from_slice(b"\n{\"event\":\"X\xff\",\"timestamp\":2}\n\xfe\xff not json\n\n");
        log.extend_from_slice(br#"{"event":"SHUTDOWN","data":{"guest":true},"timestamp":3}"#);
        std::fs::write(inst.events_log(), log).unwrap();
        let (events, skipped) = read_events(&inst).unwrap();
        let names: Vec<&str> = events.iter().map(|e| e.event.event.as_str()).collect();
        assert_eq!(names, ["RESUME", "X\u{fffd}", "SHUTDOWN"]);
        assert_eq!(skipped, 1);
    }
}
