//! The migration engine: `migrate_vma_setup` → `migrate_vma_pages` → `migrate_vma_finalize`
//! (hmm.rst "Migration to and from device memory"), over this process's real memory.
//!
//! ```text
//!   MigrateVma::setup(mm, args)   collect: lock pages, classify by SELECT_* and owner, invalidate
//!         │                       other mirrors (Migrate event, owner = the migrating device; the
//!         │                       invalidation stays active until finalize, so no mirror can map
//!         │                       a page mid-flight)
//!   driver.alloc_and_copy(...)    destinations chosen (device frames, or system)
//!   driver.copy_peer(runs)        device → device runs copied, or submitted (a fence)
//!         │
//!   .pages()                      commit: the data moves page by page (UFFDIO_MOVE, zero-copy;
//!         │                       a copy where MOVE cannot take the page); a page that cannot move
//!         │                       keeps its source and loses MIGRATE. Device → device pages
//!         │                       commit last, after the wait on their copy's fence
//!   driver.finalize(entries)      the device programs its page table
//!   .finalize()                   unlock; free device frames left behind; end the invalidation
//! ```
//!
//! Dropping a collected migration without committing rolls it back: every page unlocks where it
//! was and destination frames are freed (DESIGN.md invariant 3: commit or roll back page by page).
//!
//! Device to device (private memory of device A to private memory of device B) is seed 003's
//! two-phase commit: the driver submits the copy of every run of contiguous frames
//! ([`MigrateDriver::copy_peer`], a synchronous arena-to-arena copy unless the driver has a copy
//! engine), `pages()` commits the other directions while it runs, then waits on the fence
//! (`svm_migrate_copy_done`), and only then records the pages as B's. Nothing that a copy reads or
//! writes is freed before its fence: a dropped migration waits too. A page whose copy did not
//! complete stays on A, intact (`SkipReason::CopyFailed`), and its frame on B is freed.
//!
//! ```text
//!   A frames  [a0 a1 a2 a3]──copy run──▶[b7 b8 b9 b10]  B frames     state: A,a0..a3 (locked)
//!                             fence ▼
//!   report: request 0 failed at page 2 → pages 0,1 become B,b7/b8; 2,3 stay A,a2/a3;
//!   finalize frees a0,a1 (left A) and b9,b10 (unused); A: account_out(2), B: account_in(2)
//! ```

use std::cell::Cell;
use std::sync::Arc;

use smallvec::SmallVec;

use hetmem_core::{
    migrate::{
        MigrateEntry, MigrateFlags, MigrateSummary, MigrationCounts, PageLoc, PeerRun, SelectFlags,
        SkipReason, Trigger,
    },
    notifier::{InvalidateGuard, NotifierRange, NotifyEvent},
    page_state::{DevicePlacement, Location},
    pool::MemoryKind,
    DevPfn, DeviceId, Owner, PageRange, VirtAddr, PAGE_SIZE,
};
use hetmem_sys::{pagemap::PageCategory, uffd::UffdError};

use crate::{
    device::{DeviceMemory, MigrateDriver, PeerCopy},
    error::MigrateError,
    mm::{prot_from_bits, AddressSpace, CpuFaultBackend},
    os,
    region::Region,
};

/// Per-page bookkeeping of a migration, inline up to `N` pages: a CPU fault migrates one page
/// (or one 2 MiB block), and its handler should not pay an allocation per vector.
type PerPage<T, const N: usize> = SmallVec<[T; N]>;
/// Pages of [`MigrateVma::entries`] kept inline (a CPU fault's single page).
const INLINE_ENTRIES: usize = 1;
/// Pages of the per-page flags kept inline (they cost a byte each).
const INLINE_FLAGS: usize = 16;

/// What to migrate.
#[derive(Clone, Copy, Debug)]
pub struct MigrateArgs {
    /// The pages (must lie inside one managed region).
    pub range: PageRange,
    /// Which source pages to collect.
    pub select: SelectFlags,
    /// The migrating device's owner cookie (selects its device pages; tags the invalidation).
    pub owner: Owner,
    /// The page a CPU fault is waiting on, if this migration serves one.
    pub fault_page: Option<VirtAddr>,
}

/// A collected migration (after `migrate_vma_setup`).
#[derive(Debug)]
pub struct MigrateVma<'a> {
    mm: &'a AddressSpace,
    region: RegionRef<'a>,
    args: MigrateArgs,
    entries: PerPage<MigrateEntry, INLINE_ENTRIES>,
    compound: PerPage<bool, INLINE_FLAGS>,
    locked: PerPage<bool, INLINE_FLAGS>,
    /// Source frames that UFFDIO_MOVE emptied: nothing left to discard when they are freed.
    vacated: PerPage<bool, INLINE_FLAGS>,
    committed: bool,
    /// The device-to-device copy of this migration, between `alloc_and_copy` and its commit.
    peer: Option<PeerInFlight>,
    /// The memories of the devices this migration looked up (`device_mem`), for the steps after
    /// the commit (`device_mem_seen`).
    mems: SmallVec<[(DeviceId, Arc<DeviceMemory>); 2]>,
    /// The memory of the device that runs this migration as its caller passed it (a CPU fault's
    /// `migrate_to_ram`), kept only when setup found it to be the device table's entry for its id
    /// with the pages locked: the commit of its pages to system memory, the counting and the
    /// frees use it without looking the device up again (see [`MigrateVma::setup_in`]).
    home: Option<&'a DeviceMemory>,
    guard: Option<InvalidateGuard<'a>>,
    /// Held for reading until the migration ends: `fork()` waits for it (see `fork`).
    _fork_gate: Option<parking_lot::RwLockReadGuard<'a, ()>>,
}

/// The region a migration works in: looked up by the migration itself, or borrowed from a caller
/// that looked it up already (the CPU-fault path), which saves a reference count taken and
/// dropped per fault (two locked instructions).
#[derive(Debug)]
enum RegionRef<'a> {
    Owned(Arc<Region>),
    Borrowed(&'a Region),
}

impl std::ops::Deref for RegionRef<'_> {
    type Target = Region;
    fn deref(&self) -> &Region {
        match self {
            RegionRef::Owned(r) => r,
            RegionRef::Borrowed(r) => r,
        }
    }
}

/// A committed migration (after `migrate_vma_pages`).
#[derive(Debug)]
pub struct Committed<'a>(MigrateVma<'a>);

/// A device-to-device copy made or submitted by the driver, with the runs it covers.
#[derive(Debug)]
struct PeerInFlight {
    runs: Vec<PeerRun>,
    copy: PeerCopy,
}

fn wake_unlock(region: &Region, i: usize) {
    if region.states.unlock(i) {
        hetmem_sys::futex::wake(region.states.word(i), u32::MAX);
    }
}

impl<'a> MigrateVma<'a> {
    /// `migrate_vma_setup`: collects and locks the pages of `args.range` that `args.select`
    /// selects. Pages that do not take part are reported with a reason; a range outside managed
    /// memory is an error.
    pub fn setup(mm: &'a AddressSpace, args: MigrateArgs) -> Result<Self, MigrateError> {
        let tag = (args.owner != EVICT_ANY).then_some(args.owner);
        Self::setup_tagged(mm, args, tag, None, None)
    }

    /// [`MigrateVma::setup`] in `region`, which the caller looked up after
    /// [`AddressSpace::sync_events`] (the CPU-fault path, which has it already): neither the
    /// wait nor the lookup is repeated.
    ///
    /// `home` is the memory of the device that migrates (its owner is `args.owner`). When the
    /// device table names it for its id at setup, after the pages are locked, the pages that
    /// leave it for system memory are committed and freed through it, without a second lookup:
    /// it stays the table's entry while any of its pages is locked here, since a device leaves
    /// the table only after all its pages were evicted (`detach_device`) and eviction cannot take
    /// a locked page. (Pages going *to* a device are looked up at their commit, as always: they
    /// are system pages until then, which no eviction waits for.)
    pub(crate) fn setup_in(
        mm: &'a AddressSpace,
        region: &'a Region,
        args: MigrateArgs,
        home: Option<&'a DeviceMemory>,
    ) -> Result<Self, MigrateError> {
        let tag = (args.owner != EVICT_ANY).then_some(args.owner);
        Self::setup_tagged(mm, args, tag, Some(region), home)
    }

    /// [`MigrateVma::setup`] for a migration from the devices of `args.owner` to another
    /// device, whose owner is `to`. The pages are selected by `args.owner` as usual, but the
    /// invalidation is tagged with `to`, the device that causes it: the source device's mirrors
    /// then drop their mappings through their notifier like any other device's (with `setup`,
    /// which tags `args.owner`, the source driver skips its own migration's invalidation and must
    /// tear them down itself). The destination's mirrors skip it; they map none of the pages
    /// collected (another owner's device-private pages are never mapped remotely). When both
    /// devices share one owner, nobody of that owner is told: its driver handles its own, as for
    /// any migration it makes.
    pub fn setup_peer(
        mm: &'a AddressSpace,
        args: MigrateArgs,
        to: Owner,
    ) -> Result<Self, MigrateError> {
        Self::setup_tagged(mm, args, Some(to), None, None)
    }

    fn setup_tagged(
        mm: &'a AddressSpace,
        args: MigrateArgs,
        tag: Option<Owner>,
        region: Option<&'a Region>,
        home: Option<&'a DeviceMemory>,
    ) -> Result<Self, MigrateError> {
        if mm.forked() {
            return Err(MigrateError::ForkedChild);
        }
        let fork_gate = (!crate::fork::forking_thread()).then(|| mm.fork_gate.read_recursive());
        let region = match region {
            Some(r) => Some(RegionRef::Borrowed(r)),
            None => {
                // A discard the program made just before must not land on the pages collected
                // here.
                mm.sync_events();
                mm.region_of(args.range.start()).map(RegionRef::Owned)
            }
        };
        let region = region
            .filter(|r| r.range().contains_range(&args.range))
            .ok_or(MigrateError::NotManaged {
                addr: args.range.start(),
            })?;
        let n = args.range.npages() as usize;
        let first = region.index(args.range.start());
        let mut entries: PerPage<MigrateEntry, INLINE_ENTRIES> =
            smallvec::smallvec![MigrateEntry::skipped(SkipReason::NotSelected); n];
        let mut locked: PerPage<bool, INLINE_FLAGS> = smallvec::smallvec![false; n];
        let mut cats: PerPage<PageCategory, INLINE_FLAGS> =
            smallvec::smallvec![PageCategory::empty(); n];
        let wants_system = args.select.contains(SelectFlags::SYSTEM);
        for (k, l) in locked.iter_mut().enumerate() {
            if region.states.try_lock(first + k) {
                *l = true;
            } else {
                entries[k] = MigrateEntry::skipped(SkipReason::Locked);
            }
        }
        // The CPU's entries are read with the pages locked (the kernel collects under the page
        // table lock): a page that a CPU fault brought back from a device just before was a hole
        // a moment ago, and taking it for one now would zero-fill its destination and drop its
        // bytes.
        // A region being released takes nothing more in: its pages only go home.
        if wants_system && region.is_closing() {
            for (k, _) in locked.iter().enumerate().filter(|(_, &l)| l) {
                wake_unlock(&region, first + k);
            }
            return Err(MigrateError::NotManaged {
                addr: args.range.start(),
            });
        }
        if wants_system {
            let read = mm
                .pagemap
                .read()
                .page_flags(args.range.start().as_usize(), n, &mut cats);
            if read.is_err() {
                for (k, _) in locked.iter().enumerate().filter(|(_, &l)| l) {
                    wake_unlock(&region, first + k);
                }
            }
            read?;
        }
        // /proc/self/maps is read only when system pages are collected (never on the CPU-fault
        // path, which migrates device pages back).
        let vmas = if wants_system {
            mm.vmas(args.range).unwrap_or_default()
        } else {
            Vec::new()
        };
        // The kernel selects a device-private page when its pgmap owner is the caller's: several
        // devices may share one owner (one driver), so every device with it qualifies.
        let (owned, home) = owned_devices(mm, args.owner, home);
        for k in 0..n {
            let i = first + k;
            if !locked[k] {
                continue;
            }
            let st = region.states.get(i);
            let entry = match st.location {
                Location::System if wants_system => {
                    let c = cats[k];
                    let w = vma_write(&vmas, args.range.page(k as u64));
                    if region.is_shared() {
                        MigrateEntry::skipped(if c.contains(PageCategory::PRESENT) {
                            SkipReason::Shared
                        } else {
                            SkipReason::Hole
                        })
                    } else if c.contains(PageCategory::PRESENT)
                        && !c.contains(PageCategory::PFNZERO)
                    {
                        let mut f = MigrateFlags::VALID | MigrateFlags::MIGRATE;
                        if w {
                            f |= MigrateFlags::WRITE;
                        }
                        MigrateEntry {
                            flags: f,
                            src: PageLoc::System,
                            dst: None,
                            skipped: None,
                        }
                    } else if c.contains(PageCategory::SWAPPED) {
                        MigrateEntry::skipped(SkipReason::Pinned)
                    } else {
                        // A hole or the zero page: migrates as zero fill; the entry the CPU gets
                        // back is writable when the mapping is (migrate_vma_insert_page).
                        let mut f = MigrateFlags::MIGRATE;
                        if w {
                            f |= MigrateFlags::WRITE;
                        }
                        MigrateEntry {
                            flags: f,
                            src: PageLoc::Empty,
                            dst: None,
                            skipped: None,
                        }
                    }
                }
                Location::Device {
                    dev,
                    frame,
                    coherent,
                } => {
                    let want = if coherent {
                        SelectFlags::DEVICE_COHERENT
                    } else {
                        SelectFlags::DEVICE_PRIVATE
                    };
                    if args.select.contains(want)
                        && (owned.contains(&dev) || args.owner == EVICT_ANY)
                    {
                        let mut f = MigrateFlags::VALID | MigrateFlags::MIGRATE;
                        if st.write {
                            f |= MigrateFlags::WRITE;
                        }
                        MigrateEntry {
                            flags: f,
                            src: PageLoc::Device { dev, frame },
                            dst: None,
                            skipped: None,
                        }
                    } else {
                        MigrateEntry::skipped(SkipReason::NotSelected)
                    }
                }
                _ => MigrateEntry::skipped(SkipReason::NotSelected),
            };
            if !entry.migrates() {
                wake_unlock(&region, i);
                locked[k] = false;
            }
            entries[k] = entry;
        }
        // 2 MiB blocks collected whole (SELECT_COMPOUND): aligned, fully inside, all migrating,
        // and huge at the source (a THP, a block that moved as one, or an empty PMD).
        let mut compound: PerPage<bool, INLINE_FLAGS> = smallvec::smallvec![false; n];
        if args.select.contains(SelectFlags::COMPOUND) {
            for block in args.range.chunks(hetmem_core::HUGE_PAGE_SIZE) {
                if block.npages() != hetmem_core::addr::PAGES_PER_HUGE
                    || !block.start().0.is_multiple_of(hetmem_core::HUGE_PAGE_SIZE)
                {
                    continue;
                }
                let k0 = args.range.index_of(block.start()) as usize;
                let ks = k0..k0 + block.npages() as usize;
                let all_migrate = ks.clone().all(|k| entries[k].migrates());
                let huge = ks.clone().all(|k| cats[k].contains(PageCategory::HUGE))
                    || ks.clone().all(|k| entries[k].src == PageLoc::Empty)
                    || ks.clone().all(|k| region.states.get(first + k).huge);
                if all_migrate && huge {
                    compound[k0] = true;
                    for k in ks {
                        entries[k].flags |= MigrateFlags::COMPOUND;
                    }
                }
            }
        }
        let any = entries.iter().any(MigrateEntry::migrates);
        let guard = any.then(|| {
            mm.notifiers.invalidate_start(NotifierRange::new(
                args.range.start(),
                args.range.end(),
                NotifyEvent::Migrate,
                tag,
            ))
        });
        // The mprotect backend stops writers now (holes too: a write would populate one after
        // its copy); userfaultfd's MOVE needs no such step.
        if any && mm.backend == CpuFaultBackend::Mprotect {
            for run in runs(&entries, |e| {
                e.migrates() && matches!(e.src, PageLoc::System | PageLoc::Empty)
            }) {
                let r = sub_range(args.range, run.clone());
                let _ = os::protect(r, hetmem_sys::mman::Prot::READ);
            }
        }
        Ok(MigrateVma {
            mm,
            region,
            args,
            entries,
            compound,
            locked,
            vacated: smallvec::smallvec![false; n],
            committed: false,
            peer: None,
            mems: SmallVec::new(),
            home,
            guard,
            _fork_gate: fork_gate,
        })
    }

    /// The range.
    pub fn range(&self) -> PageRange {
        self.args.range
    }
    /// Per-page entries.
    pub fn entries(&self) -> &[MigrateEntry] {
        &self.entries
    }
    /// Per-page entries, for the driver to set destinations.
    pub fn entries_mut(&mut self) -> &mut [MigrateEntry] {
        &mut self.entries
    }
    /// Which entries start a whole 2 MiB block.
    pub fn compound(&self) -> &[bool] {
        &self.compound
    }
    /// Pages still migrating (`cpages`).
    pub fn cpages(&self) -> u64 {
        self.entries.iter().filter(|e| e.migrates()).count() as u64
    }
    /// Lets `driver` choose destinations, then has it copy (or submit the copy of) the pages
    /// that go from one device to another ([`MigrateDriver::copy_peer`]). Call it once.
    pub fn alloc_and_copy(&mut self, driver: &dyn MigrateDriver) {
        driver.alloc_and_copy(self.args.range, &mut self.entries, &self.compound);
        for e in &mut self.entries {
            if e.migrates() && e.dst.is_none() {
                e.skip(SkipReason::NoDestination);
            }
        }
        if self.peer.is_some() {
            // A second call: the first copy stays the one `pages()` commits.
            return;
        }
        let runs = self.peer_runs();
        if !runs.is_empty() {
            let copy = driver.copy_peer(self.mm, &runs);
            self.peer = Some(PeerInFlight { runs, copy });
        }
    }

    /// The device-to-device runs of the entries: pages going from one device's private memory
    /// to a different device's, split where either side's frames stop following each other.
    /// Entries that cannot take this path are dropped here, before any copy: a destination on
    /// no attached device (`NoDestination`), or coherent memory on either side (its data lives
    /// where the CPU maps it, not in an arena: `InstallFailed`).
    fn peer_runs(&mut self) -> Vec<PeerRun> {
        for k in 0..self.entries.len() {
            let e = self.entries[k];
            if !is_peer(&e) {
                continue;
            }
            let (PageLoc::Device { dev: a, .. }, Some(PageLoc::Device { dev: b, .. })) =
                (e.src, e.dst)
            else {
                continue;
            };
            match (self.device_mem(a), self.device_mem(b)) {
                (_, None) => self.entries[k].skip(SkipReason::NoDestination),
                (Some(ma), Some(mb))
                    if ma.kind() == MemoryKind::DevicePrivate
                        && mb.kind() == MemoryKind::DevicePrivate => {}
                _ => self.entries[k].skip(SkipReason::InstallFailed),
            }
        }
        let mut out = Vec::new();
        for run in runs(&self.entries, is_peer) {
            let mut k = run.start;
            while k < run.end {
                let (
                    PageLoc::Device {
                        dev: src_dev,
                        frame: src_frame,
                    },
                    Some(PageLoc::Device {
                        dev: dst_dev,
                        frame: dst_frame,
                    }),
                ) = (self.entries[k].src, self.entries[k].dst)
                else {
                    unreachable!("a peer entry goes from a device frame to a device frame");
                };
                let end = frame_run_end(&self.entries, k, run.end, |e| Some(e.src))
                    .min(frame_run_end(&self.entries, k, run.end, |e| e.dst));
                out.push(PeerRun {
                    first: k,
                    npages: (end - k) as u64,
                    src_dev,
                    src_frame,
                    dst_dev,
                    dst_frame,
                });
                k = end;
            }
        }
        out
    }

    /// `migrate_vma_pages`: moves the data of every entry that still migrates.
    pub fn pages(mut self) -> Committed<'a> {
        self.commit();
        Committed(self)
    }

    /// The work of [`MigrateVma::pages`], in place: [`run_migration`] calls it without moving
    /// the migration (some hundred bytes) into a [`Committed`] and out again.
    fn commit(&mut self) {
        let range = self.args.range;
        // Device → system first (frames leave), then system → device.
        let to_sys = runs(&self.entries, |e| {
            e.migrates()
                && matches!(e.src, PageLoc::Device { .. })
                && e.dst == Some(PageLoc::System)
        });
        for run in to_sys {
            self.commit_to_system(range, run);
        }
        let to_dev = runs(&self.entries, |e| {
            e.migrates()
                && matches!(e.src, PageLoc::System | PageLoc::Empty)
                && matches!(e.dst, Some(PageLoc::Device { .. }))
        });
        for run in to_dev {
            self.commit_to_device(range, run);
        }
        // Device → device last: its copy ran meanwhile; the wait is here.
        self.commit_peer();
        // Anything else that claims to migrate (within one device) is not supported here.
        for k in 0..self.entries.len() {
            let e = self.entries[k];
            if e.migrates() && e.skipped.is_none() && !Self::committed_entry(&e) {
                self.entries[k].skip(SkipReason::InstallFailed);
            }
        }
        self.committed = true;
        self.count_migrations();
    }

    /// The per-page report of the entries as they stand (final once committed).
    fn summary(&self) -> MigrateSummary {
        let e = &self.entries;
        MigrateSummary {
            npages: e.len() as u64,
            collected: e
                .iter()
                .filter(|x| x.skipped.is_none() || x.migrates())
                .count() as u64,
            migrated: e.iter().filter(|x| x.migrates()).count() as u64,
            migrated_valid: e
                .iter()
                .filter(|x| x.migrates() && x.flags.contains(MigrateFlags::VALID))
                .count() as u64,
        }
    }

    /// Counts the committed pages in each device's statistics under the trigger in scope, and
    /// emits the migration's trace event.
    fn count_migrations(&mut self) {
        let trigger = current_trigger();
        let mut per: SmallVec<[(DeviceId, MigrationCounts); 2]> = SmallVec::new();
        let mut bump = |dev: DeviceId, f: fn(&mut MigrationCounts)| {
            let i = match per.iter().position(|(d, _)| *d == dev) {
                Some(i) => i,
                None => {
                    per.push((dev, MigrationCounts::default()));
                    per.len() - 1
                }
            };
            f(&mut per[i].1);
        };
        for e in self.entries.iter().filter(|e| e.migrates()) {
            match (e.src, e.dst) {
                (PageLoc::Device { dev: a, .. }, Some(PageLoc::Device { dev: b, .. })) => {
                    bump(a, |c| c.to_peer += 1);
                    bump(b, |c| c.from_peer += 1);
                }
                (PageLoc::Device { dev, .. }, Some(PageLoc::System)) => {
                    bump(dev, |c| c.to_system += 1)
                }
                (PageLoc::System | PageLoc::Empty, Some(PageLoc::Device { dev, .. })) => {
                    bump(dev, |c| c.from_system += 1)
                }
                _ => {}
            }
        }
        for (dev, pages) in &per {
            self.with_device_mem_seen(*dev, |mem| mem.count_migrations(trigger, pages));
            tracing::debug!(
                trigger = trigger.name(),
                dev = dev.0,
                start = %self.args.range.start(),
                from_system = pages.from_system,
                from_peer = pages.from_peer,
                to_system = pages.to_system,
                to_peer = pages.to_peer,
                "migration"
            );
        }
    }

    fn committed_entry(e: &MigrateEntry) -> bool {
        is_peer(e)
            || matches!(
                (e.src, e.dst),
                (PageLoc::Device { .. }, Some(PageLoc::System))
                    | (
                        PageLoc::System | PageLoc::Empty,
                        Some(PageLoc::Device { .. })
                    )
            )
    }

    /// Commits the device-to-device pages: waits for their copy (seed 003's
    /// `svm_migrate_copy_done`), then records each page whose bytes arrived as the destination
    /// device's. A page whose copy did not complete, whose entry no longer matches the run that
    /// was copied, or that no copy covered, stays on its source device (`CopyFailed`).
    fn commit_peer(&mut self) {
        let Some(PeerInFlight { runs, copy }) = self.peer.take() else {
            // No copy was made: no device-to-device page completed.
            for e in self.entries.iter_mut().filter(|e| is_peer(e)) {
                e.skip(SkipReason::CopyFailed);
            }
            return;
        };
        let first = self.region.index(self.args.range.start());
        let mut done: PerPage<bool, INLINE_FLAGS> = smallvec::smallvec![false; self.entries.len()];
        let copied = copy.wait(&runs);
        for (run, &n) in runs.iter().zip(&copied) {
            let (Some(from), Some(to)) =
                (self.device_mem(run.src_dev), self.device_mem(run.dst_dev))
            else {
                continue;
            };
            let mut moved = 0u64;
            for p in 0..n {
                let k = run.first + p as usize;
                let e = self.entries[k];
                let src = PageLoc::Device {
                    dev: run.src_dev,
                    frame: DevPfn(run.src_frame.0 + p as u32),
                };
                let dst = PageLoc::Device {
                    dev: run.dst_dev,
                    frame: DevPfn(run.dst_frame.0 + p as u32),
                };
                if !e.migrates() || e.src != src || e.dst != Some(dst) {
                    break;
                }
                // As `commit_to_device`: the write bit the source mapping had, and the 2 MiB
                // shape of a block collected whole.
                self.region.states.set_device(
                    first + k,
                    DevicePlacement {
                        dev: run.dst_dev,
                        frame: DevPfn(run.dst_frame.0 + p as u32),
                        write: e.flags.contains(MigrateFlags::WRITE),
                        huge: e.flags.contains(MigrateFlags::COMPOUND),
                        coherent: false,
                        exclusive: false,
                    },
                );
                done[k] = true;
                moved += 1;
            }
            if moved > 0 {
                from.pool().lock().account_out(moved);
                to.pool().lock().account_in(moved);
                self.mm
                    .stats
                    .add(&self.mm.stats.pages_device_to_device, moved);
            }
        }
        for (k, e) in self.entries.iter_mut().enumerate() {
            if is_peer(e) && !done[k] {
                e.skip(SkipReason::CopyFailed);
            }
        }
    }

    /// The memory of device `dev`, looked up now: a commit reaches no device that detached
    /// before it. Remembered for [`MigrateVma::device_mem_seen`].
    fn device_mem(&mut self, dev: DeviceId) -> Option<Arc<DeviceMemory>> {
        let mem = self.mm.device_memory(dev);
        let seen = self.mems.iter().position(|(d, _)| *d == dev);
        match (&mem, seen) {
            (Some(m), Some(i)) => self.mems[i].1 = Arc::clone(m),
            (Some(m), None) => self.mems.push((dev, Arc::clone(m))),
            (None, Some(i)) => {
                self.mems.remove(i);
            }
            (None, None) => {}
        }
        mem
    }

    /// Runs `f` on the memory of device `dev` for the steps after the commit (counting, freeing
    /// frames): the one the last [`MigrateVma::device_mem`] of this migration found, without a
    /// second lookup on the CPU-fault path (nor a reference count taken and dropped); looked up
    /// now when none did. `None` when the device is gone.
    fn with_device_mem_seen<R>(
        &mut self,
        dev: DeviceId,
        f: impl FnOnce(&DeviceMemory) -> R,
    ) -> Option<R> {
        if let Some(home) = self.home.filter(|h| h.id() == dev) {
            return Some(f(home));
        }
        if !self.mems.iter().any(|(d, _)| *d == dev) {
            self.device_mem(dev)?;
        }
        let (_, mem) = self.mems.iter().find(|(d, _)| *d == dev)?;
        Some(f(mem))
    }

    /// Runs `f` on the memory of device `dev`, which pages of this migration leave: the home
    /// memory when it is that device's, else the device table's entry now
    /// ([`MigrateVma::device_mem`]). `None` when the device is gone.
    fn with_source_mem<R>(
        &mut self,
        dev: DeviceId,
        f: impl FnOnce(&DeviceMemory) -> R,
    ) -> Option<R> {
        match self.home.filter(|h| h.id() == dev) {
            Some(home) => Some(f(home)),
            None => self.device_mem(dev).map(|m| f(&m)),
        }
    }

    fn commit_to_device(&mut self, range: PageRange, run: std::ops::Range<usize>) {
        let mm = self.mm;
        let first = self.region.index(range.start());
        // Sub-runs with contiguous frames of one device move with one call.
        let mut k = run.start;
        while k < run.end {
            let Some(PageLoc::Device { dev, frame }) = self.entries[k].dst else {
                k += 1;
                continue;
            };
            let Some(mem) = self.device_mem(dev) else {
                self.entries[k].skip(SkipReason::NoDestination);
                k += 1;
                continue;
            };
            let end = frame_run_end(&self.entries, k, run.end, |e| e.dst);
            let va = range.page(k as u64).as_usize();
            let len = (end - k) * PAGE_SIZE as usize;
            let coherent = mem.kind() == MemoryKind::DeviceCoherent;
            let moved = if coherent {
                // Device-coherent memory is memory the CPU keeps addressing directly (as CXL
                // memory would be): the page stays where the CPU maps it and the device claims it.
                claim_coherent(mm, va, &self.entries[k..end])
            } else {
                move_out(mm, &mem, va, frame, len, &self.entries[k..end])
            };
            for j in k..end {
                let e = &mut self.entries[j];
                if j - k < moved {
                    self.region.states.set_device(
                        first + j,
                        DevicePlacement {
                            dev,
                            frame: DevPfn(frame.0 + (j - k) as u32),
                            write: e.flags.contains(MigrateFlags::WRITE),
                            huge: e.flags.contains(MigrateFlags::COMPOUND),
                            coherent,
                            exclusive: false,
                        },
                    );
                } else {
                    e.skip(SkipReason::Pinned);
                }
            }
            if coherent {
                // A coherent page stays CPU-addressable with the program's protection: undo the
                // write stop of setup (the mprotect backend; no-op for userfaultfd).
                self.restore_prot(k..k + moved);
            }
            if moved > 0 {
                mem.pool().lock().account_in(moved as u64);
                mm.stats.add(&mm.stats.pages_to_device, moved as u64);
            }
            k = end;
        }
    }

    /// Mprotect backend: gives the pages of `run` (entry indices) back the protection the program
    /// asked for, in runs of equal protection.
    fn restore_prot(&self, run: std::ops::Range<usize>) {
        if self.mm.backend != CpuFaultBackend::Mprotect {
            return;
        }
        let first = self.region.index(self.args.range.start());
        let mut k = run.start;
        while k < run.end {
            let bits = self.region.states.prot(first + k);
            let mut end = k + 1;
            while end < run.end && self.region.states.prot(first + end) == bits {
                end += 1;
            }
            let _ = os::protect(sub_range(self.args.range, k..end), prot_from_bits(bits));
            k = end;
        }
    }

    fn commit_to_system(&mut self, range: PageRange, run: std::ops::Range<usize>) {
        let mm = self.mm;
        let first = self.region.index(range.start());
        let mut k = run.start;
        while k < run.end {
            let PageLoc::Device { dev, frame } = self.entries[k].src else {
                k += 1;
                continue;
            };
            let end = frame_run_end(&self.entries, k, run.end, |e| Some(e.src));
            let va = range.page(k as u64).as_usize();
            let prot = prot_from_bits(self.region.states.prot(first + k));
            // The source device: the home memory when it is the one (see `setup_in`), looked
            // up otherwise.
            let moved = self.with_source_mem(dev, |mem| {
                if mem.kind() == MemoryKind::DeviceCoherent {
                    (end - k, 0)
                } else {
                    move_in(mm, mem, va, frame, end - k, prot)
                }
            });
            let Some((moved, vacated)) = moved else {
                self.entries[k].skip(SkipReason::InstallFailed);
                k += 1;
                continue;
            };
            for j in k..end {
                self.vacated[j] = j - k < vacated;
                if j - k < moved {
                    self.region.states.set_system(first + j);
                } else {
                    self.entries[j].skip(SkipReason::InstallFailed);
                }
            }
            // The pool counts them out when their frames are freed (`drop`), under the same
            // lock.
            if moved > 0 {
                mm.stats.add(&mm.stats.pages_to_system, moved as u64);
            }
            k = end;
        }
    }
}

impl Drop for MigrateVma<'_> {
    fn drop(&mut self) {
        // A copy still in flight (a migration dropped between `alloc_and_copy` and `pages`) may
        // still read the source frames and write the destinations: nothing is freed or unlocked
        // before its fence (seed 003 pitfall 1).
        if let Some(PeerInFlight { runs, copy }) = self.peer.take() {
            let _ = copy.wait(&runs);
        }
        let first = self.region.index(self.args.range.start());
        // Mprotect backend: give back access to system pages and holes that were collected (and
        // write-stopped in setup) but did not move, or all of them when nothing was committed.
        // Entries skipped in setup were never touched.
        let stay = |k: usize| {
            let e = &self.entries[k];
            self.locked[k]
                && matches!(e.src, PageLoc::System | PageLoc::Empty)
                && !(self.committed && e.migrates())
        };
        let mut k = 0;
        while k < self.entries.len() {
            if !stay(k) {
                k += 1;
                continue;
            }
            let s = k;
            while k < self.entries.len() && stay(k) {
                k += 1;
            }
            self.restore_prot(s..k);
        }
        // Frames freed: sources that left the device, destinations that were not used. Their
        // bytes are discarded in runs of consecutive frames (one madvise each), except where a
        // MOVE already left a hole. Frames whose page went home are counted out of the pool here
        // (`account_out`), under the lock that frees them (`out`).
        let mut freed: SmallVec<[(DeviceId, DevPfn, bool, bool); 4]> = SmallVec::new();
        for (k, e) in self.entries.iter().enumerate() {
            match (e.migrates() && self.committed, e.src, e.dst) {
                (true, PageLoc::Device { dev, frame }, Some(PageLoc::System)) => {
                    freed.push((dev, frame, !self.vacated[k], true));
                }
                // Left for another device: the bytes were copied, the frame still holds them.
                (true, PageLoc::Device { dev, frame }, Some(PageLoc::Device { .. })) => {
                    freed.push((dev, frame, true, false));
                }
                (false, _, Some(PageLoc::Device { dev, frame })) => {
                    freed.push((dev, frame, true, false))
                }
                _ => {}
            }
        }
        let mm = self.mm;
        let mut k = 0;
        while k < freed.len() {
            let (dev, frame, dirty, out) = freed[k];
            let mut end = k + 1;
            while end < freed.len()
                && freed[end] == (dev, DevPfn(frame.0 + (end - k) as u32), dirty, out)
            {
                end += 1;
            }
            let run = &freed[k..end];
            self.with_device_mem_seen(dev, |mem| {
                if dirty {
                    scrub_frames(mm, mem, frame, run.len());
                }
                // Freed last-first: the pool's free list is a stack, so the next allocation
                // pops them in ascending order again, and a later migration finds contiguous
                // frames (one copy or MOVE per run instead of one per page).
                let mut pool = mem.pool().lock();
                for &(_, f, _, _) in run.iter().rev() {
                    let _ = pool.free_page(f);
                }
                if out {
                    pool.account_out(run.len() as u64);
                }
            });
            k = end;
        }
        for (k, locked) in self.locked.iter().enumerate() {
            if *locked {
                wake_unlock(&self.region, first + k);
            }
        }
        drop(self.guard.take());
    }
}

impl<'a> Committed<'a> {
    /// Final per-page entries: MIGRATE still set means the page moved.
    pub fn entries(&self) -> &[MigrateEntry] {
        &self.0.entries
    }
    /// The range.
    pub fn range(&self) -> PageRange {
        self.0.args.range
    }
    /// `migrate_vma_finalize`: unlocks the pages, frees frames left behind, ends the
    /// invalidation.
    pub fn finalize(self) -> MigrateSummary {
        let summary = self.0.summary();
        drop(self);
        summary
    }
}

/// Readies freed frames for reuse. With userfaultfd a frame must be a hole to receive a MOVE, so
/// its bytes are discarded. The mprotect backend copies every page whole into its frames, so
/// they stay populated, as device memory always is, and the next migration does not pay for
/// faulting them in again. Every frame goes back to the pool through here, whoever wrote it last
/// (a migration, a read copy): under userfaultfd a zero-fill migration trusts a free frame to read
/// as zeros.
pub fn scrub_frames(mm: &AddressSpace, mem: &DeviceMemory, frame: DevPfn, npages: usize) {
    if mm.backend == CpuFaultBackend::Userfaultfd {
        let _ = mem.arena().discard(
            DeviceMemory::frame_offset(frame),
            npages * PAGE_SIZE as usize,
        );
    }
}

/// Is `e` a device-to-device entry still migrating: from a frame of one device to a frame of
/// another?
fn is_peer(e: &MigrateEntry) -> bool {
    e.migrates()
        && matches!(
            (e.src, e.dst),
            (PageLoc::Device { dev: a, .. }, Some(PageLoc::Device { dev: b, .. })) if a != b
        )
}

/// The default device-to-device copy ([`MigrateDriver::copy_peer`]): each run copied now, arena
/// to arena. Returns, per run, the pages copied: all of them, or none when either device is not
/// attached or a range falls outside its memory (checked before anything is written).
pub fn copy_peer_runs(mm: &AddressSpace, runs: &[PeerRun]) -> Vec<u64> {
    runs.iter()
        .map(|run| {
            let (Some(from), Some(to)) = (
                mm.device(run.src_dev).map(|d| Arc::clone(d.memory())),
                mm.device(run.dst_dev).map(|d| Arc::clone(d.memory())),
            ) else {
                return 0;
            };
            let copied = from.copy_bytes_to(
                DeviceMemory::frame_offset(run.src_frame),
                &to,
                DeviceMemory::frame_offset(run.dst_frame),
                run.npages as usize * PAGE_SIZE as usize,
            );
            match copied {
                Ok(()) => run.npages,
                Err(e) => {
                    tracing::warn!(?run, %e, "device-to-device copy failed");
                    0
                }
            }
        })
        .collect()
}

/// Owner cookie meaning "any device" (device-wide eviction).
pub const EVICT_ANY: Owner = Owner(u64::MAX);

/// The devices whose owner is `owner`, and `home` if it is the memory the device table holds for
/// its id (same object) and has that owner: one reading of the table for both.
fn owned_devices<'m>(
    mm: &AddressSpace,
    owner: Owner,
    home: Option<&'m DeviceMemory>,
) -> (SmallVec<[DeviceId; 4]>, Option<&'m DeviceMemory>) {
    let devices = mm.devices.read();
    let owned = devices
        .iter()
        .flatten()
        .filter(|d| d.memory().owner() == owner)
        .map(|d| d.memory().id())
        .collect();
    let home = home.filter(|h| {
        h.owner() == owner
            && devices
                .get(h.id().0 as usize)
                .and_then(Option::as_ref)
                .is_some_and(|d| std::ptr::eq(&**d.memory(), *h))
    });
    (owned, home)
}

/// Is `a` in a writable mapping of `vmas`?
fn vma_write(vmas: &[hetmem_sys::maps::Vma], a: VirtAddr) -> bool {
    vmas.iter()
        .any(|v| v.start as u64 <= a.0 && a.0 < v.end as u64 && v.write)
}

/// End of the run from `k` (before `limit`) whose `loc` frames continue the one at `k` on the
/// same device, frame after frame: such a run moves with one call.
fn frame_run_end(
    entries: &[MigrateEntry],
    k: usize,
    limit: usize,
    loc: impl Fn(&MigrateEntry) -> Option<PageLoc>,
) -> usize {
    let Some(PageLoc::Device { dev, frame }) = loc(&entries[k]) else {
        return k + 1;
    };
    let mut end = k + 1;
    while end < limit
        && loc(&entries[end])
            == Some(PageLoc::Device {
                dev,
                frame: DevPfn(frame.0 + (end - k) as u32),
            })
    {
        end += 1;
    }
    end
}

/// Maximal runs of consecutive entries satisfying `f` (inline up to a few: a CPU fault has one).
fn runs(
    entries: &[MigrateEntry],
    f: impl Fn(&MigrateEntry) -> bool,
) -> SmallVec<[std::ops::Range<usize>; 4]> {
    let mut out = SmallVec::new();
    let mut k = 0;
    while k < entries.len() {
        if f(&entries[k]) {
            let s = k;
            while k < entries.len() && f(&entries[k]) {
                k += 1;
            }
            out.push(s..k);
        } else {
            k += 1;
        }
    }
    out
}

fn sub_range(range: PageRange, run: std::ops::Range<usize>) -> PageRange {
    PageRange::from_pages(range.page(run.start as u64).0, (run.end - run.start) as u64)
        .expect("sub-range of a valid range")
}

/// Claims the pages at `va` for device-coherent memory: they stay where the CPU maps them. A hole
/// migrates as a zeroed page the CPU maps (the kernel's `migrate_vma_insert_page` of a zeroed
/// device-coherent page): under userfaultfd it is filled here, since neither the device nor the
/// kernel's own accesses (`process_vm_readv`) can fault a hole in. The zero page stays: it is a
/// zeroed page the CPU maps already. Returns how many pages (from the start) were claimed.
fn claim_coherent(mm: &AddressSpace, va: usize, entries: &[MigrateEntry]) -> usize {
    let uffd = match (&mm.uffd, mm.backend) {
        (Some(u), CpuFaultBackend::Userfaultfd) => u,
        // Mprotect backend: a hole is an ordinary pte_none that any access populates.
        _ => return entries.len(),
    };
    for (p, e) in entries.iter().enumerate() {
        if e.src != PageLoc::Empty {
            continue;
        }
        let page = va + p * PAGE_SIZE as usize;
        loop {
            match os::uffd_copy(
                uffd,
                page,
                os::ZERO_PAGE.as_ptr() as usize,
                PAGE_SIZE as usize,
            ) {
                Ok(_) => {}
                // Present already (the zero page, or populated meanwhile): the CPU maps it.
                Err(UffdError::Exists) => {}
                Err(UffdError::Again { .. }) => {
                    std::thread::yield_now();
                    continue;
                }
                Err(_) => return p,
            }
            break;
        }
    }
    entries.len()
}

#[allow(clippy::needless_range_loop)] // page index, frame offset and entry advance together
/// Moves `len` bytes of managed memory at `va` into frames starting at `frame`. Returns how many
/// pages (from the start) moved.
fn move_out(
    mm: &AddressSpace,
    mem: &DeviceMemory,
    va: usize,
    frame: DevPfn,
    len: usize,
    entries: &[MigrateEntry],
) -> usize {
    let dst = mem.frame_addr(frame);
    let npages = len / PAGE_SIZE as usize;
    if mm.backend == CpuFaultBackend::Userfaultfd {
        if let Some(uffd) = &mm.arena_uffd {
            let done = move_bytes(uffd, dst, va, len);
            let moved_pages = done / PAGE_SIZE as usize;
            if moved_pages == npages {
                return npages;
            }
            // The rest: copy (pages MOVE refuses: shared after fork, pinned, read-only mapping).
            for p in moved_pages..npages {
                if !copy_out_one(
                    mm,
                    mem,
                    va + p * PAGE_SIZE as usize,
                    DevPfn(frame.0 + p as u32),
                    entries[p].src,
                ) {
                    return p;
                }
                mm.stats.add(&mm.stats.move_fallbacks, 1);
            }
            return npages;
        }
    }
    // Mprotect backend: the run is read-only since setup (writers wait in the fault handler);
    // one kernel copy into the frames (holes read as zeros), then the CPU loses the pages.
    if os::copy_to_frames(dst, va, len).is_err() {
        return 0;
    }
    let run = PageRange::new(va as u64, len as u64).expect("run");
    let _ = os::protect(run, hetmem_sys::mman::Prot::empty());
    let _ = mm.with_self_zap(run, || os::advise(run, hetmem_sys::mman::Advice::DontNeed));
    npages
}

/// Copies one page out to a frame and takes it away from the CPU.
fn copy_out_one(
    mm: &AddressSpace,
    mem: &DeviceMemory,
    va: usize,
    frame: DevPfn,
    src: PageLoc,
) -> bool {
    let page = PageRange::new(va as u64, PAGE_SIZE).expect("page");
    let uffd = if mm.backend == CpuFaultBackend::Userfaultfd {
        mm.uffd.as_ref()
    } else {
        None
    };
    if let Some(u) = uffd {
        // Stop writers while copying (they wait on the page lock in the fault handler). A page
        // taken as empty too: the zero page (a page only ever read) is mapped, so a write to it
        // is the kernel's copy on write, not a missing fault hetmem sees, and would land in a
        // new page the zap below throws away (a lost write, found by the model test with
        // access-counter migrations running beside CPU writes).
        let _ = u.write_protect(va, PAGE_SIZE as usize, true);
    }
    if src == PageLoc::System {
        let mut buf = [0u8; PAGE_SIZE as usize];
        if hetmem_sys::dma::read_user(va, &mut buf).is_err() {
            if let Some(u) = uffd {
                let _ = u.write_protect(va, PAGE_SIZE as usize, false);
            }
            return false;
        }
        if mem
            .arena()
            .write(DeviceMemory::frame_offset(frame), &buf)
            .is_err()
        {
            return false;
        }
    } else if src == PageLoc::Empty
        && mem
            .arena()
            .write(
                DeviceMemory::frame_offset(frame),
                &[0u8; PAGE_SIZE as usize],
            )
            .is_err()
    {
        // A hole migrates as a zeroed page, whatever the frame held (UFFDIO_MOVE refuses a
        // populated destination, which is how this fallback is reached). Found twice: by
        // dup_stress and by the model test (issue 6), a new allocation reading old bytes.
        return false;
    }
    match uffd {
        Some(u) => {
            let _ = mm.with_self_zap(page, || {
                os::advise(page, hetmem_sys::mman::Advice::DontNeed)
            });
            let _ = u.write_protect(va, PAGE_SIZE as usize, false);
        }
        None => {
            let _ = os::protect(page, hetmem_sys::mman::Prot::empty());
            let _ = mm.with_self_zap(page, || {
                os::advise(page, hetmem_sys::mman::Advice::DontNeed)
            });
        }
    }
    true
}

/// UFFDIO_MOVE of `len` bytes from `src` to `dst`, retrying partial progress and transient
/// EBUSY a few times. Returns the bytes moved (from the start); the caller copies the rest.
fn move_bytes(uffd: &hetmem_sys::uffd::Uffd, dst: usize, src: usize, len: usize) -> usize {
    let mut done = 0usize;
    let mut busy = 0;
    while done < len {
        match os::uffd_move(uffd, dst + done, src + done, len - done, true) {
            Ok(n) if n > 0 => done += n,
            Ok(_) => break,
            Err(UffdError::Again { done: n }) if n > 0 => done += n,
            Err(UffdError::Again { .. }) => std::thread::yield_now(),
            // Transient (the page is being faulted or locked by the kernel).
            Err(UffdError::Busy) if busy < 8 => {
                busy += 1;
                std::thread::yield_now();
            }
            Err(_) => break,
        }
    }
    done
}

/// Moves `npages` frames starting at `frame` back to managed memory at `va`. Returns how many
/// pages (from the start) moved, and how many of those left their frame empty (a MOVE, not a
/// copy).
fn move_in(
    mm: &AddressSpace,
    mem: &DeviceMemory,
    va: usize,
    frame: DevPfn,
    npages: usize,
    prot: hetmem_sys::mman::Prot,
) -> (usize, usize) {
    let src = mem.frame_addr(frame);
    let len = npages * PAGE_SIZE as usize;
    if mm.backend == CpuFaultBackend::Userfaultfd {
        if let Some(uffd) = &mm.uffd {
            let mut done = move_bytes(uffd, va, src, len);
            let vacated = done / PAGE_SIZE as usize;
            while done < len {
                let off = DeviceMemory::frame_offset(frame) + done;
                match os::uffd_copy(uffd, va + done, src + done, PAGE_SIZE as usize) {
                    Ok(_) => {}
                    Err(UffdError::Exists) => {
                        // Populated behind our back (a kernel access): overwrite with the device
                        // copy, which is the current data.
                        let mut buf = [0u8; PAGE_SIZE as usize];
                        if mem.arena().read(off, &mut buf).is_err()
                            || os::procmem_write(&mm.procmem.read(), va + done, &buf).is_err()
                        {
                            return (done / PAGE_SIZE as usize, vacated);
                        }
                    }
                    Err(UffdError::Again { .. }) => {
                        std::thread::yield_now();
                        continue;
                    }
                    Err(_) => return (done / PAGE_SIZE as usize, vacated),
                }
                mm.stats.add(&mm.stats.move_fallbacks, 1);
                done += PAGE_SIZE as usize;
            }
            return (npages, vacated);
        }
    }
    // Mprotect backend: fill the pages while they are still PROT_NONE, then open them.
    if os::procmem_fill_from_frames(&mm.procmem.read(), va, src, len).is_err() {
        return (0, 0);
    }
    let range = PageRange::new(va as u64, len as u64).expect("range");
    if os::protect(range, prot).is_err() {
        return (0, 0);
    }
    (npages, 0)
}

/// A driver that sends every collected device page to system memory (eviction, release).
#[derive(Debug)]
pub struct ToSystem;

impl MigrateDriver for ToSystem {
    fn alloc_and_copy(&self, _: PageRange, entries: &mut [MigrateEntry], _: &[bool]) {
        for e in entries.iter_mut().filter(|e| e.migrates()) {
            e.dst = Some(PageLoc::System);
        }
    }
    fn finalize(&self, _: PageRange, _: &[MigrateEntry]) {}
}

thread_local! {
    /// The trigger, and for a CPU fault whether it writes.
    static TRIGGER: Cell<(Trigger, bool)> = const { Cell::new((Trigger::Explicit, false)) };
}

/// The trigger that migrations on this thread are counted under (seed 003's migration trigger):
/// [`Trigger::Explicit`] unless a [`TriggerScope`] says otherwise.
pub fn current_trigger() -> Trigger {
    TRIGGER.with(Cell::get).0
}

/// Whether the CPU fault this thread is handling is a write: false outside a CPU fault (a scope
/// nested in it, an eviction say, included), and when the backend could not tell. Placement
/// policies read it from the callbacks a CPU fault makes (which pages a program writes, rather
/// than reads, between two launches).
pub fn cpu_fault_is_write() -> bool {
    TRIGGER.with(Cell::get) == (Trigger::CpuFault, true)
}

/// Migrations on this thread count under a trigger until the scope ends; scopes nest (an eviction
/// inside a device fault's service counts as eviction, and the fault's own migration after it as
/// the fault's). The trigger rides with the thread rather than each call because migrations start
/// deep below the code that knows why (a placement policy evicting from inside a fault service, a
/// CPU fault through a device's `migrate_to_ram`); every entry point sets it once.
#[derive(Debug)]
#[must_use = "the trigger is restored when the scope is dropped"]
pub struct TriggerScope {
    prev: (Trigger, bool),
    // Restored on the thread it was set on.
    _thread: std::marker::PhantomData<*const ()>,
}

impl TriggerScope {
    /// Counts this thread's migrations under `trigger` until the returned scope is dropped.
    pub fn enter(trigger: Trigger) -> TriggerScope {
        Self::set((trigger, false))
    }

    /// A CPU fault, a write or not ([`cpu_fault_is_write`]).
    pub(crate) fn cpu_fault(write: bool) -> TriggerScope {
        Self::set((Trigger::CpuFault, write))
    }

    fn set(to: (Trigger, bool)) -> TriggerScope {
        TriggerScope {
            prev: TRIGGER.with(|t| t.replace(to)),
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for TriggerScope {
    fn drop(&mut self) {
        TRIGGER.with(|t| t.set(self.prev));
    }
}

/// Runs a whole migration of `args` with `driver`.
pub fn migrate(
    mm: &AddressSpace,
    args: MigrateArgs,
    driver: &dyn MigrateDriver,
) -> Result<(MigrateSummary, Vec<MigrateEntry>), MigrateError> {
    migrate_with(mm, args, driver, <[MigrateEntry]>::to_vec)
}

/// [`migrate`], keeping of the final entries what `keep` takes from them before finalize (the
/// CPU fault path keeps nothing, and copies nothing).
pub(crate) fn migrate_with<T>(
    mm: &AddressSpace,
    args: MigrateArgs,
    driver: &dyn MigrateDriver,
    keep: impl FnOnce(&[MigrateEntry]) -> T,
) -> Result<(MigrateSummary, T), MigrateError> {
    run_migration(MigrateVma::setup(mm, args)?, driver, keep)
}

/// [`migrate_with`] in `region`, looked up by the caller after [`AddressSpace::sync_events`]
/// ([`MigrateVma::setup_in`]).
pub(crate) fn migrate_in<'a, T>(
    mm: &'a AddressSpace,
    region: &'a Region,
    home: &'a DeviceMemory,
    args: MigrateArgs,
    driver: &dyn MigrateDriver,
    keep: impl FnOnce(&[MigrateEntry]) -> T,
) -> Result<(MigrateSummary, T), MigrateError> {
    run_migration(
        MigrateVma::setup_in(mm, region, args, Some(home))?,
        driver,
        keep,
    )
}

fn run_migration<T>(
    mut m: MigrateVma<'_>,
    driver: &dyn MigrateDriver,
    keep: impl FnOnce(&[MigrateEntry]) -> T,
) -> Result<(MigrateSummary, T), MigrateError> {
    // `pages()` and `finalize()` in place (`commit`, `summary`, then the drop), the migration
    // never moved.
    let args = m.args;
    if m.cpages() == 0 {
        let kept = keep(m.entries());
        m.commit();
        return Ok((m.summary(), kept));
    }
    m.alloc_and_copy(driver);
    m.commit();
    driver.finalize(args.range, m.entries());
    let kept = keep(m.entries());
    Ok((m.summary(), kept))
}

/// Brings back every page of `region` held by `dev` (any device when `None`). Exclusive
/// (atomic) grants are revoked too.
pub(crate) fn evict_region_device(
    mm: &AddressSpace,
    region: &Arc<Region>,
    dev: Option<DeviceId>,
) -> Result<u64, MigrateError> {
    evict_range_device(mm, region, region.range(), dev)
}

/// [`evict_region_device`] for the pages of `r`, a range inside `region`.
pub(crate) fn evict_range_device(
    mm: &AddressSpace,
    region: &Arc<Region>,
    r: PageRange,
    dev: Option<DeviceId>,
) -> Result<u64, MigrateError> {
    let first = region.index(r.start());
    let held = |k: usize| match region.states.get(first + k).location {
        Location::Device { dev: d, .. } | Location::Exclusive { dev: d, .. } => {
            dev.is_none_or(|x| x == d)
        }
        Location::System => false,
    };
    let mut moved = 0;
    let mut i = 0;
    let n = r.npages() as usize;
    while i < n {
        if !held(i) {
            i += 1;
            continue;
        }
        // Page `s` was held when checked; it may have moved since (the states are read without
        // their locks), so it opens the run regardless: a page that left collects nothing.
        let s = i;
        i += 1;
        while i < n && held(i) && (i - s) < 512 {
            i += 1;
        }
        let sub = PageRange::from_pages(r.page(s as u64).0, (i - s) as u64).expect("run");
        for a in sub.pages() {
            if matches!(
                region.states.get(region.index(a)).location,
                Location::Exclusive { .. }
            ) {
                crate::fault::restore_exclusive(mm, region, a)?;
            }
        }
        let args = MigrateArgs {
            range: sub,
            select: SelectFlags::DEVICE_PRIVATE | SelectFlags::DEVICE_COHERENT,
            owner: EVICT_ANY,
            fault_page: None,
        };
        // Pages locked by someone else (or whose move failed) are retried until they settle. A
        // page a device faulted back in after setup looked at it (not selected then) is a new
        // residency, not one this call failed to evict: under a device that keeps faulting,
        // waiting for "none held" could go on for ever.
        // Bounded in time, not in tries: a lock holder descheduled on a loaded machine can keep
        // a page for tens of milliseconds.
        let since = std::time::Instant::now();
        loop {
            let (summary, entries) = migrate(mm, args, &ToSystem)?;
            moved += summary.migrated;
            let busy = entries.iter().enumerate().find(|&(k, e)| {
                e.skipped.is_some_and(|r| r != SkipReason::NotSelected) && held(s + k)
            });
            let Some((k, _)) = busy else { break };
            if since.elapsed() > std::time::Duration::from_secs(2) {
                return Err(MigrateError::Stuck {
                    addr: sub.page(k as u64),
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
    Ok(moved)
}

/// Brings back every device page of `region`.
pub(crate) fn migrate_all_to_system(
    mm: &AddressSpace,
    region: &Arc<Region>,
) -> Result<u64, MigrateError> {
    evict_region_device(mm, region, None)
}

/// Drops the device copies of pages in `sub` (their memory was unmapped or discarded): frames
/// are freed and the pages become plain system pages.
pub(crate) fn discard_device_pages(mm: &AddressSpace, region: &Arc<Region>, sub: PageRange) {
    for a in sub.pages() {
        let i = region.index(a);
        let st = region.states.get(i);
        let (dev, frame) = match st.location {
            Location::Device { dev, frame, .. } | Location::Exclusive { dev, frame } => {
                (dev, frame)
            }
            Location::System => continue,
        };
        crate::fault::lock_page(region, i);
        // Re-check under the lock.
        let st2 = region.states.get(i);
        if matches!(st2.location, Location::Device { frame: f, .. } | Location::Exclusive { frame: f, .. } if f == frame)
        {
            if let Some(d) = mm.device(dev) {
                let mem = d.memory();
                scrub_frames(mm, mem, frame, 1);
                let _ = mem.pool().lock().free_page(frame);
            }
            region.states.set_system(i);
            mm.stats.add(&mm.stats.pages_discarded, 1);
            if mm.backend == CpuFaultBackend::Mprotect {
                let page = PageRange::new(a.0, PAGE_SIZE).expect("page");
                let _ = os::protect(page, prot_from_bits(region.states.prot(i)));
            }
        }
        wake_unlock(region, i);
    }
}

/// Moves one locked system page out to `frame` (exclusive access).
pub(crate) fn move_out_pub(
    mm: &AddressSpace,
    mem: &DeviceMemory,
    va: usize,
    frame: DevPfn,
    entries: &[MigrateEntry],
) -> bool {
    move_out(mm, mem, va, frame, PAGE_SIZE as usize, entries) == 1
}

/// Moves one frame back to the locked page at `va`.
pub(crate) fn move_in_pub(
    mm: &AddressSpace,
    mem: &DeviceMemory,
    va: usize,
    frame: DevPfn,
    prot: hetmem_sys::mman::Prot,
) -> bool {
    move_in(mm, mem, va, frame, 1, prot).0 == 1
}
