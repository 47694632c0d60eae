//! The device side that the address space needs: device memory (the ZONE_DEVICE analogue) and the
//! driver callbacks of migration (`dev_pagemap_ops`).
//!
//! A device attaches its memory to the [`crate::AddressSpace`]; migration and CPU
//! faults then find it by [`DeviceId`]. Its frames are bytes of a host [`Arena`] (for the simulated
//! devices; a real backend would hand out DMA addresses instead), frame `f` at offset `f * 4096`.

use std::sync::Arc;

use hetmem_core::{
    migrate::MigrateEntry,
    pool::{DevicePool, MemoryKind},
    DevPfn, DeviceId, Owner, PageRange, VirtAddr,
};
use hetmem_sys::arena::Arena;
use parking_lot::Mutex;

use crate::{error::MigrateError, AddressSpace};

/// Device memory: a pool of frames, the bytes behind them, and an owner cookie.
#[derive(Debug)]
pub struct DeviceMemory {
    id: DeviceId,
    owner: Owner,
    kind: MemoryKind,
    pool: Mutex<DevicePool>,
    arena: Arena,
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
}

/// A device attached to an address space: its memory, and what a CPU fault on one of its
/// device-private pages does (`dev_pagemap_ops::migrate_to_ram`).
pub trait Device: Send + Sync {
    /// The device's memory.
    fn memory(&self) -> &Arc<DeviceMemory>;

    /// Brings the page at `addr` (and, when it moved as a 2 MiB block, its block) back to system
    /// memory because the CPU touched it. Must not fail for lack of device memory.
    fn migrate_to_ram(&self, mm: &AddressSpace, addr: VirtAddr) -> Result<(), MigrateError>;

    /// Device-wide eviction: every page this device holds goes back to system memory.
    fn evict_all(&self, mm: &AddressSpace) -> Result<u64, MigrateError> {
        mm.evict_device(self.memory().id())
    }
}
