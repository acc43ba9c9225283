//! The layering rule of docs/architecture.md, kept by a test: every file in
//! `src/` may refer (through `crate::` or `super::` paths) only to files of
//! its own layer or a lower one, and no files refer to each other in a
//! circle. The layers are listed here, lowest first; a new file must be
//! placed in one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. A path ending in `/` names every file below it.
const LAYERS: &[&[&str]] = &[
    // Basics: no knowledge of QEMU or of the commands.
    &[
        "clock.rs",
        "host.rs",
        "config.rs",
        "qmp.rs",
        "qga.rs",
        "instance/paths.rs",
        "instance/proc.rs",
        "instance/lock.rs",
        "progress.rs",
    ],
    // QEMU as data: the pure argv builder, parsers of its output, its binaries.
    &["qemu/args.rs", "qemu/parse.rs", "qemu/host.rs"],
    // The records an instance keeps.
    &["instance/records.rs", "instance/mod.rs"],
    // Services over the records: images, SSH, Guix, logs, the console.
    &["qemu/image.rs", "qemu/mod.rs", "ssh.rs", "guix.rs", "logs.rs", "console.rs"],
    // QEMU's parent process and its protocol.
    &["supervisor/"],
    // Typed outcomes and their renderers.
    &["report/"],
    // The command line's types and parsers; the host checks.
    &["cli/", "doctor.rs"],
    // The command layer: imported by nothing but main.rs.
    &["app/"],
    // Property tests of every parser (test builds only).
    &["fuzz.rs"],
];

fn layer_of(file: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.iter().any(|p| if p.ends_with('/') { file.starts_with(p) } else { file == *p }))
}

fn sources(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, base, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(base).unwrap().to_str().unwrap().to_string();
            out.insert(rel, std::fs::read_to_string(&p).unwrap());
        }
    }
}

/// The source without its `#[cfg(test)] mod …` block and comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// `app/launch.rs` → `["app", "launch"]`; `app/mod.rs` → `["app"]`.
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file.trim_end_matches(".rs").split('/').map(String::from).collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    parts
}

/// The file a module path names: the longest prefix that is a file.
fn resolve(files: &BTreeMap<String, String>, segs: &[String]) -> Option<String> {
    (1..=segs.len()).rev().find_map(|k| {
        let cand = segs[..k].join("/");
        [format!("{cand}.rs"), format!("{cand}/mod.rs")].into_iter().find(|f| files.contains_key(f))
    })
}

/// Every `crate::a::b` / `super::a` path in `code`, with one level of
/// `{…}` expanded.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for root in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(i) = rest.find(root) {
            let before = rest[..i].chars().last();
            rest = &rest[i..];
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            let head = rest[..end].trim_end_matches(':').to_string();
            let tail = &rest[end..];
            rest = &rest[end..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let segs: Vec<String> = head.split("::").map(String::from).collect();
            if rest.starts_with('{') && head.len() < end {
                let close = tail.find('}').unwrap_or(tail.len());
                for item in tail[1..close].split(',') {
                    let item = item.split(" as ").next().unwrap().trim();
                    if item == "self" || item.is_empty() {
                        out.push(segs.clone());
                    } else {
                        out.push(segs.iter().cloned().chain(item.split("::").map(|s| s.trim().to_string())).collect());
                    }
                }
            } else {
                out.push(segs);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    sources(&src, &src, &mut files);
    let mut edges = BTreeMap::new();
    for (f, text) in &files {
        let here = module_of(f);
        let mut to = BTreeSet::new();
        for p in paths(&code(text)) {
            let segs: Vec<String> = match p[0].as_str() {
                "crate" => p[1..].to_vec(),
                _ => here[..here.len().saturating_sub(1)].iter().cloned().chain(p[1..].iter().cloned()).collect(),
            };
            if let Some(t) = resolve(&files, &segs).filter(|t| t != f && t != "lib.rs" && t != "main.rs") {
                to.insert(t);
            }
        }
        edges.insert(f.clone(), to);
    }
    edges
}

#[test]
fn every_file_has_a_layer_and_imports_only_downwards() {
    let g = graph();
    let mut bad = Vec::new();
    for (f, to) in &g {
        if f == "lib.rs" || f == "main.rs" {
            continue;
        }
        let Some(lf) = layer_of(f) else {
            bad.push(format!("{f} is in no layer: add it to LAYERS in tests/layers.rs"));
            continue;
        };
        for t in to {
            match layer_of(t) {
                Some(lt) if lt > lf => bad.push(format!("{f} (layer {lf}) imports {t} (layer {lt}), a higher layer")),
                _ => {}
            }
        }
    }
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

#[test]
fn no_files_import_each_other_in_a_circle() {
    let g = graph();
    // A file is in a cycle when it can reach itself.
    let mut cycles = Vec::new();
    for start in g.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = g[start].iter().collect();
        while let Some(n) = todo.pop() {
            if n == start {
                cycles.push(start.clone());
                break;
            }
            if seen.insert(n) {
                todo.extend(g.get(n).into_iter().flatten());
            }
        }
    }
    assert!(cycles.is_empty(), "files in an import cycle: {cycles:?}");
}

#[test]
fn the_guard_sees_imports() {
    // The parser must find real edges, or the two tests above prove nothing.
    let g = graph();
    assert!(g["app/launch.rs"].contains("app/boot.rs"), "{:?}", g["app/launch.rs"]);
    assert!(g["supervisor/dispatcher.rs"].contains("supervisor/ladder.rs"));
    assert!(g["report/status.rs"].contains("supervisor/protocol.rs"));
    let p = paths("use crate::a::{b, c::d as e, self};\nlet x = super::f::g();");
    assert!(p.contains(&vec!["crate".into(), "a".into(), "c".into(), "d".into()]), "{p:?}");
    assert!(p.contains(&vec!["super".into(), "f".into(), "g".into()]), "{p:?}");
}
