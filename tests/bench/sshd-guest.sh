#!/usr/bin/env bash
# Builds the OpenSSH guest of docs/benchmarks.md ("Readiness on an OpenSSH +
# systemd + PAM guest") into OUTDIR (default: tests/bench/out-sshd, git-ignored):
#
#   vmlinuz, initrd.img  Debian's cloud kernel and its initramfs-tools initrd,
#                        for launch --kernel/--initrd (root=/dev/vda)
#   rootfs.img           raw ext4 image for launch --image: Debian bookworm
#                        (debootstrap minbase) with systemd, dbus, logind
#                        (libpam-systemd), OpenSSH's sshd with UsePAM, sudo
#
# A stand-in for the Guix image (guix/dev-vm.scm): a real init, sshd, PAM and
# a login manager, where the test guest (tests/guest) has busybox and
# dropbear. Users root and dev (uid 1000, no password, sudo NOPASSWD); SSH
# is key-only. At boot, before ssh.service, qbuf-keys.service copies the key
# qbuf-qemu passes over fw_cfg (opt/org.qbuf/authorized_keys) to root's and
# dev's authorized_keys. When sshd listens on port 22, qbuf-sshd-ready.service
# prints "qbuf-sshd-guest: sshd ready" on the serial console, the marker
# tests/bench/sshd-ready.sh times from. The host key needs nothing from the
# guest: qbuf-qemu pins it at the first login (StrictHostKeyChecking
# accept-new, known_hosts per instance).
#
# Switches on the kernel command line (--append), read by qbuf-keys.service
# before sshd starts, so that one image serves every variant measured:
#   qbuf.usedns=1        sshd_config "UseDNS yes" (the default is no)
#   qbuf.pam_systemd=0   no pam_systemd in the session stack (no logind
#                        session, no systemd --user for the login)
#   qbuf.usepam=0        sshd_config "UsePAM no"
#   qbuf.sshd_log=LEVEL  sshd_config "LogLevel LEVEL" (e.g. DEBUG1)
#
#   sudo tests/bench/sshd-guest.sh [OUTDIR]
#
# Idempotent: debootstrap runs again only when the package list changed, the
# image only when this script or the root did. Needs root (debootstrap,
# chroot). Packages come from the Debian mirror in the host's own apt
# sources; no mounts and no loop devices are used. Not needed by `cargo test`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/out-sshd}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=$out/.cache
mkdir -p "$cache"
suite=bookworm
guest_pkgs=systemd,systemd-sysv,udev,dbus,libpam-systemd,openssh-server,sudo,linux-image-cloud-amd64,initramfs-tools,kmod,iproute2,procps

log() { echo "sshd-guest: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

export DEBIAN_FRONTEND=noninteractive
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
install_missing debootstrap e2fsprogs
mirror=$(debian_mirror)

# --- Debian root: systemd, sshd, kernel (debootstrap minbase) ------------------
root=$cache/root
root_key=$(echo "$suite $guest_pkgs minbase v1" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$cache/root.stamp" 2>/dev/null)" != "$root_key" ] || [ ! -x "$root/usr/sbin/sshd" ]; then
  rm -rf "$root" "$root.tmp" "$cache/root.stamp"
  mkdir -p "$cache/debs"
  log "debootstrap --variant=minbase --include=$guest_pkgs $suite (from the host's mirror; a few minutes)"
  debootstrap --variant=minbase --include="$guest_pkgs" --cache-dir="$cache/debs" "$suite" "$root.tmp" "$mirror" >&2
  rm -f "$root.tmp"/var/cache/apt/archives/*.deb
  rm -rf "$root.tmp"/var/lib/apt/lists/*
  mv "$root.tmp" "$root"
  echo "$root_key" > "$cache/root.stamp"
fi

# --- configuration (rewritten on every run: idempotent) ------------------------
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

echo qbuf-sshd > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tqbuf-sshd\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
printf '/dev/vda\t/\text4\trw,errors=remount-ro\t0\t0\n' > "$root/etc/fstab"
# QEMU's user network: DHCP from 10.0.2.2, DNS at 10.0.2.3 (no resolved here).
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' > "$root/etc/systemd/network/10-qemu.network"
rm -f "$root/etc/resolv.conf"
echo 'nameserver 10.0.2.3' > "$root/etc/resolv.conf"

# Users: root, and dev (uid 1000) with no password and sudo without one, as
# guix/dev-vm.scm makes it.
if ! in_root getent passwd dev >/dev/null; then
  in_root useradd -m -u 1000 -U -s /bin/bash -c 'qbuf developer' dev
fi
in_root usermod -p '!' dev
echo 'dev ALL=(ALL) NOPASSWD: ALL' > "$root/etc/sudoers.d/dev"
chmod 0440 "$root/etc/sudoers.d/dev"

# SSH: keys only (guix/dev-vm.scm: password-authentication? #f). The host
# keys were made when openssh-server was installed.
cat > "$root/etc/ssh/sshd_config.d/10-qbuf.conf" <<'EOF'
PasswordAuthentication no
KbdInteractiveAuthentication no
EOF

cat > "$root/usr/local/sbin/qbuf-keys" <<'EOF'
#!/bin/sh
# Installs the key qbuf-qemu passes over fw_cfg for root and dev, and applies
# the bench switches of the kernel command line (tests/bench/sshd-guest.sh).
set -u
say() { echo "qbuf-sshd-guest: $*" > /dev/ttyS0; }
modprobe qemu_fw_cfg 2>/dev/null || true
keyfile=/sys/firmware/qemu_fw_cfg/by_name/opt/org.qbuf/authorized_keys/raw
for hu in /root:root /home/dev:dev; do
  h=${hu%:*}; u=${hu#*:}
  install -d -m 700 -o "$u" -g "$u" "$h/.ssh"
  if [ -r "$keyfile" ]; then cat "$keyfile" > "$h/.ssh/authorized_keys"; else : > "$h/.ssh/authorized_keys"; fi
  chown "$u:$u" "$h/.ssh/authorized_keys"; chmod 600 "$h/.ssh/authorized_keys"
done
[ -s /root/.ssh/authorized_keys ] && say "authorized key installed for root and dev from fw_cfg" ||
  say "no authorized key in fw_cfg (opt/org.qbuf/authorized_keys)"

conf=/etc/ssh/sshd_config.d/20-qbuf-bench.conf
: > "$conf"
cp /usr/local/share/qbuf/common-session /etc/pam.d/common-session
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    qbuf.usedns=1) echo 'UseDNS yes' >> "$conf" ;;
    qbuf.usepam=0) echo 'UsePAM no' >> "$conf" ;;
    qbuf.sshd_log=*) echo "LogLevel ${arg#qbuf.sshd_log=}" >> "$conf" ;;
    qbuf.pam_systemd=0) sed -i '/pam_systemd\.so/d' /etc/pam.d/common-session ;;
  esac
done
say "bench switches: $(tr '\n' ';' < "$conf")$(grep -q pam_systemd /etc/pam.d/common-session || echo ' no pam_systemd')"
EOF
chmod 755 "$root/usr/local/sbin/qbuf-keys"
# The stock session stack, kept aside so that each boot starts from it.
mkdir -p "$root/usr/local/share/qbuf"
if [ ! -s "$root/usr/local/share/qbuf/common-session" ]; then
  cp "$root/etc/pam.d/common-session" "$root/usr/local/share/qbuf/common-session"
fi

cat > "$root/etc/systemd/system/qbuf-keys.service" <<'EOF'
[Unit]
Description=Install qbuf-qemu's SSH key from fw_cfg
After=local-fs.target
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/qbuf-keys

[Install]
WantedBy=multi-user.target
EOF

# sshd (Debian's ssh.service is Type=notify) listens once ssh.service is
# started; the port is checked anyway, as the test guest's init does.
cat > "$root/etc/systemd/system/qbuf-sshd-ready.service" <<'EOF'
[Unit]
Description=Say on the serial console when sshd listens
After=ssh.service
Requires=ssh.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'until grep -q "^ *[0-9]*: [0-9A-F]*:0016 [0-9A-F]*:0000 0A" /proc/net/tcp /proc/net/tcp6; do sleep 0.02; done; echo "qbuf-sshd-guest: sshd ready" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable systemd-networkd.service qbuf-keys.service qbuf-sshd-ready.service ssh.service >/dev/null 2>&1

# --- kernel and initrd -----------------------------------------------------------
vmlinuz=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
kver=${vmlinuz##*/vmlinuz-}
[ -s "$root/boot/initrd.img-$kver" ] || in_root update-initramfs -c -k "$kver" >&2
grep -q '^CONFIG_FW_CFG_SYSFS=[ym]' "$root/boot/config-$kver" ||
  { log "kernel $kver has no CONFIG_FW_CFG_SYSFS: the key cannot be read from fw_cfg"; exit 1; }
cp "$vmlinuz" "$out/vmlinuz.tmp" && mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img.tmp" && mv -f "$out/initrd.img.tmp" "$out/initrd.img"

# --- the ext4 image ----------------------------------------------------------------
img_key=$(
  {
    cat "$here/sshd-guest.sh"
    echo "$root_key"
  } | sha256sum | cut -d' ' -f1
)
if [ "$(cat "$out/rootfs.stamp" 2>/dev/null)" = "$img_key" ] && [ -s "$out/rootfs.img" ]; then
  echo "sshd-guest: up to date: $out/{vmlinuz,initrd.img,rootfs.img} (kernel $kver)"
  exit 0
fi
rm -f "$out/rootfs.stamp" "$out/rootfs.img.tmp"
# 2 GiB, sparse: the root is about 0.4 GB.
mkfs.ext4 -q -F -L qbufsshd -E root_owner=0:0 -d "$root" "$out/rootfs.img.tmp" 2G >&2
mv -f "$out/rootfs.img.tmp" "$out/rootfs.img"
echo "$img_key" > "$out/rootfs.stamp"
log "built $out/{vmlinuz,initrd.img,rootfs.img}: kernel $kver, image $(du -m "$out/rootfs.img" | cut -f1) MB used of 2 GiB"
echo "sshd-guest: built $out (boot: launch --image rootfs.img --kernel vmlinuz --initrd initrd.img --append 'root=/dev/vda rw console=ttyS0 quiet')"
