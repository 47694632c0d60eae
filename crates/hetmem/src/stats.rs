//! Counters of the address space. Relaxed atomics, bumped once per operation (a batch of pages),
//! never per byte.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! stats {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        /// Live counters.
        #[derive(Debug, Default)]
        pub struct Stats { $(pub(crate) $name: AtomicU64,)* }

        /// A copy of the counters at one moment.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct StatsSnapshot { $($(#[$m])* pub $name: u64,)* }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

stats! {
    /// CPU faults on managed memory handled (device pages brought back, holes filled).
    cpu_faults,
    /// CPU faults that migrated pages back from a device.
    cpu_fault_migrations,
    /// Holes of managed memory zero-filled on a CPU touch.
    zero_fills,
    /// Pages migrated into device memory.
    pages_to_device,
    /// Pages migrated back to system memory.
    pages_to_system,
    /// Pages migrated from one device's memory straight to another's.
    pages_device_to_device,
    /// Pages moved with a copy because UFFDIO_MOVE could not take them.
    move_fallbacks,
    /// Pages whose device copy was discarded (unmap, DONTNEED).
    pages_discarded,
    /// userfaultfd events handled (unmap, remap, remove).
    uffd_events,
    /// REMOVE events taken for the program's own discard (`madvise(MADV_DONTNEED)` and the
    /// like), not hetmem's.
    program_discards,
    /// Pages handed to a device as read-only copies (read duplication).
    pages_duplicated,
    /// Duplicated pages collapsed back to one copy by a write.
    dup_collapses,
}

impl Stats {
    pub(crate) fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}
