//! Host ports forwarded into a running VM's user network (slirp).
//!
//! QMP has no command for user-network forwards; HMP's `hostfwd_add`,
//! `hostfwd_remove` and `info usernet` do it, reached through
//! `human-monitor-command`. HMP reports failure as text in a successful QMP
//! reply (`"Could not set up host forwarding rule …"`), so every reply is
//! judged here: `hostfwd_add` succeeds with an empty string only.

use anyhow::{bail, Result};

use super::Vm;
use crate::qemu::args::NETDEV_ID;
use crate::qemu::forward::Forward;
use crate::qemu::parse::live_forwards;

/// The forwards QEMU's user network has now.
pub fn forwards(vm: &Vm) -> Result<Vec<Forward>> {
    Ok(live_forwards(&vm.hmp("info usernet")?))
}

/// Adds `f`; `shown` is how the user's messages name it.
pub fn add(vm: &Vm, f: &Forward, shown: &str) -> Result<()> {
    let reply = vm.hmp(&format!("hostfwd_add {NETDEV_ID} {}", f.rule()))?;
    judge_add(reply.trim(), f, shown)
}

fn judge_add(reply: &str, f: &Forward, shown: &str) -> Result<()> {
    if reply.is_empty() {
        return Ok(());
    }
    let hint = if reply.starts_with("Could not set up") {
        format!(": host port {} on {} is probably in use; choose another", f.host_port, f.host_addr)
    } else {
        String::new()
    };
    bail!("QEMU refused the forward {shown}: {reply}{hint}")
}

/// Removes `f`, a forward QEMU has.
pub fn remove(vm: &Vm, f: &Forward, shown: &str) -> Result<()> {
    let reply = vm.hmp(&format!("hostfwd_remove {NETDEV_ID} {}", f.host_end()))?;
    if !reply.contains("removed") {
        bail!("QEMU did not remove the forward {shown}: {}", reply.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmp_text_is_judged_a_refusal_unless_empty() {
        let f = Forward { udp: false, host_addr: "127.0.0.1".into(), host_port: 8080, guest_port: 80 };
        assert!(judge_add("", &f, "8080").is_ok());
        let e = judge_add("Could not set up host forwarding rule 'tcp:127.0.0.1:8080-:80'", &f, "8080").unwrap_err();
        assert!(e.to_string().contains("probably in use"), "{e}");
        let e = judge_add("invalid host forwarding rule", &f, "8080").unwrap_err();
        assert!(!e.to_string().contains("probably in use"), "{e}");
    }
}
