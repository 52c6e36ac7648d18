// SPDX-License-Identifier: GPL-2.0

//! What the driver needs beyond the `kernel` crate's sync and workqueue APIs.
//!
//! An [`Arc`] published with RCU ([`RcuArc`]) and an owned workqueue
//! ([`WorkQueue`]) with [`flush_work`], which the `kernel` crate does not have
//! yet; and, re-exported, a mutex with `try_lock` ([`TryMutex`]), RCU
//! read-side guards ([`rcu`]) and debugfs directories owning their data
//! ([`debugfs`]).
//!
//! C headers: [`include/linux/rcupdate.h`](srctree/include/linux/rcupdate.h),
//! [`include/linux/workqueue.h`](srctree/include/linux/workqueue.h).
//!
//! # Kernels
//!
//! The re-exports come from the `kernel` crate on 7.3, and on 6.12 from
//! `compat_6_12.rs`, stand-ins of the same names and shapes.

use core::{
    ops::Deref,
    ptr::{self, NonNull},
    sync::atomic::{AtomicPtr, Ordering},
};
use kernel::{
    c_str,
    prelude::*,
    str::CStr,
    sync::{Arc, ArcBorrow},
    workqueue::{HasWork, Queue, Work},
};

#[cfg(not(kernel_7_3))]
pub(crate) use crate::compat_6_12::{debugfs, new_try_mutex, rcu, TryMutex};
#[cfg(kernel_7_3)]
pub(crate) use kernel::{debugfs, new_mutex as new_try_mutex, sync::rcu, sync::Mutex as TryMutex};

/// An optional [`Arc<T>`] published to readers with RCU, as the C driver's
/// `the_virtio_vsock`.
///
/// # Invariants
///
/// `ptr` is null or comes from [`Arc::into_raw`] and owns that reference;
/// a pointer replaced by [`RcuArc::replace`] is released only after an RCU
/// grace period, so readers inside `rcu_read_lock()` can still use it.
pub(crate) struct RcuArc<T> {
    ptr: AtomicPtr<T>,
}

// SAFETY: `RcuArc<T>` hands out `Arc<T>` clones to any thread.
unsafe impl<T: Send + Sync> Send for RcuArc<T> {}
// SAFETY: As above.
unsafe impl<T: Send + Sync> Sync for RcuArc<T> {}

impl<T: Send + Sync> RcuArc<T> {
    /// Creates an empty slot.
    pub(crate) const fn new() -> Self {
        Self {
            ptr: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Calls `f` with the published object, if any, inside an RCU read-side critical section.
    ///
    /// As `rcu_read_lock(); vsock = rcu_dereference(...); ...; rcu_read_unlock()`: `f` must
    /// not sleep, and [`RcuArc::replace`] waits until it has returned.
    pub(crate) fn with<R>(&self, f: impl FnOnce(Option<ArcBorrow<'_, T>>) -> R) -> R {
        let _guard = rcu::read_lock();
        let ptr = self.ptr.load(Ordering::Acquire);
        // SAFETY: By the type invariant `ptr` came from `Arc::into_raw`, and it is not
        // released before the grace period that `_guard` holds off, which outlasts `f`.
        f((!ptr.is_null()).then(|| unsafe { ArcBorrow::from_raw(ptr) }))
    }

    /// Publishes `new` and returns the previous object, once no reader can see it any more.
    ///
    /// May sleep (`synchronize_rcu()`) if there was a previous object.
    pub(crate) fn replace(&self, new: Option<Arc<T>>) -> Option<Arc<T>> {
        let new = new.map_or(ptr::null_mut(), |arc| Arc::into_raw(arc).cast_mut());
        let old = self.ptr.swap(new, Ordering::AcqRel);
        if old.is_null() {
            return None;
        }
        // Waits for every reader that may have loaded `old`.
        rcu::synchronize_rcu();
        // SAFETY: By the type invariant `old` came from `Arc::into_raw` and owned a reference,
        // which is now ours: it is no longer in `ptr`, and no reader uses it any more.
        Some(unsafe { Arc::from_raw(old) })
    }
}

impl<T> Drop for RcuArc<T> {
    fn drop(&mut self) {
        let ptr = *self.ptr.get_mut();
        if !ptr.is_null() {
            // SAFETY: `&mut self` means no reader can hold `ptr`; it owns a reference.
            drop(unsafe { Arc::from_raw(ptr) });
        }
    }
}

/// Waits until the last queued instance of work item `ID` of `item` has run (`flush_work()`).
pub(crate) fn flush_work<T: HasWork<T, ID>, const ID: u64>(item: &T) {
    // SAFETY: `item` is valid, so `raw_get_work` (which the `HasWork` contract makes a
    // field projection) gives a valid `Work`, and `raw_get` its `work_struct`, which
    // `new_work!` initialised.
    let work = unsafe { Work::raw_get(T::raw_get_work(ptr::from_ref(item).cast_mut())) };
    // SAFETY: `work` is an initialised work item, alive for this call.
    unsafe { kernel::bindings::flush_work(work) };
}

/// Sleeps for at least `ms` milliseconds (`fsleep()`); only in process context.
pub(crate) fn sleep_ms(ms: u32) {
    #[cfg(kernel_7_3)]
    kernel::time::delay::fsleep(kernel::time::Delta::from_millis(i64::from(ms)));
    #[cfg(not(kernel_7_3))]
    {
        // SAFETY: `msleep()` only needs process context, which the callers (work items)
        // have.
        unsafe { kernel::bindings::msleep(ms) };
    }
}

/// An owned workqueue, destroyed (after running its pending work) when dropped.
///
/// # Invariants
///
/// `.0` was returned by `alloc_workqueue()` and is destroyed only by `drop`.
pub(crate) struct WorkQueue(NonNull<kernel::bindings::workqueue_struct>);

// SAFETY: Workqueues can be used and destroyed from any thread.
unsafe impl Send for WorkQueue {}
// SAFETY: Workqueue operations are thread-safe.
unsafe impl Sync for WorkQueue {}

/// `alloc_workqueue()`, a macro over `alloc_workqueue_noprof()` from 7.3 on.
#[cfg(not(kernel_7_3))]
use kernel::bindings::alloc_workqueue;
#[cfg(kernel_7_3)]
use kernel::bindings::alloc_workqueue_noprof as alloc_workqueue;

/// The flags of the C driver's workqueue: none; from 7.3 on, `WQ_PERCPU`,
/// which 7.3 asks of per-CPU workqueues now that unbound is to become the default.
#[cfg(not(kernel_7_3))]
const WQ_FLAGS: u32 = 0;
#[cfg(kernel_7_3)]
const WQ_FLAGS: u32 = kernel::bindings::wq_flags_WQ_PERCPU;

impl WorkQueue {
    /// Allocates a workqueue called `name`, as the C driver's `alloc_workqueue(name, 0, 0)`
    /// (`WQ_PERCPU` from 7.3 on).
    pub(crate) fn new(name: &'static CStr) -> Result<Self> {
        // SAFETY: The format is a valid "%s" for the one `name` argument, a C string.
        let wq =
            unsafe { alloc_workqueue(c_str!("%s").as_char_ptr(), WQ_FLAGS, 0, name.as_char_ptr()) };
        // INVARIANT: `wq` was just returned by `alloc_workqueue()`.
        NonNull::new(wq).map(Self).ok_or(ENOMEM)
    }
}

impl Deref for WorkQueue {
    type Target = Queue;

    fn deref(&self) -> &Queue {
        // SAFETY: By the type invariant the workqueue is valid until `self` is dropped.
        unsafe { Queue::from_raw(self.0.as_ptr()) }
    }
}

impl Drop for WorkQueue {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the workqueue is valid, and it is not used any more.
        unsafe { kernel::bindings::destroy_workqueue(self.0.as_ptr()) };
    }
}
