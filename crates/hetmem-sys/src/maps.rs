//! `/proc/self/maps` and the `VmFlags` lines of `/proc/self/smaps`: the VMAs of this process as
//! the kernel sees them (proc(5), Documentation/filesystems/proc.rst §1.1).
//!
//! hetmem uses this to check what it believes about its own ranges (protection changes split
//! VMAs, which count against `vm.max_map_count`; `MADV_HUGEPAGE` and userfaultfd registration show
//! up as `hg`, `um`, `uw`), in tests, `check_invariants` and the `inspect` command. Neighbours:
//! `mman` makes the mappings, `pagemap` says what is behind each page of them.
//!
//! [`read_maps_range`] asks the kernel with the `PROCMAP_QUERY` ioctl (Linux 6.11+) on a
//! `/proc/self/maps` descriptor kept open per process: one tree lookup per VMA of the range,
//! whatever lies below it. On older kernels, and for `smaps`, the text is read.
//!
//! The files are `seq_file`s: each `read` returns about one page of whole lines and the kernel
//! takes the mmap lock per read, not for the whole file, so a listing is not an atomic snapshot
//! when other threads map or unmap meanwhile (it is still sorted and free of overlaps; the same
//! holds for a series of ioctls). Reading goes through one reusable per-thread buffer and stops
//! as soon as the lines pass the range asked for, which matters for `smaps`: every record it
//! produces walks that VMA's page tables.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use bitflags::bitflags;
use linux_raw_sys::general::{procmap_query, procmap_query_flags, PROCFS_IOCTL_MAGIC};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Opcode, Updater};

use crate::error::{SysError, SysResult};

/// What a VMA maps, from the last column of `/proc/self/maps`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum VmaName {
    /// No name: private anonymous memory.
    Anonymous,
    /// A file path, as the kernel prints it (newlines escaped as `\012`, possibly ending in
    /// ` (deleted)`). Shared anonymous memory appears as `/dev/zero (deleted)` (it is a shmem
    /// file) and memfds as `/memfd:NAME (deleted)`.
    File(PathBuf),
    /// A bracketed name: `[heap]`, `[stack]`, `[vdso]`, `[vvar]`, `[vvar_vclock]`, `[vsyscall]`,
    /// `[anon:NAME]` (`PR_SET_VMA_ANON_NAME`), `[anon_shmem:NAME]`, `[uprobes]`, ...
    Special(String),
}

/// One line of `/proc/self/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// `PROT_READ`.
    pub read: bool,
    /// `PROT_WRITE`.
    pub write: bool,
    /// `PROT_EXEC`.
    pub exec: bool,
    /// `MAP_SHARED` (`s`) rather than private copy-on-write (`p`).
    pub shared: bool,
    /// File offset of `start`; 0 for memory without a file (private anonymous memory and the
    /// kernel's special mappings).
    pub offset: u64,
    /// Inode of the backing file, 0 for anonymous memory.
    pub inode: u64,
    /// What the VMA maps.
    pub name: VmaName,
}

impl Vma {
    /// Private anonymous memory: unnamed, `[heap]`, `[stack]` or `[anon:NAME]`, and no inode.
    /// False for the kernel's special mappings (`[vdso]`, `[vvar]`, `[vsyscall]`, ...), for files,
    /// and for shared anonymous memory (a shmem file, see [`VmaName::File`]).
    pub fn is_anonymous(&self) -> bool {
        self.inode == 0
            && match &self.name {
                VmaName::Anonymous => true,
                VmaName::Special(s) => {
                    s == "[heap]"
                        || s == "[stack]"
                        || s.starts_with("[anon:")
                        || s.starts_with("[stack:")
                }
                VmaName::File(_) => false,
            }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Never true for a VMA the kernel reported.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    fn overlaps(&self, start: usize, end: usize) -> bool {
        self.start < end && start < self.end
    }
}

bitflags! {
    /// The `VmFlags:` codes of `/proc/self/smaps` that hetmem cares about (`show_smap_vma_flags`
    /// in fs/proc/task_mmu.c). Other codes are ignored.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct VmFlags: u64 {
        /// `rd`: readable.
        const RD = 1 << 0;
        /// `wr`: writable.
        const WR = 1 << 1;
        /// `ex`: executable.
        const EX = 1 << 2;
        /// `sh`: shared.
        const SH = 1 << 3;
        /// `mr`: may read.
        const MR = 1 << 4;
        /// `mw`: may write.
        const MW = 1 << 5;
        /// `me`: may execute.
        const ME = 1 << 6;
        /// `ms`: may share.
        const MS = 1 << 7;
        /// `gd`: stack segment that grows down.
        const GD = 1 << 8;
        /// `pf`: pure PFN range (no struct pages).
        const PF = 1 << 9;
        /// `io`: memory-mapped I/O.
        const IO = 1 << 10;
        /// `sr`: sequential read advised.
        const SR = 1 << 11;
        /// `rr`: random read advised.
        const RR = 1 << 12;
        /// `dc`: not copied on fork (`MADV_DONTFORK`).
        const DC = 1 << 13;
        /// `de`: not expanded on remap.
        const DE = 1 << 14;
        /// `ac`: accountable (counts against overcommit).
        const AC = 1 << 15;
        /// `nr`: swap space not reserved (`MAP_NORESERVE`).
        const NR = 1 << 16;
        /// `ht`: hugetlb.
        const HT = 1 << 17;
        /// `ar`: architecture-specific flag.
        const AR = 1 << 18;
        /// `dd`: not included in core dumps.
        const DD = 1 << 19;
        /// `sd`: soft-dirty.
        const SD = 1 << 20;
        /// `mm`: mixed map.
        const MM = 1 << 21;
        /// `hg`: `MADV_HUGEPAGE`.
        const HG = 1 << 22;
        /// `nh`: `MADV_NOHUGEPAGE`.
        const NH = 1 << 23;
        /// `mg`: mergeable (KSM).
        const MG = 1 << 24;
        /// `um`: userfaultfd missing-page tracking.
        const UM = 1 << 25;
        /// `uw`: userfaultfd write-protect tracking.
        const UW = 1 << 26;
    }
}

impl VmFlags {
    fn from_code(code: &[u8]) -> VmFlags {
        match code {
            b"rd" => VmFlags::RD,
            b"wr" => VmFlags::WR,
            b"ex" => VmFlags::EX,
            b"sh" => VmFlags::SH,
            b"mr" => VmFlags::MR,
            b"mw" => VmFlags::MW,
            b"me" => VmFlags::ME,
            b"ms" => VmFlags::MS,
            b"gd" => VmFlags::GD,
            b"pf" => VmFlags::PF,
            b"io" => VmFlags::IO,
            b"sr" => VmFlags::SR,
            b"rr" => VmFlags::RR,
            b"dc" => VmFlags::DC,
            b"de" => VmFlags::DE,
            b"ac" => VmFlags::AC,
            b"nr" => VmFlags::NR,
            b"ht" => VmFlags::HT,
            b"ar" => VmFlags::AR,
            b"dd" => VmFlags::DD,
            b"sd" => VmFlags::SD,
            b"mm" => VmFlags::MM,
            b"hg" => VmFlags::HG,
            b"nh" => VmFlags::NH,
            b"mg" => VmFlags::MG,
            b"um" => VmFlags::UM,
            b"uw" => VmFlags::UW,
            _ => VmFlags::empty(),
        }
    }

    /// Parses the value of a `VmFlags:` line (`"rd wr mr mw me ac sd"`).
    fn parse(list: &[u8]) -> VmFlags {
        list.split(|&b| b == b' ')
            .filter(|c| !c.is_empty())
            .fold(VmFlags::empty(), |acc, c| acc | VmFlags::from_code(c))
    }
}

/// All VMAs of this process, sorted by start.
pub fn read_maps() -> SysResult<Vec<Vma>> {
    read_maps_range(0, usize::MAX)
}

/// The VMAs of this process that overlap `[start, end)` (none when the range is empty), sorted by
/// start.
///
/// Uses the `PROCMAP_QUERY` ioctl on `/proc/self/maps` (Linux 6.11+): one O(log n) lookup per VMA
/// returned, plus one for the end of the range when it falls in a hole, instead of formatting
/// and parsing every line of the file up to `end`. Kernels without the ioctl get
/// [`read_maps_range_text`], decided on the first call. The two give the same answer (the tests
/// compare them); like the text, the answer is not an atomic snapshot when other threads map or
/// unmap meanwhile.
///
/// Measured on Linux 6.18 (x86-64, release build; `maps::tests::bench_read_maps_range` prints
/// them), per call:
///
/// | VMAs in the process | range (VMAs in it, VMAs up to its end)     | text     | ioctl    |
/// |---------------------|--------------------------------------------|----------|----------|
/// | 40                  | 1 page of a fresh mapping (1, 9)           | 14.5 µs  | 0.58 µs  |
/// | 40                  | last page of `[stack]` (1, 39)             | 16.1 µs  | 0.63 µs  |
/// | 40                  | everything (40, 40)                        | 17.6 µs  | 13.7 µs  |
/// | 1039                | 1 page of a fresh mapping (1, 9)           | 12.6 µs  | 0.53 µs  |
/// | 1039                | last page of `[stack]` (1, 1038)           | 258 µs   | 0.43 µs  |
/// | 1039                | 16 VMAs in the middle (16, 526)            | 136 µs   | 4.9 µs   |
/// | 1039                | everything (1039, 1039)                    | 232 µs   | 230 µs   |
/// | 10039               | 1 page of a fresh mapping (1, 9)           | 10.5 µs  | 0.42 µs  |
/// | 10039               | last page of `[stack]` (1, 10038)          | 3.0 ms   | 0.54 µs  |
/// | 10039               | 16 VMAs in the middle (16, 5026)           | 925 µs   | 3.5 µs   |
/// | 10039               | everything (10039, 10039)                  | 2.9 ms   | 2.7 ms   |
///
/// The text costs about 0.2-0.3 µs per VMA up to the end of the range (mmap places new mappings
/// below older ones, so a fresh mapping is cheap and libraries, early mappings and the stack are
/// not); the ioctl about 0.2-0.3 µs per VMA in the range plus a fixed ~0.4 µs. Opening
/// `/proc/self/maps` costs another ~1.1 µs, which is why the descriptor is kept open.
pub fn read_maps_range(start: usize, end: usize) -> SysResult<Vec<Vma>> {
    if start >= end {
        return Ok(Vec::new());
    }
    match query_backend()? {
        Backend::Query { gate } => {
            match read_maps_range_query(maps_fd()?, start, end, gate.as_ref()) {
                Ok(vmas) => Ok(vmas),
                // A name longer than `PATH_MAX`: only the text can carry it.
                Err(Errno::NAMETOOLONG) => read_maps_range_text(start, end),
                Err(e) => Err(SysError::os(QUERY_OP, e)),
            }
        }
        Backend::Text => read_maps_range_text(start, end),
    }
}

/// [`read_maps_range`] from the text of `/proc/self/maps`: reads (and the kernel formats) every
/// line up to the first VMA that starts at or after `end`. What `read_maps_range` does on kernels
/// without `PROCMAP_QUERY`; public so that the two can be compared.
pub fn read_maps_range_text(start: usize, end: usize) -> SysResult<Vec<Vma>> {
    const OP: &str = "read(/proc/self/maps)";
    let mut out = Vec::new();
    if start >= end {
        return Ok(out);
    }
    for_each_line("/proc/self/maps", OP, |line| {
        let vma = parse_maps_line(line).ok_or(SysError::Invalid {
            op: OP,
            why: "malformed line",
        })?;
        if vma.start >= end {
            return Ok(ControlFlow::Break(()));
        }
        if vma.overlaps(start, end) {
            out.push(vma);
        }
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(out)
}

/// Whether [`read_maps_range`] uses `PROCMAP_QUERY` (false: the kernel lacks it and the text is
/// parsed). Decided on the first call of either.
pub fn procmap_query_supported() -> SysResult<bool> {
    Ok(matches!(query_backend()?, Backend::Query { .. }))
}

/// The ioctl's name in errors.
const QUERY_OP: &str = "PROCMAP_QUERY";

/// `PROCMAP_QUERY` = `_IOWR(PROCFS_IOCTL_MAGIC ('f'), 17, struct procmap_query)` (uapi
/// `linux/fs.h`).
const PROCMAP_QUERY: Opcode =
    rustix::ioctl::opcode::read_write::<procmap_query>(PROCFS_IOCTL_MAGIC, 17);

#[cfg(target_arch = "x86_64")]
const _: () = assert!(PROCMAP_QUERY == 0xc068_6611);

/// `PATH_MAX`: the longest name `PROCMAP_QUERY` returns, terminating NUL included.
const NAME_MAX: usize = linux_raw_sys::general::PATH_MAX as usize;

/// How [`read_maps_range`] reads this process's VMAs.
#[derive(Debug)]
enum Backend {
    /// `PROCMAP_QUERY`.
    Query {
        /// The gate VMA (x86-64's `[vsyscall]`): listed last in the text, but not a VMA of the
        /// mm, so the ioctl never finds it. The same for every process of a 64-bit ABI.
        gate: Option<Vma>,
    },
    /// The text of `/proc/self/maps`.
    Text,
}

/// Decided by the first call; kept across `fork` (the child runs the same kernel).
static BACKEND: OnceLock<Backend> = OnceLock::new();

fn query_backend() -> SysResult<&'static Backend> {
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    // Probed outside the `OnceLock` (racing threads may both probe; one result is kept), so
    // that no thread is ever inside its initialisation for long: a child forked meanwhile
    // would wait on it forever.
    let backend = probe_backend()?;
    let _ = BACKEND.set(backend);
    Ok(BACKEND.get().expect("just set"))
}

fn probe_backend() -> SysResult<Backend> {
    let fd = maps_fd()?;
    match query(fd, 0, &mut []) {
        Ok(_) | Err(Errno::NOENT) => {}
        // Before 6.11 `/proc/PID/maps` had no ioctl at all (`ENOTTY`); `EINVAL` would be a
        // kernel that rejects this layout of the argument, `EPERM` a seccomp filter. The text
        // gives the same answer whatever the reason.
        Err(_) => return Ok(Backend::Text),
    }
    // The gate VMA sits above every user address (in the kernel half), last in the text, and the
    // ioctl finds nothing at or after it. Checking the half keeps a racing `munmap` of the
    // topmost user VMA from passing for it.
    let last = read_maps_range_text(0, usize::MAX)?.pop();
    let gate = last.filter(|v| {
        v.start > usize::MAX / 2 && matches!(query(fd, v.start, &mut []), Err(Errno::NOENT))
    });
    Ok(Backend::Query { gate })
}

/// `(pid << 32) | fd` of the `/proc/self/maps` descriptor that [`maps_fd`] hands out; 0 for
/// none yet. Keyed by pid because the descriptor names the mm of the process that opened it: in
/// a forked child the inherited one still shows the parent.
static MAPS_FD: AtomicU64 = AtomicU64::new(0);

/// Whether [`forget_maps_fd_in_child`] is registered with `pthread_atfork`.
static ATFORK: AtomicBool = AtomicBool::new(false);

/// `pthread_atfork` child handler: closes the inherited descriptor, which shows the parent.
///
/// Runs in the child of `fork()` only (not `vfork`, `posix_spawn` or raw `clone`, whose children
/// may share our memory), before `fork` returns there, with no other thread left: nothing else
/// can hold or be handed the descriptor. Children the handler does not cover are caught by the
/// pid in [`MAPS_FD`]; they keep the inherited descriptor open (it is close-on-exec), since
/// closing it could pull it from under a process that shares our statics but not our descriptor
/// table.
extern "C" fn forget_maps_fd_in_child() {
    let old = MAPS_FD.swap(0, Ordering::AcqRel);
    if old != 0 {
        // SAFETY: a non-zero entry holds a descriptor that `maps_fd` gave up ownership of to
        // `MAPS_FD`; we just took it out, and this process (a fresh copy with one thread, in the
        // middle of `fork`) has no borrow of it: `maps_fd`'s borrows live within one
        // `read_maps_range` call, which does not fork.
        drop(unsafe { OwnedFd::from_raw_fd((old & u64::from(u32::MAX)) as RawFd) });
    }
}

/// An open `/proc/self/maps` of this process (opened once per process, never closed but in a
/// forked child: see [`forget_maps_fd_in_child`]).
fn maps_fd() -> SysResult<BorrowedFd<'static>> {
    const OP: &str = "open(/proc/self/maps)";
    let pid = u64::from(
        rustix::process::getpid()
            .as_raw_nonzero()
            .get()
            .unsigned_abs(),
    );
    let mut seen = MAPS_FD.load(Ordering::Acquire);
    loop {
        if seen >> 32 == pid {
            let raw = (seen & u64::from(u32::MAX)) as RawFd;
            // SAFETY: an entry tagged with our pid was stored by a thread of this process (which
            // shares our descriptor table) from a descriptor it opened and gave up ownership of
            // (`into_raw_fd`); nothing closes it, so it stays open for the life of the process.
            return Ok(unsafe { BorrowedFd::borrow_raw(raw) });
        }
        let fd = rustix::fs::open(
            "/proc/self/maps",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SysError::os(OP, e))?;
        let raw = u64::from(fd.as_raw_fd().unsigned_abs());
        let entry = pid << 32 | raw;
        match MAPS_FD.compare_exchange(seen, entry, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                // Owned by `MAPS_FD` from now on.
                let _ = fd.into_raw_fd();
                seen = entry;
                if !ATFORK.swap(true, Ordering::AcqRel) {
                    // SAFETY: registers a handler that only touches `MAPS_FD` and closes the
                    // descriptor it owns (see `forget_maps_fd_in_child`). Failure (ENOMEM) only
                    // leaves forked children to the pid check.
                    let _ =
                        unsafe { libc::pthread_atfork(None, None, Some(forget_maps_fd_in_child)) };
                }
            }
            // Another thread got there first: close ours and look again.
            Err(now) => seen = now,
        }
    }
}

/// One `PROCMAP_QUERY`: the VMA covering `addr`, or the next one above it (`ENOENT` when there
/// is none). With a non-empty `name`, the kernel writes the VMA's name there, NUL-terminated, and
/// `vma_name_size` is its length with the NUL (0: no name).
fn query(fd: BorrowedFd<'_>, addr: usize, name: &mut [u8]) -> Result<procmap_query, Errno> {
    let name_len = name.len().min(NAME_MAX);
    let mut arg = procmap_query {
        size: core::mem::size_of::<procmap_query>() as u64,
        query_flags: procmap_query_flags::PROCMAP_QUERY_COVERING_OR_NEXT_VMA as u64,
        query_addr: addr as u64,
        vma_start: 0,
        vma_end: 0,
        vma_flags: 0,
        vma_page_size: 0,
        vma_offset: 0,
        inode: 0,
        dev_major: 0,
        dev_minor: 0,
        vma_name_size: name_len as u32,
        build_id_size: 0,
        vma_name_addr: if name_len == 0 {
            0
        } else {
            name.as_mut_ptr() as u64
        },
        build_id_addr: 0,
    };
    loop {
        // SAFETY: `PROCMAP_QUERY` takes a pointer to a `struct procmap_query` (the type and its
        // size are in the opcode; `arg.size` says the same) and writes back into it. The only
        // other memory it writes is the name: at most `vma_name_size` bytes at `vma_name_addr`,
        // which point into `name`, exclusively borrowed for this call (or are 0 and 0: no name).
        // No build ID is asked for.
        let ioctl = unsafe { Updater::<PROCMAP_QUERY, procmap_query>::new(&mut arg) };
        // SAFETY: as above; the ioctl reads this process's VMA tree and touches no other memory.
        match unsafe { rustix::ioctl::ioctl(fd, ioctl) } {
            Ok(()) => return Ok(arg),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// [`read_maps_range`] through `PROCMAP_QUERY`.
fn read_maps_range_query(
    fd: BorrowedFd<'_>,
    start: usize,
    end: usize,
    gate: Option<&Vma>,
) -> Result<Vec<Vma>, Errno> {
    if start >= end {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut name = [0u8; NAME_MAX];
    let mut addr = start;
    loop {
        let q = match query(fd, addr, &mut name) {
            Ok(q) => q,
            Err(Errno::NOENT) => {
                // Past the last VMA of the mm; the text goes on with the gate VMA.
                if let Some(g) = gate.filter(|g| g.overlaps(start, end)) {
                    out.push(g.clone());
                }
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        let (vma_start, vma_end) = (q.vma_start as usize, q.vma_end as usize);
        if vma_start >= end {
            return Ok(out);
        }
        let name_len = (q.vma_name_size as usize).min(name.len());
        // Without its NUL.
        let raw_name = &name[..name_len.saturating_sub(1)];
        let flag = |f: procmap_query_flags| q.vma_flags & f as u64 != 0;
        out.push(Vma {
            start: vma_start,
            end: vma_end,
            read: flag(procmap_query_flags::PROCMAP_QUERY_VMA_READABLE),
            write: flag(procmap_query_flags::PROCMAP_QUERY_VMA_WRITABLE),
            exec: flag(procmap_query_flags::PROCMAP_QUERY_VMA_EXECUTABLE),
            shared: flag(procmap_query_flags::PROCMAP_QUERY_VMA_SHARED),
            offset: q.vma_offset,
            inode: q.inode,
            name: vma_name(&escape_newlines(raw_name)),
        });
        // The next VMA starts at or after this one's end: when that is past the range, done
        // without asking.
        if vma_end >= end {
            return Ok(out);
        }
        addr = vma_end;
    }
}

/// The name as the text shows it: `seq_path(m, path, "\n")` writes a newline in a path as the
/// octal escape `\012` (`mangle_path`), which keeps every VMA on one line. The ioctl returns the
/// raw `d_path`.
fn escape_newlines(name: &[u8]) -> Cow<'_, [u8]> {
    if !name.contains(&b'\n') {
        return Cow::Borrowed(name);
    }
    let mut out = Vec::with_capacity(name.len() + 8);
    for &b in name {
        if b == b'\n' {
            out.extend_from_slice(b"\\012");
        } else {
            out.push(b);
        }
    }
    Cow::Owned(out)
}

/// The name column of a `/proc/self/maps` line (after the padding), as a [`VmaName`].
fn vma_name(name: &[u8]) -> VmaName {
    // The kernel pads the name to a column with spaces.
    let name = name.trim_ascii_start();
    if name.is_empty() {
        VmaName::Anonymous
    } else if name.starts_with(b"[") {
        VmaName::Special(String::from_utf8_lossy(name).into_owned())
    } else {
        VmaName::File(PathBuf::from(OsStr::from_bytes(name)))
    }
}

/// `(start, end, flags)` of every VMA that overlaps `[start, end)`, from `/proc/self/smaps`.
pub fn read_vm_flags(start: usize, end: usize) -> SysResult<Vec<(usize, usize, VmFlags)>> {
    const OP: &str = "read(/proc/self/smaps)";
    let mut out = Vec::new();
    if start >= end {
        return Ok(out);
    }
    // The VMA whose record we are in, if it overlaps the range.
    let mut current: Option<(usize, usize)> = None;
    for_each_line("/proc/self/smaps", OP, |line| {
        let first = line.split(|&b| b == b' ').next().unwrap_or_default();
        if let Some(key) = first.strip_suffix(b":") {
            // "Key:   value" inside a record.
            if key == b"VmFlags" {
                if let Some((s, e)) = current.take() {
                    out.push((s, e, VmFlags::parse(&line[first.len()..])));
                }
            }
            return Ok(ControlFlow::Continue(()));
        }
        let (s, e) = parse_range(first).ok_or(SysError::Invalid {
            op: OP,
            why: "malformed line",
        })?;
        if s >= end {
            return Ok(ControlFlow::Break(()));
        }
        current = (s < end && start < e).then_some((s, e));
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(out)
}

thread_local! {
    /// The read buffer of [`for_each_line`], kept between calls.
    static LINE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Bytes asked for per `read`; a `seq_file` returns at most about a page per call anyway.
const READ_CHUNK: usize = 16 << 10;

/// Calls `f` on every line (without its `\n`) of the proc file `path` until it returns `Break`.
fn for_each_line(
    path: &str,
    op: &'static str,
    mut f: impl FnMut(&[u8]) -> SysResult<ControlFlow<()>>,
) -> SysResult<()> {
    LINE_BUF.with(|cell| {
        // Not reentrant (`f` is ours and does not read maps), but stay correct if it ever is.
        let mut own = Vec::new();
        let mut borrowed = cell.try_borrow_mut();
        let buf = match &mut borrowed {
            Ok(b) => &mut **b,
            Err(_) => &mut own,
        };
        buf.clear();
        let mut file = File::open(path).map_err(|source| SysError::Os { op, source })?;
        let mut eof = false;
        while !eof {
            let filled = buf.len();
            buf.resize(filled + READ_CHUNK, 0);
            let n = loop {
                match file.read(&mut buf[filled..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(source) => return Err(SysError::Os { op, source }),
                }
            };
            buf.truncate(filled + n);
            eof = n == 0;
            // Hand out the complete lines; keep a partial last line for the next read. At end of
            // file a last line without `\n` is complete too.
            let complete = match buf.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if eof => buf.len(),
                None => continue,
            };
            for line in buf[..complete]
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
            {
                if f(line)?.is_break() {
                    return Ok(());
                }
            }
            buf.drain(..complete);
        }
        Ok(())
    })
}

/// Parses `start-end` (hex).
fn parse_range(field: &[u8]) -> Option<(usize, usize)> {
    let dash = field.iter().position(|&b| b == b'-')?;
    Some((
        parse_hex(&field[..dash])? as usize,
        parse_hex(&field[dash + 1..])? as usize,
    ))
}

fn parse_hex(field: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(field).ok()?, 16).ok()
}

/// Parses one `/proc/self/maps` line:
/// `start-end perms offset major:minor inode<spaces>name`.
fn parse_maps_line(line: &[u8]) -> Option<Vma> {
    let mut rest = line;
    let mut field = || {
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        let f = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        f
    };
    let (start, end) = parse_range(field())?;
    let perms = field();
    let offset = parse_hex(field())?;
    let _dev = field();
    let inode = std::str::from_utf8(field()).ok()?.parse().ok()?;
    let [r, w, x, s] = perms else { return None };
    let name = vma_name(rest);
    Some(Vma {
        start,
        end,
        read: *r == b'r',
        write: *w == b'w',
        exec: *x == b'x',
        shared: *s == b's',
        offset,
        inode,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use rustix::mm::{Advice, MapFlags, MprotectFlags, ProtFlags};

    use crate::test_map::Map;

    fn vma_at(addr: usize) -> Vma {
        let vmas = read_maps_range(addr, addr + 1).unwrap();
        assert_eq!(vmas.len(), 1, "{vmas:x?}");
        vmas.into_iter().next().unwrap()
    }

    #[test]
    fn private_read_only_anonymous_mapping() {
        let m = Map::anon(2 * PAGE_SIZE, ProtFlags::READ, MapFlags::PRIVATE);
        let v = vma_at(m.addr);
        assert!(v.start <= m.addr && m.addr + m.len <= v.end, "{v:x?}");
        assert!(v.read && !v.write && !v.exec && !v.shared, "{v:x?}");
        assert!(v.is_anonymous(), "{v:x?}");
        assert_eq!((v.inode, &v.name), (0, &VmaName::Anonymous));
    }

    #[test]
    fn shared_anonymous_mapping_is_shared() {
        let m = Map::anon(
            PAGE_SIZE,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
        );
        let v = vma_at(m.addr);
        assert_eq!((v.start, v.end), (m.addr, m.addr + m.len));
        assert!(v.read && v.write && v.shared, "{v:x?}");
        // Shared anonymous memory is a shmem file as far as the kernel is concerned.
        assert_eq!(v.name, VmaName::File("/dev/zero (deleted)".into()));
        assert!(v.inode != 0 && !v.is_anonymous());
    }

    #[test]
    fn mprotect_of_the_middle_page_splits_the_vma() {
        // PROT_NONE guard pages on both sides keep neighbours from merging into our VMAs.
        let m = Map::anon(5 * PAGE_SIZE, ProtFlags::empty(), MapFlags::PRIVATE);
        let rw = MprotectFlags::READ | MprotectFlags::WRITE;
        m.protect(PAGE_SIZE, 3 * PAGE_SIZE, rw);
        let (a, b) = (m.addr + PAGE_SIZE, m.addr + 4 * PAGE_SIZE);
        let one = read_maps_range(a, b).unwrap();
        assert_eq!(
            one.iter().map(|v| (v.start, v.end)).collect::<Vec<_>>(),
            [(a, b)]
        );
        m.protect(2 * PAGE_SIZE, PAGE_SIZE, MprotectFlags::READ);
        let three = read_maps_range(a, b).unwrap();
        let got: Vec<_> = three
            .iter()
            .map(|v| (v.start - m.addr, v.end - m.addr, v.write))
            .collect();
        let p = PAGE_SIZE;
        assert_eq!(
            got,
            [
                (p, 2 * p, true),
                (2 * p, 3 * p, false),
                (3 * p, 4 * p, true)
            ]
        );
        assert!(three.iter().all(|v| v.read && v.is_anonymous()));
    }

    #[test]
    fn memfd_mapping_has_a_file_name() {
        let fd =
            rustix::fs::memfd_create("hetmem-maps-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, PAGE_SIZE as u64).unwrap();
        // SAFETY: a fresh mapping at an address of the kernel's choice overlaps nothing.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .unwrap();
        let m = Map {
            addr: p as usize,
            len: PAGE_SIZE,
        };
        let v = vma_at(m.addr);
        let VmaName::File(path) = &v.name else {
            panic!("{v:x?}")
        };
        assert!(
            path.to_str()
                .unwrap()
                .starts_with("/memfd:hetmem-maps-test"),
            "{path:?}"
        );
        assert!(v.shared && v.inode != 0 && !v.is_anonymous());
    }

    #[test]
    fn hugepage_advice_shows_as_hg() {
        let m = Map::anon(
            4 * PAGE_SIZE,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        );
        // SAFETY: the advice only affects our own mapping.
        unsafe { rustix::mm::madvise(m.addr as *mut _, m.len, Advice::LinuxHugepage) }.unwrap();
        let flags = read_vm_flags(m.addr, m.addr + m.len).unwrap();
        assert_eq!(flags.len(), 1, "{flags:x?}");
        let (s, e, f) = flags[0];
        assert!(s <= m.addr && m.addr + m.len <= e);
        let want = VmFlags::RD | VmFlags::WR | VmFlags::MR | VmFlags::MW | VmFlags::HG;
        assert!(
            f.contains(want) && !f.intersects(VmFlags::SH | VmFlags::NH),
            "{f:?}"
        );
    }

    #[test]
    fn ranges_outside_are_not_returned() {
        let m = Map::anon(3 * PAGE_SIZE, ProtFlags::empty(), MapFlags::PRIVATE);
        let (a, b) = (m.addr + PAGE_SIZE, m.addr + 2 * PAGE_SIZE);
        for v in read_maps_range(a, b).unwrap() {
            assert!(v.start < b && a < v.end, "{v:x?}");
        }
        for (s, e, _) in read_vm_flags(a, b).unwrap() {
            assert!(s < b && a < e);
        }
        assert!(read_maps_range(a, a).unwrap().is_empty());
        assert!(read_vm_flags(b, a).unwrap().is_empty());
        let all = read_maps().unwrap();
        assert!(all.len() > 3);
        assert!(
            all.windows(2).all(|w| w[0].end <= w[1].start),
            "unsorted or overlapping"
        );
        assert!(all
            .iter()
            .any(|v| v.name == VmaName::Special("[stack]".into()) && v.is_anonymous()));
        assert!(all
            .iter()
            .any(|v| v.name == VmaName::Special("[vdso]".into()) && !v.is_anonymous()));
    }

    #[test]
    fn parses_kernel_lines() {
        let v = parse_maps_line(
            b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
        )
        .unwrap();
        assert_eq!((v.start, v.end), (0xffffffffff600000, 0xffffffffff601000));
        assert!(!v.read && !v.write && v.exec && !v.shared);
        assert_eq!(v.name, VmaName::Special("[vsyscall]".into()));
        assert!(!v.is_anonymous());
        let v = parse_maps_line(b"7f00-8f00 rw-s 0001a000 fe:00 42    /tmp/a b (deleted)").unwrap();
        assert_eq!((v.offset, v.inode), (0x1a000, 42));
        assert_eq!(v.name, VmaName::File("/tmp/a b (deleted)".into()));
        let v = parse_maps_line(b"1000-2000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(v.name, VmaName::Anonymous);
        assert!(v.is_anonymous());
        assert!(parse_maps_line(b"1000-2000 rw-p").is_none());
        assert!(parse_maps_line(b"garbage").is_none());
        assert_eq!(
            VmFlags::parse(b" rd wr zz hg  uw "),
            VmFlags::RD | VmFlags::WR | VmFlags::HG | VmFlags::UW
        );
    }

    /// The gate VMA the query path appends, as the backend found it; `None` when the kernel lacks
    /// `PROCMAP_QUERY` (the tests comparing the two paths then have nothing to compare).
    fn query_gate() -> Option<Option<&'static Vma>> {
        match query_backend().unwrap() {
            Backend::Query { gate } => Some(gate.as_ref()),
            Backend::Text => {
                eprintln!("PROCMAP_QUERY unsupported by this kernel: nothing to compare");
                None
            }
        }
    }

    /// Checks that the ioctl path and the text path agree on `[start, end)`. Other tests map and
    /// unmap concurrently, so a difference counts only when it persists over several attempts
    /// whose two text reads (before and after the ioctl one) agree.
    fn assert_paths_agree(start: usize, end: usize, gate: Option<&Vma>) {
        let mut last = None;
        for _ in 0..8 {
            let before = read_maps_range_text(start, end).unwrap();
            let query = read_maps_range_query(maps_fd().unwrap(), start, end, gate).unwrap();
            let after = read_maps_range_text(start, end).unwrap();
            if query == before || query == after {
                return;
            }
            if before == after {
                last = Some((before, query));
            }
            std::thread::yield_now();
        }
        let (text, query) = last.expect("the address space kept changing");
        panic!("[{start:#x}, {end:#x}):\ntext:  {text:#x?}\nquery: {query:#x?}");
    }

    /// A file in the temporary directory, removed on drop (unless already unlinked).
    struct TempFile {
        path: PathBuf,
        fd: OwnedFd,
    }

    impl TempFile {
        fn new(tag: &str, pages: usize) -> TempFile {
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "hetmem-maps-{tag}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let fd = rustix::fs::open(
                &path,
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .unwrap();
            rustix::fs::ftruncate(&fd, (pages * PAGE_SIZE) as u64).unwrap();
            TempFile { path, fd }
        }

        fn map(&self, pages: usize, prot: ProtFlags, flags: MapFlags, page_off: usize) -> Map {
            let len = pages * PAGE_SIZE;
            // SAFETY: a fresh mapping at an address of the kernel's choice overlaps nothing.
            let p = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    flags,
                    &self.fd,
                    (page_off * PAGE_SIZE) as u64,
                )
            }
            .unwrap();
            Map {
                addr: p as usize,
                len,
            }
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Names `[addr, addr + len)` of our anonymous memory (`[anon:NAME]`); false when the kernel
    /// lacks `CONFIG_ANON_VMA_NAME`.
    fn name_anon(addr: usize, len: usize, name: &std::ffi::CStr) -> bool {
        // SAFETY: `PR_SET_VMA_ANON_NAME` only attaches a name to our own VMAs in the range; the
        // kernel copies the string.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_VMA,
                libc::PR_SET_VMA_ANON_NAME as libc::c_ulong,
                addr as libc::c_ulong,
                len as libc::c_ulong,
                name.as_ptr() as libc::c_ulong,
            )
        };
        r == 0
    }

    /// xorshift64*: reproducible ranges without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// An address space with every kind of VMA the text shows: file mappings (private at an
    /// offset, shared, of an unlinked file, of a file whose name has a newline), an anonymous
    /// mapping split by `mprotect` into VMAs of all protections with holes between some, shared
    /// anonymous memory, a memfd, a named anonymous region, and the process's own `[heap]`,
    /// `[stack]`, `[vdso]`, `[vvar]`, `[vsyscall]`.
    struct Zoo {
        _maps: Vec<Map>,
        _files: Vec<TempFile>,
        /// Where the anonymous patchwork lies.
        patch: (usize, usize),
    }

    fn zoo() -> Zoo {
        let p = PAGE_SIZE;
        let rw = ProtFlags::READ | ProtFlags::WRITE;
        let mut maps = Vec::new();
        let mut files = Vec::new();

        let f = TempFile::new("private", 8);
        maps.push(f.map(4, ProtFlags::READ, MapFlags::PRIVATE, 2));
        maps.push(f.map(2, rw, MapFlags::PRIVATE, 0));
        maps.push(f.map(8, rw, MapFlags::SHARED, 0));
        files.push(f);
        let gone = TempFile::new("unlinked", 2);
        maps.push(gone.map(2, ProtFlags::READ, MapFlags::SHARED, 0));
        std::fs::remove_file(&gone.path).unwrap();
        files.push(gone);
        let odd = TempFile::new("new\nline", 1);
        maps.push(odd.map(1, ProtFlags::READ, MapFlags::PRIVATE, 0));
        files.push(odd);

        // 32 pages: PROT_NONE, with runs of other protections and two holes.
        let patch = Map::anon(32 * p, ProtFlags::empty(), MapFlags::PRIVATE);
        let prots = [
            MprotectFlags::READ,
            MprotectFlags::READ | MprotectFlags::WRITE,
            MprotectFlags::READ | MprotectFlags::EXEC,
            MprotectFlags::empty(),
            MprotectFlags::READ | MprotectFlags::WRITE | MprotectFlags::EXEC,
        ];
        for (i, prot) in prots.iter().cycle().take(12).enumerate() {
            patch.protect((2 + 2 * i) * p, 2 * p - (i % 2) * p, *prot);
        }
        name_anon(patch.addr + 26 * p, 2 * p, c"hetmem-zoo");
        // SAFETY: the pages are inside our own mapping and nothing points into them.
        unsafe { rustix::mm::munmap((patch.addr + 20 * p) as *mut _, p) }.unwrap();
        // SAFETY: as above.
        unsafe { rustix::mm::munmap((patch.addr + 29 * p) as *mut _, 2 * p) }.unwrap();
        let range = (patch.addr, patch.addr + patch.len);
        // `Map::drop` unmaps the whole range, holes included (munmap of a hole is fine).
        maps.push(patch);

        maps.push(Map::anon(3 * p, rw, MapFlags::SHARED));
        let fd = rustix::fs::memfd_create("hetmem-zoo", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 2 * p as u64).unwrap();
        // SAFETY: a fresh mapping at an address of the kernel's choice overlaps nothing.
        let m =
            unsafe { rustix::mm::mmap(std::ptr::null_mut(), 2 * p, rw, MapFlags::SHARED, &fd, 0) }
                .unwrap();
        maps.push(Map {
            addr: m as usize,
            len: 2 * p,
        });
        let named = Map::anon(4 * p, rw, MapFlags::PRIVATE);
        name_anon(named.addr + p, 2 * p, c"hetmem-named");
        maps.push(named);
        Zoo {
            _maps: maps,
            _files: files,
            patch: range,
        }
    }

    #[test]
    fn query_and_text_agree_on_every_kind_of_vma() {
        let Some(gate) = query_gate() else { return };
        let zoo = zoo();
        // The whole address space, then random ranges between VMA boundaries (and a page either
        // side of them, inside VMAs and in holes), some empty or reversed, some of a byte.
        assert_paths_agree(0, usize::MAX, gate);
        let all = read_maps_range_text(0, usize::MAX).unwrap();
        let names: Vec<_> = all.iter().map(|v| &v.name).collect();
        for want in ["[heap]", "[stack]", "[vdso]", "[vvar]"] {
            assert!(
                names.contains(&&VmaName::Special(want.into())),
                "no {want} in {names:?}"
            );
        }
        if cfg!(target_arch = "x86_64") && names.contains(&&VmaName::Special("[vsyscall]".into())) {
            assert!(gate.is_some_and(|g| g.name == VmaName::Special("[vsyscall]".into())));
        }
        let (lo, hi) = zoo.patch;
        let zoo_vmas = read_maps_range_text(lo, hi).unwrap();
        assert!(zoo_vmas.len() >= 12, "{zoo_vmas:#x?}");
        let has = |f: &dyn Fn(&Vma) -> bool| all.iter().any(f);
        assert!(has(&|v| matches!(&v.name, VmaName::File(p)
            if p.to_str().unwrap().contains("new\\012line"))));
        assert!(has(&|v| matches!(&v.name, VmaName::File(p)
            if p.to_str().unwrap().contains("unlinked") && p.to_str().unwrap().ends_with(" (deleted)"))));
        assert!(has(&|v| v.offset == 2 * PAGE_SIZE as u64 && v.inode != 0));
        if !has(&|v| v.name == VmaName::Special("[anon:hetmem-zoo]".into())) {
            eprintln!("no [anon:NAME] VMAs: kernel without CONFIG_ANON_VMA_NAME");
        }

        let mut points: Vec<usize> = all
            .iter()
            .flat_map(|v| [v.start, v.end])
            .flat_map(|a| {
                [
                    a,
                    a.wrapping_sub(PAGE_SIZE),
                    a.wrapping_add(PAGE_SIZE),
                    a + 1,
                ]
            })
            .chain((lo..hi).step_by(PAGE_SIZE / 2))
            .chain([0, usize::MAX])
            .collect();
        points.sort_unstable();
        points.dedup();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..3000 {
            let a = points[rng.below(points.len())];
            let b = match i % 4 {
                // Near `a`: a few VMAs.
                0 | 1 => {
                    let j = points.partition_point(|&x| x < a);
                    points[(j + rng.below(24)).min(points.len() - 1)]
                }
                2 => a.saturating_add(1 + rng.below(4 * PAGE_SIZE)),
                _ => points[rng.below(points.len())],
            };
            assert_paths_agree(a, b, gate);
        }
        // The patchwork page by page.
        for a in (lo..hi).step_by(PAGE_SIZE) {
            for b in (a + 1..=hi).step_by(PAGE_SIZE) {
                assert_paths_agree(a, b, gate);
            }
        }
    }

    /// A path longer than `PATH_MAX` (possible below a directory opened on the way): the ioctl
    /// refuses to return it (`ENAMETOOLONG`), the text carries it, and `read_maps_range` falls
    /// back to the text for that call.
    #[test]
    fn names_longer_than_path_max_come_from_the_text() {
        let Some(gate) = query_gate() else { return };
        let top = std::env::temp_dir().join(format!("hetmem-maps-long-{}", std::process::id()));
        std::fs::create_dir(&top).unwrap();
        let component = "d".repeat(250);
        let mut dir =
            rustix::fs::open(&top, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        for _ in 0..17 {
            rustix::fs::mkdirat(&dir, component.as_str(), Mode::from_raw_mode(0o700)).unwrap();
            dir = rustix::fs::openat(
                &dir,
                component.as_str(),
                OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .unwrap();
        }
        let fd = rustix::fs::openat(
            &dir,
            "f",
            OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .unwrap();
        rustix::fs::ftruncate(&fd, PAGE_SIZE as u64).unwrap();
        // SAFETY: a fresh mapping at an address of the kernel's choice overlaps nothing.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                ProtFlags::READ,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .unwrap();
        let m = Map {
            addr: p as usize,
            len: PAGE_SIZE,
        };
        let (a, b) = (m.addr, m.addr + m.len);
        assert_eq!(
            read_maps_range_query(maps_fd().unwrap(), a, b, gate),
            Err(Errno::NAMETOOLONG)
        );
        let v = vma_at(a);
        let VmaName::File(path) = &v.name else {
            panic!("{v:x?}")
        };
        assert!(
            path.as_os_str().len() > NAME_MAX,
            "{}",
            path.as_os_str().len()
        );
        assert_eq!(
            read_maps_range(a, b).unwrap(),
            read_maps_range_text(a, b).unwrap()
        );
        drop(m);
        // `rm -r` of a tree deeper than PATH_MAX works (std removes relative to open dirs).
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn read_maps_range_uses_the_query_on_this_kernel() {
        // Linux 6.11+ has PROCMAP_QUERY; hetmem is developed on 6.18.
        let (major, minor) = kernel_version();
        if (major, minor) >= (6, 11) {
            assert!(procmap_query_supported().unwrap());
        }
        // PROT_NONE guard pages on both sides keep neighbours from merging into our VMAs.
        let m = Map::anon(5 * PAGE_SIZE, ProtFlags::empty(), MapFlags::PRIVATE);
        m.protect(PAGE_SIZE, PAGE_SIZE, MprotectFlags::READ);
        m.protect(3 * PAGE_SIZE, PAGE_SIZE, MprotectFlags::READ);
        let p = PAGE_SIZE;
        let got: Vec<_> = read_maps_range(m.addr + p, m.addr + 4 * p)
            .unwrap()
            .iter()
            .map(|v| (v.start - m.addr, v.end - m.addr, v.read))
            .collect();
        assert_eq!(
            got,
            [
                (p, 2 * p, true),
                (2 * p, 3 * p, false),
                (3 * p, 4 * p, true)
            ]
        );
    }

    fn kernel_version() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut nums = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse().unwrap_or(0));
        (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
    }

    /// The cached `/proc/self/maps` descriptor names the mm of the process that opened it; a
    /// forked child must not keep asking about its parent's.
    #[test]
    fn forked_child_sees_its_own_vmas() {
        if query_gate().is_none() {
            return;
        }
        let before = read_maps_range(0, usize::MAX).unwrap();
        assert!(!before.is_empty());
        // SAFETY: the child only maps, reads its own maps (glibc's malloc is usable after fork)
        // and leaves with `_exit`; it touches no lock another thread may have held.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // The atfork handler closed the parent's descriptor.
            let forgotten = MAPS_FD.load(Ordering::Acquire) == 0;
            // Guard pages as above; the VMAs exist in the child only.
            let m = Map::anon(5 * PAGE_SIZE, ProtFlags::empty(), MapFlags::PRIVATE);
            m.protect(PAGE_SIZE, PAGE_SIZE, MprotectFlags::READ);
            m.protect(3 * PAGE_SIZE, PAGE_SIZE, MprotectFlags::READ);
            let (a, b) = (m.addr + PAGE_SIZE, m.addr + 4 * PAGE_SIZE);
            let ok = read_maps_range(a, b).is_ok_and(|v| {
                v.len() == 3 && v[0].start == a && v[0].read && !v[1].read && v[2].end == b
            });
            let same =
                read_maps_range(0, usize::MAX).ok() == read_maps_range_text(0, usize::MAX).ok();
            let me = u64::from(std::process::id());
            let reopened = MAPS_FD.load(Ordering::Acquire) >> 32 == me;
            let code = if !ok {
                1
            } else if !same {
                2
            } else if !forgotten || !reopened {
                3
            } else {
                0
            };
            // SAFETY: leaves the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "1: child VMAs missing, 2: paths differ, 3: descriptor not replaced"
        );
    }

    /// Prints the time per call of both paths (run with `--release -- --nocapture`), with about
    /// 0, 1000 and 10000 extra VMAs in the process, for: one page of a fresh mapping (a fault
    /// snapshot), one page of `[stack]` (the top: the text goes through every VMA before it), 16
    /// VMAs among the extra ones, and the whole address space. The text's cost grows with the
    /// VMAs before the end of the range (printed as "after N"), the query's with those in it.
    #[test]
    fn bench_read_maps_range() {
        use std::time::{Duration, Instant};
        let Some(gate) = query_gate() else { return };
        fn per_call(mut f: impl FnMut()) -> Duration {
            f();
            let t = Instant::now();
            let mut n = 0u32;
            while n < 5 || t.elapsed() < Duration::from_millis(20) {
                f();
                n += 1;
            }
            t.elapsed() / n
        }
        let p = PAGE_SIZE;
        let open = per_call(|| {
            let fd = rustix::fs::open(
                "/proc/self/maps",
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            );
            drop(fd.unwrap());
        });
        println!("maps bench: open + close of /proc/self/maps: {open:.1?}");
        for extra in [0, 1000, 10000] {
            // `extra` VMAs: alternate pages of a read-only mapping made writable.
            let many = Map::anon(extra.max(32) * p, ProtFlags::READ, MapFlags::PRIVATE);
            for i in (1..extra).step_by(2) {
                many.protect(i * p, p, MprotectFlags::READ | MprotectFlags::WRITE);
            }
            let one = Map::anon(3 * p, ProtFlags::empty(), MapFlags::PRIVATE);
            one.protect(p, p, MprotectFlags::READ);
            let all = read_maps_range_text(0, usize::MAX).unwrap();
            let stack = all
                .iter()
                .find(|v| v.name == VmaName::Special("[stack]".into()))
                .unwrap();
            let mid = many.addr + extra / 2 * p;
            let mut cases = vec![
                ("1 page", (one.addr + p, one.addr + 2 * p)),
                ("[stack]", (stack.end - p, stack.end)),
                ("all", (0, usize::MAX)),
            ];
            if extra > 0 {
                cases.insert(2, ("16 VMAs", (mid, mid + 16 * p)));
            }
            for (what, (s, e)) in cases {
                let before = all.iter().filter(|v| v.start < e).count();
                let n = read_maps_range_text(s, e).unwrap().len();
                let text = per_call(|| drop(read_maps_range_text(s, e).unwrap()));
                let fd = maps_fd().unwrap();
                let query = per_call(|| drop(read_maps_range_query(fd, s, e, gate).unwrap()));
                println!(
                    "maps bench: {:>6} VMAs, {what:>7} ({n:>5} VMAs, after {before:>5}): \
                     text {text:>9.1?}  query {query:>9.1?}",
                    all.len()
                );
            }
        }
    }
}
