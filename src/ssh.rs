//! SSH: the user's key (one per user, shared by all instances so one image
//! serves them all), the per-instance known_hosts that pins the guest's host
//! key, readiness (a login that works, not just a banner), and running
//! OpenSSH for the user.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::host::LOOPBACK;
use crate::instance::{private_dir, Instance, StateDir};
use crate::timeouts::SSH_CONNECT;

/// Creates the tool's ed25519 key once (private 0600) and returns its path.
pub fn ensure_user_key(state: &StateDir) -> Result<PathBuf> {
    let path = state.user_key();
    // Refuses an `ssh/` or a key someone else owns: their key would be
    // the one this user's VMs trust.
    private_dir(&state.ssh_dir())?;
    crate::instance::owner::check(&path, "SSH key")?;
    if path.exists() {
        return Ok(path);
    }
    let mut key = ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
        .context("cannot generate an SSH key")?;
    key.set_comment("qbuf-qemu");
    let pem = key.to_openssh(ssh_key::LineEnding::LF).context("cannot encode the SSH key")?;
    // Two first launches at once each make a key; the first to link its
    // file in place wins, and the other uses that one (never a mix of one's
    // private key and the other's .pub).
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(path),
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
    let public = key.public_key().to_openssh().context("cannot encode the public key")?;
    let pub_tmp = path.with_extension(format!("pub.tmp{}", std::process::id()));
    fs::write(&pub_tmp, format!("{public}\n"))?;
    fs::rename(&pub_tmp, path.with_extension("pub"))?;
    tracing::info!(path = %path.display(), "generated the qbuf-qemu SSH key");
    Ok(path)
}

/// The one-line public key for a private key file: its `.pub` sibling, or
/// derived from the private key when that is unencrypted OpenSSH format.
pub fn public_key_line(private: &Path) -> Result<String> {
    let sibling = PathBuf::from(format!("{}.pub", private.display()));
    if let Ok(s) = fs::read_to_string(&sibling) {
        if let Some(line) = s.lines().find(|l| !l.trim().is_empty()) {
            return Ok(line.trim().to_string());
        }
    }
    let text = fs::read_to_string(private).with_context(|| {
        format!("cannot read SSH key {}: give a readable private key with --ssh-key", private.display())
    })?;
    let key = ssh_key::PrivateKey::from_openssh(&text).with_context(|| {
        format!(
            "{} is not an OpenSSH private key, and {} does not exist: give the key's .pub beside it",
            private.display(),
            sibling.display()
        )
    })?;
    Ok(key.public_key().to_openssh()?.trim().to_string())
}

/// Checks that a private key file is usable by OpenSSH (which refuses keys
/// readable by others).
pub fn check_private_key(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).with_context(|| {
        format!(
            "SSH key {} does not exist: give an existing private key with --ssh-key, or leave --ssh-key out to use qbuf-qemu's own",
            path.display()
        )
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "SSH key {} is readable by other users and OpenSSH will refuse it: run 'chmod 600 {}'",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// SSH keepalives: a guest that has not answered for this many seconds
/// times [`SERVER_ALIVE_COUNT`] is given up.
pub const SERVER_ALIVE_INTERVAL: u32 = 5;
pub const SERVER_ALIVE_COUNT: u32 = 3;

/// Everything OpenSSH needs to reach one instance.
#[derive(Debug, Clone)]
pub struct Target {
    pub alias: String,
    pub port: u16,
    pub user: String,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// The directory of the shared connections' control sockets (one per
    /// guest user: a user changed on a running VM must not ride on the old
    /// user's connection); `None` when there is none yet (an instance that
    /// booted before it existed) or its path is too long for a socket.
    pub control: Option<PathBuf>,
}

/// What OpenSSH appends to a ControlPath while it sets the socket up
/// (`.` and 16 random characters).
const CONTROL_TEMP_SUFFIX: usize = 17;

impl Target {
    pub fn for_instance(inst: &Instance, port: u16, user: &str, key: &Path) -> Target {
        Target {
            alias: format!("qbuf-qemu-{}", inst.name),
            port,
            user: user.to_string(),
            key: key.to_path_buf(),
            known_hosts: inst.known_hosts(),
            control: Some(inst.ssh_mux_dir()).filter(|d| {
                // DIR/USER.sock plus OpenSSH's temporary suffix.
                let len = d.as_os_str().len() + 1 + user.len() + ".sock".len() + CONTROL_TEMP_SUFFIX;
                len <= crate::instance::paths::MAX_SOCKET_PATH && d.is_dir()
            }),
        }
    }

    /// Every OpenSSH setting the tool uses, as `ssh_config` keywords: one
    /// table, rendered as `ssh` flags ([`Target::options`]), as `scp` flags
    /// ([`Target::scp_command`]) and as a `Host` block
    /// ([`Target::config_lines`]), so `ssh`, `copy` and `ssh-config` cannot
    /// drift apart. The host key is pinned under an alias, so a changed port
    /// does not lose the pin; `accept-new` records it at first connect and
    /// refuses a different key afterwards. Values are as ssh reads them
    /// after unquoting (paths with `%` doubled, as ssh expands `%` tokens in
    /// them); each renderer quotes them once for its syntax.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("IdentityFile", ssh_path(&self.key)),
            ("Port", self.port.to_string()),
            ("IdentitiesOnly", "yes".into()),
            ("IdentityAgent", "none".into()),
            ("PasswordAuthentication", "no".into()),
            ("KbdInteractiveAuthentication", "no".into()),
            // Key only, and no Kerberos round trips: Debian's own
            // ssh_config turns GSSAPI on, and a guest whose sshd offers it
            // would have every login try it first.
            ("GSSAPIAuthentication", "no".into()),
            ("PreferredAuthentications", "publickey".into()),
            // The guest is untrusted: a user's `Host *` with `ForwardAgent
            // yes` would hand it their agent (`IdentityAgent none` only
            // keeps the agent out of our own authentication), and X11
            // forwarding their display. Settings given first win, so these
            // beat ~/.ssh/config; `qbuf-qemu ssh -- -A` still forwards the
            // agent (OpenSSH's -A and -X after the destination override any
            // -o). Forwards (-L, -R, -D) are left alone: the tool sets none
            // up over SSH, and a user's own still work.
            ("ForwardAgent", "no".into()),
            ("ForwardX11", "no".into()),
            ("StrictHostKeyChecking", "accept-new".into()),
            ("UserKnownHostsFile", ssh_path(&self.known_hosts)),
            ("GlobalKnownHostsFile", "/dev/null".into()),
            ("HostKeyAlias", self.alias.clone()),
            ("CheckHostIP", "no".into()),
            // A guest that died (a kernel panic, a frozen VM) ends the
            // session within 15 s instead of hanging it forever.
            ("ServerAliveInterval", SERVER_ALIVE_INTERVAL.to_string()),
            ("ServerAliveCountMax", SERVER_ALIVE_COUNT.to_string()),
            ("LogLevel", "ERROR".into()),
        ];
        // One key exchange per boot: the first login stays as a master in
        // the background (its stdio closed, so a caller reading its output
        // is not kept waiting) until the guest's connection ends, when
        // QEMU exits, the guest closes it or the keepalives above give up.
        // The socket is in the private instance dir.
        if let Some(c) = &self.control {
            v.push(("ControlMaster", "auto".into()));
            // %r: the remote user, expanded by OpenSSH.
            v.push(("ControlPath", format!("{}/%r.sock", ssh_path(c))));
            v.push(("ControlPersist", "yes".into()));
        }
        v
    }

    /// Options before the destination: `-i KEY -p PORT`, then `-o K=V`.
    pub fn options(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (k, val) in self.settings() {
            match k {
                "IdentityFile" => v.extend(["-i".to_string(), val]),
                "Port" => v.extend(["-p".to_string(), val]),
                _ => v.extend(["-o".to_string(), format!("{k}={}", config_value(&val))]),
            }
        }
        v
    }

    /// The `Host` block lines for `~/.ssh/config` (after `Host ALIAS`). A
    /// value with a control character is refused: ssh_config has no way to
    /// quote a newline, so one in a path (`--state-dir`, `--ssh-key`)
    /// would end the line and start a directive of its own (a
    /// `ProxyCommand`, run by every later `ssh` to this host).
    pub fn config_lines(&self) -> Result<Vec<(&'static str, String)>> {
        let mut v = vec![("HostName", LOOPBACK.to_string()), ("User", self.user.clone())];
        v.extend(self.settings());
        v.into_iter()
            .map(|(k, val)| match val.contains(char::is_control) {
                true => bail!(
                    "cannot write the SSH setting {k} {val:?} into an ssh config: it holds a control character \
                     (a newline there would start a setting of its own); {}",
                    config_fix(k)
                ),
                false => Ok((k, config_value(&val))),
            })
            .collect()
    }

    /// `scp -r` with the same settings (`-o` only: scp's `-p` is not the
    /// port). `sftp` says the scp speaks SFTP, where the remote path reaches
    /// no shell; the old protocol hands it to the guest's shell, so it is
    /// quoted then.
    pub fn scp_command(&self, sources: &[ScpPath], dest: &ScpPath, sftp: bool, quiet: bool) -> Vec<String> {
        let mut v = vec!["scp".to_string(), "-r".to_string()];
        if quiet {
            v.push("-q".into());
        }
        for (k, val) in self.settings() {
            v.extend(["-o".to_string(), format!("{k}={}", config_value(&val))]);
        }
        v.push("--".into());
        let spec = |p: &ScpPath| match p {
            ScpPath::Local(l) => l.clone(),
            ScpPath::Guest(g) if sftp => format!("{}:{g}", self.destination()),
            ScpPath::Guest(g) => format!("{}:{}", self.destination(), shell_words::quote(g)),
        };
        v.extend(sources.iter().map(spec));
        v.push(spec(dest));
        v
    }

    pub fn destination(&self) -> String {
        format!("{}@{LOOPBACK}", self.user)
    }

    /// argv for `ssh … DEST ARGS…`; ARGS are passed as given, like OpenSSH.
    pub fn command(&self, remote: &[String]) -> Vec<String> {
        let mut v = vec!["ssh".to_string()];
        v.extend(self.options());
        v.push(self.destination());
        v.extend(remote.iter().cloned());
        v
    }
}

/// One side of an `scp`: a host path, or a path in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScpPath {
    Local(String),
    Guest(String),
}

/// What to change when a setting cannot go into an ssh config
/// ([`Target::config_lines`]).
fn config_fix(keyword: &str) -> &'static str {
    match keyword {
        "IdentityFile" => {
            "give --ssh-key a key whose path has none (for qbuf-qemu's own key, use a --state-dir whose path has none)"
        }
        "User" => "give --ssh-user a user name without control characters",
        _ => "use a --state-dir whose path has no control characters (newlines, tabs, escapes)",
    }
}

/// A value as `ssh_config` (and `ssh -o`) reads it: one with blanks,
/// quotes or backslashes goes in double quotes, with `"` and `\` escaped
/// (OpenSSH's argv_split), or it would be split or mangled. Nothing quotes
/// a newline: [`Target::config_lines`] refuses values with control
/// characters (in an `ssh -o` argument a newline starts nothing).
pub fn config_value(v: &str) -> String {
    if v.is_empty() || v.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '#')) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v.to_string()
    }
}

/// A path for an ssh keyword that expands `%` tokens (`IdentityFile`,
/// `UserKnownHostsFile`): a literal `%` is written `%%`.
fn ssh_path(p: &std::path::Path) -> String {
    p.display().to_string().replace('%', "%%")
}

/// Whether this host's `scp` speaks SFTP by default (OpenSSH 9.0 and
/// later), from `ssh -V`; older ones use the old protocol.
pub fn scp_speaks_sftp() -> bool {
    let out = Command::new("ssh").arg("-V").stdin(Stdio::null()).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    openssh_major(&text).is_some_and(|v| v >= 9)
}

/// `OpenSSH_9.2p1 Debian-2, …` → 9.
fn openssh_major(version: &str) -> Option<u32> {
    version.trim().strip_prefix("OpenSSH_")?.split('.').next()?.parse().ok()
}

pub const HOST_KEY_CHANGED: &str = "REMOTE HOST IDENTIFICATION HAS CHANGED";

/// The explanation that replaces OpenSSH's warning banner.
pub fn host_key_mismatch_message(t: &Target, inst: &Instance) -> String {
    let instance = &inst.name;
    let destroy = inst.command("destroy");
    format!(
        "the guest's SSH host key differs from the one pinned for instance '{instance}' in {}.\n\
         If the guest's disk was recreated, that is expected: remove that file (or run '{destroy}' to start over).\n\
         Otherwise something else answers on port {}: do not connect.",
        t.known_hosts.display(),
        t.port
    )
}

/// Reads an SSH banner from a forwarded port. QEMU's user network accepts
/// the TCP connection before the guest listens, so only a banner counts.
pub fn banner(port: u16, timeout: Duration) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    let start = Instant::now();
    while start.elapsed() < timeout {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.contains(&b'\n') {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let line = String::from_utf8_lossy(&got).lines().next().unwrap_or("").to_string();
    line.starts_with("SSH-").then_some(line)
}

/// Result of one login attempt.
#[derive(Debug, PartialEq)]
pub enum Login {
    /// The login worked; the remote command's output.
    Ok(std::process::Output),
    HostKeyChanged,
    /// The guest's sshd answered and refused the key
    /// (`Permission denied (publickey)`): no slow boot, a missing key.
    KeyRefused(String),
    Failed(String),
}

/// argv for a non-interactive `ssh … DEST REMOTE` that never prompts.
fn batch(t: &Target, remote: &[String], connect_timeout: Duration) -> Vec<String> {
    let mut argv = t.command(remote);
    let extra = [
        "-o".to_string(),
        "BatchMode=yes".into(),
        "-o".into(),
        format!("ConnectTimeout={}", connect_timeout.as_secs().max(1)),
    ];
    argv.splice(1..1, extra);
    argv
}

/// `ssh … REMOTE` with the instance key: readiness means a login works,
/// REMOTE succeeding (`true`, or a command that always exits 0). OpenSSH
/// gives up connecting after `connect_timeout`; the whole login ends at
/// `limit` (an [`Overrun`] error), whatever the guest does.
pub fn try_login(t: &Target, remote: &str, connect_timeout: Duration, limit: &Limit) -> Result<Login> {
    Ok(judge_login(bounded::output(&batch(t, &[remote.into()], connect_timeout), limit)?))
}

/// What a login's ssh said about it.
fn judge_login(out: std::process::Output) -> Login {
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Login::Ok(out)
    } else if out.status.code() == Some(255)
        && out.stdout.is_empty()
        && (err.contains(HOST_KEY_CHANGED) || err.contains("Host key verification failed"))
    {
        // OpenSSH's own refusal ends with 255 before any remote output;
        // the guest's shell could print the words, not usually both.
        Login::HostKeyChanged
    } else {
        let last = last_said(&out.stderr);
        if last.contains("Permission denied (publickey") {
            Login::KeyRefused(last)
        } else {
            Login::Failed(last)
        }
    }
}

/// The last line ssh wrote on stderr, fit for the user's terminal: the
/// guest's own words (its sshd's, its shell's) may be in it, so its
/// terminal controls are removed, and it is cut at 500 characters.
pub fn last_said(stderr: &[u8]) -> String {
    let text = crate::logs::guest_text(stderr, usize::MAX);
    text.lines().last().unwrap_or("").trim().chars().take(500).collect()
}

/// What to do when `ssh` (or `scp`) cannot be run.
pub const SSH_MISSING: &str = "install OpenSSH's client (Debian: apt-get install openssh-client)";

/// Runs the shell command line `remote` in the guest, output captured (at
/// most [`bounded::OUTPUT_CAP`] of each stream), ended at `limit`.
pub fn capture(t: &Target, remote: &str, limit: &Limit) -> Result<std::process::Output> {
    bounded::output(&streaming_command(t, remote), limit)
}

/// argv of a non-interactive ssh running `remote` with the terminal's
/// streams (for `run`: COMMAND's output goes straight through).
pub fn streaming_command(t: &Target, remote: &str) -> Vec<String> {
    batch(t, &[remote.to_string()], SSH_CONNECT)
}

/// Runs OpenSSH for the user with the terminal attached; stderr is passed
/// through line by line so a host-key mismatch gets our explanation too.
pub fn run_interactive(t: &Target, inst: &Instance, remote: &[String]) -> Result<i32> {
    run_explained(&t.command(remote), t, inst)
}

/// Runs `argv` (ssh or scp to `t`) with the terminal attached and its
/// stderr passed through; a host-key mismatch gets our explanation after
/// OpenSSH's warning. Returns the program's exit status.
pub fn run_explained(argv: &[String], t: &Target, inst: &Instance) -> Result<i32> {
    tracing::info!("running {}", shell_words::join(argv));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stderr(Stdio::piped());
    // A SIGTERM to this process alone (a CI job's timeout) must not leave
    // an scp uploading, or an ssh running, with nobody to wait for it.
    end_with_this_process(&mut cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot run '{}': {SSH_MISSING}", argv[0]))?;
    let mismatch = pass_stderr(child.stderr.take().expect("piped"), false);
    let status = child.wait()?;
    if mismatch {
        eprintln!("qbuf-qemu: {}", host_key_mismatch_message(t, inst));
    }
    Ok(status.code().unwrap_or(255))
}

mod bounded;
pub use bounded::{end_with_this_process, pass_stderr, wait_then_forget, Limit, Overrun};

#[cfg(test)]
mod tests;
