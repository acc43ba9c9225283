//! Building the Guix System image from `guix/` with the pinned channels, and
//! the cache that lets a second launch run no Guix at all.
//!
//! The image is a store item protected from `guix gc` by a GC root that Guix
//! itself registers (`--root=LINK`; a plain symlink would not be a root). One
//! root per image, under `STATE/images/KEY/`; instances record which image
//! they boot, and the root goes when the last of them is destroyed.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::instance::{read_json, write_json, Instance, StateDir};

/// The project's guix/ files, embedded so an installed binary works anywhere.
const EMBEDDED: &[(&str, &str)] = &[
    ("channels.scm", include_str!("../guix/channels.scm")),
    ("manifest.scm", include_str!("../guix/manifest.scm")),
    ("dev-vm.scm", include_str!("../guix/dev-vm.scm")),
];

/// `--guix-dir`, else `guix/` at the git top level of the current directory,
/// else the embedded copy written to the state dir.
pub fn resolve_dir(flag: Option<&Path>, state: &StateDir) -> Result<PathBuf> {
    if let Some(d) = flag {
        let d = std::fs::canonicalize(d).with_context(|| format!("--guix-dir {} does not exist", d.display()))?;
        for f in ["channels.scm", "dev-vm.scm"] {
            if !d.join(f).is_file() {
                bail!("--guix-dir {} has no {f}: point it at a directory like the project's guix/", d.display());
            }
        }
        return Ok(d);
    }
    if let Some(top) = std::env::current_dir().ok().and_then(|d| crate::host::git_toplevel(&d)) {
        let d = top.join("guix");
        if d.join("dev-vm.scm").is_file() && d.join("channels.scm").is_file() {
            return Ok(d);
        }
    }
    let d = state.root.join("guix-embedded");
    crate::instance::private_dir(&d)?;
    for (name, text) in EMBEDDED {
        let p = d.join(name);
        if std::fs::read_to_string(&p).ok().as_deref() != Some(*text) {
            std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        }
    }
    Ok(d)
}

/// FNV-1a, 64 bit: a stable content hash with no dependency (the cache key
/// must not change between builds of qbuf-qemu, unlike std's SipHash seed).
fn fnv1a(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The inputs that decide the image: every `*.scm` in the dir (name and
/// content), the image size and the authorized key.
pub fn cache_key(files: &[(String, Vec<u8>)], image_size: &str, pubkey: &str) -> String {
    let mut sorted: Vec<&(String, Vec<u8>)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = 0xcbf29ce484222325u64;
    let mut h2 = 0x84222325cbf29ce4u64;
    for (name, content) in sorted {
        for part in [name.as_bytes(), b"\0", content, b"\0"] {
            h = fnv1a(part, h);
            h2 = fnv1a(part, h2.rotate_left(7));
        }
    }
    for part in [image_size.as_bytes(), b"\0", pubkey.trim().as_bytes()] {
        h = fnv1a(part, h);
        h2 = fnv1a(part, h2.rotate_left(7));
    }
    format!("{h:016x}{h2:016x}")
}

fn scm_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) == Some("scm") {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            v.push((name, std::fs::read(&p)?));
        }
    }
    Ok(v)
}

/// What a build is for.
#[derive(Debug, Clone)]
pub struct Request {
    pub guix_dir: PathBuf,
    pub image_size: String,
    pub pubkey: String,
}

impl Request {
    pub fn key(&self) -> Result<String> {
        Ok(self.key_of(&scm_files(&self.guix_dir)?))
    }

    /// The key of `files`, this dir's `*.scm` as read once.
    fn key_of(&self, files: &[(String, Vec<u8>)]) -> String {
        let uid = dev_uid().map(|u| u.to_string()).unwrap_or_default();
        cache_key(files, &self.image_size, &format!("{}\0{uid}", self.pubkey.trim()))
    }
}

/// The uid `dev` gets in the image: the host user's, so the guest can write
/// the 9p-shared checkout (it sees the host's owners). System uids (root in
/// CI) are left to Guix.
pub fn dev_uid() -> Option<u32> {
    Some(nix::unistd::getuid().as_raw()).filter(|u| *u >= 1000)
}

/// images/KEY/build.json
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Built {
    pub key: String,
    pub store_path: PathBuf,
    pub gc_root: PathBuf,
    pub guix_dir: PathBuf,
    pub image_size: String,
    pub built_at: f64,
}

/// What `build` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BuildResult {
    pub store_path: PathBuf,
    pub gc_root: PathBuf,
    pub key: String,
    pub cache_hit: bool,
    pub seconds: f64,
}

fn entry_dir(state: &StateDir, key: &str) -> PathBuf {
    state.images_dir().join(key)
}

/// The cached image for `key` if its root still points at an existing image.
pub fn cached(state: &StateDir, key: &str) -> Result<Option<Built>> {
    let b: Option<Built> = read_json(&entry_dir(state, key).join("build.json"))?;
    Ok(b.filter(|b| {
        std::fs::canonicalize(&b.gc_root).map(|t| t == b.store_path).unwrap_or(false) && b.store_path.is_file()
    }))
}

/// The exact argv of the build, for running and for error messages.
pub fn command(req: &Request, root: &Path) -> Vec<String> {
    vec![
        "guix".into(),
        "time-machine".into(),
        "-C".into(),
        req.guix_dir.join("channels.scm").display().to_string(),
        "--".into(),
        "system".into(),
        "image".into(),
        "-t".into(),
        "qcow2".into(),
        format!("--image-size={}", req.image_size),
        format!("--root={}", root.display()),
        req.guix_dir.join("dev-vm.scm").display().to_string(),
    ]
}

/// Returns the image for `req`, building it only when the inputs changed or
/// the rooted image is gone.
/// `retry` is the command that runs the build again, for the error message.
pub fn ensure(state: &StateDir, req: &Request, quiet: bool, retry: &str) -> Result<BuildResult> {
    let start = Instant::now();
    let files = scm_files(&req.guix_dir)?;
    let key = req.key_of(&files);
    // The bytes the key was made of, kept for the pinned virtiofsd (the
    // checkout may change under a build: it is in the guest's share).
    let channels = files.iter().find(|(n, _)| n == "channels.scm").map(|(_, c)| c.clone()).unwrap_or_default();
    if let Some(b) = cached(state, &key)? {
        return Ok(BuildResult { store_path: b.store_path, gc_root: b.gc_root, key, cache_hit: true, seconds: 0.0 });
    }
    let guix = crate::host::find_in_path("guix").ok_or_else(|| {
        anyhow!(
            "Guix is not installed (no 'guix' on PATH), and the image for guix/ has not been built on this host. \
             Install Guix (https://guix.gnu.org/manual/en/html_node/Installation.html), or boot an image you have with 'launch --image FILE'"
        )
    })?;
    std::fs::create_dir_all(state.images_dir())?;
    let dir = entry_dir(state, &key);
    crate::instance::private_dir(&dir)?;
    let root = dir.join("image.gcroot");
    // Guix refuses an existing --root ("failed to create GC root … File exists").
    if std::fs::symlink_metadata(&root).is_ok() {
        std::fs::remove_file(&root).with_context(|| format!("cannot remove the stale GC root {}", root.display()))?;
        tracing::info!(root = %root.display(), "removed a stale GC root link before building");
    }
    let argv = command(req, &root);
    if !quiet {
        crate::progress::stage("building the Guix image (first time, or guix/ changed); this can take a while");
    }
    let (status, stdout, tail) = run_guix(&guix, &argv, req, quiet)?;
    let shown = shell_words::join(&argv);
    if !status.success() {
        let _ = std::fs::remove_file(&root);
        bail!(
            "the Guix build failed ({status}).\nGuix said:\n{}\ncommand (with QBUF_QEMU_SSH_PUBKEY set):\n{shown}\nFix the error in {} and run '{retry}' again",
            tail.join("\n"),
            req.guix_dir.display()
        );
    }
    let store_path = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('/'))
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("Guix succeeded but printed no store path on stdout; command:\n{shown}"))?;
    let image = if store_path.is_dir() { store_path.join("disk.qcow2") } else { store_path.clone() };
    if !image.is_file() {
        bail!("Guix printed {} but there is no image file there", store_path.display());
    }
    let built = Built {
        key: key.clone(),
        store_path: image.clone(),
        gc_root: root.clone(),
        guix_dir: req.guix_dir.clone(),
        image_size: req.image_size.clone(),
        built_at: crate::clock::now(),
    };
    write_json(&dir.join("build.json"), &built)?;
    crate::instance::write_atomic(&image_channels(state, &key), |f| Ok(std::io::Write::write_all(f, &channels)?))?;
    Ok(BuildResult { store_path: image, gc_root: root, key, cache_hit: false, seconds: start.elapsed().as_secs_f64() })
}

/// Runs Guix with its progress (stderr) passed through, shortened, unless
/// `quiet`; returns its status, its stdout (store paths) and the last lines
/// of its stderr for an error message.
fn run_guix(
    guix: &Path,
    argv: &[String],
    req: &Request,
    quiet: bool,
) -> Result<(std::process::ExitStatus, String, Vec<String>)> {
    let mut child = Command::new(guix)
        .args(&argv[1..])
        .env("QBUF_QEMU_SSH_PUBKEY", req.pubkey.trim())
        .env("QBUF_QEMU_DEV_UID", dev_uid().map(|u| u.to_string()).unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", guix.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
        s
    });
    let mut tail: VecDeque<String> = VecDeque::new();
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let Ok(line) = line else { break };
        if !quiet {
            // Guix's own progress, passed through above the status line.
            crate::progress::println(&format!("  guix: {}", compact(&line)));
        }
        tail.push_back(line);
        if tail.len() > 30 {
            tail.pop_front();
        }
    }
    let status = child.wait()?;
    let stdout = out_thread.join().unwrap_or_default();
    Ok((status, stdout, tail.into()))
}

/// What the pinned channels gave for `virtiofsd`
/// (STATE/images/virtiofsd-KEY/virtiofsd.json): its binary, rooted like an
/// image, or why there is none (asked once per channels file).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PinnedDaemon {
    binary: Option<PathBuf>,
    gc_root: Option<PathBuf>,
    missing: Option<String>,
}

/// The exact argv that builds the pinned channels' `virtiofsd`.
pub fn virtiofsd_command(channels: &Path, root: &Path) -> Vec<String> {
    let channels = channels.display().to_string();
    ["guix", "time-machine", "-C", &channels, "--", "build", "virtiofsd", &format!("--root={}", root.display())]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The copy of channels.scm an image was built with (images/KEY/), the
/// only channels file a plain `launch` evaluates: the checkout's `guix/`
/// is in the share, which the guest can write, and Guix runs a channels
/// file as code. The checkout's files are read only when the user asks
/// for a build (`build`, a new instance, `launch --recreate`).
pub fn image_channels(state: &StateDir, key: &str) -> PathBuf {
    entry_dir(state, key).join("channels.scm")
}

/// The `virtiofsd` of the pinned channels (`channels`: an image's
/// [`image_channels`]), so every host runs the same daemon; `Err` says why
/// not (no Guix, or the channels have no such package), and the caller
/// falls back to the host's. Built at most once per channels file and
/// protected from `guix gc` by its own root.
pub fn pinned_virtiofsd(state: &StateDir, channels_file: &Path) -> Result<PathBuf, String> {
    let channels = std::fs::read(channels_file).map_err(|e| format!("cannot read {}: {e}", channels_file.display()))?;
    let key = cache_key(&[("channels.scm".into(), channels)], "virtiofsd", "");
    let dir = state.images_dir().join(format!("virtiofsd-{key}"));
    let record = dir.join("virtiofsd.json");
    if let Ok(Some(p)) = read_json::<PinnedDaemon>(&record) {
        match (p.binary, p.gc_root, p.missing) {
            (Some(b), Some(r), _) if std::fs::canonicalize(&r).is_ok_and(|t| b.starts_with(t)) && b.is_file() => {
                return Ok(b)
            }
            (_, _, Some(why)) => return Err(why),
            _ => {}
        }
    }
    let guix = crate::host::find_in_path("guix").ok_or("no guix on PATH")?;
    crate::instance::private_dir(&dir).map_err(|e| format!("{e:#}"))?;
    let root = dir.join("virtiofsd.gcroot");
    let _ = std::fs::remove_file(&root);
    let argv = virtiofsd_command(channels_file, &root);
    let out = Command::new(&guix)
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", guix.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let item = stdout.lines().rev().map(str::trim).find(|l| l.starts_with('/')).map(PathBuf::from);
    let found = match item.map(|i| i.join("bin/virtiofsd")) {
        Some(b) if out.status.success() && b.is_file() => {
            PinnedDaemon { binary: Some(b), gc_root: Some(root), missing: None }
        }
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let said = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no virtiofsd in its output");
            PinnedDaemon {
                binary: None,
                gc_root: None,
                missing: Some(format!("the pinned channels: {}", compact(said))),
            }
        }
    };
    // Only a definite answer is remembered: a package the channels lack
    // ("unknown package"), or the daemon built. A failed build (network,
    // substitutes) is asked again at the next launch.
    let definite = found.binary.is_some() || found.missing.as_deref().is_some_and(|m| m.contains("unknown package"));
    if definite {
        let _ = write_json(&record, &found);
    }
    found.binary.ok_or_else(|| found.missing.unwrap_or_default())
}

/// One progress line, shortened: store hashes are noise to a reader.
pub fn compact(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find("/gnu/store/") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "/gnu/store/".len()..];
        let hash_len = after.chars().take_while(|c| c.is_ascii_alphanumeric()).count();
        if hash_len == 32 && after[32..].starts_with('-') {
            out.push_str("/gnu/store/…");
            rest = &after[32..];
        } else {
            out.push_str("/gnu/store/");
            rest = after;
        }
    }
    out.push_str(rest);
    let t = out.trim_end();
    if t.chars().count() > 160 {
        format!("{}…", t.chars().take(159).collect::<String>())
    } else {
        t.to_string()
    }
}

/// The image an instance boots (instance's guix-image.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceImage {
    pub key: String,
    pub store_path: PathBuf,
}

/// Decides which Guix image an instance boots: its recorded one while the
/// inputs are unchanged or unless `recreate`; the new one otherwise.
pub enum Choice {
    Current(InstanceImage),
    /// The inputs changed but the instance keeps its image until --recreate.
    Outdated {
        keep: InstanceImage,
    },
    Build,
}

pub fn choose(recorded: Option<InstanceImage>, new_key: &str, recreate: bool, still_rooted: bool) -> Choice {
    match recorded {
        Some(r) if r.key == new_key && still_rooted => Choice::Current(r),
        Some(r) if !recreate && still_rooted => Choice::Outdated { keep: r },
        _ => Choice::Build,
    }
}

/// Drops the GC root of the instance's image when no other instance uses it.
pub fn release_root(state: &StateDir, inst: &Instance) {
    let Ok(Some(mine)) = read_json::<InstanceImage>(&inst.guix_image()) else { return };
    let used_elsewhere = state.instance_names().iter().filter(|n| **n != inst.name).any(
        |n| matches!(read_json::<InstanceImage>(&state.instance(n).guix_image()), Ok(Some(o)) if o.key == mine.key),
    );
    if !used_elsewhere {
        let dir = entry_dir(state, &mine.key);
        let _ = std::fs::remove_file(dir.join("image.gcroot"));
        for f in ["build.json", "channels.scm"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let _ = std::fs::remove_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(a: &str) -> Vec<(String, Vec<u8>)> {
        vec![("dev-vm.scm".into(), a.as_bytes().to_vec()), ("channels.scm".into(), b"(list)".to_vec())]
    }

    #[test]
    fn cache_key_follows_every_input_and_nothing_else() {
        let k = cache_key(&files("(os)"), "20G", "ssh-ed25519 AAA");
        assert_eq!(k, cache_key(&files("(os)"), "20G", "ssh-ed25519 AAA\n"));
        let mut rev = files("(os)");
        rev.reverse();
        assert_eq!(k, cache_key(&rev, "20G", "ssh-ed25519 AAA"), "order of listing does not matter");
        assert_ne!(k, cache_key(&files("(os2)"), "20G", "ssh-ed25519 AAA"));
        assert_ne!(k, cache_key(&files("(os)"), "30G", "ssh-ed25519 AAA"));
        assert_ne!(k, cache_key(&files("(os)"), "20G", "ssh-ed25519 BBB"));
        assert_eq!(k.len(), 32);
    }

    #[test]
    fn the_pinned_virtiofsd_is_built_with_the_same_channels() {
        assert_eq!(
            shell_words::join(virtiofsd_command(
                Path::new("/s/images/k/channels.scm"),
                Path::new("/s/images/v/virtiofsd.gcroot")
            )),
            "guix time-machine -C /s/images/k/channels.scm -- build virtiofsd '--root=/s/images/v/virtiofsd.gcroot'"
        );
    }

    #[test]
    fn build_command_is_the_documented_one() {
        let req = Request { guix_dir: "/src/guix".into(), image_size: "20G".into(), pubkey: "k".into() };
        assert_eq!(
            command(&req, Path::new("/s/images/k/image.gcroot")).join(" "),
            "guix time-machine -C /src/guix/channels.scm -- system image -t qcow2 --image-size=20G --root=/s/images/k/image.gcroot /src/guix/dev-vm.scm"
        );
    }

    #[test]
    fn progress_lines_hide_store_hashes() {
        let l = "building /gnu/store/0123456789abcdfghijklmnpqrsvwxyz-image.qcow2.drv...";
        assert_eq!(compact(l), "building /gnu/store/…-image.qcow2.drv...");
        assert_eq!(compact("/gnu/store/short"), "/gnu/store/short");
    }

    #[test]
    fn an_outdated_image_is_kept_until_recreate() {
        let r = InstanceImage { key: "old".into(), store_path: "/gnu/store/x".into() };
        assert!(matches!(choose(Some(r.clone()), "old", false, true), Choice::Current(_)));
        assert!(matches!(choose(Some(r.clone()), "new", false, true), Choice::Outdated { .. }));
        assert!(matches!(choose(Some(r.clone()), "new", true, true), Choice::Build));
        assert!(matches!(choose(Some(r), "old", false, false), Choice::Build), "a collected image is rebuilt");
        assert!(matches!(choose(None, "k", false, false), Choice::Build));
    }
}
