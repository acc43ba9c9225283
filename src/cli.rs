//! Command-line types only (clap derive); no behaviour here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{AccelChoice, PortChoice, ShareMode};

#[derive(Debug, Parser)]
#[command(name = "qbuf-qemu", version, about = "One reproducible Guix System dev VM for qbuf, driven over QMP")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Accepted before or after the subcommand.
#[derive(Debug, Args)]
pub struct Global {
    /// Where instances live [default: $XDG_STATE_HOME/qbuf-qemu or ~/.local/state/qbuf-qemu]
    #[arg(long, global = true, env = "QBUF_QEMU_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Instance name: [a-z0-9][a-z0-9_-]{0,62}
    #[arg(long, global = true, default_value = "dev", value_name = "NAME")]
    pub name: String,
    /// Print exactly one JSON document on stdout; progress goes to stderr
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the VM (or say it runs) and wait until SSH accepts a login
    Launch(Box<LaunchArgs>),
    /// Build the Guix image from guix/ (or confirm the cached one is current)
    Build(BuildArgs),
    /// Run OpenSSH into the VM: qbuf-qemu ssh [-- COMMAND ARGS…]
    Ssh {
        /// Passed to ssh after the destination, as OpenSSH does
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// State, pid, uptime, resources and, for a stopped VM, why it stopped
    Status,
    /// Power the VM off: ACPI power button, then QMP quit, then signals
    Powerdown(StopArgs),
    /// Power the VM off and remove everything qbuf-qemu created for it
    Destroy {
        #[command(flatten)]
        stop: StopArgs,
        /// Do not ask (required without a terminal)
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Internal: the per-instance supervisor started by launch
    #[command(name = "__supervise", hide = true)]
    Supervise,
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Base disk image (qcow2 or raw); never written, an overlay keeps changes
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Boot this kernel directly (with --initrd)
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel
    #[arg(long, value_name = "CMDLINE", allow_hyphen_values = true)]
    pub append: Option<String>,
    /// Guest memory, e.g. 4G or 2048M [default: 4G]
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Virtual CPUs [default: 2]
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Host port forwarded to the guest's SSH, on 127.0.0.1; 'auto' picks a free one once [default: 10022]
    #[arg(long, value_name = "PORT|auto")]
    pub ssh_port: Option<PortChoice>,
    /// Host directory shared at /mnt/qbuf (9p tag qbuf) [default: the git checkout you are in]
    #[arg(long, value_name = "DIR")]
    pub share: Option<PathBuf>,
    /// Do not share a directory
    #[arg(long)]
    pub no_share: bool,
    /// rw lets the guest write the checkout (including .git/hooks the host runs); ro prevents that [default: rw]
    #[arg(long, value_enum, value_name = "MODE")]
    pub share_mode: Option<ShareMode>,
    /// auto = KVM when /dev/kvm is usable, else TCG with a warning [default: auto]
    #[arg(long, value_enum)]
    pub accel: Option<AccelChoice>,
    /// User to log in as [default: dev]
    #[arg(long, value_name = "USER")]
    pub ssh_user: Option<String>,
    /// Private key to use instead of qbuf-qemu's own
    #[arg(long, value_name = "FILE")]
    pub ssh_key: Option<PathBuf>,
    /// Seconds to wait for SSH to accept a login
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
    /// Return once QEMU runs, without waiting for SSH
    #[arg(long)]
    pub no_wait: bool,
    /// Discard the guest's disk (guest-local state) and start from the base image
    #[arg(long)]
    pub recreate: bool,
    #[command(flatten)]
    pub guix: BuildArgs,
}

#[derive(Debug, Args, Clone)]
pub struct BuildArgs {
    /// Directory with channels.scm, manifest.scm, dev-vm.scm [default: guix/ of this checkout, else the built-in copy]
    #[arg(long, value_name = "DIR")]
    pub guix_dir: Option<PathBuf>,
    /// Size of the Guix image's disk [default: 20G]
    #[arg(long, value_name = "SIZE")]
    pub image_size: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct StopArgs {
    /// Seconds the guest gets to power off by itself before escalating
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
    /// Skip the guest's own shutdown: start at QMP quit
    #[arg(long)]
    pub force: bool,
}
