// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The fault-injection hook point.
//!
//! Every packet the device forwards passes through [`Hook::on_packet`] after
//! routing and before it is queued for its destination:
//!
//! ```text
//! guest tx chain -> gather -> Packet -> Router::route -> Hook -> per-destination Inbox -> rx writer (split)
//!                                                         \-> host bridge (dst CID 2)
//! host bridge (Unix sockets) -> Packet -> Hook -> Inbox of the guest
//! ```
//!
//! The default [`PassThrough`] forwards unchanged. [`Scripted`], which the
//! control socket drives (`--control`, `--fault`), drops, duplicates,
//! reorders or delays the packets of chosen connections. The other faults
//! act on the virtqueues themselves and run on the guest's thread (see
//! [`crate::backend`]): crafted rx packets ([`crate::inject`]), used-ring
//! abuse ([`UsedKind`]) and events ([`EventKind`]); this module holds what
//! they are asked to do ([`Job`]) and what they did ([`Counts`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::inject::{Class, ClassCounts, Kind};
use crate::packet::Packet;
use crate::prng::SplitMix64;
use crate::router::lock;

/// Where a routed packet is going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The rx queue of the guest with this CID.
    Guest(u64),
    /// The host bridge of the sending guest.
    Host,
}

/// Context of one routed packet.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// CID of the guest that sent it, or 2 for the host bridge.
    pub from: u64,
    /// Where it is going.
    pub dest: Dest,
}

/// A stage between the router and the destination queue. Called from the
/// per-VM threads concurrently, hence `Sync` (use interior mutability).
pub trait Hook: Send + Sync {
    /// Handle one packet: call `emit` for each packet to queue in its place.
    fn on_packet(&self, ctx: &Ctx, pkt: Packet, emit: &mut dyn FnMut(Packet));
}

/// The default hook: forwards every packet unchanged.
#[derive(Debug, Default)]
pub struct PassThrough;

impl Hook for PassThrough {
    fn on_packet(&self, _ctx: &Ctx, pkt: Packet, emit: &mut dyn FnMut(Packet)) {
        emit(pkt)
    }
}

/// Used-ring abuse (`used CID KIND COUNT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsedKind {
    /// A used id at or above the queue size.
    BadId,
    /// An id returned before and not posted again since.
    DupId,
    /// An id in range that is not available (not posted).
    NeverPosted,
    /// A large used length for a tx buffer.
    TxLen,
}

impl UsedKind {
    /// Every kind.
    pub const ALL: [UsedKind; 4] = [
        UsedKind::BadId,
        UsedKind::DupId,
        UsedKind::NeverPosted,
        UsedKind::TxLen,
    ];

    /// The name on the control socket.
    pub fn name(self) -> &'static str {
        match self {
            UsedKind::BadId => "bad_id",
            UsedKind::DupId => "dup_id",
            UsedKind::NeverPosted => "never_posted",
            UsedKind::TxLen => "tx_len",
        }
    }

    /// Parse a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Events (`event CID KIND [ARG]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
    Reset,
    /// Change the config-space `guest_cid`, then TRANSPORT_RESET.
    ResetCid(u64),
    /// An event with this (unknown) id.
    Unknown(u32),
    /// A used length of 0 to 3 bytes.
    Short,
    /// This many TRANSPORT_RESETs back to back.
    Storm(u32),
}

impl EventKind {
    /// The name on the control socket.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Reset => "reset",
            EventKind::ResetCid(_) => "reset_cid",
            EventKind::Unknown(_) => "unknown",
            EventKind::Short => "short",
            EventKind::Storm(_) => "storm",
        }
    }

    /// How many events it posts.
    pub fn count(self) -> u32 {
        match self {
            EventKind::Storm(n) => n,
            _ => 1,
        }
    }
}

/// Stream faults (`stream CID PORT KIND PROB SEED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// Drop the packet.
    Drop,
    /// Queue it twice.
    Dup,
    /// Hold it back until the next packet of the connection has passed.
    Reorder,
    /// Hold it back 10 to 100 ms.
    Delay,
}

impl StreamKind {
    /// Every kind.
    pub const ALL: [StreamKind; 4] = [
        StreamKind::Drop,
        StreamKind::Dup,
        StreamKind::Reorder,
        StreamKind::Delay,
    ];

    /// The name on the control socket.
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::Drop => "drop",
            StreamKind::Dup => "dup",
            StreamKind::Reorder => "reorder",
            StreamKind::Delay => "delay",
        }
    }

    /// Parse a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Stream faults done, per kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounts(pub [u64; 4]);

impl StreamCounts {
    fn add(&mut self, k: StreamKind) {
        self.0[k as usize] += 1;
    }

    /// How many of `k`.
    pub fn get(&self, k: StreamKind) -> u64 {
        self.0[k as usize]
    }

    /// `PREFIXdrop=N PREFIXdup=N PREFIXreorder=N PREFIXdelay=N`.
    pub fn to_kv(&self, prefix: &str) -> String {
        StreamKind::ALL
            .iter()
            .map(|k| format!("{prefix}{}={}", k.name(), self.get(*k)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What was injected into one guest: only what reached a used ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Crafted rx buffers, by the class the driver drops them for.
    pub rx: ClassCounts,
    /// TRANSPORT_RESET events (used length 4).
    pub events_reset: u64,
    /// Events with another id (used length 4).
    pub events_unknown: u64,
    /// Events with a used length below 4.
    pub events_short: u64,
    /// Used entries by [`UsedKind`].
    pub used: [u64; 4],
}

impl Counts {
    /// Count one event that reached the used ring with `used_len`.
    pub fn add_event(&mut self, id: u32, used_len: u32) {
        if used_len < 4 {
            self.events_short += 1;
        } else if id == crate::packet::EVENT_TRANSPORT_RESET {
            self.events_reset += 1;
        } else {
            self.events_unknown += 1;
        }
    }

    /// The `counts` line (without `OK`): every key, zeros included.
    pub fn to_kv(&self, stream: &StreamCounts) -> String {
        let used = UsedKind::ALL
            .iter()
            .map(|k| format!("used_{}={}", k.name(), self.used[*k as usize]))
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            "{} events_reset={} events_unknown={} events_short={} {used} {}",
            self.rx.to_kv(),
            self.events_reset,
            self.events_unknown,
            self.events_short,
            stream.to_kv("stream_")
        )
    }
}

/// Where a job's reply goes; `None` once answered.
pub type Reply = Option<Sender<String>>;

/// Send the final line of a job, if anyone still waits for it.
pub fn answer(reply: &mut Reply, line: String) {
    if let Some(tx) = reply.take() {
        let _ = tx.send(line);
    }
}

/// Crafted rx packets still to put on the rx queue.
#[derive(Debug)]
pub struct InjectJob {
    /// What to craft.
    pub kind: Kind,
    /// How many were asked for.
    pub total: u32,
    /// How many are on the used ring already.
    pub done: u32,
    /// The generator, seeded by the command.
    pub rng: SplitMix64,
    /// What landed, by class.
    pub landed: ClassCounts,
    /// Where the answer goes.
    pub reply: Reply,
}

impl InjectJob {
    /// The `OK` line once every packet is on the used ring.
    pub fn ok_line(&self) -> String {
        let mut s = format!("OK injected={} class={}", self.done, self.kind.name());
        if self.kind == Kind::Random {
            s.push(' ');
            s.push_str(&self.landed.to_kv());
        }
        s
    }
}

/// Used-ring abuse still to do.
#[derive(Debug)]
pub struct UsedJob {
    /// What to do.
    pub kind: UsedKind,
    /// How many entries.
    pub total: u32,
    /// Entries written so far.
    pub done: u32,
    /// Where the answer goes.
    pub reply: Reply,
}

/// Events still to post.
#[derive(Debug)]
pub struct EventJob {
    /// What to post.
    pub kind: EventKind,
    /// Posted so far.
    pub done: u32,
    /// Where the answer goes.
    pub reply: Reply,
}

/// Work for a guest's thread, submitted by the control socket.
#[derive(Debug)]
pub enum Job {
    /// Crafted rx packets.
    Inject(InjectJob),
    /// Used-ring abuse.
    Used(UsedJob),
    /// Events.
    Event(EventJob),
}

/// A stream fault on the packets to one guest whose source or destination
/// port is the rule's port.
#[derive(Debug)]
struct StreamRule {
    kind: StreamKind,
    prob: u32,
    rng: SplitMix64,
    /// Reorder: the packet held back until the next one.
    held: Option<Packet>,
    done: StreamCounts,
}

/// A packet delayed by a stream rule.
#[derive(Debug)]
struct Delayed {
    due: Instant,
    cid: u64,
    port: u32,
    pkt: Packet,
}

/// The scripted hook: stream faults per (guest, port).
#[derive(Debug, Default)]
pub struct Scripted {
    active: AtomicBool,
    rules: Mutex<HashMap<(u64, u32), StreamRule>>,
    totals: Mutex<HashMap<u64, StreamCounts>>,
    delayed: Mutex<Vec<Delayed>>,
}

impl Scripted {
    /// A hook with no rule: forwards everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fault the packets to guest `cid` (its command-line CID) whose source
    /// or destination port is `port`, with probability `prob` percent. A
    /// rule for the same guest and port is replaced; what it held is
    /// returned, to be queued again.
    pub fn set_rule(
        &self,
        cid: u64,
        port: u32,
        kind: StreamKind,
        prob: u32,
        seed: u64,
    ) -> Vec<Packet> {
        let rule = StreamRule {
            kind,
            prob: prob.min(100),
            rng: SplitMix64::new(seed),
            held: None,
            done: StreamCounts::default(),
        };
        let mut rules = lock(&self.rules);
        let old = rules.insert((cid, port), rule);
        self.active.store(true, Ordering::Relaxed);
        drop(rules);
        let mut back = self.take_delayed(cid, Some(port));
        back.extend(old.and_then(|r| r.held));
        back
    }

    /// Remove the rule: what it did, and the packets it still held (in the
    /// order they came), to be queued again. `None`: no such rule.
    pub fn clear_rule(&self, cid: u64, port: u32) -> Option<(StreamCounts, Vec<Packet>)> {
        let mut rules = lock(&self.rules);
        let rule = rules.remove(&(cid, port))?;
        self.active.store(!rules.is_empty(), Ordering::Relaxed);
        drop(rules);
        let mut back = self.take_delayed(cid, Some(port));
        back.extend(rule.held);
        Some((rule.done, back))
    }

    /// Stream faults done on guest `cid` since the last reset.
    pub fn counts(&self, cid: u64) -> StreamCounts {
        lock(&self.totals).get(&cid).copied().unwrap_or_default()
    }

    /// Forget the stream faults done on guest `cid`.
    pub fn reset_counts(&self, cid: u64) {
        lock(&self.totals).remove(&cid);
    }

    /// Delayed packets now due, with the guest they go to.
    pub fn take_due(&self, now: Instant) -> Vec<(u64, Packet)> {
        let mut d = lock(&self.delayed);
        if d.is_empty() {
            return Vec::new();
        }
        let (due, keep): (Vec<Delayed>, Vec<Delayed>) = d.drain(..).partition(|x| x.due <= now);
        *d = keep;
        due.into_iter().map(|x| (x.cid, x.pkt)).collect()
    }

    fn take_delayed(&self, cid: u64, port: Option<u32>) -> Vec<Packet> {
        let mut d = lock(&self.delayed);
        let (mine, keep): (Vec<Delayed>, Vec<Delayed>) = d
            .drain(..)
            .partition(|x| x.cid == cid && port.is_none_or(|p| p == x.port));
        *d = keep;
        mine.into_iter().map(|x| x.pkt).collect()
    }

    fn count(&self, cid: u64, rule: &mut StreamRule, k: StreamKind) {
        rule.done.add(k);
        lock(&self.totals).entry(cid).or_default().add(k);
    }
}

impl Hook for Scripted {
    fn on_packet(&self, ctx: &Ctx, pkt: Packet, emit: &mut dyn FnMut(Packet)) {
        if !self.active.load(Ordering::Relaxed) {
            return emit(pkt);
        }
        let Dest::Guest(cid) = ctx.dest else {
            return emit(pkt);
        };
        let mut rules = lock(&self.rules);
        let port = [pkt.hdr.src_port, pkt.hdr.dst_port]
            .into_iter()
            .find(|p| rules.contains_key(&(cid, *p)));
        let Some(rule) = port.and_then(|p| rules.get_mut(&(cid, p))) else {
            drop(rules);
            return emit(pkt);
        };
        let hit = rule.rng.percent(rule.prob);
        match rule.kind {
            StreamKind::Drop if hit => self.count(cid, rule, StreamKind::Drop),
            StreamKind::Dup if hit => {
                self.count(cid, rule, StreamKind::Dup);
                emit(pkt.clone());
                emit(pkt);
            }
            StreamKind::Reorder => match rule.held.take() {
                Some(h) => {
                    self.count(cid, rule, StreamKind::Reorder);
                    emit(pkt);
                    emit(h);
                }
                None if hit => rule.held = Some(pkt),
                None => emit(pkt),
            },
            StreamKind::Delay if hit => {
                self.count(cid, rule, StreamKind::Delay);
                let ms = rule.rng.range(10, 100);
                lock(&self.delayed).push(Delayed {
                    due: Instant::now() + Duration::from_millis(ms),
                    cid,
                    port: port.unwrap_or_default(),
                    pkt,
                });
            }
            _ => emit(pkt),
        }
    }
}

impl fmt::Display for StreamCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_kv(""))
    }
}

/// Classes the `counts` line names, for callers that check a line.
pub fn count_keys() -> Vec<String> {
    let mut v: Vec<String> = Class::ALL.iter().map(|c| c.name().to_string()).collect();
    v.extend(["events_reset", "events_unknown", "events_short"].map(String::from));
    v.extend(UsedKind::ALL.iter().map(|k| format!("used_{}", k.name())));
    v.extend(
        StreamKind::ALL
            .iter()
            .map(|k| format!("stream_{}", k.name())),
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{op, Hdr, TYPE_STREAM};

    fn pkt(port: u32, tag: u8) -> Packet {
        Packet::with_payload(
            Hdr {
                src_cid: 4,
                dst_cid: 3,
                src_port: port,
                dst_port: 5000,
                type_: TYPE_STREAM,
                op: op::RW,
                ..Hdr::default()
            },
            vec![tag],
        )
    }

    fn run(h: &Scripted, dest: u64, pkts: Vec<Packet>) -> Vec<u8> {
        let ctx = Ctx {
            from: 4,
            dest: Dest::Guest(dest),
        };
        let mut out = Vec::new();
        for p in pkts {
            h.on_packet(&ctx, p, &mut |p| out.push(p.payload[0]));
        }
        out
    }

    #[test]
    fn no_rule_passes_everything() {
        let h = Scripted::new();
        assert_eq!(
            run(&h, 3, (0..5).map(|i| pkt(1, i)).collect()),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn rules_apply_to_their_guest_and_port_only() {
        let h = Scripted::new();
        h.set_rule(3, 1234, StreamKind::Drop, 100, 1);
        assert!(run(&h, 3, vec![pkt(1234, 0)]).is_empty());
        assert_eq!(run(&h, 4, vec![pkt(1234, 1)]), vec![1], "other guest");
        assert_eq!(run(&h, 3, vec![pkt(99, 2)]), vec![2], "other port");
        // The destination port matches too.
        let mut p = pkt(99, 3);
        p.hdr.dst_port = 1234;
        assert!(run(&h, 3, vec![p]).is_empty());
        let (done, back) = h.clear_rule(3, 1234).unwrap();
        assert_eq!(done.get(StreamKind::Drop), 2);
        assert!(back.is_empty());
        assert_eq!(h.counts(3).get(StreamKind::Drop), 2);
        assert!(h.clear_rule(3, 1234).is_none());
        assert_eq!(run(&h, 3, vec![pkt(1234, 4)]), vec![4]);
        h.reset_counts(3);
        assert_eq!(h.counts(3), StreamCounts::default());
    }

    #[test]
    fn dup_reorder_and_probability() {
        let h = Scripted::new();
        h.set_rule(3, 1, StreamKind::Dup, 100, 1);
        assert_eq!(run(&h, 3, vec![pkt(1, 7)]), vec![7, 7]);
        h.set_rule(3, 1, StreamKind::Reorder, 100, 1);
        assert_eq!(
            run(&h, 3, (0..4).map(|i| pkt(1, i)).collect()),
            vec![1, 0, 3, 2]
        );
        // A held packet comes back when the rule goes.
        assert!(run(&h, 3, vec![pkt(1, 9)]).is_empty());
        let (done, back) = h.clear_rule(3, 1).unwrap();
        assert_eq!(done.get(StreamKind::Reorder), 2);
        assert_eq!(back.len(), 1);
        // 30 percent, deterministic by seed.
        let go = |seed| {
            let h = Scripted::new();
            h.set_rule(3, 1, StreamKind::Drop, 30, seed);
            run(&h, 3, (0..200).map(|i| pkt(1, i as u8)).collect())
        };
        let a = go(5);
        assert_eq!(a, go(5));
        assert!((100..180).contains(&a.len()), "{}", a.len());
    }

    #[test]
    fn delay_releases_when_due_or_cleared() {
        let h = Scripted::new();
        h.set_rule(3, 1, StreamKind::Delay, 100, 1);
        assert!(run(&h, 3, vec![pkt(1, 0), pkt(1, 1)]).is_empty());
        assert!(h.take_due(Instant::now()).is_empty());
        let due = h.take_due(Instant::now() + Duration::from_millis(101));
        assert_eq!(due.len(), 2);
        assert!(due.iter().all(|(c, _)| *c == 3));
        run(&h, 3, vec![pkt(1, 2)]);
        let (done, back) = h.clear_rule(3, 1).unwrap();
        assert_eq!(done.get(StreamKind::Delay), 3);
        assert_eq!(back.len(), 1);
    }

    #[test]
    fn counts_line_has_every_key() {
        let mut c = Counts::default();
        c.add_event(0, 4);
        c.add_event(7, 4);
        c.add_event(0, 2);
        c.rx.add(Class::InvalidOp);
        c.used[UsedKind::TxLen as usize] = 2;
        let line = c.to_kv(&StreamCounts([1, 0, 0, 0]));
        let keys: Vec<&str> = line
            .split(' ')
            .map(|kv| kv.split('=').next().unwrap())
            .collect();
        assert_eq!(keys, count_keys());
        for want in [
            "invalid_op=1",
            "events_reset=1",
            "events_unknown=1",
            "events_short=1",
            "used_tx_len=2",
            "stream_drop=1",
            "short_buffer=0",
        ] {
            assert!(line.split(' ').any(|kv| kv == want), "{want} in {line}");
        }
    }
}
