//! QEMU's command line, built as data from a resolved [`VmSpec`] with no I/O,
//! so every option and its escaping (see [`super::value`]) is unit-tested.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::forward::Forward;
pub use super::value::{escape_value, path_value, socket_value, DiskFormat};
pub use super::virtiofs::ShareKind;

/// Accelerator actually used for a boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Share {
    pub path: PathBuf,
    pub tag: String,
    pub readonly: bool,
}

/// A disk attached at launch besides the boot disk (recorded hot-plugs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtraDisk {
    pub id: String,
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// Where QEMU's sockets and logs go; all inside the instance dir.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoints {
    /// The supervisor's own QMP connection (events for the VM's life).
    pub qmp_supervisor: PathBuf,
    /// A QMP socket left free for the user's own tools.
    pub qmp_user: PathBuf,
    pub console: PathBuf,
    pub serial_log: PathBuf,
    pub guest_agent: PathBuf,
    /// One vhost-user socket per share, when they go over virtio-fs.
    #[serde(default)]
    pub share_sockets: Vec<PathBuf>,
}

/// Everything a boot needs, resolved: no defaults are applied past this point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub accel: Accel,
    pub memory_mib: u64,
    pub cpus: u32,
    pub ssh_port: u16,
    /// The instance's qcow2 overlay (boot disk), if any.
    pub disk: Option<PathBuf>,
    pub kernel: Option<KernelBoot>,
    pub shares: Vec<Share>,
    /// How the shares reach the guest (all of one boot's the same way).
    #[serde(default)]
    pub share_kind: ShareKind,
    pub extra_disks: Vec<ExtraDisk>,
    /// Extra user-network forwards `(proto, host_addr, host_port, guest_port)`.
    pub forwards: Vec<Forward>,
    /// Public key handed to the guest over fw_cfg (the test guest reads it;
    /// Guix images have it built in).
    pub authorized_key: PathBuf,
    pub endpoints: Endpoints,
    /// Empty PCIe root ports reserved for hot-plugged devices: q35 cannot
    /// hot-plug onto its root bus.
    pub hotplug_ports: u32,
    /// An extra firmware directory (`-L`), e.g. QEMU 7.2's beside 10.0.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    /// Start paused, waiting for a saved state (`-incoming defer`, then QMP
    /// `migrate-incoming`), instead of booting.
    #[serde(default)]
    pub incoming: bool,
}

/// The default share's 9p tag (the guest mounts it at /mnt/qbuf).
pub const DEFAULT_SHARE_TAG: &str = "qbuf";
/// PCIe root ports reserved at launch for hot-plugged disks.
pub const HOTPLUG_PORTS: u32 = 4;
/// The boot disk's device id (its block node is `disk0`).
pub const BOOT_DISK_DEVICE: &str = "disk0-dev";
pub const FW_CFG_AUTHORIZED_KEYS: &str = "opt/org.qbuf/authorized_keys";
pub const NETDEV_ID: &str = "net0";
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";
/// The agent port's device id: QEMU names it in `VSERPORT_CHANGE` when the
/// guest opens or closes the port (no id, no event).
pub const GUEST_AGENT_PORT_ID: &str = "qga0-port";

fn chardev_socket(id: &str, what: &str, path: &Path) -> Result<String> {
    Ok(format!("socket,id={id},path={},server=on,wait=off", socket_value(what, path)?))
}

/// The accelerator and the CPU model that goes with it (also what `doctor`
/// and `launch --accel auto` try KVM with).
pub fn accel_args(accel: Accel) -> [&'static str; 4] {
    match accel {
        Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
        Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
    }
}

/// An argv under construction.
#[derive(Default)]
struct Argv(Vec<String>);

impl Argv {
    fn push(&mut self, xs: &[&str]) {
        self.0.extend(xs.iter().map(|s| s.to_string()));
    }
}

/// The full argument list after the binary name.
pub fn build_args(spec: &VmSpec) -> Result<Vec<String>> {
    let mut a = Argv::default();
    if let Some(fw) = &spec.firmware {
        // -L takes a plain path, not an option string: no comma escaping.
        let fw = fw.to_str().ok_or_else(|| anyhow::anyhow!("firmware path {} is not valid UTF-8", fw.display()))?;
        a.push(&["-L", fw]);
    }
    let name = escape_value(&spec.name);
    a.push(&["-name", &format!("qbuf-{name},process=qbuf-{name}")]);
    a.push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    memory(&mut a, spec);
    a.push(&accel_args(spec.accel));
    monitors_and_serial(&mut a, &spec.endpoints)?;
    disks(&mut a, spec)?;
    network(&mut a, spec);
    shares(&mut a, spec)?;
    agent_and_panic(&mut a, &spec.endpoints)?;
    let key = path_value("authorized key", &spec.authorized_key)?;
    a.push(&["-fw_cfg", &format!("name={FW_CFG_AUTHORIZED_KEYS},file={key}")]);
    if let Some(k) = &spec.kernel {
        kernel(&mut a, k)?;
    }
    if spec.incoming {
        a.push(&["-incoming", "defer"]);
    }
    Ok(a.0)
}

fn monitors_and_serial(a: &mut Argv, e: &Endpoints) -> Result<()> {
    a.push(&["-chardev", &chardev_socket("qmp-sup", "supervisor QMP", &e.qmp_supervisor)?]);
    a.push(&["-mon", "chardev=qmp-sup,mode=control"]);
    a.push(&["-chardev", &chardev_socket("qmp", "QMP", &e.qmp_user)?]);
    a.push(&["-mon", "chardev=qmp,mode=control"]);
    let serial = format!(
        "{},logfile={},logappend=on",
        chardev_socket("serial0", "serial console", &e.console)?,
        path_value("serial log", &e.serial_log)?
    );
    a.push(&["-chardev", &serial, "-serial", "chardev:serial0"]);
    Ok(())
}

fn disks(a: &mut Argv, spec: &VmSpec) -> Result<()> {
    for i in 0..spec.hotplug_ports {
        // Root ports on pcie.0 from slot 0x10 up, one chassis each.
        let rp = format!("pcie-root-port,id=hp{i},chassis={},bus=pcie.0,addr={:#x}", i + 1, 0x10 + i);
        a.push(&["-device", &rp]);
    }
    if let Some(disk) = &spec.disk {
        let file = path_value("boot disk", disk)?;
        a.push(&["-blockdev", &format!("driver=file,node-name=disk0-file,filename={file},discard=unmap")]);
        a.push(&["-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file,discard=unmap"]);
        // With -kernel, QEMU's linuxboot ROM already holds boot index 0.
        let boot = if spec.kernel.is_some() { "" } else { ",bootindex=0" };
        a.push(&["-device", &format!("virtio-blk-pci,drive=disk0,id={BOOT_DISK_DEVICE}{boot}")]);
    }
    for (i, d) in spec.extra_disks.iter().enumerate() {
        let file = path_value("disk", &d.path)?;
        let id = escape_value(&d.id);
        // One node with its file node inline, exactly as `disk add` does over
        // QMP, so one `blockdev-del ID` removes both either way.
        let fmt = d.format.as_str();
        a.push(&[
            "-blockdev",
            &format!("driver={fmt},node-name={id},file.driver=file,file.node-name={id}-file,file.filename={file}"),
        ]);
        // Recorded disks sit in the last root ports so the first stay free.
        let port = spec.hotplug_ports.saturating_sub(1 + i as u32);
        a.push(&["-device", &format!("virtio-blk-pci,drive={id},id={id},bus=hp{port}")]);
    }
    Ok(())
}

fn network(a: &mut Argv, spec: &VmSpec) {
    let mut netdev = format!("user,id={NETDEV_ID},hostfwd=tcp:127.0.0.1:{}-:22", spec.ssh_port);
    for f in &spec.forwards {
        netdev.push_str(",hostfwd=");
        netdev.push_str(&escape_value(&f.rule()));
    }
    a.push(&["-netdev", &netdev, "-device", &format!("virtio-net-pci,netdev={NETDEV_ID}")]);
}

/// The machine and its RAM. vhost-user (virtio-fs) needs guest RAM that
/// `virtiofsd` can map: a shared memfd backend, the machine's RAM.
fn memory(a: &mut Argv, spec: &VmSpec) {
    let (m, smp) = (format!("{}M", spec.memory_mib), spec.cpus.to_string());
    if spec.share_kind == ShareKind::Virtiofs && !spec.shares.is_empty() {
        a.push(&["-object", &format!("memory-backend-memfd,id=mem0,size={m},share=on")]);
        a.push(&["-machine", "q35,memory-backend=mem0"]);
    } else {
        a.push(&["-machine", "q35"]);
    }
    a.push(&["-m", &m, "-smp", &smp]);
}

fn shares(a: &mut Argv, spec: &VmSpec) -> Result<()> {
    if spec.share_kind == ShareKind::Virtiofs {
        let socks = &spec.endpoints.share_sockets;
        if socks.len() != spec.shares.len() {
            bail!("internal: {} virtio-fs shares but {} sockets", spec.shares.len(), socks.len());
        }
        for (i, (s, sock)) in spec.shares.iter().zip(socks).enumerate() {
            a.0.extend(super::virtiofs::device_args(i, &escape_value(&s.tag), &socket_value("virtio-fs", sock)?));
        }
        return Ok(());
    }
    for (i, s) in spec.shares.iter().enumerate() {
        let path = path_value("share", &s.path)?;
        let ro = if s.readonly { ",readonly=on" } else { "" };
        // security_model=none: files the guest creates belong to the host
        // user running QEMU, as they would for a local edit.
        a.push(&["-fsdev", &format!("local,id=share{i},path={path},security_model=none{ro}")]);
        a.push(&["-device", &format!("virtio-9p-pci,fsdev=share{i},mount_tag={}", escape_value(&s.tag))]);
    }
    Ok(())
}

fn agent_and_panic(a: &mut Argv, e: &Endpoints) -> Result<()> {
    a.push(&["-device", "virtio-serial-pci,id=vser0"]);
    a.push(&["-chardev", &chardev_socket("qga0", "guest agent", &e.guest_agent)?]);
    a.push(&[
        "-device",
        &format!("virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT},id={GUEST_AGENT_PORT_ID}"),
    ]);
    // Without a pvpanic device QEMU never learns that the guest panicked
    // (no GUEST_PANICKED): the guest just hangs. QEMU's default panic action
    // pauses the VM, which keeps it for inspection (`console`, `qmp`).
    a.push(&["-device", "pvpanic"]);
    Ok(())
}

fn kernel(a: &mut Argv, k: &KernelBoot) -> Result<()> {
    // -kernel/-initrd are not QemuOpts, so no escaping; but -initrd
    // splits on ',' for multiboot kernels, so refuse that.
    let kernel = k.kernel.to_str().ok_or_else(|| anyhow::anyhow!("--kernel path is not valid UTF-8"))?;
    let initrd = k.initrd.to_str().ok_or_else(|| anyhow::anyhow!("--initrd path is not valid UTF-8"))?;
    if initrd.contains(',') {
        bail!("--initrd path {initrd:?} contains ',', which QEMU reads as a list of files: rename or link it");
    }
    a.push(&["-kernel", kernel, "-initrd", initrd]);
    if let Some(ap) = &k.append {
        a.push(&["-append", ap]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &str) -> VmSpec {
        let d = PathBuf::from(dir);
        VmSpec {
            name: "dev".into(),
            accel: Accel::Tcg,
            memory_mib: 4096,
            cpus: 2,
            ssh_port: 10022,
            disk: Some(d.join("overlay.qcow2")),
            kernel: None,
            shares: vec![Share { path: "/home/u/qbuf".into(), tag: "qbuf".into(), readonly: false }],
            share_kind: ShareKind::NineP,
            extra_disks: vec![],
            forwards: vec![],
            authorized_key: d.join("authorized_keys"),
            endpoints: Endpoints {
                qmp_supervisor: d.join("qmp-sup.sock"),
                qmp_user: d.join("qmp.sock"),
                console: d.join("console.sock"),
                serial_log: d.join("serial.log"),
                guest_agent: d.join("qga.sock"),
                share_sockets: vec![],
            },
            hotplug_ports: 4,
            firmware: None,
            incoming: false,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn ssh_forward_binds_loopback_only() {
        let a = build_args(&spec("/s/i/dev")).unwrap();
        assert_eq!(after(&a, "-netdev"), ["user,id=net0,hostfwd=tcp:127.0.0.1:10022-:22"]);
    }

    #[test]
    fn boot_disk_is_virtio_blk_with_boot_index() {
        let a = build_args(&spec("/s/i/dev")).unwrap();
        assert!(after(&a, "-blockdev")[0].contains("filename=/s/i/dev/overlay.qcow2"));
        assert!(after(&a, "-device").contains(&"virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=0"));
    }

    #[test]
    fn commas_in_paths_are_doubled_everywhere() {
        let mut s = spec("/s/a,snapshot");
        s.shares[0].path = "/src/x,readonly".into();
        let a = build_args(&s).unwrap();
        let all = a.join(" ");
        assert!(all.contains("filename=/s/a,,snapshot/overlay.qcow2"), "{all}");
        assert!(all.contains("path=/src/x,,readonly,security_model=none"), "{all}");
        assert!(all.contains("path=/s/a,,snapshot/qmp.sock,server=on"), "{all}");
        assert!(all.contains("logfile=/s/a,,snapshot/serial.log"), "{all}");
        assert!(all.contains("file=/s/a,,snapshot/authorized_keys"), "{all}");
    }

    #[test]
    fn a_virtiofs_share_gets_shared_memory_and_its_socket() {
        let mut s = spec("/s,x");
        s.share_kind = ShareKind::Virtiofs;
        assert!(build_args(&s).is_err(), "a share without its socket is refused");
        s.endpoints.share_sockets = vec!["/s,x/virtiofs/0.sock".into()];
        let a = build_args(&s).unwrap();
        assert_eq!(after(&a, "-object"), ["memory-backend-memfd,id=mem0,size=4096M,share=on"]);
        assert_eq!(after(&a, "-machine"), ["q35,memory-backend=mem0"]);
        assert!(after(&a, "-chardev").contains(&"socket,id=vfs0,path=/s,,x/virtiofs/0.sock"));
        assert!(after(&a, "-device").iter().any(|d| d.starts_with("vhost-user-fs-pci,chardev=vfs0,tag=qbuf,")));
        assert!(after(&a, "-fsdev").is_empty(), "no 9p device beside it");
        (s.shares, s.endpoints.share_sockets) = (vec![], vec![]);
        assert_eq!(after(&build_args(&s).unwrap(), "-machine"), ["q35"], "no share, no shared memory");
    }

    #[test]
    fn readonly_share_is_marked_readonly() {
        let mut s = spec("/s");
        s.shares[0].readonly = true;
        let a = build_args(&s).unwrap();
        assert!(after(&a, "-fsdev")[0].ends_with(",readonly=on"));
        assert_eq!(after(&a, "-device").iter().filter(|d| d.starts_with("virtio-9p-pci")).count(), 1);
    }

    #[test]
    fn accel_chooses_cpu_model() {
        let mut s = spec("/s");
        assert_eq!(after(&build_args(&s).unwrap(), "-accel"), ["tcg"]);
        s.accel = Accel::Kvm;
        let a = build_args(&s).unwrap();
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
    }

    #[test]
    fn hotplug_ports_are_reserved() {
        let a = build_args(&spec("/s")).unwrap();
        let rps: Vec<_> = after(&a, "-device").into_iter().filter(|d| d.starts_with("pcie-root-port")).collect();
        assert_eq!(rps.len(), 4);
        assert_eq!(rps[0], "pcie-root-port,id=hp0,chassis=1,bus=pcie.0,addr=0x10");
    }

    #[test]
    fn a_resumed_vm_waits_for_its_state() {
        let mut s = spec("/s");
        assert!(!build_args(&s).unwrap().contains(&"-incoming".to_string()));
        s.incoming = true;
        assert_eq!(after(&build_args(&s).unwrap(), "-incoming"), ["defer"]);
    }

    #[test]
    fn a_firmware_dir_comes_first_as_minus_l() {
        let mut s = spec("/s");
        s.firmware = Some("/opt/q/share,x".into());
        let a = build_args(&s).unwrap();
        assert_eq!(&a[..2], ["-L", "/opt/q/share,x"]);
    }

    #[test]
    fn too_long_socket_path_is_refused_with_advice() {
        let long = format!("/{}", "x".repeat(120));
        let err = build_args(&spec(&long)).unwrap_err().to_string();
        assert!(err.contains("shorter --state-dir"), "{err}");
    }

    #[test]
    fn non_utf8_path_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let mut s = spec("/s");
        s.disk = Some(PathBuf::from(std::ffi::OsStr::from_bytes(b"/s/\xff.qcow2")));
        assert!(build_args(&s).unwrap_err().to_string().contains("not valid UTF-8"));
    }

    #[test]
    fn kernel_boot_passes_append_verbatim_and_refuses_comma_initrd() {
        let mut s = spec("/s");
        s.disk = None;
        s.kernel = Some(KernelBoot {
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd.img".into(),
            append: Some("console=ttyS0 a,b".into()),
        });
        let a = build_args(&s).unwrap();
        assert_eq!(after(&a, "-append"), ["console=ttyS0 a,b"]);
        assert!(after(&a, "-blockdev").is_empty());
        s.disk = Some("/s/o.qcow2".into());
        let a = build_args(&s).unwrap();
        assert!(
            after(&a, "-device").contains(&"virtio-blk-pci,drive=disk0,id=disk0-dev"),
            "no bootindex clash with -kernel"
        );
        s.kernel.as_mut().unwrap().initrd = "/k/a,b".into();
        assert!(build_args(&s).unwrap_err().to_string().contains("--initrd"));
    }

    #[test]
    fn extra_forwards_are_escaped_and_loopback_by_default() {
        let mut s = spec("/s");
        s.forwards.push(Forward { udp: true, host_addr: "127.0.0.1".into(), host_port: 5353, guest_port: 53 });
        let a = build_args(&s).unwrap();
        assert!(after(&a, "-netdev")[0].ends_with(",hostfwd=udp:127.0.0.1:5353-:53"));
    }

    #[test]
    fn recorded_disks_take_the_last_ports_with_their_format_and_inline_file_node() {
        let mut s = spec("/s");
        s.extra_disks.push(ExtraDisk { id: "disk1".into(), path: "/d/a,b.img".into(), format: DiskFormat::Raw });
        s.extra_disks.push(ExtraDisk { id: "disk2".into(), path: "/d/c.qcow2".into(), format: DiskFormat::Qcow2 });
        let a = build_args(&s).unwrap();
        let bd = after(&a, "-blockdev");
        assert!(bd.contains(
            &"driver=raw,node-name=disk1,file.driver=file,file.node-name=disk1-file,file.filename=/d/a,,b.img"
        ));
        let devs = after(&a, "-device");
        assert!(devs.contains(&"virtio-blk-pci,drive=disk1,id=disk1,bus=hp3"), "{devs:?}");
        assert!(devs.contains(&"virtio-blk-pci,drive=disk2,id=disk2,bus=hp2"), "{devs:?}");
    }

    #[test]
    fn guest_agent_port_has_an_id_and_panics_are_reported() {
        let a = build_args(&spec("/s")).unwrap();
        let devs = after(&a, "-device");
        assert!(devs.iter().any(|d| d.ends_with(&format!("name={GUEST_AGENT_PORT},id={GUEST_AGENT_PORT_ID}"))));
        assert!(devs.contains(&"pvpanic"));
    }
}
