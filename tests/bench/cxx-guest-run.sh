#!/bin/sh
# Runs inside the C++ benchmark guest (tests/bench/cxx-guest.sh), as root,
# started by tests/bench/cxx_build.sh over `qbuf-qemu ssh`. The test guest's
# busybox init is PID 1; the Debian root with the compiler is the ext4 disk,
# used through chroot.
#
#   cxx-guest-run.sh setup                 mount the disk and prepare the chroot;
#                                          prints "share FSTYPE" and "disk DEV"
#   cxx-guest-run.sh micro WHERE ROUNDS    1,000-file microbench; prints
#                                          "micro WHERE PHASE SECONDS" per round
#   cxx-guest-run.sh build WHERE JOBS      configure and build the source package;
#                                          prints "build WHERE STEP SECONDS"
#
# WHERE: share (/mnt/qbuf, 9p or virtio-fs), disk (the ext4 disk), tmpfs.
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
R=/bench

die() { echo "cxx-guest-run: $*" >&2; exit 1; }

dir_of() { # WHERE -> directory inside the chroot
  case "$1" in
    share) echo /mnt/qbuf/work ;;
    disk) echo /var/tmp/bench ;;
    tmpfs) echo /mnt/tmpfs/bench ;;
    *) die "unknown place '$1' (share, disk or tmpfs)" ;;
  esac
}

in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 "$@"; }
now() { in_root date +%s.%N; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

setup() {
  # The share: the test guest's init mounts a 9p tag qbuf as the tool's guests
  # do; a virtio-fs tag qbuf is mounted here if init has not done it.
  if ! awk '$2 == "/mnt/qbuf" {f = 1} END {exit !f}' /proc/mounts; then
    modprobe virtiofs 2>/dev/null || true
    mount -t virtiofs qbuf /mnt/qbuf || die "no share at /mnt/qbuf (neither 9p nor virtio-fs tag qbuf)"
  fi
  fstype=$(awk '$2 == "/mnt/qbuf" {t = $3} END {print t}' /proc/mounts)
  # The guest's own disk: the ext4 boot disk (--image), /dev/vda.
  modprobe crc32c_generic 2>/dev/null || true
  modprobe ext4 2>/dev/null || true
  mkdir -p "$R"
  if ! awk -v r="$R" '$2 == r {f = 1} END {exit !f}' /proc/mounts; then
    dev=
    for d in /dev/vda /dev/vdb /dev/vdc; do
      [ -b "$d" ] || continue
      if mount -t ext4 -o noatime "$d" "$R" 2>/dev/null; then dev=$d; break; fi
    done
    [ -n "$dev" ] || die "no ext4 disk found (vda..vdc)"
    mount -t proc proc "$R/proc"
    mount -t sysfs sysfs "$R/sys"
    mount -o bind /dev "$R/dev"
    mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
    mount -t tmpfs -o mode=0755,size=1536M tmpfs "$R/mnt/tmpfs"
    mount -o bind /mnt/qbuf "$R/mnt/qbuf"
  fi
  dev=$(awk -v r="$R" '$2 == r {d = $1} END {print d}' /proc/mounts)
  echo "share $fstype"
  echo "disk $dev"
  echo "cpus $(grep -c '^processor' /proc/cpuinfo)"
  echo "mem_mib $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)"
  echo "kernel $(uname -r)"
  echo "gcc $(in_root g++ -dumpfullversion)"
}

micro() { # WHERE ROUNDS
  d=$(dir_of "$1")
  in_root rm -rf "$d/mb"
  in_root mkdir -p "$d"
  in_root /opt/bench/microbench "$d" 1000 "$2" | sed "s/^/micro $1 /"
}

build() { # WHERE JOBS
  d=$(dir_of "$1")
  pkg=$(cut -d' ' -f1 "$R/opt/bench/source-package")
  if [ "$1" != share ]; then
    # The host put a fresh copy into the share; elsewhere, copy the image's.
    in_root rm -rf "$d/$pkg"
    in_root mkdir -p "$d"
    in_root cp -a "/opt/bench/$pkg" "$d/$pkg"
  fi
  [ -f "$R$d/$pkg/CMakeLists.txt" ] || die "no $d/$pkg/CMakeLists.txt"
  in_root rm -rf "$d/$pkg/build"
  drop_caches
  t0=$(now)
  in_root sh -c "mkdir '$d/$pkg/build' && cd '$d/$pkg/build' && cmake -DCMAKE_BUILD_TYPE=Debug -DLEVELDB_BUILD_TESTS=OFF -DLEVELDB_BUILD_BENCHMARKS=OFF .. > ../cmake.log 2>&1" ||
    { tail -n 20 "$R$d/$pkg/cmake.log" >&2; die "cmake failed in $1"; }
  t1=$(now)
  drop_caches
  t2=$(now)
  in_root sh -c "cd '$d/$pkg/build' && make -j$2 > ../make.log 2>&1" ||
    { tail -n 20 "$R$d/$pkg/make.log" >&2; die "make failed in $1"; }
  t3=$(now)
  objs=$(in_root find "$d/$pkg/build" -name '*.o' | wc -l)
  [ -s "$R$d/$pkg/build/lib$pkg.a" ] || die "no lib$pkg.a after make in $1"
  echo "build $1 configure $(echo "$t1 $t0" | awk '{printf "%.3f", $1 - $2}')"
  echo "build $1 make $(echo "$t3 $t2" | awk '{printf "%.3f", $1 - $2}')"
  echo "build $1 objects $objs"
}

case "${1:-}" in
  setup) setup ;;
  micro) [ $# = 3 ] || die "usage: micro WHERE ROUNDS"; micro "$2" "$3" ;;
  build) [ $# = 3 ] || die "usage: build WHERE JOBS"; build "$2" "$3" ;;
  *) die "usage: cxx-guest-run.sh setup | micro WHERE ROUNDS | build WHERE JOBS" ;;
esac
