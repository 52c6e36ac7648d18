// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Crafted rx packets for a hostile device: the classes of malformed
//! packet a guest driver must drop, a checker that names the class of any
//! used rx buffer, and a crafter that makes a buffer of a given class.
//!
//! The checker implements the rules the guest driver validates with, in the
//! same order; the first that fails names the class (the driver bumps its
//! counter `rx_dropped_<class>`):
//!
//! 1. `short_buffer`: used length < 44 (the header size);
//! 2. `used_len_over_capacity`: used length > the posted buffer's length;
//! 3. `payload_too_long`: `hdr.len` > used length - 44;
//! 4. `unknown_type`: type not 1 (stream) or 2 (seqpacket);
//! 5. `type_not_negotiated`: type 2 without `VIRTIO_VSOCK_F_SEQPACKET`;
//! 6. `unknown_op`: op > 7; `invalid_op`: op 0;
//! 7. `control_with_payload`: op other than RW (5) with `len` != 0;
//! 8. `cid_upper_bits`: upper 32 bits set in `src_cid` or `dst_cid`;
//! 9. `wrong_dst_cid`: `dst_cid` != the guest's CID;
//! 10. `bad_src_cid`: `src_cid` is `U32_MAX`, 1 or the guest's CID.
//!
//! Everything crafted is addressed to a destination port at or above
//! 0x8000_0000, so that nothing could touch a real connection even if a
//! driver accepted it.

use std::fmt;

use crate::packet::{op, Hdr, HDR_LEN, HOST_CID, TYPE_SEQPACKET, TYPE_STREAM};
use crate::prng::SplitMix64;

/// `VMADDR_CID_LOCAL`.
const CID_LOCAL: u64 = 1;
/// `VMADDR_CID_ANY` (`U32_MAX`).
const CID_ANY: u64 = 0xffff_ffff;
/// Largest payload put in a crafted packet.
const MAX_CRAFTED_PAYLOAD: u64 = 256;
/// Destination ports of crafted packets start here.
const PORT_BASE: u32 = 0x8000_0000;

/// Why the driver drops a used rx buffer: one validation rule each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Used length below the header size.
    ShortBuffer,
    /// Used length above what the driver posted.
    UsedLenOverCapacity,
    /// `hdr.len` longer than the bytes after the header.
    PayloadTooLong,
    /// Type neither stream nor seqpacket.
    UnknownType,
    /// Seqpacket without `VIRTIO_VSOCK_F_SEQPACKET`.
    TypeNotNegotiated,
    /// Op 0.
    InvalidOp,
    /// Op above 7.
    UnknownOp,
    /// A payload on anything but `OP_RW`.
    ControlWithPayload,
    /// Upper 32 bits set in a CID.
    CidUpperBits,
    /// Not addressed to the guest.
    WrongDstCid,
    /// From the guest itself, `VMADDR_CID_LOCAL` or `VMADDR_CID_ANY`.
    BadSrcCid,
}

impl Class {
    /// Every class, in the order the rules are checked.
    pub const ALL: [Class; 11] = [
        Class::ShortBuffer,
        Class::UsedLenOverCapacity,
        Class::PayloadTooLong,
        Class::UnknownType,
        Class::TypeNotNegotiated,
        Class::InvalidOp,
        Class::UnknownOp,
        Class::ControlWithPayload,
        Class::CidUpperBits,
        Class::WrongDstCid,
        Class::BadSrcCid,
    ];

    /// The name the driver's counter uses (`rx_dropped_<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Class::ShortBuffer => "short_buffer",
            Class::UsedLenOverCapacity => "used_len_over_capacity",
            Class::PayloadTooLong => "payload_too_long",
            Class::UnknownType => "unknown_type",
            Class::TypeNotNegotiated => "type_not_negotiated",
            Class::InvalidOp => "invalid_op",
            Class::UnknownOp => "unknown_op",
            Class::ControlWithPayload => "control_with_payload",
            Class::CidUpperBits => "cid_upper_bits",
            Class::WrongDstCid => "wrong_dst_cid",
            Class::BadSrcCid => "bad_src_cid",
        }
    }

    /// The class with this name.
    pub fn from_name(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == s)
    }

    /// Position in [`Class::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `inject` is asked for: one class, or random headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every packet of this class.
    Class(Class),
    /// Random headers and used lengths, each classified by [`classify`].
    Random,
}

impl Kind {
    /// The name on the control socket.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Class(c) => c.name(),
            Kind::Random => "random",
        }
    }

    /// Parse a class name or `random`.
    pub fn from_name(s: &str) -> Option<Kind> {
        match s {
            "random" => Some(Kind::Random),
            _ => Class::from_name(s).map(Kind::Class),
        }
    }
}

/// What the guest driver knows that the rules depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// The CID the driver read from config space.
    pub guest_cid: u64,
    /// The other guest's CID (a valid source for the driver).
    pub sibling_cid: u64,
    /// Whether the driver acked `VIRTIO_VSOCK_F_SEQPACKET`.
    pub seqpacket: bool,
}

/// Name the rule that drops a used rx buffer, or `None` if it passes all of
/// them. `hdr` is the header in the buffer (`None` if fewer than 44 bytes
/// are there; it is only read when `used_len` is at least 44), `cap` the
/// length of the posted buffer.
pub fn classify(hdr: Option<&Hdr>, used_len: u32, cap: u64, t: &Target) -> Option<Class> {
    if (used_len as usize) < HDR_LEN {
        return Some(Class::ShortBuffer);
    }
    if u64::from(used_len) > cap {
        return Some(Class::UsedLenOverCapacity);
    }
    let Some(h) = hdr else {
        return Some(Class::ShortBuffer);
    };
    if h.len > used_len - HDR_LEN as u32 {
        return Some(Class::PayloadTooLong);
    }
    if h.type_ != TYPE_STREAM && h.type_ != TYPE_SEQPACKET {
        return Some(Class::UnknownType);
    }
    if h.type_ == TYPE_SEQPACKET && !t.seqpacket {
        return Some(Class::TypeNotNegotiated);
    }
    if h.op > op::CREDIT_REQUEST {
        return Some(Class::UnknownOp);
    }
    if h.op == 0 {
        return Some(Class::InvalidOp);
    }
    if h.op != op::RW && h.len != 0 {
        return Some(Class::ControlWithPayload);
    }
    if (h.src_cid >> 32) | (h.dst_cid >> 32) != 0 {
        return Some(Class::CidUpperBits);
    }
    if h.dst_cid != t.guest_cid {
        return Some(Class::WrongDstCid);
    }
    if [CID_ANY, CID_LOCAL, t.guest_cid].contains(&h.src_cid) {
        return Some(Class::BadSrcCid);
    }
    None
}

/// One crafted rx buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crafted {
    /// Bytes to write from the start of the buffer (never more than its
    /// length).
    pub bytes: Vec<u8>,
    /// The used length to report.
    pub used_len: u32,
    /// The class [`classify`] gives it.
    pub class: Class,
}

impl Crafted {
    /// The header in [`Crafted::bytes`], if they hold a whole one.
    pub fn hdr(&self) -> Option<Hdr> {
        let b: &[u8; HDR_LEN] = self.bytes.get(..HDR_LEN)?.try_into().ok()?;
        Some(Hdr::from_bytes(b))
    }
}

/// Why a packet of a class cannot be crafted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CraftError {
    /// The posted buffer is too small to hold such a packet.
    BufferTooSmall { class: Class, cap: u64 },
    /// `type_not_negotiated` asked of a driver that acked seqpacket.
    SeqpacketNegotiated,
    /// The guest's CID makes the class unreachable (an earlier rule fires).
    Unreachable { class: Class, guest_cid: u64 },
}

impl fmt::Display for CraftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CraftError::BufferTooSmall { class, cap } => {
                write!(f, "rx buffer of {cap} bytes is too small for {class}")
            }
            CraftError::SeqpacketNegotiated => write!(f, "seqpacket negotiated"),
            CraftError::Unreachable { class, guest_cid } => write!(
                f,
                "{class} cannot be crafted for guest_cid {guest_cid} (an earlier rule fires)"
            ),
        }
    }
}

/// A source CID the driver accepts: upper bits clear, not `U32_MAX`, 1 or
/// its own.
fn valid_src(c: u64, t: &Target) -> bool {
    c >> 32 == 0 && c != CID_ANY && c != CID_LOCAL && c != t.guest_cid
}

/// A header the driver would accept, with `len` payload bytes to follow.
fn healthy(rng: &mut SplitMix64, cap: u64, t: &Target) -> Hdr {
    let mut src = if rng.below(2) == 0 {
        t.sibling_cid
    } else {
        HOST_CID
    };
    if !valid_src(src, t) {
        src = (HOST_CID..).find(|&c| valid_src(c, t)).unwrap_or(HOST_CID);
    }
    let op = 1 + rng.below(7) as u16;
    let len = if op == op::RW {
        rng.below(cap.saturating_sub(HDR_LEN as u64).min(MAX_CRAFTED_PAYLOAD) + 1) as u32
    } else {
        0
    };
    let type_ = if t.seqpacket && rng.below(2) == 0 {
        TYPE_SEQPACKET
    } else {
        TYPE_STREAM
    };
    Hdr {
        src_cid: src,
        dst_cid: t.guest_cid,
        src_port: rng.next_u32(),
        dst_port: PORT_BASE | rng.next_u32(),
        len,
        type_,
        op,
        flags: rng.next_u32() & 3,
        buf_alloc: rng.next_u32(),
        fwd_cnt: rng.next_u32(),
    }
}

/// Header followed by `payload` random bytes, cut to `cap`.
fn bytes_of(h: &Hdr, payload: u64, cap: u64, rng: &mut SplitMix64) -> Vec<u8> {
    let total = (HDR_LEN as u64 + payload).min(cap) as usize;
    let mut b = h.to_bytes().to_vec();
    b.resize(total.max(HDR_LEN), 0);
    if total > HDR_LEN {
        rng.fill(&mut b[HDR_LEN..]);
    }
    b.truncate(total);
    b
}

/// Craft one rx buffer of `kind` for a posted buffer of `cap` bytes. `seq`
/// (the packet's number in its batch) rotates the variants of a class, e.g.
/// which CID is bad. The result is checked with [`classify`]; for
/// [`Kind::Random`], headers that would pass every rule are drawn again.
pub fn craft(
    kind: Kind,
    rng: &mut SplitMix64,
    seq: u64,
    cap: u64,
    t: &Target,
) -> Result<Crafted, CraftError> {
    let class = match kind {
        Kind::Random => return Ok(craft_random(rng, cap, t)),
        Kind::Class(c) => c,
    };
    let need = match class {
        Class::ShortBuffer | Class::UsedLenOverCapacity => 0,
        Class::ControlWithPayload => HDR_LEN as u64 + 1,
        _ => HDR_LEN as u64,
    };
    if cap < need || (class == Class::UsedLenOverCapacity && cap >= u64::from(u32::MAX)) {
        return Err(CraftError::BufferTooSmall { class, cap });
    }
    if class == Class::TypeNotNegotiated && t.seqpacket {
        return Err(CraftError::SeqpacketNegotiated);
    }
    // A variant can be impossible for an odd guest CID (e.g. the sibling's
    // CID equal to it): try the next variants before giving up.
    for k in 0..3 {
        let c = craft_class(class, rng, seq + k, cap, t);
        if classify(c.hdr().as_ref(), c.used_len, cap, t) == Some(class) {
            return Ok(c);
        }
    }
    Err(CraftError::Unreachable {
        class,
        guest_cid: t.guest_cid,
    })
}

/// One try at a packet of `class`; the caller checks the result.
fn craft_class(class: Class, rng: &mut SplitMix64, seq: u64, cap: u64, t: &Target) -> Crafted {
    let mut h = healthy(rng, cap, t);
    let room = cap.saturating_sub(HDR_LEN as u64).min(MAX_CRAFTED_PAYLOAD);
    let mut used_len = None;
    match class {
        Class::ShortBuffer => {
            let used = rng.below(HDR_LEN as u64);
            let mut b = h.to_bytes().to_vec();
            b.truncate(used.min(cap) as usize);
            return Crafted {
                bytes: b,
                used_len: used as u32,
                class,
            };
        }
        Class::UsedLenOverCapacity => {
            let over = (cap + 1).max(HDR_LEN as u64) + rng.below(4096);
            used_len = Some(over.min(u64::from(u32::MAX)) as u32);
        }
        Class::PayloadTooLong => {
            h.op = op::RW;
            let k = rng.below(room + 1) as u32;
            h.len = match seq % 3 {
                0 => k + 1,
                1 => k + 1 + rng.below(65536) as u32,
                _ => rng.range(u64::from(k) + 1, u64::from(u32::MAX)) as u32,
            };
            let bytes = bytes_of(&h, u64::from(k), cap, rng);
            return Crafted {
                bytes,
                used_len: HDR_LEN as u32 + k,
                class,
            };
        }
        Class::UnknownType => {
            h.type_ = match seq % 3 {
                0 => 0,
                1 => 3,
                _ => rng.range(3, u64::from(u16::MAX)) as u16,
            };
        }
        Class::TypeNotNegotiated => h.type_ = TYPE_SEQPACKET,
        Class::InvalidOp => {
            h.op = 0;
            h.len = 0;
        }
        Class::UnknownOp => {
            h.op = rng.range(u64::from(op::CREDIT_REQUEST) + 1, u64::from(u16::MAX)) as u16;
            h.len = 0;
        }
        Class::ControlWithPayload => {
            const CONTROL: [u16; 6] = [
                op::REQUEST,
                op::RESPONSE,
                op::RST,
                op::SHUTDOWN,
                op::CREDIT_UPDATE,
                op::CREDIT_REQUEST,
            ];
            h.op = CONTROL[rng.below(CONTROL.len() as u64) as usize];
            h.len = rng.range(1, room.max(1)) as u32;
        }
        Class::CidUpperBits => {
            let high = rng.range(1, u64::from(u32::MAX)) << 32;
            match seq % 3 {
                0 => h.src_cid |= high,
                1 => h.dst_cid |= high,
                _ => {
                    h.src_cid |= high;
                    h.dst_cid |= rng.range(1, u64::from(u32::MAX)) << 32;
                }
            }
        }
        Class::WrongDstCid => {
            h.dst_cid = match seq % 3 {
                0 => t.sibling_cid,
                1 => CID_ANY,
                _ => u64::from(rng.next_u32()),
            };
            if h.dst_cid == t.guest_cid {
                h.dst_cid = u64::from((t.guest_cid as u32).wrapping_add(1));
            }
        }
        Class::BadSrcCid => {
            h.src_cid = match seq % 3 {
                0 => t.guest_cid,
                1 => CID_LOCAL,
                _ => CID_ANY,
            };
        }
    }
    let bytes = bytes_of(&h, u64::from(h.len), cap, rng);
    Crafted {
        bytes,
        used_len: used_len.unwrap_or(HDR_LEN as u32 + h.len),
        class,
    }
}

/// A random rx buffer that breaks at least one rule. Each header field is,
/// with even odds, raw random bits or a plausible value, so that every rule,
/// not only the first three, gets its share; the destination port is always
/// at or above 0x8000_0000.
fn craft_random(rng: &mut SplitMix64, cap: u64, t: &Target) -> Crafted {
    loop {
        let used = match rng.below(8) {
            0 | 1 => rng.below(HDR_LEN as u64),
            2 => cap.saturating_add(1).max(HDR_LEN as u64) + rng.below(65536),
            _ if cap >= HDR_LEN as u64 => rng.range(HDR_LEN as u64, cap),
            _ => rng.below(HDR_LEN as u64),
        }
        .min(u64::from(u32::MAX)) as u32;
        let mut h = Hdr::from_bytes(&{
            let mut b = [0u8; HDR_LEN];
            rng.fill(&mut b);
            b
        });
        let mut plausible = || rng.below(2) == 0;
        let (a, b, c, d, e) = (
            plausible(),
            plausible(),
            plausible(),
            plausible(),
            plausible(),
        );
        if a {
            h.src_cid =
                [t.sibling_cid, HOST_CID, t.guest_cid, CID_LOCAL, CID_ANY][rng.below(5) as usize];
        }
        if b {
            h.dst_cid = [t.guest_cid, t.guest_cid, t.sibling_cid][rng.below(3) as usize];
        }
        if c {
            h.len = rng.below(u64::from(used.saturating_sub(HDR_LEN as u32)) + 1) as u32;
        }
        if d {
            h.type_ = 1 + rng.below(2) as u16;
        }
        if e {
            h.op = rng.below(9) as u16;
        }
        h.dst_port |= PORT_BASE;
        let Some(class) = classify(Some(&h), used, cap, t) else {
            continue; // would reach a socket: draw again
        };
        let written = u64::from(used).min(cap);
        let mut bytes = h.to_bytes().to_vec();
        bytes.truncate(written as usize);
        if written > HDR_LEN as u64 {
            let mut payload = vec![0u8; written as usize - HDR_LEN];
            rng.fill(&mut payload);
            bytes.extend_from_slice(&payload);
        }
        return Crafted {
            bytes,
            used_len: used,
            class,
        };
    }
}

/// Per-class counts, in [`Class::ALL`] order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounts(pub [u64; 11]);

impl ClassCounts {
    /// Count one of `class`.
    pub fn add(&mut self, class: Class) {
        self.0[class.index()] += 1;
    }

    /// How many of `class`.
    pub fn get(&self, class: Class) -> u64 {
        self.0[class.index()]
    }

    /// `short_buffer=N used_len_over_capacity=N ...`, every class.
    pub fn to_kv(&self) -> String {
        Class::ALL
            .iter()
            .map(|c| format!("{}={}", c.name(), self.get(*c)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Target = Target {
        guest_cid: 3,
        sibling_cid: 4,
        seqpacket: true,
    };
    const T_NOSEQ: Target = Target {
        seqpacket: false,
        ..T
    };
    const CAP: u64 = 3776;

    fn good() -> Hdr {
        Hdr {
            src_cid: 4,
            dst_cid: 3,
            src_port: 1,
            dst_port: 0x8000_0001,
            len: 10,
            type_: TYPE_STREAM,
            op: op::RW,
            ..Hdr::default()
        }
    }

    fn cls(h: Hdr, used: u32) -> Option<Class> {
        classify(Some(&h), used, CAP, &T)
    }

    #[test]
    fn names_round_trip() {
        for c in Class::ALL {
            assert_eq!(Class::from_name(c.name()), Some(c));
            assert_eq!(Kind::from_name(c.name()), Some(Kind::Class(c)));
            assert_eq!(Class::ALL[c.index()], c);
        }
        assert_eq!(Kind::from_name("random"), Some(Kind::Random));
        assert_eq!(Kind::from_name("bogus"), None);
        let mut n = ClassCounts::default();
        n.add(Class::BadSrcCid);
        assert!(n
            .to_kv()
            .starts_with("short_buffer=0 used_len_over_capacity=0 "));
        assert!(n.to_kv().ends_with(" wrong_dst_cid=0 bad_src_cid=1"));
    }

    #[test]
    fn classifier_each_rule() {
        let ok = good();
        assert_eq!(cls(ok, 54), None);
        assert_eq!(cls(ok, 100), None, "used length above header+len is fine");
        assert_eq!(cls(Hdr { len: 0, ..ok }, 44), None, "RW without payload");
        assert_eq!(cls(ok, 43), Some(Class::ShortBuffer));
        assert_eq!(cls(ok, 0), Some(Class::ShortBuffer));
        assert_eq!(classify(None, 60, CAP, &T), Some(Class::ShortBuffer));
        assert_eq!(cls(ok, CAP as u32 + 1), Some(Class::UsedLenOverCapacity));
        assert_eq!(cls(ok, CAP as u32), None);
        assert_eq!(cls(ok, 53), Some(Class::PayloadTooLong));
        for ty in [0, 3, 0xffff] {
            assert_eq!(cls(Hdr { type_: ty, ..ok }, 54), Some(Class::UnknownType));
        }
        let seq = Hdr {
            type_: TYPE_SEQPACKET,
            ..ok
        };
        assert_eq!(cls(seq, 54), None);
        assert_eq!(
            classify(Some(&seq), 54, CAP, &T_NOSEQ),
            Some(Class::TypeNotNegotiated)
        );
        assert_eq!(
            cls(
                Hdr {
                    op: 0,
                    len: 0,
                    ..ok
                },
                44
            ),
            Some(Class::InvalidOp)
        );
        assert_eq!(
            cls(
                Hdr {
                    op: 8,
                    len: 0,
                    ..ok
                },
                44
            ),
            Some(Class::UnknownOp)
        );
        for o in [1, 2, 3, 4, 6, 7] {
            assert_eq!(
                cls(Hdr { op: o, ..ok }, 54),
                Some(Class::ControlWithPayload)
            );
            assert_eq!(
                cls(
                    Hdr {
                        op: o,
                        len: 0,
                        ..ok
                    },
                    44
                ),
                None
            );
        }
        assert_eq!(
            cls(
                Hdr {
                    src_cid: 4 | 1 << 32,
                    ..ok
                },
                54
            ),
            Some(Class::CidUpperBits)
        );
        assert_eq!(
            cls(
                Hdr {
                    dst_cid: 3 | 1 << 63,
                    ..ok
                },
                54
            ),
            Some(Class::CidUpperBits)
        );
        for d in [4, 0, 2, 0xffff_ffff] {
            assert_eq!(cls(Hdr { dst_cid: d, ..ok }, 54), Some(Class::WrongDstCid));
        }
        for s in [3, 1, 0xffff_ffff] {
            assert_eq!(cls(Hdr { src_cid: s, ..ok }, 54), Some(Class::BadSrcCid));
        }
        for s in [0, 2, 4, 5, 0xffff_fffe] {
            assert_eq!(cls(Hdr { src_cid: s, ..ok }, 54), None, "src {s}");
        }
    }

    #[test]
    fn classifier_rule_order() {
        // Everything wrong at once: each rule, once fixed, hands over to
        // the next one.
        let mut h = Hdr {
            src_cid: 3 | 1 << 40,
            dst_cid: 9,
            len: 1000,
            type_: 7,
            op: 0,
            ..good()
        };
        let t = T_NOSEQ;
        let c = |h: &Hdr, used| classify(Some(h), used, CAP, &t);
        assert_eq!(c(&h, 10), Some(Class::ShortBuffer));
        assert_eq!(c(&h, 5000), Some(Class::UsedLenOverCapacity));
        assert_eq!(c(&h, 100), Some(Class::PayloadTooLong));
        h.len = 20;
        assert_eq!(c(&h, 100), Some(Class::UnknownType));
        h.type_ = TYPE_SEQPACKET;
        assert_eq!(c(&h, 100), Some(Class::TypeNotNegotiated));
        h.type_ = TYPE_STREAM;
        assert_eq!(c(&h, 100), Some(Class::InvalidOp));
        h.op = 9;
        assert_eq!(c(&h, 100), Some(Class::UnknownOp));
        h.op = op::SHUTDOWN;
        assert_eq!(c(&h, 100), Some(Class::ControlWithPayload));
        h.op = op::RW;
        assert_eq!(c(&h, 100), Some(Class::CidUpperBits));
        h.src_cid = 3;
        assert_eq!(c(&h, 100), Some(Class::WrongDstCid));
        h.dst_cid = 3;
        assert_eq!(c(&h, 100), Some(Class::BadSrcCid));
        h.src_cid = 4;
        assert_eq!(c(&h, 100), None);
    }

    fn check(c: &Crafted, cap: u64, t: &Target) {
        assert!(c.bytes.len() as u64 <= cap, "wrote beyond the buffer");
        assert!(c.bytes.len() as u64 <= u64::from(c.used_len).max(HDR_LEN as u64));
        assert_eq!(
            classify(c.hdr().as_ref(), c.used_len, cap, t),
            Some(c.class)
        );
        if let Some(h) = c.hdr() {
            if c.class != Class::ShortBuffer && c.class != Class::UsedLenOverCapacity {
                assert!(h.dst_port >= PORT_BASE);
            }
        }
    }

    #[test]
    fn crafted_packets_classify_as_their_class() {
        let mut rng = SplitMix64::new(1);
        for class in Class::ALL {
            let t = if class == Class::TypeNotNegotiated {
                T_NOSEQ
            } else {
                T
            };
            for cap in [45, 100, CAP, 65_536] {
                for seq in 0..30 {
                    let c = craft(Kind::Class(class), &mut rng, seq, cap, &t).unwrap();
                    assert_eq!(c.class, class);
                    check(&c, cap, &t);
                }
            }
        }
        // Odd guest CIDs still give every class the rules allow.
        for g in [0, 2, 4, 0xffff_fffe, 0xffff_ffff] {
            let t = Target { guest_cid: g, ..T };
            for class in Class::ALL {
                if class == Class::TypeNotNegotiated {
                    continue;
                }
                for seq in 0..6 {
                    let c = craft(Kind::Class(class), &mut rng, seq, CAP, &t).unwrap();
                    check(&c, CAP, &t);
                }
            }
        }
    }

    #[test]
    fn craft_refusals() {
        let mut rng = SplitMix64::new(2);
        assert_eq!(
            craft(Kind::Class(Class::TypeNotNegotiated), &mut rng, 0, CAP, &T),
            Err(CraftError::SeqpacketNegotiated)
        );
        assert_eq!(
            craft(Kind::Class(Class::UnknownType), &mut rng, 0, 40, &T),
            Err(CraftError::BufferTooSmall {
                class: Class::UnknownType,
                cap: 40
            })
        );
        assert!(craft(Kind::Class(Class::ControlWithPayload), &mut rng, 0, 44, &T).is_err());
        // Tiny buffers still take these two.
        for class in [Class::ShortBuffer, Class::UsedLenOverCapacity] {
            let c = craft(Kind::Class(class), &mut rng, 0, 8, &T).unwrap();
            check(&c, 8, &T);
        }
        // A guest CID with upper bits makes rule 8 fire first.
        let t = Target {
            guest_cid: 1 << 33,
            ..T
        };
        assert!(matches!(
            craft(Kind::Class(Class::BadSrcCid), &mut rng, 0, CAP, &t),
            Err(CraftError::Unreachable { .. })
        ));
    }

    #[test]
    fn random_is_deterministic_never_valid_and_covers_every_rule() {
        let run = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..3000)
                .map(|i| craft(Kind::Random, &mut rng, i, CAP, &T_NOSEQ).unwrap())
                .collect::<Vec<_>>()
        };
        let a = run(99);
        assert_eq!(a, run(99));
        assert_ne!(a, run(100));
        let mut n = ClassCounts::default();
        for c in &a {
            check(c, CAP, &T_NOSEQ);
            n.add(c.class);
        }
        for class in Class::ALL {
            assert!(n.get(class) > 0, "{class} never drawn: {}", n.to_kv());
        }
    }

    #[test]
    fn crafting_is_deterministic() {
        let run = |seed| {
            let mut rng = SplitMix64::new(seed);
            Class::ALL
                .iter()
                .filter(|&&c| c != Class::TypeNotNegotiated)
                .map(|&c| craft(Kind::Class(c), &mut rng, 0, CAP, &T).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }
}
