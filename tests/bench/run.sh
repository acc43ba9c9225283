#!/usr/bin/env bash
# Benchmark harness for qbuf-qemu (run by hand; never part of `cargo test`).
# Measures each figure beside its floor and peer in the same run, over
# repeated rounds, and prints medians and ratios. See docs/benchmarks.md.
#
#   tests/bench/run.sh [--rounds N] [--status-runs N] [--markdown FILE]
#                      [--venv DIR] [--skip-qmp] [--skip-run] [--build-time]
#
# Environment:
#   QBUF_QEMU_BIN        the binary to measure (default: target/release/qbuf-qemu,
#                        built with 'cargo build --release' when missing)
#   QBUF_BENCH_SRC       the checkout whose 'cargo bench --bench qmp_roundtrip'
#                        runs and that --build-time clones (default: this one)
#   QBUF_TEST_GUEST_DIR  the test guest (default: tests/guest/out)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
timing=$here/timing.py
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"

rounds=5
status_runs=50
md_out=-
venv=
skip_qmp=0
skip_run=0
build_time=0
usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --status-runs) status_runs=$2; shift 2 ;;
    --markdown) md_out=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    --skip-qmp) skip_qmp=1; shift ;;
    --skip-run) skip_run=1; shift ;;
    --build-time) build_time=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --rounds needs a positive number" >&2; exit 2; }
[[ "$status_runs" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --status-runs needs a positive number" >&2; exit 2; }
if [ "$md_out" != - ]; then
  md_out=$(cd "$(dirname "$md_out")" && pwd)/$(basename "$md_out")
fi

log() { echo "bench: $(date -u +%T) $*" >&2; }

src=$(cd "${QBUF_BENCH_SRC:-$repo}" && pwd)
bin=${QBUF_QEMU_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/qbuf-qemu}
if [ ! -x "$bin" ]; then
  log "building $bin"
  (cd "$repo" && cargo build --release)
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
guest=$(cd "${QBUF_TEST_GUEST_DIR:-$repo/tests/guest/out}" && pwd)
for f in vmlinux initrd.img; do
  [ -s "$guest/$f" ] || { log "test guest file $guest/$f is missing: run tests/guest/build.sh"; exit 1; }
done
unset QBUF_QEMU_SYSTEM QBUF_QEMU_FIRMWARE QBUF_QEMU_STATE_DIR

# Short work dir: unix socket paths are limited to 107 bytes.
work=$(mktemp -d /tmp/qbb-XXXX)
state=$work/s
results=$work/results.tsv
: > "$results"
bg_pids=()

cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  end_run "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

median_of() { python3 -c 'import statistics,sys; print(statistics.median(map(float, open(sys.argv[1]).read().split())))' "$1"; }

q() { "$bin" --state-dir "$state" --name "$name" "$@"; }
# timing.py, waited for in the background so that a signal stops the run at once.
tm() {
  python3 "$timing" "$@" &
  local p=$!
  bg_pids+=("$p")
  wait "$p"
}
launch_args=(launch --kernel "$guest/vmlinux" --initrd "$guest/initrd.img" --append 'console=ttyS0 quiet'
             --memory 512M --ssh-port auto --accel tcg --no-share --timeout 300 --json)
marker='qbuf-test-guest: sshd ready'
peer_cap=120

# Starts the host-side serial watcher for instance $name; sets watcher.
watch_serial() {
  rm -f "$work/marker"
  python3 "$timing" serial "$state/instances/$name/serial.log" "$marker" "$work/marker" &
  watcher=$!
  bg_pids+=("$watcher")
}
marker_time() {
  # The guest printed the marker before sshd could answer: the watcher is done
  # by now, or within a moment.
  local i
  for i in $(seq 50); do kill -0 "$watcher" 2>/dev/null || break; sleep 0.1; done
  kill "$watcher" 2>/dev/null || true
  wait "$watcher" && [ -s "$work/marker" ] || {
    log "the '$marker' line never appeared in $state/instances/$name/serial.log (a test guest built before the marker? rebuild it with tests/guest/build.sh)"
    exit 1
  }
  cat "$work/marker"
}

# ssh argv from launch --json's ssh_command, with BatchMode=yes (as the tool's
# own readiness check) before the destination; sets ssh_cmd. ControlPath=none
# (given first, so it wins over the command's own): the floor and the peers
# are logins of their own, with a key exchange, not riding on the boot's
# shared connection.
ssh_argv() {
  mapfile -t ssh_cmd < <(python3 -c '
import json, shlex, sys
a = shlex.split(json.load(open(sys.argv[1]))["ssh_command"])
print("\n".join(a[:1] + ["-o", "BatchMode=yes", "-o", "ControlPath=none"] + sys.argv[2:] + a[1:]))' "$@")
}

cd "$work"
log "work dir $work; binary $bin"
if awk -v n="$(nproc)" '{exit !($1 > n / 2)}' /proc/loadavg; then
  log "warning: the host is busy (load average $(cut -d' ' -f1-3 /proc/loadavg)): figures will be noisy"
fi
log "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) RAM; $(qemu-system-x86_64 --version | head -1)"

for r in $(seq 1 "$rounds"); do
  # --- Round part 1: qbuf-qemu's own readiness, the ssh floor, status, RSS, stop.
  name=bench
  load=$(cut -d' ' -f1 /proc/loadavg)
  put load "$load"
  log "round $r/$rounds: launch (readiness, floor, status, RSS, stop); load average $load"
  watch_serial
  tm run "$work/launch.t" -- "$bin" --state-dir "$state" --name "$name" "${launch_args[@]}" \
    > "$work/launch.json"
  t_marker=$(marker_time)
  put ready "$(ms "$t_marker" "$(jget "$work/launch.t" end)")"

  ssh_argv "$work/launch.json"
  tm run "$work/ssh.t" -- "${ssh_cmd[@]}" true
  put ready_floor "$(ms "$(jget "$work/ssh.t" start)" "$(jget "$work/ssh.t" end)")"

  tm repeat "$status_runs" "$work/status.t" -- "$bin" --state-dir "$state" --name "$name" status --json
  put status "$(median_of "$work/status.t")"
  tm repeat "$status_runs" "$work/version.t" -- "$bin" --version
  put status_floor "$(median_of "$work/version.t")"

  qpid=$(jget "$work/launch.json" pid)
  spid=$(awk '{print $4}' "/proc/$qpid/stat")
  if tr '\0' ' ' < "/proc/$spid/cmdline" | grep -q -- ' __supervise'; then
    put rss "$(awk '/^VmRSS:/ {printf "%.2f", $2 / 1024}' "/proc/$spid/status")"
  else
    log "warning: QEMU's parent $spid is not 'qbuf-qemu __supervise'; no RSS figure this round"
  fi

  tm stop "$qpid" "$work/stop.t" -- "$bin" --state-dir "$state" --name "$name" powerdown --json \
    > "$work/powerdown.json"
  method=$(jget "$work/powerdown.json" method)
  [ "$method" = powerdown ] || log "warning: powerdown stopped the VM by '$method', not the guest's own shutdown"
  t_exit=$(jget "$work/stop.t" exit)
  put stop "$(ms "$t_exit" "$(jget "$work/stop.t" end)")"
  q events --json > "$work/events.json"
  t_shutdown=$(python3 -c 'import json,sys; print([e for e in json.load(open(sys.argv[1]))["events"] if e["event"] == "SHUTDOWN"][-1]["timestamp"])' "$work/events.json")
  put stop_floor "$(ms "$t_shutdown" "$t_exit")"
  q destroy --yes --json > /dev/null

  # --- Round part 2: the peer, a 1 s ssh retry loop started at launch time, on its own boot.
  for variant in plain ct1; do
    name=peer-$variant
    log "round $r/$rounds: launch --no-wait + 1 s retry loop ($variant)"
    watch_serial
    q "${launch_args[@]}" --no-wait > "$work/peer.json"
    if [ "$variant" = ct1 ]; then ssh_argv "$work/peer.json" -o ConnectTimeout=1; else ssh_argv "$work/peer.json"; fi
    # Capped at $peer_cap s: the plain loop's first ssh can hang in QEMU's user
    # network for minutes (see docs/benchmarks.md); a capped round counts at the cap.
    tm run "$work/peer.t" -- timeout "$peer_cap" bash -c 'until "$@" true 2>/dev/null; do sleep 1; done' _ "${ssh_cmd[@]}" || true
    t_marker=$(marker_time)
    key=ready_peer; [ "$variant" = ct1 ] && key=ready_peer_ct1
    case "$(jget "$work/peer.t" rc)" in
      0) ;;
      124)
        log "the $variant retry loop hit the ${peer_cap}s cap; the guest's own lines on its serial console:"
        grep -a 'qbuf-test-guest:' "$state/instances/$name/serial.log" >&2 || true
        put "${key}_capped" 1 ;;
      *) log "the $variant retry loop failed"; exit 1 ;;
    esac
    put "$key" "$(ms "$t_marker" "$(jget "$work/peer.t" end)")"
    q destroy --yes --json > /dev/null
  done
done

if [ "$skip_run" = 0 ]; then
  # `run`: cold boot vs from a snapshot, interleaved, one pair per round.
  log "run -- COMMAND: cold boot vs from a snapshot, $rounds rounds (run_start.py)"
  (cd "$repo" && QBUF_TEST_GUEST_DIR=$guest TMPDIR=$work tm run "$work/run_start.t" -- \
     python3 "$here/run_start.py" "$bin" "$rounds" --tsv "$results" > "$work/run_start.json")
fi

if [ "$skip_qmp" = 0 ]; then
  venv=${venv:-$work/venv}
  if ! "$venv/bin/python" -c 'import qemu.qmp' 2>/dev/null; then
    log "installing qemu.qmp from PyPI into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q qemu.qmp >&2
  fi
  log "QMP round trips: cargo bench --bench qmp_roundtrip in $src (with Python qemu.qmp $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("qemu.qmp"))'))"
  (cd "$src" && TMPDIR=$work QBUF_BENCH_PYTHON=$venv/bin/python QBUF_BENCH_ROUNDS=$rounds \
     cargo bench -q --bench qmp_roundtrip) | tee "$work/qmp.out" >&2
  line=$(grep '^RESULT ' "$work/qmp.out" | tail -1)
  for kv in ${line#RESULT }; do
    k=${kv%%=*}; v=${kv#*=}
    case "$k" in
      raw_us) put qmp_raw "$v" ;;
      ours_us) put qmp_ours "$v" ;;
      qapi_us) put qmp_qapi "$v" ;;
      python_us) put qmp_python "$v" ;;
      calls) put qmp_calls "$v" ;;
    esac
  done
fi

if [ "$build_time" = 1 ]; then
  log "release build from a fresh clone of $src (takes many minutes)"
  git -c advice.detachedHead=false clone -q "$src" "$work/clone"
  (cd "$work/clone" && CARGO_TARGET_DIR=$work/clone-target tm run "$work/build.t" -- cargo build --release -q)
  put build "$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); print(round(t["end"] - t["start"], 1))' "$work/build.t")"
fi

echo
echo "qbuf-qemu benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC'), $rounds rounds; $(nproc) cores; $(qemu-system-x86_64 --version | head -1)"
echo "binary: $bin"
echo
python3 "$timing" report "$results" "$md_out"
[ "$md_out" = - ] || log "markdown table written to $md_out"
