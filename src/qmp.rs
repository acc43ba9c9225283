//! A QMP client: qapi's generated command and reply types over a transport of
//! our own.
//!
//! qapi 0.15's own stream is unsafe to put in front of a user (measured on QEMU
//! 7.2 and 10.0): an event or enum value unknown to its QEMU 9.1 schema ends the
//! whole stream, every command uses id 0 (a command dropped by a timeout makes
//! the next one panic with "duplicate command id"), and a pending command hangs
//! after EOF. Here one reader task routes replies by a unique id and
//! broadcasts events as raw JSON, so an unknown event is just another event, a
//! late reply is dropped, and EOF fails every pending command at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, oneshot, watch};

/// A QMP event as QEMU sent it; `data` stays raw so events and enum values
/// newer than qapi's schema pass through untouched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    /// Seconds since the epoch, from QEMU's own timestamp.
    pub timestamp: f64,
}

impl Event {
    fn from_json(v: &Value) -> Option<Event> {
        let name = v.get("event")?.as_str()?.to_string();
        let ts = v.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_f64).unwrap_or(0.0);
        let micros = ts.and_then(|t| t.get("microseconds")).and_then(Value::as_f64).unwrap_or(0.0);
        Some(Event { event: name, data: v.get("data").cloned().unwrap_or(Value::Null), timestamp: secs + micros / 1e6 })
    }

    /// `SHUTDOWN`'s `(guest, reason)`, read from raw JSON so a reason newer
    /// than qapi's `ShutdownCause` still reaches the user.
    pub fn shutdown(&self) -> Option<(bool, String)> {
        if self.event != "SHUTDOWN" {
            return None;
        }
        let guest = self.data.get("guest").and_then(Value::as_bool).unwrap_or(false);
        let reason = self.data.get("reason").and_then(Value::as_str).unwrap_or("unknown");
        Some((guest, reason.to_string()))
    }
}

/// The class of an error QEMU answered with (QAPI `QapiErrorClass`), the
/// ones this tool acts on named, any other kept as QEMU spelled it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
    Other(String),
}

impl ErrorClass {
    pub fn parse(s: &str) -> ErrorClass {
        match s {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            other => ErrorClass::Other(other.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::Other(s) => s,
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for ErrorClass {
    fn from(s: String) -> ErrorClass {
        ErrorClass::parse(&s)
    }
}

impl From<ErrorClass> for String {
    fn from(c: ErrorClass) -> String {
        c.as_str().into()
    }
}

/// Why a command did not return a value.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpError {
    /// QEMU answered with an error object.
    Qemu {
        class: ErrorClass,
        desc: String,
    },
    /// No answer in time; the id is forgotten so a late reply is dropped.
    Timeout {
        command: String,
        after: Duration,
    },
    /// The connection ended before the answer (EOF or reset). After `quit`
    /// this is the expected outcome, not a failure.
    Disconnected {
        command: String,
        reason: String,
    },
    /// The answer did not decode into qapi's type for the command.
    Decode {
        command: String,
        detail: String,
    },
    Io(String),
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QmpError::Qemu { class, desc } => write!(f, "QEMU refused it: {class}: {desc}"),
            QmpError::Timeout { command, after } => {
                write!(f, "QEMU did not answer '{command}' within {:.1}s", after.as_secs_f64())
            }
            QmpError::Disconnected { command, reason } => {
                write!(f, "the QMP connection closed before QEMU answered '{command}' ({reason})")
            }
            QmpError::Decode { command, detail } => {
                write!(f, "QEMU's answer to '{command}' did not decode: {detail}")
            }
            QmpError::Io(e) => write!(f, "QMP I/O error: {e}"),
        }
    }
}

impl std::error::Error for QmpError {}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>>;

/// One QMP connection. Cheap to clone; all clones share the reader task.
/// When the last clone is dropped the connection closes, so QEMU (which
/// serves one client per socket) can greet the next one.
#[derive(Clone)]
pub struct Qmp {
    writer: Arc<tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    events: broadcast::Sender<Event>,
    /// Subscribed before negotiation, handed to the first `subscribe()`: an
    /// event right after `qmp_capabilities` must not be lost.
    first_events: Arc<Mutex<Option<broadcast::Receiver<Event>>>>,
    closed: watch::Receiver<Option<String>>,
    /// Set when a write timed out half-way: the stream is no longer framed.
    broken: Arc<Mutex<Option<String>>>,
    _reader: Arc<AbortOnDrop>,
    /// QEMU's greeting (`{"QMP": {...}}`).
    pub greeting: Value,
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities (before
    /// `qmp_capabilities` every command is `CommandNotFound`).
    pub async fn handshake<S>(stream: S, timeout: Duration) -> Result<Qmp, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let mut reader = BufReader::new(r);
        let mut line = String::new();
        let greeting = match tokio::time::timeout(timeout, reader.read_line(&mut line)).await {
            Err(_) => {
                return Err(QmpError::Timeout { command: "greeting".into(), after: timeout });
            }
            Ok(Err(e)) => return Err(QmpError::Io(e.to_string())),
            Ok(Ok(0)) => {
                return Err(QmpError::Disconnected {
                    command: "greeting".into(),
                    reason: "EOF before QEMU's greeting".into(),
                })
            }
            Ok(Ok(_)) => serde_json::from_str::<Value>(line.trim_end())
                .map_err(|e| QmpError::Io(format!("greeting is not JSON: {e}")))?,
        };
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Io(format!("not a QMP greeting: {}", line.trim_end())));
        }
        let (events, first) = broadcast::channel(1024);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (closed_tx, closed) = watch::channel(None);
        let reader = tokio::spawn(read_loop(reader, pending.clone(), events.clone(), closed_tx));
        let qmp = Qmp {
            writer: Arc::new(tokio::sync::Mutex::new(Box::new(w))),
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            events,
            first_events: Arc::new(Mutex::new(Some(first))),
            closed,
            broken: Arc::new(Mutex::new(None)),
            _reader: Arc::new(AbortOnDrop(reader.abort_handle())),
            greeting,
        };
        qmp.execute(&qapi::qmp::qmp_capabilities { enable: None }, timeout).await?;
        Ok(qmp)
    }

    /// Connects to a QMP unix socket and negotiates.
    pub async fn connect(path: &std::path::Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let s = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout { command: "connect".into(), after: timeout })?
            .map_err(|e| QmpError::Io(format!("{}: {e}", path.display())))?;
        Qmp::handshake(s, timeout).await
    }

    /// Subscribe before issuing the command whose event you wait for, so the
    /// event cannot slip past between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.first_events.lock().unwrap().take().unwrap_or_else(|| self.events.subscribe())
    }

    /// Resolves when the connection has ended; the reason is EOF or reset.
    pub async fn closed(&self) -> String {
        let mut rx = self.closed.clone();
        loop {
            if let Some(r) = rx.borrow().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return "connection dropped".into();
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// A typed command: qapi's generated type names the command and decodes
    /// the reply.
    pub async fn execute<C: qapi::Command>(&self, cmd: &C, timeout: Duration) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|e| QmpError::Io(e.to_string()))?;
        let v = self.execute_raw(C::NAME, args, timeout).await?;
        // Commands with no return value answer `{}`.
        serde_json::from_value(v).map_err(|e| QmpError::Decode { command: C::NAME.into(), detail: e.to_string() })
    }

    /// Any command by name (for `qbuf-qemu qmp`), reply as raw JSON.
    pub async fn execute_raw(&self, name: &str, args: Value, timeout: Duration) -> Result<Value, QmpError> {
        if let Some(reason) = self.broken.lock().unwrap().clone() {
            return Err(QmpError::Disconnected { command: name.into(), reason });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap();
            match p.as_mut() {
                Some(map) => map.insert(id, tx),
                None => {
                    return Err(QmpError::Disconnected {
                        command: name.into(),
                        reason: self.closed.borrow().clone().unwrap_or_else(|| "closed".into()),
                    })
                }
            };
        }
        let line = request_line(name, &args, id);
        tracing::debug!("QMP → {}", line.trim_end());
        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        };
        // The timeout covers the write too: a QEMU that stopped reading fills
        // the socket buffer and would block us (and every clone) for ever.
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.forget(id);
                return Err(QmpError::Disconnected { command: name.into(), reason: e.to_string() });
            }
            Err(_) => {
                // Part of the line may be out; QEMU would glue the next command
                // onto it, so this connection cannot be used any more.
                self.forget(id);
                let reason = format!("QEMU stopped reading QMP input ('{name}' could not be sent within {timeout:?})");
                *self.broken.lock().unwrap() = Some(reason.clone());
                return Err(QmpError::Timeout { command: name.into(), after: timeout });
            }
        }
        let answer = tokio::time::timeout_at(deadline, rx).await;
        if let Ok(Ok(r)) = &answer {
            tracing::debug!("QMP ← {id}: {r:?}");
        }
        match answer {
            Ok(Ok(r)) => r.map_err(|e| match e {
                QmpError::Disconnected { reason, .. } => QmpError::Disconnected { command: name.into(), reason },
                other => other,
            }),
            Ok(Err(_)) => Err(QmpError::Disconnected { command: name.into(), reason: "reader ended".into() }),
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout { command: name.into(), after: timeout })
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Some(map) = self.pending.lock().unwrap().as_mut() {
            map.remove(&id);
        }
    }
}

/// The bytes sent for one command. Compact on purpose: QEMU reads QMP input
/// one byte per syscall.
pub fn request_line(name: &str, args: &Value, id: u64) -> String {
    let mut req = json!({ "execute": name, "id": id });
    let has_args = match args {
        Value::Object(m) => !m.is_empty(),
        Value::Null => false,
        _ => true,
    };
    if has_args {
        req["arguments"] = args.clone();
    }
    let mut s = serde_json::to_string(&req).expect("JSON value serializes");
    s.push('\n');
    s
}

/// One parsed line from QEMU.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Reply {
        id: u64,
        result: Result<Value, (ErrorClass, String)>,
    },
    /// An error QEMU could not tie to a request (e.g. a malformed line).
    Unrouted(Value),
    Event(Event),
    Other(Value),
}

pub fn classify(line: &str) -> Option<Incoming> {
    let v: Value = serde_json::from_str(line.trim_end()).ok()?;
    if v.get("event").is_some() {
        return Event::from_json(&v).map(Incoming::Event);
    }
    let id = v.get("id").and_then(Value::as_u64);
    if let Some(r) = v.get("return") {
        return Some(match id {
            Some(id) => Incoming::Reply { id, result: Ok(r.clone()) },
            None => Incoming::Unrouted(v),
        });
    }
    if let Some(e) = v.get("error") {
        let class = ErrorClass::parse(e.get("class").and_then(Value::as_str).unwrap_or("GenericError"));
        let desc = e.get("desc").and_then(Value::as_str).unwrap_or("").to_string();
        return Some(match id {
            Some(id) => Incoming::Reply { id, result: Err((class, desc)) },
            None => Incoming::Unrouted(v),
        });
    }
    Some(Incoming::Other(v))
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    closed: watch::Sender<Option<String>>,
) {
    let mut buf = Vec::new();
    let reason = loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) => break "EOF".to_string(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "connection reset".into(),
            Err(e) => break e.to_string(),
        }
        let line = String::from_utf8_lossy(&buf);
        match classify(&line) {
            Some(Incoming::Reply { id, result }) => {
                let tx = pending.lock().unwrap().as_mut().and_then(|m| m.remove(&id));
                match tx {
                    Some(tx) => {
                        let _ = tx.send(result.map_err(|(class, desc)| QmpError::Qemu { class, desc }));
                    }
                    None => {
                        tracing::debug!(id, "dropping a reply nobody waits for (timed out earlier)")
                    }
                }
            }
            Some(Incoming::Event(ev)) => {
                tracing::debug!(event = %ev.event, "QMP event");
                let _ = events.send(ev);
            }
            Some(Incoming::Unrouted(v)) => tracing::warn!(%v, "QMP reply without an id"),
            Some(Incoming::Other(v)) => tracing::debug!(%v, "unexpected QMP line"),
            None => tracing::warn!(line = %line.trim_end(), "QMP line is not JSON"),
        }
    };
    let waiters = pending.lock().unwrap().take().unwrap_or_default();
    for (_, tx) in waiters {
        let _ = tx.send(Err(QmpError::Disconnected { command: String::new(), reason: reason.clone() }));
    }
    let _ = closed.send(Some(reason));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_is_compact_and_omits_empty_arguments() {
        assert_eq!(request_line("query-status", &json!({}), 7), "{\"execute\":\"query-status\",\"id\":7}\n");
        let l = request_line("device_del", &json!({"id": "d0"}), 8);
        assert!(l.contains("\"arguments\":{\"id\":\"d0\"}"), "{l}");
        assert!(!l.contains(' '));
    }

    #[test]
    fn classify_routes_replies_events_and_unrouted_errors() {
        assert_eq!(classify("{\"return\": {}, \"id\": 3}\r\n"), Some(Incoming::Reply { id: 3, result: Ok(json!({})) }));
        match classify("{\"id\": 4, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"x\"}}\r\n") {
            Some(Incoming::Reply { id: 4, result: Err((c, _)) }) => assert_eq!(c, ErrorClass::CommandNotFound),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify("{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\r\n"),
            Some(Incoming::Unrouted(_))
        ));
        match classify("{\"timestamp\": {\"seconds\": 10, \"microseconds\": 500000}, \"event\": \"NEW_THING\", \"data\": {\"x\": 1}}\r\n") {
            Some(Incoming::Event(e)) => {
                assert_eq!(e.event, "NEW_THING");
                assert_eq!(e.timestamp, 10.5);
            }
            other => panic!("{other:?}"),
        }
    }
}
