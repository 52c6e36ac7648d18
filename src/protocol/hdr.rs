// SPDX-License-Identifier: GPL-2.0

//! The virtio-vsock packet header, `struct virtio_vsock_hdr`.
//!
//! Every packet on the rx and tx virtqueues starts with this 44-byte packed
//! little-endian header. This module decodes and encodes it field by field with
//! explicit little-endian conversions, so it works on any host byte order and
//! needs no `unsafe`.
//!
//! C header: [`include/uapi/linux/virtio_vsock.h`](srctree/include/uapi/linux/virtio_vsock.h)

/// Size in bytes of `struct virtio_vsock_hdr` on the wire.
pub const HDR_SIZE: usize = 44;

/// [`HDR_SIZE`] as a `u32`, for comparisons with virtqueue lengths.
pub const HDR_SIZE_U32: u32 = 44;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the peer will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;

/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the peer will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Both shutdown flags, as `SHUTDOWN_MASK` in the common C code.
pub const SHUTDOWN_MASK: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `VIRTIO_VSOCK_SEQ_EOM`: the `OP_RW` packet ends a seqpacket message.
pub const SEQ_EOM: u32 = 1;

/// `VIRTIO_VSOCK_SEQ_EOR`: the `OP_RW` packet ends a seqpacket record (`MSG_EOR`).
pub const SEQ_EOR: u32 = 2;

/// Socket type of a packet, `enum virtio_vsock_type`.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    /// `VIRTIO_VSOCK_TYPE_STREAM`.
    Stream = 1,
    /// `VIRTIO_VSOCK_TYPE_SEQPACKET`, only valid if `VIRTIO_VSOCK_F_SEQPACKET` was negotiated.
    SeqPacket = 2,
}

impl Type {
    /// Every known type, in wire-value order.
    pub const ALL: [Type; 2] = [Type::Stream, Type::SeqPacket];

    /// Decodes a wire value, returning `None` for an unknown type.
    ///
    /// # Examples
    ///
    /// ```
    /// use virtio_vsock_rs::protocol::Type;
    ///
    /// assert_eq!(Type::from_raw(2), Some(Type::SeqPacket));
    /// assert_eq!(Type::from_raw(3), None);
    /// ```
    pub const fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            1 => Some(Type::Stream),
            2 => Some(Type::SeqPacket),
            _ => None,
        }
    }

    /// Returns the wire value.
    pub const fn as_raw(self) -> u16 {
        self as u16
    }

    /// Returns a short lowercase name, for logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Type::Stream => "stream",
            Type::SeqPacket => "seqpacket",
        }
    }
}

/// Operation of a packet, `enum virtio_vsock_op`.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `VIRTIO_VSOCK_OP_INVALID`, never valid on the wire.
    Invalid = 0,
    /// `VIRTIO_VSOCK_OP_REQUEST`: connection request.
    Request = 1,
    /// `VIRTIO_VSOCK_OP_RESPONSE`: connection accepted.
    Response = 2,
    /// `VIRTIO_VSOCK_OP_RST`: connection reset.
    Rst = 3,
    /// `VIRTIO_VSOCK_OP_SHUTDOWN`: half or full close, see [`SHUTDOWN_RCV`] and [`SHUTDOWN_SEND`].
    Shutdown = 4,
    /// `VIRTIO_VSOCK_OP_RW`: payload.
    Rw = 5,
    /// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: the sender's credit information.
    CreditUpdate = 6,
    /// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: asks the receiver for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// Every op a peer may send, that is all but [`Op::Invalid`], in wire-value order.
    pub const VALID: [Op; 7] = [
        Op::Request,
        Op::Response,
        Op::Rst,
        Op::Shutdown,
        Op::Rw,
        Op::CreditUpdate,
        Op::CreditRequest,
    ];

    /// Decodes a wire value, returning `None` for an unknown op.
    ///
    /// [`Op::Invalid`] is a known value and is returned as such; rejecting it is
    /// up to the caller (see [`crate::protocol::validate_rx`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use virtio_vsock_rs::protocol::Op;
    ///
    /// assert_eq!(Op::from_raw(5), Some(Op::Rw));
    /// assert_eq!(Op::from_raw(0), Some(Op::Invalid));
    /// assert_eq!(Op::from_raw(8), None);
    /// ```
    pub const fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            0 => Some(Op::Invalid),
            1 => Some(Op::Request),
            2 => Some(Op::Response),
            3 => Some(Op::Rst),
            4 => Some(Op::Shutdown),
            5 => Some(Op::Rw),
            6 => Some(Op::CreditUpdate),
            7 => Some(Op::CreditRequest),
            _ => None,
        }
    }

    /// Returns the wire value.
    pub const fn as_raw(self) -> u16 {
        self as u16
    }

    /// Returns whether packets with this op may carry a payload (`len != 0`).
    ///
    /// Only `OP_RW` does: `virtio_transport_send_pkt_info()` attaches data only
    /// for `OP_RW`, every other op is sent with `len == 0`.
    pub const fn carries_payload(self) -> bool {
        matches!(self, Op::Rw)
    }

    /// Returns a short lowercase name, for logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Op::Invalid => "invalid",
            Op::Request => "request",
            Op::Response => "response",
            Op::Rst => "rst",
            Op::Shutdown => "shutdown",
            Op::Rw => "rw",
            Op::CreditUpdate => "credit_update",
            Op::CreditRequest => "credit_request",
        }
    }
}

/// A decoded `struct virtio_vsock_hdr`, with every field in CPU byte order.
///
/// This is a copy of the header, not a reference into the buffer: once decoded,
/// later writes by the device to the buffer cannot change what was validated.
/// The fields are raw and unchecked; [`crate::protocol::validate_rx`] turns a
/// received header into a [`crate::protocol::ValidHdr`].
///
/// # Examples
///
/// ```
/// use virtio_vsock_rs::protocol::{Hdr, Op, Type, HDR_SIZE};
///
/// let hdr = Hdr {
///     src_cid: 2,
///     dst_cid: 3,
///     src_port: 1234,
///     dst_port: 5678,
///     len: 0,
///     type_: Type::Stream.as_raw(),
///     op: Op::Request.as_raw(),
///     flags: 0,
///     buf_alloc: 262144,
///     fwd_cnt: 0,
/// };
/// let bytes: [u8; HDR_SIZE] = hdr.to_bytes();
/// assert_eq!(bytes[0], 2);
/// assert_eq!(Hdr::parse(&bytes), Some(hdr));
/// assert_eq!(Hdr::parse(&bytes[..HDR_SIZE - 1]), None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Hdr {
    /// Source CID, `le64` on the wire.
    pub src_cid: u64,
    /// Destination CID, `le64` on the wire.
    pub dst_cid: u64,
    /// Source port, `le32` on the wire.
    pub src_port: u32,
    /// Destination port, `le32` on the wire.
    pub dst_port: u32,
    /// Payload length in bytes, `le32` on the wire.
    pub len: u32,
    /// Socket type (see [`Type`]), `le16` on the wire.
    pub type_: u16,
    /// Operation (see [`Op`]), `le16` on the wire.
    pub op: u16,
    /// Op-specific flags, `le32` on the wire.
    pub flags: u32,
    /// The sender's receive buffer size, `le32` on the wire.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed so far, `le32` on the wire.
    pub fwd_cnt: u32,
}

/// Consumes little-endian fields from the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (field, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*field)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

/// Fills little-endian fields from the front of a mutable byte slice.
struct Writer<'a>(&'a mut [u8]);

impl Writer<'_> {
    fn put<const N: usize>(&mut self, bytes: [u8; N]) -> Option<()> {
        let buf = core::mem::take(&mut self.0);
        let (field, rest) = buf.split_first_chunk_mut::<N>()?;
        *field = bytes;
        self.0 = rest;
        Some(())
    }
}

impl Hdr {
    /// Decodes a header from the first [`HDR_SIZE`] bytes of `bytes`.
    ///
    /// Bytes past the header are ignored. Returns `None` if `bytes` is shorter
    /// than [`HDR_SIZE`].
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        Some(Hdr {
            src_cid: r.u64()?,
            dst_cid: r.u64()?,
            src_port: r.u32()?,
            dst_port: r.u32()?,
            len: r.u32()?,
            type_: r.u16()?,
            op: r.u16()?,
            flags: r.u32()?,
            buf_alloc: r.u32()?,
            fwd_cnt: r.u32()?,
        })
    }

    /// Encodes the header into the first [`HDR_SIZE`] bytes of `out`.
    ///
    /// Bytes of `out` past the header are left untouched.
    ///
    /// # Errors
    ///
    /// Returns `None`, with `out` possibly partly written, if `out` is shorter
    /// than [`HDR_SIZE`].
    pub fn write_to(&self, out: &mut [u8]) -> Option<()> {
        let mut w = Writer(out);
        w.put(self.src_cid.to_le_bytes())?;
        w.put(self.dst_cid.to_le_bytes())?;
        w.put(self.src_port.to_le_bytes())?;
        w.put(self.dst_port.to_le_bytes())?;
        w.put(self.len.to_le_bytes())?;
        w.put(self.type_.to_le_bytes())?;
        w.put(self.op.to_le_bytes())?;
        w.put(self.flags.to_le_bytes())?;
        w.put(self.buf_alloc.to_le_bytes())?;
        w.put(self.fwd_cnt.to_le_bytes())?;
        Some(())
    }

    /// Encodes the header into a new array.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut out = [0u8; HDR_SIZE];
        // Cannot fail: `out` is exactly `HDR_SIZE` bytes long.
        let _ = self.write_to(&mut out);
        out
    }

    /// Returns the decoded [`Type`], or `None` if the type is unknown.
    pub const fn packet_type(&self) -> Option<Type> {
        Type::from_raw(self.type_)
    }

    /// Returns the decoded [`Op`], or `None` if the op is unknown.
    pub const fn packet_op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }
}
