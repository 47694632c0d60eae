//! userfaultfd: the API handshake, range registration, the resolving ioctls (COPY, ZEROPAGE,
//! MOVE, WRITEPROTECT, CONTINUE, POISON, WAKE) and the event stream (page faults and the
//! non-cooperative UNMAP / REMOVE / REMAP / FORK events).
//!
//! Built directly on rustix (`rustix::mm::userfaultfd`, `rustix::ioctl`) and the kernel's own
//! structs from `linux_raw_sys::general`, because the `userfaultfd` crate lacks MOVE, POISON,
//! COPY_MODE_WP, WP_UNPOPULATED/WP_ASYNC and loses the negotiated feature mask (ecosystem.md
//! §2.1). This is the user-space stand-in for the kernel's `migrate_to_ram` / mmu notifier pair
//! in hetmem's design: faults arrive here (or, with [`UffdFeatures::SIGBUS`], as a SIGBUS served
//! by [`crate::signal`] in the faulting thread), and UNMAP / REMOVE / REMAP events drive the
//! interval-notifier invalidations.
//!
//! Kernel rules worth knowing (measured on 6.18, see ecosystem.md §3 and §5):
//! - COPY / ZEROPAGE / MOVE / POISON only fill *holes*: a populated destination is
//!   [`UffdError::Exists`]; several threads racing on one page see one winner and `Exists` for
//!   the others, which is success.
//! - While a non-cooperative event is queued and unread, these ioctls fail with `EAGAIN`
//!   ([`UffdError::Again`]): drain events, then retry.
//! - `munmap`, `madvise(MADV_DONTNEED)` and `mremap` of a range registered with EVENT_UNMAP /
//!   EVENT_REMOVE / EVENT_REMAP block the calling thread until the event is *read*: never perform
//!   them from the thread that reads events.
//! - A moving `mremap` reports REMAP and then an UNMAP of the *old* range.
//! - MOVE (tests `move_*`): only the destination must be registered with this uffd (the source
//!   may be unregistered or registered elsewhere); both VMAs must be private anonymous, writable
//!   and of identical protection (else `EINVAL`, checked before anything moves); one call must
//!   stay inside one source and one destination VMA (else `EINVAL`); a page COW-shared with a
//!   forked child is `EBUSY`; zero pages move; the uffd-wp bit does *not* move with the page;
//!   an aligned 2 MiB range moves in one call.

use std::mem::size_of;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use linux_raw_sys::general as g;
use rustix::event::{eventfd, EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::ioctl::{self, opcode, Ioctl, IoctlOutput, Opcode, Updater};
use rustix::mm::UserfaultfdFlags;

use crate::error::{SysError, SysResult};
use crate::PAGE_SIZE;

bitflags::bitflags! {
    /// `UFFD_FEATURE_*`: what a uffd is asked to do at the `UFFDIO_API` handshake.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct UffdFeatures: u64 {
        /// Page-fault messages carry `UFFD_PAGEFAULT_FLAG_WP` (write-protect faults).
        const PAGEFAULT_FLAG_WP = g::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
        /// A `fork` delivers the child's new uffd as an event (needs CAP_SYS_PTRACE).
        const EVENT_FORK = g::UFFD_FEATURE_EVENT_FORK as u64;
        /// `mremap` of a registered range delivers a REMAP event.
        const EVENT_REMAP = g::UFFD_FEATURE_EVENT_REMAP as u64;
        /// `MADV_DONTNEED` / `MADV_REMOVE` delivers a REMOVE event.
        const EVENT_REMOVE = g::UFFD_FEATURE_EVENT_REMOVE as u64;
        /// MISSING mode on hugetlbfs.
        const MISSING_HUGETLBFS = g::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
        /// MISSING mode on shmem.
        const MISSING_SHMEM = g::UFFD_FEATURE_MISSING_SHMEM as u64;
        /// `munmap` of a registered range delivers an UNMAP event.
        const EVENT_UNMAP = g::UFFD_FEATURE_EVENT_UNMAP as u64;
        /// Faults raise SIGBUS in the faulting thread instead of queueing a message.
        const SIGBUS = g::UFFD_FEATURE_SIGBUS as u64;
        /// Page-fault messages carry the faulting thread's id.
        const THREAD_ID = g::UFFD_FEATURE_THREAD_ID as u64;
        /// MINOR mode on hugetlbfs.
        const MINOR_HUGETLBFS = g::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
        /// MINOR mode on shmem.
        const MINOR_SHMEM = g::UFFD_FEATURE_MINOR_SHMEM as u64;
        /// Fault addresses are not rounded down to the page.
        const EXACT_ADDRESS = g::UFFD_FEATURE_EXACT_ADDRESS as u64;
        /// WP mode on hugetlbfs and shmem.
        const WP_HUGETLBFS_SHMEM = g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
        /// Write-protecting never-populated anonymous memory works (installs PTE markers).
        const WP_UNPOPULATED = g::UFFD_FEATURE_WP_UNPOPULATED as u64;
        /// `UFFDIO_POISON`.
        const POISON = g::UFFD_FEATURE_POISON as u64;
        /// The kernel resolves WP faults itself and records them for PAGEMAP_SCAN.
        const WP_ASYNC = g::UFFD_FEATURE_WP_ASYNC as u64;
        /// `UFFDIO_MOVE`.
        const MOVE = g::UFFD_FEATURE_MOVE as u64;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        /// Faults on holes (pages with no PTE).
        const MISSING = g::UFFDIO_REGISTER_MODE_MISSING as u64;
        /// Write faults on pages write-protected with `UFFDIO_WRITEPROTECT`.
        const WP = g::UFFDIO_REGISTER_MODE_WP as u64;
        /// Faults on pages present in the page cache but not mapped (shmem / hugetlbfs).
        const MINOR = g::UFFDIO_REGISTER_MODE_MINOR as u64;
    }
}

/// Bits of the ioctl mask returned by [`Uffd::register`]: `1 << _UFFDIO_*`.
pub mod range_ioctl {
    use linux_raw_sys::general as g;
    /// `UFFDIO_WAKE` is allowed on the range.
    pub const WAKE: u64 = 1 << g::_UFFDIO_WAKE;
    /// `UFFDIO_COPY`.
    pub const COPY: u64 = 1 << g::_UFFDIO_COPY;
    /// `UFFDIO_ZEROPAGE`.
    pub const ZEROPAGE: u64 = 1 << g::_UFFDIO_ZEROPAGE;
    /// `UFFDIO_MOVE`.
    pub const MOVE: u64 = 1 << g::_UFFDIO_MOVE;
    /// `UFFDIO_WRITEPROTECT`.
    pub const WRITEPROTECT: u64 = 1 << g::_UFFDIO_WRITEPROTECT;
    /// `UFFDIO_CONTINUE`.
    pub const CONTINUE: u64 = 1 << g::_UFFDIO_CONTINUE;
    /// `UFFDIO_POISON`.
    pub const POISON: u64 = 1 << g::_UFFDIO_POISON;
}

// Mode bits linux-raw-sys does not generate (include/uapi/linux/userfaultfd.h).
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// ioctl numbers. Those linux-raw-sys has are taken from it; MOVE and POISON are built like the
/// C header does (`_IOWR(UFFDIO, n, struct)`), and a test checks the construction against the
/// generated ones.
mod op {
    use super::*;
    const UFFDIO: u8 = g::UFFDIO as u8;
    pub const API: Opcode = linux_raw_sys::ioctl::UFFDIO_API as Opcode;
    pub const REGISTER: Opcode = linux_raw_sys::ioctl::UFFDIO_REGISTER as Opcode;
    pub const UNREGISTER: Opcode = linux_raw_sys::ioctl::UFFDIO_UNREGISTER as Opcode;
    pub const WAKE: Opcode = linux_raw_sys::ioctl::UFFDIO_WAKE as Opcode;
    pub const COPY: Opcode = linux_raw_sys::ioctl::UFFDIO_COPY as Opcode;
    pub const ZEROPAGE: Opcode = linux_raw_sys::ioctl::UFFDIO_ZEROPAGE as Opcode;
    pub const WRITEPROTECT: Opcode = linux_raw_sys::ioctl::UFFDIO_WRITEPROTECT as Opcode;
    pub const CONTINUE: Opcode = opcode::read_write::<g::uffdio_continue>(UFFDIO, 0x07);
    pub const MOVE: Opcode = opcode::read_write::<g::uffdio_move>(UFFDIO, 0x05);
    pub const POISON: Opcode = opcode::read_write::<g::uffdio_poison>(UFFDIO, 0x08);
    /// `USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00)` on `/dev/userfaultfd`.
    pub const IOC_NEW: Opcode = opcode::none(UFFDIO, 0x00);
}

/// Issues a uffd ioctl whose argument is a `T` the kernel reads and may update.
///
/// # Safety
///
/// `OP` must be an ioctl that takes a pointer to `T`, and its effect on memory (which depends on
/// the addresses inside `arg`) must be acceptable to the caller.
unsafe fn uffd_ioctl<const OP: Opcode, T>(fd: BorrowedFd<'_>, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: the caller guarantees that `OP` takes a `T`; `arg` is a valid, exclusive pointer
    // for the duration of the call.
    unsafe { ioctl::ioctl(fd, Updater::<OP, T>::new(arg)) }
}

/// `ioctl(dev_fd, USERFAULTFD_IOC_NEW, flags)`, which returns a new uffd.
struct IocNew(usize);

// SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer argument, touches no user memory, and
// its return value is a new file descriptor.
unsafe impl Ioctl for IocNew {
    type Output = RawFd;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        op::IOC_NEW
    }

    fn as_ptr(&mut self) -> *mut core::ffi::c_void {
        self.0 as *mut core::ffi::c_void
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut core::ffi::c_void,
    ) -> rustix::io::Result<RawFd> {
        Ok(out)
    }
}

/// Why a resolving ioctl (COPY, ZEROPAGE, MOVE, POISON, CONTINUE) did not complete.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// `EEXIST`: the destination is already populated (someone else resolved the fault).
    #[error("destination already populated (EEXIST)")]
    Exists,
    /// `EAGAIN`: the address space is changing (an event is queued: read events and retry) or
    /// the operation stopped part-way; `done` bytes at the start of the range were completed.
    #[error("interrupted after {done} bytes (EAGAIN)")]
    Again {
        /// Bytes completed before the stop; continue at `dst + done`.
        done: usize,
    },
    /// `EBUSY`: MOVE of a page that is not exclusive to this process (COW-shared after fork,
    /// pinned, KSM).
    #[error("source page is shared or pinned (EBUSY)")]
    Busy,
    /// `ENOENT`: MOVE found a hole in the source and holes were not allowed.
    #[error("source page missing (ENOENT)")]
    Missing,
    /// Anything else.
    #[error(transparent)]
    Os(SysError),
}

/// Turns the ioctl result plus the struct's progress field into bytes done or a typed error.
///
/// The kernel stores in the progress field either the bytes completed (> 0) or a negative
/// errno; when it completed only part of the range the ioctl fails with EAGAIN and the field
/// holds the partial count. A negative field must not be cast to usize (the `userfaultfd`
/// crate's bug, which turned -EAGAIN into ~2^64).
fn decode(
    op: &'static str,
    res: Result<(), Errno>,
    progress: i64,
    len: usize,
) -> Result<usize, UffdError> {
    match res {
        Ok(()) => Ok(if progress > 0 { progress as usize } else { len }),
        Err(Errno::EXIST) => Err(UffdError::Exists),
        Err(Errno::AGAIN) => Err(UffdError::Again {
            done: progress.max(0) as usize,
        }),
        Err(Errno::BUSY) => Err(UffdError::Busy),
        Err(Errno::NOENT) => Err(UffdError::Missing),
        Err(e) => Err(UffdError::Os(SysError::os(op, e))),
    }
}

fn range(addr: usize, len: usize) -> g::uffdio_range {
    g::uffdio_range {
        start: addr as u64,
        len: len as u64,
    }
}

fn check_range(op: &'static str, addr: usize, len: usize) -> SysResult<()> {
    if len == 0 || (addr | len) & (PAGE_SIZE - 1) != 0 {
        return Err(SysError::Invalid {
            op,
            why: "range is empty or not page-aligned",
        });
    }
    Ok(())
}

/// A non-blocking event of the uffd's queue.
#[derive(Debug)]
pub enum UffdEvent {
    /// A thread faulted on a registered range and waits for it to be resolved (then woken).
    Pagefault {
        /// Fault address, rounded down to the page unless EXACT_ADDRESS was asked for.
        addr: usize,
        /// The access was a write.
        write: bool,
        /// A write on a write-protected page (WP mode).
        wp: bool,
        /// A MINOR fault (page cache page present, PTE missing).
        minor: bool,
        /// The faulting thread (with [`UffdFeatures::THREAD_ID`]; 0 otherwise).
        tid: u32,
    },
    /// The process forked; the child's copy of the registered ranges belongs to this new uffd.
    Fork {
        /// The child's uffd, already past its API handshake.
        uffd: OwnedFd,
    },
    /// `mremap` moved a registered range; the registration moved with it.
    Remap {
        /// Old start.
        from: usize,
        /// New start.
        to: usize,
        /// Old length.
        len: usize,
    },
    /// `MADV_DONTNEED` / `MADV_REMOVE` dropped `[start, end)`; it is now holes.
    Remove {
        /// Start.
        start: usize,
        /// End (exclusive).
        end: usize,
    },
    /// `munmap` (or a `mremap` shrink / MAP_FIXED overlay) removed `[start, end)`.
    Unmap {
        /// Start.
        start: usize,
        /// End (exclusive).
        end: usize,
    },
}

/// What [`Uffd::poll`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollResult {
    /// Events are waiting: call [`Uffd::read_events`].
    Readable,
    /// The shutdown fd became readable.
    Shutdown,
    /// The timeout expired.
    Timeout,
}

/// An owned userfaultfd after its API handshake, with the features it was granted.
///
/// The ioctls take `&self`: the kernel serialises what needs serialising, so one `Uffd` can be
/// shared by a reader thread and every faulting thread's SIGBUS handler.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: UffdFeatures,
}

fn new_raw_fd() -> SysResult<OwnedFd> {
    let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
    // SAFETY: creating the fd is harmless; what it can do to memory is confined to the ioctls of
    // this module, which carry their own contracts.
    match unsafe { rustix::mm::userfaultfd(flags) } {
        Ok(fd) => Ok(fd),
        // vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE: /dev/userfaultfd may still be
        // accessible and hands out full (kernel-fault-serving) uffds.
        Err(Errno::PERM) => open_dev_node().map_err(|_| SysError::os("userfaultfd", Errno::PERM)),
        Err(e) => Err(SysError::os("userfaultfd", e)),
    }
}

/// Creates a uffd through `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`), close-on-exec and
/// non-blocking.
fn open_dev_node() -> SysResult<OwnedFd> {
    use rustix::fs::{open, Mode, OFlags};
    let dev = open(
        "/dev/userfaultfd",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SysError::os("open(/dev/userfaultfd)", e))?;
    let flags = (g::O_CLOEXEC | g::O_NONBLOCK) as usize;
    // SAFETY: IOC_NEW takes the flags as an integer and returns a new fd (see `IocNew`).
    let raw = unsafe { ioctl::ioctl(&dev, IocNew(flags)) }
        .map_err(|e| SysError::os("USERFAULTFD_IOC_NEW", e))?;
    // SAFETY: on success the ioctl returned a freshly installed descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `UFFDIO_API` asking for `features`; returns everything the kernel offers.
fn api(fd: BorrowedFd<'_>, features: u64) -> Result<u64, Errno> {
    let mut a = g::uffdio_api {
        api: g::UFFD_API as u64,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a uffdio_api and touches no other memory.
    unsafe { uffd_ioctl::<{ op::API }, _>(fd, &mut a) }?;
    Ok(a.features)
}

fn feature_name(f: UffdFeatures) -> &'static str {
    match f {
        UffdFeatures::PAGEFAULT_FLAG_WP => "UFFD_FEATURE_PAGEFAULT_FLAG_WP",
        UffdFeatures::EVENT_FORK => "UFFD_FEATURE_EVENT_FORK",
        UffdFeatures::EVENT_REMAP => "UFFD_FEATURE_EVENT_REMAP",
        UffdFeatures::EVENT_REMOVE => "UFFD_FEATURE_EVENT_REMOVE",
        UffdFeatures::MISSING_HUGETLBFS => "UFFD_FEATURE_MISSING_HUGETLBFS",
        UffdFeatures::MISSING_SHMEM => "UFFD_FEATURE_MISSING_SHMEM",
        UffdFeatures::EVENT_UNMAP => "UFFD_FEATURE_EVENT_UNMAP",
        UffdFeatures::SIGBUS => "UFFD_FEATURE_SIGBUS",
        UffdFeatures::THREAD_ID => "UFFD_FEATURE_THREAD_ID",
        UffdFeatures::MINOR_HUGETLBFS => "UFFD_FEATURE_MINOR_HUGETLBFS",
        UffdFeatures::MINOR_SHMEM => "UFFD_FEATURE_MINOR_SHMEM",
        UffdFeatures::EXACT_ADDRESS => "UFFD_FEATURE_EXACT_ADDRESS",
        UffdFeatures::WP_HUGETLBFS_SHMEM => "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
        UffdFeatures::WP_UNPOPULATED => "UFFD_FEATURE_WP_UNPOPULATED",
        UffdFeatures::POISON => "UFFD_FEATURE_POISON",
        UffdFeatures::WP_ASYNC => "UFFD_FEATURE_WP_ASYNC",
        UffdFeatures::MOVE => "UFFD_FEATURE_MOVE",
        _ => "an unknown userfaultfd feature bit",
    }
}

impl Uffd {
    /// Creates a uffd (`O_CLOEXEC | O_NONBLOCK`, serving kernel-mode faults too, i.e. not
    /// `UFFD_USER_MODE_ONLY`) and performs the `UFFDIO_API` handshake asking for `wanted`.
    ///
    /// Returns [`SysError::Unsupported`] naming the first wanted feature the kernel lacks, and
    /// `EPERM` for EVENT_FORK without CAP_SYS_PTRACE. Asking for WP_ASYNC grants WP_UNPOPULATED
    /// too (the kernel does that).
    pub fn open(wanted: UffdFeatures) -> SysResult<Uffd> {
        let fd = new_raw_fd()?;
        match api(fd.as_fd(), wanted.bits()) {
            Ok(_) => {}
            Err(Errno::INVAL) => {
                let offered = Self::available()?;
                // Named bits come first, then any unknown remainder as one value.
                return Err(match wanted.difference(offered).iter().next() {
                    Some(first) => SysError::Unsupported(feature_name(first)),
                    None => SysError::os("UFFDIO_API", Errno::INVAL),
                });
            }
            Err(e) => return Err(SysError::os("UFFDIO_API", e)),
        }
        let mut features = wanted;
        if wanted.contains(UffdFeatures::WP_ASYNC) {
            features |= UffdFeatures::WP_UNPOPULATED;
        }
        Ok(Uffd { fd, features })
    }

    /// Wraps a uffd that already completed its handshake, for example the child's uffd of a
    /// [`UffdEvent::Fork`] (which inherits the parent's features).
    pub fn from_owned_fd(fd: OwnedFd, features: UffdFeatures) -> Uffd {
        Uffd { fd, features }
    }

    /// The features this uffd was granted.
    pub fn features(&self) -> UffdFeatures {
        self.features
    }

    /// What the running kernel offers (an API handshake with no features on a throwaway uffd).
    pub fn available() -> SysResult<UffdFeatures> {
        let fd = new_raw_fd()?;
        let offered = api(fd.as_fd(), 0).map_err(|e| SysError::os("UFFDIO_API", e))?;
        Ok(UffdFeatures::from_bits_retain(offered))
    }

    /// `UFFDIO_REGISTER`: faults of the given kinds in `[addr, addr + len)` now come to this uffd.
    /// Returns the mask of ioctls allowed on the range (bits in [`range_ioctl`]).
    ///
    /// Fails with `EBUSY` when part of the range is registered with another uffd and `EINVAL` on
    /// holes in the range or unsupported memory types.
    pub fn register(&self, addr: usize, len: usize, mode: RegisterMode) -> SysResult<u64> {
        check_range("UFFDIO_REGISTER", addr, len)?;
        let mut r = g::uffdio_register {
            range: range(addr, len),
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: REGISTER takes a uffdio_register; it changes how future faults in the range are
        // delivered, not what the memory contains.
        unsafe { uffd_ioctl::<{ op::REGISTER }, _>(self.fd.as_fd(), &mut r) }
            .map_err(|e| SysError::os("UFFDIO_REGISTER", e))?;
        Ok(r.ioctls)
    }

    /// `UFFDIO_UNREGISTER` (also wakes threads waiting on the range: they retry the fault and
    /// see ordinary memory).
    pub fn unregister(&self, addr: usize, len: usize) -> SysResult<()> {
        check_range("UFFDIO_UNREGISTER", addr, len)?;
        let mut r = range(addr, len);
        // SAFETY: UNREGISTER takes a uffdio_range and touches no memory contents.
        unsafe { uffd_ioctl::<{ op::UNREGISTER }, _>(self.fd.as_fd(), &mut r) }
            .map_err(|e| SysError::os("UFFDIO_UNREGISTER", e))
    }

    /// `UFFDIO_COPY`: fills the holes `[dst, dst + len)` with a copy of `[src, src + len)` and
    /// wakes threads waiting on them; with `write_protect` the new pages are also write-protected
    /// (`UFFDIO_COPY_MODE_WP`, needs WP registration) so the first write faults.
    ///
    /// Returns the bytes copied (`len`).
    ///
    /// # Safety
    ///
    /// `[dst, dst + len)` is registered with this uffd and owned by the caller, who decides what
    /// its missing pages contain; no Rust reference to it may be live. `src` is only read (the
    /// kernel returns EFAULT for unreadable source), but it must not be concurrently written.
    pub unsafe fn copy(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        write_protect: bool,
    ) -> Result<usize, UffdError> {
        let mode = if write_protect {
            g::UFFDIO_COPY_MODE_WP as u64
        } else {
            0
        };
        let mut c = g::uffdio_copy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            copy: 0,
        };
        // SAFETY: COPY takes a uffdio_copy; it only fills holes of a range registered with this
        // uffd, which the caller owns.
        let res = unsafe { uffd_ioctl::<{ op::COPY }, _>(self.fd.as_fd(), &mut c) };
        decode("UFFDIO_COPY", res, c.copy, len)
    }

    /// `UFFDIO_ZEROPAGE`: fills the holes `[dst, dst + len)` with zero pages (read-only shared
    /// zero page until written) and wakes waiters. Returns the bytes filled.
    ///
    /// Safe: a hole of anonymous memory already reads as zero to the kernel's definition; this
    /// only makes it so without a fault, and populated pages are never touched (`Exists`).
    pub fn zeropage(&self, dst: usize, len: usize) -> Result<usize, UffdError> {
        let mut z = g::uffdio_zeropage {
            range: range(dst, len),
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: ZEROPAGE takes a uffdio_zeropage and only fills holes with zeros.
        let res = unsafe { uffd_ioctl::<{ op::ZEROPAGE }, _>(self.fd.as_fd(), &mut z) };
        decode("UFFDIO_ZEROPAGE", res, z.zeropage, len)
    }

    /// `UFFDIO_MOVE` (6.8): moves the pages of `[src, src + len)` into the holes
    /// `[dst, dst + len)` without copying (PTEs change hands; 2 MiB PMDs move whole when both
    /// sides are aligned). The source becomes holes. With `allow_src_holes`, source holes are
    /// skipped instead of failing with [`UffdError::Missing`]. Returns the bytes moved.
    ///
    /// # Safety
    ///
    /// Both ranges are owned by the caller, with no live Rust references: the source's contents
    /// disappear (it reads as zero or faults afterwards) and the destination's appear. `dst` must
    /// be registered with this uffd; `src` need not be.
    pub unsafe fn move_pages(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        allow_src_holes: bool,
    ) -> Result<usize, UffdError> {
        let mode = if allow_src_holes {
            UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
        } else {
            0
        };
        let mut m = g::uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            move_: 0,
        };
        // SAFETY: MOVE takes a uffdio_move; the caller owns both ranges.
        let res = unsafe { uffd_ioctl::<{ op::MOVE }, _>(self.fd.as_fd(), &mut m) };
        decode("UFFDIO_MOVE", res, m.move_, len)
    }

    /// `UFFDIO_WRITEPROTECT`: sets (`protect`) or clears write protection on `[addr, addr + len)`
    /// (registered with [`RegisterMode::WP`]); clearing also wakes threads waiting on it.
    /// Unpopulated pages are protected only with [`UffdFeatures::WP_UNPOPULATED`].
    pub fn write_protect(&self, addr: usize, len: usize, protect: bool) -> SysResult<()> {
        let mode = if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        };
        let mut w = g::uffdio_writeprotect {
            range: range(addr, len),
            mode,
        };
        // SAFETY: WRITEPROTECT takes a uffdio_writeprotect and changes protection only.
        unsafe { uffd_ioctl::<{ op::WRITEPROTECT }, _>(self.fd.as_fd(), &mut w) }
            .map_err(|e| SysError::os("UFFDIO_WRITEPROTECT", e))
    }

    /// `UFFDIO_WAKE`: wakes threads waiting on faults in `[addr, addr + len)` (they retry).
    pub fn wake(&self, addr: usize, len: usize) -> SysResult<()> {
        let mut r = range(addr, len);
        // SAFETY: WAKE takes a uffdio_range and touches no memory.
        unsafe { uffd_ioctl::<{ op::WAKE }, _>(self.fd.as_fd(), &mut r) }
            .map_err(|e| SysError::os("UFFDIO_WAKE", e))
    }

    /// `UFFDIO_CONTINUE` (MINOR mode on shmem / hugetlbfs): maps the page-cache pages that
    /// already back `[addr, addr + len)` and wakes waiters; with `write_protect` they are mapped
    /// write-protected. Returns the bytes mapped.
    pub fn continue_range(
        &self,
        addr: usize,
        len: usize,
        write_protect: bool,
    ) -> Result<usize, UffdError> {
        let mode = if write_protect {
            UFFDIO_CONTINUE_MODE_WP
        } else {
            0
        };
        let mut c = g::uffdio_continue {
            range: range(addr, len),
            mode,
            mapped: 0,
        };
        // SAFETY: CONTINUE takes a uffdio_continue; it maps the file's existing pages, which are
        // by definition the range's contents.
        let res = unsafe { uffd_ioctl::<{ op::CONTINUE }, _>(self.fd.as_fd(), &mut c) };
        decode("UFFDIO_CONTINUE", res, c.mapped, len)
    }

    /// `UFFDIO_POISON` (6.6, needs [`UffdFeatures::POISON`]): marks the holes `[addr, addr + len)`
    /// so that any access raises SIGBUS (`BUS_MCEERR_AR`), like hardware-poisoned memory.
    pub fn poison(&self, addr: usize, len: usize) -> Result<usize, UffdError> {
        let mut p = g::uffdio_poison {
            range: range(addr, len),
            mode: 0,
            updated: 0,
        };
        // SAFETY: POISON takes a uffdio_poison and only installs markers in holes.
        let res = unsafe { uffd_ioctl::<{ op::POISON }, _>(self.fd.as_fd(), &mut p) };
        decode("UFFDIO_POISON", res, p.updated, len)
    }

    /// Appends every event queued right now to `out` and returns how many were appended
    /// (0 when none were queued). Never blocks.
    pub fn read_events(&self, out: &mut Vec<UffdEvent>) -> SysResult<usize> {
        const MSG: usize = size_of::<g::uffd_msg>();
        const BATCH: usize = 32;
        let mut buf = [0u8; MSG * BATCH];
        let mut appended = 0;
        loop {
            let n = match rustix::io::read(&self.fd, &mut buf[..]) {
                Ok(n) => n,
                Err(Errno::AGAIN) => return Ok(appended),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(SysError::os("read(userfaultfd)", e)),
            };
            for chunk in buf[..n].chunks_exact(MSG) {
                // SAFETY: the kernel wrote whole uffd_msg records; every bit pattern is a valid
                // uffd_msg (integers and unions of integers); read_unaligned needs no alignment.
                let msg = unsafe { chunk.as_ptr().cast::<g::uffd_msg>().read_unaligned() };
                if let Some(ev) = decode_msg(&msg) {
                    out.push(ev);
                    appended += 1;
                }
            }
            if n < buf.len() {
                return Ok(appended);
            }
        }
    }

    /// Waits until events are queued, `shutdown` becomes readable (checked first), or `timeout`
    /// passes (`None`: forever). Signals (`EINTR`) do not end the wait early.
    pub fn poll(
        &self,
        shutdown: Option<BorrowedFd<'_>>,
        timeout: Option<Duration>,
    ) -> SysResult<PollResult> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let ts =
                deadline.map(|d| duration_to_timespec(d.saturating_duration_since(Instant::now())));
            let mut fds = [
                PollFd::new(&self.fd, PollFlags::IN),
                PollFd::from_borrowed_fd(shutdown.unwrap_or(self.fd.as_fd()), PollFlags::IN),
            ];
            let nfds = if shutdown.is_some() { 2 } else { 1 };
            match rustix::event::poll(&mut fds[..nfds], ts.as_ref()) {
                Ok(0) => return Ok(PollResult::Timeout),
                Ok(_) => {
                    if nfds == 2 && !fds[1].revents().is_empty() {
                        return Ok(PollResult::Shutdown);
                    }
                    if !fds[0].revents().is_empty() {
                        // IN, or ERR/HUP: either way the next read tells the caller what happened.
                        return Ok(PollResult::Readable);
                    }
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(SysError::os("poll(userfaultfd)", e)),
            }
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn duration_to_timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos().into(),
    }
}

fn decode_msg(msg: &g::uffd_msg) -> Option<UffdEvent> {
    // Copy the union out of the packed struct first (no references into packed fields).
    let arg = msg.arg;
    let event = msg.event as u32;
    // `event` says which union member the kernel filled; every member is plain integers.
    match event {
        g::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: a PAGEFAULT message carries the pagefault member.
            let pf = unsafe { arg.pagefault };
            let flags = pf.flags;
            // SAFETY: ptid is the union's only member (zero unless THREAD_ID was granted).
            let tid = unsafe { pf.feat.ptid };
            Some(UffdEvent::Pagefault {
                addr: pf.address as usize,
                write: flags & g::UFFD_PAGEFAULT_FLAG_WRITE as u64 != 0,
                wp: flags & g::UFFD_PAGEFAULT_FLAG_WP as u64 != 0,
                minor: flags & g::UFFD_PAGEFAULT_FLAG_MINOR as u64 != 0,
                tid,
            })
        }
        g::UFFD_EVENT_FORK => {
            // SAFETY: a FORK message carries the fork member.
            let ufd = unsafe { arg.fork }.ufd as RawFd;
            // SAFETY: the kernel installed this descriptor in our table while producing the
            // message; nobody else knows it, so we take ownership.
            let uffd = unsafe { OwnedFd::from_raw_fd(ufd) };
            Some(UffdEvent::Fork { uffd })
        }
        g::UFFD_EVENT_REMAP => {
            // SAFETY: a REMAP message carries the remap member.
            let r = unsafe { arg.remap };
            Some(UffdEvent::Remap {
                from: r.from as usize,
                to: r.to as usize,
                len: r.len as usize,
            })
        }
        g::UFFD_EVENT_REMOVE => {
            // SAFETY: a REMOVE message carries the remove member.
            let r = unsafe { arg.remove };
            Some(UffdEvent::Remove {
                start: r.start as usize,
                end: r.end as usize,
            })
        }
        g::UFFD_EVENT_UNMAP => {
            // SAFETY: an UNMAP message uses the remove member too (uapi comment).
            let r = unsafe { arg.remove };
            Some(UffdEvent::Unmap {
                start: r.start as usize,
                end: r.end as usize,
            })
        }
        _ => None,
    }
}

/// An eventfd that tells a thread blocked in [`Uffd::poll`] to stop. Once signalled it stays
/// readable, so every poller sees it.
#[derive(Debug)]
pub struct ShutdownEvent {
    fd: OwnedFd,
}

impl ShutdownEvent {
    /// Creates the eventfd (`EFD_CLOEXEC | EFD_NONBLOCK`), not yet signalled.
    pub fn new() -> SysResult<ShutdownEvent> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| SysError::os("eventfd", e))?;
        Ok(ShutdownEvent { fd })
    }

    /// Makes the eventfd readable (idempotent).
    pub fn signal(&self) -> SysResult<()> {
        match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
            // AGAIN: the counter is saturated, i.e. already signalled.
            Ok(_) | Err(Errno::AGAIN) => Ok(()),
            Err(e) => Err(SysError::os("write(eventfd)", e)),
        }
    }

    /// The fd to pass to [`Uffd::poll`].
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsFd for ShutdownEvent {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mman::{self, Advice, Prot};
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc;

    const P: usize = PAGE_SIZE;
    const WAIT: Duration = Duration::from_secs(2);

    fn map(pages: usize) -> usize {
        mman::map_anonymous(pages * P, Prot::RW, false).unwrap()
    }

    fn unmap(addr: usize, pages: usize) {
        // SAFETY: tests only unmap their own mappings, with no references into them.
        unsafe { mman::unmap(addr, pages * P).unwrap() }
    }

    fn peek(addr: usize) -> u64 {
        // SAFETY: tests only read populated pages of their own mappings.
        unsafe { (addr as *const u64).read_volatile() }
    }

    fn poke(addr: usize, v: u64) {
        // SAFETY: tests only write populated (or unregistered) pages of their own mappings.
        unsafe { (addr as *mut u64).write_volatile(v) }
    }

    /// The `/proc/self/pagemap` entry of `addr`: bit 63 present, bit 57 uffd-wp.
    fn pagemap(addr: usize) -> u64 {
        let f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, (addr / P * 8) as u64).unwrap();
        u64::from_ne_bytes(b)
    }
    const PM_PRESENT: u64 = 1 << 63;
    const PM_UFFD_WP: u64 = 1 << 57;

    /// Polls and reads until `pred` matches an event or WAIT passes.
    fn wait_for(uffd: &Uffd, pred: impl Fn(&UffdEvent) -> bool) -> Option<UffdEvent> {
        let deadline = Instant::now() + WAIT;
        let mut evs = Vec::new();
        while Instant::now() < deadline {
            if uffd.poll(None, Some(deadline - Instant::now())).unwrap() != PollResult::Readable {
                continue;
            }
            evs.clear();
            uffd.read_events(&mut evs).unwrap();
            if let Some(i) = evs.iter().position(&pred) {
                return Some(evs.swap_remove(i));
            }
        }
        None
    }

    #[test]
    fn opcodes_match_kernel_headers() {
        use linux_raw_sys::ioctl as k;
        assert_eq!(
            opcode::read_write::<g::uffdio_copy>(0xAA, 3),
            k::UFFDIO_COPY as Opcode
        );
        assert_eq!(
            opcode::read_write::<g::uffdio_api>(0xAA, 0x3F),
            k::UFFDIO_API as Opcode
        );
        assert_eq!(
            opcode::read::<g::uffdio_range>(0xAA, 1),
            k::UFFDIO_UNREGISTER as Opcode
        );
        assert_eq!(op::CONTINUE, k::UFFDIO_CONTINUE as Opcode);
        // _IOWR(0xAA, 0x05, struct uffdio_move /* 40 bytes */) and _IOWR(0xAA, 0x08, 32 bytes)
        assert_eq!(op::MOVE as u64, 0xC028_AA05);
        assert_eq!(op::POISON as u64, 0xC020_AA08);
        assert_eq!(op::IOC_NEW as u64, 0xAA00);
        assert_eq!(size_of::<g::uffd_msg>(), 32);
    }

    #[test]
    fn handshake_reports_and_checks_features() {
        let offered = Uffd::available().unwrap();
        let needed = UffdFeatures::SIGBUS
            | UffdFeatures::MOVE
            | UffdFeatures::EVENT_UNMAP
            | UffdFeatures::EVENT_REMOVE
            | UffdFeatures::WP_UNPOPULATED;
        assert!(offered.contains(needed), "{offered:?}");
        let u = Uffd::open(UffdFeatures::SIGBUS | UffdFeatures::MOVE).unwrap();
        assert_eq!(u.features(), UffdFeatures::SIGBUS | UffdFeatures::MOVE);
        assert!(Uffd::open(UffdFeatures::WP_ASYNC)
            .unwrap()
            .features()
            .contains(UffdFeatures::WP_UNPOPULATED));
        let bogus = UffdFeatures::from_bits_retain(1 << 62);
        match Uffd::open(UffdFeatures::SIGBUS | bogus) {
            Err(SysError::Unsupported(what)) => assert!(what.contains("unknown"), "{what}"),
            other => panic!("{other:?}"),
        }
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Uffd>();
    }

    #[test]
    fn dev_node_gives_a_working_uffd() {
        if !std::path::Path::new("/dev/userfaultfd").exists() {
            return;
        }
        let fd = open_dev_node().unwrap();
        assert!(api(fd.as_fd(), UffdFeatures::SIGBUS.bits()).is_ok());
    }

    #[test]
    fn missing_mode_zeropage_copy_and_exists() {
        let uffd = Uffd::open(UffdFeatures::SIGBUS).unwrap();
        let a = map(6);
        let ioctls = uffd.register(a, 6 * P, RegisterMode::MISSING).unwrap();
        assert_ne!(ioctls & range_ioctl::COPY, 0);
        assert_ne!(ioctls & range_ioctl::ZEROPAGE, 0);
        assert_ne!(ioctls & range_ioctl::WAKE, 0);
        assert!(pagemap(a) & PM_PRESENT == 0);

        assert_eq!(uffd.zeropage(a, P).unwrap(), P);
        assert_eq!(peek(a), 0);
        assert!(matches!(uffd.zeropage(a, P), Err(UffdError::Exists)));

        let src = map(2);
        poke(src, 0x1122_3344_5566_7788);
        poke(src + P, 99);
        // SAFETY: a+P is a hole of our registered mapping.
        assert_eq!(unsafe { uffd.copy(a + P, src, P, false) }.unwrap(), P);
        assert_eq!(peek(a + P), 0x1122_3344_5566_7788);
        // SAFETY: as above; the page is populated now so nothing changes.
        let again = unsafe { uffd.copy(a + P, src, P, false) };
        assert!(matches!(again, Err(UffdError::Exists)));
        // Populated first page: nothing is done, the error is EEXIST itself.
        // SAFETY: our registered mapping.
        let two = unsafe { uffd.copy(a + P, src, 2 * P, false) };
        assert!(matches!(two, Err(UffdError::Exists)));
        // Hole then populated page: partial progress reported as EAGAIN with the bytes done.
        // SAFETY: our registered mapping.
        unsafe { uffd.copy(a + 3 * P, src, P, false) }.unwrap();
        // SAFETY: our registered mapping.
        match unsafe { uffd.copy(a + 2 * P, src, 2 * P, false) } {
            Err(UffdError::Again { done }) => assert_eq!(done, P),
            other => panic!("{other:?}"),
        }
        assert_eq!(peek(a + 2 * P), 0x1122_3344_5566_7788);

        // SIGBUS mode: a kernel-mode access to a hole fails with EFAULT instead of blocking.
        let e = mman::populate(a + 5 * P, P, false).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EFAULT), "{e}");
        // Unaligned ranges are refused before the call.
        assert!(matches!(
            uffd.register(a + 1, P, RegisterMode::MISSING),
            Err(SysError::Invalid { .. })
        ));

        uffd.unregister(a, 6 * P).unwrap();
        unmap(a, 6);
        unmap(src, 2);
    }

    #[test]
    fn move_transfers_pages_and_leaves_holes() {
        let uffd = Uffd::open(UffdFeatures::SIGBUS | UffdFeatures::MOVE).unwrap();
        let a = map(2);
        let b = map(2);
        assert_ne!(
            uffd.register(a, 2 * P, RegisterMode::MISSING).unwrap() & range_ioctl::MOVE,
            0
        );
        uffd.register(b, 2 * P, RegisterMode::MISSING).unwrap();
        let src = map(1);
        poke(src, 0xabcd);
        // SAFETY: all ranges are ours; holes in a and b.
        unsafe {
            uffd.copy(a, src, P, false).unwrap();
            assert_eq!(uffd.move_pages(b, a, P, false).unwrap(), P);
        }
        assert_eq!(peek(b), 0xabcd);
        assert!(pagemap(a) & PM_PRESENT == 0);
        // a is a hole again: a copy into it succeeds instead of EEXIST.
        // SAFETY: ours.
        unsafe {
            assert_eq!(uffd.copy(a, src, P, false).unwrap(), P);
            // dst populated -> EEXIST; src hole -> ENOENT unless holes are allowed.
            assert!(matches!(
                uffd.move_pages(b, a, P, false),
                Err(UffdError::Exists)
            ));
            assert!(matches!(
                uffd.move_pages(b + P, a + P, P, false),
                Err(UffdError::Missing)
            ));
            assert_eq!(uffd.move_pages(b + P, a + P, P, true).unwrap(), P);
        }
        assert!(
            pagemap(b + P) & PM_PRESENT == 0,
            "a skipped hole stays a hole"
        );

        // The source need not be registered (only the destination must be).
        let c = map(1);
        poke(c, 77);
        // SAFETY: ours.
        unsafe { uffd.move_pages(b + P, c, P, false).unwrap() };
        assert_eq!(peek(b + P), 77);
        assert!(pagemap(c) & PM_PRESENT == 0);

        // An unregistered destination is EINVAL.
        poke(c, 78);
        let d = map(1);
        // SAFETY: ours.
        match unsafe { uffd.move_pages(d, c, P, false) } {
            Err(UffdError::Os(e)) => assert_eq!(e.errno(), Some(libc::EINVAL)),
            other => panic!("{other:?}"),
        }
        for (x, n) in [(a, 2), (b, 2), (src, 1), (c, 1), (d, 1)] {
            unmap(x, n);
        }
    }

    #[test]
    fn move_restrictions_observed_on_this_kernel() {
        let u = Uffd::open(UffdFeatures::SIGBUS | UffdFeatures::MOVE).unwrap();
        let mut maps = Vec::new();
        let mut mk = |prot: Prot, register: bool, fill: bool| {
            let x = map(1);
            if fill {
                poke(x, 9);
            }
            if register {
                u.register(x, P, RegisterMode::MISSING).unwrap();
            }
            // SAFETY: our own fresh mapping.
            unsafe { mman::protect(x, P, prot).unwrap() };
            maps.push(x);
            x
        };
        let einval = |r: Result<usize, UffdError>| matches!(r, Err(UffdError::Os(ref e)) if e.errno() == Some(libc::EINVAL));
        // SAFETY: every range moved below is one of this test's own mappings.
        unsafe {
            // Both VMAs must be writable and have the same protection.
            let (s, d) = (mk(Prot::READ, false, true), mk(Prot::RW, true, false));
            assert!(einval(u.move_pages(d, s, P, false)));
            let (s, d) = (mk(Prot::READ, false, true), mk(Prot::READ, true, false));
            assert!(einval(u.move_pages(d, s, P, false)));
            let (s, d) = (mk(Prot::RW, false, true), mk(Prot::empty(), true, false));
            assert!(einval(u.move_pages(d, s, P, false)));
            let (s, d) = (
                mk(Prot::RW | Prot::EXEC, false, true),
                mk(Prot::RW, true, false),
            );
            assert!(einval(u.move_pages(d, s, P, false)));
            // A source registered (here with the same uffd) is fine, and so is the zero page.
            let (s, d) = (mk(Prot::RW, true, false), mk(Prot::RW, true, false));
            u.zeropage(s, P).unwrap();
            assert_eq!(u.move_pages(d, s, P, false).unwrap(), P);
            assert_ne!(pagemap(d) & PM_PRESENT, 0);
        }
        // A shared anonymous (shmem) source is EINVAL.
        let sh = mman::map_anonymous(P, Prot::RW, true).unwrap();
        poke(sh, 1);
        let d = mk(Prot::RW, true, false);
        // SAFETY: ours.
        assert!(einval(unsafe { u.move_pages(d, sh, P, false) }));
        unmap(sh, 1);
        // One MOVE may not span two destination VMAs (validated up front: nothing moves).
        let s2 = map(2);
        poke(s2, 1);
        poke(s2 + P, 2);
        let d2 = map(2);
        u.register(d2, 2 * P, RegisterMode::MISSING).unwrap();
        // SAFETY: ours.
        unsafe {
            mman::protect(d2 + P, P, Prot::READ).unwrap();
            assert!(einval(u.move_pages(d2, s2, 2 * P, false)));
        }
        assert_eq!(peek(s2), 1);
        // Moving a write-protected page drops the protection: the destination is writable.
        let w = Uffd::open(UffdFeatures::SIGBUS | UffdFeatures::MOVE).unwrap();
        let (ws, wd) = (map(1), map(1));
        poke(ws, 3);
        w.register(ws, P, RegisterMode::WP).unwrap();
        w.write_protect(ws, P, true).unwrap();
        w.register(wd, P, RegisterMode::MISSING | RegisterMode::WP)
            .unwrap();
        // SAFETY: ours.
        assert_eq!(unsafe { w.move_pages(wd, ws, P, false) }.unwrap(), P);
        assert_eq!(pagemap(wd) & PM_UFFD_WP, 0);
        // A 2 MiB aligned range moves in one call (as a PMD when THP backs it).
        let h = mman::map_anonymous_aligned(crate::HUGE_PAGE_SIZE, crate::HUGE_PAGE_SIZE, Prot::RW)
            .unwrap();
        let hd =
            mman::map_anonymous_aligned(crate::HUGE_PAGE_SIZE, crate::HUGE_PAGE_SIZE, Prot::RW)
                .unwrap();
        // SAFETY: ours.
        unsafe {
            mman::advise(h, crate::HUGE_PAGE_SIZE, Advice::HugePage).unwrap();
            mman::advise(hd, crate::HUGE_PAGE_SIZE, Advice::HugePage).unwrap();
        }
        poke(h + 8 * P, 4);
        u.register(hd, crate::HUGE_PAGE_SIZE, RegisterMode::MISSING)
            .unwrap();
        // SAFETY: ours.
        let moved = unsafe { u.move_pages(hd, h, crate::HUGE_PAGE_SIZE, true) };
        assert_eq!(moved.unwrap(), crate::HUGE_PAGE_SIZE);
        assert_eq!(peek(hd + 8 * P), 4);
        for x in maps {
            unmap(x, 1);
        }
        for (x, n) in [
            (d, 1),
            (s2, 2),
            (d2, 2),
            (ws, 1),
            (wd, 1),
            (h, 512),
            (hd, 512),
        ] {
            unmap(x, n);
        }
    }

    #[test]
    fn move_of_cow_shared_page_is_busy() {
        let uffd = Uffd::open(UffdFeatures::SIGBUS | UffdFeatures::MOVE).unwrap();
        let a = map(1);
        let b = map(1);
        uffd.register(b, P, RegisterMode::MISSING).unwrap();
        poke(a, 5);
        // SAFETY: the child only calls async-signal-safe functions (pause, _exit).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            loop {
                // SAFETY: async-signal-safe; the parent kills us.
                unsafe { libc::pause() };
            }
        }
        // SAFETY: ours; the page is COW-shared with the child now.
        let r = unsafe { uffd.move_pages(b, a, P, false) };
        // SAFETY: plain syscalls on our child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert!(matches!(r, Err(UffdError::Busy)), "{r:?}");
        unmap(a, 1);
        unmap(b, 1);
    }

    /// Reads events until the thread `t` (which performs an operation that blocks until its
    /// event is read) finishes; returns its result and every event seen.
    fn drain_until_done<T>(uffd: &Uffd, t: std::thread::JoinHandle<T>) -> (T, Vec<UffdEvent>) {
        let deadline = Instant::now() + WAIT;
        let mut evs = Vec::new();
        loop {
            if t.is_finished() {
                uffd.read_events(&mut evs).unwrap();
                return (t.join().unwrap(), evs);
            }
            // Panicking drops the uffd, which releases the blocked thread.
            assert!(
                Instant::now() < deadline,
                "operation still blocked; events so far: {evs:?}"
            );
            if uffd.poll(None, Some(Duration::from_millis(10))).unwrap() == PollResult::Readable {
                uffd.read_events(&mut evs).unwrap();
            }
        }
    }

    #[test]
    fn events_unmap_remove_remap_are_delivered() {
        let uffd = Uffd::open(
            UffdFeatures::SIGBUS
                | UffdFeatures::EVENT_UNMAP
                | UffdFeatures::EVENT_REMOVE
                | UffdFeatures::EVENT_REMAP,
        )
        .unwrap();
        let a = map(4);
        uffd.register(a, 4 * P, RegisterMode::MISSING).unwrap();
        uffd.zeropage(a, 4 * P).unwrap();

        // MADV_DONTNEED blocks until the REMOVE is read: do it from another thread.
        let t = std::thread::spawn(move || {
            // SAFETY: the test owns the mapping.
            unsafe { mman::advise(a, P, Advice::DontNeed) }.unwrap()
        });
        // While the REMOVE is queued and unread, resolving ioctls fail with EAGAIN and the
        // progress field holds -EAGAIN: decoded as "0 bytes done", not as a huge count.
        assert_eq!(uffd.poll(None, Some(WAIT)).unwrap(), PollResult::Readable);
        let src = map(1);
        // SAFETY: a+P is populated, so nothing could change even if the copy ran.
        let r = unsafe { uffd.copy(a + P, src, P, false) };
        assert!(matches!(r, Err(UffdError::Again { done: 0 })), "{r:?}");
        unmap(src, 1);
        let ((), evs) = drain_until_done(&uffd, t);
        assert!(
            matches!(evs[..], [UffdEvent::Remove { start, end }] if start == a && end == a + P),
            "{evs:?}"
        );

        // mremap moves the registration along and reports REMAP. (A same-size mremap without
        // MREMAP_FIXED is a no-op and reports nothing, so move onto a placeholder.)
        let placeholder = map(1);
        let t = std::thread::spawn(move || {
            // SAFETY: the test owns both mappings; the last page replaces the placeholder.
            unsafe { mman::remap(a + 3 * P, P, P, Some(placeholder), false) }.unwrap()
        });
        let (moved, evs) = drain_until_done(&uffd, t);
        assert_eq!(moved, placeholder);
        // REMAP, then an UNMAP of the old range once the move completed.
        let old = a + 3 * P;
        assert!(
            matches!(evs[..], [UffdEvent::Remap { from, to, len }, UffdEvent::Unmap { start, end }]
                if from == old && to == moved && len == P && start == old && end == old + P),
            "{evs:?}"
        );

        // munmap blocks until the UNMAP is read.
        let t = std::thread::spawn(move || unmap(a, 3));
        let ((), evs) = drain_until_done(&uffd, t);
        assert!(
            matches!(evs[..], [UffdEvent::Unmap { start, end }] if start == a && end == a + 3 * P),
            "{evs:?}"
        );

        // The moved page is still registered: unmapping it reports too.
        let t = std::thread::spawn(move || unmap(moved, 1));
        let ((), evs) = drain_until_done(&uffd, t);
        assert!(
            matches!(evs[..], [UffdEvent::Unmap { start, .. }] if start == moved),
            "{evs:?}"
        );
        let mut v = Vec::new();
        assert_eq!(uffd.read_events(&mut v).unwrap(), 0);
    }

    #[test]
    fn pagefault_event_names_address_access_and_thread() {
        let uffd = Uffd::open(UffdFeatures::THREAD_ID).unwrap();
        let a = map(1);
        uffd.register(a, P, RegisterMode::MISSING).unwrap();
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            tx.send(rustix::thread::gettid().as_raw_nonzero().get() as u32)
                .unwrap();
            poke(a + 8, 3); // blocks until the test resolves the fault
            peek(a + 8)
        });
        let tid = rx.recv().unwrap();
        let ev = wait_for(&uffd, |e| matches!(e, UffdEvent::Pagefault { .. }));
        // Resolve whatever happened so the thread cannot stay blocked.
        let _ = uffd.zeropage(a, P);
        assert!(
            matches!(ev, Some(UffdEvent::Pagefault { addr, write: true, wp: false, minor: false, tid: t })
                if addr == a && t == tid),
            "{ev:?}"
        );
        assert_eq!(t.join().unwrap(), 3);
        unmap(a, 1);
    }

    #[test]
    fn fork_event_delivers_child_uffd() {
        let uffd = Uffd::open(UffdFeatures::SIGBUS | UffdFeatures::EVENT_FORK).unwrap();
        let a = map(1);
        uffd.register(a, P, RegisterMode::MISSING).unwrap();
        // fork() waits until the FORK event is read: fork from another thread.
        let t = std::thread::spawn(|| {
            // SAFETY: the child calls only _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: async-signal-safe.
                unsafe { libc::_exit(0) };
            }
            let mut st = 0;
            // SAFETY: plain syscall on our child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            st
        });
        let ev = wait_for(&uffd, |e| matches!(e, UffdEvent::Fork { .. }));
        assert_eq!(t.join().unwrap(), 0);
        match ev {
            Some(UffdEvent::Fork { uffd: child }) => {
                // The child's uffd is a uffd (its API was done): a second API is refused.
                let child = Uffd::from_owned_fd(child, uffd.features());
                assert!(api(child.as_fd(), 0).is_err());
            }
            other => panic!("{other:?}"),
        }
        uffd.unregister(a, P).unwrap();
        unmap(a, 1);
    }

    #[test]
    fn write_protect_populated_and_unpopulated() {
        let uffd = Uffd::open(
            UffdFeatures::SIGBUS | UffdFeatures::PAGEFAULT_FLAG_WP | UffdFeatures::WP_UNPOPULATED,
        )
        .unwrap();
        let a = map(3);
        poke(a, 1);
        let ioctls = uffd
            .register(a, 3 * P, RegisterMode::MISSING | RegisterMode::WP)
            .unwrap();
        assert_ne!(ioctls & range_ioctl::WRITEPROTECT, 0);
        uffd.write_protect(a, P, true).unwrap();
        assert_ne!(pagemap(a) & PM_UFFD_WP, 0);
        assert_eq!(peek(a), 1, "reads still work");
        uffd.write_protect(a, P, false).unwrap();
        assert_eq!(pagemap(a) & PM_UFFD_WP, 0);
        poke(a, 2);
        // WP_UNPOPULATED: a never-touched page gets a marker.
        uffd.write_protect(a + P, P, true).unwrap();
        assert_ne!(pagemap(a + P) & PM_UFFD_WP, 0);
        uffd.write_protect(a + P, P, false).unwrap();
        // COPY_MODE_WP populates write-protected.
        let src = map(1);
        // SAFETY: a hole of our registered mapping.
        unsafe { uffd.copy(a + 2 * P, src, P, true) }.unwrap();
        assert_ne!(pagemap(a + 2 * P) & (PM_UFFD_WP | PM_PRESENT), 0);
        assert_ne!(pagemap(a + 2 * P) & PM_UFFD_WP, 0);
        uffd.wake(a, 3 * P).unwrap();
        unmap(a, 3);
        unmap(src, 1);
    }

    #[test]
    fn poll_times_out_and_sees_shutdown() {
        let uffd = Uffd::open(UffdFeatures::SIGBUS).unwrap();
        let stop = ShutdownEvent::new().unwrap();
        let t = Instant::now();
        assert_eq!(
            uffd.poll(Some(stop.as_fd()), Some(Duration::from_millis(10)))
                .unwrap(),
            PollResult::Timeout
        );
        assert!(t.elapsed() >= Duration::from_millis(10));
        assert_eq!(
            uffd.poll(None, Some(Duration::ZERO)).unwrap(),
            PollResult::Timeout
        );
        stop.signal().unwrap();
        stop.signal().unwrap();
        assert_eq!(
            uffd.poll(Some(stop.as_fd()), None).unwrap(),
            PollResult::Shutdown
        );
        let mut v = Vec::new();
        assert_eq!(uffd.read_events(&mut v).unwrap(), 0);
    }

    #[test]
    fn poison_fills_a_hole() {
        let uffd = Uffd::open(UffdFeatures::SIGBUS | UffdFeatures::POISON).unwrap();
        let a = map(1);
        assert_ne!(
            uffd.register(a, P, RegisterMode::MISSING).unwrap() & range_ioctl::POISON,
            0
        );
        assert_eq!(uffd.poison(a, P).unwrap(), P);
        assert!(matches!(uffd.zeropage(a, P), Err(UffdError::Exists)));
        unmap(a, 1);
    }

    #[test]
    fn minor_mode_continue_maps_page_cache() {
        use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        let uffd = Uffd::open(UffdFeatures::SIGBUS | UffdFeatures::MINOR_SHMEM).unwrap();
        let fd = memfd_create("hetmem-uffd-test", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, P as u64).unwrap();
        let rw = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: fresh shared mappings of our own memfd at kernel-chosen addresses.
        let (view, alias) = unsafe {
            (
                mmap(std::ptr::null_mut(), P, rw, MapFlags::SHARED, &fd, 0).unwrap() as usize,
                mmap(std::ptr::null_mut(), P, rw, MapFlags::SHARED, &fd, 0).unwrap() as usize,
            )
        };
        assert_ne!(
            uffd.register(view, P, RegisterMode::MINOR).unwrap() & range_ioctl::CONTINUE,
            0
        );
        poke(alias, 0x5151); // creates the page-cache page through the unregistered alias
        assert_eq!(uffd.continue_range(view, P, false).unwrap(), P);
        assert_eq!(peek(view), 0x5151);
        assert!(matches!(
            uffd.continue_range(view, P, false),
            Err(UffdError::Exists)
        ));
        unmap(view, 1);
        unmap(alias, 1);
    }
}
