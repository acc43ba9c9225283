//! `status`: one question to the supervisor, answered in one reply, or the
//! records of a stopped instance.

use anyhow::Result;

use super::{block_on, Ctx};
use crate::config::Settings;
use crate::instance::records::{RunOrigin, StopRecord};
use crate::instance::{read_json, Liveness};
use crate::report::status::{RunMark, State, Status};
use crate::supervisor::client;
use crate::timeouts::STATUS_ANSWER;

pub fn status(ctx: &Ctx) -> Result<Status> {
    let inst = ctx.existing()?;
    let settings: Option<Settings> = read_json(&inst.settings())?;
    let mut st = Status {
        name: ctx.name.clone(),
        state: State::Stopped,
        qemu_status: None,
        pid: None,
        ssh_port: settings.as_ref().map(|s| s.ssh_port),
        ssh_user: settings.as_ref().map(|s| s.ssh_user.clone()),
        uptime_seconds: None,
        accel: None,
        qemu_version: None,
        memory_mib: settings.as_ref().map(|s| s.memory_mib),
        cpus: settings.as_ref().map(|s| s.cpus),
        disks: vec![],
        shares: vec![],
        hotplug_ports: None,
        hotplug_ports_used: None,
        hotplug_ports_free: None,
        guest_agent: None,
        guest_panic: None,
        guest_boots: None,
        stopping_step: None,
        stop_reason: None,
        last_shutdown: None,
        exit: None,
        run: read_json::<RunOrigin>(&inst.run_origin())?.map(|o| RunMark::of(&o)),
        notes: vec![],
    };
    if let Some(r) = &st.run {
        st.notes.push(r.describe());
    }
    let live = Liveness::probe(&inst)?;
    if live.is_stopped() {
        return stopped(&inst, st);
    }
    match block_on(client::status(&inst.control(), STATUS_ANSWER)) {
        Ok(vm) => {
            let panicked = vm.panicked.is_some() && vm.ended.is_none();
            st.apply_vm(vm, crate::clock::now());
            running_notes(ctx, &mut st, panicked);
        }
        Err(e) => {
            // No supervisor answers, yet the lock is held: QEMU runs orphaned,
            // or another command is starting (or finishing with) the VM.
            match live.running().filter(|r| r.qemu.is_running()) {
                Some(r) => {
                    st.state = State::Unresponsive;
                    st.pid = Some(r.qemu.pid);
                    st.accel = Some(r.accel);
                    st.notes.push(format!(
                        "QEMU runs but its supervisor does not answer ({e}); '{}' still stops it",
                        ctx.command("powerdown")
                    ));
                }
                None if inst.stop_record().exists() && !inst.control().exists() => {
                    // QEMU is gone; its supervisor is exiting.
                    st.apply_record(read_json::<StopRecord>(&inst.stop_record())?);
                }
                None => {
                    st.state = State::Starting;
                    st.notes.push("another qbuf-qemu command holds the instance (starting or stopping)".into());
                }
            }
        }
    }
    Ok(st)
}

/// What a running instance's state asks the user to know: paused, or
/// its guest's kernel dead (QEMU's GUEST_PANICKED, or only its console).
fn running_notes(ctx: &Ctx, st: &mut Status, panicked: bool) {
    if st.state == State::Paused && !panicked {
        st.notes.push(format!(
            "the VM is paused (its CPUs are stopped; SSH does not answer): '{}' resumes it",
            ctx.command("resume")
        ));
    }
    if let State::Qemu(r) = &st.state {
        st.notes.push(format!(
            "QEMU's run state is '{r}', not 'running': the guest's CPUs are stopped and SSH does not answer; \
             QEMU's own words are in {}; '{}' tries to go on, '{}' stops the VM",
            ctx.instance().qemu_stderr().display(),
            ctx.command("resume"),
            ctx.command("powerdown")
        ));
    }
    if st.guest_panic.is_some() {
        st.notes.push(format!(
            "the guest's kernel panicked (its serial console says so; it has no pvpanic driver, so QEMU \
             still runs it): SSH will not answer; '{}' shows the panic, '{}' stops the VM at once",
            ctx.command("logs"),
            ctx.command("powerdown")
        ));
    }
    if panicked {
        st.notes.push(format!(
            "the guest kernel panicked; QEMU keeps the VM paused for inspection ('{}', '{}'); '{}' stops it",
            ctx.command("console"),
            ctx.command("qmp …"),
            ctx.command("powerdown")
        ));
    }
}

/// A stopped instance, as its records tell it.
fn stopped(inst: &crate::instance::Instance, mut st: Status) -> Result<Status> {
    if !inst.clean_stale().is_empty() {
        st.notes.push("removed stale runtime files left by a crash".into());
    }
    st.apply_record(read_json::<StopRecord>(&inst.stop_record())?);
    Ok(st)
}
