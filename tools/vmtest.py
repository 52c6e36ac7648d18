#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Boot two sibling guests on one vsock device and run the vsock test suites.

The runner starts the vhost-user vsock device (tools/vsock-device) serving
CIDs 3 and 4, boots both guests under TCG with the chosen transport loaded,
links them with a private QEMU socket netdev on 127.0.0.1 for vsock_test's
TCP control channel, and drives each guest through the agent that
tools/guest/init runs on the guest's second serial port.

The device reaches the guests through one of two QEMU fronts (--front): on
"generic", QEMU 11.1 (tools/setup-qemu.sh, run chrooted in its own root)
hands the device all three queues, the config space and the feature bits;
on "vsock", the host's QEMU 7.2 keeps the event queue and the config space.

Every vsock_test case runs as its own pair of processes, in both role
assignments (guest 3 server / guest 4 client, then swapped). A failed case is
retried once and reported as flaky when the retry passes. Both consoles are
scanned after every case: an Oops, BUG, WARNING, KASAN or kmemleak report
fails the run. Every wait has a timeout; a hung guest ends the case with a
message that names it, and the guests are rebooted before the next one.

The last line printed is "N passed, N failed, N skipped".
"""

import argparse
import base64
import fcntl
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("VSOCK_RS_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
    "virtio_vsock_rs")

# Lines in a guest console that fail the run.
BAD_CONSOLE = re.compile(
    r"(Oops|BUG:|WARNING:|KASAN|Kernel panic|general protection fault|"
    r"kernel BUG|unreferenced object|INFO: task .* blocked|"
    r"possible circular locking|inconsistent lock state|"
    r"sleeping function called from invalid context|"
    r"list_(add|del) corruption|UBSAN|Call Trace)")

# Rust module and its dependency, as the guest init names them.
DRIVERS = {"c": "vmw_vsock_virtio_transport", "rust": "virtio_vsock_rs"}

# Prints the Rust driver's counters in a guest (the C driver has none).
COUNTERS_CMD = ("found=; for d in /sys/bus/virtio/devices/*/vsock_rs "
                "/sys/kernel/debug/virtio_vsock_rs; do [ -d $d ] || continue; "
                "found=1; cd $d; for f in *; do echo \"$f: $(cat $f)\"; done; "
                "done; [ -n \"$found\" ] || echo 'no driver counters "
                "(the C driver has none)'")


# QEMU 11.1 from trixie-backports in a root of its own (tools/setup-qemu.sh).
QEMU_ROOT = os.path.join(CACHE, "qemu-trixie")

# vsock_test cases that fail on a kernel whatever the transport (the C
# driver too), from its socket core or from the test bed: skipped there, the skip and its reason
# printed. By kernel version, then by the name `vsock_test --list` gives.
# vsock_test 40 moves 2 MiB in 129-512-byte packets through one recv_buf(),
# which vsock_test bounds by its 10 s TIMEOUT: too little for the debug
# guests (KASAN, lockdep, kmemleak) under TCG, with either driver. On the
# perf kernel it passes in about 1 s (C/C, Rust/C, Rust/Rust on 6.12), so it
# is skipped on the other flavours only (SLOW_BED_LIMITS).
BACKPRESSURE_LIMIT = (
    "too slow on this bed: the debug guest under TCG does not receive 2 MiB "
    "of 129-512-byte packets within vsock_test's 10 s TIMEOUT, with the C "
    "driver either (the client sees send: Broken pipe); it passes on the "
    "perf kernel in about 1 s")
SLOW_BED_LIMITS = {
    "SOCK_STREAM small packets backpressure": BACKPRESSURE_LIMIT,
}
KNOWN_LIMITS = {
    "6.12": {
        "SOCK_STREAM SO_LINGER close() on unread":
            "known 6.12 limit: its socket core lingers on close() until the "
            "peer has read everything (7.x's vsock_linger() waits for unsent "
            "bytes only); fails with the C driver too",
    },
}


def kernel_name(flavour, version):
    """The cache name of a kernel flavour, as tools/lib.sh's kname."""
    return flavour if version == "6.12" else f"{version}-{flavour}"
QEMU_STAMP = os.path.join(QEMU_ROOT, ".vsock-rs-qemu")
# How the vsock device reaches a guest: "generic" is QEMU 11.1's
# vhost-user-test-device-pci, where the device serves all three queues, the
# config space and the feature bits; "vsock" is QEMU 7.2's (the host's)
# vhost-user-vsock-pci, which keeps the event queue and config in QEMU.
FRONTS = ("generic", "vsock")
VIRTIO_ID_VSOCK = 19
# vhost-user-vsock-pci's ring size; the generic front is given the same.
VSOCK_VQ_SIZE = 128

# Runs QEMU chrooted in QEMU_ROOT, in a mount namespace of its own: a tmpfs
# on the root's /mnt becomes the new root, with the root's /usr, /etc and
# /var bound read-only, the host's /dev, /proc and /sys, and each host path
# QEMU needs at the same absolute path. Nothing is written to QEMU_ROOT, and
# every mount goes away with QEMU, however it ends.
CHROOT_SH = r"""set -e
root=$1; shift
new=$root/mnt
mount -t tmpfs -o mode=755 qemu-root "$new"
for d in usr etc var; do
    mkdir "$new/$d"; mount -o bind,ro "$root/$d" "$new/$d"
done
for l in bin sbin lib lib64; do cp -P "$root/$l" "$new/$l"; done
mkdir "$new/dev" "$new/proc" "$new/sys" "$new/tmp"
mount --rbind /dev "$new/dev"
mount --rbind /proc "$new/proc"
mount --rbind /sys "$new/sys"
while [ "$1" != -- ]; do
    mkdir -p "$new$1"; mount --bind "$1" "$new$1"; shift
done
shift
exec chroot "$new" "$@"
"""


class RunError(Exception):
    """A failure that ends the current case or the run, with its cause."""


def log(msg):
    print(msg, flush=True)


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chroot_cmd(argv, binds):
    """`argv` (a QEMU command) run inside QEMU_ROOT, seeing the host paths
    `binds` (files or directories) at the same absolute paths."""
    dirs = sorted({p if os.path.isdir(p) else os.path.dirname(p)
                   for p in map(os.path.abspath, binds)})
    userns = ["--map-root-user"] if os.geteuid() else []
    return (["unshare", "--mount", "--propagation", "private"] + userns
            + ["sh", "-c", CHROOT_SH, "qemu-chroot", QEMU_ROOT] + dirs
            + ["--", "qemu-system-x86_64"] + argv[1:])


def vsock_device(front, root_port=False, chardev="vhu0"):
    """Properties of the vsock device on `front`, for -device or device_add.

    The id is vsock0; with `root_port` it sits on the PCIe root port rp0, so
    that it can be unplugged and plugged again.
    """
    if front == "generic":
        dev = {"driver": "vhost-user-test-device-pci", "chardev": chardev,
               "virtio-id": VIRTIO_ID_VSOCK, "num_vqs": 3,
               "vq_size": VSOCK_VQ_SIZE, "config_size": 8}
    else:
        dev = {"driver": "vhost-user-vsock-pci", "chardev": chardev}
    dev["id"] = "vsock0"
    if root_port:
        dev["bus"] = "rp0"
    return dev


def device_arg(props):
    """A -device value from a property dict (driver first)."""
    return ",".join([props["driver"]] + [f"{k}={v}" for k, v in props.items()
                                         if k != "driver"])


class Qmp:
    """A QMP connection to one QEMU.

    ``qmp(cmd, **args)`` runs one command and returns its "return" value;
    an error reply raises RunError. Arguments whose names have a hyphen go
    in a dict: ``qmp("device_add", **vsock_device("generic", True))``.
    Events that arrive meanwhile are kept in ``events``.
    """

    def __init__(self, path, timeout=30):
        self.path = path
        self.timeout = timeout
        self.events = []
        end = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError as e:
                self.sock.close()
                if time.monotonic() > end:
                    raise RunError(f"QMP {path}: {e}")
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        if "QMP" not in self.read():
            raise RunError(f"QMP {path}: no greeting")
        self.qmp("qmp_capabilities")

    def read(self):
        try:
            line = self.file.readline()
        except OSError as e:
            raise RunError(f"QMP {self.path}: {e}")
        if not line:
            raise RunError(f"QMP {self.path}: QEMU closed the connection")
        return json.loads(line)

    def qmp(self, cmd, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        try:
            self.file.write(json.dumps(msg).encode() + b"\n")
            self.file.flush()
        except OSError as e:
            raise RunError(f"QMP {cmd}: {e}")
        while True:
            reply = self.read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RunError(f"QMP {cmd}: {reply['error'].get('desc')}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name, timeout, **data):
        """The first event `name` whose data holds `data` (kept or new);
        RunError on timeout."""
        end = time.monotonic() + timeout
        while True:
            for ev in self.events:
                got = ev.get("data", {})
                if ev["event"] == name and all(got.get(k) == v
                                               for k, v in data.items()):
                    self.events.remove(ev)
                    return ev
            left = end - time.monotonic()
            if left <= 0:
                raise RunError(f"QMP: no {name} event {data or ''} within "
                               f"{timeout} s")
            self.sock.settimeout(left)
            try:
                self.events.append(self.read())
            finally:
                self.sock.settimeout(self.timeout)

    def close(self):
        self.file.close()
        self.sock.close()


class Job:
    """A command running in a guest, with its output lines as they arrive."""

    def __init__(self, guest, jid, cmd):
        self.guest = guest
        self.id = jid
        self.cmd = cmd
        self.lines = []
        self.rc = None
        self.cond = threading.Condition()

    def feed(self, line):
        with self.cond:
            if line.startswith("@@RC "):
                self.rc = int(line[5:].strip() or 255)
            elif line:
                self.lines.append(line)
            self.cond.notify_all()

    def wait_line(self, pattern, timeout):
        """Wait for an output line matching `pattern`; True when it came."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                if any(rx.search(l) for l in self.lines):
                    return True
                if self.rc is not None:
                    return False
                left = end - time.monotonic()
                if left <= 0 or not self.guest.alive():
                    return False
                self.cond.wait(min(left, 0.5))

    def wait(self, timeout):
        """Wait for the command to end; its exit status, or None on timeout."""
        end = time.monotonic() + timeout
        with self.cond:
            while self.rc is None:
                left = end - time.monotonic()
                if left <= 0 or not self.guest.alive():
                    return None
                self.cond.wait(min(left, 0.5))
            return self.rc

    def output(self):
        with self.cond:
            return "\n".join(self.lines)


class Guest:
    """One QEMU guest with its console log and agent channel."""

    def __init__(self, args, cid, workdir, vhost_sock, udp_mine, udp_peer,
                 driver, initrd):
        self.args = args
        self.cid = cid
        self.driver = driver
        self.dir = workdir
        self.console = os.path.join(workdir, f"console-{cid}.log")
        self.agent_path = os.path.join(workdir, f"agent-{cid}.sock")
        self.qmp_path = os.path.join(workdir, f"qmp-{cid}.sock")
        self.qmp_conn = None
        self.vhost_sock = vhost_sock
        self.udp = (udp_mine, udp_peer)
        self.initrd = initrd
        self.proc = None
        self.sock = None
        self.jobs = {}
        self.next_id = 0
        self.events = queue.Queue()
        self.scan_offset = 0
        self.lock = threading.Lock()

    def qemu_argv(self):
        """The QEMU command line, for either front (args.front)."""
        a = self.args
        kernel = os.path.join(a.kdir, "arch/x86/boot/bzImage")
        append = (f"console=ttyS0 tb.cid={self.cid} tb.driver={self.driver} "
                  "panic=-1 loglevel=6 " + a.append).strip()
        mem = a.mem
        root_port = (["-device", "pcie-root-port,id=rp0,slot=1,chassis=1"]
                     if a.root_port else [])
        return [
            # No 5-level paging: one early-boot KASAN report in ~20 boots
            # of the debug kernel under TCG came with it (not from vsock).
            a.qemu, "-accel", "tcg,thread=multi", "-cpu", "max,la57=off",
            "-smp", str(a.smp), "-m", f"{mem}M",
            "-object",
            f"memory-backend-memfd,id=mem0,size={mem}M,share=on",
            "-machine", "q35,memory-backend=mem0",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", kernel, "-initrd", self.initrd, "-append", append,
            "-serial", f"file:{self.console}",
            "-chardev",
            f"socket,id=agent,path={self.agent_path},server=on,wait=off",
            "-serial", "chardev:agent",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-netdev",
            f"socket,id=n0,udp=127.0.0.1:{self.udp[1]},"
            f"localaddr=127.0.0.1:{self.udp[0]}",
            "-device",
            f"virtio-net-pci,netdev=n0,mac=52:54:00:12:34:{self.cid:02x}",
            "-chardev", f"socket,id=vhu0,path={self.vhost_sock}",
        ] + root_port + [
            "-device", device_arg(vsock_device(a.front, a.root_port)),
        ]

    def qemu_cmd(self, argv=None):
        """The command that runs QEMU (`argv`, default qemu_argv()) on the
        chosen front: the host's QEMU, or QEMU 11.1 in its root."""
        argv = argv or self.qemu_argv()
        if self.args.front == "vsock":
            return argv
        return chroot_cmd(argv, [self.dir, argv[argv.index("-kernel") + 1],
                                 self.initrd, self.vhost_sock])

    def qmp(self, cmd, **args):
        """Run a QMP command in this guest's QEMU (see Qmp)."""
        if self.qmp_conn is None:
            self.qmp_conn = Qmp(self.qmp_path)
        return self.qmp_conn.qmp(cmd, **args)

    def unplug_vsock(self, timeout=60):
        """Unplug the vsock device (needs --root-port) and close its
        vhost-user connection, as a real unplug would."""
        self.qmp("device_del", id="vsock0")
        self.qmp_conn.wait_event("DEVICE_DELETED", timeout, device="vsock0")
        # A new device on the old connection would say SET_OWNER twice,
        # which the vhost-user backend refuses.
        self.qmp("chardev-remove", id="vhu0")

    def plug_vsock(self):
        """Plug the vsock device back in, on a new vhost-user connection."""
        addr = {"type": "unix", "data": {"path": self.vhost_sock}}
        self.qmp("chardev-add", id="vhu0", backend={
            "type": "socket", "data": {"addr": addr, "server": False}})
        self.qmp("device_add", **vsock_device(self.args.front, True))

    def start(self):
        for p in (self.console, self.agent_path, self.qmp_path):
            if os.path.exists(p):
                os.unlink(p)
        self.qmp_conn = None
        self.scan_offset = 0
        self.jobs = {}
        self.events = queue.Queue()
        qlog = open(os.path.join(self.dir, f"qemu-{self.cid}.log"), "ab")
        self.proc = subprocess.Popen(self.qemu_cmd(), stdin=subprocess.DEVNULL,
                                     stdout=qlog, stderr=qlog,
                                     start_new_session=True)
        qlog.close()
        end = time.monotonic() + 20
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(self.agent_path)
                break
            except OSError:
                self.sock.close()
                if not self.alive():
                    raise RunError(f"guest {self.cid}: QEMU exited at start: "
                                   + self.qemu_log_tail())
                if time.monotonic() > end:
                    raise RunError(f"guest {self.cid}: no agent socket")
                time.sleep(0.1)
        threading.Thread(target=self.reader, daemon=True).start()

    def qemu_log_tail(self):
        try:
            with open(os.path.join(self.dir, f"qemu-{self.cid}.log")) as f:
                return " ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    def reader(self):
        buf = b""
        sock = self.sock
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if line.startswith("@@"):
                    self.events.put(line)
                    continue
                jid, sep, rest = line.partition("| ")
                if not sep:
                    jid, sep, rest = line.partition("|")
                job = self.jobs.get(jid)
                if job:
                    job.feed(rest)
        self.events.put("@@EOF")

    def wait_ready(self, timeout):
        try:
            ev = self.events.get(timeout=timeout)
        except queue.Empty:
            raise RunError(f"guest {self.cid}: did not boot within {timeout} s"
                           f" (console: {self.console})")
        if ev.startswith("@@READY"):
            return
        if ev.startswith("@@FAIL"):
            raise RunError(f"guest {self.cid}: {ev[7:]}")
        raise RunError(f"guest {self.cid}: guest stopped while booting: "
                       + self.console_tail())

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def run(self, cmd):
        with self.lock:
            jid = f"j{self.next_id}"
            self.next_id += 1
            job = Job(self, jid, cmd)
            self.jobs[jid] = job
            line = cmd
            if "\n" in cmd:
                # The agent reads one command per line: a script of several
                # lines would run as its first line only.
                b64 = base64.b64encode(cmd.encode()).decode()
                line = f'eval "$(echo {b64} | base64 -d)"'
            try:
                self.sock.sendall(f"{jid} {line}\n".encode())
            except OSError as e:
                raise RunError(f"guest {self.cid}: agent channel: {e}")
        return job

    def wait_accept(self, prog, timeout):
        """Wait until a process named `prog` sleeps in accept() (syscall 43).

        For servers that print their readiness to a stdio buffer which a
        pipe only flushes at exit (vsock_perf).
        """
        rc, _ = self.sh(
            f"i=0; while [ $i -lt {int(timeout * 20)} ]; do "
            f"for p in $(pidof {prog}); do grep -q '^43 ' /proc/$p/syscall "
            "2>/dev/null && exit 0; done; i=$((i+1)); sleep 0.05; done; "
            "exit 1", timeout + 10)
        return rc == 0

    def sh(self, cmd, timeout):
        """Run a command to its end; (rc, output). rc None on timeout."""
        job = self.run(cmd)
        return job.wait(timeout), job.output()

    def console_text(self):
        try:
            with open(self.console, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def console_tail(self, n=5):
        return " | ".join(self.console_text().strip().splitlines()[-n:])

    def scan(self):
        """New bad lines in the console since the last scan."""
        text = self.console_text()
        new = text[self.scan_offset:]
        self.scan_offset = len(text)
        return [l.strip() for l in new.splitlines() if BAD_CONSOLE.search(l)]

    def stop(self):
        if self.alive():
            try:
                self.sock.sendall(b"x poweroff -f\n")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.sock:
            self.sock.close()
        if self.qmp_conn:
            self.qmp_conn.close()
            self.qmp_conn = None


class BedLock:
    """One process with test beds at a time on this machine.

    Two beds at once on 2 cores (4 TCG vCPUs each, plus a debug kernel) only
    slow each other until boots time out; a second run waits here instead.
    The first bed a process starts takes the lock, which the process holds
    until it exits, so that a suite's reboots are not interleaved with
    another run. VSOCK_RS_PARALLEL_BEDS=1 turns the lock off.
    """

    def __init__(self):
        self.f = None

    def acquire(self):
        if self.f or os.environ.get("VSOCK_RS_PARALLEL_BEDS") == "1":
            return
        os.makedirs(CACHE, exist_ok=True)
        self.f = open(os.path.join(CACHE, "bed.lock"), "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log("   waiting for another test bed on this machine to finish")
            fcntl.flock(self.f, fcntl.LOCK_EX)


BED_LOCK = BedLock()


class Bed:
    """The device process and the two sibling guests."""

    def __init__(self, args, workdir):
        self.args = args
        self.dir = workdir
        self.device = None
        self.guests = []

    def start(self, drivers):
        a = self.args
        BED_LOCK.acquire()
        socks = {}
        vms = []
        for cid in (3, 4):
            socks[cid] = os.path.join(self.dir, f"vhost-{cid}.sock")
            uds = os.path.join(self.dir, f"host-{cid}.vsock")
            for p in (socks[cid], uds):
                if os.path.exists(p):
                    os.unlink(p)
            vms += ["--vm", f"guest-cid={cid},socket={socks[cid]},"
                            f"uds-path={uds}"]
        dlog = open(os.path.join(self.dir, "device.log"), "ab")
        self.device = subprocess.Popen([a.device] + vms,
                                       stdin=subprocess.DEVNULL,
                                       stdout=dlog, stderr=dlog,
                                       start_new_session=True)
        dlog.close()
        end = time.monotonic() + 10
        while not all(os.path.exists(s) for s in socks.values()):
            if self.device.poll() is not None:
                raise RunError("vsock device exited at start: see "
                               + os.path.join(self.dir, "device.log"))
            if time.monotonic() > end:
                raise RunError("vsock device did not create its sockets")
            time.sleep(0.05)
        udp = {3: free_udp_port(), 4: free_udp_port()}
        self.guests = [
            Guest(a, cid, self.dir, socks[cid], udp[cid], udp[7 - cid],
                  drivers[cid], a.initrd) for cid in sorted(drivers)
        ]
        for g in self.guests:
            g.start()
        for g in self.guests:
            g.wait_ready(a.boot_timeout)

    def stop(self):
        for g in self.guests:
            g.stop()
        if self.device and self.device.poll() is None:
            os.killpg(self.device.pid, signal.SIGTERM)
            try:
                self.device.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.device.pid, signal.SIGKILL)
                self.device.wait()

    def guest(self, cid):
        return next(g for g in self.guests if g.cid == cid)

    def kernel_problems(self):
        bad = []
        for g in self.guests:
            bad += [f"guest {g.cid}: {l}" for l in g.scan()]
        return bad


class Results:
    def __init__(self):
        self.passed = self.failed = self.skipped = 0
        self.flaky = []
        self.failures = []

    def ok(self, name, note=""):
        self.passed += 1
        log(f"  ok    {name}{note}")

    def fail(self, name, why):
        self.failed += 1
        self.failures.append(f"{name}: {why}")
        log(f"  FAIL  {name}: {why}")

    def skip(self, name, why):
        self.skipped += 1
        log(f"  skip  {name}: {why}")

    def finish(self, workdir, t0):
        """Print the failures and the closing counts line, and exit with 1
        if anything failed (every runner ends this way)."""
        log(f"logs in {workdir}; {time.monotonic() - t0:.0f} s")
        if self.flaky:
            log(f"flaky (passed on retry): {', '.join(self.flaky)}")
        if self.failures:
            log("failures:")
            for f in self.failures:
                log(f"  {f}")
        log(f"{self.passed} passed, {self.failed} failed, "
            f"{self.skipped} skipped")
        sys.exit(1 if self.failed else 0)


def vsock_test_cmd(binary, mode, peer_cid, server_cid, ctl_port, peer_port,
                   only, ntests):
    skips = " ".join(f"--skip={i}" for i in range(ntests) if i != only)
    host = ("--control-host=::" if mode == "server" else
            f"--control-host=fe80::{server_cid}%eth0")
    return (f"{binary} --mode={mode} {host} --control-port={ctl_port} "
            f"--peer-cid={peer_cid} --peer-port={peer_port} {skips}")


def run_pair(bed, server, client, binary, only, ntests, port, timeout):
    """One vsock_test (or vsock_diag_test) case; raises RunError on failure."""
    ctl = 5000 + port % 1000
    srv = bed.guest(server).run(vsock_test_cmd(
        binary, "server", client, server, ctl, port, only, ntests))
    if not srv.wait_line(r"Control socket listening", 30):
        raise RunError(f"server in guest {server} did not listen: "
                       + srv.output()[-300:])
    cli = bed.guest(client).run(vsock_test_cmd(
        binary, "client", server, server, ctl, port, only, ntests))
    # One deadline for both; the server may still be in one of its own
    # 10 s waits (vsock_test's TIMEOUT) when the client ends.
    end = time.monotonic() + timeout
    rc_c = cli.wait(timeout)
    rc_s = srv.wait(max(end - time.monotonic(), 20))
    for g in bed.guests:
        if not g.alive():
            raise RunError(f"guest {g.cid} died: " + g.console_tail())
    if rc_c is None or rc_s is None:
        who, job = ("client", cli) if rc_c is None else ("server", srv)
        raise RunError(f"hung: {who} in guest {job.guest.cid} did not finish "
                       f"within {timeout} s (last output: "
                       f"{job.output()[-200:]!r})")
    if rc_c != 0 or rc_s != 0:
        # The last line of each side that failed: one side's error is often
        # only the consequence of the other's (a reset, a closed control
        # socket).
        said = [f"{who}: " + (job.output().strip().splitlines() or [""])[-1]
                for who, job, rc in (("client", cli, rc_c),
                                     ("server", srv, rc_s)) if rc]
        raise RunError(f"exit client={rc_c} server={rc_s}: "
                       + " / ".join(said))


def list_tests(args):
    out = subprocess.run([args.vsock_test_host, "--list"],
                         capture_output=True, text=True)
    tests = []
    for line in (out.stdout + out.stderr).splitlines():
        m = re.match(r"(\d+)\s+(.*)", line.strip())
        if m:
            tests.append((int(m.group(1)), m.group(2)))
    if not tests:
        raise RunError("vsock_test --list printed no tests")
    return tests


def check_kmemleak(bed, res, label):
    # Both guests scan at once: each scan keeps one vCPU of its own guest
    # busy for tens of seconds under TCG.
    jobs = [(g, g.run("f=/sys/kernel/debug/kmemleak; [ -e $f ] || "
                      "{ echo no-kmemleak; exit 0; }; echo scan > $f; "
                      "sleep 2; echo scan > $f; cat $f"))
            for g in bed.guests]
    end = time.monotonic() + 240
    for g, job in jobs:
        name = f"{label} kmemleak guest {g.cid}"
        rc = job.wait(max(1, end - time.monotonic()))
        out = job.output()
        if rc is None:
            res.fail(name, "kmemleak scan did not finish in 240 s")
        elif "no-kmemleak" in out:
            res.skip(name, "kernel without kmemleak")
        elif "unreferenced object" in out:
            first = [l for l in out.splitlines() if "unreferenced" in l]
            res.fail(name, f"{len(first)} leak(s): {first[0]}")
        else:
            res.ok(name)


def run_case(bed, drivers, res, name, fn):
    """Run one case, retried once on fresh guests; record its result."""
    errors = []
    t0 = time.monotonic()
    for attempt in (1, 2):
        t0 = time.monotonic()
        try:
            if not all(g.alive() for g in bed.guests):
                bed.stop()
                bed.start(drivers)
            fn(attempt)
            bad = bed.kernel_problems()
            if bad:
                raise RunError("kernel log: " + bad[0])
            errors.append(None)
            break
        except RunError as e:
            errors.append(str(e))
            bad = bed.kernel_problems()
            if bad and "kernel log" not in str(e):
                errors[-1] += "; kernel log: " + bad[0]
            if "kernel log" in errors[-1]:
                break  # A kernel report is never flaky.
            log(f"  retry {name}: {e}")
            bed.stop()
            bed.start(drivers)
    dt = f" ({time.monotonic() - t0:.1f} s)"
    if errors[-1] is None and len(errors) == 1:
        res.ok(name, dt)
    elif errors[-1] is None:
        res.flaky.append(name)
        res.ok(name, f"{dt} [flaky: first try: {errors[0]}]")
    else:
        res.fail(name, errors[-1])


def run_suite(args, res):
    """Every vsock_test case in both role assignments, on one pair of guests.

    Each case runs on vsock ports of its own, so the guests are booted once
    for the whole suite and again only after a failure.
    """
    tests = list_tests(args)
    wanted = set(args.only) if args.only else None
    ntests = len(tests)
    assignments = [(3, 4), (4, 3)]
    if args.one_way:
        assignments = assignments[:1]
    drivers = {3: args.driver, 4: args.peer}
    log(f"== booting guest 3 ({drivers[3]}) and guest 4 ({drivers[4]}) on "
        f"the {args.front} front")
    bed = Bed(args, args.workdir)
    t0 = time.monotonic()
    try:
        bed.start(drivers)
    except RunError as e:
        bed.stop()
        res.fail("boot", str(e))
        return
    log(f"   guests up in {time.monotonic() - t0:.1f} s (logs: {args.workdir})")
    port = 1024
    try:
        for server, client in assignments:
            label = f"[{server}->{client}]"
            log(f"== role assignment {label}: server in guest {server} "
                f"({drivers[server]}), client in guest {client} "
                f"({drivers[client]})")
            for tid, tname in tests:
                name = f"{label} {tid:2d} {tname}"
                if wanted is not None and tid not in wanted:
                    continue
                if tid in args.skip:
                    res.skip(name, "skipped by --skip")
                    continue
                limit = KNOWN_LIMITS.get(args.kernel_version, {}).get(tname)
                if args.kernel != "perf":
                    limit = limit or SLOW_BED_LIMITS.get(tname)
                if limit and not args.known_limits:
                    res.skip(name, limit)
                    continue

                def case(attempt, tid=tid, server=server, client=client):
                    nonlocal port
                    port += 2
                    run_pair(bed, server, client, "vsock_test", tid, ntests,
                             port, args.timeout)

                run_case(bed, drivers, res, name, case)
            if wanted is None or args.diag:

                def diag(attempt, server=server, client=client):
                    nonlocal port
                    port += 2
                    run_pair(bed, server, client, "vsock_diag_test", -1, 0,
                             port, args.timeout)

                run_case(bed, drivers, res, f"{label} vsock_diag_test", diag)
        if args.kmemleak:
            check_kmemleak(bed, res, "[end]")
        for g in bed.guests:
            name = f"[end] kernel log guest {g.cid}"
            bad = [l for l in g.console_text().splitlines()
                   if BAD_CONSOLE.search(l)]
            if bad:
                res.fail(name, f"{len(bad)} report line(s), first: {bad[0]}")
            else:
                res.ok(name)
    finally:
        bed.stop()


def reload_suite(args, res):
    """Load, use and unload the Rust module many times; remove it under traffic.

    Guest 3 runs the Rust driver, guest 4 the C one. Every cycle reloads the
    module and carries an echo to guest 4; then a vsock_perf transfer is cut
    by unbinding the device, which must end the transfer with an error, and
    a kmemleak scan and the consoles must show nothing.
    """
    drivers = {3: "rust", 4: args.peer}
    bed = Bed(args, args.workdir)
    mod = DRIVERS["rust"]
    drv = f"/sys/bus/virtio/drivers/{mod}"
    try:
        bed.start(drivers)
        g3, g4 = bed.guest(3), bed.guest(4)
        srv = g4.run("vsock-echo server --port 2000")
        if not srv.wait_line("listening", 30):
            raise RunError("echo server did not start: " + srv.output())
        t0 = time.monotonic()
        for i in range(1, args.reload + 1):
            rc, out = g3.sh(
                f"for t in $(seq 50); do rmmod {mod} && break; sleep 0.2; "
                f"done; insmod /lib/modules/{mod}.ko && vsock-echo client "
                "--cid 4 --port 2000 --count 5 --size 8192", 120)
            bad = bed.kernel_problems()
            if rc != 0 or bad:
                raise RunError(f"cycle {i}: status {rc}: "
                               + (bad[0] if bad else out[-200:]))
        res.ok(f"reload {args.reload} times with traffic",
               f" ({time.monotonic() - t0:.0f} s)")

        rcv = g4.run("vsock_perf --port 2100")
        if not g4.wait_accept("vsock_perf", 30):
            raise RunError("vsock_perf receiver did not listen: "
                           + rcv.output())
        snd = g3.run("vsock_perf --sender 4 --port 2100 --bytes 4G "
                     "--buf-size 65536")
        time.sleep(3)
        rc, dev = g3.sh(f"cd {drv} && ls -d virtio* | head -1", 20)
        dev = dev.strip()
        g3.sh(f"echo {dev} > {drv}/unbind", 60)
        rc = snd.wait(60)
        name = "unbind under traffic ends the transfer with an error"
        bad = bed.kernel_problems()
        if rc is None:
            res.fail(name, "the sender hung after the device went away")
        elif rc == 0:
            res.fail(name, "the sender finished as if nothing happened")
        elif bad:
            res.fail(name, bad[0])
        else:
            res.ok(name, f" (sender status {rc})")
        rcv.wait(30)
        rc, out = g3.sh(f"echo {dev} > {drv}/bind && vsock-echo client "
                        "--cid 4 --port 2000 --count 5", 60)
        if rc == 0 and not bed.kernel_problems():
            res.ok("rebind, then traffic again")
        else:
            res.fail("rebind, then traffic again", out[-200:])
        check_kmemleak(bed, res, "[reload]")
        for g in bed.guests:
            bad = [l for l in g.console_text().splitlines()
                   if BAD_CONSOLE.search(l)]
            name = f"[reload] kernel log guest {g.cid}"
            if bad:
                res.fail(name, bad[0])
            else:
                res.ok(name)
    except RunError as e:
        res.fail("reload", str(e))
    finally:
        bed.stop()


def corrupt_module_initrd(args):
    """The initramfs with the C transport module replaced by garbage."""
    root = tempfile.mkdtemp(dir=args.workdir)
    os.makedirs(os.path.join(root, "lib/modules"))
    with open(os.path.join(root, "lib/modules",
                           DRIVERS["c"] + ".ko"), "wb") as f:
        f.write(b"\x7fELF not really a module\n")
    path = os.path.join(args.workdir, "corrupt.cpio")
    with open(path, "wb") as out:
        with open(args.initrd, "rb") as f:
            shutil.copyfileobj(f, out)
        out.flush()
        subprocess.run("find . | cpio -o -H newc --quiet",
                       shell=True, cwd=root, stdout=out, check=True)
    shutil.rmtree(root)
    return path


def selftest(args, res):
    """Check that the runner itself catches the failures it promises to."""
    workdir = args.workdir
    # 1. A driver that fails to load: a corrupt module file.
    good_initrd = args.initrd
    args.initrd = corrupt_module_initrd(args)
    bed = Bed(args, workdir)
    try:
        bed.start({3: "c"})
        res.fail("selftest driver load failure", "guest booted anyway")
    except RunError as e:
        if "insmod" in str(e):
            res.ok("selftest driver load failure", f" -> {e}")
        else:
            res.fail("selftest driver load failure", f"wrong cause: {e}")
    bed.stop()
    args.initrd = good_initrd
    # 2. A test that hangs: a "test program" that never ends.
    bed = Bed(args, workdir)
    bed.start({3: "c", 4: "c"})
    hang = "echo Control socket listening; sleep 600; true"
    try:
        run_pair(bed, 3, 4, hang, 0, 0, 1100, 5)
        res.fail("selftest hang detection", "the hung pair passed")
    except RunError as e:
        if str(e).startswith("hung"):
            res.ok("selftest hang detection", f" -> {e}")
        else:
            res.fail("selftest hang detection", f"wrong cause: {e}")
    # 3. A guest that warns, and one that oopses.
    for what in ("WARNING", "EXCEPTION"):
        bed.guest(4).sh(
            f"echo {what} > /sys/kernel/debug/provoke-crash/DIRECT", 20)
        time.sleep(1)
        bad = bed.kernel_problems()
        if bad:
            res.ok(f"selftest kernel {what} detection", f" -> {bad[0]}")
        else:
            res.fail(f"selftest kernel {what} detection",
                     "nothing found in the console (is LKDTM built in?)")
    bed.stop()


def add_pair_args(p):
    """The options of the suites that pair a driver under test (guest 3)
    with a peer (guest 4) on a debug kernel: faults.py, scenarios.py."""
    p.add_argument("--driver", default="rust", choices=sorted(DRIVERS),
                   help="driver under test in guest 3 (default rust)")
    p.add_argument("--peer", default="c", choices=sorted(DRIVERS),
                   help="driver in guest 4 (default c)")
    p.add_argument("--kernel", default="debug", help="kernel flavour")
    p.add_argument("--kernel-version", choices=("6.12", "7.3"),
                   default=os.environ.get("KERNEL") or "6.12",
                   help="guest kernel (default $KERNEL, else 6.12)")


def add_front_args(p):
    """The options that choose how the vsock device reaches the guests."""
    p.add_argument("--front", choices=FRONTS,
                   help="generic: QEMU 11.1's vhost-user-test-device-pci, "
                   "the device owns all three queues and the config space "
                   "(default when 'make qemu' has set it up); vsock: the "
                   "host's QEMU 7.2 vhost-user-vsock-pci (no device events)")
    p.add_argument("--root-port", action="store_true",
                   help="put the vsock device (id vsock0) on a PCIe root "
                   "port (id rp0), so that QMP can unplug and plug it")


def front_argv(a):
    """add_front_args' options as parsed into `a`, for parse_args()."""
    return ((["--front", a.front] if a.front else [])
            + (["--root-port"] if a.root_port else []))


def pick_front(front):
    """The front asked for, or the default: generic when it is set up."""
    ready = os.path.exists(QEMU_STAMP)
    if front == "generic" and not ready:
        sys.exit(f"error: --front generic needs QEMU 11.1 in {QEMU_ROOT}: "
                 "run 'make qemu' (as root), or use --front vsock")
    if front:
        return front
    if ready:
        return "generic"
    log(f"note: no QEMU 11.1 in {QEMU_ROOT} ('make qemu' sets it up): "
        "using --front vsock, QEMU 7.2's vhost-user-vsock-pci, where the "
        "device can send no events")
    return "vsock"


def parse_args(argv=None):
    """Parse the command line and check that every part of the bed exists."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--driver", default="c", choices=sorted(DRIVERS),
                   help="transport in guest 3 (default c)")
    p.add_argument("--peer", default="c", choices=sorted(DRIVERS),
                   help="transport in guest 4 (default c)")
    p.add_argument("--kernel", default="debug", help="kernel flavour")
    p.add_argument("--kernel-version", choices=["6.12", "7.3"],
                   default=os.environ.get("KERNEL") or "6.12",
                   help="guest kernel (default $KERNEL, else 6.12)")
    p.add_argument("--only", type=int, action="append",
                   help="run only this vsock_test id (repeatable)")
    p.add_argument("--skip", type=int, action="append", default=[],
                   help="skip this vsock_test id (repeatable)")
    p.add_argument("--known-limits", action="store_true",
                   help="run the tests skipped as known limits too "
                   "(KNOWN_LIMITS, SLOW_BED_LIMITS), to see whether one "
                   "still holds")
    p.add_argument("--one-way", action="store_true",
                   help="only the first role assignment")
    p.add_argument("--diag", action="store_true",
                   help="run vsock_diag_test also with --only")
    p.add_argument("--timeout", type=int, default=120,
                   help="seconds one test case may take (default 120)")
    p.add_argument("--boot-timeout", type=int, default=90)
    p.add_argument("--no-kmemleak", dest="kmemleak", action="store_false")
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--mem", type=int, default=512, help="MiB per guest")
    p.add_argument("--append", default="", help="extra kernel parameters")
    p.add_argument("--workdir", help="where logs go (default: a temp dir)")
    p.add_argument("--reload", type=int, default=0, metavar="N",
                   help="instead of vsock_test: reload the Rust module N "
                   "times with traffic, then unbind it under traffic")
    p.add_argument("--selftest", action="store_true",
                   help="check the runner's own failure detection")
    p.add_argument("--extra-initrd", action="append", default=[],
                   help="cpio archive appended to the initramfs")
    add_front_args(p)
    args = p.parse_args(argv)

    args.front = pick_front(args.front)
    args.qemu = (os.path.join(QEMU_ROOT, "usr/bin/qemu-system-x86_64")
                 if args.front == "generic"
                 else shutil.which("qemu-system-x86_64"))
    # The flavour's cache name: "debug" for 6.12, "7.3-debug" for 7.3.
    kname = kernel_name(args.kernel, args.kernel_version)
    args.kdir = os.environ.get("KDIR") or os.path.join(CACHE, "kernel",
                                                        kname)
    args.device = os.environ.get("VSOCK_DEVICE") or os.path.join(
        CACHE, "target", "release", "vsock-device")
    args.vsock_test_host = os.path.join(
        CACHE, "vsock-tests", kernel_name("bin", args.kernel_version),
        "vsock_test")
    base_initrd = os.path.join(CACHE, "initramfs", f"{kname}.cpio")
    extras = os.path.join(CACHE, "initramfs", f"extras-{kname}.cpio")
    if os.path.exists(extras):
        args.extra_initrd.insert(0, extras)
    need = {
        "qemu-system-x86_64": args.qemu,
        "kernel": os.path.join(args.kdir, "arch/x86/boot/bzImage"),
        "vsock device": args.device,
        "initramfs": base_initrd,
        "vsock_test": args.vsock_test_host,
    }
    for what, path in need.items():
        if not path or not os.path.exists(path):
            sys.exit(f"error: {what} not found ({path}): run 'make setup "
                     f"kernel' or the Makefile target that builds it")
    args.workdir = os.path.abspath(args.workdir or
                                   tempfile.mkdtemp(prefix="vmtest-"))
    os.makedirs(args.workdir, exist_ok=True)
    # One initramfs for both guests: the base one plus the extras.
    args.initrd = os.path.join(args.workdir, "initrd.cpio")
    with open(args.initrd, "wb") as out:
        for part in [base_initrd] + args.extra_initrd:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    return args


def shell_cmd(args, driver, vhost_sock):
    """QEMU command line for one interactive guest (CID 3) on a device."""
    g = Guest(args, 3, args.workdir, vhost_sock, 0, 0, driver, args.initrd)
    cmd = g.qemu_argv()
    # Console on stdio; no agent and no network.
    drop = ("file:", "id=agent", "chardev:agent", "id=n0", "virtio-net-pci")
    out = [cmd[0]]
    i = 1
    while i < len(cmd):
        has_val = i + 1 < len(cmd) and not cmd[i + 1].startswith("-")
        item = cmd[i:i + 2] if has_val else cmd[i:i + 1]
        if not any(d in v for v in item for d in drop):
            out += item
        i += len(item)
    k = out.index("-append") + 1
    out[k] = out[k].replace("console=ttyS0", "console=ttyS0 tb.shell=1")
    return g.qemu_cmd(out + ["-serial", "mon:stdio"])


def main():
    args = parse_args()
    res = Results()
    t0 = time.monotonic()
    try:
        if args.selftest:
            selftest(args, res)
        elif args.reload:
            reload_suite(args, res)
        else:
            run_suite(args, res)
    except RunError as e:
        res.fail("runner", str(e))
    except KeyboardInterrupt:
        res.fail("runner", "interrupted")
    res.finish(args.workdir, t0)


if __name__ == "__main__":
    main()
