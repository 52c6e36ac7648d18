// SPDX-License-Identifier: GPL-2.0

//! Buffer sizing and queue flow-control decisions of the driver.
//!
//! These are the small arithmetic decisions of
//! [`net/vmw_vsock/virtio_transport.c`](srctree/net/vmw_vsock/virtio_transport.c)
//! (6.12.117), pulled out so that they can be tested without a kernel. All of
//! them use checked or saturating arithmetic and never panic.

use super::hdr::HDR_SIZE_U32;

/// Bytes allocated for one rx buffer and its `struct skb_shared_info`: one page.
///
/// `VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE` is `SKB_WITH_OVERHEAD(1024 * 4)`, so that
/// a linear rx skb fits exactly into a single 4 KiB page; see
/// [`rx_buf_size`].
pub const RX_BUF_ALLOC: u32 = 4096;

/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`: the largest payload of one tx packet.
pub const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;

/// `VIRTIO_VSOCK_MAX_BUF_SIZE`: the largest socket buffer size.
pub const MAX_BUF_SIZE: u32 = u32::MAX;

/// Number of event buffers kept posted on the event virtqueue (`event_list[8]`).
pub const EVENT_BUFS: usize = 8;

/// Computes `VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE` for a kernel configuration.
///
/// The C macro is `SKB_WITH_OVERHEAD(1024 * 4)`, that is
/// `4096 - ALIGN(sizeof(struct skb_shared_info), SMP_CACHE_BYTES)`, which
/// depends on the kernel configuration (`CONFIG_MAX_SKB_FRAGS`, cache line
/// size): the driver passes both values from its bindings. The result is the
/// length posted for each rx buffer, header included (6.12.117 posts the whole
/// linear skb, header and payload, as one descriptor).
///
/// Returns `None` if `cache_bytes` is not a power of two or the result would
/// not hold a header.
///
/// # Examples
///
/// ```
/// use virtio_vsock_rs::protocol::rx_buf_size;
///
/// // x86_64 with 64-byte cache lines and 17 fragments: 320-byte shared info.
/// assert_eq!(rx_buf_size(320, 64), Some(3776));
/// assert_eq!(rx_buf_size(321, 64), Some(3712));
/// assert_eq!(rx_buf_size(320, 48), None);
/// ```
pub const fn rx_buf_size(shared_info_size: u32, cache_bytes: u32) -> Option<u32> {
    if !cache_bytes.is_power_of_two() {
        return None;
    }
    let mask = cache_bytes - 1;
    let aligned = match shared_info_size.checked_add(mask) {
        Some(sum) => sum & !mask,
        None => return None,
    };
    match RX_BUF_ALLOC.checked_sub(aligned) {
        Some(size) if size > HDR_SIZE_U32 => Some(size),
        _ => None,
    }
}

/// Returns whether the rx virtqueue should be refilled after processing.
///
/// Mirrors `if (vsock->rx_buf_nr < vsock->rx_buf_max_nr / 2)
/// virtio_vsock_rx_fill(vsock);` at the end of `virtio_transport_rx_work()`:
/// `rx_buf_nr` is the number of buffers still posted, `rx_buf_max_nr` the
/// largest number ever posted.
pub const fn rx_refill_needed(rx_buf_nr: u32, rx_buf_max_nr: u32) -> bool {
    rx_buf_nr < rx_buf_max_nr / 2
}

/// Returns the `rx_buf_max_nr` of [`rx_refill_needed`] after a refill that
/// left `posted` buffers posted.
///
/// C keeps the most buffers ever posted, which every complete refill posts
/// while all buffers have one size. Buffers sized to the traffic
/// ([`RxSizer`]) fit the memory bound in varying numbers, so a refill that
/// filled the queue or reached the bound sets the count; one cut short by an
/// allocation failure keeps the larger one, so that refills go on trying as
/// with C.
///
/// # Examples
///
/// ```
/// use virtio_vsock_rs::protocol::{rx_buf_max_nr, rx_refill_needed};
///
/// // 128 one-page buffers, then bulk traffic: 30 of 64 KiB fill the bound.
/// let max = rx_buf_max_nr(128, 30, false);
/// assert_eq!(max, 30);
/// // 20 still posted: no refill (and no kick) on every rx run.
/// assert!(!rx_refill_needed(20, max));
/// // An allocation failure after 10 buffers keeps the 128.
/// assert_eq!(rx_buf_max_nr(128, 10, true), 128);
/// ```
pub const fn rx_buf_max_nr(prev: u32, posted: u32, out_of_memory: bool) -> u32 {
    if !out_of_memory || posted > prev {
        posted
    } else {
        prev
    }
}

/// Returns whether there is room for more replies to rx packets.
///
/// Mirrors `virtio_transport_more_replies()`: rx processing stops while the
/// number of queued reply packets (`queued_replies`) reaches the rx vring
/// size, so that a peer cannot make the guest queue unbounded replies.
pub const fn more_replies(queued_replies: u32, rx_vring_size: u32) -> bool {
    queued_replies < rx_vring_size
}

/// Returns whether sending one reply packet must restart rx processing.
///
/// Mirrors `virtio_transport_send_pkt_work()`: after
/// `val = atomic_dec_return(&vsock->queued_replies)`, rx work is queued again
/// if `val + 1 == virtqueue_get_vring_size(rx_vq)`, that is when this reply
/// took the count back below the limit of [`more_replies`].
pub const fn reply_sent_restarts_rx(queued_after_dec: u32, rx_vring_size: u32) -> bool {
    match queued_after_dec.checked_add(1) {
        Some(before) => before == rx_vring_size,
        None => false,
    }
}

/// Returns whether cancelling `cancelled` reply packets must restart rx processing.
///
/// Mirrors `virtio_transport_cancel_pkt()`: with
/// `new_cnt = atomic_sub_return(cnt, &vsock->queued_replies)`, rx work is
/// queued again if `new_cnt + cnt >= size && new_cnt < size`, that is when the
/// count crossed the limit of [`more_replies`] downwards.
pub const fn cancel_restarts_rx(queued_after_sub: u32, cancelled: u32, rx_vring_size: u32) -> bool {
    let before = queued_after_sub.saturating_add(cancelled);
    before >= rx_vring_size && queued_after_sub < rx_vring_size
}

/// Returns whether a tx packet to `dst_cid` may be sent by a guest with CID `guest_cid`.
///
/// Mirrors `virtio_transport_send_pkt()`, which drops packets whose
/// `le64_to_cpu(hdr->dst_cid) == vsock->guest_cid` with `-ENODEV`: the guest
/// cannot talk to itself through the device (that is the loopback transport's
/// job).
pub const fn tx_dst_allowed(dst_cid: u64, guest_cid: u32) -> bool {
    dst_cid != guest_cid as u64
}

/// How much more memory than the C driver the posted rx buffers may take.
///
/// C posts one page per rx buffer and fills the whole ring; larger buffers
/// are posted in fewer numbers so that rx memory stays within this factor.
pub const RX_MEM_FACTOR: u32 = 4;

/// How an rx buffer is built.
///
/// The header and the first payload bytes sit in one linear allocation of a
/// page, exactly C's buffer; a larger payload continues in order-0 pages hung
/// as fragments, so no allocation is ever above order 0 while the device can
/// deliver up to [`MAX_PKT_BUF_SIZE`] bytes per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxLayout {
    /// Payload bytes in the linear part, after the header.
    pub linear: u32,
    /// Payload bytes in page fragments.
    pub frags: u32,
    /// Pages of fragments.
    pub pages: u32,
}

impl RxLayout {
    /// Lays out a buffer for `payload` bytes of payload.
    ///
    /// `linear_buf` is C's whole linear buffer, header included
    /// ([`rx_buf_size`]), and `page_size` the size of a fragment page. The
    /// payload is clamped to what a linear buffer holds at least and to
    /// [`MAX_PKT_BUF_SIZE`] at most (see [`RxLayout::clamped`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use virtio_vsock_rs::protocol::RxLayout;
    ///
    /// // C's buffer: 3776 bytes, header included, no fragments.
    /// let c = RxLayout::new(0, 3776, 4096);
    /// assert_eq!((c.linear, c.frags, c.pages), (3732, 0, 0));
    /// assert_eq!(c.capacity(), 3776);
    ///
    /// // 64 KiB of payload: 3732 bytes linear, the rest in 16 pages.
    /// let big = RxLayout::new(65536, 3776, 4096);
    /// assert_eq!((big.linear, big.frags, big.pages), (3732, 61804, 16));
    /// assert_eq!(big.capacity(), 44 + 65536);
    /// ```
    pub const fn new(payload: u32, linear_buf: u32, page_size: u32) -> Self {
        let linear = linear_buf.saturating_sub(HDR_SIZE_U32);
        let payload = Self::clamped(payload, linear);
        let frags = payload - linear;
        let pages = if page_size == 0 {
            0
        } else {
            frags.div_ceil(page_size)
        };
        Self {
            linear,
            frags,
            pages,
        }
    }

    /// Returns `payload` clamped to `linear..=MAX_PKT_BUF_SIZE`: what a buffer
    /// can hold at least (a linear buffer) and what one packet carries at most.
    pub const fn clamped(payload: u32, linear: u32) -> u32 {
        if payload < linear {
            linear
        } else if payload > MAX_PKT_BUF_SIZE && MAX_PKT_BUF_SIZE >= linear {
            MAX_PKT_BUF_SIZE
        } else {
            payload
        }
    }

    /// Returns the payload bytes a buffer holds.
    pub const fn payload(self) -> u32 {
        self.linear.saturating_add(self.frags)
    }

    /// Returns the length posted, header included: the capacity of
    /// [`validate_rx`](super::validate_rx).
    pub const fn capacity(self) -> u32 {
        HDR_SIZE_U32.saturating_add(self.payload())
    }

    /// Returns the pages a buffer takes: its linear page and its fragments.
    pub const fn pages_used(self) -> u32 {
        self.pages.saturating_add(1)
    }

    /// Returns how many buffers to keep posted on a ring of `vring_size`
    /// entries, so that rx memory stays within [`RX_MEM_FACTOR`] times what
    /// C posts (one page per entry). With C's layout that is the whole ring.
    ///
    /// # Examples
    ///
    /// ```
    /// use virtio_vsock_rs::protocol::RxLayout;
    ///
    /// assert_eq!(RxLayout::new(0, 3776, 4096).max_bufs(128), 128);
    /// // 17 pages a buffer: 4 * 128 / 17 = 30 buffers, 510 pages (C: 128).
    /// assert_eq!(RxLayout::new(65536, 3776, 4096).max_bufs(128), 30);
    /// ```
    pub const fn max_bufs(self, vring_size: u32) -> u32 {
        let bufs = RX_MEM_FACTOR.saturating_mul(vring_size) / self.pages_used();
        let bufs = if bufs == 0 { 1 } else { bufs };
        if bufs < vring_size {
            bufs
        } else {
            vring_size
        }
    }
}

/// By how much [`RxSizer`]'s estimate falls per packet: 1/`RX_SIZE_DECAY` of itself.
pub const RX_SIZE_DECAY: u32 = 8;

/// Sizes each rx buffer for the packets arriving now.
///
/// Big buffers pay off in bulk transfers (one packet per 64 KiB message
/// instead of eighteen) and cost small messages: each carries fragment pages
/// it does not use to the device and back. As virtio-net sizes its mergeable
/// rx buffers from the lengths it receives (`ewma_pkt_len`), the driver keeps
/// an estimate of the payload the next packet needs and posts buffers of that
/// size, from the linear buffer (C's) up to the largest layout.
///
/// The estimate is a decaying peak: a longer packet raises it at once, and
/// each packet lowers it by 1/[`RX_SIZE_DECAY`] otherwise. A bulk transfer
/// gets big buffers from its first packet on; request and response traffic
/// returns to linear buffers 22 packets after the last long one. A packet
/// that fills its buffer counts as the largest payload, since the device cut
/// a longer message to fit.
///
/// # Examples
///
/// ```
/// use virtio_vsock_rs::protocol::{RxLayout, RxSizer};
///
/// let max = RxLayout::new(65536, 3776, 4096);
/// let mut sizer = RxSizer::new(max, 4096);
/// // Nothing received yet: C's linear buffer.
/// assert_eq!(sizer.layout().pages, 0);
/// // A packet that fills its linear buffer: the next ones are the largest.
/// sizer.observe(3732, 3732);
/// assert_eq!(sizer.layout(), max);
/// // Small packets bring it back down, one eighth per packet.
/// for _ in 0..21 {
///     sizer.observe(64, 65536);
/// }
/// assert_eq!(sizer.layout().pages, 1);
/// sizer.observe(64, 65536);
/// assert_eq!(sizer.layout().pages, 0);
/// // A 10000-byte message: 3732 bytes linear and two pages.
/// sizer.observe(10000, 65536);
/// assert_eq!((sizer.layout().pages, sizer.layout().frags), (2, 8192));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxSizer {
    max: RxLayout,
    page_size: u32,
    /// Payload bytes the next packet is expected to need.
    want: u32,
}

impl RxSizer {
    /// Returns a sizer of buffers up to `max` with fragments of `page_size`
    /// bytes, which starts with linear buffers.
    pub const fn new(max: RxLayout, page_size: u32) -> Self {
        Self {
            max,
            page_size,
            want: 0,
        }
    }

    /// Takes in a packet of `payload` bytes received in a buffer that had
    /// room for `room` payload bytes.
    pub fn observe(&mut self, payload: u32, room: u32) {
        let need = if payload >= room {
            self.max.payload()
        } else {
            payload
        };
        let decayed = self.want - self.want / RX_SIZE_DECAY;
        self.want = if need > decayed { need } else { decayed };
    }

    /// Returns the layout of the next buffer: the fewest fragment pages that
    /// hold the estimate, at most those of the largest layout.
    pub const fn layout(&self) -> RxLayout {
        let linear = self.max.linear;
        if self.want <= linear || self.page_size == 0 {
            return RxLayout {
                linear,
                frags: 0,
                pages: 0,
            };
        }
        let pages = (self.want - linear).div_ceil(self.page_size);
        if pages >= self.max.pages {
            return self.max;
        }
        RxLayout {
            linear,
            frags: pages * self.page_size,
            pages,
        }
    }
}
