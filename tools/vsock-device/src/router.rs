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
    limit: usize,
    live: bool,
    waiters: BTreeSet<u64>,
}

impl Inbox {
    /// An empty, not yet live inbox holding about `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Inbox {
            q: VecDeque::new(),
            bytes: 0,
            limit: limit.max(1),
            live: false,
            waiters: BTreeSet::new(),
        }
    }

    /// Queue a packet; gives it back if the guest is not live (no driver).
    pub fn push(&mut self, pkt: Packet) -> Result<(), Packet> {
        if !self.live {
            return Err(pkt);
        }
        self.bytes += pkt.wire_len();
        self.q.push_back(pkt);
        Ok(())
    }

    /// Put a packet taken by [`Inbox::pop`] back at the head (dropped if
    /// the guest went down meanwhile).
    pub fn unpop(&mut self, pkt: Packet) {
        if self.live {
            self.bytes += pkt.wire_len();
            self.q.push_front(pkt);
        }
    }

    /// Take the oldest packet.
    pub fn pop(&mut self) -> Option<Packet> {
        let p = self.q.pop_front()?;
        self.bytes -= p.wire_len();
        Some(p)
    }

    /// At or over the limit: senders must pause.
    pub fn is_full(&self) -> bool {
        self.bytes >= self.limit
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
        if self.waiters.is_empty() || self.bytes >= self.limit / 2 {
            return Vec::new();
        }
        std::mem::take(&mut self.waiters).into_iter().collect()
    }

    /// Mark the driver up or down. Going down drops the queue and returns
    /// every waiter (to be woken).
    pub fn set_live(&mut self, live: bool) -> Vec<u64> {
        self.live = live;
        if live {
            return Vec::new();
        }
        self.q.clear();
        self.bytes = 0;
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
    /// The guest's CID.
    pub cid: u64,
    inbox: Mutex<Inbox>,
    wake: EventFd,
    control: Mutex<Vec<Control>>,
}

impl Port {
    /// A port for `cid` whose inbox holds about `limit` bytes.
    pub fn new(cid: u64, limit: usize) -> io::Result<Self> {
        Ok(Port {
            cid,
            inbox: Mutex::new(Inbox::new(limit)),
            wake: EventFd::new(EFD_NONBLOCK)?,
            control: Mutex::new(Vec::new()),
        })
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

    /// The port of a configured guest.
    pub fn port(&self, cid: u64) -> Option<&Arc<Port>> {
        self.ports.get(&cid)
    }

    /// Where a packet transmitted by guest `from` goes. Err: the packet must
    /// be dropped (spoofed source).
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
        Ok(match self.ports.get(&hdr.dst_cid) {
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
    fn control_requests_wake_the_thread() {
        let (_r, a, _b) = setup(1 << 20, Arc::new(PassThrough));
        a.request(Control::TransportReset);
        assert_eq!(a.clear_wake(), 1);
        assert_eq!(a.take_controls(), vec![Control::TransportReset]);
        assert!(a.take_controls().is_empty());
    }
}
