//! Read duplication on the accelerator (UVM's read-mostly): read-only copies of system pages in
//! this device's frames, so that its reads are local while the CPU and other devices keep reading
//! their own copies (the protocol is in `hetmem`'s `dup` module).
//!
//! The copies are this device's, not hetmem's page states': the page's state stays *system*
//! (DUPLICATED), and [`Duplicates`] records which frame holds this device's copy of which page.
//! A copy is mapped read-only, so a store to it faults and the write path collapses the page.
//! Every invalidation that reaches a copy drops it (the leaf, then the TLB shootdown, then the
//! frame goes back to the pool), except `WriteProtect`, which only withdraws writable mappings.
//!
//! Locks: the table lock, then the copies' lock, then the pool's (the notifier callback, the
//! mapping of new copies and the coherence check all take them in that order).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use hetmem_core::{
    device_mmu::{MmuCore, PtePerms, PteTarget},
    link::{Cause, Direction},
    page_state::Location,
    DevPfn, DeviceId, PageRange, VirtAddr, PAGE_SIZE,
};

use super::SimDevice;

/// This device's read-only copies: page address → the frame holding the copy.
#[derive(Debug, Default)]
pub(super) struct Duplicates {
    copies: BTreeMap<u64, DevPfn>,
}

impl Duplicates {
    /// Removes and returns the copies inside `range`.
    pub(super) fn take(&mut self, range: PageRange) -> Vec<(u64, DevPfn)> {
        let keys: Vec<(u64, DevPfn)> = self
            .copies
            .range(range.start().0..range.end().0)
            .map(|(&a, &f)| (a, f))
            .collect();
        for (a, _) in &keys {
            self.copies.remove(a);
        }
        keys
    }

    /// Is there a copy inside `range`?
    pub(super) fn any_in(&self, range: PageRange) -> bool {
        self.copies
            .range(range.start().0..range.end().0)
            .next()
            .is_some()
    }

    /// Is `frame` the copy of the page at `addr`?
    pub(super) fn holds(&self, addr: VirtAddr, frame: DevPfn) -> bool {
        self.copies.get(&addr.0) == Some(&frame)
    }

    /// The frame holding this device's copy of the page at `addr`, if it has one.
    pub(super) fn copy_of(&self, addr: VirtAddr) -> Option<DevPfn> {
        self.copies.get(&addr.0).copied()
    }

    /// The smallest range holding every copy.
    pub(super) fn hull(&self) -> Option<PageRange> {
        let (&lo, _) = self.copies.first_key_value()?;
        let (&hi, _) = self.copies.last_key_value()?;
        PageRange::from_bounds(lo, hi + PAGE_SIZE).ok()
    }

    /// Number of copies.
    pub(super) fn len(&self) -> usize {
        self.copies.len()
    }

    /// Every page with a copy.
    pub(super) fn pages(&self) -> impl Iterator<Item = (VirtAddr, DevPfn)> + '_ {
        self.copies.iter().map(|(&a, &f)| (VirtAddr(a), f))
    }
}

impl SimDevice {
    /// Removes this device's copies inside `range` from the record and unmaps them (inside a
    /// table update); the caller shoots down, then [`SimDevice::free_copies`] the frames.
    pub(super) fn unmap_copies(&self, c: &mut MmuCore, range: PageRange) -> Vec<(u64, DevPfn)> {
        let taken = self.dups.lock().take(range);
        for &(a, _) in &taken {
            let p = PageRange::new(a, PAGE_SIZE).expect("page");
            let _ = c.unmap(p);
        }
        taken
    }

    /// Gives the frames of dropped copies back to the pool (after the shootdown that made them
    /// unreachable).
    pub(super) fn free_copies(&self, taken: &[(u64, DevPfn)]) {
        if taken.is_empty() {
            return;
        }
        self.release_frames(taken.iter().map(|&(_, f)| f));
        self.counters
            .copies_dropped
            .fetch_add(taken.len() as u64, Ordering::Relaxed);
    }

    /// Drops this device's copies inside `range`. Returns how many went.
    pub(super) fn drop_copies(&self, range: PageRange) -> u64 {
        let taken = self.mmu.update(|c| self.unmap_copies(c, range));
        if taken.is_empty() {
            return 0;
        }
        self.mmu.shootdown();
        self.free_copies(&taken);
        taken.len() as u64
    }

    /// Makes read-only copies of the pages of `span` (within one 2 MiB block) in this device's
    /// memory and maps them; pages another device holds come back to system memory first, to be
    /// copied from there. Returns the pages now mapped as copies; the others (on this device
    /// already, shared memory, no free frame, a collapse that kept coming) are for the caller to
    /// map where they are.
    pub(super) fn duplicate_in(&self, span: PageRange) -> Vec<VirtAddr> {
        let Some(sub) = self.sub.lock().clone() else {
            return Vec::new();
        };
        let me = self.mem.id();
        self.pull_back_from_peers(span);
        for _ in 0..4 {
            let seq = sub.read_begin();
            // Pages this device holds a copy of already need nothing.
            let wanted: Vec<VirtAddr> = {
                let dups = self.dups.lock();
                span.pages()
                    .filter(|a| !dups.copies.contains_key(&a.0))
                    .collect()
            };
            let (Some(&first), Some(&last)) = (wanted.first(), wanted.last()) else {
                return Vec::new();
            };
            let mut frames: Vec<DevPfn> = Vec::with_capacity(wanted.len());
            {
                let mut pool = self.mem.pool().lock();
                for _ in 0..wanted.len() {
                    match pool.alloc_page() {
                        Ok(f) => frames.push(f),
                        Err(_) => break,
                    }
                }
            }
            let mut spare = frames.iter().copied();
            let mut copies: Vec<(VirtAddr, DevPfn)> = Vec::new();
            let range = PageRange::from_bounds(first.0, last.0 + PAGE_SIZE).expect("pages of span");
            let arena = self.mem.arena();
            let done = self
                .mm
                .read_duplicate(range, Some(self.mem.owner()), |a, bytes| {
                    if wanted.binary_search(&a).is_err() {
                        return false;
                    }
                    let Some(f) = spare.next() else { return false };
                    let ok = arena
                        .write(hetmem::DeviceMemory::frame_offset(f), bytes)
                        .is_ok();
                    if ok {
                        copies.push((a, f));
                    }
                    ok
                });
            let used: Vec<DevPfn> = copies.iter().map(|&(_, f)| f).collect();
            self.release_frames(frames.iter().copied().filter(|f| !used.contains(f)));
            if done.is_err() || copies.is_empty() {
                return Vec::new();
            }
            let mapped = self.mmu.update(|c| {
                if sub.read_retry(seq) {
                    return None;
                }
                let mut dups = self.dups.lock();
                let mut redundant = Vec::new();
                for &(a, f) in &copies {
                    // Another duplication of the same page on this device (the fault service
                    // and a prefetch's) mapped its copy meanwhile, which the sequence does not
                    // tell (this device's own write protection does not move it): that one
                    // stays, and this frame, never reachable, goes back.
                    if dups.copies.contains_key(&a.0) {
                        redundant.push(f);
                        continue;
                    }
                    let p = PageRange::new(a.0, PAGE_SIZE).expect("page");
                    if c.map_pages(p, &[PteTarget::Local(f)], PtePerms::READ)
                        .is_err()
                    {
                        return Some(Err(a));
                    }
                    dups.copies.insert(a.0, f);
                }
                Some(Ok(redundant))
            });
            match mapped {
                Some(Ok(redundant)) => {
                    self.release_frames(redundant.iter().copied());
                    copies.retain(|(_, f)| !redundant.contains(f));
                    // Mapping over remote leaves queued their invalidations: send them before
                    // the replay.
                    self.mmu.shootdown();
                    let n = copies.len() as u64;
                    self.counters
                        .pages_duplicated
                        .fetch_add(n, Ordering::Relaxed);
                    let cost = self
                        .config
                        .link
                        .transfer(Direction::HostToDevice, n * PAGE_SIZE);
                    self.clock.charge(Cause::MigrateToDevice, cost);
                    tracing::debug!(
                        dev = me.0,
                        trigger = hetmem::migrate::current_trigger().name(),
                        start = %span.start(),
                        pages = n,
                        modelled_ns = cost.as_nanos(),
                        "read duplication"
                    );
                    return copies.into_iter().map(|(a, _)| a).collect();
                }
                Some(Err(a)) => {
                    // Outside the table's width: cannot happen for a span the service took.
                    tracing::error!(%a, "mapping a read copy failed");
                    let taken = self.mmu.update(|c| self.unmap_copies(c, span));
                    self.mmu.shootdown();
                    self.free_copies(&taken);
                    self.release_frames(
                        used.iter()
                            .copied()
                            .filter(|f| !taken.iter().any(|(_, g)| g == f)),
                    );
                    return Vec::new();
                }
                None => {
                    // A collapse (or another invalidation) came between the copy and the map.
                    self.release_frames(used.iter().copied());
                }
            }
        }
        Vec::new()
    }

    /// Gives frames back to the pool: copies' frames after their shootdown, or frames that never
    /// became reachable.
    fn release_frames(&self, frames: impl IntoIterator<Item = DevPfn>) {
        // A copy's frame holds its page's bytes: scrubbed like any frame a migration frees, or a
        // later zero-fill migration into it would hand the device those bytes for zeros.
        let frames: Vec<DevPfn> = frames.into_iter().collect();
        for &f in &frames {
            hetmem::migrate::scrub_frames(self.mm, &self.mem, f, 1);
        }
        let mut pool = self.mem.pool().lock();
        for f in frames {
            if let Err(e) = pool.free_page(f) {
                tracing::error!(frame = f.0, error = %e, "freeing a read copy's frame failed");
            }
        }
    }

    /// Brings the pages of `span` that other devices hold back to system memory.
    fn pull_back_from_peers(&self, span: PageRange) {
        let mut peers: Vec<DeviceId> = Vec::new();
        for region in self.mm.regions_in(span) {
            let Some(sub) = region.range().intersect(&span) else {
                continue;
            };
            for a in sub.pages() {
                if let Location::Device { dev, .. } = region.states.get(region.index(a)).location {
                    if dev != self.mem.id() && !peers.contains(&dev) {
                        peers.push(dev);
                    }
                }
            }
        }
        for peer in peers {
            if let Err(e) = self.mm.evict_range(span, Some(peer)) {
                tracing::debug!(peer = peer.0, error = %e, "bringing pages back for read copies");
            }
        }
    }

    /// DESIGN.md invariant 1 for copies: each is mapped read-only at its frame, the frame is
    /// allocated, and the page is a duplicated system page. Called under the table lock.
    pub(super) fn check_copies(
        &self,
        c: &hetmem_core::device_mmu::DevicePageTable,
    ) -> Result<(), String> {
        let dups = self.dups.lock();
        let pool = self.mem.pool().lock();
        for (a, f) in dups.pages() {
            if !pool.is_allocated(f) {
                return Err(format!("the copy of {a} names free frame {f:?}"));
            }
            match c.lookup(a) {
                Some(tr) if tr.target(a) == Some(PteTarget::Local(f)) => {
                    if tr.perms.contains(PtePerms::WRITE) {
                        return Err(format!("the copy of {a} is mapped writable"));
                    }
                }
                other => return Err(format!("the copy of {a} is mapped as {other:?}")),
            }
            let Some(region) = self.mm.region_of(a) else {
                return Err(format!("a copy of {a}, outside managed memory"));
            };
            let st = region.states.get(region.index(a));
            if st.location != Location::System || !st.duplicated {
                return Err(format!("a copy of {a}, whose page is {st:?}"));
            }
        }
        Ok(())
    }
}
