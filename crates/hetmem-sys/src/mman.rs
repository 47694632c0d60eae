//! Memory mappings: `mmap` / `munmap` / `mprotect` / `madvise` / `mremap` and `MADV_POPULATE_*`.
//!
//! Addresses are plain `usize`s: the memory behind them is shared with the kernel (userfaultfd
//! fills and moves pages, a simulated device copies into them), so nothing here hands out Rust
//! references to it. Creating a fresh mapping and pre-faulting one are safe; everything that can
//! change what an existing address reads as, or whether it can be read at all, is an `unsafe fn`
//! whose caller must own the range.
//!
//! Neighbours: [`crate::uffd`] registers the mappings made here, [`crate::signal`] serves faults on
//! the ones that were `mprotect`ed, [`crate::arena`] owns one as device memory.

use std::ptr;

use rustix::mm::{self, MapFlags, MprotectFlags, MremapFlags, ProtFlags};

use crate::error::{SysError, SysResult};
use crate::PAGE_SIZE;

bitflags::bitflags! {
    /// Page protection (`PROT_*`); the empty set is `PROT_NONE`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Prot: u32 {
        /// `PROT_READ`.
        const READ = linux_raw_sys::general::PROT_READ;
        /// `PROT_WRITE`.
        const WRITE = linux_raw_sys::general::PROT_WRITE;
        /// `PROT_EXEC`.
        const EXEC = linux_raw_sys::general::PROT_EXEC;
    }
}

impl Prot {
    /// Read and write, the usual protection of data.
    pub const RW: Prot = Prot::READ.union(Prot::WRITE);

    /// The same protection as rustix's `mmap` flags.
    pub fn to_rustix(self) -> ProtFlags {
        ProtFlags::from_bits_retain(self.bits())
    }

    /// The same protection as rustix's `mprotect` flags.
    pub fn to_rustix_mprotect(self) -> MprotectFlags {
        MprotectFlags::from_bits_retain(self.bits())
    }
}

/// `madvise` advice that hetmem uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages; private anonymous memory reads as zero afterwards
    /// (or faults into userfaultfd when registered MISSING).
    DontNeed,
    /// `MADV_FREE`: the kernel may drop the pages lazily, unless they are written again.
    Free,
    /// `MADV_HUGEPAGE`: allow transparent huge pages.
    HugePage,
    /// `MADV_NOHUGEPAGE`: forbid transparent huge pages.
    NoHugePage,
    /// `MADV_DONTFORK`: a forked child does not inherit the range.
    DontFork,
    /// `MADV_DOFORK`: undo [`Advice::DontFork`].
    DoFork,
    /// `MADV_COLLAPSE` (6.1): synchronously collapse the range into transparent huge pages.
    Collapse,
    /// `MADV_POPULATE_READ` (5.14): prefault readable.
    PopulateRead,
    /// `MADV_POPULATE_WRITE` (5.14): prefault writable (breaks COW, allocates).
    PopulateWrite,
}

impl Advice {
    fn raw(self) -> u32 {
        use linux_raw_sys::general as g;
        match self {
            Advice::DontNeed => g::MADV_DONTNEED,
            Advice::Free => g::MADV_FREE,
            Advice::HugePage => g::MADV_HUGEPAGE,
            Advice::NoHugePage => g::MADV_NOHUGEPAGE,
            Advice::DontFork => g::MADV_DONTFORK,
            Advice::DoFork => g::MADV_DOFORK,
            Advice::Collapse => g::MADV_COLLAPSE,          // 25
            Advice::PopulateRead => g::MADV_POPULATE_READ, // 22
            Advice::PopulateWrite => g::MADV_POPULATE_WRITE, // 23
        }
    }

    fn name(self) -> &'static str {
        match self {
            Advice::DontNeed => "madvise(MADV_DONTNEED)",
            Advice::Free => "madvise(MADV_FREE)",
            Advice::HugePage => "madvise(MADV_HUGEPAGE)",
            Advice::NoHugePage => "madvise(MADV_NOHUGEPAGE)",
            Advice::DontFork => "madvise(MADV_DONTFORK)",
            Advice::DoFork => "madvise(MADV_DOFORK)",
            Advice::Collapse => "madvise(MADV_COLLAPSE)",
            Advice::PopulateRead => "madvise(MADV_POPULATE_READ)",
            Advice::PopulateWrite => "madvise(MADV_POPULATE_WRITE)",
        }
    }
}

fn check_len(op: &'static str, len: usize) -> SysResult<()> {
    if len == 0 {
        return Err(SysError::Invalid {
            op,
            why: "length is zero",
        });
    }
    if len & (PAGE_SIZE - 1) != 0 {
        return Err(SysError::Invalid {
            op,
            why: "length is not a multiple of the page size",
        });
    }
    Ok(())
}

/// Maps `len` bytes of fresh anonymous memory (`MAP_ANONYMOUS | MAP_NORESERVE`, private or
/// shared) and returns its address. `len` must be a non-zero multiple of [`PAGE_SIZE`].
pub fn map_anonymous(len: usize, prot: Prot, shared: bool) -> SysResult<usize> {
    check_len("mmap", len)?;
    let kind = if shared {
        MapFlags::SHARED
    } else {
        MapFlags::PRIVATE
    };
    // SAFETY: a null hint without MAP_FIXED lets the kernel choose a range that is not mapped,
    // so no memory that Rust code can already reach changes.
    let addr = unsafe {
        mm::mmap_anonymous(
            ptr::null_mut(),
            len,
            prot.to_rustix(),
            kind | MapFlags::NORESERVE,
        )
    }
    .map_err(|e| SysError::os("mmap", e))?;
    Ok(addr as usize)
}

/// Maps `len` bytes of private anonymous memory whose start is a multiple of `align` (a power of
/// two, at least [`PAGE_SIZE`]), for example [`crate::HUGE_PAGE_SIZE`] so that the range can be
/// backed by transparent huge pages or moved PMD-wise.
///
/// It maps `len + align - PAGE_SIZE` bytes and unmaps the misaligned head and the tail.
pub fn map_anonymous_aligned(len: usize, align: usize, prot: Prot) -> SysResult<usize> {
    const OP: &str = "mmap (aligned)";
    check_len(OP, len)?;
    if !align.is_power_of_two() || align < PAGE_SIZE {
        return Err(SysError::Invalid {
            op: OP,
            why: "alignment is not a power of two >= PAGE_SIZE",
        });
    }
    let over = len
        .checked_add(align - PAGE_SIZE)
        .ok_or(SysError::Invalid {
            op: OP,
            why: "length plus alignment overflows",
        })?;
    let raw = map_anonymous(over, prot, false)?;
    let start = (raw + align - 1) & !(align - 1);
    let head = start - raw;
    let tail = over - head - len;
    // SAFETY: both pieces lie inside the mapping made just above, which nothing else knows of yet.
    unsafe {
        if head != 0 {
            unmap(raw, head)?;
        }
        if tail != 0 {
            unmap(start + len, tail)?;
        }
    }
    Ok(start)
}

/// `munmap(addr, len)`.
///
/// # Safety
///
/// The caller owns `[addr, addr + len)`: no Rust reference points into it and nothing will access
/// it afterwards (the range may be reused by the next mapping).
pub unsafe fn unmap(addr: usize, len: usize) -> SysResult<()> {
    // SAFETY: the caller guarantees that nothing still uses the range.
    unsafe { mm::munmap(addr as *mut _, len) }.map_err(|e| SysError::os("munmap", e))
}

/// `mprotect(addr, len, prot)`.
///
/// # Safety
///
/// The caller owns `[addr, addr + len)`: removing access makes any code touching it fault, so no
/// Rust reference to it may exist unless a fault handler restores access transparently, and
/// adding `EXEC` to data is the caller's responsibility.
pub unsafe fn protect(addr: usize, len: usize, prot: Prot) -> SysResult<()> {
    // SAFETY: the caller guarantees the range is theirs to change.
    unsafe { mm::mprotect(addr as *mut _, len, prot.to_rustix_mprotect()) }
        .map_err(|e| SysError::os("mprotect", e))
}

/// `madvise(addr, len, advice)`.
///
/// # Safety
///
/// The caller owns `[addr, addr + len)`: [`Advice::DontNeed`] and [`Advice::Free`] discard its
/// contents, [`Advice::DontFork`] removes it from children.
pub unsafe fn advise(addr: usize, len: usize, advice: Advice) -> SysResult<()> {
    // SAFETY: plain syscall on integers; the caller guarantees the effect on the range is wanted.
    // libc is used rather than rustix because rustix's `Advice` has no MADV_COLLAPSE.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice.raw() as libc::c_int) };
    if rc == 0 {
        Ok(())
    } else {
        Err(SysError::last(advice.name()))
    }
}

/// Prefaults `[addr, addr + len)` with `MADV_POPULATE_READ` (or `_WRITE` when `write`), the way a
/// read (or write) touch of every page would, but without touching from user space.
///
/// Safe because it does not change what the memory contains: it only makes the page tables
/// point at the pages a user access would have produced (a write fault on a private mapping
/// breaks copy-on-write, which preserves contents). It fails with `EFAULT` when a page cannot be
/// faulted in (PROT_NONE, a userfaultfd range in SIGBUS mode, a missing file page) and with
/// `ENOMEM` on unmapped addresses; on a userfaultfd range served by a handler thread it waits
/// for that handler like a touch would.
pub fn populate(addr: usize, len: usize, write: bool) -> SysResult<()> {
    let advice = if write {
        Advice::PopulateWrite
    } else {
        Advice::PopulateRead
    };
    // SAFETY: MADV_POPULATE_* only faults pages in; it never discards or alters contents.
    unsafe { advise(addr, len, advice) }
}

/// `mremap(old, old_len, new_len, MREMAP_MAYMOVE [| MREMAP_FIXED] [| MREMAP_DONTUNMAP], new_addr)`;
/// returns the new address.
///
/// With `dont_unmap` (5.7+, private anonymous only, `old_len == new_len`) the old range stays
/// mapped but empty: it reads as zero, or faults into userfaultfd if registered.
///
/// # Safety
///
/// The caller owns the old range (it moves away; no references may point into it) and, when
/// `new_addr` is given, `[new_addr, new_addr + new_len)` too: `MREMAP_FIXED` replaces whatever
/// was mapped there.
pub unsafe fn remap(
    old: usize,
    old_len: usize,
    new_len: usize,
    new_addr: Option<usize>,
    dont_unmap: bool,
) -> SysResult<usize> {
    let mut flags = MremapFlags::MAYMOVE;
    if dont_unmap {
        flags |= MremapFlags::DONTUNMAP;
    }
    let res = match new_addr {
        // SAFETY: the caller owns both ranges.
        Some(new) => unsafe {
            mm::mremap_fixed(old as *mut _, old_len, new_len, flags, new as *mut _)
        },
        // SAFETY: the caller owns the old range; the kernel picks a free new one.
        None => unsafe { mm::mremap(old as *mut _, old_len, new_len, flags) },
    };
    res.map(|p| p as usize)
        .map_err(|e| SysError::os("mremap", e))
}

/// Copies `len` bytes from `src` to `dst` (a plain `memcpy`).
///
/// # Safety
///
/// `[src, src + len)` must be readable, `[dst, dst + len)` writable, both owned by the caller
/// (no live Rust reference to `dst`, no concurrent writer of either), and they must not overlap.
pub unsafe fn copy_bytes(src: usize, dst: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the caller guarantees both ranges are valid, exclusively ours and disjoint; u8 has
    // no alignment requirement.
    unsafe { ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HUGE_PAGE_SIZE;

    /// Reads `/proc/self/smaps` and returns the VmFlags line of the VMA that contains `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = a <= addr && addr < b;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no VMA contains {addr:#x}");
    }

    #[test]
    fn map_rejects_bad_lengths() {
        assert!(matches!(
            map_anonymous(0, Prot::RW, false),
            Err(SysError::Invalid { .. })
        ));
        assert!(matches!(
            map_anonymous(100, Prot::RW, false),
            Err(SysError::Invalid { .. })
        ));
        assert!(matches!(
            map_anonymous_aligned(PAGE_SIZE, 3 * PAGE_SIZE, Prot::RW),
            Err(SysError::Invalid { .. })
        ));
        assert!(matches!(
            map_anonymous_aligned(PAGE_SIZE, 512, Prot::RW),
            Err(SysError::Invalid { .. })
        ));
    }

    #[test]
    fn map_write_read_unmap() {
        for shared in [false, true] {
            let len = 4 * PAGE_SIZE;
            let a = map_anonymous(len, Prot::RW, shared).unwrap();
            assert_eq!(a % PAGE_SIZE, 0);
            let flags = vm_flags(a);
            assert_eq!(flags.split(' ').any(|f| f == "sh"), shared, "{flags}");
            // SAFETY: the mapping is ours and read-write.
            unsafe {
                (a as *mut u64).write_volatile(7);
                ((a + len - 8) as *mut u64).write_volatile(9);
                assert_eq!((a as *const u64).read_volatile(), 7);
                assert_eq!(((a + len - 8) as *const u64).read_volatile(), 9);
                unmap(a, len).unwrap();
            }
        }
    }

    #[test]
    fn aligned_mapping_is_aligned_and_exact() {
        let len = 3 * PAGE_SIZE;
        let a = map_anonymous_aligned(len, HUGE_PAGE_SIZE, Prot::RW).unwrap();
        assert_eq!(a % HUGE_PAGE_SIZE, 0);
        // The pages just before and after must have been trimmed: mprotect there fails (ENOMEM)
        // unless something else happens to be mapped there, so check with our own VMA walk.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let found = maps.lines().any(|l| {
            let range = l.split(' ').next().unwrap();
            let (s, e) = range.split_once('-').unwrap();
            usize::from_str_radix(s, 16).unwrap() <= a
                && usize::from_str_radix(e, 16).unwrap() >= a + len
        });
        assert!(found);
        // SAFETY: ours.
        unsafe {
            ((a + len - 1) as *mut u8).write_volatile(1);
            unmap(a, len).unwrap();
        }
        // align == PAGE_SIZE degenerates to a plain mapping
        let b = map_anonymous_aligned(PAGE_SIZE, PAGE_SIZE, Prot::READ).unwrap();
        // SAFETY: ours.
        unsafe { unmap(b, PAGE_SIZE).unwrap() };
    }

    #[test]
    fn protect_changes_vm_flags() {
        let a = map_anonymous(2 * PAGE_SIZE, Prot::RW, false).unwrap();
        // SAFETY: ours, no references.
        unsafe { protect(a, PAGE_SIZE, Prot::READ).unwrap() };
        let f = vm_flags(a);
        assert!(f.contains("rd") && !f.contains("wr"), "{f}");
        let f2 = vm_flags(a + PAGE_SIZE);
        assert!(f2.contains("wr"), "{f2}");
        // SAFETY: ours.
        unsafe { protect(a, PAGE_SIZE, Prot::empty()).unwrap() };
        assert!(!vm_flags(a).contains("rd"));
        // SAFETY: ours.
        unsafe { unmap(a, 2 * PAGE_SIZE).unwrap() };
    }

    #[test]
    fn dontneed_zeroes_and_populate_succeeds() {
        let len = 2 * PAGE_SIZE;
        let a = map_anonymous(len, Prot::RW, false).unwrap();
        populate(a, len, true).unwrap();
        populate(a, len, false).unwrap();
        // SAFETY: ours.
        unsafe {
            (a as *mut u32).write_volatile(0xdead_beef);
            advise(a, len, Advice::DontNeed).unwrap();
            assert_eq!((a as *const u32).read_volatile(), 0);
            for adv in [
                Advice::NoHugePage,
                Advice::HugePage,
                Advice::DontFork,
                Advice::DoFork,
                Advice::Free,
            ] {
                advise(a, len, adv).unwrap();
            }
            unmap(a, len).unwrap();
        }
        // PROT_NONE cannot be populated: the kernel refuses with an error, it does not signal.
        let n = map_anonymous(PAGE_SIZE, Prot::empty(), false).unwrap();
        let e = populate(n, PAGE_SIZE, false).unwrap_err();
        assert!(e.errno().is_some(), "{e}");
        // SAFETY: ours.
        unsafe { unmap(n, PAGE_SIZE).unwrap() };
    }

    #[test]
    fn collapse_is_accepted_on_aligned_range() {
        let a = map_anonymous_aligned(HUGE_PAGE_SIZE, HUGE_PAGE_SIZE, Prot::RW).unwrap();
        populate(a, HUGE_PAGE_SIZE, true).unwrap();
        // SAFETY: ours. MADV_COLLAPSE may legitimately fail (EAGAIN/ENOMEM) when no huge page can
        // be allocated; EINVAL would mean the advice number is wrong.
        unsafe {
            if let Err(e) = advise(a, HUGE_PAGE_SIZE, Advice::Collapse) {
                assert_ne!(e.errno(), Some(libc::EINVAL), "{e}");
            }
            unmap(a, HUGE_PAGE_SIZE).unwrap();
        }
    }

    #[test]
    fn remap_moves_and_dontunmap_leaves_empty_source() {
        let len = 2 * PAGE_SIZE;
        let a = map_anonymous(len, Prot::RW, false).unwrap();
        let dst = map_anonymous(len, Prot::empty(), false).unwrap();
        // SAFETY: all ranges are ours.
        unsafe {
            (a as *mut u64).write_volatile(42);
            let b = remap(a, len, len, None, true).unwrap();
            assert_ne!(a, b);
            assert_eq!((b as *const u64).read_volatile(), 42);
            // DONTUNMAP: the old range is still mapped and reads as a fresh zero page.
            assert_eq!((a as *const u64).read_volatile(), 0);
            // FIXED: onto the placeholder `dst`, replacing it.
            let c = remap(b, len, len, Some(dst), false).unwrap();
            assert_eq!(c, dst);
            assert_eq!((c as *const u64).read_volatile(), 42);
            // growing in place or by moving
            let d = remap(c, len, 4 * len, None, false).unwrap();
            assert_eq!((d as *const u64).read_volatile(), 42);
            unmap(a, len).unwrap();
            unmap(d, 4 * len).unwrap();
        }
    }

    #[test]
    fn copy_bytes_copies() {
        let a = map_anonymous(2 * PAGE_SIZE, Prot::RW, false).unwrap();
        // SAFETY: ours, disjoint halves.
        unsafe {
            for i in 0..PAGE_SIZE {
                ((a + i) as *mut u8).write(i as u8);
            }
            copy_bytes(a, a + PAGE_SIZE, PAGE_SIZE);
            copy_bytes(0, 0, 0);
            for i in 0..PAGE_SIZE {
                assert_eq!(((a + PAGE_SIZE + i) as *const u8).read(), i as u8);
            }
            unmap(a, 2 * PAGE_SIZE).unwrap();
        }
    }
}
