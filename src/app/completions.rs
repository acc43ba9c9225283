//! `completions SHELL` and `man`: generated from the clap definition
//! itself (clap_complete, clap_mangen), so they can never disagree with
//! the command line.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::usage;
use super::Ctx;
use crate::cli::Cli;
use crate::report::write_stdout;

pub fn completions(ctx: &Ctx, shell: clap_complete::Shell) -> Result<i32> {
    if ctx.json {
        return usage("completions prints a shell script; --json does not apply");
    }
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), BIN, &mut out);
    if shell == clap_complete::Shell::Bash {
        out = fix_bash(&String::from_utf8_lossy(&out)).into_bytes();
    }
    write_stdout(&out)?;
    Ok(0)
}

const BIN: &str = "qbuf-qemu";

/// clap_complete 4.6.12's bash script spells a hyphenated program's state
/// two ways: the loop over the words arrives at `qbuf__qemu__subcmd__disk`,
/// the case arms say `qbuf__subcmd__qemu__subcmd__disk`, so nothing after a
/// subcommand completes (clap-rs/clap#6421). The arms are respelled as the
/// loop spells them; once upstream agrees with itself this changes nothing.
fn fix_bash(script: &str) -> String {
    let arms = BIN.replace('-', "__subcmd__");
    let state = BIN.replace('-', "__");
    script.replace(&format!("{arms}__"), &format!("{state}__")).replace(&format!("{arms})"), &format!("{state})"))
}

/// The manual page on stdout, or one page per command in `dir`.
pub fn man(ctx: &Ctx, dir: Option<&Path>) -> Result<i32> {
    if ctx.json {
        return usage("man prints a manual page; --json does not apply");
    }
    let cmd = Cli::command();
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            clap_mangen::generate_to(cmd, d).with_context(|| format!("cannot write the pages to {}", d.display()))?;
            ctx.progress(&format!("wrote qbuf-qemu.1 and a page per command to {}", d.display()));
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            write_stdout(&out)?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_arms_are_spelled_as_the_loop_spells_them() {
        let broken = "case ${cmd} in\n  qbuf__subcmd__qemu)\n  qbuf__subcmd__qemu__subcmd__disk)\n";
        let fixed = fix_bash(broken);
        assert_eq!(fixed, "case ${cmd} in\n  qbuf__qemu)\n  qbuf__qemu__subcmd__disk)\n");
        assert_eq!(fix_bash(&fixed), fixed, "a correct script stays as it is");
    }
}
