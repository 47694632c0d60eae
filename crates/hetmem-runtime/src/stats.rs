//! The runtime's counters: what its policies and its user calls did, by trigger (seed 003 names
//! the migration triggers: prefetch, device fault, CPU fault, eviction, suspend), context-wide
//! ([`RuntimeStats`]) and per device ([`DeviceStats`]: the device's own counters joined with what
//! only the runtime knows, such as which device an eviction emptied).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hetmem_core::{migrate::TriggerCounts, DeviceId};
use parking_lot::RwLock;

/// Counters shared by the context and its device policies.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    evictions: AtomicU64,
    pages_evicted: AtomicU64,
    pages_advised_remote: AtomicU64,
    pages_spilled: AtomicU64,
    spill_revocations: AtomicU64,
    prefetches: AtomicU64,
    pages_prefetched_to_device: AtomicU64,
    pages_prefetched_to_cpu: AtomicU64,
    pages_suspended: AtomicU64,
    advice_calls: AtomicU64,
    pages_tree_prefetch: AtomicU64,
    pages_stream_prefetch: AtomicU64,
    pages_launch_bounce_pins: AtomicU64,
    pages_launch_restore: AtomicU64,
    pages_launch_readback: AtomicU64,
    counter_notifications: AtomicU64,
    per_device: PerDevice,
    pages_throttled: AtomicU64,
    cpu_throttles: AtomicU64,
    pages_pinned_remote: AtomicU64,
    thrashing_revocations: AtomicU64,
}

impl Counters {
    /// The counters the runtime keeps for device `dev`.
    pub(crate) fn device(&self, dev: DeviceId) -> Arc<DeviceCounters> {
        self.per_device.get(dev)
    }

    pub(crate) fn add_eviction(&self, pages: u64) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
        self.pages_evicted.fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn add_remote_pages(&self, n: u64) {
        self.pages_advised_remote.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_spilled_pages(&self, n: u64) {
        self.pages_spilled.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_spill_revoked(&self, n: u64) {
        self.spill_revocations.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_prefetch(&self, to_device: u64, to_cpu: u64) {
        self.prefetches.fetch_add(1, Ordering::Relaxed);
        self.pages_prefetched_to_device
            .fetch_add(to_device, Ordering::Relaxed);
        self.pages_prefetched_to_cpu
            .fetch_add(to_cpu, Ordering::Relaxed);
    }
    pub(crate) fn add_suspended(&self, pages: u64) {
        self.pages_suspended.fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn add_tree_prefetch(&self, pages: u64) {
        self.pages_tree_prefetch.fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn add_launch_restore(&self, pages: u64) {
        self.pages_launch_restore
            .fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn add_launch_readback(&self, pages: u64) {
        self.pages_launch_readback
            .fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn add_launch_bounce_pins(&self, pages: u64) {
        self.pages_launch_bounce_pins
            .fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn add_stream_prefetch(&self, pages: u64) {
        self.pages_stream_prefetch
            .fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn add_counter_notifications(&self, n: u64) {
        self.counter_notifications.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_thrashing_kept(&self, throttled: u64, pinned: u64) {
        self.pages_throttled.fetch_add(throttled, Ordering::Relaxed);
        self.pages_pinned_remote
            .fetch_add(pinned, Ordering::Relaxed);
    }
    pub(crate) fn add_cpu_throttle(&self) {
        self.cpu_throttles.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_thrashing_revoked(&self, pages: u64) {
        self.thrashing_revocations
            .fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn add_advice(&self) {
        self.advice_calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> RuntimeStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RuntimeStats {
            evictions: g(&self.evictions),
            pages_evicted: g(&self.pages_evicted),
            pages_advised_remote: g(&self.pages_advised_remote),
            pages_spilled: g(&self.pages_spilled),
            spill_revocations: g(&self.spill_revocations),
            prefetches: g(&self.prefetches),
            pages_prefetched_to_device: g(&self.pages_prefetched_to_device),
            pages_prefetched_to_cpu: g(&self.pages_prefetched_to_cpu),
            pages_suspended: g(&self.pages_suspended),
            advice_calls: g(&self.advice_calls),
            pages_tree_prefetch: g(&self.pages_tree_prefetch),
            pages_stream_prefetch: g(&self.pages_stream_prefetch),
            pages_launch_bounce_pins: g(&self.pages_launch_bounce_pins),
            pages_launch_restore: g(&self.pages_launch_restore),
            pages_launch_readback: g(&self.pages_launch_readback),
            counter_notifications: g(&self.counter_notifications),
            pages_throttled: g(&self.pages_throttled),
            cpu_throttles: g(&self.cpu_throttles),
            pages_pinned_remote: g(&self.pages_pinned_remote),
            thrashing_revocations: g(&self.thrashing_revocations),
            ..RuntimeStats::default()
        }
    }
}

/// A snapshot of the runtime's counters (the devices keep their own: `Accelerator::stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Chunks evicted from device memory to make room (trigger: eviction).
    pub evictions: u64,
    /// Pages those evictions moved to system memory.
    pub pages_evicted: u64,
    /// Faulted pages the advice mapped remotely instead of migrating them.
    pub pages_advised_remote: u64,
    /// Pages a full device mapped remotely instead of evicting its working set for them
    /// ([`crate::ContextBuilder::spill_remote`]).
    pub pages_spilled: u64,
    /// Spilled pages whose remote mappings a launch revoked because its device had room again,
    /// so that their next access decides afresh.
    pub spill_revocations: u64,
    /// Prefetch calls completed (trigger: prefetch).
    pub prefetches: u64,
    /// Pages prefetches moved into device memory.
    pub pages_prefetched_to_device: u64,
    /// Pages prefetches moved to system memory.
    pub pages_prefetched_to_cpu: u64,
    /// Pages a suspend moved to system memory (trigger: suspend).
    pub pages_suspended: u64,
    /// Advice calls.
    pub advice_calls: u64,
    /// Pages the tree prefetcher added to fault migrations and that migrated (not what advice,
    /// thrashing, memory pressure or spilling took out again, nor pages already resident).
    pub pages_tree_prefetch: u64,
    /// Pages the stream detector migrates ahead of the faults: those it added to a fault's
    /// migration that migrated (counted as for the tree), and past the faulted block those it
    /// queued that were still in system memory (trigger: prefetch).
    pub pages_stream_prefetch: u64,
    /// Pages the CPU took back between each of the last three launches, mapped where they are
    /// at the next launch instead of restored (`restore_on_launch` with thrashing detection).
    pub pages_launch_bounce_pins: u64,
    /// Pages a launch migrated back into its device after CPU faults took them since the
    /// device's previous launch (trigger: prefetch; see `ContextBuilder::restore_on_launch`).
    pub pages_launch_restore: u64,
    /// Pages a launch's end moved back to system memory because the CPU took them back after
    /// the launches before (trigger: prefetch; see `ContextBuilder::readback_after_launch`).
    pub pages_launch_readback: u64,
    /// Regions whose remote accesses crossed the access-counter threshold (each migrates in;
    /// trigger: access counters).
    pub counter_notifications: u64,
    /// Pages declared thrashing: migrated `threshold` times in a row, each within a lapse of the
    /// previous (UVM's `num_thrashing`).
    pub thrashing_detected: u64,
    /// Faulted thrashing pages a device mapped where they were for a throttling period instead
    /// of migrating them (UVM's `num_throttle`).
    pub pages_throttled: u64,
    /// CPU faults on thrashing pages that slept until their throttling period ended before the
    /// page came back (UVM throttles the CPU in its fault handler).
    pub cpu_throttles: u64,
    /// Pin events: thrashing pages pinned to one location, every other processor mapping them
    /// remotely until the pin expires.
    pub thrashing_pins: u64,
    /// Faulted pages a device mapped remotely because they are pinned elsewhere (UVM's
    /// `MapRemote` events with cause thrashing).
    pub pages_pinned_remote: u64,
    /// Pins that expired (their pages are decided afresh at their next fault).
    pub pin_expirations: u64,
    /// Pages whose throttling or pin mapping a device revoked when it ended, so that their next
    /// access faults again.
    pub thrashing_revocations: u64,
    /// 2 MiB blocks whose thrashing state was reset after an epoch without thrashing.
    pub thrashing_resets: u64,
    /// Pages migrated into and out of the context's devices, by trigger (seed 003's prefetch,
    /// device fault, CPU fault, eviction, suspend; access counters; explicit calls). A page moved
    /// device to device counts once in `from_peer` and once in `to_peer`.
    pub migrations: TriggerCounts,
}

impl RuntimeStats {
    /// Adds the thrashing detector's own counters.
    pub(crate) fn with_thrashing(
        mut self,
        t: hetmem_core::policy::thrashing::ThrashingStats,
    ) -> Self {
        self.thrashing_detected = t.thrashing_detected;
        self.thrashing_pins = t.pins;
        self.pin_expirations = t.pin_expired;
        self.thrashing_resets = t.resets;
        self
    }
}

/// What the runtime counts per device (the device counts its faults and migrations in itself).
#[derive(Debug, Default)]
pub(crate) struct DeviceCounters {
    evictions: AtomicU64,
    pages_evicted: AtomicU64,
    pages_to_system: AtomicU64,
}

impl DeviceCounters {
    /// A chunk of this device evicted to make room.
    pub(crate) fn add_eviction(&self, pages: u64) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
        self.pages_evicted.fetch_add(pages, Ordering::Relaxed);
        self.add_to_system(pages);
    }
    /// Pages the runtime moved from this device back to system memory.
    pub(crate) fn add_to_system(&self, pages: u64) {
        self.pages_to_system.fetch_add(pages, Ordering::Relaxed);
    }
}

/// Per-device counters, made on first use (never on a hot path: evictions, suspend, prefetches
/// and unregistrations only).
#[derive(Debug, Default)]
struct PerDevice(RwLock<BTreeMap<DeviceId, Arc<DeviceCounters>>>);

impl PerDevice {
    fn get(&self, dev: DeviceId) -> Arc<DeviceCounters> {
        if let Some(c) = self.0.read().get(&dev) {
            return Arc::clone(c);
        }
        Arc::clone(self.0.write().entry(dev).or_default())
    }
}

/// One device's share of the work ([`crate::Context::device_stats`]): what migrated into its
/// memory and from where, what left it, its faults and its evictions. UVM keeps the same per GPU
/// (procfs `fault_stats`: pages migrated in and out; the tools counters' bytes host-to-device and
/// device-to-host, per GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceStats {
    /// The device.
    pub dev: DeviceId,
    /// Pages migrated into this device's memory from system memory (fault service, prefetch).
    pub pages_from_system: u64,
    /// Pages migrated into this device's memory from other devices' memory, device to device
    /// through its copy engines, without passing through system memory.
    pub pages_from_peers: u64,
    /// Every page that left this device's memory: to system memory or to another device.
    pub pages_out: u64,
    /// Pages the runtime moved from this device back to system memory: evictions, prefetches to
    /// the CPU, suspend, unregistration. What else left (`pages_out` minus this) went to peers or
    /// came back on CPU faults.
    pub pages_to_system: u64,
    /// CPU faults on this device's pages (and other devices' range faults that needed them in
    /// system memory) that brought them back: one per fault, which brings back the page, or its
    /// whole 2 MiB block when the block moved as one.
    pub cpu_faults: u64,
    /// Frames of this device's memory in use now.
    pub pages_resident: u64,
    /// Faults this device's warps raised (reads, writes, atomics).
    pub faults: u64,
    /// Fault batches its fault service handled.
    pub batches: u64,
    /// Chunks evicted from this device's memory to make room.
    pub evictions: u64,
    /// Pages those evictions moved to system memory (counted in `pages_to_system` too).
    pub pages_evicted: u64,
    /// Pages migrated into and out of this device's memory, by trigger, as the migration engine
    /// committed them (read copies are not migrations; `AccelStats::pages_duplicated` counts them).
    pub migrations: TriggerCounts,
}

impl DeviceStats {
    /// This device's counters: `acc` (the device's own), `pool` (its memory) and `rt` (the
    /// runtime's share).
    pub(crate) fn new(
        dev: DeviceId,
        acc: &hetmem_sim::accel::AccelStats,
        pool: &hetmem_core::pool::PoolStats,
        rt: &DeviceCounters,
        migrations: TriggerCounts,
    ) -> Self {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DeviceStats {
            dev,
            pages_from_system: acc.pages_to_device,
            pages_from_peers: acc.pages_from_peers,
            pages_out: pool.page_out,
            pages_to_system: g(&rt.pages_to_system),
            cpu_faults: acc.cpu_faults,
            pages_resident: pool.pages_in_use,
            faults: acc.faults_read + acc.faults_write + acc.faults_atomic,
            batches: acc.batches,
            evictions: g(&rt.evictions),
            pages_evicted: g(&rt.pages_evicted),
            migrations,
        }
    }
}
