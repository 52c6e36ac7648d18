// SPDX-License-Identifier: GPL-2.0

//! Small extensions of the 6.12 `kernel` crate that the driver needs.
//!
//! A mutex with `try_lock` ([`TryMutex`]), an [`Arc`] published with RCU
//! ([`RcuArc`]), an owned workqueue ([`WorkQueue`]) with [`flush_work`], and
//! a debugfs directory of read-only counters ([`DebugfsDir`]).
//!
//! C headers: [`include/linux/mutex.h`](srctree/include/linux/mutex.h),
//! [`include/linux/rcupdate.h`](srctree/include/linux/rcupdate.h),
//! [`include/linux/workqueue.h`](srctree/include/linux/workqueue.h),
//! [`include/linux/debugfs.h`](srctree/include/linux/debugfs.h).

use crate::bindings;
use core::{
    cell::UnsafeCell,
    marker::PhantomData,
    ops::{Deref, DerefMut},
    ptr::{self, NonNull},
    sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering},
};
use kernel::{
    c_str,
    prelude::*,
    str::CStr,
    sync::{Arc, ArcBorrow, LockClassKey},
    types::Opaque,
    workqueue::{HasWork, Queue, Work},
};

/// Creates a [`TryMutex`] initialiser with a fresh lockdep class.
macro_rules! new_try_mutex {
    ($inner:expr, $name:literal $(,)?) => {
        $crate::kext::TryMutex::new(
            $inner,
            ::kernel::c_str!($name),
            ::kernel::static_lock_class!(),
        )
    };
}
pub(crate) use new_try_mutex;

/// A sleeping mutual-exclusion lock that can also be tried without sleeping.
///
/// The 6.12 [`kernel::sync::Mutex`] has no `try_lock`; the transmit fast path
/// needs one (as `mutex_trylock()` in `virtio_transport_send_skb_fast_path()`).
///
/// # Invariants
///
/// `mutex` was initialised by `__mutex_init()`, and `data` is only accessed
/// through a [`TryMutexGuard`], that is with `mutex` held.
#[pin_data]
pub(crate) struct TryMutex<T> {
    #[pin]
    mutex: Opaque<bindings::mutex>,
    data: UnsafeCell<T>,
}

// SAFETY: The mutex hands `data` to one thread at a time, so `T: Send` suffices.
unsafe impl<T: Send> Send for TryMutex<T> {}
// SAFETY: As above: shared references only give access to `data` under the mutex.
unsafe impl<T: Send> Sync for TryMutex<T> {}

impl<T> TryMutex<T> {
    /// Returns an initialiser of a mutex protecting `data`; use [`new_try_mutex!`].
    pub(crate) fn new(
        data: T,
        name: &'static CStr,
        key: &'static LockClassKey,
    ) -> impl PinInit<Self> {
        // CAST: `LockClassKey` is a `#[repr(transparent)]` wrapper of `lock_class_key`.
        let key = ptr::from_ref(key)
            .cast_mut()
            .cast::<bindings::lock_class_key>();
        pin_init!(Self {
            // SAFETY: `slot` is valid for writes; `name` and `key` are static.
            mutex <- Opaque::ffi_init(|slot| unsafe {
                bindings::__mutex_init(slot, name.as_char_ptr(), key)
            }),
            data: UnsafeCell::new(data),
        })
    }

    /// Acquires the mutex, sleeping until it is available.
    #[must_use = "the mutex is unlocked when the guard is dropped"]
    pub(crate) fn lock(&self) -> TryMutexGuard<'_, T> {
        // SAFETY: By the type invariant the mutex is initialised.
        unsafe { bindings::vsock_rs_mutex_lock(self.mutex.get()) };
        // INVARIANT: The mutex was just acquired.
        TryMutexGuard::new(self)
    }

    /// Acquires the mutex if it is free, without sleeping.
    #[must_use = "the mutex is unlocked when the guard is dropped"]
    pub(crate) fn try_lock(&self) -> Option<TryMutexGuard<'_, T>> {
        // SAFETY: By the type invariant the mutex is initialised.
        let locked = unsafe { bindings::mutex_trylock(self.mutex.get()) } != 0;
        // INVARIANT: The mutex is held if `mutex_trylock()` returned 1. The guard must be built
        // only then (not with `then_some`, which would build and drop it, unlocking anyway).
        if locked {
            Some(TryMutexGuard::new(self))
        } else {
            None
        }
    }
}

/// Access to the data of a locked [`TryMutex`]; unlocks it when dropped.
///
/// Like [`kernel::sync::lock::Guard`], it is not `Send`: a mutex must be
/// unlocked by the task that locked it.
///
/// # Invariants
///
/// The guard's owner holds the mutex of `lock`.
#[must_use = "the mutex is unlocked when the guard is dropped"]
pub(crate) struct TryMutexGuard<'a, T> {
    lock: &'a TryMutex<T>,
    _not_send: PhantomData<*mut ()>,
}

impl<'a, T> TryMutexGuard<'a, T> {
    /// The caller must hold the mutex of `lock`, and hands it to the guard.
    fn new(lock: &'a TryMutex<T>) -> Self {
        Self {
            lock,
            _not_send: PhantomData,
        }
    }
}

// `TryMutexGuard` must not be `Send`. This fails to compile if it is: the
// call is then ambiguous between the two implementations.
const _: () = {
    trait AmbiguousIfSend<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSend<()> for T {}
    impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
    let _ = <TryMutexGuard<'static, ()> as AmbiguousIfSend<_>>::check;
};

impl<T> Deref for TryMutexGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: By the type invariant the mutex is held, so nobody else accesses `data`.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for TryMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: By the type invariant the mutex is held, so nobody else accesses `data`.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for TryMutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: By the type invariant this context holds the mutex.
        unsafe { bindings::mutex_unlock(self.lock.mutex.get()) };
    }
}

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
        // SAFETY: No precondition; paired with the unlock below.
        unsafe { bindings::vsock_rs_rcu_read_lock() };
        let ptr = self.ptr.load(Ordering::Acquire);
        // SAFETY: By the type invariant `ptr` came from `Arc::into_raw`, and it is not
        // released before the grace period that `rcu_read_lock()` holds off, which outlasts `f`.
        let ret = f((!ptr.is_null()).then(|| unsafe { ArcBorrow::from_raw(ptr) }));
        // SAFETY: Paired with the lock above.
        unsafe { bindings::vsock_rs_rcu_read_unlock() };
        ret
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
        // SAFETY: No precondition; waits for every reader that may have loaded `old`.
        unsafe { bindings::synchronize_rcu() };
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

impl WorkQueue {
    /// Allocates a workqueue called `name`, as `alloc_workqueue(name, 0, 0)`.
    pub(crate) fn new(name: &'static CStr) -> Result<Self> {
        // SAFETY: The format is a valid "%s" for the one `name` argument, a C string.
        let wq = unsafe {
            kernel::bindings::alloc_workqueue(c_str!("%s").as_char_ptr(), 0, 0, name.as_char_ptr())
        };
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

/// A debugfs directory of read-only files showing atomics of a `T`.
///
/// # Invariants
///
/// `dentry` is what `debugfs_create_dir()` returned (maybe an error pointer,
/// which debugfs ignores); every file in it points into `data`, which is kept
/// alive until the directory is removed.
pub(crate) struct DebugfsDir<T: Send + Sync> {
    dentry: *mut bindings::dentry,
    data: Arc<T>,
}

// SAFETY: debugfs dentries can be removed from any thread; `data` is `Send + Sync`.
unsafe impl<T: Send + Sync> Send for DebugfsDir<T> {}
// SAFETY: The methods only call thread-safe debugfs functions.
unsafe impl<T: Send + Sync> Sync for DebugfsDir<T> {}

impl<T: Send + Sync> DebugfsDir<T> {
    /// Creates the directory `name` at the top of debugfs, for files showing parts of `data`.
    pub(crate) fn new(name: &CStr, data: Arc<T>) -> Self {
        // SAFETY: `name` is a valid C string; a null parent means the debugfs root.
        let dentry = unsafe { bindings::debugfs_create_dir(name.as_char_ptr(), ptr::null_mut()) };
        Self { dentry, data }
    }

    /// Adds a read-only file `name` showing the value `field` selects in the data.
    pub(crate) fn add_u64(&self, name: &CStr, field: impl FnOnce(&T) -> &AtomicU64) {
        // CAST: `AtomicU64` has the size and alignment of `u64`.
        let value = field(&self.data).as_ptr();
        // SAFETY: `value` points into `data`, alive until the directory is removed (type
        // invariant); debugfs copies `name`.
        unsafe { bindings::debugfs_create_u64(name.as_char_ptr(), 0o444, self.dentry, value) };
    }

    /// Adds a read-only file `name` showing the value `field` selects in the data.
    pub(crate) fn add_u32(&self, name: &CStr, field: impl FnOnce(&T) -> &AtomicU32) {
        // CAST: `AtomicU32` has the size and alignment of `u32`.
        let value = field(&self.data).as_ptr();
        // SAFETY: As in `add_u64`.
        unsafe { bindings::debugfs_create_u32(name.as_char_ptr(), 0o444, self.dentry, value) };
    }
}

impl<T: Send + Sync> Drop for DebugfsDir<T> {
    fn drop(&mut self) {
        // SAFETY: `dentry` came from `debugfs_create_dir()`; removal waits for readers, so
        // `data` may be released afterwards.
        unsafe { bindings::debugfs_remove(self.dentry) };
    }
}
