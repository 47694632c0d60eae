//! `/proc/self/maps` and the `VmFlags` lines of `/proc/self/smaps`: the VMAs of this process as
//! the kernel sees them (proc(5), Documentation/filesystems/proc.rst §1.1).
//!
//! hetmem uses this to check what it believes about its own ranges (protection changes split
//! VMAs, which count against `vm.max_map_count`; `MADV_HUGEPAGE` and userfaultfd registration show
//! up as `hg`, `um`, `uw`), in tests, `check_invariants` and the `inspect` command. Neighbours:
//! `mman` makes the mappings, `pagemap` says what is behind each page of them.
//!
//! The files are `seq_file`s: each `read` returns about one page of whole lines and the kernel
//! takes the mmap lock per read, not for the whole file, so a listing is not an atomic snapshot
//! when other threads map or unmap meanwhile (it is still sorted and free of overlaps). Reading
//! goes through one reusable per-thread buffer and stops as soon as the lines pass the range
//! asked for, which matters for `smaps`: every record it produces walks that VMA's page tables.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use bitflags::bitflags;

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
    /// File offset of `start` (for anonymous memory: the page offset the kernel keeps).
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
/// start. Reading stops at the first VMA that starts at or after `end`.
pub fn read_maps_range(start: usize, end: usize) -> SysResult<Vec<Vma>> {
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
    // The kernel pads the name to a column with spaces.
    let name = rest.trim_ascii_start();
    let name = if name.is_empty() {
        VmaName::Anonymous
    } else if name.starts_with(b"[") {
        VmaName::Special(String::from_utf8_lossy(name).into_owned())
    } else {
        VmaName::File(PathBuf::from(OsStr::from_bytes(name)))
    };
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

    /// A test mapping, unmapped on drop.
    struct Map {
        addr: usize,
        len: usize,
    }

    impl Map {
        fn anon(len: usize, prot: ProtFlags, flags: MapFlags) -> Map {
            // SAFETY: a fresh mapping at an address of the kernel's choice overlaps nothing.
            let p = unsafe { rustix::mm::mmap_anonymous(std::ptr::null_mut(), len, prot, flags) }
                .expect("mmap");
            Map {
                addr: p as usize,
                len,
            }
        }

        fn protect(&self, off: usize, len: usize, prot: MprotectFlags) {
            // SAFETY: the range is inside our mapping, which no Rust reference points into.
            unsafe { rustix::mm::mprotect((self.addr + off) as *mut _, len, prot) }
                .expect("mprotect");
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: we own the mapping and no reference into it outlives the test.
            unsafe { rustix::mm::munmap(self.addr as *mut _, self.len) }.expect("munmap");
        }
    }

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
}
