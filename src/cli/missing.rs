//! What `--json` says when a command that has subcommands was given none
//! (`qbuf-qemu disk`): clap's answer to that is the whole help text, which
//! people read on stderr but a script reading `error` should not get.

use clap::CommandFactory;

use super::Cli;

/// One line for a command line whose last command (`disk`, `snapshot`, …)
/// needs a subcommand: the command and its subcommands' names. `args` are
/// the words after the program name.
pub fn missing_subcommand(args: &[String]) -> String {
    let mut cmd = Cli::command();
    cmd.build();
    let mut path = vec![cmd.get_name().to_string()];
    let mut here = &cmd;
    let mut words = args.iter().take_while(|a| *a != "--");
    while let Some(a) = words.next() {
        if let Some(long) = a.strip_prefix("--").filter(|l| !l.contains('=')) {
            // An option's value (`--name disk`) is not a subcommand.
            let takes_value = here.get_arguments().any(|o| o.get_long() == Some(long) && o.get_action().takes_values());
            if takes_value {
                words.next();
            }
        } else if let Some(sub) = here.find_subcommand(a) {
            path.push(sub.get_name().to_string());
            here = sub;
        }
    }
    let shown = here.get_subcommands().filter(|s| !s.is_hide_set());
    let names: Vec<&str> = shown.map(|s| s.get_name()).filter(|n| *n != "help").collect();
    format!(
        "'{}' needs a subcommand: one of {}; '{} --help' says what each does",
        path.join(" "),
        names.join(", "),
        path.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::missing_subcommand;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn names_the_command_and_its_subcommands() {
        let m = missing_subcommand(&words("--json --name x disk"));
        assert_eq!(
            m,
            "'qbuf-qemu disk' needs a subcommand: one of add, remove, list, resize; 'qbuf-qemu disk --help' says what each does"
        );
        assert!(missing_subcommand(&words("snapshot --json"))
            .starts_with("'qbuf-qemu snapshot' needs a subcommand: one of save, load"));
        assert!(!missing_subcommand(&[]).contains("supervise"), "hidden commands stay hidden");
        // An option's value that is also a command's name.
        assert!(missing_subcommand(&words("--name disk snapshot")).starts_with("'qbuf-qemu snapshot' needs"));
    }
}
