//! Command-line types (clap derive) and, in [`parse`], the bounded parsers
//! of their values; no behaviour here.

pub mod missing;
pub mod parse;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{AccelChoice, PortChoice, ShareMode, ShareType};
use crate::qemu::forward::Forward;
use crate::qemu::value::DiskFormat;
use parse::{CopyPath, HostEnd};

#[derive(Debug, Parser)]
#[command(name = "qbuf-qemu", version, about = "One reproducible Guix System dev VM for qbuf, driven over QMP")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Accepted before or after the subcommand; listed under their own heading.
#[derive(Debug, Args)]
pub struct Global {
    /// Where instances live [default: $QBUF_QEMU_STATE_DIR, else $XDG_STATE_HOME/qbuf-qemu, else ~/.local/state/qbuf-qemu]
    #[arg(long, global = true, value_name = "DIR", value_parser = parse::path(), help_heading = GLOBAL)]
    pub state_dir: Option<PathBuf>,
    /// Instance name: [a-z0-9][a-z0-9_-]{0,62} [default: dev]
    #[arg(long, global = true, value_name = "NAME", value_parser = parse::name, help_heading = GLOBAL)]
    pub name: Option<String>,
    /// Print exactly one JSON document on stdout; progress goes to stderr
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,
    /// More detail on stderr: -v what is run and why, -vv every request to the VM and its answer; RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = GLOBAL)]
    pub verbose: u8,
    /// Only errors on stderr (no progress)
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = GLOBAL)]
    pub quiet: bool,
}

/// The heading of the options every command takes.
pub const GLOBAL: &str = "Global options";

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
    /// Print an OpenSSH 'Host qbuf-qemu-NAME' block, so scp, rsync, sftp, git and editors reach the VM
    #[command(after_help = "Save it, then include it at the top of ~/.ssh/config (before any Host line):\n  \
qbuf-qemu ssh-config --all > ~/.ssh/qbuf-qemu.conf\n  \
Include qbuf-qemu.conf            (the first line of ~/.ssh/config)\n\
Then: scp FILE qbuf-qemu-dev:   rsync -a DIR qbuf-qemu-dev:   sftp qbuf-qemu-dev\n\
Run it again when an instance's SSH port or user changes.")]
    SshConfig {
        /// The instance [default: --name]
        #[arg(value_name = "NAME", value_parser = parse::name)]
        instance: Option<String>,
        /// A block for every instance that was launched
        #[arg(long, conflicts_with = "instance")]
        all: bool,
    },
    /// Copy files and directories (recursively) between the host and the VM over the pinned SSH
    #[command(after_help = "A guest path is NAME:PATH, or :PATH for the --name instance; a relative PATH is \
in the guest user's home. Either every SRC is in the guest and DEST on the host, or the other way round.\n\
Examples: qbuf-qemu copy notes.txt build/ :/tmp/\n          qbuf-qemu copy dev:/var/log/messages .")]
    Copy {
        /// SRC… DEST
        #[arg(value_name = "PATH", num_args = 2.., required = true, value_parser = parse::copy_path)]
        paths: Vec<CopyPath>,
    },
    /// State, pid, uptime, resources and, for a stopped VM, why it stopped
    Status,
    /// The saved settings (memory, CPUs, SSH, share, boot source, QEMU, recorded devices) and where each came from
    Show,
    /// Every instance: state, QEMU pid, SSH port, uptime, disk use and boot source
    #[command(visible_alias = "ls")]
    List,
    /// Power the VM off: ACPI power button (then the guest agent, if one answers), then QMP quit, then signals
    Powerdown(StopArgs),
    /// Pause the VM: its CPUs stop (QMP stop); memory and devices are kept. 'status' shows it paused
    Pause,
    /// Resume a paused VM (QMP cont)
    Resume,
    /// Reboot the guest: its own reboot (guest agent, else 'reboot' over SSH), else a reset (QMP system_reset)
    Reboot(RebootArgs),
    /// Power the VM off and remove everything qbuf-qemu created for it
    Destroy {
        #[command(flatten)]
        stop: StopArgs,
        /// Do not ask (required without a terminal)
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Disks of the running VM: hot-plugged virtio disks, recorded for the next launch
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Host ports forwarded to the guest (QEMU user network), on 127.0.0.1 unless an address is given
    #[command(subcommand)]
    Forward(ForwardCommand),
    /// Extra directory shares (virtio-fs or 9p, as the default share); they appear at the next boot
    #[command(subcommand)]
    Share(ShareCommand),
    /// Send any QMP command to the running VM and print QEMU's raw reply as JSON
    #[command(
        after_help = "Example: qbuf-qemu qmp query-status\n         qbuf-qemu qmp device_del '{\"id\": \"disk1\"}'\n\
A QMP error exits 1 with its class and description; arguments that are not a JSON object exit 2."
    )]
    Qmp {
        /// QMP command name, e.g. query-status
        command: String,
        /// Arguments as one JSON object
        #[arg(value_name = "JSON")]
        arguments: Option<String>,
        /// How long to wait for QEMU's answer (seconds, or e.g. 2m)
        #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse::timeout)]
        timeout: Duration,
    },
    /// Every QMP event of the instance's life (kept across relaunches until destroy)
    Events {
        /// Keep printing new events until the VM stops or Ctrl-C (with --json: one JSON object per line)
        #[arg(long, short)]
        follow: bool,
    },
    /// Attach this terminal to the guest's serial console; detach with Ctrl-]
    #[command(long_about = "Attach this terminal to the guest's serial console (one client at a time).\n\n\
The terminal is in raw mode while attached, so Ctrl-C and the like go to the guest. \
Detach with Ctrl-] (the VM keeps running). Everything the guest prints is also kept in the serial log \
('qbuf-qemu logs'), attached or not. Without a terminal, input is sent as is and the console detaches \
when input ends and the guest falls quiet.")]
    Console,
    /// Print the guest's serial console log (terminal control sequences removed)
    Logs(LogsArgs),
    /// Check QEMU, KVM, Guix, the SSH port, leftover state, permissions and free space, with fixes
    Doctor,
    /// Print shell completions for bash, zsh, fish, elvish or powershell
    #[command(after_help = "Install (then open a new shell):\n  \
bash: qbuf-qemu completions bash > ~/.local/share/bash-completion/completions/qbuf-qemu\n  \
zsh:  qbuf-qemu completions zsh > ~/.zfunc/_qbuf-qemu   (with fpath+=(~/.zfunc) before compinit in ~/.zshrc)\n  \
fish: qbuf-qemu completions fish > ~/.config/fish/completions/qbuf-qemu.fish")]
    Completions {
        /// The shell to complete for
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write a page per command with --dir
    #[command(after_help = "Install: qbuf-qemu man --dir ~/.local/share/man/man1, then: man qbuf-qemu")]
    Man {
        /// Write qbuf-qemu.1 and one page per command (qbuf-qemu-launch.1, …) into DIR
        #[arg(long, value_name = "DIR", value_parser = parse::path())]
        dir: Option<PathBuf>,
    },
    /// Boot a throwaway VM, run COMMAND in it, stop and remove it; exits with COMMAND's status
    #[command(
        after_help = "Exit status: COMMAND's; 124 when --timeout expired, 125 when the VM could not be started or reached \
(the VM is then stopped and removed), 128+N when run got signal N.\nExample: qbuf-qemu run --image disk.qcow2 -- make -j2 check"
    )]
    Run(Box<RunArgs>),
    /// Save, load, list and delete snapshots of the instance (memory and disk)
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Internal: the per-instance supervisor started by launch
    #[command(name = "__supervise", hide = true)]
    Supervise,
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Attach an image FILE, or a new one of --size, as a virtio disk (recorded unless --transient)
    Add(DiskAddArgs),
    /// Detach a disk once the guest released it (DEVICE_DELETED); its image is kept
    Remove {
        /// The disk's id (see 'disk list')
        #[arg(value_parser = parse::existing_disk_id)]
        id: String,
        /// How long to wait for the guest to release the disk (seconds, or e.g. 1m)
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse::timeout)]
        timeout: Duration,
    },
    /// The VM's disks as QEMU sees them, and the recorded ones
    List,
    /// Grow a disk to SIZE (never shrink): live while attached, else the image file; the boot disk is disk0-dev
    Resize {
        /// The disk's id (see 'disk list'); disk0-dev is the boot disk
        #[arg(value_parser = parse::existing_disk_id)]
        id: String,
        /// The new size, e.g. 40G (at most 64T)
        #[arg(value_name = "SIZE", value_parser = parse::disk_bytes)]
        size: u64,
    },
}

#[derive(Debug, Args)]
pub struct DiskAddArgs {
    /// An existing disk image; never deleted by qbuf-qemu (destroy included)
    #[arg(value_name = "FILE", required_unless_present = "size", conflicts_with = "size", value_parser = parse::path())]
    pub file: Option<PathBuf>,
    /// Create a new image of this size in the instance's disks dir, e.g. 20G (at most 64T)
    #[arg(long, value_name = "SIZE", value_parser = parse::disk_bytes)]
    pub size: Option<u64>,
    /// Device id [default: disk1, disk2, …]
    #[arg(long, value_name = "ID", value_parser = parse::disk_id)]
    pub id: Option<String>,
    /// The image's format; qcow2 is checked against the file's header, raw is never probed [default: qcow2]
    #[arg(long, value_enum)]
    pub format: Option<DiskFormat>,
    /// Attach to the running VM only; do not record it for the next launch
    #[arg(long)]
    pub transient: bool,
}

#[derive(Debug, Subcommand)]
pub enum ForwardCommand {
    /// Forward [ADDR:]HOST:GUEST[/udp], e.g. 8080:80 (recorded unless --transient)
    Add {
        /// The host address (default 127.0.0.1) and port, the guest port, and /udp for UDP (TCP otherwise)
        #[arg(value_name = "[ADDR:]HOST:GUEST[/udp]", value_parser = parse::parse_forward)]
        spec: Forward,
        /// Set up in the running VM only; do not record it for the next launch
        #[arg(long)]
        transient: bool,
    },
    /// Stop forwarding a host port: [ADDR:]HOST[/tcp|/udp]
    Remove {
        /// The host port (with its address and protocol when more than one forward uses it)
        #[arg(value_name = "[ADDR:]HOST[/tcp|/udp]", value_parser = parse::parse_host_end)]
        host: HostEnd,
    },
    /// Forwarded ports (from QEMU's 'info usernet' while running)
    List,
}

#[derive(Debug, Subcommand)]
pub enum ShareCommand {
    /// Record a directory shared as tag TAG from the next boot on
    Add {
        /// The host directory to share
        #[arg(value_name = "DIR", value_parser = parse::path())]
        dir: PathBuf,
        /// The mount tag the guest mounts it by (letters, digits, '-', '_')
        #[arg(value_name = "TAG", value_parser = parse::share_tag)]
        tag: String,
        /// Read-only for the guest
        #[arg(long)]
        ro: bool,
    },
    /// Stop sharing TAG from the next boot on
    Remove {
        /// The share's mount tag (see 'share list')
        #[arg(value_name = "TAG", value_parser = parse::share_tag)]
        tag: String,
    },
    /// The default share and the recorded ones
    List,
}

/// What a VM is made of: shared by `launch` and `run`.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Base disk image (qcow2 or raw); never written, an overlay keeps changes
    #[arg(long, value_name = "FILE", value_parser = parse::path())]
    pub image: Option<PathBuf>,
    /// Boot this kernel directly (with --initrd)
    #[arg(long, value_name = "FILE", value_parser = parse::path(), requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// The initial ramdisk for --kernel
    #[arg(long, value_name = "FILE", value_parser = parse::path(), requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel
    #[arg(long, value_name = "CMDLINE", allow_hyphen_values = true)]
    pub append: Option<String>,
    /// Guest memory, e.g. 4G or 2048M, at most the host's [default: 4G]
    #[arg(long, value_name = "SIZE", value_parser = parse::memory_mib)]
    pub memory: Option<u64>,
    /// Virtual CPUs, at most the host's [default: 2]
    #[arg(long, value_name = "N", value_parser = parse::cpus)]
    pub cpus: Option<u32>,
    /// Host directory shared at /mnt/qbuf (tag qbuf) [default: the git checkout you are in]
    #[arg(long, value_name = "DIR", value_parser = parse::path())]
    pub share: Option<PathBuf>,
    /// Do not share a directory
    #[arg(long, conflicts_with = "share")]
    pub no_share: bool,
    /// rw lets the guest write the checkout (including .git/hooks the host runs); ro prevents that [default: rw]
    #[arg(long, value_enum, value_name = "MODE")]
    pub share_mode: Option<ShareMode>,
    /// How /mnt/qbuf is shared: auto = virtio-fs when a virtiofsd is found (fast), else 9p [default: auto]
    #[arg(long, value_enum, value_name = "TYPE")]
    pub share_type: Option<ShareType>,
    /// auto = KVM when /dev/kvm is usable, else TCG with a warning [default: auto]
    #[arg(long, value_enum)]
    pub accel: Option<AccelChoice>,
    /// User to log in as [default: dev]
    #[arg(long, value_name = "USER", value_parser = parse::user)]
    pub ssh_user: Option<String>,
    /// Private key to use instead of qbuf-qemu's own
    #[arg(long, value_name = "FILE", value_parser = parse::path())]
    pub ssh_key: Option<PathBuf>,
    #[command(flatten)]
    pub guix: BuildArgs,
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Host port forwarded to the guest's SSH, on 127.0.0.1; 'auto' picks a free one once [default: 10022]
    #[arg(long, value_name = "PORT|auto")]
    pub ssh_port: Option<PortChoice>,
    /// How long to wait for SSH to accept a login (seconds, or e.g. 5m)
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse::wait_timeout)]
    pub timeout: Duration,
    /// Return once QEMU runs, without waiting for SSH
    #[arg(long)]
    pub no_wait: bool,
    /// Discard the guest's disk (guest-local state) and start from the base image
    #[arg(long, conflicts_with = "resume")]
    pub recreate: bool,
    /// Grow the boot disk to SIZE before it boots (never shrinks), e.g. 40G; the guest then grows its file system
    #[arg(long, value_name = "SIZE", value_parser = parse::disk_bytes, conflicts_with = "resume")]
    pub disk_size: Option<u64>,
    /// Start straight into snapshot NAME of this instance instead of booting (its disk becomes the snapshot's)
    #[arg(long, value_name = "NAME", value_parser = parse::snapshot_name)]
    pub resume: Option<String>,
}

/// `run`: a throwaway VM for one command.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Start from snapshot NAME of the instance --name names (default dev) instead of booting; it is left as it was
    #[arg(long, value_name = "NAME", value_parser = parse::snapshot_name)]
    pub from_snapshot: Option<String>,
    /// Where COMMAND runs in the guest [default: /mnt/qbuf with a share, else the login directory]
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// After COMMAND, copy GUEST_PATH (recursively) to HOST_PATH, before the VM stops; repeatable
    #[arg(long = "copy-out", value_name = "GUEST_PATH:HOST_PATH", value_parser = parse::copy_out)]
    pub copy_out: Vec<(String, PathBuf)>,
    /// The whole run's deadline; when it expires the VM is stopped and removed and run exits 124
    #[arg(long, value_name = "SECS", default_value = "3600", value_parser = parse::wait_timeout)]
    pub timeout: Duration,
    /// How long the boot (or the resume) may take to a working SSH login; past it the VM is stopped and removed and run exits 125
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse::wait_timeout)]
    pub boot_timeout: Duration,
    /// Leave the VM running afterwards (say how to reach and remove it)
    #[arg(long, conflicts_with = "keep_on_failure")]
    pub keep: bool,
    /// Leave the VM running when COMMAND fails or the run breaks
    #[arg(long)]
    pub keep_on_failure: bool,
    /// Also write the JSON summary to FILE (with --json it goes to stderr)
    #[arg(long, value_name = "FILE", value_parser = parse::path())]
    pub summary: Option<PathBuf>,
    /// The command and its arguments, run in the guest as given (each word quoted)
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save the running VM (memory and disk) as NAME; the share is unmounted in the guest meanwhile
    Save {
        /// The snapshot's name (letters, digits, '-', '_')
        #[arg(value_name = "NAME", value_parser = parse::snapshot_name)]
        snapshot: String,
    },
    /// Replace the instance's VM with snapshot NAME (a running VM is stopped first) and resume it
    Load {
        /// The snapshot to load (see 'snapshot list')
        #[arg(value_name = "NAME", value_parser = parse::snapshot_name)]
        snapshot: String,
    },
    /// The instance's snapshots
    List,
    /// Delete snapshot NAME
    Delete {
        /// The snapshot to delete
        #[arg(value_name = "NAME", value_parser = parse::snapshot_name)]
        snapshot: String,
    },
}

#[derive(Debug, Args, Clone)]
pub struct BuildArgs {
    /// Directory with channels.scm, manifest.scm, dev-vm.scm [default: guix/ of this checkout, else the built-in copy]
    #[arg(long, value_name = "DIR", value_parser = parse::path())]
    pub guix_dir: Option<PathBuf>,
    /// Size of the Guix image's disk [default: 20G]
    #[arg(long, value_name = "SIZE", value_parser = parse::image_size)]
    pub image_size: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct LogsArgs {
    /// Keep printing what the guest writes until the VM stops or Ctrl-C
    #[arg(long, short)]
    pub follow: bool,
    /// Only the last N lines
    #[arg(short = 'n', long = "lines", value_name = "N")]
    pub lines: Option<usize>,
    /// Only the current boot (or the last one, when the VM is stopped); the log keeps earlier boots too (its last 4 MiB)
    #[arg(long)]
    pub boot: bool,
}

#[derive(Debug, Args, Clone)]
pub struct RebootArgs {
    /// How long the guest gets to reboot by itself before it is reset (seconds, or e.g. 2m)
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse::timeout)]
    pub timeout: Duration,
    /// Reset at once (QMP system_reset), like the reset button: no clean shutdown
    #[arg(long)]
    pub force: bool,
    /// Return once the guest was reset, without waiting for SSH
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for SSH to accept a login again (seconds, or e.g. 5m)
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse::wait_timeout)]
    pub ssh_timeout: Duration,
}

#[derive(Debug, Args, Clone)]
pub struct StopArgs {
    /// How long the guest gets to power off by itself before escalating (seconds, or e.g. 2m): the ACPI button, and the guest agent's shutdown when an agent answers (each gets half then)
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse::timeout)]
    pub timeout: Duration,
    /// Skip the guest's own shutdown: start at QMP quit
    #[arg(long)]
    pub force: bool,
}
