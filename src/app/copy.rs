//! `copy SRC… DEST`: files and directories between the host and a guest,
//! recursively, with the instance's pinned SSH settings (the same table as
//! `ssh` and `ssh-config`). Host → guest is `scp`; guest → host goes
//! through [`crate::guest_files`], as `run --copy-out` does, because what
//! comes out of a guest is untrusted: no device nodes, setuid bits, owners
//! or links out of the copy, even for root.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use super::run::interrupt::Why;
use super::ssh::running_target;
use super::Ctx;
use crate::cli::parse::CopyPath;
use crate::guest_files::{self, Unpacked};
use crate::instance::Instance;
use crate::report::access::Copied;
use crate::report::error::{Interrupted, Usage};
use crate::ssh::{self, ScpPath};

/// Which instance a copy reaches and in which direction, from the paths
/// alone (a usage error when they mix directions or instances).
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub to_guest: bool,
    pub sources: Vec<ScpPath>,
    pub dest: ScpPath,
}

pub fn plan(default_name: &str, paths: &[CopyPath]) -> Result<Plan, String> {
    let Some((dest, sources)) = paths.split_last().filter(|(_, s)| !s.is_empty()) else {
        return Err("give at least one SRC and a DEST".into());
    };
    let guest_name = |p: &CopyPath| match p {
        CopyPath::Guest { name, .. } => Some(name.clone().unwrap_or_else(|| default_name.to_string())),
        CopyPath::Host(_) => None,
    };
    let names: Vec<Option<String>> = sources.iter().map(guest_name).collect();
    let to_guest = match (guest_name(dest), names.iter().all(Option::is_some), names.iter().all(Option::is_none)) {
        (Some(_), _, true) => true,
        (None, true, _) => false,
        (Some(_), _, false) => {
            return Err("copying from a guest to a guest is not supported: copy to the host first".into())
        }
        (None, false, false) => {
            return Err("the sources mix host and guest paths: copy each way with its own command".into())
        }
        (None, false, true) => return Err("no path is in a guest: write a guest path as NAME:PATH or :PATH".into()),
    };
    let mut all: Vec<String> = names.into_iter().flatten().chain(guest_name(dest)).collect();
    all.dedup();
    if all.len() != 1 {
        return Err(format!("the guest paths name different instances ({}): copy from one at a time", all.join(", ")));
    }
    let scp = |p: &CopyPath| match p {
        CopyPath::Host(h) => ScpPath::Local(h.clone()),
        CopyPath::Guest { path, .. } => ScpPath::Guest(path.clone()),
    };
    Ok(Plan { name: all.remove(0), to_guest, sources: sources.iter().map(scp).collect(), dest: scp(dest) })
}

pub fn copy(ctx: &Ctx, paths: &[CopyPath]) -> Result<Copied> {
    let plan = plan(&ctx.name, paths).map_err(Usage)?;
    for s in &plan.sources {
        if let ScpPath::Local(l) = s {
            if std::fs::symlink_metadata(l).is_err() {
                bail!("{l} does not exist on the host");
            }
        }
    }
    let one = Ctx { name: plan.name.clone(), ..ctx.clone() };
    let (inst, t) = running_target(&one)?;
    let started = Instant::now();
    let left_out = match &plan.dest {
        ScpPath::Local(dest) => from_guest(&t, &inst, &plan.sources, Path::new(dest))?,
        ScpPath::Guest(_) => {
            let argv = t.scp_command(&plan.sources, &plan.dest, ssh::scp_speaks_sftp(), ctx.json || ctx.quiet);
            let code = ssh::run_explained(&argv, &t, &inst)?;
            if code != 0 {
                return Err(anyhow!("scp failed (exit status {code}); its message is above"));
            }
            Unpacked::default()
        }
    };
    let show = |p: &ScpPath| match p {
        ScpPath::Local(l) => l.clone(),
        ScpPath::Guest(g) => format!("{}:{g}", plan.name),
    };
    Ok(Copied {
        name: plan.name.clone(),
        to_guest: plan.to_guest,
        sources: plan.sources.iter().map(show).collect(),
        destination: show(&plan.dest),
        seconds: started.elapsed().as_secs_f64(),
        left_out,
    })
}

/// Guest → host, each source like `cp -r`: several need DEST to be a
/// directory.
fn from_guest(t: &ssh::Target, inst: &Instance, sources: &[ScpPath], dest: &Path) -> Result<Unpacked> {
    if sources.len() > 1 && !dest.is_dir() {
        bail!("{} is not a directory: copying several sources needs an existing directory as DEST", dest.display());
    }
    let mut all = Unpacked::default();
    // No deadline (README); SIGINT, SIGTERM or SIGHUP ends the copy's ssh,
    // and the half-made copy is removed before this command exits 128+N.
    let int = super::run::interrupt::watch(None, None);
    let mut done: Vec<&str> = Vec::new();
    for s in sources {
        if let ScpPath::Guest(g) = s {
            let copied = guest_files::copy_from_guest(t, inst, g, dest, &|pid| int.track(pid));
            // A signal after this source landed leaves it landed.
            if let (Err(_), Some(Why::Signal(signal))) = (&copied, int.why()) {
                return Err(cut_short(signal, g, &done).into());
            }
            all.extend(copied?);
            done.push(g);
        }
    }
    Ok(all)
}

/// Said of a copy from the guest that `signal` ended while it copied `g`.
fn cut_short(signal: nix::sys::signal::Signal, g: &str, done: &[&str]) -> Interrupted {
    let mut message = format!("{signal} ended the copy of {g}: nothing of it was kept");
    if !done.is_empty() {
        message.push_str(&format!("; copied before it, and kept: {}", done.join(", ")));
    }
    Interrupted { signal, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse::copy_path;

    fn p(args: &[&str]) -> Result<Plan, String> {
        plan("dev", &args.iter().map(|a| copy_path(a).unwrap()).collect::<Vec<_>>())
    }

    #[test]
    fn direction_and_instance_come_from_the_paths() {
        let up = p(&["a", "b/", ":/tmp/"]).unwrap();
        assert_eq!((up.name.as_str(), up.to_guest), ("dev", true));
        assert_eq!(up.dest, ScpPath::Guest("/tmp/".into()));
        let down = p(&["web:/etc/hosts", "web:x", "."]).unwrap();
        assert_eq!((down.name.as_str(), down.to_guest, down.sources.len()), ("web", false, 2));
        assert_eq!(p(&[":a", "dev:b", "."]).unwrap().name, "dev", ":PATH is the --name instance");
        assert!(p(&["a", "b"]).unwrap_err().contains("no path is in a guest"));
        assert!(p(&[":a", "web:b"]).unwrap_err().contains("guest to a guest"));
        assert!(p(&[":a", "b", "."]).unwrap_err().contains("mix"));
        assert!(p(&["web:a", "dev:b", "."]).unwrap_err().contains("different instances"));
    }
}
