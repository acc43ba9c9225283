"""Timing helpers for tests/bench/run.sh (stdlib only).

Every timestamp is wall-clock time.time() (CLOCK_REALTIME), the clock QEMU
stamps its QMP events with, so stamps from different processes compare.

  serial LOG MARKER OUT      wait for LOG to exist, poll it every ~1 ms, and
                             write the time MARKER first appears to OUT
  run OUT -- CMD...          run CMD (stdout passed through), write
                             {"start", "end", "rc"} to OUT
  stop PID OUT -- CMD...     run CMD while polling /proc/PID/stat every
                             ~1 ms; write {"exit" (first moment PID is a
                             zombie or gone), "start", "end", "rc"} to OUT
  repeat N OUT -- CMD...     run CMD N times (stdout discarded), write the
                             wall time of each run in ms to OUT
  report TSV MDOUT           medians and ratios of run.sh's per-round values:
                             a table on stdout, markdown rows to MDOUT
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time


CHILD = None


def on_term(signum, frame):
    """run.sh's cleanup sends SIGTERM: pass it on to the measured command."""
    if CHILD is not None and CHILD.poll() is None:
        CHILD.terminate()
    sys.exit(128 + signum)


def call(cmd, **kw):
    global CHILD
    CHILD = subprocess.Popen(cmd, **kw)
    return CHILD.wait()


def cmd_after_dashes(args):
    i = args.index("--")
    return args[:i], args[i + 1:]


def serial(log, marker, out, timeout=600.0):
    marker = marker.encode()
    end = time.time() + timeout
    buf = b""
    f = None
    while time.time() < end:
        if f is None:
            try:
                f = open(log, "rb")
            except FileNotFoundError:
                time.sleep(0.001)
                continue
        chunk = f.read()
        if chunk:
            now = time.time()
            buf += chunk
            if marker in buf:
                with open(out, "w") as o:
                    o.write(f"{now:.6f}\n")
                return 0
            buf = buf[-len(marker):]
        else:
            time.sleep(0.001)
    print(f"timing.py: marker {marker!r} not seen in {log}", file=sys.stderr)
    return 1


def run(out, cmd):
    start = time.time()
    rc = call(cmd)
    end = time.time()
    with open(out, "w") as o:
        json.dump({"start": start, "end": end, "rc": rc}, o)
    return rc


def proc_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return s.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def stop(pid, out, cmd):
    seen = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            if proc_gone(pid):
                seen["exit"] = time.time()
                return
            time.sleep(0.001)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    start = time.time()
    rc = call(cmd)
    end = time.time()
    done.set()
    w.join()
    with open(out, "w") as o:
        json.dump({"exit": seen.get("exit"), "start": start, "end": end, "rc": rc}, o)
    return rc


def repeat(n, out, cmd):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        rc = call(cmd, stdout=subprocess.DEVNULL)
        times.append((time.perf_counter() - t) * 1e3)
        if rc != 0:
            print(f"timing.py: {cmd} exited {rc}", file=sys.stderr)
            return rc
    with open(out, "w") as o:
        o.write(" ".join(f"{x:.3f}" for x in times) + "\n")
    return 0


# Rows of the report: (key, label, unit, floor keys, peer keys, target).
ROWS = [
    ("ready", "readiness: sshd marker -> `launch` returns", "ms", ["ready_floor"], ["ready_peer", "ready_peer_ct1"], None),
    ("stop", "stop: QEMU exit -> `powerdown` returns", "ms", ["stop_floor"], [], "<= 50 ms"),
    ("status", "`status --json`, whole process (median of each round)", "ms", ["status_floor"], [], "<= 10 ms"),
    ("qmp_ours", "QMP `query-status` round trip, qbuf-qemu client", "us", ["qmp_raw"], ["qmp_qapi", "qmp_python"], "<= 1.1x raw"),
    ("rss", "supervisor VmRSS while the VM runs", "MiB", [], [], "<= 10 MiB"),
    ("run_snap_start", "`run` from a snapshot: `run` starts -> COMMAND starts", "ms", [], ["run_cold_start"], "<= 0.7 s"),
    ("run_snap_qemu_up", "… of which, by the run's summary: `run` starts -> QEMU up, state loaded (`qemu_up`)", "ms", [], [], None),
    ("run_snap_boot", "… `run` starts -> the first login worked, clock set (`boot`)", "ms", [], [], None),
    ("run_snap_command", "… COMMAND `sh -c 'echo started'` over the shared connection (`command`)", "ms", [], [], None),
    ("run_snap_total", "`run -- true` from a snapshot, whole (VM stopped and removed)", "ms", [], ["run_cold_total"], "<= 2.5 s"),
    ("sshd_ready", "OpenSSH guest: sshd marker -> `launch` returns", "ms", ["sshd_floor"], ["sshd_first", "sshd_ready_peer"], None),
    ("sshd_first", "OpenSSH guest, nothing probing: sshd marker -> first `ssh true` returns", "ms", ["sshd_first_second"], ["sshd_nologind", "sshd_usedns"], None),
    ("sshd_ready_probes", "OpenSSH guest: connections sshd saw closed before the key exchange, `launch` boot", "", [], ["sshd_ready_peer_probes", "sshd_first_probes"], None),
    ("build", "`cargo build --release` in a fresh clone", "s", [], [], None),
    ("load", "host 1-min load average at each round's start (includes the harness's own last guest)", "", [], [], "quiet host: about 1"),
]
LABELS = {
    "ready_floor": "one `ssh true` into the ready guest",
    "ready_peer": "`until ssh … true; do sleep 1; done` from launch (own boot)",
    "ready_peer_ct1": "same loop with `-o ConnectTimeout=1` (own boot)",
    "stop_floor": "QMP SHUTDOWN event -> QEMU exit",
    "status_floor": "`qbuf-qemu --version`, whole process",
    "qmp_raw": "raw socket",
    "qmp_qapi": "qapi QmpStreamTokio",
    "qmp_python": "Python qemu.qmp",
    "sshd_floor": "one more `ssh true` (ControlPath=none)",
    "sshd_first": "`launch --no-wait`, first `ssh true` at the marker (own boot)",
    "sshd_ready_peer": "`launch`, peer binary (own boot)",
    "sshd_first_second": "a second `ssh true` right after it",
    "sshd_nologind": "the same, booted without pam_systemd (own boot)",
    "sshd_usedns": "the same, booted with sshd `UseDNS yes` (own boot)",
    "sshd_ready_peer_probes": "`launch` boot, peer binary",
    "sshd_first_probes": "`--no-wait` boot, nothing probing",
    "run_cold_start": "the same `run` booting the guest (cold)",
    "run_cold_total": "the same `run` booting the guest (cold)",
}


def fmt(x, unit):
    if unit == "ms" and x >= 10000:
        return f"{x / 1000:.1f} s"
    if unit in ("us", "ms"):
        return f"{x:.1f} {unit}" if x < 100 else f"{x:.0f} {unit}"
    if unit == "":
        return f"{x:.2f}"
    if unit == "MiB":
        return f"{x:.1f} MiB"
    return f"{x:.0f} s"


def report(tsv, mdout):
    vals = {}
    with open(tsv) as f:
        for line in f:
            k, v = line.split()
            vals.setdefault(k, []).append(float(v))
    med = {k: statistics.median(v) for k, v in vals.items()}
    n = {k: len(v) for k, v in vals.items()}

    def others(keys, m, unit):
        cells = []
        for k in keys:
            if k not in med:
                continue
            nk = f"{med['qmp_calls']:.0f} calls" if k.startswith("qmp_") and "qmp_calls" in med else f"n={n[k]}"
            ratio = f"{m / med[k]:.2f}x" if med[k] else "–"
            c = f"{LABELS[k]}: {fmt(med[k], unit)} ({nk}); {ratio}"
            capped = int(sum(vals.get(k + "_capped", [])))
            if capped:
                c += f" ({capped} of {n[k]} stopped by the run's time cap: a lower bound)"
            cells.append(c)
        return cells or ["–"]

    rows = []
    for key, label, unit, floors, peers, target in ROWS:
        if key not in med:
            continue
        m = med[key]
        fig = f"{fmt(m, unit)} (n={n[key]})"
        if key.startswith("qmp_") and "qmp_calls" in med:
            # One median over all calls of every round.
            fig = f"{fmt(m, unit)} ({med['qmp_calls']:.0f} calls)"
        if key == "rss":
            fig = f"{fmt(m, unit)} (max {max(vals[key]):.1f}, n={n[key]})"
        rows.append([label, fig, others(floors, m, unit), others(peers, m, unit), target or "–"])
    head = ["figure", "median", "floor: median; figure/floor", "peer: median; figure/peer", "target"]

    # Console: one line per comparison.
    flat = []
    for r in rows:
        for i in range(max(len(r[2]), len(r[3]))):
            first = i == 0
            flat.append([
                r[0] if first else "", r[1] if first else "",
                r[2][i] if i < len(r[2]) else "", r[3][i] if i < len(r[3]) else "", r[4] if first else "",
            ])
    widths = [max(len(r[i]) for r in flat + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in flat:
        print(line(r))

    print("\nevery value (in measurement order):")
    for k, v in vals.items():
        if not k.endswith("_capped") and k != "qmp_calls":
            print(f"  {k:<16} " + " ".join(f"{x:g}" for x in v))

    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join([r[0], r[1], "<br>".join(r[2]), "<br>".join(r[3]), r[4]]) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    if mdout == "-":
        sys.stdout.write("\n" + text)
    else:
        with open(mdout, "w") as o:
            o.write(text)
    return 0


def main(argv):
    sub = argv[0]
    if sub == "serial":
        return serial(argv[1], argv[2], argv[3])
    if sub == "report":
        return report(argv[1], argv[2])
    head, cmd = cmd_after_dashes(argv[1:])
    if sub == "run":
        return run(head[0], cmd)
    if sub == "stop":
        return stop(int(head[0]), head[1], cmd)
    if sub == "repeat":
        return repeat(int(head[0]), head[1], cmd)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_term)
    sys.exit(main(sys.argv[1:]))
