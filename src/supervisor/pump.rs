//! QEMU's output into the logs the supervisor keeps, each bounded
//! ([`Capped`]): the guest's console (serial.log) and QEMU's own stdout and
//! stderr (qemu.log); [`pump`] also carries each virtiofsd's stderr.
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
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::instance::proc::ExitInfo;
use crate::instance::Instance;
use crate::logs::{Capped, SERIAL_CAP, SMALL_CAP};
use crate::timeouts::LOG_DRAIN;

/// How often the supervisor looks at the size of its own log.
const OWN_LOG_CHECK: Duration = Duration::from_secs(1);

/// How many chunks of console output may wait for the supervisor's look
/// (at most 64 KiB each): a guest that floods its console gets chunks
/// skipped there, never written late or not at all to serial.log.
const CONSOLE_BACKLOG: usize = 64;

/// The pipes made for QEMU, before it starts.
pub struct Pipes {
    serial: pipe::Receiver,
    output: pipe::Receiver,
    /// QEMU's stdout and stderr.
    pub output_writer: OwnedFd,
    console: mpsc::Sender<Vec<u8>>,
}

/// What the guest prints on its console, as it is written to serial.log:
/// for the supervisor to look for the kernel's panic and banner lines.
pub type Console = mpsc::Receiver<Vec<u8>>;

/// Makes the serial FIFO (which QEMU's argv names) and the pipe for QEMU's
/// output.
pub fn prepare(inst: &Instance) -> std::io::Result<(Pipes, Console)> {
    // qemu.log is this boot's alone (a launch failure quotes it whole).
    for f in [inst.qemu_stderr(), inst.qemu_stderr_old()] {
        let _ = std::fs::remove_file(f);
    }
    let fifo = inst.serial_fifo();
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let serial = pipe::OpenOptions::new().read_write(true).open_receiver(&fifo)?;
    let (tx, output) = pipe::pipe()?;
    let (console, seen) = mpsc::channel(CONSOLE_BACKLOG);
    Ok((Pipes { serial, output, output_writer: tx.into_blocking_fd()?, console }, seen))
}

/// The running pumps.
pub struct Pumps(Vec<JoinHandle<()>>);

/// Starts pumping; each pump ends once `exited` says QEMU is gone.
pub fn start(inst: &Instance, p: Pipes, exited: &watch::Receiver<Option<ExitInfo>>) -> Pumps {
    let serial = (inst.serial_log(), inst.serial_log_old(), SERIAL_CAP);
    let output = (inst.qemu_stderr(), inst.qemu_stderr_old(), SMALL_CAP);
    Pumps(vec![
        tokio::spawn(pump(p.serial, serial, exited.clone(), Some(p.console))),
        tokio::spawn(pump(p.output, output, exited.clone(), None)),
    ])
}

impl Pumps {
    /// Waits (bounded) until QEMU's last output is in the files. Call it
    /// once QEMU has exited.
    pub async fn finish(self) {
        for t in self.0 {
            let _ = tokio::time::timeout(LOG_DRAIN, t).await;
        }
    }
}

/// Copies `rx` into the capped log `to` (path, rotated path, cap) until the
/// pipe ends, or until `exited` says its writer is gone and what it wrote
/// is read. Each chunk also goes to `observer` when it has room.
pub async fn pump(
    rx: pipe::Receiver,
    to: (PathBuf, PathBuf, u64),
    mut exited: watch::Receiver<Option<ExitInfo>>,
    observer: Option<mpsc::Sender<Vec<u8>>>,
) {
    let mut observer = observer.map(|tx| Observer { tx, skipping: false });
    let (path, old, cap) = to;
    let mut log = match Capped::open(&path, &old, cap) {
        Ok(l) => l,
        Err(e) => return tracing::warn!("cannot open {}: {e}", path.display()),
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            r = rx.readable() => {
                if r.is_err() || copy(&rx, &mut buf, &mut log, &path, &mut observer) == Read::Ended {
                    return;
                }
            }
            _ = exited.wait_for(|e| e.is_some()) => break,
        }
    }
    // QEMU is gone: what it wrote before is in the pipe.
    while copy(&rx, &mut buf, &mut log, &path, &mut observer) == Read::Data {}
}

/// Whoever looks at the output as it is logged, fed when it keeps up.
struct Observer {
    tx: mpsc::Sender<Vec<u8>>,
    /// Chunks are being skipped (said once per run of skipped chunks, not
    /// once per chunk of a flood).
    skipping: bool,
}

impl Observer {
    fn offer(&mut self, chunk: &[u8]) {
        let kept = self.tx.try_send(chunk.to_vec()).is_ok() || self.tx.is_closed();
        if !kept && !self.skipping {
            tracing::warn!("the guest's console outruns the supervisor: chunks are not scanned for kernel messages");
        }
        self.skipping = !kept;
    }
}

#[derive(PartialEq, Eq)]
enum Read {
    Data,
    Empty,
    Ended,
}

/// Copies what the pipe holds now into the log.
fn copy(rx: &pipe::Receiver, buf: &mut [u8], log: &mut Capped, path: &Path, observer: &mut Option<Observer>) -> Read {
    match rx.try_read(buf) {
        Ok(0) => Read::Ended,
        Ok(n) => {
            // A full disk loses these lines, never the VM's supervision.
            if let Err(e) = log.write(&buf[..n]) {
                tracing::warn!("cannot write {}: {e}", path.display());
            }
            if let Some(o) = observer {
                o.offer(&buf[..n]);
            }
            Read::Data
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Read::Empty,
        Err(_) => Read::Ended,
    }
}

/// Keeps the supervisor's own log (its stdout and stderr, which `launch`
/// opened) under its cap for the VM's whole life: a guest can make the
/// supervisor log without end (a reboot loop). Checked every second, so the
/// file can pass the cap by what is logged in a second.
pub fn cap_own_log(inst: &Instance) {
    let (path, old) = (inst.supervisor_log(), inst.supervisor_log_old());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(OWN_LOG_CHECK).await;
            if std::fs::metadata(&path).is_ok_and(|m| m.len() > SMALL_CAP) {
                if let Err(e) = rotate_onto(&path, &old, &[1, 2]) {
                    tracing::warn!("cannot rotate {}: {e}", path.display());
                }
            }
        }
    });
}

/// Renames `path` to `old` and makes `fds` write to a fresh `path`
/// (appending, so nothing written to one fd overwrites another's lines).
fn rotate_onto(path: &Path, old: &Path, fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::rename(path, old)?;
    let fresh = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    for fd in fds {
        nix::unistd::dup2(fresh.as_raw_fd(), *fd)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_rotated_log_goes_on_in_a_fresh_file_through_the_same_fd() {
        let dir = tempfile::tempdir().unwrap();
        let (path, old) = (dir.path().join("supervisor.log"), dir.path().join("supervisor.log.1"));
        let mut stderr_like = std::fs::File::create(&path).unwrap();
        stderr_like.write_all(b"first\n").unwrap();
        rotate_onto(&path, &old, &[stderr_like.as_raw_fd()]).unwrap();
        stderr_like.write_all(b"second\n").unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "first\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
    }
}
