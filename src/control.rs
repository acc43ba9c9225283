//! The supervisor's control socket: how commands talk to a running instance.
//!
//! QMP serves one client per socket (a second connect gets no greeting until
//! the first closes), so commands never hold QEMU's socket themselves: each
//! opens a connection here, sends one request line and reads the answer. The
//! supervisor multiplexes them over its single QMP connection, so `status`
//! answers while a `powerdown` waits.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::powerdown::StopOutcome;
use crate::qmp::Event;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// A QMP command forwarded as is.
    Qmp {
        command: String,
        #[serde(default)]
        arguments: Value,
        timeout_ms: u64,
    },
    /// The supervisor's view: pids, start time, accelerator.
    Info,
    /// Run the stop ladder; answered once QEMU is gone.
    Powerdown { timeout_secs: f64, force: bool },
    /// Stream every QMP event from now on. The first answer line is
    /// `Ok(null)`, sent once the subscription is in place: a command sent
    /// after it cannot produce an event the stream misses.
    Subscribe,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Ok(Value),
    QmpError { class: String, desc: String },
    Failed(String),
    Event(Event),
    Stopped(StopOutcome),
}

/// What `Info` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub qemu_pid: i32,
    pub supervisor_pid: i32,
    pub started_at: f64,
    pub accel: crate::qemu::Accel,
    pub qemu_version: String,
    pub hotplug_ports: u32,
    /// Set while the stop ladder runs, naming its current step.
    pub stopping: Option<String>,
    /// The last SHUTDOWN event seen, if any.
    pub last_shutdown: Option<Event>,
    /// GUEST_PANICKED, if the guest panicked during this boot.
    #[serde(default)]
    pub panicked: Option<Event>,
    /// Whether the guest has the guest agent's virtio-serial port open (from
    /// `VSERPORT_CHANGE`): no agent can answer while it is closed.
    #[serde(default)]
    pub agent_port_open: bool,
}

/// Connects, sends `req`, returns the first answer line.
pub async fn call(sock: &Path, req: &Request, timeout: Duration) -> Result<Response> {
    let fut = async {
        let mut s = UnixStream::connect(sock).await.with_context(|| format!("cannot connect to {}", sock.display()))?;
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        s.write_all(line.as_bytes()).await?;
        let mut r = BufReader::new(s);
        let mut answer = String::new();
        if r.read_line(&mut answer).await? == 0 {
            return Err(anyhow!("the supervisor closed the connection without answering (is the VM stopping?)"));
        }
        Ok(serde_json::from_str::<Response>(&answer)?)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("the instance's supervisor did not answer within {}s", timeout.as_secs()))?
}

/// Sends a QMP command through the supervisor.
pub async fn qmp(
    sock: &Path,
    command: &str,
    arguments: Value,
    timeout: Duration,
) -> Result<Result<Value, (String, String)>> {
    let req = Request::Qmp { command: command.into(), arguments, timeout_ms: timeout.as_millis() as u64 };
    match call(sock, &req, timeout + Duration::from_secs(2)).await? {
        Response::Ok(v) => Ok(Ok(v)),
        Response::QmpError { class, desc } => Ok(Err((class, desc))),
        Response::Failed(m) => Err(anyhow!(m)),
        other => Err(anyhow!("unexpected answer from the supervisor: {other:?}")),
    }
}

pub async fn info(sock: &Path, timeout: Duration) -> Result<Info> {
    match call(sock, &Request::Info, timeout).await? {
        Response::Ok(v) => Ok(serde_json::from_value(v)?),
        Response::Failed(m) => Err(anyhow!(m)),
        other => Err(anyhow!("unexpected answer from the supervisor: {other:?}")),
    }
}

/// Opens an event stream and returns once the supervisor has subscribed;
/// read it with [`next_event`].
pub async fn subscribe(sock: &Path) -> Result<BufReader<UnixStream>> {
    let mut s = UnixStream::connect(sock).await.with_context(|| format!("cannot connect to {}", sock.display()))?;
    let mut line = serde_json::to_string(&Request::Subscribe)?;
    line.push('\n');
    s.write_all(line.as_bytes()).await?;
    let mut r = BufReader::new(s);
    let mut ack = String::new();
    let fut = r.read_line(&mut ack);
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok(n)) if n > 0 && matches!(serde_json::from_str(&ack), Ok(Response::Ok(_))) => Ok(r),
        _ => Err(anyhow!("the supervisor did not confirm the event subscription (is the VM stopping?)")),
    }
}

/// The next event of a stream from [`subscribe`]; `None` when it ended.
pub async fn next_event(stream: &mut BufReader<UnixStream>) -> Option<Event> {
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if let Ok(Response::Event(ev)) = serde_json::from_str(&line) {
            return Some(ev);
        }
    }
}
