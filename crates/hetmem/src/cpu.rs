//! The CPU side of range fault over this process's real memory: [`CpuMm`] read from
//! `/proc/self/maps` (VMAs and their permissions), PAGEMAP_SCAN / pagemap (present, zero page,
//! THP, exclusive) and hetmem's page states (device-resident and exclusive pages), and faults
//! carried out with MADV_POPULATE_READ/WRITE, userfaultfd zero fills and migration back to RAM.
//!
//! It works on any memory of the process (anonymous private or shared, file-backed, THP), not
//! only managed regions, as `hmm_range_fault` does.

use hetmem_core::{
    page_state::Location,
    range_fault::{range_fault, CpuMm, CpuPte, HmmRange, RangeFaultError, RangeFaultStats},
    PageRange, VirtAddr, PAGE_SIZE,
};
use hetmem_sys::{
    maps::{self, Vma, VmaName},
    pagemap::PageCategory,
    uffd::UffdError,
};

use crate::{
    fault::{lock_page, populate_empty_block, unlock_page},
    mm::{prot_from_bits, AddressSpace, CpuFaultBackend},
    os,
};

fn inaccessible(v: &Vma) -> bool {
    !v.read
        || matches!(&v.name, VmaName::Special(s) if s == "[vvar]" || s == "[vsyscall]" || s == "[vvar_vclock]")
}

impl CpuMm for AddressSpace {
    fn snapshot(&self, range: PageRange, out: &mut Vec<CpuPte>) -> Result<(), RangeFaultError> {
        out.clear();
        let n = range.npages() as usize;
        let vmas = maps::read_maps_range(range.start().as_usize(), range.end().as_usize())
            .map_err(|_| RangeFaultError::Fault {
                addr: range.start(),
            })?;
        let mut cats = vec![PageCategory::empty(); n];
        let mut entries = vec![hetmem_sys::pagemap::PagemapEntry(0); n];
        // Only where a VMA exists: the kernel refuses to scan holes in one go.
        for v in &vmas {
            let s = (v.start as u64).max(range.start().0);
            let e = (v.end as u64).min(range.end().0);
            if s >= e {
                continue;
            }
            let k = range.index_of(VirtAddr(s)) as usize;
            let cnt = ((e - s) / PAGE_SIZE) as usize;
            let _ = self
                .pagemap
                .read()
                .page_flags(s as usize, cnt, &mut cats[k..k + cnt]);
            let _ = self
                .pagemap
                .read()
                .read(s as usize, &mut entries[k..k + cnt]);
        }
        let mut vi = 0;
        for (k, a) in range.pages().enumerate() {
            while vi < vmas.len() && (vmas[vi].end as u64) <= a.0 {
                vi += 1;
            }
            let Some(v) = vmas.get(vi).filter(|v| v.start as u64 <= a.0) else {
                out.push(CpuPte::NoVma);
                continue;
            };
            let region = self.region_of(a);
            let patched;
            let v = match &region {
                Some(r) if self.backend == CpuFaultBackend::Mprotect => {
                    // Device-resident pages are PROT_NONE in the kernel's eyes; the protection
                    // the program asked for is the recorded one.
                    let p = r.states.prot(r.index(a));
                    patched = Vma {
                        read: p & 1 != 0,
                        write: p & 2 != 0,
                        ..v.clone()
                    };
                    &patched
                }
                _ => v,
            };
            let mut dup = false;
            if let Some(region) = region {
                let st = region.states.get(region.index(a));
                dup = st.duplicated;
                match st.location {
                    Location::Device {
                        dev,
                        frame,
                        coherent,
                    } => {
                        if inaccessible(v) {
                            out.push(CpuPte::Inaccessible);
                            continue;
                        }
                        let owner = self.device(dev).map(|d| d.memory().owner());
                        match owner {
                            Some(owner) => out.push(CpuPte::Device {
                                dev,
                                owner,
                                frame,
                                write: st.write && v.write,
                                coherent,
                                order: if st.huge {
                                    hetmem_core::addr::HUGE_ORDER
                                } else {
                                    0
                                },
                                vma_write: v.write,
                            }),
                            None => out.push(CpuPte::None { vma_write: v.write }),
                        }
                        continue;
                    }
                    Location::Exclusive { .. } => {
                        out.push(if inaccessible(v) {
                            CpuPte::Inaccessible
                        } else {
                            CpuPte::Exclusive { vma_write: v.write }
                        });
                        continue;
                    }
                    Location::System => {}
                }
            }
            if inaccessible(v) {
                out.push(CpuPte::Inaccessible);
                continue;
            }
            let c = cats[k];
            let pm = entries[k];
            if c.contains(PageCategory::PRESENT) || pm.present() {
                let zero = c.contains(PageCategory::PFNZERO);
                let file = pm.file_or_shared_anon() && !v.shared;
                // A private page is writable when it is ours alone (no copy-on-write pending);
                // a shared one when the mapping is.
                // A duplicated page is read-only for every mirror until a write collapses it, and
                // so is a page still write-protected for the CPU.
                let write = v.write
                    && !zero
                    && !dup
                    && !pm.uffd_wp()
                    && (v.shared || (!file && pm.exclusive()));
                let order = if c.contains(PageCategory::HUGE) {
                    hetmem_core::addr::HUGE_ORDER
                } else {
                    0
                };
                out.push(CpuPte::Present {
                    write,
                    zero,
                    order,
                    vma_write: v.write,
                });
            } else {
                out.push(CpuPte::None { vma_write: v.write });
            }
        }
        Ok(())
    }

    fn fault(&self, range: PageRange, write: bool) -> Result<(), RangeFaultError> {
        fault_range(self, range, write)
    }
}

/// Makes every page of `range` present in system memory (writable if `write`): device pages come
/// back, exclusive grants end, holes of managed memory are zero-filled, the rest goes through
/// MADV_POPULATE_READ/WRITE (the kernel's own fault path, COW breaks included).
pub(crate) fn fault_range(
    mm: &AddressSpace,
    range: PageRange,
    write: bool,
) -> Result<(), RangeFaultError> {
    match fault_range_once(mm, range, write) {
        Err(RangeFaultError::Fault { .. }) => fault_pages_locked(mm, range, write),
        r => r,
    }
}

/// The slow path of a fault whose populate failed (a page migrated, or was being migrated, between
/// the checks and the populate; a read copy was made of it again): page by page, each managed
/// system page under its lock, so that no migration, read duplication or collapse runs between
/// making it accessible and populating it. A populate that fails on a managed page opens a protection left
/// behind (a write-protect that outlived its duplication, a read-only mprotect of a migration that
/// ended) and tries again. Userfaultfd refuses protection changes (EAGAIN) while one of its events
/// waits to be read: such a page is retried, its lock released meanwhile, for a bounded time.
fn fault_pages_locked(
    mm: &AddressSpace,
    range: PageRange,
    write: bool,
) -> Result<(), RangeFaultError> {
    let populate = |a: VirtAddr| populate(PageRange::new(a.0, PAGE_SIZE).expect("page"), write);
    for a in range.pages() {
        let Some(region) = mm.region_of(a) else {
            populate(a)?;
            continue;
        };
        let i = region.index(a);
        let p = PageRange::new(a.0, PAGE_SIZE).expect("page");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            // Back in system memory first, as in the fast path (which may lose the same race).
            match fault_range_once(mm, p, false) {
                Err(RangeFaultError::Fault { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::yield_now();
                    continue;
                }
                r => r?,
            }
            lock_page(&region, i);
            if region.states.get(i).location != Location::System {
                // Moved to a device again meanwhile.
                unlock_page(&region, i);
                continue;
            }
            if write {
                crate::dup::collapse(mm, &region, i, a);
            }
            let mut r = if write && region.states.get(i).duplicated {
                Err(RangeFaultError::Fault { addr: a })
            } else {
                populate(a)
            };
            if r.is_err() && write && !region.states.get(i).duplicated && !mm.is_forked_child() {
                let opened = match (mm.backend, &mm.uffd) {
                    (CpuFaultBackend::Userfaultfd, Some(u)) => u
                        .write_protect(a.as_usize(), PAGE_SIZE as usize, false)
                        .is_ok(),
                    (CpuFaultBackend::Mprotect, _) => {
                        os::protect(p, prot_from_bits(region.states.prot(i))).is_ok()
                    }
                    _ => false,
                };
                if opened {
                    r = populate(a);
                }
            }
            unlock_page(&region, i);
            match r {
                Err(RangeFaultError::Fault { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::yield_now();
                }
                r => {
                    r?;
                    break;
                }
            }
        }
    }
    Ok(())
}

fn fault_range_once(
    mm: &AddressSpace,
    range: PageRange,
    write: bool,
) -> Result<(), RangeFaultError> {
    for a in range.pages() {
        let Some(region) = mm.region_of(a) else {
            continue;
        };
        let i = region.index(a);
        loop {
            match region.states.get(i).location {
                Location::Device {
                    dev,
                    coherent: false,
                    ..
                } => {
                    let d = mm.device(dev).ok_or(RangeFaultError::Fault { addr: a })?;
                    d.migrate_to_ram(mm, a)?;
                }
                Location::Exclusive { .. } => crate::fault::restore_exclusive(mm, &region, a)?,
                _ => break,
            }
        }
        if write {
            crate::dup::collapse_locking(mm, &region, a);
        }
        // (Not in a forked child: its memory is not registered, and the inherited userfaultfd
        // acts on the parent's address space.)
        if mm.backend == CpuFaultBackend::Userfaultfd
            && !region.is_shared()
            && !mm.is_forked_child()
        {
            // Holes of MISSING-registered memory cannot be populated by the kernel's fault path
            // in SIGBUS mode: fill them here, under the page lock.
            if let Some(uffd) = &mm.uffd {
                lock_page(&region, i);
                if region.states.get(i).location == Location::System {
                    let r = if populate_empty_block(mm, uffd, &region, a, write) {
                        Ok(PAGE_SIZE as usize)
                    } else if write {
                        os::uffd_copy(
                            uffd,
                            a.as_usize(),
                            os::ZERO_PAGE.as_ptr() as usize,
                            PAGE_SIZE as usize,
                        )
                    } else {
                        uffd.zeropage(a.as_usize(), PAGE_SIZE as usize)
                    };
                    match r {
                        Ok(_) => mm.stats.add(&mm.stats.zero_fills, 1),
                        Err(UffdError::Exists | UffdError::Again { .. }) => {}
                        Err(_) => {}
                    }
                }
                if region.states.unlock(i) {
                    hetmem_sys::futex::wake(region.states.word(i), u32::MAX);
                }
            }
        }
    }
    populate(range, write)
}

/// MADV_POPULATE_READ/WRITE over `range`, its errors as range fault's.
fn populate(range: PageRange, write: bool) -> Result<(), RangeFaultError> {
    let addr = range.start();
    hetmem_sys::mman::populate(addr.as_usize(), range.len_bytes() as usize, write).map_err(|e| {
        match e.errno() {
            Some(12) => RangeFaultError::NoMemory { addr },
            _ => RangeFaultError::Fault { addr },
        }
    })
}

impl AddressSpace {
    /// `hmm_range_fault` over this process's memory.
    pub fn range_fault(
        &self,
        range: &mut HmmRange<'_>,
    ) -> Result<RangeFaultStats, RangeFaultError> {
        range_fault(self, range)
    }
}

impl AddressSpace {
    /// The VMAs overlapping `range` (from `/proc/self/maps`), with the protection the program
    /// asked for where hetmem changed it (device-resident pages under the mprotect backend).
    pub fn vmas(&self, range: PageRange) -> Result<Vec<Vma>, hetmem_sys::SysError> {
        let mut vmas = maps::read_maps_range(range.start().as_usize(), range.end().as_usize())?;
        if self.backend == CpuFaultBackend::Mprotect {
            for v in &mut vmas {
                let a = VirtAddr((v.start as u64).max(range.start().0));
                if let Some(r) = self.region_of(a) {
                    let p = r.states.prot(r.index(a));
                    v.read = p & 1 != 0;
                    v.write = p & 2 != 0;
                }
            }
        }
        Ok(vmas)
    }

    /// Brings every page of `range` into system memory, writable if `write` (the explicit "make
    /// resident" a program calls before a system call or a DMA touches managed memory: kernel-mode
    /// accesses to device-resident pages fail with EFAULT instead of faulting).
    pub fn make_resident(&self, range: PageRange, write: bool) -> Result<(), RangeFaultError> {
        fault_range(self, range, write)
    }

    /// Copies `buf.len()` bytes from `addr` as the CPU sees them (device pages come back first).
    pub fn cpu_read(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), RangeFaultError> {
        self.cpu_copy(addr, buf.len(), false, |a, off, len| {
            hetmem_sys::dma::read_user(a, &mut buf[off..off + len]).is_ok()
        })
    }

    /// Copies `data` to `addr` as the CPU would write it (device pages come back first).
    pub fn cpu_write(&self, addr: VirtAddr, data: &[u8]) -> Result<(), RangeFaultError> {
        self.cpu_copy(addr, data.len(), true, |a, off, len| {
            os::write_user(a, &data[off..off + len]).is_ok()
        })
    }

    fn cpu_copy(
        &self,
        addr: VirtAddr,
        len: usize,
        write: bool,
        mut copy: impl FnMut(usize, usize, usize) -> bool,
    ) -> Result<(), RangeFaultError> {
        let mut off = 0usize;
        while off < len {
            let a = addr.0 + off as u64;
            let page = VirtAddr(a).page_down();
            let n = ((page.0 + PAGE_SIZE - a) as usize).min(len - off);
            let pr =
                PageRange::new(page.0, PAGE_SIZE).map_err(|_| RangeFaultError::Invalid("addr"))?;
            let mut tries = 0;
            loop {
                fault_range(self, pr, write)?;
                if copy(a as usize, off, n) {
                    break;
                }
                // Migrated away between the fault and the copy: again, a bounded number of times.
                tries += 1;
                if tries > 100 {
                    return Err(RangeFaultError::Fault { addr: page });
                }
            }
            off += n;
        }
        Ok(())
    }
}
