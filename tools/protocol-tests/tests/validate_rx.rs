// SPDX-License-Identifier: GPL-2.0

//! Tests of `validate_rx`: every malformed-header class and every good case.

use virtio_vsock_rs::protocol::{
    answer_rejected, validate_rx, DropReason, Features, Hdr, Op, Type, F_NO_IMPLIED_STREAM,
    F_SEQPACKET, F_STREAM, HDR_SIZE, HDR_SIZE_U32, SEQ_EOM, SEQ_EOR, SHUTDOWN_MASK, VMADDR_CID_ANY,
    VMADDR_CID_HOST, VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL,
};

const GUEST: u32 = 3;
const CAP: u32 = 3776;
const SEQ: Features = Features::from_bits(1 << F_SEQPACKET);

/// A header as Linux vhost-vsock sends it: host to guest, stream.
fn base(op: Op, len: u32) -> Hdr {
    Hdr {
        src_cid: u64::from(VMADDR_CID_HOST),
        dst_cid: u64::from(GUEST),
        src_port: 1234,
        dst_port: 5678,
        len,
        type_: Type::Stream.as_raw(),
        op: op.as_raw(),
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

/// Builds the buffer for `hdr` followed by its payload, and validates it
/// with a used length of exactly header plus payload.
fn check(hdr: &Hdr, features: Features) -> Result<virtio_vsock_rs::protocol::ValidHdr, DropReason> {
    let mut buf = [0u8; CAP as usize];
    hdr.write_to(&mut buf).unwrap();
    let used = HDR_SIZE_U32.saturating_add(hdr.len).min(CAP);
    validate_rx(used, CAP, &buf, GUEST, features)
}

// Length classes.

#[test]
fn short_used_len_every_value() {
    let bytes = base(Op::Request, 0).to_bytes();
    for used in 0..HDR_SIZE_U32 {
        assert_eq!(
            validate_rx(used, CAP, &bytes, GUEST, Features::NONE),
            Err(DropReason::ShortBuffer),
            "used={used}"
        );
    }
    assert!(validate_rx(HDR_SIZE_U32, CAP, &bytes, GUEST, Features::NONE).is_ok());
}

#[test]
fn short_bytes_slice_every_value() {
    let bytes = base(Op::Request, 0).to_bytes();
    for n in 0..HDR_SIZE {
        assert_eq!(
            validate_rx(HDR_SIZE_U32, CAP, &bytes[..n], GUEST, Features::NONE),
            Err(DropReason::ShortBuffer),
            "n={n}"
        );
    }
}

#[test]
fn short_buffer_wins_over_capacity() {
    // A capacity smaller than a header cannot hold one: still a short buffer.
    let bytes = base(Op::Request, 0).to_bytes();
    assert_eq!(
        validate_rx(10, 5, &bytes, GUEST, Features::NONE),
        Err(DropReason::ShortBuffer)
    );
}

#[test]
fn used_len_over_capacity() {
    let bytes = base(Op::Request, 0).to_bytes();
    for (used, cap) in [
        (CAP + 1, CAP),
        (u32::MAX, CAP),
        (HDR_SIZE_U32 + 1, HDR_SIZE_U32),
        (HDR_SIZE_U32, 0),
        (HDR_SIZE_U32, HDR_SIZE_U32 - 1),
    ] {
        assert_eq!(
            validate_rx(used, cap, &bytes, GUEST, Features::NONE),
            Err(DropReason::UsedLenOverCapacity),
            "used={used} cap={cap}"
        );
    }
    assert!(validate_rx(CAP, CAP, &bytes, GUEST, Features::NONE).is_ok());
}

#[test]
fn payload_too_long() {
    for len in [1, 100, CAP - HDR_SIZE_U32 + 1, u32::MAX] {
        let bytes = base(Op::Rw, len).to_bytes();
        assert_eq!(
            validate_rx(HDR_SIZE_U32, CAP, &bytes, GUEST, Features::NONE),
            Err(DropReason::PayloadTooLong),
            "len={len}"
        );
    }
    // One byte more than written.
    let bytes = base(Op::Rw, 101).to_bytes();
    assert_eq!(
        validate_rx(HDR_SIZE_U32 + 100, CAP, &bytes, GUEST, Features::NONE),
        Err(DropReason::PayloadTooLong)
    );
}

#[test]
fn payload_fits_exactly_and_with_slack() {
    let bytes = base(Op::Rw, 100).to_bytes();
    let v = validate_rx(HDR_SIZE_U32 + 100, CAP, &bytes, GUEST, Features::NONE).unwrap();
    assert_eq!(v.payload_len(), 100);
    // A used length larger than header plus payload is accepted, as in C.
    let v = validate_rx(CAP, CAP, &bytes, GUEST, Features::NONE).unwrap();
    assert_eq!(v.payload_len(), 100);
    // The largest payload a buffer can hold.
    let max = CAP - HDR_SIZE_U32;
    let v = check(&base(Op::Rw, max), Features::NONE).unwrap();
    assert_eq!(v.payload_len(), max);
}

#[test]
fn only_header_bytes_are_needed() {
    // The driver may pass only the header, whatever the used length.
    let bytes = base(Op::Rw, 1000).to_bytes();
    let v = validate_rx(HDR_SIZE_U32 + 1000, CAP, &bytes, GUEST, Features::NONE).unwrap();
    assert_eq!(v.payload_len(), 1000);
}

// Type classes.

#[test]
fn every_unknown_type() {
    for raw in (0..=u16::MAX).filter(|t| Type::from_raw(*t).is_none()) {
        let mut hdr = base(Op::Request, 0);
        hdr.type_ = raw;
        for features in [Features::NONE, SEQ, Features::from_bits(u64::MAX)] {
            assert_eq!(
                check(&hdr, features),
                Err(DropReason::UnknownType),
                "type={raw}"
            );
        }
    }
}

#[test]
fn seqpacket_not_negotiated() {
    for op in Op::VALID {
        let len = if op == Op::Rw { 10 } else { 0 };
        let mut hdr = base(op, len);
        hdr.type_ = Type::SeqPacket.as_raw();
        for f in [
            Features::NONE,
            Features::NONE.with(F_STREAM),
            Features::NONE.with(F_NO_IMPLIED_STREAM),
            Features::from_bits(!(1 << F_SEQPACKET)),
        ] {
            assert_eq!(
                check(&hdr, f),
                Err(DropReason::TypeNotNegotiated),
                "{op:?} {f:?}"
            );
        }
        assert!(check(&hdr, SEQ).is_ok(), "{op:?}");
    }
}

#[test]
fn stream_not_negotiated_with_no_implied_stream() {
    let hdr = base(Op::Request, 0);
    let only_seq = SEQ.with(F_NO_IMPLIED_STREAM);
    assert_eq!(check(&hdr, only_seq), Err(DropReason::TypeNotNegotiated));
    assert!(check(&hdr, only_seq.with(F_STREAM)).is_ok());
    assert!(check(&hdr, Features::NONE.with(F_STREAM)).is_ok());
}

// Op classes.

#[test]
fn invalid_op() {
    let mut hdr = base(Op::Request, 0);
    hdr.op = 0;
    assert_eq!(check(&hdr, Features::NONE), Err(DropReason::InvalidOp));
    hdr.type_ = Type::SeqPacket.as_raw();
    assert_eq!(check(&hdr, SEQ), Err(DropReason::InvalidOp));
}

#[test]
fn every_unknown_op() {
    for raw in 8..=u16::MAX {
        let mut hdr = base(Op::Request, 0);
        hdr.op = raw;
        assert_eq!(
            check(&hdr, Features::NONE),
            Err(DropReason::UnknownOp),
            "op={raw}"
        );
    }
}

#[test]
fn control_ops_with_payload() {
    for op in Op::VALID.into_iter().filter(|op| *op != Op::Rw) {
        for len in [1, 4, CAP - HDR_SIZE_U32] {
            for t in Type::ALL {
                let mut hdr = base(op, len);
                hdr.type_ = t.as_raw();
                assert_eq!(
                    check(&hdr, SEQ),
                    Err(DropReason::ControlWithPayload),
                    "{op:?} {t:?} len={len}"
                );
            }
        }
    }
}

// Address classes.

#[test]
fn cid_upper_bits() {
    for bit in 32..64 {
        let mut hdr = base(Op::Request, 0);
        hdr.src_cid |= 1 << bit;
        assert_eq!(
            check(&hdr, Features::NONE),
            Err(DropReason::CidUpperBits),
            "src bit {bit}"
        );
        let mut hdr = base(Op::Request, 0);
        hdr.dst_cid |= 1 << bit;
        assert_eq!(
            check(&hdr, Features::NONE),
            Err(DropReason::CidUpperBits),
            "dst bit {bit}"
        );
    }
    let mut hdr = base(Op::Request, 0);
    hdr.src_cid = u64::MAX;
    hdr.dst_cid = u64::MAX;
    assert_eq!(check(&hdr, Features::NONE), Err(DropReason::CidUpperBits));
}

#[test]
fn wrong_dst_cid() {
    for dst in [0, 1, 2, 4, 0x1234_5678, VMADDR_CID_ANY] {
        let mut hdr = base(Op::Request, 0);
        hdr.dst_cid = u64::from(dst);
        assert_eq!(
            check(&hdr, Features::NONE),
            Err(DropReason::WrongDstCid),
            "dst={dst}"
        );
    }
}

#[test]
fn bad_src_cid() {
    for src in [VMADDR_CID_ANY, VMADDR_CID_LOCAL, GUEST] {
        let mut hdr = base(Op::Request, 0);
        hdr.src_cid = u64::from(src);
        assert_eq!(
            check(&hdr, Features::NONE),
            Err(DropReason::BadSrcCid),
            "src={src}"
        );
    }
}

#[test]
fn good_src_cids() {
    // Hypervisor, host, and sibling guests.
    for src in [
        VMADDR_CID_HYPERVISOR,
        VMADDR_CID_HOST,
        4,
        1000,
        VMADDR_CID_ANY - 1,
    ] {
        let mut hdr = base(Op::Request, 0);
        hdr.src_cid = u64::from(src);
        let v = check(&hdr, Features::NONE).unwrap();
        assert_eq!(v.src_cid(), src);
    }
}

#[test]
fn unchecked_fields_are_accepted() {
    // Any port, flags, buf_alloc and fwd_cnt.
    for v in [0, 1, 1024, u32::MAX] {
        let mut hdr = base(Op::Rw, 1);
        hdr.src_port = v;
        hdr.dst_port = v;
        hdr.flags = v;
        hdr.buf_alloc = v;
        hdr.fwd_cnt = v;
        let valid = check(&hdr, Features::NONE).unwrap();
        assert_eq!(valid.src_port(), v);
        assert_eq!(valid.dst_port(), v);
        assert_eq!(valid.flags(), v);
        assert_eq!(valid.buf_alloc(), v);
        assert_eq!(valid.fwd_cnt(), v);
    }
}

// Order of the rules: the first failing one is reported.

#[test]
fn rule_order() {
    let mut hdr = base(Op::Request, 7);
    hdr.type_ = 9;
    hdr.op = 0;
    hdr.dst_cid = 1 << 40;
    hdr.src_cid = u64::from(GUEST);
    let b = hdr.to_bytes();
    let f = Features::NONE;
    assert_eq!(
        validate_rx(1, CAP, &b, GUEST, f),
        Err(DropReason::ShortBuffer)
    );
    assert_eq!(
        validate_rx(CAP + 1, CAP, &b, GUEST, f),
        Err(DropReason::UsedLenOverCapacity)
    );
    assert_eq!(
        validate_rx(HDR_SIZE_U32, CAP, &b, GUEST, f),
        Err(DropReason::PayloadTooLong)
    );
    let used = HDR_SIZE_U32 + 7;
    assert_eq!(
        validate_rx(used, CAP, &b, GUEST, f),
        Err(DropReason::UnknownType)
    );
    hdr.type_ = Type::SeqPacket.as_raw();
    let b = hdr.to_bytes();
    assert_eq!(
        validate_rx(used, CAP, &b, GUEST, f),
        Err(DropReason::TypeNotNegotiated)
    );
    assert_eq!(
        validate_rx(used, CAP, &b, GUEST, SEQ),
        Err(DropReason::InvalidOp)
    );
    hdr.op = Op::Response.as_raw();
    let b = hdr.to_bytes();
    assert_eq!(
        validate_rx(used, CAP, &b, GUEST, SEQ),
        Err(DropReason::ControlWithPayload)
    );
    hdr.len = 0;
    let b = hdr.to_bytes();
    assert_eq!(
        validate_rx(used, CAP, &b, GUEST, SEQ),
        Err(DropReason::CidUpperBits)
    );
    hdr.dst_cid = 4;
    let b = hdr.to_bytes();
    assert_eq!(
        validate_rx(used, CAP, &b, GUEST, SEQ),
        Err(DropReason::WrongDstCid)
    );
    hdr.dst_cid = u64::from(GUEST);
    let b = hdr.to_bytes();
    assert_eq!(
        validate_rx(used, CAP, &b, GUEST, SEQ),
        Err(DropReason::BadSrcCid)
    );
    hdr.src_cid = 2;
    let b = hdr.to_bytes();
    assert!(validate_rx(used, CAP, &b, GUEST, SEQ).is_ok());
}

// Good cases.

#[test]
fn every_valid_op_and_type() {
    for t in Type::ALL {
        for op in Op::VALID {
            for len in [0u32, 1, 4096 - 320 - HDR_SIZE_U32] {
                if len != 0 && op != Op::Rw {
                    continue;
                }
                let mut hdr = base(op, len);
                hdr.type_ = t.as_raw();
                let v = check(&hdr, SEQ).unwrap_or_else(|e| panic!("{t:?} {op:?} {len}: {e:?}"));
                assert_eq!(v.packet_type(), t);
                assert_eq!(v.op(), op);
                assert_eq!(v.payload_len(), len);
                assert_eq!(v.dst_cid(), GUEST);
                assert_eq!(v.src_cid(), VMADDR_CID_HOST);
                assert_eq!(v.src_port(), 1234);
                assert_eq!(v.dst_port(), 5678);
                assert_eq!(*v.hdr(), hdr);
            }
        }
    }
}

#[test]
fn stream_needs_no_feature() {
    for op in Op::VALID {
        assert!(check(&base(op, 0), Features::NONE).is_ok(), "{op:?}");
    }
}

#[test]
fn what_linux_sends() {
    // Packets as virtio_transport_common.c builds them.
    let mut shutdown = base(Op::Shutdown, 0);
    shutdown.flags = SHUTDOWN_MASK;
    let mut eom = base(Op::Rw, 64);
    eom.type_ = Type::SeqPacket.as_raw();
    eom.flags = SEQ_EOM | SEQ_EOR;
    let mut rst = base(Op::Rst, 0);
    rst.buf_alloc = 0;
    let credit = base(Op::CreditUpdate, 0);
    for hdr in [shutdown, eom, rst, credit] {
        assert!(check(&hdr, SEQ).is_ok(), "{hdr:?}");
    }
}

#[test]
fn header_is_read_little_endian() {
    let mut b = [0u8; HDR_SIZE];
    b[0] = 2; // src_cid
    b[8] = 3; // dst_cid
    b[16..20].copy_from_slice(&0x0102_0304u32.to_le_bytes()); // src_port
    b[20..24].copy_from_slice(&0x0506_0708u32.to_le_bytes()); // dst_port
    b[24] = 0; // len
    b[28] = 1; // type
    b[30] = 1; // op
    b[32] = 0xaa; // flags
    b[36..40].copy_from_slice(&0x0001_0000u32.to_le_bytes()); // buf_alloc
    b[40..44].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // fwd_cnt
    let v = validate_rx(HDR_SIZE_U32, CAP, &b, GUEST, Features::NONE).unwrap();
    assert_eq!(v.src_port(), 0x0102_0304);
    assert_eq!(v.dst_port(), 0x0506_0708);
    assert_eq!(v.flags(), 0xaa);
    assert_eq!(v.buf_alloc(), 0x1_0000);
    assert_eq!(v.fwd_cnt(), 0xdead_beef);
    assert_eq!(v.op(), Op::Request);
    assert_eq!(v.packet_type(), Type::Stream);
    // A big-endian `type` would be 0x0100: unknown.
    b[28] = 0;
    b[29] = 1;
    assert_eq!(
        validate_rx(HDR_SIZE_U32, CAP, &b, GUEST, Features::NONE),
        Err(DropReason::UnknownType)
    );
}

// A guest without a usable CID.

#[test]
fn no_guest_cid_drops_everything() {
    for dst in [u64::from(GUEST), u64::from(VMADDR_CID_ANY)] {
        let hdr = Hdr {
            dst_cid: dst,
            ..base(Op::Request, 0)
        };
        let bytes = hdr.to_bytes();
        assert_eq!(
            validate_rx(HDR_SIZE_U32, CAP, &bytes, VMADDR_CID_ANY, Features::NONE),
            Err(DropReason::WrongDstCid),
            "dst={dst:#x}"
        );
    }
}

// Which rejected packets the common code answers.

#[test]
fn answered_classes_are_type_and_op_only() {
    let unknown_type = Hdr {
        type_: 9,
        ..base(Op::Request, 0)
    };
    let seqpacket = Hdr {
        type_: Type::SeqPacket.as_raw(),
        ..base(Op::Request, 0)
    };
    let invalid_op = Hdr {
        op: 0,
        ..base(Op::Request, 0)
    };
    let unknown_op = Hdr {
        op: 8,
        ..base(Op::Request, 0)
    };
    for (hdr, reason) in [
        (unknown_type, DropReason::UnknownType),
        (seqpacket, DropReason::TypeNotNegotiated),
        (invalid_op, DropReason::InvalidOp),
        (unknown_op, DropReason::UnknownOp),
    ] {
        assert_eq!(check(&hdr, Features::NONE).unwrap_err(), reason);
        assert!(
            answer_rejected(reason, &hdr.to_bytes(), GUEST),
            "{reason:?}"
        );
    }
    let ok = base(Op::Request, 0).to_bytes();
    for reason in DropReason::ALL {
        let answered = matches!(
            reason,
            DropReason::UnknownType
                | DropReason::TypeNotNegotiated
                | DropReason::InvalidOp
                | DropReason::UnknownOp
        );
        assert_eq!(answer_rejected(reason, &ok, GUEST), answered, "{reason:?}");
    }
}

#[test]
fn answered_only_when_addresses_are_sane() {
    let good = Hdr {
        type_: 9,
        ..base(Op::Request, 0)
    };
    assert!(answer_rejected(
        DropReason::UnknownType,
        &good.to_bytes(),
        GUEST
    ));
    let bad = [
        Hdr { dst_cid: 4, ..good },
        Hdr {
            dst_cid: u64::from(VMADDR_CID_ANY),
            ..good
        },
        Hdr {
            dst_cid: (1 << 32) | u64::from(GUEST),
            ..good
        },
        Hdr {
            src_cid: 1 << 32 | 2,
            ..good
        },
        Hdr {
            src_cid: u64::from(VMADDR_CID_ANY),
            ..good
        },
        Hdr {
            src_cid: u64::from(VMADDR_CID_LOCAL),
            ..good
        },
        Hdr {
            src_cid: u64::from(GUEST),
            ..good
        },
    ];
    for hdr in bad {
        assert!(
            !answer_rejected(DropReason::UnknownType, &hdr.to_bytes(), GUEST),
            "{hdr:?}"
        );
    }
    // No CID, no answer; a short buffer is never answered.
    assert!(!answer_rejected(
        DropReason::UnknownType,
        &good.to_bytes(),
        VMADDR_CID_ANY
    ));
    assert!(!answer_rejected(
        DropReason::UnknownType,
        &good.to_bytes()[..HDR_SIZE - 1],
        GUEST
    ));
}
