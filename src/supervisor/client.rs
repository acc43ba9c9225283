//! The client side of the control protocol: what commands call to reach a
//! running instance's supervisor. Each call is one connection, one request
//! line and one answer line.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::protocol::{Request, Response, Stopped, VmState};
use crate::qmp::{Event, QmpError};
use crate::timeouts::{FORCE_STOP_SEND, RELAY_MARGIN, SUBSCRIBE};

async fn send(sock: &Path, req: &Request) -> Result<BufReader<UnixStream>> {
    let mut s = UnixStream::connect(sock).await.with_context(|| format!("cannot connect to {}", sock.display()))?;
    let mut line = serde_json::to_string(req)?;
    tracing::debug!("→ supervisor: {line}");
    line.push('\n');
    s.write_all(line.as_bytes()).await?;
    Ok(BufReader::new(s))
}

async fn answer(r: &mut BufReader<UnixStream>) -> Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(anyhow!("the supervisor closed the connection without answering (is the VM stopping?)"));
    }
    tracing::debug!("← supervisor: {}", line.trim_end());
    serde_json::from_str(&line).context("the supervisor's answer is not one this qbuf-qemu understands")
}

/// Connects, sends `req`, returns the answer.
pub async fn call(sock: &Path, req: &Request, timeout: Duration) -> Result<Response> {
    let fut = async { answer(&mut send(sock, req).await?).await };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("the instance's supervisor did not answer within {:.0}s", timeout.as_secs_f64()))?
}

fn unexpected(r: Response) -> anyhow::Error {
    match r {
        Response::Failed(m) => anyhow!(m),
        other => {
            anyhow!("unexpected answer from the supervisor: {}", serde_json::to_string(&other).unwrap_or_default())
        }
    }
}

/// A QMP command through the supervisor; QEMU's own refusal is the inner
/// `Err` ([`QmpError::Qemu`]), anything else the outer one.
pub async fn qmp(sock: &Path, command: &str, arguments: Value, timeout: Duration) -> Result<Result<Value, QmpError>> {
    let req = Request::Qmp { command: command.into(), arguments, timeout_ms: timeout.as_millis() as u64 };
    match call(sock, &req, timeout + RELAY_MARGIN).await? {
        Response::Return(v) => Ok(Ok(v)),
        Response::QmpError { class, desc } => Ok(Err(QmpError::Qemu { class, desc })),
        other => Err(unexpected(other)),
    }
}

/// Everything `status` shows, in one answer.
pub async fn status(sock: &Path, timeout: Duration) -> Result<VmState> {
    match call(sock, &Request::Status, timeout).await? {
        Response::Status(s) => Ok(*s),
        other => Err(unexpected(other)),
    }
}

/// What the supervisor knows without asking QEMU (no `live` part): cheap
/// enough to poll, and no competition for QEMU's or the agent's attention.
pub async fn state(sock: &Path, timeout: Duration) -> Result<VmState> {
    match call(sock, &Request::State, timeout).await? {
        Response::Status(s) => Ok(*s),
        other => Err(unexpected(other)),
    }
}

/// Runs the stop ladder; answers once QEMU is gone (within `budget`).
pub async fn powerdown(sock: &Path, timeout: Duration, force: bool, budget: Duration) -> Result<Stopped> {
    let req = Request::Powerdown { timeout_secs: timeout.as_secs_f64(), force };
    match call(sock, &req, budget).await? {
        Response::Stopped(s) => Ok(*s),
        other => Err(unexpected(other)),
    }
}

/// Asks a running stop to skip the guest's own steps (on to QMP `quit`),
/// without waiting: the stop's first caller gets its answer.
pub async fn force_stop(sock: &Path) -> Result<()> {
    let req = Request::Powerdown { timeout_secs: 0.0, force: true };
    tokio::time::timeout(FORCE_STOP_SEND, send(sock, &req))
        .await
        .map_err(|_| anyhow!("the instance's supervisor did not take the request"))??;
    Ok(())
}

/// An event stream from [`subscribe`].
pub struct Events(BufReader<UnixStream>);

/// Opens an event stream and returns once the supervisor has subscribed.
pub async fn subscribe(sock: &Path) -> Result<Events> {
    let fut = async {
        let mut r = send(sock, &Request::Subscribe).await?;
        match answer(&mut r).await? {
            Response::Subscribed => Ok(Events(r)),
            other => Err(unexpected(other)),
        }
    };
    tokio::time::timeout(SUBSCRIBE, fut)
        .await
        .map_err(|_| anyhow!("the supervisor did not confirm the event subscription (is the VM stopping?)"))?
}

impl Events {
    /// The next event; `None` when the stream ended (QEMU is gone).
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match answer(&mut self.0).await.ok()? {
                Response::Event(ev) => return Some(ev),
                _ => continue,
            }
        }
    }
}
