// SPDX-License-Identifier: GPL-2.0

//! Validation of received packets, applied to every used rx buffer.
//!
//! The C driver, `virtio_transport_rx_work()` in
//! [`net/vmw_vsock/virtio_transport.c`](srctree/net/vmw_vsock/virtio_transport.c),
//! only checks lengths before handing the packet to
//! `virtio_transport_recv_pkt()`. [`validate_rx`] applies the same length checks
//! and, in addition, rejects headers that no conforming device (Linux vhost-vsock,
//! QEMU, vhost-user-vsock, Firecracker, cloud-hypervisor) sends, so the rest of
//! the driver only ever sees a [`ValidHdr`].

use super::hdr::{Hdr, Op, Type, HDR_SIZE_U32};
use super::{Features, VMADDR_CID_ANY, VMADDR_CID_LOCAL};

/// Why a received packet was dropped.
///
/// Each reason has a stable index (see [`DropReason::index`]) and name (see
/// [`DropReason::as_str`]), so that the driver can keep one counter per reason
/// and list them by name. New reasons are only ever appended.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The used length, or the buffer passed in, is shorter than the header.
    ShortBuffer = 0,
    /// The device claims to have written more than the buffer holds.
    UsedLenOverCapacity = 1,
    /// The header's `len` is larger than the payload the device wrote.
    PayloadTooLong = 2,
    /// The header's `type` is neither stream nor seqpacket.
    UnknownType = 3,
    /// The header's `type` is known, but its feature was not negotiated.
    TypeNotNegotiated = 4,
    /// The header's `op` is `VIRTIO_VSOCK_OP_INVALID`.
    InvalidOp = 5,
    /// The header's `op` is not a known op.
    UnknownOp = 6,
    /// A control op (anything but `OP_RW`) with a non-zero `len`.
    ControlWithPayload = 7,
    /// The upper 32 bits of `src_cid` or `dst_cid` are not zero.
    CidUpperBits = 8,
    /// `dst_cid` is not the guest's CID.
    WrongDstCid = 9,
    /// `src_cid` is one the device can never send from.
    BadSrcCid = 10,
}

impl DropReason {
    /// Number of drop reasons.
    pub const COUNT: usize = 11;

    /// Every drop reason, in index order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::ShortBuffer,
        DropReason::UsedLenOverCapacity,
        DropReason::PayloadTooLong,
        DropReason::UnknownType,
        DropReason::TypeNotNegotiated,
        DropReason::InvalidOp,
        DropReason::UnknownOp,
        DropReason::ControlWithPayload,
        DropReason::CidUpperBits,
        DropReason::WrongDstCid,
        DropReason::BadSrcCid,
    ];

    /// Returns the stable index of this reason, in `0..DropReason::COUNT`.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Returns the reason with index `index`, or `None` if out of range.
    pub const fn from_index(index: usize) -> Option<Self> {
        if index < DropReason::COUNT {
            Some(DropReason::ALL[index])
        } else {
            None
        }
    }

    /// Returns the stable snake-case name of this reason.
    ///
    /// # Examples
    ///
    /// ```
    /// use virtio_vsock_rs::protocol::DropReason;
    ///
    /// assert_eq!(DropReason::WrongDstCid.as_str(), "wrong_dst_cid");
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::ShortBuffer => "short_buffer",
            DropReason::UsedLenOverCapacity => "used_len_over_capacity",
            DropReason::PayloadTooLong => "payload_too_long",
            DropReason::UnknownType => "unknown_type",
            DropReason::TypeNotNegotiated => "type_not_negotiated",
            DropReason::InvalidOp => "invalid_op",
            DropReason::UnknownOp => "unknown_op",
            DropReason::ControlWithPayload => "control_with_payload",
            DropReason::CidUpperBits => "cid_upper_bits",
            DropReason::WrongDstCid => "wrong_dst_cid",
            DropReason::BadSrcCid => "bad_src_cid",
        }
    }
}

/// A received header that passed [`validate_rx`].
///
/// It can only be built by [`validate_rx`], so holding one means that every
/// rule documented there holds: the type and op are known and allowed, the
/// payload fits in what the device wrote, and the addresses are sane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidHdr {
    hdr: Hdr,
    packet_type: Type,
    op: Op,
}

impl ValidHdr {
    /// Returns the raw header.
    pub const fn hdr(&self) -> &Hdr {
        &self.hdr
    }

    /// Returns the socket type.
    pub const fn packet_type(&self) -> Type {
        self.packet_type
    }

    /// Returns the op, never [`Op::Invalid`].
    pub const fn op(&self) -> Op {
        self.op
    }

    /// Returns the payload length, which fits in the used buffer after the header.
    ///
    /// It is zero for every op but [`Op::Rw`].
    pub const fn payload_len(&self) -> u32 {
        self.hdr.len
    }

    /// Returns the source CID, whose upper 32 bits were checked to be zero.
    pub const fn src_cid(&self) -> u32 {
        self.hdr.src_cid as u32
    }

    /// Returns the destination CID, which is the guest CID passed to [`validate_rx`].
    pub const fn dst_cid(&self) -> u32 {
        self.hdr.dst_cid as u32
    }

    /// Returns the source port.
    pub const fn src_port(&self) -> u32 {
        self.hdr.src_port
    }

    /// Returns the destination port.
    pub const fn dst_port(&self) -> u32 {
        self.hdr.dst_port
    }

    /// Returns the op-specific flags, unchecked.
    pub const fn flags(&self) -> u32 {
        self.hdr.flags
    }

    /// Returns the sender's `buf_alloc`.
    pub const fn buf_alloc(&self) -> u32 {
        self.hdr.buf_alloc
    }

    /// Returns the sender's `fwd_cnt`.
    pub const fn fwd_cnt(&self) -> u32 {
        self.hdr.fwd_cnt
    }
}

/// Validates a used rx buffer before anything in it is trusted.
///
/// `buf_used_len` is the length the device reported for the used buffer
/// (`virtqueue_get_buf()`), `buf_capacity` the length of the buffer the driver
/// posted (header included), `bytes` the start of the buffer (only its first
/// [`HDR_SIZE`](super::HDR_SIZE) bytes are read, so the driver may pass just
/// the header), `guest_cid` the guest's CID as returned by
/// [`guest_cid_from_config`](super::guest_cid_from_config), and `features` the
/// negotiated feature bits.
///
/// The rules, in the order they are checked (the first one that fails gives
/// the [`DropReason`]):
///
/// 1. [`DropReason::ShortBuffer`]: `buf_used_len < HDR_SIZE`, or `bytes` is
///    shorter than the header. Same as the C driver's
///    `len < sizeof(*hdr)` check in `virtio_transport_rx_work()`.
/// 2. [`DropReason::UsedLenOverCapacity`]: `buf_used_len > buf_capacity`. Same
///    as the C driver's `len > virtio_vsock_skb_len(skb)`: a device must never
///    write past the buffer (virtio spec 2.7.8, "used length").
/// 3. [`DropReason::PayloadTooLong`]: `hdr.len > buf_used_len - HDR_SIZE`. Same
///    as 6.12.117's `payload_len > len - sizeof(*hdr)`. A used length larger
///    than header plus payload is accepted, as in C: the spec only requires the
///    used length to be an upper bound of what was written, and the extra bytes
///    are never looked at because the driver only puts `hdr.len` bytes.
/// 4. [`DropReason::UnknownType`]: `type` is neither 1 (stream) nor 2
///    (seqpacket). `virtio_transport_recv_pkt()` refuses these too
///    (`virtio_transport_valid_type()`), answering with a reset.
/// 5. [`DropReason::TypeNotNegotiated`]: seqpacket without
///    `VIRTIO_VSOCK_F_SEQPACKET`, or stream when `VIRTIO_VSOCK_F_NO_IMPLIED_STREAM`
///    was negotiated without `VIRTIO_VSOCK_F_STREAM` (virtio spec 1.3, 5.10.3).
///    The C driver relies on no seqpacket socket being able to use the
///    transport when `seqpacket_allow` is false; this makes it explicit.
/// 6. [`DropReason::InvalidOp`]: `op` is 0, which is `VIRTIO_VSOCK_OP_INVALID`
///    and never sent; [`DropReason::UnknownOp`]: `op > 7`. The common C code
///    ignores such ops in every socket state, so dropping them changes nothing
///    but the counter.
/// 7. [`DropReason::ControlWithPayload`]: an op other than `OP_RW` with
///    `len != 0`. `virtio_transport_send_pkt_info()` only attaches a payload
///    to `OP_RW`, and so do the other devices; the C receive path ignores the
///    payload of control packets, so nothing legitimate is lost. `OP_RW` with
///    `len == 0` is accepted: the common code does not send it ("Do not send
///    zero length OP_RW pkt") but handles it on receive, and the spec allows it.
/// 8. [`DropReason::CidUpperBits`]: the upper 32 bits of `src_cid` or `dst_cid`
///    are set. The spec (5.10.6) says they are reserved and zeroed, and the C
///    code silently truncates both to 32 bits (`vsock_addr_init()` takes a
///    `u32`), so such a packet would be delivered under an alias address.
/// 9. [`DropReason::WrongDstCid`]: `dst_cid != guest_cid`, or `guest_cid` is
///    `VMADDR_CID_ANY` (the driver has no usable CID). The C driver does
///    not check this, and a packet for another CID can still match a socket
///    bound to `VMADDR_CID_ANY` in `__vsock_find_bound_socket()`; with
///    `dst_cid == VMADDR_CID_ANY` it would even match every socket bound to
///    the port. A device only sends packets addressed to the guest (vhost-vsock
///    routes by `dst_cid`). After a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` that
///    changed the CID, the device may deliver packets for the new CID before
///    the driver has handled the event: on this error the driver re-reads the
///    configuration and, if it now holds the packet's `dst_cid`, takes it as
///    its CID and validates again, so such packets are delivered as in C.
/// 10. [`DropReason::BadSrcCid`]: `src_cid` is `VMADDR_CID_ANY` (it would
///     match any bound socket as a wildcard source and is not an address),
///     `VMADDR_CID_LOCAL` (loopback, never routed to a G2H transport), or the
///     guest's own CID (the driver refuses to send to its own CID in
///     `virtio_transport_send_pkt()`, so no device echoes one back).
///     `VMADDR_CID_HYPERVISOR` (0) and `VMADDR_CID_HOST` (2) are accepted, as are
///     other guests' CIDs (sibling VMs reached with `VMADDR_FLAG_TO_HOST`):
///     `vsock_assign_transport()` sends all of them to the G2H transport.
///
/// Not checked: ports (any value is a valid port, unknown ones get a reset from
/// the common code), `flags` (unknown bits are ignored by the common code and
/// may be defined by later spec versions), `buf_alloc` and `fwd_cnt` (credit
/// accounting is the common code's business).
///
/// # Errors
///
/// Returns the [`DropReason`] of the first rule that fails. The packet must
/// then be dropped without being looked at any further.
///
/// # Examples
///
/// ```
/// use virtio_vsock_rs::protocol::{
///     validate_rx, DropReason, Features, Hdr, Op, Type, HDR_SIZE_U32,
/// };
///
/// let hdr = Hdr {
///     src_cid: 2,
///     dst_cid: 3,
///     src_port: 1024,
///     dst_port: 1234,
///     len: 5,
///     type_: Type::Stream.as_raw(),
///     op: Op::Rw.as_raw(),
///     ..Hdr::default()
/// };
/// let bytes = hdr.to_bytes();
/// let used = HDR_SIZE_U32 + 5;
///
/// let valid = validate_rx(used, 4096, &bytes, 3, Features::NONE).unwrap();
/// assert_eq!(valid.op(), Op::Rw);
/// assert_eq!(valid.payload_len(), 5);
///
/// // The same packet is not for CID 4.
/// assert_eq!(
///     validate_rx(used, 4096, &bytes, 4, Features::NONE),
///     Err(DropReason::WrongDstCid)
/// );
/// ```
pub fn validate_rx(
    buf_used_len: u32,
    buf_capacity: u32,
    bytes: &[u8],
    guest_cid: u32,
    features: Features,
) -> Result<ValidHdr, DropReason> {
    // Rule 1: the header must have been written, and be readable.
    if buf_used_len < HDR_SIZE_U32 {
        return Err(DropReason::ShortBuffer);
    }
    let hdr = Hdr::parse(bytes).ok_or(DropReason::ShortBuffer)?;

    // Rule 2: the device cannot have written more than the buffer holds.
    if buf_used_len > buf_capacity {
        return Err(DropReason::UsedLenOverCapacity);
    }

    // Rule 3: the payload must be within what the device wrote. Cannot
    // underflow: rule 1 checked `buf_used_len >= HDR_SIZE_U32`.
    if hdr.len > buf_used_len - HDR_SIZE_U32 {
        return Err(DropReason::PayloadTooLong);
    }

    // Rules 4 and 5: known type, and negotiated.
    let packet_type = hdr.packet_type().ok_or(DropReason::UnknownType)?;
    if !features.allows(packet_type) {
        return Err(DropReason::TypeNotNegotiated);
    }

    // Rule 6: known op, and not `OP_INVALID`.
    let op = match hdr.packet_op() {
        None => return Err(DropReason::UnknownOp),
        Some(Op::Invalid) => return Err(DropReason::InvalidOp),
        Some(op) => op,
    };

    // Rule 7: only `OP_RW` carries a payload.
    if hdr.len != 0 && !op.carries_payload() {
        return Err(DropReason::ControlWithPayload);
    }

    // Rules 8 to 10: the addresses.
    check_cids(&hdr, guest_cid)?;

    Ok(ValidHdr {
        hdr,
        packet_type,
        op,
    })
}

/// Returns whether a packet rejected with `reason` is handed to the common
/// code anyway, to be answered as the C driver answers it.
///
/// The C driver passes every packet of sane length to
/// `virtio_transport_recv_pkt()`, which answers an unknown type with a reset
/// (`virtio_transport_valid_type()`), a type the socket does not have with a
/// reset, and an unknown op with a reset to a listener, `EPROTO` and a reset
/// to a connecting socket, and nothing on a connected one. Dropping these
/// silently would leave the peer waiting out its timeout. So packets rejected
/// only for their type or op ([`DropReason::UnknownType`],
/// [`DropReason::TypeNotNegotiated`], [`DropReason::InvalidOp`],
/// [`DropReason::UnknownOp`]) get the common code's answer, provided the rest
/// of the header is trustworthy: rules 8 to 10 of [`validate_rx`] hold (the
/// addresses are sane and the packet is for `guest_cid`). Rule 7 does not
/// apply, since the op is unknown. Everything else stays dropped: a packet
/// whose lengths or addresses are wrong cannot be answered safely.
///
/// `bytes` is the start of the buffer, as for [`validate_rx`].
///
/// # Examples
///
/// ```
/// use virtio_vsock_rs::protocol::{answer_rejected, DropReason, Hdr};
///
/// let hdr = Hdr {
///     src_cid: 2,
///     dst_cid: 3,
///     type_: 7,
///     op: 1,
///     ..Hdr::default()
/// };
/// assert!(answer_rejected(DropReason::UnknownType, &hdr.to_bytes(), 3));
/// // Not for this guest: dropped without an answer.
/// assert!(!answer_rejected(DropReason::UnknownType, &hdr.to_bytes(), 4));
/// assert!(!answer_rejected(DropReason::PayloadTooLong, &hdr.to_bytes(), 3));
/// ```
pub fn answer_rejected(reason: DropReason, bytes: &[u8], guest_cid: u32) -> bool {
    if !matches!(
        reason,
        DropReason::UnknownType
            | DropReason::TypeNotNegotiated
            | DropReason::InvalidOp
            | DropReason::UnknownOp
    ) {
        return false;
    }
    Hdr::parse(bytes).is_some_and(|hdr| check_cids(&hdr, guest_cid).is_ok())
}

/// Rules 8 to 10 of [`validate_rx`]: sane addresses, and for `guest_cid`.
fn check_cids(hdr: &Hdr, guest_cid: u32) -> Result<(), DropReason> {
    // Rule 8: 32-bit CIDs only.
    if hdr.src_cid >> 32 != 0 || hdr.dst_cid >> 32 != 0 {
        return Err(DropReason::CidUpperBits);
    }

    // Rule 9: the packet must be for us, and we must have a CID.
    if hdr.dst_cid != u64::from(guest_cid) || guest_cid == VMADDR_CID_ANY {
        return Err(DropReason::WrongDstCid);
    }

    // Rule 10: the source must be a real peer.
    let src_cid = hdr.src_cid as u32;
    if src_cid == VMADDR_CID_ANY || src_cid == VMADDR_CID_LOCAL || src_cid == guest_cid {
        return Err(DropReason::BadSrcCid);
    }
    Ok(())
}
