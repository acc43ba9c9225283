#!/usr/bin/env bash
# Readiness on the OpenSSH guest (tests/bench/sshd-guest.sh): systemd, sshd
# with PAM and logind, a disk image, as the Guix image has them. Per round
# it boots the guest once per variant, one VM at a time, and times each
# from the guest's "sshd ready" line showing up on the host (serial log):
#
#   sshd_ready       `launch` (QBUF_QEMU_BIN) returns; then the floor, one
#                    more `ssh true` (ControlPath=none)
#   sshd_ready_peer  the same `launch` with QBUF_QEMU_PEER_BIN (when set)
#   sshd_first       `launch --no-wait`, nothing probes; at the marker one
#                    `ssh true` (the boot's first login), then a second one
#   sshd_nologind    as sshd_first, booted with qbuf.pam_systemd=0
#   sshd_usedns      as sshd_first, booted with qbuf.usedns=1
# and, for each boot, how many connections sshd saw closed before the key
# exchange (KEY_probes: banner probes, or their SYNs delivered late).
#
#   tests/bench/sshd-ready.sh [--rounds N] [--markdown FILE]
#
# Environment: QBUF_QEMU_BIN (default target/release/qbuf-qemu),
# QBUF_QEMU_PEER_BIN (another build to run `launch` beside it),
# QBUF_SSHD_GUEST_DIR (default tests/bench/out-sshd). See docs/benchmarks.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
timing=$here/timing.py
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"

rounds=4
md_out=-
usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --markdown) md_out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "sshd-ready.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "sshd-ready.sh: --rounds needs a positive number" >&2; exit 2; }
if [ "$md_out" != - ]; then
  md_out=$(cd "$(dirname "$md_out")" && pwd)/$(basename "$md_out")
fi

log() { echo "sshd-bench: $(date -u +%T) $*" >&2; }

bin=${QBUF_QEMU_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/qbuf-qemu}
[ -x "$bin" ] || { log "no binary $bin: cargo build --release, or set QBUF_QEMU_BIN"; exit 1; }
peer_bin=${QBUF_QEMU_PEER_BIN:-}
guest=$(cd "${QBUF_SSHD_GUEST_DIR:-$here/out-sshd}" && pwd)
for f in vmlinuz initrd.img rootfs.img; do
  [ -s "$guest/$f" ] || { log "$guest/$f is missing: run sudo tests/bench/sshd-guest.sh"; exit 1; }
done
unset QBUF_QEMU_SYSTEM QBUF_QEMU_FIRMWARE QBUF_QEMU_STATE_DIR

# Short work dir: unix socket paths are limited to 107 bytes.
work=$(mktemp -d /tmp/qbs-XXXX)
state=$work/s
results=$work/results.tsv
: > "$results"
watcher=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$watcher" ] && kill "$watcher" 2>/dev/null || true
  end_run "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


marker='qbuf-sshd-guest: sshd ready'
append='root=/dev/vda rw console=ttyS0 quiet'
# argv of `launch` with binary BIN as instance NAME, EXTRA on the kernel's
# command line; sets launch_cmd.
launch_argv() { # BIN NAME EXTRA [launch flags...]
  local b=$1 n=$2 extra=$3
  shift 3
  launch_cmd=("$b" --state-dir "$state" --name "$n" launch --image "$guest/rootfs.img" --kernel "$guest/vmlinuz"
    --initrd "$guest/initrd.img" --append "$append${extra:+ $extra}" --memory 1G --ssh-port auto --accel tcg
    --no-share --timeout 300 --json "$@")
}
# The serial watcher for instance NAME: timing.py serial in the background.
watch_serial() {
  rm -f "$work/marker"
  python3 "$timing" serial "$state/instances/$1/serial.log" "$marker" "$work/marker" &
  watcher=$!
}
# Waits for the watcher (in this shell: it is not a child of a subshell);
# sets t_marker.
marker_time() {
  wait "$watcher" && [ -s "$work/marker" ] || { log "no '$marker' line in $1's serial log"; exit 1; }
  watcher=
  t_marker=$(cat "$work/marker")
}
# ssh argv from launch --json's ssh_command: BatchMode=yes, as the tool's own
# login, and ControlPath=none, a login of its own (no shared connection).
ssh_argv() {
  mapfile -t ssh_cmd < <(python3 -c '
import json, shlex, sys
a = shlex.split(json.load(open(sys.argv[1]))["ssh_command"])
print("\n".join(a[:1] + ["-o", "BatchMode=yes", "-o", "ControlPath=none"] + a[1:]))' "$1")
}
# Connections sshd closed before the key exchange in this boot: probes, or
# QEMU delivering a probe's SYN late (docs/benchmarks.md).
probes_seen() {
  "${ssh_cmd[@]}" 'sudo journalctl -b -u ssh -o cat --no-pager | grep -c "kex_exchange_identification: Connection closed" || true'
}
# --force: QMP quit at once (exit 3: stopped past the guest's own shutdown).
destroy() {
  local rc=0
  "$bin" --state-dir "$state" --name "$1" destroy --force --yes --json > /dev/null || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 3 ] || { log "destroy $1 failed (exit $rc)"; exit 1; }
}

# `launch` with binary $1 as instance $2; key $3.
tool_boot() {
  local b=$1 n=$2 key=$3
  watch_serial "$n" # the instance dir appears at launch; timing.py waits for the log
  launch_argv "$b" "$n" ""
  python3 "$timing" run "$work/launch.t" -- "${launch_cmd[@]}" > "$work/launch.json" 2> "$work/launch.err" || true
  [ "$(jget "$work/launch.t" rc)" = 0 ] || { log "launch of $n failed:"; cat "$work/launch.err" >&2; exit 1; }
  marker_time "$n"
  put "$key" "$(ms "$t_marker" "$(jget "$work/launch.t" end)")"
  ssh_argv "$work/launch.json"
  if [ "$key" = sshd_ready ]; then
    python3 "$timing" run "$work/ssh.t" -- "${ssh_cmd[@]}" true
    put sshd_floor "$(ms "$(jget "$work/ssh.t" start)" "$(jget "$work/ssh.t" end)")"
  fi
  put "${key}_probes" "$(probes_seen)"
  destroy "$n"
}

# `launch --no-wait`, then at the marker one `ssh true`, then another.
login_boot() { # NAME KEY EXTRA-APPEND
  local n=$1 key=$2
  watch_serial "$n"
  launch_argv "$bin" "$n" "$3" --no-wait
  "${launch_cmd[@]}" > "$work/nowait.json" 2> "$work/launch.err"
  ssh_argv "$work/nowait.json"
  marker_time "$n"
  python3 "$timing" run "$work/ssh.t" -- "${ssh_cmd[@]}" true
  [ "$(jget "$work/ssh.t" rc)" = 0 ] || { log "the first login into $n failed"; exit 1; }
  put "$key" "$(ms "$t_marker" "$(jget "$work/ssh.t" end)")"
  python3 "$timing" run "$work/ssh2.t" -- "${ssh_cmd[@]}" true
  put "${key}_second" "$(ms "$(jget "$work/ssh2.t" start)" "$(jget "$work/ssh2.t" end)")"
  put "${key}_probes" "$(probes_seen)"
  destroy "$n"
}

log "work dir $work; binary $bin${peer_bin:+; peer binary $peer_bin}; guest $guest"
if awk -v n="$(nproc)" '{exit !($1 > n / 2)}' /proc/loadavg; then
  log "warning: the host is busy (load average $(cut -d' ' -f1-3 /proc/loadavg)): figures will be noisy"
fi
for r in $(seq 1 "$rounds"); do
  put load "$(cut -d' ' -f1 /proc/loadavg)"
  log "round $r/$rounds: launch"
  tool_boot "$bin" tool sshd_ready
  if [ -n "$peer_bin" ]; then
    log "round $r/$rounds: launch (peer binary)"
    tool_boot "$peer_bin" peer sshd_ready_peer
  fi
  log "round $r/$rounds: --no-wait, first login at the marker"
  login_boot first sshd_first ""
  log "round $r/$rounds: the same, qbuf.pam_systemd=0"
  login_boot nologind sshd_nologind qbuf.pam_systemd=0
  log "round $r/$rounds: the same, qbuf.usedns=1"
  login_boot usedns sshd_usedns qbuf.usedns=1
done

echo
echo "qbuf-qemu OpenSSH-guest readiness, $(date -u '+%Y-%m-%d %H:%M UTC'), $rounds rounds; $(nproc) cores; $(qemu-system-x86_64 --version | head -1)"
echo "binary: $bin${peer_bin:+; peer: $peer_bin}"
echo
python3 "$timing" report "$results" "$md_out"
