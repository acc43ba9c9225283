//! The `virtiofsd`s of a boot's virtio-fs shares: started by the supervisor
//! before QEMU (QEMU connects to their sockets at start-up), its children
//! like QEMU, watched for an early death, and stopped after QEMU.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::dispatcher::Msg;
use crate::instance::proc::ExitInfo;
use crate::instance::records::LaunchFailure;
use crate::qemu::virtiofs::Daemon;
use crate::timeouts::{KILLED_EXIT, VIRTIOFSD_EXIT_GRACE, VIRTIOFSD_SOCKET};

/// How much of a `virtiofsd`'s stderr a failure or an event carries.
pub const TAIL: usize = 2000;

/// One started `virtiofsd`.
pub struct Running {
    pub daemon: Daemon,
    pub pid: i32,
    pub exited: watch::Receiver<Option<ExitInfo>>,
}

/// Starts every daemon and waits for its socket. A daemon that exits or
/// never makes its socket is a launch failure with its own command line
/// and stderr; the ones already started are killed.
pub async fn start(daemons: &[Daemon]) -> Result<Vec<Running>, LaunchFailure> {
    let mut running = Vec::new();
    for d in daemons {
        match start_one(d).await {
            Ok(r) => running.push(r),
            Err(f) => {
                stop(running, Duration::ZERO).await;
                return Err(f);
            }
        }
    }
    Ok(running)
}

async fn start_one(d: &Daemon) -> Result<Running, LaunchFailure> {
    let fail = |message: String, exit: Option<ExitInfo>| LaunchFailure {
        message,
        exit,
        command_line: d.command_line(),
        stderr_tail: crate::logs::tail(&d.log, 0, TAIL, ""),
        serial_tail: String::new(),
    };
    let _ = std::fs::remove_file(&d.socket);
    let (pid, exited) = spawn(d).map_err(|m| fail(m, None))?;
    let deadline = tokio::time::Instant::now() + VIRTIOFSD_SOCKET;
    loop {
        if let Some(e) = *exited.borrow() {
            return Err(fail(format!("virtiofsd for share '{}' exited during start-up ({e})", d.tag), Some(e)));
        }
        if d.socket.exists() {
            return Ok(Running { daemon: d.clone(), pid, exited });
        }
        if tokio::time::Instant::now() > deadline {
            kill(pid);
            return Err(fail(
                format!(
                    "virtiofsd for share '{}' did not create its socket within {}s; it was killed",
                    d.tag,
                    VIRTIOFSD_SOCKET.as_secs()
                ),
                None,
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Our child, with SIGTERM and SIGHUP blocked as QEMU's are: a host-wide
/// SIGTERM must not take the share away while the guest powers down. Its
/// stderr goes through a pipe into its log, bounded like QEMU's
/// ([`super::pump`]: a guest can make virtiofsd complain without end). The
/// watch it returns says the daemon exited only once all it wrote is in the
/// log, so whoever quotes the log's tail then has its last words.
fn spawn(d: &Daemon) -> Result<(i32, watch::Receiver<Option<ExitInfo>>), String> {
    let old = old_log(d);
    for f in [&d.log, &old] {
        let _ = std::fs::remove_file(f);
    }
    let cannot = |e: std::io::Error| format!("cannot make a pipe for virtiofsd's stderr: {e}");
    let (writer, reader) = tokio::net::unix::pipe::pipe().map_err(cannot)?;
    let writer = writer.into_blocking_fd().map_err(cannot)?;
    let mut cmd = tokio::process::Command::new(&d.binary);
    cmd.args(&d.argv).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(writer);
    super::start::block_host_signals(&mut cmd);
    let child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", d.binary.display()))?;
    // The write end now lives in the child only: its exit ends the pump.
    drop(cmd);
    let (pid, exited) = super::start::reap(child, "virtiofsd")?;
    let (logged, rx) = watch::channel(None);
    let log = (d.log.clone(), old, crate::logs::SMALL_CAP);
    tokio::spawn(async move {
        let mut exited = exited;
        super::pump::pump(reader, log, exited.clone(), None).await;
        let e = exited.wait_for(|e| e.is_some()).await.map(|e| *e).ok().flatten();
        if e.is_some() {
            let _ = logged.send(e);
        }
    });
    Ok((pid, rx))
}

/// Where a daemon's log goes once it is full.
fn old_log(d: &Daemon) -> std::path::PathBuf {
    let mut name = d.log.clone().into_os_string();
    name.push(".1");
    name.into()
}

/// Tells the dispatcher when a daemon ends (while QEMU runs, that is the
/// share gone from under the guest).
pub fn forward_exits(running: &[Running], tx: mpsc::UnboundedSender<Msg>) {
    for r in running {
        let (mut exited, tag, log) = (r.exited.clone(), r.daemon.tag.clone(), r.daemon.log.clone());
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Ok(e) = exited.wait_for(|e| e.is_some()).await {
                let exit = e.expect("waited for Some");
                let stderr_tail = crate::logs::tail(&log, 0, TAIL, "");
                let _ = tx.send(Msg::ShareDaemonExited { tag, exit, stderr_tail });
            }
        });
    }
}

/// Waits up to `grace` for each daemon to end by itself, then kills it.
pub async fn stop(running: Vec<Running>, grace: Duration) {
    for mut r in running {
        if tokio::time::timeout(grace, r.exited.wait_for(|e| e.is_some())).await.is_err() {
            tracing::warn!("virtiofsd for share '{}' did not exit with QEMU: killing it", r.daemon.tag);
            kill(r.pid);
            let _ = tokio::time::timeout(KILLED_EXIT, r.exited.wait_for(|e| e.is_some())).await;
        }
        let _ = std::fs::remove_file(&r.daemon.socket);
    }
}

/// After QEMU is gone: the usual grace, then a kill.
pub async fn stop_after_qemu(running: Vec<Running>) {
    stop(running, VIRTIOFSD_EXIT_GRACE).await
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}
