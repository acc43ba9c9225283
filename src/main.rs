use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use serde::Serialize;

use qbuf_qemu::cli::{Cli, Command, DiskCommand, ForwardCommand, ShareCommand, StopArgs};
use qbuf_qemu::config::LaunchFlags;
use qbuf_qemu::instance::{default_state_dir, validate_name, StateDir};
use qbuf_qemu::lifecycle::{self, Ctx, LaunchOptions};
use qbuf_qemu::powerdown::StopOptions;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(&cli);
    let json = cli.global.json;
    match run(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("qbuf-qemu: error: {e:#}");
            if json {
                // --json promises one document on stdout, failures included.
                println!("{}", serde_json::json!({ "error": format!("{e:#}"), "exit_code": 1 }));
            }
            ExitCode::from(1)
        }
    }
}

fn init_logging(cli: &Cli) {
    let default = if matches!(cli.command, Command::Supervise) {
        "info"
    } else if cli.global.quiet {
        "error"
    } else {
        match cli.global.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("qbuf_qemu={default},qbuf_qemu_bin={default}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Prints one result: JSON on stdout with --json, else the human form.
fn emit<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", human(value));
    }
    Ok(())
}

fn stop_opts(a: &StopArgs) -> StopOptions {
    StopOptions { timeout: Duration::from_secs(a.timeout), force: a.force }
}

fn run(cli: Cli) -> Result<i32> {
    let g = &cli.global;
    validate_name(&g.name)?;
    let root = match &g.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir()?,
    };
    let root = if root.is_relative() { std::env::current_dir()?.join(root) } else { root };
    let ctx = Ctx { state: StateDir::new(root), name: g.name.clone() };
    match cli.command {
        Command::Launch(a) => {
            let flags = LaunchFlags {
                memory: a.memory,
                cpus: a.cpus,
                ssh_port: a.ssh_port,
                share: a.share,
                no_share: a.no_share,
                share_mode: a.share_mode,
                image: a.image,
                kernel: a.kernel,
                initrd: a.initrd,
                append: a.append,
                guix_dir: a.guix.guix_dir,
                image_size: a.guix.image_size,
                accel: a.accel,
                ssh_user: a.ssh_user,
                ssh_key: a.ssh_key,
            };
            let silence =
                std::env::var("QBUF_QEMU_SERIAL_SILENCE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
            let opts = LaunchOptions {
                flags,
                timeout: Duration::from_secs(a.timeout),
                no_wait: a.no_wait,
                recreate: a.recreate,
                silence: Duration::from_secs(silence),
                quiet: g.quiet,
            };
            let r = lifecycle::launch(&ctx, &opts)?;
            emit(g.json, &r, |r| r.human())?;
            Ok(0)
        }
        Command::Build(a) => {
            ctx.state.ensure()?;
            // An existing instance's own choices, so build and a plain launch
            // resolve the same image.
            let saved: Option<qbuf_qemu::config::Settings> =
                qbuf_qemu::instance::read_json(&ctx.instance().settings()).ok().flatten();
            let (saved_dir, saved_size) = match saved.as_ref().map(|s| &s.source) {
                Some(qbuf_qemu::config::Source::Guix { guix_dir, image_size }) => {
                    (guix_dir.clone(), Some(image_size.clone()))
                }
                _ => (None, None),
            };
            let key = match saved.and_then(|s| s.ssh_key) {
                Some(k) => k,
                None => qbuf_qemu::ssh::ensure_user_key(&ctx.state)?,
            };
            let req = qbuf_qemu::guix::Request {
                guix_dir: qbuf_qemu::guix::resolve_dir(a.guix_dir.or(saved_dir).as_deref(), &ctx.state)?,
                image_size: a.image_size.or(saved_size).unwrap_or_else(|| qbuf_qemu::config::DEFAULT_IMAGE_SIZE.into()),
                pubkey: qbuf_qemu::ssh::public_key_line(&key)?,
            };
            let r = qbuf_qemu::guix::ensure(&ctx.state, &req, g.quiet)?;
            emit(g.json, &r, |r| r.human())?;
            Ok(0)
        }
        Command::Ssh { .. } if g.json => {
            eprintln!("qbuf-qemu: error: ssh passes the remote command's output through as it is; --json does not apply (drop it)");
            Ok(2)
        }
        Command::Ssh { args } => {
            let inst = ctx.existing()?;
            let s: qbuf_qemu::config::Settings = qbuf_qemu::instance::read_json(&inst.settings())?
                .ok_or_else(|| anyhow::anyhow!("instance '{}' has no settings: launch it first", ctx.name))?;
            if !qbuf_qemu::instance::Lock::is_held(&inst)? {
                bail!("instance '{}' is not running: start it with '{}'", ctx.name, ctx.command("launch"));
            }
            let key = match &s.ssh_key {
                Some(k) => k.clone(),
                None => qbuf_qemu::ssh::ensure_user_key(&ctx.state)?,
            };
            let t = qbuf_qemu::ssh::Target::for_instance(&inst, s.ssh_port, &s.ssh_user, &key);
            qbuf_qemu::ssh::run_interactive(&t, &ctx.name, &args)
        }
        Command::Status => {
            let s = lifecycle::status(&ctx)?;
            emit(g.json, &s, |s| s.human())?;
            Ok(0)
        }
        Command::Powerdown(a) => {
            let r = lifecycle::powerdown(&ctx, &stop_opts(&a))?;
            emit(g.json, &r, |r| r.human())?;
            Ok(r.code)
        }
        Command::Destroy { stop, yes } => {
            ctx.existing()?;
            if !yes {
                if !std::io::stdin().is_terminal() {
                    eprintln!(
                        "qbuf-qemu: destroy deletes instance '{}' and its disk; without a terminal pass --yes",
                        ctx.name
                    );
                    return Ok(2);
                }
                eprint!("Destroy instance '{}' and delete its disk (guest data is lost)? [y/N] ", ctx.name);
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    eprintln!("Nothing was done.");
                    return Ok(1);
                }
            }
            let r = lifecycle::destroy(&ctx, &stop_opts(&stop))?;
            let code = r.stop.as_ref().map(|s| s.code).unwrap_or(0);
            emit(g.json, &r, |r| r.human())?;
            Ok(code)
        }
        Command::Disk(DiskCommand::Add(a)) => {
            let req = qbuf_qemu::devices::DiskAdd {
                file: a.file,
                size: a.size,
                id: a.id,
                format: a.format,
                transient: a.transient,
            };
            let r = qbuf_qemu::devices::add_disk(&ctx, &req)?;
            emit(g.json, &r, |r| r.human())?;
            Ok(0)
        }
        Command::Disk(DiskCommand::Remove { id, timeout }) => {
            let r = qbuf_qemu::devices::remove_disk(&ctx, &id, Duration::from_secs(timeout))?;
            emit(g.json, &r, |r| r.human())?;
            Ok(0)
        }
        Command::Disk(DiskCommand::List) => {
            emit(g.json, &qbuf_qemu::devices::list_disks(&ctx)?, |r| r.human())?;
            Ok(0)
        }
        Command::Forward(ForwardCommand::Add { spec, transient }) => {
            emit(g.json, &qbuf_qemu::forwards::add(&ctx, &spec, transient)?, |r| r.human())?;
            Ok(0)
        }
        Command::Forward(ForwardCommand::Remove { host }) => {
            emit(g.json, &qbuf_qemu::forwards::remove(&ctx, &host)?, |r| r.human())?;
            Ok(0)
        }
        Command::Forward(ForwardCommand::List) => {
            emit(g.json, &qbuf_qemu::forwards::list(&ctx)?, |r| r.human())?;
            Ok(0)
        }
        Command::Share(ShareCommand::Add { dir, tag, ro }) => {
            emit(g.json, &qbuf_qemu::devices::add_share(&ctx, &dir, &tag, ro)?, |r| r.human())?;
            Ok(0)
        }
        Command::Share(ShareCommand::Remove { tag }) => {
            emit(g.json, &qbuf_qemu::devices::remove_share(&ctx, &tag)?, |r| r.human())?;
            Ok(0)
        }
        Command::Share(ShareCommand::List) => {
            emit(g.json, &qbuf_qemu::devices::list_shares(&ctx)?, |r| r.human())?;
            Ok(0)
        }
        Command::Qmp { command, arguments, timeout } => {
            let args = match qbuf_qemu::vm::parse_arguments(arguments.as_deref()) {
                Ok(v) => v,
                Err(m) => {
                    eprintln!("qbuf-qemu: error: {m}");
                    return Ok(2);
                }
            };
            match qbuf_qemu::vm::raw(&ctx, &command, args, Duration::from_secs(timeout))? {
                Ok(reply) => {
                    println!("{}", serde_json::to_string_pretty(&reply)?);
                    Ok(0)
                }
                Err((class, desc)) => {
                    if g.json {
                        println!("{}", serde_json::json!({ "error": { "class": class, "desc": desc } }));
                    }
                    eprintln!("qbuf-qemu: QEMU refused '{command}': {class}: {desc}");
                    Ok(1)
                }
            }
        }
        Command::Events { follow: true } => {
            qbuf_qemu::logs::follow_events(&ctx, g.json)?;
            Ok(0)
        }
        Command::Events { follow: false } => {
            emit(g.json, &qbuf_qemu::logs::events(&ctx)?, |r| r.human())?;
            Ok(0)
        }
        Command::Console | Command::Logs { follow: true } if g.json => {
            eprintln!("qbuf-qemu: error: this command streams the guest's console as text; --json does not apply");
            Ok(2)
        }
        Command::Console => {
            qbuf_qemu::console::attach(&ctx)?;
            Ok(0)
        }
        Command::Logs { follow: true } => {
            qbuf_qemu::logs::follow_serial_log(&ctx)?;
            Ok(0)
        }
        Command::Logs { follow: false } => {
            let log = qbuf_qemu::logs::serial_log(&ctx)?;
            if g.json {
                emit(true, &log, |_| String::new())?;
            } else {
                use std::io::Write;
                std::io::stdout().write_all(log.text.as_bytes())?;
            }
            Ok(0)
        }
        Command::Doctor => {
            emit(g.json, &qbuf_qemu::doctor::run(&ctx), |r| r.human())?;
            Ok(0)
        }
        Command::Supervise => qbuf_qemu::supervisor::run(ctx.instance()),
    }
}
