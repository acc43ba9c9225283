//! `qbuf-qemu`: parse, run one command, print its outcome, exit with the
//! contract's code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use qbuf_qemu::cli::{Cli, Command};
use qbuf_qemu::{error_document, exit_code, StdoutClosed};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::SUCCESS; // --help, --version
            }
            // The contract's one document on stdout holds for a flag clap
            // refused too, with clap's whole message: its first line alone
            // can be "the following required arguments were not provided:"
            // without naming them. (`to_string` is plain text: clap styles
            // only what it prints.)
            if asked_for_json() {
                let text = e.to_string();
                let text = text.trim_end();
                let message = match e.kind() {
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
                        let args: Vec<String> =
                            std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
                        qbuf_qemu::cli::missing::missing_subcommand(&args)
                    }
                    _ => text.strip_prefix("error: ").unwrap_or(text).to_string(),
                };
                let _ = qbuf_qemu::print_line(&error_document(&anyhow::anyhow!(message), 2).to_string());
            }
            return ExitCode::from(2);
        }
    };
    init_logging(&cli);
    let json = cli.global.json;
    let result = qbuf_qemu::run(cli);
    qbuf_qemu::finish_progress();
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            eprintln!("qbuf-qemu: error: {e:#}");
            if json {
                let _ = qbuf_qemu::print_line(&error_document(&e, code).to_string());
            }
            ExitCode::from(code as u8)
        }
    }
}

/// Whether `--json` is among the options (before any `--`), for errors
/// found before the command line could be parsed.
fn asked_for_json() -> bool {
    std::env::args_os().skip(1).take_while(|a| a != "--").any(|a| a == "--json")
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("qbuf_qemu={default}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| qbuf_qemu::ProgressStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
