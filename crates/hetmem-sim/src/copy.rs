//! The simulated devices' copy engine backend, and device-to-device migration through it.
//!
//! [`SimCopyBackend`] is the [`CopyBackend`] of the simulated devices: one window of a
//! [`CopyEngine`] batch becomes real copies between device arenas (found through the address
//! space's `device(id)`) and between system memory and arenas (`process_vm_readv/writev` on our
//! own pid, so a racing `munmap` fails the window instead of the process). It is the `memcpy`
//! behind seed 003's SDMA engine; the engine around it does the windows, fences and link-model
//! charging.
//!
//! [`PeerDriver`] is the [`MigrateDriver`] of a migration from one device's private memory to
//! another's: it allocates frames on the destination device and submits the device-to-device
//! runs to a [`CopyEngine`] as one batch. The migration (`hetmem::migrate`) commits the other
//! directions meanwhile and waits on the fence before the pages become the destination's (seed
//! 003's two-phase commit: `svm_migrate_copy_to_vram` returns an `mfence`, `migrate_vma_pages`
//! runs, `svm_migrate_copy_done` waits, then `migrate_vma_finalize`). [`migrate_between`] runs a
//! whole such migration; the accelerator will use it to move pages between its instances.
//!
//! Invariant defended (DESIGN.md 3, nothing lost): a page whose copy did not complete stays on
//! its source device, intact, and the frame allocated for it on the destination is freed after
//! the fence, never before (the migration engine waits; see `MigrateVma`'s `Drop`).

use std::sync::Arc;

use hetmem::{
    migrate::{MigrateArgs, MigrateVma},
    AddressSpace, DeviceMemory, MigrateDriver, MigrateError, PeerCopy,
};
use hetmem_core::{
    copy_engine::{CopyBackend, CopyBatch, CopyEngine, CopyFault, CopyWindow, Endpoint},
    migrate::{MigrateEntry, MigrateSummary, PageLoc, PeerRun, SelectFlags},
    pool::MemoryKind,
    DevPfn, DeviceId, PageRange, VirtAddr,
};

/// Bytes bounced through the heap per step of a copy between system memory and an arena.
const BOUNCE: usize = 64 << 10;

/// A [`CopyBackend`] with real copies: arena to arena, system memory to arena and back, system
/// to system. Devices are looked up by id in the address space for every window, so a device
/// detached while a batch waits fails that batch's windows ([`CopyFault::NoSuchDevice`]) rather
/// than copying into memory that is gone.
#[derive(Debug, Clone, Copy)]
pub struct SimCopyBackend {
    mm: &'static AddressSpace,
}

impl SimCopyBackend {
    /// A backend copying within `mm`.
    pub fn new(mm: &'static AddressSpace) -> Self {
        SimCopyBackend { mm }
    }

    fn memory(&self, dev: DeviceId) -> Result<Arc<DeviceMemory>, CopyFault> {
        self.mm
            .device(dev)
            .map(|d| Arc::clone(d.memory()))
            .ok_or(CopyFault::NoSuchDevice { dev })
    }

    /// Fails unless `[offset, offset + len)` lies inside `mem`.
    fn in_range(mem: &DeviceMemory, offset: u64, len: u64) -> Result<usize, CopyFault> {
        let fault = CopyFault::DeviceAccess {
            dev: mem.id(),
            offset,
            len,
        };
        let (off, n) = (
            usize::try_from(offset).map_err(|_| fault.clone())?,
            usize::try_from(len).map_err(|_| fault.clone())?,
        );
        mem.arena().checked_addr(off, n).ok_or(fault)?;
        Ok(off)
    }
}

impl CopyBackend for SimCopyBackend {
    fn copy(&self, w: &CopyWindow) -> Result<(), CopyFault> {
        let len = w.len as usize;
        let (src, dst) = (w.src_addr(), w.dst_addr());
        let system = |addr: u64, n: usize| CopyFault::SystemAccess {
            addr: VirtAddr(addr),
            len: n as u64,
        };
        match (w.src, w.dst) {
            (Endpoint::Device { dev: s, .. }, Endpoint::Device { dev: d, .. }) => {
                let (from, to) = (self.memory(s)?, self.memory(d)?);
                let src_off = Self::in_range(&from, src, w.len)?;
                let dst_off = Self::in_range(&to, dst, w.len)?;
                // Both ranges are checked: the copy itself cannot fail any more.
                from.copy_bytes_to(src_off, &to, dst_off, len).map_err(|_| {
                    CopyFault::DeviceAccess {
                        dev: s,
                        offset: src,
                        len: w.len,
                    }
                })
            }
            (Endpoint::System(_), Endpoint::Device { dev, .. }) => {
                let to = self.memory(dev)?;
                let dst_off = Self::in_range(&to, dst, w.len)?;
                bounce(len, |at, buf| {
                    hetmem_sys::dma::read_user(src as usize + at, buf)
                        .map_err(|_| system(src + at as u64, buf.len()))?;
                    to.arena()
                        .write(dst_off + at, buf)
                        .map_err(|_| CopyFault::DeviceAccess {
                            dev,
                            offset: dst + at as u64,
                            len: buf.len() as u64,
                        })
                })
            }
            (Endpoint::Device { dev, .. }, Endpoint::System(_)) => {
                let from = self.memory(dev)?;
                let src_off = Self::in_range(&from, src, w.len)?;
                bounce(len, |at, buf| {
                    from.arena()
                        .read(src_off + at, buf)
                        .map_err(|_| CopyFault::DeviceAccess {
                            dev,
                            offset: src + at as u64,
                            len: buf.len() as u64,
                        })?;
                    hetmem::write_user(dst as usize + at, buf)
                        .map_err(|_| system(dst + at as u64, buf.len()))
                })
            }
            (Endpoint::System(_), Endpoint::System(_)) => bounce(len, |at, buf| {
                hetmem_sys::dma::read_user(src as usize + at, buf)
                    .map_err(|_| system(src + at as u64, buf.len()))?;
                hetmem::write_user(dst as usize + at, buf)
                    .map_err(|_| system(dst + at as u64, buf.len()))
            }),
        }
    }
}

/// Runs `step(offset, buffer)` over `len` bytes in pieces of at most [`BOUNCE`] bytes, stopping at
/// the first error.
fn bounce(
    len: usize,
    mut step: impl FnMut(usize, &mut [u8]) -> Result<(), CopyFault>,
) -> Result<(), CopyFault> {
    let mut buf = vec![0u8; len.min(BOUNCE)];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(BOUNCE);
        step(at, &mut buf[..n])?;
        at += n;
    }
    Ok(())
}

/// The driver of a migration from device `from`'s private memory to device `to`'s: frames on
/// `to` for every collected page of `from` (a whole 2 MiB block for a block collected whole,
/// when one is free), and the copy of the device-to-device runs submitted to `engine`.
#[derive(Debug)]
pub struct PeerDriver<'a> {
    from: &'a DeviceMemory,
    to: &'a DeviceMemory,
    engine: &'a CopyEngine,
}

impl<'a> PeerDriver<'a> {
    /// A driver moving pages of `from` to `to` through `engine` (whose backend must reach both
    /// devices' memory, as [`SimCopyBackend`] does).
    pub fn new(from: &'a DeviceMemory, to: &'a DeviceMemory, engine: &'a CopyEngine) -> Self {
        PeerDriver { from, to, engine }
    }

    fn leaves_source(&self, e: &MigrateEntry) -> bool {
        e.migrates() && matches!(e.src, PageLoc::Device { dev, .. } if dev == self.from.id())
    }
}

impl MigrateDriver for PeerDriver<'_> {
    fn alloc_and_copy(&self, _range: PageRange, entries: &mut [MigrateEntry], compound: &[bool]) {
        let to = self.to.id();
        let mut pool = self.to.pool().lock();
        let mut k = 0;
        while k < entries.len() {
            let block = hetmem_core::addr::PAGES_PER_HUGE as usize;
            if compound[k] && entries[k..k + block].iter().all(|e| self.leaves_source(e)) {
                // A block that moves whole gets a whole block: one contiguous run, one copy.
                if let Ok(base) = pool.alloc_huge() {
                    for (j, e) in entries[k..k + block].iter_mut().enumerate() {
                        e.dst = Some(PageLoc::Device {
                            dev: to,
                            frame: DevPfn(base.0 + j as u32),
                        });
                    }
                    k += block;
                    continue;
                }
            }
            // Pages of another device that shares `from`'s owner are not this driver's: left
            // without a destination, they are skipped.
            if self.leaves_source(&entries[k]) {
                if let Ok(frame) = pool.alloc_page() {
                    entries[k].dst = Some(PageLoc::Device { dev: to, frame });
                }
            }
            k += 1;
        }
    }

    fn copy_peer(&self, _mm: &AddressSpace, runs: &[PeerRun]) -> PeerCopy {
        let mut batch = CopyBatch::new();
        for run in runs {
            batch.push(run.request());
        }
        match self.engine.submit(batch) {
            Ok(fence) => PeerCopy::Fenced(fence),
            // Refused (a full queue, an engine shutting down): nothing was copied, every page
            // stays on `from`.
            Err(e) => {
                tracing::warn!(error = %e.error, "device-to-device copy not submitted");
                PeerCopy::Done(Vec::new())
            }
        }
    }

    fn finalize(&self, _range: PageRange, _entries: &[MigrateEntry]) {}
}

/// Migrates the pages of `range` (inside one managed region) that live in `from`'s private
/// memory to `to`'s, copying through `engine`. Pages elsewhere are not selected; pages that
/// could not move (no frame on `to`, a failed copy) stay on `from`, intact, with their reason in
/// the entries. Both devices must be attached to `mm`, distinct, and device-private.
///
/// The invalidation is tagged with `to`'s owner ([`MigrateVma::setup_peer`]), so the mirrors
/// of `from` drop their mappings of the range through their notifiers.
pub fn migrate_between(
    mm: &AddressSpace,
    range: PageRange,
    from: &DeviceMemory,
    to: &DeviceMemory,
    engine: &CopyEngine,
) -> Result<(MigrateSummary, Vec<MigrateEntry>), MigrateError> {
    if from.id() == to.id()
        || from.kind() != MemoryKind::DevicePrivate
        || to.kind() != MemoryKind::DevicePrivate
    {
        return Err(MigrateError::PeerUnsupported {
            from: from.id(),
            to: to.id(),
        });
    }
    for mem in [from, to] {
        let attached = mm
            .device(mem.id())
            .is_some_and(|d| std::ptr::eq(d.memory().as_ref(), mem));
        if !attached {
            return Err(MigrateError::NoDevice(mem.id()));
        }
    }
    let args = MigrateArgs {
        range,
        select: SelectFlags::DEVICE_PRIVATE | SelectFlags::COMPOUND,
        owner: from.owner(),
        fault_page: None,
    };
    let driver = PeerDriver::new(from, to, engine);
    let mut m = MigrateVma::setup_peer(mm, args, to.owner())?;
    if m.cpages() > 0 {
        m.alloc_and_copy(&driver);
    }
    let c = m.pages();
    driver.finalize(range, c.entries());
    let entries = c.entries().to_vec();
    Ok((c.finalize(), entries))
}
