// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Routing between guests: one [`Port`] per configured guest, holding the
//! bounded [`Inbox`] of packets waiting for that guest's rx queue and the
//! eventfd that wakes the guest's thread; the [`Router`] decides where a
//! packet goes and runs the fault [`Hook`] before queueing.
//!
//! Back-pressure: a sender whose push leaves the destination inbox at or over
//! its byte limit is registered as a waiter and stops consuming its tx queue;
//! the destination's thread wakes the waiters once the inbox drains below
//! half the limit (or the destination goes away). One FIFO per destination
//! keeps the order of every (source, destination) pair.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::fault::{Ctx, Dest, Hook};
use crate::packet::{op, Hdr, Packet, HOST_CID};

/// Lock a mutex, ignoring poisoning (a panicking thread must not take the
/// other guests down).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Packets waiting for one guest's rx queue.
#[derive(Debug)]
pub struct Inbox {
    q: VecDeque<Packet>,
    bytes: usize,
    /// Bytes of the packet taken by [`Inbox::take`] and not yet started
    /// or put back: they still count against the limit.
    in_hand: usize,
    limit: usize,
    live: bool,
    /// Packets are kept but not handed out (`hold CID on`).
    hold: bool,
    /// Packets are accepted and kept while the driver is down: set by
    /// `hold`, cleared once the driver is up and the hold is released.
    retain: bool,
    waiters: BTreeSet<u64>,
}

impl Inbox {
    /// An empty, not yet live inbox holding about `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Inbox {
            q: VecDeque::new(),
            bytes: 0,
            in_hand: 0,
            limit: limit.max(1),
            live: false,
            hold: false,
            retain: false,
            waiters: BTreeSet::new(),
        }
    }

    /// Queue a packet; gives it back if the guest is not live (no driver)
    /// and no hold keeps its packets.
    pub fn push(&mut self, pkt: Packet) -> Result<(), Packet> {
        if !self.live && !self.retain {
            return Err(pkt);
        }
        self.bytes += pkt.wire_len();
        self.q.push_back(pkt);
        Ok(())
    }

    /// Put a packet taken by [`Inbox::take`] back at the head (dropped if
    /// the guest went down meanwhile).
    pub fn unpop(&mut self, pkt: Packet) {
        self.in_hand = 0;
        if self.live || self.retain {
            self.bytes += pkt.wire_len();
            self.q.push_front(pkt);
        }
    }

    /// Take the oldest packet (none while held).
    pub fn pop(&mut self) -> Option<Packet> {
        if self.hold {
            return None;
        }
        let p = self.q.pop_front()?;
        self.bytes -= p.wire_len();
        Some(p)
    }

    /// Take the oldest packet for delivery. Until [`Inbox::unpop`] (no rx
    /// buffer) or [`Inbox::settle`] (the end of the rx pass that took it)
    /// it still counts against the limit, so that a sender cannot slip one
    /// packet past the bound while this one waits for a buffer.
    pub fn take(&mut self) -> Option<Packet> {
        let p = self.pop()?;
        self.in_hand = p.wire_len();
        Some(p)
    }

    /// The rx pass is over: the packet it last took has started (or is
    /// done) and no longer counts.
    pub fn settle(&mut self) {
        self.in_hand = 0;
    }

    fn counted(&self) -> usize {
        self.bytes + self.in_hand
    }

    /// At or over the limit: senders must pause.
    pub fn is_full(&self) -> bool {
        self.counted() >= self.limit
    }

    /// Queued bytes (headers included).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Queued packets.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// No packet queued.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// A packet can be taken now: queued and not held.
    pub fn is_deliverable(&self) -> bool {
        !self.hold && !self.q.is_empty()
    }

    /// Hold packets (keep them, even while the driver is down, and hand
    /// none out) or release them. Returns the number of packets queued.
    pub fn set_hold(&mut self, hold: bool) -> usize {
        self.hold = hold;
        if hold {
            self.retain = true;
        } else if self.live {
            self.retain = false;
        }
        self.q.len()
    }

    /// Whether packets are held.
    pub fn is_held(&self) -> bool {
        self.hold
    }

    /// Whether the guest's driver is up.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// If full, register `cid` to be woken when it drains and return true.
    pub fn wait_if_full(&mut self, cid: u64) -> bool {
        if self.is_full() {
            self.waiters.insert(cid);
        }
        self.is_full()
    }

    /// Senders to wake now: all waiters once below half the limit.
    pub fn take_ready_waiters(&mut self) -> Vec<u64> {
        if self.waiters.is_empty() || self.counted() >= self.limit / 2 {
            return Vec::new();
        }
        std::mem::take(&mut self.waiters).into_iter().collect()
    }

    /// Mark the driver up or down. Going down drops the queue (unless a
    /// hold keeps it) and returns every waiter (to be woken).
    pub fn set_live(&mut self, live: bool) -> Vec<u64> {
        self.live = live;
        self.in_hand = 0;
        if live {
            if !self.hold {
                self.retain = false;
            }
            return Vec::new();
        }
        if !self.retain {
            self.q.clear();
            self.bytes = 0;
        }
        std::mem::take(&mut self.waiters).into_iter().collect()
    }
}

/// Requests to a guest's thread from elsewhere in the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Send `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue and drop
    /// the guest's host-bridge connections.
    TransportReset,
}

/// One configured guest as seen by the others.
#[derive(Debug)]
pub struct Port {
    /// The guest's CID as configured on the command line: its name in the
    /// process (logs, wakeups, the control socket).
    pub cid: u64,
    /// The `guest_cid` of its config space, which the device routes by.
    /// Starts as `cid`; fault injection can change it.
    guest_cid: AtomicU64,
    inbox: Mutex<Inbox>,
    wake: EventFd,
    control: Mutex<Vec<Control>>,
}

impl Port {
    /// A port for `cid` whose inbox holds about `limit` bytes.
    pub fn new(cid: u64, limit: usize) -> io::Result<Self> {
        Ok(Port {
            cid,
            guest_cid: AtomicU64::new(cid),
            inbox: Mutex::new(Inbox::new(limit)),
            wake: EventFd::new(EFD_NONBLOCK)?,
            control: Mutex::new(Vec::new()),
        })
    }

    /// The config-space `guest_cid`: the address the guest is reached at.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid.load(Ordering::Relaxed)
    }

    /// Change the config-space `guest_cid`; routing follows at once.
    pub fn set_guest_cid(&self, cid: u64) {
        self.guest_cid.store(cid, Ordering::Relaxed);
    }

    /// The inbox, locked.
    pub fn inbox(&self) -> MutexGuard<'_, Inbox> {
        lock(&self.inbox)
    }

    /// The eventfd the guest's thread polls.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Wake the guest's thread.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Consume pending wakeups (returns how many were pending).
    pub fn clear_wake(&self) -> u64 {
        self.wake.read().unwrap_or(0)
    }

    /// Ask the guest's thread to do something (see [`Control`]).
    pub fn request(&self, c: Control) {
        lock(&self.control).push(c);
        self.wake();
    }

    /// Requests not yet handled.
    pub fn take_controls(&self) -> Vec<Control> {
        std::mem::take(&mut *lock(&self.control))
    }
}

/// Where [`Router::route`] sends a guest's packet.
#[derive(Debug)]
pub enum Route {
    /// To the sending guest's host bridge (dst CID 2).
    Host,
    /// To a configured guest.
    Guest(Arc<Port>),
    /// No such CID.
    Unknown,
}

/// Result of queueing for a guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Queued (or dropped by the hook). `full`: the inbox is at its limit
    /// and the caller was registered as a waiter; it must pause.
    Queued { full: bool },
    /// The destination has no live driver.
    Unreachable,
}

/// The process-wide switch between the guests.
pub struct Router {
    ports: HashMap<u64, Arc<Port>>,
    hook: Arc<dyn Hook>,
}

impl Router {
    /// A router over a fixed set of guests.
    pub fn new(ports: Vec<Arc<Port>>, hook: Arc<dyn Hook>) -> Self {
        Router {
            ports: ports.into_iter().map(|p| (p.cid, p)).collect(),
            hook,
        }
    }

    /// The port of a configured guest (by its command-line CID).
    pub fn port(&self, cid: u64) -> Option<&Arc<Port>> {
        self.ports.get(&cid)
    }

    /// The command-line CIDs of every guest, in order.
    pub fn cids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.ports.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The port of the guest whose config space holds `guest_cid`. Should
    /// two hold the same, the one configured with that CID wins, else the
    /// lowest configured CID.
    pub fn port_at(&self, guest_cid: u64) -> Option<&Arc<Port>> {
        match self.ports.get(&guest_cid) {
            Some(p) if p.guest_cid() == guest_cid => Some(p),
            _ => self
                .ports
                .values()
                .filter(|p| p.guest_cid() == guest_cid)
                .min_by_key(|p| p.cid),
        }
    }

    /// Where a packet transmitted by the guest at `from` (its config-space
    /// CID) goes. Err: the packet must be dropped (spoofed source).
    pub fn route(&self, from: u64, hdr: &Hdr) -> Result<Route, String> {
        if hdr.src_cid != from {
            return Err(format!(
                "src_cid {} is not the sender's CID {from}",
                hdr.src_cid
            ));
        }
        if hdr.dst_cid == HOST_CID {
            return Ok(Route::Host);
        }
        Ok(match self.port_at(hdr.dst_cid) {
            Some(p) => Route::Guest(p.clone()),
            None => Route::Unknown,
        })
    }

    /// Run the hook and queue for guest `dst`. `from` is the packet's origin
    /// (a guest CID or 2 for the host bridge), `waiter` the CID of the
    /// calling guest thread, registered for wakeup if the inbox is full.
    pub fn to_guest(&self, from: u64, waiter: u64, dst: &Port, pkt: Packet) -> Sent {
        let ctx = Ctx {
            from,
            dest: Dest::Guest(dst.cid),
        };
        let mut queued = false;
        let mut unreachable = false;
        let mut full = false;
        self.hook.on_packet(&ctx, pkt, &mut |p| {
            let mut ib = dst.inbox();
            match ib.push(p) {
                Ok(()) => {
                    queued = true;
                    full |= ib.wait_if_full(waiter);
                }
                Err(_) => unreachable = true,
            }
        });
        if queued {
            dst.wake();
        }
        if unreachable {
            Sent::Unreachable
        } else {
            Sent::Queued { full }
        }
    }

    /// Queue for guest `dst` without running the hook (packets a fault held
    /// back and now releases). Back-pressure is not applied.
    pub fn release(&self, dst: &Port, pkt: Packet) {
        if dst.inbox().push(pkt).is_ok() {
            dst.wake();
        }
    }

    /// Run the hook on a packet for guest `from`'s host bridge; the packets
    /// to hand to the bridge are appended to `out`.
    pub fn to_host(&self, from: u64, pkt: Packet, out: &mut Vec<Packet>) {
        let ctx = Ctx {
            from,
            dest: Dest::Host,
        };
        self.hook.on_packet(&ctx, pkt, &mut |p| out.push(p));
    }

    /// Wake the threads of these guests.
    pub fn wake(&self, cids: &[u64]) {
        for c in cids {
            if let Some(p) = self.ports.get(c) {
                p.wake();
            }
        }
    }

    /// Whether guest `waiter` must still wait for `dst` (re-registers it).
    pub fn still_blocked(&self, waiter: u64, dst: u64) -> bool {
        match self.ports.get(&dst) {
            Some(p) => p.inbox().wait_if_full(waiter),
            None => false,
        }
    }
}

/// The answer to a packet for nobody: RST to a connection request, as a peer
/// with nothing listening would send; other packets are dropped.
pub fn reject(hdr: &Hdr) -> Option<Packet> {
    (hdr.op == op::REQUEST).then(|| Packet::control(hdr.reply(op::RST)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::PassThrough;
    use crate::packet::{HDR_LEN, TYPE_STREAM};

    fn pkt(src: u64, dst: u64, n: usize, tag: u8) -> Packet {
        Packet::with_payload(
            Hdr {
                src_cid: src,
                dst_cid: dst,
                src_port: 1,
                dst_port: 2,
                type_: TYPE_STREAM,
                op: op::RW,
                ..Hdr::default()
            },
            vec![tag; n],
        )
    }

    fn setup(limit: usize, hook: Arc<dyn Hook>) -> (Router, Arc<Port>, Arc<Port>) {
        let a = Arc::new(Port::new(3, limit).unwrap());
        let b = Arc::new(Port::new(4, limit).unwrap());
        (Router::new(vec![a.clone(), b.clone()], hook), a, b)
    }

    #[test]
    fn routes_and_validates_source() {
        let (r, _a, _b) = setup(1 << 20, Arc::new(PassThrough));
        assert!(matches!(r.route(3, &pkt(3, 4, 0, 0).hdr), Ok(Route::Guest(p)) if p.cid == 4));
        assert!(matches!(r.route(3, &pkt(3, 2, 0, 0).hdr), Ok(Route::Host)));
        assert!(matches!(
            r.route(3, &pkt(3, 99, 0, 0).hdr),
            Ok(Route::Unknown)
        ));
        assert!(r.route(3, &pkt(4, 3, 0, 0).hdr).is_err());
    }

    #[test]
    fn reject_answers_requests_only() {
        let mut h = pkt(3, 99, 0, 0).hdr;
        assert!(reject(&h).is_none());
        h.op = op::REQUEST;
        let rst = reject(&h).unwrap();
        assert_eq!(rst.hdr.op, op::RST);
        assert_eq!((rst.hdr.src_cid, rst.hdr.dst_cid), (99, 3));
        assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (2, 1));
    }

    #[test]
    fn delivery_wakes_and_keeps_order() {
        let (r, _a, b) = setup(1 << 20, Arc::new(PassThrough));
        // Not live yet: unreachable.
        assert_eq!(r.to_guest(3, 3, &b, pkt(3, 4, 1, 0)), Sent::Unreachable);
        assert_eq!(b.clear_wake(), 0);
        b.inbox().set_live(true);
        for i in 0..10 {
            assert_eq!(
                r.to_guest(3, 3, &b, pkt(3, 4, 10, i)),
                Sent::Queued { full: false }
            );
        }
        assert_eq!(b.clear_wake(), 10);
        let tags: Vec<u8> = std::iter::from_fn(|| b.inbox().pop())
            .map(|p| p.payload[0])
            .collect();
        assert_eq!(tags, (0..10).collect::<Vec<u8>>());
    }

    #[test]
    fn back_pressure_bound_and_wakeup() {
        let limit = 10 * (HDR_LEN + 1000);
        let (r, a, b) = setup(limit, Arc::new(PassThrough));
        b.inbox().set_live(true);
        let mut pushed = 0;
        loop {
            pushed += 1;
            match r.to_guest(3, 3, &b, pkt(3, 4, 1000, 0)) {
                Sent::Queued { full: false } => continue,
                Sent::Queued { full: true } => break,
                Sent::Unreachable => panic!(),
            }
        }
        assert_eq!(pushed, 10);
        assert!(b.inbox().bytes() <= limit);
        assert!(r.still_blocked(3, 4));
        a.clear_wake();
        // Draining to just over half does not wake yet.
        for _ in 0..5 {
            b.inbox().pop();
        }
        assert!(b.inbox().take_ready_waiters().is_empty());
        b.inbox().pop();
        let w = b.inbox().take_ready_waiters();
        assert_eq!(w, vec![3]);
        r.wake(&w);
        assert_eq!(a.clear_wake(), 1);
        assert!(!r.still_blocked(3, 4));
        // Going down drops the queue and releases waiters.
        while !r.still_blocked(3, 4) {
            r.to_guest(3, 3, &b, pkt(3, 4, 1000, 0));
        }
        assert_eq!(b.inbox().set_live(false), vec![3]);
        assert!(b.inbox().is_empty());
        assert_eq!(b.inbox().bytes(), 0);
    }

    #[test]
    fn packet_waiting_for_a_buffer_still_counts() {
        // The receiver takes a packet, finds no rx buffer and puts it back:
        // a sender pushing meanwhile must not get past the bound.
        let limit = 10 * (HDR_LEN + 1000);
        let (r, _a, b) = setup(limit, Arc::new(PassThrough));
        b.inbox().set_live(true);
        for _ in 0..9 {
            assert_eq!(
                r.to_guest(3, 3, &b, pkt(3, 4, 1000, 0)),
                Sent::Queued { full: false }
            );
        }
        let taken = b.inbox().take().unwrap();
        assert_eq!(
            r.to_guest(3, 3, &b, pkt(3, 4, 1000, 0)),
            Sent::Queued { full: true }
        );
        b.inbox().unpop(taken);
        assert_eq!(b.inbox().bytes(), limit);
        // Once started, the packet no longer counts.
        let _started = b.inbox().take().unwrap();
        b.inbox().settle();
        assert_eq!(b.inbox().bytes(), limit - (HDR_LEN + 1000));
        assert!(!b.inbox().is_full());
    }

    struct DropOdd(Mutex<u32>);
    impl Hook for DropOdd {
        fn on_packet(&self, _ctx: &Ctx, pkt: Packet, emit: &mut dyn FnMut(Packet)) {
            let mut n = lock(&self.0);
            *n += 1;
            if *n % 2 == 1 {
                emit(pkt.clone());
                emit(pkt); // duplicate the kept ones
            }
        }
    }

    #[test]
    fn hook_sits_between_router_and_queue() {
        let (r, _a, b) = setup(1 << 20, Arc::new(DropOdd(Mutex::new(0))));
        b.inbox().set_live(true);
        for i in 0..4 {
            r.to_guest(3, 3, &b, pkt(3, 4, 1, i));
        }
        let tags: Vec<u8> = std::iter::from_fn(|| b.inbox().pop())
            .map(|p| p.payload[0])
            .collect();
        assert_eq!(tags, vec![0, 0, 2, 2]);
        let mut out = Vec::new();
        r.to_host(3, pkt(3, 2, 1, 9), &mut out);
        r.to_host(3, pkt(3, 2, 1, 9), &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn routes_by_config_space_cid() {
        let (r, a, b) = setup(1 << 20, Arc::new(PassThrough));
        a.set_guest_cid(7);
        assert_eq!(a.cid, 3);
        assert_eq!(r.cids(), vec![3, 4]);
        // Packets for 7 reach guest 3, packets for 3 nobody.
        assert!(matches!(r.route(4, &pkt(4, 7, 0, 0).hdr), Ok(Route::Guest(p)) if p.cid == 3));
        assert!(matches!(
            r.route(4, &pkt(4, 3, 0, 0).hdr),
            Ok(Route::Unknown)
        ));
        // Guest 3 now sends as 7.
        assert!(r.route(7, &pkt(7, 4, 0, 0).hdr).is_ok());
        assert!(r.route(7, &pkt(3, 4, 0, 0).hdr).is_err());
        // Two guests at one CID: the one configured with it wins.
        b.set_guest_cid(3);
        a.set_guest_cid(3);
        assert_eq!(r.port_at(3).map(|p| p.cid), Some(3));
        a.set_guest_cid(4);
        assert_eq!(r.port_at(4).map(|p| p.cid), Some(3));
        assert_eq!(r.port_at(3).map(|p| p.cid), Some(4));
    }

    #[test]
    fn hold_keeps_packets_until_released() {
        let (r, _a, b) = setup(1 << 20, Arc::new(PassThrough));
        // Held before the driver is up: packets wait instead of bouncing.
        assert_eq!(b.inbox().set_hold(true), 0);
        assert_eq!(
            r.to_guest(3, 3, &b, pkt(3, 4, 1, 0)),
            Sent::Queued { full: false }
        );
        b.inbox().set_live(true);
        r.to_guest(3, 3, &b, pkt(3, 4, 1, 1));
        assert!(b.inbox().pop().is_none());
        assert!(!b.inbox().is_deliverable());
        // The driver goes down and up again: still kept.
        b.inbox().set_live(false);
        assert_eq!(b.inbox().len(), 2);
        // Released while down: kept until the driver is up.
        assert_eq!(b.inbox().set_hold(false), 2);
        r.to_guest(3, 3, &b, pkt(3, 4, 1, 2));
        b.inbox().set_live(true);
        let tags: Vec<u8> = std::iter::from_fn(|| b.inbox().pop())
            .map(|p| p.payload[0])
            .collect();
        assert_eq!(tags, vec![0, 1, 2]);
        // Without a hold, going down drops the queue again.
        r.to_guest(3, 3, &b, pkt(3, 4, 1, 3));
        b.inbox().set_live(false);
        assert!(b.inbox().is_empty());
        assert_eq!(r.to_guest(3, 3, &b, pkt(3, 4, 1, 4)), Sent::Unreachable);
        // release() skips the hook and wakes.
        b.inbox().set_live(true);
        b.clear_wake();
        r.release(&b, pkt(3, 4, 1, 5));
        assert_eq!(b.clear_wake(), 1);
        assert_eq!(b.inbox().len(), 1);
    }

    #[test]
    fn control_requests_wake_the_thread() {
        let (_r, a, _b) = setup(1 << 20, Arc::new(PassThrough));
        a.request(Control::TransportReset);
        assert_eq!(a.clear_wake(), 1);
        assert_eq!(a.take_controls(), vec![Control::TransportReset]);
        assert!(a.take_controls().is_empty());
    }
}
