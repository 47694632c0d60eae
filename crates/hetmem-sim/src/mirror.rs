//! `MirrorDevice`: the kernel's test_hmm "dmirror" device in user space (lib/test_hmm.c,
//! ../shared/reference/hmm-tests.md §1).
//!
//! A [`DmirrorDevice`] is one device instance: device memory (private or coherent) with an owner
//! cookie. [`DmirrorDevice::open`] gives a [`Mirror`], the per-open state of the kernel driver: a
//! device page table keyed by virtual page number, an interval notifier over the whole address
//! space, the update lock, and the one-shot FAIL_ALLOC flag. The commands are the ioctls: read,
//! write, migrate to device, migrate to system, snapshot, exclusive, check exclusive, release,
//! flags, with the driver's `cpages` and `faults` semantics (`faults` counts fault *rounds*).
//!
//! The device reaches system memory only through the process's address space (fault-tolerant
//! `process_vm_readv/writev`, so a racing munmap fails the command instead of the process), and its
//! own memory through its arena.

use std::{
    collections::BTreeMap,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use hetmem::{
    region::Region, AddressSpace, Device, DeviceMemory, MigrateDriver, MigrateError, MmError,
};
use hetmem_core::{
    migrate::{MigrateEntry, MigrateFlags, PageLoc, SelectFlags},
    notifier::{IntervalNotifier, IntervalNotifierOps, NotifierRange, NotifyEvent},
    pfn::HmmPfn,
    pool::MemoryKind,
    range_fault::{HmmRange, RangeFaultError},
    DevPfn, DeviceId, Owner, PageRange, VirtAddr, PAGE_SIZE,
};
use parking_lot::Mutex;

/// Pages per fault window (the driver's 32-page `hmm_range` windows).
const FAULT_WINDOW: u64 = 32;
/// `HMM_RANGE_DEFAULT_TIMEOUT`.
const RANGE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Default device memory per instance.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;
/// Device memory for tests: small enough that many devices fit.
pub const DEFAULT_CAPACITY_FOR_TESTS: u64 = 64 << 20;

/// Errors of the commands, with the kernel driver's errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// `EINVAL`: bad arguments (unaligned, empty or wrapping range), no VMA, no read permission.
    #[error("invalid argument")]
    Invalid,
    /// `EFAULT`: a page cannot be made valid.
    #[error("bad address")]
    Fault,
    /// `EPERM`: write on read-only memory, or an exclusive entry found.
    #[error("operation not permitted")]
    Perm,
    /// `ENOENT`: a page is missing from the device page table after a migration.
    #[error("no such entry")]
    NoEnt,
    /// `EBUSY`: the range kept being invalidated for a second.
    #[error("busy")]
    Busy,
    /// `ENOMEM`.
    #[error("out of memory")]
    NoMem,
    /// `EOPNOTSUPP`: exclusive access on memory that is not anonymous.
    #[error("not supported")]
    NotSupported,
}

impl MirrorError {
    /// The errno the kernel driver returns.
    pub fn errno(self) -> i32 {
        match self {
            MirrorError::Invalid => 22,
            MirrorError::Fault => 14,
            MirrorError::Perm => 1,
            MirrorError::NoEnt => 2,
            MirrorError::Busy => 16,
            MirrorError::NoMem => 12,
            MirrorError::NotSupported => 95,
        }
    }
}

impl From<RangeFaultError> for MirrorError {
    fn from(e: RangeFaultError) -> Self {
        match e {
            RangeFaultError::Busy => MirrorError::Busy,
            RangeFaultError::Fault { .. } => MirrorError::Fault,
            RangeFaultError::Permission { .. } => MirrorError::Perm,
            RangeFaultError::NoMemory { .. } => MirrorError::NoMem,
            RangeFaultError::Invalid(_) => MirrorError::Invalid,
        }
    }
}

impl From<MigrateError> for MirrorError {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::Pool(_) => MirrorError::NoMem,
            MigrateError::NotManaged { .. } | MigrateError::Addr(_) => MirrorError::Invalid,
            _ => MirrorError::Fault,
        }
    }
}

/// `cpages` and `faults` of a successful command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdResult {
    /// Pages copied, migrated or snapshotted.
    pub cpages: u64,
    /// Device fault rounds (read and write).
    pub faults: u64,
}

/// `HMM_DMIRROR_PROT_*` snapshot bytes.
#[derive(Debug)]
pub struct SnapshotProt;

impl SnapshotProt {
    /// No valid entry possible.
    pub const ERROR: u8 = 0xFF;
    /// Not populated, or not valid for this device.
    pub const NONE: u8 = 0x00;
    /// Valid, read-only.
    pub const READ: u8 = 0x01;
    /// Valid, writable.
    pub const WRITE: u8 = 0x02;
    /// Mapped by a PMD.
    pub const PMD: u8 = 0x04;
    /// Mapped by a PUD.
    pub const PUD: u8 = 0x08;
    /// The zero page.
    pub const ZERO: u8 = 0x10;
    /// Device-private page of this device.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
    /// Device-private page of another device.
    pub const DEV_PRIVATE_REMOTE: u8 = 0x30;
    /// Device-coherent page of this device.
    pub const DEV_COHERENT_LOCAL: u8 = 0x40;
    /// Device-coherent page of another device.
    pub const DEV_COHERENT_REMOTE: u8 = 0x50;
}

bitflags::bitflags! {
    /// `HMM_DMIRROR_FLAG_*`.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct MirrorFlags: u64 {
        /// The next large allocation (device memory on the way in, system memory on the way out)
        /// fails once.
        const FAIL_ALLOC = 1 << 0;
    }
}

/// One device-page-table entry: what the device reaches at a virtual page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pte {
    /// System memory at this virtual address (also device-coherent memory, which the CPU maps).
    System { write: bool },
    /// A frame of this device's private memory.
    Device { frame: DevPfn, write: bool },
    /// Exclusive (atomic) access; the data waits in a frame.
    Atomic { frame: DevPfn },
}

/// Slots of a [`PageTable`] leaf: one 2 MiB block of virtual pages.
const LEAF_PAGES: usize = 512;

/// A device page table keyed by virtual page number (the driver's xarray): leaves of
/// [`LEAF_PAGES`] slots under an ordered map of leaves. Adding or erasing an entry is one leaf
/// lookup and a store, with no rebalancing of a map of every page (a CPU fault erases one entry),
/// and a range visits only the leaves that hold entries. A leaf whose last entry goes is freed.
#[derive(Debug, Default)]
struct PageTable {
    leaves: BTreeMap<u64, Box<Leaf>>,
    len: usize,
}

#[derive(Debug)]
struct Leaf {
    slots: [Option<Pte>; LEAF_PAGES],
    used: usize,
}

impl PageTable {
    fn split(vpn: u64) -> (u64, usize) {
        (vpn / LEAF_PAGES as u64, (vpn % LEAF_PAGES as u64) as usize)
    }

    fn get(&self, vpn: u64) -> Option<&Pte> {
        let (leaf, slot) = Self::split(vpn);
        self.leaves.get(&leaf)?.slots[slot].as_ref()
    }

    fn contains_key(&self, vpn: u64) -> bool {
        self.get(vpn).is_some()
    }

    fn insert(&mut self, vpn: u64, pte: Pte) {
        let (leaf, slot) = Self::split(vpn);
        let leaf = self.leaves.entry(leaf).or_insert_with(|| {
            Box::new(Leaf {
                slots: [None; LEAF_PAGES],
                used: 0,
            })
        });
        if leaf.slots[slot].replace(pte).is_none() {
            leaf.used += 1;
            self.len += 1;
        }
    }

    /// The leaves overlapping `vpns`, each with the slots of it that `vpns` covers.
    fn leaf_span(vpns: &std::ops::Range<u64>) -> Option<std::ops::RangeInclusive<u64>> {
        (vpns.start < vpns.end).then(|| Self::split(vpns.start).0..=Self::split(vpns.end - 1).0)
    }

    fn slots_of(leaf: u64, vpns: &std::ops::Range<u64>) -> std::ops::Range<usize> {
        let base = leaf * LEAF_PAGES as u64;
        let lo = vpns.start.max(base) - base;
        let hi = vpns.end.min(base + LEAF_PAGES as u64) - base;
        lo as usize..hi as usize
    }

    /// Erases every entry in `vpns`.
    fn remove_range(&mut self, vpns: std::ops::Range<u64>) {
        let Some(span) = Self::leaf_span(&vpns) else {
            return;
        };
        // Inline: a CPU fault empties at most one leaf.
        let mut emptied: smallvec::SmallVec<[u64; 2]> = smallvec::SmallVec::new();
        for (&k, leaf) in self.leaves.range_mut(span) {
            for slot in &mut leaf.slots[Self::slots_of(k, &vpns)] {
                if slot.take().is_some() {
                    leaf.used -= 1;
                    self.len -= 1;
                }
            }
            if leaf.used == 0 {
                emptied.push(k);
            }
        }
        for k in emptied {
            self.leaves.remove(&k);
        }
    }

    /// Does any entry in `vpns` satisfy `f`?
    fn any_in(&self, vpns: std::ops::Range<u64>, f: impl Fn(&Pte) -> bool) -> bool {
        let Some(span) = Self::leaf_span(&vpns) else {
            return false;
        };
        self.leaves.range(span).any(|(&k, leaf)| {
            leaf.slots[Self::slots_of(k, &vpns)]
                .iter()
                .flatten()
                .any(&f)
        })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.leaves.clear();
        self.len = 0;
    }
}

/// One device instance (`/dev/hmm_dmirrorN`).
pub struct DmirrorDevice {
    mem: Arc<DeviceMemory>,
    /// The page tables of the open mirrors (a mirror removes its own when dropped). Lock order:
    /// this list, then a page table.
    mirrors: Mutex<Vec<Arc<Mutex<PageTable>>>>,
    fail_alloc_once: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for DmirrorDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmirrorDevice")
            .field("mem", &self.mem)
            .finish_non_exhaustive()
    }
}

impl DmirrorDevice {
    /// Attaches a new device of `kind` with `capacity` bytes of memory to the process's address
    /// space.
    pub fn new(kind: MemoryKind, capacity: u64) -> Result<Arc<Self>, MmError> {
        let mm = AddressSpace::current()?;
        mm.attach_device(|id| {
            let owner = Owner(0xd317_0000 + id.0 as u64);
            let mem = DeviceMemory::new(id, owner, kind, capacity)?;
            Ok(Arc::new(DmirrorDevice {
                mem: Arc::new(mem),
                mirrors: Mutex::new(Vec::new()),
                fail_alloc_once: std::sync::atomic::AtomicBool::new(false),
            }))
        })
    }

    /// The device id.
    pub fn id(&self) -> DeviceId {
        self.mem.id()
    }
    /// The owner cookie.
    pub fn owner(&self) -> Owner {
        self.mem.owner()
    }
    /// Private or coherent.
    pub fn kind(&self) -> MemoryKind {
        self.mem.kind()
    }
    /// Pool counters (pages in use, calloc, cfree, page_in, page_out).
    pub fn pool_stats(&self) -> hetmem_core::pool::PoolStats {
        self.mem.pool().lock().stats()
    }

    /// Opens a mirror of the process's address space on this device.
    pub fn open(self: &Arc<Self>) -> Result<Mirror, MmError> {
        let mm = AddressSpace::current()?;
        let inner = Arc::new_cyclic(|weak: &Weak<MirrorInner>| {
            let ops: Weak<dyn IntervalNotifierOps> = weak.clone();
            // Its callback skips this device's own migrations (test_hmm.c): they do not call it.
            let sub = mm.notifiers().insert_skipping_own(
                VirtAddr(0),
                VirtAddr(!(PAGE_SIZE - 1)),
                ops,
                self.owner(),
            );
            MirrorInner {
                dev: Arc::clone(self),
                pt: Arc::new(Mutex::new(PageTable::default())),
                sub,
                flags: Mutex::new(MirrorFlags::empty()),
            }
        });
        self.mirrors.lock().push(Arc::clone(&inner.pt));
        Ok(Mirror { inner, mm })
    }

    /// Erases this device's page-table entries for `range` in every open mirror (the driver
    /// tearing down its own mappings during its own migration, whose invalidation it skips).
    fn erase_own(&self, range: PageRange) {
        // The tables are reached under the list's lock, without a reference taken to each: the
        // list holds them, and nothing but a table is dropped with it.
        let vpns = range.start().vpn()..range.end().vpn();
        for pt in self.mirrors.lock().iter() {
            pt.lock().remove_range(vpns.clone());
        }
    }
}

impl Device for DmirrorDevice {
    fn memory(&self) -> &Arc<DeviceMemory> {
        &self.mem
    }

    fn migrate_to_ram_in(
        &self,
        mm: &AddressSpace,
        region: &Arc<Region>,
        addr: VirtAddr,
    ) -> Result<(), MigrateError> {
        // The one-shot FAIL_ALLOC of a mirror makes the large system allocation fail: fall back
        // to the faulting base page only.
        // Read before it is taken: the flag is almost always clear, and a plain load keeps the
        // fault path free of a locked exchange. Only the swap takes it, so it is taken once.
        let split = self
            .fail_alloc_once
            .load(std::sync::atomic::Ordering::Acquire)
            && self
                .fail_alloc_once
                .swap(false, std::sync::atomic::Ordering::AcqRel);
        hetmem::fault::migrate_to_ram(
            mm,
            region,
            &self.mem,
            addr,
            split,
            &ToSystemDriver { dev: self },
        )
    }
}

/// Per-open state (`struct dmirror`).
struct MirrorInner {
    dev: Arc<DmirrorDevice>,
    pt: Arc<Mutex<PageTable>>,
    sub: Arc<IntervalNotifier>,
    flags: Mutex<MirrorFlags>,
}

impl IntervalNotifierOps for MirrorInner {
    fn invalidate(&self, sub: &IntervalNotifier, range: &NotifierRange, cur_seq: u64) -> bool {
        // Our own migration: the driver updates its page table itself (test_hmm.c).
        if range.event == NotifyEvent::Migrate && range.owner == Some(self.dev.owner()) {
            return true;
        }
        let mut pt = if range.blockable {
            self.pt.lock()
        } else {
            match self.pt.try_lock() {
                Some(g) => g,
                None => return false,
            }
        };
        sub.set_seq(cur_seq);
        pt.remove_range(range.start.vpn()..range.end.0.div_ceil(PAGE_SIZE));
        true
    }
}

/// An open mirror: the command interface.
pub struct Mirror {
    inner: Arc<MirrorInner>,
    mm: &'static Arc<AddressSpace>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("dev", &self.inner.dev.id())
            .finish_non_exhaustive()
    }
}

/// Validates `(addr, npages)` as the ioctl dispatcher does.
fn check(addr: u64, npages: u64) -> Result<PageRange, MirrorError> {
    if !addr.is_multiple_of(PAGE_SIZE) {
        return Err(MirrorError::Invalid);
    }
    let len = npages.checked_mul(PAGE_SIZE).ok_or(MirrorError::Invalid)?;
    PageRange::new(addr, len).map_err(|_| MirrorError::Invalid)
}

struct ToDeviceDriver<'a> {
    dev: &'a DmirrorDevice,
    fail_alloc: bool,
}

impl MigrateDriver for ToDeviceDriver<'_> {
    fn alloc_and_copy(&self, _range: PageRange, entries: &mut [MigrateEntry], compound: &[bool]) {
        let mut fail = self.fail_alloc;
        let mut pool = self.dev.mem.pool().lock();
        let mut k = 0;
        while k < entries.len() {
            if compound[k] {
                let n = hetmem_core::addr::PAGES_PER_HUGE as usize;
                let got = if fail {
                    fail = false;
                    None
                } else {
                    pool.alloc_huge().ok()
                };
                for j in 0..n {
                    let f = match got {
                        Some(base) => Some(DevPfn(base.0 + j as u32)),
                        // Fall back to single frames.
                        None => pool.alloc_page().ok(),
                    };
                    if let Some(frame) = f {
                        entries[k + j].dst = Some(PageLoc::Device {
                            dev: self.dev.id(),
                            frame,
                        });
                    }
                }
                k += n;
                continue;
            }
            if entries[k].migrates() {
                if fail {
                    fail = false;
                } else if let Ok(frame) = pool.alloc_page() {
                    entries[k].dst = Some(PageLoc::Device {
                        dev: self.dev.id(),
                        frame,
                    });
                }
            }
            k += 1;
        }
    }

    fn finalize(&self, _range: PageRange, _entries: &[MigrateEntry]) {}
}

struct ToSystemDriver<'a> {
    dev: &'a DmirrorDevice,
}

impl MigrateDriver for ToSystemDriver<'_> {
    fn alloc_and_copy(&self, range: PageRange, entries: &mut [MigrateEntry], _compound: &[bool]) {
        for e in entries.iter_mut().filter(|e| e.migrates()) {
            e.dst = Some(PageLoc::System);
        }
        self.dev.erase_own(range);
    }
    fn finalize(&self, _range: PageRange, _entries: &[MigrateEntry]) {}
}

impl Mirror {
    /// The device this mirror belongs to.
    pub fn device(&self) -> &Arc<DmirrorDevice> {
        &self.inner.dev
    }

    fn owner(&self) -> Owner {
        self.inner.dev.owner()
    }

    /// Copies present entries from the device page table into `buf`, from page `from`; returns
    /// the index of the first page without a usable entry.
    fn copy_from_pt(
        &self,
        range: PageRange,
        from: u64,
        buf: &mut [u8],
        write: Option<&[u8]>,
    ) -> Result<u64, MirrorError> {
        let pt = self.inner.pt.lock();
        let mem = &self.inner.dev.mem;
        let mut i = from;
        while i < range.npages() {
            let a = range.page(i);
            let off = (i * PAGE_SIZE) as usize;
            let page = off..off + PAGE_SIZE as usize;
            let Some(pte) = pt.get(a.vpn()) else { break };
            match (write, *pte) {
                (None, Pte::System { .. }) => {
                    hetmem_sys::dma::read_user(a.as_usize(), &mut buf[page])
                        .map_err(|_| MirrorError::Fault)?
                }
                (None, Pte::Device { frame, .. } | Pte::Atomic { frame }) => mem
                    .arena()
                    .read(DeviceMemory::frame_offset(frame), &mut buf[page])
                    .map_err(|_| MirrorError::Fault)?,
                (Some(data), Pte::System { write: true }) => {
                    hetmem::write_user(a.as_usize(), &data[page]).map_err(|_| MirrorError::Fault)?
                }
                (Some(data), Pte::Device { frame, write: true }) => mem
                    .arena()
                    .write(DeviceMemory::frame_offset(frame), &data[page])
                    .map_err(|_| MirrorError::Fault)?,
                (Some(_), _) => break,
            }
            i += 1;
        }
        Ok(i)
    }

    /// One fault round over `range` (windows of 32 pages, each with the retry protocol).
    fn fault_round(&self, range: PageRange, write: bool) -> Result<(), MirrorError> {
        let deadline = Instant::now() + RANGE_TIMEOUT;
        for window in range.chunks(FAULT_WINDOW * PAGE_SIZE) {
            loop {
                if Instant::now() > deadline {
                    return Err(MirrorError::Busy);
                }
                let mut flags = HmmPfn::REQ_FAULT;
                if write {
                    flags |= HmmPfn::REQ_WRITE;
                }
                let mut r = HmmRange::new(&self.inner.sub, window, flags);
                r.dev_private_owner = Some(self.owner());
                r.notifier_seq = self.inner.sub.read_begin();
                match self.mm.range_fault(&mut r) {
                    Ok(_) => {}
                    Err(RangeFaultError::Busy) => continue,
                    Err(e) => return Err(e.into()),
                }
                let mut pt = self.inner.pt.lock();
                if self.inner.sub.read_retry(r.notifier_seq) {
                    continue;
                }
                for (k, pfn) in r.hmm_pfns.iter().enumerate() {
                    let a = window.page(k as u64);
                    if write && !pfn.is_write() {
                        return Err(MirrorError::Fault);
                    }
                    let pte = match pfn.device_frame() {
                        Some((_, frame, false)) => Pte::Device {
                            frame,
                            write: pfn.is_write(),
                        },
                        _ => Pte::System {
                            write: pfn.is_write(),
                        },
                    };
                    pt.insert(a.vpn(), pte);
                }
                break;
            }
        }
        Ok(())
    }

    fn rw(
        &self,
        addr: u64,
        npages: u64,
        buf: &mut [u8],
        data: Option<&[u8]>,
    ) -> Result<CmdResult, MirrorError> {
        let range = check(addr, npages)?;
        let len = range.len_bytes() as usize;
        if buf.len() < len && data.is_none() || data.is_some_and(|d| d.len() < len) {
            return Err(MirrorError::Fault);
        }
        let mut bounce = vec![0u8; len];
        let mut done = 0;
        let mut faults = 0;
        loop {
            done = self.copy_from_pt(range, done, &mut bounce, data)?;
            if done == range.npages() {
                break;
            }
            let rest = PageRange::from_bounds(range.page(done).0, range.end().0)
                .map_err(|_| MirrorError::Invalid)?;
            self.fault_round(rest, data.is_some())?;
            faults += 1;
        }
        if data.is_none() {
            buf[..len].copy_from_slice(&bounce);
        }
        Ok(CmdResult {
            cpages: npages,
            faults,
        })
    }

    /// `HMM_DMIRROR_READ`: the device reads `npages` pages at `addr` into `buf`.
    pub fn read(&self, addr: u64, npages: u64, buf: &mut [u8]) -> Result<CmdResult, MirrorError> {
        self.rw(addr, npages, buf, None)
    }

    /// `HMM_DMIRROR_WRITE`: the device writes `data` to `npages` pages at `addr`.
    pub fn write(&self, addr: u64, npages: u64, data: &[u8]) -> Result<CmdResult, MirrorError> {
        self.rw(addr, npages, &mut [], Some(data))
    }

    /// VMA chunks of `[addr, end)` as the driver walks them: no VMA or no read permission is
    /// `EINVAL`; chunks stop at 512 pages and at VMA ends.
    fn vma_chunks(&self, range: PageRange) -> Result<Vec<PageRange>, MirrorError> {
        let vmas = self.mm.vmas(range).map_err(|_| MirrorError::Invalid)?;
        let mut out = Vec::new();
        let mut at = range.start().0;
        for v in &vmas {
            if v.start as u64 > at {
                return Err(MirrorError::Invalid);
            }
            if !v.read {
                return Err(MirrorError::Invalid);
            }
            let end = (v.end as u64).min(range.end().0);
            let sub = PageRange::from_bounds(at, end).map_err(|_| MirrorError::Invalid)?;
            out.extend(sub.chunks(hetmem_core::HUGE_PAGE_SIZE));
            at = end;
            if at >= range.end().0 {
                break;
            }
        }
        if at < range.end().0 {
            return Err(MirrorError::Invalid);
        }
        Ok(out)
    }

    /// `HMM_DMIRROR_MIGRATE_TO_DEV`: migrates the range into this device's memory, then reads it
    /// back from the device page table into `buf` (`ENOENT` when a page is not there).
    pub fn migrate_to_dev(
        &self,
        addr: u64,
        npages: u64,
        buf: &mut [u8],
    ) -> Result<CmdResult, MirrorError> {
        self.migrate_inner(addr, npages, buf, true)
    }

    fn migrate_inner(
        &self,
        addr: u64,
        npages: u64,
        buf: &mut [u8],
        readback: bool,
    ) -> Result<CmdResult, MirrorError> {
        let range = check(addr, npages)?;
        if readback && buf.len() < range.len_bytes() as usize {
            return Err(MirrorError::Fault);
        }
        let kind = self.inner.dev.kind();
        for chunk in self.vma_chunks(range)? {
            let fail_alloc = self.take_fail_alloc();
            let args = hetmem::migrate::MigrateArgs {
                range: chunk,
                select: SelectFlags::SYSTEM | SelectFlags::COMPOUND,
                owner: self.owner(),
                fault_page: None,
            };
            let mut m = match hetmem::migrate::MigrateVma::setup(self.mm, args) {
                Ok(m) => m,
                // Memory hetmem does not manage cannot migrate: nothing moves, as for shared memory.
                Err(MigrateError::NotManaged { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            if m.cpages() > 0 {
                m.alloc_and_copy(&ToDeviceDriver {
                    dev: &self.inner.dev,
                    fail_alloc,
                });
            }
            let c = m.pages();
            {
                let mut pt = self.inner.pt.lock();
                for (k, e) in c.entries().iter().enumerate() {
                    let Some(PageLoc::Device { frame, .. }) = e.dst else {
                        continue;
                    };
                    if !e.migrates() {
                        continue;
                    }
                    let write = e.flags.contains(MigrateFlags::VALID | MigrateFlags::WRITE);
                    let pte = match kind {
                        MemoryKind::DevicePrivate => Pte::Device { frame, write },
                        MemoryKind::DeviceCoherent => Pte::System { write },
                    };
                    pt.insert(chunk.page(k as u64).vpn(), pte);
                }
            }
            c.finalize();
        }
        // Pages already on this device count as present too.
        {
            let mut pt = self.inner.pt.lock();
            for a in range.pages() {
                if let Some(r) = self.mm.region_of(a) {
                    if let hetmem_core::page_state::Location::Device {
                        dev,
                        frame,
                        coherent,
                    } = r.states.get(r.index(a)).location
                    {
                        if dev == self.inner.dev.id() && !pt.contains_key(a.vpn()) {
                            let write = r.states.get(r.index(a)).write;
                            pt.insert(
                                a.vpn(),
                                if coherent {
                                    Pte::System { write }
                                } else {
                                    Pte::Device { frame, write }
                                },
                            );
                        }
                    }
                }
            }
        }
        if !readback {
            return Ok(CmdResult {
                cpages: npages,
                faults: 0,
            });
        }
        let mut tmp = vec![0u8; range.len_bytes() as usize];
        let got = self.copy_from_pt(range, 0, &mut tmp, None)?;
        if got < range.npages() {
            return Err(MirrorError::NoEnt);
        }
        buf[..tmp.len()].copy_from_slice(&tmp);
        Ok(CmdResult {
            cpages: npages,
            faults: 0,
        })
    }

    /// `HMM_DMIRROR_MIGRATE_TO_SYS`: brings this device's pages in the range back to system
    /// memory; `cpages` counts present pages moved.
    pub fn migrate_to_sys(&self, addr: u64, npages: u64) -> Result<CmdResult, MirrorError> {
        let range = check(addr, npages)?;
        let select = match self.inner.dev.kind() {
            MemoryKind::DevicePrivate => SelectFlags::DEVICE_PRIVATE,
            MemoryKind::DeviceCoherent => SelectFlags::DEVICE_COHERENT,
        } | SelectFlags::COMPOUND;
        let mut cpages = 0;
        for chunk in self.vma_chunks(range)? {
            if self.take_fail_alloc() {
                // The large system allocation fails: the driver moves base pages instead, which
                // for hetmem means the blocks lose their 2 MiB shape.
                self.inner
                    .dev
                    .fail_alloc_once
                    .store(false, std::sync::atomic::Ordering::Release);
            }
            let args = hetmem::migrate::MigrateArgs {
                range: chunk,
                select,
                owner: self.owner(),
                fault_page: None,
            };
            match hetmem::migrate::migrate(
                self.mm,
                args,
                &ToSystemDriver {
                    dev: &self.inner.dev,
                },
            ) {
                Ok((summary, _)) => cpages += summary.migrated_valid,
                Err(MigrateError::NotManaged { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(CmdResult { cpages, faults: 0 })
    }

    /// `HMM_DMIRROR_SNAPSHOT`: one protection byte per page, never faulting.
    pub fn snapshot(
        &self,
        addr: u64,
        npages: u64,
        out: &mut [u8],
    ) -> Result<CmdResult, MirrorError> {
        let range = check(addr, npages)?;
        if out.len() < npages as usize {
            return Err(MirrorError::Fault);
        }
        let me = self.inner.dev.id();
        let mut k0 = 0usize;
        for window in range.chunks(FAULT_WINDOW * PAGE_SIZE) {
            let deadline = Instant::now() + RANGE_TIMEOUT;
            let pfns = loop {
                if Instant::now() > deadline {
                    return Err(MirrorError::Busy);
                }
                let mut r = HmmRange::new(&self.inner.sub, window, 0);
                r.dev_private_owner = Some(self.owner());
                r.notifier_seq = self.inner.sub.read_begin();
                match self.mm.range_fault(&mut r) {
                    Ok(_) => {}
                    Err(RangeFaultError::Busy) => continue,
                    Err(e) => return Err(e.into()),
                }
                let _g = self.inner.pt.lock();
                if self.inner.sub.read_retry(r.notifier_seq) {
                    continue;
                }
                break r.hmm_pfns;
            };
            for (k, p) in pfns.iter().enumerate() {
                out[k0 + k] = prot_byte(*p, me);
            }
            k0 += pfns.len();
        }
        Ok(CmdResult {
            cpages: npages,
            faults: 0,
        })
    }

    /// `HMM_DMIRROR_EXCLUSIVE`: takes exclusive (atomic) access to the range and reads it.
    pub fn exclusive(
        &self,
        addr: u64,
        npages: u64,
        buf: &mut [u8],
    ) -> Result<CmdResult, MirrorError> {
        let range = check(addr, npages)?;
        let dev = self.inner.dev.id();
        for a in range.pages() {
            let page = PageRange::new(a.0, PAGE_SIZE).map_err(|_| MirrorError::Invalid)?;
            self.mm
                .make_device_exclusive(page, dev, None)
                .map_err(|e| match e {
                    MmError::NotManaged { .. } => MirrorError::NotSupported,
                    _ => MirrorError::Fault,
                })?;
            let mut pt = self.inner.pt.lock();
            // Install only if the grant still stands (a CPU touch may have revoked it already).
            if let Some(frame) = self.mm.exclusive_frame(a, dev) {
                pt.insert(a.vpn(), Pte::Atomic { frame });
            }
        }
        let mut tmp = vec![0u8; range.len_bytes() as usize];
        let mut done = 0;
        while done < range.npages() {
            done = self.copy_from_pt(range, done, &mut tmp, None)?;
            if done < range.npages() {
                // Revoked meanwhile: read through a normal fault round.
                let rest = PageRange::from_bounds(range.page(done).0, range.end().0)
                    .map_err(|_| MirrorError::Invalid)?;
                self.fault_round(rest, false)?;
            }
        }
        buf[..tmp.len()].copy_from_slice(&tmp);
        Ok(CmdResult {
            cpages: npages,
            faults: 0,
        })
    }

    /// `HMM_DMIRROR_CHECK_EXCLUSIVE`: `EPERM` if any atomic entry remains in the range.
    pub fn check_exclusive(&self, addr: u64, npages: u64) -> Result<CmdResult, MirrorError> {
        let range = check(addr, npages)?;
        let pt = self.inner.pt.lock();
        if pt.any_in(range.start().vpn()..range.end().vpn(), |p| {
            matches!(p, Pte::Atomic { .. })
        }) {
            return Err(MirrorError::Perm);
        }
        Ok(CmdResult::default())
    }

    /// `HMM_DMIRROR_RELEASE`: evicts every page of the device (all mirrors) to system memory.
    pub fn release(&self, addr: u64, npages: u64) -> Result<CmdResult, MirrorError> {
        check(addr, npages)?;
        self.mm.evict_device(self.inner.dev.id())?;
        Ok(CmdResult::default())
    }

    /// `HMM_DMIRROR_FLAGS`: sets the mirror's flags (the value travels in `npages`).
    ///
    /// The dispatcher validates `(addr, npages)` before any command runs, FLAGS included: a value
    /// of 0 is `npages == 0`, hence `EINVAL` (§1.6 dispatch rule 4).
    pub fn set_flags(&self, addr: u64, flags: u64) -> Result<CmdResult, MirrorError> {
        check(addr, flags)?;
        let f = MirrorFlags::from_bits_truncate(flags);
        *self.inner.flags.lock() = f;
        self.inner.dev.fail_alloc_once.store(
            f.contains(MirrorFlags::FAIL_ALLOC),
            std::sync::atomic::Ordering::Release,
        );
        Ok(CmdResult::default())
    }

    fn take_fail_alloc(&self) -> bool {
        let mut f = self.inner.flags.lock();
        let was = f.contains(MirrorFlags::FAIL_ALLOC);
        f.remove(MirrorFlags::FAIL_ALLOC);
        was
    }

    /// The mirror's interval notifier (for callers that run their own range faults).
    pub fn notifier(&self) -> &IntervalNotifier {
        &self.inner.sub
    }

    /// MIGRATE_TO_DEV without the verification read (benchmarks).
    pub fn migrate_to_dev_no_readback(
        &self,
        addr: u64,
        npages: u64,
    ) -> Result<CmdResult, MirrorError> {
        let mut buf = Vec::new();
        self.migrate_inner(addr, npages, &mut buf, false)
    }

    /// Number of entries in the device page table (for tests).
    pub fn pt_len(&self) -> usize {
        self.inner.pt.lock().len()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.mm.notifiers().remove(&self.inner.sub);
        // The v7.0 driver evicts the whole device on close.
        let _ = self.mm.evict_device(self.inner.dev.id());
        self.inner.pt.lock().clear();
        self.inner
            .dev
            .mirrors
            .lock()
            .retain(|pt| !Arc::ptr_eq(pt, &self.inner.pt));
    }
}

/// The driver's `mkentry`.
fn prot_byte(p: HmmPfn, me: DeviceId) -> u8 {
    if p.is_error() {
        return SnapshotProt::ERROR;
    }
    if !p.is_valid() {
        return SnapshotProt::NONE;
    }
    let mut b = match p.device_frame() {
        Some((dev, _, false)) => {
            if dev == me {
                SnapshotProt::DEV_PRIVATE_LOCAL
            } else {
                SnapshotProt::DEV_PRIVATE_REMOTE
            }
        }
        Some((dev, _, true)) => {
            if dev == me {
                SnapshotProt::DEV_COHERENT_LOCAL
            } else {
                SnapshotProt::DEV_COHERENT_REMOTE
            }
        }
        None if p.is_zero() => SnapshotProt::ZERO,
        None => 0,
    };
    b |= if p.is_write() {
        SnapshotProt::WRITE
    } else {
        SnapshotProt::READ
    };
    match p.map_order() {
        9 => b |= SnapshotProt::PMD,
        18 => b |= SnapshotProt::PUD,
        _ => {}
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, bool),
        Remove(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Virtual pages over four leaves, so that ranges cross leaf boundaries.
        let vpn = 0..4 * LEAF_PAGES as u64;
        prop_oneof![
            (vpn.clone(), any::<bool>()).prop_map(|(v, w)| Op::Insert(v, w)),
            (vpn, 0..700u64).prop_map(|(v, n)| Op::Remove(v, v + n)),
        ]
    }

    proptest! {
        /// The two-level table answers every query as a map of every page would.
        #[test]
        fn page_table_matches_a_plain_map(ops in proptest::collection::vec(op(), 1..200)) {
            let mut pt = PageTable::default();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(v, write) => {
                        pt.insert(v, Pte::System { write });
                        model.insert(v, Pte::System { write });
                    }
                    Op::Remove(a, b) => {
                        pt.remove_range(a..b);
                        model.retain(|k, _| !(a..b).contains(k));
                    }
                }
                prop_assert_eq!(pt.len(), model.len());
                // No empty leaf is kept, and each counts its entries.
                for leaf in pt.leaves.values() {
                    prop_assert!(leaf.used > 0);
                    prop_assert_eq!(leaf.used, leaf.slots.iter().flatten().count());
                }
                for v in 0..4 * LEAF_PAGES as u64 {
                    prop_assert_eq!(pt.get(v), model.get(&v));
                }
                prop_assert_eq!(
                    pt.any_in(100..900, |p| matches!(p, Pte::System { write: true })),
                    model.range(100..900).any(|(_, p)| matches!(p, Pte::System { write: true }))
                );
            }
            pt.clear();
            prop_assert_eq!(pt.len(), 0);
            prop_assert!(!pt.contains_key(0));
        }
    }
}
