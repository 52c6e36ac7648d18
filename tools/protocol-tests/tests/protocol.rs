// SPDX-License-Identifier: GPL-2.0

//! Tests of the protocol layer outside `validate_rx`.

use virtio_vsock_rs::protocol::*;

#[test]
fn hdr_size_and_offsets() {
    assert_eq!(HDR_SIZE, 44);
    assert_eq!(HDR_SIZE_U32 as usize, HDR_SIZE);
    let hdr = Hdr {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 0x1112_1314_1516_1718,
        src_port: 0x2122_2324,
        dst_port: 0x3132_3334,
        len: 0x4142_4344,
        type_: 0x5152,
        op: 0x6162,
        flags: 0x7172_7374,
        buf_alloc: 0x8182_8384,
        fwd_cnt: 0x9192_9394,
    };
    let b = hdr.to_bytes();
    let expected: [u8; HDR_SIZE] = [
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // src_cid
        0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, // dst_cid
        0x24, 0x23, 0x22, 0x21, // src_port
        0x34, 0x33, 0x32, 0x31, // dst_port
        0x44, 0x43, 0x42, 0x41, // len
        0x52, 0x51, // type
        0x62, 0x61, // op
        0x74, 0x73, 0x72, 0x71, // flags
        0x84, 0x83, 0x82, 0x81, // buf_alloc
        0x94, 0x93, 0x92, 0x91, // fwd_cnt
    ];
    assert_eq!(b, expected);
    assert_eq!(Hdr::parse(&b), Some(hdr));
}

#[test]
fn hdr_parse_ignores_trailing_bytes() {
    let hdr = Hdr {
        len: 3,
        ..Hdr::default()
    };
    let mut buf = [0xffu8; 64];
    hdr.write_to(&mut buf).unwrap();
    assert!(buf[HDR_SIZE..].iter().all(|b| *b == 0xff));
    assert_eq!(Hdr::parse(&buf), Some(hdr));
}

#[test]
fn hdr_short_buffers() {
    let hdr = Hdr::default();
    for n in 0..HDR_SIZE {
        let mut buf = vec![0u8; n];
        assert_eq!(hdr.write_to(&mut buf), None, "n={n}");
        assert_eq!(Hdr::parse(&buf), None, "n={n}");
    }
}

#[test]
fn type_and_op_values_match_uapi() {
    assert_eq!(Type::Stream.as_raw(), 1);
    assert_eq!(Type::SeqPacket.as_raw(), 2);
    let ops = [
        (Op::Invalid, 0),
        (Op::Request, 1),
        (Op::Response, 2),
        (Op::Rst, 3),
        (Op::Shutdown, 4),
        (Op::Rw, 5),
        (Op::CreditUpdate, 6),
        (Op::CreditRequest, 7),
    ];
    for (op, raw) in ops {
        assert_eq!(op.as_raw(), raw);
        assert_eq!(Op::from_raw(raw), Some(op));
        assert!(!op.as_str().is_empty());
        assert_eq!(op.carries_payload(), op == Op::Rw);
    }
    for t in Type::ALL {
        assert_eq!(Type::from_raw(t.as_raw()), Some(t));
    }
    assert_eq!(Type::from_raw(0), None);
    assert_eq!(Op::VALID.len(), 7);
    assert!(!Op::VALID.contains(&Op::Invalid));
    assert_eq!((SHUTDOWN_RCV, SHUTDOWN_SEND, SHUTDOWN_MASK), (1, 2, 3));
    assert_eq!((SEQ_EOM, SEQ_EOR), (1, 2));
    assert_eq!((F_STREAM, F_SEQPACKET, F_NO_IMPLIED_STREAM), (0, 1, 2));
    assert_eq!(VIRTIO_ID_VSOCK, 19);
    assert_eq!((VQ_RX, VQ_TX, VQ_EVENT, VQ_MAX), (0, 1, 2, 3));
}

#[test]
fn features() {
    assert!(Features::NONE.allows(Type::Stream));
    assert!(!Features::NONE.allows(Type::SeqPacket));
    let f = Features::NONE.with(F_SEQPACKET);
    assert_eq!(f.bits(), 2);
    assert!(f.has(F_SEQPACKET));
    assert!(!f.has(64));
    assert!(!f.has(u32::MAX));
    assert_eq!(f.with(64), f);
    assert!(!Features::NONE
        .with(F_NO_IMPLIED_STREAM)
        .allows(Type::Stream));
    assert!(Features::from_bits(0b101).allows(Type::Stream));
    assert_eq!(DRIVER_FEATURES, [F_SEQPACKET]);
}

#[test]
fn guest_cid_config() {
    for cid in [0u64, 1, 2, 0xffff_ffff] {
        assert_eq!(
            guest_cid_from_config(cid),
            Err(CidError::Reserved(cid as u32))
        );
    }
    for cid in [3u64, 4, 0xffff_fffe] {
        assert_eq!(guest_cid_from_config(cid), Ok(cid as u32));
    }
    for cid in [1u64 << 32, (1 << 32) | 3, u64::MAX] {
        assert_eq!(guest_cid_from_config(cid), Err(CidError::UpperBits(cid)));
    }
    assert_eq!(
        guest_cid_from_config_bytes([42, 0, 0, 0, 0, 0, 0, 0]),
        Ok(42)
    );
    assert_eq!(
        guest_cid_from_config_bytes([3, 0, 0, 0, 1, 0, 0, 0]),
        Err(CidError::UpperBits((1 << 32) | 3))
    );
    assert_eq!((CONFIG_SIZE, CONFIG_GUEST_CID_OFFSET), (8, 0));
}

#[test]
fn events() {
    assert_eq!(parse_event(4, &[0, 0, 0, 0]), Ok(Event::TransportReset));
    assert_eq!(parse_event(4, &[0, 0, 0, 0, 9]), Ok(Event::TransportReset));
    assert_eq!(
        parse_event(4, &[1, 2, 3, 4]),
        Ok(Event::Unknown(0x0403_0201))
    );
    for len in [0, 1, 3, 5, 8, u32::MAX] {
        assert_eq!(parse_event(len, &[0; 8]), Err(EventError::BadLength(len)));
    }
    assert_eq!(parse_event(4, &[0, 0, 0]), Err(EventError::BadLength(4)));
    assert_eq!(
        (EVENT_SIZE, EVENT_SIZE_U32, EVENT_TRANSPORT_RESET),
        (4, 4, 0)
    );
}

#[test]
fn rx_buf_sizing() {
    assert_eq!(rx_buf_size(320, 64), Some(3776));
    assert_eq!(rx_buf_size(320, 128), Some(3712));
    assert_eq!(rx_buf_size(0, 64), Some(4096));
    assert_eq!(rx_buf_size(320, 0), None);
    assert_eq!(rx_buf_size(320, 3), None);
    assert_eq!(rx_buf_size(u32::MAX, 64), None);
    assert_eq!(rx_buf_size(4096, 64), None);
    assert_eq!(rx_buf_size(4096 - 44, 1), None);
    assert_eq!(rx_buf_size(4096 - 45, 1), Some(45));
    assert_eq!(RX_BUF_ALLOC, 4096);
    assert_eq!(MAX_PKT_BUF_SIZE, 65536);
    assert_eq!(MAX_BUF_SIZE, u32::MAX);
    assert_eq!(EVENT_BUFS, 8);
}

#[test]
fn flow_control() {
    // Refill when fewer than half of the most ever posted remain.
    assert!(rx_refill_needed(0, 128));
    assert!(rx_refill_needed(63, 128));
    assert!(!rx_refill_needed(64, 128));
    assert!(!rx_refill_needed(0, 0));
    assert!(!rx_refill_needed(0, 1));
    // Replies.
    assert!(more_replies(0, 128));
    assert!(more_replies(127, 128));
    assert!(!more_replies(128, 128));
    assert!(!more_replies(0, 0));
    assert!(reply_sent_restarts_rx(127, 128));
    assert!(!reply_sent_restarts_rx(126, 128));
    assert!(!reply_sent_restarts_rx(128, 128));
    assert!(!reply_sent_restarts_rx(u32::MAX, 0));
    assert!(cancel_restarts_rx(100, 28, 128));
    assert!(cancel_restarts_rx(127, 5, 128));
    assert!(!cancel_restarts_rx(100, 27, 128));
    assert!(!cancel_restarts_rx(128, 5, 128));
    assert!(cancel_restarts_rx(0, u32::MAX, 128));
    // Tx to self.
    assert!(!tx_dst_allowed(3, 3));
    assert!(tx_dst_allowed(2, 3));
    assert!(tx_dst_allowed((1 << 32) | 3, 3));
}

#[test]
fn drop_reasons_are_dense_and_named() {
    assert_eq!(DropReason::ALL.len(), DropReason::COUNT);
    let mut names = std::collections::HashSet::new();
    for (i, r) in DropReason::ALL.into_iter().enumerate() {
        assert_eq!(r.index(), i);
        assert_eq!(DropReason::from_index(i), Some(r));
        assert!(names.insert(r.as_str()), "duplicate {}", r.as_str());
        assert!(r
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_'));
    }
    assert_eq!(DropReason::from_index(DropReason::COUNT), None);
    assert_eq!(DropReason::from_index(usize::MAX), None);
}

#[test]
fn counters_are_dense_and_named() {
    let all: Vec<Counter> = Counter::iter().collect();
    assert_eq!(all.len(), Counter::COUNT);
    let mut names = std::collections::HashSet::new();
    for (i, c) in all.iter().enumerate() {
        assert_eq!(c.index(), i, "{c:?}");
        assert_eq!(Counter::from_index(i), Some(*c));
        assert!(names.insert(c.name()), "duplicate {}", c.name());
        assert!(c
            .name()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_'));
    }
    assert_eq!(Counter::from_index(Counter::COUNT), None);
    assert_eq!(Counter::from_index(usize::MAX), None);
    // Every drop reason has its own counter, named after the reason.
    for r in DropReason::ALL {
        let c = Counter::RxDropped(r);
        assert!(all.contains(&c));
        assert_eq!(c.name(), format!("rx_dropped_{}", r.as_str()));
    }
    for c in [
        Counter::RxPackets,
        Counter::RxBytes,
        Counter::TxPackets,
        Counter::TxBytes,
        Counter::TxQueueFull,
        Counter::EventTransportReset,
    ] {
        assert!(all.contains(&c));
    }
    assert_eq!(Counter::RxPackets.name(), "rx_packets");
    assert_eq!(Counter::TxQueueFull.name(), "tx_queue_full");
}

// Rx buffer layout: linear page plus order-0 fragments, memory bound.

#[test]
fn rx_layout_every_payload() {
    use virtio_vsock_rs::protocol::{RxLayout, HDR_SIZE_U32, MAX_PKT_BUF_SIZE, RX_MEM_FACTOR};
    let (linear_buf, page) = (3776, 4096);
    let c = RxLayout::new(0, linear_buf, page);
    for payload in (0..=70_000).step_by(97).chain([u32::MAX, MAX_PKT_BUF_SIZE]) {
        let l = RxLayout::new(payload, linear_buf, page);
        assert_eq!(l.linear, linear_buf - HDR_SIZE_U32);
        assert!(
            l.payload() >= c.payload() && l.payload() <= MAX_PKT_BUF_SIZE,
            "{payload}"
        );
        assert_eq!(l.capacity(), l.payload() + HDR_SIZE_U32);
        // Enough pages, and not one too many.
        assert!(
            l.pages * page >= l.frags && l.pages * page < l.frags + page,
            "{payload}"
        );
        assert!(l.pages as usize <= 17 - 1, "fits MAX_SKB_FRAGS");
        for ring in [1u32, 2, 16, 64, 128, 256, 1024] {
            let n = l.max_bufs(ring);
            assert!(n >= 1 && n <= ring);
            // Memory bound: never more than RX_MEM_FACTOR x C's ring of pages.
            assert!(
                n * l.pages_used() <= RX_MEM_FACTOR * ring || n == 1,
                "{payload} {ring}"
            );
        }
    }
    assert_eq!(c.max_bufs(128), 128);
    assert_eq!(c.pages, 0);
}

// Rx buffer sizing: every layout the sizer picks is one the driver can post.

#[test]
fn rx_sizer_layouts_stay_within_the_largest() {
    use virtio_vsock_rs::protocol::{RxLayout, RxSizer, RX_SIZE_DECAY};
    let page = 4096;
    for max_payload in [0u32, 3732, 4000, 8192, 40_000, 65_536] {
        let max = RxLayout::new(max_payload, 3776, page);
        let mut sizer = RxSizer::new(max, page);
        // A deterministic mix: small, medium, full-buffer and zero-length packets.
        let mut x: u32 = 12345;
        let mut room = sizer.layout().payload();
        for _ in 0..20_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let payload = match x >> 29 {
                0 => 0,
                1 | 2 => x % 128,
                3 | 4 => x % 20_000,
                _ => room,
            }
            .min(room);
            let before = sizer.layout();
            sizer.observe(payload, room);
            let l = sizer.layout();
            assert_eq!(l.linear, max.linear);
            assert!(
                l.pages <= max.pages && l.payload() <= max.payload(),
                "{l:?} {max:?}"
            );
            assert!(l.frags <= l.pages * page && l.pages * page < l.frags + page);
            // A packet that filled its buffer asks for the largest one.
            if payload == room && room > 0 {
                assert_eq!(l, max);
            }
            // Otherwise the estimate falls by at most 1/RX_SIZE_DECAY, so the
            // next buffer holds a payload of this size.
            if payload < room && payload > max.linear {
                assert!(l.payload() >= payload, "{payload} {l:?}");
            }
            // And falls no faster than that.
            if payload < room {
                let floor = before.payload().saturating_sub(page);
                assert!(
                    l.payload() + 1 >= floor / RX_SIZE_DECAY * (RX_SIZE_DECAY - 1),
                    "{before:?} -> {l:?}"
                );
            }
            room = l.payload();
        }
    }
}
