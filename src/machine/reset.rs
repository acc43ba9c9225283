//! A VM's resets as QEMU reports them: `RESET` events, subscribed to
//! *before* the guest is asked to reboot so the event cannot be missed,
//! and QMP `system_reset` for a guest that did not reboot itself.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::json;

use super::Vm;
use crate::supervisor::client;
use crate::timeouts::QMP_QUERY;

/// The `RESET` events of one VM from the moment of [`Resets::subscribe`].
pub struct Resets {
    vm: Vm,
    events: client::Events,
}

impl Resets {
    pub async fn subscribe(vm: &Vm) -> Result<Resets> {
        Ok(Resets { vm: vm.clone(), events: client::subscribe(&vm.inst.control()).await? })
    }

    /// The next `RESET` within `limit`: `None` when none came, an error
    /// when the VM stopped meanwhile.
    pub async fn next(&mut self, limit: Duration) -> Option<Result<()>> {
        let inst = &self.vm.inst;
        let reset = async {
            while let Some(ev) = self.events.next().await {
                if ev.event == "RESET" {
                    return Ok(());
                }
            }
            Err(anyhow!("instance '{}' stopped while rebooting (see '{}')", inst.name, inst.command("status")))
        };
        tokio::time::timeout(limit, reset).await.ok()
    }

    /// QMP `system_reset`, and its `RESET`.
    pub async fn force(&mut self) -> Result<()> {
        let sock = self.vm.inst.control();
        if let Err(e) = client::qmp(&sock, "system_reset", json!({}), QMP_QUERY).await? {
            bail!(
                "QEMU refused system_reset ({e}): the guest was not reset; '{}' stops the VM, 'launch' starts it again",
                self.vm.inst.command("powerdown")
            );
        }
        self.next(QMP_QUERY).await.unwrap_or(Ok(()))
    }
}
