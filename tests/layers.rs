//! The layering rule of docs/architecture.md, kept by a test: every file in
//! `src/` may refer (through `crate::` or `super::` paths) only to files of
//! its own layer or a lower one, nothing but `main.rs` (through `lib.rs`,
//! which declares the module) refers to the command layer `app/`, and no
//! files refer to each other in a circle. The layers are listed here, lowest
//! first; a new file must be placed in one, and in the same row of
//! docs/architecture.md's layer table (checked below too).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. A path ending in `/` names every file below it.
const LAYERS: &[&[&str]] = &[
    // Basics: no knowledge of QEMU or of the commands.
    &[
        "clock.rs",
        "host.rs",
        "config.rs",
        "config/tests.rs",
        "qmp.rs",
        "qga.rs",
        "instance/paths.rs",
        "instance/owner.rs",
        "instance/proc.rs",
        "instance/lock.rs",
        "progress.rs",
        "runtime.rs",
        "timeouts.rs",
    ],
    // QEMU as data: the pure argv builder, parsers of its output, its binaries.
    &["qemu/value.rs", "qemu/args.rs", "qemu/forward.rs", "qemu/virtiofs.rs", "qemu/parse.rs", "qemu/binaries.rs"],
    // The records an instance keeps.
    &["instance/records.rs", "instance/stops.rs", "instance/liveness.rs", "instance/mod.rs"],
    // Services over the records: images, SSH, files out of a guest, Guix, logs, the console.
    &[
        "qemu/image.rs",
        "qemu/mod.rs",
        "ssh.rs",
        "ssh/bounded.rs",
        "ssh/tests.rs",
        "guest_files.rs",
        "guest_files/tests.rs",
        "guest_files/limits.rs",
        "guix.rs",
        "logs.rs",
        "logs/filter.rs",
        "console.rs",
    ],
    // QEMU's parent process and its protocol.
    &["supervisor/"],
    // A running VM behind its supervisor: typed QMP, hot-plug, migration, forwards.
    &["machine/"],
    // Typed outcomes and their renderers.
    &["report/"],
    // The command line's types and parsers.
    &["cli/"],
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

/// The command layer: nothing outside it imports it but `main.rs` (and
/// `lib.rs`, which declares it and re-exports `app::run` for `main.rs`).
const APP: &str = "app/";

/// Every breach of the rule in `g`, one message each, naming the file.
fn layering_problems(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (f, to) in g {
        if f == "lib.rs" || f == "main.rs" {
            continue;
        }
        let Some(lf) = layer_of(f) else {
            bad.push(format!("{f} is in no layer: add it to LAYERS in tests/layers.rs"));
            continue;
        };
        for t in to {
            if t.starts_with(APP) && !f.starts_with(APP) {
                bad.push(format!(
                    "{f} imports {t}: nothing imports the command layer ({APP}) but main.rs (through lib.rs)"
                ));
                continue;
            }
            match layer_of(t) {
                Some(lt) if lt > lf => bad.push(format!("{f} (layer {lf}) imports {t} (layer {lt}), a higher layer")),
                _ => {}
            }
        }
    }
    bad
}

#[test]
fn every_file_has_a_layer_and_imports_only_downwards() {
    let bad = layering_problems(&graph());
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

/// docs/architecture.md's layer table: for each row, lowest first, the
/// modules its "files" cell names (`clock`, `instance/records`,
/// `qemu/{args,parse}` expanded, `report/*` kept as a prefix `report/`).
fn documented_layers() -> Vec<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        if line.starts_with("| layer (lowest first) |") {
            in_table = true;
            continue;
        }
        if !in_table || line.starts_with("| ---") {
            continue;
        }
        if !line.starts_with('|') {
            break;
        }
        let cell = line.split('|').nth(2).unwrap_or("");
        let mut names = Vec::new();
        for span in cell.split('`').skip(1).step_by(2) {
            match span.split_once('{') {
                Some((dir, rest)) => {
                    names.extend(rest.trim_end_matches('}').split(',').map(|m| format!("{dir}{}", m.trim())))
                }
                None => names.push(span.trim_end_matches('*').to_string()),
            }
        }
        rows.push(names);
    }
    rows
}

#[test]
fn the_architecture_doc_has_the_same_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    sources(&src, &src, &mut files);
    let doc = documented_layers();
    assert_eq!(
        doc.len(),
        LAYERS.len(),
        "docs/architecture.md's layer table has {} rows, LAYERS {}",
        doc.len(),
        LAYERS.len()
    );
    let doc_layer = |file: &str| {
        let module = file.trim_end_matches(".rs");
        doc.iter().position(|row| {
            row.iter().any(|n| if n.ends_with('/') { module.starts_with(n.as_str()) } else { module == n })
        })
    };
    let mut bad = Vec::new();
    for f in files.keys().filter(|f| *f != "lib.rs" && *f != "main.rs") {
        if doc_layer(f) != layer_of(f) {
            bad.push(format!(
                "{f}: row {:?} of docs/architecture.md's table, layer {:?} in LAYERS",
                doc_layer(f),
                layer_of(f)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "docs/architecture.md and LAYERS disagree (rows and layers count from 0):\n{}",
        bad.join("\n")
    );
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
    // An import of app/ from outside it is named, even from a higher layer.
    let fake: BTreeMap<String, BTreeSet<String>> = [
        ("fuzz.rs", "app/run.rs"),
        ("supervisor/ladder.rs", "app/stop.rs"),
        ("app/launch.rs", "app/boot.rs"),
        ("lib.rs", "app/mod.rs"),
    ]
    .into_iter()
    .map(|(f, t)| (f.to_string(), BTreeSet::from([t.to_string()])))
    .collect();
    let bad = layering_problems(&fake);
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad.iter().any(|m| m.starts_with("fuzz.rs imports app/run.rs: nothing imports")), "{bad:?}");
    assert!(bad.iter().any(|m| m.starts_with("supervisor/ladder.rs imports app/stop.rs")), "{bad:?}");
}
