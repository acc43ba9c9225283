//! Small jobs done inside the guest over the instance's pinned SSH: the
//! shares (9p or virtio-fs) unmounted for a snapshot and mounted again
//! after a resume, and
//! the clock set after a resume. They need root: as another user they go
//! through `sudo -n` (the dev image gives `dev` passwordless sudo).

use anyhow::{bail, Result};

use crate::instance::records::GuestMount;
use crate::qemu::args::ShareKind;
use crate::ssh::{self, Target};

/// Runs `script` as root in the guest and returns its stdout.
fn as_root(t: &Target, script: &str) -> Result<String> {
    let wrapped =
        format!("if [ \"$(id -u)\" = 0 ]; then sh -c {0}; else sudo -n sh -c {0}; fi", shell_words::quote(script));
    let out = ssh::capture(t, &wrapped)?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The shares mounted in the guest, from its /proc/mounts.
pub fn mounted_shares(t: &Target) -> Result<Vec<GuestMount>> {
    let out = ssh::capture(t, "cat /proc/mounts")?;
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
        .collect()
}

/// Unmounts the guest's 9p shares; says which when the guest cannot.
pub fn unmount_shares(t: &Target, mounts: &[GuestMount]) -> Result<()> {
    for m in mounts {
        if let Err(e) = as_root(t, &format!("umount {}", shell_words::quote(&m.path))) {
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

/// Mounts the shares again, as the guest mounts its share at boot.
pub fn mount_shares(t: &Target, mounts: &[GuestMount]) -> Result<()> {
    for m in mounts {
        let how = match m.kind {
            ShareKind::NineP => "-t 9p -o trans=virtio,version=9p2000.L,msize=262144",
            ShareKind::Virtiofs => "-t virtiofs",
        };
        let script = format!(
            "mkdir -p {path} && mount {how} {tag} {path}",
            path = shell_words::quote(&m.path),
            tag = shell_words::quote(&m.tag)
        );
        as_root(t, &script)
            .map_err(|e| anyhow::anyhow!("could not mount share '{}' at {} again: {e}", m.tag, m.path))?;
    }
    Ok(())
}

/// Sets the guest's clock to the host's: a resumed guest's clock stands
/// where it was saved.
pub fn set_clock(t: &Target) -> Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    as_root(t, &format!("date -s @{now} >/dev/null")).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_9p_and_virtiofs_mounts_are_shares() {
        let m = "proc /proc proc rw 0 0\nqbuf /mnt/qbuf 9p rw,trans=virtio 0 0\nextra /mnt/my\\040dir 9p ro 0 0\n\
                 fs /mnt/f virtiofs rw 0 0\nfuse /x fuse rw 0 0\n";
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
