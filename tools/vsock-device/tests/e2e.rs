// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! End to end through the vhost-user protocol: the real per-guest daemon
//! threads, driven by a fake VMM (this file) that connects as QEMU does and
//! plays the virtio driver on shared memory with split virtqueues.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vsock_device::backend::{serve, VmBackend, VmConfig, F_SEQPACKET};
use vsock_device::fault::PassThrough;
use vsock_device::packet::{
    op, Hdr, HDR_LEN, HOST_CID, SEQ_EOM, SEQ_EOR, TYPE_SEQPACKET, TYPE_STREAM,
};
use vsock_device::router::{Control, Port, Router};

const MEM_SIZE: usize = 8 << 20;
const QSIZE: u16 = 256;
const DATA_START: u64 = 1 << 20;

/// One virtqueue, driver side.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// A fake guest: its memory, rings and vhost-user connection.
struct Guest {
    mem: GuestMemoryMmap,
    _file: File,
    rings: Vec<Ring>,
    bump: u64,
    _fe: Frontend,
}

impl Guest {
    fn connect(sock: &PathBuf, nqueues: usize, tag: &str) -> Guest {
        let path =
            std::env::temp_dir().join(format!("vsockdev-e2e-mem-{}-{tag}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(MEM_SIZE as u64).unwrap();
        let fd = file.as_raw_fd();
        let fo = FileOffset::new(file.try_clone().unwrap(), 0);
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM_SIZE, Some(fo))])
            .unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;

        let mut fe = Frontend::connect(sock, 3).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_ne!(features & F_SEQPACKET, 0);
        let pf = fe.get_protocol_features().unwrap();
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG));
        fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
            .unwrap();
        fe.set_features(features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: fd,
        };
        fe.set_mem_table(&[region]).unwrap();
        let mut rings = Vec::new();
        for q in 0..nqueues {
            let base = 0x10000 * q as u64;
            let r = Ring {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
                kick: EventFd::new(0).unwrap(),
                call: EventFd::new(0).unwrap(),
            };
            fe.set_vring_num(q, QSIZE).unwrap();
            let cfg = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + r.desc,
                used_ring_addr: host + r.used,
                avail_ring_addr: host + r.avail,
                log_addr: None,
            };
            fe.set_vring_addr(q, &cfg).unwrap();
            fe.set_vring_base(q, 0).unwrap();
            fe.set_vring_call(q, &r.call).unwrap();
            fe.set_vring_kick(q, &r.kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            rings.push(r);
        }
        Guest {
            mem,
            _file: file,
            rings,
            bump: DATA_START,
            _fe: fe,
        }
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let a = self.bump;
        self.bump += (len as u64 + 63) & !63;
        assert!(self.bump < MEM_SIZE as u64);
        a
    }

    /// Post a chain of (data, writable) buffers on queue `q` and kick.
    fn post(&mut self, q: usize, bufs: &[(Vec<u8>, bool)]) -> Vec<u64> {
        let mut addrs = Vec::new();
        for (data, _) in bufs {
            let a = self.alloc(data.len());
            self.mem.write_slice(data, GuestAddress(a)).unwrap();
            addrs.push(a);
        }
        let r = &mut self.rings[q];
        let head = r.next_desc;
        for (i, (data, w)) in bufs.iter().enumerate() {
            let idx = r.next_desc;
            assert!(idx < QSIZE, "test ran out of descriptors");
            r.next_desc += 1;
            let last = i + 1 == bufs.len();
            let flags: u16 = if last { 0 } else { 1 } | if *w { 2 } else { 0 };
            let d = r.desc + 16 * u64::from(idx);
            self.mem.write_obj(addrs[i], GuestAddress(d)).unwrap();
            self.mem
                .write_obj(data.len() as u32, GuestAddress(d + 8))
                .unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(idx + 1, GuestAddress(d + 14)).unwrap();
        }
        let slot = r.avail + 4 + 2 * u64::from(r.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        r.avail_idx = r.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(r.avail_idx, GuestAddress(r.avail + 2))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        r.kick.write(1).unwrap();
        addrs
    }

    /// Used entries not seen yet: (head, len).
    fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let r = &mut self.rings[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(r.used + 2)).unwrap();
        let mut v = Vec::new();
        while r.last_used != idx {
            let e = r.used + 4 + 8 * u64::from(r.last_used % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            v.push((id, len));
            r.last_used = r.last_used.wrapping_add(1);
        }
        v
    }

    /// Wait until `n` more used entries show up on queue `q`.
    fn wait_used(&mut self, q: usize, n: usize) -> Vec<(u32, u32)> {
        let t = Instant::now();
        let mut v = Vec::new();
        while v.len() < n {
            v.extend(self.used(q));
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "timeout: {} of {n} used",
                v.len()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        v
    }

    /// Post `n` rx buffers of `size` bytes, each as two descriptors.
    fn post_rx(&mut self, n: usize, size: usize) -> Vec<u64> {
        let split = size / 3;
        (0..n)
            .map(|_| {
                let a = self.post(0, &[(vec![0; split], true), (vec![0; size - split], true)]);
                assert_eq!(a[1], a[0] + ((split as u64 + 63) & !63));
                a[0]
            })
            .collect()
    }

    /// Read back a received buffer (contiguous in our allocator only if the
    /// two pieces are, so read them piecewise).
    fn read_rx(&self, first: u64, size: usize, len: u32) -> (Hdr, Vec<u8>) {
        let split = size / 3;
        let second = first + ((split as u64 + 63) & !63);
        let mut buf = vec![0u8; size];
        self.mem
            .read_slice(&mut buf[..split], GuestAddress(first))
            .unwrap();
        self.mem
            .read_slice(&mut buf[split..], GuestAddress(second))
            .unwrap();
        buf.truncate(len as usize);
        let mut hb = [0u8; HDR_LEN];
        hb.copy_from_slice(&buf[..HDR_LEN]);
        (Hdr::from_bytes(&hb), buf[HDR_LEN..].to_vec())
    }

    /// Transmit a packet as a chain: header cut at `cut`, payload in `n` pieces.
    fn send(&mut self, h: Hdr, payload: &[u8], cut: usize, n: usize) {
        let h = Hdr {
            len: payload.len() as u32,
            ..h
        };
        let hb = h.to_bytes();
        let mut bufs = vec![(hb[..cut].to_vec(), false), (hb[cut..].to_vec(), false)];
        if !payload.is_empty() {
            for c in payload.chunks(payload.len().div_ceil(n)) {
                bufs.push((c.to_vec(), false));
            }
        }
        self.post(1, &bufs);
    }
}

struct Setup {
    dir: PathBuf,
    ports: Vec<Arc<Port>>,
}

impl Setup {
    /// Connect a fake guest (3 or 4) and wait until the device sees its driver up.
    fn guest(&self, cid: u64, nqueues: usize, tag: &str) -> Guest {
        let g = Guest::connect(&self.dir.join(format!("{cid}.sock")), nqueues, tag);
        let t = Instant::now();
        while !self.ports[cid as usize - 3].inbox().is_live() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "guest {cid} never up"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        g
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Start the device for guests 3 and 4 (in-process threads).
fn start(name: &str, queue_limit: usize) -> Setup {
    let dir = std::env::temp_dir().join(format!("vsockdev-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ports: Vec<Arc<Port>> = [3u64, 4]
        .iter()
        .map(|&c| Arc::new(Port::new(c, queue_limit).unwrap()))
        .collect();
    let router = Arc::new(Router::new(ports.clone(), Arc::new(PassThrough)));
    for cid in [3u64, 4] {
        let cfg = VmConfig {
            cid,
            socket: dir.join(format!("{cid}.sock")),
            uds_path: Some(dir.join(format!("{cid}.vsock"))),
            buf_alloc: 65536,
            queue_size: 1024,
        };
        let listener = Listener::new(&cfg.socket, true).unwrap();
        let b = Arc::new(VmBackend::new(cfg, router.clone()).unwrap());
        std::thread::spawn(move || serve(b, listener));
    }
    Setup { dir, ports }
}

fn hdr(src: (u64, u32), dst: (u64, u32), type_: u16, op: u16, flags: u32) -> Hdr {
    Hdr {
        src_cid: src.0,
        src_port: src.1,
        dst_cid: dst.0,
        dst_port: dst.1,
        type_,
        op,
        flags,
        buf_alloc: 65536,
        ..Hdr::default()
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

const RXSZ: usize = 3776; // what Linux 6.12 posts: SKB_WITH_OVERHEAD(4096)

#[test]
fn sibling_seqpacket_split_long_tx_chain_and_rst() {
    let s = start("split", 4 << 20);
    let mut a = s.guest(3, 2, "split-a");
    let mut b = s.guest(4, 2, "split-b");
    let b_rx = b.post_rx(4, RXSZ);
    let a_rx = a.post_rx(2, RXSZ);

    // 10000 bytes over a 7-descriptor tx chain with the header split.
    let payload = pattern(10_000);
    let h = hdr(
        (3, 1000),
        (4, 2000),
        TYPE_SEQPACKET,
        op::RW,
        SEQ_EOM | SEQ_EOR,
    );
    a.send(h, &payload, 20, 5);
    assert_eq!(a.wait_used(1, 1), vec![(0, 0)]);
    let used = b.wait_used(0, 3);
    let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
    assert_eq!(lens, vec![3776, 3776, (HDR_LEN + 10_000 - 2 * 3732) as u32]);
    let mut got = Vec::new();
    for (i, &(_, len)) in used.iter().enumerate() {
        let (rh, data) = b.read_rx(b_rx[i], RXSZ, len);
        assert_eq!(rh.len as usize, data.len());
        let want_flags = if i == 2 { SEQ_EOM | SEQ_EOR } else { 0 };
        assert_eq!(rh.flags, want_flags, "fragment {i}");
        assert_eq!((rh.src_cid, rh.dst_cid, rh.op), (3, 4, op::RW));
        got.extend(data);
    }
    assert_eq!(got, payload);

    // Request to a CID nobody has: RST back to the sender.
    a.send(
        hdr((3, 1001), (99, 5), TYPE_STREAM, op::REQUEST, 0),
        &[],
        44 - 4,
        1,
    );
    let used = a.wait_used(0, 1);
    let (rh, _) = a.read_rx(a_rx[0], RXSZ, used[0].1);
    assert_eq!(
        (rh.op, rh.src_cid, rh.dst_cid, rh.dst_port),
        (op::RST, 99, 3, 1001)
    );

    // Spoofed source: dropped, descriptor still returned.
    a.send(
        hdr((4, 1), (4, 2000), TYPE_STREAM, op::REQUEST, 0),
        &[],
        10,
        1,
    );
    // Malformed (len beyond the chain): dropped, descriptor still returned.
    let mut bad = hdr((3, 1), (4, 2000), TYPE_STREAM, op::RW, 0);
    bad.len = 5000;
    a.post(
        1,
        &[(bad.to_bytes().to_vec(), false), (vec![0; 100], false)],
    );
    assert_eq!(a.wait_used(1, 3).len(), 3);
    std::thread::sleep(Duration::from_millis(50));
    assert!(b.used(0).is_empty());
}

#[test]
fn back_pressure_pauses_sender_until_receiver_posts_buffers() {
    let limit = 16 << 10;
    let s = start("bp", limit);
    let mut a = s.guest(3, 2, "bp-a");
    let mut b = s.guest(4, 2, "bp-b");
    let total = 40;
    for i in 0..total {
        let h = hdr((3, 1000), (4, 2000), TYPE_STREAM, op::RW, 0);
        a.send(h, &vec![i as u8; 1000], 44, 1);
    }
    // 16 packets of 1044 bytes reach the 16 KiB bound; the sender pauses.
    let first = a.wait_used(1, 16);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        first.len() + a.used(1).len(),
        16,
        "sender must pause at the bound"
    );
    // The receiver posts buffers: everything arrives, in order.
    let rx = b.post_rx(total, 2048);
    let used = b.wait_used(0, total);
    for (i, &(_, len)) in used.iter().enumerate() {
        let (rh, data) = b.read_rx(rx[i], 2048, len);
        assert_eq!(rh.len, 1000);
        assert!(
            data.iter().all(|&x| x == i as u8),
            "packet {i} out of order"
        );
    }
    assert_eq!(a.wait_used(1, total - 16).len(), total - 16);
}

#[test]
fn host_bridge_both_directions_and_transport_reset() {
    let s = start("bridge", 4 << 20);
    let mut a = s.guest(3, 3, "bridge-a");
    let rx = a.post_rx(8, RXSZ);

    // Guest -> host port 1234.
    let l = UnixListener::bind(s.dir.join("3.vsock_1234")).unwrap();
    a.send(
        hdr((3, 5000), (HOST_CID, 1234), TYPE_STREAM, op::REQUEST, 0),
        &[],
        30,
        1,
    );
    let u = a.wait_used(0, 1);
    let (rh, _) = a.read_rx(rx[0], RXSZ, u[0].1);
    assert_eq!(
        (rh.op, rh.src_cid, rh.src_port, rh.dst_port),
        (op::RESPONSE, 2, 1234, 5000)
    );
    let (mut host, _) = l.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    a.send(
        hdr((3, 5000), (HOST_CID, 1234), TYPE_STREAM, op::RW, 0),
        b"to host",
        44,
        1,
    );
    let mut buf = [0u8; 7];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to host");
    // 5000 bytes from the host: split over two rx buffers.
    host.write_all(&pattern(5000)).unwrap();
    let u = a.wait_used(0, 2);
    let (h1, d1) = a.read_rx(rx[1], RXSZ, u[0].1);
    let (_, d2) = a.read_rx(rx[2], RXSZ, u[1].1);
    assert_eq!((h1.op, h1.src_cid), (op::RW, 2));
    assert_eq!([d1, d2].concat(), pattern(5000));

    // Host -> guest port 6000.
    let mut c = UnixStream::connect(s.dir.join("3.vsock")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"CONNECT 6000\n").unwrap();
    let u = a.wait_used(0, 1);
    let (req, _) = a.read_rx(rx[3], RXSZ, u[0].1);
    assert_eq!(
        (req.op, req.src_cid, req.src_port, req.dst_port),
        (op::REQUEST, 2, 1024, 6000)
    );
    a.send(req.reply(op::RESPONSE), &[], 44, 1);
    let mut line = [0u8; 8];
    c.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"OK 1024\n");

    // TRANSPORT_RESET on the event queue (when the frontend hands it over).
    let ev = a.post(2, &[(vec![0xff; 4], true)]);
    s.ports[0].request(Control::TransportReset);
    assert_eq!(a.wait_used(2, 1)[0].1, 4);
    let id: u32 = a.mem.read_obj(GuestAddress(ev[0])).unwrap();
    assert_eq!(id, 0);
    // Host connections were dropped with it.
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty());
}
