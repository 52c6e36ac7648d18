// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-vsock packets: the 44-byte header, gathering a tx descriptor chain
//! into a [`Packet`], and splitting a packet over rx buffers.
//!
//! Everything here works on abstract segments ([`ReadSeg`], [`WriteSeg`]) so
//! it is testable on plain byte slices; the vhost glue implements the traits
//! for guest memory.

/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HDR_LEN: usize = 44;
/// Largest payload accepted from a tx chain. Linux never sends more than
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE` (64 KiB); the margin tolerates drivers that
/// round up, anything bigger is treated as malformed.
pub const MAX_PAYLOAD: usize = 64 * 1024 + 4096;
/// The host's CID.
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// `VIRTIO_VSOCK_TYPE_SEQPACKET`.
pub const TYPE_SEQPACKET: u16 = 2;

/// `VIRTIO_VSOCK_OP_*`.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset.
    pub const RST: u16 = 3;
    /// Shutdown; flags carry `SHUTDOWN_RCV` / `SHUTDOWN_SEND`.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Unsolicited credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Ask the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;

    /// Short name for logs.
    pub fn name(op: u16) -> &'static str {
        match op {
            REQUEST => "REQUEST",
            RESPONSE => "RESPONSE",
            RST => "RST",
            SHUTDOWN => "SHUTDOWN",
            RW => "RW",
            CREDIT_UPDATE => "CREDIT_UPDATE",
            CREDIT_REQUEST => "CREDIT_REQUEST",
            _ => "INVALID",
        }
    }
}

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// `VIRTIO_VSOCK_SEQ_EOM`: last packet of a SEQPACKET message.
pub const SEQ_EOM: u32 = 1;
/// `VIRTIO_VSOCK_SEQ_EOR`: MSG_EOR was set on the message.
pub const SEQ_EOR: u32 = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the id of `struct virtio_vsock_event`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// `struct virtio_vsock_hdr`, decoded to host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// Decode a little-endian wire header.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encode to the little-endian wire format.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A header travelling back to the sender of `self` (addresses and ports
    /// swapped, same socket type), with the given op and everything else 0.
    pub fn reply(&self, op: u16) -> Hdr {
        Hdr {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: self.type_,
            op,
            ..Hdr::default()
        }
    }
}

impl std::fmt::Display for Hdr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} -> {}:{} {} type={} len={} flags={:#x} buf_alloc={} fwd_cnt={}",
            self.src_cid,
            self.src_port,
            self.dst_cid,
            self.dst_port,
            op::name(self.op),
            self.type_,
            self.len,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt
        )
    }
}

/// A whole packet. `payload.len()` is authoritative; `hdr.len` is rewritten
/// per fragment when the packet is written to rx buffers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    pub hdr: Hdr,
    pub payload: Vec<u8>,
}

impl Packet {
    /// A packet without payload.
    pub fn control(hdr: Hdr) -> Self {
        Packet {
            hdr: Hdr { len: 0, ..hdr },
            payload: Vec::new(),
        }
    }

    /// A packet with payload; `hdr.len` is set from it.
    pub fn with_payload(hdr: Hdr, payload: Vec<u8>) -> Self {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        Packet {
            hdr: Hdr { len, ..hdr },
            payload,
        }
    }

    /// Bytes this packet costs in a queue (header + payload).
    pub fn wire_len(&self) -> usize {
        HDR_LEN + self.payload.len()
    }
}

/// A readable piece of a descriptor chain (device-readable buffer).
pub trait ReadSeg {
    /// Length in bytes.
    fn seg_len(&self) -> usize;
    /// Fill `buf` from offset `off`; false on a memory error.
    fn read_at(&self, off: usize, buf: &mut [u8]) -> bool;
}

/// A writable piece of a descriptor chain (device-writable buffer).
pub trait WriteSeg {
    /// Length in bytes.
    fn seg_len(&self) -> usize;
    /// Store `data` at offset `off`; false on a memory error.
    fn write_at(&mut self, off: usize, data: &[u8]) -> bool;
}

impl ReadSeg for &[u8] {
    fn seg_len(&self) -> usize {
        self.len()
    }
    fn read_at(&self, off: usize, buf: &mut [u8]) -> bool {
        match self.get(off..off + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

impl WriteSeg for &mut [u8] {
    fn seg_len(&self) -> usize {
        self.len()
    }
    fn write_at(&mut self, off: usize, data: &[u8]) -> bool {
        match self.get_mut(off..off + data.len()) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
}

fn total_len<T>(segs: &[T], len: impl Fn(&T) -> usize) -> usize {
    segs.iter().fold(0usize, |a, s| a.saturating_add(len(s)))
}

/// Copy `out.len()` bytes starting at logical offset `pos` of the
/// concatenation of `segs`. False if memory access fails or the segments are
/// too short.
fn read_span<S: ReadSeg>(segs: &[S], mut pos: usize, out: &mut [u8]) -> bool {
    let mut done = 0;
    for s in segs {
        if done == out.len() {
            break;
        }
        let l = s.seg_len();
        if pos >= l {
            pos -= l;
            continue;
        }
        let n = (l - pos).min(out.len() - done);
        if !s.read_at(pos, &mut out[done..done + n]) {
            return false;
        }
        done += n;
        pos = 0;
    }
    done == out.len()
}

/// Store `data` at logical offset `pos` of the concatenation of `segs`;
/// false if memory access fails or the segments are too short.
pub fn write_span<S: WriteSeg>(segs: &mut [S], mut pos: usize, data: &[u8]) -> bool {
    let mut done = 0;
    for s in segs.iter_mut() {
        if done == data.len() {
            break;
        }
        let l = s.seg_len();
        if pos >= l {
            pos -= l;
            continue;
        }
        let n = (l - pos).min(data.len() - done);
        if !s.write_at(pos, &data[done..done + n]) {
            return false;
        }
        done += n;
        pos = 0;
    }
    done == data.len()
}

/// Why a tx chain was rejected.
#[derive(Debug, PartialEq, Eq)]
pub enum GatherError {
    /// The chain holds fewer than 44 bytes.
    ShortChain(usize),
    /// `hdr.len` is above [`MAX_PAYLOAD`].
    TooLong(u32),
    /// `hdr.len` is more than the chain holds after the header.
    Truncated { len: u32, avail: usize },
    /// The chain contains a device-writable descriptor.
    WritableDescriptor,
    /// Guest memory could not be read.
    Memory,
}

impl std::fmt::Display for GatherError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatherError::ShortChain(n) => write!(f, "chain of {n} bytes is shorter than a header"),
            GatherError::TooLong(l) => write!(f, "hdr.len {l} exceeds {MAX_PAYLOAD}"),
            GatherError::Truncated { len, avail } => {
                write!(f, "hdr.len {len} but only {avail} payload bytes in chain")
            }
            GatherError::WritableDescriptor => write!(f, "device-writable descriptor in tx chain"),
            GatherError::Memory => write!(f, "guest memory read failed"),
        }
    }
}

/// Gather a tx chain of any length into a packet. The header may straddle
/// descriptors; the payload is the `hdr.len` bytes following it, and any
/// extra bytes in the chain are ignored.
pub fn gather<S: ReadSeg>(segs: &[S]) -> Result<Packet, GatherError> {
    let total = total_len(segs, |s| s.seg_len());
    if total < HDR_LEN {
        return Err(GatherError::ShortChain(total));
    }
    let mut hb = [0u8; HDR_LEN];
    if !read_span(segs, 0, &mut hb) {
        return Err(GatherError::Memory);
    }
    let hdr = Hdr::from_bytes(&hb);
    let len = hdr.len as usize;
    if len > MAX_PAYLOAD {
        return Err(GatherError::TooLong(hdr.len));
    }
    if len > total - HDR_LEN {
        return Err(GatherError::Truncated {
            len: hdr.len,
            avail: total - HDR_LEN,
        });
    }
    let mut payload = vec![0u8; len];
    if !read_span(segs, HDR_LEN, &mut payload) {
        return Err(GatherError::Memory);
    }
    Ok(Packet { hdr, payload })
}

/// Why an rx buffer could not take a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum SplitError {
    /// The buffer is smaller than a header.
    SmallBuffer(usize),
    /// Guest memory could not be written.
    Memory,
}

/// One fragment written to one rx buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Bytes written (header + payload): the used-ring length.
    pub used: usize,
    /// Payload bytes in this fragment.
    pub payload: usize,
    /// True if this fragment ends the packet.
    pub last: bool,
}

/// Write the part of `pkt` starting at payload offset `off` into one rx
/// buffer, as kernel vhost does: a copy of the header with `len` set to the
/// payload that fits, and the SEQPACKET `EOM`/`EOR` flags cleared unless this
/// fragment ends the packet.
pub fn write_fragment<S: WriteSeg>(
    pkt: &Packet,
    off: usize,
    segs: &mut [S],
) -> Result<Fragment, SplitError> {
    let cap = total_len(segs, |s| s.seg_len());
    if cap < HDR_LEN {
        return Err(SplitError::SmallBuffer(cap));
    }
    let rest = pkt.payload.get(off..).unwrap_or(&[]);
    let n = rest.len().min(cap - HDR_LEN);
    let last = n == rest.len();
    let mut hdr = pkt.hdr;
    hdr.len = n as u32; // n <= MAX_PAYLOAD
    if !last {
        hdr.flags &= !(SEQ_EOM | SEQ_EOR);
    }
    if !write_span(segs, 0, &hdr.to_bytes()) || !write_span(segs, HDR_LEN, &rest[..n]) {
        return Err(SplitError::Memory);
    }
    Ok(Fragment {
        used: HDR_LEN + n,
        payload: n,
        last,
    })
}

/// A packet partly written to the receiver: the next fragment starts at
/// payload offset `off`.
#[derive(Debug)]
pub struct InFlight {
    pub pkt: Packet,
    pub off: usize,
}

/// Outcome of offering one fragment to the next rx buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum RxStep {
    /// The receiver has no rx buffer posted.
    NoBuffer,
    /// A buffer was consumed without carrying data (too small, malformed).
    Skipped,
    /// A fragment was written; the payload offset is now the value.
    Wrote(usize),
}

/// Deliver packets (the in-flight one first, then `next_pkt()`) fragment by
/// fragment through `write_next(pkt, off)`, until packets or rx buffers run
/// out. A packet is never lost: if buffers run out mid-packet it stays in
/// `cur` and continues on the next call; a packet not started yet goes back
/// through `unpop` (to the head of its queue, so it keeps counting against
/// the queue's bound). Returns the number of buffers used.
pub fn deliver(
    cur: &mut Option<InFlight>,
    mut next_pkt: impl FnMut() -> Option<Packet>,
    mut unpop: impl FnMut(Packet),
    mut write_next: impl FnMut(&Packet, usize) -> RxStep,
) -> usize {
    let mut used = 0;
    loop {
        let mut fl = match cur.take() {
            Some(f) => f,
            None => match next_pkt() {
                Some(pkt) => InFlight { pkt, off: 0 },
                None => return used,
            },
        };
        match write_next(&fl.pkt, fl.off) {
            RxStep::NoBuffer => {
                if fl.off == 0 {
                    unpop(fl.pkt);
                } else {
                    *cur = Some(fl);
                }
                return used;
            }
            RxStep::Skipped => {
                used += 1;
                *cur = Some(fl);
            }
            RxStep::Wrote(off) => {
                used += 1;
                fl.off = off;
                if off < fl.pkt.payload.len() {
                    *cur = Some(fl);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(len: u32, flags: u32) -> Hdr {
        Hdr {
            src_cid: 3,
            dst_cid: 4,
            src_port: 1000,
            dst_port: 2000,
            len,
            type_: TYPE_SEQPACKET,
            op: op::RW,
            flags,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    fn wire(h: &Hdr, payload: &[u8]) -> Vec<u8> {
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn header_roundtrip_and_layout() {
        let h = hdr(5, SEQ_EOM);
        let b = h.to_bytes();
        assert_eq!(Hdr::from_bytes(&b), h);
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        let r = h.reply(op::RST);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (4, 3, 2000, 1000)
        );
        assert_eq!((r.len, r.flags, r.type_), (0, 0, TYPE_SEQPACKET));
    }

    #[test]
    fn gather_single_and_split_header() {
        let payload = pattern(300);
        let w = wire(&hdr(300, 0), &payload);
        // One descriptor.
        let p = gather(&[&w[..]]).unwrap();
        assert_eq!(p.payload, payload);
        // Header split at every position across two descriptors, payload
        // spread over 1..N more.
        for cut in 1..HDR_LEN {
            for n in 1..6 {
                let mut segs: Vec<&[u8]> = vec![&w[..cut], &w[cut..HDR_LEN]];
                let chunk = payload.len().div_ceil(n);
                for c in w[HDR_LEN..].chunks(chunk) {
                    segs.push(c);
                }
                let p = gather(&segs).unwrap();
                assert_eq!(p.hdr, hdr(300, 0));
                assert_eq!(p.payload, payload);
            }
        }
    }

    #[test]
    fn gather_many_descriptors_and_empty_ones() {
        let payload = pattern(40_000);
        let w = wire(&hdr(40_000, 0), &payload);
        let mut segs: Vec<&[u8]> = Vec::new();
        for c in w.chunks(1000) {
            segs.push(c);
            segs.push(&[]);
        }
        assert!(segs.len() > 80);
        assert_eq!(gather(&segs).unwrap().payload, payload);
    }

    #[test]
    fn gather_rejects_and_ignores() {
        let payload = pattern(100);
        // len bigger than the chain.
        let w = wire(&hdr(101, 0), &payload);
        assert_eq!(
            gather(&[&w[..]]),
            Err(GatherError::Truncated {
                len: 101,
                avail: 100
            })
        );
        // len smaller than the chain: extra bytes ignored.
        let w = wire(&hdr(60, 0), &payload);
        assert_eq!(
            gather(&[&w[..50], &w[50..]]).unwrap().payload,
            &payload[..60]
        );
        // Too short for a header.
        assert_eq!(
            gather(&[&w[..20], &w[20..43]]),
            Err(GatherError::ShortChain(43))
        );
        // Oversized len.
        let big = (MAX_PAYLOAD + 1) as u32;
        let w = wire(&hdr(big, 0), &[]);
        assert_eq!(gather(&[&w[..]]), Err(GatherError::TooLong(big)));
        // Zero-length payload.
        let w = wire(&hdr(0, 0), &[]);
        assert!(gather(&[&w[..]]).unwrap().payload.is_empty());
    }

    /// Deliver `pkt` over rx buffers of the given sizes (each buffer made of
    /// `pieces` descriptors); returns the written buffers, truncated to the
    /// used length.
    fn split(pkt: Packet, sizes: &[usize], pieces: usize) -> (Vec<Vec<u8>>, Option<InFlight>) {
        let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&s| vec![0xAA; s]).collect();
        bufs.reverse();
        let mut out = Vec::new();
        let mut cur = None;
        let mut once = Some(pkt);
        deliver(
            &mut cur,
            || once.take(),
            |_| panic!("started packet given back"),
            |p, off| {
                let Some(mut b) = bufs.pop() else {
                    return RxStep::NoBuffer;
                };
                let step = {
                    let chunk = b.len().div_ceil(pieces).max(1);
                    let mut segs: Vec<&mut [u8]> = b.chunks_mut(chunk).collect();
                    write_fragment(p, off, &mut segs).ok()
                };
                match step {
                    Some(f) => {
                        b.truncate(f.used);
                        out.push(b);
                        RxStep::Wrote(off + f.payload)
                    }
                    None => RxStep::Skipped,
                }
            },
        );
        (out, cur)
    }

    #[test]
    fn split_over_buffers_of_different_sizes() {
        let payload = pattern(10_000);
        let pkt = Packet::with_payload(hdr(0, 0), payload.clone());
        let sizes = [3776, 100, HDR_LEN + 1, 2000, 65536];
        for pieces in [1, 3] {
            let (bufs, cur) = split(pkt.clone(), &sizes, pieces);
            assert!(cur.is_none());
            let lens: Vec<usize> = bufs.iter().map(|b| b.len() - HDR_LEN).collect();
            assert_eq!(lens, vec![3732, 56, 1, 1956, 10_000 - 3732 - 56 - 1 - 1956]);
            let mut joined = Vec::new();
            for b in &bufs {
                let mut hb = [0u8; HDR_LEN];
                hb.copy_from_slice(&b[..HDR_LEN]);
                let h = Hdr::from_bytes(&hb);
                assert_eq!(h.len as usize, b.len() - HDR_LEN);
                assert_eq!(Hdr { len: 0, ..h }, hdr(0, 0));
                joined.extend_from_slice(&b[HDR_LEN..]);
            }
            assert_eq!(joined, payload);
        }
    }

    fn flags_of(b: &[u8]) -> u32 {
        let mut hb = [0u8; HDR_LEN];
        hb.copy_from_slice(&b[..HDR_LEN]);
        Hdr::from_bytes(&hb).flags
    }

    #[test]
    fn seqpacket_boundaries_only_on_last_fragment() {
        let other = 0x100; // unrelated flag bits survive
        let pkt = Packet::with_payload(hdr(0, SEQ_EOM | SEQ_EOR | other), pattern(9000));
        let (bufs, _) = split(pkt.clone(), &[4000, 4000, 4000], 2);
        let flags: Vec<u32> = bufs.iter().map(|b| flags_of(b)).collect();
        assert_eq!(flags, vec![other, other, SEQ_EOM | SEQ_EOR | other]);
        // Fits in one buffer: flags preserved.
        let (bufs, _) = split(pkt, &[9044], 1);
        assert_eq!(bufs.len(), 1);
        assert_eq!(flags_of(&bufs[0]), SEQ_EOM | SEQ_EOR | other);
        // EOM without EOR.
        let pkt = Packet::with_payload(hdr(0, SEQ_EOM), pattern(100));
        let (bufs, _) = split(pkt, &[100, 100], 1);
        assert_eq!(flags_of(&bufs[0]), 0);
        assert_eq!(flags_of(&bufs[1]), SEQ_EOM);
    }

    #[test]
    fn control_packet_and_bad_buffers() {
        // A zero-payload packet uses exactly one buffer, even a header-sized
        // one; buffers smaller than a header are skipped without losing it.
        let pkt = Packet::control(Hdr {
            op: op::REQUEST,
            ..hdr(0, 0)
        });
        let (bufs, cur) = split(pkt, &[10, HDR_LEN], 1);
        assert!(cur.is_none());
        assert_eq!(bufs.len(), 1);
        assert_eq!(bufs[0].len(), HDR_LEN);
    }

    #[test]
    fn out_of_buffers_keeps_remainder() {
        let payload = pattern(5000);
        let pkt = Packet::with_payload(hdr(0, SEQ_EOM), payload.clone());
        let (first, cur) = split(pkt, &[1044, 1044], 1);
        let cur = cur.expect("remainder must stay queued");
        assert_eq!(cur.off, 2000);
        // Receiver posts more buffers later.
        let mut cur = Some(cur);
        let mut out = first;
        let mut bufs = vec![vec![0u8; 8192]];
        deliver(
            &mut cur,
            || None,
            |_| unreachable!(),
            |p, off| match bufs.pop() {
                None => RxStep::NoBuffer,
                Some(mut b) => {
                    let f = write_fragment(p, off, &mut [&mut b[..]]).unwrap();
                    b.truncate(f.used);
                    out.push(b);
                    RxStep::Wrote(off + f.payload)
                }
            },
        );
        assert!(cur.is_none());
        let joined: Vec<u8> = out.iter().flat_map(|b| b[HDR_LEN..].to_vec()).collect();
        assert_eq!(joined, payload);
        assert_eq!(flags_of(&out[2]), SEQ_EOM);
        assert_eq!(flags_of(&out[1]), 0);
    }

    #[test]
    fn unstarted_packet_goes_back_to_its_queue() {
        let mut q: std::collections::VecDeque<Packet> =
            vec![Packet::with_payload(hdr(0, 0), vec![1; 10])].into();
        let mut cur = None;
        let mut back = None;
        let used = deliver(
            &mut cur,
            || q.pop_front(),
            |p| back = Some(p),
            |_, _| RxStep::NoBuffer,
        );
        assert_eq!(used, 0);
        assert!(cur.is_none());
        assert_eq!(back.map(|p| p.payload.len()), Some(10));
    }

    #[test]
    fn deliver_preserves_order() {
        let pkts: Vec<Packet> = (0..5)
            .map(|i| Packet::with_payload(hdr(0, 0), vec![i as u8; 100 * i]))
            .collect();
        let mut q: std::collections::VecDeque<Packet> = pkts.clone().into();
        let mut cur = None;
        let mut seen = Vec::new();
        let used = deliver(
            &mut cur,
            || q.pop_front(),
            |_| unreachable!(),
            |p, off| {
                let mut b = [0u8; HDR_LEN + 64];
                let f = write_fragment(p, off, &mut [&mut b[..]]).unwrap();
                seen.extend_from_slice(&b[HDR_LEN..f.used]);
                RxStep::Wrote(off + f.payload)
            },
        );
        let want: Vec<u8> = pkts.iter().flat_map(|p| p.payload.clone()).collect();
        assert_eq!(seen, want);
        // 1 + 2 + 4 + 5 + 7 fragments (0-payload packet uses one buffer).
        assert_eq!(used, 1 + 2 + 4 + 5 + 7);
    }
}
