//! CPU faults on managed memory (the kernel's `do_swap_page` → `migrate_to_ram` path, and the
//! restore of device-exclusive entries).
//!
//! The handler runs in the faulting thread, from the SIGBUS (userfaultfd) or SIGSEGV (mprotect)
//! signal: no thread hop, 3-5 µs on this machine against 30-130 µs for a handler thread
//! (ecosystem.md §1.1). It holds no lock when it starts (see the lock order in `mm`), waits on a
//! page's lock with a futex, asks the owning device to bring a device-private page back, fills a
//! hole with zeros, and returns so the access re-executes.

use std::sync::Arc;

use hetmem_core::{
    notifier::{NotifierRange, NotifyEvent},
    page_state::{DevicePlacement, Location},
    DevPfn, DeviceId, Owner, PageRange, VirtAddr, PAGE_SIZE,
};
use hetmem_sys::{
    signal::{FaultInfo, FaultSignal},
    uffd::UffdError,
};

use crate::{
    device::DeviceMemory,
    error::{MigrateError, MmError},
    mm::{prot_from_bits, AddressSpace, CpuFaultBackend},
    os,
    region::Region,
};

static MM: std::sync::OnceLock<&'static AddressSpace> = std::sync::OnceLock::new();

pub(crate) fn install(mm: &'static Arc<AddressSpace>) -> Result<(), MmError> {
    let _ = MM.set(mm);
    hetmem_sys::signal::install_fault_handler(on_fault)?;
    Ok(())
}

fn on_fault(info: &FaultInfo) -> bool {
    let Some(mm) = MM.get() else { return false };
    let ok = mm.handle_cpu_fault(VirtAddr(info.addr as u64), info.write, info.signal);
    if !ok && std::env::var_os("HETMEM_DEBUG_FAULTS").is_some() {
        eprintln!("hetmem: unhandled {info:?}");
    }
    ok
}

/// Takes page `i`'s lock, waiting (futex) while someone else holds it.
pub(crate) fn lock_page(region: &Region, i: usize) {
    while !region.states.try_lock(i) {
        if let Some(v) = region.states.prepare_wait(i) {
            hetmem_sys::futex::wait(
                region.states.word(i),
                v,
                Some(std::time::Duration::from_millis(5)),
            );
        }
    }
}

pub(crate) fn unlock_page(region: &Region, i: usize) {
    if region.states.unlock(i) {
        hetmem_sys::futex::wake(region.states.word(i), u32::MAX);
    }
}

/// Userfaultfd backend, first touch of an empty 2 MiB block: populates `page` through the
/// kernel's own fault path, as it would be populated without userfaultfd, so that a THP-eligible
/// mapping (`MADV_HUGEPAGE`, or THP `always`) gets a transparent huge page (the huge zero page on
/// a read) and any other mapping a base page. The kernel's fault path cannot run on a
/// MISSING-registered range in SIGBUS mode, UFFDIO_COPY and UFFDIO_ZEROPAGE install base pages
/// only, and hetmem cannot read a VMA's THP advice cheaply (`smaps` walks page tables): so the
/// block leaves the userfaultfd for the duration of one `MADV_POPULATE_*`, with every one of its
/// pages locked, which keeps hetmem's migrations and faults away from it meanwhile.
///
/// The caller holds the lock of `page`, a system hole of `region` (a private region). Returns
/// false, having changed nothing, when the block is not wholly inside the region, not all holes
/// and unlocked system pages, or the kernel's fault path failed (the caller then fills the page
/// itself).
pub(crate) fn populate_empty_block(
    mm: &AddressSpace,
    uffd: &hetmem_sys::uffd::Uffd,
    region: &Region,
    page: VirtAddr,
    write: bool,
) -> bool {
    const N: usize = hetmem_core::addr::PAGES_PER_HUGE as usize;
    let base = page.huge_down();
    let Ok(block) = PageRange::new(base.0, hetmem_core::HUGE_PAGE_SIZE) else {
        return false;
    };
    // A forked child's userfaultfd is the parent's: never (un)register through it.
    if region.is_shared() || !region.range().contains_range(&block) || mm.is_forked_child() {
        return false;
    }
    // All holes: a pagemap read on the faulting thread's stack (no allocation in signal context),
    // before taking the locks (the common case, a block already populated, stops here) and again
    // under them (with every page locked, nothing populates the block behind our back: a CPU
    // touch waits in this handler, a kernel access to a hole fails).
    let empty = || {
        let mut pm = [hetmem_sys::pagemap::PagemapEntry(0); N];
        mm.pagemap
            .read()
            .read(block.start().as_usize(), &mut pm)
            .is_ok()
            && pm.iter().all(|e| !e.present() && !e.swapped())
    };
    if !empty() {
        return false;
    }
    let first = region.index(block.start());
    let me = region.index(page);
    let unlock_taken = |n: usize| {
        for j in (first..first + n).filter(|&j| j != me) {
            unlock_page(region, j);
        }
    };
    let mut taken = 0;
    for j in first..first + N {
        if j != me {
            if !region.states.try_lock(j) {
                break;
            }
            if region.states.get(j).location != Location::System {
                unlock_page(region, j);
                break;
            }
        }
        taken += 1;
    }
    if taken < N || !empty() {
        unlock_taken(taken);
        return false;
    }
    let (addr, len) = (block.start().as_usize(), block.len_bytes() as usize);
    if uffd.unregister(addr, len).is_err() {
        unlock_taken(N);
        return false;
    }
    let populated = hetmem_sys::mman::populate(page.as_usize(), PAGE_SIZE as usize, write).is_ok();
    reregister_block(uffd, block);
    unlock_taken(N);
    populated
}

/// Puts `block` back on the userfaultfd after [`populate_empty_block`]. A page that stayed mapped
/// but cannot be registered again would later lose data (a CPU touch after its data moved to a
/// device would read fresh zeros): that is fatal, not an error to report.
fn reregister_block(uffd: &hetmem_sys::uffd::Uffd, block: PageRange) {
    use hetmem_sys::uffd::RegisterMode;
    let mode = RegisterMode::MISSING | RegisterMode::WP;
    for _ in 0..3 {
        if uffd
            .register(block.start().as_usize(), block.len_bytes() as usize, mode)
            .is_ok()
        {
            return;
        }
        std::thread::yield_now();
    }
    // Part of the block was unmapped meanwhile (or the kernel is out of memory): page by page,
    // skipping pages no longer mapped.
    for a in block.pages() {
        if uffd
            .register(a.as_usize(), PAGE_SIZE as usize, mode)
            .is_err()
            && hetmem_sys::maps::read_maps_range(a.as_usize(), a.as_usize() + PAGE_SIZE as usize)
                .map_or(true, |v| !v.is_empty())
        {
            tracing::error!(%a, "managed page cannot be registered with userfaultfd again");
            std::process::abort();
        }
    }
}

impl AddressSpace {
    /// Handles a CPU fault at `addr`. Returns false when the fault is not hetmem's (outside
    /// managed memory, or a genuine protection violation): the previous handler then runs.
    pub(crate) fn handle_cpu_fault(
        &self,
        addr: VirtAddr,
        write: Option<bool>,
        sig: FaultSignal,
    ) -> bool {
        if self.forked() {
            // The child of a fork: its pages are plain memory, the userfaultfd is the parent's.
            return false;
        }
        let page = addr.page_down();
        let _trigger = crate::migrate::TriggerScope::cpu_fault(write == Some(true));
        let mut synced = false;
        loop {
            // Read before the lookup: a migration uses the region only if no event batch began
            // or ended since (`sync_events_since`).
            let seen = self.events_seen();
            let Some(region) = self.region_of(page) else {
                // An mremap's REMAP event may be read but not yet handled: wait for it once.
                if !synced && self.uffd.is_some() {
                    synced = true;
                    self.sync_events();
                    continue;
                }
                if std::env::var_os("HETMEM_DEBUG_FAULTS").is_some() {
                    eprintln!("hetmem: no region at {page}");
                }
                return false;
            };
            let i = region.index(page);
            let st = region.states.get(i);
            if st.locked {
                if let Some(v) = region.states.prepare_wait(i) {
                    hetmem_sys::futex::wait(
                        region.states.word(i),
                        v,
                        Some(std::time::Duration::from_millis(5)),
                    );
                }
                continue;
            }
            match st.location {
                Location::Device {
                    dev,
                    coherent: false,
                    ..
                } => {
                    // The region goes on to the migration, which must not use one looked up
                    // while a discard or unmap was pending (see `Device::migrate_to_ram`): it
                    // is looked up again when an event batch ran meanwhile.
                    if self.sync_events_since(seen) {
                        continue;
                    }
                    let Some(d) = self.device(dev) else {
                        return false;
                    };
                    self.stats.add(&self.stats.cpu_fault_migrations, 1);
                    if let Err(e) = d.migrate_to_ram_in(self, &region, page) {
                        if std::env::var_os("HETMEM_DEBUG_FAULTS").is_some() {
                            eprintln!("hetmem: migrate_to_ram at {page} failed: {e}");
                        }
                        return false;
                    }
                    // The page is back, mapped with its protection: let the access re-execute.
                    // (Had a concurrent migration kept it, the access faults again and waits.)
                    return true;
                }
                Location::Exclusive { .. } => {
                    return restore_exclusive(self, &region, page).is_ok();
                }
                Location::System | Location::Device { coherent: true, .. } => {
                    return self.fault_system_page(&region, i, page, write, sig);
                }
            }
        }
    }

    fn fault_system_page(
        &self,
        region: &Arc<Region>,
        i: usize,
        page: VirtAddr,
        write: Option<bool>,
        sig: FaultSignal,
    ) -> bool {
        let prot = region.states.prot(i);
        match self.backend {
            CpuFaultBackend::Userfaultfd => {
                if sig != FaultSignal::Bus {
                    return false;
                }
                let Some(uffd) = &self.uffd else { return false };
                if !region.states.try_lock(i) {
                    return true; // someone is working on it: retry the access
                }
                if !matches!(
                    region.states.get(i).location,
                    Location::System | Location::Device { coherent: true, .. }
                ) {
                    unlock_page(region, i);
                    return true;
                }
                // A write to a duplicated page: the devices' copies go first. (Unknown access:
                // collapsing is always safe.)
                if write.unwrap_or(true) && region.states.get(i).duplicated {
                    crate::dup::collapse(self, region, i, page);
                    unlock_page(region, i);
                    self.stats.add(&self.stats.cpu_faults, 1);
                    return true;
                }
                let va = page.as_usize();
                let write = write.unwrap_or(true) && prot & 2 != 0;
                let r = if region.states.get(i).location == Location::System
                    && populate_empty_block(self, uffd, region, page, write)
                {
                    Ok(PAGE_SIZE as usize)
                } else if write {
                    os::uffd_copy(
                        uffd,
                        va,
                        os::ZERO_PAGE.as_ptr() as usize,
                        PAGE_SIZE as usize,
                    )
                } else {
                    uffd.zeropage(va, PAGE_SIZE as usize)
                };
                let ok = match r {
                    Ok(_) => {
                        self.stats.add(&self.stats.zero_fills, 1);
                        true
                    }
                    // Present already: a write-protect left behind; open it (collapsing the
                    // page if it is duplicated: never open a page devices hold copies of).
                    Err(UffdError::Exists) if region.states.get(i).duplicated => {
                        crate::dup::collapse(self, region, i, page);
                        true
                    }
                    Err(UffdError::Exists) => {
                        match uffd.write_protect(va, PAGE_SIZE as usize, false) {
                            Ok(()) => true,
                            // The address space is changing (an event not read yet): retry.
                            Err(e) if e.errno() == Some(11) => true,
                            Err(e) => {
                                if std::env::var_os("HETMEM_DEBUG_FAULTS").is_some() {
                                    eprintln!("hetmem: unprotect at {page} failed: {e}");
                                }
                                false
                            }
                        }
                    }
                    Err(UffdError::Again { .. }) => true,
                    Err(e) => {
                        if std::env::var_os("HETMEM_DEBUG_FAULTS").is_some() {
                            eprintln!("hetmem: zero fill at {page} failed: {e}");
                        }
                        false
                    }
                };
                unlock_page(region, i);
                self.stats.add(&self.stats.cpu_faults, 1);
                ok
            }
            CpuFaultBackend::Mprotect => {
                let need = if write.unwrap_or(false) { 2 } else { 1 };
                if prot & need == 0 {
                    return false; // the program's own protection: a genuine fault
                }
                // A protection left over from a migration that ended: restore it, under the
                // page lock. Without it, a migration that locks the page after we looked at its
                // state could have its write stop undone here, and a write landing after its
                // copy would be lost.
                if !region.states.try_lock(i) {
                    return true; // someone is working on it: retry the access
                }
                let ok = match region.states.get(i).location {
                    Location::System | Location::Device { coherent: true, .. } => {
                        // A write (or an access of unknown kind) to a duplicated page collapses
                        // it, which restores the protection; a read keeps it read-only.
                        let mut prot = prot;
                        if region.states.get(i).duplicated {
                            if write == Some(false) {
                                prot &= !2;
                            } else {
                                crate::dup::collapse(self, region, i, page);
                            }
                        }
                        let p = PageRange::new(page.0, PAGE_SIZE).expect("page");
                        self.stats.add(&self.stats.cpu_faults, 1);
                        os::protect(p, prot_from_bits(prot)).is_ok()
                    }
                    // It left for a device meanwhile: the retried access faults it back.
                    _ => true,
                };
                unlock_page(region, i);
                ok
            }
        }
    }

    /// Grants device `dev` exclusive (atomic) access to every page of `range`
    /// (`make_device_exclusive`): each page is faulted in writable, other mirrors are
    /// invalidated, and the CPU loses access until it touches the page again. Returns the frame
    /// holding each page's data while the grant lasts.
    pub fn make_device_exclusive(
        &self,
        range: PageRange,
        dev: DeviceId,
        owner: Option<Owner>,
    ) -> Result<Vec<DevPfn>, MmError> {
        let region = self
            .region_of(range.start())
            .filter(|r| r.range().contains_range(&range) && !r.is_shared())
            .ok_or(MmError::NotManaged {
                addr: range.start(),
            })?;
        let d = self.device(dev).ok_or(MmError::NoDevice(dev))?;
        let mem = Arc::clone(d.memory());
        if self.forked() {
            return Err(MigrateError::ForkedChild.into());
        }
        let _fork_gate = (!crate::fork::forking_thread()).then(|| self.fork_gate.read_recursive());
        self.sync_events();
        let mut frames = Vec::with_capacity(range.npages() as usize);
        for a in range.pages() {
            let p = PageRange::new(a.0, PAGE_SIZE)?;
            // Fault it in writable (GUP with FOLL_WRITE): a write-fault range fault.
            crate::cpu::fault_range(self, p, true).map_err(|_| MmError::NotManaged { addr: a })?;
            let i = region.index(a);
            lock_page(&region, i);
            if region.states.get(i).location != Location::System {
                unlock_page(&region, i);
                return Err(MmError::NotManaged { addr: a });
            }
            let frame = match mem.pool().lock().alloc_page() {
                Ok(f) => f,
                Err(e) => {
                    unlock_page(&region, i);
                    return Err(MigrateError::from(e).into());
                }
            };
            self.notifiers.invalidate(NotifierRange::new(
                a,
                VirtAddr(a.0 + PAGE_SIZE),
                NotifyEvent::Exclusive,
                owner,
            ));
            let entries = [hetmem_core::migrate::MigrateEntry {
                flags: hetmem_core::migrate::MigrateFlags::VALID,
                src: hetmem_core::migrate::PageLoc::System,
                dst: None,
                skipped: None,
            }];
            let moved = crate::migrate::move_out_pub(self, &mem, a.as_usize(), frame, &entries);
            if !moved {
                let _ = mem.pool().lock().free_page(frame);
                unlock_page(&region, i);
                return Err(MmError::NotManaged { addr: a });
            }
            region.states.set_device(
                i,
                DevicePlacement {
                    dev,
                    frame,
                    write: true,
                    huge: false,
                    coherent: false,
                    exclusive: true,
                },
            );
            unlock_page(&region, i);
            frames.push(frame);
        }
        Ok(frames)
    }

    /// The frame holding page `addr` while device `dev` has exclusive access to it.
    pub fn exclusive_frame(&self, addr: VirtAddr, dev: DeviceId) -> Option<DevPfn> {
        let r = self.region_of(addr)?;
        match r.states.get(r.index(addr)).location {
            Location::Exclusive { dev: d, frame } if d == dev => Some(frame),
            _ => None,
        }
    }
}

/// Revokes a device's exclusive access to `page` and gives it back to the CPU.
pub(crate) fn restore_exclusive(
    mm: &AddressSpace,
    region: &Arc<Region>,
    page: VirtAddr,
) -> Result<(), MigrateError> {
    let i = region.index(page);
    lock_page(region, i);
    let Location::Exclusive { dev, frame } = region.states.get(i).location else {
        unlock_page(region, i);
        return Ok(());
    };
    // Mirrors drop their atomic mappings first (the kernel restores the PTE after a notifier
    // invalidation of the page).
    mm.notifiers.invalidate(NotifierRange::new(
        page,
        VirtAddr(page.0 + PAGE_SIZE),
        NotifyEvent::Clear,
        None,
    ));
    let Some(d) = mm.device(dev) else {
        unlock_page(region, i);
        return Err(MigrateError::NoDevice(dev));
    };
    let mem: &DeviceMemory = d.memory();
    let prot = prot_from_bits(region.states.prot(i));
    if !crate::migrate::move_in_pub(mm, mem, page.as_usize(), frame, prot) {
        unlock_page(region, i);
        return Err(MigrateError::Stuck { addr: page });
    }
    crate::migrate::scrub_frames(mm, mem, frame, 1);
    let _ = mem.pool().lock().free_page(frame);
    region.states.set_system(i);
    unlock_page(region, i);
    Ok(())
}

/// The common `migrate_to_ram`: brings back the page at `addr` (its whole 2 MiB block when it
/// moved as one, unless `split`) from device `mem`, with `driver` tearing down the device's own
/// mappings.
///
/// `region` holds `addr` and was looked up with no userfaultfd event pending (as
/// `MigrateVma::setup` would look it up: a discard the program made just before must not land on
/// the page); see [`crate::Device::migrate_to_ram_in`].
pub fn migrate_to_ram(
    mm: &AddressSpace,
    region: &Region,
    mem: &DeviceMemory,
    addr: VirtAddr,
    split: bool,
    driver: &dyn crate::device::MigrateDriver,
) -> Result<(), MigrateError> {
    if !region.range().contains(addr) {
        return Err(MigrateError::NotManaged { addr });
    }
    let st = region.states.get(region.index(addr));
    let block = if st.huge && !split {
        let b = addr.huge_down();
        PageRange::new(b.0, hetmem_core::HUGE_PAGE_SIZE)
            .ok()
            .filter(|r| region.range().contains_range(r))
    } else {
        None
    };
    let range = block.unwrap_or(PageRange::new(addr.page_down().0, PAGE_SIZE)?);
    let select = match mem.kind() {
        hetmem_core::pool::MemoryKind::DevicePrivate => {
            hetmem_core::migrate::SelectFlags::DEVICE_PRIVATE
        }
        hetmem_core::pool::MemoryKind::DeviceCoherent => {
            hetmem_core::migrate::SelectFlags::DEVICE_COHERENT
        }
    } | hetmem_core::migrate::SelectFlags::COMPOUND;
    crate::migrate::migrate_in(
        mm,
        region,
        mem,
        crate::migrate::MigrateArgs {
            range,
            select,
            owner: mem.owner(),
            fault_page: Some(addr),
        },
        driver,
        |_| (),
    )?;
    if split || block.is_some() {
        for a in range.pages() {
            region.states.clear_huge(region.index(a));
        }
    }
    Ok(())
}
