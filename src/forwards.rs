//! Host ports forwarded to the guest over QEMU's user network (slirp).
//!
//! QMP has no command for user-network forwards; HMP's `hostfwd_add`,
//! `hostfwd_remove` and `info usernet` do it, reached through
//! `human-monitor-command`. HMP reports failure as text in a successful QMP
//! reply (`"Could not set up host forwarding rule …"`), so every reply is
//! judged here: `hostfwd_add` succeeds with an empty string only. Forwards
//! bind 127.0.0.1 unless an address is given explicitly.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::config::Settings;
use crate::devices::{edit_lock, Recorded};
use crate::instance::read_json;
use crate::lifecycle::Ctx;
use crate::qemu::{Forward, NETDEV_ID};
use crate::vm::Vm;

const LOOPBACK: &str = "127.0.0.1";

fn split_proto(s: &str) -> Result<(&str, bool), String> {
    match s.rsplit_once('/') {
        Some((rest, "udp")) => Ok((rest, true)),
        Some((rest, "tcp")) => Ok((rest, false)),
        Some((_, p)) => Err(format!("unknown protocol {p:?}: use /tcp (the default) or /udp")),
        None => Ok((s, false)),
    }
}

fn port(what: &str, s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{what} port {s:?} is not a port: give 1-65535")),
    }
}

fn addr(s: &str) -> Result<String, String> {
    s.parse::<Ipv4Addr>()
        .map(|a| a.to_string())
        .map_err(|_| format!("{s:?} is not an IPv4 address to listen on (e.g. 127.0.0.1 or 0.0.0.0)"))
}

/// `[ADDR:]HOST:GUEST[/udp]`, e.g. `8080:80`, `0.0.0.0:8080:80`, `5353:53/udp`.
pub fn parse_forward(s: &str) -> Result<Forward, String> {
    let (body, udp) = split_proto(s)?;
    let parts: Vec<&str> = body.split(':').collect();
    let (host_addr, host, guest) = match parts.as_slice() {
        [h, g] => (LOOPBACK.to_string(), *h, *g),
        [a, h, g] => (addr(a)?, *h, *g),
        _ => return Err(format!("{s:?} is not a forward: write [ADDR:]HOST_PORT:GUEST_PORT[/udp], e.g. 8080:80")),
    };
    Ok(Forward { udp, host_addr, host_port: port("host", host)?, guest_port: port("guest", guest)? })
}

/// What `forward remove` names: `[ADDR:]HOST[/udp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEnd {
    pub udp: bool,
    pub addr: Option<String>,
    pub port: u16,
}

impl HostEnd {
    fn matches(&self, f: &Forward) -> bool {
        f.udp == self.udp && f.host_port == self.port && self.addr.as_ref().is_none_or(|a| *a == f.host_addr)
    }
}

pub fn parse_host_end(s: &str) -> Result<HostEnd, String> {
    let (body, udp) = split_proto(s)?;
    match body.split(':').collect::<Vec<_>>().as_slice() {
        [p] => Ok(HostEnd { udp, addr: None, port: port("host", p)? }),
        [a, p] => Ok(HostEnd { udp, addr: Some(addr(a)?), port: port("host", p)? }),
        _ => Err(format!("{s:?} is not a host port: write [ADDR:]HOST_PORT[/udp], e.g. 8080")),
    }
}

/// One line of `info usernet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsernetEntry {
    pub netdev: String,
    pub udp: bool,
    /// e.g. `HOST_FORWARD`, `ESTABLISHED`.
    pub state: String,
    pub src_addr: String,
    pub src_port: u16,
    pub dst_addr: String,
    pub dst_port: u16,
}

/// Parses `info usernet` (same layout in QEMU 7.2 and 10.0):
/// `Hub -1 (net0):`, a header, then
/// `  TCP[HOST_FORWARD]   8       127.0.0.1 34917       10.0.2.15    22     0     0`.
pub fn parse_usernet(text: &str) -> Vec<UsernetEntry> {
    let mut netdev = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Hub") || t.starts_with("VLAN") {
            netdev = t.rsplit_once('(').map(|(_, r)| r.trim_end_matches("):").to_string()).unwrap_or_default();
            continue;
        }
        let f: Vec<&str> = t.split_whitespace().collect();
        let [proto_state, _fd, src, sport, dst, dport, ..] = f.as_slice() else { continue };
        let Some((proto, state)) = proto_state.split_once('[') else { continue };
        let (Ok(src_port), Ok(dst_port)) = (sport.parse(), dport.parse()) else { continue };
        let unspecified = |a: &str| if a == "*" { "0.0.0.0".to_string() } else { a.to_string() };
        out.push(UsernetEntry {
            netdev: netdev.clone(),
            udp: proto.eq_ignore_ascii_case("udp"),
            state: state.trim_end_matches(']').to_string(),
            src_addr: unspecified(src),
            src_port,
            dst_addr: unspecified(dst),
            dst_port,
        });
    }
    out
}

/// The host forwards of our NIC in `info usernet`.
pub fn live_forwards(text: &str) -> Vec<Forward> {
    parse_usernet(text)
        .into_iter()
        .filter(|e| e.netdev == NETDEV_ID && e.state == "HOST_FORWARD")
        .map(|e| Forward { udp: e.udp, host_addr: e.src_addr, host_port: e.src_port, guest_port: e.dst_port })
        .collect()
}

fn proto(f: &Forward) -> &'static str {
    if f.udp {
        "udp"
    } else {
        "tcp"
    }
}

fn describe(f: &Forward) -> String {
    format!("{}:{} -> guest port {}/{}", f.host_addr, f.host_port, f.guest_port, proto(f))
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardChanged {
    pub name: String,
    pub forward: Forward,
    pub added: bool,
    /// Changed in the running VM now.
    pub live: bool,
    /// In devices.json (set up at every launch), after this change.
    pub recorded: bool,
}

impl ForwardChanged {
    pub fn human(&self) -> String {
        let f = describe(&self.forward);
        match (self.added, self.live) {
            (true, true) if self.recorded => format!("Forwarding {f}. Recorded: set up again at the next launch."),
            (true, true) => format!("Forwarding {f} (--transient: not set up again at the next launch)."),
            (true, false) => {
                format!(
                    "Forward {f} recorded; instance '{}' is not running, it is set up at the next launch.",
                    self.name
                )
            }
            (false, true) => format!("Stopped forwarding {f}."),
            (false, false) => format!("Forward {f} removed from the record."),
        }
    }
}

fn ssh_port(ctx: &Ctx) -> Result<Option<u16>> {
    Ok(read_json::<Settings>(&ctx.existing()?.settings())?.map(|s| s.ssh_port))
}

pub fn add(ctx: &Ctx, f: &Forward, transient: bool) -> Result<ForwardChanged> {
    let vm = Vm::if_running(ctx)?;
    let inst = ctx.existing()?;
    if vm.is_none() && transient {
        bail!("instance '{}' is not running, and a --transient forward is never recorded: launch it first", ctx.name);
    }
    if !f.udp && ssh_port(ctx)? == Some(f.host_port) {
        bail!("host port {} is the instance's SSH forward: choose another host port", f.host_port);
    }
    let _lock = edit_lock(&inst)?;
    let mut rec = Recorded::load(&inst)?;
    let taken = |g: &Forward| g.udp == f.udp && g.host_port == f.host_port;
    if let Some(vm) = &vm {
        if let Some(g) = live_forwards(&vm.hmp("info usernet")?).iter().find(|g| taken(g)) {
            bail!("host port {} is already forwarded ({}): remove it first", f.host_port, describe(g));
        }
        let reply = vm.hmp(&format!("hostfwd_add {NETDEV_ID} {}", f.rule()))?;
        let reply = reply.trim();
        if !reply.is_empty() {
            let hint = if reply.starts_with("Could not set up") {
                format!(": host port {} on {} is probably in use; choose another", f.host_port, f.host_addr)
            } else {
                String::new()
            };
            bail!("QEMU refused the forward {}: {reply}{hint}", describe(f));
        }
    } else if let Some(g) = rec.forwards.iter().find(|g| taken(g)) {
        bail!("host port {} is already recorded for a forward ({}): remove it first", f.host_port, describe(g));
    }
    if !transient {
        rec.forwards.retain(|g| !taken(g));
        rec.forwards.push(f.clone());
        rec.save(&inst)?;
    }
    Ok(ForwardChanged {
        name: ctx.name.clone(),
        forward: f.clone(),
        added: true,
        live: vm.is_some(),
        recorded: !transient,
    })
}

pub fn remove(ctx: &Ctx, end: &HostEnd) -> Result<ForwardChanged> {
    let vm = Vm::if_running(ctx)?;
    let inst = ctx.existing()?;
    if !end.udp && ssh_port(ctx)? == Some(end.port) {
        bail!("host port {} is the instance's SSH forward; change it with 'launch --ssh-port' instead", end.port);
    }
    let _lock = edit_lock(&inst)?;
    let mut rec = Recorded::load(&inst)?;
    let recorded = rec.forwards.iter().find(|g| end.matches(g)).cloned();
    let mut live = None;
    if let Some(vm) = &vm {
        live = live_forwards(&vm.hmp("info usernet")?).into_iter().find(|g| end.matches(g));
        if let Some(f) = &live {
            let reply = vm.hmp(&format!("hostfwd_remove {NETDEV_ID} {}:{}:{}", proto(f), f.host_addr, f.host_port))?;
            if !reply.contains("removed") {
                bail!("QEMU did not remove the forward {}: {}", describe(f), reply.trim());
            }
        }
    }
    let Some(forward) = live.clone().or(recorded.clone()) else {
        bail!("instance '{}' forwards no host port {} ('qbuf-qemu forward list' shows them)", ctx.name, end.port);
    };
    if recorded.is_some() {
        rec.forwards.retain(|g| !end.matches(g));
        rec.save(&inst)?;
    }
    Ok(ForwardChanged { name: ctx.name.clone(), forward, added: false, live: live.is_some(), recorded: false })
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardEntry {
    #[serde(flatten)]
    pub forward: Forward,
    /// The instance's own SSH forward.
    pub ssh: bool,
    pub recorded: bool,
    /// Set up in the running VM now.
    pub live: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardList {
    pub name: String,
    pub running: bool,
    pub forwards: Vec<ForwardEntry>,
}

impl ForwardList {
    pub fn human(&self) -> String {
        let mut s = String::new();
        if !self.running {
            s.push_str(&format!("Instance '{}' is not running; forwards set up at its next launch:\n", self.name));
        }
        for e in &self.forwards {
            let what = match (e.ssh, e.recorded, e.live) {
                (true, _, _) => "ssh",
                (_, true, _) => "recorded",
                (_, false, true) => "transient",
                _ => "",
            };
            s.push_str(&format!("{:<24} [{what}]\n", describe(&e.forward)));
        }
        s.trim_end().to_string()
    }
}

pub fn list(ctx: &Ctx) -> Result<ForwardList> {
    let vm = Vm::if_running(ctx)?;
    let inst = ctx.existing()?;
    let rec = Recorded::load(&inst)?;
    let ssh = ssh_port(ctx)?;
    let is_ssh = |f: &Forward| !f.udp && Some(f.host_port) == ssh && f.guest_port == 22;
    let mut forwards: Vec<ForwardEntry> = match &vm {
        Some(vm) => live_forwards(&vm.hmp("info usernet")?)
            .into_iter()
            .map(|f| ForwardEntry { ssh: is_ssh(&f), recorded: rec.forwards.contains(&f), live: true, forward: f })
            .collect(),
        None => ssh
            .map(|p| Forward { udp: false, host_addr: LOOPBACK.into(), host_port: p, guest_port: 22 })
            .into_iter()
            .map(|forward| ForwardEntry { forward, ssh: true, recorded: false, live: false })
            .collect(),
    };
    let pending: Vec<Forward> =
        rec.forwards.into_iter().filter(|f| !forwards.iter().any(|e| e.forward == *f)).collect();
    forwards.extend(pending.into_iter().map(|forward| ForwardEntry {
        forward,
        ssh: false,
        recorded: true,
        live: false,
    }));
    forwards.sort_by_key(|e| (!e.ssh, e.forward.host_port));
    Ok(ForwardList { name: ctx.name.clone(), running: vm.is_some(), forwards })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fwd(udp: bool, a: &str, h: u16, g: u16) -> Forward {
        Forward { udp, host_addr: a.into(), host_port: h, guest_port: g }
    }

    #[test]
    fn forward_specs_default_to_loopback_and_tcp() {
        assert_eq!(parse_forward("8080:80").unwrap(), fwd(false, "127.0.0.1", 8080, 80));
        assert_eq!(parse_forward("0.0.0.0:8080:80").unwrap(), fwd(false, "0.0.0.0", 8080, 80));
        assert_eq!(parse_forward("5353:53/udp").unwrap(), fwd(true, "127.0.0.1", 5353, 53));
        assert_eq!(parse_forward("10.1.2.3:1:2/tcp").unwrap(), fwd(false, "10.1.2.3", 1, 2));
        for bad in ["8080", "a:80", "8080:0", "8080:80/sctp", "host:1:2", "1:2:3:4", "70000:80", ""] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
        assert!(parse_forward("8080:80/sctp").unwrap_err().contains("/udp"));
        assert_eq!(parse_host_end("8080").unwrap(), HostEnd { udp: false, addr: None, port: 8080 });
        assert_eq!(
            parse_host_end("0.0.0.0:53/udp").unwrap(),
            HostEnd { udp: true, addr: Some("0.0.0.0".into()), port: 53 }
        );
        assert!(parse_host_end("8080:80:1").is_err());
        assert_eq!(fwd(true, "127.0.0.1", 5353, 53).rule(), "udp:127.0.0.1:5353-:53");
    }

    /// The `info usernet` replies recorded from real QEMU 7.2 and 10.0.
    fn recorded_usernet(version: &str) -> Vec<String> {
        let path = format!("{}/qmp-fixtures/{version}/hmp-usernet.jsonl", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("s")?.as_str().map(String::from))
            .filter_map(|s| serde_json::from_str::<Value>(&s).ok()?.get("return")?.as_str().map(String::from))
            .filter(|r| r.starts_with("Hub"))
            .collect()
    }

    #[test]
    fn usernet_parser_reads_the_recorded_text_of_both_versions() {
        for version in ["qemu-10.0", "qemu-7.2"] {
            let replies = recorded_usernet(version);
            assert_eq!(replies.len(), 6, "{version}");
            let first = live_forwards(&replies[0]);
            assert_eq!(first.len(), 1, "{version}: {first:?}");
            assert_eq!((first[0].host_addr.as_str(), first[0].guest_port, first[0].udp), ("127.0.0.1", 22, false));
            // After `hostfwd_add … :0-:80`: the newest rule first, with the real port.
            let second = live_forwards(&replies[1]);
            assert_eq!(second.len(), 2, "{version}");
            assert_eq!(second[0].guest_port, 80);
            assert_ne!(second[0].host_port, 0);
            assert_eq!(second[1], first[0]);
            let e = &parse_usernet(&replies[1].replace("\r\n", "\n"))[0];
            assert_eq!(
                (e.netdev.as_str(), e.state.as_str(), e.dst_addr.as_str()),
                ("net0", "HOST_FORWARD", "10.0.2.15")
            );
            // The last one (after a failed add on a busy port): 80 and 22.
            let ports: Vec<u16> = live_forwards(&replies[5]).iter().map(|f| f.guest_port).collect();
            assert_eq!(ports, [80, 22], "{version}");
        }
    }

    #[test]
    fn usernet_parser_skips_other_netdevs_states_and_noise() {
        let text =
            "Hub -1 (net0):\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\n  \
                    UDP[HOST_FORWARD]  13               * 5353       10.0.2.15    53     0     0\n  \
                    TCP[ESTABLISHED]   14       127.0.0.1 40000       10.0.2.15    22     0     0\n\
                    Hub -1 (other):\n  TCP[HOST_FORWARD]   9       127.0.0.1 2222       10.0.2.15    22     0     0\n";
        assert_eq!(live_forwards(text), vec![fwd(true, "0.0.0.0", 5353, 53)]);
        assert_eq!(parse_usernet(text).len(), 3);
    }
}
