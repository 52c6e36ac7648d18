#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
# The vsock server of shared/seeds/002 ("vsock notes"), as written there
# apart from its CID and port: the first and second arguments, if given.

import socket
import sys

CID = int(sys.argv[1]) if len(sys.argv) > 1 else socket.VMADDR_CID_HOST
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 9999

s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((CID, PORT))
s.listen()
(conn, (remote_cid, remote_port)) = s.accept()

print(f"Connection opened by cid={remote_cid} port={remote_port}")

while True:
    buf = conn.recv(64)
    if not buf:
        break

    print(f"Received bytes: {buf}")
