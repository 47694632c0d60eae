//! SIGSEGV / SIGBUS handling for CPU faults on managed memory, chained to whatever handler was
//! installed before.
//!
//! One handler function per process ([`install_fault_handler`]) receives every fault-generated
//! SIGSEGV (mprotect backend) and SIGBUS (userfaultfd SIGBUS mode, poisoned pages, truncated
//! files) as a [`FaultInfo`]. When it returns true the faulting instruction re-executes; when it
//! returns false the signal goes to the action that was installed before ours: Rust std's
//! stack-overflow handler in a normal Rust program, which (for an address that is not a guard
//! page) restores SIG_DFL and returns, so the access faults again and kills the process exactly
//! as it would have without hetmem. The design follows wasmtime's `signals.rs`.
//!
//! Flags are `SA_SIGINFO | SA_NODEFER | SA_RESTART`, deliberately without `SA_ONSTACK`: the
//! handler does real work (uffd ioctls, futex waits, copies through the migration engine) and
//! the alternate signal stack std gives each thread is a few KiB with no guard page
//! (rust-lang/rust #69533), far too small. The cost: a stack overflow cannot run any handler —
//! the kernel finds no room for the signal frame and kills the thread's process with SIGSEGV,
//! the right outcome, minus std's "has overflowed its stack" message (a test checks this).
//! `SA_NODEFER` lets a fault inside the handler re-enter it (and reach the previous action)
//! instead of killing the process with the signal blocked (ecosystem.md §5.5).
//!
//! Async-signal safety: the trampoline reads atomics and `OnceLock`s that were set before the
//! action was installed, builds the `FaultInfo` on the stack, saves and restores `errno`, and
//! calls the handler inside `catch_unwind` (a panic aborts: unwinding out of a signal handler is
//! undefined). Nothing in it allocates or takes a lock; the handler must obey the same rules
//! (ecosystem.md §5.6).

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{SysError, SysResult};
use crate::mman::{self, Prot};
use crate::PAGE_SIZE;

/// Which signal reported the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultSignal {
    /// SIGSEGV: no mapping, or the mapping's protection forbids the access (mprotect backend).
    Segv,
    /// SIGBUS: a userfaultfd range in SIGBUS mode, a poisoned page, or a file page past EOF.
    Bus,
}

/// A CPU fault as the handler sees it.
#[derive(Debug, Clone, Copy)]
pub struct FaultInfo {
    /// The signal.
    pub signal: FaultSignal,
    /// The faulting data address (`si_addr`), not rounded.
    pub addr: usize,
    /// `si_code` (`SEGV_MAPERR`, `SEGV_ACCERR`, `BUS_ADRERR`, `BUS_MCEERR_AR`, ...).
    pub code: i32,
    /// Whether the access was a write, when the architecture tells: on x86-64 bit 1 of the
    /// page-fault error code saved in the ucontext (`None` for faults that were not page faults);
    /// `None` on other architectures.
    pub write: Option<bool>,
}

/// The process's fault handler: returns true when it resolved the fault (the access is
/// re-executed), false to pass the signal on to the previous action.
///
/// It runs in signal context on the faulting thread's own stack: no allocation, no locks that
/// the interrupted code could hold, no `tracing`.
pub type FaultHandler = fn(&FaultInfo) -> bool;

/// The installed [`FaultHandler`], as a data pointer (null: none yet).
static HANDLER: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// A saved `sigaction`; written once before our action is installed, read by the trampoline.
struct SavedAction(libc::sigaction);

// SAFETY: `libc::sigaction` is plain data (a handler address, a mask, flags, a restorer
// address); sharing copies of it between threads is harmless.
unsafe impl Send for SavedAction {}
// SAFETY: as above; it is never mutated after being stored.
unsafe impl Sync for SavedAction {}

static PREV_SEGV: OnceLock<SavedAction> = OnceLock::new();
static PREV_BUS: OnceLock<SavedAction> = OnceLock::new();
/// The installation's outcome (an errno on failure), computed once.
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

/// `[start, end)` of the pages [`segv_mprotect_roundtrip`] is measuring (0..0 when idle).
static BASELINE_START: AtomicUsize = AtomicUsize::new(0);
static BASELINE_END: AtomicUsize = AtomicUsize::new(0);

/// `[start, end)` of the holes [`sigbus_uffd_move_roundtrip`] is measuring, and the distance to
/// the pages that fill them (`src = dst - MOVE_DELTA`, wrapping).
static MOVE_START: AtomicUsize = AtomicUsize::new(0);
static MOVE_END: AtomicUsize = AtomicUsize::new(0);
static MOVE_DELTA: AtomicUsize = AtomicUsize::new(0);
/// The userfaultfd of that measurement (opened once, kept for later measurements).
static MOVE_UFFD: OnceLock<crate::uffd::Uffd> = OnceLock::new();

fn prev_slot(sig: libc::c_int) -> &'static OnceLock<SavedAction> {
    if sig == libc::SIGBUS {
        &PREV_BUS
    } else {
        &PREV_SEGV
    }
}

/// Installs `handler` for SIGSEGV and SIGBUS, chaining to the actions installed before.
///
/// Once per process: calling it again with the same function is `Ok`; with a different one it
/// is [`SysError::Invalid`] (there is one handler per process; it dispatches on the address).
pub fn install_fault_handler(handler: FaultHandler) -> SysResult<()> {
    let new = handler as *const () as *mut ();
    match HANDLER.compare_exchange(
        std::ptr::null_mut(),
        new,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => {}
        Err(cur) if cur == new => {}
        Err(_) => {
            return Err(SysError::Invalid {
                op: "install_fault_handler",
                why: "a different fault handler is already installed",
            })
        }
    }
    // A second caller with the same handler also waits here until the actions are in place.
    install_trampoline()
}

/// Installs the trampoline for SIGSEGV and SIGBUS once per process (the handler may come later).
fn install_trampoline() -> SysResult<()> {
    let res = INSTALLED.get_or_init(|| {
        for sig in [libc::SIGSEGV, libc::SIGBUS] {
            // 1. Save the current action where the trampoline will find it ...
            let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
            // SAFETY: querying only (null new action); `old` is writable storage.
            if unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) } != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            // SAFETY: sigaction succeeded and filled `old`.
            let old = unsafe { old.assume_init() };
            // Cannot be set already: this closure runs once.
            let _ = prev_slot(sig).set(SavedAction(old));
            // 2. ... then install ours.
            // SAFETY: a zeroed sigaction is a valid starting point; every field we rely on is
            // set below and the mask is initialised with sigemptyset.
            let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
            sa.sa_sigaction = trampoline as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
            // SAFETY: `sa.sa_mask` is a valid sigset_t we own; the new action is fully
            // initialised and its handler has the SA_SIGINFO signature.
            let rc = unsafe {
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut())
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    res.map_err(|errno| SysError::Os {
        op: "sigaction",
        source: std::io::Error::from_raw_os_error(errno),
    })
}

fn errno_location() -> *mut libc::c_int {
    // SAFETY: returns the calling thread's errno slot; no preconditions.
    unsafe { libc::__errno_location() }
}

/// Whether the access was a write, from the interrupted context.
#[cfg(target_arch = "x86_64")]
fn write_from_context(ctx: *mut libc::c_void) -> Option<bool> {
    if ctx.is_null() {
        return None;
    }
    // SAFETY: for an SA_SIGINFO handler the third argument points to the interrupted thread's
    // ucontext_t, valid for the duration of the handler; we only read two saved registers.
    let gregs = unsafe { &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
    // Trap 14 is #PF; only then is REG_ERR a page-fault error code (bit 1: write access).
    (gregs[libc::REG_TRAPNO as usize] == 14).then_some(gregs[libc::REG_ERR as usize] & 2 != 0)
}

/// Other architectures: not decoded (aarch64 would need the ESR record of `__reserved`).
#[cfg(not(target_arch = "x86_64"))]
fn write_from_context(_ctx: *mut libc::c_void) -> Option<bool> {
    None
}

extern "C" fn trampoline(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The handler's syscalls (mprotect, ioctl) clobber errno; the interrupted code may be
    // between a failed call and its errno read.
    let errno = errno_location();
    // SAFETY: the thread's own errno slot.
    let saved = unsafe { *errno };
    if !dispatch(sig, info, ctx) {
        forward(sig, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

/// Runs the baseline fast path and the registered handler; true when the fault was resolved.
fn dispatch(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) -> bool {
    if info.is_null() {
        return false;
    }
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t for this delivery.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // si_code <= 0 (SI_USER, SI_TKILL, SI_QUEUE): sent by kill/raise, not by a fault; si_addr is
    // meaningless. Leave it to the previous action.
    if code <= 0 {
        return false;
    }
    if sig == libc::SIGSEGV {
        let (start, end) = (
            BASELINE_START.load(Ordering::Acquire),
            BASELINE_END.load(Ordering::Acquire),
        );
        if start <= addr && addr < end {
            let page = addr & !(PAGE_SIZE - 1);
            // SAFETY: the page belongs to `segv_mprotect_roundtrip`'s private mapping, which no
            // Rust reference covers; opening it is what that benchmark measures.
            return unsafe { mman::protect(page, PAGE_SIZE, Prot::RW) }.is_ok();
        }
    }
    if sig == libc::SIGBUS {
        let (start, end) = (
            MOVE_START.load(Ordering::Acquire),
            MOVE_END.load(Ordering::Acquire),
        );
        if start <= addr && addr < end {
            let page = addr & !(PAGE_SIZE - 1);
            let src = page.wrapping_sub(MOVE_DELTA.load(Ordering::Acquire));
            return MOVE_UFFD.get().is_some_and(|u| {
                // SAFETY: both pages belong to `sigbus_uffd_move_roundtrip`'s private mappings,
                // which no Rust reference covers; moving one into the other's hole is what that
                // benchmark measures.
                unsafe { u.move_pages(page, src, PAGE_SIZE, false) }.is_ok()
            });
        }
    }
    let h = HANDLER.load(Ordering::Acquire);
    if h.is_null() {
        return false;
    }
    // SAFETY: HANDLER only ever holds a `FaultHandler` stored by `install_fault_handler`;
    // fn pointers and data pointers have the same size on every target Rust supports here.
    let handler = unsafe { std::mem::transmute::<*mut (), FaultHandler>(h) };
    let fi = FaultInfo {
        signal: if sig == libc::SIGBUS {
            FaultSignal::Bus
        } else {
            FaultSignal::Segv
        },
        addr,
        code,
        write: write_from_context(ctx),
    };
    // Unwinding out of a signal handler is undefined behaviour: abort instead.
    std::panic::catch_unwind(move || handler(&fi)).unwrap_or_else(|_| std::process::abort())
}

/// Hands the signal to the action that was installed before ours.
fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(SavedAction(prev)) = prev_slot(sig).get() else {
        // Unreachable (saved before installing); behave like SIG_DFL.
        restore_default(sig);
        return;
    };
    let h = prev.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // Put the old action back and return: a fault re-executes and the default action
        // (termination; the kernel treats an ignored synchronous fault as SIG_DFL) applies.
        // SAFETY: re-installing a sigaction the kernel handed us.
        unsafe { libc::sigaction(sig, prev, std::ptr::null_mut()) };
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: installed with SA_SIGINFO, so `h` has this signature; we pass on exactly what
        // the kernel gave us (std's stack-overflow handler is such a handler).
        let f = unsafe {
            std::mem::transmute::<
                usize,
                extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
            >(h)
        };
        f(sig, info, ctx);
    } else {
        // SAFETY: a handler installed without SA_SIGINFO takes the signal number only.
        let f = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(h) };
        f(sig);
    }
}

fn restore_default(sig: libc::c_int) {
    // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask and no flags.
    unsafe {
        let sa: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// The physical baseline of a CPU fault: `npages` SIGSEGV + `mprotect` round trips on a private
/// PROT_NONE mapping (touch, trap, open the page, resume), served by the trampoline itself
/// (no handler call). Returns the total time. Not reentrant: one measurement at a time.
pub fn segv_mprotect_roundtrip(npages: usize) -> SysResult<Duration> {
    install_trampoline()?;
    let npages = npages.max(1);
    let len = npages * PAGE_SIZE;
    let base = mman::map_anonymous(len, Prot::RW, false)?;
    // Populate first so the measurement is the trap, not first-touch allocation.
    mman::populate(base, len, true)?;
    // SAFETY: `base` is our own fresh private mapping, referenced by nothing.
    unsafe { mman::protect(base, len, Prot::empty())? };
    BASELINE_START.store(base, Ordering::Release);
    BASELINE_END.store(base + len, Ordering::Release);
    let t = Instant::now();
    for p in 0..npages {
        // SAFETY: a volatile load from our own mapping; the trampoline opens the page.
        unsafe { std::ptr::read_volatile((base + p * PAGE_SIZE) as *const u8) };
    }
    let dt = t.elapsed();
    BASELINE_START.store(0, Ordering::Release);
    BASELINE_END.store(0, Ordering::Release);
    // SAFETY: the mapping is ours and no longer used.
    unsafe { mman::unmap(base, len)? };
    Ok(dt)
}

/// The physical baseline of a userfaultfd CPU fault: `npages` round trips of a touch on a hole
/// registered in MISSING mode with `UFFD_FEATURE_SIGBUS` (trap, SIGBUS, `UFFDIO_MOVE` of a
/// populated page into the hole, resume), served by the trampoline itself. The floor under a
/// userfaultfd-based fault path, as [`segv_mprotect_roundtrip`] is under an mprotect one.
/// Returns the total time. Not reentrant: one measurement at a time.
pub fn sigbus_uffd_move_roundtrip(npages: usize) -> SysResult<Duration> {
    use crate::uffd::{RegisterMode, Uffd, UffdFeatures};
    install_trampoline()?;
    if MOVE_UFFD.get().is_none() {
        let u = Uffd::open(UffdFeatures::SIGBUS | UffdFeatures::MOVE)?;
        let _ = MOVE_UFFD.set(u);
    }
    let uffd = MOVE_UFFD.get().expect("set above");
    let npages = npages.max(1);
    let len = npages * PAGE_SIZE;
    let src = mman::map_anonymous(len, Prot::RW, false)?;
    let dst = mman::map_anonymous(len, Prot::RW, false)?;
    mman::populate(src, len, true)?;
    uffd.register(dst, len, RegisterMode::MISSING)?;
    MOVE_DELTA.store(dst.wrapping_sub(src), Ordering::Release);
    MOVE_START.store(dst, Ordering::Release);
    MOVE_END.store(dst + len, Ordering::Release);
    let t = Instant::now();
    for p in 0..npages {
        // SAFETY: a volatile load from our own mapping; the trampoline moves a page into the hole.
        unsafe { std::ptr::read_volatile((dst + p * PAGE_SIZE) as *const u8) };
    }
    let dt = t.elapsed();
    MOVE_START.store(0, Ordering::Release);
    MOVE_END.store(0, Ordering::Release);
    let _ = uffd.unregister(dst, len);
    // SAFETY: both mappings are ours and no longer used.
    unsafe {
        mman::unmap(src, len)?;
        mman::unmap(dst, len)?;
    }
    Ok(dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI32, AtomicU32};

    // Every test in this binary shares the process-wide handler: `test_handler` dispatches on a
    // table of test-owned pages. A slot is claimed by storing its page; `KIND` says how to
    // resolve a fault there.
    const SLOTS: usize = 16;
    const KIND_MPROTECT: u32 = 1;
    const KIND_TRUNCATE: u32 = 2;
    const KIND_PANIC: u32 = 3;
    static PAGE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static KIND: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];
    static FD: [AtomicI32; SLOTS] = [const { AtomicI32::new(-1) }; SLOTS];
    static HITS: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];
    /// 0 unknown, 1 read, 2 write, as seen by the last fault in the slot.
    static ACCESS: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];
    /// 1 Segv, 2 Bus.
    static SIGNAL: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];
    /// Every call of the handler, handled or not.
    static CALLS: AtomicU32 = AtomicU32::new(0);

    fn test_handler(fi: &FaultInfo) -> bool {
        CALLS.fetch_add(1, Ordering::Relaxed);
        let page = fi.addr & !(PAGE_SIZE - 1);
        let Some(i) = (0..SLOTS).find(|&i| PAGE[i].load(Ordering::Acquire) == page) else {
            return false;
        };
        HITS[i].fetch_add(1, Ordering::Relaxed);
        let access = match fi.write {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        ACCESS[i].store(access, Ordering::Relaxed);
        SIGNAL[i].store(
            if fi.signal == FaultSignal::Segv { 1 } else { 2 },
            Ordering::Relaxed,
        );
        match KIND[i].load(Ordering::Acquire) {
            // SAFETY: the page is a test's own mapping with no references into it.
            KIND_MPROTECT => unsafe { mman::protect(page, PAGE_SIZE, Prot::RW) }.is_ok(),
            // SAFETY: plain syscall on the test's memfd: grow it so the page exists.
            KIND_TRUNCATE => unsafe {
                libc::ftruncate(FD[i].load(Ordering::Acquire), PAGE_SIZE as i64) == 0
            },
            KIND_PANIC => panic!("handler panics"),
            _ => false,
        }
    }

    fn claim(page: usize, kind: u32, fd: i32) -> usize {
        for i in 0..SLOTS {
            if PAGE[i].load(Ordering::Acquire) == 0 {
                KIND[i].store(kind, Ordering::Release);
                FD[i].store(fd, Ordering::Release);
                HITS[i].store(0, Ordering::Release);
                if PAGE[i]
                    .compare_exchange(0, page, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return i;
                }
            }
        }
        panic!("no free test slot");
    }

    fn release(i: usize) {
        PAGE[i].store(0, Ordering::Release);
    }

    fn none_page() -> usize {
        mman::map_anonymous(PAGE_SIZE, Prot::empty(), false).unwrap()
    }

    /// Forks; the child runs `child` (async-signal-safe code only) and `_exit`s with its result.
    /// Returns the raw wait status; kills the child if it runs for more than 5 s.
    fn in_child(child: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only runs `child`, which the callers keep to async-signal-safe
        // operations, then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: plain syscalls in the child; no core files from the deliberate crashes.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::_exit(child());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                return status;
            }
            if Instant::now() > deadline {
                // SAFETY: our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                panic!("child hung");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn killed_by(status: i32) -> Option<i32> {
        libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
    }

    #[test]
    fn second_install_same_fn_ok_different_fn_refused() {
        install_fault_handler(test_handler).unwrap();
        install_fault_handler(test_handler).unwrap();
        fn other(_: &FaultInfo) -> bool {
            false
        }
        assert!(matches!(
            install_fault_handler(other),
            Err(SysError::Invalid { .. })
        ));
        // What we chain to is Rust std's stack-overflow handler (SA_SIGINFO).
        let SavedAction(prev) = PREV_SEGV.get().unwrap();
        assert_ne!(prev.sa_sigaction, libc::SIG_DFL);
        assert_ne!(prev.sa_flags & libc::SA_SIGINFO, 0);
    }

    #[test]
    fn handled_segv_resumes_the_access() {
        install_fault_handler(test_handler).unwrap();
        let (r, w) = (none_page(), none_page());
        let (ri, wi) = (claim(r, KIND_MPROTECT, -1), claim(w, KIND_MPROTECT, -1));
        // SAFETY: our own PROT_NONE pages; the handler opens them on the first access.
        unsafe {
            assert_eq!(((r + 24) as *const u64).read_volatile(), 0);
            ((w + 8) as *mut u64).write_volatile(0x5eed);
            assert_eq!(((w + 8) as *const u64).read_volatile(), 0x5eed);
        }
        assert_eq!(HITS[ri].load(Ordering::Relaxed), 1);
        assert_eq!(HITS[wi].load(Ordering::Relaxed), 1);
        assert_eq!(SIGNAL[wi].load(Ordering::Relaxed), 1);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(ACCESS[ri].load(Ordering::Relaxed), 1, "read seen as a read");
            assert_eq!(
                ACCESS[wi].load(Ordering::Relaxed),
                2,
                "write seen as a write"
            );
        }
        release(ri);
        release(wi);
        // SAFETY: ours.
        unsafe {
            mman::unmap(r, PAGE_SIZE).unwrap();
            mman::unmap(w, PAGE_SIZE).unwrap();
        }
    }

    #[test]
    fn handled_sigbus_resumes_the_access() {
        use rustix::fs::{memfd_create, MemfdFlags};
        use std::os::fd::{AsRawFd, IntoRawFd};
        install_fault_handler(test_handler).unwrap();
        // A shared mapping of an empty memfd: touching it is SIGBUS (BUS_ADRERR) until the
        // handler grows the file.
        let fd = memfd_create("hetmem-signal-test", MemfdFlags::CLOEXEC).unwrap();
        let raw = fd.as_raw_fd();
        // SAFETY: a fresh mapping at a kernel-chosen address.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .unwrap() as usize;
        let i = claim(p, KIND_TRUNCATE, raw);
        // SAFETY: our own mapping; the handler makes the page exist.
        unsafe {
            (p as *mut u32).write_volatile(7);
            assert_eq!((p as *const u32).read_volatile(), 7);
        }
        assert_eq!(HITS[i].load(Ordering::Relaxed), 1);
        assert_eq!(SIGNAL[i].load(Ordering::Relaxed), 2);
        release(i);
        let _ = fd.into_raw_fd();
        // SAFETY: ours; closing the memfd we leaked from the OwnedFd above.
        unsafe {
            mman::unmap(p, PAGE_SIZE).unwrap();
            libc::close(raw);
        }
    }

    #[test]
    fn unhandled_segv_reaches_previous_handler_and_kills() {
        install_fault_handler(test_handler).unwrap();
        let p = none_page();
        let status = in_child(|| {
            // SAFETY: deliberately faulting on a PROT_NONE page nobody handles.
            unsafe { (p as *const u8).read_volatile() };
            0
        });
        assert_eq!(killed_by(status), Some(libc::SIGSEGV), "status {status:#x}");
        // SAFETY: ours.
        unsafe { mman::unmap(p, PAGE_SIZE).unwrap() };
    }

    #[test]
    fn unhandled_sigbus_kills_with_sigbus() {
        use rustix::fs::{memfd_create, MemfdFlags};
        install_fault_handler(test_handler).unwrap();
        let fd = memfd_create("hetmem-signal-test", MemfdFlags::CLOEXEC).unwrap();
        // SAFETY: a fresh mapping at a kernel-chosen address.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .unwrap() as usize;
        let status = in_child(|| {
            // SAFETY: deliberately reading past the end of an empty file.
            unsafe { (p as *const u8).read_volatile() };
            0
        });
        assert_eq!(killed_by(status), Some(libc::SIGBUS), "status {status:#x}");
        // SAFETY: ours.
        unsafe { mman::unmap(p, PAGE_SIZE).unwrap() };
    }

    #[test]
    fn user_sent_sigsegv_is_not_given_to_the_handler() {
        install_fault_handler(test_handler).unwrap();
        let status = in_child(|| {
            let before = CALLS.load(Ordering::Relaxed);
            // SAFETY: plain syscalls: signal this thread. std's handler (reached through ours)
            // treats it as "not a guard page": it restores SIG_DFL and returns, and since no
            // instruction re-executes, the child lives on.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::gettid(),
                    libc::SIGSEGV,
                )
            };
            (CALLS.load(Ordering::Relaxed) - before) as i32
        });
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "the handler was called for a kill()"
        );
    }

    #[test]
    fn stack_overflow_still_kills_with_sigsegv() {
        install_fault_handler(test_handler).unwrap();
        #[inline(never)]
        fn recurse(n: u64) -> u64 {
            let buf = std::hint::black_box([n as u8; 1024]);
            if n == u64::MAX {
                return 0;
            }
            recurse(n + 1) + u64::from(buf[7])
        }
        let status = in_child(|| recurse(0) as i32);
        assert_eq!(killed_by(status), Some(libc::SIGSEGV), "status {status:#x}");
    }

    #[test]
    fn panicking_handler_aborts() {
        install_fault_handler(test_handler).unwrap();
        let p = none_page();
        let i = claim(p, KIND_PANIC, -1);
        let status = in_child(|| {
            // A silent hook: the default one would print a backtrace into the test output.
            std::panic::set_hook(Box::new(|_| {}));
            // SAFETY: deliberately faulting; the handler panics.
            unsafe { (p as *const u8).read_volatile() };
            0
        });
        release(i);
        assert_eq!(killed_by(status), Some(libc::SIGABRT), "status {status:#x}");
        // SAFETY: ours.
        unsafe { mman::unmap(p, PAGE_SIZE).unwrap() };
    }

    #[test]
    fn baseline_roundtrip_measures_something() {
        let d = segv_mprotect_roundtrip(16).unwrap();
        assert!(d > Duration::ZERO);
    }
}
