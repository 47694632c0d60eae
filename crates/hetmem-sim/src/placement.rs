//! Placement: what the fault service does with the faulted pages of one 2 MiB block (issue 3,
//! item 5). The service asks a [`PlacementPolicy`] once per block of each batch; the runtime's
//! policies (prefetch, thrashing, access counters, read duplication: issue 4) plug in here.
//!
//! The default, [`Granularity`], is demand migration widened to an aligned window, the way AMD's
//! SVM migrates by its per-range `granularity` attribute (default 2 MiB: uvm-svm.md, "AMD SVM"),
//! and NVIDIA's UVM without its prefetcher migrates exactly the faulted 4 KiB pages (a window of
//! one page).

use std::fmt::Debug;
use std::time::Duration;

use hetmem_core::{
    fault_ring::FaultAccess, migrate::Trigger, PageRange, VirtAddr, HUGE_PAGE_SIZE, PAGE_SIZE,
};

/// What to do with a block's faulted pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementAction {
    /// Migrate the span into this device's memory; what does not fit (device memory full, pages
    /// that cannot move) is mapped where it is.
    Migrate,
    /// Leave the pages where they are and map them over the link (system memory, a peer's frames).
    MapRemote,
}

/// The faulted pages of one block, as the policy sees them.
#[derive(Clone, Copy, Debug)]
pub struct BlockFaults<'a> {
    /// The 2 MiB-aligned block.
    pub block: PageRange,
    /// Faulted pages (sorted, one entry per page) with the strongest access of each.
    pub pages: &'a [(VirtAddr, FaultAccess)],
    /// Free frames of the device's memory right now.
    pub free_frames: u64,
}

/// The policy's answer for one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPlan {
    /// What to do.
    pub action: PlacementAction,
    /// The pages to service, sorted and disjoint: the faulted ones and any others of the block
    /// worth taking along. The service clips them to the block and to managed memory, and
    /// services a faulted page that no span covers on its own.
    pub spans: Vec<PageRange>,
    /// Pages to map where they are even when the action is [`PlacementAction::Migrate`] (sorted,
    /// disjoint, apart from `spans`): what the advice keeps remote in a block whose other pages
    /// migrate.
    pub remote: Vec<PageRange>,
    /// Pages to read-duplicate (sorted, disjoint, apart from the others): a read-only copy in
    /// this device's memory while the page stays in system memory (read-mostly advice). Pages
    /// that cannot be copied are mapped where they are. Ignored when a residency request forces
    /// the action.
    pub duplicate: Vec<PageRange>,
}

/// Decides, per faulted block, where its pages go.
pub trait PlacementPolicy: Send + Sync + Debug {
    /// The plan for `faults`.
    fn place(&self, faults: &BlockFaults<'_>) -> BlockPlan;

    /// A lane of the device reached `addr` over the link (a remote mapping): the input of
    /// access counters. Called on a compute unit's hot path, so it must be cheap. Default:
    /// ignored.
    fn remote_access(&self, addr: VirtAddr) {
        let _ = addr;
    }

    /// Ranges to migrate into the device that no fault asked for: regions whose remote
    /// accesses crossed a threshold (UVM's access counter notifications), or a prefetch reaching
    /// past the faulted block, each with what triggered it (access counters or prefetch). The
    /// fault service drains them between batches, also while idle (its clock for housekeeping),
    /// and migrates them only while a launch is in flight: what it takes between launches
    /// waits for the next. Default: none.
    fn take_migrations(&self) -> Vec<(PageRange, Trigger)> {
        Vec::new()
    }

    /// A CPU fault brought the page at `page` back from this device to system memory (the CPU
    /// side of a page bouncing between processors: the input of thrashing detection). Called
    /// on the faulting thread after the migration succeeded, so it must be cheap and must not
    /// touch managed memory. Default: ignored.
    fn migrated_to_host(&self, page: VirtAddr) {
        let _ = page;
    }

    /// How long a CPU thread that faulted on `page`, held by this device, waits before the page
    /// comes back: thrashing mitigation throttling the CPU (UVM's CPU fault handler sleeps until
    /// the throttling period ends, then services the fault). Called on the faulting thread before
    /// the migration, with no lock held; it must not touch managed memory. Default: no wait.
    fn cpu_fault_delay(&self, page: VirtAddr) -> Option<Duration> {
        let _ = page;
        None
    }
}

/// Migrates the faulted pages widened to aligned windows of `bytes` (a power of two from 4 KiB to
/// 2 MiB): every window holding a faulted page, adjacent windows merged into one span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granularity {
    bytes: u64,
}

impl Granularity {
    /// A window of `bytes`; `None` unless it is a power of two from 4 KiB to 2 MiB.
    pub fn new(bytes: u64) -> Option<Self> {
        (bytes.is_power_of_two() && (PAGE_SIZE..=HUGE_PAGE_SIZE).contains(&bytes))
            .then_some(Granularity { bytes })
    }
    /// Pure demand paging: only the faulted pages.
    pub fn page() -> Self {
        Granularity { bytes: PAGE_SIZE }
    }
    /// Whole 2 MiB blocks (AMD's default granularity).
    pub fn block() -> Self {
        Granularity {
            bytes: HUGE_PAGE_SIZE,
        }
    }
    /// The window size.
    pub fn bytes(self) -> u64 {
        self.bytes
    }
}

impl Default for Granularity {
    fn default() -> Self {
        Self::block()
    }
}

impl PlacementPolicy for Granularity {
    fn place(&self, faults: &BlockFaults<'_>) -> BlockPlan {
        let mut spans: Vec<PageRange> = Vec::new();
        for &(a, _) in faults.pages {
            let start = a.0 & !(self.bytes - 1);
            match spans.last_mut() {
                Some(last) if start <= last.end().0 => {
                    if start + self.bytes > last.end().0 {
                        if let Ok(r) = PageRange::from_bounds(last.start().0, start + self.bytes) {
                            *last = r;
                        }
                    }
                }
                _ => spans.extend(PageRange::new(start, self.bytes).ok()),
            }
        }
        BlockPlan {
            action: PlacementAction::Migrate,
            spans,
            remote: Vec::new(),
            duplicate: Vec::new(),
        }
    }
}

/// Never migrates: every faulted page is mapped where it lives (zero-copy access over the link,
/// what `cudaMemAdviseSetAccessedBy` with a system preferred location gives).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapRemote;

impl PlacementPolicy for MapRemote {
    fn place(&self, faults: &BlockFaults<'_>) -> BlockPlan {
        let mut plan = Granularity::page().place(faults);
        plan.action = PlacementAction::MapRemote;
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 0x7f00_0000_0000;

    fn faults(pages: &[(VirtAddr, FaultAccess)]) -> BlockFaults<'_> {
        BlockFaults {
            block: PageRange::new(BLOCK, HUGE_PAGE_SIZE).unwrap(),
            pages,
            free_frames: 1 << 20,
        }
    }

    #[test]
    fn granularity_widens_to_aligned_windows() {
        let p = [
            (VirtAddr(BLOCK + 17 * PAGE_SIZE), FaultAccess::Read),
            (VirtAddr(BLOCK + 50 * PAGE_SIZE), FaultAccess::Write),
        ];
        let g = Granularity::new(64 << 10).unwrap();
        let plan = g.place(&faults(&p));
        assert_eq!(plan.action, PlacementAction::Migrate);
        let bounds: Vec<(u64, u64)> = plan
            .spans
            .iter()
            .map(|r| ((r.start().0 - BLOCK) / PAGE_SIZE, r.npages()))
            .collect();
        assert_eq!(bounds, vec![(16, 16), (48, 16)]);
        let pages = Granularity::page().place(&faults(&p)).spans;
        assert_eq!(pages.len(), 2, "demand paging takes the faulted pages only");
        assert!(pages.iter().all(|r| r.npages() == 1));
        let block = Granularity::block().place(&faults(&p)).spans;
        assert_eq!(block.len(), 1);
        assert_eq!(block[0].npages(), 512);
    }

    #[test]
    fn adjacent_windows_merge() {
        let p: Vec<(VirtAddr, FaultAccess)> = (3..9)
            .map(|k| (VirtAddr(BLOCK + k * PAGE_SIZE), FaultAccess::Read))
            .collect();
        let spans = Granularity::page().place(&faults(&p)).spans;
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].start().0, BLOCK + 3 * PAGE_SIZE);
        assert_eq!(spans[0].npages(), 6);
    }

    #[test]
    fn granularity_rejects_bad_sizes() {
        for b in [0, 1, 4095, 3 * PAGE_SIZE, 4 << 20] {
            assert!(Granularity::new(b).is_none(), "{b} accepted");
        }
        assert!(Granularity::new(PAGE_SIZE).is_some());
    }

    #[test]
    fn map_remote_never_migrates() {
        let p = [(VirtAddr(BLOCK), FaultAccess::Atomic)];
        let plan = MapRemote.place(&faults(&p));
        assert_eq!(plan.action, PlacementAction::MapRemote);
        assert_eq!(plan.spans.len(), 1);
        assert_eq!(plan.spans[0].npages(), 1);
    }
}
