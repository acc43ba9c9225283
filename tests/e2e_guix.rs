//! The Guix step end to end, with a fake `guix` on PATH that behaves like the
//! real one and hands back the test guest's bootable qcow2: build → launch →
//! ssh → powerdown, the cache, changed inputs, failures.

mod support;

use std::path::PathBuf;

use serde_json::Value;
use support::*;

struct Guix {
    env: Env,
    log: PathBuf,
    guix_dir: PathBuf,
}

fn setup(test: &str) -> Guix {
    let env = Env::new(test);
    let store = env.dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let log = env.dir.join("guix.log");
    // A copy of guix/ the test may change.
    let guix_dir = env.dir.join("guix");
    std::fs::create_dir_all(&guix_dir).unwrap();
    for f in ["channels.scm", "manifest.scm", "dev-vm.scm"] {
        std::fs::copy(repo().join("guix").join(f), guix_dir.join(f)).unwrap();
    }
    let path = format!("{}:{}", repo().join("tests/support/fake-guix").display(), std::env::var("PATH").unwrap());
    let env = env
        .with_env("PATH", &path)
        .with_env("FAKE_GUIX_STORE", path_str(&store))
        .with_env("FAKE_GUIX_IMAGE", path_str(&guest().disk))
        .with_env("FAKE_GUIX_LOG", path_str(&log));
    Guix { env, log, guix_dir }
}

impl Guix {
    fn calls(&self) -> usize {
        std::fs::read_to_string(&self.log).map(|s| s.lines().count()).unwrap_or(0)
    }
    fn launch(&self, extra: &[&str]) -> (Value, Out) {
        self.env.json(&strs(&vm_args(&["--guix-dir", path_str(&self.guix_dir), "--no-share"], extra)))
    }
}

#[test]
fn launch_builds_the_image_once_boots_it_and_the_second_launch_runs_no_guix() {
    let g = setup("guixonce");
    let (v, out) = g.launch(&[]);
    out.ok();
    assert_eq!(g.calls(), 1);
    let logged = std::fs::read_to_string(&g.log).unwrap();
    assert!(logged.contains("time-machine -C") && logged.contains("system image -t qcow2"), "{logged}");
    assert!(logged.contains("QBUF_QEMU_SSH_PUBKEY=ssh-ed25519 "), "the key reaches the build: {logged}");
    assert!(out.stderr().contains("guix:"), "Guix's progress is shown: {}", out.stderr());
    g.env.ssh("dev", "true").ok();
    let (p, out) = g.env.json(&["powerdown"]);
    out.code_is(0);
    assert_eq!(p["shutdown_reason"], "guest-shutdown");

    let (v2, out) = g.env.json(&["launch", "--timeout", "120"]);
    out.ok();
    assert_eq!(g.calls(), 1, "a cache hit must not run guix");
    assert_ne!(v["pid"], v2["pid"]);
    let (b, out) = g.env.json(&["build", "--guix-dir", path_str(&g.guix_dir)]);
    out.ok();
    assert_eq!(b["cache_hit"], true);
    assert_eq!(g.calls(), 1);
    g.env.run(&["powerdown"]).code_is(0);

    // destroy drops the image's GC root when no instance needs it.
    let root = PathBuf::from(b["gc_root"].as_str().unwrap());
    assert!(std::fs::symlink_metadata(&root).is_ok());
    g.env.run(&["destroy", "--yes"]).code_is(0);
    assert!(std::fs::symlink_metadata(&root).is_err(), "GC root survives destroy");
    assert!(!root.parent().unwrap().exists(), "the image's cache entry (its channels copy too) goes with it");
}

#[test]
fn changed_inputs_keep_the_old_image_until_recreate() {
    let g = setup("guixchange");
    g.launch(&[]).1.ok();
    g.env.ssh("dev", "echo old > /data/state && sync").ok();
    g.env.run(&["powerdown"]).code_is(0);
    let manifest = g.guix_dir.join("manifest.scm");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, format!("{text}\n;; a new package would go here\n")).unwrap();

    let out = g.env.run(&["launch", "--timeout", "120"]);
    out.ok();
    assert_eq!(g.calls(), 1, "a changed guix/ does not rebuild behind an existing instance");
    assert!(out.stdout().contains("--recreate") && out.stdout().contains("changed"), "{}", out.text());
    assert_eq!(g.env.ssh("dev", "cat /data/state").stdout().trim(), "old");
    g.env.run(&["powerdown"]).code_is(0);

    let out = g.env.run(&["launch", "--recreate", "--timeout", "120"]);
    out.ok();
    assert_eq!(g.calls(), 2);
    assert!(out.stdout().contains("discarded the guest's disk"), "{}", out.text());
    g.env.ssh("dev", "test ! -e /data/state").ok();
    g.env.run(&["powerdown"]).code_is(0);
}

#[test]
fn a_failing_guix_shows_its_error_and_the_command_and_leaves_no_instance() {
    let g = setup("guixfail");
    let env = g.env.with_env("FAKE_GUIX_FAIL", "package 'clang' not found");
    let out = env.run(&["launch", "--guix-dir", path_str(&g.guix_dir), "--accel", "tcg", "--no-share"]);
    out.code_is(1);
    let err = out.stderr();
    assert!(err.contains("guix system: error: package 'clang' not found"), "{err}");
    assert!(err.contains("guix time-machine -C"), "{err}");
    assert!(!env.instance_dir("dev").exists(), "half-made instance left behind");
}

#[test]
fn missing_guix_is_a_clear_error() {
    let env = Env::new("guixmissing").with_env("PATH", "/usr/bin:/bin");
    let dir = repo().join("guix");
    let out = env.run(&["launch", "--guix-dir", path_str(&dir), "--accel", "tcg", "--no-share"]);
    out.code_is(1);
    assert!(out.stderr().contains("Guix is not installed"), "{}", out.text());
    assert!(out.stderr().contains("--image"), "{}", out.text());
    assert!(!env.instance_dir("dev").exists());
}

#[test]
fn a_stale_gc_root_link_is_replaced_not_fatal() {
    let g = setup("guixroot");
    // First build, then break the cache record so the next build reuses the key dir.
    let (b, out) = g.env.json(&["build", "--guix-dir", path_str(&g.guix_dir)]);
    out.ok();
    let root = PathBuf::from(b["gc_root"].as_str().unwrap());
    std::fs::remove_file(root.parent().unwrap().join("build.json")).unwrap();
    assert!(std::fs::symlink_metadata(&root).is_ok(), "the link is still there");
    let (b2, out) = g.env.json(&["build", "--guix-dir", path_str(&g.guix_dir)]);
    out.ok();
    assert_eq!(b2["cache_hit"], false);
    assert_eq!(g.calls(), 2);
    assert_eq!(b2["store_path"], b["store_path"]);
}

#[test]
fn a_guix_image_shares_over_the_pinned_channels_virtiofsd_when_they_have_one() {
    let Guix { env, log, guix_dir } = setup("guixvfsd");
    let share = env.dir.join("checkout");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("f"), "from the host\n").unwrap();
    let store = std::fs::canonicalize(env.dir.join("store")).unwrap();
    let host_daemon = which("virtiofsd").expect("virtiofsd is not on PATH: run tests/setup.sh");
    let mut env = env.with_env("FAKE_GUIX_VIRTIOFSD", path_str(&host_daemon));
    let args = vm_args(&["--guix-dir", path_str(&guix_dir), "--share", path_str(&share)], &[]);
    let daemon = |env: &Env| s(&env.json(&["status"]).0["shares"][0], "daemon_binary");
    let builds = || std::fs::read_to_string(&log).unwrap_or_default().matches("build virtiofsd").count();
    env.json(&strs(&args)).1.ok();
    assert!(daemon(&env).starts_with(path_str(&store)), "Guix's virtiofsd serves the share");
    assert_eq!(env.ssh("dev", "cat /mnt/qbuf/f").stdout(), "from the host\n");
    assert_eq!(builds(), 1);
    env.run(&["powerdown"]).code_is(0);
    env.json(&["launch", "--timeout", "120"]).1.ok();
    assert_eq!(builds(), 1, "asked once per channels file");
    env.run(&["powerdown"]).code_is(0);

    // Other channels, without the package. guix/ is in the checkout, which
    // the guest can write, and Guix runs a channels file as code: a plain
    // launch runs no Guix for it and keeps the image's channels' daemon.
    env.envs.retain(|(k, _)| k != "FAKE_GUIX_VIRTIOFSD");
    let mut channels = std::fs::read_to_string(guix_dir.join("channels.scm")).unwrap();
    channels.push_str("\n;; other channels\n");
    std::fs::write(guix_dir.join("channels.scm"), channels).unwrap();
    let calls = || std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    let before = calls();
    env.json(&["launch", "--timeout", "120"]).1.ok();
    assert_eq!(calls(), before, "a changed channels.scm runs no Guix at a plain launch");
    assert!(daemon(&env).starts_with(path_str(&store)), "the image's channels' daemon");
    env.run(&["powerdown"]).code_is(0);
    // Asked for (--recreate): the new image's channels have no virtiofsd,
    // so the host's serves, and that answer is remembered too.
    env.json(&["launch", "--recreate", "--timeout", "120"]).1.ok();
    assert_eq!(daemon(&env), path_str(&host_daemon));
    assert_eq!(builds(), 2);
    env.run(&["powerdown"]).code_is(0);
    env.json(&["launch", "--timeout", "120"]).1.ok();
    assert_eq!(builds(), 2, "the missing package is remembered");
    env.run(&["powerdown"]).code_is(0);
}
