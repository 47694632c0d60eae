//! Access counters: the hardware of NVIDIA UVM's `uvm_gpu_access_counters.c` (uvm-svm.md A.10)
//! as a pure state machine.
//!
//! A device counts its *remote* accesses (loads and stores to memory that is not in its own
//! memory: system memory or a peer's) per aligned region of `granularity` bytes. When a region's
//! count reaches `threshold`, a notification for the region is raised and the count restarts; the
//! runtime's service thread drains notifications in batches and typically migrates the hot region
//! to the device (cause [`crate::policy::thrashing::MigrationCause::AccessCounter`]). One
//! [`AccessCounters`] per device.
//!
//! Design: [`AccessCounters::record`] is called on the hot path (a device's remote load/store, or
//! a batch of them) and only counts; a notification goes to an internal queue, and `record`
//! returns whether it raised one so the caller can wake the service thread, like the hardware's
//! interrupt. The service thread drains with [`AccessCounters::take_notifications`]. A region
//! waits in the queue at most once: crossings while it waits are counted in the stats but merge
//! into the pending notification (servicing a region twice would do nothing more).
//!
//! ```text
//!   record(addr, n) ──► count[region] += n ── reaches threshold ──► queue (FIFO, one per region)
//!                        (count restarts)                                │ take_notifications(max)
//!                                                                        ▼
//!                                    oldest `max` regions, sorted by address ──► service thread
//! ```
//!
//! Batches are the oldest pending notifications, sorted by address, as UVM fetches a batch from
//! the notification buffer in arrival order and sorts it; arrival order keeps a hot low region
//! from starving the others.
//!
//! Where this differs from UVM: the granularity defaults to the hardware's smallest tracking
//! region, 64 KiB, where UVM programs 2 MiB regions with a 32-bit mask of touched 64 KiB parts;
//! counting at 64 KiB gives the same information without the mask. UVM's *migration* on
//! notifications is off by default on PCIe systems; whether to act is the runtime's policy, so
//! counting is on by default here.
//!
//! Invariants ([`AccessCounters::check_invariants`]): every stored count is below the threshold;
//! a region is stored only with a non-zero count or a pending notification; the queue holds
//! exactly the pending regions, once each.

use std::collections::{HashMap, VecDeque};

use crate::addr::{PageRange, VirtAddr, HUGE_PAGE_SIZE, PAGE_SIZE};

/// Smallest granularity (one base page).
pub const MIN_GRANULARITY: u64 = PAGE_SIZE;
/// Largest granularity (one 2 MiB block).
pub const MAX_GRANULARITY: u64 = HUGE_PAGE_SIZE;
/// Largest threshold (`uvm_perf_access_counter_threshold`, 16 bits).
pub const MAX_THRESHOLD: u32 = 65535;

/// Parameters of the access counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessCounterConfig {
    /// Counting on (default on). Off: [`AccessCounters::record`] counts nothing.
    pub enabled: bool,
    /// Bytes per tracking region: a power of two in 4 KiB..=2 MiB (default 64 KiB).
    pub granularity: u64,
    /// Remote accesses to a region that raise a notification (default 256, valid `1..=65535`).
    pub threshold: u32,
}

impl Default for AccessCounterConfig {
    fn default() -> Self {
        AccessCounterConfig {
            enabled: true,
            granularity: 64 << 10,
            threshold: 256,
        }
    }
}

/// A bad [`AccessCounterConfig`] parameter. Values are refused, never clamped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessCounterError {
    /// The granularity is not a power of two.
    #[error("access counter granularity {bytes:#x} is not a power of two")]
    GranularityNotPowerOfTwo {
        /// The value given.
        bytes: u64,
    },
    /// The granularity is outside 4 KiB..=2 MiB.
    #[error(
        "access counter granularity {bytes:#x} outside {MIN_GRANULARITY:#x}..={MAX_GRANULARITY:#x}"
    )]
    GranularityOutOfRange {
        /// The value given.
        bytes: u64,
    },
    /// The threshold is outside `1..=65535`.
    #[error("access counter threshold {value} outside 1..={MAX_THRESHOLD}")]
    Threshold {
        /// The value given.
        value: u32,
    },
}

impl AccessCounterConfig {
    /// Checks every parameter against its valid range.
    pub fn validate(&self) -> Result<(), AccessCounterError> {
        let bytes = self.granularity;
        if !bytes.is_power_of_two() {
            return Err(AccessCounterError::GranularityNotPowerOfTwo { bytes });
        }
        if !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&bytes) {
            return Err(AccessCounterError::GranularityOutOfRange { bytes });
        }
        if !(1..=MAX_THRESHOLD).contains(&self.threshold) {
            return Err(AccessCounterError::Threshold {
                value: self.threshold,
            });
        }
        Ok(())
    }
}

/// Counters of the access counters. They only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessCounterStats {
    /// Remote accesses recorded.
    pub accesses: u64,
    /// Notifications raised: times a region's count reached the threshold, including those that
    /// merged into a notification already pending.
    pub notifications: u64,
    /// Regions whose count or pending notification [`AccessCounters::clear`] or
    /// [`AccessCounters::clear_all`] discarded.
    pub cleared: u64,
}

/// The state of one region: only regions with a count or a pending notification are stored.
#[derive(Clone, Copy, Debug, Default)]
struct Region {
    /// Below the threshold.
    count: u32,
    /// In the queue.
    pending: bool,
}

/// One device's access counters. Plain `&mut self` state; the runtime wraps it in its lock.
#[derive(Debug)]
pub struct AccessCounters {
    config: AccessCounterConfig,
    /// log2 of the granularity.
    shift: u32,
    /// Keyed by region number (address >> shift).
    regions: HashMap<u64, Region>,
    /// Pending notifications, oldest first, by region number.
    queue: VecDeque<u64>,
    stats: AccessCounterStats,
}

impl AccessCounters {
    /// Counters at zero, once `config` is valid.
    pub fn new(config: AccessCounterConfig) -> Result<Self, AccessCounterError> {
        config.validate()?;
        Ok(AccessCounters {
            config,
            shift: config.granularity.trailing_zeros(),
            regions: HashMap::new(),
            queue: VecDeque::new(),
            stats: AccessCounterStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AccessCounterConfig {
        &self.config
    }

    /// The region (aligned to the granularity) that holds `addr`, or `None` for the topmost
    /// region of the 64-bit address space, whose end cannot be represented (never user memory).
    pub fn region_of(&self, addr: VirtAddr) -> Option<PageRange> {
        self.region(addr.0 >> self.shift)
    }

    fn region(&self, number: u64) -> Option<PageRange> {
        PageRange::new(number << self.shift, self.config.granularity).ok()
    }

    /// Records `n` remote accesses of this device to the page at `addr`. Returns whether they
    /// raised a notification (the region's count reached the threshold); it is then queued for
    /// [`AccessCounters::take_notifications`] unless the region is already pending, and the
    /// count restarts with what was left over past the threshold. Cheap: one hash-map update.
    ///
    /// Does nothing when counting is disabled, or for the topmost region of the address space
    /// (see [`AccessCounters::region_of`]).
    pub fn record(&mut self, addr: VirtAddr, n: u32) -> bool {
        if !self.config.enabled || n == 0 {
            return false;
        }
        let number = addr.0 >> self.shift;
        if number == u64::MAX >> self.shift {
            return false;
        }
        self.stats.accesses = self.stats.accesses.saturating_add(u64::from(n));
        let threshold = u64::from(self.config.threshold);
        let region = self.regions.entry(number).or_default();
        let total = u64::from(region.count) + u64::from(n);
        let crossings = total / threshold;
        // Lossless: the remainder is below the threshold, a u32.
        region.count = (total % threshold) as u32;
        if crossings == 0 {
            return false;
        }
        self.stats.notifications = self.stats.notifications.saturating_add(crossings);
        if !region.pending {
            region.pending = true;
            self.queue.push_back(number);
        }
        true
    }

    /// The count of the region holding `addr` (below the threshold).
    pub fn count(&self, addr: VirtAddr) -> u32 {
        self.regions
            .get(&(addr.0 >> self.shift))
            .map_or(0, |r| r.count)
    }

    /// Pending notifications.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Drains a batch: the oldest `max` pending notifications, sorted by address. The regions'
    /// counts are left as they are (they restarted when the notification was raised); clear them
    /// with [`AccessCounters::clear`] once the region is serviced, if wanted.
    pub fn take_notifications(&mut self, max: usize) -> Vec<PageRange> {
        let take = max.min(self.queue.len());
        let mut batch: Vec<u64> = self.queue.drain(..take).collect();
        for number in &batch {
            if let Some(region) = self.regions.get_mut(number) {
                region.pending = false;
                if region.count == 0 {
                    self.regions.remove(number);
                }
            }
        }
        batch.sort_unstable();
        batch.into_iter().filter_map(|n| self.region(n)).collect()
    }

    /// Clears the count and drops the pending notification of every region that overlaps
    /// `range` (a region is cleared whole, as the hardware's targeted clear does); used once a
    /// range has been serviced, migrated or unmapped.
    pub fn clear(&mut self, range: PageRange) {
        let first = range.start().0 >> self.shift;
        let last = (range.end().0 - 1) >> self.shift;
        let mut cleared = 0u64;
        let mut dropped_pending = false;
        // Walk whichever is smaller: the regions of the range or the stored ones.
        if last - first < self.regions.len() as u64 {
            for number in first..=last {
                if let Some(region) = self.regions.remove(&number) {
                    cleared += 1;
                    dropped_pending |= region.pending;
                }
            }
        } else {
            self.regions.retain(|number, region| {
                let hit = (first..=last).contains(number);
                if hit {
                    cleared += 1;
                    dropped_pending |= region.pending;
                }
                !hit
            });
        }
        if dropped_pending {
            self.queue.retain(|number| !(first..=last).contains(number));
        }
        self.stats.cleared += cleared;
    }

    /// Clears every count and drops every pending notification (`UvmClearAllAccessCounters`).
    pub fn clear_all(&mut self) {
        self.stats.cleared += self.regions.len() as u64;
        self.regions.clear();
        self.queue.clear();
    }

    /// The counters.
    pub fn stats(&self) -> AccessCounterStats {
        self.stats
    }

    /// Checks the state invariants (see the module documentation).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut pending = 0;
        for (&number, region) in &self.regions {
            if region.count >= self.config.threshold {
                return Err(format!(
                    "region {number:#x}: count {} at or over the threshold {}",
                    region.count, self.config.threshold
                ));
            }
            if region.count == 0 && !region.pending {
                return Err(format!("region {number:#x}: stored with nothing to say"));
            }
            pending += usize::from(region.pending);
        }
        if pending != self.queue.len() {
            return Err(format!(
                "{pending} regions pending, {} queued",
                self.queue.len()
            ));
        }
        for number in &self.queue {
            if !self.regions.get(number).is_some_and(|r| r.pending) {
                return Err(format!("region {number:#x} queued but not pending"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const KIB: u64 = 1 << 10;

    fn counters(threshold: u32, granularity: u64) -> AccessCounters {
        AccessCounters::new(AccessCounterConfig {
            enabled: true,
            granularity,
            threshold,
        })
        .unwrap()
    }

    fn range(start: u64, len: u64) -> PageRange {
        PageRange::new(start, len).unwrap()
    }

    #[test]
    fn notification_exactly_at_threshold_then_the_count_restarts() {
        let mut ac = AccessCounters::new(AccessCounterConfig::default()).unwrap();
        let addr = VirtAddr(0x7f00_0001_2345);
        for i in 1..256 {
            assert!(!ac.record(addr, 1), "access {i}");
        }
        assert_eq!(ac.pending(), 0);
        assert_eq!(ac.count(addr), 255);
        assert!(ac.record(addr, 1), "the 256th raises it");
        assert_eq!(ac.count(addr), 0);
        assert_eq!(ac.pending(), 1);
        // Once: the next accesses count afresh.
        assert!(!ac.record(addr, 255));
        assert_eq!(
            ac.take_notifications(10),
            vec![range(0x7f00_0001_0000, 64 * KIB)]
        );
        assert_eq!(ac.take_notifications(10), vec![]);
        assert!(ac.record(addr, 1), "255 + 1 more reach it again");
        assert_eq!(
            ac.stats(),
            AccessCounterStats {
                accesses: 512,
                notifications: 2,
                cleared: 0
            }
        );
        ac.check_invariants().unwrap();
    }

    #[test]
    fn a_large_batch_keeps_what_is_left_past_the_threshold() {
        let mut ac = counters(100, 64 * KIB);
        assert!(ac.record(VirtAddr(0), 250));
        assert_eq!(ac.count(VirtAddr(0)), 50);
        assert_eq!(ac.stats().notifications, 2);
        // Crossings while pending merge into the pending notification.
        assert!(ac.record(VirtAddr(0x1000), 50));
        assert_eq!(ac.stats().notifications, 3);
        assert_eq!(ac.pending(), 1);
        assert_eq!(ac.take_notifications(usize::MAX), vec![range(0, 64 * KIB)]);
        assert_eq!(ac.count(VirtAddr(0)), 0);
        assert!(ac.regions.is_empty(), "nothing left to store");
        assert!(!ac.record(VirtAddr(0), 0), "zero accesses are nothing");
        ac.check_invariants().unwrap();
    }

    #[test]
    fn regions_are_aligned_to_the_granularity() {
        for granularity in [4 * KIB, 64 * KIB, 2048 * KIB] {
            let mut ac = counters(1, granularity);
            let addr = VirtAddr(0x1234_5678_9abc);
            assert!(ac.record(addr, 1));
            let region = ac.take_notifications(1)[0];
            assert_eq!(region.start().0 % granularity, 0);
            assert_eq!(region.len_bytes(), granularity);
            assert!(region.contains(addr));
            assert_eq!(ac.region_of(addr), Some(region));
        }
        // Two pages of one region share its count; a page of the next region does not.
        let mut ac = counters(3, 64 * KIB);
        assert!(!ac.record(VirtAddr(0x10000), 1));
        assert!(!ac.record(VirtAddr(0x1f000), 1));
        assert!(!ac.record(VirtAddr(0x20000), 1));
        assert_eq!(ac.count(VirtAddr(0x1ffff)), 2);
        assert!(ac.record(VirtAddr(0x18000), 1));
        assert_eq!(ac.take_notifications(8), vec![range(0x10000, 64 * KIB)]);
    }

    #[test]
    fn the_topmost_region_is_not_counted() {
        let mut ac = counters(1, 2048 * KIB);
        let top = VirtAddr(u64::MAX - 5);
        assert_eq!(ac.region_of(top), None);
        assert!(!ac.record(top, 10));
        assert_eq!(ac.stats(), AccessCounterStats::default());
        assert!(ac.record(VirtAddr(u64::MAX - 2048 * KIB), 1));
    }

    #[test]
    fn disabled_counters_count_nothing() {
        let mut ac = AccessCounters::new(AccessCounterConfig {
            enabled: false,
            ..Default::default()
        })
        .unwrap();
        assert!(!ac.record(VirtAddr(0), u32::MAX));
        assert_eq!(ac.pending(), 0);
        assert_eq!(ac.stats(), AccessCounterStats::default());
    }

    #[test]
    fn clear_forgets_counts_and_pending_notifications_of_overlapping_regions() {
        let mut ac = counters(4, 64 * KIB);
        // Regions 0..8 of 64 KiB: even ones pending, odd ones counting.
        for r in 0..8u64 {
            ac.record(VirtAddr(r * 64 * KIB), if r % 2 == 0 { 4 } else { 2 });
        }
        assert_eq!(ac.pending(), 4);
        // One page in region 1 and one in region 2: both regions are cleared whole.
        ac.clear(range(2 * 64 * KIB - 4 * KIB, 8 * KIB));
        assert_eq!(ac.stats().cleared, 2);
        assert_eq!(ac.count(VirtAddr(64 * KIB)), 0);
        assert_eq!(ac.pending(), 3);
        ac.check_invariants().unwrap();
        // A range much larger than what is stored walks the stored regions instead.
        ac.clear(range(6 * 64 * KIB, 1 << 40));
        assert_eq!(ac.stats().cleared, 4);
        assert_eq!(
            ac.take_notifications(8),
            vec![range(0, 64 * KIB), range(4 * 64 * KIB, 64 * KIB)]
        );
        // Clearing nothing stored is free.
        ac.clear(range(1 << 30, 4 * KIB));
        assert_eq!(ac.stats().cleared, 4);
        assert_eq!(ac.count(VirtAddr(3 * 64 * KIB)), 2);
        ac.check_invariants().unwrap();
        ac.clear_all();
        assert_eq!(ac.stats().cleared, 6, "regions 3 and 5 still counted");
        assert_eq!(ac.pending(), 0);
        assert!(ac.regions.is_empty());
        // Counting starts over.
        assert!(!ac.record(VirtAddr(0), 3));
        assert!(ac.record(VirtAddr(0), 1));
        ac.check_invariants().unwrap();
    }

    #[test]
    fn batches_are_the_oldest_notifications_sorted_and_bounded() {
        let mut ac = counters(1, 4 * KIB);
        let order = [9u64, 3, 7, 1, 8, 2, 6];
        for &page in &order {
            assert!(ac.record(VirtAddr(page << 12), 1));
        }
        let page = |p: u64| range(p << 12, 4 * KIB);
        // The three oldest (9, 3, 7), by address.
        assert_eq!(ac.take_notifications(3), vec![page(3), page(7), page(9)]);
        assert_eq!(ac.take_notifications(3), vec![page(1), page(2), page(8)]);
        assert_eq!(ac.take_notifications(0), vec![]);
        assert_eq!(ac.take_notifications(3), vec![page(6)]);
        assert_eq!(ac.take_notifications(3), vec![]);
        ac.check_invariants().unwrap();
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let ok = AccessCounterConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let bad = |config: AccessCounterConfig| {
            let err = config.validate().unwrap_err();
            assert_eq!(AccessCounters::new(config).unwrap_err(), err);
            err
        };
        for bytes in [0, 3, 96 * KIB, 4097] {
            assert_eq!(
                bad(AccessCounterConfig {
                    granularity: bytes,
                    ..ok
                }),
                AccessCounterError::GranularityNotPowerOfTwo { bytes }
            );
        }
        for bytes in [1, 2 * KIB, 4096 * KIB, 1 << 63] {
            assert_eq!(
                bad(AccessCounterConfig {
                    granularity: bytes,
                    ..ok
                }),
                AccessCounterError::GranularityOutOfRange { bytes }
            );
        }
        for value in [0, 65536, u32::MAX] {
            assert_eq!(
                bad(AccessCounterConfig {
                    threshold: value,
                    ..ok
                }),
                AccessCounterError::Threshold { value }
            );
        }
        for (granularity, threshold) in [(4 * KIB, 1), (2048 * KIB, 65535)] {
            let config = AccessCounterConfig {
                granularity,
                threshold,
                enabled: false,
            };
            assert_eq!(config.validate(), Ok(()));
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Record { page: u64, n: u32 },
        Take { max: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u64..64, 0u32..40).prop_map(|(page, n)| Op::Record { page, n }),
            1 => (0usize..6).prop_map(|max| Op::Take { max }),
        ]
    }

    proptest! {
        #[test]
        fn notifications_match_totals_per_region(
            ops in proptest::collection::vec(op(), 1..400),
            threshold in 1u32..50,
            shift in 12u32..16,
        ) {
            let granularity = 1u64 << shift;
            let mut ac = counters(threshold, granularity);
            // Total accesses per region, and regions drained so far.
            let mut totals: HashMap<u64, u64> = HashMap::new();
            let mut drained: BTreeSet<u64> = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Record { page, n } => {
                        let addr = VirtAddr((page << 12) + 7);
                        let number = addr.0 / granularity;
                        let before = totals.get(&number).copied().unwrap_or(0);
                        let after = before + u64::from(n);
                        totals.insert(number, after);
                        let raised = ac.record(addr, n);
                        let t = u64::from(threshold);
                        prop_assert_eq!(raised, after / t > before / t);
                        prop_assert_eq!(u64::from(ac.count(addr)), after % t);
                    }
                    Op::Take { max } => {
                        let pending = ac.pending();
                        let batch = ac.take_notifications(max);
                        prop_assert_eq!(batch.len(), max.min(pending));
                        for w in batch.windows(2) {
                            prop_assert!(w[0].start() < w[1].start());
                        }
                        for r in &batch {
                            prop_assert_eq!(r.len_bytes(), granularity);
                            prop_assert_eq!(r.start().0 % granularity, 0);
                            let number = r.start().0 / granularity;
                            prop_assert!(totals[&number] >= u64::from(threshold));
                            drained.insert(number);
                        }
                    }
                }
                if let Err(e) = ac.check_invariants() {
                    return Err(TestCaseError::fail(e));
                }
                let expected: u64 = totals.values().map(|t| t / u64::from(threshold)).sum();
                prop_assert_eq!(ac.stats().notifications, expected);
                prop_assert_eq!(ac.stats().accesses, totals.values().sum::<u64>());
            }
            // Draining everything yields exactly the regions that reached the threshold.
            for r in ac.take_notifications(usize::MAX) {
                drained.insert(r.start().0 / granularity);
            }
            let hot: BTreeSet<u64> = totals
                .iter()
                .filter(|(_, &t)| t >= u64::from(threshold))
                .map(|(&n, _)| n)
                .collect();
            prop_assert_eq!(drained, hot);
        }
    }
}
