//! Every outcome the user sees, as a typed value with two renderings: a
//! human one and JSON (through serde only). Commands build these values;
//! `main` prints them with [`emit`], and errors with [`error`].

pub mod access;
pub mod build;
pub mod devices;
pub mod doctor;
pub mod error;
pub mod events;
pub mod launch;
pub mod list;
pub mod power;
pub mod run;
pub mod show;
pub mod snapshot;
pub mod status;
pub mod stop;

use std::io::Write;

use serde::Serialize;

pub use error::{error_document, exit_code};

/// An outcome that prints for people; its JSON form is its `Serialize`.
pub trait Render: Serialize {
    fn human(&self) -> String;
}

/// Prints one result on stdout: the JSON document with `--json`, else the
/// human form.
pub fn emit<T: Render>(json: bool, value: &T) -> anyhow::Result<()> {
    crate::progress::finish();
    let text = if json { serde_json::to_string_pretty(value)? } else { value.human() };
    print_line(&text)
}

/// Writes `text` and a newline to stdout.
pub fn print_line(text: &str) -> anyhow::Result<()> {
    write_stdout(format!("{text}\n").as_bytes())
}

/// Stdout's reader went away (`| head`, `| true`): the command is over,
/// not failed. `main` exits quietly on it instead of panicking as
/// `println!` would.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes bytes to stdout; a closed pipe is [`StdoutClosed`].
pub fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        other => Ok(other?),
    }
}
