#!/usr/bin/env bash
# Builds the qbuf-qemu test guest: vmlinuz, initrd.img and a bootable
# disk.qcow2 in OUTDIR (default: tests/guest/out). See README.md.
# Idempotent; needs root (installs Debian packages, makes device nodes).
# No mounts and no loop devices are used.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=$out/.cache
mkdir -p "$cache"

log() { echo "guest-build: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

export DEBIAN_FRONTEND=noninteractive
apt_opts=(-q -o APT::Sandbox::User=root)

# Host packages this script needs (the kernel and sudo are only downloaded,
# not installed). The libraries the guest's sudo and PAM link are copied from
# the host: they are on every Debian, listed so that the stamp follows them.
pkgs=(busybox-static dropbear-bin openssh-sftp-server syslinux syslinux-common mtools dosfstools cpio qemu-utils
      libc6 libcrypt1 zlib1g libpam0g libpam-modules libaudit1 libselinux1 libcap-ng0 libpcre2-8-0)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  if ! apt-get install -y --no-install-recommends "${apt_opts[@]}" "${missing[@]}" >&2; then
    apt-get update "${apt_opts[@]}" >&2
    apt-get install -y --no-install-recommends "${apt_opts[@]}" "${missing[@]}" >&2
  fi
fi

# The kernel package that linux-image-amd64 points at (its candidate version).
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}'; }
kernel_pkg=$(kpkg)
if [ -z "$kernel_pkg" ]; then
  apt-get update "${apt_opts[@]}" >&2
  kernel_pkg=$(kpkg)
fi
[ -n "$kernel_pkg" ] || { log "cannot resolve linux-image-amd64"; exit 1; }
kernel_ver=$(apt-cache policy "$kernel_pkg" | awk '$1 == "Candidate:" {print $2}')
# sudo for the guest: downloaded and unpacked, never installed on the host (a
# root-only host has no sudo and should not get a setuid one from a test build).
sudo_ver=$(apt-cache policy sudo | awk '$1 == "Candidate:" && $2 != "(none)" {print $2}')
if [ -z "$sudo_ver" ]; then
  apt-get update "${apt_opts[@]}" >&2
  sudo_ver=$(apt-cache policy sudo | awk '$1 == "Candidate:" && $2 != "(none)" {print $2}')
fi
[ -n "$sudo_ver" ] || { log "no candidate for the sudo package"; exit 1; }

# Up to date? The stamp covers this script, the guest files and the versions used.
stamp_key=$(
  {
    cat "$here/build.sh" "$here/init"
    echo "$kernel_pkg=$kernel_ver"
    echo "sudo=$sudo_ver"
    [ -z "${QBUF_GUEST_EXTRA_MODULES:-}" ] || echo "extra modules: $QBUF_GUEST_EXTRA_MODULES"
    dpkg-query -W "${pkgs[@]}"
  } | sha256sum | cut -d' ' -f1
)
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp_key" ] &&
   [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ -s "$out/disk.qcow2" ]; then
  echo "guest-build: up to date: $out/{vmlinuz,initrd.img,disk.qcow2} ($kernel_pkg $kernel_ver)"
  exit 0
fi
rm -f "$out/.stamp"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A package's .deb in the cache (older ones matching $3 are dropped); prints its path.
fetch_deb() { # $1 package, $2 version, $3 glob of the package's older .debs
  local deb=$cache/${1}_${2//:/%3a}_amd64.deb
  if [ ! -s "$deb" ]; then
    rm -f "$cache"/$3
    log "downloading $1 $2"
    (cd "$cache" && apt-get download "${apt_opts[@]}" "$1=$2" >&2) ||
      { apt-get update "${apt_opts[@]}" >&2; (cd "$cache" && apt-get download "${apt_opts[@]}" "$1=$2" >&2); }
    deb=$(ls "$cache"/"$1"_*.deb | head -n1)
  fi
  echo "$deb"
}

# --- kernel -----------------------------------------------------------------
deb=$(fetch_deb "$kernel_pkg" "$kernel_ver" 'linux-image-*.deb')
kx=$tmp/kernel
mkdir -p "$kx"
dpkg-deb -x "$deb" "$kx"
vmlinuz=$(ls "$kx"/boot/vmlinuz-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
moddir=$kx/lib/modules/$kver
[ -d "$moddir" ] || moddir=$kx/usr/lib/modules/$kver
[ -d "$moddir" ] || { log "no modules for $kver in $deb"; exit 1; }

# Dependencies from modules.dep (made with busybox depmod: kmod need not be installed).
if [ ! -s "$moddir/modules.dep" ]; then
  busybox depmod -b "$kx" "$kver" 2>/dev/null || true
  [ -s "$moddir/modules.dep" ] || { mkdir -p "$kx/lib/modules"; ln -sfn "$moddir" "$kx/lib/modules/$kver"; busybox depmod -b "$kx" "$kver"; }
fi
want=(virtio_pci virtio_blk virtio_net virtio_console 9pnet_virtio 9p virtiofs button evdev qemu_fw_cfg
      vfat nls_cp437 nls_ascii nls_iso8859-1 nls_utf8)
# More modules (and their dependencies) for other guests built from this one,
# e.g. tests/bench/cxx-guest.sh's ext4 and virtiofs. Only put in the initramfs:
# init loads its own list; `modprobe NAME` loads these.
read -r -a extra_mods <<< "${QBUF_GUEST_EXTRA_MODULES:-}"
want+=("${extra_mods[@]}")
declare -A need_mod=()
add_mod() { # $1 = path relative to moddir, as in modules.dep
  local rel=$1 line dep
  [ -n "${need_mod[$rel]:-}" ] && return 0
  need_mod[$rel]=1
  line=$(grep -m1 "^${rel}:" "$moddir/modules.dep" || true)
  for dep in ${line#*:}; do add_mod "$dep"; done
}
for m in "${want[@]}"; do
  # Match foo.ko, foo.ko.xz, foo.ko.zst, foo.ko.gz; '-' and '_' are interchangeable in names.
  pat=$(echo "$m" | sed 's/[-_]/[-_]/g')
  rel=$(grep -m1 -E "(^|/)${pat}\.ko(\.(xz|zst|gz))?:" "$moddir/modules.dep" | cut -d: -f1 || true)
  if [ -z "$rel" ]; then
    if grep -qE "(^|/)${pat}\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
      log "module $m is built into $kver"
    else
      log "warning: module $m not found for $kver"
    fi
    continue
  fi
  add_mod "$rel"
done

# --- initramfs --------------------------------------------------------------
root=$tmp/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/lib,lib,lib64,etc/pam.d,proc,sys,dev,run,tmp,root,home/dev,home/nosudo,mnt/qbuf,data,var/log}
mkdir -p "$root/etc/acpi/PWRF" "$root/lib/modules/$kver"
ln -s ../run "$root/var/run"

# Modules, decompressed (the guest's busybox then needs no decompressor).
: > "$root/lib/modules/$kver/modules.dep"
for rel in "${!need_mod[@]}"; do
  plain=${rel%.xz}; plain=${plain%.zst}; plain=${plain%.gz}
  mkdir -p "$root/lib/modules/$kver/$(dirname "$plain")"
  case "$rel" in
    *.xz) xz -dc "$moddir/$rel" > "$root/lib/modules/$kver/$plain" ;;
    *.zst) zstd -qdc "$moddir/$rel" > "$root/lib/modules/$kver/$plain" ;;
    *.gz) gzip -dc "$moddir/$rel" > "$root/lib/modules/$kver/$plain" ;;
    *) cp "$moddir/$rel" "$root/lib/modules/$kver/$plain" ;;
  esac
  grep -m1 "^${rel}:" "$moddir/modules.dep" | sed -E 's/\.ko\.(xz|zst|gz)/.ko/g' >> "$root/lib/modules/$kver/modules.dep"
done
cp "$moddir/modules.builtin" "$root/lib/modules/$kver/" 2>/dev/null || true

# busybox, with a link for every applet at its usual place.
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list-full); do
  [ -e "$root/$a" ] || [ -L "$root/$a" ] || ln -s /bin/busybox "$root/$a"
done

# dropbear (+ dropbearkey, sftp-server) with the shared libraries ldd names.
copy_libs() { # $1 binary or library: the host's libraries it links (not those under $tmp)
  ldd "$1" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | while read -r lib; do
    case "$lib" in "$tmp"/*) continue ;; esac
    mkdir -p "$root/$(dirname "$lib")"
    [ -e "$root/$lib" ] || cp -L "$lib" "$root/$lib"
  done
}
copy_bin() { # $1 host binary, $2 path in guest
  mkdir -p "$root/$(dirname "$2")"
  cp -L "$1" "$root/$2"
  copy_libs "$1"
}
copy_bin /usr/sbin/dropbear /usr/sbin/dropbear
copy_bin /usr/bin/dropbearkey /usr/bin/dropbearkey
copy_bin /usr/lib/openssh/sftp-server /usr/lib/sftp-server

# sudo from Debian's package, because the tool runs root jobs in the guest
# through `sudo -n` as the real dev VM's `dev`. Only sudo itself, its sudoers
# plugin and libsudo_util (found through sudo's RUNPATH /usr/libexec/sudo),
# and the PAM modules /etc/pam.d/sudo names.
sx=$tmp/sudo
mkdir -p "$sx"
dpkg-deb -x "$(fetch_deb sudo "$sudo_ver" 'sudo_*.deb')" "$sx"
mkdir -p "$root/usr/libexec/sudo" "$root/var/lib/sudo/lectured"
install -m 4755 -o 0 -g 0 "$sx/usr/bin/sudo" "$root/usr/bin/sudo"
cp -a "$sx"/usr/libexec/sudo/sudoers.so "$sx"/usr/libexec/sudo/libsudo_util.so* "$root/usr/libexec/sudo/"
chmod 700 "$root/var/lib/sudo/lectured"
for f in "$sx/usr/bin/sudo" "$sx/usr/libexec/sudo/sudoers.so"; do
  LD_LIBRARY_PATH=$sx/usr/libexec/sudo copy_libs "$f"
done
pamdir=$(dirname "$(dpkg -L libpam-modules | grep -m1 '/security/pam_permit\.so$')")
mkdir -p "$root/$pamdir"
for m in pam_permit pam_deny pam_unix; do
  cp -L "$pamdir/$m.so" "$root/$pamdir/$m.so"
  copy_libs "$pamdir/$m.so"
done
# No user has a password (shadow has '*'): pam_unix's auth never succeeds, so
# only NOPASSWD rules work, and anyone else's `sudo -n` says "a password is
# required".
cat > "$root/etc/pam.d/sudo" <<'EOF'
auth     required pam_unix.so
account  required pam_permit.so
session  required pam_permit.so
password required pam_deny.so
EOF
cat > "$root/etc/sudoers" <<'EOF'
# dev's rule is the real dev VM's (guix/dev-vm.scm); nosudo has none.
Defaults env_reset
root ALL=(ALL) ALL
dev  ALL=(ALL) NOPASSWD: ALL
EOF
chmod 440 "$root/etc/sudoers"

install -m 0755 "$here/init" "$root/init"

cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
dev:x:1000:1000:dev:/home/dev:/bin/sh
nosudo:x:1001:1001:nosudo:/home/nosudo:/bin/sh
EOF
cat > "$root/etc/group" <<'EOF'
root:x:0:
tty:x:5:
dev:x:1000:
nosudo:x:1001:
EOF
cat > "$root/etc/shadow" <<'EOF'
root:*:19000:0:99999:7:::
dev:*:19000:0:99999:7:::
nosudo:*:19000:0:99999:7:::
EOF
chmod 600 "$root/etc/shadow"
printf '/bin/sh\n/bin/ash\n' > "$root/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > "$root/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n10.0.2.15 qbuf-test\n' > "$root/etc/hosts"
echo qbuf-test > "$root/etc/hostname"
cat > "$root/etc/profile" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
if [ "$(id -u)" = 0 ]; then PS1='qbuf-test# '; else PS1='qbuf-test$ '; fi
export PS1
EOF
cat > "$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# Power button (QEMU system_powerdown): flush the data disk and power off.
echo "qbuf-test-guest: power button: powering off" > /dev/console
sync
umount /mnt/qbuf 2>/dev/null
umount -r /data 2>/dev/null
sync
poweroff -f
EOF
chmod 755 "$root/etc/acpi/PWRF/00000080"

mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
mknod -m 600 "$root/dev/ttyS0" c 4 64

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --reproducible) | gzip -9n > "$tmp/initrd.img"
cp "$vmlinuz" "$tmp/vmlinuz"

# vmlinux: the same kernel uncompressed (an ELF with a PVH entry point). QEMU's
# -kernel boots it without the in-guest decompression of the bzImage, which
# under TCG saves about 3.5 s per boot. Optional: skipped if not extractable.
extract_vmlinux() { # $1 bzImage, $2 output
  local magic off tool
  for magic in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
    tool=${magic%%:*}
    command -v "$tool" >/dev/null || continue
    for off in $(LC_ALL=C grep -obUaP "${magic#*:}" "$1" | cut -d: -f1 | head -n 5); do
      case "$tool" in
        xz) tail -c +$((off + 1)) "$1" | xz -dc --single-stream > "$2" 2>/dev/null ;;
        zstd) tail -c +$((off + 1)) "$1" | zstd -qdc > "$2" 2>/dev/null ;;
        gzip) tail -c +$((off + 1)) "$1" | gzip -dc > "$2" 2>/dev/null ;;
      esac
      [ "$(head -c 4 "$2" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && return 0
    done
  done
  rm -f "$2"; return 1
}
extract_vmlinux "$vmlinuz" "$tmp/vmlinux" || log "warning: could not extract an uncompressed vmlinux (skipped)"

# --- bootable disk (FAT superfloppy + syslinux) -------------------------------
cat > "$tmp/syslinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT qbuf
PROMPT 0
TIMEOUT 0
LABEL qbuf
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND console=ttyS0 quiet no_timer_check
EOF
fat=$tmp/disk.img
mkfs.vfat -C -n QBUFTEST "$fat" $((128 * 1024)) >/dev/null
mcopy -i "$fat" "$tmp/vmlinuz" "$tmp/initrd.img" "$tmp/syslinux.cfg" ::/
syslinux --install "$fat"
qemu-img convert -f raw -O qcow2 "$fat" "$tmp/disk.qcow2"

mv -f "$tmp/vmlinuz" "$out/vmlinuz"
if [ -s "$tmp/vmlinux" ]; then mv -f "$tmp/vmlinux" "$out/vmlinux"; else rm -f "$out/vmlinux"; fi
mv -f "$tmp/initrd.img" "$out/initrd.img"
mv -f "$tmp/disk.qcow2" "$out/disk.qcow2"
echo "$stamp_key" > "$out/.stamp"
echo "guest-build: built $out/{vmlinuz,$([ -s "$out/vmlinux" ] && echo vmlinux,)initrd.img,disk.qcow2}: kernel $kver ($kernel_ver), initrd $(du -k "$out/initrd.img" | cut -f1) KiB, ${#need_mod[@]} modules"
