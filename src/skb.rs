// SPDX-License-Identifier: GPL-2.0

//! Socket buffers of virtio vsock packets.
//!
//! [`Skb`] is a borrowed `struct sk_buff`, [`SkBuff`] an owned one, freed
//! when dropped, and [`SkbQueue`] a `struct sk_buff_head` of owned buffers.
//! Every one of them starts with a `struct virtio_vsock_hdr` at `skb->head`
//! (`VIRTIO_VSOCK_SKB_HEADROOM`), as the common vsock code allocates them.
//!
//! C headers: [`include/linux/skbuff.h`](srctree/include/linux/skbuff.h),
//! [`include/linux/virtio_vsock.h`](srctree/include/linux/virtio_vsock.h).

use crate::{
    bindings,
    protocol::{RxLayout, HDR_SIZE, HDR_SIZE_U32},
    vsock::VsockSock,
};
use core::{ops::Deref, ptr::NonNull};
use kernel::{error::to_result, prelude::*, types::Opaque};

/// Memory allocation flags of the functions that may allocate.
#[derive(Clone, Copy)]
pub(crate) enum Gfp {
    /// `GFP_KERNEL`: may sleep.
    Kernel,
    /// `GFP_ATOMIC`: does not sleep.
    Atomic,
}

impl Gfp {
    pub(crate) fn as_raw(self) -> bindings::gfp_t {
        match self {
            Gfp::Kernel => bindings::GFP_KERNEL,
            Gfp::Atomic => bindings::GFP_ATOMIC,
        }
    }
}

/// A borrowed socket buffer of a virtio vsock packet.
///
/// # Invariants
///
/// `.0` is a valid `struct sk_buff` whose head holds a `struct virtio_vsock_hdr`.
#[repr(transparent)]
pub(crate) struct Skb(Opaque<bindings::sk_buff>);

impl Skb {
    /// Returns a reference to the socket buffer at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a valid `sk_buff` whose head holds a `virtio_vsock_hdr`, and stay
    /// so for `'a`.
    pub(crate) unsafe fn from_raw<'a>(ptr: *mut bindings::sk_buff) -> &'a Self {
        // CAST: `Skb` is a transparent wrapper of `sk_buff`.
        // SAFETY: By the safety requirements the pointer is valid for `'a`.
        unsafe { &*ptr.cast::<Self>() }
    }

    pub(crate) fn as_ptr(&self) -> *mut bindings::sk_buff {
        self.0.get()
    }

    /// Returns the length of the payload (`skb->len`).
    pub(crate) fn len(&self) -> u32 {
        // SAFETY: By the type invariant the buffer is valid.
        unsafe { (*self.as_ptr()).len }
    }

    /// Returns the bytes of the packet header (`virtio_vsock_hdr(skb)`).
    pub(crate) fn hdr(&self) -> &[u8; HDR_SIZE] {
        // SAFETY: By the type invariant the buffer is valid.
        let hdr = unsafe { bindings::vsock_rs_skb_hdr(self.as_ptr()) };
        // CAST: `virtio_vsock_hdr` is a packed struct of `HDR_SIZE` bytes.
        // SAFETY: By the type invariant the head holds a header, which lives as long as `self`.
        unsafe { &*hdr.cast::<[u8; HDR_SIZE]>() }
    }

    /// Returns whether this packet is a reply to a received one (`virtio_vsock_skb_reply()`).
    pub(crate) fn is_reply(&self) -> bool {
        // SAFETY: By the type invariant the buffer is valid.
        unsafe { bindings::vsock_rs_skb_reply(self.as_ptr()) }
    }

    /// Returns the room left in the linear part (`skb_tailroom()`).
    pub(crate) fn tailroom(&self) -> u32 {
        // SAFETY: By the type invariant the buffer is valid.
        unsafe { bindings::vsock_rs_skb_tailroom(self.as_ptr()) }
    }

    /// Returns the number of page fragments (`skb_shinfo(skb)->nr_frags`).
    pub(crate) fn nr_frags(&self) -> u32 {
        // SAFETY: By the type invariant the buffer is valid.
        unsafe { bindings::vsock_rs_skb_nr_frags(self.as_ptr()) }
    }

    /// Returns the bytes the page fragments span, used or not: for an rx
    /// buffer before [`SkBuff::rx_put`], the room posted after the linear part.
    pub(crate) fn frags_len(&self) -> u32 {
        // SAFETY: By the type invariant the buffer is valid.
        unsafe { bindings::vsock_rs_skb_frags_len(self.as_ptr()) }
    }
}

/// An owned socket buffer of a virtio vsock packet.
///
/// # Invariants
///
/// `.0` satisfies the invariants of [`Skb`] and this value owns it: nothing else frees it.
pub(crate) struct SkBuff(NonNull<Skb>);

// SAFETY: A socket buffer that nobody else owns can be used and freed from any thread.
unsafe impl Send for SkBuff {}

impl SkBuff {
    /// Allocates an rx buffer laid out as `layout`: a linear part with the
    /// header and `layout.linear` payload bytes, then `layout.frags` bytes in
    /// order-0 pages, taken from `pool` first.
    ///
    /// As `virtio_vsock_alloc_linear_skb()` plus the zeroing of the header in
    /// `virtio_vsock_rx_fill()`, with fragments when the layout has them.
    pub(crate) fn alloc_rx(layout: RxLayout, gfp: Gfp, pool: &mut PagePool) -> Option<Self> {
        let linear = HDR_SIZE_U32.checked_add(layout.linear)?;
        // SAFETY: By the type invariant of `PagePool` the pool is valid, and `&mut` makes this
        // its only user.
        let skb = NonNull::new(unsafe {
            bindings::vsock_rs_alloc_rx_skb(linear, layout.frags, gfp.as_raw(), pool.as_ptr())
        })?;
        // SAFETY: The buffer was just allocated with a linear part of `linear >= HDR_SIZE`
        // bytes from its head.
        unsafe { core::ptr::write_bytes(bindings::vsock_rs_skb_hdr(skb.as_ptr()), 0, 1) };
        // INVARIANT: The buffer is new, so ours, and its head holds a (zeroed) header.
        Some(Self(skb.cast()))
    }

    /// Takes ownership of the socket buffer at `ptr`, if not null.
    ///
    /// # Safety
    ///
    /// `ptr` must be null or point to a valid `sk_buff` whose head holds a
    /// `virtio_vsock_hdr`, owned by the caller, who hands that ownership over.
    pub(crate) unsafe fn from_raw(ptr: *mut bindings::sk_buff) -> Option<Self> {
        // INVARIANT: By the safety requirements.
        NonNull::new(ptr.cast::<Skb>()).map(Self)
    }

    /// Gives up ownership, returning the raw pointer.
    pub(crate) fn into_raw(self) -> *mut bindings::sk_buff {
        let ptr = self.as_ptr();
        core::mem::forget(self);
        ptr
    }

    /// Sets the header's `len` to zero, so that the header no longer claims
    /// payload bytes the buffer does not hold (before showing a rejected
    /// packet to the vsockmon taps, which copy `len` bytes).
    pub(crate) fn clear_hdr_len(&mut self) {
        // SAFETY: By the type invariant the buffer is valid and ours, and its head holds a
        // header.
        unsafe { (*bindings::vsock_rs_skb_hdr(self.as_ptr())).len = 0 };
    }

    /// Makes the `len` payload bytes the device wrote after the header the
    /// buffer's data, for a buffer posted with `linear` bytes of linear room
    /// ([`Virtqueue::add_skb_in`](crate::virtio::Virtqueue::add_skb_in)).
    ///
    /// Fragments past `len` go to `pool` (or are freed if it is full), so a
    /// payload that fits the linear room leaves a linear buffer, as the common
    /// code's coalescing of small packets needs (`virtio_vsock_skb_put()`,
    /// with fragments).
    ///
    /// # Errors
    ///
    /// `EINVAL` if the buffer already has data or `len` does not fit.
    pub(crate) fn rx_put(&mut self, linear: u32, len: u32, pool: &mut PagePool) -> Result {
        // SAFETY: By the type invariants the buffer is valid and ours and the pool valid; `&mut`
        // makes this the pool's only user.
        to_result(unsafe {
            bindings::vsock_rs_skb_rx_put(self.as_ptr(), linear, len, pool.as_ptr())
        })
    }

    /// Frees a buffer the driver drops, its fragment pages to `pool` (those
    /// it has room for), so that the next refill takes them instead of
    /// allocating: a device that floods the driver with packets it rejects
    /// costs it no page allocations.
    pub(crate) fn free_to_pool(self, pool: &mut PagePool) {
        let skb = self.into_raw();
        // SAFETY: `into_raw` gave up our ownership of the valid buffer to this call, which frees
        // it; the pool is valid and `&mut` makes this its only user.
        unsafe { bindings::vsock_rs_skb_free_to_pool(skb, pool.as_ptr()) };
    }
}

/// Spare order-0 pages for the fragments of rx buffers (`struct vsock_rs_page_pool`).
///
/// [`SkBuff::rx_put`] keeps the fragment pages a short payload leaves unused
/// and [`SkBuff::alloc_rx`] takes them before asking the page allocator. The
/// pages are freed when the pool is dropped.
///
/// # Invariants
///
/// `.0` was returned by `vsock_rs_page_pool_new()` and is freed only on drop.
pub(crate) struct PagePool(NonNull<bindings::vsock_rs_page_pool>);

// SAFETY: The pool holds pages and nothing tied to a thread; `&mut` serialises its users.
unsafe impl Send for PagePool {}

impl PagePool {
    /// Returns an empty pool that keeps at most `max` pages.
    pub(crate) fn new(max: u32, gfp: Gfp) -> Result<Self> {
        // SAFETY: No precondition.
        let pool = unsafe { bindings::vsock_rs_page_pool_new(max, gfp.as_raw()) };
        // INVARIANT: Returned by `vsock_rs_page_pool_new()`, when not null.
        NonNull::new(pool).map(Self).ok_or(ENOMEM)
    }

    fn as_ptr(&mut self) -> *mut bindings::vsock_rs_page_pool {
        self.0.as_ptr()
    }
}

impl Drop for PagePool {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the pool is valid, and dropping it is its last use.
        unsafe { bindings::vsock_rs_page_pool_free(self.0.as_ptr()) };
    }
}

impl Deref for SkBuff {
    type Target = Skb;

    fn deref(&self) -> &Skb {
        // SAFETY: By the type invariant the buffer is valid while we own it.
        unsafe { self.0.as_ref() }
    }
}

impl Drop for SkBuff {
    fn drop(&mut self) {
        // SAFETY: By the type invariant we own the buffer.
        unsafe { bindings::vsock_rs_kfree_skb(self.as_ptr()) };
    }
}

/// A queue of owned socket buffers with its own spinlock (`struct sk_buff_head`).
///
/// # Invariants
///
/// `head` was initialised by `skb_queue_head_init()` and every buffer on it
/// satisfies the invariants of [`SkBuff`] and is owned by the queue.
#[pin_data(PinnedDrop)]
pub(crate) struct SkbQueue {
    #[pin]
    head: Opaque<bindings::sk_buff_head>,
}

// SAFETY: The queue owns `Send` buffers and has its own lock.
unsafe impl Send for SkbQueue {}
// SAFETY: Every operation takes the queue's lock, except `is_empty_lockless`.
unsafe impl Sync for SkbQueue {}

impl SkbQueue {
    /// Returns an initialiser of an empty queue.
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            // SAFETY: `slot` is valid for writes.
            head <- Opaque::ffi_init(|slot| unsafe {
                bindings::vsock_rs_skb_queue_head_init(slot)
            }),
        })
    }

    /// Adds `skb` at the tail.
    pub(crate) fn push_back(&self, skb: SkBuff) {
        // SAFETY: The queue is initialised; it takes over the ownership of `skb`.
        unsafe { bindings::vsock_rs_skb_queue_tail(self.head.get(), skb.into_raw()) };
    }

    /// Adds `skb` at the head.
    pub(crate) fn push_front(&self, skb: SkBuff) {
        // SAFETY: The queue is initialised; it takes over the ownership of `skb`.
        unsafe { bindings::vsock_rs_skb_queue_head(self.head.get(), skb.into_raw()) };
    }

    /// Removes the buffer at the head.
    pub(crate) fn pop_front(&self) -> Option<SkBuff> {
        // SAFETY: The queue is initialised.
        let skb = unsafe { bindings::vsock_rs_skb_dequeue(self.head.get()) };
        // SAFETY: By the type invariant the queue owned the buffer, now unlinked and ours.
        unsafe { SkBuff::from_raw(skb) }
    }

    /// Returns whether the queue is empty, without taking its lock.
    pub(crate) fn is_empty_lockless(&self) -> bool {
        // SAFETY: The queue is initialised.
        unsafe { bindings::vsock_rs_skb_queue_empty_lockless(self.head.get()) }
    }

    /// Frees every buffer.
    pub(crate) fn purge(&self) {
        // SAFETY: The queue is initialised and owns its buffers.
        unsafe { bindings::vsock_rs_skb_queue_purge(self.head.get()) };
    }

    /// Frees the buffers of socket `vsk`; returns how many were replies
    /// (`virtio_transport_purge_skbs()`).
    pub(crate) fn purge_sock(&self, vsk: &VsockSock) -> u32 {
        // SAFETY: The queue is initialised and owns its buffers; `vsk` is a valid socket.
        let n =
            unsafe { bindings::virtio_transport_purge_skbs(vsk.as_ptr().cast(), self.head.get()) };
        u32::try_from(n).unwrap_or(0)
    }
}

#[pinned_drop]
impl PinnedDrop for SkbQueue {
    fn drop(self: Pin<&mut Self>) {
        self.purge();
    }
}

/// Size of the C driver's rx buffer, header included (`VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE`):
/// the linear part of every rx buffer.
pub(crate) const RX_BUF_SIZE: u32 = bindings::VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE;

/// Size of a fragment page (`PAGE_SIZE`).
pub(crate) const PAGE_SIZE: u32 = bindings::PAGE_SIZE;

/// Returns the module parameter `rx_buf_size`: payload bytes per rx buffer, unchecked.
pub(crate) fn rx_buf_size_param() -> u32 {
    // SAFETY: No precondition; the parameter is read-only after load.
    unsafe { bindings::vsock_rs_rx_buf_size_param() }
}
