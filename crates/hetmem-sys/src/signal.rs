//! SIGSEGV / SIGBUS handling for CPU faults on managed memory.
//!
//! One handler function per process ([`install_fault_handler`]) receives every SIGSEGV and SIGBUS
//! as a [`FaultInfo`]; when it returns true the faulting access is re-executed, otherwise the
//! signal goes to the handler that was installed before (Rust's stack-overflow handler, say), or
//! to the default action, which kills the process as it would have without hetmem.
//!
//! Installed with `SA_SIGINFO | SA_NODEFER | SA_RESTART` and deliberately without `SA_ONSTACK`:
//! the handler does real work (ioctls, futex waits, migrations) and the per-thread alternate
//! signal stack Rust sets up is a few KiB with no guard page (rust-lang/rust #69533). A stack
//! overflow therefore cannot run our handler; the kernel then kills the process with SIGSEGV, the
//! same outcome without the message.
//!
//! Nothing in the trampoline allocates or locks: it reads atomics, builds a `FaultInfo` on the
//! stack and calls the registered function inside `catch_unwind` (a panic aborts).

use std::{
    mem::MaybeUninit,
    sync::atomic::{AtomicPtr, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::{
    error::{SysError, SysResult},
    mman::{self, Prot},
    PAGE_SIZE,
};

/// Which signal reported the fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultSignal {
    /// SIGSEGV (a protection or mapping fault).
    Segv,
    /// SIGBUS (userfaultfd SIGBUS mode, or a truncated file).
    Bus,
}

/// A CPU fault as the handler sees it.
#[derive(Clone, Copy, Debug)]
pub struct FaultInfo {
    /// The signal.
    pub signal: FaultSignal,
    /// The faulting address (`si_addr`).
    pub addr: usize,
    /// `si_code`.
    pub code: i32,
    /// Whether the access was a write, when the architecture tells (x86-64: the page-fault error
    /// code in the ucontext).
    pub write: Option<bool>,
}

/// The process's fault handler: true = handled, re-execute the access.
pub type FaultHandler = fn(&FaultInfo) -> bool;

static HANDLER: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
static PREV_SEGV: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static PREV_BUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
/// A page range `[start, end)` served by the baseline benchmark: the handler only mprotects.
static BASELINE_START: AtomicUsize = AtomicUsize::new(0);
static BASELINE_END: AtomicUsize = AtomicUsize::new(0);

#[cfg(target_arch = "x86_64")]
fn write_from_context(ctx: *mut libc::c_void) -> Option<bool> {
    if ctx.is_null() {
        return None;
    }
    // SAFETY: for an SA_SIGINFO handler the third argument is the interrupted thread's
    // `ucontext_t`, valid for the duration of the handler; we only read one register slot.
    let err =
        unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_ERR as usize] };
    Some(err & 2 != 0)
}

#[cfg(not(target_arch = "x86_64"))]
fn write_from_context(_ctx: *mut libc::c_void) -> Option<bool> {
    None
}

extern "C" fn trampoline(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
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
    // The baseline benchmark's pages: a bare mprotect round trip.
    let (bs, be) = (
        BASELINE_START.load(Ordering::Acquire),
        BASELINE_END.load(Ordering::Acquire),
    );
    if sig == libc::SIGSEGV && bs <= addr && addr < be {
        let page = addr & !(PAGE_SIZE - 1);
        // SAFETY: the page belongs to the benchmark's private mapping, which no Rust reference
        // covers; opening it read-write is what the benchmark measures.
        if unsafe { mman::protect(page, PAGE_SIZE, Prot::READ | Prot::WRITE) }.is_ok() {
            return;
        }
    }
    let h = HANDLER.load(Ordering::Acquire);
    if !h.is_null() {
        // SAFETY: HANDLER only ever holds a `FaultHandler` fn pointer stored by
        // `install_fault_handler`.
        let f: FaultHandler = unsafe { std::mem::transmute::<*mut (), FaultHandler>(h) };
        let handled = std::panic::catch_unwind(|| f(&fi)).unwrap_or_else(|_| std::process::abort());
        if handled {
            return;
        }
    }
    forward(sig, info, ctx);
}

fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = if sig == libc::SIGBUS {
        &PREV_BUS
    } else {
        &PREV_SEGV
    };
    let p = prev.load(Ordering::Acquire);
    if p.is_null() {
        restore_default(sig);
        return;
    }
    // SAFETY: `p` points to a leaked `sigaction` saved at installation, never freed.
    let prev = unsafe { &*p };
    let h = prev.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // Restore and return: the access re-executes and the default action applies.
        // SAFETY: re-installing the saved action for this signal.
        unsafe { libc::sigaction(sig, prev, std::ptr::null_mut()) };
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it takes these three
        // arguments; we pass through exactly what the kernel gave us.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}

fn restore_default(sig: libc::c_int) {
    // SAFETY: a zeroed sigaction with SIG_DFL is a valid default disposition.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// Installs `handler` for SIGSEGV and SIGBUS (once per process; installing the same function
/// again is a no-op, a different one is refused).
pub fn install_fault_handler(handler: FaultHandler) -> SysResult<()> {
    let new = handler as *mut ();
    match HANDLER.compare_exchange(
        std::ptr::null_mut(),
        new,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => {}
        Err(cur) if cur == new => return Ok(()),
        Err(_) => {
            return Err(SysError::Invalid {
                op: "install_fault_handler",
                why: "another handler is installed",
            })
        }
    }
    install_trampoline()
}

fn install_trampoline() -> SysResult<()> {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        for (sig, slot) in [(libc::SIGSEGV, &PREV_SEGV), (libc::SIGBUS, &PREV_BUS)] {
            // SAFETY: sigaction with a valid, fully initialised action; the previous action is
            // written into a zeroed struct that we then leak so the trampoline can use it for the
            // rest of the process's life.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = trampoline as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut prev = MaybeUninit::<libc::sigaction>::zeroed();
                if libc::sigaction(sig, &sa, prev.as_mut_ptr()) != 0 {
                    result = Err(SysError::last("sigaction"));
                    return;
                }
                slot.store(
                    Box::into_raw(Box::new(prev.assume_init())),
                    Ordering::Release,
                );
            }
        }
    });
    result
}

/// The physical baseline of a CPU fault: `npages` SIGSEGV + `mprotect` round trips on a private
/// PROT_NONE mapping (touch, trap, open the page, resume). Returns the total time.
pub fn segv_mprotect_roundtrip(npages: usize) -> SysResult<Duration> {
    install_trampoline()?;
    let len = npages.max(1) * PAGE_SIZE;
    let base = mman::map_anonymous(len, Prot::READ | Prot::WRITE, false)?;
    // Populate first so the measurement is the trap, not first-touch allocation.
    mman::populate(base, len, true)?;
    // SAFETY: `base` is our own fresh private mapping, referenced by nothing.
    unsafe { mman::protect(base, len, Prot::empty())? };
    BASELINE_START.store(base, Ordering::Release);
    BASELINE_END.store(base + len, Ordering::Release);
    let t = Instant::now();
    for p in 0..npages.max(1) {
        // SAFETY: a one-byte volatile load from our own mapping; the trampoline opens the page.
        unsafe { std::ptr::read_volatile((base + p * PAGE_SIZE) as *const u8) };
    }
    let dt = t.elapsed();
    BASELINE_START.store(0, Ordering::Release);
    BASELINE_END.store(0, Ordering::Release);
    // SAFETY: the mapping is ours and no longer used.
    unsafe { mman::unmap(base, len)? };
    Ok(dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    static TEST_PAGE: AtomicUsize = AtomicUsize::new(0);
    static HITS: AtomicUsize = AtomicUsize::new(0);

    fn test_handler(fi: &FaultInfo) -> bool {
        let p = TEST_PAGE.load(Ordering::Acquire);
        if p != 0 && fi.addr & !(PAGE_SIZE - 1) == p {
            HITS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the test's own page.
            return unsafe { mman::protect(p, PAGE_SIZE, Prot::READ | Prot::WRITE) }.is_ok();
        }
        false
    }

    #[test]
    fn handled_fault_resumes_the_access() {
        install_fault_handler(test_handler).unwrap();
        install_fault_handler(test_handler).unwrap();
        let p = mman::map_anonymous(PAGE_SIZE, Prot::empty(), false).unwrap();
        TEST_PAGE.store(p, Ordering::Release);
        // SAFETY: our own mapping; the handler opens it on the first access.
        unsafe { std::ptr::write_volatile(p as *mut u32, 42) };
        // SAFETY: as above.
        assert_eq!(unsafe { std::ptr::read_volatile(p as *const u32) }, 42);
        assert!(HITS.load(Ordering::Relaxed) >= 1);
        TEST_PAGE.store(0, Ordering::Release);
    }

    #[test]
    fn baseline_roundtrip_measures_something() {
        let d = segv_mprotect_roundtrip(16).unwrap();
        assert!(d > Duration::ZERO);
    }

    #[test]
    fn unhandled_fault_still_kills() {
        install_fault_handler(test_handler).unwrap();
        let p = mman::map_anonymous(PAGE_SIZE, Prot::empty(), false).unwrap();
        // SAFETY: fork in a test; the child only touches the page and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: deliberately faulting on our own PROT_NONE page.
            unsafe { std::ptr::read_volatile(p as *const u8) };
            // SAFETY: exiting the child without running destructors.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSIGNALED(status));
        assert_eq!(libc::WTERMSIG(status), libc::SIGSEGV);
    }
}
