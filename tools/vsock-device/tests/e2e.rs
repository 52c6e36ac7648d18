// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! End to end through the vhost-user protocol: the real per-guest daemon
//! threads, driven by a fake VMM (this file) that connects as QEMU does and
//! plays the virtio driver on shared memory with split virtqueues.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vsock_device::backend::{serve, VmBackend, VmConfig, F_SEQPACKET, INJECT_BURST};
use vsock_device::control::{self, Device};
use vsock_device::fault::{Counts, Hook, PassThrough, Scripted, StreamCounts, UsedKind};
use vsock_device::inject::{classify, craft, Class, ClassCounts, Kind, Target};
use vsock_device::packet::{
    op, Hdr, HDR_LEN, HOST_CID, SEQ_EOM, SEQ_EOR, TYPE_SEQPACKET, TYPE_STREAM,
};
use vsock_device::prng::SplitMix64;
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
    fe: Frontend,
}

impl Guest {
    /// Connect; `seqpacket` is whether the device must offer SEQPACKET.
    fn connect_with(sock: &PathBuf, nqueues: usize, tag: &str, seqpacket: bool) -> Guest {
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
        assert_eq!(features & F_SEQPACKET != 0, seqpacket);
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
            fe,
        }
    }

    /// The `guest_cid` the device's config space holds.
    fn config_cid(&mut self) -> u64 {
        let (_, payload) = self
            .fe
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
            .unwrap();
        u64::from_le_bytes(payload[..8].try_into().unwrap())
    }

    /// A whole rx buffer posted by [`Guest::post_rx`].
    fn read_buf(&self, first: u64, size: usize) -> Vec<u8> {
        let split = size / 3;
        let second = first + ((split as u64 + 63) & !63);
        let mut buf = vec![0u8; size];
        self.mem
            .read_slice(&mut buf[..split], GuestAddress(first))
            .unwrap();
        self.mem
            .read_slice(&mut buf[split..], GuestAddress(second))
            .unwrap();
        buf
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
        let mut buf = self.read_buf(first, size);
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
    control: PathBuf,
}

impl Setup {
    /// Connect a fake guest (3 or 4) and wait until the device sees its driver up.
    fn guest(&self, cid: u64, nqueues: usize, tag: &str) -> Guest {
        self.guest_with(cid, nqueues, tag, true)
    }

    fn guest_with(&self, cid: u64, nqueues: usize, tag: &str, seqpacket: bool) -> Guest {
        let sock = self.dir.join(format!("{cid}.sock"));
        let g = Guest::connect_with(&sock, nqueues, tag, seqpacket);
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
    start_with(name, queue_limit, false)
}

/// The same, with a control socket at `Setup::control` if `control`.
fn start_with(name: &str, queue_limit: usize, control: bool) -> Setup {
    let dir = std::env::temp_dir().join(format!("vsockdev-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ports: Vec<Arc<Port>> = [3u64, 4]
        .iter()
        .map(|&c| Arc::new(Port::new(c, queue_limit).unwrap()))
        .collect();
    let scripted = Arc::new(Scripted::new());
    let hook: Arc<dyn Hook> = if control {
        scripted.clone()
    } else {
        Arc::new(PassThrough)
    };
    let router = Arc::new(Router::new(ports.clone(), hook));
    let mut backends = Vec::new();
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
        backends.push(b.clone());
        std::thread::spawn(move || serve(b, listener));
    }
    let path = dir.join("control.sock");
    if control {
        let dev = Device::new(backends, router, scripted).unwrap();
        control::serve(&path, dev).unwrap();
    }
    Setup {
        dir,
        ports,
        control: path,
    }
}

/// A control socket client.
struct Ctl {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Ctl {
    fn connect(path: &Path) -> Ctl {
        let w = UnixStream::connect(path).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Ctl {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        }
    }

    /// Send one line, return the reply line.
    fn cmd(&mut self, line: &str) -> String {
        self.w.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        self.r.read_line(&mut reply).unwrap();
        assert!(reply.ends_with('\n'), "{line}: {reply:?}");
        reply.trim_end().to_string()
    }

    /// Send a line from another thread; join for the reply.
    fn spawn(path: &Path, line: &str) -> std::thread::JoinHandle<String> {
        let (path, line) = (path.to_path_buf(), line.to_string());
        std::thread::spawn(move || Ctl::connect(&path).cmd(&line))
    }

    /// Wait until guest `cid` has `n` fault jobs submitted and not
    /// finished: the guest's thread takes them before it next moves a
    /// packet.
    fn wait_jobs(&mut self, cid: u64, n: usize) {
        let t = Instant::now();
        let want = format!(" jobs={n}");
        loop {
            let st = self.cmd(&format!("status {cid}"));
            if st.ends_with(&want) {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{st}, want{want}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
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

/// The header at the start of a buffer.
fn hdr_of(buf: &[u8]) -> Option<Hdr> {
    Some(Hdr::from_bytes(buf.get(..HDR_LEN)?.try_into().ok()?))
}

/// Wait until guest `i`'s inbox holds `n` packets.
fn wait_queued(s: &Setup, i: usize, n: usize) {
    let t = Instant::now();
    while s.ports[i].inbox().len() < n {
        assert!(t.elapsed() < Duration::from_secs(10), "never queued");
        std::thread::sleep(Duration::from_millis(1));
    }
}

const T3: Target = Target {
    guest_cid: 3,
    sibling_cid: 4,
    seqpacket: true,
};

#[test]
fn inject_interleaves_with_healthy_traffic_and_counts_what_landed() {
    let s = start_with("inject", 4 << 20, true);
    let mut a = s.guest(3, 3, "inject-a");
    let mut b = s.guest(4, 2, "inject-b");
    let mut c = Ctl::connect(&s.control);
    assert_eq!(
        c.cmd("status 3"),
        "OK live=1 seqpacket=1 event_idx=1 guest_cid=3 rx_avail=0 jobs=0"
    );
    // Ten healthy packets wait for rx buffers, then ten crafted ones are
    // asked for: they share the buffers INJECT_BURST crafted to one healthy
    // while both wait, then the rest of the healthy ones.
    for i in 0..10u8 {
        let h = hdr((4, 1000), (3, 2000), TYPE_STREAM, op::RW, 0);
        b.send(h, &[i; 100], 44, 1);
    }
    wait_queued(&s, 0, 10);
    let job = Ctl::spawn(&s.control, "inject 3 payload_too_long 10 7");
    c.wait_jobs(3, 1);
    let rx = a.post_rx(20, RXSZ);
    assert_eq!(job.join().unwrap(), "OK injected=10 class=payload_too_long");
    let used = a.wait_used(0, 20);
    let burst = INJECT_BURST as usize;
    assert!((5..10).contains(&burst), "the schedule below needs 5-9");
    // Crafted: the first burst, then the rest right after healthy #0.
    let crafted = |i: usize| i < burst || (i > burst && i <= 10);
    let mut healthy = Vec::new();
    for (i, &(_, len)) in used.iter().enumerate() {
        let buf = a.read_buf(rx[i], RXSZ);
        let h = hdr_of(&buf);
        let class = classify(h.as_ref(), len, RXSZ as u64, &T3);
        if crafted(i) {
            assert_eq!(class, Some(Class::PayloadTooLong), "buffer {i}");
            assert!(h.unwrap().dst_port >= 0x8000_0000);
        } else {
            assert_eq!(class, None, "buffer {i} is healthy");
            assert_eq!(len as usize, HDR_LEN + 100);
            healthy.push(buf[HDR_LEN]);
        }
    }
    assert_eq!(healthy, (0..10).collect::<Vec<u8>>(), "healthy order kept");

    // Random headers: each classified, none valid, the same as crafted
    // here from the same seed.
    let rx = a.post_rx(40, RXSZ);
    let reply = c.cmd("inject 3 random 40 99");
    let used = a.wait_used(0, 40);
    let mut rng = SplitMix64::new(99);
    let mut landed = ClassCounts::default();
    for (i, &(_, len)) in used.iter().enumerate() {
        let want = craft(Kind::Random, &mut rng, i as u64, RXSZ as u64, &T3).unwrap();
        let buf = a.read_buf(rx[i], RXSZ);
        assert_eq!(len, want.used_len);
        assert_eq!(&buf[..want.bytes.len()], &want.bytes[..]);
        let class = classify(hdr_of(&buf).as_ref(), len, RXSZ as u64, &T3);
        assert_eq!(class, Some(want.class));
        landed.add(want.class);
    }
    assert_eq!(
        reply,
        format!("OK injected=40 class=random {}", landed.to_kv())
    );

    // Counts: exactly what landed, every key present.
    let mut want = Counts {
        rx: landed,
        ..Counts::default()
    };
    for _ in 0..10 {
        want.rx.add(Class::PayloadTooLong);
    }
    assert_eq!(
        c.cmd("counts 3"),
        format!("OK {}", want.to_kv(&StreamCounts::default()))
    );
    assert_eq!(c.cmd("reset-counts 3"), "OK");
    assert_eq!(
        c.cmd("counts 3"),
        format!("OK {}", Counts::default().to_kv(&StreamCounts::default()))
    );
    // What cannot be done is refused at once.
    assert_eq!(
        c.cmd("inject 3 type_not_negotiated 1 1"),
        "ERR seqpacket negotiated"
    );
    assert!(c
        .cmd("inject 9 short_buffer 1 1")
        .starts_with("ERR no guest with CID 9"));
    assert!(c
        .cmd("inject 3 nonsense 1 1")
        .starts_with("ERR unknown class"));
}

#[test]
fn events_reset_cid_routing_and_pending_events() {
    let s = start_with("events", 4 << 20, true);
    let mut c = Ctl::connect(&s.control);
    // Before any driver: kept, delivered once event buffers come.
    assert_eq!(c.cmd("event 3 reset"), "OK event=reset pending=1");
    let mut a = s.guest(3, 3, "events-a");
    let mut b = s.guest(4, 2, "events-b");
    let ev = a.post(2, &[(vec![0xff; 4], true)]);
    assert_eq!(a.wait_used(2, 1)[0].1, 4);
    assert_eq!(a.mem.read_obj::<u32>(GuestAddress(ev[0])).unwrap(), 0);

    // A new CID, then TRANSPORT_RESET: config and routing follow.
    let ev = a.post(2, &[(vec![0xff; 4], true)]);
    assert_eq!(c.cmd("event 3 reset_cid 7"), "OK event=reset_cid posted=1");
    assert_eq!(a.wait_used(2, 1)[0].1, 4);
    assert_eq!(a.mem.read_obj::<u32>(GuestAddress(ev[0])).unwrap(), 0);
    assert_eq!(a.config_cid(), 7);
    assert!(c.cmd("status 3").contains(" guest_cid=7 "));
    assert!(
        c.cmd("status 7").contains(" guest_cid=7 "),
        "the new CID names it too"
    );
    let a_rx = a.post_rx(4, RXSZ);
    let b_rx = b.post_rx(4, RXSZ);
    b.send(
        hdr((4, 1000), (7, 2000), TYPE_STREAM, op::REQUEST, 0),
        &[],
        44,
        1,
    );
    let u = a.wait_used(0, 1);
    let (rh, _) = a.read_rx(a_rx[0], RXSZ, u[0].1);
    assert_eq!((rh.op, rh.src_cid, rh.dst_cid), (op::REQUEST, 4, 7));
    a.send(rh.reply(op::RESPONSE), &[], 44, 1);
    let u = b.wait_used(0, 1);
    let (rh, _) = b.read_rx(b_rx[0], RXSZ, u[0].1);
    assert_eq!((rh.op, rh.src_cid, rh.dst_cid), (op::RESPONSE, 7, 4));
    // The old CID is nobody's now.
    b.send(
        hdr((4, 1001), (3, 2000), TYPE_STREAM, op::REQUEST, 0),
        &[],
        44,
        1,
    );
    let u = b.wait_used(0, 1);
    let (rh, _) = b.read_rx(b_rx[1], RXSZ, u[0].1);
    assert_eq!((rh.op, rh.src_cid), (op::RST, 3));

    // Driver up but no event buffer: pending, delivered when one comes.
    assert_eq!(c.cmd("event 3 unknown 9"), "OK event=unknown pending=1");
    let ev = a.post(2, &[(vec![0xff; 4], true)]);
    assert_eq!(a.wait_used(2, 1)[0].1, 4);
    assert_eq!(a.mem.read_obj::<u32>(GuestAddress(ev[0])).unwrap(), 9);
    a.post(2, &[(vec![0xff; 4], true)]);
    assert_eq!(c.cmd("event 3 short"), "OK event=short posted=1");
    assert!(a.wait_used(2, 1)[0].1 < 4);
    // A storm waits for buffers as they come.
    for _ in 0..2 {
        a.post(2, &[(vec![0xff; 4], true)]);
    }
    let storm = Ctl::spawn(&s.control, "event 3 storm 4");
    assert_eq!(a.wait_used(2, 2).len(), 2);
    for _ in 0..2 {
        a.post(2, &[(vec![0xff; 4], true)]);
    }
    assert_eq!(storm.join().unwrap(), "OK event=storm posted=4");
    assert!(a.wait_used(2, 2).iter().all(|u| u.1 == 4));
    let counts = c.cmd("counts 3");
    for kv in [
        "events_reset=6",
        "events_unknown=1",
        "events_short=1",
        "short_buffer=0",
    ] {
        assert!(counts.split(' ').any(|x| x == kv), "{kv} in {counts}");
    }

    // Config space alone, any value.
    assert_eq!(
        c.cmd("config 3 guest_cid 0x100000003"),
        "OK guest_cid=4294967299"
    );
    assert_eq!(a.config_cid(), (1 << 32) | 3);
    assert_eq!(c.cmd("config 3 guest_cid 3"), "OK guest_cid=3");
    assert_eq!(a.config_cid(), 3);
}

#[test]
fn used_ring_abuse_hold_stream_faults_and_features() {
    let s = start_with("used", 4 << 20, true);
    let mut c = Ctl::connect(&s.control);
    // SEQPACKET withdrawn before guest 4 connects.
    assert_eq!(c.cmd("features 4 seqpacket off"), "OK seqpacket=off");
    let mut a = s.guest(3, 3, "used-a");
    let mut b = s.guest_with(4, 2, "used-b", false);
    assert!(c.cmd("status 4").contains(" seqpacket=0 "));
    let b_rx = b.post_rx(2, RXSZ);
    assert_eq!(
        c.cmd("inject 4 type_not_negotiated 2 5"),
        "OK injected=2 class=type_not_negotiated"
    );
    let t4 = Target {
        guest_cid: 4,
        sibling_cid: 3,
        seqpacket: false,
    };
    for (i, &(_, len)) in b.wait_used(0, 2).iter().enumerate() {
        let buf = b.read_buf(b_rx[i], RXSZ);
        assert_eq!(
            classify(hdr_of(&buf).as_ref(), len, RXSZ as u64, &t4),
            Some(Class::TypeNotNegotiated)
        );
    }

    // Hold: packets wait, even with buffers posted, until released.
    assert_eq!(c.cmd("hold 3 on"), "OK hold=on");
    for i in 0..3u8 {
        b.send(
            hdr((4, 1000), (3, 2000), TYPE_STREAM, op::RW, 0),
            &[i; 10],
            44,
            1,
        );
    }
    wait_queued(&s, 0, 3);
    let rx = a.post_rx(3, RXSZ);
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.used(0).is_empty());
    assert!(c.cmd("status 3").ends_with(" rx_avail=3 jobs=0"));
    assert_eq!(c.cmd("hold 3 off"), "OK hold=off released=3");
    let u = a.wait_used(0, 3);
    for (i, &(_, len)) in u.iter().enumerate() {
        assert_eq!(a.read_rx(rx[i], RXSZ, len).1, vec![i as u8; 10]);
    }

    // Stream faults on one port only.
    assert_eq!(
        c.cmd("stream 3 2000 drop 100 1"),
        "OK stream=drop port=2000 prob=100"
    );
    for port in [2000, 2000, 2001] {
        b.send(
            hdr((4, 1000), (3, port), TYPE_STREAM, op::RW, 0),
            &[1],
            44,
            1,
        );
    }
    let rx = a.post_rx(3, RXSZ);
    let u = a.wait_used(0, 1);
    assert_eq!(a.read_rx(rx[0], RXSZ, u[0].1).0.dst_port, 2001);
    std::thread::sleep(Duration::from_millis(50));
    assert!(a.used(0).is_empty());
    assert_eq!(
        c.cmd("stream 3 2000 off"),
        "OK stream=off port=2000 drop=2 dup=0 reorder=0 delay=0"
    );
    assert!(c
        .cmd("stream 3 2000 off")
        .starts_with("ERR no stream fault"));

    // Used-ring abuse on rx: out of range, returned before, never posted.
    assert_eq!(c.cmd("used 3 bad_id 1"), "OK used=bad_id count=1");
    assert_eq!(a.wait_used(0, 1), vec![(u32::from(QSIZE), 0)]);
    assert_eq!(c.cmd("used 3 dup_id 1"), "OK used=dup_id count=1");
    let (dup, _) = a.wait_used(0, 1)[0];
    assert!(dup < 2 * 6, "an id returned before: {dup}");
    // Heads 0..=10 were posted two descriptors each; the chains at 8 and
    // 10 are still available. Any other id is free in the driver.
    assert_eq!(
        c.cmd("used 3 never_posted 1"),
        "OK used=never_posted count=1"
    );
    let (never, _) = a.wait_used(0, 1)[0];
    assert!(
        never < u32::from(QSIZE) && ![8, 10, dup].contains(&never),
        "an id not available: {never}"
    );
    // A large used length for the next tx chain.
    let job = Ctl::spawn(&s.control, "used 3 tx_len 1");
    c.wait_jobs(3, 1);
    a.send(
        hdr((3, 2000), (4, 1000), TYPE_STREAM, op::RW, 0),
        &[0; 100],
        44,
        1,
    );
    assert_eq!(job.join().unwrap(), "OK used=tx_len count=1");
    let (_, len) = a.wait_used(1, 1)[0];
    assert_eq!(len as usize, HDR_LEN + 100 + 4096);
    let counts = c.cmd("counts 3");
    for k in UsedKind::ALL {
        let kv = format!("used_{}=1", k.name());
        assert!(counts.split(' ').any(|x| x == kv), "{kv} in {counts}");
    }
    assert!(counts.ends_with(" stream_drop=2 stream_dup=0 stream_reorder=0 stream_delay=0"));
}
