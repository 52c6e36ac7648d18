// SPDX-License-Identifier: GPL-2.0

//! The virtio-vsock wire protocol, independent of the kernel.
//!
//! This is the protocol layer of the driver: header parsing and validation,
//! feature, configuration and event decoding, counter names and flow-control
//! arithmetic. It uses nothing but `core` (no `kernel` crate, no `alloc`, no
//! `unsafe`), so the same files also build as a userspace crate
//! (`tools/protocol-tests`) that is unit-tested and fuzzed.
//!
//! C headers: [`include/uapi/linux/virtio_vsock.h`](srctree/include/uapi/linux/virtio_vsock.h),
//! [`include/uapi/linux/vm_sockets.h`](srctree/include/uapi/linux/vm_sockets.h),
//! [`include/linux/virtio_vsock.h`](srctree/include/linux/virtio_vsock.h).

mod flow;
mod hdr;
mod rx;
mod stats;

pub use flow::{
    cancel_restarts_rx, more_replies, reply_sent_restarts_rx, rx_buf_max_nr, rx_buf_size,
    rx_refill_needed, tx_dst_allowed, RxLayout, RxSizer, EVENT_BUFS, MAX_BUF_SIZE,
    MAX_PKT_BUF_SIZE, RX_BUF_ALLOC, RX_MEM_FACTOR, RX_SIZE_DECAY,
};
pub use hdr::{
    Hdr, Op, Type, HDR_SIZE, HDR_SIZE_U32, SEQ_EOM, SEQ_EOR, SHUTDOWN_MASK, SHUTDOWN_RCV,
    SHUTDOWN_SEND,
};
pub use rx::{answer_rejected, validate_rx, DropReason, ValidHdr};
pub use stats::Counter;

/// `VIRTIO_ID_VSOCK`: the virtio device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// `VMADDR_CID_HYPERVISOR`: the hypervisor's CID.
pub const VMADDR_CID_HYPERVISOR: u32 = 0;

/// `VMADDR_CID_LOCAL`: the loopback CID.
pub const VMADDR_CID_LOCAL: u32 = 1;

/// `VMADDR_CID_HOST`: the host's CID.
pub const VMADDR_CID_HOST: u32 = 2;

/// `VMADDR_CID_ANY`: the wildcard CID (`-1U`).
pub const VMADDR_CID_ANY: u32 = u32::MAX;

/// `VMADDR_PORT_ANY`: the wildcard port (`-1U`).
pub const VMADDR_PORT_ANY: u32 = u32::MAX;

/// Virtqueue index of the rx queue (`VSOCK_VQ_RX`), host to guest packets.
pub const VQ_RX: usize = 0;

/// Virtqueue index of the tx queue (`VSOCK_VQ_TX`), guest to host packets.
pub const VQ_TX: usize = 1;

/// Virtqueue index of the event queue (`VSOCK_VQ_EVENT`).
pub const VQ_EVENT: usize = 2;

/// Number of virtqueues (`VSOCK_VQ_MAX`).
pub const VQ_MAX: usize = 3;

/// Feature bit `VIRTIO_VSOCK_F_STREAM` (virtio spec 1.3, not in the 6.12 uapi header).
pub const F_STREAM: u32 = 0;

/// Feature bit `VIRTIO_VSOCK_F_SEQPACKET`.
pub const F_SEQPACKET: u32 = 1;

/// Feature bit `VIRTIO_VSOCK_F_NO_IMPLIED_STREAM` (virtio spec 1.3, not in the 6.12 uapi header).
pub const F_NO_IMPLIED_STREAM: u32 = 2;

/// Feature bits the driver offers, as the C driver's `feature_table`.
///
/// Like the 6.12 C driver, only [`F_SEQPACKET`]: without
/// [`F_NO_IMPLIED_STREAM`] stream support is implied.
pub const DRIVER_FEATURES: [u32; 1] = [F_SEQPACKET];

/// A set of negotiated device-specific feature bits.
///
/// # Examples
///
/// ```
/// use virtio_vsock_rs::protocol::{Features, Type, F_SEQPACKET};
///
/// let f = Features::from_bits(1 << F_SEQPACKET);
/// assert!(f.allows(Type::SeqPacket));
/// assert!(f.allows(Type::Stream));
/// assert!(!Features::NONE.allows(Type::SeqPacket));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features(u64);

impl Features {
    /// No feature negotiated: stream only.
    pub const NONE: Features = Features(0);

    /// Builds a set from a bitmap of feature bits (bit `n` is feature `n`).
    pub const fn from_bits(bits: u64) -> Self {
        Features(bits)
    }

    /// Returns the bitmap.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Returns the set with feature bit `bit` added; bits above 63 are ignored.
    pub const fn with(self, bit: u32) -> Self {
        match 1u64.checked_shl(bit) {
            Some(mask) => Features(self.0 | mask),
            None => self,
        }
    }

    /// Returns whether feature bit `bit` is in the set; bits above 63 never are.
    pub const fn has(self, bit: u32) -> bool {
        match 1u64.checked_shl(bit) {
            Some(mask) => self.0 & mask != 0,
            None => false,
        }
    }

    /// Returns whether packets of type `packet_type` may be exchanged.
    ///
    /// Seqpacket needs [`F_SEQPACKET`]. Stream is implied unless
    /// [`F_NO_IMPLIED_STREAM`] was negotiated, in which case it needs
    /// [`F_STREAM`] (virtio spec 1.3, 5.10.3).
    pub const fn allows(self, packet_type: Type) -> bool {
        match packet_type {
            Type::Stream => !self.has(F_NO_IMPLIED_STREAM) || self.has(F_STREAM),
            Type::SeqPacket => self.has(F_SEQPACKET),
        }
    }
}

/// Size in bytes of `struct virtio_vsock_config`.
pub const CONFIG_SIZE: usize = 8;

/// Offset of `guest_cid` in `struct virtio_vsock_config`.
pub const CONFIG_GUEST_CID_OFFSET: usize = 0;

/// Why the `guest_cid` of the configuration space cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CidError {
    /// The upper 32 bits are not zero.
    UpperBits(u64),
    /// The CID is one of the reserved 0, 1, 2 or `0xffffffff`.
    Reserved(u32),
}

/// Extracts the guest CID from the configuration space field `guest_cid`.
///
/// `raw` is the field already converted from little endian (`le64_to_cpu`).
///
/// The C driver, `virtio_vsock_update_guest_cid()`, stores
/// `le64_to_cpu(guest_cid)` into a `u32` without any check. This is stricter:
/// the virtio spec (5.10.4) says the upper 32 bits are reserved and zeroed, and
/// that CIDs 0 (hypervisor), 1 (local), 2 (host) and `0xffffffff` (any) are
/// reserved and cannot be the guest's. With such a CID the guest could not be
/// addressed (and with 2 it could not even reach the host, since the driver
/// refuses to send to its own CID). Every conforming device refuses to be
/// configured with one (vhost-vsock's `VHOST_VSOCK_SET_GUEST_CID`, QEMU's
/// `guest-cid` property, Firecracker, cloud-hypervisor), so a conforming device
/// is never rejected.
///
/// # Errors
///
/// [`CidError::UpperBits`] if the upper 32 bits are set, [`CidError::Reserved`]
/// for a reserved CID. The driver then has no CID: it stays bound, drops every
/// received packet ([`validate_rx`] with [`VMADDR_CID_ANY`]) and refuses to
/// send, until a transport reset or a received packet shows that the
/// configuration space holds a usable CID again.
///
/// # Examples
///
/// ```
/// use virtio_vsock_rs::protocol::{guest_cid_from_config, CidError};
///
/// assert_eq!(guest_cid_from_config(3), Ok(3));
/// assert_eq!(guest_cid_from_config(2), Err(CidError::Reserved(2)));
/// assert_eq!(
///     guest_cid_from_config((1 << 32) | 3),
///     Err(CidError::UpperBits((1 << 32) | 3))
/// );
/// ```
pub const fn guest_cid_from_config(raw: u64) -> Result<u32, CidError> {
    if raw >> 32 != 0 {
        return Err(CidError::UpperBits(raw));
    }
    let cid = raw as u32;
    match cid {
        VMADDR_CID_HYPERVISOR | VMADDR_CID_LOCAL | VMADDR_CID_HOST | VMADDR_CID_ANY => {
            Err(CidError::Reserved(cid))
        }
        _ => Ok(cid),
    }
}

/// Extracts the guest CID from the raw little-endian bytes of `guest_cid`.
///
/// # Errors
///
/// As [`guest_cid_from_config`].
pub const fn guest_cid_from_config_bytes(bytes: [u8; CONFIG_SIZE]) -> Result<u32, CidError> {
    guest_cid_from_config(u64::from_le_bytes(bytes))
}

/// Size in bytes of `struct virtio_vsock_event`.
pub const EVENT_SIZE: usize = 4;

/// [`EVENT_SIZE`] as a `u32`, for comparisons with virtqueue lengths.
pub const EVENT_SIZE_U32: u32 = 4;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the event id of a transport reset.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// An event received on the event virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: connections are lost (for instance
    /// after live migration) and the guest CID may have changed.
    TransportReset,
    /// An event id this driver does not know; the C driver ignores it.
    Unknown(u32),
}

/// Why an event buffer was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventError {
    /// The used length is not [`EVENT_SIZE`], or the buffer is shorter.
    BadLength(u32),
}

/// Decodes a used event buffer.
///
/// `used_len` is the length reported by the device and `bytes` the buffer.
/// Mirrors `virtio_transport_event_work()`, which only handles an event if
/// `len == sizeof(*event)`, and `virtio_vsock_event_handle()`, which acts only
/// on `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`. Either way the buffer is posted
/// again.
///
/// # Errors
///
/// [`EventError::BadLength`] if `used_len` is not [`EVENT_SIZE`] or `bytes`
/// is shorter than that.
///
/// # Examples
///
/// ```
/// use virtio_vsock_rs::protocol::{parse_event, Event, EventError};
///
/// assert_eq!(parse_event(4, &[0, 0, 0, 0]), Ok(Event::TransportReset));
/// assert_eq!(parse_event(4, &[7, 0, 0, 0]), Ok(Event::Unknown(7)));
/// assert_eq!(parse_event(3, &[0, 0, 0, 0]), Err(EventError::BadLength(3)));
/// ```
pub fn parse_event(used_len: u32, bytes: &[u8]) -> Result<Event, EventError> {
    if used_len != EVENT_SIZE_U32 {
        return Err(EventError::BadLength(used_len));
    }
    let id = bytes
        .first_chunk::<EVENT_SIZE>()
        .map(|b| u32::from_le_bytes(*b))
        .ok_or(EventError::BadLength(used_len))?;
    Ok(match id {
        EVENT_TRANSPORT_RESET => Event::TransportReset,
        other => Event::Unknown(other),
    })
}
