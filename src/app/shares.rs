//! `share add|remove|list`: extra shares, recorded in devices.json; they go
//! over virtio-fs or 9p as the boot's default share does (`--share-type`).
//!
//! Shares are added at boot. 9p shares cannot be hot-added: a `virtio-9p-pci` device needs an fsdev,
//! and fsdevs exist only from `-fsdev`/`-virtfs` at start-up. Neither QMP nor
//! HMP has `fsdev_add` (checked on QEMU 7.2 and 10.0: `device_add
//! virtio-9p-pci` answers "9pfs device couldn't find fsdev", HMP answers
//! "unknown command: 'fsdev_add'"). So `share add` records the share and it
//! appears at the next boot. There is no `--transient`: a share that is not
//! recorded would never appear.

use std::path::Path;

use anyhow::{bail, Result};

use super::Ctx;
use crate::config::Settings;
use crate::instance::lock::devices_lock;
use crate::instance::read_json;
use crate::instance::records::{BootPlan, DevicesRecord};
use crate::machine::Vm;
use crate::qemu::args::{Share, DEFAULT_SHARE_TAG};
use crate::qemu::value::{validate_id, IdKind};
use crate::report::devices::{ShareChanged, ShareEntry, ShareList};

fn changed(ctx: &Ctx, s: Share, added: bool, running: bool) -> ShareChanged {
    ShareChanged {
        name: ctx.name.clone(),
        tag: s.tag,
        path: s.path,
        readonly: s.readonly,
        added,
        running,
        // `;`, not `&&`: a powerdown that had to escalate exits 3, and the
        // VM is stopped all the same.
        relaunch_command: format!("{}; {}", ctx.command("powerdown"), ctx.command("launch")),
    }
}

pub fn add(ctx: &Ctx, dir: &Path, tag: &str, readonly: bool) -> Result<ShareChanged> {
    validate_id(IdKind::ShareTag, tag)?;
    if tag == DEFAULT_SHARE_TAG {
        bail!(
            "tag '{DEFAULT_SHARE_TAG}' is the default share's (set it with 'launch --share DIR'): choose another tag"
        );
    }
    let running = Vm::if_running(&ctx.existing()?)?.is_some();
    let inst = ctx.existing()?;
    let path = super::spec::must_exist(dir, "share directory")?;
    if !path.is_dir() {
        bail!("{} is not a directory: give a directory to share", path.display());
    }
    // Refused now, not at the next launch that would give it to QEMU.
    crate::qemu::value::path_value("share", &path)?;
    if let Some(w) = super::spec::wide_share_warning(&path, readonly, "share a project directory, or add '--ro'") {
        ctx.progress(&w);
    }
    let _lock = devices_lock(&inst)?;
    let mut rec = DevicesRecord::load(&inst)?;
    if rec.shares.iter().any(|s| s.tag == tag) {
        bail!("instance '{}' already has a share tagged '{tag}': remove it first, or choose another tag", ctx.name);
    }
    let share = Share { path, tag: tag.into(), readonly };
    rec.shares.push(share.clone());
    rec.save(&inst)?;
    Ok(changed(ctx, share, true, running))
}

pub fn remove(ctx: &Ctx, tag: &str) -> Result<ShareChanged> {
    if tag == DEFAULT_SHARE_TAG {
        bail!("'{DEFAULT_SHARE_TAG}' is the default share: stop sharing it with 'launch --no-share'");
    }
    let running = Vm::if_running(&ctx.existing()?)?.is_some();
    let inst = ctx.existing()?;
    let _lock = devices_lock(&inst)?;
    let mut rec = DevicesRecord::load(&inst)?;
    let Some(i) = rec.shares.iter().position(|s| s.tag == tag) else {
        bail!("instance '{}' has no share tagged '{tag}' ('{}' shows them)", ctx.name, ctx.command("share list"));
    };
    let s = rec.shares.remove(i);
    rec.save(&inst)?;
    Ok(changed(ctx, s, false, running))
}

pub fn list(ctx: &Ctx) -> Result<ShareList> {
    let running = Vm::if_running(&ctx.existing()?)?.is_some();
    let inst = ctx.existing()?;
    let settings: Option<Settings> = read_json(&inst.settings())?;
    let booted: Vec<Share> = match running {
        true => read_json::<BootPlan>(&inst.boot_plan())?.map(|p| p.spec.shares).unwrap_or_default(),
        false => vec![],
    };
    let entry = |s: &Share, default: bool| ShareEntry {
        tag: s.tag.clone(),
        path: s.path.clone(),
        readonly: s.readonly,
        default,
        live: booted.contains(s),
        removed: false,
    };
    let mut shares = Vec::new();
    if let Some(share) = settings.as_ref().and_then(super::spec::default_share) {
        shares.push(entry(&share, true));
    }
    for s in DevicesRecord::load(&inst)?.shares {
        shares.push(entry(&s, false));
    }
    for b in &booted {
        if !shares.iter().any(|s| s.tag == b.tag) {
            shares.push(ShareEntry { removed: true, live: true, ..entry(b, b.tag == DEFAULT_SHARE_TAG) });
        }
    }
    Ok(ShareList { name: ctx.name.clone(), running, shares })
}
