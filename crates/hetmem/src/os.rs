//! The runtime's only `unsafe` code: protection, discard and unmap of managed memory, and the
//! data moves between managed pages and device frames.
//!
//! Why these are sound to call from the rest of the crate: hetmem hands out no Rust reference
//! into managed memory and never creates one itself; it moves managed data only through the
//! kernel (UFFDIO_MOVE/COPY, `process_vm_*`, `/proc/self/mem`). Changing the protection of, or
//! discarding, such memory cannot invalidate a reference hetmem holds. The public entry points
//! that take a range from the program (`AddressSpace::unmap`, `protect`, `discard`, `remap`) are
//! `unsafe fn`: the program promises it holds no reference into that range either.
#![allow(unsafe_code)]

use hetmem_core::PageRange;
use hetmem_sys::{
    mman::{self, Advice, Prot},
    uffd::{Uffd, UffdError},
    SysResult,
};

/// munmap.
pub(crate) fn unmap(range: PageRange) -> SysResult<()> {
    // SAFETY: see the module documentation: no reference into `range` exists in hetmem, and the
    // public caller promised the same for the program.
    unsafe { mman::unmap(range.start().as_usize(), range.len_bytes() as usize) }
}

/// mprotect.
pub(crate) fn protect(range: PageRange, prot: Prot) -> SysResult<()> {
    // SAFETY: as for `unmap`: managed memory is only ever accessed through the kernel by hetmem,
    // so a protection change cannot break a Rust reference.
    unsafe { mman::protect(range.start().as_usize(), range.len_bytes() as usize, prot) }
}

/// madvise.
pub(crate) fn advise(range: PageRange, advice: Advice) -> SysResult<()> {
    // SAFETY: as for `unmap`; DONTNEED on managed memory discards data hetmem has already copied
    // or moved elsewhere, or that the program asked to discard.
    unsafe { mman::advise(range.start().as_usize(), range.len_bytes() as usize, advice) }
}

/// mremap.
pub(crate) fn remap(
    old: PageRange,
    new_len: u64,
    new_addr: Option<u64>,
    dont_unmap: bool,
) -> SysResult<usize> {
    // SAFETY: as for `unmap`; the public caller promised the old and new ranges hold nothing Rust
    // code references.
    unsafe {
        mman::remap(
            old.start().as_usize(),
            old.len_bytes() as usize,
            new_len as usize,
            new_addr.map(|a| a as usize),
            dont_unmap,
        )
    }
}

/// UFFDIO_MOVE from `src` to `dst` (`len` bytes).
pub(crate) fn uffd_move(
    uffd: &Uffd,
    dst: usize,
    src: usize,
    len: usize,
    allow_holes: bool,
) -> Result<usize, UffdError> {
    // SAFETY: `dst` is a hole in managed memory or a free device frame, `src` a managed page or an
    // allocated frame that the caller has locked; the kernel checks both mappings, and neither
    // range is referenced by Rust code (module documentation).
    unsafe { uffd.move_pages(dst, src, len, allow_holes) }
}

/// UFFDIO_COPY from `src` to `dst` (`len` bytes).
pub(crate) fn uffd_copy(
    uffd: &Uffd,
    dst: usize,
    src: usize,
    len: usize,
) -> Result<usize, UffdError> {
    // SAFETY: `src` is readable memory (a device frame or a static zero page) of at least `len`
    // bytes; `dst` is a hole of managed memory the caller has locked; the kernel populates it
    // atomically.
    unsafe { uffd.copy(dst, src, len, false) }
}

/// Writes `data` at `addr` through `/proc/self/mem` (works on a PROT_NONE private page).
pub(crate) fn procmem_write(
    pm: &hetmem_sys::dma::ProcMem,
    addr: usize,
    data: &[u8],
) -> SysResult<()> {
    // SAFETY: `addr` is a locked managed page whose contents hetmem is restoring; no Rust
    // reference into it exists (module documentation).
    unsafe { pm.write(addr, data) }
}

/// Copies a run of managed pages at `src` into device frames at `dst` (the mprotect backend's
/// migration to a device).
pub(crate) fn copy_to_frames(dst: usize, src: usize, len: usize) -> SysResult<()> {
    // SAFETY: `dst` is a run of device frames allocated to this migration (arena memory, which
    // Rust code only reaches by raw atomic copies, and which no one else touches while the
    // migration owns them); the source pages are locked and the kernel checks both mappings.
    unsafe { hetmem_sys::dma::copy_user(dst, src, len) }
}

/// Fills locked managed pages at `addr` from device frames at `src` through `/proc/self/mem`
/// (the mprotect backend's migration back: the pages are still `PROT_NONE`).
pub(crate) fn procmem_fill_from_frames(
    pm: &hetmem_sys::dma::ProcMem,
    addr: usize,
    src: usize,
    len: usize,
) -> SysResult<()> {
    // SAFETY: `src` is a run of frames owned by this migration (nothing writes them until they
    // are freed after it); `addr` holds locked managed pages no Rust reference points into.
    unsafe { pm.write_from(addr, src as *const u8, len) }
}

/// Writes `data` into this process's memory at `addr` (a device writing system memory).
pub fn write_user(addr: usize, data: &[u8]) -> SysResult<()> {
    // SAFETY: callers pass addresses of memory the program gave a device access to (managed or
    // mirrored memory), which Rust code in hetmem never references; the kernel checks the
    // mapping and permissions and fails with EFAULT rather than faulting.
    unsafe { hetmem_sys::dma::write_user(addr, data) }
}

/// A page of zeros, the source of zero fills.
pub(crate) static ZERO_PAGE: [u8; 4096] = [0; 4096];

/// Touches (reads one byte of) the managed page holding `addr` from the CPU, through the
/// ordinary load path: a device-resident page faults back, a hole is filled. The value read is
/// returned.
pub fn cpu_touch(addr: hetmem_core::VirtAddr) -> Result<u8, crate::MmError> {
    let mm = crate::AddressSpace::current()?;
    if mm.region_of(addr).is_none() {
        return Err(crate::MmError::NotManaged { addr });
    }
    // SAFETY: `addr` lies in a managed region, which is mapped readable memory of this process
    // (checked just above); a volatile one-byte load cannot create a reference, and if the page is
    // held by a device the fault handler brings it back before the load completes.
    Ok(unsafe { std::ptr::read_volatile(addr.as_usize() as *const u8) })
}
