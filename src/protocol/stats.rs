// SPDX-License-Identifier: GPL-2.0

//! Counter identifiers and their names.
//!
//! The driver keeps one counter per [`Counter`], for instance in an array of
//! `Counter::COUNT` atomics indexed with [`Counter::index`], and lists them
//! with [`Counter::name`]. This module only defines the identifiers; it holds
//! no state.

use super::rx::DropReason;

/// One driver counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Received packets that passed validation and were delivered.
    RxPackets,
    /// Payload bytes of [`Counter::RxPackets`].
    RxBytes,
    /// Received packets dropped by validation, one counter per reason.
    RxDropped(DropReason),
    /// Times rx processing stopped because too many replies were queued
    /// (`virtio_transport_more_replies()` false).
    RxRepliesThrottled,
    /// Times the rx virtqueue was refilled.
    RxRefills,
    /// Times an rx buffer could not be allocated or queued during a refill.
    RxRefillFailures,
    /// Packets added to the tx virtqueue.
    TxPackets,
    /// Payload bytes of [`Counter::TxPackets`].
    TxBytes,
    /// Times the tx virtqueue was full and a packet was queued for later.
    TxQueueFull,
    /// Packets refused because they were addressed to the guest's own CID.
    TxDstSelf,
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` events handled.
    EventTransportReset,
    /// Events with an unknown id, ignored.
    EventUnknown,
    /// Events whose used length was not the event size, ignored.
    EventBadLen,
    /// Times the configuration space held an unusable guest CID.
    ConfigBadCid,
    /// Times the guest CID changed: at a transport reset, or when the rx
    /// path found a packet for the CID the configuration space now holds.
    GuestCidChanged,
    /// Rejected packets handed to the common code to be answered as C does
    /// (see [`answer_rejected`](super::answer_rejected)); each is also
    /// counted under its [`Counter::RxDropped`] reason.
    RxAnswered,
    /// Packets refused because the device has no usable guest CID yet.
    TxNoCid,
    /// Packets dropped because they had more fragments than a tx buffer
    /// can describe; they can never be sent.
    TxTooManyFrags,
}

/// Counters before the [`Counter::RxDropped`] block.
const DROP_BASE: usize = 2;

/// Counters after the [`Counter::RxDropped`] block.
const AFTER_DROP: [Counter; 15] = [
    Counter::RxRepliesThrottled,
    Counter::RxRefills,
    Counter::RxRefillFailures,
    Counter::TxPackets,
    Counter::TxBytes,
    Counter::TxQueueFull,
    Counter::TxDstSelf,
    Counter::EventTransportReset,
    Counter::EventUnknown,
    Counter::EventBadLen,
    Counter::ConfigBadCid,
    Counter::GuestCidChanged,
    Counter::RxAnswered,
    Counter::TxNoCid,
    Counter::TxTooManyFrags,
];

/// Index of the first counter after the [`Counter::RxDropped`] block.
const AFTER_BASE: usize = DROP_BASE + DropReason::COUNT;

impl Counter {
    /// Number of counters, the length of an array indexed by [`Counter::index`].
    pub const COUNT: usize = AFTER_BASE + AFTER_DROP.len();

    /// Returns the index of this counter, in `0..Counter::COUNT`.
    ///
    /// Indices are dense and stable within one build; use [`Counter::name`] to
    /// identify a counter across builds.
    ///
    /// # Examples
    ///
    /// ```
    /// use virtio_vsock_rs::protocol::{Counter, DropReason};
    ///
    /// let c = Counter::RxDropped(DropReason::BadSrcCid);
    /// assert_eq!(Counter::from_index(c.index()), Some(c));
    /// assert_eq!(c.name(), "rx_dropped_bad_src_cid");
    /// ```
    pub const fn index(self) -> usize {
        match self {
            Counter::RxPackets => 0,
            Counter::RxBytes => 1,
            Counter::RxDropped(reason) => DROP_BASE + reason.index(),
            Counter::RxRepliesThrottled => AFTER_BASE,
            Counter::RxRefills => AFTER_BASE + 1,
            Counter::RxRefillFailures => AFTER_BASE + 2,
            Counter::TxPackets => AFTER_BASE + 3,
            Counter::TxBytes => AFTER_BASE + 4,
            Counter::TxQueueFull => AFTER_BASE + 5,
            Counter::TxDstSelf => AFTER_BASE + 6,
            Counter::EventTransportReset => AFTER_BASE + 7,
            Counter::EventUnknown => AFTER_BASE + 8,
            Counter::EventBadLen => AFTER_BASE + 9,
            Counter::ConfigBadCid => AFTER_BASE + 10,
            Counter::GuestCidChanged => AFTER_BASE + 11,
            Counter::RxAnswered => AFTER_BASE + 12,
            Counter::TxNoCid => AFTER_BASE + 13,
            Counter::TxTooManyFrags => AFTER_BASE + 14,
        }
    }

    /// Returns the counter with index `index`, or `None` if out of range.
    pub const fn from_index(index: usize) -> Option<Self> {
        if index == 0 {
            Some(Counter::RxPackets)
        } else if index == 1 {
            Some(Counter::RxBytes)
        } else if index < AFTER_BASE {
            match DropReason::from_index(index - DROP_BASE) {
                Some(reason) => Some(Counter::RxDropped(reason)),
                None => None,
            }
        } else if index < Counter::COUNT {
            Some(AFTER_DROP[index - AFTER_BASE])
        } else {
            None
        }
    }

    /// Returns the stable snake-case name of this counter, for listings.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::RxPackets => "rx_packets",
            Counter::RxBytes => "rx_bytes",
            Counter::RxDropped(reason) => match reason {
                DropReason::ShortBuffer => "rx_dropped_short_buffer",
                DropReason::UsedLenOverCapacity => "rx_dropped_used_len_over_capacity",
                DropReason::PayloadTooLong => "rx_dropped_payload_too_long",
                DropReason::UnknownType => "rx_dropped_unknown_type",
                DropReason::TypeNotNegotiated => "rx_dropped_type_not_negotiated",
                DropReason::InvalidOp => "rx_dropped_invalid_op",
                DropReason::UnknownOp => "rx_dropped_unknown_op",
                DropReason::ControlWithPayload => "rx_dropped_control_with_payload",
                DropReason::CidUpperBits => "rx_dropped_cid_upper_bits",
                DropReason::WrongDstCid => "rx_dropped_wrong_dst_cid",
                DropReason::BadSrcCid => "rx_dropped_bad_src_cid",
            },
            Counter::RxRepliesThrottled => "rx_replies_throttled",
            Counter::RxRefills => "rx_refills",
            Counter::RxRefillFailures => "rx_refill_failures",
            Counter::TxPackets => "tx_packets",
            Counter::TxBytes => "tx_bytes",
            Counter::TxQueueFull => "tx_queue_full",
            Counter::TxDstSelf => "tx_dst_self",
            Counter::EventTransportReset => "event_transport_reset",
            Counter::EventUnknown => "event_unknown",
            Counter::EventBadLen => "event_bad_len",
            Counter::ConfigBadCid => "config_bad_cid",
            Counter::GuestCidChanged => "guest_cid_changed",
            Counter::RxAnswered => "rx_answered",
            Counter::TxNoCid => "tx_no_cid",
            Counter::TxTooManyFrags => "tx_too_many_frags",
        }
    }

    /// Returns an iterator over every counter, in index order.
    pub fn iter() -> impl Iterator<Item = Counter> {
        (0..Counter::COUNT).filter_map(Counter::from_index)
    }
}
