// SPDX-License-Identifier: GPL-2.0

//! Stand-ins for what the 6.12 `kernel` crate lacks and 7.3's has.
//!
//! Built only for kernels before 7.3 (`not(kernel_7_3)`, see `Kbuild`).
//! [`crate::kext`] re-exports either these or the upstream items, which they
//! follow in name and shape, so the driver is the same on both kernels and
//! dropping 6.12 deletes this file:
//!
//! | here | 7.3 |
//! |------|-----|
//! | [`TryMutex`], `new_try_mutex!` | `kernel::sync::Mutex` (with `try_lock`), `new_mutex!` |
//! | [`rcu`] | `kernel::sync::rcu` |
//! | [`debugfs`] | `kernel::debugfs` (`Scope`, `ScopedDir`) |
//!
//! C headers: [`include/linux/mutex.h`](srctree/include/linux/mutex.h),
//! [`include/linux/rcupdate.h`](srctree/include/linux/rcupdate.h),
//! [`include/linux/debugfs.h`](srctree/include/linux/debugfs.h).

use crate::bindings;
use core::{
    cell::UnsafeCell,
    marker::PhantomData,
    ops::{Deref, DerefMut},
    ptr,
};
use kernel::{prelude::*, str::CStr, sync::LockClassKey, types::Opaque};

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

pub(crate) mod rcu {
    //! RCU read-side critical sections, as 7.3's `kernel::sync::rcu`.

    use crate::bindings;
    use core::marker::PhantomData;

    /// Evidence that the RCU read side lock is held on the current thread/CPU.
    ///
    /// Not `Send`, because this property is per-thread/CPU.
    ///
    /// # Invariants
    ///
    /// The RCU read side lock is actually held while instances of this guard exist.
    pub(crate) struct Guard(PhantomData<*mut ()>);

    impl Guard {
        /// Acquires the RCU read side lock and returns a guard.
        pub(crate) fn new() -> Self {
            // SAFETY: An FFI call with no additional requirements.
            unsafe { bindings::vsock_rs_rcu_read_lock() };
            // INVARIANT: The RCU read side lock was just acquired above.
            Self(PhantomData)
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: By the type invariant the RCU read side is locked, so it may be unlocked.
            unsafe { bindings::vsock_rs_rcu_read_unlock() };
        }
    }

    /// Acquires the RCU read side lock.
    pub(crate) fn read_lock() -> Guard {
        Guard::new()
    }

    /// Waits for one RCU grace period: every read-side critical section
    /// begun before the call has ended when it returns. May sleep.
    pub(crate) fn synchronize_rcu() {
        // SAFETY: `synchronize_rcu()` may always be called from process context.
        unsafe { bindings::synchronize_rcu() };
    }
}

pub(crate) mod debugfs {
    //! Directories of read-only debugfs files whose data they own, as 7.3's
    //! `kernel::debugfs::{Scope, ScopedDir}`, for what `debugfs_create_u32()`
    //! and `debugfs_create_u64()` show.

    use crate::bindings;
    use core::{
        marker::{PhantomData, PhantomPinned},
        ptr,
        sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering},
    };
    use kernel::{prelude::*, str::CStr};

    /// A value a debugfs file can show.
    pub(crate) trait Writer {
        /// Creates the read-only file `name` in `parent`, showing `self`.
        ///
        /// # Safety
        ///
        /// `parent` must be a debugfs directory (or an error pointer), removed
        /// before `self` is dropped or moved.
        unsafe fn create_file(&self, name: &CStr, parent: *mut bindings::dentry);
    }

    impl Writer for AtomicU64 {
        unsafe fn create_file(&self, name: &CStr, parent: *mut bindings::dentry) {
            // SAFETY: `AtomicU64` has the layout of `u64`, which outlives the file by the
            // safety requirements; debugfs copies `name`.
            unsafe {
                bindings::debugfs_create_u64(name.as_char_ptr(), 0o444, parent, self.as_ptr())
            };
        }
    }

    impl Writer for AtomicU32 {
        unsafe fn create_file(&self, name: &CStr, parent: *mut bindings::dentry) {
            // SAFETY: As for `AtomicU64`.
            unsafe {
                bindings::debugfs_create_u32(name.as_char_ptr(), 0o444, parent, self.as_ptr())
            };
        }
    }

    /// A debugfs directory at the top of debugfs whose files show parts of
    /// `data`; removed, files and all, before `data` is dropped.
    ///
    /// # Invariants
    ///
    /// `dentry` is null or what `debugfs_create_dir()` returned (maybe an
    /// error pointer, which debugfs takes and ignores); every file in it
    /// shows a part of `data`, which is pinned.
    #[pin_data(PinnedDrop)]
    pub(crate) struct Scope<T> {
        dentry: AtomicPtr<bindings::dentry>,
        #[pin]
        data: T,
        #[pin]
        _pin: PhantomPinned,
    }

    // SAFETY: A debugfs directory may be removed from any thread.
    unsafe impl<T: Send> Send for Scope<T> {}
    // SAFETY: `&Scope` gives access to `&T` only.
    unsafe impl<T: Sync> Sync for Scope<T> {}

    impl<T> Scope<T> {
        /// Creates the directory `name` at the top of debugfs for `data`;
        /// `init` adds its files.
        pub(crate) fn dir<'a, E: 'a, F>(
            data: impl PinInit<T, E> + 'a,
            name: &'a CStr,
            init: F,
        ) -> impl PinInit<Self, E> + 'a
        where
            T: 'a,
            F: for<'data, 'dir> FnOnce(&'data T, &'dir ScopedDir<'data, 'dir>) + 'a,
        {
            try_pin_init!(Self {
                dentry: AtomicPtr::new(ptr::null_mut()),
                data <- data,
                _pin: PhantomPinned,
            }? E)
            .pin_chain(move |scope| {
                // SAFETY: `name` is a valid C string; a null parent means the debugfs root.
                let dentry =
                    unsafe { bindings::debugfs_create_dir(name.as_char_ptr(), ptr::null_mut()) };
                // INVARIANT: The directory is removed by `drop`, before `data`.
                scope.dentry.store(dentry, Ordering::Relaxed);
                init(
                    &scope.data,
                    &ScopedDir {
                        dentry,
                        _p: PhantomData,
                    },
                );
                Ok(())
            })
        }
    }

    impl<T> core::ops::Deref for Scope<T> {
        type Target = T;

        fn deref(&self) -> &T {
            &self.data
        }
    }

    #[pinned_drop]
    impl<T> PinnedDrop for Scope<T> {
        fn drop(self: Pin<&mut Self>) {
            let dentry = self.dentry.load(Ordering::Relaxed);
            if !dentry.is_null() {
                // SAFETY: By the type invariant `dentry` came from `debugfs_create_dir()`;
                // removal waits for the files' readers, so `data` may be dropped next.
                unsafe { bindings::debugfs_remove(dentry) };
            }
        }
    }

    /// The directory of a [`Scope`] while [`Scope::dir`] fills it: files may
    /// show data that lives for `'data`.
    pub(crate) struct ScopedDir<'data, 'dir> {
        dentry: *mut bindings::dentry,
        _p: PhantomData<fn(&'data ()) -> &'dir ()>,
    }

    impl<'data> ScopedDir<'data, '_> {
        /// Creates the read-only file `name` showing `data`.
        pub(crate) fn read_only_file<T: Writer + Send + Sync + 'static>(
            &self,
            name: &CStr,
            data: &'data T,
        ) {
            // SAFETY: `dentry` is the directory of a `Scope` whose pinned data holds `data`,
            // and the directory is removed before that data is dropped.
            unsafe { data.create_file(name, self.dentry) };
        }
    }
}
