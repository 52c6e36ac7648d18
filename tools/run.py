#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""The main job: two sibling guests with a vsock transport, shown at work.

Boots guests 3 and 4 on the vsock device with the chosen transport loaded,
then shows: the module loaded in each guest, the CID each guest reads, an
echo over SOCK_STREAM and over SOCK_SEQPACKET between the guests, an echo
between the host and a guest through the device's Unix socket (both ways),
and the driver's counters. With --shell it boots one guest and hands over
its console instead.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vmtest  # noqa: E402
from vmtest import RunError, log  # noqa: E402

PORT = 1234


def step(title):
    log(f"\n--- {title}")


def show(guest, cmd, timeout=60):
    rc, out = guest.sh(cmd, timeout)
    for line in out.strip().splitlines():
        log(f"  guest {guest.cid}: {line}")
    if rc != 0:
        raise RunError(f"guest {guest.cid}: '{cmd}' failed (status {rc})")
    return out


def echo_between(bed, server, client, kind):
    srv = bed.guest(server).run(
        f"vsock-echo server --type {kind} --port {PORT} --count 1")
    if not srv.wait_line(r"listening", 30):
        raise RunError(f"echo server in guest {server}: {srv.output()}")
    show(bed.guest(client),
         f"vsock-echo client --type {kind} --cid {server} --port {PORT} "
         "--count 10 --size 4096")
    if srv.wait(20) != 0:
        raise RunError(f"echo server in guest {server}: {srv.output()}")


def host_to_guest(bed, workdir, cid):
    """Host connects through the device's Unix socket to a guest server."""
    g = bed.guest(cid)
    srv = g.run(f"vsock-echo server --port {PORT} --count 1")
    if not srv.wait_line(r"listening", 30):
        raise RunError(f"echo server in guest {cid}: {srv.output()}")
    path = os.path.join(workdir, f"host-{cid}.vsock")
    msg = b"hello from the host over AF_VSOCK\n" * 8
    for attempt in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(path)
            s.sendall(f"CONNECT {PORT}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(1)
                if not chunk:
                    raise ConnectionError("closed before OK")
                reply += chunk
            if not reply.startswith(b"OK"):
                raise ConnectionError(reply.decode().strip())
            break
        except (OSError, ConnectionError) as e:
            s.close()
            if attempt == 19:
                raise RunError(f"host -> guest {cid}: {e}")
            time.sleep(0.5)
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    if got != msg:
        raise RunError(f"host -> guest {cid}: echo differs "
                       f"({len(got)} of {len(msg)} bytes)")
    log(f"  host: echo ok through {path} ({reply.decode().strip()}): "
        f"{len(msg)} bytes")
    srv.wait(10)


def guest_to_host(bed, workdir, cid):
    """A guest client connects to CID 2; the device hands it to a host socket."""
    path = os.path.join(workdir, f"host-{cid}.vsock_{PORT + 1}")
    if os.path.exists(path):
        os.unlink(path)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    lsock.settimeout(60)

    def serve():
        try:
            conn, _ = lsock.accept()
            conn.settimeout(30)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    show(bed.guest(cid), f"vsock-echo client --cid 2 --port {PORT + 1} "
         "--count 10 --size 1024")
    t.join(10)
    lsock.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--driver", default="rust", choices=sorted(vmtest.DRIVERS))
    p.add_argument("--kernel", default="debug")
    p.add_argument("--shell", action="store_true",
                   help="boot one guest and give its console")
    p.add_argument("--workdir")
    vmtest.add_front_args(p)
    a = p.parse_args()
    args = vmtest.parse_args([
        "--driver", a.driver, "--peer", a.driver, "--kernel", a.kernel,
    ] + (["--workdir", a.workdir] if a.workdir else [])
        + vmtest.front_argv(a))
    if a.shell:
        sock = os.path.join(args.workdir, "vhost-3.sock")
        uds = os.path.join(args.workdir, "host-3.vsock")
        dev = subprocess.Popen([args.device, "--vm",
                                f"guest-cid=3,socket={sock},uds-path={uds}"])
        while not os.path.exists(sock) and dev.poll() is None:
            time.sleep(0.05)
        log(f"guest 3 with the '{a.driver}' transport; host side of its "
            f"vsock: {uds}; 'poweroff -f' or Ctrl-A X leaves")
        rc = subprocess.call(vmtest.shell_cmd(args, a.driver, sock))
        dev.terminate()
        sys.exit(rc)

    bed = vmtest.Bed(args, args.workdir)
    try:
        step(f"booting guests 3 and 4 with the '{a.driver}' transport on "
             f"the {args.front} front")
        t0 = time.monotonic()
        bed.start({3: a.driver, 4: a.driver})
        log(f"  up in {time.monotonic() - t0:.0f} s; logs in {args.workdir}")
        module = vmtest.DRIVERS[a.driver]
        step("module loaded, and the CID each guest reads")
        for cid in (3, 4):
            g = bed.guest(cid)
            show(g, f"grep -w {module} /proc/modules | cut -d' ' -f1-3")
            show(g, "echo \"local CID: $(vsock-echo cid)\"")
        step("echo between the guests over SOCK_STREAM (4 -> 3)")
        echo_between(bed, 3, 4, "stream")
        step("echo between the guests over SOCK_SEQPACKET (3 -> 4)")
        echo_between(bed, 4, 3, "seqpacket")
        step("host -> guest 3 through the device's Unix socket")
        host_to_guest(bed, args.workdir, 3)
        step("guest 4 -> host (CID 2) through the device's Unix socket")
        guest_to_host(bed, args.workdir, 4)
        step("driver counters")
        for cid in (3, 4):
            show(bed.guest(cid), vmtest.COUNTERS_CMD)
        bad = bed.kernel_problems()
        if bad:
            raise RunError("kernel log: " + bad[0])
        log("\nrun ok")
    except RunError as e:
        log(f"\nrun FAILED: {e}")
        sys.exit(1)
    finally:
        bed.stop()


if __name__ == "__main__":
    main()
