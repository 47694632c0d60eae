//! The replayable fault buffer of a device MMU, and what the fault service thread does with it:
//! fetch a batch, preprocess it (merge duplicates, sort, group by 2 MiB block), decide when to
//! replay, and mark faults fatal (seed 002 "GPU FAULT BUFFER", quoting NVIDIA's
//! `dev_mmu_fault.ref.txt`; NVIDIA UVM `uvm_gpu_replayable_faults.c`, summarised in
//! `reference/uvm-svm.md` §A.3–A.5).
//!
//! Neighbours: the device MMU (producer) writes a [`FaultEntry`] at `PUT` when a warp misses in
//! its TLB and page table, and the warp stalls. The fault service thread (consumer) reads batches
//! at `GET` ([`FaultRing::fetch_batch`]), turns each into a [`FaultBatch`], hands its blocks to
//! the residency / migration policies, records each fault's [`FaultOutcome`], and issues replays
//! when the [`ReplayScheduler`] says so. A replay makes every stalled warp retry its access; a
//! cancel fails the warps of a fatal fault.
//!
//! ```text
//!                GET (consumer)            PUT (producer)
//!                 v                         v
//!      +-----+-----+-----+-----+-----+-----+-----+-----+
//!      |     | e0  | e1  | e2  | e3  | e4  |     |     |   capacity 8 = 7 usable slots
//!      +-----+-----+-----+-----+-----+-----+-----+-----+
//!      empty: GET == PUT            full: PUT + 1 == GET (mod capacity)
//! ```
//!
//! `GET` and `PUT` are slot indices, as the hardware registers are: one slot always stays empty so
//! that a full ring is told from an empty one (NVIDIA's `uvm_hal_volta_fault_buffer_write_get`:
//! overflow is "PUT == GET - 1 and a fault has arrived"). When a fault arrives at a full ring the
//! ring *overflows*: the entry is dropped and the overflow status stays asserted, dropping every
//! further fault, until the consumer writes `GET` (fetch or flush), which frees space and clears it.
//!
//! Invariant defended (DESIGN.md 4, Progress): every fault is serviced or reported fatal. A dropped
//! *replayable* fault is not lost: its warp is still stalled and faults again on the next replay
//! (seed 002: "When faults are dropped they are not lost for replayable faults as the requests are
//! buffered in MMU replay buffer"), so the ring only counts it, and [`ReplayScheduler`] guarantees
//! a replay before the service thread goes idle. A dropped *non-replayable* fault is lost ("as
//! those requests are not buffered for further processing"); the ring counts it separately so that
//! the loss is visible, never silent. [`FaultRing::flush`] discards replayable entries (they come
//! back after the replay) but hands non-replayable ones to the caller. [`FaultRing::check_invariants`]
//! checks the index arithmetic and that every accepted entry is fetched, flushed or still queued.
//!
//! Lock order: [`SharedFaultRing`]'s mutex is a leaf. Nothing else is locked while it is held and
//! no caller code runs under it.

use std::time::Duration;

use crate::sync::{Condvar, Mutex};
use bitflags::bitflags;

use crate::addr::VirtAddr;

/// Faults fetched and serviced per batch (UVM's `uvm_perf_fault_batch_count` default).
pub const DEFAULT_BATCH_SIZE: usize = 256;

/// Largest ring accepted, in slots (a hardware fault buffer holds a few thousand entries).
pub const MAX_RING_CAPACITY: usize = 1 << 20;

/// Errors of the fault ring and of fault batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FaultRingError {
    /// The ring's capacity must be a power of two, at least 2 (one slot always stays empty) and at
    /// most [`MAX_RING_CAPACITY`].
    #[error(
        "fault ring capacity {capacity} is not a power of two in 2..={max}",
        max = MAX_RING_CAPACITY
    )]
    InvalidCapacity {
        /// The capacity asked for.
        capacity: usize,
    },
    /// An outcome was recorded for a page that has no fault in the batch.
    #[error("no fault on page {page} in this batch")]
    NotInBatch {
        /// The page (aligned down) asked for.
        page: VirtAddr,
    },
}

/// The kind of access that faulted, weakest first: the derived order is UVM's "intrusiveness"
/// (prefetch < read < write < atomic), so `max` keeps the strongest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultAccess {
    /// A speculative prefetch by the hardware; never fatal, only counted when invalid.
    Prefetch,
    /// A load.
    Read,
    /// A store.
    Write,
    /// An atomic read-modify-write.
    Atomic,
}

impl FaultAccess {
    /// Every kind, weakest first.
    pub const ALL: [FaultAccess; 4] = [
        FaultAccess::Prefetch,
        FaultAccess::Read,
        FaultAccess::Write,
        FaultAccess::Atomic,
    ];

    /// The bit of this kind in a [`FaultAccessMask`].
    pub fn mask(self) -> FaultAccessMask {
        match self {
            FaultAccess::Prefetch => FaultAccessMask::PREFETCH,
            FaultAccess::Read => FaultAccessMask::READ,
            FaultAccess::Write => FaultAccessMask::WRITE,
            FaultAccess::Atomic => FaultAccessMask::ATOMIC,
        }
    }
}

bitflags! {
    /// The set of access kinds merged into one page fault (UVM's `access_type_mask`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct FaultAccessMask: u8 {
        /// A prefetch was merged.
        const PREFETCH = 1 << 0;
        /// A read was merged.
        const READ = 1 << 1;
        /// A write was merged.
        const WRITE = 1 << 2;
        /// An atomic was merged.
        const ATOMIC = 1 << 3;
    }
}

/// Who faulted: a warp of a compute unit (UVM's GPC / client id pair, which a targeted cancel
/// names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FaultClient {
    /// Compute unit (SM).
    pub cu: u16,
    /// Warp within the device (stalled until replay or cancel).
    pub warp: u32,
}

/// One fault packet, as the device MMU writes it into the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultEntry {
    /// The faulting address (batch preprocessing aligns it down to its page).
    pub addr: VirtAddr,
    /// What the access wanted.
    pub access: FaultAccess,
    /// Who is waiting on it.
    pub client: FaultClient,
    /// Device clock when the fault was raised, in nanoseconds.
    pub timestamp: u64,
    /// Does the warp stall and retry on replay (SM faults), or is the request gone (copy engine,
    /// host: "fault and switch")?
    pub replayable: bool,
}

/// What [`FaultRing::push`] did with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PushOutcome {
    /// Written at `PUT`.
    Queued,
    /// The ring was full (or still overflowed) and the fault replayable: dropped and counted; the
    /// warp stays stalled and faults again on the next replay.
    DroppedReplayable,
    /// The ring was full (or still overflowed) and the fault non-replayable: lost and counted.
    LostNonReplayable,
}

/// What [`FaultRing::flush`] discarded and kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlushReport {
    /// Replayable entries skipped; their warps fault again after the replay that follows.
    pub discarded_replayable: usize,
    /// Non-replayable entries handed to the caller, which must service them.
    pub kept_nonreplayable: usize,
}

/// Counters of a ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FaultRingStats {
    /// Entries accepted (written at `PUT`).
    pub pushed: u64,
    /// Replayable faults dropped because the ring was full or overflowed.
    pub dropped_replayable: u64,
    /// Non-replayable faults lost because the ring was full or overflowed.
    pub lost_nonreplayable: u64,
    /// Entries handed to the consumer (by fetch, and non-replayable ones by flush).
    pub fetched: u64,
    /// Replayable entries discarded by flush.
    pub flushed: u64,
    /// Times the overflow status was asserted.
    pub overflows: u64,
    /// Most entries ever queued at once.
    pub high_water: u64,
}

/// The fault ring: a fixed circular buffer with hardware `GET` / `PUT` semantics.
#[derive(Debug)]
pub struct FaultRing {
    slots: Vec<Option<FaultEntry>>,
    mask: usize,
    get: usize,
    put: usize,
    overflowed: bool,
    stats: FaultRingStats,
}

impl FaultRing {
    /// A ring of `capacity` slots (a power of two in `2..=MAX_RING_CAPACITY`), holding at most
    /// `capacity - 1` entries.
    pub fn new(capacity: usize) -> Result<Self, FaultRingError> {
        if !(2..=MAX_RING_CAPACITY).contains(&capacity) || !capacity.is_power_of_two() {
            return Err(FaultRingError::InvalidCapacity { capacity });
        }
        Ok(FaultRing {
            slots: vec![None; capacity],
            mask: capacity - 1,
            get: 0,
            put: 0,
            overflowed: false,
            stats: FaultRingStats::default(),
        })
    }

    /// Slots in the ring (one more than it can hold).
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }
    /// Most entries it can hold: `capacity - 1`.
    pub fn max_len(&self) -> usize {
        self.mask
    }
    /// Entries queued between `GET` and `PUT`.
    pub fn len(&self) -> usize {
        self.put.wrapping_sub(self.get) & self.mask
    }
    /// No entry queued (`GET == PUT`).
    pub fn is_empty(&self) -> bool {
        self.get == self.put
    }
    /// No room for another entry (`PUT + 1 == GET`).
    pub fn is_full(&self) -> bool {
        (self.put + 1) & self.mask == self.get
    }
    /// The `GET` register: the slot the consumer reads next.
    pub fn get(&self) -> usize {
        self.get
    }
    /// The `PUT` register: the slot the producer writes next.
    pub fn put(&self) -> usize {
        self.put
    }
    /// Is the overflow status asserted (a fault was dropped since `GET` was last written)?
    pub fn is_overflowed(&self) -> bool {
        self.overflowed
    }
    /// Counters.
    pub fn stats(&self) -> FaultRingStats {
        self.stats
    }

    /// The device MMU reports a fault. Never fails: a full ring drops the entry and counts it.
    pub fn push(&mut self, entry: FaultEntry) -> PushOutcome {
        if self.overflowed || self.is_full() {
            if !self.overflowed {
                self.overflowed = true;
                self.stats.overflows += 1;
                tracing::debug!(len = self.len(), "fault ring overflow asserted");
            }
            return if entry.replayable {
                self.stats.dropped_replayable += 1;
                tracing::trace!(addr = %entry.addr, "fault ring full: replayable fault dropped");
                PushOutcome::DroppedReplayable
            } else {
                self.stats.lost_nonreplayable += 1;
                tracing::warn!(addr = %entry.addr, "fault ring full: non-replayable fault lost");
                PushOutcome::LostNonReplayable
            };
        }
        self.slots[self.put] = Some(entry);
        self.put = (self.put + 1) & self.mask;
        self.stats.pushed += 1;
        self.stats.high_water = self.stats.high_water.max(self.len() as u64);
        PushOutcome::Queued
    }

    /// Takes one entry at `GET`, advancing it.
    fn take(&mut self) -> Option<FaultEntry> {
        if self.is_empty() {
            return None;
        }
        let e = self.slots[self.get].take();
        debug_assert!(e.is_some(), "slot {} inside [GET, PUT) is empty", self.get);
        self.get = (self.get + 1) & self.mask;
        e
    }

    /// Writing `GET` frees space, so the overflow status is cleared with it (index first, then
    /// the bit, as `uvm_hal_volta_fault_buffer_write_get` does).
    fn write_get(&mut self) {
        if self.overflowed {
            tracing::debug!(len = self.len(), "fault ring overflow cleared");
        }
        self.overflowed = false;
    }

    /// The service thread takes up to `max` entries, oldest first, appending them to `out`, and
    /// writes `GET`. Returns how many it took.
    pub fn fetch_batch(&mut self, max: usize, out: &mut Vec<FaultEntry>) -> usize {
        let n = max.min(self.len());
        if n == 0 {
            return 0;
        }
        out.reserve(n);
        for _ in 0..n {
            if let Some(e) = self.take() {
                out.push(e);
            }
        }
        self.stats.fetched += n as u64;
        self.write_get();
        n
    }

    /// Skips every entry up to `PUT` (UVM's fault buffer flush before a `BATCH_FLUSH` replay):
    /// replayable entries are discarded, since their warps fault again after the replay, and
    /// non-replayable ones, which would never come back, are appended to `nonreplayable`.
    pub fn flush(&mut self, nonreplayable: &mut Vec<FaultEntry>) -> FlushReport {
        let mut report = FlushReport::default();
        if self.is_empty() {
            return report;
        }
        while let Some(e) = self.take() {
            if e.replayable {
                report.discarded_replayable += 1;
            } else {
                report.kept_nonreplayable += 1;
                nonreplayable.push(e);
            }
        }
        self.stats.flushed += report.discarded_replayable as u64;
        self.stats.fetched += report.kept_nonreplayable as u64;
        self.write_get();
        report
    }

    /// Verifies the index arithmetic, the slot occupancy and the counters.
    pub fn check_invariants(&self) -> Result<(), String> {
        let cap = self.slots.len();
        if !cap.is_power_of_two() || cap < 2 || self.mask != cap - 1 {
            return Err(format!("capacity {cap} with mask {:#x}", self.mask));
        }
        if self.get >= cap || self.put >= cap {
            return Err(format!(
                "GET {} / PUT {} beyond {cap} slots",
                self.get, self.put
            ));
        }
        let len = self.len();
        for (i, slot) in self.slots.iter().enumerate() {
            let live = (i.wrapping_sub(self.get) & self.mask) < len;
            if live != slot.is_some() {
                return Err(format!(
                    "slot {i} is {} but GET {} PUT {} make it {}",
                    if slot.is_some() { "full" } else { "empty" },
                    self.get,
                    self.put,
                    if live { "live" } else { "free" }
                ));
            }
        }
        if self.overflowed && !self.is_full() {
            return Err(format!(
                "overflow asserted with {len} of {} entries",
                self.mask
            ));
        }
        let s = &self.stats;
        if s.high_water > self.mask as u64 || s.high_water < len as u64 {
            return Err(format!(
                "high-water mark {} with {len} queued",
                s.high_water
            ));
        }
        if s.pushed != s.fetched + s.flushed + len as u64 {
            return Err(format!(
                "pushed {} != fetched {} + flushed {} + queued {len}",
                s.pushed, s.fetched, s.flushed
            ));
        }
        if (s.dropped_replayable + s.lost_nonreplayable > 0) != (s.overflows > 0) {
            return Err("drops without an overflow, or an overflow without drops".into());
        }
        Ok(())
    }
}

/// The ring shared between producers (the compute units' MMU) and the service thread, which can
/// sleep until entries arrive.
#[derive(Debug)]
pub struct SharedFaultRing {
    ring: Mutex<FaultRing>,
    not_empty: Condvar,
}

impl SharedFaultRing {
    /// A shared ring of `capacity` slots (see [`FaultRing::new`]).
    pub fn new(capacity: usize) -> Result<Self, FaultRingError> {
        Ok(SharedFaultRing {
            ring: Mutex::new(FaultRing::new(capacity)?),
            not_empty: Condvar::new(),
        })
    }

    /// [`FaultRing::push`], waking the service thread when the entry made the ring non-empty
    /// (the only transition a waiter waits for; a wake-up per entry would cost every faulting
    /// warp a system call).
    pub fn push(&self, entry: FaultEntry) -> PushOutcome {
        let (outcome, first) = {
            let mut ring = self.ring.lock();
            let outcome = ring.push(entry);
            (outcome, ring.len() == 1)
        };
        if outcome == PushOutcome::Queued && first {
            self.not_empty.notify_one();
        }
        outcome
    }

    /// Waits up to `timeout` for the ring to hold an entry; returns whether it does.
    pub fn wait_nonempty(&self, timeout: Duration) -> bool {
        let mut ring = self.ring.lock();
        self.not_empty
            .wait_while_for(&mut ring, |r| r.is_empty(), timeout);
        !ring.is_empty()
    }

    /// [`FaultRing::fetch_batch`] without waiting.
    pub fn fetch_batch(&self, max: usize, out: &mut Vec<FaultEntry>) -> usize {
        self.ring.lock().fetch_batch(max, out)
    }

    /// Waits up to `timeout` for at least one entry, then [`FaultRing::fetch_batch`]. Returns 0 on
    /// timeout (or when `max` is 0), so a service thread can check for shutdown between waits.
    pub fn wait_fetch_batch(
        &self,
        max: usize,
        out: &mut Vec<FaultEntry>,
        timeout: Duration,
    ) -> usize {
        if max == 0 {
            return 0;
        }
        let mut ring = self.ring.lock();
        // wait_while_for re-checks the condition after spurious wake-ups.
        self.not_empty
            .wait_while_for(&mut ring, |r| r.is_empty(), timeout);
        ring.fetch_batch(max, out)
    }

    /// [`FaultRing::flush`].
    pub fn flush(&self, nonreplayable: &mut Vec<FaultEntry>) -> FlushReport {
        self.ring.lock().flush(nonreplayable)
    }

    /// Entries queued now.
    pub fn len(&self) -> usize {
        self.ring.lock().len()
    }
    /// No entry queued now.
    pub fn is_empty(&self) -> bool {
        self.ring.lock().is_empty()
    }
    /// Counters.
    pub fn stats(&self) -> FaultRingStats {
        self.ring.lock().stats()
    }
    /// [`FaultRing::check_invariants`] under the lock.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.ring.lock().check_invariants()
    }
}

/// Why a fault is fatal (UVM's `UvmEventFatalReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FatalReason {
    /// The address is not managed memory of this address space.
    InvalidAddress,
    /// The access is not allowed by the CPU mapping (write to read-only, for example).
    InvalidPermissions,
    /// The hardware reported a fault type that cannot be serviced.
    InvalidFaultType,
    /// No memory could be found for the page, even after eviction.
    OutOfMemory,
    /// The service path failed for an internal reason.
    InternalError,
    /// The operation is not supported on this memory.
    InvalidOperation,
}

/// How a fault ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultOutcome {
    /// The page is mapped with enough permission; a replay resumes the waiting warps.
    Serviced,
    /// The fault cannot be serviced; the waiting warps are cancelled and the launch fails.
    Fatal {
        /// Why.
        reason: FatalReason,
    },
}

/// All the faults of one batch on one page, merged: the strongest access, every access kind seen,
/// every client waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageFault {
    page: VirtAddr,
    access: FaultAccess,
    accesses: FaultAccessMask,
    clients: Vec<FaultClient>,
    instances: u32,
    replayable: bool,
    timestamp: u64,
    outcome: Option<FaultOutcome>,
}

impl PageFault {
    /// The page (aligned down).
    pub fn page(&self) -> VirtAddr {
        self.page
    }
    /// The strongest access merged: what servicing must grant.
    pub fn access(&self) -> FaultAccess {
        self.access
    }
    /// Every access kind merged.
    pub fn accesses(&self) -> FaultAccessMask {
        self.accesses
    }
    /// The clients waiting on this page, sorted, each once.
    pub fn clients(&self) -> &[FaultClient] {
        &self.clients
    }
    /// Ring entries merged into this fault (at least 1).
    pub fn instances(&self) -> u32 {
        self.instances
    }
    /// Entries merged beyond the first.
    pub fn duplicates(&self) -> u32 {
        self.instances - 1
    }
    /// Were all merged entries replayable? If not, some client is not waiting for a replay and
    /// must be told the outcome directly.
    pub fn is_replayable(&self) -> bool {
        self.replayable
    }
    /// Device clock of the earliest merged entry.
    pub fn timestamp(&self) -> u64 {
        self.timestamp
    }
    /// The outcome recorded so far (`None`: not resolved yet).
    pub fn outcome(&self) -> Option<FaultOutcome> {
        self.outcome
    }
    /// Is the outcome fatal?
    pub fn is_fatal(&self) -> bool {
        matches!(self.outcome, Some(FaultOutcome::Fatal { .. }))
    }

    /// Records `outcome`. A fatal outcome is never downgraded: once a fault is known fatal, a
    /// later `Serviced` for the same page does not resurrect it.
    fn resolve(&mut self, outcome: FaultOutcome) {
        if !self.is_fatal() {
            self.outcome = Some(outcome);
        }
    }

    fn from_entry(e: &FaultEntry) -> Self {
        PageFault {
            page: e.addr.page_down(),
            access: e.access,
            accesses: e.access.mask(),
            clients: vec![e.client],
            instances: 1,
            replayable: e.replayable,
            timestamp: e.timestamp,
            outcome: None,
        }
    }

    fn merge(&mut self, e: &FaultEntry) {
        self.access = self.access.max(e.access);
        self.accesses |= e.access.mask();
        self.clients.push(e.client);
        self.instances += 1;
        self.replayable &= e.replayable;
        self.timestamp = self.timestamp.min(e.timestamp);
    }
}

/// The faults of a batch inside one 2 MiB block (UVM's VA block: the unit of locking and
/// servicing), sorted by page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockFaults {
    block: VirtAddr,
    faults: Vec<PageFault>,
}

impl BlockFaults {
    /// The block's first address (2 MiB aligned).
    pub fn block(&self) -> VirtAddr {
        self.block
    }
    /// The merged faults, sorted by page, at least one.
    pub fn faults(&self) -> &[PageFault] {
        &self.faults
    }
    /// Each faulting page with the access servicing must grant.
    pub fn pages(&self) -> impl Iterator<Item = (VirtAddr, FaultAccess)> + '_ {
        self.faults.iter().map(|f| (f.page, f.access))
    }
    /// Every client waiting on a page of this block (a client faulting on two pages appears
    /// twice).
    pub fn clients(&self) -> impl Iterator<Item = FaultClient> + '_ {
        self.faults.iter().flat_map(|f| f.clients.iter().copied())
    }
    /// Records the outcome of the fault on `addr`'s page.
    pub fn resolve(&mut self, addr: VirtAddr, outcome: FaultOutcome) -> Result<(), FaultRingError> {
        let page = addr.page_down();
        let i = self
            .faults
            .binary_search_by_key(&page, |f| f.page)
            .map_err(|_| FaultRingError::NotInBatch { page })?;
        self.faults[i].resolve(outcome);
        Ok(())
    }
    /// Records `outcome` for every fault of the block (fatal ones stay fatal).
    pub fn resolve_all(&mut self, outcome: FaultOutcome) {
        for f in &mut self.faults {
            f.resolve(outcome);
        }
    }
}

/// Counters of one batch's preprocessing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FaultBatchStats {
    /// Ring entries in the batch.
    pub faults: u64,
    /// Distinct pages after merging.
    pub pages: u64,
    /// Entries merged into another one on the same page (`faults - pages`).
    pub duplicates: u64,
    /// Distinct 2 MiB blocks.
    pub blocks: u64,
    /// Entries that were prefetches.
    pub prefetch: u64,
    /// Entries that were reads.
    pub read: u64,
    /// Entries that were writes.
    pub write: u64,
    /// Entries that were atomics.
    pub atomic: u64,
    /// Entries that were non-replayable.
    pub nonreplayable: u64,
}

impl FaultBatchStats {
    /// The entry count of one access kind.
    pub fn by_access(&self, access: FaultAccess) -> u64 {
        match access {
            FaultAccess::Prefetch => self.prefetch,
            FaultAccess::Read => self.read,
            FaultAccess::Write => self.write,
            FaultAccess::Atomic => self.atomic,
        }
    }
}

/// A preprocessed batch: duplicates merged, sorted by address, grouped by 2 MiB block, as
/// `preprocess_fault_batch` leaves it for `service_fault_batch`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultBatch {
    blocks: Vec<BlockFaults>,
    stats: FaultBatchStats,
}

impl FaultBatch {
    /// Merges, sorts and groups `entries` (typically what [`FaultRing::fetch_batch`] returned).
    ///
    /// Entries on the same page merge into one [`PageFault`] whatever their order in the ring,
    /// keeping the strongest access (atomic > write > read > prefetch), the mask of all kinds,
    /// every client (sorted, each once), the instance count and the earliest device clock.
    /// Addresses are aligned down to their page first, as UVM does with fault addresses.
    pub fn from_entries(entries: &[FaultEntry]) -> Self {
        let mut stats = FaultBatchStats {
            faults: entries.len() as u64,
            ..FaultBatchStats::default()
        };
        for e in entries {
            match e.access {
                FaultAccess::Prefetch => stats.prefetch += 1,
                FaultAccess::Read => stats.read += 1,
                FaultAccess::Write => stats.write += 1,
                FaultAccess::Atomic => stats.atomic += 1,
            }
            if !e.replayable {
                stats.nonreplayable += 1;
            }
        }

        // Sort by page (most intrusive access first within a page, as UVM sorts) so duplicates are
        // adjacent and the faults of one block contiguous; then one linear pass merges and groups.
        let mut order: Vec<&FaultEntry> = entries.iter().collect();
        order.sort_by(|a, b| {
            a.addr
                .page_down()
                .cmp(&b.addr.page_down())
                .then(b.access.cmp(&a.access))
        });

        let mut blocks: Vec<BlockFaults> = Vec::new();
        for e in order {
            let page = e.addr.page_down();
            let block = page.huge_down();
            match blocks.last_mut() {
                Some(b) if b.block == block => match b.faults.last_mut() {
                    Some(f) if f.page == page => f.merge(e),
                    _ => b.faults.push(PageFault::from_entry(e)),
                },
                _ => blocks.push(BlockFaults {
                    block,
                    faults: vec![PageFault::from_entry(e)],
                }),
            }
        }
        for f in blocks.iter_mut().flat_map(|b| b.faults.iter_mut()) {
            f.clients.sort_unstable();
            f.clients.dedup();
        }

        stats.blocks = blocks.len() as u64;
        stats.pages = blocks.iter().map(|b| b.faults.len() as u64).sum();
        stats.duplicates = stats.faults - stats.pages;
        FaultBatch { blocks, stats }
    }

    /// The blocks, in address order.
    pub fn blocks(&self) -> &[BlockFaults] {
        &self.blocks
    }
    /// The blocks, to record outcomes while servicing them.
    pub fn blocks_mut(&mut self) -> &mut [BlockFaults] {
        &mut self.blocks
    }
    /// Every merged fault, in address order.
    pub fn faults(&self) -> impl Iterator<Item = &PageFault> + '_ {
        self.blocks.iter().flat_map(|b| b.faults.iter())
    }
    /// Distinct pages.
    pub fn len(&self) -> usize {
        self.stats.pages as usize
    }
    /// No fault at all.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
    /// Preprocessing counters.
    pub fn stats(&self) -> FaultBatchStats {
        self.stats
    }

    /// Records the outcome of the fault on `addr`'s page.
    pub fn resolve(&mut self, addr: VirtAddr, outcome: FaultOutcome) -> Result<(), FaultRingError> {
        let page = addr.page_down();
        let i = self
            .blocks
            .binary_search_by_key(&page.huge_down(), |b| b.block)
            .map_err(|_| FaultRingError::NotInBatch { page })?;
        self.blocks[i].resolve(page, outcome)
    }

    /// Marks a fault fatal (a cancel): shorthand for [`FaultBatch::resolve`] with
    /// [`FaultOutcome::Fatal`].
    pub fn cancel(&mut self, addr: VirtAddr, reason: FatalReason) -> Result<(), FaultRingError> {
        self.resolve(addr, FaultOutcome::Fatal { reason })
    }

    /// A global error (out of memory, ECC, channel error): every fault of the batch that is not
    /// serviced yet becomes fatal, without precise attribution.
    pub fn cancel_unresolved(&mut self, reason: FatalReason) {
        for f in self.blocks.iter_mut().flat_map(|b| b.faults.iter_mut()) {
            if f.outcome.is_none() {
                f.outcome = Some(FaultOutcome::Fatal { reason });
            }
        }
    }

    /// Faults with no outcome yet. The service thread must leave none (DESIGN.md 4).
    pub fn unresolved(&self) -> impl Iterator<Item = &PageFault> + '_ {
        self.faults().filter(|f| f.outcome.is_none())
    }
    /// Faults found fatal: their clients are to be cancelled.
    pub fn fatal(&self) -> impl Iterator<Item = &PageFault> + '_ {
        self.faults().filter(|f| f.is_fatal())
    }
    /// Does every fault have an outcome?
    pub fn is_resolved(&self) -> bool {
        self.unresolved().next().is_none()
    }
}

/// When replays are issued (UVM's `uvm_perf_fault_replay_policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ReplayPolicy {
    /// After the faults of each 2 MiB block are serviced: most replays, earliest restart.
    Block,
    /// Once after each batch.
    Batch,
    /// After each batch, first flushing the ring: faults that arrived while the batch was serviced
    /// are mostly duplicates that the replay would raise again anyway. UVM's default.
    #[default]
    BatchFlush,
    /// A single replay once the ring is drained.
    Once,
}

impl ReplayPolicy {
    /// Every policy.
    pub const ALL: [ReplayPolicy; 4] = [
        ReplayPolicy::Block,
        ReplayPolicy::Batch,
        ReplayPolicy::BatchFlush,
        ReplayPolicy::Once,
    ];

    /// The policy's name: `block`, `batch`, `batch-flush` or `once`.
    pub fn name(self) -> &'static str {
        match self {
            ReplayPolicy::Block => "block",
            ReplayPolicy::Batch => "batch",
            ReplayPolicy::BatchFlush => "batch-flush",
            ReplayPolicy::Once => "once",
        }
    }
}

impl std::fmt::Display for ReplayPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A replay policy name that is none of [`ReplayPolicy::ALL`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown replay policy {0:?} (known: block, batch, batch-flush, once)")]
pub struct UnknownReplayPolicy(pub String);

impl std::str::FromStr for ReplayPolicy {
    type Err = UnknownReplayPolicy;

    /// A policy by its [`ReplayPolicy::name`] (ASCII case ignored).
    fn from_str(s: &str) -> Result<Self, UnknownReplayPolicy> {
        ReplayPolicy::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownReplayPolicy(s.to_owned()))
    }
}

/// What the service thread should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplayDecision {
    /// Nothing yet.
    Wait,
    /// Issue a replay.
    Replay,
    /// Flush the ring ([`FaultRing::flush`]), then issue a replay.
    FlushThenReplay,
}

impl ReplayDecision {
    /// Does this decision issue a replay?
    pub fn replays(self) -> bool {
        !matches!(self, ReplayDecision::Wait)
    }
}

/// Counters of a [`ReplayScheduler`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReplayStats {
    /// Blocks serviced.
    pub blocks: u64,
    /// Batches serviced.
    pub batches: u64,
    /// Replays decided.
    pub replays: u64,
    /// Flushes decided (each followed by its replay).
    pub flushes: u64,
}

/// The replay state machine of one service thread: told when a block, a batch or the whole ring
/// is done, it says when to replay.
///
/// Whatever the policy, [`ReplayScheduler::after_drain`] replays if anything was serviced, or a
/// fault may have been dropped, since the last replay: a warp is never left stalled when the
/// service thread goes idle (UVM issues "at least one replay before leaving"; DESIGN.md 4).
#[derive(Clone, Debug, Default)]
pub struct ReplayScheduler {
    policy: ReplayPolicy,
    /// Blocks serviced since the last replay.
    blocks_owed: u64,
    /// A batch (or an overflow) since the last replay whose warps still wait.
    batch_owed: bool,
    stats: ReplayStats,
}

impl ReplayScheduler {
    /// A scheduler for `policy`.
    pub fn new(policy: ReplayPolicy) -> Self {
        ReplayScheduler {
            policy,
            ..ReplayScheduler::default()
        }
    }
    /// The policy.
    pub fn policy(&self) -> ReplayPolicy {
        self.policy
    }
    /// Counters.
    pub fn stats(&self) -> ReplayStats {
        self.stats
    }
    /// Is some warp possibly waiting for a replay that has not been decided yet?
    pub fn replay_owed(&self) -> bool {
        self.blocks_owed > 0 || self.batch_owed
    }

    fn decide(&mut self, d: ReplayDecision) -> ReplayDecision {
        if d.replays() {
            self.stats.replays += 1;
            if d == ReplayDecision::FlushThenReplay {
                self.stats.flushes += 1;
            }
            self.blocks_owed = 0;
            self.batch_owed = false;
        }
        d
    }

    /// The faults of one block are serviced.
    pub fn after_block(&mut self) -> ReplayDecision {
        self.stats.blocks += 1;
        self.blocks_owed += 1;
        match self.policy {
            ReplayPolicy::Block => self.decide(ReplayDecision::Replay),
            _ => ReplayDecision::Wait,
        }
    }

    /// A whole batch is serviced.
    pub fn after_batch(&mut self) -> ReplayDecision {
        self.stats.batches += 1;
        match self.policy {
            // Every block already replayed; a batch without serviced blocks (all fatal, say) is
            // left owed for after_drain.
            ReplayPolicy::Block => {
                if self.blocks_owed > 0 {
                    self.decide(ReplayDecision::Replay)
                } else {
                    self.batch_owed = true;
                    ReplayDecision::Wait
                }
            }
            ReplayPolicy::Batch => self.decide(ReplayDecision::Replay),
            ReplayPolicy::BatchFlush => self.decide(ReplayDecision::FlushThenReplay),
            ReplayPolicy::Once => {
                self.batch_owed = true;
                ReplayDecision::Wait
            }
        }
    }

    /// The ring overflowed (see [`FaultRing::is_overflowed`]): some warp's fault was dropped and it
    /// waits for a replay to raise it again.
    pub fn note_overflow(&mut self) {
        self.batch_owed = true;
    }

    /// The ring is empty and the service thread is about to sleep: replay if anything is owed.
    pub fn after_drain(&mut self) -> ReplayDecision {
        if self.replay_owed() {
            self.decide(ReplayDecision::Replay)
        } else {
            ReplayDecision::Wait
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    fn client(cu: u16, warp: u32) -> FaultClient {
        FaultClient { cu, warp }
    }

    #[test]
    fn replay_policies_round_trip_by_name_and_unknown_names_are_refused() {
        for p in ReplayPolicy::ALL {
            assert_eq!(p.name().parse::<ReplayPolicy>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!("Batch-Flush".parse(), Ok(ReplayPolicy::BatchFlush));
        let e = "eager".parse::<ReplayPolicy>().unwrap_err();
        assert_eq!(e, UnknownReplayPolicy("eager".into()));
        assert!(e.to_string().contains("batch-flush"), "{e}");
    }

    fn fault(addr: u64, access: FaultAccess, c: FaultClient) -> FaultEntry {
        FaultEntry {
            addr: VirtAddr(addr),
            access,
            client: c,
            timestamp: 0,
            replayable: true,
        }
    }

    fn nr(addr: u64) -> FaultEntry {
        FaultEntry {
            replayable: false,
            ..fault(addr, FaultAccess::Read, client(u16::MAX, 0))
        }
    }

    fn numbered(i: u64) -> FaultEntry {
        FaultEntry {
            timestamp: i,
            ..fault(i * PAGE_SIZE, FaultAccess::Read, client(0, i as u32))
        }
    }

    // ---- the ring -------------------------------------------------------------------------

    #[test]
    fn capacity_must_be_a_power_of_two_of_at_least_two() {
        for bad in [
            0,
            1,
            3,
            6,
            100,
            MAX_RING_CAPACITY + 1,
            MAX_RING_CAPACITY * 2,
        ] {
            assert_eq!(
                FaultRing::new(bad).unwrap_err(),
                FaultRingError::InvalidCapacity { capacity: bad }
            );
            assert!(SharedFaultRing::new(bad).is_err());
        }
        let r = FaultRing::new(8).unwrap();
        assert_eq!((r.capacity(), r.max_len(), r.len()), (8, 7, 0));
        assert!(r.is_empty() && !r.is_full() && !r.is_overflowed());
        r.check_invariants().unwrap();
        assert!(FaultRing::new(MAX_RING_CAPACITY).is_ok());
    }

    #[test]
    fn fetch_order_is_push_order() {
        let mut r = FaultRing::new(16).unwrap();
        for i in 0..10 {
            assert_eq!(r.push(numbered(i)), PushOutcome::Queued);
        }
        let mut out = Vec::new();
        assert_eq!(r.fetch_batch(4, &mut out), 4);
        assert_eq!(r.fetch_batch(100, &mut out), 6);
        assert_eq!(r.fetch_batch(100, &mut out), 0);
        let ts: Vec<u64> = out.iter().map(|e| e.timestamp).collect();
        assert_eq!(ts, (0..10).collect::<Vec<_>>());
        assert_eq!(r.stats().fetched, 10);
        r.check_invariants().unwrap();
    }

    #[test]
    fn get_and_put_wrap_around_the_ring() {
        let mut r = FaultRing::new(4).unwrap();
        let mut out = Vec::new();
        let mut next = 0;
        let mut seen_put = BTreeSet::new();
        // 3 in, 2 out, repeatedly: the indices pass slot 3 back to slot 0 many times.
        for round in 0..20 {
            while !r.is_full() {
                assert_eq!(r.push(numbered(next)), PushOutcome::Queued);
                next += 1;
                seen_put.insert(r.put());
            }
            assert_eq!(r.len(), 3);
            assert_eq!((r.put() + 1) % 4, r.get(), "full means PUT + 1 == GET");
            out.clear();
            assert_eq!(r.fetch_batch(2, &mut out), 2);
            assert_eq!(r.len(), 1, "round {round}");
            r.check_invariants().unwrap();
        }
        assert_eq!(seen_put, BTreeSet::from([0, 1, 2, 3]));
        out.clear();
        r.fetch_batch(10, &mut out);
        assert_eq!(
            out[0].timestamp,
            next - 1,
            "the survivor is the newest entry"
        );
        assert!(r.is_empty());
        assert_eq!(r.get(), r.put());
        assert_eq!(r.stats().high_water, 3);
        assert_eq!(r.stats().dropped_replayable, 0);
    }

    #[test]
    fn full_ring_drops_replayable_faults_and_counts_them() {
        let mut r = FaultRing::new(4).unwrap();
        for i in 0..3 {
            assert_eq!(r.push(numbered(i)), PushOutcome::Queued);
        }
        assert!(r.is_full());
        assert_eq!(r.push(numbered(3)), PushOutcome::DroppedReplayable);
        assert_eq!(r.push(numbered(4)), PushOutcome::DroppedReplayable);
        assert!(r.is_overflowed());
        let s = r.stats();
        assert_eq!(
            (s.pushed, s.dropped_replayable, s.overflows, s.high_water),
            (3, 2, 1, 3)
        );
        r.check_invariants().unwrap();
        // The queued entries are intact, in order.
        let mut out = Vec::new();
        r.fetch_batch(10, &mut out);
        assert_eq!(
            out.iter().map(|e| e.timestamp).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        // Writing GET cleared the overflow: the warps' re-raised faults get in on the replay.
        assert!(!r.is_overflowed());
        assert_eq!(r.push(numbered(3)), PushOutcome::Queued);
        r.check_invariants().unwrap();
    }

    #[test]
    fn overflow_stays_asserted_until_get_is_written() {
        let mut r = FaultRing::new(2).unwrap();
        assert_eq!(r.push(numbered(0)), PushOutcome::Queued);
        assert_eq!(r.push(numbered(1)), PushOutcome::DroppedReplayable);
        let mut out = Vec::new();
        // A fetch of nothing does not write GET.
        assert_eq!(r.fetch_batch(0, &mut out), 0);
        assert!(r.is_overflowed());
        assert_eq!(r.push(numbered(2)), PushOutcome::DroppedReplayable);
        assert_eq!(r.fetch_batch(1, &mut out), 1);
        assert!(!r.is_overflowed());
        assert_eq!(r.stats().overflows, 1);
        r.check_invariants().unwrap();
    }

    #[test]
    fn non_replayable_fault_is_lost_and_counted_when_full() {
        let mut r = FaultRing::new(2).unwrap();
        assert_eq!(r.push(nr(0)), PushOutcome::Queued);
        assert_eq!(r.push(nr(PAGE_SIZE)), PushOutcome::LostNonReplayable);
        assert_eq!(r.push(numbered(2)), PushOutcome::DroppedReplayable);
        let s = r.stats();
        assert_eq!((s.lost_nonreplayable, s.dropped_replayable), (1, 1));
        r.check_invariants().unwrap();
    }

    #[test]
    fn flush_discards_replayable_and_hands_back_non_replayable() {
        let mut r = FaultRing::new(8).unwrap();
        r.push(numbered(0));
        r.push(nr(0x5000));
        r.push(numbered(1));
        r.push(nr(0x6000));
        r.push(numbered(2));
        let mut kept = Vec::new();
        let rep = r.flush(&mut kept);
        assert_eq!(
            rep,
            FlushReport {
                discarded_replayable: 3,
                kept_nonreplayable: 2
            }
        );
        assert_eq!(
            kept.iter().map(|e| e.addr.0).collect::<Vec<_>>(),
            [0x5000, 0x6000]
        );
        assert!(r.is_empty());
        let s = r.stats();
        assert_eq!((s.flushed, s.fetched), (3, 2));
        assert_eq!(r.flush(&mut kept), FlushReport::default());
        r.check_invariants().unwrap();
    }

    #[test]
    fn flush_clears_the_overflow() {
        let mut r = FaultRing::new(2).unwrap();
        r.push(numbered(0));
        r.push(numbered(1));
        assert!(r.is_overflowed());
        r.flush(&mut Vec::new());
        assert!(!r.is_overflowed());
        assert_eq!(r.push(numbered(1)), PushOutcome::Queued);
        r.check_invariants().unwrap();
    }

    #[derive(Clone, Debug)]
    enum Op {
        Push { page: u8, replayable: bool },
        Fetch(usize),
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<u8>(), prop::bool::weighted(0.8))
                .prop_map(|(page, replayable)| Op::Push { page, replayable }),
            2 => (0usize..10).prop_map(Op::Fetch),
            1 => Just(Op::Flush),
        ]
    }

    /// The ring against a bounded `VecDeque` that knows nothing of indices.
    #[derive(Default)]
    struct Model {
        q: VecDeque<FaultEntry>,
        overflowed: bool,
        stats: FaultRingStats,
    }

    proptest! {
        #[test]
        fn ring_matches_a_bounded_queue_model(
            capacity in prop::sample::select(vec![2usize, 4, 8, 16]),
            ops in prop::collection::vec(op(), 1..300),
        ) {
            let mut r = FaultRing::new(capacity).unwrap();
            let mut m = Model::default();
            let limit = capacity - 1;
            for (ts, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Push { page, replayable } => {
                        let e = FaultEntry {
                            timestamp: ts as u64,
                            replayable,
                            ..fault(page as u64 * PAGE_SIZE, FaultAccess::Write, client(1, 2))
                        };
                        let want = if m.overflowed || m.q.len() == limit {
                            if !m.overflowed {
                                m.overflowed = true;
                                m.stats.overflows += 1;
                            }
                            if replayable {
                                m.stats.dropped_replayable += 1;
                                PushOutcome::DroppedReplayable
                            } else {
                                m.stats.lost_nonreplayable += 1;
                                PushOutcome::LostNonReplayable
                            }
                        } else {
                            m.q.push_back(e);
                            m.stats.pushed += 1;
                            m.stats.high_water = m.stats.high_water.max(m.q.len() as u64);
                            PushOutcome::Queued
                        };
                        prop_assert_eq!(r.push(e), want);
                    }
                    Op::Fetch(max) => {
                        let n = max.min(m.q.len());
                        let want: Vec<_> = m.q.drain(..n).collect();
                        if n > 0 {
                            m.overflowed = false;
                        }
                        m.stats.fetched += n as u64;
                        let mut got = Vec::new();
                        prop_assert_eq!(r.fetch_batch(max, &mut got), n);
                        prop_assert_eq!(got, want);
                    }
                    Op::Flush => {
                        let all: Vec<_> = m.q.drain(..).collect();
                        if !all.is_empty() {
                            m.overflowed = false;
                        }
                        let want: Vec<_> = all.iter().copied().filter(|e| !e.replayable).collect();
                        m.stats.flushed += (all.len() - want.len()) as u64;
                        m.stats.fetched += want.len() as u64;
                        let mut got = Vec::new();
                        let rep = r.flush(&mut got);
                        prop_assert_eq!(rep.kept_nonreplayable, want.len());
                        prop_assert_eq!(rep.discarded_replayable, all.len() - want.len());
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(r.len(), m.q.len());
                prop_assert_eq!(r.is_full(), m.q.len() == limit);
                prop_assert_eq!(r.is_empty(), m.q.is_empty());
                prop_assert_eq!(r.is_overflowed(), m.overflowed);
                prop_assert_eq!(r.stats(), m.stats);
                prop_assert!(r.check_invariants().is_ok(), "{:?}", r.check_invariants());
            }
        }
    }

    // ---- the shared ring ------------------------------------------------------------------

    #[test]
    fn waiting_consumer_times_out_on_an_empty_ring() {
        let r = SharedFaultRing::new(4).unwrap();
        let mut out = Vec::new();
        assert_eq!(r.wait_fetch_batch(8, &mut out, Duration::from_millis(5)), 0);
        r.push(numbered(0));
        assert_eq!(r.wait_fetch_batch(0, &mut out, Duration::from_secs(60)), 0);
        assert_eq!(r.wait_fetch_batch(8, &mut out, Duration::ZERO), 1);
        assert!(r.is_empty());
        r.check_invariants().unwrap();
    }

    #[test]
    fn waiting_consumer_wakes_when_a_producer_pushes() {
        let r = SharedFaultRing::new(4).unwrap();
        std::thread::scope(|s| {
            let consumer = s.spawn(|| {
                let mut out = Vec::new();
                let n = r.wait_fetch_batch(8, &mut out, Duration::from_secs(60));
                (n, out)
            });
            std::thread::sleep(Duration::from_millis(10));
            assert_eq!(r.push(numbered(7)), PushOutcome::Queued);
            let (n, out) = consumer.join().unwrap();
            assert_eq!(n, 1);
            assert_eq!(out[0].timestamp, 7);
        });
        assert_eq!(r.stats().fetched, 1);
    }

    /// N compute units, each with stalled warps, against one service thread on a ring far too
    /// small for them. On every replay each warp whose page is still unmapped faults again, as
    /// hardware does; non-replayable faults (a copy engine) are raised once and either fetched
    /// or counted lost. Everything must finish, every warp's fault must have been fetched, and
    /// nothing may vanish uncounted.
    #[test]
    fn every_replayable_fault_is_eventually_fetched_when_warps_reraise_after_replay() {
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
        use std::sync::Barrier;
        use std::time::Instant;

        const CUS: u16 = 4;
        const WARPS: u32 = 48;
        const NONREPLAYABLE: u64 = 24;
        // Warp w of cu c faults on its own page; 48 * 4 pages spread over several 2 MiB blocks.
        let page_of = |cu: u16, w: u32| (cu as u64 * WARPS as u64 + w as u64) * 3 * PAGE_SIZE;
        let nr_base = 64 * HUGE_PAGE_SIZE;

        let ring = SharedFaultRing::new(16).unwrap();
        let replays = AtomicU64::new(0);
        let mapped: Vec<AtomicBool> = (0..CUS as usize * WARPS as usize)
            .map(|_| AtomicBool::new(false))
            .collect();
        let producers_left = AtomicUsize::new(CUS as usize);
        let nr_lost_seen = AtomicU64::new(0);
        let start = Barrier::new(CUS as usize + 1);
        let deadline = Instant::now() + Duration::from_secs(60);

        let (fetched_clients, nr_fetched, sched) = std::thread::scope(|s| {
            for cu in 0..CUS {
                let (ring, replays, mapped, start) = (&ring, &replays, &mapped, &start);
                let (producers_left, nr_lost_seen) = (&producers_left, &nr_lost_seen);
                s.spawn(move || {
                    let idx = |w: u32| cu as usize * WARPS as usize + w as usize;
                    let raise = |w: u32, ts: u64| {
                        let e = FaultEntry {
                            timestamp: ts,
                            ..fault(page_of(cu, w), FaultAccess::Write, client(cu, w))
                        };
                        ring.push(e)
                    };
                    let mut nr_raised = 0;
                    let raise_nr = |i: u64| {
                        if ring.push(nr(nr_base + i * PAGE_SIZE)) == PushOutcome::LostNonReplayable
                        {
                            nr_lost_seen.fetch_add(1, SeqCst);
                        }
                    };
                    // The launch: every warp faults at once, long before the ring drains.
                    for w in 0..WARPS {
                        raise(w, 0);
                    }
                    if cu == 0 {
                        while nr_raised < 4 {
                            raise_nr(nr_raised);
                            nr_raised += 1;
                        }
                    }
                    start.wait();
                    let mut seen = 0;
                    loop {
                        let waiting: Vec<u32> = (0..WARPS)
                            .filter(|&w| !mapped[idx(w)].load(SeqCst))
                            .collect();
                        if waiting.is_empty() {
                            // The copy engine raises what it has left, then the unit is done.
                            if cu == 0 {
                                while nr_raised < NONREPLAYABLE {
                                    raise_nr(nr_raised);
                                    nr_raised += 1;
                                }
                            }
                            break;
                        }
                        assert!(Instant::now() < deadline, "cu {cu}: no progress");
                        let now = replays.load(SeqCst);
                        if now == seen {
                            std::thread::yield_now();
                            continue;
                        }
                        seen = now;
                        // A replay: every stalled warp retries and faults again.
                        for w in waiting {
                            raise(w, now);
                        }
                        // cu 0 also stands for a copy engine raising non-replayable faults.
                        if cu == 0 {
                            for _ in 0..2 {
                                if nr_raised < NONREPLAYABLE {
                                    raise_nr(nr_raised);
                                    nr_raised += 1;
                                }
                            }
                        }
                    }
                    producers_left.fetch_sub(1, SeqCst);
                });
            }

            // The service thread.
            start.wait();
            let mut sched = ReplayScheduler::new(ReplayPolicy::BatchFlush);
            let mut fetched_clients = BTreeSet::new();
            let mut nr_fetched = 0u64;
            let mut buf = Vec::new();
            let mut kept = Vec::new();
            loop {
                assert!(Instant::now() < deadline, "service thread: no progress");
                buf.clear();
                let n =
                    ring.wait_fetch_batch(DEFAULT_BATCH_SIZE, &mut buf, Duration::from_millis(1));
                if n == 0 {
                    if sched.after_drain().replays() {
                        replays.fetch_add(1, SeqCst);
                    }
                    if producers_left.load(SeqCst) == 0 && ring.is_empty() {
                        break;
                    }
                    continue;
                }
                nr_fetched += buf.iter().filter(|e| !e.replayable).count() as u64;
                let mut batch = FaultBatch::from_entries(&buf);
                assert_eq!(batch.stats().faults, n as u64);
                for block in batch.blocks_mut() {
                    for f in block.faults() {
                        fetched_clients.extend(f.clients().iter().copied());
                        if f.is_replayable() {
                            let i = (f.page().0 / (3 * PAGE_SIZE)) as usize;
                            mapped[i].store(true, SeqCst);
                        }
                    }
                    block.resolve_all(FaultOutcome::Serviced);
                    assert_eq!(sched.after_block(), ReplayDecision::Wait);
                }
                assert!(batch.is_resolved());
                match sched.after_batch() {
                    ReplayDecision::FlushThenReplay => {
                        kept.clear();
                        ring.flush(&mut kept);
                        nr_fetched += kept.len() as u64;
                        replays.fetch_add(1, SeqCst);
                    }
                    d => panic!("batch_flush decided {d:?}"),
                }
            }
            (fetched_clients, nr_fetched, sched)
        });

        for cu in 0..CUS {
            for w in 0..WARPS {
                assert!(
                    fetched_clients.contains(&client(cu, w)),
                    "warp {w} of cu {cu} was never fetched"
                );
            }
        }
        let s = ring.stats();
        assert!(s.dropped_replayable > 0, "the test must overflow the ring");
        assert_eq!(s.lost_nonreplayable, nr_lost_seen.load(SeqCst));
        assert_eq!(
            nr_fetched + s.lost_nonreplayable,
            NONREPLAYABLE,
            "a non-replayable fault vanished"
        );
        assert_eq!(s.pushed, s.fetched + s.flushed);
        assert!(!sched.replay_owed());
        ring.check_invariants().unwrap();
    }

    // ---- batch preprocessing --------------------------------------------------------------

    #[test]
    fn duplicates_merge_with_the_strongest_access_and_keep_every_client() {
        use FaultAccess::*;
        let p = 0x4000_0000;
        let entries = [
            FaultEntry {
                timestamp: 30,
                ..fault(p, Read, client(2, 7))
            },
            FaultEntry {
                timestamp: 10,
                ..fault(p + 0x10, Write, client(1, 3))
            },
            FaultEntry {
                timestamp: 20,
                ..fault(p + 0xff8, Prefetch, client(2, 7))
            },
            FaultEntry {
                timestamp: 40,
                ..fault(p + PAGE_SIZE, Read, client(0, 1))
            },
        ];
        let batch = FaultBatch::from_entries(&entries);
        assert_eq!(batch.len(), 2);
        let f = &batch.blocks()[0].faults()[0];
        assert_eq!(f.page(), VirtAddr(p));
        assert_eq!(f.access(), Write);
        assert_eq!(
            f.accesses(),
            FaultAccessMask::READ | FaultAccessMask::WRITE | FaultAccessMask::PREFETCH
        );
        assert_eq!(f.clients(), [client(1, 3), client(2, 7)]);
        assert_eq!((f.instances(), f.duplicates()), (3, 2));
        assert_eq!(f.timestamp(), 10);
        assert!(f.is_replayable());
        let s = batch.stats();
        assert_eq!((s.faults, s.pages, s.duplicates, s.blocks), (4, 2, 2, 1));
        assert_eq!(
            FaultAccess::ALL.map(|a| s.by_access(a)),
            [1, 2, 1, 0],
            "prefetch, read, write, atomic"
        );
        // An atomic anywhere in the group wins over everything.
        let batch = FaultBatch::from_entries(&[
            fault(p, Atomic, client(0, 0)),
            fault(p, Write, client(0, 1)),
        ]);
        assert_eq!(batch.faults().next().unwrap().access(), Atomic);
    }

    #[test]
    fn a_non_replayable_instance_makes_the_merged_fault_non_replayable() {
        let batch = FaultBatch::from_entries(&[numbered(0), nr(0)]);
        let f = batch.faults().next().unwrap();
        assert!(!f.is_replayable());
        assert_eq!(batch.stats().nonreplayable, 1);
    }

    #[test]
    fn batch_is_sorted_by_address_and_grouped_by_2mib_block() {
        let h = HUGE_PAGE_SIZE;
        let addrs = [
            3 * h + 5 * PAGE_SIZE,
            h,
            3 * h,
            h + h - PAGE_SIZE,
            0x1000,
            3 * h + 5 * PAGE_SIZE,
        ];
        let entries: Vec<_> = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| fault(a, FaultAccess::Read, client(0, i as u32)))
            .collect();
        let batch = FaultBatch::from_entries(&entries);
        let blocks: Vec<u64> = batch.blocks().iter().map(|b| b.block().0).collect();
        assert_eq!(blocks, [0, h, 3 * h]);
        let pages: Vec<Vec<u64>> = batch
            .blocks()
            .iter()
            .map(|b| b.pages().map(|(p, _)| p.0).collect())
            .collect();
        assert_eq!(
            pages,
            [
                vec![0x1000],
                vec![h, 2 * h - PAGE_SIZE],
                vec![3 * h, 3 * h + 5 * PAGE_SIZE]
            ]
        );
        assert_eq!(batch.blocks()[2].clients().count(), 3);
        assert_eq!(batch.stats().blocks, 3);
        assert!(FaultBatch::from_entries(&[]).is_empty());
    }

    #[test]
    fn fatal_outcomes_are_recorded_and_never_downgraded() {
        let mut batch = FaultBatch::from_entries(&[numbered(0), numbered(1), numbered(2)]);
        assert_eq!(batch.unresolved().count(), 3);
        batch
            .cancel(VirtAddr(PAGE_SIZE + 8), FatalReason::InvalidPermissions)
            .unwrap();
        batch.resolve(VirtAddr(0), FaultOutcome::Serviced).unwrap();
        // Servicing the whole block afterwards leaves the fatal fault fatal.
        batch.blocks_mut()[0].resolve_all(FaultOutcome::Serviced);
        assert!(batch.is_resolved());
        let fatal: Vec<_> = batch.fatal().map(|f| (f.page().0, f.outcome())).collect();
        assert_eq!(
            fatal,
            [(
                PAGE_SIZE,
                Some(FaultOutcome::Fatal {
                    reason: FatalReason::InvalidPermissions
                })
            )]
        );
        assert_eq!(
            batch.resolve(VirtAddr(7 * PAGE_SIZE), FaultOutcome::Serviced),
            Err(FaultRingError::NotInBatch {
                page: VirtAddr(7 * PAGE_SIZE)
            })
        );
        assert_eq!(
            batch.resolve(VirtAddr(5 * HUGE_PAGE_SIZE), FaultOutcome::Serviced),
            Err(FaultRingError::NotInBatch {
                page: VirtAddr(5 * HUGE_PAGE_SIZE)
            })
        );
    }

    #[test]
    fn global_error_cancels_every_unserviced_fault() {
        let mut batch = FaultBatch::from_entries(&[
            numbered(0),
            numbered(1),
            fault(HUGE_PAGE_SIZE, FaultAccess::Read, client(0, 9)),
        ]);
        batch.resolve(VirtAddr(0), FaultOutcome::Serviced).unwrap();
        batch.cancel_unresolved(FatalReason::OutOfMemory);
        assert!(batch.is_resolved());
        assert_eq!(batch.fatal().count(), 2);
        assert_eq!(
            batch.faults().next().unwrap().outcome(),
            Some(FaultOutcome::Serviced)
        );
    }

    fn entry_strategy() -> impl Strategy<Value = FaultEntry> {
        (
            0u64..3,
            0u64..6,
            0u64..PAGE_SIZE,
            prop::sample::select(FaultAccess::ALL.to_vec()),
            0u16..3,
            0u32..4,
            any::<bool>(),
            0u64..100,
        )
            .prop_map(|(blk, pg, off, access, cu, warp, replayable, timestamp)| {
                FaultEntry {
                    addr: VirtAddr(blk * 5 * HUGE_PAGE_SIZE + pg * 97 * PAGE_SIZE + off),
                    access,
                    client: client(cu, warp),
                    timestamp,
                    replayable,
                }
            })
    }

    proptest! {
        #[test]
        fn batch_matches_a_per_page_model(entries in prop::collection::vec(entry_strategy(), 0..80)) {
            type PageModel = (FaultAccess, FaultAccessMask, BTreeSet<FaultClient>, u32, bool, u64);
            let mut model: BTreeMap<u64, PageModel> = BTreeMap::new();
            for e in &entries {
                let m = model.entry(e.addr.page_down().0).or_insert((
                    e.access, FaultAccessMask::empty(), BTreeSet::new(), 0, true, u64::MAX,
                ));
                m.0 = m.0.max(e.access);
                m.1 |= e.access.mask();
                m.2.insert(e.client);
                m.3 += 1;
                m.4 &= e.replayable;
                m.5 = m.5.min(e.timestamp);
            }
            let batch = FaultBatch::from_entries(&entries);
            let got: Vec<_> = batch.faults().map(|f| f.page().0).collect();
            let want: Vec<_> = model.keys().copied().collect();
            prop_assert_eq!(got, want, "pages sorted and unique");
            for b in batch.blocks() {
                prop_assert_eq!(b.block(), b.block().huge_down());
                prop_assert!(!b.faults().is_empty());
                for f in b.faults() {
                    prop_assert_eq!(f.page().huge_down(), b.block());
                    let m = &model[&f.page().0];
                    prop_assert_eq!(f.access(), m.0);
                    prop_assert_eq!(f.accesses(), m.1);
                    prop_assert_eq!(f.clients(), m.2.iter().copied().collect::<Vec<_>>());
                    prop_assert_eq!(f.instances(), m.3);
                    prop_assert_eq!(f.is_replayable(), m.4);
                    prop_assert_eq!(f.timestamp(), m.5);
                    prop_assert_eq!(f.outcome(), None);
                }
            }
            prop_assert!(batch.blocks().windows(2).all(|w| w[0].block() < w[1].block()));
            let s = batch.stats();
            prop_assert_eq!(s.faults, entries.len() as u64);
            prop_assert_eq!(s.pages, model.len() as u64);
            prop_assert_eq!(s.duplicates, s.faults - s.pages);
            prop_assert_eq!(
                FaultAccess::ALL.iter().map(|&a| s.by_access(a)).sum::<u64>(),
                s.faults
            );
        }
    }

    // ---- replay policy --------------------------------------------------------------------

    #[test]
    fn default_policy_is_batch_flush() {
        assert_eq!(ReplayPolicy::default(), ReplayPolicy::BatchFlush);
        assert_eq!(
            ReplayScheduler::default().policy(),
            ReplayPolicy::BatchFlush
        );
    }

    #[test]
    fn block_policy_replays_after_every_block() {
        let mut s = ReplayScheduler::new(ReplayPolicy::Block);
        assert_eq!(s.after_block(), ReplayDecision::Replay);
        assert_eq!(s.after_block(), ReplayDecision::Replay);
        assert_eq!(s.after_batch(), ReplayDecision::Wait);
        // The batch itself is owed a replay only when it serviced no block (all fatal):
        // after_drain covers it.
        assert_eq!(s.after_drain(), ReplayDecision::Replay);
        assert_eq!(s.after_drain(), ReplayDecision::Wait);
        assert_eq!(s.stats().replays, 3);
    }

    #[test]
    fn batch_policy_replays_once_per_batch() {
        let mut s = ReplayScheduler::new(ReplayPolicy::Batch);
        for _ in 0..3 {
            assert_eq!(s.after_block(), ReplayDecision::Wait);
        }
        assert_eq!(s.after_batch(), ReplayDecision::Replay);
        assert_eq!(s.after_drain(), ReplayDecision::Wait);
        assert_eq!(
            s.stats(),
            ReplayStats {
                blocks: 3,
                batches: 1,
                replays: 1,
                flushes: 0
            }
        );
    }

    #[test]
    fn batch_flush_policy_flushes_then_replays_after_each_batch() {
        let mut s = ReplayScheduler::new(ReplayPolicy::BatchFlush);
        assert_eq!(s.after_block(), ReplayDecision::Wait);
        assert_eq!(s.after_batch(), ReplayDecision::FlushThenReplay);
        assert_eq!(s.after_batch(), ReplayDecision::FlushThenReplay);
        assert_eq!(s.after_drain(), ReplayDecision::Wait);
        assert_eq!(s.stats().flushes, 2);
        assert_eq!(s.stats().replays, 2);
    }

    #[test]
    fn once_policy_replays_only_when_the_ring_is_drained() {
        let mut s = ReplayScheduler::new(ReplayPolicy::Once);
        for _ in 0..4 {
            assert_eq!(s.after_block(), ReplayDecision::Wait);
            assert_eq!(s.after_batch(), ReplayDecision::Wait);
        }
        assert!(s.replay_owed());
        assert_eq!(s.after_drain(), ReplayDecision::Replay);
        assert_eq!(s.after_drain(), ReplayDecision::Wait);
        assert_eq!(s.stats().replays, 1);
    }

    #[test]
    fn an_overflow_forces_a_replay_before_going_idle() {
        for policy in [
            ReplayPolicy::Block,
            ReplayPolicy::Batch,
            ReplayPolicy::BatchFlush,
            ReplayPolicy::Once,
        ] {
            let mut s = ReplayScheduler::new(policy);
            assert_eq!(
                s.after_drain(),
                ReplayDecision::Wait,
                "{policy:?}: nothing owed"
            );
            s.note_overflow();
            assert_eq!(s.after_drain(), ReplayDecision::Replay, "{policy:?}");
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Ev {
        Block,
        Batch,
        Overflow,
        Drain,
    }

    proptest! {
        /// Whatever the policy and the event order, going idle never leaves a serviced block or a
        /// dropped fault without a replay after it, and each policy replays exactly where NVIDIA's does.
        #[test]
        fn no_warp_is_left_stalled_when_the_service_thread_goes_idle(
            policy in prop::sample::select(vec![
                ReplayPolicy::Block, ReplayPolicy::Batch, ReplayPolicy::BatchFlush, ReplayPolicy::Once,
            ]),
            evs in prop::collection::vec(
                prop::sample::select(vec![Ev::Block, Ev::Batch, Ev::Overflow, Ev::Drain]), 0..60),
        ) {
            let mut s = ReplayScheduler::new(policy);
            let mut owed = false;
            for ev in evs {
                let d = match ev {
                    Ev::Block => { owed = true; s.after_block() }
                    Ev::Batch => { owed = true; s.after_batch() }
                    Ev::Overflow => { owed = true; s.note_overflow(); ReplayDecision::Wait }
                    Ev::Drain => {
                        let d = s.after_drain();
                        prop_assert_eq!(d.replays(), owed);
                        prop_assert!(!s.replay_owed());
                        d
                    }
                };
                match (policy, ev) {
                    (ReplayPolicy::Block, Ev::Block) => prop_assert_eq!(d, ReplayDecision::Replay),
                    (ReplayPolicy::Batch, Ev::Batch) => prop_assert_eq!(d, ReplayDecision::Replay),
                    (ReplayPolicy::BatchFlush, Ev::Batch) =>
                        prop_assert_eq!(d, ReplayDecision::FlushThenReplay),
                    (_, Ev::Drain) => {}
                    _ => prop_assert_eq!(d, ReplayDecision::Wait),
                }
                if d.replays() {
                    owed = false;
                }
                prop_assert_eq!(s.replay_owed(), owed);
            }
            prop_assert_eq!(s.after_drain().replays(), owed);
            prop_assert!(!s.replay_owed());
        }
    }
}
