#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Where a guest's CPU goes during one vsock transfer: a perf profile.

Boots guest 3 (--driver) and guest 4 (--peer) on the perf kernel, as
tools/bench.py does, with the host's perf (Debian's linux-perf) and its
libraries appended to the initramfs. One untimed transfer warms the guests
up; then `perf record -e cpu-clock -a` runs in --guest while vsock_perf
moves --bytes from --src to --dst in --buf-size writes, and `perf report`
prints the symbols that took the most samples, in that guest, by its
/proc/kallsyms (the module's symbols included).

With --vs, the profiled guest runs the other driver too, on fresh guests,
interleaved over --reps: the table gives samples per GiB moved for each
driver and their difference, largest first. That shows where one driver
spends more than the other, which the bench's CPU-per-GiB ratio cannot.
Under TCG the profile is of the emulated CPU: its proportions, not its
absolute times, carry over to hardware, and a guest's samples follow the
host's speed too. Use --reps 3 or more, and check that the copy to or from
the user (_copy_to_iter, _copy_from_iter: the same work for both drivers)
came out alike before reading the other rows.

  tools/perf_profile.py --driver rust --peer c --vs c --reps 3
  make profile DRIVER=rust PEER=c PROFILE_ARGS='--vs c --reps 3'

The last line is "profile: N samples in guest G" or "profile FAILED: why".
"""

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (after the path is set)
from vmtest import CACHE, RunError  # noqa: E402

PERF = "/usr/bin/perf"


def perf_cpio():
    """A cpio archive of the host's perf and the libraries it loads, kept in
    the cache under a name made from their contents."""
    if not os.path.exists(PERF):
        sys.exit(f"profile FAILED: {PERF} not found: run 'make setup' "
                 f"(it installs linux-perf)")
    out = subprocess.run(["ldd", PERF], capture_output=True, text=True,
                         check=True).stdout
    files = [PERF]
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            files.append(path)
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f} {st.st_size} {st.st_mtime_ns}\n".encode())
    path = os.path.join(CACHE, "initramfs", f"perf-{h.hexdigest()[:12]}.cpio")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory() as root:
        for f in files:
            dst = os.path.join(root, f.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.realpath(f), dst)
        with open(path + ".tmp", "wb") as o:
            subprocess.run("find . | cpio -o -H newc --quiet", shell=True,
                           cwd=root, stdout=o, check=True)
    os.replace(path + ".tmp", path)
    return path


def make_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--driver", choices=("c", "rust"), default="rust",
                   help="guest 3's driver (default rust)")
    p.add_argument("--peer", choices=("c", "rust"), default="c",
                   help="guest 4's driver (default c)")
    p.add_argument("--vs", choices=("c", "rust"),
                   help="profile the same with this driver in the profiled "
                        "guest too, interleaved, and compare")
    p.add_argument("--src", type=int, choices=(3, 4), default=3,
                   help="the sending guest (default 3)")
    p.add_argument("--dst", type=int, choices=(3, 4), default=4,
                   help="the receiving guest (default 4)")
    p.add_argument("--guest", type=int, choices=(3, 4), default=3,
                   help="the guest profiled (default 3)")
    p.add_argument("--buf-size", type=bench.parse_size, default=64 << 10,
                   help="bytes per write and read (default 64K)")
    p.add_argument("--bytes", type=bench.parse_size, default=512 << 20,
                   help="bytes moved while perf records (default 512M)")
    p.add_argument("--reps", type=int, default=1,
                   help="profiles per driver, each on fresh guests, "
                        "summed (default 1)")
    p.add_argument("--freq", type=int, default=997,
                   help="samples per second (default 997)")
    p.add_argument("--top", type=int, default=30,
                   help="symbols shown (default 30)")
    p.add_argument("--kernel", default="perf", help="kernel flavour")
    p.add_argument("--kernel-version", choices=("6.12", "7.3"),
                   default=os.environ.get("KERNEL", "6.12"))
    p.add_argument("--workdir", help="where logs go (default: a temp dir)")
    a = p.parse_args(argv)
    if a.src == a.dst:
        p.error("--src and --dst must differ")
    if a.reps < 1:
        p.error("--reps must be at least 1")
    # What bench.setup and Bench read, with the bench's defaults; --vs as
    # driver2, so that bench.setup checks the Rust module is there for it.
    b = bench.make_args([f"--kernel={a.kernel}", "--reps=1"]
                        + ([f"--workdir={a.workdir}"] if a.workdir else []))
    for k, v in vars(a).items():
        setattr(b, k, v)
    b.driver2 = a.vs
    os.environ["KERNEL"] = a.kernel_version
    return b


# "    31.47%          2203  [k] _copy_from_iter" (perf report -n).
ROW = re.compile(r"^\s*([\d.]+)%\s+(\d+)\s+\[(.)\]\s+(.+?)\s*$")


def short(sym):
    """A Rust symbol without its hash and crate path noise."""
    m = re.match(r"_ZN(.*)17h[0-9a-f]{16}E$", sym)
    if not m:
        return sym
    parts, rest = [], m.group(1)
    while rest:
        n = re.match(r"(\d+)", rest)
        if not n:
            break
        k = int(n.group(1))
        parts.append(rest[len(n.group(1)):len(n.group(1)) + k])
        rest = rest[len(n.group(1)) + k:]
    name = "::".join(parts)
    if name.startswith("_$"):
        name = name[1:]
    return (name.replace("$LT$", "<").replace("$GT$", ">")
            .replace("$u20$", " ").replace("..", "::"))


def profile_once(b, args, driver):
    """Samples per symbol in the profiled guest during one transfer, on
    fresh guests: ({symbol: samples}, transfer result)."""
    d3, d4 = (driver, args.peer) if args.guest == 3 else (args.driver,
                                                          driver)
    b.boot(bench.Config("P", d3, d4))
    g = b.bed.guest(args.guest)
    rc, out = g.sh("perf --version", 30)
    if rc != 0:
        raise RunError(f"perf does not run in guest {args.guest}: "
                       f"{out.strip()[-200:]}")
    rec = g.run(f"perf record -q -e cpu-clock -F {args.freq} -a "
                f"-o /tmp/perf.data -- sleep 3600")
    res = b.throughput(args.src, args.dst, args.buf_size, args.bytes)
    g.sh("kill -INT $(pidof perf)", 30)
    if rec.wait(120) is None:
        raise RunError("perf record did not stop")
    bench.log(f"guest {args.guest} {driver}: {args.src}->{args.dst} "
              f"{bench.human(args.buf_size)}: {res['gbps']:.3f} Gbit/s, "
              f"guest CPU {res['cpu_s_per_gib']:.2f} s/GiB")
    rc, report = g.sh("perf report -i /tmp/perf.data --stdio -n "
                      "--no-children --sort sym 2>/dev/null", 300)
    if rc != 0:
        raise RunError(f"perf report failed: {report.strip()[-200:]}")
    syms = {}
    for line in report.splitlines():
        m = ROW.match(line)
        if m:
            name = short(m.group(4))
            syms[name] = syms.get(name, 0) + int(m.group(2))
    if not syms:
        raise RunError(f"no samples in perf report: {report[-300:]!r}")
    return syms, res


def main():
    args = make_args()
    cpio = perf_cpio()
    bench.setup(args)
    with open(args.initrd, "ab") as out, open(cpio, "rb") as f:
        shutil.copyfileobj(f, out)
    b = bench.Bench(args)
    mine = args.driver if args.guest == 3 else args.peer
    drivers = [mine] + ([args.vs] if args.vs and args.vs != mine else [])
    per = {d: {} for d in drivers}
    gib = {d: 0.0 for d in drivers}
    try:
        for rep in range(args.reps):
            for d in (drivers if rep % 2 == 0 else drivers[::-1]):
                syms, res = profile_once(b, args, d)
                for k, v in syms.items():
                    per[d][k] = per[d].get(k, 0) + v
                gib[d] += res["bytes"] / bench.GIB
    except RunError as e:
        print(f"profile FAILED: {e}")
        sys.exit(1)
    finally:
        b.stop()
    # Samples per GiB moved, so that runs of different speed compare.
    rate = {d: {k: v / gib[d] for k, v in per[d].items()} for d in drivers}
    first = drivers[0]
    keys = set().union(*(rate[d] for d in drivers))
    if len(drivers) == 2:
        other = drivers[1]
        order = sorted(keys, key=lambda k: -abs(rate[first].get(k, 0)
                                                - rate[other].get(k, 0)))
    else:
        order = sorted(keys, key=lambda k: -rate[first].get(k, 0))
    print(f"== guest {args.guest}, {args.src}->{args.dst} "
          f"{bench.human(args.buf_size)}, {args.reps} rep(s): samples per "
          f"GiB moved ({args.freq} Hz cpu-clock)")
    head = "".join(f"{d:>10}" for d in drivers)
    if len(drivers) == 2:
        head += f"{drivers[0] + '-' + drivers[1]:>12}"
    print(f"{head}  symbol")
    for k in order[:args.top]:
        row = "".join(f"{rate[d].get(k, 0):10.0f}" for d in drivers)
        if len(drivers) == 2:
            row += f"{rate[first].get(k, 0) - rate[drivers[1]].get(k, 0):+12.0f}"
        print(f"{row}  {k}")
    tot = "".join(f"{sum(rate[d].values()):10.0f}" for d in drivers)
    print(f"{tot}  (all, idle included)")
    n = sum(sum(per[d].values()) for d in drivers)
    print(f"profile: {n} samples in guest {args.guest}")


if __name__ == "__main__":
    main()
