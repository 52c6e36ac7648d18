// SPDX-License-Identifier: GPL-2.0

//! Virtio device drivers: devices, virtqueues and driver registration.
//!
//! A driver implements [`Driver`] and registers with [`Registration`]. Its
//! state is an [`Arc`] stored in `vdev->priv` from probe to remove, so that
//! virtqueue callbacks (in interrupt context) reach it.
//!
//! Virtqueues are typed by the token ([`Token`]) that owns each posted
//! buffer. [`Device::find_vqs`] creates them and
//! [`Device::reset_and_del_vqs`] takes every one of them back, resets the
//! device, frees the buffers still posted and deletes the queues; dropping a
//! [`Virtqueue`] only forgets it (and leaks its buffers).
//!
//! One rule is not enforced by the types: [`Driver::stop`] must hand every
//! virtqueue back (the queues die with the device's transport). If a driver
//! does not, its state is leaked rather than freed, an error is logged, and
//! the module is pinned so that the leaked queues' callbacks stay valid.
//!
//! C headers: [`include/linux/virtio.h`](srctree/include/linux/virtio.h),
//! [`include/linux/virtio_config.h`](srctree/include/linux/virtio_config.h).

use crate::{
    bindings,
    skb::{Gfp, SkBuff, Skb},
};
use core::{ffi::c_void, marker::PhantomData, ptr};
use kernel::{
    alloc::KBox,
    error::{from_result, to_result},
    prelude::*,
    str::CString,
    sync::{Arc, ArcBorrow},
    types::{ForeignOwnable, Opaque},
    ThisModule,
};

/// A virtio driver whose per-device state is `Arc<Self>`.
///
/// The callbacks are called by [`Registration`]'s trampolines: `probe` then
/// `start` when a device is bound, `stop` when it is removed, `stop` and
/// `start` again around a system sleep (freeze/restore).
pub(crate) trait Driver: Send + Sync + Sized + 'static {
    /// Driver name.
    const NAME: &'static CStr;
    /// Virtio device ID served by the driver.
    const DEVICE_ID: u32;
    /// Device-specific feature bits the driver offers.
    const FEATURES: &'static [u32];

    /// Allocates the state of a newly bound device; no virtqueue exists yet.
    fn probe(dev: &Device<Self>) -> Result<Arc<Self>>;

    /// Sets up the virtqueues and starts the device (probe and restore).
    ///
    /// The state is already reachable from virtqueue callbacks. On error, the
    /// driver must have deleted the virtqueues it created.
    fn start(this: &Arc<Self>, dev: &Device<Self>) -> Result;

    /// Stops the device and deletes its virtqueues (remove and freeze).
    fn stop(this: &Arc<Self>, dev: &Device<Self>);

    /// Called in interrupt context when virtqueue `index` has used buffers.
    fn vq_done(this: ArcBorrow<'_, Self>, index: u32);
}

/// A virtio device bound to driver `T`.
///
/// # Invariants
///
/// `.0` is a valid `virtio_device` bound to the driver registered by
/// `Registration<T>`, whose `priv` is null or an `Arc<T>` from
/// [`ForeignOwnable::into_foreign`].
#[repr(transparent)]
pub(crate) struct Device<T>(Opaque<bindings::virtio_device>, PhantomData<T>);

impl<T: Driver> Device<T> {
    /// # Safety
    ///
    /// `ptr` must be a device bound to `Registration<T>`'s driver, valid for `'a`.
    unsafe fn from_raw<'a>(ptr: *mut bindings::virtio_device) -> &'a Self {
        // CAST: `Device<T>` is a transparent wrapper of `virtio_device`.
        // SAFETY: By the safety requirements.
        unsafe { &*ptr.cast::<Self>() }
    }

    fn as_ptr(&self) -> *mut bindings::virtio_device {
        self.0.get()
    }

    /// Returns the index of the device (N in `virtioN`).
    pub(crate) fn index(&self) -> i32 {
        // SAFETY: By the type invariant the device is valid; `index` does not change.
        unsafe { (*self.as_ptr()).index }
    }

    /// Returns whether feature `bit`, one of [`Driver::FEATURES`], was negotiated.
    ///
    /// Other bits are reported as not negotiated (`virtio_has_feature()` would `BUG()`).
    pub(crate) fn has_feature(&self, bit: u32) -> bool {
        // SAFETY: The device is valid and the driver offered `bit`.
        T::FEATURES.contains(&bit)
            && unsafe { bindings::vsock_rs_virtio_has_feature(self.as_ptr(), bit) }
    }

    /// Reads the little-endian 64-bit configuration field at `offset`
    /// (`virtio_cread_bytes()` and `le64_to_cpu()`, also on legacy devices).
    pub(crate) fn read_config_le64(&self, offset: u32) -> u64 {
        // SAFETY: The device is valid and bound; the transport checks the offset.
        unsafe { bindings::vsock_rs_virtio_cread_le64(self.as_ptr(), offset) }
    }

    /// Adds a directory `name` of read-only files to the device's sysfs
    /// directory (`/sys/bus/virtio/devices/virtioN/<name>/`), one per entry
    /// of `files`, each showing `read(&data, index)` as a decimal number.
    ///
    /// The files exist until the returned group is dropped.
    pub(crate) fn add_u64_group<D: Send + Sync>(
        &self,
        name: &'static CStr,
        data: Arc<D>,
        files: KVec<CString>,
        read: fn(&D, usize) -> u64,
    ) -> Result<U64Group<D>> {
        U64Group::new(self.as_ptr(), name, data, files, read)
    }

    /// Tells the device that the driver is ready (`virtio_device_ready()`).
    pub(crate) fn ready(&self) {
        // SAFETY: The device is valid.
        unsafe { bindings::vsock_rs_virtio_device_ready(self.as_ptr()) };
    }

    fn nr_vqs(&self) -> usize {
        // SAFETY: The device is valid; its queues change only in probe/remove paths.
        unsafe { bindings::vsock_rs_virtio_nr_vqs(self.as_ptr()) }
    }

    /// Creates the device's virtqueues, one per name; callbacks go to [`Driver::vq_done`].
    ///
    /// # Errors
    ///
    /// `EBUSY` if the device already has virtqueues, or the transport's error.
    pub(crate) fn find_vqs<const N: usize>(&self, names: [&'static CStr; N]) -> Result<[NewVq; N]> {
        if self.nr_vqs() != 0 {
            return Err(EBUSY);
        }
        let mut info = names.map(|name| bindings::virtqueue_info {
            name: name.as_char_ptr(),
            callback: Some(vq_callback::<T>),
            ctx: false,
        });
        let mut vqs = [ptr::null_mut(); N];
        let n = u32::try_from(N).map_err(|_| EINVAL)?;
        // SAFETY: The device is valid and both arrays have `N` entries.
        to_result(unsafe {
            bindings::vsock_rs_virtio_find_vqs(
                self.as_ptr(),
                n,
                vqs.as_mut_ptr(),
                info.as_mut_ptr(),
            )
        })?;
        if vqs.iter().any(|vq| vq.is_null()) {
            // SAFETY: The device is valid; no handle to its queues exists.
            unsafe { bindings::vsock_rs_virtio_del_vqs(self.as_ptr()) };
            return Err(EINVAL);
        }
        // INVARIANT: The queues were just created, each handle is unique.
        Ok(vqs.map(NewVq))
    }

    /// Resets the device, frees the buffers still posted and deletes all its virtqueues.
    ///
    /// As `virtio_vsock_vqs_del()`. `vqs` must be every virtqueue of the
    /// device; otherwise nothing is done and the queues and their buffers
    /// are leaked.
    pub(crate) fn reset_and_del_vqs<const N: usize>(&self, vqs: [AnyVq; N]) {
        // SAFETY: Reading `vdev` of a valid queue.
        let ours = vqs.iter().all(|q| unsafe { (*q.vq).vdev } == self.as_ptr());
        if !ours || self.nr_vqs() != N {
            pr_err!(
                "virtqueues of device {} not deleted: not all handed back\n",
                self.index()
            );
            return;
        }
        // SAFETY: The device is valid. After the reset it uses no buffer any more.
        unsafe { bindings::virtio_reset_device(self.as_ptr()) };
        for q in &vqs {
            loop {
                // SAFETY: The queue is valid and the device reset.
                let token = unsafe { bindings::virtqueue_detach_unused_buf(q.vq) };
                if token.is_null() {
                    break;
                }
                // SAFETY: By `AnyVq`'s invariant, every token on the queue is a `T` of `free`.
                unsafe { (q.free)(token) };
            }
        }
        // SAFETY: Every queue handle was handed back (checked above) and is consumed now.
        unsafe { bindings::vsock_rs_virtio_del_vqs(self.as_ptr()) };
    }
}

/// A virtqueue token: the owner of a buffer posted on a queue.
pub(crate) trait Token: Send + Sized {
    /// Returns the pointer [`Token::into_ptr`] returns, without giving up ownership.
    fn token_ptr(&self) -> *mut c_void;

    /// Gives up ownership of the buffer for the queue.
    fn into_ptr(self) -> *mut c_void;

    /// Takes the buffer back from the queue; `None` for a null `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must be null or come from [`Token::into_ptr`] of this type, and not be used again.
    unsafe fn from_ptr(ptr: *mut c_void) -> Option<Self>;
}

impl Token for SkBuff {
    fn token_ptr(&self) -> *mut c_void {
        self.as_ptr().cast()
    }

    fn into_ptr(self) -> *mut c_void {
        self.into_raw().cast()
    }

    unsafe fn from_ptr(ptr: *mut c_void) -> Option<Self> {
        // SAFETY: By the safety requirements `ptr` is null or an owned buffer from `into_raw`.
        unsafe { SkBuff::from_raw(ptr.cast()) }
    }
}

impl<const N: usize> Token for KBox<[u8; N]> {
    fn token_ptr(&self) -> *mut c_void {
        ptr::from_ref::<[u8; N]>(self).cast_mut().cast()
    }

    fn into_ptr(self) -> *mut c_void {
        KBox::into_raw(self).cast()
    }

    unsafe fn from_ptr(ptr: *mut c_void) -> Option<Self> {
        // SAFETY: By the safety requirements `ptr` is null or comes from `KBox::into_raw`.
        (!ptr.is_null()).then(|| unsafe { KBox::from_raw(ptr.cast()) })
    }
}

/// A virtqueue just created by [`Device::find_vqs`], to be converted into a [`Virtqueue`].
///
/// # Invariants
///
/// `.0` is a live (non-null) virtqueue, and this is its only handle.
pub(crate) struct NewVq(*mut bindings::virtqueue);

/// A virtqueue whose posted buffers are owned by tokens of type `T`.
///
/// # Invariants
///
/// `vq` is a live (non-null) virtqueue, this is its only handle, and every
/// buffer on it was added with a `T` token.
pub(crate) struct Virtqueue<T: Token> {
    vq: *mut bindings::virtqueue,
    _p: PhantomData<T>,
}

// SAFETY: Virtqueue operations may run on any thread; `&mut self` serialises them.
unsafe impl<T: Token> Send for Virtqueue<T> {}
// SAFETY: The `&self` methods only read constant fields of the queue.
unsafe impl<T: Token> Sync for Virtqueue<T> {}

impl<T: Token> From<NewVq> for Virtqueue<T> {
    fn from(vq: NewVq) -> Self {
        // INVARIANT: A new queue has no buffer yet.
        Self {
            vq: vq.0,
            _p: PhantomData,
        }
    }
}

impl<T: Token> Virtqueue<T> {
    fn as_ptr(&self) -> *mut bindings::virtqueue {
        self.vq
    }

    /// Returns the number of descriptors of the ring (`virtqueue_get_vring_size()`).
    pub(crate) fn vring_size(&self) -> u32 {
        // SAFETY: By the type invariant the queue is live.
        unsafe { bindings::virtqueue_get_vring_size(self.as_ptr()) }
    }

    /// Returns the largest number of descriptors the queue may have (`vq->num_max`).
    pub(crate) fn num_max(&self) -> u32 {
        // SAFETY: By the type invariant the queue is live; `num_max` is constant.
        unsafe { (*self.as_ptr()).num_max }
    }

    /// Returns the number of free descriptors (`vq->num_free`).
    pub(crate) fn num_free(&mut self) -> u32 {
        // SAFETY: By the type invariant the queue is live; `&mut self` serialises updates.
        unsafe { (*self.as_ptr()).num_free }
    }

    /// Reads a configuration field of the queue's device, as [`Device::read_config_le64`].
    ///
    /// A live queue means a bound device, so this is usable outside the driver callbacks.
    pub(crate) fn read_config_le64(&mut self, offset: u32) -> u64 {
        // SAFETY: By the type invariant the queue, hence its bound device, is live.
        unsafe { bindings::vsock_rs_virtio_cread_le64((*self.as_ptr()).vdev, offset) }
    }

    /// Notifies the device of new buffers (`virtqueue_kick()`).
    pub(crate) fn kick(&mut self) -> bool {
        // SAFETY: By the type invariant the queue is live.
        unsafe { bindings::virtqueue_kick(self.as_ptr()) }
    }

    /// Disables used-buffer callbacks (`virtqueue_disable_cb()`).
    pub(crate) fn disable_cb(&mut self) {
        // SAFETY: By the type invariant the queue is live.
        unsafe { bindings::virtqueue_disable_cb(self.as_ptr()) };
    }

    /// Enables callbacks; returns `false` if buffers were used meanwhile (`virtqueue_enable_cb()`).
    pub(crate) fn enable_cb(&mut self) -> bool {
        // SAFETY: By the type invariant the queue is live.
        unsafe { bindings::virtqueue_enable_cb(self.as_ptr()) }
    }

    /// Takes back a used buffer and the length the device wrote (`virtqueue_get_buf()`).
    pub(crate) fn get_buf(&mut self) -> Option<(T, u32)> {
        let mut len = 0;
        // SAFETY: By the type invariant the queue is live.
        let token = unsafe { bindings::virtqueue_get_buf(self.as_ptr(), &mut len) };
        // SAFETY: By the type invariant every token on the queue is a `T`; it left the queue.
        unsafe { T::from_ptr(token) }.map(|t| (t, len))
    }

    /// Adds a buffer made of `out` device-readable and `in_` device-writable
    /// scatterlists, owned by `token`.
    ///
    /// # Safety
    ///
    /// Every entry of `sgs` must describe memory owned by `token`.
    unsafe fn add_sgs(
        &mut self,
        sgs: &mut [*mut bindings::scatterlist],
        out: usize,
        token: T,
        gfp: Gfp,
    ) -> Result<(), T> {
        let (Ok(n_out), Ok(n_in)) = (u32::try_from(out), u32::try_from(sgs.len() - out)) else {
            return Err(token);
        };
        // SAFETY: The queue is live; the scatterlists describe memory owned by the token,
        // which the queue owns from now on if this succeeds.
        let ret = unsafe {
            bindings::virtqueue_add_sgs(
                self.as_ptr(),
                sgs.as_mut_ptr(),
                n_out,
                n_in,
                token.token_ptr(),
                gfp.as_raw(),
            )
        };
        if ret < 0 {
            return Err(token);
        }
        let _ = token.into_ptr();
        Ok(())
    }
}

impl Virtqueue<SkBuff> {
    /// Posts `skb`, from [`SkBuff::alloc_rx`], for the device to write: its
    /// header and `linear` payload bytes after it, then its page fragments
    /// (as `virtio_vsock_rx_fill()`, with fragments).
    ///
    /// Gives `skb` back if `linear` exceeds its linear room, it has more
    /// fragments than a [`SgTable`] holds, or the queue is full.
    pub(crate) fn add_skb_in(
        &mut self,
        skb: SkBuff,
        linear: u32,
        sg: &mut SgTable,
        gfp: Gfp,
    ) -> Result<(), SkBuff> {
        if linear > skb.tailroom() {
            return Err(skb);
        }
        let Some(n) = sg.fill(&skb, crate::protocol::HDR_SIZE_U32 + linear, None) else {
            return Err(skb);
        };
        // SAFETY: `fill` made the first `n` entries describe memory owned by `skb`.
        unsafe { self.add_sgs(&mut sg.ptrs[..n], 0, skb, gfp) }
    }

    /// Posts `skb` for the device to read: header, then linear data or page
    /// fragments (as `virtio_transport_send_skb()`).
    ///
    /// Returns the buffer, now owned by the queue, for as long as the queue is borrowed.
    ///
    /// # Errors
    ///
    /// [`AddOutError::Full`] if the queue has no room now, and
    /// [`AddOutError::TooManyFrags`] if the buffer has more fragments than a
    /// [`SgTable`] holds, so it can never be added.
    pub(crate) fn add_skb_out<'a>(
        &'a mut self,
        skb: SkBuff,
        sg: &mut SgTable,
        gfp: Gfp,
    ) -> Result<&'a Skb, AddOutError> {
        let p = skb.as_ptr();
        // SAFETY: `p` is a valid buffer.
        let linear = (!unsafe { bindings::vsock_rs_skb_is_nonlinear(p) } && skb.len() > 0)
            // SAFETY: `p` is valid; a linear buffer has `len` bytes at `data`.
            .then(|| (unsafe { (*p).data }.cast::<c_void>(), skb.len()));
        let Some(n) = sg.fill(&skb, crate::protocol::HDR_SIZE_U32, linear) else {
            return Err(AddOutError::TooManyFrags(skb));
        };
        // SAFETY: `fill` made the first `n` entries describe memory owned by `skb`.
        unsafe { self.add_sgs(&mut sg.ptrs[..n], n, skb, gfp) }.map_err(AddOutError::Full)?;
        // SAFETY: The queue owns the buffer, and keeps it until `get_buf` or
        // `reset_and_del_vqs`, which both need the queue borrowed for longer than `'a`.
        Ok(unsafe { Skb::from_raw(p) })
    }
}

/// Why [`Virtqueue::add_skb_out`] gave a buffer back.
pub(crate) enum AddOutError {
    /// The queue is full for now: try again once the device has used buffers.
    Full(SkBuff),
    /// The buffer has more page fragments than a transmit can describe.
    TooManyFrags(SkBuff),
}

/// Adds one device-writable buffer: `virtqueue_add_inbuf()`, and from 7.3 on
/// `virtqueue_add_inbuf_cache_clean()`, as the C driver adds its event
/// buffers: the CPU leaves the buffer's cache lines clean while the device
/// owns it.
#[cfg(not(kernel_7_3))]
use bindings::virtqueue_add_inbuf as add_inbuf_raw;
#[cfg(kernel_7_3)]
use bindings::virtqueue_add_inbuf_cache_clean as add_inbuf_raw;

impl<const N: usize> Virtqueue<KBox<[u8; N]>> {
    /// Posts `buf` for the device to write (`virtqueue_add_inbuf()`).
    pub(crate) fn add_inbuf(
        &mut self,
        mut buf: KBox<[u8; N]>,
        gfp: Gfp,
    ) -> Result<(), KBox<[u8; N]>> {
        let Ok(len) = u32::try_from(N) else {
            return Err(buf);
        };
        let sg = Opaque::<bindings::scatterlist>::uninit();
        // SAFETY: `sg` is valid for writes; `buf` has `N` bytes.
        unsafe { bindings::sg_init_one(sg.get(), buf.as_mut_ptr().cast(), len) };
        // SAFETY: The queue is live; the scatterlist describes memory owned by `buf`, which a
        // `KBox` does not move and the queue owns from now on if this succeeds. Nothing else
        // writes it meanwhile, and kmalloc keeps other objects out of its cache lines where DMA
        // is not coherent, as `virtqueue_add_inbuf_cache_clean()` needs.
        let ret =
            unsafe { add_inbuf_raw(self.as_ptr(), sg.get(), 1, buf.token_ptr(), gfp.as_raw()) };
        if ret < 0 {
            return Err(buf);
        }
        let _ = buf.into_ptr();
        Ok(())
    }
}

/// A virtqueue of any token type, handed back to [`Device::reset_and_del_vqs`].
///
/// # Invariants
///
/// As [`Virtqueue`]; `free` drops a token of the queue's type.
pub(crate) struct AnyVq {
    vq: *mut bindings::virtqueue,
    free: unsafe fn(*mut c_void),
}

impl<T: Token> From<Virtqueue<T>> for AnyVq {
    fn from(vq: Virtqueue<T>) -> Self {
        /// # Safety
        ///
        /// `ptr` must be a token of type `T` taken off the queue.
        unsafe fn free<T: Token>(ptr: *mut c_void) {
            // SAFETY: By the safety requirements.
            drop(unsafe { T::from_ptr(ptr) });
        }
        Self {
            vq: vq.vq,
            free: free::<T>,
        }
    }
}

/// Number of scatterlists of a transmitted packet: header and `MAX_SKB_FRAGS` fragments.
const SG_MAX: usize = bindings::MAX_SKB_FRAGS as usize + 1;

/// Scatterlists of a packet (header, data, page fragments), kept off the
/// stack as in the C driver.
pub(crate) struct SgTable {
    sg: [Opaque<bindings::scatterlist>; SG_MAX],
    ptrs: [*mut bindings::scatterlist; SG_MAX],
}

// SAFETY: The scatterlists are only scratch space, without pointers kept between uses.
unsafe impl Send for SgTable {}

impl SgTable {
    /// Allocates a table.
    pub(crate) fn new() -> Result<KBox<Self>> {
        Ok(KBox::new(
            Self {
                sg: [const { Opaque::uninit() }; SG_MAX],
                ptrs: [ptr::null_mut(); SG_MAX],
            },
            GFP_KERNEL,
        )?)
    }

    /// Describes `head` bytes of `skb` from its header on, then `data` if
    /// given, then every page fragment of `skb` if it has any.
    ///
    /// Returns how many entries of `ptrs` are set, or `None` if they do not
    /// fit (more fragments than `MAX_SKB_FRAGS`).
    fn fill(&mut self, skb: &Skb, head: u32, data: Option<(*mut c_void, u32)>) -> Option<usize> {
        let p = skb.as_ptr();
        // SAFETY: `p` is a valid buffer.
        let nr_frags = unsafe { bindings::vsock_rs_skb_nr_frags(p) } as usize;
        if 1 + usize::from(data.is_some()) + nr_frags > SG_MAX {
            return None;
        }
        let mut n = 0;
        let mut push = |addr: *mut c_void, len: u32| {
            let entry = self.sg[n].get();
            // SAFETY: `entry` is valid for writes; `addr` has `len` bytes owned by `skb`
            // (the callers' ranges below).
            unsafe { bindings::sg_init_one(entry, addr, len) };
            self.ptrs[n] = entry;
            n += 1;
        };
        // SAFETY: `p` is a valid buffer with a header at its head, followed by its linear
        // part, of which the callers pass at most `HDR_SIZE` plus the tail room.
        push(unsafe { bindings::vsock_rs_skb_hdr(p) }.cast(), head);
        if let Some((addr, len)) = data {
            push(addr, len);
        }
        for i in 0..nr_frags {
            let mut len = 0;
            // SAFETY: `p` is valid and `i < nr_frags`, which fits a `u32` (at most `SG_MAX`).
            let va = unsafe { bindings::vsock_rs_skb_frag_virt(p, i as u32, &mut len) };
            push(va, len);
        }
        Some(n)
    }
}

/// One file of a [`U64Group`].
#[repr(C)]
struct U64Attr<D> {
    /// First, so that the attribute sysfs hands to [`show_u64`] is the file.
    attr: bindings::device_attribute,
    data: *const D,
    index: usize,
    read: fn(&D, usize) -> u64,
}

/// A sysfs directory of read-only numbers under a virtio device, from
/// [`Device::add_u64_group`]; removed when dropped.
///
/// # Invariants
///
/// `dev` holds a reference (`get_device()`) on a device whose kobject has
/// `group` registered on it. `group` points at `ptrs` (null-terminated),
/// which point at the attributes in `attrs`, whose names point into `names`
/// and whose `data` points into `data`; none of these heap buffers moves or
/// is freed until the group is removed.
pub(crate) struct U64Group<D> {
    dev: *mut bindings::device,
    group: KBox<bindings::attribute_group>,
    _ptrs: KVec<*mut bindings::attribute>,
    _attrs: KVec<U64Attr<D>>,
    _names: KVec<CString>,
    _data: Arc<D>,
}

// SAFETY: The group only reads `D` (which is `Sync`), and can be removed from any thread.
unsafe impl<D: Send + Sync> Send for U64Group<D> {}
// SAFETY: `&U64Group` gives access to nothing.
unsafe impl<D: Send + Sync> Sync for U64Group<D> {}

impl<D: Send + Sync> U64Group<D> {
    fn new(
        vdev: *mut bindings::virtio_device,
        name: &'static CStr,
        data: Arc<D>,
        names: KVec<CString>,
        read: fn(&D, usize) -> u64,
    ) -> Result<Self> {
        let mut attrs = KVec::with_capacity(names.len(), GFP_KERNEL)?;
        for (index, file) in names.iter().enumerate() {
            // SAFETY: All-zero is a valid `device_attribute` (null name and callbacks).
            let mut attr: bindings::device_attribute = unsafe { core::mem::zeroed() };
            attr.attr.name = file.as_char_ptr();
            attr.attr.mode = 0o444;
            // 6.12 has `show`, 7.3 a union of `show` and `show_const`.
            #[cfg(not(kernel_7_3))]
            {
                attr.show = Some(show_u64::<D>);
            }
            #[cfg(kernel_7_3)]
            {
                attr.__bindgen_anon_1.show = Some(show_u64::<D>);
            }
            let entry = U64Attr {
                attr,
                data: &*data,
                index,
                read,
            };
            // Cannot reallocate: the capacity was reserved above.
            attrs.push(entry, GFP_KERNEL)?;
        }
        let mut ptrs = KVec::with_capacity(attrs.len() + 1, GFP_KERNEL)?;
        for a in attrs.iter_mut() {
            let attr = ptr::addr_of_mut!(a.attr.attr);
            // SAFETY: `attr` is valid, and stays where it is (no more pushes on `attrs`).
            unsafe { bindings::vsock_rs_sysfs_attr_init(attr) };
            ptrs.push(attr, GFP_KERNEL)?;
        }
        ptrs.push(ptr::null_mut(), GFP_KERNEL)?;
        // SAFETY: All-zero is a valid `attribute_group` (no name, no attributes).
        let mut group: KBox<bindings::attribute_group> =
            KBox::new(unsafe { core::mem::zeroed() }, GFP_KERNEL)?;
        group.name = name.as_char_ptr();
        // 6.12 has `attrs`, 7.3 a union of `attrs` and `attrs_const`.
        #[cfg(not(kernel_7_3))]
        {
            group.attrs = ptrs.as_mut_ptr();
        }
        #[cfg(kernel_7_3)]
        {
            group.__bindgen_anon_2.attrs = ptrs.as_mut_ptr();
        }
        // SAFETY: `vdev` is a valid, bound device (the caller's `Device`).
        let dev = unsafe { bindings::get_device(ptr::addr_of_mut!((*vdev).dev)) };
        // SAFETY: `dev` is valid (we hold a reference); the group and everything it points
        // to stay allocated and unmoved until `drop` removes it.
        let ret = unsafe { bindings::sysfs_create_group(ptr::addr_of_mut!((*dev).kobj), &*group) };
        if let Err(e) = to_result(ret) {
            // SAFETY: Paired with the `get_device()` above.
            unsafe { bindings::put_device(dev) };
            return Err(e);
        }
        // INVARIANT: The group was just registered on `dev`, which we hold.
        Ok(Self {
            dev,
            group,
            _ptrs: ptrs,
            _attrs: attrs,
            _names: names,
            _data: data,
        })
    }
}

impl<D> Drop for U64Group<D> {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the group is registered on `dev`, which we hold.
        // Removal waits for the `show` calls in progress.
        unsafe {
            bindings::sysfs_remove_group(ptr::addr_of_mut!((*self.dev).kobj), &*self.group);
            bindings::put_device(self.dev);
        }
    }
}

/// Shows one number of a [`U64Group`].
///
/// # Safety
///
/// `attr` must be the attribute of a live [`U64Attr<D>`], and `buf` a sysfs page.
unsafe extern "C" fn show_u64<D>(
    _dev: *mut bindings::device,
    attr: *mut bindings::device_attribute,
    buf: *mut kernel::ffi::c_char,
) -> isize {
    // CAST: `attr` is the first field of a `#[repr(C)]` `U64Attr<D>`.
    // SAFETY: By the safety requirements; the group (and so the attribute and the data it
    // points to) is removed only after every `show` has returned.
    let a = unsafe { &*attr.cast::<U64Attr<D>>() };
    // SAFETY: By `U64Group`'s invariant `data` is alive while the file exists.
    let value = (a.read)(unsafe { &*a.data }, a.index);
    // SAFETY: `buf` is a sysfs page, by the safety requirements.
    unsafe { bindings::vsock_rs_sysfs_emit_u64(buf, value) }
}

/// Calls `T::vq_done` for the driver state of the queue's device.
///
/// # Safety
///
/// `vq` must be a live virtqueue of a device bound to `Registration<T>`'s driver.
unsafe extern "C" fn vq_callback<T: Driver>(vq: *mut bindings::virtqueue) {
    // SAFETY: By the safety requirements `vq` and its device are valid.
    let (vdev, index) = unsafe { ((*vq).vdev, (*vq).index) };
    // SAFETY: As above.
    let data = unsafe { (*vdev).priv_ };
    if data.is_null() {
        return;
    }
    // SAFETY: By `Device`'s invariant `priv` is an `Arc<T>`; it is released only after the
    // queues are deleted, which waits for callbacks.
    let this = unsafe { <Arc<T> as ForeignOwnable>::borrow(data) };
    T::vq_done(this, index);
}

/// The trampolines from the C virtio core to a [`Driver`].
struct Adapter<T>(PhantomData<T>);

impl<T: Driver> Adapter<T> {
    /// Returns a new reference to the driver state of `dev`.
    fn state(dev: &Device<T>) -> Option<Arc<T>> {
        // SAFETY: The device is valid.
        let data = unsafe { (*dev.as_ptr()).priv_ };
        // SAFETY: By `Device`'s invariant `priv` is null or an `Arc<T>`, released only by
        // `release`, which runs after the driver callbacks.
        (!data.is_null()).then(|| Arc::from(unsafe { <Arc<T> as ForeignOwnable>::borrow(data) }))
    }

    /// Releases the driver state of `dev`; leaks it if the device still has virtqueues.
    ///
    /// Leaked queues keep their callbacks, which point into this module, so
    /// the module is then pinned: it can no longer be unloaded, and no
    /// callback can ever run in freed module text.
    fn release(dev: &Device<T>) {
        if dev.nr_vqs() != 0 {
            pr_err!(
                "device {} removed with live virtqueues: state leaked, module pinned\n",
                dev.index()
            );
            // SAFETY: The device is valid and bound to this module's driver.
            unsafe { bindings::vsock_rs_pin_driver_module(dev.as_ptr()) };
            return;
        }
        // SAFETY: The device is valid; without queues no callback can run.
        let data =
            unsafe { ptr::replace(ptr::addr_of_mut!((*dev.as_ptr()).priv_), ptr::null_mut()) };
        if !data.is_null() {
            // SAFETY: `priv` held the reference from `into_foreign` in `probe`.
            drop(unsafe { <Arc<T> as ForeignOwnable>::from_foreign(data) });
        }
    }

    /// # Safety
    ///
    /// `vdev` must be a valid device being bound to this driver.
    unsafe extern "C" fn probe(vdev: *mut bindings::virtio_device) -> i32 {
        // SAFETY: By the safety requirements.
        let dev = unsafe { Device::<T>::from_raw(vdev) };
        from_result(|| {
            let this = T::probe(dev)?;
            let data = this.clone().into_foreign();
            // 6.12's `into_foreign` returns a `*const`.
            #[cfg(not(kernel_7_3))]
            let data = data.cast_mut();
            // INVARIANT: `priv` holds an `Arc<T>` from `into_foreign`.
            // SAFETY: The device is valid and its `priv` is ours.
            unsafe { (*vdev).priv_ = data };
            T::start(&this, dev).inspect_err(|_| Self::release(dev))?;
            Ok(0)
        })
    }

    /// # Safety
    ///
    /// `vdev` must be a valid device bound to this driver.
    unsafe extern "C" fn remove(vdev: *mut bindings::virtio_device) {
        // SAFETY: By the safety requirements.
        let dev = unsafe { Device::<T>::from_raw(vdev) };
        if let Some(this) = Self::state(dev) {
            T::stop(&this, dev);
        }
        Self::release(dev);
    }

    /// # Safety
    ///
    /// `vdev` must be a valid device bound to this driver.
    unsafe extern "C" fn freeze(vdev: *mut bindings::virtio_device) -> i32 {
        // SAFETY: By the safety requirements.
        let dev = unsafe { Device::<T>::from_raw(vdev) };
        if let Some(this) = Self::state(dev) {
            T::stop(&this, dev);
        }
        0
    }

    /// # Safety
    ///
    /// `vdev` must be a valid device bound to this driver.
    unsafe extern "C" fn restore(vdev: *mut bindings::virtio_device) -> i32 {
        // SAFETY: By the safety requirements.
        let dev = unsafe { Device::<T>::from_raw(vdev) };
        from_result(|| {
            let this = Self::state(dev).ok_or(ENODEV)?;
            T::start(&this, dev)?;
            Ok(0)
        })
    }
}

/// The C structures of a registered driver.
#[repr(C)]
struct DriverTables {
    driver: bindings::virtio_driver,
    id_table: [bindings::virtio_device_id; 2],
}

/// A registered virtio driver; unregistered (removing its devices) when dropped.
///
/// # Invariants
///
/// `tables` holds the `virtio_driver` registered with the virtio core, whose
/// callbacks are `Adapter<T>`'s.
pub(crate) struct Registration<T: Driver> {
    tables: Pin<KBox<Opaque<DriverTables>>>,
    _p: PhantomData<T>,
}

// SAFETY: Unregistering may happen on any thread.
unsafe impl<T: Driver> Send for Registration<T> {}
// SAFETY: `&Registration` gives no access to anything.
unsafe impl<T: Driver> Sync for Registration<T> {}

impl<T: Driver> Registration<T> {
    /// Registers driver `T` with the virtio core (`register_virtio_driver()`).
    pub(crate) fn new(module: &'static ThisModule) -> Result<Self> {
        let mut tables = DriverTables {
            // SAFETY: All-zero is a valid `virtio_driver` (null pointers, `None` callbacks).
            driver: unsafe { core::mem::zeroed() },
            id_table: [
                bindings::virtio_device_id {
                    device: T::DEVICE_ID,
                    vendor: bindings::VIRTIO_DEV_ANY_ID,
                },
                bindings::virtio_device_id::default(),
            ],
        };
        let drv = &mut tables.driver;
        drv.driver.name = T::NAME.as_char_ptr();
        drv.feature_table = T::FEATURES.as_ptr();
        drv.feature_table_size = u32::try_from(T::FEATURES.len())?;
        drv.probe = Some(Adapter::<T>::probe);
        drv.remove = Some(Adapter::<T>::remove);
        drv.freeze = Some(Adapter::<T>::freeze);
        drv.restore = Some(Adapter::<T>::restore);
        let tables = KBox::pin(Opaque::new(tables), GFP_KERNEL)?;
        let t = tables.get();
        // SAFETY: `t` is valid and pinned; `id_table` points into the same allocation.
        unsafe { (*t).driver.id_table = (*t).id_table.as_ptr() };
        // CAST: the module's bindings and the kernel's describe the same `struct module`.
        let owner = module.as_ptr().cast::<bindings::module>();
        // SAFETY: The driver structure is valid, pinned, and outlives the registration.
        to_result(unsafe {
            bindings::__register_virtio_driver(core::ptr::addr_of_mut!((*t).driver), owner)
        })?;
        // INVARIANT: The driver was just registered.
        Ok(Self {
            tables,
            _p: PhantomData,
        })
    }
}

impl<T: Driver> Drop for Registration<T> {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the driver is registered.
        unsafe {
            bindings::unregister_virtio_driver(core::ptr::addr_of_mut!((*self.tables.get()).driver))
        };
    }
}
