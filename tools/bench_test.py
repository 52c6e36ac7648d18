#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Unit tests of tools/bench.py's logic: statistics, order, parsing, the
host sender and the report. No guest is booted.

    python3 -m unittest tools/bench_test.py     (or run this file)
"""

import io
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import unittest
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


class Quantile(unittest.TestCase):
    def test_known_values(self):
        v = [1.0, 2.0, 3.0, 4.0, 5.0]
        self.assertEqual(bench.quantile(v, 0), 1.0)
        self.assertEqual(bench.quantile(v, 1), 5.0)
        self.assertEqual(bench.quantile(v, 0.5), 3.0)
        self.assertAlmostEqual(bench.quantile(v, 0.1), 1.4)
        self.assertAlmostEqual(bench.quantile([10.0, 20.0], 0.25), 12.5)
        self.assertEqual(bench.quantile([7.0], 0.975), 7.0)

    def test_empty(self):
        with self.assertRaises(ValueError):
            bench.quantile([], 0.5)


class MemNote(unittest.TestCase):
    def test_only_guests_that_report(self):
        res = {"rx_mem_posted": {"4": None, "3": 528384}}
        self.assertEqual(bench.mem_note(res), ", rx buffers: guest 3 516 KiB")

    def test_c_only_says_nothing(self):
        self.assertEqual(bench.mem_note({"rx_mem_posted": {"3": None}}), "")
        self.assertEqual(bench.mem_note({}), "")


class Bootstrap(unittest.TestCase):
    def test_constant_data_gives_exact_ratio(self):
        r = bench.bootstrap_ratio([2.0] * 10, [3.0] * 10, 500, seed=1)
        self.assertEqual(r["ratio"], 1.5)
        self.assertEqual((r["lo"], r["hi"]), (1.5, 1.5))
        self.assertEqual(r["resamples"], 500)

    def test_direction_is_b_over_a(self):
        # Throughput B twice A: ratio 2, whatever the interval.
        r = bench.bootstrap_ratio([1.0, 1.1, 0.9], [2.0, 2.2, 1.8], 200)
        self.assertAlmostEqual(r["ratio"], 2.0)
        self.assertLessEqual(r["lo"], r["ratio"])
        self.assertGreaterEqual(r["hi"], r["ratio"])
        r = bench.bootstrap_ratio([2.0, 2.2, 1.8], [1.0, 1.1, 0.9], 200)
        self.assertAlmostEqual(r["ratio"], 0.5)

    def test_two_point_distribution(self):
        # B = {1, 3} resampled by twos has median 1, 2 or 3 with
        # probabilities 1/4, 1/2, 1/4; A is constant 1. So the 2.5th and
        # 97.5th percentiles are 1 and 3, the point ratio 2.
        r = bench.bootstrap_ratio([1.0, 1.0], [1.0, 3.0], 4000, seed=7)
        self.assertEqual(r["ratio"], 2.0)
        self.assertEqual((r["lo"], r["hi"]), (1.0, 3.0))
        r = bench.bootstrap_ratio([1.0, 1.0], [1.0, 3.0], 4000, seed=7,
                                  level=0.4)
        self.assertEqual((r["lo"], r["hi"]), (2.0, 2.0))

    def test_same_seed_same_interval(self):
        rng = random.Random(3)
        a = [rng.gauss(10, 1) for _ in range(10)]
        b = [rng.gauss(11, 1) for _ in range(10)]
        r1 = bench.bootstrap_ratio(a, b, 1000, seed="x/tput")
        r2 = bench.bootstrap_ratio(a, b, 1000, seed="x/tput")
        r3 = bench.bootstrap_ratio(a, b, 1000, seed="y/tput")
        self.assertEqual(r1, r2)
        self.assertNotEqual((r1["lo"], r1["hi"]), (r3["lo"], r3["hi"]))

    def test_interval_separates_a_ten_percent_difference(self):
        # 10 reps with 3 % noise: B 10 % above A is told apart from 1.0,
        # and the interval holds the true ratio.
        rng = random.Random(11)
        a = [rng.gauss(100, 3) for _ in range(10)]
        b = [rng.gauss(110, 3.3) for _ in range(10)]
        r = bench.bootstrap_ratio(a, b, 2000, seed=1)
        self.assertGreater(r["lo"], 1.0)
        self.assertLess(r["lo"], 1.1)
        self.assertGreater(r["hi"], 1.1)

    def test_coverage(self):
        # Over 60 independent data sets the 95 % interval should hold the
        # true ratio (1.0) most of the time; percentile bootstraps of a
        # median at n = 10 run a little under nominal.
        rng = random.Random(5)
        hits = 0
        for i in range(60):
            a = [rng.gauss(50, 5) for _ in range(10)]
            b = [rng.gauss(50, 5) for _ in range(10)]
            r = bench.bootstrap_ratio(a, b, 400, seed=i)
            hits += r["lo"] <= 1.0 <= r["hi"]
        self.assertGreaterEqual(hits, 51)

    def test_wider_with_more_noise(self):
        rng = random.Random(2)
        base = [rng.gauss(0, 1) for _ in range(10)]
        quiet = bench.bootstrap_ratio([100 + x for x in base],
                                      [100 + x for x in base[::-1]], 1000)
        loud = bench.bootstrap_ratio([100 + 10 * x for x in base],
                                     [100 + 10 * x for x in base[::-1]],
                                     1000)
        self.assertLess(quiet["hi"] - quiet["lo"], loud["hi"] - loud["lo"])

    def test_bad_input(self):
        with self.assertRaises(ValueError):
            bench.bootstrap_ratio([], [1.0])
        with self.assertRaises(ValueError):
            bench.bootstrap_ratio([0.0, 0.0], [1.0])


class Schedule(unittest.TestCase):
    def cfgs(self, n):
        return [bench.Config(name, "c", "c", f"#{i}")
                for i, name in enumerate("ABN"[:n])]

    def names(self, n, reps):
        return "".join(c.name for _, c in bench.schedule(self.cfgs(n), reps))

    def test_order(self):
        self.assertEqual(self.names(3, 4), "ABN" "BNA" "NAB" "ABN")
        self.assertEqual(self.names(2, 4), "AB" "BA" "AB" "BA")
        self.assertEqual(self.names(1, 3), "AAA")

    def test_reps_and_rounds(self):
        blocks = bench.schedule(self.cfgs(3), 10)
        self.assertEqual(len(blocks), 30)
        for r in range(1, 11):
            rnd = [c.name for rep, c in blocks if rep == r]
            self.assertEqual(sorted(rnd), ["A", "B", "N"])

    def test_places_balanced_and_no_repeats(self):
        blocks = bench.schedule(self.cfgs(3), 9)
        names = [c.name for _, c in blocks]
        # Each configuration in each place of a round equally often.
        for place in range(3):
            self.assertEqual(sorted(names[place::3]), ["A"] * 3 + ["B"] * 3
                             + ["N"] * 3)
        # Never the same configuration twice in a row.
        self.assertTrue(all(x != y for x, y in zip(names, names[1:])))


class Judge(unittest.TestCase):
    def r(self, ratio, lo, hi):
        return {"ratio": ratio, "lo": lo, "hi": hi}

    def test_at_least(self):
        noise = self.r(1.0, 0.97, 1.03)
        self.assertEqual(bench.judge(self.r(1.4, 1.31, 1.5), noise, ">=",
                                     1.3), ("pass", True))
        # Median over, interval not: fail.
        self.assertEqual(bench.judge(self.r(1.35, 1.25, 1.45), noise, ">=",
                                     1.3), ("fail", True))
        self.assertEqual(bench.judge(self.r(1.01, 0.99, 1.05), noise, ">=",
                                     1.0), ("fail", False))

    def test_at_most(self):
        noise = self.r(1.0, 0.95, 1.05)
        self.assertEqual(bench.judge(self.r(1.0, 0.9, 1.08), noise, "<=",
                                     1.1), ("pass", False))
        self.assertEqual(bench.judge(self.r(0.7, 0.65, 0.75), noise, "<=",
                                     0.8), ("pass", True))
        self.assertEqual(bench.judge(self.r(0.7, 0.65, 0.85), None, "<=",
                                     0.8), ("fail", None))

    def test_missing(self):
        self.assertEqual(bench.judge(None, None, ">=", 1.0), ("n/a", None))


class Parsing(unittest.TestCase):
    def test_cpu_busy_ticks(self):
        stat = ("cpu  100 5 30 9000 7 2 3 0 0 0\n"
                "cpu0 100 5 30 9000 7 2 3 0 0 0\nintr 1 2\n")
        self.assertEqual(bench.cpu_busy_ticks(stat), 100 + 5 + 30 + 2 + 3)
        with self.assertRaises(ValueError):
            bench.cpu_busy_ticks("intr 1 2\n")

    def test_sizes(self):
        self.assertEqual(bench.parse_size("64K"), 65536)
        self.assertEqual(bench.parse_size("1G"), 1 << 30)
        self.assertEqual(bench.human(256 << 20), "256M")
        self.assertEqual(bench.human(1000), "1000")

    def test_values(self):
        s = {"kind": "throughput", "metric": "tput 2->3 64K", "gbps": 1.5,
             "cpu_s_per_gib": 4.0}
        self.assertEqual(bench.values(s), [
            ("tput 2->3 64K", bench.TPUT, 1.5),
            ("cpu/GiB 2->3 64K", bench.CPUG, 4.0)])
        s = {"kind": "latency", "metric": "lat 3->4 64B", "p50_us": 1.0,
             "p90_us": 2.0, "p99_us": 3.0}
        self.assertEqual([v[0] for v in bench.values(s)],
                         ["lat 3->4 64B p50", "lat 3->4 64B p90",
                          "lat 3->4 64B p99"])
        s = {"kind": "idle", "metric": "cpu% idle", "busy_pct": 2.5}
        self.assertEqual(bench.values(s), [("cpu% idle", bench.PCT, 2.5)])


def fake_samples():
    """Raw samples of three configurations, B 1.5x faster than A."""
    rng = random.Random(4)
    out = []
    for label, name, scale in (("c/c", "A", 1.0), ("rust/c", "B", 1.5),
                               ("c/c#2", "N", 1.0)):
        for rep in range(1, 6):
            for metric in ("tput 3->4 64K", "tput 2->3 64K"):
                g = scale * rng.gauss(1.0, 0.02)
                out.append({"config": label, "config_name": name,
                            "rep": rep, "kind": "throughput",
                            "metric": metric, "gbps": g,
                            "cpu_s_per_gib": 8.6 / g})
            out.append({"config": label, "config_name": name, "rep": rep,
                        "kind": "latency", "metric": "lat 3->4 64B",
                        "p50_us": 100 / scale, "p90_us": 120 / scale,
                        "p99_us": 150 * rng.gauss(1, 0.05)})
            out.append({"config": label, "config_name": name, "rep": rep,
                        "kind": "cpu_total", "metric": "cpu/GiB all",
                        "cpu_s_per_gib": 8.6 / scale})
            out.insert(0, {"config": label, "config_name": name,
                           "rep": rep, "kind": "idle", "metric": "cpu% idle",
                           "busy_pct": rng.gauss(3, 0.3)})
    return out


def fake_doc():
    labels = ["c/c", "rust/c", "c/c#2"]
    summary = bench.summarize(fake_samples(), labels)
    doc = {"configs": [{"name": n, "label": l, "guest3": l.split("/")[0],
                        "guest4": "c"} for n, l in zip("ABN", labels)],
           "settings": {"reps": 5, "kernel": "perf"},
           "git": {"commit": "0123456789abcdef", "dirty": True},
           "summary": summary,
           "ratio": {"of": "rust/c", "vs": "c/c", "resamples": 300,
                     "seed": 1, "per_metric": bench.compare(
                         summary, "c/c", "rust/c", 300, 1)},
           "noise": {"of": "c/c#2", "vs": "c/c", "resamples": 300,
                     "seed": 1, "per_metric": bench.compare(
                         summary, "c/c", "c/c#2", 300, 1)}}
    doc["done_when"] = bench.done_when(doc)
    return doc


class Report(unittest.TestCase):
    def test_summary_and_ratios(self):
        doc = fake_doc()
        s = doc["summary"]
        self.assertEqual(list(s)[:3], ["lat 3->4 64B p50", "lat 3->4 64B p90",
                                       "lat 3->4 64B p99"])
        self.assertEqual(list(s)[-2:], ["cpu/GiB all", "cpu% idle"])
        self.assertEqual(s["tput 3->4 64K"]["configs"]["c/c"]["n"], 5)
        t = doc["ratio"]["per_metric"]["tput 3->4 64K"]
        self.assertGreater(t["lo"], 1.4)
        self.assertLess(t["hi"], 1.6)
        lat = doc["ratio"]["per_metric"]["lat 3->4 64B p50"]
        self.assertAlmostEqual(lat["ratio"], 1 / 1.5)
        n = doc["noise"]["per_metric"]["tput 3->4 64K"]
        self.assertLess(n["lo"], 1.0)
        self.assertGreater(n["hi"], 1.0)

    def test_done_when(self):
        rows = {r["metric"]: r for r in fake_doc()["done_when"]}
        self.assertEqual(len(rows), len(bench.THRESHOLDS))
        self.assertEqual(rows["tput 3->4 64K"]["result"], "pass")
        self.assertIs(rows["tput 3->4 64K"]["clear_of_noise"], True)
        self.assertEqual(rows["lat 3->4 64B p50"]["result"], "pass")
        self.assertEqual(rows["cpu/GiB all"]["result"], "pass")
        self.assertEqual(rows["tput 4->3 64K"]["result"], "n/a")

    def test_print_report(self):
        out = io.StringIO()
        with redirect_stdout(out):
            bench.print_report(fake_doc())
        text = out.getvalue()
        self.assertIn("rust/c / c/c [95% CI]", text)
        self.assertIn("noise c/c#2 / c/c", text)
        self.assertRegex(text, r"tput 3->4 64K +>= 1\.30 .* pass +clear")
        self.assertRegex(text, r"tput 4->3 64K .* not measured .* n/a")

    def test_plot(self):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.skipTest("no matplotlib in this python")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "b.png")
            bench.plot(fake_doc(), path)
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_json_round_trip(self):
        doc = fake_doc()
        again = json.loads(json.dumps(doc))
        self.assertEqual(bench.done_when(again), doc["done_when"])


class HostSender(unittest.TestCase):
    """host_send against a stand-in for the device's host bridge."""

    def bridge(self, path, refuse=0):
        """Accept connections; refuse the first `refuse` CONNECTs by
        closing, then answer OK, count the bytes until EOF and close."""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(4)
        got = {"lines": [], "bytes": 0}

        def serve():
            for i in range(refuse + 1):
                c, _ = srv.accept()
                with c:
                    got["lines"].append(bench.read_line(c))
                    if i < refuse:
                        continue
                    c.sendall(b"OK 1024\n")
                    while True:
                        d = c.recv(1 << 16)
                        if not d:
                            break
                        got["bytes"] += len(d)
            srv.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        return t, got

    def test_streams_all_bytes(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "host-3.vsock")
            t, got = self.bridge(path, refuse=2)
            sent, secs = bench.host_send(path, 2042, 1000003, 4096, 10)
            t.join(10)
            self.assertEqual(sent, 1000003)
            self.assertEqual(got["bytes"], 1000003)
            self.assertEqual(got["lines"], [b"CONNECT 2042"] * 3)
            self.assertGreaterEqual(secs, 0)

    def test_gives_up(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(bench.RunError):
                bench.host_send(os.path.join(d, "none"), 1, 10, 10, 1,
                                attempts=2)

    def test_thread_wrapper(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "host-3.vsock")
            t, got = self.bridge(path)
            s = bench.HostSender(path, 5, 70000, 65536, 10)
            s.start()
            self.assertEqual(s.wait(10), 0)
            self.assertIn("total bytes sent: 70000", s.output())
            self.assertRegex(s.output(), r"total time in tx loop: [\d.]+ sec")
            t.join(10)


if __name__ == "__main__":
    # The closing line tools/check.sh counts.
    r = unittest.main(exit=False, verbosity=1).result
    failed = len(r.failures) + len(r.errors)
    skipped = len(r.skipped)
    print(f"{r.testsRun - failed - skipped} passed, {failed} failed, "
          f"{skipped} skipped")
    sys.exit(1 if failed else 0)
