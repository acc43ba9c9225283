//! The documentation tells the truth about the CLI: every `qbuf-qemu …` line
//! in README.md and docs/*.md parses with the real clap definition, their
//! relative links resolve, the README names every subcommand, and its test
//! command is the one CI runs.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use qbuf_qemu::cli::Cli;

const DOCS: &[&str] = &["README.md", "docs/dev-vm.md", "docs/architecture.md", "docs/benchmarks.md"];

/// The README's one test command; `.ci/run` must run exactly this.
const TEST_COMMAND: &str = "cargo test --no-fail-fast";

/// Placeholders the docs use for user-supplied values, and what they stand
/// for when parsing.
const PLACEHOLDERS: &[(&str, &str)] = &[("FILE", "/tmp/qbuf-docs/file"), ("DIR", "/tmp/qbuf-docs/dir")];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// One command line found in a doc, with where it came from.
#[derive(Debug)]
struct Found {
    file: String,
    line: usize,
    text: String,
}

/// Lines starting with `qbuf-qemu ` inside ```sh blocks (a trailing `\`
/// continues the line), plus inline code spans starting with `qbuf-qemu `.
fn commands_in(file: &str, text: &str) -> Vec<Found> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None; // the info string of the open fence
    let mut pending: Option<Found> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        let trimmed = line.trim_start();
        if let Some(p) = pending.as_mut() {
            p.text.push(' ');
            p.text.push_str(trimmed.trim_end_matches('\\'));
            if !trimmed.ends_with('\\') {
                out.push(pending.take().unwrap());
            }
            continue;
        }
        if let Some(info) = trimmed.strip_prefix("```") {
            fence = match fence {
                Some(_) => None,
                None => Some(info.trim().to_string()),
            };
            continue;
        }
        match fence.as_deref() {
            Some("sh") => {
                if trimmed.starts_with("qbuf-qemu ") {
                    let f = Found { file: file.into(), line: i + 1, text: trimmed.trim_end_matches('\\').to_string() };
                    if trimmed.ends_with('\\') {
                        pending = Some(f);
                    } else {
                        out.push(f);
                    }
                }
            }
            Some(_) => {}
            None => {
                // Inline code: the odd-numbered pieces between backticks.
                for (k, span) in line.split('`').enumerate() {
                    if k % 2 == 1 && span.starts_with("qbuf-qemu ") {
                        out.push(Found { file: file.into(), line: i + 1, text: span.to_string() });
                    }
                }
            }
        }
    }
    assert!(fence.is_none(), "{file}: a ``` fence is not closed");
    out
}

/// Splits a command line into words like a POSIX shell would, for the parts
/// the docs use: blanks, '…' and "…" quoting, backslash escapes. Stops at an
/// unquoted `&&`, `||`, `|`, `;`, `<`, `>` or a word starting with `#`.
fn shell_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '&' if chars.peek() == Some(&'&') => break,
            '|' | ';' | '<' | '>' => break,
            '#' if !in_word => break,
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => return Err("unterminated '".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => cur.push(ch),
                            Some(ch) => {
                                cur.push('\\');
                                cur.push(ch);
                            }
                            None => return Err("unterminated \"".into()),
                        },
                        Some(ch) => cur.push(ch),
                        None => return Err("unterminated \"".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(ch) = chars.next() {
                    cur.push(ch);
                }
            }
            _ => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

fn substitute(word: String) -> String {
    PLACEHOLDERS.iter().find(|(p, _)| *p == word).map(|(_, v)| v.to_string()).unwrap_or(word)
}

#[test]
fn shell_words_splits_like_the_docs_need() {
    let w = |s: &str| shell_words(s).unwrap();
    assert_eq!(w("qbuf-qemu ssh -- 'cd /mnt/qbuf && make'"), ["qbuf-qemu", "ssh", "--", "cd /mnt/qbuf && make"]);
    assert_eq!(w(r#"qbuf-qemu launch --append "a \"b\" c""#), ["qbuf-qemu", "launch", "--append", r#"a "b" c"#]);
    assert_eq!(w("qbuf-qemu status && echo ok"), ["qbuf-qemu", "status"]);
    assert_eq!(w("qbuf-qemu status --json | jq .state"), ["qbuf-qemu", "status", "--json"]);
    assert_eq!(w("qbuf-qemu status # comment"), ["qbuf-qemu", "status"]);
    assert_eq!(w("qbuf-qemu status>out; ls"), ["qbuf-qemu", "status"]);
    assert_eq!(w("qbuf-qemu a\\ b x''y"), ["qbuf-qemu", "a b", "xy"]);
    assert!(shell_words("qbuf-qemu 'open").is_err());
}

#[test]
fn every_documented_command_line_parses() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for file in DOCS {
        let text = read(file);
        for f in commands_in(file, &text) {
            checked += 1;
            let words = match shell_words(&f.text) {
                Ok(w) => w.into_iter().map(substitute).collect::<Vec<_>>(),
                Err(e) => {
                    failures.push(format!("{}:{}: {}\n  cannot split: {e}", f.file, f.line, f.text));
                    continue;
                }
            };
            if let Err(e) = Cli::try_parse_from(&words) {
                use clap::error::ErrorKind;
                // `--help` and `--version` "fail" by design: they print and exit 0.
                if !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                    failures.push(format!("{}:{}: {}\n{}", f.file, f.line, f.text, e.render()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "documented commands the CLI rejects:\n\n{}", failures.join("\n"));
    assert!(checked >= 20, "only {checked} qbuf-qemu command lines found in {DOCS:?}: is the extraction broken?");
}

#[test]
fn readme_test_command_is_the_one_ci_runs() {
    let readme = read("README.md");
    let in_sh_block = {
        let mut fence: Option<&str> = None;
        let mut found = false;
        for line in readme.lines() {
            let t = line.trim();
            if let Some(info) = t.strip_prefix("```") {
                fence = if fence.is_some() { None } else { Some(info.trim()) };
            } else if fence == Some("sh") && t == TEST_COMMAND {
                found = true;
            }
        }
        found
    };
    assert!(in_sh_block, "README.md must show the test command `{TEST_COMMAND}` on its own line in a ```sh block");
    // Run as root: a root-only host has no sudo (issue 11).
    let install = "tests/setup.sh && cargo build --release";
    assert!(
        readme.lines().any(|l| l.trim() == install),
        "README.md must show the one-command install on a line of its own: {install}"
    );
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == TEST_COMMAND),
        ".ci/run must run the README's test command `{TEST_COMMAND}` as a line of its own"
    );
}

#[test]
fn readme_lists_every_subcommand() {
    let readme = read("README.md");
    let table_rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
    let mut missing = Vec::new();
    for sub in Cli::command().get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        let row = format!("| `{name}");
        let in_table =
            table_rows.iter().any(|r| r.starts_with(&row) && matches!(r[row.len()..].chars().next(), Some('`' | ' ')));
        if !in_table {
            missing.push(name.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "README.md's command table has no row for: {} (add a row starting with | `NAME` |)",
        missing.join(", ")
    );
}

#[test]
fn relative_links_between_the_docs_resolve() {
    for file in DOCS {
        let text = read(file);
        let base = Path::new(file).parent().unwrap_or(Path::new(""));
        for piece in text.split("](").skip(1) {
            let target = piece.split(')').next().unwrap_or("");
            if target.contains("://") || target.starts_with('#') || target.is_empty() {
                continue;
            }
            let path = target.split('#').next().unwrap();
            assert!(repo().join(base).join(path).exists(), "{file}: link to {target} does not resolve");
        }
    }
}
