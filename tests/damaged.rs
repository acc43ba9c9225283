//! Records and state broken on purpose, without a VM: a damaged file of one
//! instance or snapshot is shown as damaged, with the way out, and never
//! hides the healthy ones or leaves a dead end.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// A scratch state dir for one test.
struct State(PathBuf);

impl State {
    fn new(test: &str) -> State {
        let d = std::env::temp_dir().join(format!("qbuf-dmg-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        State(d)
    }

    /// A stopped instance as far as the tool can tell (a file it makes).
    fn instance(&self, name: &str) -> PathBuf {
        let inst = self.0.join("instances").join(name);
        fs::create_dir_all(&inst).unwrap();
        fs::write(inst.join("serial.log"), "booted once\n").unwrap();
        inst
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_qbuf-qemu"))
            .arg("--state-dir")
            .arg(&self.0)
            .args(args)
            .env_remove("QBUF_QEMU_STATE_DIR")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `--json` output: its exit code and its one document.
    fn json(&self, args: &[&str]) -> (i32, Value) {
        let o = self.run(&[&["--json"], args].concat());
        let v = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON document ({e}): {}", text(&o)));
        (o.status.code().unwrap_or(-1), v)
    }
}

impl Drop for State {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write(p: &Path, body: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, body).unwrap();
}

#[test]
fn snapshots_without_a_readable_record_are_listed_damaged_and_can_be_deleted() {
    let s = State::new("snap");
    let snaps = s.instance("x").join("snapshots");
    write(&snaps.join("half/state.bin"), &[0; 4096]);
    write(&snaps.join("bad/snapshot.json"), br#"{"name":"bad""#);

    let (code, v) = s.json(&["--name", "x", "snapshot", "list"]);
    assert_eq!(code, 0, "{v}");
    let list = v["snapshots"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    for snap in list {
        let name = snap["name"].as_str().unwrap();
        let why = snap["damaged"].as_str().unwrap_or_else(|| panic!("{name} is not marked damaged: {v}"));
        assert!(why.contains(&format!("snapshot delete {name}")), "{why}");
        assert!(!why.contains("destroy"), "{why}");
        for field in ["created_at", "qemu_version", "state_bytes", "seconds", "shares"] {
            assert!(snap.get(field).is_some(), "{field} missing: {snap}");
        }
    }
    let human = String::from_utf8_lossy(&s.run(&["--name", "x", "snapshot", "list"]).stdout).to_string();
    assert!(human.contains("half") && human.contains("bad") && human.matches("DAMAGED").count() == 2, "{human}");

    for name in ["half", "bad"] {
        let o = s.run(&["--name", "x", "snapshot", "load", name]);
        let said = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(said.contains(&format!("snapshot '{name}' is damaged")) && said.contains("snapshot delete"), "{said}");
    }
    for name in ["half", "bad"] {
        let (code, v) = s.json(&["--name", "x", "snapshot", "delete", name]);
        assert_eq!(code, 0, "{v}");
        assert_eq!(v["what"], "deleted", "{v}");
        assert!(!snaps.join(name).exists(), "{name} is still there");
    }
    let (_, v) = s.json(&["--name", "x", "snapshot", "list"]);
    assert_eq!(v["snapshots"], serde_json::json!([]), "{v}");
    let o = s.run(&["--name", "x", "snapshot", "delete", "half"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no snapshot 'half'"), "{}", text(&o));
}

/// settings.json of a stopped instance booted from an image, with its own
/// key (so nothing has to be generated).
fn settings(port: u16) -> String {
    serde_json::json!({
        "memory_mib": 512, "cpus": 1, "ssh_port": port, "share": null, "share_mode": "rw",
        "source": {"kind": "image", "path": "/nonexistent/base.qcow2"}, "accel": "tcg",
        "ssh_user": "dev", "ssh_key": "/nonexistent/id_ed25519"
    })
    .to_string()
}

#[test]
fn one_instance_with_a_damaged_record_does_not_hide_the_others() {
    let s = State::new("list");
    write(&s.instance("good").join("settings.json"), settings(10022).as_bytes());
    for (name, file) in [("a", "settings.json"), ("b", "stopped.json"), ("c", "run-origin.json")] {
        write(&s.instance(name).join(file), b"{\"half\":");
    }

    let (code, v) = s.json(&["list"]);
    assert_eq!(code, 0, "list could list, so it succeeds: {v}");
    let rows = v["instances"].as_array().unwrap();
    let row = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap_or_else(|| panic!("{n} is missing: {v}"));
    assert_eq!(row("good")["state"], "stopped", "{v}");
    assert_eq!(row("good")["damaged"], Value::Null, "{v}");
    for (name, file) in [("a", "settings.json"), ("b", "stopped.json"), ("c", "run-origin.json")] {
        assert_eq!(row(name)["state"], "damaged", "{v}");
        let why = row(name)["damaged"].as_str().unwrap();
        assert!(why.contains(&format!("{name}/{file} is damaged")), "{why}");
        assert!(why.contains(&format!("--name {name} destroy")), "{why}");
    }
    let o = s.run(&["list"]);
    let human = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(human.contains("good") && human.contains("a: ") && human.contains("settings.json is damaged"), "{human}");

    let o = s.run(&["ssh-config", "--all"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Host qbuf-qemu-good") && !out.contains("qbuf-qemu-a"), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no block for instance 'a'") && err.contains("settings.json is damaged"), "{err}");
}

#[test]
fn events_survive_a_byte_that_is_not_utf8() {
    let s = State::new("events");
    let log = s.instance("x").join("events.jsonl");
    write(&log, b"{\"event\":\"RESUME\",\"data\":{},\"timestamp\":1.5}\n\xff\xfe\n");
    let (code, v) = s.json(&["--name", "x", "events"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["events"][0]["event"], "RESUME", "{v}");
    assert_eq!(v["events"].as_array().unwrap().len(), 1, "{v}");
    let o = s.run(&["--name", "x", "events"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("skipped 1 damaged line"), "{}", text(&o));
}

/// A snapshot load cut short leaves the disk from before it set aside; the
/// current disk may hold work done since. A new load touches neither.
#[test]
fn a_load_after_a_cut_short_one_keeps_both_disks_and_says_how_to_choose() {
    let s = State::new("cutshort");
    let inst = s.instance("x");
    write(&inst.join("overlay.qcow2"), b"work done since");
    write(&inst.join("overlay.qcow2.kept"), b"from before the load");
    for args in [&["--name", "x", "snapshot", "load", "s1"][..], &["--name", "x", "launch", "--resume", "s1"]] {
        let o = s.run(args);
        let said = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(said.contains("was cut short") && said.contains("Nothing was changed"), "{said}");
        assert!(!said.contains("as it was before the load"), "{said}");
        assert_eq!(fs::read(inst.join("overlay.qcow2")).unwrap(), b"work done since");
        assert_eq!(fs::read(inst.join("overlay.qcow2.kept")).unwrap(), b"from before the load");
    }
}
