#!/usr/bin/env python3
"""Boots the test guest under QEMU (TCG) with the command line qbuf-qemu uses
and checks what the guest promises (see README.md). Stdlib only.

  tests/guest/smoke.py [--qemu 10|7.2|PATH] [--boot kernel|disk|both] [--out DIR]

Prints one line per check and 'N passed, N failed' at the end; exit 1 on failure.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
QEMU72 = "/opt/qbuf-qemu-test/qemu-7.2"

results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def qemu_cmd(which):
    if which == "10":
        return ["qemu-system-x86_64"]
    if which == "7.2":
        # 7.2 is unpacked, not installed: its firmware search path (relative
        # to the binary) lacks seabios and ipxe, so name them too.
        return [f"{QEMU72}/usr/bin/qemu-system-x86_64", "-L", f"{QEMU72}/usr/share/qemu",
                "-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu"]
    return [which]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Qmp:
    def __init__(self, path, timeout=10):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""
        self.events = []
        self.recv()  # greeting
        self.cmd("qmp_capabilities")

    def recv(self, timeout=30):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("QMP closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.recv()
            if "event" in r:
                self.events.append(r)
                continue
            return r

    def wait_event(self, name, timeout):
        for e in self.events:
            if e["event"] == name:
                return e
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                r = self.recv(timeout=max(0.1, deadline - time.time()))
            except (socket.timeout, EOFError):
                break
            if "event" in r:
                self.events.append(r)
                if r["event"] == name:
                    return r
        return None


class Vm:
    def __init__(self, args, d, boot, append_extra="", overlay=None):
        self.d = d
        self.port = free_port()
        self.key = os.path.join(d, "key")
        self.share = os.path.join(d, "share")
        self.known = os.path.join(d, "known_hosts")
        overlay = overlay or os.path.join(d, "overlay.qcow2")
        cmd = qemu_cmd(args.qemu) + [
            "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "512M",
            "-chardev", f"socket,id=qmp,path={d}/qmp.sock,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=serial0,path={d}/console.sock,server=on,wait=off,logfile={d}/serial.log,logappend=on",
            "-serial", "chardev:serial0",
            "-device", "pcie-root-port,id=hp0,chassis=1,bus=pcie.0,addr=0x10",
            "-device", "pcie-root-port,id=hp1,chassis=2,bus=pcie.0,addr=0x11",
        ]
        if boot == "disk" or args.kernel_with_disk:
            cmd += [
                "-blockdev", f"driver=file,node-name=disk0-file,filename={overlay}",
                "-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
                # With -kernel, QEMU (7.2 and 10) gives bootindex 0 to its linuxboot
                # option ROM: a disk with bootindex=0 is then refused at startup.
                "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev" + (",bootindex=0" if boot == "disk" else ""),
            ]
        cmd += [
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.port}-:22", "-device", "virtio-net-pci,netdev=net0",
            "-fsdev", f"local,id=share0,path={self.share},security_model=none",
            "-device", "virtio-9p-pci,fsdev=share0,mount_tag=qbuf",
            "-fw_cfg", f"name=opt/org.qbuf/authorized_keys,file={self.key}.pub",
        ]
        if boot == "kernel":
            cmd += ["-kernel", f"{args.out}/{args.kernel}", "-initrd", f"{args.out}/initrd.img",
                    "-append", ("console=ttyS0 " + append_extra).strip()]
        self.serial_log = os.path.join(d, "serial.log")
        self.log_start = os.path.getsize(self.serial_log) if os.path.exists(self.serial_log) else 0
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=open(os.path.join(d, "qemu.out"), "ab"), stderr=subprocess.STDOUT)
        self.qmp = Qmp(f"{d}/qmp.sock")

    def serial(self):
        try:
            with open(self.serial_log, "rb") as f:
                f.seek(self.log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def ssh(self, user, command, timeout=60, check_rc=True):
        r = subprocess.run(
            ["ssh", "-p", str(self.port), "-i", self.key, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
             "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.known}", "-o", "LogLevel=ERROR",
             f"{user}@127.0.0.1", command],
            capture_output=True, text=True, timeout=timeout)
        return r

    def wait_ssh(self, timeout=120):
        """Waits for the ready line on the serial console, then for 'ssh dev@ true'.
        Returns seconds from QEMU start to the first successful ssh (None on failure);
        self.t_ready is the time to the ready line."""
        deadline = time.time() + timeout
        self.t_ready = None
        while time.time() < deadline and self.proc.poll() is None:
            if "qbuf-test-guest: ready" in self.serial():
                self.t_ready = time.time() - self.t0
                break
            time.sleep(0.05)
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return None
            try:
                r = self.ssh("dev", "true", timeout=20)
                if r.returncode == 0:
                    return time.time() - self.t0
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.2)
        return None

    def host_key(self):
        r = subprocess.run(["ssh-keyscan", "-p", str(self.port), "-t", "ed25519", "127.0.0.1"],
                           capture_output=True, text=True, timeout=30)
        return " ".join(r.stdout.split()[1:3]) if r.stdout else ""

    def kill(self):
        if self.proc.poll() is None:
            try:
                self.qmp.cmd("quit")
            except Exception:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def console_prompt(vm):
    """Attach to the serial console socket, press Enter, expect the root prompt, run a command."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(f"{vm.d}/console.sock")
    s.settimeout(1)
    got = b""
    deadline = time.time() + 20
    s.sendall(b"\r")
    sent_cmd = False
    while time.time() < deadline:
        try:
            data = s.recv(4096)
            if not data:
                break
            got += data
        except socket.timeout:
            s.sendall(b"\r")
        if not sent_cmd and b"qbuf-test# " in got:
            s.sendall(b"echo console-$((40+2))\r")
            sent_cmd = True
        if b"console-42" in got:
            break
    s.close()
    return b"qbuf-test# " in got and b"console-42" in got, got.decode(errors="replace")[-200:]


def powerdown(vm, name):
    r = vm.qmp.cmd("system_powerdown")
    ev = vm.qmp.wait_event("SHUTDOWN", 60)
    try:
        vm.proc.wait(30)
        exited = True
    except subprocess.TimeoutExpired:
        exited = False
    data = ev.get("data", {}) if ev else {}
    check(f"{name}: system_powerdown -> SHUTDOWN guest=true reason=guest-shutdown, QEMU exits",
          "return" in r and ev is not None and data.get("guest") is True and data.get("reason") == "guest-shutdown"
          and exited, json.dumps(data) + f", exited={exited}")


def run(args, boot):
    tag = f"qemu {args.qemu} {boot} boot" + (f" ({args.kernel}{' +disk' if args.kernel_with_disk else ''})" if boot == "kernel" else "")
    d = tempfile.mkdtemp(prefix="qbuf-guest-")
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, "key")], check=True)
        os.makedirs(os.path.join(d, "share"))
        if os.getuid() == 0:
            # 9p with security_model=none: the guest's dev (uid 1000) writes only
            # where the host lets uid 1000 write.
            os.chown(d, 1000, 1000)
            os.chown(os.path.join(d, "share"), 1000, 1000)
        with open(os.path.join(d, "share", "from-host.txt"), "w") as f:
            f.write("hello from host\n")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        os.path.join(args.out, "disk.qcow2"), os.path.join(d, "overlay.qcow2")], check=True)

        vm = Vm(args, d, boot)
        try:
            t = vm.wait_ssh()
            if not check(f"{tag}: ssh dev@ true", t is not None, f"ready line {vm.t_ready:.1f}s, ssh ok {t:.1f}s after QEMU start" if t else ""):
                print(vm.serial()[-3000:])
                return
            ready = [l for l in vm.serial().splitlines() if "qbuf-test-guest: ready" in l]
            check(f"{tag}: serial console shows ready line", bool(ready), ready[0].strip() if ready else "")
            r = vm.ssh("root", "id -u; hostname")
            check(f"{tag}: ssh root@ works, hostname qbuf-test", r.stdout.split() == ["0", "qbuf-test"], r.stdout.strip())
            r = vm.ssh("dev", "sudo -n id -u")
            check(f"{tag}: dev's sudo -n needs no password", r.returncode == 0 and r.stdout.strip() == "0",
                  (r.stdout + r.stderr).strip())
            r = vm.ssh("nosudo", "id -u; sudo -n id -u")
            check(f"{tag}: nosudo logs in, its sudo -n is refused (a password is required)",
                  r.returncode != 0 and r.stdout.split() == ["1001"] and "a password is required" in r.stderr,
                  (r.stdout + r.stderr).strip().replace("\n", " | "))
            r = vm.ssh("dev", "cd /mnt/qbuf && ls && cat from-host.txt && id")
            check(f"{tag}: dev reads 9p share", "from-host.txt" in r.stdout and "hello from host" in r.stdout
                  and "uid=1000(dev)" in r.stdout, r.stdout.strip().replace("\n", " | "))
            r = vm.ssh("dev", "echo written-by-dev > /mnt/qbuf/from-guest.txt && sync")
            p = os.path.join(d, "share", "from-guest.txt")
            ok = r.returncode == 0 and os.path.exists(p) and open(p).read() == "written-by-dev\n"
            check(f"{tag}: file written by dev appears on host", ok,
                  f"owner uid {os.stat(p).st_uid}" if os.path.exists(p) else r.stderr.strip())
            r = vm.ssh("dev", "echo data > /data/dev-file && cat /data/dev-file && mount | grep ' /data '")
            check(f"{tag}: dev writes /data", r.returncode == 0 and "data" in r.stdout,
                  r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr.strip())
            r = vm.ssh("root", "ls /sys/module | grep -E '^(virtio_pci|virtio_blk|virtio_net|virtio_console|9p|9pnet_virtio|button|evdev|qemu_fw_cfg|vfat)$' | tr '\\n' ' '; pidof dropbear acpid >/dev/null && echo daemons-ok")
            check(f"{tag}: modules loaded, dropbear+acpid running", "daemons-ok" in r.stdout and len(r.stdout.split()) >= 11,
                  r.stdout.strip())
            rs = subprocess.run(["scp", "-P", str(vm.port), "-i", vm.key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                                 "-o", f"UserKnownHostsFile={vm.known}", "-o", "LogLevel=ERROR",
                                 os.path.join(d, "share", "from-host.txt"), "dev@127.0.0.1:/tmp/scp.txt"],
                                capture_output=True, text=True, timeout=60)
            check(f"{tag}: scp (sftp protocol) to guest", rs.returncode == 0, rs.stderr.strip())

            # Hot-plug a disk into root port hp0.
            hp = os.path.join(d, "hot.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", hp, "64M"], check=True)
            r1 = vm.qmp.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "hot0",
                                                "file": {"driver": "file", "filename": hp}})
            r2 = vm.qmp.cmd("device_add", driver="virtio-blk-pci", bus="hp0", id="hot0-dev", drive="hot0")
            want = "vdb" if (boot == "disk" or args.kernel_with_disk) else "vda"
            seen = False
            deadline = time.time() + 30
            while time.time() < deadline and not seen:
                r = vm.ssh("root", f"cat /sys/block/{want}/size 2>/dev/null")
                seen = r.stdout.strip() == str(64 * 1024 * 1024 // 512)
                if not seen:
                    time.sleep(1)
            check(f"{tag}: hot-plugged disk appears as /sys/block/{want}", "return" in r1 and "return" in r2 and seen,
                  f"blockdev-add {list(r1)[0]}, device_add {list(r2)[0]}")

            ok, tail = console_prompt(vm)
            check(f"{tag}: serial console gives a root prompt", ok, repr(tail[-60:]))

            if boot == "disk":
                hk1 = vm.host_key()
                vm.ssh("dev", "echo persisted > /data/persist.txt")
            powerdown(vm, tag)
        finally:
            vm.kill()

        if boot == "disk":
            vm = Vm(args, d, boot)
            try:
                t = vm.wait_ssh()
                check(f"{tag} (reboot same disk): ssh again", t is not None, f"{t:.1f}s" if t else "")
                r = vm.ssh("dev", "cat /data/persist.txt")
                check(f"{tag} (reboot same disk): /data survives reboot", r.stdout.strip() == "persisted", r.stdout.strip())
                hk2 = vm.host_key()
                check(f"{tag} (reboot same disk): host key unchanged", hk1 and hk1 == hk2, hk2[:40] + "...")
            finally:
                vm.kill()
        else:
            # A guest that ignores powerdown.
            vm = Vm(args, d, "kernel", append_extra="qbuf.ignore_power=1")
            try:
                t = vm.wait_ssh()
                check(f"{tag} qbuf.ignore_power=1: boots", t is not None, f"{t:.1f}s" if t else "")
                vm.qmp.cmd("system_powerdown")
                time.sleep(8)
                r = vm.ssh("root", "pidof acpid || echo no-acpid")
                check(f"{tag} qbuf.ignore_power=1: still running 8s after system_powerdown",
                      vm.proc.poll() is None and "no-acpid" in r.stdout, r.stdout.strip())
            finally:
                vm.kill()
    finally:
        if args.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu", default="10", help="10, 7.2, or a path to qemu-system-x86_64")
    ap.add_argument("--boot", default="both", choices=["kernel", "disk", "both"])
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--kernel", default="vmlinuz", help="kernel file in --out for kernel boot (vmlinuz or vmlinux)")
    ap.add_argument("--kernel-with-disk", action="store_true", help="attach the disk on kernel boot too")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (serial.log etc.)")
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    for boot in (["kernel", "disk"] if args.boot == "both" else [args.boot]):
        run(args, boot)
    passed = sum(results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
