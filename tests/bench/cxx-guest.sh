#!/usr/bin/env bash
# Builds the C++ benchmark guest of docs/benchmarks.md ("C++ build and file
# microbench") into OUTDIR (default: tests/bench/out, git-ignored):
#
#   guest/vmlinux, guest/initrd.img  the test guest (tests/guest/build.sh) with
#                                    the ext4 and virtiofs modules added
#   rootfs.img   raw ext4 image: Debian bookworm minbase + g++, make, cmake
#                (debootstrap), with /opt/bench/{leveldb,microbench} in it
#   src/leveldb  the unpacked Debian source package the benchmark builds,
#                copied into the share at run time (cxx-guest-run.sh's cmake
#                options are leveldb's)
#
#   sudo tests/bench/cxx-guest.sh [OUTDIR]
#
# Idempotent: each part is redone only when its inputs changed. Needs root
# (debootstrap, chroot). Packages come from the Debian mirror in the host's
# own apt sources; no mounts and no loop devices are used. Not needed by
# `cargo test`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$here/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=$out/.cache
mkdir -p "$cache"
src_pkg=leveldb
suite=bookworm
guest_pkgs=g++,make,cmake

log() { echo "cxx-guest: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

export DEBIAN_FRONTEND=noninteractive
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
install_missing debootstrap e2fsprogs dpkg-dev
mirror=$(debian_mirror)

# --- kernel and initramfs: the test guest, plus ext4 and virtiofs ------------
# crc32c_generic: ext4 asks the crypto API for crc32c, which busybox modprobe
# would not find by its alias, so it is loaded by name.
QBUF_GUEST_EXTRA_MODULES="crc32c_generic ext4 virtiofs" "$repo/tests/guest/build.sh" "$out/guest" >&2
[ -s "$out/guest/vmlinux" ] || { log "tests/guest/build.sh made no vmlinux"; exit 1; }

# --- Debian root with the compiler (debootstrap minbase) ----------------------
root=$cache/root
root_key=$(echo "$suite $guest_pkgs minbase v1" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$cache/root.stamp" 2>/dev/null)" != "$root_key" ] || [ ! -x "$root/usr/bin/g++" ]; then
  rm -rf "$root" "$root.tmp" "$cache/root.stamp"
  mkdir -p "$cache/debs"
  log "debootstrap --variant=minbase --include=$guest_pkgs $suite (from the host's mirror; about 1-2 min)"
  debootstrap --variant=minbase --include="$guest_pkgs" --cache-dir="$cache/debs" "$suite" "$root.tmp" "$mirror" >&2
  rm -f "$root.tmp"/var/cache/apt/archives/*.deb
  rm -rf "$root.tmp"/var/lib/apt/lists/*
  echo qbuf-bench > "$root.tmp/etc/hostname"
  mv "$root.tmp" "$root"
  echo "$root_key" > "$cache/root.stamp"
fi

# --- the source package ---------------------------------------------------------
# A private apt state with one deb-src line for the same mirror: the host's apt
# sources are not touched.
apt_src=(-o "Dir::Etc::SourceList=$cache/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
         -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt/cache" -o APT::Sandbox::User=root)
mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial" "$cache/src"
printf 'deb-src %s %s main\n' "$mirror" "$suite" > "$cache/apt/sources.list"
dsc=$(ls "$cache/src/${src_pkg}"_*.dsc 2>/dev/null | head -n1 || true)
if [ -z "$dsc" ]; then
  log "fetching the source package $src_pkg ($suite)"
  apt-get "${apt_src[@]}" update -q >&2
  (cd "$cache/src" && apt-get "${apt_src[@]}" source -q --download-only "$src_pkg" >&2)
  dsc=$(ls "$cache/src/${src_pkg}"_*.dsc | head -n1)
fi
src_ver=$(sed -n 's/^Version: //p' "$dsc" | head -n1)
if [ "$(cat "$out/src/.version" 2>/dev/null)" != "$src_pkg $src_ver" ]; then
  rm -rf "$out/src"
  mkdir -p "$out/src"
  dpkg-source -q --no-check -x "$dsc" "$out/src/$src_pkg" >&2
  echo "$src_pkg $src_ver" > "$out/src/.version"
fi

# --- the ext4 image ---------------------------------------------------------------
img_key=$(
  {
    cat "$here/cxx-guest.sh" "$here/microbench.c"
    echo "$root_key $src_pkg $src_ver"
  } | sha256sum | cut -d' ' -f1
)
if [ "$(cat "$out/rootfs.stamp" 2>/dev/null)" = "$img_key" ] && [ -s "$out/rootfs.img" ]; then
  echo "cxx-guest: up to date: $out/{guest/vmlinux,guest/initrd.img,rootfs.img,src/$src_pkg} ($src_pkg $src_ver)"
  exit 0
fi
rm -f "$out/rootfs.stamp"
rm -rf "$root/opt/bench"
mkdir -p "$root/opt/bench" "$root/mnt/qbuf" "$root/mnt/tmpfs" "$root/bench"
cp -a "$out/src/$src_pkg" "$root/opt/bench/$src_pkg"
cp "$here/microbench.c" "$root/opt/bench/microbench.c"
chroot "$root" gcc -O2 -Wall -o /opt/bench/microbench /opt/bench/microbench.c
echo "$src_pkg $src_ver" > "$root/opt/bench/source-package"
# 4 GiB, sparse: the root is about 0.55 GB, a build adds well under 1 GB.
rm -f "$out/rootfs.img.tmp"
mkfs.ext4 -q -F -L qbufbench -E root_owner=0:0 -d "$root" "$out/rootfs.img.tmp" 4G >&2
mv -f "$out/rootfs.img.tmp" "$out/rootfs.img"
echo "$img_key" > "$out/rootfs.stamp"
log "built $out/{guest/vmlinux,guest/initrd.img,rootfs.img,src/$src_pkg}: $src_pkg $src_ver, image $(du -m "$out/rootfs.img" | cut -f1) MB used of 4 GiB"
