// SPDX-License-Identifier: GPL-2.0

//! Fuzz target: `validate_rx` against an independent reference model.
//!
//! Input layout: one mode byte, then `used_len` (le32), `capacity` (le32),
//! `guest_cid` (le32), negotiated features (le64), then the buffer. Mode bits
//! make the fuzzer reach the accepting paths quickly by deriving some values
//! from the buffer instead of the input:
//!
//! - bit 0: `used_len` is the buffer length,
//! - bit 1: `capacity` is `used_len`,
//! - bit 2: `guest_cid` is the low 32 bits of the header's `dst_cid`,
//! - bit 3: `F_SEQPACKET` is negotiated on top of the given features.
//!
//! Invariants checked: no panic (arithmetic overflow included, debug
//! assertions are on), the result equals the reference model's, and an
//! accepted header's payload fits and its op and type are known and allowed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_vsock_rs::protocol::{
    guest_cid_from_config, parse_event, validate_rx, DropReason, Features, Hdr, Op, Type, HDR_SIZE,
    HDR_SIZE_U32,
};

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    for (i, x) in a.iter_mut().enumerate() {
        *x = b.get(off + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from(le32(b, off)) | (u64::from(le32(b, off + 4)) << 32)
}

fn le16(b: &[u8], off: usize) -> u16 {
    (le32(b, off) & 0xffff) as u16
}

/// The rules of `validate_rx`, written again independently, in u64 arithmetic.
fn reference(used: u32, cap: u32, buf: &[u8], guest: u32, bits: u64) -> Result<(), DropReason> {
    if (used as u64) < 44 || buf.len() < 44 {
        return Err(DropReason::ShortBuffer);
    }
    if used as u64 > cap as u64 {
        return Err(DropReason::UsedLenOverCapacity);
    }
    let len = le32(buf, 24) as u64;
    if len + 44 > used as u64 {
        return Err(DropReason::PayloadTooLong);
    }
    let ty = le16(buf, 28);
    if ty != 1 && ty != 2 {
        return Err(DropReason::UnknownType);
    }
    let seqpacket = bits & 2 != 0;
    let stream = bits & 4 == 0 || bits & 1 != 0;
    if (ty == 2 && !seqpacket) || (ty == 1 && !stream) {
        return Err(DropReason::TypeNotNegotiated);
    }
    let op = le16(buf, 30);
    if op == 0 {
        return Err(DropReason::InvalidOp);
    }
    if op > 7 {
        return Err(DropReason::UnknownOp);
    }
    if op != 5 && len != 0 {
        return Err(DropReason::ControlWithPayload);
    }
    let src = le64(buf, 0);
    let dst = le64(buf, 8);
    if src > u32::MAX as u64 || dst > u32::MAX as u64 {
        return Err(DropReason::CidUpperBits);
    }
    // A driver without a usable CID (VMADDR_CID_ANY) takes no packet.
    if dst != guest as u64 || guest == u32::MAX {
        return Err(DropReason::WrongDstCid);
    }
    if src == u32::MAX as u64 || src == 1 || src == guest as u64 {
        return Err(DropReason::BadSrcCid);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let buf = rest.get(20..).unwrap_or(&[]);
    let mut used = le32(rest, 0);
    let mut cap = le32(rest, 4);
    let mut guest = le32(rest, 8);
    let mut bits = le64(rest, 12);
    if mode & 1 != 0 {
        used = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    }
    if mode & 2 != 0 {
        cap = used;
    }
    if mode & 4 != 0 {
        guest = le32(buf, 8);
    }
    if mode & 8 != 0 {
        bits |= 2;
    }
    let features = Features::from_bits(bits);

    let got = validate_rx(used, cap, buf, guest, features);
    let want = reference(used, cap, buf, guest, bits);
    assert_eq!(
        got.map(|_| ()),
        want,
        "used={used} cap={cap} guest={guest} bits={bits:#x}"
    );

    if let Ok(v) = got {
        let hdr = Hdr::parse(buf).expect("accepted without a header");
        assert_eq!(*v.hdr(), hdr);
        assert!(used >= HDR_SIZE_U32 && used <= cap);
        assert!(v.payload_len() <= used - HDR_SIZE_U32);
        assert_ne!(v.op(), Op::Invalid);
        assert_eq!(Op::from_raw(hdr.op), Some(v.op()));
        assert_eq!(Type::from_raw(hdr.type_), Some(v.packet_type()));
        assert!(features.allows(v.packet_type()));
        assert!(v.payload_len() == 0 || v.op() == Op::Rw);
        assert_eq!(v.dst_cid(), guest);
        assert_eq!(u64::from(v.src_cid()), hdr.src_cid);
        assert_ne!(v.src_cid(), guest);
    }

    // Encoding round trip of whatever header the bytes hold.
    if let Some(hdr) = Hdr::parse(buf) {
        assert_eq!(Hdr::parse(&hdr.to_bytes()), Some(hdr));
        assert_eq!(hdr.to_bytes()[..], buf[..HDR_SIZE]);
    }

    // The other decoders must not panic either.
    let _ = parse_event(used, buf);
    let _ = guest_cid_from_config(le64(buf, 0));
});
