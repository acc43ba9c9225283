//! What `events` and `logs` report.

use serde::Serialize;
use serde_json::Value;

use super::Render;
use crate::clock::utc_time;
use crate::qmp::Event;

/// One event as `events` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct EventLine {
    #[serde(flatten)]
    pub event: Event,
    /// `timestamp`, readable.
    pub time: String,
}

impl EventLine {
    pub fn parse(line: &str) -> Option<EventLine> {
        let event: Event = serde_json::from_str(line.trim()).ok()?;
        Some(EventLine { time: utc_time(event.timestamp), event })
    }

    pub fn human(&self) -> String {
        match &self.event.data {
            Value::Null => format!("{}  {}", self.time, self.event.event),
            Value::Object(m) if m.is_empty() => format!("{}  {}", self.time, self.event.event),
            d => format!("{}  {}  {d}", self.time, self.event.event),
        }
    }
}

/// `events` without `--follow`.
#[derive(Debug, Clone, Serialize)]
pub struct Events {
    pub name: String,
    pub events: Vec<EventLine>,
}

impl Render for Events {
    fn human(&self) -> String {
        if self.events.is_empty() {
            return format!("(no events recorded for instance '{}')", self.name);
        }
        self.events.iter().map(EventLine::human).collect::<Vec<_>>().join("\n")
    }
}

/// `logs --json`: the serial console log as the guest wrote it. Only its
/// head is a value: `app/logs.rs` streams the `text` member after it, so a
/// large log is never held in memory.
#[derive(Debug, Clone, Serialize)]
pub struct SerialLog {
    pub name: String,
    pub path: std::path::PathBuf,
    /// The older file (`serial.log.1`) the text begins in, when it does.
    pub older_path: Option<std::path::PathBuf>,
    /// Where older output went, when the log reached its cap.
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_parse_and_render() {
        let e = EventLine::parse(
            r#"{"event":"SHUTDOWN","data":{"guest":true,"reason":"guest-shutdown"},"timestamp":1764093781.5}"#,
        )
        .unwrap();
        assert_eq!(e.human(), r#"2025-11-25 18:03:01.500 UTC  SHUTDOWN  {"guest":true,"reason":"guest-shutdown"}"#);
        let p = EventLine::parse(r#"{"event":"POWERDOWN","data":null,"timestamp":1.0}"#).unwrap();
        assert_eq!(p.human(), "1970-01-01 00:00:01.000 UTC  POWERDOWN");
        assert!(EventLine::parse("not json").is_none());
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "SHUTDOWN");
        assert_eq!(v["time"], "2025-11-25 18:03:01.500 UTC");
        assert_eq!(v["timestamp"], 1764093781.5);
    }
}
