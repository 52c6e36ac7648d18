#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Benchmark vsock between two sibling guests and from the host, with ratios.

Guest 3 runs --driver and guest 4 --peer (c or rust), on the perf kernel by
default, booted by tools/vmtest.py's Bed. One block is a fresh boot of one
configuration and one repetition of every metric:

  lat 3->4 64B p50, p90, p99
      vsock-echo client --latency in guest 3 against vsock-echo server in
      guest 4: round trips of 64-byte stream messages, timed one by one
      after a warm-up; per block its p50, p90 and p99 (microseconds).
  tput 3->4 4K, tput 4->3 4K, tput 2->3 4K, and the same at 64K
      vsock_perf receiving in one guest with 4 KiB and 64 KiB read()
      buffers. The sender is vsock_perf in the other guest, or for 2->3 the
      host: this script connects to guest 3's Unix socket on the device
      (uds-path, "CONNECT <port>") and streams the bytes in writes of the
      same size. The figure is the goodput seen by the receiver: bytes sent
      * 8 / the receiver's time from accept to EOF (the time comes from its
      "rx performance" line; its byte count can fall short of what was
      sent, since it stops reading at the peer's shutdown).
  cpu/GiB <transfer>, cpu/GiB all
      Guest CPU time per GiB moved: user + nice + system + irq + softirq of
      the "cpu" line of /proc/stat in both guests, read before the sender
      starts and after both ends have finished, in CPU-seconds per GiB
      sent; "all" sums every transfer of the block. Under TCG throughput is
      capped by the emulation, this shows the work each driver does.
  cpu% idle
      The same busy time of both guests at rest for --idle-seconds at the
      start of the block, in percent of one CPU: the part of the figures
      above that is not moving data (agents, timers, the emulation).

Configurations. With --driver2/--peer2 a second configuration B is measured
against the first, A, and a third one, N, identical to A, measures the noise
floor of the bed in the same run (--no-noise leaves it out). Only one pair
of guests runs at a time (the machine has two cores). The blocks are
interleaved round by round, each round running every configuration once in
an order rotated by one per round (A B N, B N A, N A B, ...), so that each
configuration takes each place equally often and a slow drift of the host's
load falls on all alike. Every block boots afresh (a single configuration
boots once).

Statistics. Per metric and configuration: the median over the repetitions.
Per metric, the ratio B/A of the medians with a 95 % percentile bootstrap
interval: the repetitions of A and of B are resampled independently (they
are separate boots) --resamples times with a fixed --seed, so the same
samples always give the same interval. N/A, computed the same way, is the
noise floor printed beside each ratio: a ratio whose interval overlaps N/A's
is not told apart from noise. Throughput >1 is faster; latency and CPU/GiB
>1 are slower or costlier.

Issue 8's "done when" thresholds are printed as a table, one row per
figure: "pass" when the whole 95 % interval of B/A is on the good side of
the threshold (>= 1.30: its low end at least 1.30; <= 1.1: its high end at
most 1.1), and whether that interval is clear of the noise floor's. The
table is informational: it never changes the exit status.

Output: the tables on stdout; the JSON (every raw sample, medians,
intervals, settings, kernel, git commit, module hash) to --json (default
$CACHE/bench/bench-<timestamp>.json) and a plot of every ratio with its
interval and the noise floor's beside it to --plot (default: the JSON's
name with .png; needs python3-matplotlib). --replot JSON prints the tables
and draws the plot again from a saved JSON.

The guests get one vCPU each by default: on two host cores, two vCPUs per
guest gave half the throughput, three times the latency and a wider spread
(measured with the C driver), as vCPU threads, the device and the host's
other work fight for the cores. With the defaults (256M per 4K transfer, 1G
per 64K transfer, 5000 round trips, 10 reps, three configurations) a run
takes 30 to 60 minutes under TCG.

Every measurement has a timeout; a failed one ends the run with one line
"bench FAILED: ..." and exit status 1, after the JSON of what was measured.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import vmtest  # noqa: E402  (after the path is set)
from vmtest import Bed, RunError  # noqa: E402

CACHE = vmtest.CACHE
TOP = vmtest.TOP
T0 = time.monotonic()

TPUT = "Gbit/s"
USEC = "us"
CPUG = "s/GiB"
PCT = "%"
HOST_CID = 2
# /proc/stat counts in USER_HZ, 100 on x86 whatever CONFIG_HZ is.
USER_HZ = 100
GIB = 1 << 30

# Issue 8's "done when": (metric, comparison, threshold) for B/A.
THRESHOLDS = [
    ("tput 3->4 64K", ">=", 1.30),
    ("tput 4->3 64K", ">=", 1.30),
    ("tput 2->3 64K", ">=", 1.30),
    ("tput 3->4 4K", ">=", 1.0),
    ("tput 4->3 4K", ">=", 1.0),
    ("tput 2->3 4K", ">=", 1.0),
    ("lat 3->4 64B p50", "<=", 1.0),
    ("lat 3->4 64B p99", "<=", 1.1),
    ("cpu/GiB all", "<=", 0.8),
]


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def parse_size(text):
    """'64K', '128M', '1G' or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size '{text}'")
    shift = {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
    return int(m.group(1)) << shift


def human(n):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


# --- Statistics (unit-tested in bench_test.py) ---------------------------

def quantile(sorted_vals, q):
    """The q-quantile (0..1) of sorted values, interpolated linearly between
    the two nearest ranks (numpy's default, Hyndman and Fan type 7)."""
    if not sorted_vals:
        raise ValueError("quantile of no values")
    pos = (len(sorted_vals) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def bootstrap_ratio(a, b, resamples=10000, seed=1, level=0.95):
    """median(b) / median(a) with a percentile bootstrap interval.

    `a` and `b` are resampled independently, with replacement, each to its
    own size; `seed` (any int or str) fixes the draws. Returns a dict with
    "ratio", "lo", "hi", "level", "resamples".
    """
    if not a or not b:
        raise ValueError("bootstrap of an empty sample")
    ma = statistics.median(a)
    if ma == 0:
        raise ValueError("median of the reference is 0")
    point = statistics.median(b) / ma
    rng = random.Random(seed)
    boot = []
    for _ in range(resamples):
        ra = statistics.median(rng.choices(a, k=len(a)))
        rb = statistics.median(rng.choices(b, k=len(b)))
        if ra:
            boot.append(rb / ra)
    boot.sort()
    tail = (1 - level) / 2
    return {"ratio": point, "lo": quantile(boot, tail),
            "hi": quantile(boot, 1 - tail), "level": level,
            "resamples": len(boot)}


def schedule(configs, reps):
    """The blocks to run, [(rep, config)]: round r (from 1) runs every
    configuration once, the list rotated left by r - 1 (A B N, B N A,
    N A B, A B N, ...)."""
    k = len(configs)
    return [(r, configs[(r - 1 + i) % k])
            for r in range(1, reps + 1) for i in range(k)]


def judge(ratio, noise, op, threshold):
    """One "done when" row: (result, clear of noise).

    result is "pass" when the whole interval of `ratio` is on the good side
    of `threshold` ("n/a" without a ratio); clear is True when that interval
    does not overlap the noise floor's, None without one.
    """
    if ratio is None:
        return "n/a", None
    if op == ">=":
        ok = ratio["lo"] >= threshold
    elif op == "<=":
        ok = ratio["hi"] <= threshold
    else:
        raise ValueError(f"bad comparison {op!r}")
    clear = None
    if noise is not None:
        clear = ratio["lo"] > noise["hi"] or ratio["hi"] < noise["lo"]
    return ("pass" if ok else "fail"), clear


def mem_note(res):
    """', rx buffers: guest 3 N KiB' for the guests that report it."""
    mem = {c: v for c, v in (res.get("rx_mem_posted") or {}).items()
           if v is not None}
    if not mem:
        return ""
    return ", rx buffers: " + ", ".join(
        f"guest {c} {v >> 10} KiB" for c, v in sorted(mem.items()))


def cpu_busy_ticks(stat):
    """user + nice + system + irq + softirq of /proc/stat's "cpu" line."""
    for line in stat.splitlines():
        f = line.split()
        if f and f[0] == "cpu":
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f[1:8])
            return user + nice + system + irq + softirq
    raise ValueError(f"no cpu line in {stat[:80]!r}")


def read_line(sock, limit=256):
    """Bytes up to a newline (without it) or EOF, read one at a time."""
    out = b""
    while len(out) < limit:
        c = sock.recv(1)
        if not c or c == b"\n":
            break
        out += c
    return out


def host_send(path, port, nbytes, buf, timeout, attempts=10):
    """Stream `nbytes` zeros in writes of `buf` to guest `port` through the
    device's host bridge at `path`; (bytes sent, seconds).

    Says "CONNECT <port>" and waits for "OK"; a refused connection (the
    listener not up yet) is tried again. After the last byte it shuts its
    side and waits for the guest to close.
    """
    why = "no attempt"
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.2)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(f"CONNECT {port}\n".encode())
            line = read_line(s)
        except OSError as e:
            s.close()
            why = str(e)
            continue
        if line.startswith(b"OK"):
            break
        s.close()
        why = f"reply {line!r}"
    else:
        raise RunError(f"host CONNECT {port} via {path}: {why}")
    with s:
        view = memoryview(bytes(buf))
        t0 = time.monotonic()
        left = nbytes
        while left:
            n = min(left, buf)
            s.sendall(view[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        return nbytes, time.monotonic() - t0


class HostSender(threading.Thread):
    """host_send() in a thread, with the interface of a guest Job."""

    def __init__(self, path, port, nbytes, buf, timeout):
        super().__init__(daemon=True)
        self.args = (path, port, nbytes, buf, timeout)
        self.rc = None
        self.text = ""

    def run(self):
        try:
            sent, secs = host_send(*self.args)
            self.text = (f"total bytes sent: {sent}\n"
                         f"total time in tx loop: {secs:.6f} sec\n")
            self.rc = 0
        except (OSError, RunError) as e:
            self.text = f"host sender: {e}"
            self.rc = 1

    def wait(self, timeout):
        self.join(timeout)
        return None if self.is_alive() else self.rc

    def output(self):
        return self.text


# --- The measurements ----------------------------------------------------

class Config:
    def __init__(self, name, driver, peer, suffix=""):
        self.name = name  # "A", "B" or "N" (the noise floor, same as A)
        self.driver = driver
        self.peer = peer
        self.label = f"{driver}/{peer}{suffix}"


class Bench:
    def __init__(self, args):
        self.args = args
        self.port = 2000
        self.samples = []
        self.bed = None
        self.kernels = {}
        self.t_start = None

    def next_port(self):
        self.port += 1
        return self.port

    def check_guests(self, what):
        for g in self.bed.guests:
            if not g.alive():
                raise RunError(f"{what}: guest {g.cid} died: "
                               + g.console_tail())
        bad = self.bed.kernel_problems()
        if bad:
            raise RunError(f"{what}: kernel log: {bad[0]}")

    def diagnose(self, what):
        """State of the guests after a hung measurement, to a file."""
        cmd = ("for p in $(pidof vsock_perf vsock-echo); do "
               "echo \"pid $p $(cat /proc/$p/cmdline | tr '\\0' ' '): "
               "syscall $(cat /proc/$p/syscall) "
               "wchan $(cat /proc/$p/wchan)\"; "
               "cat /proc/$p/stack 2>/dev/null; done; "
               "grep -i virtio /proc/interrupts; true")
        path = os.path.join(self.args.workdir,
                            f"hang-{len(self.samples)}-{self.port}.txt")
        with open(path, "w") as f:
            f.write(f"{what}\n")
            for g in self.bed.guests:
                rc, out = g.sh(cmd, 20)
                f.write(f"== guest {g.cid} (rc {rc})\n{out}\n")
        return path

    def cpu_ticks(self, what):
        """{cid: busy ticks} of both guests, read at about the same time."""
        jobs = [(g, g.run("head -n 1 /proc/stat")) for g in self.bed.guests]
        out = {}
        for g, job in jobs:
            if job.wait(20) != 0:
                raise RunError(f"{what}: reading /proc/stat in guest "
                               f"{g.cid} failed: {job.output()[-100:]!r}")
            try:
                out[g.cid] = cpu_busy_ticks(job.output())
            except ValueError as e:
                raise RunError(f"{what}: guest {g.cid}: {e}")
        return out

    def rx_mem(self):
        """rx_mem_posted_bytes of the Rust driver in each guest (None for
        C): the memory its rx buffers take after the run, which shows them
        sized to the traffic."""
        mem = {}
        for g in self.bed.guests:
            rc, out = g.sh("cat /sys/bus/virtio/devices/*/vsock_rs/"
                           "rx_mem_posted_bytes 2>/dev/null", 10)
            out = out.strip()
            mem[str(g.cid)] = int(out) if rc == 0 and out.isdigit() else None
        return mem

    def throughput(self, src, dst, buf, nbytes):
        """One vsock_perf transfer from guest (or host) src to guest dst."""
        a = self.args
        port = self.next_port()
        what = f"vsock_perf {src}->{dst} buf {human(buf)}"
        rx = self.bed.guest(dst).run(
            f"vsock_perf --port {port} --buf-size {buf}")
        # Its "Listen port" line only arrives when it exits (stdout is a pipe).
        if not self.bed.guest(dst).wait_accept("vsock_perf", 30):
            self.check_guests(what)
            raise RunError(f"{what}: the receiver in guest {dst} did not "
                           f"reach accept() (output: {rx.output()[-200:]!r};"
                           f" guest state in {self.diagnose(what)})")
        cpu0 = self.cpu_ticks(what)
        if src == HOST_CID:
            tx = HostSender(os.path.join(self.bed.dir, f"host-{dst}.vsock"),
                            port, nbytes, buf, a.run_timeout)
            tx.start()
        else:
            tx = self.bed.guest(src).run(
                f"vsock_perf --sender {dst} --port {port} --bytes {nbytes} "
                f"--buf-size {buf}")
        t0 = time.monotonic()
        rc_tx = tx.wait(a.run_timeout)
        rc_rx = rx.wait(15 if rc_tx is not None else 1)
        wall = time.monotonic() - t0
        self.check_guests(what)
        if rc_tx is None or rc_rx is None:
            who = ("sender", a.run_timeout) if rc_tx is None else \
                ("receiver", 15)
            raise RunError(f"{what}: {who[0]} did not finish within "
                           f"{who[1]} s (sender output: "
                           f"{tx.output()[-150:]!r}, receiver output: "
                           f"{rx.output()[-150:]!r}; guest state in "
                           f"{self.diagnose(what)})")
        if rc_tx != 0 or rc_rx != 0:
            job = tx if rc_tx else rx
            tail = " / ".join(job.output().strip().splitlines()[-2:])
            raise RunError(f"{what}: exit sender={rc_tx} receiver={rc_rx}: "
                           f"{tail}")
        cpu1 = self.cpu_ticks(what)
        txo, rxo = tx.output(), rx.output()

        def num(text, rx_):
            m = re.search(rx_, text)
            if not m:
                raise RunError(f"{what}: no '{rx_}' in the output: "
                               f"{text[-200:]!r}")
            return float(m.group(1))

        sent = int(num(txo, r"total bytes sent: (\d+)"))
        recv = int(num(rxo, r"total bytes received: (\d+)"))
        rx_gbps = num(rxo, r"rx performance: ([\d.]+) Gbits/s")
        tx_loop = num(txo, r"total time in tx loop: ([\d.]+) sec")
        if sent != nbytes or recv <= 0 or rx_gbps <= 0:
            raise RunError(f"{what}: sent {sent} of {nbytes} bytes, "
                           f"received {recv}, rx {rx_gbps} Gbit/s")
        rx_time = recv * 8 / (rx_gbps * 1e9)
        ticks = {cid: cpu1[cid] - cpu0[cid] for cid in cpu0}
        cpu_s = sum(ticks.values()) / USER_HZ
        return {
            "gbps": sent * 8 / rx_time / 1e9,
            "bytes": sent, "rx_bytes": recv, "rx_time_s": rx_time,
            "rx_gbps": rx_gbps, "tx_loop_s": tx_loop,
            "tx_loop_gbps": sent * 8 / tx_loop / 1e9 if tx_loop else None,
            "cpu_ticks": {str(c): t for c, t in ticks.items()},
            "cpu_s": cpu_s, "cpu_s_per_gib": cpu_s / (sent / GIB),
            "wall_s": wall, "rx_output": rxo, "tx_output": txo,
            "rx_mem_posted": self.rx_mem(),
        }

    def latency(self, src, dst, size):
        """Round trips of size-byte stream messages from guest src to dst."""
        a = self.args
        port = self.next_port()
        what = f"vsock-echo latency {src}->{dst} {size} B"
        srv = self.bed.guest(dst).run(
            f"vsock-echo server --port {port} --count 1")
        if not srv.wait_line(r"echo server: stream listening", 30):
            self.check_guests(what)
            raise RunError(f"{what}: server in guest {dst} did not listen: "
                           f"{srv.output()[-200:]!r}")
        t0 = time.monotonic()
        cli = self.bed.guest(src).run(
            f"vsock-echo client --cid {dst} --port {port} --latency "
            f"--count {a.lat_count} --warmup {a.lat_warmup} --size {size} "
            f"--timeout 10")
        rc = cli.wait(a.run_timeout)
        rc_s = srv.wait(15 if rc is not None else 1)
        wall = time.monotonic() - t0
        self.check_guests(what)
        if rc is None or rc_s is None:
            who = ("client", a.run_timeout) if rc is None else ("server", 15)
            raise RunError(f"{what}: {who[0]} did not finish within "
                           f"{who[1]} s (client output: "
                           f"{cli.output()[-150:]!r}, server output: "
                           f"{srv.output()[-150:]!r}; guest state in "
                           f"{self.diagnose(what)})")
        out = cli.output()
        line = next((l for l in out.splitlines()
                     if l.startswith("latency:")), None)
        if rc != 0 or rc_s != 0 or line is None:
            tail = " / ".join((cli if rc else srv).output().strip()
                              .splitlines()[-2:])
            raise RunError(f"{what}: exit client={rc} server={rc_s}: {tail}")
        vals = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        try:
            res = {k: float(vals[k]) for k in
                   ("min_us", "p50_us", "p90_us", "p99_us", "max_us",
                    "mean_us")}
            res["n"] = int(vals["n"])
        except (KeyError, ValueError):
            raise RunError(f"{what}: bad output line: {line!r}")
        res.update(wall_s=wall, output=line, rx_mem_posted=self.rx_mem())
        return res

    def record(self, cfg, rep, kind, metric, res, **extra):
        sample = {"config": cfg.label, "config_name": cfg.name, "rep": rep,
                  "kind": kind, "metric": metric,
                  "loadavg1": round(os.getloadavg()[0], 2),
                  "time": datetime.datetime.now().isoformat(
                      timespec="seconds")}
        sample.update(extra)
        sample.update(res)
        self.samples.append(sample)

    def boot(self, cfg):
        a = self.args
        if self.bed:
            self.bed.stop()
        log(f"{cfg.label}: booting guest 3 ({cfg.driver}) and guest 4 "
            f"({cfg.peer}) on the {a.kernel} kernel")
        t0 = time.monotonic()
        self.bed = Bed(a, a.workdir)
        try:
            self.bed.start({3: cfg.driver, 4: cfg.peer})
        except RunError as e:
            raise RunError(f"{cfg.label}: boot: {e}")
        # Both agents must answer before anything is timed.
        for g in self.bed.guests:
            for _ in range(12):
                if g.run("echo agent ok").wait_line(r"^agent ok$", 5):
                    break
            else:
                raise RunError(f"{cfg.label}: guest {g.cid} does not answer "
                               f"on its agent channel")
        if cfg.label not in self.kernels:
            rc, out = self.bed.guest(3).sh("cat /proc/version", 20)
            self.kernels[cfg.label] = out.strip() if rc == 0 else None
        log(f"{cfg.label}: guests up in {time.monotonic() - t0:.1f} s")
        if a.warmup_bytes:
            # Untimed: the first transfer after boot faults pages in.
            for src, dst in ((3, 4), (4, 3)):
                self.throughput(src, dst, 64 << 10, a.warmup_bytes)

    def idle(self, seconds):
        """Busy ticks of both idle guests over `seconds`: what /proc/stat
        counts when nothing moves (the agents, timers, the emulation)."""
        t0 = time.monotonic()
        cpu0 = self.cpu_ticks("idle")
        time.sleep(seconds)
        cpu1 = self.cpu_ticks("idle")
        wall = time.monotonic() - t0
        ticks = {cid: cpu1[cid] - cpu0[cid] for cid in cpu0}
        return {"cpu_ticks": {str(c): t for c, t in ticks.items()},
                "wall_s": wall,
                "busy_pct": sum(ticks.values()) / USER_HZ / wall * 100}

    def one_rep(self, cfg, rep):
        """All metrics once, on the guests booted for cfg."""
        a = self.args
        tag = f"{cfg.label} rep {rep}/{a.reps}"
        if a.idle_seconds:
            res = self.idle(a.idle_seconds)
            self.record(cfg, rep, "idle", "cpu% idle", res)
            log(f"{tag}: idle guests: {res['busy_pct']:.1f} % of a CPU busy")
        res = self.latency(3, 4, a.lat_size)
        self.record(cfg, rep, "latency", f"lat 3->4 {a.lat_size}B", res,
                    size=a.lat_size)
        log(f"{tag}: lat 3->4 {a.lat_size}B: p50 {res['p50_us']:.1f} us, "
            f"p99 {res['p99_us']:.1f} us (n={res['n']}){mem_note(res)}")
        pairs = [(3, 4), (4, 3)] + ([] if a.no_host else [(HOST_CID, 3)])
        cpu_s = nbytes_all = 0
        for buf, nbytes in ((4 << 10, a.bytes_4k), (64 << 10, a.bytes_64k)):
            for src, dst in pairs:
                metric = f"tput {src}->{dst} {human(buf)}"
                r = self.throughput(src, dst, buf, nbytes)
                self.record(cfg, rep, "throughput", metric, r, buf=buf)
                cpu_s += r["cpu_s"]
                nbytes_all += r["bytes"]
                log(f"{tag}: {metric}: {r['gbps']:.3f} Gbit/s "
                    f"({human(nbytes)} in {r['rx_time_s']:.1f} s), "
                    f"{r['cpu_s_per_gib']:.2f} CPU-s/GiB{mem_note(r)}")
        self.record(cfg, rep, "cpu_total", "cpu/GiB all",
                    {"cpu_s": cpu_s, "bytes": nbytes_all,
                     "cpu_s_per_gib": cpu_s / (nbytes_all / GIB)})

    def run(self, configs):
        a = self.args
        blocks = schedule(configs, a.reps)
        log("order: " + " ".join(c.name for _, c in blocks) + "  ("
            + ", ".join(f"{c.name} = {c.label}" for c in configs) + ")")
        # vmtest lets one process at a time run beds; wait for it here, so
        # that the time measured is the bench's own.
        lock = getattr(vmtest, "BED_LOCK", None)
        if lock:
            lock.acquire()
        t_first = self.t_start = time.monotonic()
        for i, (rep, cfg) in enumerate(blocks):
            if i:
                left = (time.monotonic() - t_first) / i * (len(blocks) - i)
                log(f"block {i + 1}/{len(blocks)}, about {left / 60:.0f} "
                    f"min left")
            # One configuration boots once; several boot every block.
            if self.bed is None or len(configs) > 1:
                self.boot(cfg)
            self.one_rep(cfg, rep)

    def stop(self):
        if self.bed:
            self.bed.stop()
            self.bed = None


# --- Summary, tables and plot --------------------------------------------

def values(sample):
    """The (metric, unit, value) figures one raw sample gives."""
    kind = sample["kind"]
    if kind == "throughput":
        return [(sample["metric"], TPUT, sample["gbps"]),
                (sample["metric"].replace("tput", "cpu/GiB", 1), CPUG,
                 sample["cpu_s_per_gib"])]
    if kind == "cpu_total":
        return [(sample["metric"], CPUG, sample["cpu_s_per_gib"])]
    if kind == "idle":
        return [(sample["metric"], PCT, sample["busy_pct"])]
    return [(f"{sample['metric']} {q}", USEC, sample[f"{q}_us"])
            for q in ("p50", "p90", "p99")]


def metric_order(name):
    """Table order: latency, throughput, CPU per transfer, CPU in all."""
    for i, prefix in enumerate(("lat ", "tput ", "cpu/GiB ", "cpu% ")):
        if name.startswith(prefix):
            return (i, name == "cpu/GiB all")
    return (4, False)


def summarize(samples, labels):
    """{metric: {"unit", "configs": {label: stats}}}, in table order."""
    per = {}
    for s in samples:
        for metric, unit, v in values(s):
            m = per.setdefault(metric, {"unit": unit, "configs": {}})
            m["configs"].setdefault(s["config"], []).append(v)
    out = {}
    for metric in sorted(per, key=lambda m: (metric_order(m),
                                              list(per).index(m))):
        m = per[metric]
        stats = {}
        for label in labels:
            vals = m["configs"].get(label)
            if not vals:
                continue
            med = statistics.median(vals)
            lo, hi = min(vals), max(vals)
            stats[label] = {
                "n": len(vals), "median": med, "min": lo, "max": hi,
                "spread_pct": (hi - lo) / med * 100 if med else None,
                "values": vals,
            }
        out[metric] = {"unit": m["unit"], "configs": stats}
    return out


def compare(summary, a, b, resamples, seed):
    """{metric: bootstrap_ratio of b over a} for the metrics both have."""
    out = {}
    for metric, m in summary.items():
        sa, sb = m["configs"].get(a), m["configs"].get(b)
        if sa and sb and sa["median"]:
            out[metric] = bootstrap_ratio(sa["values"], sb["values"],
                                          resamples,
                                          f"{seed}/{metric}/{b}/{a}")
    return out


def done_when(doc):
    """The THRESHOLDS rows judged on the doc's ratios."""
    rows = []
    ratio = (doc.get("ratio") or {}).get("per_metric", {})
    noise = (doc.get("noise") or {}).get("per_metric", {})
    for metric, op, t in THRESHOLDS:
        r, n = ratio.get(metric), noise.get(metric)
        result, clear = judge(r, n, op, t)
        rows.append({"metric": metric, "op": op, "threshold": t,
                     "ratio": r, "noise": n, "result": result,
                     "clear_of_noise": clear})
    return rows


def fmt(v, unit):
    return f"{v:.3f}" if unit in (TPUT, CPUG) else f"{v:.1f}"


def fmt_ci(r):
    return f"{r['ratio']:6.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"


def print_report(doc):
    """The medians, the ratios beside the noise floor, the done-when rows."""
    labels = [c["label"] for c in doc["configs"]]
    summary = doc["summary"]
    reps = doc["settings"]["reps"]
    print()
    print(f"medians of {reps} reps; "
          + ", ".join(f"{c['name']} = {c['label']} (guest 3 {c['guest3']},"
                      f" guest 4 {c['guest4']})" for c in doc["configs"]))
    rat, noi = doc.get("ratio"), doc.get("noise")
    head = f"  {'metric':<20} {'unit':<6}" + "".join(
        f" {l:>9}" for l in labels)
    if rat:
        head += f"  {rat['of'] + ' / ' + rat['vs'] + ' [95% CI]':>24}"
    if noi:
        head += f"  {'noise ' + noi['of'] + ' / ' + noi['vs']:>24}"
    print(head)
    for metric, m in summary.items():
        line = f"  {metric:<20} {m['unit']:<6}"
        for l in labels:
            s = m["configs"].get(l)
            line += f" {fmt(s['median'], m['unit']) if s else '-':>9}"
        for part in (rat, noi):
            if part:
                r = part["per_metric"].get(metric)
                line += f"  {fmt_ci(r) if r else '-':>24}"
        print(line)
    if rat:
        print(f"  (B / A: throughput >1 = faster; latency, CPU/GiB >1 = "
              f"slower; {rat['resamples']} bootstrap resamples, seed "
              f"{rat['seed']})")
        print()
        print(f"issue 8, done when ({rat['of']} against {rat['vs']}; pass: "
              f"the whole 95% interval beyond the threshold; informational)")
        print(f"  {'metric':<20} {'want':<8} {'ratio [95% CI]':>26} "
              f"{'noise [95% CI]':>26}  {'result':<6} noise")
        for row in doc["done_when"]:
            r, n = row["ratio"], row["noise"]
            clear = {True: "clear", False: "overlaps",
                     None: "-"}[row["clear_of_noise"]]
            print(f"  {row['metric']:<20} {row['op']} {row['threshold']:<5.2f}"
                  f" {fmt_ci(r) if r else 'not measured':>26}"
                  f" {fmt_ci(n) if n else '-':>26}  {row['result']:<6} "
                  f"{clear}")


def plot(doc, path):
    """Per metric the B/A ratio with its interval and the noise floor's
    beside it, a line at 1.0, the done-when thresholds as red ticks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rat = doc["ratio"]["per_metric"]
    noi = (doc.get("noise") or {}).get("per_metric", {})
    metrics = [m for m in doc["summary"] if m in rat]
    thresholds = {m: t for m, _, t in THRESHOLDS}
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.42 * len(metrics)))
    for i, m in enumerate(metrics):
        y = len(metrics) - 1 - i
        for r, dy, color, label in ((rat[m], 0.12, "tab:blue",
                                     f"{doc['ratio']['of']} / "
                                     f"{doc['ratio']['vs']}"),
                                    (noi.get(m), -0.12, "tab:gray",
                                     "noise floor "
                                     + (doc.get("noise") or {}).get("of", "")
                                     + f" / {doc['ratio']['vs']}")):
            if r is None:
                continue
            ax.errorbar(r["ratio"], y + dy,
                        xerr=[[r["ratio"] - r["lo"]], [r["hi"] - r["ratio"]]],
                        fmt="o", color=color, capsize=3, ms=4,
                        label=label if i == 0 else None)
        if m in thresholds:
            ax.plot([thresholds[m]] * 2, [y - 0.3, y + 0.3], color="tab:red",
                    lw=1.5, label="done-when threshold" if i == 0 else None)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(metrics)))
    ax.set_yticklabels([f"{m} ({doc['summary'][m]['unit']})"
                        for m in reversed(metrics)], fontsize=8)
    ax.set_ylim(-0.6, len(metrics) - 0.4)
    ax.set_xlabel("ratio of medians, 95 % bootstrap interval "
                  "(throughput >1 faster; latency, CPU/GiB >1 slower)")
    g = doc.get("git", {})
    ax.set_title(f"{doc['ratio']['of']} / {doc['ratio']['vs']}, "
                 f"{doc['settings']['reps']} reps, {doc['settings']['kernel']}"
                 f" kernel, {(g.get('commit') or '?')[:12]}"
                 f"{'-dirty' if g.get('dirty') else ''}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw(doc, path):
    """plot(), in Debian's python3 when this one has no matplotlib (a
    pyenv or venv python first on PATH). None, or why it drew nothing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        system = "/usr/bin/python3"
        if os.path.realpath(sys.executable) == os.path.realpath(system) or \
                not os.path.exists(system):
            return ("no matplotlib: install python3-matplotlib "
                    "(make setup)")
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
                "import bench; bench.plot(json.load(open(sys.argv[2])), "
                "sys.argv[3])")
        r = subprocess.run([system, "-c", code, TOOLS, doc["json"], path],
                           capture_output=True, text=True)
        if r.returncode:
            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
            return f"{system} could not draw it: {tail}"
        return None
    plot(doc, path)
    return None


# --- Command line --------------------------------------------------------

def interrupted(signum, frame):
    raise KeyboardInterrupt


def make_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Sizes take K, M and G suffixes (powers of 1024).")
    drivers = sorted(vmtest.DRIVERS)
    p.add_argument("--driver", default="c", choices=drivers,
                   help="transport in guest 3 (default c)")
    p.add_argument("--peer", choices=drivers,
                   help="transport in guest 4 (default: --driver)")
    p.add_argument("--driver2", choices=drivers,
                   help="second configuration: transport in guest 3")
    p.add_argument("--peer2", choices=drivers,
                   help="second configuration: transport in guest 4 "
                        "(default: --driver2)")
    p.add_argument("--no-noise", action="store_true",
                   help="leave out the third configuration, a copy of the "
                        "first that measures the noise floor")
    p.add_argument("--kernel", default="perf",
                   help="kernel flavour (default perf)")
    p.add_argument("--reps", type=int, default=10,
                   help="repetitions of every metric (default 10)")
    p.add_argument("--bytes", type=parse_size,
                   help="bytes per throughput run, both buffer sizes")
    p.add_argument("--bytes-4k", type=parse_size,
                   help="bytes per throughput run with 4 KiB buffers "
                        "(default 256M, 32M on other kernels than perf)")
    p.add_argument("--bytes-64k", type=parse_size,
                   help="bytes per throughput run with 64 KiB buffers "
                        "(default 1G, 128M on other kernels than perf)")
    p.add_argument("--no-host", action="store_true",
                   help="leave out the host-to-guest transfers")
    p.add_argument("--warmup-bytes", type=parse_size,
                   default=parse_size("8M"),
                   help="untimed transfer each way after every boot "
                        "(default 8M, 0 for none)")
    p.add_argument("--lat-count", type=int, default=5000,
                   help="timed round trips per latency run (default 5000)")
    p.add_argument("--lat-warmup", type=int, default=100,
                   help="untimed round trips before them (default 100)")
    p.add_argument("--lat-size", type=int, default=64,
                   help="bytes per latency message (default 64)")
    p.add_argument("--idle-seconds", type=float, default=3,
                   help="per block, how long to count the busy time of "
                        "both guests at rest (default 3, 0 for none)")
    p.add_argument("--resamples", type=int, default=10000,
                   help="bootstrap resamples per interval (default 10000)")
    p.add_argument("--seed", type=int, default=1,
                   help="bootstrap seed (default 1)")
    p.add_argument("--run-timeout", type=int, default=180,
                   help="seconds one measurement may take (default 180)")
    p.add_argument("--boot-timeout", type=int, default=120)
    p.add_argument("--smp", type=int, default=1,
                   help="vCPUs per guest (default 1: two guests on two "
                        "host cores)")
    p.add_argument("--mem", type=int, default=512, help="MiB per guest")
    p.add_argument("--append", default="", help="extra kernel parameters")
    p.add_argument("--json", help="where the results go (default "
                   "$CACHE/bench/bench-<timestamp>.json)")
    p.add_argument("--plot", help="where the plot goes (default: the "
                   "JSON's path with .png)")
    p.add_argument("--replot", metavar="JSON",
                   help="measure nothing: print the tables and draw the "
                        "plot of a saved JSON")
    p.add_argument("--workdir", help="where logs go (default: a temp dir)")
    vmtest.add_front_args(p)
    args = p.parse_args(argv)
    args.peer = args.peer or args.driver
    if args.peer2 and not args.driver2:
        p.error("--peer2 needs --driver2")
    args.peer2 = args.peer2 or args.driver2
    if args.bytes:
        args.bytes_4k = args.bytes_64k = args.bytes
    # The debug kernel (KASAN, lockdep) moves data ten times slower.
    perf = args.kernel == "perf"
    args.bytes_4k = args.bytes_4k or parse_size("256M" if perf else "32M")
    args.bytes_64k = args.bytes_64k or parse_size("1G" if perf else "128M")
    if args.reps < 1 or args.lat_count < 1 or args.resamples < 1:
        p.error("--reps, --lat-count and --resamples must be at least 1")
    return args


def setup(args):
    """Fill in what vmtest's Bed and Guest read, with vmtest's own parser."""
    argv = [f"--kernel={args.kernel}", f"--smp={args.smp}",
            f"--mem={args.mem}", f"--append={args.append}",
            f"--boot-timeout={args.boot_timeout}",
            f"--timeout={args.run_timeout}", "--no-kmemleak"]
    argv += vmtest.front_argv(args)
    if args.workdir:
        argv.append(f"--workdir={args.workdir}")
    else:
        argv.append("--workdir=" + tempfile.mkdtemp(prefix="bench-"))
    vargs = vmtest.parse_args(argv)
    # vmtest appends the extras archive (samples, Rust module) when it exists.
    if not any(os.path.basename(p).startswith("extras-")
               for p in vargs.extra_initrd):
        sys.exit(f"bench FAILED: no extras archive for the {args.kernel} "
                 f"kernel in {CACHE}/initramfs (it holds vsock-echo): run "
                 f"'make bench' or 'make extras FLAVOUR={args.kernel}'")
    for k, v in vars(vargs).items():
        if not hasattr(args, k) or k in ("workdir", "initrd", "front"):
            setattr(args, k, v)
    # The guests' initramfs is copied now; the Rust module must be in it.
    if "rust" in (args.driver, args.peer, args.driver2, args.peer2):
        with open(args.initrd, "rb") as f:
            if b"lib/modules/virtio_vsock_rs.ko" not in f.read():
                sys.exit(f"bench FAILED: the extras archive for the "
                         f"{args.kernel} kernel has no Rust module: run "
                         f"'make bench' or 'make extras FLAVOUR={args.kernel}"
                         f" DRIVER=rust'")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.json = args.json or os.path.join(CACHE, "bench",
                                          f"bench-{stamp}.json")
    args.plot = args.plot or os.path.splitext(args.json)[0] + ".png"


def git_info():
    def git(*argv):
        r = subprocess.run(["git", "-C", TOP] + list(argv),
                           capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"),
            "describe": git("describe", "--always", "--dirty"),
            "dirty": bool(status) if status is not None else None,
            "changed": status.splitlines() if status else []}


def sha256(path):
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def kernel_info(args, bench):
    try:
        with open(os.path.join(args.kdir, "include/config/kernel.release")) \
                as f:
            release = f.read().strip()
    except OSError:
        release = None
    return {"flavour": args.kernel, "kdir": args.kdir, "release": release,
            "proc_version": bench.kernels,
            "rust_module_sha256": sha256(os.path.join(
                CACHE, "module",
                vmtest.kernel_name(args.kernel, args.kernel_version),
                "virtio_vsock_rs.ko")),
            "initrd_sha256": sha256(args.initrd)}


def replot(args):
    with open(args.replot) as f:
        doc = json.load(f)
    doc["json"] = os.path.abspath(args.replot)
    print_report(doc)
    print()
    if doc.get("ratio"):
        path = args.plot or os.path.splitext(args.replot)[0] + ".png"
        why = draw(doc, path)
        print(f"plot: {why or path}")


def main():
    args = make_args()
    if args.replot:
        return replot(args)
    setup(args)
    configs = [Config("A", args.driver, args.peer)]
    if args.driver2:
        # The same configuration twice measures the noise of the bed (A/A).
        same = (args.driver2, args.peer2) == (args.driver, args.peer)
        configs.append(Config("B", args.driver2, args.peer2,
                              "#2" if same else ""))
        if not args.no_noise:
            configs.append(Config("N", args.driver, args.peer,
                                  "#3" if same else "#2"))
    log(f"bench: {' vs '.join(c.label for c in configs)}, kernel "
        f"{args.kernel}, {args.front} front, {args.reps} reps, "
        f"{human(args.bytes_4k)} per 4K transfer, {human(args.bytes_64k)} "
        f"per 64K transfer, {args.lat_count} round trips per latency run; "
        f"logs in {args.workdir}")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 2) / 2:
        log(f"warning: host load average {load:.1f} on {os.cpu_count()} "
            f"CPUs before the guests start: other work is running, the "
            f"figures will be noisy")
    bench = Bench(args)
    # The guests run in their own sessions: stop them on SIGTERM too.
    signal.signal(signal.SIGTERM, interrupted)
    error = None
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load0 = os.getloadavg()
    try:
        bench.run(configs)
    except RunError as e:
        error = str(e)
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        bench.stop()
    labels = [c.label for c in configs]
    summary = summarize(bench.samples, labels)
    rat = noise = None
    if len(configs) >= 2:
        a, b = configs[0].label, configs[1].label
        rat = {"of": b, "vs": a, "resamples": args.resamples,
               "seed": args.seed,
               "per_metric": compare(summary, a, b, args.resamples,
                                     args.seed)}
    if len(configs) == 3:
        a, n = configs[0].label, configs[2].label
        noise = {"of": n, "vs": a, "resamples": args.resamples,
                 "seed": args.seed,
                 "per_metric": compare(summary, a, n, args.resamples,
                                       args.seed)}
    doc = {
        "version": 2,
        "started": started,
        "seconds": round(time.monotonic() - T0, 1),
        "seconds_measuring": (round(time.monotonic() - bench.t_start, 1)
                              if bench.t_start else None),
        "error": error,
        "configs": [{"name": c.name, "label": c.label, "guest3": c.driver,
                     "guest4": c.peer} for c in configs],
        "order": [f"{c.name}{rep}" for rep, c in schedule(configs,
                                                          args.reps)],
        "settings": {k: getattr(args, k) for k in (
            "kernel", "kdir", "front", "root_port", "reps", "bytes_4k",
            "bytes_64k", "no_host", "idle_seconds", "warmup_bytes",
            "lat_count",
            "lat_warmup", "lat_size", "resamples", "seed", "smp", "mem",
            "append", "run_timeout", "workdir")},
        "kernel": kernel_info(args, bench),
        "git": git_info(),
        "host": {"node": platform.node(), "cpus": os.cpu_count(),
                 "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "method": "tput: bytes sent * 8 / receiver time from accept to EOF "
                  "(vsock_perf receiving; sender vsock_perf or, from CID 2, "
                  "this script through the device's Unix socket); lat: "
                  "vsock-echo client --latency round trips; cpu/GiB: "
                  "user+nice+system+irq+softirq of /proc/stat in both "
                  "guests around each transfer, per GiB sent; ratios: "
                  "median B / median A, 95% percentile bootstrap "
                  "resampling each configuration's reps independently; "
                  "blocks interleaved in rotated rounds, one fresh boot "
                  "per block",
        "summary": summary,
        "ratio": rat,
        "noise": noise,
        "json": os.path.abspath(args.json),
        "plot": None,
        "samples": bench.samples,
    }
    doc["done_when"] = done_when(doc) if rat else None
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    why = None
    if rat and rat["per_metric"]:
        doc["plot"] = os.path.abspath(args.plot)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    if doc["plot"]:
        why = draw(doc, doc["plot"])
        if why:
            doc["plot"] = None
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
    print_report(doc)
    print()
    print(f"json: {doc['json']}")
    if rat:
        print(f"plot: {doc['plot'] or why or 'nothing to plot'}")
    waited = ""
    if doc["seconds_measuring"] is not None and \
            doc["seconds"] - doc["seconds_measuring"] > 5:
        waited = (f" ({doc['seconds'] - doc['seconds_measuring']:.0f} s of "
                  f"them waiting for another test bed)")
    print(f"logs: {args.workdir}; {doc['seconds']:.0f} s{waited}")
    if error:
        print(f"bench FAILED: {error}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
