//! `pthread_atfork(3)` handlers: what runs in the forking thread before `fork()`, and after it in
//! the parent and in the child.
//!
//! The handlers are plain Rust functions, registered once per process; the C-ABI trampolines here
//! call them. They run in the forking thread (and in the child's only thread), not in a signal
//! handler, so they may take locks and allocate; the child handler runs before `fork()` returns
//! in the child, with every other thread gone.

use std::sync::OnceLock;

use crate::error::{SysError, SysResult};

/// The three handlers.
#[derive(Clone, Copy, Debug)]
pub struct ForkHandlers {
    /// Before `fork()`, in the forking thread.
    pub prepare: fn(),
    /// After `fork()`, in the parent.
    pub parent: fn(),
    /// After `fork()`, in the child.
    pub child: fn(),
}

static HANDLERS: OnceLock<ForkHandlers> = OnceLock::new();

extern "C" fn prepare() {
    if let Some(h) = HANDLERS.get() {
        (h.prepare)();
    }
}

extern "C" fn parent() {
    if let Some(h) = HANDLERS.get() {
        (h.parent)();
    }
}

extern "C" fn child() {
    if let Some(h) = HANDLERS.get() {
        (h.child)();
    }
}

/// Registers `handlers` with `pthread_atfork`. Only the first registration in a process takes
/// effect; later calls return `Ok` and change nothing.
pub fn register(handlers: ForkHandlers) -> SysResult<()> {
    if HANDLERS.set(handlers).is_err() {
        return Ok(());
    }
    // SAFETY: the three trampolines are `extern "C" fn()` items that live for the whole program;
    // they only read a `OnceLock` and call safe Rust functions.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        return Err(SysError::os(
            "pthread_atfork",
            rustix::io::Errno::from_raw_os_error(rc),
        ));
    }
    Ok(())
}
