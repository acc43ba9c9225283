//! The QEMU guest agent, over the `qga.sock` chardev.
//!
//! QGA is line JSON like QMP but without a greeting or negotiation, and a
//! fresh connection may find the agent's parser holding half a request from
//! an earlier client. So every conversation starts with the documented
//! resynchronisation: a 0xFF byte (which resets the agent's parser) and
//! `guest-sync-delimited`, whose answer is prefixed by 0xFF so stale output
//! can be skipped. With no agent in the guest nothing answers at all, so every
//! step has a short deadline.

use std::path::Path;
use std::time::Duration;

use crate::timeouts::AGENT_SHUTDOWN_REPLY;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The most the agent may send in one reply (or as stale output before its
/// sync's 0xFF). The guest is untrusted and the supervisor reads these for
/// every `status` and in the stop ladder: a guest streaming bytes without a
/// line end must not grow its memory. Real replies here are a few bytes.
const MAX_REPLY: u64 = 1 << 20;

/// Whether the guest agent answers, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    Answers,
    /// The guest has not opened the agent's port: no agent runs.
    NotRunning,
    /// The port is open but no answer came in time.
    NoAnswer,
}

fn request(name: &str, args: Value) -> Vec<u8> {
    let mut v = json!({ "execute": name });
    if !args.is_null() {
        v["arguments"] = args;
    }
    let mut line = serde_json::to_vec(&v).expect("JSON serializes");
    line.push(b'\n');
    line
}

/// Reads up to and including `end` into `buf`, at most [`MAX_REPLY`]
/// bytes; `what` names the read in the error when the cap is reached.
/// Returns how many bytes were read (0 at EOF).
async fn read_capped<R: AsyncBufRead + Unpin>(
    r: &mut R,
    end: u8,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<usize, String> {
    let n = (&mut *r).take(MAX_REPLY).read_until(end, buf).await.map_err(|e| e.to_string())?;
    if n as u64 == MAX_REPLY && buf.last() != Some(&end) {
        return Err(format!(
            "the guest agent sent more than {} KiB {what}: stopped reading (the guest is not trusted)",
            MAX_REPLY / 1024
        ));
    }
    Ok(n)
}

async fn read_json_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Value, String> {
    let mut line = Vec::new();
    match read_capped(r, b'\n', &mut line, "without a line end").await? {
        0 => Err("the agent's socket closed".into()),
        _ => serde_json::from_slice(line.trim_ascii())
            .map_err(|e| format!("the agent sent something that is not JSON: {e}")),
    }
}

/// Skips the agent's output up to the 0xFF that starts the answer to the
/// sync numbered `id` (stale output of earlier clients comes first).
async fn skip_to_sync<R: AsyncBufRead + Unpin>(r: &mut R, id: i64) -> Result<(), String> {
    loop {
        let mut skipped = Vec::new();
        if read_capped(r, 0xFF, &mut skipped, "before its sync marker (0xFF)").await? == 0 {
            return Err("the agent's socket closed".into());
        }
        if read_json_line(r).await?.get("return").and_then(Value::as_i64) == Some(id) {
            return Ok(());
        }
    }
}

/// A connection on which the agent has just answered `guest-sync-delimited`.
async fn synced(sock: &Path) -> Result<BufReader<UnixStream>, String> {
    let mut s = UnixStream::connect(sock).await.map_err(|e| format!("cannot connect to {}: {e}", sock.display()))?;
    // Unique enough that a reply to an earlier client's sync cannot match.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let id = i64::from(std::process::id()) * 1_000_000_000 + i64::from(nanos);
    let mut req = vec![0xFF];
    req.extend(request(<qapi::qga::guest_sync_delimited as qapi::Command>::NAME, json!({ "id": id })));
    s.write_all(&req).await.map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    skip_to_sync(&mut r, id).await?;
    Ok(r)
}

async fn ping_inner(sock: &Path) -> Result<(), String> {
    let mut r = synced(sock).await?;
    r.get_mut()
        .write_all(&request(<qapi::qga::guest_ping as qapi::Command>::NAME, Value::Null))
        .await
        .map_err(|e| e.to_string())?;
    match read_json_line(&mut r).await? {
        v if v.get("return").is_some() => Ok(()),
        v => Err(format!("guest-ping failed: {v}")),
    }
}

/// Whether the agent answers `guest-ping` within `timeout`.
pub async fn ping(sock: &Path, timeout: Duration) -> Result<(), String> {
    tokio::time::timeout(timeout, ping_inner(sock))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:.1}s", timeout.as_secs_f64())))
}

/// Asks the agent to power the guest off. `guest-shutdown` sends no reply
/// when it works (the guest goes down), only an error when it does not;
/// `Ok` says what was done, and the caller judges by QEMU exiting.
pub async fn shutdown(sock: &Path, timeout: Duration) -> Result<String, String> {
    guest_shutdown(sock, "powerdown", timeout).await
}

/// Asks the agent to reboot the guest (`guest-shutdown` with mode
/// `reboot`); judged by the caller from QEMU's `RESET` event.
pub async fn reboot(sock: &Path, timeout: Duration) -> Result<String, String> {
    guest_shutdown(sock, "reboot", timeout).await
}

async fn guest_shutdown(sock: &Path, mode: &str, timeout: Duration) -> Result<String, String> {
    let fut = async {
        let mut r = synced(sock).await?;
        let args = json!({ "mode": mode });
        r.get_mut()
            .write_all(&request(<qapi::qga::guest_shutdown as qapi::Command>::NAME, args))
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(AGENT_SHUTDOWN_REPLY, read_json_line(&mut r)).await {
            Ok(Ok(v)) if v.get("error").is_some() => {
                Err(format!("the guest agent refused guest-shutdown ({mode}): {}", v["error"]))
            }
            _ => Ok(format!(
                "asked the guest agent to {} (guest-shutdown)",
                if mode == "powerdown" { "power off" } else { mode }
            )),
        }
    };
    tokio::time::timeout(timeout, fut).await.unwrap_or_else(|_| Err("the guest agent did not answer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line() {
        assert_eq!(request("guest-ping", Value::Null), b"{\"execute\":\"guest-ping\"}\n");
        let r = String::from_utf8(request("guest-sync-delimited", json!({"id": 5}))).unwrap();
        assert_eq!(r, "{\"arguments\":{\"id\":5},\"execute\":\"guest-sync-delimited\"}\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_guest_streaming_without_end_is_cut_off_at_the_cap() {
        // Twice the cap and more, with no line end and no 0xFF: before the
        // cap, the whole stream was kept in memory (and then parsed).
        let flood = vec![b'a'; 2 * MAX_REPLY as usize + 7];
        let mut r = BufReader::new(&flood[..]);
        let e = read_json_line(&mut r).await.unwrap_err();
        assert!(e.contains("more than 1024 KiB without a line end"), "{e}");
        let mut r = BufReader::new(&flood[..]);
        let e = skip_to_sync(&mut r, 5).await.unwrap_err();
        assert!(e.contains("more than 1024 KiB before its sync marker"), "{e}");
        // A reply of exactly the cap, line end included, is still read.
        let mut line = vec![b' '; MAX_REPLY as usize - 3];
        line.extend(b"{}\n");
        assert_eq!(read_json_line(&mut BufReader::new(&line[..])).await.unwrap(), json!({}));
        // Stale output, then the sync's answer.
        let mut r = BufReader::new(&b"junk\xff{\"return\": 4}\n\xff{\"return\": 5}\n{\"return\": {}}\n"[..]);
        skip_to_sync(&mut r, 5).await.unwrap();
        assert_eq!(read_json_line(&mut r).await.unwrap(), json!({"return": {}}));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_socket_is_no_agent_and_a_fake_agent_answers_after_stale_output() {
        let dir = std::env::temp_dir().join(format!("qbuf-qga-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qga.sock");
        let _ = std::fs::remove_file(&sock);
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        // Silent: like QEMU's chardev while no agent opened the guest's port.
        let silent = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            drop(s);
            l
        });
        let e = ping(&sock, Duration::from_millis(300)).await.unwrap_err();
        assert!(e.contains("no answer"), "{e}");
        let l = silent.await.unwrap();
        // An agent that first sends leftovers of an earlier conversation.
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = BufReader::new(s);
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).await.unwrap();
            let v: Value = serde_json::from_slice(&line[1..]).unwrap();
            let id = v["arguments"]["id"].as_i64().unwrap();
            r.get_mut().write_all(b"{\"return\": {}}\n\0").await.unwrap();
            r.get_mut().write_all(&[0xFF]).await.unwrap();
            r.get_mut().write_all(format!("{{\"return\": {id}}}\n").as_bytes()).await.unwrap();
            line.clear();
            r.read_until(b'\n', &mut line).await.unwrap();
            assert!(String::from_utf8_lossy(&line).contains("guest-ping"));
            r.get_mut().write_all(b"{\"return\": {}}\n").await.unwrap();
        });
        ping(&sock, Duration::from_secs(3)).await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
