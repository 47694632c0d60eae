//! hetmem-runtime: unified memory over hetmem, as a CUDA managed-memory, HIP or AMD SVM user
//! expects it (issue 4): a [`Context`] of devices sharing the process's address space,
//! [`Managed`] allocations the CPU uses as ordinary slices and kernels reach by the same address,
//! the program's own memory made managed ([`Registered`]), advice and range attributes
//! ([`Advice`], [`RangeAttributes`]), asynchronous prefetch, eviction of least recently used
//! chunks when device memory runs out, a per-context memory limit, and suspend. Several devices
//! share one context: pages move between them device to device, and each has its own statistics
//! ([`DeviceStats`]).
//!
//! ```text
//!   Context ── devices (ComputeDevice: hetmem-sim's Accelerator) ── each with a RuntimePlacement
//!      │                                                             policy its fault service asks
//!      ├─ AdviceMap (RangeMap of per-range attributes) ◄─────────────── per faulted block
//!      ├─ alloc → Managed ── view / view_mut (CPU slices; exclude launches: the Gate)
//!      ├─ register(Vec) → Registered ── views; unregister → the Vec, every page at home
//!      ├─ advise / attributes / prefetch (a worker, a Fence) / suspend
//!      ├─ Thrashing: one detector for all devices (CPU faults report through the policy)
//!      ├─ RuntimeStats (evictions, remote blocks, prefetches, thrashing, by trigger)
//!      └─ DeviceStats per device (in from system, in from peers, out, faults, evictions)
//! ```
#![deny(unsafe_code)]

pub mod advice;
pub mod context;
#[allow(unsafe_code)] // the CPU views: slices over managed and registered memory (see the module)
pub mod managed;
mod policy;
pub mod stats;

pub use advice::{Advice, Attr, RangeAttributes};
pub use context::{Context, ContextBuilder, Fence, LaunchHandle, MAX_CPU_READAHEAD};
pub use hetmem_core::migrate::{MigrationCounts, Trigger, TriggerCounts};
pub use hetmem_core::policy::Processor;
pub use managed::{
    Managed, Page, Plain, RegisterError, Registered, UnregisterError, View, ViewMut,
};
pub use policy::EvictionOrder;
pub use stats::{DeviceStats, RuntimeStats};

use hetmem::{MigrateError, MmError};
use hetmem_core::{DeviceId, PageRange};
use hetmem_sim::accel::AccelError;

/// What can go wrong in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The address space refused.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// A device refused (a launch that failed, a range it cannot map).
    #[error(transparent)]
    Accel(#[from] AccelError),
    /// A migration failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// A context needs a device.
    #[error("a context needs at least one device")]
    NoDevices,
    /// No such device in this context.
    #[error("no device {0:?} in this context")]
    NoSuchDevice(DeviceId),
    /// The range is not (wholly) managed memory.
    #[error("range {0:?} is not managed memory")]
    NotManaged(PageRange),
    /// A granularity that is not a power of two from 4 KiB to 2 MiB.
    #[error("granularity {0} is not a power of two from 4 KiB to 2 MiB")]
    BadGranularity(u64),
    /// A CPU readahead limit that is not a power of two from 4 KiB to 64 MiB.
    #[error("CPU readahead {0} is not a power of two from 4 KiB to 64 MiB")]
    BadReadahead(u64),
    /// An allocation of zero bytes.
    #[error("an allocation needs at least one byte")]
    EmptyAllocation,
    /// A registration of an empty buffer.
    #[error("a registration needs at least one page")]
    EmptyRegistration,
    /// A registration of memory that does not start and end on page boundaries (a `Vec` of
    /// [`Page`]s always does).
    #[error("{len} bytes at {addr:#x} are not whole pages")]
    Unaligned {
        /// Where the buffer starts.
        addr: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// A registration of memory that overlaps memory already managed (an allocation, another
    /// registration).
    #[error("range {0:?} overlaps memory already managed")]
    AlreadyManaged(PageRange),
    /// An allocation too large to round up to pages.
    #[error("an allocation of {0} bytes is too large")]
    TooLarge(u64),
    /// A launch while CPU views of managed memory are open.
    #[error("{views} CPU views of managed memory are open: drop them before launching")]
    ViewsOpen {
        /// Views open.
        views: usize,
    },
    /// A prefetcher parameter is out of range.
    #[error(transparent)]
    Prefetch(#[from] hetmem_core::policy::prefetch::PrefetchError),
    /// An access-counter parameter is out of range.
    #[error(transparent)]
    AccessCounters(#[from] hetmem_core::policy::access_counters::AccessCounterError),
    /// A thrashing-detection parameter is out of range.
    #[error(transparent)]
    Thrashing(#[from] hetmem_core::policy::thrashing::ThrashingError),
    /// A background worker could not start or panicked.
    #[error("a background worker failed")]
    Worker,
}
