//! Fault-tolerant copies to and from this process's own virtual addresses: how a (simulated)
//! device does "DMA" on user memory without ever crashing the process.
//!
//! A device thread that dereferenced a user pointer would take SIGSEGV when the program unmaps or
//! protects the range under it (the HMM contract allows exactly that: invalidation may come at
//! any time). These copies go through the kernel instead, which checks every page and answers
//! EFAULT:
//!
//! * [`read_user`] / [`write_user`]: `process_vm_readv(2)` / `process_vm_writev(2)` on our own
//!   pid. They obey VMA permissions (a read-only or `PROT_NONE` page is EFAULT), fault pages in
//!   the way GUP does (a missing page is allocated; a userfaultfd-registered one raises a uffd
//!   fault, which with `UFFD_USER_MODE_ONLY` fails with EFAULT), and stop at the first page that
//!   cannot be reached: a partial copy is [`SysError::Short`], nothing copied is `Os(EFAULT)`.
//! * [`ProcMem`]: `pread`/`pwrite` on `/proc/self/mem`, which the kernel performs with
//!   `FOLL_FORCE` (proc(5); `CONFIG_PROC_MEM_ALWAYS_FORCE`, the default). That lets the runtime
//!   fill a *private* page that is still `PROT_NONE` and only then grant access, so no thread can
//!   observe a half-copied page. Forced writes to *shared* `PROT_NONE` memory are refused (EIO):
//!   the kernel only force-writes copy-on-write mappings (`check_vma_flags` in mm/gup.c).
//!
//! Neighbours: `mman` sets the protections these copies respect, `arena` is the device memory
//! on the other side of the copy. The kernel's copy is not a Rust access: it races with Rust
//! code only the way another process writing shared memory does, so the data seen may be torn but
//! no Rust-level data race happens. Writing, however, changes memory that Rust code might own,
//! which is why the writing functions are `unsafe`.

use std::os::fd::OwnedFd;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::error::{SysError, SysResult};

/// The most one `process_vm_*` iovec carries. The kernel silently caps a call at `MAX_RW_COUNT`
/// (2 GiB minus a page); staying well below keeps every partial result meaningful.
const MAX_IOV_LEN: usize = 1 << 30;

/// Copies `buf.len()` bytes from this process's address `addr` into `buf` with
/// `process_vm_readv`.
///
/// Fails with `Os(EFAULT)` when the first byte cannot be read (unmapped, `PROT_NONE`, beyond the
/// address space) and with [`SysError::Short`] when the copy stopped part way.
pub fn read_user(addr: usize, buf: &mut [u8]) -> SysResult<()> {
    // SAFETY: the kernel writes only into `buf`, which is exclusively borrowed and `buf.len()`
    // bytes long; every byte pattern is a valid `u8`. The source is read by the kernel with the
    // VMA permissions checked, and faults become EFAULT, never a signal. Reading memory that Rust
    // code concurrently writes yields torn bytes in `buf`, not undefined behaviour: the kernel's
    // copy is outside the Rust abstract machine.
    unsafe { vm_copy(addr, buf.as_mut_ptr(), buf.len(), Dir::Read, MAX_IOV_LEN) }
}

/// Copies `data` to this process's address `addr` with `process_vm_writev`.
///
/// Fails with `Os(EFAULT)` when the first byte cannot be written (unmapped, read-only,
/// `PROT_NONE`) and with [`SysError::Short`] when the copy stopped part way.
///
/// # Safety
///
/// `[addr, addr + data.len())` must not be memory that Rust code reads or writes through
/// references, or whose contents any live Rust value depends on: no `&`/`&mut` may point into it,
/// and it must not hold Rust objects (stack frames, heap allocations, statics). In hetmem it is
/// only ever managed user memory or device memory, which Rust code accesses by raw copies alone.
/// Addresses that are not mapped or not writable are fine: they are reported as errors.
pub unsafe fn write_user(addr: usize, data: &[u8]) -> SysResult<()> {
    // SAFETY: the kernel only reads `data` (a live shared slice of `data.len()` bytes). The
    // destination is checked by the kernel (faults become EFAULT) and, by this function's
    // contract, holds nothing Rust code borrows or relies on.
    unsafe {
        vm_copy(
            addr,
            data.as_ptr().cast_mut(),
            data.len(),
            Dir::Write,
            MAX_IOV_LEN,
        )
    }
}

/// Copies `len` bytes from this process's address `src` to its address `dst` with one
/// `process_vm_readv` (a kernel memcpy that checks both sides: a fault on either is an error,
/// never a signal). Used to move a run of pages between managed memory and device frames.
///
/// # Safety
///
/// `[dst, dst + len)` must satisfy the contract of [`write_user`] and must not overlap
/// `[src, src + len)`.
pub unsafe fn copy_user(dst: usize, src: usize, len: usize) -> SysResult<()> {
    // SAFETY: the kernel writes `len` bytes at `dst` (the local side) and checks the mapping,
    // answering EFAULT for a bad one; by the caller's contract nothing Rust borrows lives there.
    unsafe { vm_copy(src, dst as *mut u8, len, Dir::Read, MAX_IOV_LEN) }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Remote (`addr`) to local (`local`).
    Read,
    /// Local to remote.
    Write,
}

/// The loop behind [`read_user`] and [`write_user`], in calls of at most `chunk` bytes.
///
/// # Safety
///
/// `local` must be valid for `len` bytes: for writes by the kernel when `dir` is `Read` (and not
/// aliased by any live reference), for reads when `dir` is `Write`. When `dir` is `Write`, the
/// remote range must satisfy the contract of [`write_user`].
unsafe fn vm_copy(
    addr: usize,
    local: *mut u8,
    len: usize,
    dir: Dir,
    chunk: usize,
) -> SysResult<()> {
    let op = match dir {
        Dir::Read => "process_vm_readv",
        Dir::Write => "process_vm_writev",
    };
    if addr.checked_add(len).is_none() {
        return Err(SysError::Invalid {
            op,
            why: "range wraps around the address space",
        });
    }
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk);
        let local_iov = libc::iovec {
            // `done < len`, so this stays inside the caller's buffer.
            iov_base: local.wrapping_add(done).cast(),
            iov_len: n,
        };
        let remote_iov = libc::iovec {
            iov_base: (addr + done) as *mut libc::c_void,
            iov_len: n,
        };
        // SAFETY: both iovec arrays are single, live locals. The local iovec covers `n` bytes of
        // the caller's buffer, which the caller guarantees is valid for the kernel's access in
        // this direction; the remote side is checked by the kernel page by page (EFAULT, no
        // signal), and for writes the caller guarantees nothing Rust owns lives there.
        let r = unsafe {
            match dir {
                Dir::Read => libc::process_vm_readv(pid, &local_iov, 1, &remote_iov, 1, 0),
                Dir::Write => libc::process_vm_writev(pid, &local_iov, 1, &remote_iov, 1, 0),
            }
        };
        if r > 0 {
            done += r as usize;
            continue;
        }
        let err = if r == 0 {
            Errno::FAULT
        } else {
            Errno::from_raw_os_error(errno())
        };
        if err == Errno::INTR {
            continue;
        }
        return Err(if done == 0 {
            SysError::os(op, err)
        } else {
            SysError::Short { op, done, len }
        });
    }
    Ok(())
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `/proc/self/mem`, for forced access to this process's memory (proc(5)).
///
/// The file is bound to the address space it was opened in: after `fork` the child's copy of the
/// descriptor still reads and writes the parent.
#[derive(Debug)]
pub struct ProcMem {
    fd: OwnedFd,
}

impl ProcMem {
    /// Opens `/proc/self/mem` read-write, `O_CLOEXEC`.
    pub fn open() -> SysResult<ProcMem> {
        let fd = rustix::fs::open(
            "/proc/self/mem",
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SysError::os("open(/proc/self/mem)", e))?;
        Ok(ProcMem { fd })
    }

    /// Reads `buf.len()` bytes at `addr`, whatever the page protection (`PROT_NONE` included).
    /// Unmapped addresses fail with `Os(EIO)`, or [`SysError::Short`] after a partial read.
    pub fn read(&self, addr: usize, buf: &mut [u8]) -> SysResult<()> {
        const OP: &str = "pread(/proc/self/mem)";
        let off = mem_offset(OP, addr, buf.len())?;
        let len = buf.len();
        let mut done = 0;
        while done < len {
            match rustix::io::pread(&self.fd, &mut buf[done..], off + done as u64) {
                Ok(0) => return Err(short_or_eio(OP, done, len)),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) if done == 0 => return Err(SysError::os(OP, e)),
                Err(_) => return Err(SysError::Short { op: OP, done, len }),
            }
        }
        Ok(())
    }

    /// Writes `data` at `addr`, whatever the protection of a *private* mapping (`PROT_NONE` and
    /// read-only included: the kernel breaks copy-on-write into a private anonymous page without
    /// making the PTE writable). Writes to shared mappings without `PROT_WRITE` and to unmapped
    /// addresses fail with `Os(EIO)`, or [`SysError::Short`] after a partial write.
    ///
    /// # Safety
    ///
    /// As for [`write_user`]: `[addr, addr + data.len())` must not be memory that Rust code holds
    /// references to or whose contents any live Rust value depends on. Since protections are
    /// bypassed, this includes read-only memory such as code and `static`s.
    pub unsafe fn write(&self, addr: usize, data: &[u8]) -> SysResult<()> {
        const OP: &str = "pwrite(/proc/self/mem)";
        let off = mem_offset(OP, addr, data.len())?;
        let len = data.len();
        let mut done = 0;
        while done < len {
            // `pwrite` on /proc/self/mem stores into our own memory; the caller guarantees that
            // nothing Rust owns or borrows lives there.
            match rustix::io::pwrite(&self.fd, &data[done..], off + done as u64) {
                Ok(0) => return Err(short_or_eio(OP, done, len)),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) if done == 0 => return Err(SysError::os(OP, e)),
                Err(_) => return Err(SysError::Short { op: OP, done, len }),
            }
        }
        Ok(())
    }
}

impl ProcMem {
    /// [`ProcMem::write`] from a raw source: writes `len` bytes read from `src` at `addr`,
    /// whatever the protection of a private mapping.
    ///
    /// # Safety
    ///
    /// `src` must be readable for `len` bytes and not written concurrently; the destination must
    /// satisfy the contract of [`ProcMem::write`].
    pub unsafe fn write_from(&self, addr: usize, src: *const u8, len: usize) -> SysResult<()> {
        // SAFETY: the caller guarantees `src` is readable and stable for `len` bytes, so the
        // slice is valid for its lifetime here; the write's contract is passed on.
        unsafe { self.write(addr, std::slice::from_raw_parts(src, len)) }
    }
}

/// The file offset of `addr` in `/proc/self/mem` (it is the address, as a non-negative `loff_t`).
fn mem_offset(op: &'static str, addr: usize, len: usize) -> SysResult<u64> {
    match addr.checked_add(len) {
        Some(end) if end as u64 <= i64::MAX as u64 => Ok(addr as u64),
        _ => Err(SysError::Invalid {
            op,
            why: "address beyond the file offset range",
        }),
    }
}

fn short_or_eio(op: &'static str, done: usize, len: usize) -> SysError {
    if done == 0 {
        SysError::os(op, Errno::IO)
    } else {
        SysError::Short { op, done, len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};

    use crate::test_map::Map;

    /// `pages` read-write private pages followed by an unmapped page (returned as well). The pair
    /// is placed low in the address space, where the kernel's top-down allocator does not reach,
    /// so that no concurrently running test can get a mapping into the hole.
    fn mapped_then_hole(pages: usize) -> (Map, usize) {
        let len = (pages + 1) * PAGE_SIZE;
        for base in (1..64).map(|i| i << 24) {
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
            let r = unsafe {
                rustix::mm::mmap_anonymous(
                    base as *mut _,
                    len,
                    rw(),
                    MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
                )
            };
            let Ok(p) = r else { continue };
            let hole = p as usize + pages * PAGE_SIZE;
            // SAFETY: the last page of the mapping we just made.
            unsafe { rustix::mm::munmap(hole as *mut _, PAGE_SIZE) }.unwrap();
            return (
                Map {
                    addr: p as usize,
                    len: pages * PAGE_SIZE,
                },
                hole,
            );
        }
        panic!("no free low address range");
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn rw() -> ProtFlags {
        ProtFlags::READ | ProtFlags::WRITE
    }

    #[test]
    fn read_user_and_write_user_round_trip() {
        let m = Map::anon(16 * PAGE_SIZE, rw(), MapFlags::PRIVATE);
        let data = pattern(m.len - 100, 5);
        // SAFETY: our own mapping, never borrowed by Rust.
        unsafe { write_user(m.addr + 50, &data) }.unwrap();
        assert_eq!(m.bytes(50, data.len()), data);
        let mut back = vec![0; data.len()];
        read_user(m.addr + 50, &mut back).unwrap();
        assert_eq!(back, data);
        read_user(m.addr, &mut []).unwrap();
    }

    #[test]
    fn copies_split_into_chunks_and_stop_short_at_a_hole() {
        let m = Map::anon(4 * PAGE_SIZE, rw(), MapFlags::PRIVATE);
        let data = pattern(3 * PAGE_SIZE, 9);
        // SAFETY: our own mapping, never borrowed; `data` is valid for reads.
        unsafe {
            vm_copy(
                m.addr,
                data.as_ptr().cast_mut(),
                data.len(),
                Dir::Write,
                1000,
            )
        }
        .unwrap();
        let mut back = vec![0; data.len()];
        // SAFETY: `back` is valid for writes of its length and not otherwise borrowed.
        unsafe { vm_copy(m.addr, back.as_mut_ptr(), back.len(), Dir::Read, 4099) }.unwrap();
        assert_eq!(back, data);
        let (m, _hole) = mapped_then_hole(2);
        let mut buf = vec![0; 3 * PAGE_SIZE];
        // SAFETY: `buf` is valid for writes of its length and not otherwise borrowed.
        let r = unsafe { vm_copy(m.addr, buf.as_mut_ptr(), buf.len(), Dir::Read, 1000) };
        assert!(
            matches!(r, Err(SysError::Short { done, .. }) if done == 2 * PAGE_SIZE),
            "{r:?}"
        );
    }

    #[test]
    fn unmapped_memory_is_an_error_not_a_crash() {
        let (m, hole) = mapped_then_hole(1);
        let mut buf = vec![0u8; PAGE_SIZE];
        let e = read_user(hole, &mut buf).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EFAULT), "{e}");
        let mut two = vec![0u8; 2 * PAGE_SIZE];
        let e = read_user(m.addr, &mut two).unwrap_err();
        assert!(
            matches!(e, SysError::Short { done: PAGE_SIZE, len, .. } if len == 2 * PAGE_SIZE),
            "{e}"
        );
        // SAFETY: nothing is mapped at `hole`.
        let e = unsafe { write_user(hole, &buf) }.unwrap_err();
        assert_eq!(e.errno(), Some(libc::EFAULT), "{e}");
        assert!(matches!(
            read_user(usize::MAX, &mut buf),
            Err(SysError::Invalid { .. })
        ));
    }

    #[test]
    fn write_user_into_read_only_memory_fails() {
        let m = Map::anon(PAGE_SIZE, ProtFlags::READ, MapFlags::PRIVATE);
        // SAFETY: our own mapping, never borrowed by Rust.
        let e = unsafe { write_user(m.addr, &[1, 2, 3]) }.unwrap_err();
        assert_eq!(e.errno(), Some(libc::EFAULT), "{e}");
        assert_eq!(m.bytes(0, 3), [0, 0, 0]);
        let none = Map::anon(PAGE_SIZE, ProtFlags::empty(), MapFlags::PRIVATE);
        let e = read_user(none.addr, &mut [0; 8]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EFAULT), "{e}");
    }

    #[test]
    fn proc_mem_fills_a_private_prot_none_page() {
        let mem = ProcMem::open().unwrap();
        let m = Map::anon(2 * PAGE_SIZE, ProtFlags::empty(), MapFlags::PRIVATE);
        let data = pattern(PAGE_SIZE + 10, 3);
        // SAFETY: our own PROT_NONE mapping, never borrowed by Rust.
        unsafe { mem.write(m.addr + 7, &data) }.unwrap();
        let mut back = vec![0; data.len()];
        mem.read(m.addr + 7, &mut back).unwrap();
        assert_eq!(back, data);
        // The page stayed inaccessible to ordinary access.
        assert!(read_user(m.addr, &mut [0; 1]).is_err());
        m.protect(0, m.len, MprotectFlags::READ);
        assert_eq!(m.bytes(7, data.len()), data);
        assert_eq!(m.bytes(0, 7), [0; 7]);
    }

    #[test]
    fn proc_mem_refuses_shared_prot_none_writes() {
        let mem = ProcMem::open().unwrap();
        let m = Map::anon(PAGE_SIZE, rw(), MapFlags::SHARED);
        // SAFETY: our own mapping, never borrowed by Rust.
        unsafe { write_user(m.addr, &[42]) }.unwrap();
        m.protect(0, m.len, MprotectFlags::empty());
        // SAFETY: our own mapping, never borrowed by Rust.
        let e = unsafe { mem.write(m.addr, &[1]) }.unwrap_err();
        assert_eq!(e.errno(), Some(libc::EIO), "{e}");
        // Forced reads of shared PROT_NONE memory do work.
        let mut b = [0];
        mem.read(m.addr, &mut b).unwrap();
        assert_eq!(b, [42]);
    }

    #[test]
    fn proc_mem_on_unmapped_memory_is_eio() {
        let mem = ProcMem::open().unwrap();
        let (m, hole) = mapped_then_hole(1);
        let mut buf = vec![0; 2 * PAGE_SIZE];
        let e = mem.read(hole, &mut buf).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EIO), "{e}");
        let e = mem.read(m.addr, &mut buf).unwrap_err();
        assert!(
            matches!(
                e,
                SysError::Short {
                    done: PAGE_SIZE,
                    ..
                }
            ),
            "{e}"
        );
        // SAFETY: our own mapping (and a hole), never borrowed by Rust.
        let e = unsafe { mem.write(m.addr, &buf) }.unwrap_err();
        assert!(
            matches!(
                e,
                SysError::Short {
                    done: PAGE_SIZE,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            mem.read(usize::MAX - 1, &mut buf),
            Err(SysError::Invalid { .. })
        ));
    }
}
