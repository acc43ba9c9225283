//! `forward add|remove|list`: host ports forwarded to the guest over QEMU's
//! user network (slirp, `machine::usernet`), recorded in devices.json for
//! the next launch. Forwards bind 127.0.0.1 unless an address is given
//! explicitly.

use anyhow::{bail, Result};

use super::Ctx;
use crate::cli::parse::{HostEnd, LOOPBACK};
use crate::config::Settings;
use crate::instance::lock::devices_lock;
use crate::instance::read_json;
use crate::instance::records::DevicesRecord;
use crate::machine::{usernet, Vm};
use crate::qemu::forward::Forward;
use crate::report::devices::{describe, ForwardChanged, ForwardEntry, ForwardList};

fn ssh_port(ctx: &Ctx) -> Result<Option<u16>> {
    Ok(read_json::<Settings>(&ctx.existing()?.settings())?.map(|s| s.ssh_port))
}

pub fn add(ctx: &Ctx, f: &Forward, transient: bool) -> Result<ForwardChanged> {
    let inst = ctx.existing()?;
    let vm = Vm::if_running(&inst)?;
    if vm.is_none() && transient {
        bail!("instance '{}' is not running, and a --transient forward is never recorded: launch it first", ctx.name);
    }
    if !f.udp && ssh_port(ctx)? == Some(f.host_port) {
        bail!("host port {} is the instance's SSH forward: choose another host port", f.host_port);
    }
    let _lock = devices_lock(&inst)?;
    let mut rec = DevicesRecord::load(&inst)?;
    let taken = |g: &Forward| g.udp == f.udp && g.host_port == f.host_port;
    if let Some(vm) = &vm {
        if let Some(g) = usernet::forwards(vm)?.iter().find(|g| taken(g)) {
            bail!("host port {} is already forwarded ({}): remove it first", f.host_port, describe(g));
        }
        usernet::add(vm, f, &describe(f))?;
    } else if let Some(g) = rec.forwards.iter().find(|g| taken(g)) {
        bail!("host port {} is already recorded for a forward ({}): remove it first", f.host_port, describe(g));
    }
    if !transient {
        rec.forwards.retain(|g| !taken(g));
        rec.forwards.push(f.clone());
        rec.save(&inst)?;
    }
    Ok(ForwardChanged {
        name: ctx.name.clone(),
        forward: f.clone(),
        added: true,
        live: vm.is_some(),
        recorded: !transient,
    })
}

pub fn remove(ctx: &Ctx, end: &HostEnd) -> Result<ForwardChanged> {
    let inst = ctx.existing()?;
    let vm = Vm::if_running(&inst)?;
    if end.udp != Some(true) && ssh_port(ctx)? == Some(end.port) {
        bail!("host port {} is the instance's SSH forward; change it with 'launch --ssh-port' instead", end.port);
    }
    let _lock = devices_lock(&inst)?;
    let mut rec = DevicesRecord::load(&inst)?;
    let live_now = match &vm {
        Some(vm) => usernet::forwards(vm)?,
        None => vec![],
    };
    let end = &narrow(ctx, end, live_now.iter().chain(rec.forwards.iter()))?;
    let recorded = rec.forwards.iter().find(|g| end.matches(g)).cloned();
    let live = live_now.into_iter().find(|g| end.matches(g));
    if let (Some(vm), Some(f)) = (&vm, &live) {
        usernet::remove(vm, f, &describe(f))?;
    }
    let Some(forward) = live.clone().or(recorded.clone()) else {
        bail!(
            "instance '{}' forwards no host port {} ('{}' shows them)",
            ctx.name,
            end.port,
            ctx.command("forward list")
        );
    };
    if recorded.is_some() {
        rec.forwards.retain(|g| !end.matches(g));
        rec.save(&inst)?;
    }
    Ok(ForwardChanged { name: ctx.name.clone(), forward, added: false, live: live.is_some(), recorded: false })
}

/// A port given without `/tcp` or `/udp` means whichever protocol forwards
/// it; when both do, the user must say which.
fn narrow<'a>(ctx: &Ctx, end: &HostEnd, known: impl Iterator<Item = &'a Forward>) -> Result<HostEnd> {
    if end.udp.is_some() {
        return Ok(end.clone());
    }
    let protos: Vec<bool> = known.filter(|f| end.matches(f)).map(|f| f.udp).collect();
    match (protos.contains(&false), protos.contains(&true)) {
        (true, true) => bail!(
            "host port {} is forwarded for both TCP and UDP: say which, e.g. '{}'",
            end.port,
            ctx.command(&format!("forward remove {}/udp", end.port))
        ),
        (false, true) => Ok(HostEnd { udp: Some(true), ..end.clone() }),
        _ => Ok(HostEnd { udp: Some(false), ..end.clone() }),
    }
}

pub fn list(ctx: &Ctx) -> Result<ForwardList> {
    let inst = ctx.existing()?;
    let vm = Vm::if_running(&inst)?;
    let rec = DevicesRecord::load(&inst)?;
    let ssh = ssh_port(ctx)?;
    let is_ssh = |f: &Forward| !f.udp && Some(f.host_port) == ssh && f.guest_port == 22;
    let mut forwards: Vec<ForwardEntry> = match &vm {
        Some(vm) => usernet::forwards(vm)?
            .into_iter()
            .map(|f| ForwardEntry { ssh: is_ssh(&f), recorded: rec.forwards.contains(&f), live: true, forward: f })
            .collect(),
        None => ssh
            .map(|p| Forward { udp: false, host_addr: LOOPBACK.into(), host_port: p, guest_port: 22 })
            .into_iter()
            .map(|forward| ForwardEntry { forward, ssh: true, recorded: false, live: false })
            .collect(),
    };
    let pending: Vec<Forward> =
        rec.forwards.into_iter().filter(|f| !forwards.iter().any(|e| e.forward == *f)).collect();
    forwards.extend(pending.into_iter().map(|forward| ForwardEntry {
        forward,
        ssh: false,
        recorded: true,
        live: false,
    }));
    forwards.sort_by_key(|e| (!e.ssh, e.forward.host_port));
    Ok(ForwardList { name: ctx.name.clone(), running: vm.is_some(), forwards })
}
