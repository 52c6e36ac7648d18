#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Run the uses vsock was made for, with the tools people use, on a guest driver.

Two sibling guests run on the project's vhost-user device (tools/vsock-device)
as tools/vmtest.py boots them: guest 3 runs the driver under test (--driver),
guest 4 the peer (--peer, default c). The initramfs carries, besides the
usual parts, tools/build-scenarios.sh's archive: iproute2's ip, tcpdump,
ncat, socat, a minimal Python 3, the seeds' C and Python server and client,
and the kernel's vhost_vsock (H2G) and vsockmon modules. The device runs
with -v, so that device.log holds every packet a guest put on its tx queue:
the record against which the cases check what did, or did not, reach it.

The cases (--list):

- loopback.*: VMADDR_CID_LOCAL echoes inside guest 3 beside the driver, and
  neither the device's packet log nor the driver's counters see any of it.
- clients.*: socat, ncat, the seeds' Python and C programs, unchanged;
  100 MiB (--bulk-mib) each way with a SHA-256, 100 connections open at
  once, and the host through the device's Unix socket (CONNECT <port>).
- vsockmon.*: a scripted exchange captured by tcpdump on vsockmon0 in
  guest 3; every packet once, in order, with the op, length, ports and CIDs
  of the device's log; payload bytes as sent; decoded again by the host's
  tshark.
- routing.*: vhost_vsock (H2G) beside the driver (G2H): a sibling CID
  without VMADDR_FLAG_TO_HOST goes to H2G and fails with ENODEV, with the
  flag it reaches the sibling, both ways, stream and seqpacket, the accepted
  socket's peer address carries the flag; unloading either transport under
  traffic leaves the other working.

After every case both consoles are scanned (Oops, WARNING, KASAN, lockdep,
kmemleak reports fail it); at the end a kmemleak scan of both guests. The
last line printed is "N passed, N failed, N skipped".
"""

import argparse
import base64
import fnmatch
import gzip
import hashlib
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faults  # noqa: E402  (Control, module_cpio)
import vmtest  # noqa: E402  (the runner: Bed, Guest, Results, ...)
from vmtest import RunError, log  # noqa: E402

MIB = 1 << 20
# The payload a one-page rx buffer holds (SKB_WITH_OVERHEAD(4096) less the
# 44-byte header): C's whole buffer, the Rust driver's linear part.
LINEAR_ROOM = 3732
# iproute2's ip in the guest (busybox's sh runs its own ip applet first).
SCN_BIN = "/usr/lib/scenarios/bin"
# VMADDR_CID_ANY as the seeds' Python server takes it.
CID_ANY = 0xffffffff
# Echo servers (vsock-echo) the cases share: stream and seqpacket, per guest.
ECHO = {3: (3000, 3001), 4: (4000, 4001)}
# virtio_vsock_hdr ops (include/uapi/linux/virtio_vsock.h), by the names the
# device logs.
OPS = {"REQUEST": 1, "RESPONSE": 2, "RST": 3, "SHUTDOWN": 4, "RW": 5,
       "CREDIT_UPDATE": 6, "CREDIT_REQUEST": 7}
OP_NAMES = {v: k for k, v in OPS.items()}
# af_vsockmon_hdr.op for each virtio op (virtio_transport_build_skb()).
MON_OP = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 3, 7: 3}
LINKTYPE_VSOCK = 271
MON_HDR = struct.Struct("<QQIIHHH2x")      # struct af_vsockmon_hdr, 32 bytes
VIRTIO_HDR = struct.Struct("<QQIIIHHIII")  # struct virtio_vsock_hdr, 44 bytes
# A device log line for one packet a guest put on its tx queue.
DEVLOG_TX = re.compile(r"cid (\d+): tx (\d+):(\d+) -> (\d+):(\d+) (\w+) "
                       r"type=(\d+) len=(\d+) flags=(0x[0-9a-f]+)")


class Problem(Exception):
    """What went wrong in a case; ends the case."""


def pattern(msg, size):
    """The bytes of vsock-echo's message `msg` (samples/src/main.rs)."""
    return bytes((msg * 131 + off * 7) % 251 for off in range(size))


def echo_stream(count, size):
    """Everything vsock-echo client sends (and gets back) on one connection."""
    return b"".join(pattern(i, size) for i in range(count))


def device_wrapper(workdir, device, control):
    """A script that runs `device` with -v and a control socket, for
    vmtest's Bed (which starts args.device with the --vm options only)."""
    path = os.path.join(workdir, "vsock-device-scenarios")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec {device} -v --control {control} \"$@\"\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


# -- the capture -------------------------------------------------------------

def read_pcap(data):
    """The link type and records of a pcap file: (linktype, [bytes]).

    >>> hdr = struct.pack("<IHHiIII", 0xa1b2c3d4, 2, 4, 0, 0, 65535, 271)
    >>> rec = struct.pack("<IIII", 1, 2, 3, 3) + b"abc"
    >>> read_pcap(hdr + rec)
    (271, [b'abc'])
    """
    magic = struct.unpack_from("<I", data)[0]
    if magic in (0xa1b2c3d4, 0xa1b23c4d):
        end = "<"
    elif magic in (0xd4c3b2a1, 0x4d3cb2a1):
        end = ">"
    else:
        raise Problem(f"not a pcap file (magic {magic:#x})")
    linktype = struct.unpack_from(end + "I", data, 20)[0]
    recs, off = [], 24
    while off + 16 <= len(data):
        _, _, incl, orig = struct.unpack_from(end + "IIII", data, off)
        off += 16
        if incl != orig:
            raise Problem(f"packet cut by the snapshot length: {incl} of "
                          f"{orig} bytes")
        recs.append(data[off:off + incl])
        off += incl
    return linktype, recs


def parse_vsockmon(rec):
    """One LINKTYPE_VSOCK record as a dict: the af_vsockmon_hdr fields
    (mon_*), the virtio_vsock_hdr fields, and the payload."""
    if len(rec) < MON_HDR.size:
        raise Problem(f"record of {len(rec)} bytes: no af_vsockmon_hdr")
    (scid, dcid, sport, dport, mop, trans, tlen) = MON_HDR.unpack_from(rec)
    if trans != 2 or tlen != VIRTIO_HDR.size:
        raise Problem(f"transport {trans} header length {tlen}: not virtio")
    (vs, vd, vsp, vdp, ln, typ, op, flags, buf, fwd) = VIRTIO_HDR.unpack_from(
        rec, MON_HDR.size)
    payload = rec[MON_HDR.size + VIRTIO_HDR.size:]
    return {"mon": (scid, dcid, sport, dport, mop), "src": (vs, vsp),
            "dst": (vd, vdp), "len": ln, "type": typ, "op": op,
            "flags": flags, "payload": payload}


def pkt_key(p):
    """What a packet is, for comparing a capture with the device's log."""
    return (p["src"], p["dst"], OP_NAMES.get(p["op"], str(p["op"])),
            p["type"], p["len"])


def merge_fragments(pkts, device):
    """Capture `pkts` of one direction matched to the device's `device`
    packets: the device writes a packet over as many rx buffers as it needs
    (each fragment a packet with its own header and `len`), so consecutive
    RW fragments of one connection add up to one device packet. Raises
    Problem at the first packet that does not match, is missing or extra.
    """
    i = 0
    for n, want in enumerate(device):
        if i >= len(pkts):
            raise Problem(f"packet {n} {want} missing from the capture "
                          f"({len(pkts)} captured)")
        got = pkt_key(pkts[i])
        if want[2] != "RW" or got == want:
            if got != want:
                raise Problem(f"packet {n}: captured {got}, device logged "
                              f"{want}")
            i += 1
            continue
        total = 0
        while total < want[4]:
            if i >= len(pkts):
                raise Problem(f"packet {n} {want}: capture ends after "
                              f"{total} bytes of it")
            g = pkt_key(pkts[i])
            if g[:4] != want[:4]:
                raise Problem(f"packet {n} {want}: fragment {g} after "
                              f"{total} bytes")
            total += g[4]
            i += 1
        if total != want[4]:
            raise Problem(f"packet {n} {want}: fragments add up to {total}")
    if i != len(pkts):
        raise Problem(f"{len(pkts) - i} captured packet(s) the device never "
                      f"carried, first {pkt_key(pkts[i])}")


# -- the fixture -------------------------------------------------------------

class Scenarios:
    """The bed (device with -v and a control socket, two guests) and the
    helpers the cases share."""

    def __init__(self, args, vargs):
        self.args = args
        self.vargs = vargs
        self.bulk = args.bulk_mib * MIB
        self.mod = vmtest.DRIVERS[args.driver]
        self.bed = None
        self.ctl = faults.Control(os.path.join(vargs.workdir, "control.sock"))
        self.devlog = os.path.join(vargs.workdir, "device.log")
        self.h2g = False
        self.port = 10000
        self.notes = {}
        self.case = None

    def boot(self):
        self.shutdown()
        drivers = {3: self.args.driver, 4: self.args.peer}
        log(f"== booting guest 3 ({drivers[3]}) and guest 4 ({drivers[4]}) "
            f"on the {self.vargs.front} front")
        t0 = time.monotonic()
        self.bed = vmtest.Bed(self.vargs, self.vargs.workdir)
        self.h2g = False
        self.bed.start(drivers)
        log(f"   up in {time.monotonic() - t0:.0f} s")
        for cid, (sp, qp) in ECHO.items():
            self.serve(cid, f"vsock-echo server --port {sp}", "listening")
            self.serve(cid, f"vsock-echo server --type seqpacket --port {qp}",
                       "listening")

    def shutdown(self):
        self.ctl.close()
        if self.bed:
            self.bed.stop()
        self.bed = None

    def alive(self):
        return self.bed is not None and all(g.alive() for g in self.bed.guests)

    def g(self, cid):
        return self.bed.guest(cid)

    def note(self, msg):
        log(f"        {msg}")
        self.notes.setdefault(self.case, []).append(msg)

    def next_port(self):
        self.port += 1
        return self.port

    def sh(self, cid, cmd, timeout=300, what=None):
        """Run a command in a guest to its end; (rc, output). A hang is a
        Problem."""
        rc, out = self.g(cid).sh(cmd, timeout)
        if rc is None:
            raise Problem(f"guest {cid}: {what or cmd[:80]!r} did not end "
                          f"within {timeout} s")
        return rc, out

    def ok(self, cid, cmd, timeout=300, what=None):
        """Run a command that must succeed; its output."""
        rc, out = self.sh(cid, cmd, timeout, what)
        if rc != 0:
            raise Problem(f"guest {cid}: {what or cmd[:80]!r} exited {rc}: "
                          + " / ".join(out.strip().splitlines()[-3:]))
        return out

    def serve(self, cid, cmd, ready, timeout=60):
        """Start a server in a guest; its Job once it printed `ready`."""
        job = self.g(cid).run(cmd)
        if not job.wait_line(ready, timeout):
            raise Problem(f"guest {cid}: {cmd!r} did not start: "
                          + job.output()[-200:])
        return job

    def listener(self, cid, cmd, prog, timeout=60):
        """Start a server that prints nothing when it listens (socat,
        ncat, the seeds); its Job once `prog` waits in accept or poll."""
        job = self.g(cid).run(cmd)
        # accept, accept4, poll, select, pselect6, ppoll, epoll_wait.
        calls = "43|288|7|23|270|271|232|281"
        rc, _ = self.sh(cid, (
            f"i=0; while [ $i -lt {timeout * 10} ]; do for p in $(pidof "
            f"{prog}); do grep -qE '^({calls}) ' /proc/$p/syscall "
            "2>/dev/null && exit 0; done; i=$((i+1)); sleep 0.1; done; "
            "exit 1"), timeout + 30)
        if rc != 0:
            raise Problem(f"guest {cid}: {cmd!r} did not listen: "
                          + job.output()[-200:])
        return job

    def wait_job(self, job, timeout, what):
        rc = job.wait(timeout)
        if rc is None:
            raise Problem(f"{what} did not end within {timeout} s: "
                          + job.output()[-200:])
        return rc, job.output()

    # -- the device's record --
    def devlog_mark(self):
        try:
            return os.path.getsize(self.devlog)
        except OSError:
            return 0

    def device_packets(self, mark, ports, cid=None):
        """Packets the device logged (tx of either guest, or of `cid`) since
        `mark` whose source or destination port is in `ports`, as pkt_key
        tuples."""
        time.sleep(1)  # The device writes its log line after the packet.
        with open(self.devlog, "rb") as f:
            f.seek(mark)
            text = f.read().decode("utf-8", "replace")
        out = []
        for m in DEVLOG_TX.finditer(text):
            g = [int(x, 0) if x[0].isdigit() else x for x in m.groups()]
            if cid is not None and g[0] != cid:
                continue
            if g[2] in ports or g[4] in ports:
                out.append(((g[1], g[2]), (g[3], g[4]), g[5], g[6], g[7]))
        return out

    def counters(self):
        """The Rust driver's counters in guest 3, or None (C driver)."""
        if self.args.driver != "rust":
            return None
        _, out = self.sh(3, faults.COUNTERS_CMD, 300, "reading counters")
        c = {}
        for line in out.splitlines():
            k, sep, v = line.rpartition("/")[2].partition(":")
            if sep and v.strip().isdigit():
                c[k.strip()] = int(v)
        if "tx_packets" not in c:
            raise Problem("no tx_packets among the driver's counters: "
                          + out[-200:])
        return c

    # -- transports --
    def load_h2g(self):
        if self.h2g:
            return
        self.ok(3, "for m in vhost_iotlb vhost vhost_vsock; do "
                "insmod /lib/modules/$m.ko || exit 1; done; "
                "test -c /dev/vhost-vsock", 120, "insmod vhost_vsock")
        self.h2g = True

    def kernel_problems(self):
        return self.bed.kernel_problems() if self.bed else []


# -- guest shell snippets ----------------------------------------------------

def send_cmd(size, sender, tag):
    """`size` bytes piped into `sender`; prints the status and the SHA-256
    of what went in: 'sent rc=N sum=HEX'.

    The bytes are 1 MiB blocks of /dev/urandom, each a new one made from
    the last by a numbered header, so that no two blocks are alike (a lost,
    doubled or swapped block changes the hash) and the guest's TCG spends
    its time on the transfer, not on /dev/urandom.
    """
    f = f"/tmp/fifo-{tag}"
    blocks = size // MIB
    return (f"rm -f {f} /tmp/sum-{tag}; mkfifo {f}; "
            f"head -c {MIB - 16} /dev/urandom >/tmp/blk-{tag}; "
            f"sha256sum <{f} >/tmp/sum-{tag} & "
            f"for i in $(seq {blocks}); do printf 'block %09d\\n' $i; "
            f"cat /tmp/blk-{tag}; done | tee {f} | {sender}; rc=$?; wait; "
            f"rm -f /tmp/blk-{tag}; "
            f"echo \"sent rc=$rc sum=$(cut -d' ' -f1 /tmp/sum-{tag})\"")


def recv_cmd(receiver, tag):
    """What `receiver` writes to stdout, counted and hashed: 'got rc=N
    bytes=N sum=HEX'."""
    f = f"/tmp/rfifo-{tag}"
    return (f"rm -f {f}; mkfifo {f}; sha256sum <{f} >/tmp/rsum-{tag} & "
            f"n=$({receiver} | tee {f} | wc -c); rc=$?; wait; "
            f"echo \"got rc=$rc bytes=$n sum=$(cut -d' ' -f1 "
            f"/tmp/rsum-{tag})\"")


def field(out, key):
    m = re.search(rf"\b{key}=(\S+)", out)
    return m.group(1) if m else None


def transfer(sc, src, dst, size, listen, connect, prog, what):
    """`size` random bytes from guest `src` to guest `dst`: `listen` (a
    command that writes what it receives to stdout) in `dst`, `connect` (a
    command that sends its stdin) in `src`; the hashes must match."""
    tag = sc.next_port()
    rcv = sc.listener(dst, recv_cmd(listen, tag), prog)
    t0 = time.monotonic()
    rc, sent = sc.sh(src, send_cmd(size, connect, tag), 900, what)
    rrc, got = sc.wait_job(rcv, 300, f"receiver of {what}")
    dt = time.monotonic() - t0
    s_sum, g_sum = field(sent, "sum"), field(got, "sum")
    n = field(got, "bytes")
    if field(sent, "rc") != "0" or rc != 0:
        raise Problem(f"{what}: sender failed: {sent.strip()[-200:]}")
    if n != str(size):
        raise Problem(f"{what}: received {n} bytes of {size}")
    if not s_sum or s_sum != g_sum:
        raise Problem(f"{what}: SHA-256 sent {s_sum}, received {g_sum}")
    sc.note(f"{what}: {size} bytes in {dt:.1f} s, sha256 {s_sum[:16]}...")


# -- loopback ----------------------------------------------------------------

def case_loopback(kind):
    def run(sc):
        port = ECHO[3][0 if kind == "stream" else 1]
        c0 = sc.counters()
        dev0 = sc.ctl.cmd("counts", 3)
        mark = sc.devlog_mark()
        count, size = 64, 60000
        out = sc.ok(3, f"vsock-echo client --type {kind} --cid 1 --port "
                    f"{port} --count {count} --size {size}", 300)
        want = f"echo ok: {kind} cid=1 port={port} {count} messages " \
               f"{count * size} bytes"
        if want not in out:
            raise Problem(f"echo to VMADDR_CID_LOCAL: {out.strip()[-200:]}")
        seen = sc.device_packets(mark, {port}, cid=3)
        dev1 = sc.ctl.cmd("counts", 3)
        c1 = sc.counters()
        if seen:
            raise Problem(f"{len(seen)} loopback packet(s) reached the "
                          f"device, first {seen[0]}")
        if dev1 != dev0:
            raise Problem(f"device counts moved: {dev0} -> {dev1}")
        if c0 is not None:
            moved = {k: c1[k] - c0[k] for k in ("tx_packets", "tx_bytes",
                                                "rx_packets", "rx_bytes")
                     if c1.get(k) != c0.get(k)}
            if moved:
                raise Problem(f"driver counters moved: {moved}")
            sc.note(f"{count * size} bytes each way over CID 1; device "
                    f"log: no packet; driver tx/rx counters unchanged")
        else:
            sc.note(f"{count * size} bytes each way over CID 1; device "
                    "log: no packet (C driver: no counters)")
        # The same checks must see a sibling connection: they can fail.
        mark = sc.devlog_mark()
        peer = ECHO[4][0 if kind == "stream" else 1]
        sc.ok(3, f"vsock-echo client --type {kind} --cid 4 --port {peer} "
              "--count 2 --size 1000")
        seen = sc.device_packets(mark, {peer}, cid=3)
        c2 = sc.counters()
        if not seen:
            raise Problem("the device log shows no packet of a sibling "
                          "connection either: the check is blind")
        if c2 is not None and c2["tx_packets"] == c1["tx_packets"]:
            raise Problem("tx_packets did not move for a sibling "
                          "connection: the check is blind")
        sc.note(f"control: a sibling echo shows {len(seen)} packets in the "
                "device log" + ("" if c2 is None else
                                f", tx_packets +{c2['tx_packets'] - c1['tx_packets']}"))
    return run


# -- real clients ------------------------------------------------------------

def case_socat_bulk(src, dst):
    def run(sc):
        port = sc.next_port()
        transfer(sc, src, dst, sc.bulk, f"socat -u -b 65536 VSOCK-LISTEN:{port} -",
                 f"socat -u -b 65536 - VSOCK-CONNECT:{dst}:{port}", "socat",
                 f"socat {src}->{dst}")
    return run


def case_ncat_bulk(src, dst):
    def run(sc):
        port = sc.next_port()
        transfer(sc, src, dst, sc.bulk,
                 f"ncat --vsock -l --recv-only {port}",
                 f"ncat --vsock --send-only {dst} {port}", "ncat",
                 f"ncat {src}->{dst}")
    return run


def case_parallel(sc):
    """100 socat clients in guest 3, all connected at once to a socat echo
    server in guest 4 (one cat per connection), each with its own random
    16 KiB echoed back. The device's log shows that all 100 were open at
    once: each answered (RESPONSE) before any was shut down or reset."""
    n, port = 100, sc.next_port()
    mark = sc.devlog_mark()
    srv = sc.listener(4, f"socat VSOCK-LISTEN:{port},fork,backlog=128 "
                      "EXEC:/bin/cat", "socat")
    d = "/tmp/par"
    # Each client's input ends only when the FIFO `go` is opened for
    # writing and closed again (a reader blocks in open() until then, with
    # no CPU spent: polling a file in 100 shells starved the TCG guest):
    # after every connection is open. One cat reads both files: a subshell
    # `(cat $i; cat go >/dev/null)` execs its last command with stdout on
    # /dev/null, so the pipe closed after the 16 KiB and every client shut
    # down at once (the device log showed it). The clients start 0.3 s
    # apart, and one whose connect times out (vsock's default 2 s, short for a TCG guest forking
    # a cat per connection) tries again: socat reads nothing before it is
    # connected.
    cli = sc.g(3).run(
        f"rm -rf {d}; mkdir {d}; mkfifo {d}/go; for i in $(seq {n}); do "
        f"head -c 16384 /dev/urandom >{d}/$i; done; "
        f"for i in $(seq {n}); do ( cat {d}/$i {d}/go | "
        f"(for t in 1 2 3 4 5; do socat -t 120 - "
        f"VSOCK-CONNECT:4:{port} && exit 0; sleep 1; done; exit 1) "
        f">{d}/$i.out && cmp -s {d}/$i {d}/$i.out && echo \"conn $i ok\" "
        f"|| echo \"conn $i FAILED\" ) & sleep 0.3; done; wait; echo done")
    end = time.monotonic() + 600
    try:
        while True:
            pk = sc.device_packets(mark, {port})
            answered = {p[1] for p in pk
                        if p[0][1] == port and p[2] == "RESPONSE"}
            ended = {p[1] if p[0][1] == port else p[0] for p in pk
                     if p[2] in ("SHUTDOWN", "RST")}
            opened = len(answered - ended)
            if opened >= n or cli.rc is not None or time.monotonic() > end:
                break
        sc.note(f"{len(answered)} connections answered, {opened} of them "
                f"open at once, {len(ended)} reset before (device log)")
    finally:
        sc.sh(3, f"(sleep 10 >{d}/go) >/dev/null 2>&1 &")
    rc, out = sc.wait_job(cli, 600, "the 100 clients")
    oks = len(re.findall(r"conn \d+ ok", out))
    bad = re.findall(r"conn \d+ FAILED", out)
    sc.sh(4, f"kill {srv_pids(sc, 4, port)} 2>/dev/null; true")
    if opened != n:
        raise Problem(f"only {opened} of {n} connections were open at once; "
                      f"clients: {out.strip()[-300:]!r}")
    if oks != n:
        raise Problem(f"{oks} of {n} echoed right; {len(bad)} failed, "
                      f"first {bad[:1]}")
    sc.note(f"{oks} of {n} connections echoed their 16 KiB")


def srv_pids(sc, cid, port):
    _, out = sc.sh(cid, "for p in $(pidof socat); do tr '\\0' ' ' "
                   f"</proc/$p/cmdline | grep -q 'LISTEN:{port}' && "
                   "echo $p; done; true")
    return " ".join(out.split())


def seed_server(lang):
    return ("python3 /usr/lib/scenarios/seed-server.py "
            f"{CID_ANY} 9999" if lang == "python" else "seed-server")


def seed_client(lang, cid):
    return (f"python3 /usr/lib/scenarios/seed-client.py {cid} 9999"
            if lang == "python" else f"seed-client-{cid}")


def seed_check(lang, out, src_cid):
    """What the seed's server prints for the seed's client."""
    if lang == "python":
        want = [rf"Connection opened by cid={src_cid} port=\d+",
                r"Received bytes: b'Hello, world!'"]
    else:
        want = [r"Received 13 bytes: Hello, world!"]
    lines = out.strip().splitlines()
    if len(lines) != len(want) or not all(re.fullmatch(w, l.strip())
                                          for w, l in zip(want, lines)):
        raise Problem(f"{lang} server printed {lines!r}, want {want!r}")


def case_seed(lang, src, dst):
    def run(sc):
        srv = sc.listener(dst, seed_server(lang),
                          "python3" if lang == "python" else "seed-server")
        out = sc.ok(src, seed_client(lang, dst), 60)
        rc, sout = sc.wait_job(srv, 60, f"the {lang} server")
        if rc != 0:
            raise Problem(f"{lang} server exited {rc}: {sout[-200:]}")
        seed_check(lang, sout, src)
        sc.note(f"server in guest {dst}: " + " | ".join(
            sout.strip().splitlines()) + (f"; client: {out.strip()}"
                                          if out.strip() else ""))
    return run


class HostListener:
    """A Unix socket `uds-path_PORT` on the host (Firecracker's hybrid
    vsock): what guest 3 sends to CID 2, PORT arrives here; counted and
    hashed."""

    def __init__(self, sc, port):
        self.path = os.path.join(sc.vargs.workdir, f"host-3.vsock_{port}")
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.sock.settimeout(600)
        self.data = b""
        self.nbytes = 0
        self.sha = hashlib.sha256()
        self.keep = False
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(600)
                while True:
                    b = conn.recv(1 << 16)
                    if not b:
                        break
                    self.nbytes += len(b)
                    self.sha.update(b)
                    if self.nbytes <= 4096:
                        self.data += b
        except OSError as e:
            self.error = e
        finally:
            self.sock.close()

    def wait(self, timeout):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise Problem(f"host side {self.path}: no EOF within {timeout} s")
        if self.error:
            raise Problem(f"host side {self.path}: {self.error}")
        return self.nbytes, self.sha.hexdigest()


def host_connect(sc, port, timeout=60):
    """The host's side of a connection to guest 3's PORT, through the
    device's Unix socket: 'CONNECT PORT' answered by 'OK HOSTPORT'."""
    path = os.path.join(sc.vargs.workdir, "host-3.vsock")
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(600)
        try:
            s.connect(path)
            s.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                b = s.recv(1)
                if not b:
                    break
                line += b
            if line.startswith(b"OK "):
                return s, line.decode().strip()
            raise OSError(f"answer {line!r}")
        except OSError as e:
            s.close()
            if time.monotonic() > end:
                raise Problem(f"CONNECT {port} through {path}: {e}")
            time.sleep(0.5)


def case_host_to_guest(sc):
    """The host (Python) sends --bulk-mib MiB to socat in guest 3."""
    port, size = sc.next_port(), sc.bulk
    rcv = sc.listener(3, recv_cmd(f"socat -u -b 65536 VSOCK-LISTEN:{port} -", port),
                      "socat")
    s, ok = host_connect(sc, port)
    sha = hashlib.sha256()
    t0 = time.monotonic()
    with s:
        left = size
        while left:
            b = os.urandom(min(left, 1 << 16))
            sha.update(b)
            s.sendall(b)
            left -= len(b)
        s.shutdown(socket.SHUT_WR)
    rc, got = sc.wait_job(rcv, 300, "socat in guest 3")
    if field(got, "bytes") != str(size) or field(got, "sum") != sha.hexdigest():
        raise Problem(f"guest 3 received {field(got, 'bytes')} bytes, sha256 "
                      f"{field(got, 'sum')}; host sent {size}, "
                      f"{sha.hexdigest()}")
    sc.note(f"host ({ok}) -> guest 3: {size} bytes in "
            f"{time.monotonic() - t0:.1f} s, sha256 {sha.hexdigest()[:16]}...")


def case_guest_to_host(sc):
    """socat in guest 3 sends --bulk-mib MiB to the host (CID 2)."""
    port, size = sc.next_port(), sc.bulk
    h = HostListener(sc, port)
    t0 = time.monotonic()
    rc, sent = sc.sh(3, send_cmd(size, f"socat -u -b 65536 - VSOCK-CONNECT:2:{port}",
                                 port), 900, "socat to the host")
    n, digest = h.wait(300)
    if field(sent, "rc") != "0" or n != size or field(sent, "sum") != digest:
        raise Problem(f"guest 3 sent {sent.strip()[-120:]}; host got {n} "
                      f"bytes, sha256 {digest}")
    sc.note(f"guest 3 -> host: {size} bytes in {time.monotonic() - t0:.1f} "
            f"s, sha256 {digest[:16]}...")


def case_seed_to_host(lang):
    """The seed's client exactly as written (CID 2, port 9999) reaches a
    listener on the host."""
    def run(sc):
        h = HostListener(sc, 9999)
        cmd = ("python3 /usr/lib/scenarios/seed-client.py" if lang == "python"
               else "seed-client-2")
        sc.ok(3, cmd, 60)
        n, _ = h.wait(60)
        if h.data != b"Hello, world!":
            raise Problem(f"the host got {h.data!r}")
        sc.note(f"{cmd}: the host got {h.data!r}")
    return run


def case_host_to_seed(sc):
    """The host connects to the seeds' C server in guest 3 and sends the
    client's message."""
    srv = sc.listener(3, seed_server("c"), "seed-server")
    s, ok = host_connect(sc, 9999)
    with s:
        s.sendall(b"Hello, world!")
    rc, out = sc.wait_job(srv, 60, "the C server")
    seed_check("c", out, 2)
    sc.note(f"host ({ok}) -> C server: {out.strip()}")


# -- vsockmon ----------------------------------------------------------------

def vsockmon_up(sc):
    # iproute2's ip by its path: the guest's busybox sh runs its own
    # applets before anything on PATH.
    ip = f"{SCN_BIN}/ip"
    sc.ok(3, "lsmod | grep -q '^vsockmon ' || insmod /lib/modules/vsockmon.ko;"
          f" {ip} link show vsockmon0 >/dev/null 2>&1 || "
          f"{ip} link add type vsockmon; {ip} link set vsockmon0 up; "
          f"{ip} -d link show vsockmon0", 60, "ip link add type vsockmon")


def capture(sc, fn, name):
    """Run `fn()` while tcpdump captures vsockmon0 in guest 3; the pcap
    file's bytes (also kept in the work directory as NAME.pcap)."""
    vsockmon_up(sc)
    pcap = f"/tmp/{name}.pcap"
    td = sc.serve(3, f"tcpdump -Z root -i vsockmon0 -s 0 -U -w {pcap}",
                  "listening on vsockmon0")
    t0 = time.monotonic()
    try:
        fn()
        time.sleep(1)
    finally:
        sc.sh(3, "kill -INT $(pidof tcpdump) 2>/dev/null; true")
    t_fn = time.monotonic() - t0
    rc, out = sc.wait_job(td, 60, "tcpdump")
    m = re.search(r"(\d+) packets? dropped by kernel", out)
    if not m or m.group(1) != "0":
        raise Problem(f"tcpdump: {out.strip()[-200:]}")
    # The agent's channel moves about 7 KB/s under TCG: the capture (echo
    # patterns, 870 KB) goes compressed, about 6 KB.
    t0 = time.monotonic()
    b64 = sc.ok(3, f"gzip -c {pcap} | base64; rm -f {pcap}", 300,
                "reading the pcap")
    data = gzip.decompress(base64.b64decode("".join(b64.split())))
    sc.note(f"capture: {t_fn:.1f} s of traffic, the pcap read in "
            f"{time.monotonic() - t0:.1f} s")
    path = os.path.join(sc.vargs.workdir, f"{name}.pcap")
    with open(path, "wb") as f:
        f.write(data)
    sc.note(f"tcpdump: {out.strip().splitlines()[-3]}; {len(data)} bytes, "
            f"{path}")
    return data, path


def check_capture(sc, data, mark, ports, flows):
    """The capture against the device's log and the bytes sent.

    `flows` maps a guest 3 port to (to_4, to_3): the bytes that went from
    guest 3 to guest 4 and back on that connection.
    """
    lt, recs = read_pcap(data)
    if lt != LINKTYPE_VSOCK:
        raise Problem(f"link type {lt}, not LINKTYPE_VSOCK (271)")
    pkts = [parse_vsockmon(r) for r in recs]
    pkts = [p for p in pkts if p["src"][1] in ports or p["dst"][1] in ports]
    for n, p in enumerate(pkts):
        mon = (p["src"][0], p["dst"][0], p["src"][1], p["dst"][1],
               MON_OP.get(p["op"]))
        if p["mon"] != mon:
            raise Problem(f"packet {n}: af_vsockmon_hdr {p['mon']} does not "
                          f"match its virtio header {mon}")
        if len(p["payload"]) != (p["len"] if p["op"] == OPS["RW"] else 0):
            raise Problem(f"packet {n} {pkt_key(p)}: {len(p['payload'])} "
                          "payload bytes captured")
    tx = [p for p in pkts if p["src"][0] == 3]
    rx = [p for p in pkts if p["src"][0] == 4]
    dev_tx = sc.device_packets(mark, ports, cid=3)
    dev_rx = sc.device_packets(mark, ports, cid=4)
    # Guest 3's tx: one captured packet per packet the device took.
    if [pkt_key(p) for p in tx] != dev_tx:
        first = next((i for i, (a, b) in enumerate(
            zip([pkt_key(p) for p in tx], dev_tx)) if a != b),
            min(len(tx), len(dev_tx)))
        raise Problem(f"tx: {len(tx)} captured, {len(dev_tx)} logged by the "
                      f"device; first difference at {first}: "
                      f"{pkt_key(tx[first]) if first < len(tx) else None} vs "
                      f"{dev_tx[first] if first < len(dev_tx) else None}")
    # Guest 3's rx: what guest 4 sent, as the device split it.
    merge_fragments(rx, dev_rx)
    ops = sorted({OP_NAMES.get(p["op"]) for p in pkts} - {None})
    for port, (to4, to3) in flows.items():
        out = b"".join(p["payload"] for p in tx
                       if p["src"][1] == port and p["op"] == OPS["RW"])
        back = b"".join(p["payload"] for p in rx
                        if p["dst"][1] == port and p["op"] == OPS["RW"])
        if out != to4 or back != to3:
            raise Problem(f"port {port}: captured payload differs from what "
                          f"was sent ({len(out)}/{len(to4)} bytes out, "
                          f"{len(back)}/{len(to3)} back)")
    # Payloads past a linear buffer's room arrived in nonlinear skbs.
    nonlinear = sum(1 for p in rx if p["len"] > LINEAR_ROOM)
    sc.note(f"{len(tx)} tx and {len(rx)} rx packets as the device logged "
            f"them ({len(dev_rx)} before its rx split); ops {' '.join(ops)};"
            f" {nonlinear} rx payloads over {LINEAR_ROOM} bytes (nonlinear)")
    if sc.args.driver == "rust" and not nonlinear:
        raise Problem("no rx payload over a linear buffer's room: the tap "
                      "was not shown a nonlinear skb")
    return pkts, ops


def tshark_check(sc, path, pkts, ports):
    """The host's tshark decodes the capture to the same packets."""
    filt = " || ".join(f"vsock.src_port == {p} || vsock.dst_port == {p}"
                       for p in sorted(ports))
    out = subprocess.run(
        ["tshark", "-r", path, "-Y", filt, "-T", "fields", "-e",
         "vsock.src_cid", "-e", "vsock.src_port", "-e", "vsock.dst_cid",
         "-e", "vsock.dst_port", "-e", "vsock.virtio.op", "-e",
         "vsock.virtio.len"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise Problem(f"tshark -r: {out.stderr.strip()[-200:]}")
    got = [tuple(int(x, 0) for x in l.split("\t"))
           for l in out.stdout.splitlines() if l.strip()]
    want = [(p["src"][0], p["src"][1], p["dst"][0], p["dst"][1], p["op"],
             p["len"]) for p in pkts]
    if got != want:
        raise Problem(f"tshark decodes {len(got)} packets, the runner "
                      f"{len(want)}; first {got[:1]} vs {want[:1]}")
    sc.note(f"tshark -r: the same {len(got)} packets")


def case_vsockmon(sc):
    """connect, data both ways (72000-byte messages: several packets and,
    on the rx side, nonlinear skbs), credit updates (over 192 KiB read),
    shutdown, a reset (connect to a port nobody listens on) and an
    MSG_ZEROCOPY connection."""
    count, size = 3, 72000
    srv = sc.next_port()
    closed = sc.next_port()
    sc.serve(4, f"vsock-echo server --port {srv} --size 65536",
             "listening")
    # The Rust driver sizes its rx buffers to the traffic and starts with
    # one-page ones: 2 MiB of bulk first, so that it has posted 64 KiB
    # buffers when the capture starts (before it, not captured).
    t0 = time.monotonic()
    sc.ok(3, f"vsock-echo client --cid 4 --port {srv} --count 32 "
          "--size 65536", 300)
    sc.note(f"2 MiB before the capture in {time.monotonic() - t0:.1f} s")
    mark = sc.devlog_mark()
    outs = []

    def exchange():
        for zc in ("", " --zerocopy"):
            outs.append(sc.ok(3, f"vsock-echo client --cid 4 --port {srv} "
                              f"--count {count} --size {size}{zc}", 120))
        rc, out = sc.sh(3, f"vsock-echo client --cid 4 --port {closed} "
                        "--count 1", 60)
        if rc == 0 or "reset" not in out.lower():
            raise Problem(f"connect to a closed port: {out.strip()}")
        outs.append(out)

    data, path = capture(sc, exchange, "vsockmon")
    ports = {srv, closed}
    # The client's ports, from the capture's requests.
    lt, recs = read_pcap(data)
    reqs = [parse_vsockmon(r) for r in recs]
    cports = [p["src"][1] for p in reqs if p["op"] == OPS["REQUEST"]
              and p["src"][0] == 3 and p["dst"][1] in ports]
    if len(cports) != 3:
        raise Problem(f"{len(cports)} connection requests captured, not 3")
    ports |= set(cports)
    stream = echo_stream(count, size)
    flows = {cports[0]: (stream, stream), cports[1]: (stream, stream),
             cports[2]: (b"", b"")}
    pkts, ops = check_capture(sc, data, mark, ports, flows)
    need = {"REQUEST", "RESPONSE", "RW", "CREDIT_UPDATE", "SHUTDOWN", "RST"}
    if not need <= set(ops):
        raise Problem(f"ops missing from the exchange: {need - set(ops)}")
    rst = [p for p in pkts if p["src"][1] == closed and
           p["op"] == OPS["RST"]]
    if len(rst) != 1:
        raise Problem(f"{len(rst)} RST for the closed port, not 1")
    tshark_check(sc, path, pkts, ports)


# -- routing -----------------------------------------------------------------

# How a connect to a sibling CID without VMADDR_FLAG_TO_HOST fails when
# vhost_vsock (H2G) is loaded and has no such guest: stream in
# vhost_transport_send_pkt(), seqpacket in vsock_assign_transport() (vhost's
# seqpacket_allow() finds no guest).
NO_FLAG_ERRNO = {"stream": (19, "ENODEV"), "seqpacket": (94, "ESOCKTNOSUPPORT")}
G2H_FALLBACK = "/proc/sys/net/vsock/g2h_fallback"


def case_no_flag(kind):
    """Without the flag a CID above 2 goes to H2G. 7.3's core falls back to
    G2H when H2G has no such CID and net.vsock.g2h_fallback is 1 (its
    default): there the case checks both settings."""
    def run(sc):
        sc.load_h2g()
        port = ECHO[4][0 if kind == "stream" else 1]
        errno, name = NO_FLAG_ERRNO[kind]
        client = (f"vsock-echo client --type {kind} --cid 4 --port {port} "
                  "--count 1")
        rc, fb = sc.sh(3, f"cat {G2H_FALLBACK} 2>/dev/null || echo none")
        fallback = fb.strip()
        if fallback != "none":
            sc.ok(3, f"echo 0 > {G2H_FALLBACK}")
        try:
            mark = sc.devlog_mark()
            rc, out = sc.sh(3, client, 60)
            seen = sc.device_packets(mark, {port}, cid=3)
            if rc == 0:
                raise Problem("without VMADDR_FLAG_TO_HOST the connect "
                              f"reached the sibling: {out.strip()}")
            if f"os error {errno})" not in out:
                raise Problem(f"connect failed otherwise than with {name}: "
                              f"{out.strip()}")
            if seen:
                raise Problem(f"the device saw {seen[0]}: not routed to H2G")
            sc.note("no flag, H2G loaded: "
                    + out.strip().splitlines()[-1] + f" ({name})")
            if fallback == "none":
                return
            sc.ok(3, f"echo 1 > {G2H_FALLBACK}")
            mark = sc.devlog_mark()
            out = sc.ok(3, client, 60, "connect with g2h_fallback=1")
            seen = sc.device_packets(mark, {port}, cid=3)
            if not seen or "echo ok" not in out:
                raise Problem("with g2h_fallback=1 the connect did not go "
                              f"through the device: {out.strip()}")
            sc.note(f"g2h_fallback=1: G2H, {len(seen)} packets at the "
                    "device: " + out.strip())
        finally:
            if fallback != "none":
                sc.sh(3, f"echo {fallback} > {G2H_FALLBACK}")
    return run


def case_to_host(kind, src, dst):
    def run(sc):
        sc.load_h2g()
        port = sc.next_port()
        count, size = 20, 30000
        srv = sc.serve(dst, f"vsock-echo server --type {kind} --port {port} "
                       "--count 1", "listening")
        out = sc.ok(src, f"vsock-echo client --type {kind} --cid {dst} "
                    f"--port {port} --to-host --count {count} --size {size}",
                    120)
        rc, sout = sc.wait_job(srv, 60, "the echo server")
        want = (rf"peer cid={src} port=\d+ flags=0x1 "
                + (rf"{count} messages {count * size} bytes"
                   if kind == "seqpacket" else rf"{count * size} bytes"))
        if "echo ok" not in out or not re.search(want, sout):
            raise Problem(f"server in guest {dst}: {sout.strip()[-200:]!r}, "
                          f"want /{want}/; client: {out.strip()[-100:]}")
        sc.note(f"guest {dst}: " + sout.strip().splitlines()[-1])
    return run


def case_unload_h2g(sc):
    """rmmod vhost_vsock while the driver carries flows both ways (with
    VMADDR_FLAG_TO_HOST from guest 3); they go on, and afterwards a
    connect without the flag reaches the sibling too."""
    sc.load_h2g()
    # faults.Flow puts `kind` after --type: guest 3's loop adds the flag.
    flows = [faults.Flow(sc.g(3), 4, ECHO[4][0], "h2g-a",
                         kind="stream --to-host"),
             faults.Flow(sc.g(4), 3, ECHO[3][0], "h2g-b")]
    try:
        for f in flows:
            if not f.wait_oks(2, 120):
                raise Problem("flow did not start: " + f.describe())
        marks = [f.oks() for f in flows]
        sc.ok(3, "rmmod vhost_vsock && ! test -e /dev/vhost-vsock", 120,
              "rmmod vhost_vsock")
        sc.h2g = False
        for f, m in zip(flows, marks):
            if not f.wait_oks(m + 3, 120):
                raise Problem("flow stopped after rmmod: " + f.describe())
    finally:
        for f in flows:
            f.stop(120)
    bad = [f.describe() for f in flows if f.failures()]
    if bad:
        raise Problem("flow failures: " + "; ".join(bad))
    sc.note("; ".join(f.describe() for f in flows))
    out = sc.ok(3, f"vsock-echo client --cid 4 --port {ECHO[4][0]} "
                "--count 2", 60)
    sc.note("without H2G, no flag: " + out.strip())


def case_unload_g2h(sc):
    """rmmod the driver while a loopback flow runs in guest 3; the flow
    goes on; insmod again and the sibling is reachable."""
    flow = faults.Flow(sc.g(3), 1, ECHO[3][0], "g2h-a")
    try:
        if not flow.wait_oks(2, 120):
            raise Problem("loopback flow did not start: " + flow.describe())
        m = flow.oks()
        # Closing sockets hold the module for up to 8 s (vsock's close
        # timeout): retry for 20 s.
        sc.ok(3, f"for t in $(seq 100); do rmmod {sc.mod} && break; "
              f"sleep 0.2; done; ! lsmod | grep -q '^{sc.mod} '", 120,
              f"rmmod {sc.mod}")
        if not flow.wait_oks(m + 3, 120):
            raise Problem("loopback flow stopped after rmmod: "
                          + flow.describe())
        rc, out = sc.sh(3, f"vsock-echo client --cid 4 --port {ECHO[4][0]} "
                        "--count 1 --timeout 5", 60)
        if rc == 0:
            raise Problem(f"the sibling answered without a G2H driver: {out}")
        sc.note("without the driver: " + out.strip().splitlines()[-1])
    finally:
        flow.stop(120)
        sc.sh(3, f"lsmod | grep -q '^{sc.mod} ' || "
              f"insmod /lib/modules/{sc.mod}.ko", 120)
    if flow.failures():
        raise Problem("loopback flow failures: " + flow.describe())
    sc.note(flow.describe())
    end = time.monotonic() + 60
    while True:
        rc, out = sc.sh(3, f"vsock-echo client --cid 4 --port {ECHO[4][0]} "
                        "--count 2", 60)
        if rc == 0:
            break
        if time.monotonic() > end:
            raise Problem("no echo to the sibling after insmod: " + out)
        time.sleep(1)
    sc.note("after insmod: " + out.strip())


# -- the list ----------------------------------------------------------------

def cases():
    """Every case, in run order: those that leave the guests as they were
    first, the transport reloads last."""
    out = [(f"loopback.{k}", case_loopback(k)) for k in ("stream",
                                                         "seqpacket")]
    for lang in ("python", "c"):
        out += [(f"clients.seed_{lang}.3to4", case_seed(lang, 3, 4)),
                (f"clients.seed_{lang}.4to3", case_seed(lang, 4, 3)),
                (f"clients.seed_{lang}.to_host", case_seed_to_host(lang))]
    out += [
        ("clients.seed_c.from_host", case_host_to_seed),
        ("clients.socat_bulk.3to4", case_socat_bulk(3, 4)),
        ("clients.socat_bulk.4to3", case_socat_bulk(4, 3)),
        ("clients.ncat_bulk.3to4", case_ncat_bulk(3, 4)),
        ("clients.ncat_bulk.4to3", case_ncat_bulk(4, 3)),
        ("clients.socat_100_parallel", case_parallel),
        ("clients.host_bulk.to_guest", case_host_to_guest),
        ("clients.host_bulk.from_guest", case_guest_to_host),
        ("vsockmon.exchange", case_vsockmon),
    ]
    for kind in ("stream", "seqpacket"):
        out.append((f"routing.no_flag.{kind}", case_no_flag(kind)))
    for kind in ("stream", "seqpacket"):
        out += [(f"routing.to_host.{kind}.3to4", case_to_host(kind, 3, 4)),
                (f"routing.to_host.{kind}.4to3", case_to_host(kind, 4, 3))]
    out += [("routing.unload_h2g_under_traffic", case_unload_h2g),
            ("routing.unload_g2h_under_loopback", case_unload_g2h)]
    return out


def run_all(args, vargs, res):
    sc = Scenarios(args, vargs)
    selected = [(n, f) for n, f in cases()
                if not args.only or any(fnmatch.fnmatch(n, p) or p in n
                                        for p in args.only)]
    verdicts = {}
    try:
        for name, fn in selected:
            sc.case = name
            if not sc.alive():
                try:
                    sc.boot()
                except (RunError, Problem) as e:
                    res.fail(name, f"boot: {e}")
                    verdicts[name] = f"FAIL: boot: {e}"
                    sc.shutdown()
                    continue
            t0 = time.monotonic()
            problem = None
            try:
                fn(sc)
            except (Problem, RunError, faults.BedError) as e:
                problem = str(e)
            except Exception as e:  # noqa: BLE001 (a bug in the case)
                problem = f"{type(e).__name__}: {e}"
            bad = sc.kernel_problems()
            if bad:
                problem = (problem + "; " if problem else "") + \
                    "kernel log: " + bad[0]
            dead = [g.cid for g in sc.bed.guests if not g.alive()]
            if dead and not problem:
                problem = f"guest {dead[0]} died: " + \
                    sc.g(dead[0]).console_tail()
            if problem:
                res.fail(name, problem)
                verdicts[name] = "FAIL: " + problem
                sc.shutdown()  # The next case starts on fresh guests.
            else:
                res.ok(name, f" ({time.monotonic() - t0:.1f} s)")
                verdicts[name] = "ok"
        if sc.alive() and not args.only:
            vmtest.check_kmemleak(sc.bed, res, "[end]")
            for g in sc.bed.guests:
                bad = [l for l in g.console_text().splitlines()
                       if vmtest.BAD_CONSOLE.search(l)]
                name = f"[end] kernel log guest {g.cid}"
                (res.fail(name, bad[0]) if bad else res.ok(name))
    finally:
        sc.shutdown()
    return verdicts, sc.notes


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    vmtest.add_pair_args(p)
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="run the cases whose name matches (glob or "
                   "substring; repeatable); no kmemleak scan at the end")
    p.add_argument("--list", action="store_true", help="list the cases")
    p.add_argument("--bulk-mib", type=int, default=100, metavar="N",
                   help="MiB each bulk transfer moves (default 100; make "
                   "check uses less to fit its time)")
    p.add_argument("--json", help="write verdicts and notes to this file")
    p.add_argument("--workdir")
    p.add_argument("--boot-timeout", type=int, default=600)
    p.add_argument("--smp", type=int, default=2, help="vCPUs per guest")
    p.add_argument("--selftest", action="store_true",
                   help="run the doctests of the capture parser")
    vmtest.add_front_args(p)
    return p.parse_args()


def on_sigterm(signum, frame):
    """SIGTERM ends the run as Ctrl-C does: the guests and the device are
    stopped on the way out."""
    raise KeyboardInterrupt


def main():
    signal.signal(signal.SIGTERM, on_sigterm)
    args = parse_args()
    if args.bulk_mib < 1:
        sys.exit("error: --bulk-mib must be at least 1 (MiB per transfer)")
    if args.list:
        for name, fn in cases():
            print(name)
        return
    if args.selftest:
        import doctest
        failed, tried = doctest.testmod()
        print(f"{tried - failed} passed, {failed} failed, 0 skipped")
        sys.exit(1 if failed else 0)
    kname = vmtest.kernel_name(args.kernel, args.kernel_version)
    extra = os.path.join(vmtest.CACHE, "initramfs", f"scenarios-{kname}.cpio")
    if not os.path.exists(extra):
        sys.exit(f"error: {extra} not found: run 'tools/build-scenarios.sh "
                 f"{args.kernel}' (KERNEL={args.kernel_version})")
    args.workdir = os.path.abspath(args.workdir or
                                   tempfile.mkdtemp(prefix="scenarios-"))
    os.makedirs(args.workdir, exist_ok=True)
    vargv = ["--kernel", args.kernel, "--kernel-version", args.kernel_version,
             "--driver", args.driver, "--peer", args.peer,
             "--boot-timeout", str(args.boot_timeout), "--smp",
             str(args.smp), "--workdir", args.workdir]
    if "rust" in (args.driver, args.peer):
        vargv += ["--extra-initrd", faults.module_cpio(
            args.workdir, args.kernel, args.kernel_version)]
    vargv += ["--extra-initrd", extra] + vmtest.front_argv(args)
    vargs = vmtest.parse_args(vargv)
    vargs.device = device_wrapper(vargs.workdir, vargs.device,
                                  os.path.join(vargs.workdir, "control.sock"))
    res = vmtest.Results()
    t0 = time.monotonic()
    verdicts, notes = {}, {}
    try:
        verdicts, notes = run_all(args, vargs, res)
    except RunError as e:
        res.fail("runner", str(e))
    except KeyboardInterrupt:
        res.fail("runner", "interrupted")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"driver": args.driver, "peer": args.peer,
                       "kernel": args.kernel_version, "verdicts": verdicts,
                       "notes": notes}, f, indent=1)
    res.finish(vargs.workdir, t0)


if __name__ == "__main__":
    main()
