#!/usr/bin/env python3
"""Record QMP transcripts from real QEMU processes (stdlib only).

Usage:
  record.py [--qemu PATH [-L DIR]...] [--out DIR] [--only NAME[,NAME...]] [--quit-tries N]
  record.py --check [--out DIR]

With no --qemu, records both QEMU builds this project tests against
(QEMU 10.0 from /usr/bin and QEMU 7.2 unpacked under /opt/qbuf-qemu-test).
Each version goes to OUT/qemu-MAJOR.MINOR/ (named from `qemu --version`),
one SCENARIO.jsonl per scenario. See README.md for the format.

Every scenario starts a fresh QEMU with no guest OS, talks to its QMP
socket with a raw AF_UNIX socket, and writes down every byte in both
directions, in the order they happened. QEMU is killed at the end of each
scenario; no process is left behind.
"""

import argparse
import base64
import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_TARGETS = [
    ("/usr/bin/qemu-system-x86_64", []),
    # The unpacked 7.2 tree has no SeaBIOS/iPXE of its own (they are separate
    # Debian packages): take the host's seabios and ipxe-qemu files via more -L.
    ("/opt/qbuf-qemu-test/qemu-7.2/usr/bin/qemu-system-x86_64",
     ["/opt/qbuf-qemu-test/qemu-7.2/usr/share/qemu", "/usr/share/seabios",
      "/usr/lib/ipxe/qemu"]),
]

BASE_ARGS = ["-nodefaults", "-no-user-config", "-display", "none",
             "-machine", "q35", "-accel", "tcg", "-m", "64M"]

QUIET = 0.3          # seconds of silence that ends a read phase
REPLY_TIMEOUT = 10.0  # max seconds to wait for an expected reply


class Transcript:
    """Collects records in the order they happened and writes JSON Lines."""

    def __init__(self, header):
        self.header = header
        self.records = []

    def add(self, rec):
        self.records.append(rec)

    def add_bytes(self, key, data):
        try:
            self.records.append({key: data.decode("utf-8")})
        except UnicodeDecodeError:
            # Not valid UTF-8 (only the 0xFF byte the client sends in
            # unbalanced-input; never seen from QEMU): keep it as base64.
            self.records.append({key + "_b64": base64.b64encode(data).decode("ascii")})

    def note(self, text):
        self.records.append({"note": text})

    def write(self, path):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for rec in [self.header] + self.records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)


def _set_pdeathsig():
    # Best effort: have the kernel SIGKILL QEMU if this recorder dies.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Qemu:
    """One QEMU process plus one raw QMP connection, recording everything."""

    def __init__(self, target, scenario, about, extra_args=(), paused=True, name=None):
        self.target = target
        self.tmpdir = tempfile.mkdtemp(prefix="qmp-fixtures-")
        self.sock_path = os.path.join(self.tmpdir, "qmp.sock")
        argv = [target.qemu]
        for d in target.libdirs:
            argv += ["-L", d]
        argv += BASE_ARGS
        if paused:
            argv.append("-S")
        argv += list(extra_args)
        argv += ["-chardev", "socket,id=qmp,path=%s,server=on,wait=off" % self.sock_path,
                 "-mon", "chardev=qmp,mode=control"]
        self.argv = argv
        self.header = {"qemu": target.version, "scenario": name or scenario,
                       "about": about, "argv": argv}
        self.t = Transcript(self.header)
        self.sock = None
        self.buf = b""
        self.closed = None      # None, "eof" or "reset"
        self.next_id = 1
        self.stderr_path = os.path.join(self.tmpdir, "stderr")
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr,
                                     preexec_fn=_set_pdeathsig)

    # -- lifecycle -------------------------------------------------------

    def connect(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("QEMU exited (%s) before its QMP socket was up: %s"
                                   % (self.proc.returncode, self.read_stderr()))
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.sock_path)
                s.setblocking(False)
                self.sock = s
                return
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def read_stderr(self):
        self.stderr.flush()
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def close_client(self):
        if self.sock is not None:
            self.flush_partial()
            self.sock.close()
            self.sock = None
            self.t.note("client closed the connection")

    def finish(self, out_dir, filename=None, kill_note=True):
        """Close, kill QEMU if still alive, write the transcript, clean up."""
        if self.sock is not None:
            self.close_client()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            if kill_note:
                self.t.note("cleanup: QEMU killed with SIGKILL after the client was done")
        else:
            self.proc.wait()
        err = self.read_stderr()
        self.stderr.close()
        if err.strip():
            self.t.note("qemu stderr: " + err)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        path = os.path.join(out_dir, (filename or self.header["scenario"]) + ".jsonl")
        self.t.write(path)
        return path

    def abort(self):
        try:
            if self.sock is not None:
                self.sock.close()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.stderr.close()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- I/O ---------------------------------------------------------------

    def send_raw(self, data):
        """Send exact bytes; record them. Returns None or the errno name on failure."""
        self.t.add_bytes("c", data)
        try:
            self.sock.setblocking(True)
            self.sock.sendall(data)
            return None
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e.errno))
            self.t.note("the send above failed: %s (%s); nothing was delivered"
                        % (name, os.strerror(e.errno)))
            return name
        finally:
            if self.sock is not None:
                self.sock.setblocking(False)

    def cmd(self, execute, arguments=None, id_=None):
        """Send one command with a fresh (or given) id; return the id."""
        if id_ is None:
            id_ = self.next_id
            self.next_id += 1
        msg = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        msg["id"] = id_
        self.send_raw((json.dumps(msg, separators=(",", ":")) + "\n").encode())
        return id_

    def _emit_lines(self, matcher):
        """Move complete lines from buf into the transcript; True if matcher hit."""
        hit = False
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            line += b"\n"
            self.t.add_bytes("s", line)
            if matcher is not None and not hit:
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if obj is not None and matcher(obj):
                    hit = True
        return hit

    def flush_partial(self):
        if self.buf:
            self.t.add_bytes("s", self.buf)
            self.buf = b""

    def read(self, matcher=None, timeout=REPLY_TIMEOUT, quiet=QUIET, first_wait=None,
             until_closed=False):
        """Read and record QEMU output.

        With a matcher: wait (up to timeout) for a line it accepts, then keep
        reading until `quiet` seconds pass with nothing new.  Without one:
        read until `quiet` seconds pass with nothing new (after waiting up to
        first_wait for the first byte).  With until_closed: read until EOF or
        reset (up to timeout).  Returns True if the matcher hit / stream closed.
        """
        if self.sock is None or self.closed:
            return False
        start = time.monotonic()
        last = start
        hit = False
        if first_wait is None:
            first_wait = quiet
        got_any = False
        while True:
            now = time.monotonic()
            if until_closed:
                wait = start + timeout - now
            elif matcher is not None and not hit:
                wait = start + timeout - now
            else:
                limit = quiet if got_any or matcher is not None else first_wait
                wait = last + limit - now
            if wait <= 0:
                break
            r, _, _ = select.select([self.sock], [], [], wait)
            if not r:
                continue
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                self.flush_partial()
                self.t.add({"reset": True})
                self.closed = "reset"
                return True if until_closed else hit
            if not data:
                self.flush_partial()
                self.t.add({"eof": True})
                self.closed = "eof"
                return True if until_closed else hit
            got_any = True
            last = time.monotonic()
            self.buf += data
            if self._emit_lines(matcher):
                hit = True
        return hit

    def expect(self, id_, timeout=REPLY_TIMEOUT):
        ok = self.read(lambda o: o.get("id") == id_ and ("return" in o or "error" in o),
                       timeout=timeout)
        if not ok and not self.closed:
            self.t.note("no reply with id %r within %.1f s" % (id_, timeout))
        return ok

    def run(self, execute, arguments=None, timeout=REPLY_TIMEOUT):
        i = self.cmd(execute, arguments)
        self.expect(i, timeout)
        return i

    def last_reply(self, id_):
        for rec in reversed(self.t.records):
            if "s" in rec:
                try:
                    obj = json.loads(rec["s"])
                except ValueError:
                    continue
                if obj.get("id") == id_:
                    return obj
        return None

    def greeting(self):
        self.read(lambda o: "QMP" in o)

    @contextlib.contextmanager
    def session(self, negotiate=True):
        """Connect (and negotiate); on any failure kill QEMU before re-raising."""
        try:
            self.connect()
            if negotiate:
                self.negotiate()
            yield self
        except BaseException:
            self.abort()
            raise

    def negotiate(self):
        self.greeting()
        return self.run("qmp_capabilities")

    def wait_note(self, seconds, what):
        """Read for `seconds` more, then note what came (recorded anyway)."""
        before = len(self.t.records)
        self.read(timeout=seconds, quiet=seconds, first_wait=seconds)
        new = [r for r in self.t.records[before:] if "s" in r]
        if new:
            self.t.note("waited %.1f s %s; the %d line(s) above arrived meanwhile"
                        % (seconds, what, len(new)))
        else:
            self.t.note("waited %.1f s %s; nothing arrived" % (seconds, what))


class Target:
    def __init__(self, qemu, libdirs):
        self.qemu = qemu
        self.libdirs = list(libdirs)
        argv = [qemu] + ["--version"]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        first = out.splitlines()[0]
        m = re.match(r"QEMU emulator version (\S+)(.*)$", first)
        if not m:
            raise RuntimeError("cannot parse %r" % first)
        self.version = (m.group(1) + m.group(2)).strip()
        mm = re.match(r"(\d+)\.(\d+)", m.group(1))
        self.major, self.minor = int(mm.group(1)), int(mm.group(2))
        self.dirname = "qemu-%d.%d" % (self.major, self.minor)


# ---------------------------------------------------------------------------
# Scenarios.  Each takes (target, out_dir, opts) and writes its transcript(s).

SCENARIOS = []


def scenario(fn):
    SCENARIOS.append(fn)
    return fn


def _name(fn):
    return fn.__name__[3:].replace("_", "-")


@scenario
def sc_greeting_negotiation(tg, out, opts):
    q = Qemu(tg, "greeting-negotiation",
             "Connect, read the greeting, qmp_capabilities, query-status, query-version, "
             "then the client closes.")
    with q.session():
        q.run("query-status")
        q.run("query-version")
    return q.finish(out)


@scenario
def sc_command_before_capabilities(tg, out, opts):
    q = Qemu(tg, "command-before-capabilities",
             "query-status sent before qmp_capabilities (error), then negotiation and "
             "query-status again.")
    with q.session(negotiate=False):
        q.greeting()
        q.run("query-status")
        q.run("qmp_capabilities")
        q.run("query-status")
    return q.finish(out)


@scenario
def sc_errors(tg, out, opts):
    q = Qemu(tg, "errors",
             "Error replies: unknown command, device_del of a missing device, wrong "
             "argument type, 'arguments' not an object, missing/unknown arguments, "
             "no 'execute', then a good command.")
    with q.session():
        q.run("no-such-command")
        q.run("device_del", {"id": "nope"})
        q.run("device_del", {"id": 42})
        q.run("query-status", [])
        q.run("device_del", {})
        q.run("query-status", {"bogus": 1})
        i = q.next_id
        q.next_id += 1
        q.send_raw(b'{"arguments":{},"id":%d}\n' % i)
        q.expect(i)
        i = q.next_id
        q.next_id += 1
        q.send_raw(b'{"execute":"query-status","id":%d,"extra":true}\n' % i)
        q.expect(i)
        q.run("query-status")
    return q.finish(out)


def _no_id_error(o):
    return "error" in o and "id" not in o


@scenario
def sc_malformed_line(tg, out, opts):
    q = Qemu(tg, "malformed-line",
             "Complete but invalid JSON lines (errors without an id: a control character "
             "in a string gives two errors, a bad keyword one, a missing comma one), JSON "
             "that is not an object, an extra closing brace after a good command; the "
             "stream stays usable.")
    with q.session():
        q.send_raw(b'{"execute":"query-status","id":%d,"x":"\x01"}\n' % q.next_id)
        q.header["expect_no_reply"] = [q.next_id]
        q.next_id += 1
        q.read(_no_id_error, timeout=2.0)
        q.run("query-status")
        q.send_raw(b'{"execute": junk}\n')
        q.read(_no_id_error, timeout=2.0)
        q.send_raw(b'{"execute":"query-status" "id":%d}\n' % q.next_id)
        q.header["expect_no_reply"].append(q.next_id)
        q.next_id += 1
        q.read(_no_id_error, timeout=2.0)
        q.run("query-status")
        q.send_raw(b'"just a string"\n')
        q.read(_no_id_error, timeout=2.0)
        q.send_raw(b'[1,2]\n')
        q.read(_no_id_error, timeout=2.0)
        i = q.next_id
        q.next_id += 1
        q.send_raw(b'{"execute":"query-status","id":%d}}\n' % i)
        q.expect(i)
        q.run("query-status")
    return q.finish(out)


@scenario
def sc_unbalanced_input(tg, out, opts):
    q = Qemu(tg, "unbalanced-input",
             "An unterminated object ('{\"execute\":' newline 'junk' newline) makes QEMU "
             "swallow the next good command silently until braces balance; a lone '}' "
             "then yields one error. An unterminated command followed by a 0xFF byte "
             "(lexer reset) likewise yields one error. Then the stream works again.")
    with q.session():
        q.send_raw(b'{"execute":\njunk\n')
        q.read(_no_id_error, timeout=1.0)
        swallowed = [q.cmd("query-status")]
        q.read(lambda o: o.get("id") == swallowed[0], timeout=2.0)
        q.t.note("no reply to id %d: it was taken as part of the unterminated object"
                 % swallowed[0])
        q.send_raw(b'}\n')
        q.read(_no_id_error, timeout=2.0)
        q.run("query-status")
        i = q.next_id
        q.next_id += 1
        swallowed.append(i)
        q.send_raw(b'{"execute":"query-status","id":%d\n' % i)
        q.read(_no_id_error, timeout=1.0)
        q.send_raw(b'\xff')
        q.read(_no_id_error, timeout=2.0)
        q.run("query-status")
        q.header["expect_no_reply"] = swallowed
    return q.finish(out)


@scenario
def sc_events_interleaved(tg, out, opts):
    q = Qemu(tg, "events-interleaved",
             "Started with -S: cont, stop, cont, query-status, system_powerdown with no "
             "guest OS (POWERDOWN only, no SHUTDOWN follows).")
    with q.session():
        q.run("cont")
        q.run("stop")
        q.run("cont")
        q.run("query-status")
        q.run("system_powerdown")
        q.wait_note(2.0, "after system_powerdown")
        q.run("query-status")
    return q.finish(out)


def _quit_tries(tg, out, opts, prefix, payload, about):
    """Run quit `opts.quit_tries` times; keep the first transcript of each
    outcome as PREFIX-eof / PREFIX-reset and note the tally in each."""
    outcomes = []
    kept = {}
    tries = opts.quit_tries
    for n in range(1, tries + 1):
        q = Qemu(tg, prefix, about)
        with q.session():
            q.send_raw(payload)
            q.read(until_closed=True, timeout=10.0)
            if not q.closed:
                q.t.note("stream still open 10 s after quit")
            try:
                rc = q.proc.wait(timeout=10)
                q.t.note("QEMU exited by itself with status %d" % rc)
            except subprocess.TimeoutExpired:
                pass
        outcome = q.closed or "open"
        got_reply = q.last_reply(2) is not None
        outcomes.append((outcome, got_reply))
        if outcome in kept:
            q.abort()
            continue
        q.header["scenario"] = "%s-%s" % (prefix, outcome)
        q.t.note("this was attempt %d" % n)
        kept[outcome] = q
        # Transcripts are written after all attempts so the tally can go in.
        if q.sock is not None:
            q.sock.close()
            q.sock = None
    tally = {}
    for o, r in outcomes:
        k = "%s%s" % (o, "" if r else " (no return line)")
        tally[k] = tally.get(k, 0) + 1
    summary = "over %d attempts on this QEMU: %s" % (
        tries, ", ".join("%s %d" % kv for kv in sorted(tally.items())))
    paths = []
    for key, q in kept.items():
        q.t.note(summary)
        paths.append(q.finish(out, "%s-%s" % (prefix, key), kill_note=False))
    # Remove stale outcome files from earlier runs that did not happen now.
    for key in ("eof", "reset", "open"):
        p = os.path.join(out, "%s-%s.jsonl" % (prefix, key))
        if key not in kept and os.path.exists(p):
            os.remove(p)
    print("  %s: %s" % (prefix, summary))
    return paths


@scenario
def sc_quit(tg, out, opts):
    return _quit_tries(
        tg, out, opts, "quit", b'{"execute":"quit","id":2}\n',
        "qmp_capabilities then quit (with the usual trailing newline): SHUTDOWN "
        "(host-qmp-quit), the return, then the stream ends with EOF or ECONNRESET.")


@scenario
def sc_quit_no_newline(tg, out, opts):
    return _quit_tries(
        tg, out, opts, "quit-no-newline", b'{"execute":"quit","id":2}',
        "quit sent without a trailing newline, so no byte is left unread in QEMU's "
        "socket when it exits: SHUTDOWN, the return, then the stream ends.")


@scenario
def sc_eof_mid_command(tg, out, opts):
    q = Qemu(tg, "eof-mid-command",
             "Negotiate, then QEMU is SIGKILLed and the client sends query-status: no "
             "reply, the stream ends.")
    with q.session():
        q.proc.kill()
        q.proc.wait()
        q.t.note("QEMU killed with SIGKILL here (and reaped) before the next send")
        i = q.cmd("query-status")
        q.header["expect_no_reply"] = [i]
        q.read(until_closed=True, timeout=5.0)
    return q.finish(out)


@scenario
def sc_killed_command_pending(tg, out, opts):
    q = Qemu(tg, "killed-command-pending",
             "Negotiate, SIGSTOP QEMU, send query-status (delivered to the socket, never "
             "read), SIGKILL QEMU: what a client sees when QEMU dies with a command in "
             "flight.")
    with q.session():
        q.proc.send_signal(signal.SIGSTOP)
        q.t.note("QEMU stopped with SIGSTOP here")
        i = q.cmd("query-status")
        q.header["expect_no_reply"] = [i]
        time.sleep(0.3)
        q.proc.kill()
        q.proc.wait()
        q.t.note("QEMU killed with SIGKILL here (and reaped)")
        q.read(until_closed=True, timeout=5.0)
    return q.finish(out)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@scenario
def sc_hmp_usernet(tg, out, opts):
    q = Qemu(tg, "hmp-usernet",
             "human-monitor-command: info usernet, hostfwd_add with host port 0 (the real "
             "port shows in info usernet; removed by it), with a fixed free port, "
             "hostfwd_remove, and failing hostfwd_add/remove; raw HMP text replies.",
             extra_args=["-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22",
                         "-device", "virtio-net-pci,netdev=net0"])
    hmp = lambda line: q.run("human-monitor-command", {"command-line": line})
    with q.session():
        hmp("info usernet")
        hmp("hostfwd_add net0 tcp:127.0.0.1:0-:80")
        i = hmp("info usernet")
        # The port-0 rule is listed with the port the host actually bound.
        text = (q.last_reply(i) or {}).get("return", "")
        m = re.search(r"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+80\s", text)
        hmp("hostfwd_remove net0 tcp:127.0.0.1:0")
        if m:
            hmp("hostfwd_remove net0 tcp:127.0.0.1:%s" % m.group(1))
        else:
            q.t.note("could not find the port-0 rule's real port in info usernet")
        hmp("info usernet")
        port = _free_port()
        hmp("hostfwd_add net0 tcp:127.0.0.1:%d-:8080" % port)
        hmp("info usernet")
        hmp("hostfwd_remove net0 tcp:127.0.0.1:%d" % port)
        hmp("info usernet")
        hmp("hostfwd_remove net0 tcp:127.0.0.1:%d" % port)
        hmp("hostfwd_add net0 tcp:127.0.0.1:notaport-:22")
        hmp("hostfwd_add nosuchnet tcp:127.0.0.1:%d-:22" % port)
        hmp("hostfwd_add net0 tcp:127.0.0.1:%d-:80" % port)
        hmp("hostfwd_add net0 tcp:127.0.0.1:%d-:81" % port)
        hmp("info usernet")
        hmp("no_such_hmp_command")
    return q.finish(out)


@scenario
def sc_query_misc(tg, out, opts):
    q = Qemu(tg, "query-misc",
             "query-kvm, query-cpus-fast, query-block, query-name, "
             "query-memory-size-summary, query-pci on a 2-vCPU q35 with one null-co "
             "virtio-blk disk and -name.",
             extra_args=["-name", "qbuf-fixture", "-smp", "2",
                         "-blockdev", "driver=null-co,node-name=disk0node",
                         "-device", "virtio-blk-pci,drive=disk0node,id=disk0"])
    with q.session():
        for c in ("query-kvm", "query-cpus-fast", "query-block", "query-name",
                  "query-memory-size-summary", "query-pci"):
            q.run(c)
    return q.finish(out)


@scenario
def sc_device_del_no_guest(tg, out, opts):
    q = Qemu(tg, "device-del-no-guest",
             "Running q35 (no -S) with a pcie-root-port and no OS: blockdev-add null-co, "
             "device_add virtio-blk-pci on it, device_del, ~5 s wait for DEVICE_DELETED, "
             "device_del again, qom-list of /machine/peripheral, blockdev-del.",
             paused=False,
             extra_args=["-device", "pcie-root-port,id=hp0,chassis=1,bus=pcie.0,addr=0x10"])
    with q.session():
        q.run("blockdev-add", {"driver": "null-co", "node-name": "n0"})
        q.run("device_add", {"driver": "virtio-blk-pci", "bus": "hp0", "id": "d0",
                             "drive": "n0"})
        q.run("device_del", {"id": "d0"})
        q.wait_note(5.0, "after device_del")
        q.run("device_del", {"id": "d0"})
        q.wait_note(1.0, "after the second device_del")
        q.run("qom-list", {"path": "/machine/peripheral"})
        q.run("blockdev-del", {"node-name": "n0"})
    return q.finish(out)


@scenario
def sc_qmp_schema(tg, out, opts):
    q = Qemu(tg, "qmp-schema",
             "query-qmp-schema: the full introspected QAPI schema of this QEMU (one "
             "long line), for diffing against the qapi crate's schema.")
    with q.session():
        q.run("query-qmp-schema", timeout=30.0)
    return q.finish(out)


class FakeVhostUserBackend:
    """Just enough of a vhost-user backend (server side of the vhost-user
    socket) for QEMU's vhost-user netdev to finish its start-up handshake:
    GET_FEATURES is answered (no protocol features), everything else is
    swallowed.  It exists only so that QEMU emits its NETDEV_VHOST_USER_*
    events; nothing it does is part of the QMP transcript."""

    GET_FEATURES, GET_VRING_BASE, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM = 1, 11, 15, 17

    def __init__(self, path):
        import threading
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.srv.settimeout(0.2)
        self.stop = threading.Event()
        self.conn = None
        self.requests = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import array
        import struct
        while not self.stop.is_set() and self.conn is None:
            try:
                self.conn, _ = self.srv.accept()
            except socket.timeout:
                continue
        if self.conn is None:
            return
        c = self.conn
        c.settimeout(0.2)
        while not self.stop.is_set():
            try:
                hdr, anc, _, _ = c.recvmsg(12, socket.CMSG_SPACE(16 * 4))
            except socket.timeout:
                continue
            except OSError:
                return
            if len(hdr) < 12:
                return
            req, _flags, size = struct.unpack("<III", hdr)
            for lvl, typ, data in anc:
                if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[:len(data) - len(data) % 4])
                    for fd in fds:
                        os.close(fd)
            payload = b""
            c.settimeout(5)
            while len(payload) < size:
                chunk = c.recv(size - len(payload))
                if not chunk:
                    return
                payload += chunk
            c.settimeout(0.2)
            self.requests.append(req)
            if req in (self.GET_FEATURES, self.GET_PROTOCOL_FEATURES, self.GET_QUEUE_NUM):
                val = (1 << 32) if req == self.GET_FEATURES else 0  # VIRTIO_F_VERSION_1
                c.sendall(struct.pack("<IIIQ", req, 0x1 | 0x4, 8, val))
            elif req == self.GET_VRING_BASE:
                c.sendall(struct.pack("<IIIII", req, 0x1 | 0x4, 8, payload[0], 0))

    def disconnect(self):
        self.stop.set()
        self.thread.join()
        if self.conn is not None:
            self.conn.close()
        self.srv.close()


@scenario
def sc_unknown_event(tg, out, opts):
    if (tg.major, tg.minor) < (10, 0):
        return None
    tmp = tempfile.mkdtemp(prefix="qmp-fixtures-vu-")
    vu_path = os.path.join(tmp, "vhost-user.sock")
    backend = FakeVhostUserBackend(vu_path)
    q = Qemu(tg, "unknown-event",
             "Events NETDEV_VHOST_USER_CONNECTED and NETDEV_VHOST_USER_DISCONNECTED (new in "
             "QEMU 10.0, absent from the QEMU 9.1 schema of the qapi crate 0.15): netdev_add "
             "of a vhost-user netdev whose chardev is connected to a minimal fake backend, "
             "then the backend hangs up.",
             extra_args=["-chardev", "socket,id=vu0,path=%s" % vu_path])
    try:
        with q.session():
            q.run("netdev_add", {"type": "vhost-user", "id": "vunet0", "chardev": "vu0"})
            q.wait_note(1.0, "after netdev_add")
            backend.disconnect()
            q.t.note("the recorder's fake vhost-user backend closed its end of the vhost-user "
                     "socket here (it had handled vhost-user requests %s)"
                     % ",".join(map(str, backend.requests)))
            q.read(lambda o: o.get("event") == "NETDEV_VHOST_USER_DISCONNECTED", timeout=5.0)
            q.run("query-status")
    finally:
        backend.disconnect()
        shutil.rmtree(tmp, ignore_errors=True)
    return q.finish(out)


@scenario
def sc_unknown_enum_value(tg, out, opts):
    if (tg.major, tg.minor) < (10, 0):
        return None
    q = Qemu(tg, "unknown-enum-value",
             "Enum value MigMode 'cpr-transfer' (new in QEMU 10.0, absent from the QEMU 9.1 "
             "schema of the qapi crate 0.15) in the reply to query-migrate-parameters after "
             "migrate-set-parameters mode=cpr-transfer.")
    with q.session():
        q.run("query-migrate-parameters")
        q.run("migrate-set-parameters", {"mode": "cpr-transfer"})
        q.run("query-migrate-parameters")
    return q.finish(out)


# ---------------------------------------------------------------------------
# Self-check

ALLOWED = {"c", "s", "c_b64", "s_b64", "eof", "reset", "note"}


def _raw(rec, key):
    if key in rec:
        return rec[key].encode("utf-8")
    if key + "_b64" in rec:
        return base64.b64decode(rec[key + "_b64"])
    return None


def check_file(path):
    errs = []
    with open(path, "rb") as f:
        data = f.read()
    if not data.endswith(b"\n"):
        errs.append("file does not end with a newline")
    lines = data.split(b"\n")[:-1]
    if not lines:
        return ["empty file"]
    recs = []
    for n, line in enumerate(lines, 1):
        try:
            recs.append(json.loads(line.decode("utf-8")))
        except ValueError as e:
            errs.append("line %d: not JSON: %s" % (n, e))
            return errs
        if json.dumps(recs[-1], ensure_ascii=False).encode() != line:
            errs.append("line %d: does not round-trip" % n)
    hdr = recs[0]
    for k, ty in (("qemu", str), ("scenario", str), ("about", str), ("argv", list)):
        if not isinstance(hdr.get(k), ty):
            errs.append("header: missing or bad %r" % k)
    base = os.path.basename(path)[:-len(".jsonl")]
    if hdr.get("scenario") != base:
        errs.append("header scenario %r != file name %r" % (hdr.get("scenario"), base))
    no_reply = set(map(json.dumps, hdr.get("expect_no_reply", [])))
    sent_ids = []
    reply_ids = set()
    ended = False
    greeting = False
    for n, rec in enumerate(recs[1:], 2):
        if not isinstance(rec, dict) or len(rec) != 1 or next(iter(rec)) not in ALLOWED:
            errs.append("line %d: bad record %r" % (n, rec))
            continue
        k = next(iter(rec))
        if k in ("eof", "reset"):
            if rec[k] is not True:
                errs.append("line %d: %s must be true" % (n, k))
            if ended:
                errs.append("line %d: stream ended twice" % n)
            ended = True
        elif k in ("c", "c_b64"):
            raw = _raw(rec, "c")
            for part in raw.split(b"\n"):
                try:
                    obj = json.loads(part)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "id" in obj:
                    sent_ids.append(json.dumps(obj["id"]))
        elif k in ("s", "s_b64"):
            if ended:
                errs.append("line %d: server data after end of stream" % n)
            raw = _raw(rec, "s")
            if raw.count(b"\n") > 1 or (b"\n" in raw and not raw.endswith(b"\n")):
                errs.append("line %d: s record is not exactly one line" % n)
            if not raw.endswith(b"\n"):
                continue  # a trailing partial line
            if not raw.endswith(b"\r\n"):
                errs.append("line %d: server line does not end with CR LF" % n)
            try:
                obj = json.loads(raw)
            except ValueError as e:
                errs.append("line %d: server line is not JSON: %s" % (n, e))
                continue
            if "QMP" in obj:
                greeting = True
            elif "id" in obj:
                reply_ids.add(json.dumps(obj["id"]))
            elif "event" not in obj and "error" not in obj:
                errs.append("line %d: server line is neither greeting, reply nor event" % n)
    if not greeting:
        errs.append("no greeting")
    for i in sent_ids:
        if i not in reply_ids and i not in no_reply:
            errs.append("id %s got no reply" % i)
    for i in no_reply:
        if i in reply_ids:
            errs.append("id %s is listed in expect_no_reply but got one" % i)
    return errs


def check(out_dir):
    files = sorted(glob.glob(os.path.join(out_dir, "qemu-*", "*.jsonl")))
    bad = 0
    for p in files:
        errs = check_file(p)
        rel = os.path.relpath(p, out_dir)
        if errs:
            bad += 1
            for e in errs:
                print("FAIL %s: %s" % (rel, e))
        else:
            print("ok   %s" % rel)
    print("%d passed, %d failed" % (len(files) - bad, bad))
    return 0 if files and not bad else 1


# ---------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qemu", help="qemu-system-x86_64 to record (default: both known builds)")
    ap.add_argument("-L", dest="libdirs", action="append", default=[],
                    help="QEMU data directory, passed on as -L (repeatable)")
    ap.add_argument("--out", default=HERE, help="output root (default: this directory)")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--quit-tries", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="only validate existing transcripts")
    opts = ap.parse_args()
    if opts.check:
        return check(opts.out)
    if opts.libdirs and not opts.qemu:
        ap.error("-L needs --qemu")
    targets = [(opts.qemu, opts.libdirs)] if opts.qemu else DEFAULT_TARGETS
    only = set(opts.only.split(",")) if opts.only else None
    names = {_name(fn) for fn in SCENARIOS}
    if only and only - names:
        ap.error("unknown scenario(s): %s (known: %s)"
                 % (", ".join(sorted(only - names)), ", ".join(sorted(names))))
    for qemu, libdirs in targets:
        tg = Target(qemu, libdirs)
        out = os.path.join(opts.out, tg.dirname)
        os.makedirs(out, exist_ok=True)
        print("%s -> %s" % (tg.version, out))
        for fn in SCENARIOS:
            if only and _name(fn) not in only:
                continue
            res = fn(tg, out, opts)
            if isinstance(res, str):
                print("  wrote " + os.path.relpath(res, opts.out))
            elif isinstance(res, list):
                for r in res:
                    print("  wrote " + os.path.relpath(r, opts.out))
    return check(opts.out)


if __name__ == "__main__":
    sys.exit(main())
