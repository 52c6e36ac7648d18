#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Benchmark vsock between two sibling guests: throughput and latency.

Guest 3 runs --driver and guest 4 --peer (c or rust), on the perf kernel by
default, booted by tools/vmtest.py's Bed. Each repetition measures:

  tput 3->4 4K, tput 4->3 4K, tput 3->4 64K, tput 4->3 64K
      vsock_perf, receiver in one guest and sender in the other, with 4 KiB
      and 64 KiB read()/send() buffers. The figure is the goodput seen by the
      receiver: bytes sent * 8 / the receiver's time from accept to EOF (the
      time comes from its "rx performance" line; its byte count can fall
      short of what was sent, since it stops reading at the peer's shutdown).
  lat 3->4 64B
      vsock-echo client --latency in guest 3 against vsock-echo server in
      guest 4: round trips of 64-byte stream messages, timed one by one
      after a warm-up; per repetition its p50, p90 and p99.

Each metric is reported as the median over --reps repetitions, with the
minimum, maximum and spread ((max - min) / median).

The guests get one vCPU each by default: on two host cores, two vCPUs per
guest (vmtest's setting) gave half the throughput, three times the latency
and a wider spread (measured with the C driver), as vCPU threads, the device
and the host's other work fight for the cores. With the defaults (256M per
4K run, 1G per 64K run, 5000 round trips, 5 reps) one configuration takes
3-5 minutes under TCG. One configuration boots once for all repetitions.

With --driver2/--peer2 a second configuration B is measured in the same run,
against the first, A. Only one pair of guests runs at a time (the machine has
two cores): the guests are rebooted for every block of one repetition of one
configuration, in the order A B B A A B ..., so that both configurations see
as many fresh boots, and a slow drift of the host's load (other guests) falls
on both alike; it takes twice as long, plus a boot per block. Ratios are
printed as B/A: put the C configuration first to get the project's ratios
against the C driver. The same configuration twice (B labelled "c/c#2")
measures how far apart two identical configurations come out: the noise
floor any ratio must clear.

Every measurement has a timeout; a failed one ends the run with one line
"bench FAILED: ..." and exit status 1. The table goes to stdout and every raw
sample to --json (default $CACHE/bench/bench-<timestamp>.json).
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import vmtest  # noqa: E402  (after the path is set)
from vmtest import Bed, RunError  # noqa: E402

CACHE = vmtest.CACHE
T0 = time.monotonic()

TPUT = "Gbit/s"
USEC = "us"


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


class Config:
    def __init__(self, name, driver, peer, suffix=""):
        self.name = name  # "A" or "B"
        self.driver = driver
        self.peer = peer
        self.label = f"{driver}/{peer}{suffix}"


class Bench:
    def __init__(self, args):
        self.args = args
        self.port = 2000
        self.samples = []
        self.bed = None

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

    def throughput(self, src, dst, buf, nbytes):
        """One vsock_perf transfer from guest src to guest dst."""
        a = self.args
        port = self.next_port()
        what = f"vsock_perf {src}->{dst} buf {human(buf)}"
        rx = self.bed.guest(dst).run(
            f"vsock_perf --port {port} --buf-size {buf}")
        # Its "Listen port" line only arrives when it exits (stdout is a pipe).
        rc = 0 if self.bed.guest(dst).wait_accept("vsock_perf", 30) else 1
        if rc != 0:
            self.check_guests(what)
            raise RunError(f"{what}: the receiver in guest {dst} did not "
                           f"reach accept() (rc {rc}, output: "
                           f"{rx.output()[-200:]!r}; guest state in "
                           f"{self.diagnose(what)})")
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
        tx_gbps = num(txo, r"tx performance: ([\d.]+) Gbits/s")
        tx_loop = num(txo, r"total time in tx loop: ([\d.]+) sec")
        if sent != nbytes or recv <= 0 or rx_gbps <= 0:
            raise RunError(f"{what}: sent {sent} of {nbytes} bytes, "
                           f"received {recv}, rx {rx_gbps} Gbit/s")
        rx_time = recv * 8 / (rx_gbps * 1e9)
        return {
            "gbps": sent * 8 / rx_time / 1e9,
            "bytes": sent, "rx_bytes": recv, "rx_time_s": rx_time,
            "rx_gbps": rx_gbps, "tx_gbps": tx_gbps, "tx_loop_s": tx_loop,
            "tx_loop_gbps": sent * 8 / tx_loop / 1e9 if tx_loop else None,
            "wall_s": wall, "rx_output": rxo, "tx_output": txo,
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
        res.update(wall_s=wall, output=line)
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
        log(f"{cfg.label}: guests up in {time.monotonic() - t0:.1f} s")
        if a.warmup_bytes:
            # Untimed: the first transfer after boot faults pages in.
            for src, dst in ((3, 4), (4, 3)):
                self.throughput(src, dst, 64 << 10, a.warmup_bytes)

    def one_rep(self, cfg, rep):
        """All metrics once, on the guests booted for cfg."""
        a = self.args
        tag = f"{cfg.label} rep {rep}/{a.reps}"
        res = self.latency(3, 4, a.lat_size)
        self.record(cfg, rep, "latency", f"lat 3->4 {a.lat_size}B", res,
                    size=a.lat_size)
        log(f"{tag}: lat 3->4 {a.lat_size}B: p50 {res['p50_us']:.1f} us, "
            f"p99 {res['p99_us']:.1f} us (n={res['n']})")
        for buf, nbytes in ((4 << 10, a.bytes_4k), (64 << 10, a.bytes_64k)):
            for src, dst in ((3, 4), (4, 3)):
                metric = f"tput {src}->{dst} {human(buf)}"
                r = self.throughput(src, dst, buf, nbytes)
                self.record(cfg, rep, "throughput", metric, r, buf=buf)
                log(f"{tag}: {metric}: {r['gbps']:.3f} Gbit/s "
                    f"({human(nbytes)} in {r['rx_time_s']:.1f} s)")

    def run(self, configs):
        a = self.args
        if len(configs) == 1:
            cfg = configs[0]
            self.boot(cfg)
            for rep in range(1, a.reps + 1):
                self.one_rep(cfg, rep)
            return
        # A B, B A, A B, ...: each block is a fresh boot and one repetition.
        for rep in range(1, a.reps + 1):
            order = configs if rep % 2 else configs[::-1]
            for cfg in order:
                self.boot(cfg)
                self.one_rep(cfg, rep)

    def stop(self):
        if self.bed:
            self.bed.stop()
            self.bed = None


def values(sample):
    """The (metric, unit, value) figures one raw sample gives."""
    if sample["kind"] == "throughput":
        return [(sample["metric"], TPUT, sample["gbps"])]
    return [(f"{sample['metric']} {q}", USEC, sample[f"{q}_us"])
            for q in ("p50", "p90", "p99")]


def summarize(samples, configs):
    """{config label: {metric: stats}}, metrics in first-seen order."""
    out = {}
    for cfg in configs:
        per = {}
        for s in samples:
            if s["config"] == cfg.label:
                for metric, unit, v in values(s):
                    per.setdefault(metric, (unit, []))[1].append(v)
        stats = {}
        for metric, (unit, vals) in per.items():
            med = statistics.median(vals)
            lo, hi = min(vals), max(vals)
            stats[metric] = {
                "unit": unit, "n": len(vals), "median": med, "min": lo,
                "max": hi,
                "spread_pct": (hi - lo) / med * 100 if med else None,
            }
        out[cfg.label] = stats
    return out


def fmt(v, unit):
    return f"{v:.3f}" if unit == TPUT else f"{v:.1f}"


def print_table(summary, configs, reps):
    for cfg in configs:
        stats = summary[cfg.label]
        if not stats:
            continue
        print()
        print(f"{cfg.label} (guest 3: {cfg.driver}, guest 4: {cfg.peer}), "
              f"median of {reps} reps")
        print(f"  {'metric':<22} {'unit':<7} {'median':>9} {'min':>9} "
              f"{'max':>9} {'spread':>7}")
        for metric, s in stats.items():
            spread = (f"{s['spread_pct']:6.1f}%" if s["spread_pct"]
                      is not None else "     -")
            print(f"  {metric:<22} {s['unit']:<7} "
                  f"{fmt(s['median'], s['unit']):>9} "
                  f"{fmt(s['min'], s['unit']):>9} "
                  f"{fmt(s['max'], s['unit']):>9} {spread:>7}")


def ratios(summary, a, b):
    """Per-metric B/A of the medians, and the headline figures."""
    sa, sb = summary[a.label], summary[b.label]
    per = {m: sb[m]["median"] / sa[m]["median"]
           for m in sa if m in sb and sa[m]["median"]}
    tput = [r for m, r in per.items() if sa[m]["unit"] == TPUT]
    head = {
        "throughput_geomean": (math.exp(sum(map(math.log, tput)) / len(tput))
                               if tput else None),
    }
    for m, r in per.items():
        if m.startswith("lat ") and m.endswith((" p50", " p99")):
            head["latency_" + m.rsplit(" ", 1)[1]] = r
    return {"of": b.label, "vs": a.label, "per_metric": per,
            "headline": head}


def print_ratios(rat):
    print()
    print(f"ratio {rat['of']} vs {rat['vs']} (medians, {rat['of']} / "
          f"{rat['vs']}; throughput >1 = faster, latency >1 = slower):")
    for m, r in rat["per_metric"].items():
        print(f"  {m:<22} {r:6.3f}x")
    h = rat["headline"]
    parts = []
    if h.get("throughput_geomean") is not None:
        parts.append(f"throughput {h['throughput_geomean']:.2f}x")
    for q in ("p50", "p99"):
        if f"latency_{q}" in h:
            parts.append(f"latency {q} {h[f'latency_{q}']:.2f}x")
    print(f"{rat['of']} vs {rat['vs']}: " + ", ".join(parts))


def interrupted(signum, frame):
    raise KeyboardInterrupt


def make_args():
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
    p.add_argument("--kernel", default="perf",
                   help="kernel flavour (default perf)")
    p.add_argument("--reps", type=int, default=5,
                   help="repetitions of every metric (default 5)")
    p.add_argument("--bytes", type=parse_size,
                   help="bytes per throughput run, both buffer sizes")
    p.add_argument("--bytes-4k", type=parse_size,
                   help="bytes per throughput run with 4 KiB buffers "
                        "(default 256M, 32M on other kernels than perf)")
    p.add_argument("--bytes-64k", type=parse_size,
                   help="bytes per throughput run with 64 KiB buffers "
                        "(default 1G, 128M on other kernels than perf)")
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
    p.add_argument("--run-timeout", type=int, default=180,
                   help="seconds one measurement may take (default 180)")
    p.add_argument("--boot-timeout", type=int, default=120)
    p.add_argument("--smp", type=int, default=1,
                   help="vCPUs per guest (default 1: two guests on two "
                        "host cores)")
    p.add_argument("--mem", type=int, default=512, help="MiB per guest")
    p.add_argument("--append", default="", help="extra kernel parameters")
    p.add_argument("--json", help="where the raw samples go (default "
                   "$CACHE/bench/bench-<timestamp>.json)")
    p.add_argument("--workdir", help="where logs go (default: a temp dir)")
    vmtest.add_front_args(p)
    args = p.parse_args()
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
    if args.reps < 1 or args.lat_count < 1:
        p.error("--reps and --lat-count must be at least 1")
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
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.json = args.json or os.path.join(CACHE, "bench",
                                          f"bench-{stamp}.json")


def main():
    args = make_args()
    setup(args)
    configs = [Config("A", args.driver, args.peer)]
    if args.driver2:
        # The same configuration twice measures the noise of the bed (A/A).
        same = (args.driver2, args.peer2) == (args.driver, args.peer)
        configs.append(Config("B", args.driver2, args.peer2,
                              "#2" if same else ""))
    log(f"bench: {' vs '.join(c.label for c in configs)}, kernel "
        f"{args.kernel}, {args.front} front, {args.reps} reps, {human(args.bytes_4k)} per 4K "
        f"run, {human(args.bytes_64k)} per 64K run, {args.lat_count} round "
        f"trips per latency run; logs in {args.workdir}")
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
    summary = summarize(bench.samples, configs)
    rat = ratios(summary, *configs) if len(configs) == 2 and not error \
        else None
    doc = {
        "version": 1,
        "started": started,
        "seconds": round(time.monotonic() - T0, 1),
        "error": error,
        "configs": [{"name": c.name, "label": c.label, "guest3": c.driver,
                     "guest4": c.peer} for c in configs],
        "settings": {k: getattr(args, k) for k in (
            "kernel", "kdir", "front", "root_port", "reps", "bytes_4k",
            "bytes_64k", "warmup_bytes", "lat_count", "lat_warmup",
            "lat_size", "smp", "mem", "append", "run_timeout", "workdir")},
        "host": {"node": platform.node(), "cpus": os.cpu_count(),
                 "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "method": "tput: bytes sent * 8 / receiver time from accept to EOF "
                  "(vsock_perf); lat: vsock-echo client --latency round "
                  "trips; two configs alternate A B B A ..., one fresh boot "
                  "per block",
        "summary": summary,
        "ratio": rat,
        "samples": bench.samples,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print_table(summary, configs, args.reps)
    if rat:
        print_ratios(rat)
    print()
    print(f"json: {args.json}")
    print(f"logs: {args.workdir}; {time.monotonic() - T0:.0f} s")
    if error:
        print(f"bench FAILED: {error}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
