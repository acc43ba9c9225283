#!/usr/bin/env python3
"""C++ build and 1,000-file microbench: the share (virtio-fs, 9p) against the
guest's own disk, in one run. See docs/benchmarks.md ("C++ build and file
microbench"). A benchmark, run by hand; never part of `cargo test`.

  tests/bench/cxx_build.py [--share-types virtiofs,9p] [--micro-rounds N]
                           [--no-build] [--no-guest-build] [--tmpfs-build] [--cpus N] [--memory SIZE]
                           [--markdown FILE] [--keep-work]

It first runs tests/bench/cxx-guest.sh, which makes the guest in
tests/bench/out or finds it up to date, and runs as root for it (and because
the guest's root writes the share). For each share
type it boots the guest once with qbuf-qemu (`--accel tcg`, `--image` the
ext4 disk, `--share` a fresh directory holding a copy of the source tree)
and, over `qbuf-qemu ssh`, runs tests/bench/cxx-guest-run.sh there: the
microbench in /mnt/qbuf, on the ext4 disk and in a tmpfs, then the build
(cmake configure, then make -jCPUS) in /mnt/qbuf and on the disk (and in a
tmpfs with --tmpfs-build). The disk and tmpfs figures are thus measured in
every boot, beside the share's.

Environment: QBUF_QEMU_BIN (default target/release/qbuf-qemu),
QBUF_CXX_GUEST_DIR (default tests/bench/out).
"""

import argparse
import json
import shlex
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PHASES = ["create", "stat", "read", "stat_cold", "read_cold", "rm"]
PHASE_LABEL = {
    "create": "create 1,000 files (100 B each)",
    "stat": "stat 1,000",
    "read": "read 1,000",
    "stat_cold": "stat 1,000, caches dropped",
    "read_cold": "read 1,000, caches dropped",
    "rm": "rm -r (unlink 1,000, rmdir)",
}
FS_LABEL = {"virtiofs": "virtio-fs", "9p": "9p", "virtiofs-always": "virtio-fs, cache=always"}
# The share type qbuf-qemu is given for each bench share type, and the kind
# the guest must report at /mnt/qbuf. "virtiofs-always" is not a qbuf-qemu
# setting: it runs the same virtiofsd through a wrapper that swaps the tool's
# --cache=auto for --cache=always, to show what the targets would take and
# what it costs (the host-edit row).
BASE_TYPE = {"virtiofs": "virtiofs", "9p": "9p", "virtiofs-always": "virtiofs"}


def log(msg):
    print(f"cxx-bench: {time.strftime('%H:%M:%S', time.gmtime())} {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.bin = os.path.abspath(os.environ.get("QBUF_QEMU_BIN", os.path.join(REPO, "target/release/qbuf-qemu")))
        self.guest = os.path.abspath(os.environ.get("QBUF_CXX_GUEST_DIR", os.path.join(HERE, "out")))
        # Short: unix socket paths are limited to 107 bytes.
        self.work = tempfile.mkdtemp(prefix="qbc-", dir="/tmp")
        self.state = os.path.join(self.work, "s")
        self.names = []
        self.samples = []  # (share_type, place, metric, value)
        self.info = {}
        self.loads = []  # (moment, 1-min load average)

    def q(self, name, *a, check=True, capture=True, timeout=None, env=None):
        cmd = [self.bin, "--state-dir", self.state, "--name", name, *a]
        p = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True, timeout=timeout, env=env)
        if check and p.returncode != 0:
            raise SystemExit(f"cxx-bench: failed (exit {p.returncode}): {' '.join(cmd)}")
        return p.stdout if capture else ""

    def guest_run(self, name, *a):
        out = self.q(name, "ssh", "--", "sh", "/mnt/qbuf/cxx-guest-run.sh", *a)
        return [line.split() for line in out.splitlines() if line.strip()]

    def cleanup(self):
        for n in self.names:
            subprocess.run([self.bin, "--state-dir", self.state, "--name", n, "destroy", "--force", "--yes"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        # Anything still running that belongs to this run, by pid.
        for p in os.listdir("/proc"):
            if not p.isdigit() or int(p) == os.getpid():
                continue
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if (self.work + "/").encode() in cmdline:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except OSError:
                    pass
        if self.args.keep_work:
            log(f"work dir kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def boot(self, share_type):
        name = f"cxx-{share_type}"
        share = os.path.join(self.work, f"share-{share_type}")
        os.makedirs(os.path.join(share, "work"))
        src = os.path.join(self.guest, "src")
        pkg = next(d for d in os.listdir(src) if not d.startswith("."))
        shutil.copytree(os.path.join(src, pkg), os.path.join(share, "work", pkg), symlinks=True)
        shutil.copy(os.path.join(HERE, "cxx-guest-run.sh"), share)
        launch = ["launch", "--kernel", os.path.join(self.guest, "guest/vmlinux"),
                  "--initrd", os.path.join(self.guest, "guest/initrd.img"),
                  "--append", "console=ttyS0 quiet", "--image", os.path.join(self.guest, "rootfs.img"),
                  "--memory", self.args.memory, "--cpus", str(self.args.cpus), "--ssh-port", "auto",
                  "--accel", "tcg", "--share", share, "--ssh-user", "root", "--timeout", "240", "--json"]
        if self.share_type_flag:
            launch += ["--share-type", BASE_TYPE[share_type]]
        env = self.always_env() if share_type == "virtiofs-always" else None
        self.names.append(name)
        self.loads.append((f"at the {FS_LABEL[share_type]} boot", os.getloadavg()[0]))
        log(f"boot {len(self.names)}: {FS_LABEL[share_type]} share, {self.args.cpus} cpus, {self.args.memory}")
        # The busybox guest's kernel sometimes stalls at boot under TCG on a
        # loaded host (RCU: "timer wakeup didn't happen"; see
        # tests/support/mod.rs), and QEMU 10.0's TCG can abort early in a
        # boot: a failed boot is destroyed and tried again, up to 3 times.
        for attempt in range(1, 4):
            out = self.q(name, *launch, check=False, env=env)
            try:
                launched = json.loads(out)
                if launched.get("pid"):
                    break
            except ValueError:
                pass
            log(f"  boot attempt {attempt} failed (see above); destroying it" + ("" if attempt == 3 else ", trying again"))
            self.q(name, "destroy", "--force", "--yes", check=False)
        else:
            raise SystemExit(f"cxx-bench: the {share_type} guest did not boot in 3 attempts")
        status = json.loads(self.q(name, "status", "--json"))
        info = {k: v for k, v in ((r[0], " ".join(r[1:])) for r in self.guest_run(name, "setup"))}
        if info.get("share") != BASE_TYPE[share_type]:
            raise SystemExit(f"cxx-bench: asked for a {share_type} share, the guest has '{info.get('share')}' "
                             f"at /mnt/qbuf (status: {json.dumps(status.get('share', status))[:300]})")
        self.info[share_type] = info
        log(f"guest: {info}; qemu pid {launched.get('pid')}")

        self.host_edit(name, share_type, share)
        for place in ["share", "disk", "tmpfs"]:
            log(f"  microbench in {place} ({self.args.micro_rounds} rounds)")
            for row in self.guest_run(name, "micro", place, str(self.args.micro_rounds)):
                self.samples.append((share_type, place, row[2], float(row[3])))
        places = [] if self.args.no_build else ["share", "disk"] + (["tmpfs"] if self.args.tmpfs_build else [])
        for place in places:
            log(f"  build in {place} (make -j{self.args.cpus})")
            for row in self.guest_run(name, "build", place, str(self.args.cpus)):
                self.samples.append((share_type, place, f"build_{row[2]}", float(row[3])))
                log(f"    {row[2]}: {row[3]}")
        p = json.loads(self.q(name, "powerdown", "--json"))
        if p.get("method") != "powerdown":
            log(f"  warning: the VM was stopped by '{p.get('method')}'")
        self.q(name, "destroy", "--yes", "--json")

    def always_env(self):
        """An environment whose QBUF_QEMU_VIRTIOFSD is a wrapper running the
        real virtiofsd with --cache=always instead of --cache=auto."""
        real = os.environ.get("QBUF_QEMU_VIRTIOFSD") or shutil.which("virtiofsd")
        if not real:
            raise SystemExit("cxx-bench: virtiofs-always needs virtiofsd on PATH or in QBUF_QEMU_VIRTIOFSD")
        wrapper = os.path.join(self.work, "virtiofsd-always")
        with open(wrapper, "w") as f:
            f.write("#!/bin/sh\n"
                    "for a; do shift; [ \"$a\" = --cache=auto ] && a=--cache=always; set -- \"$@\" \"$a\"; done\n"
                    f"exec {shlex.quote(real)} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        return dict(os.environ, QBUF_QEMU_VIRTIOFSD=wrapper)

    def host_edit(self, name, share_type, share):
        """Is a file rewritten on the host seen by the guest 1 s later, after
        the guest has read (and may cache) the old content? 1 = yes."""
        path = os.path.join(share, "host-edit.txt")
        with open(path, "w") as f:
            f.write("before\n")
        self.q(name, "ssh", "--", "cat", "/mnt/qbuf/host-edit.txt")
        with open(path, "w") as f:
            f.write("after the host's edit\n")
        time.sleep(1.0)
        seen = self.q(name, "ssh", "--", "cat", "/mnt/qbuf/host-edit.txt").strip()
        ok = seen == "after the host's edit"
        log(f"  host edit seen after 1 s: {'yes' if ok else 'no (the guest read ' + repr(seen) + ')'}")
        self.samples.append((share_type, "share", "host_edit_seen", 1.0 if ok else 0.0))

    def values(self, share_type, place, metric):
        return [v for (t, p, m, v) in self.samples
                if (share_type is None or t == share_type) and p == place and m == metric]

    def report(self):
        types = self.args.share_types
        places = ["disk", "tmpfs"]

        def cell(vals, unit):
            if not vals:
                return "–"
            m = statistics.median(vals)
            if unit == "ms":
                s = f"{m * 1e3:.0f} ms" if m >= 0.1 else f"{m * 1e3:.1f} ms"
            else:
                s = f"{m:.0f} s"
            if unit == "s" and len(vals) > 1:
                s += " (" + ", ".join(f"{v:.0f}" for v in vals) + ")"
            return s

        def ratio(a, b):
            if not a or not b:
                return "–"
            return f"{statistics.median(a) / statistics.median(b):.2f}x"

        head = ["figure"] + [f"/mnt/qbuf over {FS_LABEL[t]}" for t in types] + ["guest disk (ext4)", "tmpfs"] \
            + [f"{FS_LABEL[t]} / disk (same boot)" for t in types] + ["target"]
        rows = []
        micro_target = {"stat": "share <= 2x disk", "read": "share <= 2x disk"}
        for ph in PHASES:
            r = [PHASE_LABEL[ph]]
            r += [cell(self.values(t, "share", ph), "ms") for t in types]
            r += [cell(self.values(None, p, ph), "ms") for p in places]
            r += [ratio(self.values(t, "share", ph), self.values(t, "disk", ph)) for t in types]
            r.append(micro_target.get(ph, "–"))
            rows.append(r)
        for metric, label, target in [("build_configure", "cmake configure", "–"),
                                      (f"build_make", f"make -j{self.args.cpus}", "share <= 1.25x disk")]:
            r = [label]
            r += [cell(self.values(t, "share", metric), "s") for t in types]
            r += [cell(self.values(None, p, metric), "s") for p in places]
            r += [ratio(self.values(t, "share", metric), self.values(t, "disk", metric)) for t in types]
            r.append(target)
            rows.append(r)
        seen = [self.values(t, "share", "host_edit_seen") for t in types]
        rows.append(["host edit seen by the guest 1 s later"]
                    + [("yes" if v and min(v) == 1.0 else "no") if v else "–" for v in seen]
                    + ["–", "–"] + ["–"] * len(types) + ["yes"])
        md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        n_micro = len(self.values(types[0], "share", "stat"))
        n_disk = len(self.values(None, "disk", "stat"))
        notes = [
            "",
            f"Microbench: median of {n_micro} rounds per share type and of {n_disk} rounds on the disk and in the tmpfs "
            f"({len(types)} boot{'s' if len(types) > 1 else ''} x {self.args.micro_rounds}); each figure is the whole "
            f"phase for 1,000 files. Build: median over boots, every sample in brackets (s). A ratio is the share's "
            f"median over the disk's median *in the same boot* (the host's load drifts between boots).",
            "",
            "Host 1-min load average: " + ", ".join(f"{k} {v:.2f}" for k, v in self.loads) + ".",
        ]
        raw = ["", "Every sample (share type of the boot, place, figure, seconds; build_objects is a count):", "", "```"]
        for t, p, m, v in self.samples:
            raw.append(f"{t:15} {p:6} {m:16} {v:.6f}")
        raw.append("```")
        guest = ["", "Guests: " + "; ".join(f"{FS_LABEL[t]} boot: " + ", ".join(f"{k} {v}" for k, v in i.items())
                                           for t, i in self.info.items())]
        text = "\n".join(md + notes + guest + raw) + "\n"
        print(text)
        if self.args.markdown:
            with open(self.args.markdown, "w") as f:
                f.write(text)
            log(f"markdown written to {self.args.markdown}")

    def run(self):
        if not self.args.no_guest_build:
            # Idempotent, and quick when the guest is up to date.
            subprocess.run([os.path.join(HERE, "cxx-guest.sh"), self.guest], check=True)
        for f in ["guest/vmlinux", "guest/initrd.img", "rootfs.img"]:
            if not os.path.exists(os.path.join(self.guest, f)):
                raise SystemExit(f"cxx-bench: {self.guest}/{f} is missing: run sudo tests/bench/cxx-guest.sh")
        if not os.access(self.bin, os.X_OK):
            log(f"building {self.bin}")
            subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
        helptext = subprocess.run([self.bin, "launch", "--help"], stdout=subprocess.PIPE, text=True).stdout
        self.share_type_flag = "--share-type" in helptext
        if not self.share_type_flag:
            if "virtiofs" in self.args.share_types:
                raise SystemExit("cxx-bench: this qbuf-qemu has no 'launch --share-type': give --share-types 9p")
            log("this qbuf-qemu has no 'launch --share-type': its default share (9p) is used")
        la = os.getloadavg()[0]
        if la > os.cpu_count() / 2:
            log(f"warning: the host is busy (load average {la:.2f}): figures will be noisy")
        qv = subprocess.run(["qemu-system-x86_64", "--version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0]
        log(f"work dir {self.work}; binary {self.bin}; {os.cpu_count()} host cores; {qv}")
        t0 = time.time()
        for t in self.args.share_types:
            self.boot(t)
        self.loads.append(("at the end", os.getloadavg()[0]))
        log(f"done in {time.time() - t0:.0f} s")
        self.report()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--share-types", default="virtiofs,9p",
                    help="comma-separated share types, one boot each (default: virtiofs,9p; also "
                         "virtiofs-always: virtiofsd with --cache=always instead of the tool's --cache=auto)")
    ap.add_argument("--micro-rounds", type=int, default=5, help="microbench rounds per place and boot (default 5)")
    ap.add_argument("--no-guest-build", action="store_true",
                    help="do not run cxx-guest.sh first (by default it runs: it makes or checks the guest)")
    ap.add_argument("--no-build", action="store_true", help="only the microbench (a quick check)")
    ap.add_argument("--tmpfs-build", action="store_true", help="also build in a tmpfs in each boot")
    ap.add_argument("--cpus", type=int, default=2, help="guest vCPUs, and make -jN (default 2)")
    ap.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    ap.add_argument("--markdown", help="write the table and the samples to this file too")
    ap.add_argument("--keep-work", action="store_true", help="keep the work dir (shares, state) for a look")
    args = ap.parse_args()
    args.share_types = [t.strip() for t in args.share_types.split(",") if t.strip()]
    for t in args.share_types:
        if t not in FS_LABEL:
            ap.error(f"unknown share type '{t}' (virtiofs, 9p or virtiofs-always)")
    if os.geteuid() != 0:
        ap.error("run as root (the guest's root writes the share)")
    b = Bench(args)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))
    try:
        b.run()
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        b.cleanup()


if __name__ == "__main__":
    main()
