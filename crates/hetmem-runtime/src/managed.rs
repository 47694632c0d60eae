//! Managed allocations, registered memory, and the CPU's views of them: ordinary slices over
//! memory that kernels reach by the same address.
//!
//! A view is a `&[T]` or `&mut [T]` straight over the managed mapping: the CPU reads and writes
//! it with plain loads and stores, and a page that lives on a device comes back on the CPU fault
//! (userfaultfd or SIGSEGV), invisibly. What Rust needs for such a slice is that nothing else
//! writes the memory while it lives. Devices write it only from kernels, so a view and a launch
//! exclude each other through the context's gate: opening a view waits for the launches in
//! flight, and a launch while a view is open is refused with a typed error rather than blocking
//! (the thread holding the view would wait for itself). Migrations and evictions move pages but
//! never change their bytes, so they run under views freely.
//!
//! Registered memory ([`Registered`]) is the program's own memory made managed
//! (`cudaHostRegister`, `hipHostRegister`, HMM's plain `malloc` memory): the registration takes
//! the buffer by value, so while it lasts nothing but its views reaches the bytes, and a
//! registration that is leaked keeps the buffer for ever rather than giving it back while devices
//! may still hold it. Unregistration (explicit, or on drop) closes the gate (no launch or
//! prefetch runs meanwhile), brings every page back to system memory with its data, and only
//! then hands the buffer back: the program reads the devices' writes through its own pointer.
//!
//! Releasing memory (dropping a [`Managed`], unregistering) and suspending close the gate: they
//! wait for the launches and prefetches in flight and hold new ones off until done, so neither
//! can move pages into a device between the pages coming home and the region going away. (Not
//! covered: a migration a device's policy queued during a launch that has since ended (the
//! stream detector's pages ahead, access-counter notifications), which the device's service
//! thread carries out on its own shortly after; `AddressSpace::unregister` and `unmap` do not
//! exclude it either.)
//! A thread that still holds an unwaited [`crate::LaunchHandle`] must wait for it before it
//! releases memory or opens a view: the gate would wait for it for ever.

use std::marker::PhantomData;
use std::sync::Arc;

use hetmem::AddressSpace;
use hetmem_core::{DeviceId, PageRange, VirtAddr, PAGE_SIZE};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::advice::AdviceMap;
use crate::stats::Counters;
use crate::RuntimeError;

/// Launches and prefetches in flight, CPU views open, and releases of memory under way: views
/// and launches exclude each other; a release (closing) waits for launches and prefetches and
/// holds new ones off.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    views: usize,
    launches: usize,
    prefetches: usize,
    closing: usize,
}

impl Gate {
    /// Registers a launch; refused while a view is open, held off while memory is released.
    pub(crate) fn enter_launch(&self) -> Result<(), RuntimeError> {
        let mut s = self.state.lock();
        loop {
            if s.views > 0 {
                return Err(RuntimeError::ViewsOpen { views: s.views });
            }
            if s.closing == 0 {
                break;
            }
            self.changed.wait(&mut s);
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

    /// Registers a prefetch (held off while memory is released) until the ticket drops.
    pub(crate) fn enter_prefetch(self: &Arc<Self>) -> PrefetchTicket {
        let mut s = self.state.lock();
        while s.closing > 0 {
            self.changed.wait(&mut s);
        }
        s.prefetches += 1;
        PrefetchTicket {
            gate: Arc::clone(self),
        }
    }

    /// Waits for the launches and prefetches in flight and holds new ones off until the guard
    /// drops (views may open meanwhile: they move nothing).
    pub(crate) fn close(&self) -> Closed<'_> {
        let mut s = self.state.lock();
        s.closing += 1;
        while s.launches > 0 || s.prefetches > 0 {
            self.changed.wait(&mut s);
        }
        Closed { gate: self }
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
}

/// A prefetch in flight ([`Gate::enter_prefetch`]).
#[derive(Debug)]
pub(crate) struct PrefetchTicket {
    gate: Arc<Gate>,
}

impl Drop for PrefetchTicket {
    fn drop(&mut self) {
        self.gate.state.lock().prefetches -= 1;
        self.gate.changed.notify_all();
    }
}

/// The gate closed for a release or a suspend ([`Gate::close`]).
#[derive(Debug)]
pub(crate) struct Closed<'a> {
    gate: &'a Gate,
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.gate.state.lock().closing -= 1;
        self.gate.changed.notify_all();
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
plain!(u8 u16 u32 u64 i8 i16 i32 i64 f32 f64 Page);

/// One page of bytes, page aligned: a `Vec<Page>` is memory [`crate::Context::register`]
/// accepts as it is (a `Vec` of numbers is aligned only as its numbers are, so its first page is
/// shared with whatever the allocator put before it).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE_SIZE as usize]);

const _: () = assert!(
    std::mem::size_of::<Page>() as u64 == PAGE_SIZE
        && std::mem::align_of::<Page>() as u64 == PAGE_SIZE
);

impl Page {
    /// A page of zeros.
    pub const ZERO: Page = Page([0; PAGE_SIZE as usize]);
}

impl Default for Page {
    fn default() -> Self {
        Page::ZERO
    }
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Page").field(&&self.0[..8]).finish()
    }
}

/// Memory shared by the CPU and the context's devices, unmapped when dropped.
#[derive(Debug)]
pub struct Managed {
    mm: &'static Arc<AddressSpace>,
    range: PageRange,
    len: u64,
    gate: Arc<Gate>,
    advice: Arc<RwLock<AdviceMap>>,
}

impl Managed {
    pub(crate) fn new(
        mm: &'static Arc<AddressSpace>,
        range: PageRange,
        len: u64,
        gate: Arc<Gate>,
        advice: Arc<RwLock<AdviceMap>>,
    ) -> Self {
        Managed {
            mm,
            range,
            len,
            gate,
            advice,
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
        View::new(&self.gate, self.addr(), elems::<T>(self.len))
    }

    /// A CPU view as `mut [T]`; waits for launches in flight.
    pub fn view_mut<T: Plain>(&mut self) -> ViewMut<'_, T> {
        ViewMut::new(&self.gate, self.addr(), elems::<T>(self.len))
    }
}

/// Whole `T`s in `bytes`.
fn elems<T>(bytes: u64) -> usize {
    bytes as usize / std::mem::size_of::<T>()
}

impl Drop for Managed {
    fn drop(&mut self) {
        // A kernel or a prefetch may still run on these pages: let it finish, and start no other
        // until the memory is gone.
        let _closed = self.gate.close();
        // The advice goes with the memory (not after: the range is ours until unmapped, and a
        // new allocation may be given the same addresses at once).
        self.advice.write().clear(self.range);
        // SAFETY: this allocation owns the mapping (made for it by the context, never handed out
        // elsewhere); no view is alive (views borrow `self`), and no launch or prefetch is in
        // flight (waited for above, and held off until the unmap is done), so nothing refers to
        // the memory any more.
        if let Err(e) = unsafe { self.mm.unmap(self.range) } {
            tracing::error!(range = ?self.range, error = %e, "unmapping managed memory failed");
        }
    }
}

/// The program's own memory, registered with a context ([`crate::Context::register`]): kernels
/// reach it by its address, the CPU through views, until it is unregistered and the buffer comes
/// back with every byte in system memory.
pub struct Registered<T: Plain> {
    mm: &'static Arc<AddressSpace>,
    range: PageRange,
    /// The buffer, until it is handed back. Its bytes are reached only through views while it
    /// is registered (never through the `Vec`: no reference to them is made here).
    buf: Option<Vec<T>>,
    gate: Arc<Gate>,
    advice: Arc<RwLock<AdviceMap>>,
    counters: Arc<Counters>,
    /// The context's devices, whose pages come home first (counted per device).
    devices: Vec<DeviceId>,
}

/// The parts of a context a registration needs.
pub(crate) struct RegistrationParts {
    pub(crate) mm: &'static Arc<AddressSpace>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) advice: Arc<RwLock<AdviceMap>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) devices: Vec<DeviceId>,
}

impl<T: Plain> std::fmt::Debug for Registered<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the contents: reading them here would race with kernels.
        f.debug_struct("Registered")
            .field("range", &self.range)
            .field("elements", &self.buf.as_ref().map_or(0, Vec::len))
            .finish_non_exhaustive()
    }
}

impl<T: Plain> Registered<T> {
    /// `buf`, registered over `range` (its exact bytes) by the caller.
    pub(crate) fn new(parts: RegistrationParts, range: PageRange, buf: Vec<T>) -> Self {
        Registered {
            mm: parts.mm,
            range,
            buf: Some(buf),
            gate: parts.gate,
            advice: parts.advice,
            counters: parts.counters,
            devices: parts.devices,
        }
    }

    /// The address kernels use (the buffer's own).
    pub fn addr(&self) -> u64 {
        self.range.start().0
    }

    /// The address of byte `offset`.
    pub fn at(&self, offset: u64) -> VirtAddr {
        VirtAddr(self.range.start().0 + offset)
    }

    /// Bytes registered (the whole buffer).
    pub fn len(&self) -> u64 {
        self.range.len_bytes()
    }

    /// Never true: empty buffers are refused.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The pages registered.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// A CPU view as `[U]`; waits for launches in flight.
    pub fn view<U: Plain>(&self) -> View<'_, U> {
        View::new(&self.gate, self.addr(), elems::<U>(self.len()))
    }

    /// A CPU view as `mut [U]`; waits for launches in flight.
    pub fn view_mut<U: Plain>(&mut self) -> ViewMut<'_, U> {
        ViewMut::new(&self.gate, self.addr(), elems::<U>(self.len()))
    }

    /// Ends the registration: waits for launches and prefetches in flight, brings every page
    /// back to system memory with its data, stops managing the range (devices lose their
    /// mappings: a kernel that reaches it afterwards fails) and hands the buffer back. On failure
    /// the memory stays registered and comes back inside the error.
    pub fn unregister(mut self) -> Result<Vec<T>, UnregisterError<T>> {
        match self.release() {
            Ok(()) => Ok(self.buf.take().expect("registered until released")),
            Err(error) => Err(UnregisterError {
                error,
                registered: Box::new(self),
            }),
        }
    }

    fn release(&mut self) -> Result<(), RuntimeError> {
        let _closed = self.gate.close();
        // The context's devices first, so that what each gives back is counted as its own;
        // `unregister` brings home whatever else is left (other contexts' devices).
        for &dev in &self.devices {
            let pages = self.mm.evict_range(self.range, Some(dev))?;
            self.counters.device(dev).add_to_system(pages);
        }
        self.mm.unregister(self.range)?;
        self.advice.write().clear(self.range);
        Ok(())
    }
}

impl<T: Plain> Drop for Registered<T> {
    fn drop(&mut self) {
        if self.buf.is_none() {
            return;
        }
        if let Err(e) = self.release() {
            // The pages may still be on a device and the range still managed: the buffer must
            // not go back to the allocator, which would hand the memory to someone else.
            tracing::error!(range = ?self.range, error = %e, "unregistering failed: buffer leaked");
            std::mem::forget(self.buf.take());
        }
    }
}

/// [`crate::Context::register`] refused a buffer: why, and the buffer, untouched.
pub struct RegisterError<T> {
    /// Why.
    pub error: RuntimeError,
    /// The buffer.
    pub buffer: Vec<T>,
}

/// [`Registered::unregister`] failed: why, and the registration, still in force (dropping it
/// tries again).
pub struct UnregisterError<T: Plain> {
    /// Why.
    pub error: RuntimeError,
    /// The registration.
    pub registered: Box<Registered<T>>,
}

impl<T> std::fmt::Debug for RegisterError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterError")
            .field("error", &self.error)
            .field("elements", &self.buffer.len())
            .finish()
    }
}

impl<T> std::fmt::Display for RegisterError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "registration refused: {}", self.error)
    }
}

impl<T> std::error::Error for RegisterError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<T> From<RegisterError<T>> for RuntimeError {
    fn from(e: RegisterError<T>) -> Self {
        e.error
    }
}

impl<T: Plain> std::fmt::Debug for UnregisterError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnregisterError")
            .field("error", &self.error)
            .field("registered", &self.registered)
            .finish()
    }
}

impl<T: Plain> std::fmt::Display for UnregisterError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unregistering {:?} failed: {}",
            self.registered.range, self.error
        )
    }
}

impl<T: Plain> std::error::Error for UnregisterError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<T: Plain> From<UnregisterError<T>> for RuntimeError {
    fn from(e: UnregisterError<T>) -> Self {
        // The registration inside drops here: it tries once more, and leaks the buffer if it
        // fails again.
        let UnregisterError { error, registered } = e;
        drop(registered);
        error
    }
}

/// A shared CPU view of managed memory (an allocation or a registered buffer).
#[derive(Debug)]
pub struct View<'a, T: Plain> {
    gate: &'a Gate,
    addr: u64,
    len: usize,
    _t: PhantomData<&'a [T]>,
}

impl<'a, T: Plain> View<'a, T> {
    /// Opens a view of `len` elements at `addr`, memory of a [`Managed`] or [`Registered`] that
    /// the caller borrows for `'a`; waits for launches in flight.
    fn new(gate: &'a Gate, addr: u64, len: usize) -> Self {
        gate.enter_view();
        View {
            gate,
            addr,
            len,
            _t: PhantomData,
        }
    }
}

impl<T: Plain> std::ops::Deref for View<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `[addr, addr + len * size_of::<T>())` is memory owned by the `Managed` (a live
        // private anonymous mapping, unmapped only when it drops) or the `Registered` (its
        // buffer, handed back only when it is consumed) that this view borrows for its lifetime;
        // page aligned, hence aligned for any `Plain` type; readable: a page held by a device
        // faults back transparently. Every bit pattern is a `T` (`Plain`). Nothing writes it
        // while the view lives: no launch runs (the gate), and CPU writers need the owner `&mut`.
        unsafe { std::slice::from_raw_parts(self.addr as *const T, self.len) }
    }
}

impl<T: Plain> Drop for View<'_, T> {
    fn drop(&mut self) {
        self.gate.leave_view();
    }
}

/// An exclusive CPU view of managed memory (an allocation or a registered buffer).
#[derive(Debug)]
pub struct ViewMut<'a, T: Plain> {
    gate: &'a Gate,
    addr: u64,
    len: usize,
    _t: PhantomData<&'a mut [T]>,
}

impl<'a, T: Plain> ViewMut<'a, T> {
    /// Opens a view of `len` elements at `addr`, memory of a [`Managed`] or [`Registered`] that
    /// the caller borrows mutably for `'a`; waits for launches in flight.
    fn new(gate: &'a Gate, addr: u64, len: usize) -> Self {
        gate.enter_view();
        ViewMut {
            gate,
            addr,
            len,
            _t: PhantomData,
        }
    }
}

impl<T: Plain> std::ops::Deref for ViewMut<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: as in `View::deref`; this view borrows its owner exclusively.
        unsafe { std::slice::from_raw_parts(self.addr as *const T, self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for ViewMut<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `View::deref`, and the memory is writable (a managed allocation is mapped
        // read-write by the context; a registered buffer is a `Vec` the registration owns); the
        // view was made from `&mut` of its owner, so no other view of it exists, and no launch
        // runs while it lives (the gate).
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut T, self.len) }
    }
}

impl<T: Plain> Drop for ViewMut<'_, T> {
    fn drop(&mut self) {
        self.gate.leave_view();
    }
}
