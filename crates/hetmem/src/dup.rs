//! Read duplication (UVM's read-mostly advice, uvm-svm.md): devices keep read-only copies of a
//! system page in their own memory, so that readers on every processor read locally and nothing
//! migrates; a write from anywhere collapses the copies back to the one in system memory.
//!
//! The system page stays the master copy: its state is *system* with the DUPLICATED bit, and the
//! CPU's mapping of it is write-protected (userfaultfd write-protect, or a read-only mprotect under
//! the mprotect backend). The protocol, per page, under its lock:
//!
//! - **Duplicate** ([`AddressSpace::read_duplicate`]): set DUPLICATED first, so that any snapshot
//!   taken from here on reports the page read-only; then a `WriteProtect` invalidation makes every
//!   mirror drop *writable* mappings of it (read-only mappings and copies stay valid); then the
//!   CPU's mapping is write-protected and the page's bytes are handed to the device, which maps
//!   its copy read-only once its notifier sequence says no invalidation intervened.
//! - **Collapse** (a CPU write fault, a range fault or `make_resident` for writing): a
//!   `Protection` invalidation makes every mirror drop its copy, then DUPLICATED is cleared and
//!   the CPU's write access restored. A device write to a copy faults (the copy is read-only), and
//!   its range fault for writing collapses the same way; a migration of the page collects it like
//!   any system page, its invalidation drops the copies, and the move clears DUPLICATED.
//!
//! Invariant (DESIGN.md 1, no stale mapping): while a device holds a copy of a page, the page is
//! DUPLICATED and nothing can write it without first invalidating that copy.

use std::sync::Arc;

use hetmem_core::{
    notifier::{NotifierRange, NotifyEvent},
    page_state::Location,
    Owner, PageRange, VirtAddr, PAGE_SIZE,
};

use crate::{
    error::MmError,
    fault::{lock_page, unlock_page},
    mm::{prot_from_bits, AddressSpace, CpuFaultBackend},
    os,
    region::Region,
};

impl AddressSpace {
    /// Read duplication of `range`: every page of it that is in system memory, in a private
    /// managed region, is made read-only for the CPU and marked duplicated, and its bytes are
    /// passed to `copy` (under the page's lock), which stores them in a device frame and returns
    /// whether it did. Returns the pages duplicated; the others (on a device, in shared memory, not
    /// managed, or refused by `copy`) are left as they were. `owner` is the duplicating device,
    /// whose own mirror is told by the invalidation's owner that it causes it.
    ///
    /// The caller maps its copies read-only, and only if its notifier sequence (read before this
    /// call) has not moved: a collapse may come the moment a page's lock is released.
    pub fn read_duplicate(
        &self,
        range: PageRange,
        owner: Option<Owner>,
        mut copy: impl FnMut(VirtAddr, &[u8]) -> bool,
    ) -> Result<Vec<VirtAddr>, MmError> {
        if self.forked() {
            return Err(crate::error::MigrateError::ForkedChild.into());
        }
        let _fork_gate = (!crate::fork::forking_thread()).then(|| self.fork_gate.read_recursive());
        let mut done = Vec::new();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for a in range.pages() {
            let Some(region) = self.region_of(a) else {
                continue;
            };
            if region.is_shared() {
                continue;
            }
            let i = region.index(a);
            if region.states.get(i).location != Location::System {
                continue;
            }
            let p = PageRange::new(a.0, PAGE_SIZE)?;
            // Present for reading: a hole gets the zero page, which the protection covers too.
            if crate::cpu::fault_range(self, p, false).is_err() {
                continue;
            }
            lock_page(&region, i);
            let st = region.states.get(i);
            if st.location != Location::System
                || region.states.prot(i) & 1 == 0
                || region.is_closing()
            {
                unlock_page(&region, i);
                continue;
            }
            if !st.duplicated {
                region.states.set_duplicated(i, true);
                self.notifiers.invalidate(NotifierRange::new(
                    a,
                    p.end(),
                    NotifyEvent::WriteProtect,
                    owner,
                ));
            }
            // Every time: a page emptied and filled again since it was duplicated (DONTNEED, then
            // a read) keeps the bit but lost the protection. No mirror maps a duplicated page
            // writable, so only the CPU's mapping needs it.
            if !self.cpu_write_protect(&region, i, p, true) {
                crate::dup::collapse(self, &region, i, a);
                unlock_page(&region, i);
                continue;
            }
            let ok = hetmem_sys::dma::read_user(a.as_usize(), &mut buf).is_ok() && copy(a, &buf);
            unlock_page(&region, i);
            if ok {
                done.push(a);
            }
        }
        if !done.is_empty() {
            self.stats
                .add(&self.stats.pages_duplicated, done.len() as u64);
        }
        Ok(done)
    }

    /// Collapses every duplicated page of `range` (managed memory; other pages are skipped):
    /// every device's read copy goes, and the CPU may write the pages again without a fault
    /// (what `cudaMemAdviseUnsetReadMostly` does to the copies).
    pub fn collapse_duplicates(&self, range: PageRange) {
        for region in self.regions_in(range) {
            let Some(sub) = region.range().intersect(&range) else {
                continue;
            };
            for a in sub.pages() {
                collapse_locking(self, &region, a);
            }
        }
    }

    /// Write-protects (or opens again) the CPU's mapping of page `i` of `region`, locked by the
    /// caller. Under the mprotect backend, opening restores the program's own protection.
    fn cpu_write_protect(&self, region: &Region, i: usize, p: PageRange, protect: bool) -> bool {
        match self.backend {
            CpuFaultBackend::Userfaultfd => {
                let Some(uffd) = &self.uffd else { return false };
                uffd.write_protect(p.start().as_usize(), PAGE_SIZE as usize, protect)
                    .is_ok()
            }
            CpuFaultBackend::Mprotect => {
                let prot = region.states.prot(i);
                let prot = if protect { prot & !2 } else { prot };
                os::protect(p, prot_from_bits(prot)).is_ok()
            }
        }
    }
}

/// Collapses the duplicated page `page` (index `i` of `region`, locked by the caller): every
/// device's copy goes, then the CPU may write again. Does nothing to a page not duplicated.
pub(crate) fn collapse(mm: &AddressSpace, region: &Arc<Region>, i: usize, page: VirtAddr) {
    if !region.states.get(i).duplicated {
        return;
    }
    let p = PageRange::new(page.0, PAGE_SIZE).expect("page");
    mm.notifiers.invalidate(NotifierRange::new(
        page,
        p.end(),
        NotifyEvent::Protection,
        None,
    ));
    // The CPU's write access first, the bit after: while the bit is set every snapshot reports
    // the page read-only, so no mirror maps it writable while the CPU's mapping still is not. A
    // failed reopening (the address space changing under userfaultfd) keeps the page duplicated
    // and without copies: the write faults again and collapses again.
    if mm.cpu_write_protect(region, i, p, false) {
        region.states.set_duplicated(i, false);
        mm.stats.add(&mm.stats.dup_collapses, 1);
    }
}

/// Collapses page `page` of `region` if it is duplicated, taking its lock.
pub(crate) fn collapse_locking(mm: &AddressSpace, region: &Arc<Region>, page: VirtAddr) {
    let i = region.index(page);
    if !region.states.get(i).duplicated {
        return;
    }
    lock_page(region, i);
    if region.states.get(i).location == Location::System {
        collapse(mm, region, i, page);
    }
    unlock_page(region, i);
}
