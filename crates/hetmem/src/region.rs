//! Managed regions: the VMAs hetmem tracks, each with its per-page state table.
//!
//! A region is memory hetmem mapped itself ([`RegionKind::Mapped`]) or existing anonymous memory
//! the program registered ([`RegionKind::Registered`]). Private regions can migrate to devices;
//! shared ones are tracked for invalidation only (the kernel does not migrate shared pages
//! either: hmm-tests' `migrate_shared`).

use hetmem_core::{page_state::PageStates, PageRange, VirtAddr};

/// How a region came to be managed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// hetmem mapped it; `unmap` releases it.
    Mapped,
    /// The program registered existing memory; `unregister` releases it.
    Registered,
}

/// One managed region.
#[derive(Debug)]
pub struct Region {
    range: PageRange,
    kind: RegionKind,
    shared: bool,
    /// Per-page state.
    pub states: PageStates,
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
            states,
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
    /// Index of the page holding `addr` (which must be inside).
    pub fn index(&self, addr: VirtAddr) -> usize {
        self.range.index_of(addr) as usize
    }
    /// A new region covering `sub` (inside this one) with the same page states: used when part of
    /// a region is unmapped or moved.
    pub fn carve(&self, sub: PageRange, at: VirtAddr) -> Region {
        let first = self.index(sub.start());
        let range = PageRange::new(at.0, sub.len_bytes()).expect("carved range is valid");
        let states = PageStates::new(sub.npages() as usize);
        for k in 0..states.len() {
            states.copy_from(k, &self.states, first + k);
        }
        Region {
            range,
            kind: self.kind,
            shared: self.shared,
            states,
        }
    }
}
