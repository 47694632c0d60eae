//! Managed regions: the VMAs hetmem tracks, each with its per-page state table.
//!
//! A region is memory hetmem mapped itself ([`RegionKind::Mapped`]) or existing anonymous memory
//! the program registered ([`RegionKind::Registered`]). Private regions can migrate to devices;
//! shared ones are tracked for invalidation only (the kernel does not migrate shared pages
//! either: hmm-tests' `migrate_shared`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hetmem_core::{page_state::PageStates, PageRange, VirtAddr};

/// How a region came to be managed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// hetmem mapped it; `unmap` releases it.
    Mapped,
    /// The program registered existing memory; `unregister` releases it.
    Registered,
}

/// One managed region: a range and its window onto a page-state table.
///
/// When part of a region is unmapped or moved, the pieces that remain (and the moved part) are
/// new regions over the *same* table: a thread that looked the old region up and holds a page
/// lock keeps working on the very state word the new regions see, so splitting never copies a
/// state that is changing under a lock.
#[derive(Debug)]
pub struct Region {
    range: PageRange,
    kind: RegionKind,
    shared: bool,
    /// Index in `states` of the region's first page.
    base: usize,
    /// Per-page state (shared with the regions split from the same original).
    pub states: Arc<PageStates>,
    /// Being released (unregistered): nothing may move into a device or be copied to one any
    /// more, so that what the release brings home stays home.
    closing: AtomicBool,
}

impl Region {
    /// A region of system pages, each with protection `prot` (bits: 1 read, 2 write, 4 exec).
    pub fn new(range: PageRange, kind: RegionKind, shared: bool, prot: u32) -> Self {
        let states = PageStates::new(range.npages() as usize);
        for i in 0..states.len() {
            states.set_prot(i, prot);
        }
        Region {
            range,
            kind,
            shared,
            base: 0,
            states: Arc::new(states),
            closing: AtomicBool::new(false),
        }
    }

    /// The pages it covers.
    pub fn range(&self) -> PageRange {
        self.range
    }
    /// Mapped or registered.
    pub fn kind(&self) -> RegionKind {
        self.kind
    }
    /// MAP_SHARED memory (never migrates).
    pub fn is_shared(&self) -> bool {
        self.shared
    }
    /// Is it being released? Checked with a page's lock held: a migration or copy that saw
    /// `false` holds a lock the release waits for, one that starts later sees `true`.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }
    /// A release that failed: the region stays managed and open.
    pub(crate) fn reopen(&self) {
        self.closing.store(false, Ordering::SeqCst);
    }
    /// Index in [`Region::states`] of the page holding `addr` (which must be inside).
    pub fn index(&self, addr: VirtAddr) -> usize {
        self.base + self.range.index_of(addr) as usize
    }
    /// The region covering `sub` (inside this one) at address `at`, over the same page states:
    /// what remains after part of a region is unmapped, or what an mremap moved.
    pub fn carve(&self, sub: PageRange, at: VirtAddr) -> Region {
        Region {
            range: PageRange::new(at.0, sub.len_bytes()).expect("carved range is valid"),
            kind: self.kind,
            shared: self.shared,
            base: self.index(sub.start()),
            states: Arc::clone(&self.states),
            closing: AtomicBool::new(self.is_closing()),
        }
    }

    /// A region covering `sub` (inside this one) with fresh states: system pages with the
    /// protection the old ones had (the old range of an MREMAP_DONTUNMAP, mapped and empty).
    pub fn fresh(&self, sub: PageRange) -> Region {
        let r = Region::new(sub, self.kind, self.shared, 0);
        for a in sub.pages() {
            r.states
                .set_prot(r.index(a), self.states.prot(self.index(a)));
        }
        r
    }
}
