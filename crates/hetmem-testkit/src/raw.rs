//! What the model does to managed memory with system calls: `madvise` and `munmap` behind
//! hetmem's back (the kernel's userfaultfd events must catch them), and hetmem's own `discard`
//! and `protect`, which are `unsafe` for the reason `madvise(2)` and `mprotect(2)` are: no Rust
//! reference may point into the range in a way the call breaks. The machine guarantees that by
//! construction: views exist only inside one op, and every launch and prefetch is waited for
//! before the op ends.
#![allow(unsafe_code)]

use hetmem::{AddressSpace, Prot};
use hetmem_core::PageRange;
use hetmem_runtime::Managed;
use hetmem_sys::mman::{self, Advice};

fn mm() -> Result<&'static std::sync::Arc<AddressSpace>, String> {
    AddressSpace::current().map_err(|e| e.to_string())
}

/// `madvise(MADV_DONTNEED)` through hetmem.
pub(crate) fn discard(range: PageRange) -> Result<(), String> {
    // SAFETY: the range is managed memory of a slot; no view of it is alive and no launch or
    // prefetch is in flight (the machine makes views only inside an op and waits for its
    // launches and prefetches), so nothing refers to the bytes that turn to zeros.
    unsafe { mm()?.discard(range) }.map_err(|e| e.to_string())
}

/// `madvise(MADV_DONTNEED)` as a program would call it, behind hetmem's back.
pub(crate) fn madvise_dontneed(range: PageRange) -> Result<(), String> {
    // SAFETY: as in `discard`: nothing refers to the bytes of the slot's range.
    unsafe {
        mman::advise(
            range.start().as_usize(),
            range.len_bytes() as usize,
            Advice::DontNeed,
        )
    }
    .map_err(|e| e.to_string())
}

/// `munmap` of a whole allocation as a program would call it, behind hetmem's back; the
/// `Managed` is forgotten (its own unmap would hit whatever is mapped there next).
pub(crate) fn munmap_behind_back(m: Managed) -> Result<(), String> {
    let range = m.range();
    std::mem::forget(m);
    // SAFETY: the allocation's mapping belonged to `m`, which is forgotten: nothing refers to
    // it any more (no view, no launch or prefetch in flight), and nothing will.
    unsafe { mman::unmap(range.start().as_usize(), range.len_bytes() as usize) }
        .map_err(|e| e.to_string())
}

/// `mprotect` through hetmem.
pub(crate) fn protect(range: PageRange, prot: Prot) -> Result<(), String> {
    // SAFETY: no view of the range is alive while it is read-only (the machine opens none until
    // it made the range read-write again), and the kernels it launches meanwhile go through
    // the device's own permission checks.
    unsafe { mm()?.protect(range, prot) }.map_err(|e| e.to_string())
}
