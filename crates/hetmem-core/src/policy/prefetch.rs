//! Prefetching: which pages to migrate along with the ones that faulted.
//!
//! Two pure decision makers, fed by the fault service path and answered with pages; neither
//! moves memory, takes a lock or reads a clock.
//!
//! * [`TreePrefetcher`] is NVIDIA UVM's density prefetcher (`uvm_perf_prefetch.c`, summarised in
//!   `reference/uvm-svm.md` §A.8), decided per 2 MiB block and per destination. Its inputs are
//!   [`BlockMask`]s: what is resident at the destination, what faulted now, and what the
//!   thrashing detector (§A.9) pins.
//! * [`StreamDetector`] is ours: it follows faults that advance through memory batch after batch
//!   (a vector add's `a`, `b` and `c` arrays) and prefetches ahead of them, across blocks.
//!
//! The runtime keeps one `StreamDetector` per destination and asks the `TreePrefetcher` once per
//! faulted block. The policy gates of §A.8 that need knowledge of the address space stay with the
//! runtime: first touch of a block by its preferred location populates the whole block, no
//! prefetch to a processor that is not the preferred location, and clamping to the VMA.
//!
//! # The tree
//!
//! A complete binary tree over the 512 pages of a block; a node's value is how many of its
//! pages are *occupied* (resident at the destination, faulted now, or filled by the big-page
//! upgrade). With the defaults (threshold 51 %, 16-page leaves) one fault on an empty block:
//!
//! ```text
//!  pages   0 ......... 15 16 ........ 31 32 ......................... 63   ...  511
//!  fault      ^ page 5
//!  upgrade [=== 16/16 ===]                                       the 64 KiB region of the fault
//!  32      [=========== 16/32 = 50 % ===]                        not > 51 %: stop growing there
//!  64      [==================== 16/64 ===============================]
//!  ...
//!  result: pages 0..16 except 5 (15 pages)
//! ```
//!
//! For each faulted page the **largest** subtree on its path to the root whose occupancy is
//! strictly greater than the threshold is that page's prefetch region (a larger subtree wins even
//! when a smaller one between them fails). The answer is the union of the regions, less the pages
//! that faulted (they migrate anyway), are resident (nothing to do) or thrash (must stay put).
//!
//! Invariant defended: the answer never contains a faulted, resident or thrashing page, and is
//! empty when the prefetcher is disabled or the block has not seen `min_faults` fault migrations.

use std::ops::Range;

use crate::addr::{PageRange, VirtAddr, HUGE_ORDER, PAGES_PER_HUGE, PAGE_SHIFT};

/// Pages in one 2 MiB block, the unit the tree prefetcher decides over.
pub const BLOCK_PAGES: usize = PAGES_PER_HUGE as usize;

const WORD_BITS: usize = u64::BITS as usize;
const WORDS: usize = BLOCK_PAGES / WORD_BITS;

/// UVM's default threshold (`UVM_PREFETCH_THRESHOLD_DEFAULT`), percent.
pub const DEFAULT_THRESHOLD_PERCENT: u32 = 51;
/// Default big-page upgrade granularity: 16 pages, UVM's 64 KiB big page.
pub const DEFAULT_LEAF_PAGES: u32 = 16;
/// UVM's default `uvm_perf_prefetch_min_faults`.
pub const DEFAULT_MIN_FAULTS: u32 = 1;
/// Largest accepted `min_faults` (`UVM_PREFETCH_MIN_FAULTS_MAX`).
pub const MAX_MIN_FAULTS: u32 = 20;
/// Largest accepted stream window and prefetch depth, in pages (4 GiB): speculation beyond that
/// is a configuration mistake, and the bound keeps page arithmetic far from overflow.
pub const MAX_STREAM_PAGES: u64 = 1 << 20;
/// Largest accepted number of tracked streams (matching is a linear scan).
pub const MAX_STREAMS: usize = 64;

/// One past the highest page number the stream detector hands out: the last page of the address
/// space is never prefetched, so every range's end address fits in a `u64`.
const VPN_END: u64 = u64::MAX >> PAGE_SHIFT;

/// Why a prefetcher configuration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefetchError {
    /// The threshold must be a percentage in `1..=100`.
    #[error("prefetch threshold {percent}% is outside 1..=100")]
    InvalidThreshold {
        /// The threshold asked for.
        percent: u32,
    },
    /// The big-page upgrade granularity must be a power of two in `1..=512` pages.
    #[error("prefetch leaf of {pages} pages is not a power of two in 1..=512")]
    InvalidLeafPages {
        /// The leaf size asked for.
        pages: u32,
    },
    /// `min_faults` must lie in `1..=`[`MAX_MIN_FAULTS`].
    #[error("prefetch min_faults {min_faults} is outside 1..={max}", max = MAX_MIN_FAULTS)]
    InvalidMinFaults {
        /// The value asked for.
        min_faults: u32,
    },
    /// The stream window must lie in `1..=`[`MAX_STREAM_PAGES`].
    #[error("stream window of {pages} pages is outside 1..={max}", max = MAX_STREAM_PAGES)]
    InvalidWindow {
        /// The window asked for.
        pages: u64,
    },
    /// A stream needs at least one advancing batch to be confirmed.
    #[error("stream confirmation count must be at least 1")]
    InvalidConfirm,
    /// Depths must satisfy `1 <= depth_pages <= max_depth_pages <=` [`MAX_STREAM_PAGES`].
    #[error(
        "stream depth {depth_pages} / max {max_depth_pages} pages: need 1 <= depth <= max <= {max}",
        max = MAX_STREAM_PAGES
    )]
    InvalidDepth {
        /// The initial depth asked for.
        depth_pages: u64,
        /// The maximum depth asked for.
        max_depth_pages: u64,
    },
    /// The number of tracked streams must lie in `1..=`[`MAX_STREAMS`].
    #[error("{streams} tracked streams is outside 1..={max}", max = MAX_STREAMS)]
    InvalidMaxStreams {
        /// The number asked for.
        streams: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// BlockMask
// ---------------------------------------------------------------------------------------------

/// A set of pages of one 2 MiB block (512 bits, page `i` is bit `i % 64` of word `i / 64`):
/// UVM's `uvm_page_mask_t`.
///
/// Methods that take a page or a range panic when it reaches past [`BLOCK_PAGES`], as slice
/// indexing does: a page index outside the block is a caller bug, not a runtime condition.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct BlockMask([u64; WORDS]);

/// The words a page range touches, with the bits of each word it covers.
fn word_masks(pages: Range<usize>) -> impl Iterator<Item = (usize, u64)> {
    assert!(
        pages.end <= BLOCK_PAGES,
        "page range {pages:?} reaches past the block"
    );
    let (start, end) = (pages.start, pages.end.max(pages.start));
    let words = if start == end {
        0..0
    } else {
        start / WORD_BITS..(end - 1) / WORD_BITS + 1
    };
    words.map(move |w| {
        let base = w * WORD_BITS;
        let lo = start.max(base) - base;
        let hi = end.min(base + WORD_BITS) - base;
        let bits = if hi - lo == WORD_BITS {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (w, bits)
    })
}

impl BlockMask {
    /// The empty set.
    pub const fn new() -> Self {
        BlockMask([0; WORDS])
    }

    /// Every page of the block.
    pub const fn full() -> Self {
        BlockMask([u64::MAX; WORDS])
    }

    /// The pages of `pages`.
    ///
    /// # Panics
    /// When `pages.end > BLOCK_PAGES`.
    pub fn from_range(pages: Range<usize>) -> Self {
        let mut m = Self::new();
        m.set_range(pages);
        m
    }

    fn locate(page: usize) -> (usize, u64) {
        assert!(page < BLOCK_PAGES, "page {page} is outside the block");
        (page / WORD_BITS, 1u64 << (page % WORD_BITS))
    }

    /// Adds `page`.
    ///
    /// # Panics
    /// When `page >= BLOCK_PAGES`.
    pub fn set(&mut self, page: usize) {
        let (w, bit) = Self::locate(page);
        self.0[w] |= bit;
    }

    /// Removes `page`.
    ///
    /// # Panics
    /// When `page >= BLOCK_PAGES`.
    pub fn clear(&mut self, page: usize) {
        let (w, bit) = Self::locate(page);
        self.0[w] &= !bit;
    }

    /// Is `page` in the set?
    ///
    /// # Panics
    /// When `page >= BLOCK_PAGES`.
    pub fn contains(&self, page: usize) -> bool {
        let (w, bit) = Self::locate(page);
        self.0[w] & bit != 0
    }

    /// Adds every page of `pages` (an empty or reversed range adds nothing).
    ///
    /// # Panics
    /// When `pages.end > BLOCK_PAGES`.
    pub fn set_range(&mut self, pages: Range<usize>) {
        for (w, bits) in word_masks(pages) {
            self.0[w] |= bits;
        }
    }

    /// Removes every page of `pages`.
    ///
    /// # Panics
    /// When `pages.end > BLOCK_PAGES`.
    pub fn clear_range(&mut self, pages: Range<usize>) {
        for (w, bits) in word_masks(pages) {
            self.0[w] &= !bits;
        }
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// Number of pages of `pages` in the set.
    ///
    /// # Panics
    /// When `pages.end > BLOCK_PAGES`.
    pub fn count_range(&self, pages: Range<usize>) -> u32 {
        word_masks(pages)
            .map(|(w, bits)| (self.0[w] & bits).count_ones())
            .sum()
    }

    /// Does the set hold any page of `pages`?
    ///
    /// # Panics
    /// When `pages.end > BLOCK_PAGES`.
    pub fn any_in(&self, pages: Range<usize>) -> bool {
        word_masks(pages).any(|(w, bits)| self.0[w] & bits != 0)
    }

    /// Is the set empty?
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    fn zip(&self, other: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        let mut out = [0; WORDS];
        for (o, (a, b)) in out.iter_mut().zip(self.0.iter().zip(other.0.iter())) {
            *o = f(*a, *b);
        }
        BlockMask(out)
    }

    /// Pages in either set.
    pub fn union(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a | b)
    }

    /// Pages in both sets.
    pub fn intersection(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a & b)
    }

    /// Pages in `self` but not in `other`.
    pub fn difference(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a & !b)
    }

    /// Do the sets share no page?
    pub fn is_disjoint(&self, other: &Self) -> bool {
        self.intersection(other).is_empty()
    }

    /// Is every page of `self` in `other`?
    pub fn is_subset(&self, other: &Self) -> bool {
        self.difference(other).is_empty()
    }

    /// The lowest page at or after `from` that is in the set.
    fn next_set(&self, from: usize) -> Option<usize> {
        if from >= BLOCK_PAGES {
            return None;
        }
        let mut w = from / WORD_BITS;
        let mut word = self.0[w] & (u64::MAX << (from % WORD_BITS));
        loop {
            if word != 0 {
                return Some(w * WORD_BITS + word.trailing_zeros() as usize);
            }
            w += 1;
            if w == WORDS {
                return None;
            }
            word = self.0[w];
        }
    }

    /// The lowest page at or after `from` that is not in the set, or `BLOCK_PAGES`.
    fn next_clear(&self, from: usize) -> usize {
        if from >= BLOCK_PAGES {
            return BLOCK_PAGES;
        }
        let mut w = from / WORD_BITS;
        let mut word = !self.0[w] & (u64::MAX << (from % WORD_BITS));
        loop {
            if word != 0 {
                return w * WORD_BITS + word.trailing_zeros() as usize;
            }
            w += 1;
            if w == WORDS {
                return BLOCK_PAGES;
            }
            word = !self.0[w];
        }
    }

    /// The pages in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let page = self.next_set(at)?;
            at = page + 1;
            Some(page)
        })
    }

    /// The maximal runs of consecutive pages in the set, ascending (what a copy engine wants).
    pub fn runs(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let start = self.next_set(at)?;
            let end = self.next_clear(start);
            at = end;
            Some(start..end)
        })
    }
}

impl FromIterator<usize> for BlockMask {
    /// The set of the given pages.
    ///
    /// # Panics
    /// When a page is `>= BLOCK_PAGES`.
    fn from_iter<I: IntoIterator<Item = usize>>(pages: I) -> Self {
        let mut m = BlockMask::new();
        for p in pages {
            m.set(p);
        }
        m
    }
}

// ---------------------------------------------------------------------------------------------
// TreePrefetcher
// ---------------------------------------------------------------------------------------------

/// Parameters of the [`TreePrefetcher`]; the defaults are UVM's (§A.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// `uvm_perf_prefetch_enable`: when false the prefetcher answers nothing. Default true.
    pub enabled: bool,
    /// `uvm_perf_prefetch_threshold`: a subtree is prefetched when strictly more than this
    /// percentage of its pages is occupied. `1..=100`, default 51. At 100 nothing is ever strictly
    /// denser than the threshold, so nothing is prefetched, not even the big-page upgrade: UVM
    /// behaves the same way.
    pub threshold_percent: u32,
    /// Big-page upgrade granularity in pages: every aligned region of this size that holds a
    /// faulted page and no thrashing page counts as fully occupied ("assume big pages by
    /// default"). A power of two in `1..=512`; default 16 (64 KiB); 1 turns the upgrade off.
    pub leaf_pages: u32,
    /// `uvm_perf_prefetch_min_faults`: prefetch only once the block has seen this many
    /// fault-driven page migrations to the destination, this batch included. `1..=20`, default 1.
    pub min_faults: u32,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            enabled: true,
            threshold_percent: DEFAULT_THRESHOLD_PERCENT,
            leaf_pages: DEFAULT_LEAF_PAGES,
            min_faults: DEFAULT_MIN_FAULTS,
        }
    }
}

impl PrefetchConfig {
    /// Checks every parameter, reporting the first one out of range.
    pub fn validate(&self) -> Result<(), PrefetchError> {
        if !(1..=100).contains(&self.threshold_percent) {
            return Err(PrefetchError::InvalidThreshold {
                percent: self.threshold_percent,
            });
        }
        if !self.leaf_pages.is_power_of_two() || self.leaf_pages as usize > BLOCK_PAGES {
            return Err(PrefetchError::InvalidLeafPages {
                pages: self.leaf_pages,
            });
        }
        if !(1..=MAX_MIN_FAULTS).contains(&self.min_faults) {
            return Err(PrefetchError::InvalidMinFaults {
                min_faults: self.min_faults,
            });
        }
        Ok(())
    }
}

/// UVM's tree-based density prefetcher for one destination (see the module documentation).
///
/// Stateless between calls: the per-block state UVM keeps (fault migrations to the last
/// destination) is the caller's, passed in as `fault_migrations`.
#[derive(Clone, Debug)]
pub struct TreePrefetcher {
    config: PrefetchConfig,
}

impl TreePrefetcher {
    /// A prefetcher with a validated configuration.
    pub fn new(config: PrefetchConfig) -> Result<Self, PrefetchError> {
        config.validate()?;
        Ok(TreePrefetcher { config })
    }

    /// Its configuration.
    pub fn config(&self) -> &PrefetchConfig {
        &self.config
    }

    /// One block's decision for one destination.
    ///
    /// * `resident`: pages already resident at the destination;
    /// * `faulted`: pages faulted now, to be migrated to the destination;
    /// * `thrashing`: pages that must not be prefetched; a big page holding one is not upgraded,
    ///   and a faulted one grows no region;
    /// * `fault_migrations`: fault-driven page migrations this block has already seen to this
    ///   destination, before this batch (the caller resets it when the destination changes).
    ///
    /// Prefetch fires when `fault_migrations` plus the pages faulted now reaches `min_faults`: UVM
    /// adds the batch's faulted pages to `fault_migrations_to_last_proc` before it reads the hint.
    ///
    /// Returns the pages to migrate in addition to the faulted ones; never a faulted, resident or
    /// thrashing page. Empty when disabled, below `min_faults`, or when no faulted page is
    /// outside `thrashing`.
    pub fn prefetch(
        &self,
        resident: &BlockMask,
        faulted: &BlockMask,
        thrashing: &BlockMask,
        fault_migrations: u32,
    ) -> BlockMask {
        let cfg = &self.config;
        if !cfg.enabled || faulted.is_empty() {
            return BlockMask::new();
        }
        if fault_migrations.saturating_add(faulted.count()) < cfg.min_faults {
            return BlockMask::new();
        }

        // Leaves: what is, or is about to be, at the destination.
        let mut occupied = resident.union(faulted);

        // Big-page upgrade (UVM's grow_fault_granularity): a fault makes its whole big page
        // count as occupied, unless a page of it thrashes. Our blocks are 2 MiB aligned, so the
        // big pages tile the block exactly and UVM's prefix/suffix and tree shift do not arise.
        let leaf = cfg.leaf_pages as usize;
        if leaf > 1 {
            for start in (0..BLOCK_PAGES).step_by(leaf) {
                let region = start..start + leaf;
                if faulted.any_in(region.clone()) && !thrashing.any_in(region.clone()) {
                    occupied.set_range(region);
                }
            }
        }

        // Walk up from every faulted page that does not thrash (UVM's compute_prefetch_region).
        // A page inside a region already chosen can be skipped: its region and that one are
        // subtrees sharing the page, so nested; a larger one would be an ancestor of the earlier
        // page too and would have been chosen for it. This generalises UVM's early exit once a
        // region reaches the end of the block, and leaves the union unchanged.
        let mut regions = BlockMask::new();
        for page in faulted.difference(thrashing).iter() {
            if regions.contains(page) {
                continue;
            }
            if let Some(region) = self.region_of(&occupied, page) {
                regions.set_range(region);
            }
        }

        regions
            .difference(faulted)
            .difference(resident)
            .difference(thrashing)
    }

    /// The largest subtree holding `page` that is strictly denser than the threshold.
    ///
    /// Levels run from the page itself (as in UVM, whose tree leaves are pages) to the whole
    /// block; below `leaf_pages` an upgraded region is full, so starting at the page only matters
    /// next to thrashing pages, where UVM too grows sub-big-page regions.
    fn region_of(&self, occupied: &BlockMask, page: usize) -> Option<Range<usize>> {
        let threshold = u64::from(self.config.threshold_percent);
        let mut best = None;
        for level in 0..=HUGE_ORDER {
            let size = 1usize << level;
            let start = page & !(size - 1);
            let subtree = start..start + size;
            let count = u64::from(occupied.count_range(subtree.clone()));
            if count * 100 > size as u64 * threshold {
                best = Some(subtree);
            }
        }
        best
    }
}

// ---------------------------------------------------------------------------------------------
// StreamDetector
// ---------------------------------------------------------------------------------------------

/// Parameters of the [`StreamDetector`] (ours, no UVM counterpart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// How far, in pages, a batch's lowest fault may land past the stream's frontier and still
    /// advance it; also the largest gap between two faults of one batch that belong to one
    /// stream. `1..=`[`MAX_STREAM_PAGES`], default 64 (256 KiB).
    pub window_pages: u64,
    /// Advancing batches, after the one that started the stream, before the stream is
    /// prefetched. At least 1; default 2 (the third batch of a stream prefetches).
    pub confirm: u32,
    /// Pages prefetched ahead of the highest fault on confirmation; doubled on every further
    /// advancing batch. Default 16 (64 KiB).
    pub depth_pages: u64,
    /// Cap on the doubling depth, `depth_pages..=`[`MAX_STREAM_PAGES`]; default 512 (2 MiB).
    pub max_depth_pages: u64,
    /// Streams tracked at once, least recently advanced replaced first. `1..=`[`MAX_STREAMS`],
    /// default 8.
    pub max_streams: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            window_pages: 64,
            confirm: 2,
            depth_pages: 16,
            max_depth_pages: 512,
            max_streams: 8,
        }
    }
}

impl StreamConfig {
    /// Checks every parameter, reporting the first one out of range.
    pub fn validate(&self) -> Result<(), PrefetchError> {
        if !(1..=MAX_STREAM_PAGES).contains(&self.window_pages) {
            return Err(PrefetchError::InvalidWindow {
                pages: self.window_pages,
            });
        }
        if self.confirm == 0 {
            return Err(PrefetchError::InvalidConfirm);
        }
        if self.depth_pages == 0
            || self.depth_pages > self.max_depth_pages
            || self.max_depth_pages > MAX_STREAM_PAGES
        {
            return Err(PrefetchError::InvalidDepth {
                depth_pages: self.depth_pages,
                max_depth_pages: self.max_depth_pages,
            });
        }
        if !(1..=MAX_STREAMS).contains(&self.max_streams) {
            return Err(PrefetchError::InvalidMaxStreams {
                streams: self.max_streams,
            });
        }
        Ok(())
    }
}

/// One tracked stream; page numbers are virtual page numbers.
#[derive(Clone, Copy, Debug)]
struct Stream {
    /// Highest page faulted by the last batch that started, advanced or reset the stream.
    last_hi: u64,
    /// Highest page the stream has covered: faulted, or already handed out as prefetch.
    frontier: u64,
    /// Consecutive advancing batches since the stream started.
    advances: u32,
    /// Pages prefetched ahead on the latest advance; 0 until confirmed.
    depth: u64,
    /// Batch number of its latest use, for LRU replacement and one match per batch.
    used: u64,
}

impl Stream {
    fn start(hi: u64, batch: u64) -> Self {
        Stream {
            last_hi: hi,
            frontier: hi,
            advances: 0,
            depth: 0,
            used: batch,
        }
    }
}

/// Sequential-stream detector for one destination (ours; see [`StreamConfig`]).
///
/// Each call to [`observe`](Self::observe) takes one fault batch:
///
/// 1. The faulted pages are sorted and split into *clusters*: a gap wider than `window_pages`
///    between two consecutive faulted pages starts a new cluster, so the `a`, `b` and `c` arrays
///    of a vector add fall into three clusters of one batch.
/// 2. Each cluster, lowest first, is matched to the **nearest** stream it advances: one whose
///    last highest fault lies below the cluster's lowest page, no more than `window_pages` below
///    the cluster (counted from the stream's frontier, see below). Nearest is the smallest gap
///    between the two; a stream advances at most once per batch.
/// 3. A cluster that advances no stream but lands within `window_pages` of one (behind it, or
///    overlapping what it already faulted: a backward or repeated step) resets that stream to
///    start again from the cluster. Any other cluster starts a new stream, replacing the least
///    recently used one when all `max_streams` are taken (never one used in this batch).
/// 4. A stream that has advanced `confirm` consecutive batches prefetches `depth_pages` pages
///    past its highest fault; each further advance doubles the depth up to `max_depth_pages`.
///    Pages already handed out earlier are not handed out again.
///
/// The frontier: once a stream prefetches, its next faults land past the prefetched pages (those
/// no longer fault), more than `window_pages` past its last fault once the depth exceeds the
/// window. So the window is counted from the stream's frontier, the higher of its last fault
/// and the end of what it prefetched; a batch that still faults inside the prefetched range (the
/// copy has not landed yet) advances it too.
///
/// A random pattern rarely lands within a window of a stream twice in a row, so it is never
/// confirmed in practice; the detector keeps no timing, so a stream that pauses for a few batches
/// and resumes is still recognised while it stays among the most recently used.
#[derive(Clone, Debug)]
pub struct StreamDetector {
    config: StreamConfig,
    streams: Vec<Stream>,
    /// Number of the current (latest) batch; 0 before the first.
    batch: u64,
}

impl StreamDetector {
    /// A detector with a validated configuration and no stream.
    pub fn new(config: StreamConfig) -> Result<Self, PrefetchError> {
        config.validate()?;
        Ok(StreamDetector {
            config,
            streams: Vec::with_capacity(config.max_streams),
            batch: 0,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &StreamConfig {
        &self.config
    }

    /// Number of streams tracked now.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Forgets every stream (the destination's memory was unmapped, or the process forked).
    pub fn reset(&mut self) {
        self.streams.clear();
        self.batch = 0;
    }

    /// Takes one fault batch (addresses in any order, duplicates allowed, not necessarily page
    /// aligned) and returns the page ranges to prefetch: ascending, neither overlapping nor
    /// adjacent to one another, and sharing no page with the batch's faults. The caller clamps
    /// them to managed memory and skips what is already resident.
    pub fn observe(&mut self, faulted: &[VirtAddr]) -> Vec<PageRange> {
        self.observe_from(faulted, &[])
    }

    /// [`observe`](Self::observe), told where objects begin (`heads`: the first page of each
    /// allocation near the faults, in any order). A new stream whose lowest page is a head
    /// (the fault brought in the object's first page) is confirmed at once: it prefetches
    /// `depth_pages` past its highest fault and doubles from there, as a read at the start of a
    /// file gets the page cache's initial readahead window instead of waiting to be seen
    /// sequential (`page_cache_sync_ra`). A walk from the start of an array is the common case;
    /// a random access pattern pays one window per object. A cluster that advances or resets a
    /// stream is matched as usual.
    pub fn observe_from(&mut self, faulted: &[VirtAddr], heads: &[VirtAddr]) -> Vec<PageRange> {
        self.batch += 1;
        let mut pages: Vec<u64> = faulted.iter().map(|a| a.vpn()).collect();
        pages.sort_unstable();
        pages.dedup();
        let window = self.config.window_pages;

        let mut wanted: Vec<(u64, u64)> = Vec::new();
        for cluster in pages.chunk_by(|a, b| b - a <= window) {
            let (lo, hi) = (cluster[0], cluster[cluster.len() - 1]);
            let head = heads.iter().any(|h| h.vpn() == lo);
            if let Some(range) = self.place(lo, hi, head) {
                wanted.push(range);
            }
        }

        wanted.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(wanted.len());
        for (start, end) in wanted {
            match merged.last_mut() {
                Some(prev) if start <= prev.1 => prev.1 = prev.1.max(end),
                _ => merged.push((start, end)),
            }
        }

        // Another stream's faults may lie inside a range: cut them out.
        let mut out = Vec::new();
        for (start, end) in merged {
            let mut at = start;
            let first = pages.partition_point(|&p| p < start);
            for &p in pages[first..].iter().take_while(|&&p| p < end) {
                push_pages(&mut out, at, p);
                at = p + 1;
            }
            push_pages(&mut out, at, end);
        }
        out
    }

    /// Matches the cluster `[lo, hi]` of this batch to a stream; returns the pages to prefetch.
    /// `head`: the cluster begins at an object's first page.
    fn place(&mut self, lo: u64, hi: u64, head: bool) -> Option<(u64, u64)> {
        let (window, batch) = (self.config.window_pages, self.batch);

        let advancing = self
            .streams
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.used != batch && s.last_hi < lo && lo <= s.frontier.saturating_add(window)
            })
            .min_by_key(|(_, s)| lo - s.last_hi)
            .map(|(i, _)| i);
        if let Some(i) = advancing {
            return self.advance(i, hi);
        }

        let near = self
            .streams
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.used != batch
                    && lo <= s.frontier.saturating_add(window)
                    && hi.saturating_add(window) >= s.last_hi
            })
            .min_by_key(|(_, s)| s.last_hi.abs_diff(hi))
            .map(|(i, _)| i);
        if let Some(i) = near {
            self.streams[i] = Stream::start(hi, batch);
            return None;
        }

        let slot = if self.streams.len() < self.config.max_streams {
            self.streams.push(Stream::start(hi, batch));
            self.streams.len() - 1
        } else if let Some(victim) = self
            .streams
            .iter()
            .enumerate()
            .filter(|(_, s)| s.used != batch)
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i)
        {
            self.streams[victim] = Stream::start(hi, batch);
            victim
        } else {
            return None;
        };
        if !head {
            return None;
        }
        // Confirmed from its first batch: the advance below hands out the first depth.
        let s = &mut self.streams[slot];
        s.advances = self.config.confirm - 1;
        self.advance(slot, hi)
    }

    /// Stream `i` advanced to `hi`: count it, grow its depth, hand out the pages past its
    /// frontier up to `depth` past `hi`.
    fn advance(&mut self, i: usize, hi: u64) -> Option<(u64, u64)> {
        let cfg = self.config;
        let s = &mut self.streams[i];
        s.used = self.batch;
        s.last_hi = hi;
        s.frontier = s.frontier.max(hi);
        s.advances = s.advances.saturating_add(1);
        if s.advances < cfg.confirm {
            return None;
        }
        s.depth = if s.advances == cfg.confirm {
            cfg.depth_pages
        } else {
            s.depth.saturating_mul(2).min(cfg.max_depth_pages)
        };
        let start = s.frontier + 1;
        let end = hi.saturating_add(1).saturating_add(s.depth).min(VPN_END);
        if start >= end {
            return None;
        }
        s.frontier = end - 1;
        Some((start, end))
    }

    /// Checks the detector's bookkeeping; tests call it after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        let cfg = &self.config;
        if self.streams.len() > cfg.max_streams {
            return Err(format!(
                "{} streams tracked, at most {}",
                self.streams.len(),
                cfg.max_streams
            ));
        }
        for (i, s) in self.streams.iter().enumerate() {
            if s.frontier < s.last_hi {
                return Err(format!("stream {i}: frontier below its last fault: {s:?}"));
            }
            if s.frontier > VPN_END {
                return Err(format!(
                    "stream {i}: frontier past the address space: {s:?}"
                ));
            }
            let confirmed = s.advances >= cfg.confirm;
            if confirmed != (s.depth != 0) {
                return Err(format!("stream {i}: depth disagrees with advances: {s:?}"));
            }
            if confirmed && !(cfg.depth_pages..=cfg.max_depth_pages).contains(&s.depth) {
                return Err(format!("stream {i}: depth out of bounds: {s:?}"));
            }
            if s.frontier.saturating_sub(s.last_hi) > s.depth {
                return Err(format!("stream {i}: prefetched past its depth: {s:?}"));
            }
            if s.used == 0 || s.used > self.batch {
                return Err(format!(
                    "stream {i}: used at batch {} of {}",
                    s.used, self.batch
                ));
            }
        }
        Ok(())
    }
}

/// Appends the pages `[start, end)` as a range, when not empty.
fn push_pages(out: &mut Vec<PageRange>, start: u64, end: u64) {
    if start >= end {
        return;
    }
    // Cannot fail: `end <= VPN_END`, so the range is aligned, non-empty and below 2^64.
    if let Ok(range) = PageRange::from_bounds(start << PAGE_SHIFT, end << PAGE_SHIFT) {
        out.push(range);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use proptest::prelude::*;

    // ---- helpers ------------------------------------------------------------------------------

    fn tree(config: PrefetchConfig) -> TreePrefetcher {
        TreePrefetcher::new(config).unwrap()
    }

    fn cfg(threshold_percent: u32, leaf_pages: u32) -> PrefetchConfig {
        PrefetchConfig {
            threshold_percent,
            leaf_pages,
            ..PrefetchConfig::default()
        }
    }

    fn mask(pages: &[usize]) -> BlockMask {
        pages.iter().copied().collect()
    }

    fn none() -> BlockMask {
        BlockMask::new()
    }

    // ---- BlockMask ----------------------------------------------------------------------------

    #[test]
    fn block_mask_ranges_cross_words_and_runs_merge() {
        let mut m = BlockMask::new();
        assert!(m.is_empty());
        m.set_range(60..70);
        m.set(0);
        m.set(511);
        m.set_range(128..192);
        assert_eq!(m.count(), 10 + 2 + 64);
        assert_eq!(m.count_range(64..128), 6);
        assert!(m.any_in(69..70) && !m.any_in(70..128));
        assert_eq!(
            m.runs().collect::<Vec<_>>(),
            vec![0..1, 60..70, 128..192, 511..512]
        );
        m.clear(65);
        m.clear_range(128..191);
        assert_eq!(
            m.runs().collect::<Vec<_>>(),
            vec![0..1, 60..65, 66..70, 191..192, 511..512]
        );
        assert_eq!(m.iter().take(3).collect::<Vec<_>>(), vec![0, 60, 61]);
        assert_eq!(BlockMask::full().count(), 512);
        assert_eq!(
            BlockMask::full().runs().collect::<Vec<_>>(),
            vec![0..BLOCK_PAGES]
        );
        m.set_range(10..10);
        let (hi, lo) = (20, 10);
        m.set_range(hi..lo);
        assert_eq!(m.count(), 12);
    }

    #[test]
    fn block_mask_set_algebra() {
        let a = BlockMask::from_range(0..100);
        let b = BlockMask::from_range(50..150);
        assert_eq!(a.union(&b), BlockMask::from_range(0..150));
        assert_eq!(a.intersection(&b), BlockMask::from_range(50..100));
        assert_eq!(a.difference(&b), BlockMask::from_range(0..50));
        assert!(a.difference(&b).is_disjoint(&b));
        assert!(a.intersection(&b).is_subset(&a));
        assert!(!a.is_subset(&b));
    }

    #[test]
    #[should_panic(expected = "outside the block")]
    fn block_mask_refuses_a_page_past_the_block() {
        BlockMask::new().set(BLOCK_PAGES);
    }

    #[test]
    #[should_panic(expected = "reaches past the block")]
    fn block_mask_refuses_a_range_past_the_block() {
        BlockMask::new().set_range(500..513);
    }

    // ---- PrefetchConfig -----------------------------------------------------------------------

    #[test]
    fn default_config_is_uvms() {
        let c = PrefetchConfig::default();
        assert!(c.enabled);
        assert_eq!(
            (c.threshold_percent, c.leaf_pages, c.min_faults),
            (51, 16, 1)
        );
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn bad_prefetch_configs_are_typed_errors() {
        let ok = PrefetchConfig::default();
        for percent in [0, 101, u32::MAX] {
            let c = PrefetchConfig {
                threshold_percent: percent,
                ..ok
            };
            assert_eq!(
                TreePrefetcher::new(c).unwrap_err(),
                PrefetchError::InvalidThreshold { percent }
            );
        }
        for pages in [0, 3, 24, 1024, u32::MAX] {
            let c = PrefetchConfig {
                leaf_pages: pages,
                ..ok
            };
            assert_eq!(c.validate(), Err(PrefetchError::InvalidLeafPages { pages }));
        }
        for min_faults in [0, 21] {
            let c = PrefetchConfig { min_faults, ..ok };
            assert_eq!(
                c.validate(),
                Err(PrefetchError::InvalidMinFaults { min_faults })
            );
        }
        for (percent, pages, min_faults) in [(1, 1, 1), (100, 512, 20)] {
            let c = PrefetchConfig {
                threshold_percent: percent,
                leaf_pages: pages,
                min_faults,
                enabled: false,
            };
            assert_eq!(c.validate(), Ok(()));
        }
        let msg = PrefetchError::InvalidThreshold { percent: 0 }.to_string();
        assert!(msg.contains("1..=100"), "{msg}");
    }

    // ---- TreePrefetcher -----------------------------------------------------------------------

    #[test]
    fn single_fault_on_empty_block_prefetches_its_64k_region() {
        let p = tree(PrefetchConfig::default());
        let got = p.prefetch(&none(), &mask(&[37]), &none(), 0);
        let mut want = BlockMask::from_range(32..48);
        want.clear(37);
        assert_eq!(got, want);
        assert_eq!(got.count(), 15);
    }

    #[test]
    fn faults_at_block_edges_stay_inside_the_block() {
        let p = tree(PrefetchConfig::default());
        let first = p.prefetch(&none(), &mask(&[0]), &none(), 0);
        assert_eq!(first.runs().collect::<Vec<_>>(), vec![1..16]);
        let last = p.prefetch(&none(), &mask(&[511]), &none(), 0);
        assert_eq!(last.runs().collect::<Vec<_>>(), vec![496..511]);
        let both = p.prefetch(&none(), &mask(&[0, 511]), &none(), 0);
        assert_eq!(both.runs().collect::<Vec<_>>(), vec![1..16, 496..511]);
    }

    #[test]
    fn dense_block_prefetches_the_whole_block() {
        let p = tree(PrefetchConfig::default());
        // 262/512 = 51.2 % resident (far from the fault), one fault: the root passes.
        let resident = BlockMask::from_range(250..512);
        let got = p.prefetch(&resident, &mask(&[3]), &none(), 0);
        let mut want = BlockMask::from_range(0..250);
        want.clear(3);
        assert_eq!(got, want);
        assert_eq!(got.union(&resident).count(), 511);
    }

    #[test]
    fn root_needs_strictly_more_than_threshold_at_default() {
        // With the upgrade off, a root of 512 pages with 261 occupied (50.98 %) does not pass,
        // 262 (51.17 %) does; exactly 51 % of a power of two is not an integer.
        let p = tree(cfg(51, 1));
        let resident = BlockMask::from_range(0..260);
        let below = p.prefetch(&resident, &mask(&[511]), &none(), 0);
        // Page 511's lower levels: {510,511} 1/2 no, ... nothing passes until the root.
        assert!(below.is_empty(), "{below:?}");
        let resident = BlockMask::from_range(0..261);
        let above = p.prefetch(&resident, &mask(&[511]), &none(), 0);
        assert_eq!(above, BlockMask::from_range(261..511));
    }

    #[test]
    fn threshold_equal_occupancy_does_not_prefetch() {
        // threshold 75: a 4-page subtree with 3 occupied is exactly 75 %: not enough.
        let p = tree(cfg(75, 1));
        let exact = p.prefetch(&mask(&[8, 9]), &mask(&[10]), &none(), 0);
        assert!(exact.is_empty(), "{exact:?}");
        // 7 of 8 = 87.5 % passes at the 8-page level.
        let above = p.prefetch(&mask(&[8, 9, 10, 12, 13, 14]), &mask(&[11]), &none(), 0);
        assert_eq!(above, mask(&[15]));
        // threshold 50: a 2-page subtree with 1 page is exactly 50 %, 256 of 512 too.
        let p = tree(cfg(50, 1));
        assert!(p.prefetch(&none(), &mask(&[6]), &none(), 0).is_empty());
        let half = BlockMask::from_range(0..255);
        assert!(p.prefetch(&half, &mask(&[300]), &none(), 0).is_empty());
        let over = BlockMask::from_range(0..256);
        assert_eq!(
            p.prefetch(&over, &mask(&[300]), &none(), 0),
            BlockMask::from_range(256..512).difference(&mask(&[300]))
        );
    }

    #[test]
    fn threshold_51_versus_52_percent() {
        // 0..32 resident, fault at 32: every subtree of page 32 below 64 pages is nearly empty;
        // 0..64 holds 33/64 = 51.6 %, 0..128 only 33/128.
        let resident = BlockMask::from_range(0..32);
        let faulted = mask(&[32]);
        let at51 = tree(cfg(51, 1)).prefetch(&resident, &faulted, &none(), 0);
        assert_eq!(at51, BlockMask::from_range(33..64));
        let at52 = tree(cfg(52, 1)).prefetch(&resident, &faulted, &none(), 0);
        assert!(at52.is_empty(), "{at52:?}");
        // One more resident page: 34/64 = 53.1 % passes 52 too.
        let resident = resident.union(&mask(&[40]));
        let at52 = tree(cfg(52, 1)).prefetch(&resident, &faulted, &none(), 0);
        assert_eq!(at52, BlockMask::from_range(33..64).difference(&mask(&[40])));
    }

    #[test]
    fn largest_passing_subtree_wins_over_a_failing_smaller_one() {
        // Fault at 0; 1 fails at level 2 (1/2 = 50 %), but 0..8 has 5/8 occupied.
        let p = tree(cfg(51, 1));
        let got = p.prefetch(&mask(&[4, 5, 6, 7]), &mask(&[0]), &none(), 0);
        assert_eq!(got, mask(&[1, 2, 3]));
    }

    #[test]
    fn thrashing_pages_are_excluded_and_block_the_upgrade_of_their_region() {
        let p = tree(PrefetchConfig::default());
        // Fault at 5, page 7 thrashes: 0..16 is not upgraded; 1/2 fails at the first level.
        let got = p.prefetch(&none(), &mask(&[5]), &mask(&[7]), 0);
        assert!(got.is_empty(), "{got:?}");
        // The neighbouring big page is still upgraded.
        let got = p.prefetch(&none(), &mask(&[5, 100]), &mask(&[7]), 0);
        assert_eq!(
            got,
            BlockMask::from_range(96..112).difference(&mask(&[100]))
        );
        // A dense block still prefetches everything but the thrashing page.
        let resident = BlockMask::from_range(256..512);
        let got = p.prefetch(&resident, &mask(&[5, 100]), &mask(&[7]), 0);
        assert_eq!(
            got,
            BlockMask::from_range(0..256).difference(&mask(&[5, 7, 100]))
        );
    }

    #[test]
    fn thrashing_faults_do_not_walk() {
        let p = tree(PrefetchConfig::default());
        let got = p.prefetch(&none(), &mask(&[5]), &mask(&[5]), 0);
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn next_to_thrashing_a_region_grows_below_the_big_page() {
        // As in UVM, whose tree leaves are pages: pages 0..6 fault, 15 thrashes, so 0..16 is not
        // upgraded; 0..8 is 6/8 = 75 % occupied and becomes the region.
        let p = tree(PrefetchConfig::default());
        let got = p.prefetch(&none(), &BlockMask::from_range(0..6), &mask(&[15]), 0);
        assert_eq!(got, mask(&[6, 7]));
    }

    #[test]
    fn resident_pages_are_never_returned() {
        let p = tree(PrefetchConfig::default());
        let resident = mask(&[33, 40, 47]);
        let got = p.prefetch(&resident, &mask(&[37]), &none(), 0);
        assert_eq!(
            got,
            BlockMask::from_range(32..48).difference(&mask(&[33, 37, 40, 47]))
        );
    }

    #[test]
    fn min_faults_gates_prefetch() {
        let p = tree(PrefetchConfig {
            min_faults: 3,
            ..PrefetchConfig::default()
        });
        let one = mask(&[100]);
        assert!(p.prefetch(&none(), &one, &none(), 0).is_empty());
        assert!(p.prefetch(&none(), &one, &none(), 1).is_empty());
        assert_eq!(p.prefetch(&none(), &one, &none(), 2).count(), 15);
        // The batch's own faults count, as in UVM.
        assert_eq!(
            p.prefetch(&none(), &mask(&[100, 101, 102]), &none(), 0)
                .count(),
            13
        );
        assert_eq!(p.prefetch(&none(), &one, &none(), u32::MAX).count(), 15);
        // The default (1) prefetches on the first fault.
        let p = tree(PrefetchConfig::default());
        assert_eq!(p.prefetch(&none(), &one, &none(), 0).count(), 15);
    }

    #[test]
    fn disabled_prefetcher_answers_nothing() {
        let p = tree(PrefetchConfig {
            enabled: false,
            ..PrefetchConfig::default()
        });
        let resident = BlockMask::from_range(0..400);
        assert!(p.prefetch(&resident, &mask(&[450]), &none(), 20).is_empty());
        assert!(p.prefetch(&none(), &mask(&[0]), &none(), 0).is_empty());
    }

    #[test]
    fn no_fault_no_prefetch() {
        let p = tree(PrefetchConfig::default());
        assert!(p
            .prefetch(&BlockMask::from_range(0..511), &none(), &none(), 5)
            .is_empty());
    }

    #[test]
    fn threshold_100_prefetches_nothing() {
        let p = tree(cfg(100, 16));
        let got = p.prefetch(&BlockMask::from_range(0..500), &mask(&[505]), &none(), 0);
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn whole_block_leaf_upgrades_the_block_on_one_fault() {
        let p = tree(cfg(51, 512));
        let got = p.prefetch(&none(), &mask(&[200]), &none(), 0);
        assert_eq!(got, BlockMask::full().difference(&mask(&[200])));
        let got = p.prefetch(&none(), &mask(&[200]), &mask(&[0]), 0);
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn growth_is_power_of_two_with_more_residency() {
        // The academic description: 64 KiB, then doubling while > 51 % is there.
        let p = tree(PrefetchConfig::default());
        // 0..16 resident, fault at 16: 16..32 upgraded, 0..32 full, 0..64 = 32/64 = 50 %.
        let got = p.prefetch(&BlockMask::from_range(0..16), &mask(&[16]), &none(), 0);
        assert_eq!(got, BlockMask::from_range(17..32));
        // One more resident page elsewhere in 32..64: 33/64 passes, 33/128 fails.
        let got = p.prefetch(
            &mask(&[63]).union(&BlockMask::from_range(0..16)),
            &mask(&[16]),
            &none(),
            0,
        );
        assert_eq!(got, BlockMask::from_range(17..63));
    }

    // ---- model and properties -----------------------------------------------------------------

    /// The algorithm of §A.8 written plainly over bools: no skipping, no word tricks.
    fn model(
        c: &PrefetchConfig,
        r: &BlockMask,
        f: &BlockMask,
        t: &BlockMask,
        migrations: u32,
    ) -> BlockMask {
        let (r, f, t): (Vec<bool>, Vec<bool>, Vec<bool>) = (
            (0..BLOCK_PAGES).map(|p| r.contains(p)).collect(),
            (0..BLOCK_PAGES).map(|p| f.contains(p)).collect(),
            (0..BLOCK_PAGES).map(|p| t.contains(p)).collect(),
        );
        let faults = f.iter().filter(|&&x| x).count() as u64;
        if !c.enabled || u64::from(migrations) + faults < u64::from(c.min_faults) {
            return BlockMask::new();
        }
        let mut occ: Vec<bool> = (0..BLOCK_PAGES).map(|p| r[p] || f[p]).collect();
        let leaf = c.leaf_pages as usize;
        for start in (0..BLOCK_PAGES).step_by(leaf) {
            let region = start..start + leaf;
            if f[region.clone()].iter().any(|&x| x) && !t[region.clone()].iter().any(|&x| x) {
                occ[region].iter_mut().for_each(|x| *x = true);
            }
        }
        let mut chosen = vec![false; BLOCK_PAGES];
        for p in (0..BLOCK_PAGES).filter(|&p| f[p] && !t[p]) {
            let mut best = None;
            let mut size = 1;
            while size <= BLOCK_PAGES {
                let start = p / size * size;
                let n = occ[start..start + size].iter().filter(|&&x| x).count();
                if n * 100 > size * c.threshold_percent as usize {
                    best = Some(start..start + size);
                }
                size *= 2;
            }
            if let Some(b) = best {
                chosen[b].iter_mut().for_each(|x| *x = true);
            }
        }
        (0..BLOCK_PAGES)
            .filter(|&p| chosen[p] && !f[p] && !r[p] && !t[p])
            .collect()
    }

    /// Masks of scattered pages plus a few runs, sparse to dense.
    fn arb_mask(max_pages: usize, max_runs: usize) -> impl Strategy<Value = BlockMask> {
        (
            prop::collection::vec(0..BLOCK_PAGES, 0..=max_pages),
            prop::collection::vec((0..BLOCK_PAGES, 1usize..128), 0..=max_runs),
        )
            .prop_map(|(pages, runs)| {
                let mut m: BlockMask = pages.into_iter().collect();
                for (start, len) in runs {
                    m.set_range(start..(start + len).min(BLOCK_PAGES));
                }
                m
            })
    }

    fn arb_config() -> impl Strategy<Value = PrefetchConfig> {
        (prop::bool::weighted(0.9), 1u32..=100, 0u32..=9, 1u32..=4).prop_map(
            |(enabled, threshold_percent, leaf_order, min_faults)| PrefetchConfig {
                enabled,
                threshold_percent,
                leaf_pages: 1 << leaf_order,
                min_faults,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prefetch_matches_the_plain_model_and_never_touches_what_it_must_not(
            c in arb_config(),
            r in arb_mask(200, 4),
            f in arb_mask(24, 1),
            t in arb_mask(12, 1),
            migrations in 0u32..4,
        ) {
            let p = TreePrefetcher::new(c).unwrap();
            let got = p.prefetch(&r, &f, &t, migrations);
            prop_assert_eq!(got, model(&c, &r, &f, &t, migrations));
            prop_assert!(got.is_disjoint(&f));
            prop_assert!(got.is_disjoint(&r));
            prop_assert!(got.is_disjoint(&t));
            if f.difference(&t).is_empty() || !c.enabled {
                prop_assert!(got.is_empty());
            }
            // The thrash-free big pages of non-thrashing faults always come along.
            if c.enabled && c.threshold_percent < 100
                && migrations + f.count() >= c.min_faults {
                let leaf = c.leaf_pages as usize;
                for page in f.difference(&t).iter() {
                    let start = page / leaf * leaf;
                    let big = BlockMask::from_range(start..start + leaf);
                    if big.is_disjoint(&t) {
                        prop_assert!(big.is_subset(&got.union(&f).union(&r)));
                    }
                }
            }
        }

        #[test]
        fn prefetch_is_monotone_in_residency_faults_thrashing_and_threshold(
            c in arb_config(),
            r in arb_mask(160, 3),
            more_r in arb_mask(60, 2),
            f in arb_mask(16, 1),
            more_f in arb_mask(8, 1),
            t in arb_mask(8, 1),
            more_t in arb_mask(8, 1),
            lower in 0u32..50,
        ) {
            let c = PrefetchConfig { enabled: true, min_faults: 1, ..c };
            let p = TreePrefetcher::new(c).unwrap();
            let base = p.prefetch(&r, &f, &t, 0);

            // More resident pages never shrink what ends up at the destination.
            let r2 = r.union(&more_r);
            let got = p.prefetch(&r2, &f, &t, 0);
            prop_assert!(base.union(&r).is_subset(&got.union(&r2)));

            // More faults never shrink what is migrated.
            let f2 = f.union(&more_f);
            let got = p.prefetch(&r, &f2, &t, 0);
            prop_assert!(base.union(&f).is_subset(&got.union(&f2)));

            // More thrashing pages never grow the prefetch.
            let got = p.prefetch(&r, &f, &t.union(&more_t), 0);
            prop_assert!(got.is_subset(&base));

            // A lower threshold never shrinks it.
            let low = PrefetchConfig {
                threshold_percent: c.threshold_percent.saturating_sub(lower).max(1),
                ..c
            };
            let got = TreePrefetcher::new(low).unwrap().prefetch(&r, &f, &t, 0);
            prop_assert!(base.is_subset(&got));
        }

        #[test]
        fn block_mask_matches_a_bool_array(
            ops in prop::collection::vec((0u8..4, 0..BLOCK_PAGES, 0usize..200), 0..40),
        ) {
            let mut m = BlockMask::new();
            let mut model = [false; BLOCK_PAGES];
            for (op, at, len) in ops {
                let r = at..(at + len).min(BLOCK_PAGES);
                match op {
                    0 => { m.set(at); model[at] = true; }
                    1 => { m.clear(at); model[at] = false; }
                    2 => { m.set_range(r.clone()); model[r].iter_mut().for_each(|x| *x = true); }
                    _ => { m.clear_range(r.clone()); model[r].iter_mut().for_each(|x| *x = false); }
                }
                let pages: Vec<usize> = (0..BLOCK_PAGES).filter(|&p| model[p]).collect();
                prop_assert_eq!(m.iter().collect::<Vec<_>>(), pages.clone());
                prop_assert_eq!(m.count() as usize, pages.len());
                let from_runs: Vec<usize> = m.runs().flatten().collect();
                prop_assert_eq!(from_runs, pages);
                for w in m.runs().collect::<Vec<_>>().windows(2) {
                    prop_assert!(w[0].end < w[1].start, "runs touch: {:?}", w);
                }
                let q = at / 2..(at / 2 + len).min(BLOCK_PAGES);
                let n = model[q.clone()].iter().filter(|&&x| x).count();
                prop_assert_eq!(m.count_range(q.clone()) as usize, n);
                prop_assert_eq!(m.any_in(q), n > 0);
            }
        }
    }

    // ---- StreamDetector -----------------------------------------------------------------------

    fn detector(config: StreamConfig) -> StreamDetector {
        StreamDetector::new(config).unwrap()
    }

    /// The addresses of pages `[first, first + n)`.
    fn batch(first: u64, n: u64) -> Vec<VirtAddr> {
        (first..first + n)
            .map(|p| VirtAddr(p * PAGE_SIZE))
            .collect()
    }

    /// The ranges as `(first page, one past the last page)`.
    fn pages_of(ranges: &[PageRange]) -> Vec<(u64, u64)> {
        ranges
            .iter()
            .map(|r| (r.start().vpn(), r.end().vpn()))
            .collect()
    }

    fn observe(d: &mut StreamDetector, faults: &[VirtAddr]) -> Vec<(u64, u64)> {
        let got = d.observe(faults);
        d.check_invariants().unwrap();
        pages_of(&got)
    }

    #[test]
    fn default_stream_config_is_valid() {
        let c = StreamConfig::default();
        assert_eq!(
            (
                c.window_pages,
                c.confirm,
                c.depth_pages,
                c.max_depth_pages,
                c.max_streams
            ),
            (64, 2, 16, 512, 8)
        );
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn bad_stream_configs_are_typed_errors() {
        let ok = StreamConfig::default();
        for pages in [0, MAX_STREAM_PAGES + 1] {
            let c = StreamConfig {
                window_pages: pages,
                ..ok
            };
            assert_eq!(
                StreamDetector::new(c).unwrap_err(),
                PrefetchError::InvalidWindow { pages }
            );
        }
        let c = StreamConfig { confirm: 0, ..ok };
        assert_eq!(c.validate(), Err(PrefetchError::InvalidConfirm));
        for (depth_pages, max_depth_pages) in [(0, 512), (64, 32), (16, MAX_STREAM_PAGES + 1)] {
            let c = StreamConfig {
                depth_pages,
                max_depth_pages,
                ..ok
            };
            assert_eq!(
                c.validate(),
                Err(PrefetchError::InvalidDepth {
                    depth_pages,
                    max_depth_pages
                })
            );
        }
        for streams in [0, MAX_STREAMS + 1] {
            let c = StreamConfig {
                max_streams: streams,
                ..ok
            };
            assert_eq!(
                c.validate(),
                Err(PrefetchError::InvalidMaxStreams { streams })
            );
        }
        let edge = StreamConfig {
            window_pages: MAX_STREAM_PAGES,
            confirm: 1,
            depth_pages: MAX_STREAM_PAGES,
            max_depth_pages: MAX_STREAM_PAGES,
            max_streams: MAX_STREAMS,
        };
        assert_eq!(edge.validate(), Ok(()));
    }

    #[test]
    fn forward_stream_is_confirmed_then_depth_doubles_to_max() {
        let mut d = detector(StreamConfig::default());
        let base = 0x7f00_0000u64; // a page number
                                   // Batches of 16 contiguous pages; each starts at the first page not yet covered, as a
                                   // real stream does once prefetched pages stop faulting.
        let mut next = base;
        let mut depths = Vec::new();
        for i in 0..9 {
            let got = observe(&mut d, &batch(next, 16));
            let hi = next + 15;
            if i < 2 {
                assert!(got.is_empty(), "batch {i} prefetched {got:?}");
                next = hi + 1;
                continue;
            }
            assert_eq!(got.len(), 1, "batch {i}: {got:?}");
            let (start, end) = got[0];
            assert_eq!(start, hi + 1, "batch {i} starts right after the faults");
            depths.push(end - hi - 1);
            next = end;
        }
        assert_eq!(depths, vec![16, 32, 64, 128, 256, 512, 512]);
    }

    #[test]
    fn a_stream_from_an_objects_first_page_reads_ahead_at_once() {
        let mut d = detector(StreamConfig::default());
        let base = 0x7f00_0000u64;
        let head = VirtAddr(base * PAGE_SIZE);
        // The first batch of a walk from the head prefetches the first depth at once, and the
        // next advance doubles it.
        let got = d.observe_from(&batch(base, 16), &[head]);
        d.check_invariants().unwrap();
        assert_eq!(pages_of(&got), vec![(base + 16, base + 32)]);
        let got = d.observe_from(&batch(base + 32, 16), &[head]);
        d.check_invariants().unwrap();
        assert_eq!(pages_of(&got), vec![(base + 48, base + 80)]);
        // A walk from inside an object, or one beginning a page past a head, waits for its
        // confirmation as before.
        let mut d = detector(StreamConfig::default());
        let other = VirtAddr((base + 1) * PAGE_SIZE);
        for k in 0..2 {
            let got = d.observe_from(&batch(base + 16 * k, 16), &[other]);
            assert!(got.is_empty(), "batch {k} prefetched {got:?}");
        }
        assert_eq!(
            observe(&mut d, &batch(base + 32, 16)),
            vec![(base + 48, base + 64)]
        );
        // A head cluster that lands on a known stream resets it without reading ahead: a walk
        // stepping back to an object's start is not a new object.
        let mut d = detector(StreamConfig::default());
        assert!(observe(&mut d, &batch(base + 8, 8)).is_empty());
        let got = d.observe_from(&batch(base, 4), &[head]);
        assert!(got.is_empty(), "{got:?}");
        d.check_invariants().unwrap();
    }

    #[test]
    fn stream_faulting_inside_its_prefetch_is_not_handed_pages_twice() {
        // The prefetch has not landed yet: the stream keeps faulting contiguously.
        let mut d = detector(StreamConfig::default());
        let mut handed: Vec<(u64, u64)> = Vec::new();
        for i in 0..12 {
            let got = observe(&mut d, &batch(1000 + 16 * i, 16));
            handed.extend(got);
        }
        // 3rd batch (pages 1032..1048): 1048..1064; 4th (..1064): up to 1064+32; ...
        assert_eq!(handed.first(), Some(&(1048, 1064)));
        for w in handed.windows(2) {
            assert_eq!(
                w[0].1, w[1].0,
                "ranges are contiguous, never repeated: {handed:?}"
            );
        }
        // The 12th batch ends at page 1191; the depth reached 512.
        assert_eq!(handed.last().unwrap().1, 1192 + 512);
    }

    #[test]
    fn confirm_one_prefetches_on_the_second_batch() {
        let mut d = detector(StreamConfig {
            confirm: 1,
            ..StreamConfig::default()
        });
        assert!(observe(&mut d, &batch(0, 4)).is_empty());
        assert_eq!(observe(&mut d, &batch(4, 4)), vec![(8, 24)]);
    }

    #[test]
    fn three_interleaved_streams_are_each_detected() {
        // c[i] = a[i] + b[i]: each batch faults the next 8 pages of all three arrays.
        let mut d = detector(StreamConfig::default());
        let bases = [0x10_0000u64, 0x20_0000, 0x30_0000];
        let mut handed = [0u64; 3]; // end of what each stream was handed so far
        for i in 0..8u64 {
            let mut faults = Vec::new();
            for k in 0..8 {
                // Interleaved as warps would fault them, not page aligned.
                for b in bases {
                    faults.push(VirtAddr((b + 8 * i + k) * PAGE_SIZE + 24));
                }
            }
            let got = observe(&mut d, &faults);
            if i < 2 {
                assert!(got.is_empty(), "batch {i}: {got:?}");
                continue;
            }
            assert_eq!(got.len(), 3, "batch {i}: {got:?}");
            for ((start, end), (b, prev)) in got.iter().zip(bases.iter().zip(handed.iter_mut())) {
                let hi = b + 8 * i + 7;
                if i == 2 {
                    assert_eq!((*start, *end), (hi + 1, hi + 17));
                } else {
                    assert_eq!(*start, *prev, "batch {i}: continues where it stopped");
                }
                assert!(*end <= hi + 1 + 512);
                *prev = *end;
            }
        }
        assert_eq!(d.stream_count(), 3);
    }

    #[test]
    fn random_pattern_never_prefetches() {
        let mut d = detector(StreamConfig::default());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let faults: Vec<VirtAddr> = (0..8)
                .map(|_| VirtAddr((next() % (1 << 20)) * PAGE_SIZE))
                .collect();
            let got = observe(&mut d, &faults);
            assert!(got.is_empty(), "{got:?}");
        }
    }

    #[test]
    fn backward_stream_never_prefetches() {
        let mut d = detector(StreamConfig::default());
        for i in 0..20u64 {
            let got = observe(&mut d, &batch(10_000 - 16 * i, 16));
            assert!(got.is_empty(), "batch {i}: {got:?}");
        }
        assert_eq!(
            d.stream_count(),
            1,
            "each backward step resets the same stream"
        );
    }

    #[test]
    fn backward_step_resets_a_confirmed_stream() {
        let mut d = detector(StreamConfig::default());
        for i in 0..4 {
            observe(&mut d, &batch(100 + 16 * i, 16));
        }
        // The stream is at page 163, depth 32. Stepping back a little resets it in place.
        assert!(observe(&mut d, &batch(120, 8)).is_empty());
        assert_eq!(d.stream_count(), 1);
        // It must be confirmed again, and starts over at depth 16.
        assert!(observe(&mut d, &batch(128, 8)).is_empty());
        assert_eq!(observe(&mut d, &batch(136, 8)), vec![(144, 160)]);
    }

    #[test]
    fn jump_restarts_confirmation() {
        let mut d = detector(StreamConfig::default());
        for i in 0..3 {
            observe(&mut d, &batch(16 * i, 16));
        }
        // Jump far ahead: nothing, and the new position needs `confirm` advances again.
        assert!(observe(&mut d, &batch(1 << 30, 16)).is_empty());
        assert!(observe(&mut d, &batch((1 << 30) + 16, 16)).is_empty());
        assert_eq!(
            observe(&mut d, &batch((1 << 30) + 32, 16)),
            vec![((1 << 30) + 48, (1 << 30) + 64)]
        );
    }

    #[test]
    fn gap_within_the_window_still_advances() {
        let mut d = detector(StreamConfig::default());
        observe(&mut d, &batch(0, 4));
        observe(&mut d, &batch(4 + 63, 4)); // lowest at hi + 64
        assert_eq!(observe(&mut d, &batch(70 + 64, 1)), vec![(135, 151)]);
        let mut d = detector(StreamConfig::default());
        observe(&mut d, &batch(0, 4));
        observe(&mut d, &batch(3 + 65, 4)); // hi + 65: a new stream
        assert!(observe(&mut d, &batch(71 + 1, 1)).is_empty());
    }

    #[test]
    fn prefetch_skips_other_streams_faults() {
        // Two streams close together: the lower one's prefetch would cover the upper's faults.
        let mut d = detector(StreamConfig {
            window_pages: 4,
            ..StreamConfig::default()
        });
        for i in 0..3u64 {
            let mut faults = batch(1000 + 2 * i, 2);
            faults.extend(batch(1010 + 2 * i, 2));
            let got = observe(&mut d, &faults);
            if i == 2 {
                // Lower: hi 1005 -> 1006..1022; upper: hi 1015 -> 1016..1032, minus 1014, 1015.
                assert_eq!(got, vec![(1006, 1014), (1016, 1032)]);
            }
        }
    }

    #[test]
    fn least_recently_used_stream_is_replaced() {
        let mut d = detector(StreamConfig {
            max_streams: 2,
            confirm: 1,
            ..StreamConfig::default()
        });
        let (a, b, c) = (0u64, 1 << 20, 2 << 20);
        observe(&mut d, &batch(a, 4));
        observe(&mut d, &batch(b, 4));
        observe(&mut d, &batch(a + 4, 4)); // a advances and is the most recent
        observe(&mut d, &batch(c, 4)); // replaces b
        assert_eq!(d.stream_count(), 2);
        assert_eq!(observe(&mut d, &batch(c + 4, 4)), vec![(c + 8, c + 24)]);
        assert!(!observe(&mut d, &batch(a + 8, 4)).is_empty(), "a survived");
        assert!(
            observe(&mut d, &batch(b + 4, 4)).is_empty(),
            "b was forgotten"
        );
    }

    #[test]
    fn reset_forgets_every_stream() {
        let mut d = detector(StreamConfig::default());
        for i in 0..3 {
            observe(&mut d, &batch(16 * i, 16));
        }
        d.reset();
        assert_eq!(d.stream_count(), 0);
        assert!(observe(&mut d, &batch(48, 16)).is_empty());
        assert!(observe(&mut d, &batch(64, 16)).is_empty());
        assert!(!observe(&mut d, &batch(80, 16)).is_empty());
    }

    #[test]
    fn empty_batches_and_unaligned_duplicates_are_handled() {
        let mut d = detector(StreamConfig::default());
        assert!(observe(&mut d, &[]).is_empty());
        let dup = vec![VirtAddr(0x1001), VirtAddr(0x1fff), VirtAddr(0x1000)];
        assert!(observe(&mut d, &dup).is_empty());
        assert!(observe(&mut d, &[VirtAddr(0x2abc)]).is_empty());
        assert_eq!(observe(&mut d, &[VirtAddr(0x3000)]), vec![(4, 20)]);
    }

    #[test]
    fn stream_at_the_top_of_the_address_space_is_clamped() {
        let mut d = detector(StreamConfig::default());
        let top = VPN_END - 20;
        observe(&mut d, &batch(top, 4));
        observe(&mut d, &batch(top + 4, 4));
        let got = observe(&mut d, &batch(top + 8, 4));
        assert_eq!(got, vec![(top + 12, VPN_END)]);
        assert!(observe(&mut d, &batch(top + 12, 4)).is_empty());
        assert!(observe(&mut d, &batch(VPN_END - 1, 1)).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn stream_output_is_sorted_disjoint_and_avoids_faults(
            window in 1u64..100,
            confirm in 1u32..4,
            depth in 1u64..64,
            extra in 0u64..256,
            streams in 1usize..6,
            batches in prop::collection::vec(
                prop::collection::vec((0u64..4, 0u64..400), 0..24), 1..30),
        ) {
            let mut d = StreamDetector::new(StreamConfig {
                window_pages: window,
                confirm,
                depth_pages: depth,
                max_depth_pages: depth + extra,
                max_streams: streams,
            }).unwrap();
            for faults in batches {
                // A few regions far apart, pages within them random.
                let addrs: Vec<VirtAddr> = faults
                    .iter()
                    .map(|&(region, page)| VirtAddr(((region << 30) + page) * PAGE_SIZE))
                    .collect();
                let got = d.observe(&addrs);
                d.check_invariants().map_err(TestCaseError::fail)?;
                for w in got.windows(2) {
                    prop_assert!(w[0].end() < w[1].start(), "{:?}", got);
                }
                let total: u64 = got.iter().map(|r| r.npages()).sum();
                prop_assert!(total <= addrs.len() as u64 * (depth + extra));
                for r in &got {
                    for a in &addrs {
                        prop_assert!(!r.contains(a.page_down()), "{:?} holds fault {:?}", r, a);
                    }
                }
            }
        }
    }
}
