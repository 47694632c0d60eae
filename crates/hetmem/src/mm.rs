//! The address space: this process's memory as hetmem manages it (the kernel's `mm_struct` with its
//! VMAs, MMU notifiers and device-private entries).
//!
//! There is one per process ([`AddressSpace::current`]), as there is one `mm` per process: one
//! userfaultfd (a VMA can belong to one only), one SIGSEGV/SIGBUS handler.
//!
//! ## Lock order (written once, here)
//!
//! 1. page locks (the LOCKED bit of each page's state; taken with try-lock in migration setup, in
//!    ascending address order; the CPU-fault path waits on one page's lock holding nothing else);
//! 2. the notifier sequence lock, then a driver's update lock (inside its `invalidate`);
//! 3. a device pool's lock;
//! 4. the region table and the device table (held only to look up or insert, never across 1-3).
//!
//! hetmem never dereferences managed memory while it holds any lock: the data moves by
//! UFFDIO_MOVE/COPY, `process_vm_readv/writev` or `/proc/self/mem`, which fail with an error where
//! a plain access would fault. So a thread that takes a CPU fault on managed memory holds no hetmem
//! lock, and the fault handler, which runs in that thread, may take them (DESIGN.md invariant 4).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    thread::JoinHandle,
};

use hetmem_core::{
    notifier::{InvalidateGuard, MmNotifiers, NotifierRange, NotifyEvent},
    page_state::Location,
    PageRange, VirtAddr,
};
use hetmem_sys::{
    dma::ProcMem,
    maps,
    mman::{self, Prot},
    pagemap::PageMap,
    uffd::{RegisterMode, ShutdownEvent, Uffd, UffdFeatures},
};
use parking_lot::{Mutex, RwLock};

use crate::{
    device::Device,
    error::MmError,
    region::{Region, RegionKind},
    stats::Stats,
};

/// How CPU accesses to device-resident pages are caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuFaultBackend {
    /// userfaultfd in MISSING + WRITE-PROTECT mode with `UFFD_FEATURE_SIGBUS`: a device-resident
    /// page is a hole in the CPU page table; a touch raises SIGBUS in the faulting thread, which
    /// moves the page back (UFFDIO_MOVE) and resumes. The default: it never splits VMAs.
    Userfaultfd,
    /// `mprotect(PROT_NONE)` + SIGSEGV: a device-resident page is mapped PROT_NONE; a touch raises
    /// SIGSEGV in the faulting thread, which refills it through `/proc/self/mem` and restores the
    /// protection. Works where userfaultfd is not allowed; splits VMAs.
    Mprotect,
}

impl CpuFaultBackend {
    /// The backend named by `HETMEM_CPU_FAULT_BACKEND` (`uffd` or `mprotect`), if set.
    pub fn from_env() -> Option<Self> {
        match std::env::var("HETMEM_CPU_FAULT_BACKEND").ok()?.as_str() {
            "uffd" | "userfaultfd" => Some(CpuFaultBackend::Userfaultfd),
            "mprotect" | "sigsegv" => Some(CpuFaultBackend::Mprotect),
            _ => None,
        }
    }
}

/// Settings fixed when the address space starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// CPU fault backend; `None`: `HETMEM_CPU_FAULT_BACKEND`, else userfaultfd when available.
    pub backend: Option<CpuFaultBackend>,
}

static MM: OnceLock<Arc<AddressSpace>> = OnceLock::new();

/// The process's address space as hetmem manages it.
pub struct AddressSpace {
    pub(crate) backend: CpuFaultBackend,
    pub(crate) uffd: Option<Uffd>,
    /// A second userfaultfd, without events, holding the device arenas (userfaultfd backend):
    /// UFFDIO_MOVE needs its destination registered, so moving a page *into* a device frame is
    /// an ioctl on this one. Registered in write-protect mode only (nothing is ever protected),
    /// so a hole in an arena fills as ordinary anonymous memory does, and discarding a frame
    /// sends no REMOVE event to wait on.
    pub(crate) arena_uffd: Option<Uffd>,
    /// Per-process files (reopened in a forked child; see `fork`).
    pub(crate) procmem: RwLock<ProcMem>,
    pub(crate) pagemap: RwLock<PageMap>,
    /// Migrations hold it for reading; `fork()` for writing (see `fork`).
    pub(crate) fork_gate: RwLock<()>,
    /// Set in the child of a `fork()`: it never migrates nor touches the parent's userfaultfd.
    pub(crate) forked: AtomicBool,
    pub(crate) notifiers: Arc<MmNotifiers>,
    pub(crate) regions: RwLock<BTreeMap<u64, Arc<Region>>>,
    pub(crate) devices: RwLock<Vec<Option<Arc<dyn Device>>>>,
    /// Ranges hetmem itself is discarding with MADV_DONTNEED: their REMOVE events are its own.
    pub(crate) self_zaps: Mutex<crate::zaps::SelfZaps>,
    /// mremaps hetmem itself is doing, `(from, to, len, dont_unmap)` (`to` is `u64::MAX` when
    /// the kernel picks it): the event thread learns from the mark whether the old range stays
    /// mapped, which the REMAP event does not say.
    pub(crate) self_remaps: Mutex<Vec<(u64, u64, u64, bool)>>,
    /// The event thread's batch sequence: odd while a batch is being read and handled, even
    /// when idle (see [`AddressSpace::sync_events`]).
    pub(crate) event_batch: AtomicU64,
    pub(crate) stats: Stats,
    pid: u32,
    shutdown: ShutdownEvent,
    stopping: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace")
            .field("backend", &self.backend)
            .field("regions", &self.regions.read().len())
            .finish_non_exhaustive()
    }
}

fn prot_bits(p: Prot) -> u32 {
    let mut b = 0;
    if p.contains(Prot::READ) {
        b |= 1;
    }
    if p.contains(Prot::WRITE) {
        b |= 2;
    }
    if p.contains(Prot::EXEC) {
        b |= 4;
    }
    b
}

pub(crate) fn prot_from_bits(b: u32) -> Prot {
    let mut p = Prot::empty();
    if b & 1 != 0 {
        p |= Prot::READ;
    }
    if b & 2 != 0 {
        p |= Prot::WRITE;
    }
    if b & 4 != 0 {
        p |= Prot::EXEC;
    }
    p
}

impl AddressSpace {
    /// The process's address space, started with [`Config::default`] on first use.
    pub fn current() -> Result<&'static Arc<AddressSpace>, MmError> {
        Self::init(Config::default())
    }

    /// Starts the address space with `config`, or returns it if already started (the config is
    /// then ignored: compare [`AddressSpace::backend`]).
    pub fn init(config: Config) -> Result<&'static Arc<AddressSpace>, MmError> {
        if let Some(mm) = MM.get() {
            return Ok(mm);
        }
        let mm = Arc::new(Self::start(config)?);
        let _ = MM.set(mm);
        let mm = MM.get().expect("just set");
        mm.spawn_event_thread();
        crate::fault::install(mm)?;
        crate::fork::install(mm)?;
        Ok(mm)
    }

    fn start(config: Config) -> Result<Self, MmError> {
        let available = Uffd::available().unwrap_or(UffdFeatures::empty());
        let events =
            UffdFeatures::EVENT_REMAP | UffdFeatures::EVENT_REMOVE | UffdFeatures::EVENT_UNMAP;
        let fault_features = UffdFeatures::SIGBUS
            | UffdFeatures::PAGEFAULT_FLAG_WP
            | UffdFeatures::WP_UNPOPULATED
            | UffdFeatures::MOVE
            | UffdFeatures::MISSING_SHMEM
            | UffdFeatures::WP_HUGETLBFS_SHMEM;
        let backend = config.backend.or_else(CpuFaultBackend::from_env).unwrap_or(
            if available.contains(fault_features) {
                CpuFaultBackend::Userfaultfd
            } else {
                CpuFaultBackend::Mprotect
            },
        );
        let uffd = match backend {
            CpuFaultBackend::Userfaultfd => Some(
                Uffd::open(fault_features | events)
                    .map_err(|e| MmError::Backend(format!("userfaultfd: {e}")))?,
            ),
            // The mprotect backend still wants the kernel's reports of munmap / mremap / madvise:
            // it registers in write-protect mode only and never protects anything.
            CpuFaultBackend::Mprotect => {
                let want =
                    events | UffdFeatures::PAGEFAULT_FLAG_WP | UffdFeatures::WP_HUGETLBFS_SHMEM;
                if available.contains(want) {
                    Uffd::open(want).ok()
                } else {
                    None
                }
            }
        };
        let arena_uffd = match backend {
            CpuFaultBackend::Userfaultfd => Some(
                Uffd::open(UffdFeatures::MOVE)
                    .map_err(|e| MmError::Backend(format!("userfaultfd (arenas): {e}")))?,
            ),
            CpuFaultBackend::Mprotect => None,
        };
        Ok(AddressSpace {
            backend,
            uffd,
            arena_uffd,
            procmem: RwLock::new(ProcMem::open()?),
            pagemap: RwLock::new(PageMap::open()?),
            fork_gate: RwLock::new(()),
            forked: AtomicBool::new(false),
            notifiers: MmNotifiers::new(),
            regions: RwLock::new(BTreeMap::new()),
            devices: RwLock::new(Vec::new()),
            self_zaps: Mutex::new(crate::zaps::SelfZaps::default()),
            self_remaps: Mutex::new(Vec::new()),
            event_batch: AtomicU64::new(0),
            stats: Stats::default(),
            pid: std::process::id(),
            shutdown: ShutdownEvent::new()?,
            stopping: AtomicBool::new(false),
            thread: Mutex::new(None),
        })
    }

    /// The CPU fault backend in use.
    pub fn backend(&self) -> CpuFaultBackend {
        self.backend
    }

    /// The interval notifiers of this address space.
    pub fn notifiers(&self) -> &Arc<MmNotifiers> {
        &self.notifiers
    }

    /// Counters.
    pub fn stats(&self) -> crate::stats::StatsSnapshot {
        self.stats.snapshot()
    }

    /// True in a child process created by `fork()` after hetmem started: the child has no
    /// userfaultfd of its own, so it cannot migrate; range faults and reads still work.
    pub fn is_forked_child(&self) -> bool {
        self.forked() || std::process::id() != self.pid
    }

    pub(crate) fn forked(&self) -> bool {
        self.forked.load(Ordering::Acquire)
    }

    // ----- regions -------------------------------------------------------------------------

    /// The region holding `addr`.
    pub fn region_of(&self, addr: VirtAddr) -> Option<Arc<Region>> {
        let regions = self.regions.read();
        let (_, r) = regions.range(..=addr.0).next_back()?;
        r.range().contains(addr).then(|| Arc::clone(r))
    }

    /// Regions overlapping `range`, in address order.
    pub fn regions_in(&self, range: PageRange) -> Vec<Arc<Region>> {
        let regions = self.regions.read();
        let first = regions
            .range(..=range.start().0)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(0);
        regions
            .range(first..range.end().0)
            .filter(|(_, r)| r.range().overlaps(range.start(), range.end()))
            .map(|(_, r)| Arc::clone(r))
            .collect()
    }

    /// Waits until every userfaultfd event the kernel has already delivered is handled.
    ///
    /// munmap, mremap and madvise return as soon as the event thread has *read* their event,
    /// not when it has acted on it. Without this wait, a program that unmaps a range and maps a
    /// new region at the same address (or discards pages and migrates fresh data there) could
    /// see the stale event land afterwards and drop the new region or its device pages. The
    /// event thread makes `event_batch` odd before it reads and even after it has handled the
    /// batch; since the program's call returned only after the read, it sees the odd value of
    /// that batch (and waits for it to end) or a later one (that batch is done).
    ///
    /// Public for devices: a launch waits here too, so that a kernel started right after the
    /// program's `madvise` or `munmap` cannot reach device pages the pending event is about to
    /// discard.
    pub fn sync_events(&self) {
        if self.uffd.is_none() || self.forked() || crate::events::on_event_thread() {
            return;
        }
        let v = self.event_batch.load(Ordering::SeqCst);
        if v.is_multiple_of(2) {
            return;
        }
        let mut spins = 0u32;
        while self.event_batch.load(Ordering::SeqCst) == v && !self.stopping() {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// The event thread's batch sequence now. A lookup made after reading it is as fresh as one
    /// made after [`AddressSpace::sync_events`] when [`AddressSpace::sync_events_since`] then
    /// says false.
    pub(crate) fn events_seen(&self) -> u64 {
        self.event_batch.load(Ordering::SeqCst)
    }

    /// [`AddressSpace::sync_events`], then whether an event batch began or ended since `seen`
    /// ([`AddressSpace::events_seen`]) was read: a region looked up in between may be stale, and
    /// is to be looked up again. False where `sync_events` waits for nothing (no userfaultfd, a
    /// forked child, the event thread itself).
    pub(crate) fn sync_events_since(&self, seen: u64) -> bool {
        if self.uffd.is_none() || self.forked() || crate::events::on_event_thread() {
            return false;
        }
        self.sync_events();
        self.event_batch.load(Ordering::SeqCst) != seen
    }

    fn insert_region(&self, region: Region) -> Result<Arc<Region>, MmError> {
        self.sync_events();
        let range = region.range();
        let mut regions = self.regions.write();
        let first = regions
            .range(..=range.start().0)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(0);
        if regions
            .range(first..range.end().0)
            .any(|(_, r)| r.range().overlaps(range.start(), range.end()))
        {
            return Err(MmError::AlreadyManaged {
                addr: range.start(),
            });
        }
        let r = Arc::new(region);
        regions.insert(range.start().0, Arc::clone(&r));
        Ok(r)
    }

    fn uffd_register(&self, range: PageRange, shared: bool) {
        let Some(uffd) = &self.uffd else { return };
        let mode = match (self.backend, shared) {
            (CpuFaultBackend::Userfaultfd, false) => RegisterMode::MISSING | RegisterMode::WP,
            _ => RegisterMode::WP,
        };
        if let Err(e) = uffd.register(range.start().as_usize(), range.len_bytes() as usize, mode) {
            tracing::warn!(?range, error = %e, "userfaultfd registration failed");
        }
    }

    /// Maps `len` bytes of anonymous memory managed by hetmem (private, or shared with
    /// `shared`), readable and writable as `prot` says.
    pub fn map_anonymous(&self, len: u64, prot: Prot, shared: bool) -> Result<PageRange, MmError> {
        PageRange::new(0, len)?;
        let addr = mman::map_anonymous(len as usize, prot, shared)?;
        let range = PageRange::new(addr as u64, len)?;
        self.uffd_register(range, shared);
        self.insert_region(Region::new(
            range,
            RegionKind::Mapped,
            shared,
            prot_bits(prot),
        ))?;
        Ok(range)
    }

    /// Maps `len` bytes of private anonymous memory aligned to `align` (a power of two).
    pub fn map_anonymous_aligned(
        &self,
        len: u64,
        align: u64,
        prot: Prot,
    ) -> Result<PageRange, MmError> {
        PageRange::new(0, len)?;
        let addr = mman::map_anonymous_aligned(len as usize, align as usize, prot)?;
        let range = PageRange::new(addr as u64, len)?;
        self.uffd_register(range, false);
        self.insert_region(Region::new(
            range,
            RegionKind::Mapped,
            false,
            prot_bits(prot),
        ))?;
        Ok(range)
    }

    /// Registers existing anonymous memory of the program (a `Vec`'s pages, say): from now on it
    /// can migrate to devices. The range must be page aligned and entirely anonymous.
    pub fn register(&self, addr: u64, len: u64) -> Result<PageRange, MmError> {
        let range = PageRange::new(addr, len)?;
        let vmas = maps::read_maps_range(range.start().as_usize(), range.end().as_usize())?;
        let mut at = range.start().0;
        let mut shared = None;
        let mut prot = 0;
        for v in &vmas {
            if v.start as u64 > at || !v.is_anonymous() || shared.is_some_and(|s| s != v.shared) {
                return Err(MmError::NotAnonymous {
                    addr: range.start(),
                });
            }
            shared = Some(v.shared);
            prot = (v.read as u32) | ((v.write as u32) << 1) | ((v.exec as u32) << 2);
            at = v.end as u64;
        }
        if at < range.end().0 {
            return Err(MmError::NotAnonymous {
                addr: range.start(),
            });
        }
        let shared = shared.unwrap_or(false);
        self.insert_region(Region::new(range, RegionKind::Registered, shared, prot))?;
        self.uffd_register(range, shared);
        Ok(range)
    }

    /// Releases memory registered with [`AddressSpace::register`]: its device pages come back to
    /// system memory first. Releasing what is not registered (twice, say) is an error.
    pub fn unregister(&self, range: PageRange) -> Result<(), MmError> {
        let region = self
            .regions
            .read()
            .get(&range.start().0)
            .filter(|r| r.range() == range && r.kind() == RegionKind::Registered)
            .cloned()
            .ok_or(MmError::NotRegistered {
                addr: range.start(),
            })?;
        // Closed first: a policy's migration or a read copy starting now finds the region
        // closing under the page's lock and takes nothing in; one already holding a lock is
        // waited for by the eviction below, which then brings its page home too.
        region.close();
        for a in range.pages() {
            crate::dup::collapse_locking(self, &region, a);
        }
        if let Err(e) = crate::migrate::migrate_all_to_system(self, &region) {
            region.reopen();
            return Err(e.into());
        }
        self.regions.write().remove(&range.start().0);
        if let Some(uffd) = &self.uffd {
            let _ = uffd.unregister(range.start().as_usize(), range.len_bytes() as usize);
        }
        self.notifiers.invalidate(NotifierRange::new(
            range.start(),
            range.end(),
            NotifyEvent::Release,
            None,
        ));
        Ok(())
    }

    /// `munmap` of managed (or any) memory through hetmem: device mappings are invalidated, the
    /// device frames released, then the memory unmapped.
    ///
    /// # Safety
    ///
    /// As for `munmap(2)`: no Rust reference may point into `range`.
    #[allow(unsafe_code)]
    pub unsafe fn unmap(&self, range: PageRange) -> Result<(), MmError> {
        // The kernel's munmap inside the invalidation too: until the mapping is gone, a range
        // fault would still find the memory (as plain, unmanaged memory) and a device could
        // map it.
        let _inv = self.invalidate_start(range, NotifyEvent::Unmap);
        self.forget_within(range, NotifyEvent::Unmap);
        crate::os::unmap(range)?;
        Ok(())
    }

    /// `invalidate_range_start` over `range` for `event`; the invalidation ends when the guard
    /// drops.
    fn invalidate_start(&self, range: PageRange, event: NotifyEvent) -> InvalidateGuard<'_> {
        self.notifiers
            .invalidate_start(NotifierRange::new(range.start(), range.end(), event, None))
    }

    /// Invalidates `range` for `event`, frees device frames of pages in it and drops its regions
    /// (the memory is gone, or its contents are discarded).
    pub(crate) fn forget(&self, range: PageRange, event: NotifyEvent) {
        let _inv = self.invalidate_start(range, event);
        self.forget_within(range, event);
    }

    /// [`AddressSpace::forget`]'s changes, inside an invalidation the caller holds: a device's
    /// range fault that starts meanwhile waits for its end, and one in flight retries, so no
    /// device maps the range from a snapshot taken while it changes (a device fault serviced
    /// between a finished invalidation and the changes mapped pages of an unmapped region, and
    /// device frames a discard was about to free: found by the model test with access-counter
    /// migrations running in the background).
    fn forget_within(&self, range: PageRange, event: NotifyEvent) {
        for region in self.regions_in(range) {
            if let Some(sub) = region.range().intersect(&range) {
                crate::migrate::discard_device_pages(self, &region, sub);
            }
        }
        if event == NotifyEvent::Unmap {
            Self::drop_range(&mut self.regions.write(), range);
        }
    }

    /// Removes `range` from every region overlapping it, keeping what lies on either side (as
    /// regions over the same page states). Works on whatever the table holds when the lock is
    /// taken, so two threads trimming the same region concurrently both take effect.
    fn drop_range(regions: &mut BTreeMap<u64, Arc<Region>>, range: PageRange) {
        let first = regions
            .range(..=range.start().0)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(0);
        let hit: Vec<Arc<Region>> = regions
            .range(first..range.end().0)
            .filter(|(_, r)| r.range().overlaps(range.start(), range.end()))
            .map(|(_, r)| Arc::clone(r))
            .collect();
        for region in hit {
            let r = region.range();
            regions.remove(&r.start().0);
            if r.start() < range.start() {
                let left = PageRange::from_bounds(r.start().0, range.start().0).expect("left part");
                regions.insert(left.start().0, Arc::new(region.carve(left, left.start())));
            }
            if range.end() < r.end() {
                let right = PageRange::from_bounds(range.end().0, r.end().0).expect("right part");
                regions.insert(
                    right.start().0,
                    Arc::new(region.carve(right, right.start())),
                );
            }
        }
    }

    /// Moves the regions of `[from, from+len)` to `to` after the kernel moved the memory: the
    /// moved regions keep their page states (the same state words, so a page locked meanwhile
    /// stays locked); with `keep_old` (MREMAP_DONTUNMAP) the old range stays managed, empty.
    pub(crate) fn move_region_states(&self, from: u64, to: u64, len: u64, keep_old: bool) {
        let Ok(old) = PageRange::new(from, len) else {
            return;
        };
        let mut moved = Vec::new();
        let mut fresh = Vec::new();
        for region in self.regions_in(old) {
            let Some(sub) = region.range().intersect(&old) else {
                continue;
            };
            let at = VirtAddr(to + (sub.start().0 - from));
            moved.push(region.carve(sub, at));
            if keep_old {
                fresh.push(region.fresh(sub));
            }
        }
        if moved.is_empty() {
            return;
        }
        {
            let mut regions = self.regions.write();
            Self::drop_range(&mut regions, old);
            for region in fresh {
                regions.insert(region.range().start().0, Arc::new(region));
            }
        }
        for region in moved {
            let r = region.range();
            if self.insert_region(region).is_err() {
                tracing::warn!(?r, "remap target overlaps a managed region");
            }
        }
    }

    /// `mprotect` through hetmem: device mappings are invalidated first (the kernel's
    /// MMU_NOTIFY_PROTECTION_VMA), then the protection changes. With the mprotect backend,
    /// device-resident pages stay PROT_NONE and get `prot` back when they return.
    ///
    /// # Safety
    ///
    /// As for `mprotect(2)`: no Rust reference into `range` may be used in a way the new
    /// protection forbids.
    #[allow(unsafe_code)]
    pub unsafe fn protect(&self, range: PageRange, prot: Prot) -> Result<(), MmError> {
        self.notifiers.invalidate(NotifierRange::new(
            range.start(),
            range.end(),
            NotifyEvent::Protection,
            None,
        ));
        let bits = prot_bits(prot);
        let regions = self.regions_in(range);
        for region in &regions {
            let Some(sub) = region.range().intersect(&range) else {
                continue;
            };
            for a in sub.pages() {
                region.states.set_prot(region.index(a), bits);
            }
        }
        if self.backend == CpuFaultBackend::Mprotect {
            self.protect_mprotect_backend(range, prot, &regions)
        } else {
            Ok(crate::os::protect(range, prot)?)
        }
    }

    /// [`AddressSpace::protect`]'s CPU side under the mprotect backend, where hetmem's own
    /// protections share the page tables with the program's. Pages held away from the CPU stay
    /// `PROT_NONE` (they get `prot` when they come back). A duplicated page stays write-protected,
    /// or a CPU write would not collapse its copies. Each managed page in system memory changes
    /// under its lock: read duplication write-protects a page under the same lock, and a
    /// duplication between the check and the `mprotect` would otherwise be opened again with its
    /// copy in place (a device reading stale bytes after the CPU's next write).
    fn protect_mprotect_backend(
        &self,
        range: PageRange,
        prot: Prot,
        regions: &[Arc<Region>],
    ) -> Result<(), MmError> {
        let mut at = range.start();
        for region in regions {
            let Some(sub) = region.range().intersect(&range) else {
                continue;
            };
            // Unmanaged memory before the region: the plain mprotect.
            if at < sub.start() {
                crate::os::protect(PageRange::from_bounds(at.0, sub.start().0)?, prot)?;
            }
            for a in sub.pages() {
                let i = region.index(a);
                crate::fault::lock_page(region, i);
                let st = region.states.get(i);
                let page_prot = match st.location {
                    Location::System if st.duplicated => Some(prot - Prot::WRITE),
                    Location::System | Location::Device { coherent: true, .. } => Some(prot),
                    _ => None,
                };
                let page = PageRange::new(a.0, hetmem_core::PAGE_SIZE)?;
                let r = page_prot.map_or(Ok(()), |p| crate::os::protect(page, p));
                crate::fault::unlock_page(region, i);
                r?;
            }
            at = sub.end();
        }
        if at < range.end() {
            crate::os::protect(PageRange::from_bounds(at.0, range.end().0)?, prot)?;
        }
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)` through hetmem: contents are discarded, device pages included.
    ///
    /// # Safety
    ///
    /// No Rust reference may point into `range` (its contents change to zeros).
    #[allow(unsafe_code)]
    pub unsafe fn discard(&self, range: PageRange) -> Result<(), MmError> {
        let _inv = self.invalidate_start(range, NotifyEvent::Clear);
        self.forget_within(range, NotifyEvent::Clear);
        Ok(self.with_self_zap(range, || crate::os::advise(range, mman::Advice::DontNeed))?)
    }

    /// `mremap` through hetmem: moves `[old, old + len)` to `new_addr` (or anywhere when `None`),
    /// keeping the old range mapped and empty when `dont_unmap`. Device-resident pages move with
    /// it. Returns the new range.
    ///
    /// # Safety
    ///
    /// As for `mremap(2)`: no Rust reference may point into the old range (or into the new one,
    /// which is replaced).
    #[allow(unsafe_code)]
    pub unsafe fn remap(
        &self,
        old: PageRange,
        new_addr: Option<u64>,
        dont_unmap: bool,
    ) -> Result<PageRange, MmError> {
        if let Some(a) = new_addr {
            let target = PageRange::new(a, old.len_bytes())?;
            if self
                .regions_in(target)
                .iter()
                .any(|r| r.range().overlaps(target.start(), target.end()))
            {
                self.forget(target, NotifyEvent::Unmap);
            }
        }
        self.notifiers.invalidate(NotifierRange::new(
            old.start(),
            old.end(),
            NotifyEvent::Unmap,
            None,
        ));
        // With userfaultfd the kernel reports the move as REMAP, followed by UNMAP of the old
        // range: the states must move when the REMAP is handled, before that UNMAP frees the
        // old range's device pages. So the event thread moves them, told by a mark whether the
        // old range stays mapped (the event does not say), and this thread waits for it.
        let key = (
            old.start().0,
            new_addr.unwrap_or(u64::MAX),
            old.len_bytes(),
            dont_unmap,
        );
        let tracked = self.uffd.is_some() && !self.regions_in(old).is_empty();
        if tracked {
            self.self_remaps.lock().push(key);
        }
        let result = crate::os::remap(old, old.len_bytes(), new_addr, dont_unmap);
        let moved = result.as_ref().is_ok_and(|&to| to as u64 != old.start().0);
        if tracked && !moved {
            // No move, no event: the mark would outlive it.
            let mut z = self.self_remaps.lock();
            if let Some(i) = z.iter().position(|k| *k == key) {
                z.swap_remove(i);
            }
        }
        let to = result? as u64;
        let new = PageRange::new(to, old.len_bytes())?;
        if tracked {
            self.sync_events();
        } else if moved {
            self.move_region_states(old.start().0, to, old.len_bytes(), dont_unmap);
        }
        Ok(new)
    }

    /// Runs `f` (which discards `range` itself) so that the REMOVE event it causes is not taken
    /// for the program's own madvise.
    pub(crate) fn with_self_zap<T, E>(
        &self,
        range: PageRange,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        // The mark is claimed by the event thread as it handles the REMOVE events (one per VMA
        // crossed): the madvise returns as soon as they are *read*, before they are handled, so
        // removing it here would race with the handling (see `zaps`).
        if self.uffd.is_none() {
            return f();
        }
        let id = self.self_zaps.lock().begin(range.start().0, range.end().0);
        let r = f();
        let batch = self.event_batch.load(Ordering::SeqCst);
        self.self_zaps.lock().finish(id, batch, r.is_err());
        r
    }

    /// Consumes the mark of hetmem's own mremap of `[from, from + len)` to `to`, if there is
    /// one: whether the old range stays mapped.
    pub(crate) fn take_self_remap(&self, from: u64, to: u64, len: u64) -> Option<bool> {
        let mut z = self.self_remaps.lock();
        let i = z
            .iter()
            .position(|&(f, t, l, _)| f == from && l == len && (t == to || t == u64::MAX))?;
        Some(z.swap_remove(i).3)
    }

    /// Consumes a self-zap covering `[start, end)`, if there is one.
    pub(crate) fn take_self_zap(&self, start: u64, end: u64) -> bool {
        let batch = self.event_batch.load(Ordering::SeqCst);
        self.self_zaps.lock().claim(start, end, batch)
    }

    // ----- devices -------------------------------------------------------------------------

    /// Attaches a device; returns the id its memory must use. `make` receives the id.
    pub fn attach_device<D: Device + 'static>(
        &self,
        make: impl FnOnce(hetmem_core::DeviceId) -> Result<Arc<D>, MmError>,
    ) -> Result<Arc<D>, MmError> {
        let mut devices = self.devices.write();
        let slot = devices
            .iter()
            .position(Option::is_none)
            .unwrap_or(devices.len());
        if slot >= 255 {
            return Err(MmError::TooManyDevices);
        }
        let dev = make(hetmem_core::DeviceId(slot as u8))?;
        if let Some(u) = &self.arena_uffd {
            let arena = dev.memory().arena();
            u.register(arena.base(), arena.len(), RegisterMode::WP)
                .map_err(|e| MmError::Backend(format!("userfaultfd arena registration: {e}")))?;
        }
        let as_dyn: Arc<dyn Device> = dev.clone();
        if slot == devices.len() {
            devices.push(Some(as_dyn));
        } else {
            devices[slot] = Some(as_dyn);
        }
        Ok(dev)
    }

    /// Detaches a device after evicting everything it holds.
    pub fn detach_device(&self, id: hetmem_core::DeviceId) -> Result<(), MmError> {
        self.evict_device(id)?;
        let mut devices = self.devices.write();
        match devices.get_mut(id.0 as usize) {
            Some(slot @ Some(_)) => {
                *slot = None;
                Ok(())
            }
            _ => Err(MmError::NoDevice(id)),
        }
    }

    /// The device with this id.
    pub fn device(&self, id: hetmem_core::DeviceId) -> Option<Arc<dyn Device>> {
        self.devices
            .read()
            .get(id.0 as usize)
            .and_then(Clone::clone)
    }

    /// The memory of the device with this id: [`AddressSpace::device`]'s lookup, without a
    /// reference to the device itself (the migration engine's per-run lookup).
    pub(crate) fn device_memory(
        &self,
        id: hetmem_core::DeviceId,
    ) -> Option<Arc<crate::device::DeviceMemory>> {
        self.devices
            .read()
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .map(|d| Arc::clone(d.memory()))
    }

    /// Moves every page held by device `id` back to system memory (device-wide eviction, the
    /// test device's RELEASE). Returns the pages moved.
    pub fn evict_device(
        &self,
        id: hetmem_core::DeviceId,
    ) -> Result<u64, crate::error::MigrateError> {
        let regions: Vec<_> = self.regions.read().values().cloned().collect();
        let mut moved = 0;
        for region in regions {
            moved += crate::migrate::evict_region_device(self, &region, Some(id))?;
        }
        Ok(moved)
    }

    /// Moves the pages of `range` held by device `dev` (any device when `None`) back to system
    /// memory: a runtime's eviction of a chosen victim. Pages outside managed memory are
    /// skipped. Returns the pages moved.
    pub fn evict_range(
        &self,
        range: PageRange,
        dev: Option<hetmem_core::DeviceId>,
    ) -> Result<u64, crate::error::MigrateError> {
        let mut moved = 0;
        for region in self.regions_in(range) {
            if let Some(sub) = region.range().intersect(&range) {
                moved += crate::migrate::evict_range_device(self, &region, sub, dev)?;
            }
        }
        Ok(moved)
    }

    /// Moves every device-held page back to system memory (seed 003's suspend; used before
    /// `fork()` so that the child sees every byte).
    pub fn evict_all(&self) -> Result<u64, crate::error::MigrateError> {
        let regions: Vec<_> = self.regions.read().values().cloned().collect();
        let mut moved = 0;
        for region in regions {
            moved += crate::migrate::evict_region_device(self, &region, None)?;
        }
        Ok(moved)
    }

    // ----- events --------------------------------------------------------------------------

    fn spawn_event_thread(self: &'static Arc<Self>) {
        if self.uffd.is_none() {
            return;
        }
        let mm: &'static AddressSpace = self;
        let h = std::thread::Builder::new()
            .name("hetmem-uffd-events".into())
            .spawn(move || crate::events::run(mm))
            .expect("spawn the userfaultfd event thread");
        *self.thread.lock() = Some(h);
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn shutdown_event(&self) -> &ShutdownEvent {
        &self.shutdown
    }

    /// Checks the invariants of every region's page states against the device pools, and of the
    /// notifiers.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.notifiers.check_invariants()?;
        let devices = self.devices.read().clone();
        for region in self.regions.read().values() {
            region.states.check_invariants(|dev, frame| {
                devices
                    .get(dev.0 as usize)
                    .and_then(|d| d.as_ref())
                    .is_some_and(|d| d.memory().pool().lock().is_allocated(frame))
            })?;
        }
        for d in devices.iter().flatten() {
            d.memory().pool().lock().check_invariants()?;
        }
        Ok(())
    }
}
