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
//! Faults that act on the virtqueues run on the same thread, as [`Job`]s
//! submitted by the control socket: crafted rx packets interleaved with the
//! healthy ones, used-ring abuse and events. [`VmBackend::counts`] says what
//! reached a used ring.
//!
//! Adapted in spirit from vhost-device-vsock (rust-vmm, Apache-2.0 OR
//! BSD-3-Clause): daemon-per-VM loop, sibling wakeup through eventfds,
//! extra listeners registered on the epoll handler.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::bridge::Bridge;
use crate::fault::{answer, Counts, EventJob, EventKind, InjectJob, Job, UsedJob, UsedKind};
use crate::inject::{craft, Class, Kind, Target};
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
/// Crafted rx packets put between two healthy ones while both are pending.
/// A crafted packet costs the guest a validation and a drop, a healthy one
/// a copy of up to 64 KiB: at 8 to 1 a flood of 10^4 goes faster than
/// alternating, and the healthy load still gets a buffer in every nine.
pub const INJECT_BURST: u32 = 8;
/// Device event: the guest's port eventfd.
const WAKE_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Device event: the bridge's epoll fd.
const BRIDGE_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// Pump rounds per event before yielding to the epoll loop.
const MAX_ROUNDS: usize = 64;
/// Tx chains per round.
const TX_BATCH: usize = 256;
/// Rx ids remembered as returned (for `used dup_id`).
const RX_HISTORY: usize = 64;

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

/// The heads the driver has made available and the device not yet taken.
fn avail_heads(q: &Queue, mem: &GuestMemoryMmap) -> Vec<u16> {
    let size = q.size();
    let Ok(idx) = q.avail_idx(mem, Ordering::Acquire) else {
        return Vec::new();
    };
    let mut i = q.next_avail();
    let mut v = Vec::new();
    while i != idx.0 && size > 0 && v.len() < usize::from(size) {
        let slot = q.avail_ring() + 4 + 2 * u64::from(i % size);
        if let Ok(h) = mem.read_obj::<u16>(GuestAddress(slot)) {
            v.push(u16::from_le(h));
        }
        i = i.wrapping_add(1);
    }
    v
}

/// Put `entries` (id, len) on the used ring as they are, whatever the ids:
/// virtio-queue's `add_used` refuses an id out of range. One index update
/// for all, then a notification. False on a memory error.
fn raw_used(v: &VringRwLock, mem: &GuestMemoryMmap, entries: &[(u32, u32)]) -> bool {
    let ok = {
        let mut g = v.get_mut();
        let q = g.get_queue_mut();
        let size = q.size().max(1);
        let used = q.used_ring();
        let mut next = q.next_used();
        let mut ok = true;
        for &(id, len) in entries {
            let slot = used + 4 + 8 * u64::from(next % size);
            ok &= mem.write_obj(id.to_le(), GuestAddress(slot)).is_ok()
                && mem.write_obj(len.to_le(), GuestAddress(slot + 4)).is_ok();
            next = next.wrapping_add(1);
        }
        fence(Ordering::SeqCst);
        ok &= mem
            .store(next.to_le(), GuestAddress(used + 2), Ordering::Release)
            .is_ok();
        q.set_next_used(next);
        ok
    };
    if let Err(e) = v.signal_used_queue() {
        info!("signalling used queue: {e}");
    }
    ok
}

/// A CID the guest driver can take from config space: not 0, 1, 2 or
/// `U32_MAX`, upper bits clear (otherwise it keeps the CID it had).
pub fn usable_cid(cid: u64) -> bool {
    cid >> 32 == 0 && cid > HOST_CID && cid != u64::from(u32::MAX)
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
    /// The rx queue, for [`VmBackend::status`].
    rx: Option<VringRwLock>,
    /// Crafted rx packets to interleave with the healthy ones.
    injects: VecDeque<InjectJob>,
    /// Crafted packets that may go before the next healthy one (up to
    /// [`INJECT_BURST`] after each whole healthy packet).
    inject_credit: u32,
    /// Used-ring abuse on rx (or tx for `never_posted` when rx has no id).
    used_jobs: VecDeque<UsedJob>,
    /// Large used lengths for the next tx chains.
    tx_len_jobs: VecDeque<UsedJob>,
    /// Events to post.
    events: VecDeque<EventJob>,
    /// Short events posted (rotates their length over 0..=3).
    short_events: u32,
    /// Rx ids recently returned, newest last.
    rx_returned: VecDeque<u16>,
}

/// The guest as the control socket sees it (`status CID`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// The driver is up: rx queue ready and enabled.
    pub live: bool,
    /// Since when it is up.
    pub live_for: Option<Duration>,
    /// `VIRTIO_VSOCK_F_SEQPACKET` acked.
    pub seqpacket: bool,
    /// `VIRTIO_RING_F_EVENT_IDX` acked.
    pub event_idx: bool,
    /// Config-space `guest_cid`.
    pub guest_cid: u64,
    /// Rx buffers available to the device.
    pub rx_avail: u16,
    /// The frontend handed the event queue to the device and set it up.
    pub evq_ready: bool,
    /// Fault jobs (`inject`, `used`, `event`) submitted and not finished:
    /// once one shows here, the guest's thread takes it before it next
    /// touches a queue.
    pub jobs: usize,
}

/// Fault state of one guest shared with the control socket.
struct GuestFaults {
    /// Jobs not yet taken by the guest's thread.
    jobs: Mutex<Vec<Job>>,
    /// What reached a used ring.
    counts: Mutex<Counts>,
    /// Offer SEQPACKET from the next connection on.
    want_seqpacket: AtomicBool,
    /// SEQPACKET offered in this connection.
    offer_seqpacket: AtomicBool,
    /// Feature bits acked by the frontend.
    acked: AtomicU64,
    /// The CID the driver uses: the last usable config-space value.
    driver_cid: AtomicU64,
    /// When the driver came up; `None` while it is down.
    live_since: Mutex<Option<Instant>>,
}

/// The vhost-user backend of one guest.
pub struct VmBackend {
    cfg: VmConfig,
    port: Arc<Port>,
    router: Arc<Router>,
    state: Mutex<VmState>,
    faults: GuestFaults,
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
        let faults = GuestFaults {
            jobs: Mutex::new(Vec::new()),
            counts: Mutex::new(Counts::default()),
            want_seqpacket: AtomicBool::new(true),
            offer_seqpacket: AtomicBool::new(true),
            acked: AtomicU64::new(0),
            driver_cid: AtomicU64::new(cfg.cid),
            live_since: Mutex::new(None),
        };
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
                rx: None,
                injects: VecDeque::new(),
                inject_credit: INJECT_BURST,
                used_jobs: VecDeque::new(),
                tx_len_jobs: VecDeque::new(),
                events: VecDeque::new(),
                short_events: 0,
                rx_returned: VecDeque::new(),
            }),
            faults,
        })
    }

    /// The guest's CID as configured on the command line.
    pub fn cid(&self) -> u64 {
        self.cfg.cid
    }

    /// Hand a fault job to the guest's thread. It runs once the driver is
    /// up (and, for rx and events, has posted buffers).
    pub fn submit(&self, job: Job) {
        lock(&self.faults.jobs).push(job);
        self.port.wake();
    }

    /// What reached a used ring so far (stream faults excluded: they are
    /// the hook's).
    pub fn counts(&self) -> Counts {
        *lock(&self.faults.counts)
    }

    /// Forget what was injected.
    pub fn reset_counts(&self) {
        *lock(&self.faults.counts) = Counts::default();
    }

    /// Set the config-space `guest_cid` (routing follows at once). A value
    /// the driver can use becomes the CID crafted packets are checked
    /// against.
    pub fn set_guest_cid(&self, cid: u64) {
        self.port.set_guest_cid(cid);
        if usable_cid(cid) {
            self.faults.driver_cid.store(cid, Ordering::Relaxed);
        }
        info!("cid {}: config guest_cid now {cid}", self.cfg.cid);
    }

    /// Offer `VIRTIO_VSOCK_F_SEQPACKET` or not, from the next vhost-user
    /// connection (or device reset) on: a frontend acks what it was offered
    /// when it connected, and a change under it would fail its
    /// `SET_FEATURES`.
    pub fn offer_seqpacket(&self, on: bool) {
        self.faults.want_seqpacket.store(on, Ordering::Relaxed);
        if lock(&self.state).mem.is_none() {
            self.latch_features();
        }
    }

    fn latch_features(&self) {
        let on = self.faults.want_seqpacket.load(Ordering::Relaxed);
        self.faults.offer_seqpacket.store(on, Ordering::Relaxed);
    }

    /// What crafted rx packets are checked against: the driver's CID, the
    /// sibling's, and whether seqpacket was negotiated.
    pub fn target(&self) -> Target {
        let sibling = self
            .router
            .cids()
            .into_iter()
            .find(|&c| c != self.cfg.cid)
            .and_then(|c| self.router.port(c).map(|p| p.guest_cid()))
            .unwrap_or(HOST_CID);
        Target {
            guest_cid: self.faults.driver_cid.load(Ordering::Relaxed),
            sibling_cid: sibling,
            seqpacket: self.faults.acked.load(Ordering::Relaxed) & F_SEQPACKET != 0,
        }
    }

    /// The guest's state for `status`.
    pub fn status(&self) -> Status {
        let st = lock(&self.state);
        let live = self.port.inbox().is_live();
        let acked = self.faults.acked.load(Ordering::Relaxed);
        let rx_avail = match (&st.rx, &st.mem) {
            (Some(rx), Some(mem)) if live => {
                let guard = mem.memory();
                let r = rx.get_ref();
                let q = r.get_queue();
                q.avail_idx(&*guard, Ordering::Acquire)
                    .map(|i| i.0.wrapping_sub(q.next_avail()))
                    .unwrap_or(0)
            }
            _ => 0,
        };
        let evq_ready = st
            .evq
            .as_ref()
            .is_some_and(|e| e.get_ref().get_queue().ready());
        let jobs = lock(&self.faults.jobs).len()
            + st.injects.len()
            + st.used_jobs.len()
            + st.tx_len_jobs.len()
            + st.events.len();
        Status {
            jobs,
            live,
            live_for: (*lock(&self.faults.live_since)).map(|t| t.elapsed()),
            seqpacket: acked & F_SEQPACKET != 0,
            event_idx: acked & F_EVENT_IDX != 0,
            guest_cid: self.port.guest_cid(),
            rx_avail,
            evq_ready,
        }
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
        st.rx = None;
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
        let seqpacket = if self.faults.offer_seqpacket.load(Ordering::Relaxed) {
            F_SEQPACKET
        } else {
            0
        };
        F_VERSION_1
            | seqpacket
            | F_EVENT_IDX
            | F_NOTIFY_ON_EMPTY
            | F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.faults.acked.store(features, Ordering::Relaxed);
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
        self.latch_features();
    }

    fn set_event_idx(&self, enabled: bool) {
        lock(&self.state).event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.port.guest_cid().to_le_bytes();
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
        *lock(&vm.faults.live_since) = live.then(Instant::now);
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
        if self.rx.is_none() {
            self.rx = Some(rx.clone());
        }
        self.take_jobs(vm);
        self.bridge.set_cid(vm.port.guest_cid());
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
            progress |= self.post_events(vm);
            progress |= self.abuse_used(vm, rx, tx);
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
                let chain_len = segs.iter().map(|s| s.len as u64).sum();
                let used_len = self.tx_used_len(chain_len);
                match tx.add_used(head, used_len) {
                    Ok(()) if used_len != 0 => self.tx_len_landed(vm, used_len),
                    Ok(()) => {}
                    Err(e) => info!("cid {cid}: tx add_used: {e}"),
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
        match vm.router.route(vm.port.guest_cid(), &h) {
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
        // Jobs are only taken at the start of a pump: none can appear here.
        let target = (!self.injects.is_empty()).then(|| vm.target());
        let mut used = 0;
        loop {
            let _ = rx.disable_notification();
            let n = match &target {
                Some(t) if !self.injects.is_empty() => self.rx_mixed(vm, rx, &guard, t),
                _ => {
                    let returned = &mut self.rx_returned;
                    deliver(
                        &mut self.inflight,
                        || vm.port.inbox().take(),
                        |pkt| vm.port.inbox().unpop(pkt),
                        |pkt, off| write_rx(cid, rx, &guard, pkt, off, returned),
                    )
                }
            };
            used += n;
            let pending =
                self.inflight.is_some() || !vm.port.inbox().is_empty() || !self.injects.is_empty();
            let more = matches!(rx.enable_notification(), Ok(true));
            if !(pending && more && n > 0) {
                break;
            }
        }
        if used > 0 {
            signal(rx, self.event_idx);
        }
        vm.port.inbox().settle();
        let waiters = vm.port.inbox().take_ready_waiters();
        vm.router.wake(&waiters);
        used > 0
    }

    /// Rx with crafted packets pending: up to [`INJECT_BURST`] crafted
    /// packets, one healthy packet (all its fragments), and so on, so that
    /// neither starves the other; crafted ones go only between whole
    /// packets. Returns the number of rx buffers used.
    fn rx_mixed(
        &mut self,
        vm: &VmBackend,
        rx: &VringRwLock,
        guard: &MemGuard,
        target: &Target,
    ) -> usize {
        let cid = vm.cfg.cid;
        let mut used = 0;
        loop {
            let healthy = self.inflight.is_some() || vm.port.inbox().is_deliverable();
            let inject = self.inflight.is_none() && !self.injects.is_empty();
            if inject && (!healthy || self.inject_credit > 0) {
                match self.inject_one(vm, rx, guard, target) {
                    InjectStep::NoBuffer => return used,
                    InjectStep::Used => {
                        used += 1;
                        self.inject_credit = self.inject_credit.saturating_sub(1);
                    }
                    InjectStep::Ended => {}
                }
            } else if healthy {
                let mut first = self.inflight.is_none();
                let returned = &mut self.rx_returned;
                let n = deliver(
                    &mut self.inflight,
                    || {
                        if std::mem::take(&mut first) {
                            vm.port.inbox().take()
                        } else {
                            None
                        }
                    },
                    |pkt| vm.port.inbox().unpop(pkt),
                    |pkt, off| write_rx(cid, rx, guard, pkt, off, returned),
                );
                if n == 0 {
                    return used;
                }
                used += n;
                if self.inflight.is_none() {
                    self.inject_credit = INJECT_BURST;
                }
            } else {
                return used;
            }
        }
    }

    /// Put the next crafted packet of the first inject job in the next rx
    /// buffer.
    fn inject_one(
        &mut self,
        vm: &VmBackend,
        rx: &VringRwLock,
        guard: &MemGuard,
        t: &Target,
    ) -> InjectStep {
        let cid = vm.cfg.cid;
        let Some(job) = self.injects.front_mut() else {
            return InjectStep::Ended;
        };
        let Some((head, segs)) = pop_writable(rx, guard) else {
            return InjectStep::NoBuffer;
        };
        let (used_len, class, cap) = match segs {
            // A chain the device may not write: it goes back empty, which
            // the driver drops as a short buffer.
            Err(()) => (0, Class::ShortBuffer, 0),
            Ok(mut segs) => {
                let cap = segs.iter().map(|s| s.len as u64).sum();
                match craft(job.kind, &mut job.rng, u64::from(job.done), cap, t) {
                    Ok(c) if packet::write_span(&mut segs, 0, &c.bytes) => {
                        (c.used_len, c.class, cap)
                    }
                    Ok(_) => (0, Class::ShortBuffer, cap),
                    Err(e) => {
                        // Leave the buffer to the healthy traffic.
                        rx.get_mut().get_queue_mut().go_to_previous_position();
                        info!("cid {cid}: inject {}: {e}", job.kind.name());
                        let line = match job.done {
                            0 => format!("ERR {e}"),
                            n => format!("ERR {e} (injected {n})"),
                        };
                        answer(&mut job.reply, line);
                        self.injects.pop_front();
                        return InjectStep::Ended;
                    }
                }
            }
        };
        if let Err(e) = rx.add_used(head, used_len) {
            info!("cid {cid}: rx add_used: {e}");
            return InjectStep::Used;
        }
        remember(&mut self.rx_returned, head);
        lock(&vm.faults.counts).rx.add(class);
        job.landed.add(class);
        if job.kind == Kind::Random || job.kind == Kind::Class(class) {
            job.done += 1;
        }
        debug!("cid {cid}: injected {class}: used len {used_len}, buffer of {cap}");
        if job.done >= job.total {
            info!(
                "cid {cid}: injected {} {} packet(s)",
                job.done,
                job.kind.name()
            );
            let line = job.ok_line();
            answer(&mut job.reply, line);
            self.injects.pop_front();
        }
        InjectStep::Used
    }

    /// Take the jobs the control socket submitted.
    fn take_jobs(&mut self, vm: &VmBackend) {
        let jobs = std::mem::take(&mut *lock(&vm.faults.jobs));
        for j in jobs {
            match j {
                Job::Inject(j) => self.injects.push_back(j),
                Job::Used(j) if j.kind == UsedKind::TxLen => self.tx_len_jobs.push_back(j),
                Job::Used(j) => self.used_jobs.push_back(j),
                Job::Event(j) => self.events.push_back(j),
            }
        }
    }

    /// The used length for the next tx chain of `chain_len` bytes: 0, or a
    /// large one while a `tx_len` job runs.
    fn tx_used_len(&self, chain_len: u64) -> u32 {
        let Some(j) = self.tx_len_jobs.front() else {
            return 0;
        };
        match j.done % 3 {
            0 => chain_len.saturating_add(4096).min(u64::from(u32::MAX)) as u32,
            1 => 1 << 24,
            _ => u32::MAX,
        }
    }

    /// A large tx used length reached the ring.
    fn tx_len_landed(&mut self, vm: &VmBackend, len: u32) {
        let Some(j) = self.tx_len_jobs.front_mut() else {
            return;
        };
        lock(&vm.faults.counts).used[UsedKind::TxLen as usize] += 1;
        j.done += 1;
        debug!("cid {}: tx used length {len}", vm.cfg.cid);
        if j.done >= j.total {
            info!("cid {}: {} tx used length(s) abused", vm.cfg.cid, j.done);
            answer(&mut j.reply, format!("OK used=tx_len count={}", j.done));
            self.tx_len_jobs.pop_front();
        }
    }

    /// Run the first used-ring abuse job, once the driver is up.
    fn abuse_used(&mut self, vm: &VmBackend, rx: &VringRwLock, tx: &VringRwLock) -> bool {
        if self.used_jobs.is_empty() || !vm.port.inbox().is_live() {
            return false;
        }
        let Some(mem) = self.mem.clone() else {
            return false;
        };
        let guard = mem.memory();
        let cid = vm.cfg.cid;
        let Some(job) = self.used_jobs.front_mut() else {
            return false;
        };
        let n = job.total as usize;
        let (rx_size, rx_heads) = {
            let r = rx.get_ref();
            (r.get_queue().size(), avail_heads(r.get_queue(), &guard))
        };
        let mut extra_short = false;
        let (queue, entries): (&VringRwLock, Vec<(u32, u32)>) = match job.kind {
            UsedKind::BadId => {
                let size = u32::from(rx_size);
                let ids = (0..n).map(|i| match i % 3 {
                    0 => size,
                    1 => size + 1 + (i as u32).wrapping_mul(7919) % 60_000,
                    _ => u32::MAX,
                });
                (rx, ids.map(|id| (id, 0)).collect())
            }
            UsedKind::DupId => {
                let old = self
                    .rx_returned
                    .iter()
                    .rev()
                    .find(|id| !rx_heads.contains(id))
                    .copied();
                match old {
                    Some(id) => (rx, vec![(u32::from(id), 0); n]),
                    None => {
                        // Every id returned was posted again: return one
                        // now (empty, a short buffer to the driver), then
                        // again at once.
                        let Some((head, _)) = pop_writable(rx, &guard) else {
                            return false;
                        };
                        extra_short = true;
                        let mut v = vec![(u32::from(head), 0)];
                        v.extend(vec![(u32::from(head), 0); n]);
                        (rx, v)
                    }
                }
            }
            UsedKind::NeverPosted => {
                let free = |size: u16, heads: &[u16], avoid: &VecDeque<u16>| {
                    let mut ids = (0..size).filter(|i| !heads.contains(i));
                    ids.clone()
                        .find(|i| !avoid.contains(i))
                        .or_else(|| ids.next())
                };
                let none = VecDeque::new();
                let on_rx = free(rx_size, &rx_heads, &self.rx_returned);
                let on_tx = || {
                    let r = tx.get_ref();
                    let q = r.get_queue();
                    q.ready()
                        .then(|| free(q.size(), &avail_heads(q, &guard), &none))
                        .flatten()
                };
                match (on_rx, on_rx.is_none().then(on_tx).flatten()) {
                    (Some(id), _) => (rx, vec![(u32::from(id), 0); n]),
                    (None, Some(id)) => (tx, vec![(u32::from(id), 0); n]),
                    (None, None) => {
                        answer(
                            &mut job.reply,
                            "ERR every descriptor id is available on rx and tx".into(),
                        );
                        self.used_jobs.pop_front();
                        return true;
                    }
                }
            }
            UsedKind::TxLen => return false,
        };
        let which = if std::ptr::eq(queue, rx) { "rx" } else { "tx" };
        if !raw_used(queue, &guard, &entries) {
            info!("cid {cid}: used {}: guest memory error", job.kind.name());
        }
        {
            let mut c = lock(&vm.faults.counts);
            if extra_short {
                c.rx.add(Class::ShortBuffer);
            }
            c.used[job.kind as usize] += n as u64;
        }
        info!(
            "cid {cid}: used {} on {which}: {:?}",
            job.kind.name(),
            &entries[..entries.len().min(8)]
        );
        job.done = job.total;
        let line = format!("OK used={} count={}", job.kind.name(), job.done);
        answer(&mut job.reply, line);
        self.used_jobs.pop_front();
        true
    }

    /// Post the events of the event jobs, as buffers allow. A job that
    /// cannot post its first event answers `pending=1` and stays.
    fn post_events(&mut self, vm: &VmBackend) -> bool {
        let mut progress = false;
        while let Some(mut job) = self.events.pop_front() {
            let n = job.kind.count();
            while job.done < n {
                let (id, short) = match job.kind {
                    EventKind::Unknown(id) => (id, false),
                    EventKind::Short => (EVENT_TRANSPORT_RESET, true),
                    _ => (EVENT_TRANSPORT_RESET, false),
                };
                if !self.post_event(vm, id, short) {
                    break;
                }
                job.done += 1;
                progress = true;
            }
            let name = job.kind.name();
            if job.done < n {
                if job.done == 0 {
                    answer(&mut job.reply, format!("OK event={name} pending=1"));
                }
                self.events.push_front(job);
                break;
            }
            info!("cid {}: posted {n} event(s) {name}", vm.cfg.cid);
            answer(&mut job.reply, format!("OK event={name} posted={n}"));
        }
        progress
    }

    /// Post one event and count it; a TRANSPORT_RESET also drops the host
    /// connections. False if no event buffer is available.
    fn post_event(&mut self, vm: &VmBackend, id: u32, short: bool) -> bool {
        let len = short.then_some(self.short_events % 4);
        let Some(used) = self.send_event(vm.cfg.cid, id, len) else {
            return false;
        };
        if short {
            self.short_events = self.short_events.wrapping_add(1);
        }
        lock(&vm.faults.counts).add_event(id, used);
        if id == EVENT_TRANSPORT_RESET && used >= 4 {
            info!("cid {}: sent TRANSPORT_RESET", vm.cfg.cid);
            self.bridge.drop_all();
        }
        true
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
                    if !self.post_event(vm, EVENT_TRANSPORT_RESET, false) {
                        break;
                    }
                }
            }
            self.controls.remove(0);
        }
        self.controls.len() != before
    }

    /// Put a `struct virtio_vsock_event` on the event queue, with used
    /// length 4 or `short_len`. Returns the used length that reached the
    /// ring (0 if the buffer could not take the id), `None` if no event
    /// buffer is available (kept for later). Note: QEMU's
    /// vhost-user-vsock keeps the event queue to itself, so with QEMU this
    /// only works if the frontend hands queue 2 to the backend.
    fn send_event(&mut self, cid: u64, id: u32, short_len: Option<u32>) -> Option<u32> {
        let (Some(evq), Some(mem)) = (&self.evq, &self.mem) else {
            return None;
        };
        if !evq.get_ref().get_queue().ready() {
            debug!("cid {cid}: event queue not set up by the frontend");
            return None;
        }
        let guard = mem.memory();
        let (head, segs) = pop_writable(evq, &guard)?;
        let ok = match segs {
            Ok(mut s) => packet::write_span(&mut s, 0, &id.to_le_bytes()),
            Err(()) => false,
        };
        let len = match (ok, short_len) {
            (false, _) => 0,
            (true, Some(l)) => l,
            (true, None) => 4,
        };
        if let Err(e) = evq.add_used(head, len) {
            // Nothing reached the ring: count nothing, try the next buffer.
            info!("cid {cid}: event add_used: {e}");
            return None;
        }
        signal(evq, self.event_idx);
        Some(len)
    }
}

/// Outcome of [`VmState::inject_one`].
enum InjectStep {
    /// No rx buffer available.
    NoBuffer,
    /// An rx buffer was used.
    Used,
    /// The job ended without using a buffer.
    Ended,
}

/// Remember an rx id as returned.
fn remember(returned: &mut VecDeque<u16>, head: u16) {
    if returned.len() == RX_HISTORY {
        returned.pop_front();
    }
    returned.push_back(head);
}

/// Write the next fragment of `pkt` into the next rx buffer.
fn write_rx(
    cid: u64,
    rx: &VringRwLock,
    guard: &MemGuard,
    pkt: &Packet,
    off: usize,
    returned: &mut VecDeque<u16>,
) -> RxStep {
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
    match rx.add_used(head, used as u32) {
        Ok(()) => remember(returned, head),
        Err(e) => info!("cid {cid}: rx add_used: {e}"),
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
        backend.latch_features();
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
