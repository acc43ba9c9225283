//! What `doctor` reports.

use serde::Serialize;

use super::Render;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// Checks at `warn` or `fail`.
    pub problems: usize,
}

impl Render for Report {
    fn human(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            let level = match c.level {
                Level::Ok => "ok",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            s.push_str(&format!("{level:<5} {:<11} {}\n", c.name, c.detail));
            if let Some(f) = &c.fix {
                s.push_str(&format!("{:17} fix: {f}\n", ""));
            }
        }
        match self.problems {
            0 => s.push_str("No problems found."),
            n => s.push_str(&format!("{n} problem(s) found.")),
        }
        s
    }
}
