//! Device memory backing: an owned private anonymous mapping addressed by byte offset.
//!
//! An [`Arena`] is the "VRAM" of a simulated device. Device frames are offsets into it; the
//! device's copy engine moves bytes between it and user memory (through `dma`), and its kernels
//! read, write and atomically update it from several threads at once.
//!
//! Rust never hands out references into the arena: every access is a bounds-checked copy, so the
//! memory behaves like device memory (or a guest's memory in rust-vmm's `vm-memory`, whose
//! `VolatileSlice` makes the same choice). Unlike `vm-memory`'s volatile copies, every access here
//! is an aligned [`AtomicU32`] access of the 4-byte word it touches (relaxed for bulk copies;
//! partial words are merged with a compare-exchange loop). Hence:
//!
//! * threads working on disjoint bytes never disturb each other, even inside one word;
//! * threads racing on the same bytes (a protocol bug of the layer above, such as a device kernel
//!   writing a frame that is being migrated) see unspecified byte values — torn at word
//!   granularity — but no data race in the sense of the Rust memory model, because all accesses
//!   are atomic and all have the same size (mixed-size racing atomics would not be allowed);
//! * the device atomics [`read_u32`](Arena::read_u32), [`write_u32`](Arena::write_u32) and
//!   [`fetch_add_u32`](Arena::fetch_add_u32) use the same granule, with acquire/release ordering,
//!   so they can publish data written by bulk copies.
//!
//! The mapping is madvised `MADV_NOHUGEPAGE` so that frames stay 4 KiB-granular: a
//! [`discard`](Arena::discard) of one frame must not split (or be rounded to) a huge page.
//! Kernel accesses (`MADV_DONTNEED`, `process_vm_readv` targeting the arena) are outside the Rust
//! abstract machine and race with Rust code only the way another process would.

use std::sync::atomic::{AtomicU32, Ordering};

use rustix::io::Errno;
use rustix::mm::{Advice, MapFlags, ProtFlags};

use crate::error::{SysError, SysResult};
use crate::PAGE_SIZE;

/// The access granule: every access to arena memory is an aligned `AtomicU32` access.
const WORD: usize = 4;

/// Bytes bounced through the stack per step of [`Arena::copy_within`].
const BOUNCE: usize = 4096;

/// An owned, page-aligned, private anonymous read-write mapping, unmapped on drop.
///
/// `Send` and `Sync` (its fields are plain addresses): all access goes through `&self` methods
/// that only make atomic accesses, see the module documentation.
#[derive(Debug)]
pub struct Arena {
    base: usize,
    len: usize,
}

impl Arena {
    /// Maps `len` bytes (a non-zero multiple of [`PAGE_SIZE`]) starting at an address aligned to
    /// `align` (a power of two, at least [`PAGE_SIZE`]). The memory reads as zeros.
    pub fn new(len: usize, align: usize) -> SysResult<Arena> {
        const OP: &str = "Arena::new";
        if len == 0 || !page_aligned(len) {
            return Err(SysError::Invalid {
                op: OP,
                why: "length not a non-zero multiple of the page size",
            });
        }
        if !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(SysError::Invalid {
                op: OP,
                why: "alignment not a power of two >= page size",
            });
        }
        let total = len
            .checked_add(align - PAGE_SIZE)
            .ok_or(SysError::Invalid {
                op: OP,
                why: "too large",
            })?;
        // SAFETY: a fresh mapping at an address of the kernel's choice overlaps nothing.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                total,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| SysError::os("mmap", e))? as usize;
        // Over-mapped by `align - PAGE_SIZE`, so an aligned `len` bytes fit inside: trim both ends.
        //
        //   raw          base                 base+len          raw+total
        //    |-- head --|======= arena =======|------ tail -----|
        let base = raw.next_multiple_of(align);
        let (head, tail) = (base - raw, raw + total - (base + len));
        let trim = |addr: usize, n: usize| -> SysResult<()> {
            if n == 0 {
                return Ok(());
            }
            // SAFETY: `[addr, addr + n)` is a part of the mapping made above that no arena will
            // own; nothing refers to it.
            unsafe { rustix::mm::munmap(addr as *mut _, n) }.map_err(|e| SysError::os("munmap", e))
        };
        // On failure unmap only what is still ours: a trimmed piece may already be reused.
        let undo = |addr: usize, n: usize| {
            // SAFETY: `[addr, addr + n)` is what remains of the mapping made above; nothing
            // refers to it.
            let _ = unsafe { rustix::mm::munmap(addr as *mut _, n) };
        };
        if let Err(e) = trim(raw, head) {
            undo(raw, total);
            return Err(e);
        }
        if let Err(e) = trim(base + len, tail) {
            undo(base, len + tail);
            return Err(e);
        }
        let arena = Arena { base, len };
        // SAFETY: the advice only affects how the kernel backs our own mapping, not its contents.
        match unsafe { rustix::mm::madvise(base as *mut _, len, Advice::LinuxNoHugepage) } {
            // EINVAL: a kernel without transparent huge pages, where frames are 4 KiB anyway.
            Ok(()) | Err(Errno::INVAL) => Ok(arena),
            Err(e) => Err(SysError::os("madvise(MADV_NOHUGEPAGE)", e)),
        }
    }

    /// The address of offset 0 (aligned as asked in [`new`](Self::new)).
    pub fn base(&self) -> usize {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an arena is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of `offset`, if `offset < len()`.
    pub fn addr(&self, offset: usize) -> Option<usize> {
        (offset < self.len).then(|| self.base + offset)
    }

    /// The address of `offset`, if `[offset, offset + len)` lies inside the arena (an empty range
    /// may start at `len()`).
    pub fn checked_addr(&self, offset: usize, len: usize) -> Option<usize> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| self.base + offset)
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> SysResult<()> {
        let addr = self.range("Arena::read", offset, buf.len())?;
        let (head, body, tail) = split_words(addr, buf.len());
        let (h, rest) = buf.split_at_mut(head);
        let (b, t) = rest.split_at_mut(body);
        if !h.is_empty() {
            let lo = addr % WORD;
            let w = self.word(addr - lo).load(Ordering::Relaxed).to_ne_bytes();
            h.copy_from_slice(&w[lo..lo + head]);
        }
        let words = self.word_run(addr + head, body);
        for (chunk, w) in b.chunks_exact_mut(WORD).zip(words) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        if tail != 0 {
            let w = self.word(addr + head + body).load(Ordering::Relaxed);
            t.copy_from_slice(&w.to_ne_bytes()[..tail]);
        }
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> SysResult<()> {
        let addr = self.range("Arena::write", offset, data.len())?;
        self.store(addr, Some(data), data.len());
        Ok(())
    }

    /// Sets `len` bytes at `offset` to zero (in place; [`discard`](Self::discard) frees pages).
    pub fn zero(&self, offset: usize, len: usize) -> SysResult<()> {
        let addr = self.range("Arena::zero", offset, len)?;
        self.store(addr, None, len);
        Ok(())
    }

    /// Copies `len` bytes from `src_off` to `dst_off`; the ranges may overlap (`memmove`).
    pub fn copy_within(&self, src_off: usize, dst_off: usize, len: usize) -> SysResult<()> {
        const OP: &str = "Arena::copy_within";
        self.range(OP, src_off, len)?;
        self.range(OP, dst_off, len)?;
        let mut buf = [0u8; BOUNCE];
        let step = |at: usize, n: usize, buf: &mut [u8; BOUNCE]| -> SysResult<()> {
            self.read(src_off + at, &mut buf[..n])?;
            self.write(dst_off + at, &buf[..n])
        };
        if dst_off <= src_off {
            // Front to back: each step writes below everything later steps read.
            let mut at = 0;
            while at < len {
                let n = (len - at).min(BOUNCE);
                step(at, n, &mut buf)?;
                at += n;
            }
        } else {
            // Back to front: each step writes above everything later steps read.
            let mut end = len;
            while end > 0 {
                let n = end.min(BOUNCE);
                step(end - n, n, &mut buf)?;
                end -= n;
            }
        }
        Ok(())
    }

    /// Atomically loads the `u32` at `offset` (4-aligned), with acquire ordering.
    pub fn read_u32(&self, offset: usize) -> SysResult<u32> {
        Ok(self
            .word(self.word_addr("Arena::read_u32", offset)?)
            .load(Ordering::Acquire))
    }

    /// Atomically stores `value` at `offset` (4-aligned), with release ordering.
    pub fn write_u32(&self, offset: usize, value: u32) -> SysResult<()> {
        self.word(self.word_addr("Arena::write_u32", offset)?)
            .store(value, Ordering::Release);
        Ok(())
    }

    /// Atomically adds `value` (wrapping) to the `u32` at `offset` (4-aligned) and returns the
    /// previous value, with acquire-release ordering.
    pub fn fetch_add_u32(&self, offset: usize, value: u32) -> SysResult<u32> {
        let word = self.word(self.word_addr("Arena::fetch_add_u32", offset)?);
        Ok(word.fetch_add(value, Ordering::AcqRel))
    }

    /// Frees the pages of `[offset, offset + len)` (both page aligned) with `MADV_DONTNEED`:
    /// they read as zeros afterwards and cost no memory until written again.
    pub fn discard(&self, offset: usize, len: usize) -> SysResult<()> {
        const OP: &str = "madvise(MADV_DONTNEED)";
        let addr = self.range(OP, offset, len)?;
        if !page_aligned(offset) || !page_aligned(len) {
            return Err(SysError::Invalid {
                op: OP,
                why: "range not page aligned",
            });
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the range is inside our mapping and Rust holds no references into it (every
        // access is a copy through an atomic); the kernel replacing the pages with zero-fill ones
        // is, for concurrent accessors, indistinguishable from another thread storing zeros.
        unsafe { rustix::mm::madvise(addr as *mut _, len, Advice::LinuxDontNeed) }
            .map_err(|e| SysError::os(OP, e))
    }

    /// Bounds check: the address of `offset` when `[offset, offset + len)` is inside.
    fn range(&self, op: &'static str, offset: usize, len: usize) -> SysResult<usize> {
        self.checked_addr(offset, len).ok_or(SysError::Invalid {
            op,
            why: "range outside the arena",
        })
    }

    /// Bounds and alignment check for the `u32` accessors.
    fn word_addr(&self, op: &'static str, offset: usize) -> SysResult<usize> {
        if offset & (WORD - 1) != 0 {
            return Err(SysError::Invalid {
                op,
                why: "offset not 4-byte aligned",
            });
        }
        self.range(op, offset, WORD)
    }

    /// The arena as words: the only way Rust code touches arena memory.
    fn words(&self) -> &[AtomicU32] {
        // SAFETY:
        // 1. `base` is page aligned (so aligned for `AtomicU32`, which has the layout of `u32`)
        //    and `[base, base + len)` is a readable and writable mapping of `len / 4` whole words
        //    (`len` is a multiple of the page size, and below `isize::MAX` since it was mapped).
        // 2. The mapping stays mapped while `self` is borrowed: it is unmapped only in `Drop`.
        // 3. `AtomicU32` is an `UnsafeCell`, so the shared slice permits the mutation other
        //    threads (and the kernel, for `discard`) perform; and since every Rust access to arena
        //    memory goes through this slice, there are no non-atomic or mixed-size accesses.
        unsafe { std::slice::from_raw_parts(self.base as *const AtomicU32, self.len / WORD) }
    }

    /// The `bytes / 4` words from `addr` (4-aligned; panics if outside the arena: callers check
    /// bounds first).
    fn word_run(&self, addr: usize, bytes: usize) -> &[AtomicU32] {
        let first = addr.wrapping_sub(self.base) / WORD;
        &self.words()[first..first + bytes / WORD]
    }

    /// The word containing `addr` (panics if outside the arena: callers check bounds first).
    fn word(&self, addr: usize) -> &AtomicU32 {
        &self.words()[addr.wrapping_sub(self.base) / WORD]
    }

    /// Stores `len` bytes at `addr` (bounds already checked): `data`, or zeros when `None`.
    fn store(&self, addr: usize, data: Option<&[u8]>, len: usize) {
        let byte = |i: usize| data.map_or(0, |d| d[i]);
        let (head, body, tail) = split_words(addr, len);
        if head != 0 {
            let lo = addr % WORD;
            self.merge(addr - lo, lo, head, byte);
        }
        let words = self.word_run(addr + head, body);
        match data {
            Some(d) => {
                for (w, c) in words.iter().zip(d[head..head + body].chunks_exact(WORD)) {
                    w.store(
                        u32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
                        Ordering::Relaxed,
                    );
                }
            }
            None => words.iter().for_each(|w| w.store(0, Ordering::Relaxed)),
        }
        if tail != 0 {
            let i = head + body;
            self.merge(addr + i, 0, tail, |j| byte(i + j));
        }
    }

    /// Replaces bytes `[lo, lo + n)` of the word at `word_addr` with `byte(0..n)`, leaving the
    /// others as they are even if other threads change them meanwhile.
    fn merge(&self, word_addr: usize, lo: usize, n: usize, byte: impl Fn(usize) -> u8) {
        let _ = self
            .word(word_addr)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                let mut w = old.to_ne_bytes();
                for j in 0..n {
                    w[lo + j] = byte(j);
                }
                Some(u32::from_ne_bytes(w))
            });
    }
}

/// Whether `x` is a multiple of [`PAGE_SIZE`].
fn page_aligned(x: usize) -> bool {
    x & (PAGE_SIZE - 1) == 0
}

/// Splits `[addr, addr + len)` into a partial first word, whole words, and a partial last word:
/// returns the byte counts `(head, body, tail)`.
fn split_words(addr: usize, len: usize) -> (usize, usize, usize) {
    let lo = addr % WORD;
    let head = if lo == 0 { 0 } else { (WORD - lo).min(len) };
    let body = (len - head) / WORD * WORD;
    (head, body, len - head - body)
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: we own the mapping, and `&mut self` proves no method is using it; Rust never
        // handed out references into it.
        let _ = unsafe { rustix::mm::munmap(self.base as *mut _, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{read_maps_range, read_vm_flags, VmFlags};
    use crate::HUGE_PAGE_SIZE;
    use std::sync::Arc;

    /// A tiny deterministic generator for test data.
    fn bytes(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect()
    }

    fn snapshot(a: &Arena) -> Vec<u8> {
        let mut v = vec![0xAA; a.len()];
        a.read(0, &mut v).unwrap();
        v
    }

    #[test]
    fn arena_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Arena>();
    }

    #[test]
    fn new_rejects_bad_sizes_and_alignments() {
        for (len, align) in [
            (0, PAGE_SIZE),
            (100, PAGE_SIZE),
            (PAGE_SIZE, 2048),
            (PAGE_SIZE, 3 * PAGE_SIZE),
        ] {
            assert!(
                matches!(Arena::new(len, align), Err(SysError::Invalid { .. })),
                "{len} {align}"
            );
        }
        assert!(matches!(
            Arena::new(usize::MAX & !(PAGE_SIZE - 1), 1 << 40),
            Err(SysError::Invalid { .. })
        ));
    }

    #[test]
    fn base_is_aligned_and_the_mapping_trimmed() {
        for align in [PAGE_SIZE, 64 << 10, HUGE_PAGE_SIZE] {
            let a = Arena::new(3 * PAGE_SIZE, align).unwrap();
            assert_eq!(a.base() % align, 0);
            assert_eq!((a.len(), a.is_empty()), (3 * PAGE_SIZE, false));
            let vmas =
                read_maps_range(a.base() - PAGE_SIZE, a.base() + a.len() + PAGE_SIZE).unwrap();
            let v = vmas.iter().find(|v| v.start <= a.base()).unwrap();
            assert!(
                v.end >= a.base() + a.len() && v.read && v.write && !v.shared,
                "{v:x?}"
            );
            let flags = read_vm_flags(a.base(), a.base() + a.len()).unwrap();
            assert!(
                flags.iter().all(|f| f.2.contains(VmFlags::NH)),
                "{flags:x?}"
            );
            assert_eq!(snapshot(&a), vec![0; a.len()]);
        }
    }

    #[test]
    fn addresses_are_bounds_checked() {
        let a = Arena::new(2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let end = 2 * PAGE_SIZE;
        assert_eq!(a.addr(0), Some(a.base()));
        assert_eq!(a.addr(end - 1), Some(a.base() + end - 1));
        assert_eq!(a.addr(end), None);
        assert_eq!(a.checked_addr(end, 0), Some(a.base() + end));
        assert_eq!(a.checked_addr(end - 4, 4), Some(a.base() + end - 4));
        assert_eq!(a.checked_addr(end - 4, 5), None);
        assert_eq!(a.checked_addr(usize::MAX, 2), None);
        let invalid = |r: SysResult<()>| matches!(r, Err(SysError::Invalid { .. }));
        assert!(invalid(a.read(end - 3, &mut [0; 4])));
        assert!(invalid(a.write(end, &[1])));
        assert!(invalid(a.zero(1, usize::MAX)));
        assert!(invalid(a.copy_within(0, end - 10, 11)));
        assert!(invalid(a.copy_within(end - 10, 0, 11)));
        assert!(invalid(a.discard(PAGE_SIZE, 2 * PAGE_SIZE)));
        assert!(invalid(a.discard(100, PAGE_SIZE)));
        assert!(invalid(a.discard(0, 100)));
        assert!(matches!(a.read_u32(2), Err(SysError::Invalid { .. })));
        assert!(matches!(a.read_u32(end), Err(SysError::Invalid { .. })));
        assert!(invalid(a.write_u32(end - 2, 0)));
        assert!(matches!(
            a.fetch_add_u32(usize::MAX - 3, 1),
            Err(SysError::Invalid { .. })
        ));
        // Nothing was written by the rejected calls; empty ranges at the end are fine.
        a.write(end, &[]).unwrap();
        a.read(end, &mut []).unwrap();
        assert_eq!(snapshot(&a), vec![0; end]);
    }

    #[test]
    fn writes_read_back_at_any_offset_and_length() {
        let a = Arena::new(4 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let mut model = vec![0u8; a.len()];
        let mut seed = 1;
        for (off, len) in [
            (0, 1),
            (1, 2),
            (3, 1),
            (5, 7),
            (6, 2),
            (4095, 2),
            (17, 3 * PAGE_SIZE),
            (0, 4 * PAGE_SIZE),
        ] {
            seed += 1;
            let data = bytes(len, seed);
            a.write(off, &data).unwrap();
            model[off..off + len].copy_from_slice(&data);
            let mut back = vec![0; len];
            a.read(off, &mut back).unwrap();
            assert_eq!(back, data, "{off} {len}");
            assert_eq!(snapshot(&a), model, "{off} {len}");
        }
        a.zero(3, 4090).unwrap();
        model[3..4093].fill(0);
        assert_eq!(snapshot(&a), model);
    }

    #[test]
    fn copy_within_handles_overlap_both_ways() {
        let a = Arena::new(4 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let mut model = bytes(a.len(), 7);
        a.write(0, &model).unwrap();
        for (src, dst, len) in [
            (0, 1, 9000),
            (1, 0, 9000),
            (100, 5000, 6000),
            (5000, 103, 6000),
            (8, 8, 50),
            (3, 2, 1),
        ] {
            a.copy_within(src, dst, len).unwrap();
            model.copy_within(src..src + len, dst);
            assert_eq!(snapshot(&a), model, "{src} {dst} {len}");
        }
    }

    #[test]
    fn u32_atomics() {
        let a = Arena::new(PAGE_SIZE, PAGE_SIZE).unwrap();
        a.write_u32(8, 41).unwrap();
        assert_eq!(a.fetch_add_u32(8, 1).unwrap(), 41);
        assert_eq!(a.read_u32(8).unwrap(), 42);
        assert_eq!(a.fetch_add_u32(8, u32::MAX).unwrap(), 42);
        assert_eq!(a.read_u32(8).unwrap(), 41);
        let mut b = [0; 4];
        a.read(8, &mut b).unwrap();
        assert_eq!(u32::from_ne_bytes(b), 41);
        a.write(12, &7u32.to_ne_bytes()).unwrap();
        assert_eq!(a.read_u32(12).unwrap(), 7);
    }

    #[test]
    fn discard_frees_pages_to_zero() {
        let a = Arena::new(3 * PAGE_SIZE, PAGE_SIZE).unwrap();
        a.write(0, &vec![0xEE; a.len()]).unwrap();
        a.discard(PAGE_SIZE, PAGE_SIZE).unwrap();
        a.discard(0, 0).unwrap();
        let got = snapshot(&a);
        assert!(got[..PAGE_SIZE].iter().all(|&b| b == 0xEE));
        assert!(got[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(got[2 * PAGE_SIZE..].iter().all(|&b| b == 0xEE));
    }

    #[test]
    fn threads_on_disjoint_bytes_do_not_disturb_each_other() {
        // Neighbouring threads share words: thread t owns bytes t, t + 4, t + 8, ... and the
        // counter at offset 0 of the last page is shared by all.
        const THREADS: usize = 4;
        const ROUNDS: u32 = 200;
        let a = Arc::new(Arena::new(2 * PAGE_SIZE, PAGE_SIZE).unwrap());
        let counter = PAGE_SIZE;
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let a = Arc::clone(&a);
                std::thread::spawn(move || {
                    for round in 0..ROUNDS {
                        for i in (t..PAGE_SIZE).step_by(THREADS) {
                            a.write(i, &[(round as u8) ^ (t as u8)]).unwrap();
                        }
                        a.fetch_add_u32(counter, 1).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(a.read_u32(counter).unwrap(), THREADS as u32 * ROUNDS);
        let got = snapshot(&a);
        for (i, &b) in got[..PAGE_SIZE].iter().enumerate() {
            assert_eq!(b, ((ROUNDS - 1) as u8) ^ ((i % THREADS) as u8), "byte {i}");
        }
    }
}
