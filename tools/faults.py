#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Play a hostile device and the production paths against a vsock guest driver.

Two sibling guests run on the project's vhost-user device (tools/vsock-device)
exactly as tools/vmtest.py boots them: guest 3 runs the driver under test
(--driver), guest 4 the peer (--peer, default c). The device is started with a
control socket (`--control PATH`) through which every fault is scripted from a
seed: crafted rx packets of each class the driver must drop, used-ring abuse,
events, config-space CIDs, feature bits, holding packets back.

Every case runs with a healthy load: `vsock-echo` loops in both directions
between the guests, each connection checking every echoed byte. A case passes
only if

- that load succeeds across the fault (or, where the fault resets
  connections by design, fails the documented way and works again after);
- the exact-count oracle holds: for every drop class, the number of packets
  the device says it injected equals the change of the driver's
  `rx_dropped_<class>` counter, and event and config counters likewise;
- neither console shows an Oops, WARNING, KASAN, UBSAN or lockdep report;
- kmemleak finds nothing when the guests are checked (before every reboot
  and at the end).

The C driver (--driver c) has no counters: for it the suite records what
happens in each case (crash, hang, leak, answered, accepted) and fails only
when the test bed itself breaks. --json writes those findings; --table turns
two such files (C and Rust) into the table of Documentation/faults.rst.

--soak multiplies the sizes (10^6 crafted packets, 100 transport resets,
1000 reloads). --selftest shows that the suite's checks can fail: it runs
cases with a wrong oracle, a load that cannot succeed and a provoked WARNING,
and passes only if each of them is caught.

The last line printed is "N passed, N failed, N skipped".
"""

import argparse
import errno
import fnmatch
import json
import os
import re
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vmtest  # noqa: E402  (the runner: Bed, Guest, Qmp, Results, ...)
from vmtest import RunError, log  # noqa: E402

# Drop classes, in the order the driver checks them (see
# tools/vsock-device/src/inject.rs and src/protocol/rx.rs).
CLASSES = ("short_buffer", "used_len_over_capacity", "payload_too_long",
           "unknown_type", "type_not_negotiated", "invalid_op", "unknown_op",
           "control_with_payload", "cid_upper_bits", "wrong_dst_cid",
           "bad_src_cid")
# Classes rejected only for their type or op: with sane addresses the
# common code still sees them and answers (usually with an RST), as in C.
ANSWERED = ("unknown_type", "type_not_negotiated", "invalid_op", "unknown_op")
USED_ABUSE = ("bad_id", "dup_id", "never_posted", "tx_len")
# Config-space CIDs no guest may use: reserved, VMADDR_CID_ANY, upper bits.
BAD_CIDS = (0, 1, 2, 0xffffffff, 1 << 32 | 3)
NO_CID = 0xffffffff
CID_LOCAL = 1

# The driver's counters in one process (vmtest.COUNTERS_CMD runs a cat per
# file, which takes a minute on a loaded host): debugfs, else sysfs, as
# "path:value" lines.
COUNTERS_CMD = ("d=/sys/kernel/debug/virtio_vsock_rs; [ -d $d ] || "
                "d=$(ls -d /sys/bus/virtio/devices/*/vsock_rs 2>/dev/null | "
                "head -1); [ -n \"$d\" ] && [ -d $d ] && grep -r . $d || "
                "echo 'no driver counters'")

# Echo servers: guest 3 listens on SERVER_PORT[3], guest 4 on SERVER_PORT[4].
SERVER_PORT = {3: 3000, 4: 4000}


class BedError(Exception):
    """The test bed itself broke (device, QEMU, control socket): a failure
    whatever the driver."""


class Problem(Exception):
    """What the driver did wrong in a case; ends the case."""


# -- the device's control socket ---------------------------------------------

class Control:
    """The line protocol of `vsock-device --control PATH`.

    ``cmd("inject", 3, "short_buffer", 10000, 1)`` sends one line and returns
    the reply's ``key=value`` pairs as a dict (numbers as int); ``ERR``
    raises BedError, or ControlRefused when `refusal_ok`.
    """

    def __init__(self, path, timeout=600):
        self.path = path
        self.timeout = timeout
        self.sock = None
        self.file = None

    def connect(self, wait=15):
        end = time.monotonic() + wait
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except OSError as e:
                s.close()
                if time.monotonic() > end:
                    raise BedError(f"control socket {self.path}: {e}")
                time.sleep(0.1)
        s.settimeout(self.timeout)
        self.sock = s
        self.file = s.makefile("rwb")

    def close(self):
        if self.file:
            self.file.close()
            self.sock.close()
        self.sock = self.file = None

    def raw(self, line):
        """Send one command line; the reply line, as text."""
        if self.file is None:
            self.connect()
        try:
            self.file.write(line.encode() + b"\n")
            self.file.flush()
            reply = self.file.readline()
        except OSError as e:
            self.close()
            raise BedError(f"control: {line!r}: {e}")
        if not reply:
            self.close()
            raise BedError(f"control: {line!r}: the device closed the socket")
        return reply.decode().strip()

    def cmd(self, *words, refusal_ok=False):
        line = " ".join(str(w) for w in words)
        reply = self.raw(line)
        if reply.startswith("OK"):
            return parse_kv(reply[2:])
        if refusal_ok and reply.startswith("ERR"):
            raise ControlRefused(reply[3:].strip())
        raise BedError(f"control: {line!r} -> {reply!r}")


class ControlRefused(Exception):
    """The device answered ERR to a command the caller allowed to fail."""


def parse_kv(text):
    """``a=1 b=x`` as {"a": 1, "b": "x"}; numbers (also 0x...) as int.

    >>> parse_kv(" injected=10000 class=short_buffer x=0x10 junk")
    {'injected': 10000, 'class': 'short_buffer', 'x': 16}
    """
    out = {}
    for word in text.split():
        k, sep, v = word.partition("=")
        if not sep:
            continue
        try:
            out[k] = int(v, 0)
        except ValueError:
            out[k] = v
    return out


def class_counts(kv):
    """The per-class numbers in a device reply, keyed by class name.

    The device may name them `short_buffer=` or with a prefix
    (`injected_short_buffer=`, `rx_short_buffer=`).

    >>> class_counts({"injected": 3, "short_buffer": 1, "rx_bad_src_cid": 2})
    {'short_buffer': 1, 'bad_src_cid': 2}
    """
    out = {}
    for k, v in kv.items():
        for prefix in ("", "injected_", "inject_", "rx_", "rx_dropped_"):
            if k.startswith(prefix) and k[len(prefix):] in CLASSES:
                out[k[len(prefix):]] = v
    return out


def module_cpio(workdir, kernel, version):
    """A cpio archive with the Rust module as built for `kernel`, appended
    to the initramfs: the shared extras archive holds it only when the last
    `make extras` asked for it."""
    ko = os.path.join(vmtest.CACHE, "module",
                      vmtest.kernel_name(kernel, version), "virtio_vsock_rs.ko")
    if not os.path.exists(ko):
        sys.exit(f"error: {ko} not found: run 'make module FLAVOUR={kernel} "
                 f"KERNEL={version}'")
    root = os.path.join(workdir, "module-root")
    os.makedirs(os.path.join(root, "lib/modules"), exist_ok=True)
    shutil.copy(ko, os.path.join(root, "lib/modules"))
    path = os.path.join(workdir, "module.cpio")
    with open(path, "wb") as out:
        subprocess.run("find . | cpio -o -H newc --quiet", shell=True,
                       cwd=root, stdout=out, check=True)
    shutil.rmtree(root)
    return path


def device_wrapper(workdir, device, control):
    """A script that runs `device` with a control socket, for vmtest's Bed
    (which starts args.device with the --vm options only)."""
    path = os.path.join(workdir, "vsock-device-control")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec {device} --control {control} \"$@\"\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


# -- healthy load ------------------------------------------------------------

class Flow:
    """One `vsock-echo client` loop in a guest, until a stop file appears.

    Every connection sends `count` messages of `size` bytes and checks each
    echoed byte. A strict flow stops at its first failure; a tolerant one
    (for faults that reset connections by design) counts failures and goes
    on, so that it shows the first connection after the fault succeeding.
    """

    def __init__(self, guest, cid, port, tag, count=8, size=16384,
                 timeout=10, tolerant=False, kind="stream"):
        self.guest = guest
        self.dst = (cid, port)
        self.tag = tag
        self.tolerant = tolerant
        stop = f"/tmp/stop-{tag}"
        on_fail = ('echo "flow failure $f"' if tolerant else
                   'echo "flow FAILED after $n rounds"; exit 1')
        script = (
            f"rm -f {stop}; n=0; f=0; "
            f"while [ ! -e {stop} ]; do "
            f"vsock-echo client --type {kind} --cid {cid} --port {port} "
            f"--count {count} --size {size} --timeout {timeout} 2>&1 "
            f"&& n=$((n+1)) || {{ f=$((f+1)); {on_fail}; sleep 0.2; }}; "
            f"done; echo \"flow done: ok=$n failed=$f\"")
        self.job = guest.run(script)

    def lines(self):
        with self.job.cond:
            return list(self.job.lines)

    def oks(self):
        return sum(1 for l in self.lines() if l.startswith("echo ok"))

    def failures(self):
        return [l for l in self.lines() if l.startswith("echo FAILED")]

    def wait_oks(self, n, timeout):
        """Wait until `n` connections have succeeded; False on timeout or if
        the flow ended."""
        end = time.monotonic() + timeout
        while self.oks() < n:
            if self.job.rc is not None or time.monotonic() > end:
                return False
            if not self.guest.alive():
                return False
            time.sleep(0.2)
        return True

    def stop(self, timeout):
        """Stop the loop after its current connection; its exit status (None
        if it did not end within `timeout`)."""
        if self.job.rc is None and self.guest.alive():
            self.guest.sh(f"touch /tmp/stop-{self.tag}", 30)
        return self.job.wait(timeout)

    def describe(self):
        f = self.failures()
        return (f"{self.guest.cid}->{self.dst[0]}:{self.dst[1]} "
                f"ok={self.oks()} failed={len(f)}"
                + (f" first failure: {f[0]}" if f else ""))


# -- the suite's state -------------------------------------------------------

class Fixture:
    """The bed (device with its control socket, two guests) and what the
    cases share: counters, flows, the guest CID, findings."""

    def __init__(self, args, vargs):
        self.args = args
        self.vargs = vargs
        self.driver = args.driver
        self.mod = vmtest.DRIVERS[args.driver]
        self.bed = None
        self.drivers = None
        self.ctl = Control(os.path.join(vargs.workdir, "control.sock"))
        self.cid3 = 3
        self.servers = {}
        self.ntag = 0
        self.dirty = False
        self.session = []  # cases run since the last boot (for kmemleak)
        self.findings = {}  # case name -> list of observations
        self.bias = 0  # --selftest: a deliberately wrong oracle

    # -- boot and reboot --
    def boot(self, drivers):
        self.shutdown()
        self.bed = vmtest.Bed(self.vargs, self.vargs.workdir)
        self.drivers = dict(drivers)
        self.cid3 = 3
        self.servers = {}
        self.dirty = False
        try:
            self.bed.start(self.drivers)
        except RunError as e:
            raise BedError(f"boot: {e}")
        self.ctl.close()
        self.ctl.connect()
        for cid, drv in self.drivers.items():
            if drv != "none":
                self.start_server(cid)

    def shutdown(self):
        self.ctl.close()
        if self.bed:
            self.bed.stop()
        self.bed = None

    def reboot_guest(self, cid, driver=None):
        """Power one guest off and boot it again (the device stays)."""
        g = self.g(cid)
        g.stop()
        if driver:
            self.drivers[cid] = driver
            g.driver = driver
        if cid == 3:
            self.cid3 = 3
        self.servers.pop(cid, None)
        try:
            g.start()
            g.wait_ready(self.vargs.boot_timeout)
        except RunError as e:
            raise Problem(f"guest {cid} did not boot again: {e}")
        if self.drivers[cid] != "none":
            self.start_server(cid)

    def g(self, cid):
        return self.bed.guest(cid)

    def tag(self):
        self.ntag += 1
        return f"f{self.ntag}"

    # -- guest helpers --
    def sh(self, cid, cmd, timeout=300, what=None):
        """Run a command in a guest; its output. A hang is a Problem."""
        rc, out = self.g(cid).sh(cmd, timeout)
        if rc is None:
            raise Problem(f"guest {cid} hung: {what or cmd!r} did not end "
                          f"within {timeout} s")
        return rc, out

    def start_server(self, cid):
        job = self.g(cid).run(f"vsock-echo server --port {SERVER_PORT[cid]}")
        if not job.wait_line("listening", 60):
            raise Problem(f"echo server in guest {cid} did not start: "
                          + job.output()[-200:])
        self.servers[cid] = job

    def server_alive(self, cid):
        job = self.servers.get(cid)
        return job is not None and job.rc is None

    def flows(self, n=1, tolerant=False, count=8, size=16384, timeout=10,
              timeout_to3=None):
        """`n` flows each way: guest 3 -> guest 4 and guest 4 -> guest 3."""
        out = []
        for _ in range(n):
            out.append(Flow(self.g(3), 4, SERVER_PORT[4], self.tag(),
                            count, size, timeout, tolerant))
            out.append(Flow(self.g(4), self.cid3, SERVER_PORT[3], self.tag(),
                            count, size, timeout_to3 or timeout, tolerant))
        return out

    def wait_flowing(self, flows, timeout=120):
        for f in flows:
            if not f.wait_oks(1, timeout):
                raise Problem("healthy load did not start: " + f.describe()
                              + " " + " / ".join(f.lines()[-2:]))

    def finish_flows(self, flows, timeout=120, more=True):
        """After a fault: each flow completes one more connection (so one
        that overlapped the fault succeeded), then stops cleanly."""
        marks = [f.oks() for f in flows]
        if more:
            for f, m in zip(flows, marks):
                if not f.wait_oks(m + 1, timeout):
                    self.stop_flows(flows)
                    raise Problem("healthy load broke: " + f.describe())
        bad = []
        for f in flows:
            rc = f.stop(timeout)
            if rc is None:
                bad.append("hung: " + f.describe())
            elif rc != 0:
                bad.append("failed: " + f.describe())
        if bad:
            raise Problem("healthy load " + "; ".join(bad))

    def stop_flows(self, flows, timeout=60):
        for f in flows:
            f.stop(timeout)

    def echo(self, src, dst_cid, port, count=4, size=8192, timeout=10):
        """One checked echo connection; (ok, output)."""
        rc, out = self.sh(src, f"vsock-echo client --cid {dst_cid} --port "
                          f"{port} --count {count} --size {size} --timeout "
                          f"{timeout}", timeout * 3 + 30)
        return rc == 0, out.strip()

    def echo_both(self, what):
        """A checked echo each way right now, or a Problem."""
        for src, dst, port in ((3, 4, SERVER_PORT[4]),
                               (4, self.cid3, SERVER_PORT[3])):
            ok, out = self.echo(src, dst, port)
            if not ok:
                last = out.splitlines()[-1] if out else "(no output)"
                raise Problem(f"{what}: echo {src}->{dst} failed: {last}")

    # -- counters --
    def counters(self, cid=3):
        """The driver's counters in a guest, or None (C driver)."""
        rc, out = self.sh(cid, COUNTERS_CMD, 300, "reading counters")
        if "no driver counters" in out:
            return None
        c = {}
        for line in out.splitlines():
            k, sep, v = line.rpartition("/")[2].partition(":")
            if sep:
                try:
                    c[k.strip()] = int(v.strip(), 0)
                except ValueError:
                    pass
        return c

    def has_counters(self):
        return self.driver == "rust"

    def settle(self, base, want, timeout=60):
        """Poll the driver's counters until every counter in `want` has moved
        by exactly its value from `base` (or `timeout` passes); then read
        once more a second later, so that a late extra count shows too.
        The deltas of every counter in `want`."""
        end = time.monotonic() + timeout
        while True:
            cur = self.counters() or {}
            delta = {k: cur.get(k, 0) - base.get(k, 0) for k in want}
            if delta == want or time.monotonic() > end:
                break
            time.sleep(0.5)
        time.sleep(1)
        cur = self.counters() or {}
        return {k: cur.get(k, 0) - base.get(k, 0) for k in want}

    def oracle(self, base, want, what):
        """Assert exact counter deltas (Rust); record nothing for C."""
        if not self.has_counters():
            return None
        want = {k: v + self.bias for k, v in want.items()}
        got = self.settle(base, want)
        wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        if wrong:
            raise Problem(f"{what}: counter mismatch (driver, expected): "
                          + ", ".join(f"{k}={g} want {w}"
                                      for k, (g, w) in sorted(wrong.items())))
        return got

    def device_counts(self, cid=3):
        return class_counts(self.ctl.cmd("counts", cid))

    def status(self, cid=3):
        return self.ctl.cmd("status", cid)

    def note(self, case, msg):
        self.findings.setdefault(case, []).append(msg)

    # -- driver binding --
    def drv_dir(self):
        return f"/sys/bus/virtio/drivers/{self.mod}"

    def bound_dev(self):
        rc, out = self.sh(3, f"cd {self.drv_dir()} 2>/dev/null && "
                          "ls -d virtio* 2>/dev/null | head -1")
        return out.strip() or None

    def unbind(self, timeout=120):
        dev = self.bound_dev()
        if not dev:
            raise Problem("no device bound to the driver")
        rc, out = self.sh(3, f"echo {dev} > {self.drv_dir()}/unbind", timeout,
                          "unbind")
        if rc != 0:
            raise Problem(f"unbind failed: {out.strip()}")
        return dev

    def bind(self, dev, timeout=120):
        rc, out = self.sh(3, f"echo {dev} > {self.drv_dir()}/bind", timeout,
                          "bind")
        if rc != 0:
            raise Problem(f"bind failed: {out.strip()}")

    def rebind(self, dev, what):
        """Bind the driver to `dev` again, restart guest 3's echo server if
        the unbind took it, and check an echo each way."""
        self.bind(dev)
        self.wait_bound()
        if not self.server_alive(3):
            self.start_server(3)
        self.echo_both(what)

    def wait_bound(self, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.bound_dev():
                return
            time.sleep(0.5)
        raise Problem(f"the driver did not bind within {timeout} s")

    def local_cid(self, cid=3):
        rc, out = self.sh(cid, "vsock-echo cid")
        m = re.search(r"(\d+)", out)
        return int(m.group(1)) if m and rc == 0 else None

    # -- reports --
    def kernel_problems(self):
        return self.bed.kernel_problems() if self.bed else []

    def kmemleak(self):
        """Leak reports of both guests (vmtest.check_kmemleak), as text."""
        rec = Recorder()
        vmtest.check_kmemleak(self.bed, rec, "kmemleak")
        return rec.failures


class Recorder:
    """Stands in for vmtest.Results where a check's result is only kept."""

    def __init__(self):
        self.failures = []

    def ok(self, name, note=""):
        pass

    def skip(self, name, why):
        pass

    def fail(self, name, why):
        self.failures.append(f"{name}: {why}")


# -- the cases ---------------------------------------------------------------

class Case:
    """One named case: `fn(fx, case)` raises Problem on what the driver did
    wrong; `needs` lists what the bed must offer; `boot` asks for fresh
    guests (with `drivers` overriding guest 3's or 4's driver)."""

    def __init__(self, name, fn, needs=(), boot=False, drivers=None,
                 reboot_after=False, doc=""):
        self.name = name
        self.fn = fn
        self.needs = set(needs)
        self.boot = boot
        self.drivers = drivers or {}
        self.reboot_after = reboot_after
        self.doc = doc


def scaled(args, check, soak):
    return soak if args.soak else check


def case_flood(kind):
    def run(fx, case):
        a = fx.args
        n = a.packets or scaled(a, 10000, 84000)
        renegotiated = False
        if kind == "type_not_negotiated" and fx.status().get("seqpacket"):
            # Withdraw SEQPACKET: the front reads the device's features when
            # it connects, so guest 3 boots again to see them.
            fx.ctl.cmd("features", 3, "seqpacket", "off")
            renegotiated = True
            fx.reboot_guest(3)
            st = fx.status()
            if st.get("seqpacket"):
                raise BedError(f"seqpacket still negotiated after a reboot "
                               f"with it withdrawn: {st}")
            fx.note(case.name, "seqpacket withdrawn, guest 3 booted again")
        try:
            flows = fx.flows()
            fx.wait_flowing(flows)
            base = fx.counters()
            dev0 = fx.device_counts()
            t0 = time.monotonic()
            rep = fx.ctl.cmd("inject", 3, kind, n, a.seed + CLASSES_AND_RANDOM.index(kind))
            dt = time.monotonic() - t0
            dev1 = fx.device_counts()
            ddev = {c: dev1.get(c, 0) - dev0.get(c, 0) for c in CLASSES}
            if rep.get("injected") != n:
                raise BedError(f"device injected {rep.get('injected')} of {n}")
            if sum(ddev.values()) != n:
                raise BedError(f"device counts moved by {sum(ddev.values())}"
                               f", not {n}: {ddev}")
            if kind != "random" and ddev[kind] != n:
                raise BedError(f"device counted {ddev}, not {n} {kind}")
            want = {f"rx_dropped_{c}": ddev[c] for c in CLASSES}
            got = fx.oracle(base, want, f"{n} x {kind}")
            fx.finish_flows(flows)
            fx.note(case.name, f"{n} injected in {dt:.1f} s"
                    + ("" if kind != "random" else ", per class "
                       + " ".join(f"{c}={v}" for c, v in ddev.items() if v)))
            if got is not None:
                answered(fx, case, base, ddev)
        finally:
            if renegotiated:
                # Offered again from the next boot on.
                fx.ctl.cmd("features", 3, "seqpacket", "on")
                fx.dirty = True
    return run


def answered(fx, case, base, ddev):
    """The type/op classes go on to the common code, which answers them
    (or throttles its answers); no other class may be answered."""
    cur = fx.counters()
    ans = cur.get("rx_answered", 0) - base.get("rx_answered", 0)
    thr = (cur.get("rx_replies_throttled", 0)
           - base.get("rx_replies_throttled", 0))
    sane = sum(ddev[c] for c in ANSWERED)
    fx.note(case.name, f"rx_answered +{ans}, rx_replies_throttled +{thr}")
    if ans > sane:
        raise Problem(f"rx_answered +{ans} exceeds the {sane} type/op "
                      "packets that may be answered")


CLASSES_AND_RANDOM = CLASSES + ("random",)

# The device's event counts and the driver's counters they must equal.
EVENT_COUNTERS = {"events_reset": "event_transport_reset",
                  "events_unknown": "event_unknown",
                  "events_short": "event_bad_len"}


def event_oracle(fx, base, dev0, what, extra=None):
    """Every event the device put on the used ring since `dev0` (its
    `counts`) is counted by the driver under its kind, exactly."""
    dev1 = fx.ctl.cmd("counts", 3)
    want = {drv: dev1.get(k, 0) - dev0.get(k, 0)
            for k, drv in EVENT_COUNTERS.items()}
    want.update(extra or {})
    fx.oracle(base, want, what)
    return want


FAULTED_PORT = 5000


def case_stream(kind):
    """Packets of one connection dropped, duplicated, reordered or delayed
    by the device: that connection may fail (vsock trusts its transport),
    but it must end, and the healthy load beside it must not notice."""
    def run(fx, case):
        srv = fx.g(3).run(f"vsock-echo server --port {FAULTED_PORT}")
        if not srv.wait_line("listening", 30):
            raise Problem("no server on the faulted port")
        flows = fx.flows()
        fx.wait_flowing(flows)
        fx.ctl.cmd("stream", 3, FAULTED_PORT, kind, 10, fx.args.seed)
        try:
            hit = Flow(fx.g(4), fx.cid3, FAULTED_PORT, fx.tag(), count=20,
                       size=4096, timeout=5, tolerant=True)
            time.sleep(scaled(fx.args, 10, 60))
            rc = hit.stop(90)
        finally:
            rep = fx.ctl.cmd("stream", 3, FAULTED_PORT, "off")
        fx.note(case.name, f"faulted flow: {hit.describe()}; device: "
                + " ".join(f"{k}={v}" for k, v in rep.items()
                           if k in ("drop", "dup", "reorder", "delay")))
        if rc is None:
            raise Problem("the faulted connection hung: " + hit.describe())
        fx.finish_flows(flows)
        fx.sh(3, f"kill {srv_pid(fx, FAULTED_PORT)} 2>/dev/null; true")
    return run


def srv_pid(fx, port):
    rc, out = fx.sh(3, "for p in $(pidof vsock-echo); do tr '\\0' ' ' "
                    f"</proc/$p/cmdline | grep -q -- 'server --port {port} ' "
                    "&& echo $p; done; true")
    return " ".join(out.split())


def case_used(kind):
    def run(fx, case):
        flows = fx.flows(tolerant=True, timeout=5)
        fx.wait_flowing(flows)
        rep = fx.ctl.cmd("used", 3, kind, 1)
        fx.note(case.name, "device: " + " ".join(f"{k}={v}"
                                                  for k, v in rep.items()))
        time.sleep(3)
        fx.stop_flows(flows, 90)
        fx.note(case.name, "load after the abuse: "
                + "; ".join(f.describe() for f in flows))
        bad = fx.kernel_problems()
        if bad:
            raise Problem("kernel log: " + bad[0])
        t0 = time.monotonic()
        dev = fx.unbind()
        fx.note(case.name, f"unbind took {time.monotonic() - t0:.1f} s")
        leaks = fx.kmemleak()
        if leaks:
            raise Problem("after unbind: " + leaks[0])
        # Binding again resets the device and sets up new virtqueues: the
        # next case starts from a healthy device without a reboot.
        fx.rebind(dev, "after binding again")
    return run


def case_event_reset(fx, case):
    """TRANSPORT_RESET, same CID: connected sockets get ECONNRESET, the
    listener keeps listening, a new connection works at once."""
    base = fx.counters()
    dev0 = fx.ctl.cmd("counts", 3)
    # One long connection each way, in flight when the reset comes.
    long3 = fx.g(3).run(f"vsock-echo client --cid 4 --port {SERVER_PORT[4]} "
                        "--count 100000 --size 4096 --timeout 10")
    long4 = fx.g(4).run(f"vsock-echo client --cid 3 --port {SERVER_PORT[3]} "
                        "--count 100000 --size 4096 --timeout 10")
    time.sleep(3)
    if long3.rc is not None or long4.rc is not None:
        raise Problem("long connections ended before the reset: "
                      + (long3.output() or long4.output())[-200:])
    fx.ctl.cmd("event", 3, "reset")
    rc3 = long3.wait(60)
    out3 = long3.output()
    if rc3 is None:
        raise Problem("a connected socket in guest 3 saw nothing of the reset")
    if rc3 == 0:
        raise Problem("the connection in guest 3 survived a transport reset")
    # ECONNRESET from the call, or ENOTCONN with ECONNRESET left in
    # SO_ERROR ("pending socket error: ..."), when the call was not waiting
    # as the reset came.
    reset_seen = re.search(r"reset|os error 104", out3, re.I)
    fx.note(case.name, "guest 3 client: " + out3.strip().splitlines()[-1])
    rc4 = long4.wait(60)
    fx.note(case.name, "guest 4 client: " + (long4.output().strip()
                                             .splitlines() or ["?"])[-1])
    if not reset_seen:
        raise Problem("the connected socket did not get ECONNRESET: "
                      + out3.strip()[-200:])
    if not fx.server_alive(3):
        raise Problem("the listener in guest 3 died with the reset")
    fx.echo_both("right after the reset")
    want = event_oracle(fx, base, dev0, "reset")
    if want["event_transport_reset"] != 1:
        raise BedError(f"the device counted {want} for one reset")
    flows = fx.flows()
    fx.wait_flowing(flows)
    fx.finish_flows(flows)


def case_event_reset_cid(fx, case):
    """TRANSPORT_RESET with a new CID: in use at once, both ways."""
    new = 5
    base = fx.counters()
    dev0 = fx.ctl.cmd("counts", 3)
    fx.ctl.cmd("event", 3, "reset_cid", new)
    fx.cid3 = new
    cid = fx.local_cid()
    fx.note(case.name, f"vsock-echo cid after the reset: {cid}")
    try:
        # A sibling connecting to the new CID succeeds at once: no retry.
        ok, out = fx.echo(4, new, SERVER_PORT[3])
        if not ok:
            raise Problem(f"guest 4 -> new CID {new} failed at once: {out}")
        if cid != new:
            raise Problem(f"vsock-echo cid prints {cid}, not {new}")
        event_oracle(fx, base, dev0, "reset_cid", {"guest_cid_changed": 1})
        if fx.has_counters() and fx.counters().get("guest_cid") != new:
            raise Problem("guest_cid counter is not the new CID")
        flows = fx.flows()
        fx.wait_flowing(flows)
        fx.finish_flows(flows, more=False)
    finally:
        fx.ctl.cmd("event", 3, "reset_cid", 3)
        fx.cid3 = 3
        time.sleep(1)
    if fx.local_cid() != 3:
        raise Problem("the CID did not come back to 3")
    fx.echo_both("back on CID 3")


def case_event_quiet(kind, *words):
    """Events that must change nothing but a counter: unknown id, short."""
    counter = {"unknown": "event_unknown", "short": "event_bad_len"}[kind]

    def run(fx, case):
        flows = fx.flows()
        fx.wait_flowing(flows)
        base = fx.counters()
        dev0 = fx.ctl.cmd("counts", 3)
        rep = fx.ctl.cmd("event", 3, kind, *words)
        fx.note(case.name, "device: " + " ".join(f"{k}={v}"
                                                  for k, v in rep.items()))
        want = event_oracle(fx, base, dev0, kind)
        if want[counter] != rep.get("posted", 1):
            raise BedError(f"the device counted {want}, posted {rep}")
        fx.finish_flows(flows)
    return run


def case_event_storm(fx, case):
    n = scaled(fx.args, 100, 1000)
    flows = fx.flows(tolerant=True, timeout=5)
    fx.wait_flowing(flows)
    base = fx.counters()
    dev0 = fx.ctl.cmd("counts", 3)
    rep = fx.ctl.cmd("event", 3, "storm", n)
    fx.note(case.name, f"{rep.get('posted')} resets posted")
    event_oracle(fx, base, dev0, "storm")
    fx.finish_flows(flows)
    fx.echo_both("after the storm")


def case_event_before_ok(fx, case):
    """An event posted before the driver is up reaches it when it starts."""
    dev0 = fx.ctl.cmd("counts", 3)
    rep = fx.ctl.cmd("event", 3, "reset")
    fx.note(case.name, "device: " + " ".join(f"{k}={v}"
                                              for k, v in rep.items()))
    load_driver(fx)
    # The driver's counters start at zero with it.
    want = event_oracle(fx, {}, dev0, "early event")
    fx.note(case.name, f"delivered after insmod: {want}")
    if want["event_transport_reset"] != 1:
        raise Problem(f"the early event was not delivered: {want}")
    fx.start_server(3)
    fx.echo_both("after the early event")


def load_driver(fx):
    rc, out = fx.sh(3, "[ ! -e /lib/modules/vmw_vsock_virtio_transport_common"
                    ".ko ] || insmod /lib/modules/vmw_vsock_virtio_transport_"
                    f"common.ko 2>/dev/null; insmod /lib/modules/{fx.mod}.ko",
                    120, "insmod")
    if rc != 0:
        raise Problem(f"insmod {fx.mod}: {out.strip()}")
    fx.drivers[3] = fx.driver
    fx.g(3).driver = fx.driver
    fx.wait_bound()


def case_probe_pending(fx, case):
    """Packets for guest 3 wait in the device while its driver is not
    loaded; after insmod and release they are delivered."""
    fx.ctl.cmd("hold", 3, "on")
    try:
        # A listener needs no transport until a connection arrives.
        srv = fx.g(3).run(f"vsock-echo server --port {SERVER_PORT[3]}")
        early = srv.wait_line("listening", 30)
        fx.note(case.name, "listener before insmod: "
                + ("yes" if early else "no: " + srv.output()[-120:]))
        cli = fx.g(4).run(f"vsock-echo client --cid 3 --port {SERVER_PORT[3]}"
                          " --count 20 --size 8192 --timeout 90")
        time.sleep(2)
        load_driver(fx)
        if not early:
            srv = fx.g(3).run(f"vsock-echo server --port {SERVER_PORT[3]}")
            if not srv.wait_line("listening", 30):
                raise Problem("no listener after insmod")
        fx.servers[3] = srv
        st = fx.status()
        fx.note(case.name, f"held: rx_avail={st.get('rx_avail')}")
    finally:
        fx.ctl.cmd("hold", 3, "off")
    rc = cli.wait(120)
    if rc != 0:
        raise Problem("the held connection was not delivered: "
                      + cli.output()[-200:])
    fx.echo_both("after the probe")


def case_config(value):
    def run(fx, case):
        base = fx.counters()
        dev0 = fx.ctl.cmd("counts", 3)
        fx.ctl.cmd("config", 3, "guest_cid", value)
        fx.ctl.cmd("event", 3, "reset")
        try:
            time.sleep(2)
            cid = fx.local_cid()
            fx.note(case.name, f"local CID after the reset: {cid}")
            ok, out = fx.echo(3, 4, SERVER_PORT[4], timeout=5)
            fx.note(case.name, "guest 3 -> 4 with that CID: "
                    + ("delivered" if ok else "refused: " + out[-80:]))
            if fx.has_counters():
                event_oracle(fx, base, dev0, f"CID {value:#x}",
                             {"config_bad_cid": 1})
                c = fx.counters()
                if c.get("guest_cid") != NO_CID:
                    raise Problem(f"guest_cid reads {c.get('guest_cid')}, "
                                  f"not {NO_CID} (no CID)")
                # Without a CID from the driver, the ioctl falls back to
                # vsock_loopback's VMADDR_CID_LOCAL (1).
                if cid not in (NO_CID, CID_LOCAL, None):
                    raise Problem(f"the guest still reports CID {cid}")
                if ok:
                    raise Problem("traffic went out with an unusable CID")
        finally:
            fx.ctl.cmd("config", 3, "guest_cid", 3)
            fx.ctl.cmd("event", 3, "reset")
        time.sleep(1)
        cid = fx.local_cid()
        if cid != 3:
            raise Problem(f"did not recover CID 3 (reads {cid})")
        fx.echo_both("after recovery")
    return run


def case_reset_load(fx, case):
    n = fx.args.resets or scaled(fx.args, 10, 100)
    flows = fx.flows(tolerant=True, timeout=8, timeout_to3=4)
    fx.wait_flowing(flows)
    base = fx.counters()
    dev0 = fx.ctl.cmd("counts", 3)
    t0 = time.monotonic()
    for i in range(n):
        marks = [f.oks() for f in flows]
        fx.ctl.cmd("event", 3, "reset")
        for f, m in zip(flows, marks):
            if not f.wait_oks(m + 1, 90):
                fx.stop_flows(flows)
                raise Problem(f"reset {i + 1}: no new connection after it: "
                              + f.describe())
        bad = fx.kernel_problems()
        if bad:
            fx.stop_flows(flows)
            raise Problem(f"reset {i + 1}: kernel log: {bad[0]}")
    fx.note(case.name, f"{n} resets in {time.monotonic() - t0:.0f} s; "
            + "; ".join(f.describe() for f in flows))
    want = event_oracle(fx, base, dev0, "resets")
    if want["event_transport_reset"] != n:
        raise BedError(f"the device counted {want} for {n} resets")
    fx.finish_flows(flows, more=False)
    if not fx.server_alive(3):
        raise Problem("the listener in guest 3 did not survive the resets")


def case_suspend(fx, case):
    n = fx.args.cycles or 20
    rc, out = fx.sh(3, "cat /sys/power/state; cat /sys/power/pm_test; "
                    "echo 0 > /sys/module/suspend/parameters/pm_test_delay; "
                    "echo devices > /sys/power/pm_test")
    if "freeze" not in out or rc != 0:
        raise BedError(f"no s2idle with pm_test in the guest: {out.strip()}")
    t0 = time.monotonic()
    for i in range(n):
        fx.echo_both(f"before cycle {i + 1}")
        rc, out = fx.sh(3, "echo freeze > /sys/power/state", 120,
                        f"suspend cycle {i + 1}")
        if rc != 0:
            raise Problem(f"cycle {i + 1}: suspend failed: {out.strip()}")
        fx.echo_both(f"after cycle {i + 1}")
        bad = fx.kernel_problems()
        if bad:
            raise Problem(f"cycle {i + 1}: kernel log: {bad[0]}")
    fx.note(case.name, f"{n} cycles of pm_test=devices + freeze (s2idle) "
            f"in {time.monotonic() - t0:.0f} s")
    fx.sh(3, "echo none > /sys/power/pm_test")


def case_hotplug(fx, case):
    n = fx.args.cycles or 20
    g = fx.g(3)
    t0 = time.monotonic()
    took = {"unplug": [], "bind": [], "traffic": []}
    # One tolerant flow each way for all the cycles: connections fail while
    # the device is away, and after each re-plug a new one must succeed.
    flows = fx.flows(tolerant=True, timeout=5)
    fx.wait_flowing(flows)
    try:
        for i in range(n):
            # Unplug waits for the proxy's own DEVICE_DELETED (the virtio
            # child sends one first) and closes the vhost-user connection;
            # the re-plug comes on a new one, which the device takes as a
            # new front.
            t = time.monotonic()
            try:
                g.unplug_vsock(120)
            except RunError as e:
                raise Problem(f"cycle {i + 1}: the guest did not release "
                              f"the device: {e}")
            took["unplug"].append(time.monotonic() - t)
            t = time.monotonic()
            g.plug_vsock()
            fx.wait_bound(120)
            took["bind"].append(time.monotonic() - t)
            # Connections that began before the unplug cannot succeed:
            # an ok counted from now on is a connection on the new device.
            t = time.monotonic()
            base = [f.oks() for f in flows]
            for f, b in zip(flows, base):
                if not f.wait_oks(b + 1, 120):
                    raise Problem(f"cycle {i + 1}: no traffic after "
                                  f"re-plug: " + f.describe())
            took["traffic"].append(time.monotonic() - t)
            bad = fx.kernel_problems()
            if bad:
                raise Problem(f"cycle {i + 1}: kernel log: {bad[0]}")
    finally:
        fx.stop_flows(flows)
    fx.note(case.name, f"{n} cycles in {time.monotonic() - t0:.0f} s; "
            + ", ".join(f"{k} median {statistics.median(v):.1f} s"
                        for k, v in took.items()))
    fx.note(case.name, "load: " + "; ".join(f.describe() for f in flows))
    fx.echo_both("after the last re-plug")


def case_reload(fx, case):
    n = fx.args.reloads or scaled(fx.args, 20, 1000)
    refused = 0
    waits = []
    t0 = time.monotonic()
    for i in range(n):
        fx.echo_both(f"cycle {i + 1}")
        t1 = time.monotonic()
        rc, out = fx.sh(3, f"r=0; until rmmod {fx.mod} 2>/dev/null; do "
                        "r=$((r+1)); [ $r -gt 200 ] && exit 1; sleep 0.05; "
                        "done; echo refused=$r", 120, "rmmod")
        if rc != 0:
            lsmod = fx.sh(3, "lsmod")[1]
            raise Problem(f"cycle {i + 1}: rmmod refused for 10 s: "
                          + " ".join(lsmod.split())[-120:])
        refused += int(re.search(r"refused=(\d+)", out).group(1))
        waits.append(time.monotonic() - t1)
        rc, out = fx.sh(3, f"insmod /lib/modules/{fx.mod}.ko", 120, "insmod")
        if rc != 0:
            raise Problem(f"cycle {i + 1}: insmod: {out.strip()}")
        if not fx.server_alive(3):
            fx.start_server(3)
        bad = fx.kernel_problems()
        if bad:
            raise Problem(f"cycle {i + 1}: kernel log: {bad[0]}")
    fx.note(case.name, f"{n} reloads in {time.monotonic() - t0:.0f} s; "
            f"rmmod refused {refused} times (sockets still closing), "
            f"rmmod wait max {max(waits):.2f} s; listener survived: "
            + ("yes" if fx.server_alive(3) else "no"))
    fx.echo_both("after the reloads")


def case_unbind_flows(fx, case):
    flows = fx.flows(4, tolerant=True, count=20, size=16384, timeout=10)
    fx.wait_flowing(flows)
    dev = fx.unbind()
    time.sleep(2)
    fx.stop_flows(flows, 120)
    hung = [f for f in flows if f.job.rc is None]
    fx.note(case.name, "; ".join(f.describe() for f in flows))
    if hung:
        raise Problem("flows hung after unbind: " + hung[0].describe())
    bad = fx.kernel_problems()
    if bad:
        raise Problem("kernel log: " + bad[0])
    fx.rebind(dev, "after rebind")
    flows = fx.flows()
    fx.wait_flowing(flows)
    fx.finish_flows(flows)


FAIL_SETUP = r"""set -e
for a in failslab fail_page_alloc; do
  d=/sys/kernel/debug/$a; [ -d $d ]
  echo 0 > $d/probability; echo 0 > $d/verbose; echo 1 > $d/interval
  echo -1 > $d/times; echo 0 > $d/space; echo N > $d/task-filter
  echo N > $d/ignore-gfp-wait
  [ ! -e $d/min-order ] || echo 0 > $d/min-order
  [ ! -e $d/ignore-gfp-highmem ] || echo N > $d/ignore-gfp-highmem
  echo 32 > $d/stacktrace-depth
  echo $((START)) > $d/require-start; echo $((END)) > $d/require-end
done
"""


def case_failslab(fx, case):
    secs = fx.args.fail_seconds or scaled(fx.args, 10, 120)
    rc, out = fx.sh(3, f"cat /proc/modules | grep '^{fx.mod} '; "
                    f"cat /sys/module/{fx.mod}/sections/.text")
    m = re.search(rf"^{fx.mod} (\d+) .* (0x[0-9a-f]+)", out, re.M)
    if not m or int(m.group(2), 16) == 0:
        raise BedError(f"module address unknown: {out.strip()}")
    start, size = int(m.group(2), 16), int(m.group(1))
    setup = FAIL_SETUP.replace("$((START))", str(start)).replace(
        "$((END))", str(start + size))
    rc, out = fx.sh(3, setup)
    if rc != 0:
        raise BedError("fault injection debugfs not usable: " + out.strip())
    fx.note(case.name, f"aimed at {fx.mod} [{start:#x}, {start + size:#x})")
    base = fx.counters()
    flows = fx.flows(tolerant=True, timeout=5)
    fx.wait_flowing(flows)
    try:
        fx.sh(3, "for a in failslab fail_page_alloc; do echo 30 > "
              "/sys/kernel/debug/$a/probability; done")
        time.sleep(secs)
    finally:
        fx.sh(3, "for a in failslab fail_page_alloc; do echo 0 > "
              "/sys/kernel/debug/$a/probability; done", 120,
              "turning fault injection off")
    rc, out = fx.sh(3, "grep . /sys/kernel/debug/fail*/times")
    for f in flows:
        if not f.wait_oks(f.oks() + 1, 120):
            fx.stop_flows(flows)
            raise Problem("no traffic after the faults stopped: "
                          + f.describe())
    fx.stop_flows(flows)
    fx.note(case.name, "load: " + "; ".join(f.describe() for f in flows))
    if fx.has_counters():
        c = fx.counters()
        fails = c.get("rx_refill_failures", 0) - base.get("rx_refill_failures",
                                                          0)
        fx.note(case.name, f"rx_refill_failures +{fails}, rx_refills "
                f"+{c.get('rx_refills', 0) - base.get('rx_refills', 0)}")
        if fails + fx.bias <= 0:
            raise Problem("no rx refill failure counted: the faults did not "
                          "reach the driver")
    fx.echo_both("after the faults")


def cases(args):
    """Every case, in an order that needs few boots: those that share the
    first boot, then those that boot guest 3 without a driver or leave it
    changed (a reboot after each), then the used-ring abuse, which binds
    the driver again after each case."""
    ev = ("generic",)
    out = [Case(f"flood.{c}", case_flood(c),
                doc=f"crafted rx packets of class {c}")
           for c in CLASSES_AND_RANDOM if c != "type_not_negotiated"]
    out += [Case(f"stream.{k}", case_stream(k),
                 doc=f"{k} 10% of one connection's packets")
            for k in ("drop", "dup", "reorder", "delay")]
    out += [
        Case("event.reset", case_event_reset, ev),
        Case("event.reset_cid", case_event_reset_cid, ev),
        Case("event.unknown", case_event_quiet("unknown", 7), ev),
        Case("event.short", case_event_quiet("short"), ev),
        Case("event.storm", case_event_storm, ev),
    ]
    out += [Case(f"config.cid_{v:#x}", case_config(v), ev) for v in BAD_CIDS]
    out += [
        Case("reset.under_load", case_reset_load, ev),
        Case("suspend.freeze", case_suspend),
        Case("hotplug.root_port", case_hotplug, ("root_port",)),
        Case("reload.under_traffic", case_reload),
        Case("unbind.8_flows", case_unbind_flows),
        Case("alloc.failslab", case_failslab, reboot_after=True),
        Case("probe.pending", case_probe_pending, boot=True,
             drivers={3: "none"}),
        Case("event.before_driver_ok", case_event_before_ok, ev, boot=True,
             drivers={3: "none"}),
    ]
    # Boots guest 3 again without SEQPACKET, and leaves it so.
    out.append(Case("flood.type_not_negotiated",
                    case_flood("type_not_negotiated"), reboot_after=True))
    out += [Case(f"used.{kind}", case_used(kind),
                 doc=f"used-ring abuse {kind}, then unbind and bind")
            for kind in USED_ABUSE]
    return out


# -- running them ------------------------------------------------------------

def bed_offers(fx, need):
    v = fx.vargs
    if need == "generic" and v.front != "generic":
        return ("needs --front generic: QEMU 7.2's vhost-user-vsock-pci "
                "keeps the event queue and config space in QEMU")
    if need == "root_port" and not getattr(v, "root_port", False):
        return "needs the PCIe root port (--root-port)"
    return None


def end_session(fx, res, driver_findings):
    """kmemleak and the consoles before the guests go away."""
    if not fx.bed or not fx.session:
        return
    names = ", ".join(fx.session)
    fx.session = []
    if not all(g.alive() for g in fx.bed.guests):
        return
    leaks = fx.kmemleak()
    label = f"kmemleak after [{names}]"
    if leaks:
        if fx.driver == "rust":
            res.fail(label, leaks[0])
        else:
            res.ok(label, f" (C: {leaks[0]})")
            driver_findings.setdefault("kmemleak", []).append(leaks[0])
    else:
        res.ok(label)


def boot_with_retry(fx, drivers):
    """Boot the bed; a second try on failure, then BedDown."""
    for attempt in (1, 2):
        log(f"== booting guest 3 ({drivers[3]}) and guest 4 ({drivers[4]}) "
            f"on the {fx.vargs.front} front")
        t0 = time.monotonic()
        try:
            fx.boot(drivers)
            log(f"   up in {time.monotonic() - t0:.0f} s")
            return
        except BedError as e:
            log(f"   boot failed: {e}")
            err = e
    raise BedDown(str(err))


class BedDown(BedError):
    """The guests do not boot twice in a row: the run stops."""


def run_all(args, vargs, res):
    fx = Fixture(args, vargs)
    base_drivers = {3: args.driver, 4: args.peer}
    selected = [c for c in cases(args)
                if not args.only or any(fnmatch.fnmatch(c.name, p) or p in
                                        c.name for p in args.only)]
    findings = {}
    verdicts = {}
    try:
        for case in selected:
            why = next((w for w in (bed_offers(fx, n) for n in case.needs)
                        if w), None)
            if why:
                res.skip(case.name, why)
                verdicts[case.name] = "skipped: " + why
                continue
            want = dict(base_drivers)
            want.update(case.drivers)
            need_boot = (fx.bed is None or case.boot or fx.dirty
                         or fx.drivers != want
                         or not all(g.alive() for g in fx.bed.guests))
            try:
                if need_boot:
                    end_session(fx, res, findings)
                    boot_with_retry(fx, want)
                fx.session.append(case.name)
                t0 = time.monotonic()
                problem = None
                try:
                    case.fn(fx, case)
                    bad = fx.kernel_problems()
                    if bad:
                        problem = "kernel log: " + bad[0]
                    dead = [g.cid for g in fx.bed.guests if not g.alive()]
                    if dead:
                        problem = (f"guest {dead[0]} died: "
                                   + fx.g(dead[0]).console_tail())
                except Problem as e:
                    problem = str(e)
                    bad = fx.kernel_problems()
                    if bad and "kernel log" not in problem:
                        problem += "; kernel log: " + bad[0]
                    fx.dirty = True
                except RunError as e:
                    problem = str(e)
                    fx.dirty = True
                if fx.bed.device.poll() is not None:
                    raise BedError("the vsock device exited: see "
                                   + os.path.join(vargs.workdir,
                                                  "device.log"))
                dt = f" ({time.monotonic() - t0:.1f} s)"
                notes = fx.findings.get(case.name, [])
                for n in notes:
                    log(f"        {n}")
                if problem is None:
                    res.ok(case.name, dt)
                    verdicts[case.name] = "ok"
                elif args.driver == "rust":
                    res.fail(case.name, problem)
                    verdicts[case.name] = "FAIL: " + problem
                else:
                    res.ok(case.name, f"{dt} (C: {problem})")
                    verdicts[case.name] = problem
                if case.reboot_after:
                    fx.dirty = True
            except BedDown as e:
                res.fail(case.name, f"test bed: {e}")
                verdicts[case.name] = f"bed: {e}"
                rest = selected[selected.index(case) + 1:]
                for c in rest:
                    res.skip(c.name, "not run: the guests do not boot")
                break
            except BedError as e:
                res.fail(case.name, f"test bed: {e}")
                verdicts[case.name] = f"bed: {e}"
                fx.dirty = True
        end_session(fx, res, findings)
    finally:
        fx.shutdown()
    return verdicts, fx.findings, findings


def selftest(args, vargs, res):
    """The suite's checks fail when they should."""
    import doctest
    failed, tried = doctest.testmod(sys.modules[__name__])
    (res.ok if not failed else res.fail)(
        "selftest doctests", f" ({tried} examples)" if not failed
        else f"{failed} of {tried} examples failed")
    fx = Fixture(args, vargs)
    try:
        fx.boot({3: args.driver, 4: args.peer})
        cases_by_name = {c.name: c for c in cases(args)}
        # 1. An oracle off by one must be caught (needs the counters).
        name = "selftest oracle off by one"
        if fx.has_counters():
            fx.bias = 1
            args.packets = args.packets or 1000
            try:
                cases_by_name["flood.invalid_op"].fn(
                    fx, cases_by_name["flood.invalid_op"])
                res.fail(name, "a wrong expected count passed")
            except Problem as e:
                ok = "counter mismatch" in str(e)
                (res.ok if ok else res.fail)(name, f" -> {e}")
            finally:
                fx.bias = 0
        else:
            res.skip(name, "the C driver has no counters")
        # 2. A load that cannot succeed must fail the case.
        name = "selftest broken load"
        f = Flow(fx.g(3), 4, 4999, fx.tag(), timeout=3)
        try:
            fx.wait_flowing([f], 30)
            res.fail(name, "echo to a port nobody listens on passed")
        except Problem as e:
            res.ok(name, f" -> {e}")
        f.stop(30)
        # 3. A kernel WARNING during a case must be found.
        name = "selftest kernel report"
        fx.sh(3, "echo WARNING > /sys/kernel/debug/provoke-crash/DIRECT")
        time.sleep(1)
        bad = fx.kernel_problems()
        (res.ok if bad else res.fail)(name, f" -> {bad[0]}" if bad else
                                      "nothing found in the console")
    finally:
        fx.shutdown()


# -- the table for Documentation/faults.rst -----------------------------------

def table(c_path, rust_path):
    with open(c_path) as f:
        c = json.load(f)
    with open(rust_path) as f:
        r = json.load(f)
    names = list(r["verdicts"]) + [n for n in c["verdicts"]
                                   if n not in r["verdicts"]]

    def cell(d, n):
        """The verdict and the findings that tell the drivers apart, short
        enough for a table: answers, the CID in use, whether it was sent."""
        v = d["verdicts"].get(n, "not run")
        if v != "ok":
            v = v.split(":")[0]
        short = []
        for x in d["notes"].get(n, []):
            if m := re.match(r"rx_answered \+(\d+)", x):
                short.append(f"answered {m[1]}")
            elif m := re.match(r"local CID after the reset: (\d+)", x):
                short.append(f"CID {m[1]}")
            elif "with that CID: delivered" in x:
                short.append("sends with it")
            elif m := re.search(r"with that CID: refused.*\(os error (\d+)\)",
                                x):
                short.append(f"refused ({errno.errorcode.get(int(m[1]), m[1])})")
        text = v if not short else f"{v}: " + ", ".join(short)
        return text.replace("|", "/")

    rows = [("case", "C driver", "Rust driver")]
    rows += [(n, cell(c, n), cell(r, n)) for n in names]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    sep = "  ".join("=" * x for x in w)
    out = [sep, "  ".join(rows[0][i].ljust(w[i]) for i in range(3)).rstrip(),
           sep]
    out += ["  ".join(row[i].ljust(w[i]) for i in range(3)).rstrip()
            for row in rows[1:]]
    out.append(sep)
    return "\n".join(out)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    vmtest.add_pair_args(p)
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="run the cases whose name matches (glob or "
                   "substring; repeatable)")
    p.add_argument("--list", action="store_true", help="list the cases")
    p.add_argument("--soak", action="store_true",
                   help="the big sizes: 10^6 packets, 100 resets, 1000 "
                   "reloads")
    p.add_argument("--selftest", action="store_true",
                   help="show that the checks catch a wrong oracle, a "
                   "broken load and a kernel report")
    p.add_argument("--seed", type=int, default=1,
                   help="first seed of the crafted packets (default 1)")
    p.add_argument("--packets", type=int, default=0,
                   help="crafted packets per flood case")
    p.add_argument("--resets", type=int, default=0)
    p.add_argument("--reloads", type=int, default=0)
    p.add_argument("--cycles", type=int, default=0,
                   help="suspend and hot-plug cycles (default 20)")
    p.add_argument("--fail-seconds", type=int, default=0)
    p.add_argument("--json", help="write verdicts and notes to this file")
    p.add_argument("--table", nargs=2, metavar=("C_JSON", "RUST_JSON"),
                   help="print the C/Rust table from two --json files")
    p.add_argument("--workdir")
    p.add_argument("--boot-timeout", type=int, default=600,
                   help="seconds a guest may take to boot (default 600: "
                   "the debug kernel under TCG on a loaded host is slow)")
    p.add_argument("--smp", type=int, default=2, help="vCPUs per guest")
    vmtest.add_front_args(p)
    return p.parse_args()


def main():
    args = parse_args()
    if args.table:
        print(table(*args.table))
        return
    if args.list:
        for c in cases(args):
            print(c.name + (f"  (needs {', '.join(sorted(c.needs))})"
                            if c.needs else ""))
        return
    # The runner's own options, so that the bed is the one vmtest boots;
    # the device gets a control socket through a wrapper script.
    vargv = ["--kernel", args.kernel, "--kernel-version", args.kernel_version,
             "--driver", args.driver, "--peer",
             args.peer, "--boot-timeout", str(args.boot_timeout),
             "--smp", str(args.smp)]
    args.workdir = os.path.abspath(args.workdir or
                                   tempfile.mkdtemp(prefix="faults-"))
    os.makedirs(args.workdir, exist_ok=True)
    vargv += ["--workdir", args.workdir]
    if "rust" in (args.driver, args.peer):
        vargv += ["--extra-initrd", module_cpio(args.workdir, args.kernel,
                                                 args.kernel_version)]
    args.root_port = True
    vargv += vmtest.front_argv(args)
    vargs = vmtest.parse_args(vargv)
    vargs.device = device_wrapper(vargs.workdir, vargs.device,
                                  os.path.join(vargs.workdir, "control.sock"))
    res = vmtest.Results()
    t0 = time.monotonic()
    verdicts = notes = {}
    try:
        if args.selftest:
            selftest(args, vargs, res)
        else:
            verdicts, notes, _ = run_all(args, vargs, res)
    except BedError as e:
        res.fail("test bed", str(e))
    except RunError as e:
        res.fail("runner", str(e))
    except KeyboardInterrupt:
        res.fail("runner", "interrupted")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"driver": args.driver, "verdicts": verdicts,
                       "notes": notes}, f, indent=1)
    res.finish(vargs.workdir, t0)


if __name__ == "__main__":
    main()
