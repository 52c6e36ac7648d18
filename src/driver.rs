// SPDX-License-Identifier: GPL-2.0

//! The driver: what `net/vmw_vsock/virtio_transport.c` does, without `unsafe`.
//!
//! One [`Vsock`] per bound device holds the three virtqueues, each behind
//! its own lock (`None` while the device is stopped, which plays the role of
//! the C driver's `rx_run`/`tx_run`/`event_run`), the queue of packets
//! waiting for room on the tx virtqueue, and the four work items, which run
//! on the module's workqueue [`WORKQUEUE`] (`virtio_vsock_workqueue`). The
//! active device is published in [`THE_VSOCK`] for the transport callbacks,
//! as `the_virtio_vsock`.

#![deny(unsafe_code)]

use crate::{
    kext::{self, debugfs, flush_work, new_try_mutex, RcuArc, TryMutex, WorkQueue},
    protocol::{self as proto, Counter, Event},
    skb::{Gfp, PagePool, SkBuff, SkbQueue},
    virtio::{self, AddOutError, Device, SgTable, Virtqueue},
    vsock::{self, Transport, VsockSock},
};
use core::{
    convert::Infallible,
    sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering::Relaxed},
};
use kernel::{
    alloc::KBox,
    c_str, new_mutex,
    prelude::*,
    str::CString,
    sync::{Arc, ArcBorrow, Mutex},
    workqueue::{impl_has_work, new_work, HasWork, Work, WorkItem},
};

/// The transport ops table registered with the vsock core.
static TRANSPORT: vsock::Ops<VsockTransport> = vsock::Ops::new();

/// The device in use, as `the_virtio_vsock`.
static THE_VSOCK: RcuArc<Vsock> = RcuArc::new();

/// The module's workqueue, shared by its devices as `virtio_vsock_workqueue`.
///
/// Work items hold an `Arc<Vsock>`, so the last reference to a device may be
/// dropped by a worker; the queue itself is only ever destroyed by module
/// exit ([`VsockModule`]), after every device is gone.
static WORKQUEUE: RcuArc<WorkQueue> = RcuArc::new();

/// Whether a device is active: only one is driven at a time.
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Most rx packets handled by one run of the rx work before it yields.
const RX_BUDGET: u32 = 256;

/// Spare fragment pages kept for the next rx refill at most (their array
/// fits a 4 KiB allocation). Between two refills a ring of 128 entries with
/// 64 KiB buffers consumes at most 30 buffers of 16 fragment pages; beyond
/// this the pages go back to the page allocator.
const RX_POOL_PAGES: u32 = 480;

/// Pause before the rx work tries again to post buffers after a refill that
/// left none posted.
const RX_REFILL_RETRY_MS: u32 = 100;

/// Offset of `guest_cid` in the configuration space.
const GUEST_CID_OFFSET: u32 = proto::CONFIG_GUEST_CID_OFFSET as u32;

/// Work item IDs.
const RX_WORK: u64 = 0;
const TX_WORK: u64 = 1;
const EVENT_WORK: u64 = 2;
const SEND_PKT_WORK: u64 = 3;

/// Counters and guest CID of a device, shown in debugfs.
pub(crate) struct Stats {
    guest_cid: AtomicU32,
    counters: [AtomicU64; Counter::COUNT],
    /// Largest payload of an rx buffer (the module parameter, clamped).
    rx_buf_size: AtomicU32,
    /// The most memory the posted rx buffers may take, in bytes.
    rx_mem_max: AtomicU64,
    /// The memory the posted rx buffers take after the last rx run, in bytes.
    rx_mem_posted: AtomicU64,
}

impl Stats {
    fn add(&self, counter: Counter, n: u64) {
        if let Some(c) = self.counters.get(counter.index()) {
            c.fetch_add(n, Relaxed);
        }
    }

    fn inc(&self, counter: Counter) {
        self.add(counter, 1);
    }
}

struct RxState {
    vq: Virtqueue<SkBuff>,
    sg: KBox<SgTable>,
    buf_nr: u32,
    /// Buffers posted by the last refill that filled the queue or reached
    /// the memory bound (C: the most ever posted, the same number while every
    /// buffer has one size). Refills start when fewer than half of them remain.
    buf_max_nr: u32,
    /// Pages the posted buffers take, linear parts and fragments.
    pages_posted: u32,
    /// Most pages posted at once: [`proto::RxLayout::max_bufs`] buffers of
    /// the largest layout, the memory bound.
    pages_limit: u32,
    /// Sizes the next buffers for the packets arriving now.
    sizer: proto::RxSizer,
    /// Fragment pages of consumed buffers that their payload did not reach,
    /// for the next refill: pages of buffers consumed since the last refill,
    /// so posted and spare pages together stay within the bound.
    pool: PagePool,
}

struct TxState {
    vq: Virtqueue<SkBuff>,
    sg: KBox<SgTable>,
}

type EventBuf = KBox<[u8; proto::EVENT_SIZE]>;

/// The debugfs directory of a device, which owns a reference to its counters.
type DebugfsDir = Pin<KBox<debugfs::Scope<Arc<Stats>>>>;

/// The state of one virtio socket device (`struct virtio_vsock`).
#[pin_data]
pub(crate) struct Vsock {
    stats: Arc<Stats>,
    features: proto::Features,
    /// Whether this device holds [`CLAIMED`].
    active: AtomicBool,
    queued_replies: AtomicI32,
    rx_vring_size: AtomicU32,
    tx_num_max: AtomicU32,
    rx_layout: proto::RxLayout,
    #[pin]
    tx: TryMutex<Option<TxState>>,
    #[pin]
    rx: Mutex<Option<RxState>>,
    #[pin]
    event: Mutex<Option<Virtqueue<EventBuf>>>,
    #[pin]
    send_pkt_queue: SkbQueue,
    #[pin]
    debugfs: Mutex<Option<DebugfsDir>>,
    #[pin]
    sysfs: Mutex<Option<virtio::U64Group<Stats>>>,
    #[pin]
    rx_work: Work<Vsock, RX_WORK>,
    #[pin]
    tx_work: Work<Vsock, TX_WORK>,
    #[pin]
    event_work: Work<Vsock, EVENT_WORK>,
    #[pin]
    send_pkt_work: Work<Vsock, SEND_PKT_WORK>,
}

impl_has_work! {
    impl HasWork<Self, RX_WORK> for Vsock { self.rx_work }
    impl HasWork<Self, TX_WORK> for Vsock { self.tx_work }
    impl HasWork<Self, EVENT_WORK> for Vsock { self.event_work }
    impl HasWork<Self, SEND_PKT_WORK> for Vsock { self.send_pkt_work }
}

impl WorkItem<RX_WORK> for Vsock {
    type Pointer = Arc<Vsock>;
    fn run(this: Arc<Vsock>) {
        this.rx_work();
    }
}

impl WorkItem<TX_WORK> for Vsock {
    type Pointer = Arc<Vsock>;
    fn run(this: Arc<Vsock>) {
        this.tx_work();
    }
}

impl WorkItem<EVENT_WORK> for Vsock {
    type Pointer = Arc<Vsock>;
    fn run(this: Arc<Vsock>) {
        this.event_work();
    }
}

impl WorkItem<SEND_PKT_WORK> for Vsock {
    type Pointer = Arc<Vsock>;
    fn run(this: Arc<Vsock>) {
        this.send_pkt_work();
    }
}

impl Vsock {
    fn guest_cid(&self) -> u32 {
        self.stats.guest_cid.load(Relaxed)
    }

    /// Queues work item `ID` on the module's workqueue, unless already queued.
    fn queue_work<const ID: u64>(self: &Arc<Self>)
    where
        Self: WorkItem<ID, Pointer = Arc<Self>> + HasWork<Self, ID>,
    {
        WORKQUEUE.with(|wq| {
            if let Some(wq) = wq {
                let _ = wq.enqueue::<Arc<Self>, ID>(self.clone());
            }
        });
    }

    /// Sets the guest CID from the configuration field `guest_cid`
    /// (`virtio_vsock_update_guest_cid()`).
    ///
    /// An unusable value leaves the device without a CID ([`proto::VMADDR_CID_ANY`]):
    /// it stays bound but drops what it receives and refuses to send, until
    /// the device shows a usable CID again.
    fn update_guest_cid(&self, raw: u64) {
        let cid = proto::guest_cid_from_config(raw).unwrap_or_else(|e| {
            self.stats.inc(Counter::ConfigBadCid);
            pr_err!(
                "unusable guest CID in config space: {:?}; no CID until the device gives one\n",
                e
            );
            proto::VMADDR_CID_ANY
        });
        if self.stats.guest_cid.swap(cid, Relaxed) != cid {
            self.stats.inc(Counter::GuestCidChanged);
        }
    }

    /// Takes the configuration's CID if it is now `dst_cid`, the destination
    /// of a packet that failed validation with [`proto::DropReason::WrongDstCid`].
    ///
    /// After a transport reset that changed the CID, the device may deliver
    /// packets for the new CID before the event work has run; as in C, they are
    /// delivered. Returns whether the CID changed.
    fn adopt_config_cid(&self, vq: &mut Virtqueue<SkBuff>, dst_cid: u64) -> bool {
        let Ok(dst) = proto::guest_cid_from_config(dst_cid) else {
            return false;
        };
        if dst == self.guest_cid() || vq.read_config_le64(GUEST_CID_OFFSET) != dst_cid {
            return false;
        }
        self.update_guest_cid(dst_cid);
        true
    }

    /// Posts rx buffers until the queue is full or holds as many as the
    /// memory bound allows (`virtio_vsock_rx_fill()`).
    ///
    /// Returns whether it stopped because an allocation failed, which is
    /// worth retrying (a queue that refuses buffers, e.g. broken, is not).
    fn rx_fill(&self, rx: &mut RxState) -> bool {
        let mut out_of_memory = false;
        while rx.vq.num_free() > 0 {
            // Each buffer as large as the packets arriving now need.
            let layout = rx.sizer.layout();
            let pages = rx.pages_posted.saturating_add(layout.pages_used());
            if pages > rx.pages_limit {
                break;
            }
            let Some(skb) = SkBuff::alloc_rx(layout, Gfp::Kernel, &mut rx.pool) else {
                self.stats.inc(Counter::RxRefillFailures);
                out_of_memory = true;
                break;
            };
            if rx
                .vq
                .add_skb_in(skb, layout.linear, &mut rx.sg, Gfp::Kernel)
                .is_err()
            {
                self.stats.inc(Counter::RxRefillFailures);
                break;
            }
            rx.buf_nr += 1;
            rx.pages_posted = pages;
        }
        rx.buf_max_nr = proto::rx_buf_max_nr(rx.buf_max_nr, rx.buf_nr, out_of_memory);
        rx.vq.kick();
        self.stats.inc(Counter::RxRefills);
        out_of_memory
    }

    /// Shows in `rx_mem_posted_bytes` what the posted buffers take now.
    fn note_rx_mem(&self, rx: &RxState) {
        let bytes = u64::from(rx.pages_posted) * u64::from(crate::skb::PAGE_SIZE);
        self.stats.rx_mem_posted.store(bytes, Relaxed);
    }

    /// Validates a used rx buffer and hands it to the common code.
    ///
    /// `room` is the payload the buffer was posted with: its linear room and
    /// its fragments, as the driver built it (the device cannot change that).
    fn rx_one(&self, rx: &mut RxState, mut skb: SkBuff, used_len: u32, room: u32) {
        let validate = |skb: &SkBuff| {
            proto::validate_rx(
                used_len,
                proto::HDR_SIZE_U32.saturating_add(room),
                skb.hdr(),
                self.guest_cid(),
                self.features,
            )
        };
        let mut verdict = validate(&skb);
        if verdict == Err(proto::DropReason::WrongDstCid) {
            let dst_cid = proto::Hdr::parse(skb.hdr()).map_or(0, |h| h.dst_cid);
            if self.adopt_config_cid(&mut rx.vq, dst_cid) {
                verdict = validate(&skb);
            }
        }
        let hdr = match verdict {
            Ok(hdr) => hdr,
            Err(reason) => return self.rx_rejected(skb, reason, &mut rx.pool),
        };
        // Cannot fail: `validate_rx` checked the payload fits in the buffer.
        if skb
            .rx_put(self.rx_layout.linear, hdr.payload_len(), &mut rx.pool)
            .is_err()
        {
            self.stats
                .inc(Counter::RxDropped(proto::DropReason::PayloadTooLong));
            return;
        }
        rx.sizer.observe(hdr.payload_len(), room);
        self.stats.inc(Counter::RxPackets);
        self.stats.add(Counter::RxBytes, hdr.payload_len().into());
        vsock::deliver_tap(&skb);
        TRANSPORT.recv_pkt(skb);
    }

    /// Counts a packet that failed validation, shows it to the vsockmon taps,
    /// and hands it to the common code if C would answer it
    /// ([`proto::answer_rejected`]); drops it otherwise.
    fn rx_rejected(&self, mut skb: SkBuff, reason: proto::DropReason, pool: &mut PagePool) {
        self.stats.inc(Counter::RxDropped(reason));
        let answer = proto::answer_rejected(reason, skb.hdr(), self.guest_cid());
        // The taps copy the header's `len` bytes: give them the payload only
        // when it is known to be in the buffer (rules 1 to 3 held).
        let payload = match reason {
            proto::DropReason::ShortBuffer
            | proto::DropReason::UsedLenOverCapacity
            | proto::DropReason::PayloadTooLong => None,
            _ => proto::Hdr::parse(skb.hdr()).map(|h| h.len),
        };
        match payload {
            Some(len) if skb.rx_put(self.rx_layout.linear, len, pool).is_ok() => (),
            _ => skb.clear_hdr_len(),
        }
        vsock::deliver_tap(&skb);
        if answer {
            self.stats.inc(Counter::RxAnswered);
            TRANSPORT.recv_pkt(skb);
        } else {
            skb.free_to_pool(pool);
        }
    }

    /// `virtio_transport_rx_work()`, handling at most [`RX_BUDGET`] packets per run.
    fn rx_work(self: &Arc<Self>) {
        let mut guard = self.rx.lock();
        let Some(rx) = &mut *guard else {
            return;
        };
        let vring_size = rx.vq.vring_size();
        let mut budget = RX_BUDGET;
        'work: loop {
            rx.vq.disable_cb();
            loop {
                let replies = u32::try_from(self.queued_replies.load(Relaxed)).unwrap_or(0);
                if !proto::more_replies(replies, vring_size) {
                    // Stop rx until the device has taken the pending replies; the
                    // send_pkt work restarts rx. Callbacks stay disabled.
                    self.stats.inc(Counter::RxRepliesThrottled);
                    break 'work;
                }
                if budget == 0 {
                    self.queue_work::<RX_WORK>();
                    break 'work;
                }
                let Some((skb, len)) = rx.vq.get_buf() else {
                    break;
                };
                budget -= 1;
                rx.buf_nr = rx.buf_nr.saturating_sub(1);
                let pages = skb.nr_frags().saturating_add(1);
                rx.pages_posted = rx.pages_posted.saturating_sub(pages);
                let room = self.rx_layout.linear.saturating_add(skb.frags_len());
                self.rx_one(rx, skb, len, room);
            }
            if rx.vq.enable_cb() {
                break;
            }
        }
        let out_of_memory = proto::rx_refill_needed(rx.buf_nr, rx.buf_max_nr) && self.rx_fill(rx);
        self.note_rx_mem(rx);
        if rx.buf_nr > 0 || !out_of_memory {
            return;
        }
        // Nothing is posted (allocations failed), so no rx interrupt will come
        // to run this work again: the C driver stalls here until the device is
        // reset. Retry after a pause, as virtio-net's refill work does, for as
        // long as the device is started.
        drop(guard);
        kext::sleep_ms(RX_REFILL_RETRY_MS);
        if self.rx.lock().is_some() {
            self.queue_work::<RX_WORK>();
        }
    }

    /// Adds `skb` to the tx virtqueue (`virtio_transport_send_skb()`); the caller kicks.
    ///
    /// Gives `skb` back if the queue is full. A packet that can never fit in
    /// a tx buffer is dropped and counted instead of being retried forever.
    fn send_skb(&self, tx: &mut TxState, skb: SkBuff, gfp: Gfp) -> Result<(), SkBuff> {
        let len = skb.len();
        match tx.vq.add_skb_out(skb, &mut tx.sg, gfp) {
            Ok(skb) => vsock::deliver_tap(skb),
            Err(AddOutError::Full(skb)) => {
                self.stats.inc(Counter::TxQueueFull);
                return Err(skb);
            }
            Err(AddOutError::TooManyFrags(skb)) => {
                self.stats.inc(Counter::TxTooManyFrags);
                pr_err!("dropped a {len}-byte packet with more fragments than a tx buffer holds\n");
                drop(skb);
                return Ok(());
            }
        }
        self.stats.inc(Counter::TxPackets);
        self.stats.add(Counter::TxBytes, len.into());
        Ok(())
    }

    /// `virtio_transport_send_pkt_work()`: moves queued packets to the tx virtqueue.
    fn send_pkt_work(self: &Arc<Self>) {
        let mut restart_rx = false;
        {
            let mut guard = self.tx.lock();
            let Some(tx) = &mut *guard else {
                return;
            };
            let rx_vring_size = self.rx_vring_size.load(Relaxed);
            let mut added = false;
            while let Some(skb) = self.send_pkt_queue.pop_front() {
                let reply = skb.is_reply();
                if let Err(skb) = self.send_skb(tx, skb, Gfp::Kernel) {
                    self.send_pkt_queue.push_front(skb);
                    break;
                }
                if reply {
                    let left = self.queued_replies.fetch_sub(1, Relaxed) - 1;
                    let left = u32::try_from(left).unwrap_or(u32::MAX);
                    restart_rx |= proto::reply_sent_restarts_rx(left, rx_vring_size);
                }
                added = true;
            }
            if added {
                tx.vq.kick();
            }
        }
        if restart_rx {
            self.queue_work::<RX_WORK>();
        }
    }

    /// `virtio_transport_send_pkt()`, under RCU: the fast path or the queue.
    fn send_pkt(self: &Arc<Self>, skb: SkBuff) -> Result<u32> {
        let len = skb.len();
        let dst_cid = proto::Hdr::parse(skb.hdr()).map_or(0, |hdr| hdr.dst_cid);
        if self.guest_cid() == proto::VMADDR_CID_ANY {
            self.stats.inc(Counter::TxNoCid);
            return Err(ENODEV);
        }
        if !proto::tx_dst_allowed(dst_cid, self.guest_cid()) {
            self.stats.inc(Counter::TxDstSelf);
            return Err(ENODEV);
        }
        // Keep packets in order: bypass the queue only if it is empty, and
        // only if the tx virtqueue is free right now.
        let skb = if self.send_pkt_queue.is_empty_lockless() {
            match self.send_fast(skb) {
                Ok(()) => return Ok(len),
                Err(skb) => skb,
            }
        } else {
            skb
        };
        if skb.is_reply() {
            self.queued_replies.fetch_add(1, Relaxed);
        }
        self.send_pkt_queue.push_back(skb);
        self.queue_work::<SEND_PKT_WORK>();
        Ok(len)
    }

    /// `virtio_transport_send_skb_fast_path()`: sends `skb` now if the tx lock is free.
    fn send_fast(&self, skb: SkBuff) -> Result<(), SkBuff> {
        let Some(mut guard) = self.tx.try_lock() else {
            return Err(skb);
        };
        let Some(tx) = &mut *guard else {
            return Err(skb);
        };
        self.send_skb(tx, skb, Gfp::Atomic)?;
        tx.vq.kick();
        Ok(())
    }

    /// `virtio_transport_tx_work()`: frees the packets the device has sent.
    fn tx_work(self: &Arc<Self>) {
        let mut added = false;
        {
            let mut guard = self.tx.lock();
            let Some(tx) = &mut *guard else {
                return;
            };
            loop {
                tx.vq.disable_cb();
                while let Some((skb, _)) = tx.vq.get_buf() {
                    vsock::consume_skb_sent(skb);
                    added = true;
                }
                if tx.vq.enable_cb() {
                    break;
                }
            }
        }
        if added {
            self.queue_work::<SEND_PKT_WORK>();
        }
    }

    /// `virtio_transport_event_work()`: handles events and posts their buffers again.
    fn event_work(self: &Arc<Self>) {
        let mut guard = self.event.lock();
        let Some(vq) = &mut *guard else {
            return;
        };
        loop {
            vq.disable_cb();
            while let Some((buf, len)) = vq.get_buf() {
                match proto::parse_event(len, &buf[..]) {
                    Ok(Event::TransportReset) => {
                        // The device may have moved (live migration): new CID, connections lost.
                        self.stats.inc(Counter::EventTransportReset);
                        self.update_guest_cid(vq.read_config_le64(GUEST_CID_OFFSET));
                        TRANSPORT.reset_connected_sockets();
                    }
                    Ok(Event::Unknown(_)) => self.stats.inc(Counter::EventUnknown),
                    Err(_) => self.stats.inc(Counter::EventBadLen),
                }
                let _ = vq.add_inbuf(buf, Gfp::Kernel);
            }
            if vq.enable_cb() {
                break;
            }
        }
        vq.kick();
    }
}

/// The transport callbacks: `virtio_transport_send_pkt()` and friends.
struct VsockTransport;

// Each callback runs inside `THE_VSOCK.with()`, an RCU read-side critical
// section as in C: it must not sleep, and `stop()` waits for it to finish.
impl Transport for VsockTransport {
    fn get_local_cid() -> u32 {
        THE_VSOCK.with(|vsock| vsock.map_or(proto::VMADDR_CID_ANY, |v| v.guest_cid()))
    }

    fn send_pkt(skb: SkBuff) -> Result<u32> {
        THE_VSOCK.with(|vsock| Arc::from(vsock.ok_or(ENODEV)?).send_pkt(skb))
    }

    fn cancel_pkt(vsk: &VsockSock) -> Result {
        THE_VSOCK.with(|vsock| {
            let vsock = Arc::from(vsock.ok_or(ENODEV)?);
            let cnt = vsock.send_pkt_queue.purge_sock(vsk);
            if cnt != 0 {
                let delta = i32::try_from(cnt).unwrap_or(i32::MAX);
                let left = vsock.queued_replies.fetch_sub(delta, Relaxed) - delta;
                let left = u32::try_from(left).unwrap_or(u32::MAX);
                if proto::cancel_restarts_rx(left, cnt, vsock.rx_vring_size.load(Relaxed)) {
                    vsock.queue_work::<RX_WORK>();
                }
            }
            Ok(())
        })
    }

    fn can_msgzerocopy(bufs_num: i32) -> bool {
        // The whole packet must fit in the tx virtqueue, or it would be
        // requeued forever (see `virtio_transport_can_msgzerocopy()`).
        THE_VSOCK.with(|vsock| {
            vsock.is_some_and(|v| {
                u32::try_from(bufs_num).is_ok_and(|n| n <= v.tx_num_max.load(Relaxed))
            })
        })
    }

    fn seqpacket_allow(_remote_cid: u32) -> bool {
        THE_VSOCK.with(|vsock| vsock.is_some_and(|v| v.features.allows(proto::Type::SeqPacket)))
    }

    fn msgzerocopy_allow() -> bool {
        true
    }
}

impl virtio::Driver for Vsock {
    const NAME: &'static CStr = c_str!("virtio_vsock_rs");
    const DEVICE_ID: u32 = proto::VIRTIO_ID_VSOCK;
    const FEATURES: &'static [u32] = &proto::DRIVER_FEATURES;

    fn probe(dev: &Device<Self>) -> Result<Arc<Self>> {
        let features = proto::DRIVER_FEATURES
            .iter()
            .filter(|&&bit| dev.has_feature(bit))
            .fold(proto::Features::NONE, |f, &bit| f.with(bit));
        let stats = Arc::new(
            Stats {
                guest_cid: AtomicU32::new(proto::VMADDR_CID_ANY),
                counters: [const { AtomicU64::new(0) }; Counter::COUNT],
                rx_buf_size: AtomicU32::new(0),
                rx_mem_max: AtomicU64::new(0),
                rx_mem_posted: AtomicU64::new(0),
            },
            GFP_KERNEL,
        )?;
        let rx_layout = rx_layout_from_param(crate::skb::rx_buf_size_param());
        stats.rx_buf_size.store(rx_layout.payload(), Relaxed);
        Arc::pin_init(
            pin_init!(Self {
                stats,
                features,
                active: AtomicBool::new(false),
                queued_replies: AtomicI32::new(0),
                rx_vring_size: AtomicU32::new(0),
                tx_num_max: AtomicU32::new(0),
                rx_layout,
                tx <- new_try_mutex!(None, "Vsock::tx"),
                rx <- new_mutex!(None, "Vsock::rx"),
                event <- new_mutex!(None, "Vsock::event"),
                send_pkt_queue <- SkbQueue::new(),
                debugfs <- new_mutex!(None, "Vsock::debugfs"),
                sysfs <- new_mutex!(None, "Vsock::sysfs"),
                rx_work <- new_work!("Vsock::rx_work"),
                tx_work <- new_work!("Vsock::tx_work"),
                event_work <- new_work!("Vsock::event_work"),
                send_pkt_work <- new_work!("Vsock::send_pkt_work"),
            }),
            GFP_KERNEL,
        )
    }

    /// `virtio_vsock_vqs_init()` and `virtio_vsock_vqs_start()`.
    fn start(this: &Arc<Self>, dev: &Device<Self>) -> Result {
        if CLAIMED.swap(true, Relaxed) {
            return Err(EBUSY);
        }
        this.start_claimed(dev)
            .inspect_err(|_| CLAIMED.store(false, Relaxed))?;
        this.active.store(true, Relaxed);
        Ok(())
    }

    /// `virtio_vsock_vqs_del()` and the flushes of `virtio_vsock_remove()`.
    fn stop(this: &Arc<Self>, dev: &Device<Self>) {
        if !this.active.swap(false, Relaxed) {
            return;
        }
        THE_VSOCK.replace(None);
        // Reset all connected sockets when the virtqueues disappear.
        TRANSPORT.reset_connected_sockets();
        // Taking the queues stops the work items, as clearing `*_run` in C.
        let rx = this.rx.lock().take();
        let tx = this.tx.lock().take();
        let event = this.event.lock().take();
        if let (Some(rx), Some(tx), Some(event)) = (rx, tx, event) {
            dev.reset_and_del_vqs([rx.vq.into(), tx.vq.into(), event.into()]);
        }
        this.send_pkt_queue.purge();
        // As `virtio_vsock_remove()`: no work can be queued any more (no
        // queues, no callbacks, not published); wait for what runs. The send
        // work first, since it may queue the rx work.
        flush_work::<_, SEND_PKT_WORK>(&**this);
        flush_work::<_, RX_WORK>(&**this);
        flush_work::<_, TX_WORK>(&**this);
        flush_work::<_, EVENT_WORK>(&**this);
        *this.debugfs.lock() = None;
        *this.sysfs.lock() = None;
        CLAIMED.store(false, Relaxed);
    }

    fn vq_done(this: ArcBorrow<'_, Self>, index: u32) {
        let this = Arc::from(this);
        match index as usize {
            proto::VQ_RX => this.queue_work::<RX_WORK>(),
            proto::VQ_TX => this.queue_work::<TX_WORK>(),
            proto::VQ_EVENT => this.queue_work::<EVENT_WORK>(),
            _ => (),
        }
    }
}

impl Vsock {
    fn start_claimed(self: &Arc<Self>, dev: &Device<Self>) -> Result {
        self.queued_replies.store(0, Relaxed);
        let sg = SgTable::new()?;
        let rx_sg = SgTable::new()?;
        let pool = PagePool::new(RX_POOL_PAGES, Gfp::Kernel)?;
        let mut events = KVec::with_capacity(proto::EVENT_BUFS, GFP_KERNEL)?;
        for _ in 0..proto::EVENT_BUFS {
            events.push(KBox::new([0u8; proto::EVENT_SIZE], GFP_KERNEL)?, GFP_KERNEL)?;
        }
        let [rx, tx, event] = dev.find_vqs([c_str!("rx"), c_str!("tx"), c_str!("event")])?;
        let (rx, tx, mut event) = (
            Virtqueue::<SkBuff>::from(rx),
            Virtqueue::<SkBuff>::from(tx),
            Virtqueue::<EventBuf>::from(event),
        );
        self.update_guest_cid(dev.read_config_le64(GUEST_CID_OFFSET));
        dev.ready();
        self.rx_vring_size.store(rx.vring_size(), Relaxed);
        self.tx_num_max.store(tx.num_max(), Relaxed);
        THE_VSOCK.replace(Some(self.clone()));

        // As `virtio_vsock_vqs_start()`: each queue is stored under its lock
        // before buffers are posted on it, so that the work a callback queues
        // finds it and re-enables callbacks (with EVENT_IDX, a callback that
        // found nothing would be the last interrupt).
        *self.tx.lock() = Some(TxState { vq: tx, sg });
        {
            let mut rx_guard = self.rx.lock();
            let pages_limit = self
                .rx_layout
                .max_bufs(rx.vring_size())
                .saturating_mul(self.rx_layout.pages_used());
            let mem_max = u64::from(pages_limit) * u64::from(crate::skb::PAGE_SIZE);
            self.stats.rx_mem_max.store(mem_max, Relaxed);
            let rx = rx_guard.insert(RxState {
                vq: rx,
                sg: rx_sg,
                buf_nr: 0,
                buf_max_nr: 0,
                pages_posted: 0,
                pages_limit,
                sizer: proto::RxSizer::new(self.rx_layout, crate::skb::PAGE_SIZE),
                pool,
            });
            self.rx_fill(rx);
            self.note_rx_mem(rx);
        }
        {
            let mut event_guard = self.event.lock();
            for buf in events {
                let _ = event.add_inbuf(buf, Gfp::Kernel);
            }
            event.kick();
            *event_guard = Some(event);
        }
        *self.debugfs.lock() = self.debugfs_dir().ok();
        *self.sysfs.lock() = self.sysfs_group(dev).ok();

        // Send what was queued before the tx virtqueue was there.
        self.queue_work::<SEND_PKT_WORK>();
        Ok(())
    }

    /// Creates `/sys/bus/virtio/devices/virtioN/vsock_rs/`: one file per
    /// counter, then `guest_cid`, the stable interface for monitoring.
    fn sysfs_group(&self, dev: &Device<Self>) -> Result<virtio::U64Group<Stats>> {
        let mut files = KVec::with_capacity(Counter::COUNT + 4, GFP_KERNEL)?;
        for counter in Counter::iter() {
            files.push(
                CString::try_from_fmt(format_args!("{}", counter.name()))?,
                GFP_KERNEL,
            )?;
        }
        for name in [
            "guest_cid",
            "rx_buf_size",
            "rx_mem_max_bytes",
            "rx_mem_posted_bytes",
        ] {
            files.push(CString::try_from_fmt(format_args!("{name}"))?, GFP_KERNEL)?;
        }
        dev.add_u64_group(
            c_str!("vsock_rs"),
            self.stats.clone(),
            files,
            |stats, index| match index.checked_sub(Counter::COUNT) {
                None => stats.counters.get(index).map_or(0, |c| c.load(Relaxed)),
                Some(0) => stats.guest_cid.load(Relaxed).into(),
                Some(1) => stats.rx_buf_size.load(Relaxed).into(),
                Some(2) => stats.rx_mem_max.load(Relaxed),
                Some(_) => stats.rx_mem_posted.load(Relaxed),
            },
        )
    }

    /// Creates `/sys/kernel/debug/virtio_vsock_rs/`: `guest_cid` and one file per counter.
    ///
    /// A counter whose file name cannot be allocated has no file.
    fn debugfs_dir(&self) -> Result<DebugfsDir> {
        let scope = debugfs::Scope::dir(
            self.stats.clone(),
            c_str!("virtio_vsock_rs"),
            |stats, dir| {
                dir.read_only_file(c_str!("guest_cid"), &stats.guest_cid);
                dir.read_only_file(c_str!("rx_buf_size"), &stats.rx_buf_size);
                dir.read_only_file(c_str!("rx_mem_max_bytes"), &stats.rx_mem_max);
                dir.read_only_file(c_str!("rx_mem_posted_bytes"), &stats.rx_mem_posted);
                for counter in Counter::iter() {
                    let name = CString::try_from_fmt(format_args!("{}", counter.name()));
                    if let (Some(value), Ok(name)) = (stats.counters.get(counter.index()), name) {
                        dir.read_only_file(&name, value);
                    }
                }
            },
        );
        KBox::pin_init::<Infallible>(scope, GFP_KERNEL)
    }
}

/// Lays out rx buffers for the module parameter `rx_buf_size`, saying what
/// is used instead of a value out of range.
fn rx_layout_from_param(requested: u32) -> proto::RxLayout {
    let layout = proto::RxLayout::new(requested, crate::skb::RX_BUF_SIZE, crate::skb::PAGE_SIZE);
    if layout.payload() != requested {
        pr_warn!(
            "rx_buf_size={requested} is out of range {}..={}: using {}\n",
            layout.linear,
            proto::MAX_PKT_BUF_SIZE,
            layout.payload()
        );
    }
    layout
}

/// The module: creates the workqueue, registers the transport, then the virtio driver.
pub(crate) struct VsockModule {
    // Dropped in declaration order: the driver first, as `virtio_vsock_exit()`,
    // and the workqueue last, once no device is left to queue work.
    _driver: virtio::Registration<Vsock>,
    _transport: vsock::Registration<VsockTransport>,
    _workqueue: ModuleWorkQueue,
}

/// Owns [`WORKQUEUE`]: destroys it, after the work still queued, when dropped.
struct ModuleWorkQueue;

impl ModuleWorkQueue {
    fn new() -> Result<Self> {
        let wq = Arc::new(WorkQueue::new(c_str!("virtio_vsock_rs"))?, GFP_KERNEL)?;
        WORKQUEUE.replace(Some(wq));
        Ok(Self)
    }
}

impl Drop for ModuleWorkQueue {
    fn drop(&mut self) {
        drop(WORKQUEUE.replace(None));
    }
}

impl kernel::Module for VsockModule {
    fn init(module: &'static ThisModule) -> Result<Self> {
        let workqueue = ModuleWorkQueue::new()?;
        let transport = TRANSPORT.register(module)?;
        let driver = virtio::Registration::new(module)?;
        Ok(Self {
            _driver: driver,
            _transport: transport,
            _workqueue: workqueue,
        })
    }
}
