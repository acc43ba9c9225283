//! Checks of the Guix files in `guix/` and of the fake `guix` used by tests.
//!
//! Guix itself cannot run here, so these tests check what can be checked
//! without it:
//!
//! * every `guix/*.scm` file reads as well-formed Scheme, using Guile's
//!   reader extended the way Guix extends it (`#~`, `#$`, `#$@`, `#+`,
//!   `#+@`) — see `tests/support/guix-read-check.scm`;
//! * the reader check itself rejects broken files (so a pass means something);
//! * the files state the facts qbuf-qemu relies on (SSH key only, the share
//!   mounted over virtio-fs or 9p and allowed to be absent, the pvpanic
//!   driver, guest agent port, pinned channel...); where a comment could
//!   state the fact as well, the code itself is checked (`--forms` of the
//!   read check writes the forms, without comments);
//! * `tests/support/fake-guix/guix` keeps the contract other tests rely on.
//!
//! Needs `guile` (Debian package `guile-3.0`) and `bash`.  A missing `guile`
//! is a test failure, never a skip.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const PINNED_COMMIT: &str = "230aa373f315f247852ee07dff34146e9b480aec";
const INTRO_COMMIT: &str = "9edb3f66fd807b096b48283debdcddccfea34bad";
const INTRO_SIGNER: &str = "BBB0 2DDF 2CEA F6A8 0D1D  E643 A2A0 6DF2 A33A 54FA";

fn repo_root() -> PathBuf {
    match option_env!("CARGO_MANIFEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_dir().expect("current directory"),
    }
}

fn read_text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {}", path.display(), e))
}

/// The `guix/*.scm` files, sorted.
fn guix_scm_files() -> Vec<PathBuf> {
    let dir = repo_root().join("guix");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {}", dir.display(), e))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "scm"))
        .collect();
    files.sort();
    files
}

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "qbuf-guix-files-{}-{}-{}-{}",
            tag,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            nanos
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create {}: {}", path.display(), e));
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("cannot write {}: {}", path.display(), e));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn describe(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Run the Guix-aware read check on FILES.  Panics, loudly, when `guile` is
/// not installed: the check must never be skipped silently.
fn read_check(files: &[PathBuf]) -> Output {
    let root = repo_root();
    let script = root.join("tests/support/guix-read-check.scm");
    let result = Command::new("guile")
        .arg("--no-auto-compile")
        .arg("-s")
        .arg(&script)
        .args(files)
        .current_dir(&root)
        .env("GUILE_AUTO_COMPILE", "0")
        .output();
    match result {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "`guile` is not installed (not found on PATH), so guix/*.scm cannot be \
             checked.  Run the project's setup script, which installs the Debian \
             package guile-3.0 (by hand: apt-get install -y guile-3.0)."
        ),
        Err(e) => panic!("cannot run guile: {}", e),
    }
}

/// The forms of FILE (at any depth) whose head is one of HEADS, one per line
/// as Guile writes them: comments are gone, strings are quoted.
fn forms(file: &Path, heads: &[&str]) -> Vec<String> {
    let root = repo_root();
    let output = Command::new("guile")
        .arg("--no-auto-compile")
        .arg("-s")
        .arg(root.join("tests/support/guix-read-check.scm"))
        .arg("--forms")
        .arg(file)
        .args(heads)
        .current_dir(&root)
        .env("GUILE_AUTO_COMPILE", "0")
        .output()
        .unwrap_or_else(|e| panic!("cannot run guile (install guile-3.0): {}", e));
    assert!(output.status.success(), "--forms failed on {}\n{}", file.display(), describe(&output));
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect()
}

fn dev_vm() -> PathBuf {
    repo_root().join("guix/dev-vm.scm")
}

#[test]
fn every_guix_file_reads_as_scheme() {
    let files = guix_scm_files();
    let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for expected in ["channels.scm", "manifest.scm", "dev-vm.scm"].iter() {
        assert!(names.iter().any(|n| n == expected), "guix/{} is missing; found {:?}", expected, names);
    }
    let output = read_check(&files);
    assert!(output.status.success(), "guix/*.scm failed the read check\n{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("read OK: {} file(s)", files.len())), "unexpected report\n{}", describe(&output));
}

#[test]
fn read_check_rejects_an_unbalanced_form() {
    let tmp = TempDir::new("unbalanced");
    let bad = tmp.write("bad.scm", ";; a comment first\n(operating-system\n  (host-name \"qbuf-dev\")\n");
    let output = read_check(std::slice::from_ref(&bad));
    assert!(!output.status.success(), "an unbalanced form was accepted\n{}", describe(&output));
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    // File name and the position where the unterminated form starts.
    let expected = format!("{}:2:1:", bad.display());
    assert!(stderr.contains(&expected), "expected {:?} in stderr\n{}", expected, describe(&output));
}

#[test]
fn read_check_rejects_a_stray_closing_paren() {
    let tmp = TempDir::new("stray");
    let bad = tmp.write("stray.scm", "(list 1 2))\n(list 3)\n");
    let output = read_check(std::slice::from_ref(&bad));
    assert!(!output.status.success(), "a stray ')' was accepted\n{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("{}:1:", bad.display())), "{}", describe(&output));
}

#[test]
fn read_check_rejects_unreadable_syntax_and_empty_files() {
    let tmp = TempDir::new("unreadable");
    let unreadable = tmp.write("unreadable.scm", "(list #<procedure foo>)\n");
    let empty = tmp.write("empty.scm", ";; nothing but a comment\n");
    let good = tmp.write("good.scm", "(list 1)\n");
    let output = read_check(&[unreadable.clone(), good, empty.clone()]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Every bad file is reported, not just the first one.
    assert!(stderr.contains(&unreadable.display().to_string()), "{}", describe(&output));
    assert!(stderr.contains(&empty.display().to_string()), "{}", describe(&output));
}

#[test]
fn read_check_accepts_guix_gexp_syntax() {
    let tmp = TempDir::new("gexp");
    let file = tmp.write(
        "gexp.scm",
        "(define x\n  #~(begin\n      (mkdir #$output)\n      (list #$@inputs #+tool #+@natives)\n      \
         (symlink #$glibc:static \"lib\")))\n#:keyword\n#;(commented out)\n#| block |#\n#f\n",
    );
    let output = read_check(&[file]);
    assert!(output.status.success(), "gexp syntax was rejected\n{}", describe(&output));
}

#[test]
fn dev_vm_states_what_qbuf_qemu_relies_on() {
    let text = read_text(&repo_root().join("guix/dev-vm.scm"));
    let required = [
        // Login: SSH key only, key from qbuf-qemu.
        "(password-authentication? #f)",
        "(permit-root-login #f)",
        "QBUF_QEMU_SSH_PUBKEY",
        "(getenv \"QBUF_QEMU_SSH_PUBKEY\")",
        "openssh-service-type",
        "(name \"dev\")",
        "NOPASSWD: ALL",
        // The checkout at /mnt/qbuf, over virtio-fs or 9p (the code is
        // checked in dev_vm_mounts_the_share_over_virtiofs_or_9p), writable
        // by `dev` with the host user's uid.
        "(define %qbuf-share-tag \"qbuf\")",
        "(define %qbuf-share-mount-point \"/mnt/qbuf\")",
        "trans=virtio,version=9p2000.L,msize=262144",
        "(service qbuf-share-service-type)",
        "(getenv \"QBUF_QEMU_DEV_UID\")",
        "(uid %qbuf-dev-uid)",
        // Guest agent and power button.
        "qemu-guest-agent-service-type",
        "org.qemu.guest_agent.0",
        "elogind-service-type",
        "(handle-power-key 'poweroff)",
        // Disk, boot, console, network.
        "/dev/vda",
        "grub-bootloader",
        "\"Guix_image\"",
        "console=ttyS0,115200",
        "dhcpcd-service-type",
        "(host-name \"qbuf-dev\")",
        // Packages come from manifest.scm, found next to this file.
        "manifest.scm",
        "(current-filename)",
        "%base-packages",
        "%base-services",
    ];
    let missing: Vec<&str> = required.iter().cloned().filter(|s| !text.contains(s)).collect();
    assert!(missing.is_empty(), "guix/dev-vm.scm lacks {:?}", missing);
    assert!(!text.contains("(password-authentication? #t)"), "password authentication must stay off");
}

#[test]
fn dev_vm_mounts_the_share_over_virtiofs_or_9p() {
    let file = dev_vm();

    // Tag and mount point, and the 9p options qbuf-qemu itself uses.
    let defines = forms(&file, &["define"]);
    for expected in [
        "(define %qbuf-share-tag \"qbuf\")",
        "(define %qbuf-share-mount-point \"/mnt/qbuf\")",
        "(define %qbuf-share-9p-options \"trans=virtio,version=9p2000.L,msize=262144\")",
    ]
    .iter()
    {
        assert!(defines.iter().any(|f| f == expected), "guix/dev-vm.scm lacks {}", expected);
    }

    // One mount(2) of the tag at the mount point, tried over virtio-fs first
    // (filesystem type "virtiofs", no options), then over 9p.
    let mounts = forms(&file, &["mount", "mount-share"]);
    assert!(
        mounts.iter().any(|f| f == "(mount (ungexp %qbuf-share-tag) (ungexp %qbuf-share-mount-point) type 0 options)"),
        "the share service does not mount the tag at the mount point: {:?}",
        mounts
    );
    let calls: Vec<&String> = mounts.iter().filter(|f| f.starts_with("(mount-share \"")).collect();
    assert_eq!(
        calls,
        ["(mount-share \"virtiofs\" #f)", "(mount-share \"9p\" (ungexp %qbuf-share-9p-options))"],
        "virtiofs first, then 9p"
    );

    // No <file-system> for /mnt/qbuf: a second one would make Guix refuse
    // the system (two services named file-system-/mnt/qbuf), and even one
    // would mount over the share service's mount.
    let file_systems = forms(&file, &["file-system"]);
    assert!(!file_systems.is_empty(), "no file-system entries found at all");
    assert!(
        !file_systems.iter().any(|f| f.contains("(mount-point \"/mnt/qbuf\")")),
        "a <file-system> mounts /mnt/qbuf besides qbuf-share-service-type: {:?}",
        file_systems
    );

    // The service is in the system, and user processes wait for it.
    let services = forms(&file, &["service", "service-extension", "provision"]);
    for expected in [
        "(service qbuf-share-service-type)",
        "(service-extension user-processes-service-type (const (quote (qbuf-share))))",
        "(provision (quote (qbuf-share)))",
    ]
    .iter()
    {
        assert!(services.iter().any(|f| f == expected), "guix/dev-vm.scm lacks {}: {:?}", expected, services);
    }
}

#[test]
fn dev_vm_loads_the_share_and_pvpanic_modules_from_the_initrd() {
    let found = forms(&dev_vm(), &["initrd-modules"]);
    assert_eq!(found.len(), 1, "expected one initrd-modules field: {:?}", found);
    let field = &found[0];
    // virtiofs.ko, the 9p client over virtio, and pvpanic-mmio (the driver
    // of QEMU's ISA pvpanic device, ACPI QEMU0001); Guix's defaults kept.
    for module in ["virtiofs", "9p", "9pnet_virtio", "pvpanic-mmio"].iter() {
        let quoted = format!("\"{}\"", module);
        assert!(field.contains(&quoted), "initrd-modules lacks {}: {}", quoted, field);
    }
    assert!(field.contains("%base-initrd-modules"), "initrd-modules drops Guix's defaults: {}", field);
}

#[test]
fn read_check_writes_the_forms_asked_for() {
    let tmp = TempDir::new("forms");
    let file = tmp.write(
        "forms.scm",
        ";; (wanted \"in a comment\")\n(define x\n  (list (wanted 1) #~(wanted #$y)))\n(other (wanted \"two\"))\n",
    );
    assert_eq!(forms(&file, &["wanted"]), ["(wanted 1)", "(wanted (ungexp y))", "(wanted \"two\")"]);
    assert_eq!(forms(&file, &["nothing"]), Vec::<String>::new());
}

#[test]
fn channels_pin_an_authenticated_guix_commit() {
    let text = read_text(&repo_root().join("guix/channels.scm"));
    for needle in [
        "(name 'guix)",
        "(url \"https://git.guix.gnu.org/guix.git\")",
        "(make-channel-introduction",
        INTRO_COMMIT,
        INTRO_SIGNER,
    ]
    .iter()
    {
        assert!(text.contains(needle), "guix/channels.scm lacks {:?}", needle);
    }
    // Exactly one pinned commit, 40 lowercase hex digits, inside (commit ...).
    let after = text.split("(commit").nth(1).expect("guix/channels.scm has no (commit ...) field");
    let commit: String =
        after.trim_start().trim_start_matches('"').chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    assert_eq!(commit.len(), 40, "pinned commit {:?} is not a full hash", commit);
    assert!(commit.chars().all(|c| !c.is_ascii_uppercase()));
    assert_eq!(commit, PINNED_COMMIT, "update this test when moving the pin");
}

#[test]
fn manifest_lists_the_cpp_toolchain() {
    let text = read_text(&repo_root().join("guix/manifest.scm"));
    assert!(text.contains("(specifications->manifest"), "not a specifications manifest");
    for package in ["gcc-toolchain", "clang", "cmake", "ninja", "make", "pkg-config", "gdb", "git", "vim"].iter() {
        let quoted = format!("\"{}\"", package);
        assert!(text.contains(&quoted), "guix/manifest.scm lacks {}", quoted);
    }
}

// ---------------------------------------------------------------------------
// The fake `guix`.
// ---------------------------------------------------------------------------

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests qbuf-qemu";

fn fake_guix() -> PathBuf {
    repo_root().join("tests/support/fake-guix/guix")
}

/// A scratch copy of guix/ plus a store, so builds never touch the checkout.
struct FakeEnv {
    tmp: TempDir,
}

impl FakeEnv {
    fn new(tag: &str) -> FakeEnv {
        let tmp = TempDir::new(tag);
        let guix = tmp.path().join("guix");
        fs::create_dir_all(&guix).unwrap();
        for file in guix_scm_files() {
            fs::copy(&file, guix.join(file.file_name().unwrap())).unwrap();
        }
        FakeEnv { tmp }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    fn command(&self, key: Option<&str>) -> Command {
        let mut cmd = Command::new(fake_guix());
        cmd.current_dir(self.tmp.path())
            .env("FAKE_GUIX_STORE", self.store())
            .env("FAKE_GUIX_LOG", self.path("guix.log"))
            .env_remove("FAKE_GUIX_FAIL")
            .env_remove("FAKE_GUIX_DELAY")
            .env_remove("FAKE_GUIX_IMAGE");
        match key {
            Some(k) => cmd.env("QBUF_QEMU_SSH_PUBKEY", k),
            None => cmd.env_remove("QBUF_QEMU_SSH_PUBKEY"),
        };
        cmd
    }

    /// guix time-machine -C guix/channels.scm -- system image ... guix/dev-vm.scm
    fn build(&self, key: Option<&str>, root: &str, extra_env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(key);
        cmd.args(["time-machine", "-C", "guix/channels.scm", "--", "system", "image"])
            .args(["-t", "qcow2", "--image-size=20G"])
            .arg(format!("--root={}", root))
            .arg(self.path("guix/dev-vm.scm"));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.output().expect("run the fake guix")
    }

    fn log_lines(&self) -> usize {
        fs::read_to_string(self.path("guix.log")).map(|s| s.lines().count()).unwrap_or(0)
    }
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn fake_guix_builds_an_image_and_its_root_link() {
    let env = FakeEnv::new("fake-build");
    let image = env.tmp.write("disk.qcow2", "QFI\u{fb} pretend image");
    let output = env.build(Some(KEY), "vm.qcow2", &[("FAKE_GUIX_IMAGE", image.to_str().unwrap())]);
    assert!(output.status.success(), "{}", describe(&output));

    // stdout: exactly the store path.
    let stdout = stdout_of(&output);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must only hold the store path\n{}", describe(&output));
    let item = PathBuf::from(lines[0]);
    let store = fs::canonicalize(env.store()).unwrap();
    assert_eq!(item.parent().unwrap(), store.as_path());
    let name = item.file_name().unwrap().to_string_lossy().into_owned();
    let (hash, rest) = name.split_at(32);
    assert_eq!(rest, "-image.qcow2");
    assert!(hash.chars().all(|c| "0123456789abcdfghijklmnpqrsvwxyz".contains(c)), "hash {:?} is not nix-base32", hash);

    // Read-only store item with the image's content; root link points at it.
    let meta = fs::metadata(&item).unwrap();
    assert!(meta.permissions().readonly());
    assert_eq!(fs::read(&item).unwrap(), fs::read(&image).unwrap());
    assert_eq!(fs::read_link(env.path("vm.qcow2")).unwrap(), item);

    // Progress went to stderr; one call logged, with the key.
    assert!(stderr_of(&output).contains("building /gnu/store/"), "{}", describe(&output));
    let log = fs::read_to_string(env.path("guix.log")).unwrap();
    assert_eq!(log.lines().count(), 1);
    assert!(log.contains("system image") && log.contains(&format!("QBUF_QEMU_SSH_PUBKEY={}", KEY)));
}

#[test]
fn fake_guix_store_path_follows_the_inputs() {
    let env = FakeEnv::new("fake-hash");
    let first = env.build(Some(KEY), "a", &[]);
    let again = env.build(Some(KEY), "b", &[]);
    assert!(first.status.success() && again.status.success());
    assert_eq!(stdout_of(&first), stdout_of(&again), "same inputs must give the same path");
    assert!(
        !stderr_of(&again).contains("building "),
        "an existing store item must not be rebuilt\n{}",
        describe(&again)
    );

    let other_key = env.build(Some("ssh-ed25519 AAAAother other"), "c", &[]);
    assert!(other_key.status.success());
    assert_ne!(stdout_of(&first), stdout_of(&other_key), "the key is an input");

    let manifest = env.path("guix/manifest.scm");
    let edited = read_text(&manifest).replace("\"python\"", "\"python\" \"htop\"");
    fs::write(&manifest, edited).unwrap();
    let other_manifest = env.build(Some(KEY), "d", &[]);
    assert!(other_manifest.status.success());
    assert_ne!(stdout_of(&first), stdout_of(&other_manifest), "manifest.scm is an input");
    assert_eq!(env.log_lines(), 4);
}

#[test]
fn fake_guix_refuses_an_existing_root_like_guix() {
    let env = FakeEnv::new("fake-root");
    fs::write(env.path("vm.qcow2"), "in the way").unwrap();
    let output = env.build(Some(KEY), "vm.qcow2", &[]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let root = fs::canonicalize(env.tmp.path()).unwrap().join("vm.qcow2");
    let expected = format!("guix system: error: failed to create GC root `{}': File exists", root.display());
    assert!(stderr_of(&output).contains(&expected), "expected {:?}\n{}", expected, describe(&output));
    // Like 'guix system', the store path was printed before the GC root failed.
    assert!(stdout_of(&output).trim_end().ends_with("-image.qcow2"));
    assert_eq!(read_text(&env.path("vm.qcow2")), "in the way");
}

#[test]
fn fake_guix_needs_the_ssh_key() {
    let env = FakeEnv::new("fake-key");
    for key in [None, Some(""), Some("  ")].iter() {
        let output = env.build(*key, "vm.qcow2", &[]);
        assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
        assert!(stdout_of(&output).is_empty(), "{}", describe(&output));
        assert!(
            stderr_of(&output).contains(
                "guix system: error: QBUF_QEMU_SSH_PUBKEY is not set: \
                 build the image with 'qbuf-qemu build'"
            ),
            "{}",
            describe(&output)
        );
        assert!(!env.path("vm.qcow2").exists());
    }
}

#[test]
fn fake_guix_can_simulate_a_failed_build() {
    let env = FakeEnv::new("fake-fail");
    let output = env.build(Some(KEY), "vm.qcow2", &[("FAKE_GUIX_FAIL", "build of image failed")]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(stdout_of(&output).is_empty());
    let stderr = stderr_of(&output);
    assert!(stderr.contains("building /gnu/store/"), "{}", describe(&output));
    assert!(stderr.trim_end().ends_with("guix system: error: build of image failed"), "{}", stderr);
    assert!(!env.path("vm.qcow2").exists());
    assert_eq!(env.log_lines(), 1);
}

#[test]
fn fake_guix_reports_missing_files_like_guix() {
    let env = FakeEnv::new("fake-missing");
    let mut cmd = env.command(Some(KEY));
    let output = cmd
        .args(["time-machine", "-C", "nowhere.scm", "--", "system", "image"])
        .args(["-t", "qcow2", "--root=vm", "guix/dev-vm.scm"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr_of(&output)
        .contains("guix time-machine: error: failed to load 'nowhere.scm': No such file or directory"));

    let mut cmd = env.command(Some(KEY));
    let output = cmd
        .args(["time-machine", "--channels=guix/channels.scm", "--", "system", "image"])
        .args(["--image-type=qcow2", "--root", "vm", "missing.scm"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr_of(&output).contains("guix system: error: failed to load 'missing.scm': No such file or directory"));
}

#[test]
fn fake_guix_answers_version_and_rejects_the_rest() {
    let env = FakeEnv::new("fake-misc");
    let version = env.command(None).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(stdout_of(&version).starts_with("guix (GNU Guix) "));

    let describe_out = env.command(None).args(["describe", "-f", "channels"]).output().unwrap();
    assert!(describe_out.status.success());
    assert!(stdout_of(&describe_out).contains(PINNED_COMMIT));

    let other = env.command(None).args(["build", "hello"]).output().unwrap();
    assert_eq!(other.status.code(), Some(1));
    assert!(stdout_of(&other).is_empty());
    assert!(stderr_of(&other).contains("guix: error: fake guix does not implement: build hello"));

    let unknown_option = env
        .command(Some(KEY))
        .args(["time-machine", "-C", "guix/channels.scm", "--", "system", "image"])
        .args(["-t", "qcow2", "--frobnicate", "--root=vm", "guix/dev-vm.scm"])
        .output()
        .unwrap();
    assert_eq!(unknown_option.status.code(), Some(1));
    assert!(stderr_of(&unknown_option).contains("guix system: error: --frobnicate: unrecognized option"));
}
