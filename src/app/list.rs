//! `list`: every instance of the state dir with its state, and the message
//! for a `--name` that names none (the existing ones, and the closest).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Result;

use super::Ctx;
use crate::config::Settings;
use crate::instance::read_json;
use crate::report::list::{boot_summary, InstanceLine, InstanceList};

/// Every instance; one whose records cannot be read is listed as damaged
/// (which file, and what to do) and never hides the others.
pub fn list(ctx: &Ctx) -> Result<InstanceList> {
    let instances = ctx
        .state
        .instance_names()
        .into_iter()
        .map(|name| {
            let one = Ctx { name: name.clone(), ..ctx.clone() };
            line(&one).unwrap_or_else(|e| InstanceLine::damaged(name, format!("{e:#}"), allocated(&one.instance().dir)))
        })
        .collect();
    Ok(InstanceList { state_dir: ctx.state.root.clone(), instances, launch_command: ctx.command("launch") })
}

/// One instance's row, from its status and saved settings.
fn line(ctx: &Ctx) -> Result<InstanceLine> {
    let inst = ctx.instance();
    let st = super::status::status(ctx)?;
    let settings: Option<Settings> = read_json(&inst.settings())?;
    let from = st.run.as_ref().and_then(|r| r.from_snapshot.as_ref());
    let boot = match from {
        Some(s) => Some(format!("snapshot {}/{}", s.instance, s.snapshot)),
        None => settings.map(|s| boot_summary(&s.source)),
    };
    Ok(InstanceLine {
        name: ctx.name.clone(),
        state: st.state,
        pid: st.pid,
        ssh_port: st.ssh_port,
        boot,
        run: st.run,
        uptime_seconds: st.uptime_seconds,
        disk_bytes: allocated(&inst.dir),
        damaged: None,
    })
}

/// Bytes allocated to the files under `dir` (a sparse file counts what it
/// uses, not its length).
fn allocated(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// The error for a name that is no instance: the ones there are, the
/// closest by spelling, and how to create it.
pub fn unknown_instance(ctx: &Ctx) -> anyhow::Error {
    let names = ctx.state.instance_names();
    let mut msg = format!("no instance named '{}' in {}", ctx.name, ctx.state.root.display());
    let inst = ctx.instance();
    if inst.dir.is_dir() && !inst.kept_files().is_empty() {
        msg.push_str(&format!(
            " (its directory {} holds only files qbuf-qemu did not create; destroy kept them)",
            inst.dir.display()
        ));
    }
    if let Some(close) = closest(&ctx.name, &names) {
        msg.push_str(&format!(": did you mean '{close}'? ('{}')", ctx.state.command(close, "status")));
    }
    match names.len() {
        0 => msg.push_str(&format!(". There are no instances; create one with '{}'", ctx.command("launch"))),
        _ => msg.push_str(&format!(
            ". Instances: {}. Create '{}' with '{}'",
            names.join(", "),
            ctx.name,
            ctx.command("launch")
        )),
    }
    anyhow::anyhow!(msg)
}

/// The name most like `name`, when one is close enough to be a typo: at
/// most a third of its letters differ (at least one may), or one is a
/// prefix of the other.
pub fn closest<'a>(name: &str, names: &'a [String]) -> Option<&'a str> {
    names
        .iter()
        .map(|n| (strsim::damerau_levenshtein(name, n), n))
        .filter(|(d, n)| {
            *d <= (name.len().max(n.len()) / 3).max(1) || n.starts_with(name) || name.starts_with(n.as_str())
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_finds_the_instance_and_a_stranger_finds_none() {
        let names: Vec<String> = ["dev", "review", "test-72"].map(String::from).into();
        assert_eq!(closest("dve", &names), Some("dev"));
        assert_eq!(closest("reveiw", &names), Some("review"));
        assert_eq!(closest("test", &names), Some("test-72"));
        assert_eq!(closest("production", &names), None);
        assert_eq!(closest("x", &[]), None);
    }
}
