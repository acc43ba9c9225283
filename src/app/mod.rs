//! The command layer: one function per verb group, each parsing nothing and
//! printing nothing. It resolves what the user asked (`config`), drives the
//! lower layers, and returns a typed outcome from `report` for `main` to
//! print. Nothing imports this layer but `main`.

pub mod boot;
pub mod build;
pub mod completions;
pub mod console;
pub mod copy;
pub mod disks;
pub mod doctor;
pub mod forwards;
pub mod guest;
pub mod launch;
pub mod list;
pub mod logs;
pub mod power;
pub mod qmp;
pub mod ready;
pub mod resize;
pub mod restore;
pub mod run;
pub mod shares;
pub mod show;
pub mod snapshot;
pub mod spec;
pub mod ssh;
pub mod ssh_config;
pub mod status;
pub mod stop;

use std::path::PathBuf;

use anyhow::Result;

use crate::cli::{Cli, Command, DiskCommand, ForwardCommand, ShareCommand, SnapshotCommand, StopArgs};
use crate::instance::{default_state_dir, Instance, StateDir};
use crate::report::{emit, Render};
use crate::supervisor::ladder::StopOptions;
use crate::timeouts::SNAPSHOT_LOAD_READY;

/// What every command knows: where state lives, which instance, and how
/// to print.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub state: StateDir,
    pub name: String,
    /// `--name` was given (not the default).
    pub named: bool,
    pub json: bool,
    pub quiet: bool,
    /// The instance is a `run`'s throwaway one, removed when the run ends:
    /// hints must not send the user to it.
    pub throwaway: bool,
}

impl Ctx {
    /// A qbuf-qemu command line for the user to copy, with this run's
    /// `--state-dir` and `--name` (the one hint builder).
    pub fn command(&self, rest: &str) -> String {
        self.state.command(&self.name, rest)
    }

    /// A command about the host rather than this instance (`doctor`): it
    /// names no throwaway instance, which is gone by the time it is read.
    pub fn host_command(&self, rest: &str) -> String {
        match self.throwaway {
            true => self.state.command(crate::instance::paths::DEFAULT_NAME, rest),
            false => self.command(rest),
        }
    }

    pub fn instance(&self) -> Instance {
        self.state.instance(&self.name)
    }

    /// The instance, or a clear error when it was never launched.
    pub fn existing(&self) -> Result<Instance> {
        let inst = self.instance();
        if !inst.exists() {
            return Err(list::unknown_instance(self));
        }
        Ok(inst)
    }

    /// Progress for people on stderr (with `--json` too: stdout holds the
    /// document), unless `-q`: a line of its own.
    pub fn progress(&self, line: &str) {
        crate::progress::println(&format!("qbuf-qemu: {line}"));
    }

    /// The stage a long command is at, on the status line (a terminal) or
    /// as a plain line (see [`crate::progress`]).
    pub fn stage(&self, name: &str) {
        crate::progress::stage(name);
    }
}

pub use crate::runtime::block_on;

/// `--json` given to a command whose stdout is a stream of text: refused
/// as a usage error with stdout left empty (no document could describe it).
pub fn usage(msg: &str) -> Result<i32> {
    eprintln!("qbuf-qemu: error: {msg}");
    Ok(2)
}

fn context(cli: &Cli) -> Result<Ctx> {
    let g = &cli.global;
    let root = match &g.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir()?,
    };
    let root = if root.is_relative() { std::env::current_dir()?.join(root) } else { root };
    crate::progress::init(g.quiet);
    let name = g.name.clone().unwrap_or_else(|| crate::instance::paths::DEFAULT_NAME.into());
    Ok(Ctx {
        state: StateDir::new(root),
        name,
        named: g.name.is_some(),
        json: g.json,
        quiet: g.quiet,
        throwaway: false,
    })
}

fn stop_opts(a: &StopArgs) -> StopOptions {
    StopOptions { timeout: a.timeout, force: a.force }
}

/// Prints `value` and returns exit status 0.
fn done<T: Render>(ctx: &Ctx, value: &T) -> Result<i32> {
    emit(ctx.json, value)?;
    Ok(0)
}

/// Runs one command line; the result is the process's exit status.
pub fn run(cli: Cli) -> Result<i32> {
    let ctx = context(&cli)?;
    // The contract: a state dir that is not the user's is refused, before
    // any command reads or writes there. doctor reports it instead.
    if !matches!(cli.command, Command::Doctor | Command::Completions { .. } | Command::Man { .. }) {
        ctx.state.check_owned(&ctx.name)?;
    }
    match cli.command {
        Command::Launch(a) => done(&ctx, &launch::launch(&ctx, &spec::LaunchOptions::from_args(*a)?)?),
        Command::Build(a) => done(&ctx, &build::build(&ctx, a)?),
        Command::Status => done(&ctx, &status::status(&ctx)?),
        Command::List => done(&ctx, &list::list(&ctx)?),
        Command::Show => done(&ctx, &show::show(&ctx)?),
        Command::Logs(a) => logs::logs(&ctx, &a),
        Command::Events { follow } => logs::events(&ctx, follow),
        Command::SshConfig { instance, all } => done(&ctx, &ssh_config::ssh_config(&ctx, instance.as_deref(), all)?),
        Command::Copy { paths } => done(&ctx, &copy::copy(&ctx, &paths)?),
        Command::Completions { shell } => completions::completions(&ctx, shell),
        Command::Man { dir } => completions::man(&ctx, dir.as_deref()),
        Command::Pause => done(&ctx, &power::pause(&ctx)?),
        Command::Resume => done(&ctx, &power::resume(&ctx)?),
        Command::Reboot(a) => {
            let opts = power::RebootOptions {
                timeout: a.timeout,
                force: a.force,
                no_wait: a.no_wait,
                ssh_timeout: a.ssh_timeout,
            };
            done(&ctx, &power::reboot(&ctx, &opts)?)
        }
        Command::Powerdown(a) => {
            let r = stop::powerdown(&ctx, &stop_opts(&a))?;
            emit(ctx.json, &r)?;
            Ok(r.exit_code())
        }
        Command::Destroy { stop, yes } => {
            let r = stop::destroy_asking(&ctx, &stop_opts(&stop), yes)?;
            emit(ctx.json, &r)?;
            Ok(r.exit_code())
        }
        Command::Disk(c) => disk(&ctx, c),
        Command::Forward(c) => forward(&ctx, c),
        Command::Share(c) => share(&ctx, c),
        Command::Snapshot(c) => snapshots(&ctx, c),
        Command::Run(a) => run::run(&ctx, *a),
        Command::Supervise => crate::supervisor::run(ctx.instance()),
        Command::Ssh { args } => ssh::ssh(&ctx, &args),
        Command::Qmp { command, arguments, timeout } => qmp::qmp(&ctx, &command, arguments.as_deref(), timeout),
        Command::Console => console::console(&ctx),
        Command::Doctor => done(&ctx, &doctor::run(&ctx.instance())),
    }
}

fn disk(ctx: &Ctx, c: DiskCommand) -> Result<i32> {
    match c {
        DiskCommand::Add(a) => {
            let req = disks::DiskAdd { file: a.file, size: a.size, id: a.id, format: a.format, transient: a.transient };
            done(ctx, &disks::add(ctx, &req)?)
        }
        DiskCommand::Remove { id, timeout } => done(ctx, &disks::remove(ctx, &id, timeout)?),
        DiskCommand::List => done(ctx, &disks::list(ctx)?),
        DiskCommand::Resize { id, size } => done(ctx, &resize::resize(ctx, &id, size)?),
    }
}

fn forward(ctx: &Ctx, c: ForwardCommand) -> Result<i32> {
    match c {
        ForwardCommand::Add { spec, transient } => done(ctx, &forwards::add(ctx, &spec, transient)?),
        ForwardCommand::Remove { host } => done(ctx, &forwards::remove(ctx, &host)?),
        ForwardCommand::List => done(ctx, &forwards::list(ctx)?),
    }
}

fn share(ctx: &Ctx, c: ShareCommand) -> Result<i32> {
    match c {
        ShareCommand::Add { dir, tag, ro } => done(ctx, &shares::add(ctx, &dir, &tag, ro)?),
        ShareCommand::Remove { tag } => done(ctx, &shares::remove(ctx, &tag)?),
        ShareCommand::List => done(ctx, &shares::list(ctx)?),
    }
}

fn snapshots(ctx: &Ctx, c: SnapshotCommand) -> Result<i32> {
    match c {
        SnapshotCommand::Save { snapshot: s } => done(ctx, &snapshot::save(ctx, &s)?),
        SnapshotCommand::Load { snapshot: s } => done(ctx, &snapshot::load(ctx, &s, SNAPSHOT_LOAD_READY)?),
        SnapshotCommand::List => done(ctx, &snapshot::list(ctx)?),
        SnapshotCommand::Delete { snapshot: s } => done(ctx, &snapshot::delete(ctx, &s)?),
    }
}

/// Makes a user-given path absolute against the current directory, so a
/// saved setting means the same from anywhere (the supervisor runs
/// elsewhere, and the next `launch` may run from another directory).
pub fn absolute_flag(p: Option<PathBuf>) -> Result<Option<PathBuf>> {
    Ok(match p {
        Some(p) if p.is_relative() => Some(crate::config::normalize(&std::env::current_dir()?.join(p))),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_hints_name_no_throwaway_instance() {
        let ctx = Ctx {
            state: StateDir::new("/tmp/s".into()),
            name: "run-0badcafe".into(),
            named: true,
            json: false,
            quiet: false,
            throwaway: true,
        };
        assert_eq!(ctx.host_command("doctor"), "qbuf-qemu --state-dir /tmp/s doctor");
        let kept = Ctx { throwaway: false, ..ctx };
        assert_eq!(kept.host_command("doctor"), "qbuf-qemu --state-dir /tmp/s --name run-0badcafe doctor");
    }
}
