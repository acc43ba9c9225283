//! QEMU's output into the logs the supervisor keeps, each bounded
//! ([`Capped`]): the guest's console (serial.log) and QEMU's own stdout and
//! stderr (qemu.log).
//!
//! QEMU writes the console through its chardev `logfile=`, and a file QEMU
//! holds cannot be rotated: QEMU would go on writing into the renamed one.
//! So its logfile is a FIFO (`serial.fifo`) and its stdout/stderr a pipe;
//! the supervisor reads both and writes the files. The FIFO is opened
//! read-write, so it never reads as ended while QEMU has yet to open it;
//! each pump ends once QEMU has exited and what it wrote is read. A pump
//! that falls behind only slows QEMU's console (QEMU waits on a full pipe),
//! and a supervisor that died takes the logs with it, not QEMU (which
//! ignores SIGPIPE).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::instance::proc::ExitInfo;
use crate::instance::Instance;
use crate::logs::{Capped, SERIAL_CAP, SMALL_CAP};

/// How long the pumps may take to read QEMU's last words after its exit.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// The pipes made for QEMU, before it starts.
pub struct Pipes {
    serial: pipe::Receiver,
    output: pipe::Receiver,
    /// QEMU's stdout and stderr.
    pub output_writer: OwnedFd,
}

/// Makes the serial FIFO (which QEMU's argv names) and the pipe for QEMU's
/// output.
pub fn prepare(inst: &Instance) -> std::io::Result<Pipes> {
    // qemu.log is this boot's alone (a launch failure quotes it whole).
    for f in [inst.qemu_stderr(), inst.qemu_stderr_old()] {
        let _ = std::fs::remove_file(f);
    }
    let fifo = inst.serial_fifo();
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let serial = pipe::OpenOptions::new().read_write(true).open_receiver(&fifo)?;
    let (tx, output) = pipe::pipe()?;
    Ok(Pipes { serial, output, output_writer: tx.into_blocking_fd()? })
}

/// The running pumps.
pub struct Pumps(Vec<JoinHandle<()>>);

/// Starts pumping; each pump ends once `exited` says QEMU is gone.
pub fn start(inst: &Instance, p: Pipes, exited: &watch::Receiver<Option<ExitInfo>>) -> Pumps {
    let serial = (inst.serial_log(), inst.serial_log_old(), SERIAL_CAP);
    let output = (inst.qemu_stderr(), inst.qemu_stderr_old(), SMALL_CAP);
    Pumps(vec![
        tokio::spawn(pump(p.serial, serial, exited.clone())),
        tokio::spawn(pump(p.output, output, exited.clone())),
    ])
}

impl Pumps {
    /// Waits (bounded) until QEMU's last output is in the files. Call it
    /// once QEMU has exited.
    pub async fn finish(self) {
        for t in self.0 {
            let _ = tokio::time::timeout(DRAIN_DEADLINE, t).await;
        }
    }
}

async fn pump(rx: pipe::Receiver, to: (PathBuf, PathBuf, u64), mut exited: watch::Receiver<Option<ExitInfo>>) {
    let (path, old, cap) = to;
    let mut log = match Capped::open(&path, &old, cap) {
        Ok(l) => l,
        Err(e) => return tracing::warn!("cannot open {}: {e}", path.display()),
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            r = rx.readable() => {
                if r.is_err() || copy(&rx, &mut buf, &mut log, &path) == Read::Ended {
                    return;
                }
            }
            _ = exited.wait_for(|e| e.is_some()) => break,
        }
    }
    // QEMU is gone: what it wrote before is in the pipe.
    while copy(&rx, &mut buf, &mut log, &path) == Read::Data {}
}

#[derive(PartialEq, Eq)]
enum Read {
    Data,
    Empty,
    Ended,
}

/// Copies what the pipe holds now into the log.
fn copy(rx: &pipe::Receiver, buf: &mut [u8], log: &mut Capped, path: &Path) -> Read {
    match rx.try_read(buf) {
        Ok(0) => Read::Ended,
        Ok(n) => {
            // A full disk loses these lines, never the VM's supervision.
            if let Err(e) = log.write(&buf[..n]) {
                tracing::warn!("cannot write {}: {e}", path.display());
            }
            Read::Data
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Read::Empty,
        Err(_) => Read::Ended,
    }
}
