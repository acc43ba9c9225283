//! `ssh-config`: the instance's OpenSSH settings as a `Host` block, from
//! the same table `ssh` and `copy` use ([`crate::ssh::Target::settings`]).

use anyhow::{bail, Result};

use super::ssh::ssh_target;
use super::Ctx;
use crate::report::access::{SshConfig, SshHost};

/// `instance` (else `--name`), or every launched instance with `all`.
pub fn ssh_config(ctx: &Ctx, instance: Option<&str>, all: bool) -> Result<SshConfig> {
    let names = match (all, instance) {
        (true, _) => {
            let names: Vec<String> =
                ctx.state.instance_names().into_iter().filter(|n| ctx.state.instance(n).settings().is_file()).collect();
            if names.is_empty() {
                bail!("no instance has been launched yet: start one with '{}'", ctx.command("launch"));
            }
            names
        }
        (false, Some(n)) => vec![n.to_string()],
        (false, None) => vec![ctx.name.clone()],
    };
    let mut hosts = Vec::new();
    let mut skipped = Vec::new();
    for name in names {
        let one = Ctx { name: name.clone(), ..ctx.clone() };
        match ssh_target(&one).and_then(|(_, t)| Ok((t.config_lines()?, t))) {
            Ok((lines, t)) => {
                let options = lines.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                hosts.push(SshHost { name, host: t.alias.clone(), options });
            }
            // One damaged instance does not cost the others their blocks.
            Err(e) if all => {
                let why = format!("no block for instance '{name}': {e:#}");
                ctx.progress(&format!("note: {why}"));
                skipped.push(why);
            }
            Err(e) => return Err(e),
        }
    }
    if hosts.is_empty() && !skipped.is_empty() {
        bail!("{}", skipped.join("; "));
    }
    let rest = match (all, instance) {
        (true, _) => "ssh-config --all".to_string(),
        (false, Some(n)) => format!("ssh-config {n}"),
        (false, None) => "ssh-config".to_string(),
    };
    Ok(SshConfig { hosts, generated_by: ctx.command(&rest) })
}
