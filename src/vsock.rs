// SPDX-License-Identifier: GPL-2.0

//! The AF_VSOCK transport: the ops table handed to the vsock core.
//!
//! [`Ops`] is a `struct virtio_transport` whose socket operations are the
//! common `virtio_transport_*` functions of `virtio_transport_common.c`,
//! exactly as in the C driver, and whose device operations (`get_local_cid`,
//! `send_pkt`, `cancel_pkt`, ...) call a [`Transport`]. It lives in a
//! `static`; [`Ops::register`] registers it with `vsock_core_register()`.
//!
//! From 7.3 on (`kernel_7_3`), the ops take the socket or its network
//! namespace: the trampolines keep [`Transport`] the same on both kernels and,
//! as the 7.3 C driver, serve only sockets of namespaces in global mode
//! (`stream_allow`, `seqpacket_allow`), claim every remote CID
//! (`has_remote_cid`), ignore the namespace of a sent packet and hand received
//! ones to the common code without one.
//!
//! C headers: [`include/net/af_vsock.h`](srctree/include/net/af_vsock.h),
//! [`include/linux/virtio_vsock.h`](srctree/include/linux/virtio_vsock.h).

use crate::{
    bindings,
    skb::{SkBuff, Skb},
};
use core::marker::PhantomData;
use kernel::{
    error::{from_result, to_result},
    prelude::*,
    types::Opaque,
    ThisModule,
};

/// A vsock socket (`struct vsock_sock`).
///
/// # Invariants
///
/// `.0` is a valid `vsock_sock`.
#[repr(transparent)]
pub(crate) struct VsockSock(Opaque<bindings::vsock_sock>);

impl VsockSock {
    /// Returns a reference to the socket at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a valid `vsock_sock` that stays valid for `'a`.
    unsafe fn from_raw<'a>(ptr: *mut bindings::vsock_sock) -> &'a Self {
        // CAST: `VsockSock` is a transparent wrapper of `vsock_sock`.
        // SAFETY: By the safety requirements the pointer is valid for `'a`.
        unsafe { &*ptr.cast::<Self>() }
    }

    pub(crate) fn as_ptr(&self) -> *mut bindings::vsock_sock {
        self.0.get()
    }

    /// Returns whether the socket's network namespace is in global vsock mode
    /// (`vsock_net_mode_global()`): the only mode a virtio transport serves.
    #[cfg(kernel_7_3)]
    fn net_mode_global(&self) -> bool {
        // SAFETY: By the type invariant the socket is valid.
        unsafe { bindings::vsock_rs_net_mode_global(self.as_ptr()) }
    }
}

/// The device side of a virtio vsock transport.
pub(crate) trait Transport: 'static {
    /// Returns the guest's CID, or `VMADDR_CID_ANY` without a device.
    fn get_local_cid() -> u32;
    /// Sends `skb`; returns its payload length.
    fn send_pkt(skb: SkBuff) -> Result<u32>;
    /// Drops the packets of `vsk` not yet handed to the device.
    fn cancel_pkt(vsk: &VsockSock) -> Result;
    /// Returns whether `bufs_num` buffers can be sent in one go (`MSG_ZEROCOPY`).
    fn can_msgzerocopy(bufs_num: i32) -> bool;
    /// Returns whether `SOCK_SEQPACKET` sockets may use the transport.
    fn seqpacket_allow(remote_cid: u32) -> bool;
    /// Returns whether `MSG_ZEROCOPY` is supported.
    fn msgzerocopy_allow() -> bool;
}

/// The ops table of transport `T` (`struct virtio_transport`).
///
/// # Invariants
///
/// `.0` holds the common socket operations and `T`'s trampolines; only
/// `transport.module` is written after construction, before registration.
pub(crate) struct Ops<T>(Opaque<bindings::virtio_transport>, PhantomData<T>);

// SAFETY: The table is read-only once registered; the vsock core reads it from any thread.
unsafe impl<T> Sync for Ops<T> {}

macro_rules! common_ops {
    ($t:ident, $($field:ident = $func:ident),* $(,)?) => {
        $( $t.$field = Some(bindings::$func); )*
    };
}

impl<T: Transport> Ops<T> {
    /// Builds the table, as `virtio_transport` in `virtio_transport.c`.
    pub(crate) const fn new() -> Self {
        // SAFETY: All-zero is a valid `virtio_transport`: null pointers and `None` callbacks.
        let mut vt: bindings::virtio_transport = unsafe { core::mem::zeroed() };
        let t = &mut vt.transport;
        t.get_local_cid = Some(get_local_cid::<T>);
        t.cancel_pkt = Some(cancel_pkt::<T>);
        t.seqpacket_allow = Some(seqpacket_allow::<T>);
        t.msgzerocopy_allow = Some(msgzerocopy_allow::<T>);
        #[cfg(not(kernel_7_3))]
        {
            t.stream_allow = Some(bindings::virtio_transport_stream_allow);
        }
        #[cfg(kernel_7_3)]
        {
            t.stream_allow = Some(stream_allow);
            t.has_remote_cid = Some(has_remote_cid);
        }
        common_ops!(
            t,
            init = virtio_transport_do_socket_init,
            destruct = virtio_transport_destruct,
            release = virtio_transport_release,
            connect = virtio_transport_connect,
            shutdown = virtio_transport_shutdown,
            dgram_bind = virtio_transport_dgram_bind,
            dgram_dequeue = virtio_transport_dgram_dequeue,
            dgram_enqueue = virtio_transport_dgram_enqueue,
            dgram_allow = virtio_transport_dgram_allow,
            stream_dequeue = virtio_transport_stream_dequeue,
            stream_enqueue = virtio_transport_stream_enqueue,
            stream_has_data = virtio_transport_stream_has_data,
            stream_has_space = virtio_transport_stream_has_space,
            stream_rcvhiwat = virtio_transport_stream_rcvhiwat,
            stream_is_active = virtio_transport_stream_is_active,
            seqpacket_dequeue = virtio_transport_seqpacket_dequeue,
            seqpacket_enqueue = virtio_transport_seqpacket_enqueue,
            seqpacket_has_data = virtio_transport_seqpacket_has_data,
            notify_poll_in = virtio_transport_notify_poll_in,
            notify_poll_out = virtio_transport_notify_poll_out,
            notify_recv_init = virtio_transport_notify_recv_init,
            notify_recv_pre_block = virtio_transport_notify_recv_pre_block,
            notify_recv_pre_dequeue = virtio_transport_notify_recv_pre_dequeue,
            notify_recv_post_dequeue = virtio_transport_notify_recv_post_dequeue,
            notify_send_init = virtio_transport_notify_send_init,
            notify_send_pre_block = virtio_transport_notify_send_pre_block,
            notify_send_pre_enqueue = virtio_transport_notify_send_pre_enqueue,
            notify_send_post_enqueue = virtio_transport_notify_send_post_enqueue,
            notify_buffer_size = virtio_transport_notify_buffer_size,
            notify_set_rcvlowat = virtio_transport_notify_set_rcvlowat,
            unsent_bytes = virtio_transport_unsent_bytes,
            read_skb = virtio_transport_read_skb,
        );
        vt.send_pkt = Some(send_pkt::<T>);
        vt.can_msgzerocopy = Some(can_msgzerocopy::<T>);
        // INVARIANT: The table was just filled in.
        Self(Opaque::new(vt), PhantomData)
    }

    fn as_ptr(&self) -> *mut bindings::virtio_transport {
        self.0.get()
    }

    /// Registers the transport as the guest-to-host one (`vsock_core_register()`).
    pub(crate) fn register(&'static self, module: &'static ThisModule) -> Result<Registration<T>> {
        let vt = self.as_ptr();
        // CAST: the module's bindings and the kernel's describe the same `struct module`.
        let owner = module.as_ptr().cast::<bindings::module>();
        // SAFETY: `vt` is valid; the table is not registered yet, so nobody reads it.
        unsafe { (*vt).transport.module = owner };
        // SAFETY: `transport` is the first field of a `virtio_transport` that lives forever.
        to_result(unsafe {
            bindings::vsock_core_register(
                core::ptr::addr_of_mut!((*vt).transport),
                bindings::VSOCK_TRANSPORT_F_G2H as i32,
            )
        })?;
        Ok(Registration(self))
    }

    /// Hands a received packet to the common code (`virtio_transport_recv_pkt()`).
    pub(crate) fn recv_pkt(&self, skb: SkBuff) {
        // SAFETY: The table is valid; the common code takes ownership of `skb`.
        #[cfg(not(kernel_7_3))]
        unsafe {
            bindings::virtio_transport_recv_pkt(self.as_ptr(), skb.into_raw())
        };
        // SAFETY: The table is valid; the common code takes ownership of `skb`. A null
        // namespace means global mode, as in C.
        #[cfg(kernel_7_3)]
        unsafe {
            bindings::virtio_transport_recv_pkt(
                self.as_ptr(),
                skb.into_raw(),
                core::ptr::null_mut(),
            )
        };
    }

    /// Resets every connected socket of this transport, as the C driver's
    /// `vsock_for_each_connected_socket(..., virtio_vsock_reset_sock)`.
    pub(crate) fn reset_connected_sockets(&self) {
        // SAFETY: The table is valid; `vsock_rs_reset_sock` is a valid callback.
        unsafe {
            bindings::vsock_for_each_connected_socket(
                core::ptr::addr_of_mut!((*self.as_ptr()).transport),
                Some(bindings::vsock_rs_reset_sock),
            )
        };
    }
}

/// A registered transport; unregistered when dropped.
///
/// # Invariants
///
/// `.0` is registered with the vsock core.
pub(crate) struct Registration<T: Transport>(&'static Ops<T>);

impl<T: Transport> Drop for Registration<T> {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the transport is registered.
        unsafe {
            bindings::vsock_core_unregister(core::ptr::addr_of_mut!((*self.0.as_ptr()).transport))
        };
    }
}

/// Delivers a copy of `skb` to the vsockmon taps (`virtio_transport_deliver_tap_pkt()`).
pub(crate) fn deliver_tap(skb: &Skb) {
    // SAFETY: `skb` is a valid virtio vsock buffer.
    unsafe { bindings::virtio_transport_deliver_tap_pkt(skb.as_ptr()) };
}

/// Frees a packet the device has sent (`virtio_transport_consume_skb_sent(skb, true)`).
pub(crate) fn consume_skb_sent(skb: SkBuff) {
    // SAFETY: The buffer is ours; the function consumes it.
    unsafe { bindings::virtio_transport_consume_skb_sent(skb.into_raw(), true) };
}

extern "C" fn get_local_cid<T: Transport>() -> u32 {
    T::get_local_cid()
}

/// Sends `skb`. From 7.3 on, the common code passes the namespace of the
/// socket, which a virtio transport does not use (as in C).
///
/// # Safety
///
/// `skb` must be a valid virtio vsock buffer owned by the caller, who hands it over.
unsafe extern "C" fn send_pkt<T: Transport>(
    skb: *mut bindings::sk_buff,
    #[cfg(kernel_7_3)] _net: *mut bindings::net,
) -> i32 {
    // SAFETY: By the safety requirements.
    let Some(skb) = (unsafe { SkBuff::from_raw(skb) }) else {
        return EINVAL.to_errno();
    };
    from_result(|| Ok(i32::try_from(T::send_pkt(skb)?)?))
}

/// # Safety
///
/// `vsk` must be a valid socket.
unsafe extern "C" fn cancel_pkt<T: Transport>(vsk: *mut bindings::vsock_sock) -> i32 {
    // SAFETY: By the safety requirements `vsk` is valid for the call.
    let vsk = unsafe { VsockSock::from_raw(vsk) };
    from_result(|| {
        T::cancel_pkt(vsk)?;
        Ok(0)
    })
}

extern "C" fn can_msgzerocopy<T: Transport>(bufs_num: i32) -> bool {
    T::can_msgzerocopy(bufs_num)
}

/// From 7.3 on, only sockets of namespaces in global mode may use
/// `SOCK_SEQPACKET` (as in C).
///
/// # Safety
///
/// From 7.3 on, `vsk` must be a valid socket.
unsafe extern "C" fn seqpacket_allow<T: Transport>(
    #[cfg(kernel_7_3)] vsk: *mut bindings::vsock_sock,
    remote_cid: u32,
) -> bool {
    // SAFETY: By the safety requirements `vsk` is valid for the call.
    #[cfg(kernel_7_3)]
    if !unsafe { VsockSock::from_raw(vsk) }.net_mode_global() {
        return false;
    }
    T::seqpacket_allow(remote_cid)
}

/// `virtio_transport_stream_allow()`, which 7.3 moved into the C driver.
///
/// # Safety
///
/// `vsk` must be a valid socket.
#[cfg(kernel_7_3)]
unsafe extern "C" fn stream_allow(vsk: *mut bindings::vsock_sock, _cid: u32, _port: u32) -> bool {
    // SAFETY: By the safety requirements `vsk` is valid for the call.
    unsafe { VsockSock::from_raw(vsk) }.net_mode_global()
}

/// The host may implement any CID: always assume it does (as the C driver).
#[cfg(kernel_7_3)]
extern "C" fn has_remote_cid(_vsk: *mut bindings::vsock_sock, _cid: u32) -> bool {
    true
}

extern "C" fn msgzerocopy_allow<T: Transport>() -> bool {
    T::msgzerocopy_allow()
}
