//! `logs` and `events`: the serial console log and the QMP event log, as
//! files (they outlive the VM), whole or from the end, and `--follow`ed
//! while the VM runs. What the guest printed reaches the terminal without
//! its control sequences ([`TerminalFilter`]): a guest must not be able to
//! move the user's cursor or make the terminal type (`ESC[6n`).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::observe::usage;
use super::{done, Ctx};
use crate::cli::LogsArgs;
use crate::instance::records::BootPlan;
use crate::instance::{read_json, Instance, Lock};
use crate::logs::{last_lines_start, TerminalFilter};
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
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut start = match a.boot {
        true => read_json::<BootPlan>(&inst.boot_plan())?.map(|p| p.serial_start as usize).unwrap_or(0),
        false => 0,
    };
    start = start.min(bytes.len());
    if let Some(n) = a.lines {
        start += last_lines_start(&bytes[start..], n);
    }
    if ctx.json {
        let text = String::from_utf8_lossy(&bytes[start..]).into_owned();
        return done(ctx, &SerialLog { name: ctx.name.clone(), path, text });
    }
    let mut filter = TerminalFilter::default();
    let mut out = Vec::new();
    filter.push(&bytes[start..], &mut out);
    write_stdout(&out)?;
    if a.follow {
        follow_to_end(ctx, &inst, &path, bytes.len() as u64, |chunk| {
            out.clear();
            filter.push(chunk, &mut out);
            write_stdout(&out)
        })?;
    }
    Ok(0)
}

/// Follows `path` from `offset` until the VM stops, then says so.
fn follow_to_end(
    ctx: &Ctx,
    inst: &Instance,
    path: &Path,
    offset: u64,
    emit: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    if !Lock::is_held(inst)? {
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
        return done(ctx, &Events { name: ctx.name.clone(), events: read_events(&inst.events_log())? });
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
    let recorded = std::fs::read(inst.events_log()).unwrap_or_default();
    print(&recorded)?;
    follow_to_end(ctx, &inst, &inst.events_log(), recorded.len() as u64, print)?;
    Ok(0)
}

/// Every event recorded so far.
fn read_events(path: &Path) -> Result<Vec<EventLine>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.lines().filter_map(EventLine::parse).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}
