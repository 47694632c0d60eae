//! The synchronisation primitives of the concurrent cores, switchable to the shuttle model checker.
//!
//! Four modules share state between threads: [`crate::notifier`] (the sequence protocol),
//! [`crate::fault_ring`] ([`crate::fault_ring::SharedFaultRing`]), [`crate::shared_mmu`] (the
//! device MMU that compute units use at once) and [`crate::page_state`] (the page lock word).
//! They take their mutexes, condition variables and atomics from here, and nowhere else, so that
//! the very same code runs under [shuttle](https://docs.rs/shuttle), a randomised concurrency
//! model checker, in `tests/shuttle_models.rs`.
//!
//! - Normally (`cfg(not(shuttle))`): `parking_lot`'s `Mutex`, `MutexGuard` and `Condvar`, and
//!   `std`'s atomics: exactly what the modules used before this shim existed.
//! - Built with `RUSTFLAGS="--cfg shuttle"`: shuttle's mutex, condition variable and atomics,
//!   behind wrappers with `parking_lot`'s signatures (`lock()` without poisoning, `wait(&mut
//!   guard)`), so the modules do not change. Every lock, wait and atomic access becomes a point
//!   where shuttle may switch threads. A timed wait never times out under shuttle (it waits for
//!   a notification), so a protocol that relied on a timeout to make progress deadlocks in the
//!   model, and shuttle reports it.
//!
//! `cfg(shuttle)` is for the model tests only: shuttle's primitives panic outside a shuttle run,
//! and `PageStates::word` then hands out a shuttle atomic that the real futex cannot wait on, so
//! only this crate (never `hetmem`) is built that way, in its own target directory (see
//! `scripts/test.sh`).

#[cfg(not(shuttle))]
pub use parking_lot::{Condvar, Mutex, MutexGuard};
#[cfg(not(shuttle))]
pub use std::sync::atomic::{AtomicU32, AtomicU64};

#[cfg(shuttle)]
pub use model::{Condvar, Mutex, MutexGuard};
#[cfg(shuttle)]
pub use shuttle::sync::atomic::{AtomicU32, AtomicU64};

#[cfg(shuttle)]
mod model {
    use std::ops::{Deref, DerefMut};
    use std::sync::PoisonError;
    use std::time::Duration;

    /// `parking_lot::Mutex` over `shuttle::sync::Mutex` (poisoning ignored, as parking_lot has
    /// none: a panic in a model run fails the run anyway).
    pub struct Mutex<T: ?Sized>(shuttle::sync::Mutex<T>);

    /// `parking_lot::MutexGuard`: the shuttle guard, taken out and put back by a condition wait.
    pub struct MutexGuard<'a, T: ?Sized>(Option<shuttle::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        /// A mutex holding `value`.
        pub fn new(value: T) -> Self {
            Mutex(shuttle::sync::Mutex::new(value))
        }
    }

    impl<T: ?Sized> Mutex<T> {
        /// Locks, waiting for the holder.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)))
        }

        /// Locks if nobody holds it.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            match self.0.try_lock() {
                Ok(g) => Some(MutexGuard(Some(g))),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(MutexGuard(Some(p.into_inner()))),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
    }

    impl<T: Default> Default for Mutex<T> {
        fn default() -> Self {
            Mutex::new(T::default())
        }
    }

    impl<T: ?Sized> std::fmt::Debug for Mutex<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            // Taking the lock to print would add a scheduling point (and may deadlock a model).
            f.write_str("Mutex { .. }")
        }
    }

    impl<T: ?Sized> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0.as_ref().expect("guard held")
        }
    }

    impl<T: ?Sized> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("guard held")
        }
    }

    impl<T: ?Sized> std::fmt::Debug for MutexGuard<'_, T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("MutexGuard { .. }")
        }
    }

    /// `parking_lot::Condvar` over `shuttle::sync::Condvar`.
    pub struct Condvar(shuttle::sync::Condvar);

    impl Condvar {
        /// A condition variable nobody waits on.
        pub fn new() -> Self {
            Condvar(shuttle::sync::Condvar::new())
        }

        /// Waits for a notification, releasing `guard`'s lock meanwhile.
        pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let g = guard.0.take().expect("guard held");
            guard.0 = Some(self.0.wait(g).unwrap_or_else(PoisonError::into_inner));
        }

        /// Waits while `condition` holds. The timeout is not modelled: shuttle waits for a
        /// notification (see the module documentation).
        pub fn wait_while_for<T, F>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            mut condition: F,
            _timeout: Duration,
        ) where
            F: FnMut(&mut T) -> bool,
        {
            while condition(&mut **guard) {
                self.wait(guard);
            }
        }

        /// Wakes one waiter.
        pub fn notify_one(&self) {
            self.0.notify_one();
        }

        /// Wakes every waiter.
        pub fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    impl Default for Condvar {
        fn default() -> Self {
            Condvar::new()
        }
    }

    impl std::fmt::Debug for Condvar {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Condvar { .. }")
        }
    }
}
