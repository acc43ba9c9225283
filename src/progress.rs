//! The one status line on stderr while a long command works: the current
//! stage, the time since the command started and a detail (the guest's last
//! serial line), redrawn in place by indicatif on a terminal. When stderr
//! is not a terminal, each new stage is one plain line and details are not
//! printed; with `-q`, nothing. Stdout is never touched.
//!
//! Process-wide on purpose: stderr is one per process, so every line a
//! command prints there (progress, Guix's output, log records) must pass
//! through here to keep the status line below them intact.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Terminal,
    Plain,
    Quiet,
}

struct Line {
    mode: Mode,
    bar: Option<ProgressBar>,
    stage: String,
}

static LINE: Mutex<Option<Line>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Line) -> R) -> R {
    let mut g = LINE.lock().unwrap_or_else(|e| e.into_inner());
    let line = g.get_or_insert_with(|| Line { mode: Mode::Plain, bar: None, stage: String::new() });
    f(line)
}

/// Chooses how progress is shown, once per process: nothing with `quiet`,
/// a status line when stderr is a terminal, plain lines otherwise.
pub fn init(quiet: bool) {
    let mode = match (quiet, std::io::stderr().is_terminal()) {
        (true, _) => Mode::Quiet,
        (false, true) => Mode::Terminal,
        (false, false) => Mode::Plain,
    };
    with(|l| l.mode = mode);
}

/// What `stage` shows (pure): `stage`, then `: detail` when there is one.
pub fn message(stage: &str, detail: &str) -> String {
    match detail.trim() {
        "" => stage.to_string(),
        d => format!("{stage}: {d}"),
    }
}

/// The current stage, e.g. "starting QEMU"; a stage that did not change is
/// not printed again.
pub fn stage(name: &str) {
    with(|l| {
        if l.stage == name {
            return;
        }
        l.stage = name.to_string();
        match l.mode {
            Mode::Quiet => {}
            Mode::Plain => eprintln!("qbuf-qemu: {name}"),
            Mode::Terminal => {
                let bar = l.bar.get_or_insert_with(|| {
                    let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                    let style = ProgressStyle::with_template("{spinner} [{elapsed}] {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner());
                    b.set_style(style);
                    b.enable_steady_tick(Duration::from_millis(120));
                    b
                });
                bar.set_message(name.to_string());
            }
        }
    });
}

/// A detail of the current stage (the guest's last serial line), shown on
/// the status line only.
pub fn detail(text: &str) {
    with(|l| {
        if let Some(bar) = &l.bar {
            bar.set_message(message(&l.stage, text));
        }
    });
}

/// A line of its own on stderr (above the status line), unless `-q`.
pub fn println(text: &str) {
    with(|l| match (&l.bar, l.mode) {
        (_, Mode::Quiet) => {}
        (Some(bar), _) => bar.suspend(|| eprintln!("{text}")),
        (None, _) => eprintln!("{text}"),
    });
}

/// Clears the status line (before the result is printed, or on exit).
pub fn finish() {
    with(|l| {
        if let Some(bar) = l.bar.take() {
            bar.finish_and_clear();
        }
        l.stage.clear();
    });
}

/// Stderr for log records: written with the status line out of the way.
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = LINE.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|l| l.bar.clone());
        match bar {
            Some(b) => b.suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len()),
            None => std::io::stderr().write_all(buf).map(|()| buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_stage_then_its_detail() {
        assert_eq!(message("waiting for SSH", ""), "waiting for SSH");
        assert_eq!(message("booting", "  [ 1.2] virtio_blk  "), "booting: [ 1.2] virtio_blk");
    }
}
