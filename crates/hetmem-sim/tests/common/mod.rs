//! Shared fixtures and helpers of the HMM self-test port (`hmm_tests.rs`): the `hmm` / `hmm2`
//! fixtures, `struct hmm_buffer`, the int patterns, temp files and fork helpers.
//!
//! Tests are not library code: they touch the mapped memory with raw pointers on purpose (a CPU
//! access to a device-resident page is what must be served transparently).
#![allow(dead_code)]

use std::{
    fs::File,
    os::unix::fs::{FileExt, OpenOptionsExt},
    sync::Arc,
};

use hetmem::{AddressSpace, Prot};
use hetmem_core::{pool::MemoryKind, PageRange};
use hetmem_sim::{mirror::DEFAULT_CAPACITY, CmdResult, DmirrorDevice, Mirror, MirrorError};

/// Base page size.
pub const PS: u64 = 4096;
/// `HMM_BUFFER_SIZE`.
pub const BUFFER_SIZE: u64 = 1024 << 12;
/// `N`: pages of an `HMM_BUFFER_SIZE` buffer.
pub const N: u64 = BUFFER_SIZE / PS;
/// `TWOMEG`.
pub const TWOMEG: u64 = 2 << 20;

pub const PRIVATE: MemoryKind = MemoryKind::DevicePrivate;
pub const COHERENT: MemoryKind = MemoryKind::DeviceCoherent;

/// `read_pmd_pagesize()`, with the tests' 2 MiB fallback when it is unknown.
pub fn pmd_size() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&v: &u64| v != 0)
        .unwrap_or(TWOMEG)
}

/// The process's address space.
pub fn mm() -> &'static Arc<AddressSpace> {
    AddressSpace::current().expect("hetmem address space")
}

/// The `hmm` fixture: one device, one open mirror.
pub struct Hmm {
    pub dev: Arc<DmirrorDevice>,
    pub m: Mirror,
}

impl Hmm {
    pub fn new(kind: MemoryKind) -> Self {
        let dev = DmirrorDevice::new(kind, DEFAULT_CAPACITY).expect("create device");
        let m = dev.open().expect("open device");
        Hmm { dev, m }
    }
}

/// The `hmm2` fixture: two devices of one kind, one mirror on each.
pub struct Hmm2 {
    pub dev0: Arc<DmirrorDevice>,
    pub dev1: Arc<DmirrorDevice>,
    pub m0: Mirror,
    pub m1: Mirror,
}

impl Hmm2 {
    pub fn new(kind: MemoryKind) -> Self {
        let dev0 = DmirrorDevice::new(kind, DEFAULT_CAPACITY).expect("create device 0");
        let dev1 = DmirrorDevice::new(kind, DEFAULT_CAPACITY).expect("create device 1");
        let m0 = dev0.open().expect("open device 0");
        let m1 = dev1.open().expect("open device 1");
        Hmm2 { dev0, dev1, m0, m1 }
    }
}

/// `struct hmm_buffer`: `ptr` (the address the device and the CPU access), `size`, `mirror` (the
/// `cmd.ptr` buffer), and the mapping to release at the end (`None`: leaked or released by the
/// test).
pub struct Buffer {
    pub ptr: u64,
    pub size: u64,
    pub mirror: Vec<u8>,
    pub mapping: Option<PageRange>,
}

impl Buffer {
    /// `size` bytes of hetmem-managed anonymous memory (private, or shared with `shared`).
    pub fn anon(size: u64, prot: Prot, shared: bool) -> Self {
        let r = mm()
            .map_anonymous(size, prot, shared)
            .expect("map_anonymous");
        Buffer {
            ptr: r.start().0,
            size,
            mirror: vec![0; size as usize],
            mapping: Some(r),
        }
    }

    /// `size` bytes of managed private anonymous memory aligned to `align`.
    pub fn aligned(size: u64, align: u64, prot: Prot) -> Self {
        let r = mm()
            .map_anonymous_aligned(size, align, prot)
            .expect("map_anonymous_aligned");
        Buffer {
            ptr: r.start().0,
            size,
            mirror: vec![0; size as usize],
            mapping: Some(r),
        }
    }

    /// A buffer over a mapping the test made itself (released with `AddressSpace::unmap`).
    pub fn raw(ptr: u64, size: u64) -> Self {
        let r = PageRange::new(ptr, size).expect("raw mapping range");
        Buffer {
            ptr,
            size,
            mirror: vec![0; size as usize],
            mapping: Some(r),
        }
    }

    pub fn npages(&self) -> u64 {
        self.size / PS
    }
    pub fn nints(&self) -> usize {
        (self.size / 4) as usize
    }
    pub fn range(&self) -> PageRange {
        PageRange::new(self.ptr, self.size).expect("buffer range")
    }
    fn int_ptr(&self, k: usize) -> *mut i32 {
        assert!(k < self.nints(), "int index {k} outside the buffer");
        (self.ptr as usize + 4 * k) as *mut i32
    }

    /// CPU read of int `k` of `ptr`.
    pub fn get(&self, k: usize) -> i32 {
        // SAFETY: `k` is inside the buffer's live, readable mapping (checked above); no Rust
        // reference to it exists; a device-resident page is brought back by hetmem's fault
        // handler, which is the behaviour under test.
        unsafe { std::ptr::read_volatile(self.int_ptr(k)) }
    }
    /// CPU write of int `k` of `ptr`.
    pub fn set(&self, k: usize, v: i32) {
        // SAFETY: as for `get`; the mapping is writable where tests call this.
        unsafe { std::ptr::write_volatile(self.int_ptr(k), v) }
    }
    /// `ptr[k] = f(k)` for every int.
    pub fn fill(&self, f: impl Fn(usize) -> i32) {
        for k in 0..self.nints() {
            self.set(k, f(k));
        }
    }
    /// Asserts `ptr[k] == f(k)` for every int in `ks`.
    pub fn check_range(&self, ks: std::ops::Range<usize>, f: impl Fn(usize) -> i32, what: &str) {
        for k in ks {
            let v = self.get(k);
            assert_eq!(v, f(k), "{what}: ptr[{k}]");
        }
    }
    /// Asserts `ptr[k] == f(k)` for every int.
    pub fn check(&self, f: impl Fn(usize) -> i32, what: &str) {
        self.check_range(0..self.nints(), f, what)
    }

    /// Int `k` of the mirror.
    pub fn mget(&self, k: usize) -> i32 {
        i32::from_ne_bytes(self.mirror[4 * k..4 * k + 4].try_into().expect("4 bytes"))
    }
    /// `mirror[k] = f(k)` for every int.
    pub fn mfill(&mut self, f: impl Fn(usize) -> i32) {
        for (k, c) in self.mirror.chunks_exact_mut(4).enumerate() {
            c.copy_from_slice(&f(k).to_ne_bytes());
        }
    }
    /// Asserts `mirror[k] == f(k)` for every int in `ks`.
    pub fn mcheck_range(&self, ks: std::ops::Range<usize>, f: impl Fn(usize) -> i32, what: &str) {
        for k in ks {
            assert_eq!(self.mget(k), f(k), "{what}: mirror[{k}]");
        }
    }
    /// Asserts `mirror[k] == f(k)` for the ints of `size` bytes.
    pub fn mcheck(&self, f: impl Fn(usize) -> i32, what: &str) {
        self.mcheck_range(0..self.nints(), f, what)
    }

    /// Releases the mapping now (hmm_buffer_free's munmap), through hetmem.
    pub fn free(&mut self) {
        if let Some(r) = self.mapping.take() {
            // SAFETY: the tests hold no Rust reference into their buffers (all accesses are raw
            // pointer reads and writes), and nothing uses the range afterwards.
            unsafe { mm().unmap(r) }.expect("unmap buffer");
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(r) = self.mapping.take() {
            // SAFETY: as in `free`. Errors are ignored while unwinding from a failed assertion.
            let _ = unsafe { mm().unmap(r) };
        }
    }
}

/// `mprotect` through hetmem.
pub fn protect(ptr: u64, len: u64, prot: Prot) {
    let r = PageRange::new(ptr, len).expect("protect range");
    // SAFETY: the tests hold no Rust reference into their mappings.
    unsafe { mm().protect(r, prot) }.expect("protect");
}

/// `munmap` through hetmem.
pub fn unmap(ptr: u64, len: u64) {
    let r = PageRange::new(ptr, len).expect("unmap range");
    // SAFETY: the tests hold no Rust reference into their mappings.
    unsafe { mm().unmap(r) }.expect("unmap");
}

/// Raw `madvise`, for advice that does not change contents (HUGEPAGE, NOHUGEPAGE, COLLAPSE) or
/// where the kernel test's own raw call is the point (FREE). Returns the errno on failure.
pub fn madvise(ptr: u64, len: u64, advice: i32) -> Result<(), i32> {
    // SAFETY: plain syscall on a range of the test's own mapping; the advice passed by the tests
    // does not invalidate any Rust reference (there are none into these mappings).
    let rc = unsafe { libc::madvise(ptr as *mut libc::c_void, len as usize, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// `MADV_COLLAPSE` (6.1).
pub const MADV_COLLAPSE: i32 = 25;

/// Asserts a successful command with the given `cpages` (and `faults` if given).
#[track_caller]
pub fn assert_ok(r: Result<CmdResult, MirrorError>, cpages: u64, faults: Option<u64>, what: &str) {
    match r {
        Ok(c) => {
            assert_eq!(c.cpages, cpages, "{what}: cpages");
            if let Some(f) = faults {
                assert_eq!(c.faults, f, "{what}: faults");
            }
        }
        Err(e) => panic!("{what}: expected success, got {e:?} (errno {})", e.errno()),
    }
}

/// Asserts a failed command with `errno`.
#[track_caller]
pub fn assert_errno(r: Result<CmdResult, MirrorError>, errno: i32, what: &str) {
    match r {
        Ok(c) => panic!("{what}: expected errno {errno}, got success {c:?}"),
        Err(e) => assert_eq!(e.errno(), errno, "{what}: errno (got {e:?})"),
    }
}

/// `hmm_create_file(size)`: an unnamed temporary file of `size` bytes in /tmp.
pub fn create_file(size: u64) -> File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_EXCL)
        .mode(0o600)
        .open("/tmp")
        .expect("O_TMPFILE in /tmp");
    f.set_len(size).expect("ftruncate");
    f
}

/// Writes `data` at offset 0 of `f` (the test's pwrite).
pub fn pwrite_all(f: &File, data: &[u8]) {
    f.write_all_at(data, 0).expect("pwrite");
}

/// Reads `len` bytes at offset 0 of `f` (the test's pread).
pub fn pread_all(f: &File, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, 0).expect("pread");
    v
}

/// Raw `mmap` of a file (hetmem does not manage file mappings).
pub fn mmap_file(f: &File, len: u64, prot: i32, flags: i32) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: a null hint without MAP_FIXED maps fresh address space that nothing references.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            prot,
            flags,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap of the file");
    p as u64
}

/// `hmm_random()`.
pub fn random_u32() -> u32 {
    use std::io::Read;
    let mut b = [0u8; 4];
    match File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u32::from_ne_bytes(b),
        Err(_) => !0,
    }
}

/// Forks; the child runs `f` and exits with 0, or 1 if `f` panicked (a failed assertion). Returns
/// the child's pid in the parent.
pub fn fork_child(f: impl FnOnce()) -> libc::pid_t {
    // SAFETY: fork() itself; the child only runs `f` (hetmem calls and raw memory accesses, as
    // the brief allows) and leaves with `_exit`, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        // SAFETY: terminates the child without running the parent's atexit handlers or
        // destructors.
        unsafe { libc::_exit(if r.is_ok() { 0 } else { 1 }) }
    }
    pid
}

/// `waitpid(pid)`; returns the raw status.
pub fn wait_child(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return status;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EINTR), "waitpid: {e}");
    }
}

/// Asserts the child exited with status 0.
#[track_caller]
pub fn assert_child_ok(status: i32) {
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally (status {status:#x})"
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "child failed (see its assertion message above)"
    );
}

/// `/proc/sys/vm/nr_hugepages`.
pub fn nr_hugepages() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The default hugetlb page size (`Hugepagesize` in /proc/meminfo), 0 if unknown.
pub fn default_huge_page_size() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Hugepagesize:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(|kb| kb * 1024)
                })
        })
        .unwrap_or(0)
}

/// Rounds `v` up to a multiple of `a` (a power of two).
pub fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// Wall-clock budget of a stress test: `HETMEM_STRESS_SECS` seconds (default 2).
pub fn stress_budget() -> std::time::Duration {
    let secs = std::env::var("HETMEM_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    std::time::Duration::from_secs(secs)
}
