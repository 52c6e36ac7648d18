// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! vhost-user glue: one [`VmBackend`] per guest, served by its own
//! `VhostUserDaemon` (one vring worker thread per guest; the vhost-user
//! request handling runs on a second thread).
//!
//! The worker thread wakes on the guest's rx/tx/event kicks, on the guest's
//! [`Port`] eventfd (a sibling queued packets for it, or an inbox it was
//! waiting on drained) and on the host bridge's epoll fd, and then runs
//! [`VmState::pump`]: tx queue -> router, bridge sockets, inbox -> rx queue,
//! until nothing moves. Guest errors are logged, never returned: an `Err`
//! from `handle_event` would stop the worker thread.
//!
//! Adapted in spirit from vhost-device-vsock (rust-vmm, Apache-2.0 OR
//! BSD-3-Clause): daemon-per-VM loop, sibling wakeup through eventfds,
//! extra listeners registered on the epoll handler.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::bridge::Bridge;
use crate::packet::{
    self, deliver, gather, write_fragment, GatherError, InFlight, Packet, ReadSeg, RxStep,
    WriteSeg, EVENT_TRANSPORT_RESET, HOST_CID,
};
use crate::router::{lock, reject, Control, Port, Route, Router, Sent};
use crate::{debug, info};

type Gm = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// `VIRTIO_F_NOTIFY_ON_EMPTY`.
const F_NOTIFY_ON_EMPTY: u64 = 1 << 24;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
const F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
const F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_VERSION_1`.
const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_VSOCK_F_SEQPACKET`.
pub const F_SEQPACKET: u64 = 1 << 1;

const RX: usize = 0;
const TX: usize = 1;
const EVQ: usize = 2;
const NUM_QUEUES: usize = 3;
/// Device event: the guest's port eventfd.
const WAKE_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Device event: the bridge's epoll fd.
const BRIDGE_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// Pump rounds per event before yielding to the epoll loop.
const MAX_ROUNDS: usize = 64;
/// Tx chains per round.
const TX_BATCH: usize = 256;

/// Configuration of one guest.
#[derive(Clone, Debug, PartialEq)]
pub struct VmConfig {
    /// The guest's CID (config space `guest_cid`).
    pub cid: u64,
    /// vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    /// Host bridge socket path (`None`: no host side, connections refused).
    pub uds_path: Option<PathBuf>,
    /// `buf_alloc` the bridge advertises per connection.
    pub buf_alloc: u32,
    /// Largest virtqueue size accepted.
    pub queue_size: usize,
}

/// A guest memory piece of a descriptor chain.
struct GSeg<'a> {
    mem: &'a GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
}

impl GSeg<'_> {
    fn at(&self, off: usize) -> Option<GuestAddress> {
        self.addr.checked_add(off as u64)
    }
}

impl ReadSeg for GSeg<'_> {
    fn seg_len(&self) -> usize {
        self.len
    }
    fn read_at(&self, off: usize, buf: &mut [u8]) -> bool {
        self.at(off)
            .is_some_and(|a| self.mem.read_slice(buf, a).is_ok())
    }
}

impl WriteSeg for GSeg<'_> {
    fn seg_len(&self) -> usize {
        self.len
    }
    fn write_at(&mut self, off: usize, data: &[u8]) -> bool {
        self.at(off)
            .is_some_and(|a| self.mem.write_slice(data, a).is_ok())
    }
}

/// Pop a chain and split it into device-writable segments. None: queue
/// empty. Some((head, Err)): chain has device-readable descriptors.
fn pop_writable<'a>(
    vring: &VringRwLock,
    guard: &'a MemGuard,
) -> Option<(u16, Result<Vec<GSeg<'a>>, ()>)> {
    let chain = vring
        .get_mut()
        .get_queue_mut()
        .pop_descriptor_chain(guard.clone())?;
    let head = chain.head_index();
    let mut segs = Vec::new();
    for d in chain {
        if !d.is_write_only() {
            return Some((head, Err(())));
        }
        segs.push(GSeg {
            mem: guard,
            addr: d.addr(),
            len: d.len() as usize,
        });
    }
    Some((head, Ok(segs)))
}

/// Signal the used ring, respecting EVENT_IDX.
fn signal(v: &VringRwLock, event_idx: bool) {
    let needed = !event_idx || v.needs_notification().unwrap_or(true);
    if needed {
        if let Err(e) = v.signal_used_queue() {
            info!("signalling used queue: {e}");
        }
    }
}

/// Per-guest state, owned by the guest's worker thread (and touched by the
/// vhost-user request thread on memory updates and stops).
pub struct VmState {
    mem: Option<Gm>,
    event_idx: bool,
    bridge: Bridge,
    /// A packet partly written to the rx queue.
    inflight: Option<InFlight>,
    /// Tx paused until this guest's inbox drains.
    blocked_on: Option<u64>,
    evq: Option<VringRwLock>,
    controls: Vec<Control>,
}

/// The vhost-user backend of one guest.
pub struct VmBackend {
    cfg: VmConfig,
    port: Arc<Port>,
    router: Arc<Router>,
    state: Mutex<VmState>,
}

impl VmBackend {
    /// Backend for `cfg.cid`, whose port must be known to `router`. Binds
    /// the host bridge socket.
    pub fn new(cfg: VmConfig, router: Arc<Router>) -> io::Result<Self> {
        let port = router
            .port(cfg.cid)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("cid {} not routed", cfg.cid)))?;
        let bridge = Bridge::new(cfg.cid, cfg.uds_path.clone(), cfg.buf_alloc)?;
        Ok(VmBackend {
            cfg,
            port,
            router,
            state: Mutex::new(VmState {
                mem: None,
                event_idx: false,
                bridge,
                inflight: None,
                blocked_on: None,
                evq: None,
                controls: Vec::new(),
            }),
        })
    }

    /// The guest's port (e.g. to [`Port::request`] a transport reset).
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    /// The driver stopped or the VMM went away: drop queued packets, the
    /// partly written one and the host connections; release waiting senders.
    fn go_down(&self, why: &str) {
        let mut st = lock(&self.state);
        st.set_live(self, false, why);
        st.blocked_on = None;
        st.evq = None;
    }
}

impl VhostUserBackend for VmBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        F_VERSION_1
            | F_SEQPACKET
            | F_EVENT_IDX
            | F_NOTIFY_ON_EMPTY
            | F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        info!(
            "cid {}: features acked {features:#x} (seqpacket {}, event_idx {})",
            self.cfg.cid,
            features & F_SEQPACKET != 0,
            features & F_EVENT_IDX != 0
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&self) {
        self.go_down("device reset");
    }

    fn set_event_idx(&self, enabled: bool) {
        lock(&self.state).event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.cfg.cid.to_le_bytes();
        let o = offset as usize;
        cfg.get(o..o.saturating_add(size as usize))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn update_memory(&self, mem: Gm) -> io::Result<()> {
        lock(&self.state).mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << NUM_QUEUES) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, index: u32) -> io::Result<()> {
        if index as usize == RX || index as usize == TX {
            self.go_down("vring stopped");
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if device_event == WAKE_EVENT {
            self.port.clear_wake();
        }
        lock(&self.state).pump(self, vrings);
        Ok(())
    }
}

impl VmState {
    fn set_live(&mut self, vm: &VmBackend, live: bool, why: &str) {
        let mut ib = vm.port.inbox();
        if ib.is_live() == live {
            return;
        }
        let waiters = ib.set_live(live);
        drop(ib);
        vm.router.wake(&waiters);
        self.bridge.set_live(live);
        self.inflight = None;
        let s = if live { "up" } else { "down" };
        info!("cid {}: guest driver {s} ({why})", vm.cfg.cid);
    }

    /// Move everything that can move, until nothing does.
    fn pump(&mut self, vm: &VmBackend, vrings: &[VringRwLock]) {
        let (Some(rx), Some(tx)) = (vrings.get(RX), vrings.get(TX)) else {
            return;
        };
        if self.evq.is_none() {
            self.evq = vrings.get(EVQ).cloned();
        }
        let ready = self.mem.is_some() && {
            let r = rx.get_ref();
            r.get_queue().ready() && r.is_enabled()
        };
        self.set_live(vm, ready, "rx queue ready");
        let mut out = Vec::new();
        for round in 0.. {
            if round == MAX_ROUNDS {
                vm.port.wake(); // let other events in, continue afterwards
                break;
            }
            let mut progress = self.controls(vm);
            progress |= self.process_tx(vm, tx);
            let room = !vm.port.inbox().is_full();
            progress |= self.bridge.poll(room, &mut out);
            self.queue_host_packets(vm, &mut out);
            progress |= self.process_rx(vm, rx);
            if !progress {
                break;
            }
        }
        let room = !vm.port.inbox().is_full();
        self.bridge.refresh(room);
    }

    /// Queue packets from the host bridge for the guest.
    fn queue_host_packets(&mut self, vm: &VmBackend, out: &mut Vec<Packet>) {
        for p in out.drain(..) {
            debug!("cid {}: host {}", vm.cfg.cid, p.hdr);
            if let Sent::Queued { full: true } =
                vm.router.to_guest(HOST_CID, vm.cfg.cid, &vm.port, p)
            {
                self.blocked_on.get_or_insert(vm.cfg.cid);
            }
        }
    }

    fn process_tx(&mut self, vm: &VmBackend, tx: &VringRwLock) -> bool {
        let cid = vm.cfg.cid;
        if let Some(dst) = self.blocked_on {
            if vm.router.still_blocked(cid, dst) {
                return false;
            }
            debug!("cid {cid}: tx resumes (cid {dst} drained)");
            self.blocked_on = None;
        }
        let Some(mem) = self.mem.clone() else {
            return false;
        };
        let guard = mem.memory();
        let mut n = 0;
        loop {
            let _ = tx.disable_notification();
            let before = n;
            while n < TX_BATCH && self.blocked_on.is_none() {
                let chain = tx
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(guard.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let mut segs = Vec::new();
                let mut writable = false;
                for d in chain {
                    writable |= d.is_write_only();
                    segs.push(GSeg {
                        mem: &guard,
                        addr: d.addr(),
                        len: d.len() as usize,
                    });
                }
                let pkt = if writable {
                    Err(GatherError::WritableDescriptor)
                } else {
                    gather(&segs)
                };
                // Every tx descriptor goes back, whatever the packet's fate.
                if let Err(e) = tx.add_used(head, 0) {
                    info!("cid {cid}: tx add_used: {e}");
                }
                n += 1;
                match pkt {
                    Ok(p) => self.on_tx_packet(vm, p),
                    Err(e) => info!("cid {cid}: dropping malformed tx chain: {e}"),
                }
            }
            if n >= TX_BATCH || self.blocked_on.is_some() || n == before {
                // (n == before: nothing poppable although enable_notification
                // said otherwise, e.g. a bogus avail index: do not spin.)
                if n == before {
                    let _ = tx.enable_notification();
                }
                break;
            }
            if !matches!(tx.enable_notification(), Ok(true)) {
                break;
            }
        }
        if n > 0 {
            signal(tx, self.event_idx);
        }
        if let Some(d) = self.blocked_on {
            debug!("cid {cid}: tx paused, inbox of cid {d} full");
        }
        n > 0
    }

    fn on_tx_packet(&mut self, vm: &VmBackend, pkt: Packet) {
        let cid = vm.cfg.cid;
        let h = pkt.hdr;
        debug!("cid {cid}: tx {h}");
        match vm.router.route(cid, &h) {
            Err(why) => info!("cid {cid}: dropping tx packet: {why}"),
            Ok(Route::Host) => {
                let mut to_bridge = Vec::new();
                vm.router.to_host(cid, pkt, &mut to_bridge);
                let mut out = Vec::new();
                for p in to_bridge {
                    self.bridge.on_guest_packet(p, &mut out);
                }
                self.queue_host_packets(vm, &mut out);
            }
            Ok(Route::Guest(port)) => match vm.router.to_guest(cid, cid, &port, pkt) {
                Sent::Queued { full } => {
                    if full {
                        self.blocked_on = Some(port.cid);
                    }
                }
                Sent::Unreachable => self.reject(vm, &h),
            },
            Ok(Route::Unknown) => self.reject(vm, &h),
        }
    }

    /// RST a connection request to nobody (unknown CID or guest not up).
    fn reject(&mut self, vm: &VmBackend, h: &packet::Hdr) {
        let cid = vm.cfg.cid;
        match reject(h) {
            Some(rst) => {
                debug!("cid {cid}: no cid {}: RST", h.dst_cid);
                if let Sent::Queued { full: true } =
                    vm.router.to_guest(h.dst_cid, cid, &vm.port, rst)
                {
                    self.blocked_on = Some(cid);
                }
            }
            None => debug!("cid {cid}: no cid {}: dropped", h.dst_cid),
        }
    }

    fn process_rx(&mut self, vm: &VmBackend, rx: &VringRwLock) -> bool {
        let Some(mem) = self.mem.clone() else {
            return false;
        };
        let guard = mem.memory();
        let cid = vm.cfg.cid;
        let mut used = 0;
        loop {
            let _ = rx.disable_notification();
            let n = deliver(
                &mut self.inflight,
                || vm.port.inbox().pop(),
                |pkt| vm.port.inbox().unpop(pkt),
                |pkt, off| write_rx(cid, rx, &guard, pkt, off),
            );
            used += n;
            let pending = self.inflight.is_some() || !vm.port.inbox().is_empty();
            let more = matches!(rx.enable_notification(), Ok(true));
            if !(pending && more && n > 0) {
                break;
            }
        }
        if used > 0 {
            signal(rx, self.event_idx);
        }
        let waiters = vm.port.inbox().take_ready_waiters();
        vm.router.wake(&waiters);
        used > 0
    }

    /// Handle [`Control`] requests; keeps the ones that must wait.
    fn controls(&mut self, vm: &VmBackend) -> bool {
        let new = vm.port.take_controls();
        if new.is_empty() && self.controls.is_empty() {
            return false;
        }
        self.controls.extend(new);
        let before = self.controls.len();
        while let Some(&c) = self.controls.first() {
            match c {
                Control::TransportReset => {
                    if !self.send_event(vm.cfg.cid, EVENT_TRANSPORT_RESET) {
                        break;
                    }
                    info!("cid {}: sent TRANSPORT_RESET", vm.cfg.cid);
                    self.bridge.drop_all();
                }
            }
            self.controls.remove(0);
        }
        self.controls.len() != before
    }

    /// Put a `struct virtio_vsock_event` on the event queue. False if no
    /// event buffer is available (kept for later). Note: QEMU's
    /// vhost-user-vsock keeps the event queue to itself, so with QEMU this
    /// only works if the frontend hands queue 2 to the backend.
    fn send_event(&mut self, cid: u64, id: u32) -> bool {
        let (Some(evq), Some(mem)) = (&self.evq, &self.mem) else {
            return false;
        };
        if !evq.get_ref().get_queue().ready() {
            debug!("cid {cid}: event queue not set up by the frontend");
            return false;
        }
        let guard = mem.memory();
        let Some((head, segs)) = pop_writable(evq, &guard) else {
            return false;
        };
        let ok = match segs {
            Ok(mut s) => packet::write_span(&mut s, 0, &id.to_le_bytes()),
            Err(()) => false,
        };
        let _ = evq.add_used(head, if ok { 4 } else { 0 });
        signal(evq, self.event_idx);
        ok
    }
}

/// Write the next fragment of `pkt` into the next rx buffer.
fn write_rx(cid: u64, rx: &VringRwLock, guard: &MemGuard, pkt: &Packet, off: usize) -> RxStep {
    let Some((head, segs)) = pop_writable(rx, guard) else {
        return RxStep::NoBuffer;
    };
    let (used, step) = match segs {
        Err(()) => {
            info!("cid {cid}: rx chain with device-readable descriptors skipped");
            (0, RxStep::Skipped)
        }
        Ok(mut segs) => match write_fragment(pkt, off, &mut segs) {
            Ok(f) => {
                debug!(
                    "cid {cid}: rx {} [{off}+{}{}]",
                    pkt.hdr,
                    f.payload,
                    if f.last { "" } else { ", more" }
                );
                (f.used, RxStep::Wrote(off + f.payload))
            }
            Err(e) => {
                info!("cid {cid}: rx buffer skipped: {e:?}");
                (0, RxStep::Skipped)
            }
        },
    };
    if let Err(e) = rx.add_used(head, used as u32) {
        info!("cid {cid}: rx add_used: {e}");
    }
    step
}

/// Serve one guest forever: accept a VMM connection on `listener`, run the
/// daemon until it disconnects, reset, repeat.
pub fn serve(backend: Arc<VmBackend>, mut listener: Listener) -> Result<(), String> {
    let cid = backend.cfg.cid;
    let sock = backend.cfg.socket.display().to_string();
    let bridge_fd = lock(&backend.state).bridge.epoll_fd();
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(format!("vsock-cid{cid}"), backend.clone(), mem)
            .map_err(|e| format!("cid {cid}: {e}"))?;
        for h in daemon.get_epoll_handlers() {
            h.register_listener(backend.port.wake_fd(), EventSet::IN, u64::from(WAKE_EVENT))
                .and_then(|_| h.register_listener(bridge_fd, EventSet::IN, u64::from(BRIDGE_EVENT)))
                .map_err(|e| format!("cid {cid}: registering listeners: {e}"))?;
        }
        info!("cid {cid}: waiting for the VMM on {sock}");
        daemon
            .start(&mut listener)
            .map_err(|e| format!("cid {cid}: {sock}: {e}"))?;
        info!("cid {cid}: VMM connected");
        match daemon.wait() {
            Ok(()) => info!("cid {cid}: VMM disconnected"),
            Err(e) => info!("cid {cid}: VMM connection ended: {e}"),
        }
        backend.go_down("VMM disconnected");
        lock(&backend.state).mem = None;
    }
}
