//! The device side that the address space needs: device memory (the ZONE_DEVICE analogue) and the
//! driver callbacks of migration (`dev_pagemap_ops`).
//!
//! A device attaches its memory to the [`crate::AddressSpace`]; migration and CPU
//! faults then find it by [`DeviceId`]. Its frames are bytes of a host [`Arena`] (for the simulated
//! devices; a real backend would hand out DMA addresses instead), frame `f` at offset `f * 4096`.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use hetmem_core::{
    copy_engine::Fence,
    link::ClockReport,
    migrate::{MigrateEntry, MigrationCounts, PeerRun, Trigger, TriggerCounts},
    pool::{DevicePool, MemoryKind},
    DevPfn, DeviceId, Owner, PageRange, VirtAddr,
};
use hetmem_sys::arena::Arena;
use parking_lot::Mutex;

use crate::{error::MigrateError, region::Region, AddressSpace};

/// Device memory: a pool of frames, the bytes behind them, and an owner cookie.
#[derive(Debug)]
pub struct DeviceMemory {
    id: DeviceId,
    owner: Owner,
    kind: MemoryKind,
    pool: Mutex<DevicePool>,
    arena: Arena,
    /// Pages migrated into and out of this memory, by trigger (counted at each migration's
    /// commit), in [`Trigger::ALL`]'s order: one relaxed add per direction that moved pages (a
    /// CPU fault's migration makes one), no lock.
    migrations: [MigrationCounters; Trigger::ALL.len()],
}

/// [`MigrationCounts`] as counters.
#[derive(Debug, Default)]
struct MigrationCounters {
    from_system: AtomicU64,
    from_peer: AtomicU64,
    to_system: AtomicU64,
    to_peer: AtomicU64,
}

impl DeviceMemory {
    /// Device memory of `capacity_bytes` (rounded down to 2 MiB chunks).
    pub fn new(
        id: DeviceId,
        owner: Owner,
        kind: MemoryKind,
        capacity_bytes: u64,
    ) -> Result<Self, hetmem_sys::SysError> {
        let frames = (capacity_bytes / hetmem_core::PAGE_SIZE).max(512);
        let pool = DevicePool::new(id, owner, kind, frames);
        let arena = Arena::new(
            (pool.capacity_frames() * hetmem_core::PAGE_SIZE) as usize,
            hetmem_sys::HUGE_PAGE_SIZE,
        )?;
        Ok(DeviceMemory {
            id,
            owner,
            kind,
            pool: Mutex::new(pool),
            arena,
            migrations: Default::default(),
        })
    }

    /// The device id.
    pub fn id(&self) -> DeviceId {
        self.id
    }
    /// The owner cookie.
    pub fn owner(&self) -> Owner {
        self.owner
    }
    /// Private or coherent.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }
    /// The frame pool.
    pub fn pool(&self) -> &Mutex<DevicePool> {
        &self.pool
    }
    /// Pages migrated into and out of this memory so far, by trigger.
    /// (Each counter is read on its own: a migration committing meanwhile may be counted in
    /// one direction and not yet in the other.)
    pub fn migrations(&self) -> TriggerCounts {
        let mut out = TriggerCounts::default();
        for (&t, c) in Trigger::ALL.iter().zip(&self.migrations) {
            *out.get_mut(t) = MigrationCounts {
                from_system: c.from_system.load(Ordering::Relaxed),
                from_peer: c.from_peer.load(Ordering::Relaxed),
                to_system: c.to_system.load(Ordering::Relaxed),
                to_peer: c.to_peer.load(Ordering::Relaxed),
            };
        }
        out
    }

    pub(crate) fn count_migrations(&self, trigger: Trigger, pages: &MigrationCounts) {
        let c = &self.migrations[trigger.index()];
        for (counter, n) in [
            (&c.from_system, pages.from_system),
            (&c.from_peer, pages.from_peer),
            (&c.to_system, pages.to_system),
            (&c.to_peer, pages.to_peer),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// The bytes behind the frames.
    pub fn arena(&self) -> &Arena {
        &self.arena
    }
    /// Host address of a frame (what MOVE and COPY use).
    pub fn frame_addr(&self, frame: DevPfn) -> usize {
        self.arena.base() + frame.0 as usize * hetmem_sys::PAGE_SIZE
    }
    /// Byte offset of a frame in the arena.
    pub fn frame_offset(frame: DevPfn) -> usize {
        frame.0 as usize * hetmem_sys::PAGE_SIZE
    }

    /// Copies `len` bytes at byte offset `src_off` of this memory to byte offset `dst_off` of
    /// `dst`: another device's memory (a peer-to-peer copy), or this one (a `memmove`). Both
    /// ranges are checked before anything is written, so an out-of-range copy writes nothing.
    /// The bytes go through a bounded bounce buffer with the arenas' own accessors: neither
    /// arena is ever referenced by Rust code (see `hetmem_sys::arena`).
    pub fn copy_bytes_to(
        &self,
        src_off: usize,
        dst: &DeviceMemory,
        dst_off: usize,
        len: usize,
    ) -> Result<(), hetmem_sys::SysError> {
        const BOUNCE: usize = 64 << 10;
        let out_of_range = hetmem_sys::SysError::Invalid {
            op: "DeviceMemory::copy_bytes_to",
            why: "range outside device memory",
        };
        if self.arena.checked_addr(src_off, len).is_none()
            || dst.arena.checked_addr(dst_off, len).is_none()
        {
            return Err(out_of_range);
        }
        if std::ptr::eq(self, dst) {
            return self.arena.copy_within(src_off, dst_off, len);
        }
        let mut buf = vec![0u8; len.min(BOUNCE)];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(BOUNCE);
            self.arena.read(src_off + at, &mut buf[..n])?;
            dst.arena.write(dst_off + at, &buf[..n])?;
            at += n;
        }
        Ok(())
    }
}

/// How a driver's device-to-device copy ([`MigrateDriver::copy_peer`]) went, or will go.
#[derive(Debug)]
#[must_use = "the migration must learn what was copied before it commits"]
pub enum PeerCopy {
    /// The copy is over: for run `i`, how many of its leading pages hold their data at the
    /// destination (`runs[i].npages` when the run copied whole; fewer when it stopped part way).
    /// A missing count means nothing of that run was copied.
    Done(Vec<u64>),
    /// The copy was submitted to a copy engine as one batch whose request `i` copies run `i`
    /// ([`PeerRun::request`]). The migration waits on the fence before it changes the state of
    /// any page of these runs and before it frees any frame they read or write (seed 003's
    /// two-phase commit: submit, update, `svm_migrate_copy_done`, then finalize), also when it is
    /// dropped instead of committed.
    Fenced(Fence),
}

impl PeerCopy {
    /// Waits for the copy if it is in flight, and returns how many leading pages of each run
    /// were copied, one count per run. A failed or cancelled request counts the whole pages
    /// before the window that stopped it; a fence that reports no result counts nothing.
    pub fn wait(self, runs: &[PeerRun]) -> Vec<u64> {
        let mut copied = match self {
            PeerCopy::Done(copied) => copied,
            PeerCopy::Fenced(fence) => {
                let result = fence.wait();
                let report = match &result {
                    Ok(report) => Some(report),
                    Err(hetmem_core::copy_engine::CopyError::Cancelled { report }) => Some(report),
                    Err(_) => None,
                };
                runs.iter()
                    .enumerate()
                    .map(|(i, run)| {
                        report.and_then(|r| r.outcome(i)).map_or(0, |o| {
                            o.copied_bytes(run.len_bytes()) / hetmem_core::PAGE_SIZE
                        })
                    })
                    .collect()
            }
        };
        // A driver's count never exceeds its run, and a missing one is zero.
        copied.resize(runs.len(), 0);
        for (c, run) in copied.iter_mut().zip(runs) {
            *c = (*c).min(run.npages);
        }
        copied
    }
}

/// The driver's part of a migration (`dev_pagemap_ops` and the driver steps between
/// `migrate_vma_setup`, `_pages` and `_finalize`).
pub trait MigrateDriver {
    /// Chooses destinations: for each entry that migrates, set `dst` (a device frame for a
    /// migration to the device, [`PageLoc::System`](hetmem_core::migrate::PageLoc::System) for one
    /// to system memory) or leave it `None` to skip the page. A driver migrating its own pages
    /// away must also tear down its own mappings of them here (its notifier skips its own
    /// migration's invalidation). `compound` marks entries that start a whole 2 MiB block.
    fn alloc_and_copy(&self, range: PageRange, entries: &mut [MigrateEntry], compound: &[bool]);

    /// Called after commit, before pages unlock, with the final entries: program the device page
    /// table for pages that now live in its memory.
    fn finalize(&self, range: PageRange, entries: &[MigrateEntry]);

    /// Copies the device-to-device runs of the migration (pages leaving one device's private
    /// memory for another device's, destinations chosen by [`MigrateDriver::alloc_and_copy`]).
    /// Called once per migration, right after `alloc_and_copy`, only when there are such runs;
    /// the source pages are locked and their state does not change until the copy is over.
    ///
    /// The default copies synchronously, arena to arena ([`crate::migrate::copy_peer_runs`]). A
    /// driver with a copy engine submits the runs as one batch and returns its fence
    /// ([`PeerCopy::Fenced`]): the migration commits the other directions meanwhile and waits
    /// on the fence before any of these pages changes state. Pages whose copy did not complete
    /// stay on their source device, intact, skipped as
    /// [`SkipReason::CopyFailed`](hetmem_core::migrate::SkipReason::CopyFailed).
    fn copy_peer(&self, mm: &AddressSpace, runs: &[PeerRun]) -> PeerCopy {
        PeerCopy::Done(crate::migrate::copy_peer_runs(mm, runs))
    }
}

/// A device attached to an address space: its memory, and what a CPU fault on one of its
/// device-private pages does (`dev_pagemap_ops::migrate_to_ram`).
pub trait Device: Send + Sync {
    /// The device's memory.
    fn memory(&self) -> &Arc<DeviceMemory>;

    /// Brings the page at `addr` (and, when it moved as a 2 MiB block, its block) back to system
    /// memory because the CPU touched it. Must not fail for lack of device memory.
    ///
    /// Looks the page's region up (after [`AddressSpace::sync_events`], as `migrate_vma_setup`
    /// would) and hands it to [`Device::migrate_to_ram_in`].
    fn migrate_to_ram(&self, mm: &AddressSpace, addr: VirtAddr) -> Result<(), MigrateError> {
        mm.sync_events();
        let region = mm
            .region_of(addr)
            .ok_or(MigrateError::NotManaged { addr })?;
        self.migrate_to_ram_in(mm, &region, addr)
    }

    /// [`Device::migrate_to_ram`] of a page of `region`, which the caller looked up with no
    /// userfaultfd event pending (the CPU fault handler has it already: the one lookup of the
    /// fault serves the migration too).
    fn migrate_to_ram_in(
        &self,
        mm: &AddressSpace,
        region: &Arc<Region>,
        addr: VirtAddr,
    ) -> Result<(), MigrateError>;

    /// Device-wide eviction: every page this device holds goes back to system memory.
    fn evict_all(&self, mm: &AddressSpace) -> Result<u64, MigrateError> {
        mm.evict_device(self.memory().id())
    }
}

/// A device that runs work: what a runtime drives, whatever runs behind it (DESIGN.md "Devices";
/// issue 3, item 1). The simulated accelerator implements it; a GPU backend would implement it
/// over its driver, with its own kernel type. Every method takes a range: residency, remote
/// mappings, unmapping and accessed bits are managed per range, never per page, so a backend can
/// turn each call into one page-table update and one TLB invalidation.
///
/// Faults are the device's own business: a launch that touches what is not mapped faults,
/// and the device services the faults in batches (on the simulator, its service thread; on a
/// GPU, its fault buffer) through the address space, so a runtime sees only launches that
/// complete or fail with the faulting address.
pub trait ComputeDevice: Device {
    /// A program the device runs (the simulator's per-thread kernel; a GPU's compiled function).
    type Kernel: ?Sized + Send + Sync;
    /// A launch in flight; [`ComputeDevice::wait`] completes it.
    type Launch: Send;
    /// What can go wrong.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Starts `kernel` over `threads` threads and returns at once.
    fn launch(&self, kernel: Arc<Self::Kernel>, threads: u64) -> Result<Self::Launch, Self::Error>;

    /// Waits for a launch; a fault that could not be serviced fails it.
    fn wait(&self, launch: Self::Launch) -> Result<(), Self::Error>;

    /// Migrates the pages of `range` into this device's memory (what fits) and maps all of them,
    /// writable when `write`: a prefetch, or residency before a launch that may not fault.
    fn make_resident(&self, range: PageRange, write: bool) -> Result<(), Self::Error>;

    /// Maps `range` where its pages are, migrating nothing: system pages are reached over the
    /// link (an accessed-by device, a page pinned against thrashing).
    fn map_remote(&self, range: PageRange, write: bool) -> Result<(), Self::Error>;

    /// Drops this device's mappings of `range`. When it returns, no work on the device can reach
    /// the pages through them.
    fn unmap(&self, range: PageRange) -> Result<(), Self::Error>;

    /// Clears the accessed bits of `range` and returns the ranges the device used since the last
    /// call (seed 000's `clear_flush_young`): what an LRU or an access counter samples.
    fn take_accessed(&self, range: PageRange) -> Result<Vec<PageRange>, Self::Error>;

    /// The device's modelled time so far, by cause.
    fn clock(&self) -> ClockReport;
}
