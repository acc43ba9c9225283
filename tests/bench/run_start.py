#!/usr/bin/env python3
"""`qbuf-qemu run`: cold boot vs from a snapshot, side by side in one run.

For each round, interleaved: `run -- sh -c 'echo started; true'` booting the
test guest, and the same from a snapshot of a booted test guest. Measured on
the host: from starting `run` to the first line of COMMAND's output
(COMMAND started) and to `run` returning (the whole run, VM stopped and
removed). Prints medians and the ratio.

Usage: tests/bench/run_start.py QBUF_QEMU_BIN [ROUNDS] [--tsv FILE]   (run from the repo)
With --tsv, each round's figures (ms) are appended to FILE as `key value`
lines, the harness's results file (tests/bench/run.sh runs it so).
Targets: from a snapshot, COMMAND starts within 0.7 s (issue: CI-hard; it
was 1.5 s) and the whole `run -- true` takes at most 2.5 s. The snapshot
runs' summary phases (`qemu_up`: QEMU up and the state loaded; `boot`: a
login worked; `command`) show where the time goes.
"""
import json, os, shutil, statistics, subprocess, sys, tempfile, time

ARGS = [a for a in sys.argv[1:]]
TSV = None
if "--tsv" in ARGS:
    i = ARGS.index("--tsv")
    TSV = ARGS[i + 1]
    del ARGS[i:i + 2]
BIN = ARGS[0] if len(ARGS) > 0 else "target/release/qbuf-qemu"
ROUNDS = int(ARGS[1]) if len(ARGS) > 1 else 5
GUEST = os.environ.get("QBUF_TEST_GUEST_DIR", "tests/guest/out")
BOOT = ["--kernel", f"{GUEST}/vmlinux", "--initrd", f"{GUEST}/initrd.img", "--append", "console=ttyS0 quiet",
        "--image", f"{GUEST}/disk.qcow2", "--memory", "512M", "--accel", "tcg", "--no-share", "--ssh-user", "root"]


def q(state, *args, **kw):
    return subprocess.run([BIN, "--state-dir", state, *args], capture_output=True, text=True, **kw)


def timed_run(state, extra, phases=None):
    """Seconds to COMMAND's first output line, and to run's end. With
    `phases` (a dict), the summary's phases are added to it."""
    summary = os.path.join(state, "summary.json")
    if phases is not None:
        extra = [*extra, "--summary", summary]
    start = time.monotonic()
    p = subprocess.Popen([BIN, "--state-dir", state, "-q", "run", *extra, "--", "sh", "-c", "echo started"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    first = time.monotonic() - start
    p.communicate()
    total = time.monotonic() - start
    if line.strip() != "started" or p.returncode != 0:
        sys.exit(f"run failed ({p.returncode}): {line!r}")
    if phases is not None:
        with open(summary) as f:
            for k, v in json.load(f).get("phases", {}).items():
                if v is not None:
                    phases.setdefault(k, []).append(v)
    return first, total


def main():
    state = tempfile.mkdtemp(prefix="qbr-", dir=os.environ.get("TMPDIR", "/tmp"))
    try:
        r = q(state, "--name", "warm", "launch", *BOOT, "--ssh-port", "auto", "--timeout", "300")
        if r.returncode != 0:
            sys.exit(r.stderr)
        r = q(state, "--name", "warm", "snapshot", "save", "ready")
        if r.returncode != 0:
            sys.exit(r.stderr)
        q(state, "--name", "warm", "powerdown")
        cold, warm, phases = [], [], {}
        for i in range(ROUNDS):
            cold.append(timed_run(state, BOOT))
            warm.append(timed_run(state, ["--name", "warm", "--from-snapshot", "ready"], phases))
            print(f"round {i + 1}: cold {cold[-1][0]:.2f}s/{cold[-1][1]:.2f}s  "
                  f"snapshot {warm[-1][0]:.2f}s/{warm[-1][1]:.2f}s", file=sys.stderr)
            if TSV:
                with open(TSV, "a") as f:
                    for key, (start, total) in (("run_cold", cold[-1]), ("run_snap", warm[-1])):
                        f.write(f"{key}_start {start * 1e3:.1f}\n{key}_total {total * 1e3:.1f}\n")
                    # The summary's view of the same run: where the time went.
                    for key in ("qemu_up", "boot", "command"):
                        if key in phases:
                            f.write(f"run_snap_{key} {phases[key][-1] * 1e3:.1f}\n")
        med = lambda xs, k: statistics.median(x[k] for x in xs)
        out = {
            "rounds": ROUNDS,
            "cold_command_start_s": med(cold, 0), "cold_total_s": med(cold, 1),
            "snapshot_command_start_s": med(warm, 0), "snapshot_total_s": med(warm, 1),
        }
        out["command_start_ratio"] = out["cold_command_start_s"] / out["snapshot_command_start_s"]
        out["snapshot_phases_s"] = {k: statistics.median(v) for k, v in phases.items()}
        print(json.dumps(out, indent=2))
    finally:
        q(state, "--name", "warm", "destroy", "--yes")
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
