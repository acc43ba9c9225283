//! `console`: the terminal attached to the guest's serial console.

use anyhow::Result;

use super::{usage, Ctx};
use crate::machine::Vm;

/// `console`: the terminal attached to the guest's serial console.
pub fn console(ctx: &Ctx) -> Result<i32> {
    if ctx.json {
        return usage("this command streams the guest's console as text; --json does not apply");
    }
    let vm = Vm::running(&ctx.existing()?)?;
    crate::console::attach(&vm.inst.console(), &ctx.name)?;
    Ok(0)
}
