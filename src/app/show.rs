//! `show`: the saved settings of an instance and where each came from (a
//! launch flag, a default, `--ssh-port auto`, the environment), with the
//! QEMU binary the next launch runs and the recorded devices.

use anyhow::{anyhow, Result};

use super::Ctx;
use crate::config::{Origin, Settings, ShareMode};
use crate::instance::read_json;
use crate::instance::records::{BootPlan, DevicesRecord, RunOrigin};
use crate::report::devices::describe;
use crate::report::show::{ShowReport, Shown, ShownOrigin};
use crate::report::status::RunMark;

fn shown(o: Option<Origin>) -> ShownOrigin {
    match o {
        Some(Origin::Flag) => ShownOrigin::Flag,
        Some(Origin::Default) => ShownOrigin::Default,
        Some(Origin::Checkout) => ShownOrigin::Checkout,
        Some(Origin::Auto) => ShownOrigin::Auto,
        None => ShownOrigin::Saved,
    }
}

/// `--share-type`, and what the last boot used (what `auto` chose).
fn share_type(inst: &crate::instance::Instance, s: &Settings) -> String {
    let plan: Option<BootPlan> = read_json(&inst.boot_plan()).ok().flatten();
    match plan.filter(|p| !p.spec.shares.is_empty()) {
        Some(p) => format!("{} (the last boot shared over {})", s.share_type.as_str(), p.spec.share_kind.as_str()),
        None => s.share_type.as_str().to_string(),
    }
}

/// How the instance boots: a run's from a snapshot resumes that snapshot
/// (its disk is an overlay on the snapshot's), whatever the inherited
/// settings' boot source says.
fn boot_row(inst: &crate::instance::Instance, s: &Settings) -> Result<Shown> {
    let origin: Option<RunOrigin> = read_json(&inst.run_origin())?;
    Ok(match origin.and_then(|o| o.from_snapshot) {
        Some(snap) => Shown {
            setting: "boot",
            value: format!("{snap} (resumed by run; its disk is an overlay on the snapshot's)"),
            origin: ShownOrigin::Run,
        },
        None => Shown { setting: "boot", value: s.source.describe(), origin: shown(s.origins.source) },
    })
}

pub fn show(ctx: &Ctx) -> Result<ShowReport> {
    let inst = ctx.existing()?;
    let s: Settings = read_json(&inst.settings())?
        .ok_or_else(|| anyhow!("instance '{}' has no saved settings yet: launch it first", ctx.name))?;
    let o = &s.origins;
    let row = |setting, value: String, origin| Shown { setting, value, origin };
    let share = match (&s.share, s.share_mode) {
        (Some(p), ShareMode::Rw) => format!("{} at /mnt/qbuf, read-write", p.display()),
        (Some(p), ShareMode::Ro) => format!("{} at /mnt/qbuf, read-only", p.display()),
        (None, _) => "none".into(),
    };
    let key = match &s.ssh_key {
        Some(k) => k.display().to_string(),
        None => format!("qbuf-qemu's own ({})", ctx.state.user_key().display()),
    };
    let mut settings = vec![
        row("memory", format!("{} MiB", s.memory_mib), shown(o.memory)),
        row("cpus", s.cpus.to_string(), shown(o.cpus)),
        row("ssh", format!("{}@127.0.0.1 port {}", s.ssh_user, s.ssh_port), shown(o.ssh_port)),
        row("ssh key", key, shown(o.ssh_key)),
        row("share", share, shown(o.share)),
        row("share type", share_type(&inst, &s), shown(o.share_type)),
        boot_row(&inst, &s)?,
        row("accel", format!("{:?}", s.accel).to_lowercase(), shown(o.accel)),
    ];
    if let Some(r) = read_json::<RunOrigin>(&inst.run_origin())? {
        settings.push(row("run", RunMark::of(&r).describe(), ShownOrigin::Run));
    }
    // The binaries a launch would use, found the way a launch finds them.
    let from_env = std::env::var_os("QBUF_QEMU_SYSTEM").is_some_and(|v| !v.is_empty());
    let origin = if from_env { ShownOrigin::Environment } else { ShownOrigin::Path };
    settings.push(match crate::qemu::binaries::qemu_binaries() {
        Ok(b) if from_env => row("qemu", format!("{} (QBUF_QEMU_SYSTEM)", b.system.display()), origin),
        Ok(b) => row("qemu", b.system.display().to_string(), origin),
        Err(e) => row("qemu", format!("not usable: {e:#}"), origin),
    });
    if let Some(f) = std::env::var_os("QBUF_QEMU_FIRMWARE").filter(|v| !v.is_empty()) {
        settings.push(row(
            "firmware",
            format!("{} (QBUF_QEMU_FIRMWARE)", f.to_string_lossy()),
            ShownOrigin::Environment,
        ));
    }
    let rec = DevicesRecord::load(&inst)?;
    let mut devices: Vec<Shown> = rec
        .disks
        .iter()
        .map(|d| row("disk", format!("{} {} ({})", d.id, d.path.display(), d.format.as_str()), ShownOrigin::Recorded))
        .collect();
    devices.extend(rec.shares.iter().map(|sh| {
        let mode = if sh.readonly { "read-only" } else { "read-write" };
        row("share", format!("{} {} ({mode})", sh.tag, sh.path.display()), ShownOrigin::Recorded)
    }));
    devices.extend(rec.forwards.iter().map(|f| row("forward", describe(f), ShownOrigin::Recorded)));
    Ok(ShowReport {
        name: ctx.name.clone(),
        settings_file: inst.settings(),
        settings,
        devices,
        change_hint: format!(
            "Change a setting with its flag, e.g. '{}' (applied at the next boot).",
            ctx.command("launch --memory 8G")
        ),
    })
}
