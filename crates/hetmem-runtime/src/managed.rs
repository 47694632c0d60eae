//! Managed allocations and the CPU's views of them: ordinary slices over memory that kernels
//! reach by the same address.
//!
//! A view is a `&[T]` or `&mut [T]` straight over the managed mapping: the CPU reads and writes
//! it with plain loads and stores, and a page that lives on a device comes back on the CPU fault
//! (userfaultfd or SIGSEGV), invisibly. What Rust needs for such a slice is that nothing else
//! writes the memory while it lives. Devices write it only from kernels, so a view and a launch
//! exclude each other through the context's gate: opening a view waits for the launches in
//! flight, and a launch while a view is open is refused with a typed error rather than blocking
//! (the thread holding the view would wait for itself). Migrations and evictions move pages but
//! never change their bytes, so they run under views freely.

use std::marker::PhantomData;
use std::sync::Arc;

use hetmem::AddressSpace;
use hetmem_core::{PageRange, VirtAddr};
use parking_lot::{Condvar, Mutex};

use crate::RuntimeError;

/// Launches in flight and CPU views open, which exclude each other.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    views: usize,
    launches: usize,
}

impl Gate {
    /// Registers a launch; refused while a view is open.
    pub(crate) fn enter_launch(&self) -> Result<(), RuntimeError> {
        let mut s = self.state.lock();
        if s.views > 0 {
            return Err(RuntimeError::ViewsOpen { views: s.views });
        }
        s.launches += 1;
        Ok(())
    }

    /// A launch ended.
    pub(crate) fn leave_launch(&self) {
        let mut s = self.state.lock();
        s.launches -= 1;
        drop(s);
        self.changed.notify_all();
    }

    /// Waits for the launches in flight, then registers a view.
    fn enter_view(&self) {
        let mut s = self.state.lock();
        while s.launches > 0 {
            self.changed.wait(&mut s);
        }
        s.views += 1;
    }

    fn leave_view(&self) {
        self.state.lock().views -= 1;
        self.changed.notify_all();
    }

    /// Waits until no launch is in flight.
    pub(crate) fn quiesce(&self) {
        let mut s = self.state.lock();
        while s.launches > 0 {
            self.changed.wait(&mut s);
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Element types a view may have: plain numbers, for which every bit pattern is a value (managed
/// memory starts zeroed and kernels write arbitrary bytes).
pub trait Plain: sealed::Sealed + Copy + Send + Sync + 'static {}

macro_rules! plain {
    ($($t:ty)*) => {$(
        impl sealed::Sealed for $t {}
        impl Plain for $t {}
    )*};
}
plain!(u8 u16 u32 u64 i8 i16 i32 i64 f32 f64);

/// Memory shared by the CPU and the context's devices, unmapped when dropped.
#[derive(Debug)]
pub struct Managed {
    mm: &'static Arc<AddressSpace>,
    range: PageRange,
    len: u64,
    gate: Arc<Gate>,
}

impl Managed {
    pub(crate) fn new(
        mm: &'static Arc<AddressSpace>,
        range: PageRange,
        len: u64,
        gate: Arc<Gate>,
    ) -> Self {
        Managed {
            mm,
            range,
            len,
            gate,
        }
    }

    /// The address kernels use (the same the CPU uses).
    pub fn addr(&self) -> u64 {
        self.range.start().0
    }

    /// The address of byte `offset`.
    pub fn at(&self, offset: u64) -> VirtAddr {
        VirtAddr(self.range.start().0 + offset)
    }

    /// Bytes asked for.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: allocations are not empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pages of the allocation.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// A CPU view as `[T]` (whole elements of the allocation); waits for launches in flight.
    pub fn view<T: Plain>(&self) -> View<'_, T> {
        self.gate.enter_view();
        View {
            owner: self,
            _t: PhantomData,
        }
    }

    /// A CPU view as `mut [T]`; waits for launches in flight.
    pub fn view_mut<T: Plain>(&mut self) -> ViewMut<'_, T> {
        self.gate.enter_view();
        ViewMut {
            owner: self,
            _t: PhantomData,
        }
    }

    fn elems<T>(&self) -> usize {
        self.len as usize / std::mem::size_of::<T>()
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        // A kernel may still run on these pages: let it finish first.
        self.gate.quiesce();
        // SAFETY: this allocation owns the mapping (made for it by the context, never handed out
        // elsewhere); no view is alive (views borrow `self`), and no launch is in flight (waited
        // for above), so nothing refers to the memory any more.
        if let Err(e) = unsafe { self.mm.unmap(self.range) } {
            tracing::error!(range = ?self.range, error = %e, "unmapping managed memory failed");
        }
    }
}

/// A shared CPU view of a managed allocation.
#[derive(Debug)]
pub struct View<'a, T: Plain> {
    owner: &'a Managed,
    _t: PhantomData<&'a [T]>,
}

impl<T: Plain> std::ops::Deref for View<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let n = self.owner.elems::<T>();
        // SAFETY: the range is a live private anonymous mapping owned by `owner` (unmapped only
        // when it drops, which this borrow prevents), page-aligned hence aligned for any `Plain`
        // type, `n * size_of::<T>()` bytes long at most, and readable: a page held by a device
        // faults back transparently. Every bit pattern is a `T` (`Plain`). Nothing writes it
        // while the view lives: no launch runs (the gate), and CPU writers need `&mut Managed`.
        unsafe { std::slice::from_raw_parts(self.owner.addr() as *const T, n) }
    }
}

impl<T: Plain> Drop for View<'_, T> {
    fn drop(&mut self) {
        self.owner.gate.leave_view();
    }
}

/// An exclusive CPU view of a managed allocation.
#[derive(Debug)]
pub struct ViewMut<'a, T: Plain> {
    owner: &'a mut Managed,
    _t: PhantomData<&'a mut [T]>,
}

impl<T: Plain> std::ops::Deref for ViewMut<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let n = self.owner.elems::<T>();
        // SAFETY: as in `View::deref`; this view borrows the allocation exclusively.
        unsafe { std::slice::from_raw_parts(self.owner.addr() as *const T, n) }
    }
}

impl<T: Plain> std::ops::DerefMut for ViewMut<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let n = self.owner.elems::<T>();
        // SAFETY: as in `View::deref`, and the mapping is writable (mapped read-write by the
        // context); the view holds `&mut Managed`, so no other view of it exists, and no launch
        // runs while it lives (the gate).
        unsafe { std::slice::from_raw_parts_mut(self.owner.addr() as *mut T, n) }
    }
}

impl<T: Plain> Drop for ViewMut<'_, T> {
    fn drop(&mut self) {
        self.owner.gate.leave_view();
    }
}
