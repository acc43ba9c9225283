//! `qbuf-qemu console`: this terminal attached to the guest's serial console.
//!
//! QEMU serves the console on `console.sock` (a chardev socket server, one
//! client at a time) and keeps writing everything the guest prints to
//! serial.log through the chardev's logfile, attached or not. The terminal
//! goes raw while attached, so keys such as Ctrl-C reach the guest; Ctrl-]
//! detaches, as in telnet and virsh. The terminal is restored on every way
//! out, including errors and panics (a drop guard).
//!
//! [`sign`] reads one line of that log for what it says about the guest's
//! kernel: the supervisor watches for a panic that QEMU never hears of.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// Ctrl-]: detaches from the console.
pub const DETACH: u8 = 0x1d;

/// Milliseconds the console keeps printing after input ended (not a terminal).
const DRAIN_MS: u16 = 500;

/// Raw mode on standard input while attached; restores the saved settings
/// when dropped.
struct RawMode(Termios);

impl RawMode {
    fn enable() -> Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = tcgetattr(stdin.as_fd()).context("cannot read the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).context("cannot put the terminal in raw mode")?;
        Ok(Some(RawMode(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

/// Why the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Detached,
    /// Standard input ended (not a terminal) and the guest fell quiet.
    InputEnded,
    /// The console closed: QEMU is gone.
    VmGone,
}

/// What a line of the serial console says about the guest's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// "Kernel panic - not syncing": the guest is dead. A kernel without a
    /// pvpanic driver panics without QEMU knowing (no GUEST_PANICKED).
    KernelPanic,
    /// The kernel's banner ("Linux version …"), printed first at each boot
    /// (not under `quiet`: resets count boots then).
    KernelStart,
}

/// The kernel's own message at the start of `line`, after its optional
/// `[  12.345678] ` timestamp; only the kernel's shape counts, not the
/// words anywhere in a line a program printed.
pub fn sign(line: &str) -> Option<Sign> {
    let l = line.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    let msg = match l.strip_prefix('[') {
        Some(rest) => {
            let (stamp, msg) = rest.split_once(']')?;
            stamp.trim().parse::<f64>().ok()?;
            msg.trim_start()
        }
        None => l,
    };
    if msg.starts_with("Kernel panic - not syncing") {
        Some(Sign::KernelPanic)
    } else if msg.strip_prefix("Linux version ").is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit())) {
        Some(Sign::KernelStart)
    } else {
        None
    }
}

/// Attaches to the console socket `sock` of instance `name`.
pub fn attach(sock: &Path, name: &str) -> Result<End> {
    let mut conn =
        UnixStream::connect(sock).with_context(|| format!("cannot connect to the console {}", sock.display()))?;
    let end = {
        let _raw = RawMode::enable()?;
        eprint!("Connected to the serial console of '{}'. Detach with Ctrl-]. Press Enter for a prompt.\r\n", name);
        pump(&mut conn)?
    };
    match end {
        End::Detached => eprintln!("\nDetached from the console of '{}'; the VM keeps running.", name),
        End::InputEnded => eprintln!("\nInput ended; detached from the console of '{}'.", name),
        End::VmGone => eprintln!("\nThe console closed: instance '{}' stopped.", name),
    }
    Ok(end)
}

/// Copies the console to stdout and stdin to the console until Ctrl-], the
/// end of the VM, or the end of input.
fn pump(conn: &mut UnixStream) -> Result<End> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    let mut input_open = true;
    let ready = |f: &PollFd| {
        f.revents().is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR))
    };
    loop {
        let (from_vm, from_user) = {
            let mut fds = vec![PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
            if input_open {
                fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, if input_open { PollTimeout::NONE } else { PollTimeout::from(DRAIN_MS) }) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("poll"),
                Ok(0) => return Ok(End::InputEnded),
                Ok(_) => (ready(&fds[0]), input_open && ready(&fds[1])),
            }
        };
        if from_vm {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(End::VmGone);
            }
            out.write_all(&buf[..n])?;
            out.flush()?;
        }
        if from_user {
            // Unbuffered: std's Stdin buffers, and poll cannot see its buffer.
            let n = nix::unistd::read(stdin.as_raw_fd(), &mut buf)?;
            if n == 0 {
                input_open = false;
                continue;
            }
            if let Some(i) = buf[..n].iter().position(|b| *b == DETACH) {
                conn.write_all(&buf[..i])?;
                return Ok(End::Detached);
            }
            conn.write_all(&buf[..n])?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{sign, Sign};

    #[test]
    fn the_kernels_panic_and_banner_lines_are_told_apart_from_other_text() {
        assert_eq!(sign("[   23.906830] Kernel panic - not syncing: sysrq triggered crash\r"), Some(Sign::KernelPanic));
        assert_eq!(sign("Kernel panic - not syncing: VFS: Unable to mount root fs"), Some(Sign::KernelPanic));
        assert_eq!(
            sign("[    0.000000] Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org)"),
            Some(Sign::KernelStart)
        );
        // The panic's closing line, a program's output, a shell prompt.
        assert_eq!(sign("[   23.910287] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---"), None);
        assert_eq!(sign("qbuf-test# echo Kernel panic - not syncing"), None);
        assert_eq!(sign("[ not a stamp] Kernel panic - not syncing"), None);
        assert_eq!(sign("Linux version of the day"), None);
        assert_eq!(sign(""), None);
    }
}
