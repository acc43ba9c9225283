//! Small jobs done inside the guest over the instance's pinned SSH: the
//! shares (9p or virtio-fs) unmounted for a snapshot and mounted again
//! after a resume, and
//! the clock set after a resume. They need root: as another user they go
//! through `sudo -n` (the dev image gives `dev` passwordless sudo).

use anyhow::{bail, Result};

use crate::instance::records::GuestMount;
use crate::logs::guest_text;
use crate::qemu::args::ShareKind;
use crate::ssh::{self, Limit, Target};
use crate::timeouts::GUEST_JOB;

/// The exit status the wrapper of [`as_root`] gives when the guest has no
/// `sudo` for a user that is not root.
const NO_SUDO: i32 = 97;

/// Runs `script` as root in the guest and returns its stdout. A user that
/// cannot become root (no `sudo`, or one that wants a password) is told
/// apart from a script that failed: the fix is the user, not the script.
/// `step` names it if the guest takes longer than [`GUEST_JOB`].
fn as_root(t: &Target, script: &str, step: &str) -> Result<String> {
    judge_as_root(t, ssh::capture(t, &as_root_command(script), &Limit::within(step, GUEST_JOB))?)
}

/// Put before a root job: root's tools (`reboot`; `mount` on some systems)
/// live in sbin directories a user's PATH may lack (dropbear gives a user
/// `/usr/bin:/bin`), and a sudo without `secure_path` (Guix's, the test
/// guest's) keeps the user's PATH. Guix keeps them in its system profile.
const ROOT_PATH: &str =
    "PATH=\"$PATH:/run/current-system/profile/sbin:/usr/local/sbin:/usr/sbin:/sbin\"; export PATH; ";

/// `script` for `sh -c`, quoted, with root's PATH.
fn root_script(script: &str) -> String {
    shell_words::quote(&format!("{ROOT_PATH}{script}")).into_owned()
}

/// The remote command line that runs `script` through `sudo -n`, with
/// root's PATH.
pub fn sudo_command(script: &str) -> String {
    format!("sudo -n sh -c {}", root_script(script))
}

/// The remote command line that runs `script` as root.
fn as_root_command(script: &str) -> String {
    format!(
        "if [ \"$(id -u)\" = 0 ]; then sh -c {0}; elif command -v sudo >/dev/null 2>&1; then {1}; \
         else exit {NO_SUDO}; fi",
        root_script(script),
        sudo_command(script)
    )
}

/// The stdout of an [`as_root_command`] that worked, or why it did not.
fn judge_as_root(t: &Target, out: std::process::Output) -> Result<String> {
    let stderr = guest_text(&out.stderr, 2000);
    let no_root = |why: String| anyhow::Error::new(NoRoot { user: t.user.clone(), why });
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Some(NO_SUDO) => Err(no_root("the guest has no sudo".into())),
        _ if stderr.contains("sudo:") && stderr.contains("password") => {
            Err(no_root(format!("sudo wants a password ({stderr})")))
        }
        _ => bail!("{stderr}"),
    }
}

/// The guest user cannot become root.
#[derive(Debug)]
struct NoRoot {
    user: String,
    why: String,
}

impl std::fmt::Display for NoRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the guest user '{0}' is not root and {1}: this needs root in the guest; relaunch with \
             '--ssh-user root', or give '{0}' passwordless sudo",
            self.user, self.why
        )
    }
}

impl std::error::Error for NoRoot {}

/// The shares mounted in the guest, from its /proc/mounts.
pub fn mounted_shares(t: &Target) -> Result<Vec<GuestMount>> {
    let out = ssh::capture(t, "cat /proc/mounts", &Limit::within("reading the guest's /proc/mounts", GUEST_JOB))?;
    Ok(parse_share_mounts(&String::from_utf8_lossy(&out.stdout)))
}

/// `TAG PATH 9p|virtiofs …` lines of /proc/mounts (paths are
/// octal-escaped there).
pub fn parse_share_mounts(mounts: &str) -> Vec<GuestMount> {
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let kind = match f.get(2) {
                Some(&"9p") => ShareKind::NineP,
                Some(&"virtiofs") => ShareKind::Virtiofs,
                _ => return None,
            };
            Some(GuestMount { tag: f[0].to_string(), path: f[1].replace("\\040", " "), kind })
        })
        // The guest wrote this: only tags the host could have given and
        // paths without control characters go on to messages and records.
        .filter(|m| {
            crate::qemu::value::validate_id(crate::qemu::value::IdKind::ShareTag, &m.tag).is_ok()
                || m.tag == crate::qemu::args::DEFAULT_SHARE_TAG
        })
        .filter(|m| !m.path.chars().any(char::is_control))
        .collect()
}

/// Unmounts the guest's 9p shares; says which when the guest cannot.
pub fn unmount_shares(t: &Target, mounts: &[GuestMount]) -> Result<()> {
    for m in mounts {
        if let Err(e) = as_root(t, &format!("umount {}", shell_words::quote(&m.path)), "the guest's umount") {
            if e.is::<NoRoot>() {
                return Err(e.context(format!(
                    "a snapshot unmounts the guest's shares first, and share '{}' at {} could not be",
                    m.tag, m.path
                )));
            }
            bail!(
                "the guest could not unmount share '{}' at {} ({e}); a VM is saved with its shares unmounted \
                 (QEMU refuses to save one with a 9p share mounted): stop what uses it (a shell cd'd there, a \
                 build) and try again",
                m.tag,
                m.path
            );
        }
    }
    Ok(())
}

/// The command that mounts share `m` as the guest mounts it at boot.
fn mount_command(m: &GuestMount) -> String {
    let how = match m.kind {
        ShareKind::NineP => "-t 9p -o trans=virtio,version=9p2000.L,msize=262144",
        ShareKind::Virtiofs => "-t virtiofs",
    };
    format!(
        "mkdir -p {path} && mount {how} {tag} {path}",
        path = shell_words::quote(&m.path),
        tag = shell_words::quote(&m.tag)
    )
}

/// Mounts the shares again, as the guest mounts its share at boot.
pub fn mount_shares(t: &Target, mounts: &[GuestMount]) -> Result<()> {
    for m in mounts {
        as_root(t, &mount_command(m), "the guest's mount")
            .map_err(|e| anyhow::anyhow!("could not mount share '{}' at {} again: {e}", m.tag, m.path))?;
    }
    Ok(())
}

/// What a resumed guest needs, run by the login that shows it is ready
/// (each login costs a key exchange, about 0.2 s under TCG, and
/// `run --from-snapshot` waits for it): the clock set to the host's (it
/// stands where it was saved) and the shares mounted again. Made at each
/// login attempt, so the time is the attempt's. It exits 0 like the
/// readiness check's `true` whatever becoming root did; that status is on
/// its last line of stdout.
pub fn after_resume_login(mounts: &[GuestMount]) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{}; echo \"{ROOT_EXIT} $?\"", as_root_command(&after_resume_script(now, mounts)))
}

/// The last line of [`after_resume_login`]'s stdout: `qbuf-root-exit N`.
const ROOT_EXIT: &str = "qbuf-root-exit";

/// What [`after_resume_login`]'s output says could not be done, as notes:
/// each step is tried whatever the others did, and the VM runs anyway.
pub fn after_resume_notes(t: &Target, mut out: std::process::Output, mounts: &[GuestMount]) -> Vec<String> {
    use std::os::unix::process::ExitStatusExt;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text.lines().rev().find_map(|l| l.strip_prefix(ROOT_EXIT)?.trim().parse::<i32>().ok()).unwrap_or(1);
    out.status = std::process::ExitStatus::from_raw((code & 0xff) << 8);
    match judge_as_root(t, out) {
        Ok(out) => failed_steps(&out)
            .into_iter()
            .map(|(step, why)| match step.checked_sub(1).and_then(|i| mounts.get(i)) {
                Some(m) => format!(
                    "could not mount share '{}' at {} again: {why}; mount it in the guest yourself",
                    m.tag, m.path
                ),
                None => format!("could not set the resumed guest's clock ({why}); it stands where it was saved"),
            })
            .collect(),
        Err(e) => vec![format!(
            "could not set the resumed guest's clock or mount its shares again ({e}); its clock stands where it \
             was saved, and its shares are to be mounted in the guest by hand"
        )],
    }
}

/// A script that runs each step and prints `qbuf-failed N WHY` for each
/// step that failed: N is 0 for the clock, then 1 for the first mount, 2
/// for the second, …
fn after_resume_script(now: u64, mounts: &[GuestMount]) -> String {
    let mut steps = vec![format!("date -s @{now} >/dev/null")];
    steps.extend(mounts.iter().map(mount_command));
    let mut script = String::from(
        "step() { n=$1; shift; out=$(sh -c \"$1\" 2>&1 >/dev/null) || printf 'qbuf-failed %s %s\\n' \"$n\" \"$(printf %s \"$out\" | tr '\\n' ' ')\"; }\n",
    );
    for (i, st) in steps.iter().enumerate() {
        script.push_str(&format!("step {i} {}\n", shell_words::quote(st)));
    }
    script
}

/// The steps [`after_resume_script`] said failed, with why.
fn failed_steps(out: &str) -> Vec<(usize, String)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("qbuf-failed ")?;
            let (n, why) = rest.split_once(' ').unwrap_or((rest, ""));
            let why = guest_text(why.as_bytes(), 300);
            Some((n.parse().ok()?, if why.is_empty() { "no reason given".to_string() } else { why }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resumed_guests_login_exit_status_is_read_from_its_last_line() {
        use std::os::unix::process::ExitStatusExt;
        let t = Target {
            alias: "a".into(),
            port: 1,
            user: "dev".into(),
            key: "/k".into(),
            known_hosts: "/h".into(),
            control: None,
        };
        let mounts = [GuestMount { tag: "qbuf".into(), path: "/mnt/qbuf".into(), kind: ShareKind::Virtiofs }];
        let out = |stdout: &str| std::process::Output {
            status: std::process::ExitStatus::from_raw(0),
            stdout: stdout.as_bytes().to_vec(),
            stderr: vec![],
        };
        let notes = after_resume_notes(&t, out("qbuf-failed 1 mount: \x1b[31mgone\nqbuf-root-exit 0\n"), &mounts);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("share 'qbuf'") && notes[0].contains("mount: gone"), "filtered: {notes:?}");
        let notes = after_resume_notes(&t, out(&format!("qbuf-root-exit {NO_SUDO}\n")), &mounts);
        assert!(notes[0].contains("has no sudo"), "{notes:?}");
        assert!(after_resume_notes(&t, out("qbuf-root-exit 0\n"), &mounts).is_empty());
        assert!(after_resume_login(&mounts).ends_with("; echo \"qbuf-root-exit $?\""));
    }

    #[test]
    fn root_jobs_find_roots_tools_when_the_users_path_lacks_sbin() {
        // As the test guest's dev runs them: dropbear's PATH for a user,
        // kept by a sudo without secure_path.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("sh -c {}", root_script("echo \"$PATH\"")))
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        let path = String::from_utf8_lossy(&out.stdout);
        assert!(path.starts_with("/usr/bin:/bin:") && path.contains(":/usr/sbin:/sbin"), "{path}");
        assert!(sudo_command("reboot").starts_with("sudo -n sh -c ") && sudo_command("reboot").ends_with("reboot'"));
        assert!(as_root_command("reboot").contains(&sudo_command("reboot")));
    }

    #[test]
    fn a_user_whom_sudo_refuses_is_told_the_fix_not_a_script_failure() {
        use std::os::unix::process::ExitStatusExt;
        let t = Target {
            alias: "a".into(),
            port: 1,
            user: "nosudo".into(),
            key: "/k".into(),
            known_hosts: "/h".into(),
            control: None,
        };
        let out = |code: i32, stderr: &str| std::process::Output {
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: vec![],
            stderr: stderr.as_bytes().to_vec(),
        };
        // What Debian's sudo 1.9.13 says to `sudo -n` from a user with no
        // NOPASSWD rule, in sudoers or not (the test guest's nosudo).
        let e = judge_as_root(&t, out(1, "sudo: a password is required\n")).unwrap_err();
        assert!(e.is::<NoRoot>(), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("'nosudo' is not root") && msg.contains("a password is required"), "{msg}");
        assert!(msg.contains("--ssh-user root") && msg.contains("give 'nosudo' passwordless sudo"), "{msg}");
        let e = judge_as_root(&t, out(NO_SUDO, "")).unwrap_err();
        assert!(e.is::<NoRoot>() && e.to_string().contains("has no sudo"), "{e}");
        // A script that failed is the script's failure, with what it said.
        let e = judge_as_root(&t, out(32, "umount: /mnt/qbuf: target is busy\n")).unwrap_err();
        assert!(!e.is::<NoRoot>() && e.to_string() == "umount: /mnt/qbuf: target is busy", "{e}");
    }

    #[test]
    fn the_after_resume_script_runs_every_step_and_names_the_failed_ones() {
        let mounts = vec![
            GuestMount { tag: "qbuf".into(), path: "/mnt/qbuf".into(), kind: ShareKind::Virtiofs },
            GuestMount { tag: "x".into(), path: "/nonexistent/$(touch /tmp/pwned)".into(), kind: ShareKind::NineP },
        ];
        let script = after_resume_script(1_700_000_000, &mounts);
        // Run by a real shell with stand-ins for mount and date: the first
        // mount and the clock succeed, the second mount fails.
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path();
        for (name, body) in [
            ("mount", "case \"$*\" in *qbuf*) exit 0;; *) echo \"mount: $4: special device x does not exist\" >&2; exit 32;; esac"),
            ("mkdir", "exit 0"),
            ("date", "[ \"$2\" = @1700000000 ] || exit 1"),
        ] {
            let p = bin.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        assert!(out.status.success());
        let failed = failed_steps(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, 2);
        assert!(failed[0].1.contains("does not exist"), "{failed:?}");
        assert!(!std::path::Path::new("/tmp/pwned").exists(), "a share path reached the shell unquoted");
    }

    #[test]
    fn only_9p_and_virtiofs_mounts_are_shares() {
        let m = "proc /proc proc rw 0 0\nqbuf /mnt/qbuf 9p rw,trans=virtio 0 0\nextra /mnt/my\\040dir 9p ro 0 0\n\
                 fs /mnt/f virtiofs rw 0 0\nfuse /x fuse rw 0 0\nb\x1b[2Jad /mnt/b 9p rw 0 0\nok /mnt/\x1b]0;t\x07 9p rw 0 0\n";
        assert_eq!(
            parse_share_mounts(m),
            vec![
                GuestMount { tag: "qbuf".into(), path: "/mnt/qbuf".into(), kind: ShareKind::NineP },
                GuestMount { tag: "extra".into(), path: "/mnt/my dir".into(), kind: ShareKind::NineP },
                GuestMount { tag: "fs".into(), path: "/mnt/f".into(), kind: ShareKind::Virtiofs }
            ]
        );
    }
}
