//! Copy engines: asynchronous queues of copy requests, split into bounded windows, each batch
//! completed by a [`Fence`] (seed 003: AMD SVM's SDMA copies through 256 MiB GART windows and
//! `dma_fence`; DESIGN.md "SDMA + GART window, `dma_fence` → copy engine").
//!
//! A [`CopyEngine`] owns N queues (two by default, one per direction, like the SDMA engines a
//! GPU dedicates to each way), each served by one worker thread. [`CopyEngine::submit`] takes a
//! [`CopyBatch`] (runs of bytes to copy, [`CopyRequest`]), returns a [`Fence`] at once, and the
//! queue's worker splits every request into [`CopyWindow`]s of at most
//! [`CopyEngineConfig::window_bytes`] and hands them, in order, to the [`CopyBackend`], which
//! performs one bounded copy (the simulated device: a `memcpy` through its arena and
//! `process_vm_*` calls). Each window is charged to the shared [`DeviceClock`] at the
//! [`LinkModel`]'s transfer time. When every window of the batch has run (or failed, or was
//! cancelled) the fence signals with a [`CopyReport`] that says, request by request, what was
//! copied; then the batch's [`Release`] payloads run.
//!
//! ```text
//!   migration k    collect ─ submit ─┐                                  wait ─ finalize
//!                                    v                                   ^
//!   queue (H2D)          [ w0 | w1 | w2 ]  (windows of <= window_bytes)  │ fence k
//!                                    └──────────────────────────────────-┘   then release k
//!   migration k+1           collect ─ submit ─┐    (collecting k+1 overlaps the copy of k)
//!                                             v
//!   queue (H2D)                         [ w0 | w1 ] ──> fence k+1 (signals after fence k)
//! ```
//!
//! This is seed 003's two-phase commit (`svm_migrate_ram_to_vram`): the copy is submitted
//! (`svm_migrate_copy_to_vram` returns an `mfence`), the page tables are updated
//! (`migrate_vma_pages`), and only then does the driver wait on the fence
//! (`svm_migrate_copy_done`) before `migrate_vma_finalize` releases what the copy read.
//!
//! Neighbours: [`crate::link`] (the [`LinkModel`] and [`DeviceClock`] each window is charged to,
//! as [`Cause::MigrateToDevice`] / [`Cause::MigrateToHost`]); the migration engine
//! (`crates/hetmem/src/migrate.rs`), which will submit the copy of a collected migration,
//! overlap it with collecting the next, and wait on the fence before it finalises; the simulated
//! device (`crates/hetmem-sim`), which implements [`CopyBackend`] with real copies and
//! [`FrameSink`] with its [`crate::pool::DevicePool`].
//!
//! Invariants defended:
//!
//! * DESIGN.md 3 (nothing lost): a page is never freed while an in-flight copy refers to it.
//!   Frames and other resources a batch reads or writes travel with the batch as [`Release`]
//!   payloads, which run only after its fence has signalled, never before; a frame whose copy did
//!   not complete can be kept ([`ReleaseWhen::Done`]) so that a page that could not move stays
//!   valid where it was. A failed window fails exactly its request, reported with the byte offset
//!   where the copy stopped, so the migration rolls back exactly those pages.
//! * DESIGN.md 4 (progress): every fence signals. Dropping the engine cancels queued work,
//!   signals every outstanding fence with [`CopyError::Cancelled`] and joins the workers; a
//!   backend that panics fails its window instead of killing the queue; a wait that could never
//!   finish (on the queue's own worker) is refused with [`CopyError::WouldDeadlock`].
//! * Order: fences of one queue signal in submission order, and a batch's releases have run
//!   before the next batch of the same queue starts.
//!
//! Seed 003's pitfalls ("⚠️ 常见陷阱") and what answers them here:
//!
//! 1. "忘记等待SDMA完成" (forgetting to wait for the SDMA copy): [`Fence`] is `#[must_use]`, and
//!    whatever the copy reads is released by the engine after the fence, not by the caller, so
//!    forgetting to wait cannot free a frame under a copy.
//! 2. "大范围迁移不分批" (not splitting a large migration): every request is cut into windows of
//!    at most `window_bytes` (256 MiB, `AMDGPU_GTT_MAX_TRANSFER_SIZE`, by default). A window is
//!    also the unit of cancellation, as the GART window bounds how long `gtt_window_lock` is held
//!    so "other operations can interleave": shutdown stops at the next window boundary.
//! 3. "假设所有页面都能迁移" (assuming every page migrates): the fence reports a per-request
//!    [`RequestOutcome`] (done, failed at offset, cancelled at offset); partial success is the
//!    normal case, not an error. Fault injection ([`FaultPlan`]) lets tests exercise it.
//! 4. "在中断上下文调用迁移" (migrating in interrupt context, where one cannot sleep): waiting is
//!    blocking and must happen in a context that can wait; the copy workers are not one, and a
//!    wait there on their own queue returns [`CopyError::WouldDeadlock`] instead of hanging.
//!
//! Lock order: every lock here is a leaf (a queue's state, a queue's counters, the fault plan, a
//! fence's slot). None is held while another is taken, and no backend, sink or callback code
//! runs under any of them.
//!
//! ```
//! use std::sync::Arc;
//! use hetmem_core::copy_engine::{
//!     CopyBackend, CopyBatch, CopyEngine, CopyEngineConfig, CopyFault, CopyRequest, CopyWindow,
//!     Endpoint,
//! };
//! use hetmem_core::link::DeviceClock;
//! use hetmem_core::{DevPfn, DeviceId, VirtAddr};
//!
//! struct Nothing;
//! impl CopyBackend for Nothing {
//!     fn copy(&self, _: &CopyWindow) -> Result<(), CopyFault> {
//!         Ok(())
//!     }
//! }
//!
//! let engine =
//!     CopyEngine::new(CopyEngineConfig::default(), Arc::new(Nothing), Arc::new(DeviceClock::new()))
//!         .unwrap();
//! let batch = CopyBatch::new().with_request(CopyRequest::new(
//!     Endpoint::System(VirtAddr(0x10000)),
//!     Endpoint::Device { dev: DeviceId(0), frame: DevPfn(3) },
//!     8192,
//! ));
//! let fence = engine.submit(batch).unwrap();
//! // ... collect the next migration here, while this one copies ...
//! let report = fence.wait().unwrap();
//! assert!(report.is_complete());
//! ```

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::num::NonZeroU64;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::addr::{DevPfn, DeviceId, VirtAddr, PAGE_SIZE};
use crate::link::{Bandwidth, Cause, DeviceClock, Direction, LinkError, LinkModel, ModelTime};

/// Default window: AMD's `AMDGPU_GTT_MAX_TRANSFER_SIZE`, the GART window an SDMA copy of system
/// memory goes through (seed 003 §7.5.1, "GART窗口有限(通常256MB)").
pub const DEFAULT_WINDOW_BYTES: u64 = 256 << 20;

/// Default number of queues: one per direction, as SDMA engines are used.
pub const DEFAULT_QUEUES: usize = 2;

/// Most queues an engine may have.
pub const MAX_QUEUES: usize = 64;

/// Default bound on batches waiting on one queue before [`CopyEngine::submit`] answers
/// [`CopyError::QueueFull`].
pub const DEFAULT_MAX_QUEUED_BATCHES: usize = 1024;

// ---------------------------------------------------------------------------------------------
// Endpoints, requests, windows
// ---------------------------------------------------------------------------------------------

/// One end of a copy: where a run of bytes starts.
///
/// A run on a device is contiguous in the device's memory: it starts at `frame` and continues
/// through the following frames (byte `o` of the run is device byte `frame × PAGE_SIZE + o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// System memory of this process, at a virtual address.
    System(VirtAddr),
    /// Device memory, from the start of a frame of a device's pool.
    Device {
        /// The device.
        dev: DeviceId,
        /// The first frame of the run.
        frame: DevPfn,
    },
}

/// An address space a copy reads or writes: system memory, or one device's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// System memory (virtual addresses of this process).
    System,
    /// One device's memory (byte offsets into its pool).
    Device(DeviceId),
}

impl Endpoint {
    /// The address space it lies in.
    pub fn space(self) -> Space {
        match self {
            Endpoint::System(_) => Space::System,
            Endpoint::Device { dev, .. } => Space::Device(dev),
        }
    }

    /// Its first byte, as an address in its space: the virtual address, or
    /// `frame × PAGE_SIZE` in the device's memory.
    pub fn base(self) -> u64 {
        match self {
            Endpoint::System(va) => va.0,
            Endpoint::Device { frame, .. } => u64::from(frame.0) * PAGE_SIZE,
        }
    }
}

/// What a copy crosses, from its endpoints. Decides the link direction charged and the clock
/// cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyDirection {
    /// System → device: over the link, [`Direction::HostToDevice`], [`Cause::MigrateToDevice`].
    HostToDevice,
    /// Device → system: over the link, [`Direction::DeviceToHost`], [`Cause::MigrateToHost`].
    DeviceToHost,
    /// Within one device's memory: free, or [`CopyEngineConfig::local_bandwidth`] charged to
    /// [`Cause::MigrateToDevice`].
    DeviceLocal,
    /// Device → another device: staged through system memory (no peer-to-peer link is
    /// modelled), charged as a device → host transfer plus a host → device one.
    PeerToPeer,
    /// System → system: a host `memcpy`, not charged (its cost is wall time).
    HostLocal,
}

impl CopyDirection {
    /// Number of directions.
    pub const COUNT: usize = 5;
    /// Every direction, in index order.
    pub const ALL: [CopyDirection; CopyDirection::COUNT] = [
        CopyDirection::HostToDevice,
        CopyDirection::DeviceToHost,
        CopyDirection::DeviceLocal,
        CopyDirection::PeerToPeer,
        CopyDirection::HostLocal,
    ];

    /// The direction of a copy from `src` to `dst`.
    pub fn of(src: Endpoint, dst: Endpoint) -> Self {
        match (src.space(), dst.space()) {
            (Space::System, Space::Device(_)) => CopyDirection::HostToDevice,
            (Space::Device(_), Space::System) => CopyDirection::DeviceToHost,
            (Space::Device(a), Space::Device(b)) if a == b => CopyDirection::DeviceLocal,
            (Space::Device(_), Space::Device(_)) => CopyDirection::PeerToPeer,
            (Space::System, Space::System) => CopyDirection::HostLocal,
        }
    }

    /// Dense index, `0..COUNT`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            CopyDirection::HostToDevice => "host-to-device",
            CopyDirection::DeviceToHost => "device-to-host",
            CopyDirection::DeviceLocal => "device-local",
            CopyDirection::PeerToPeer => "peer-to-peer",
            CopyDirection::HostLocal => "host-local",
        }
    }
}

impl fmt::Display for CopyDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One copy request: `len` bytes from `src` to `dst` (a run of pages, typically: one contiguous
/// piece of a migration). Validated when its batch is submitted ([`CopyRequest::validate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CopyRequest {
    /// Where the bytes are.
    pub src: Endpoint,
    /// Where they go.
    pub dst: Endpoint,
    /// How many bytes.
    pub len: u64,
}

impl CopyRequest {
    /// `len` bytes from `src` to `dst`.
    pub fn new(src: Endpoint, dst: Endpoint, len: u64) -> Self {
        CopyRequest { src, dst, len }
    }

    /// `npages` base pages from `src` to `dst` (a length that overflows is refused at submit).
    pub fn pages(src: Endpoint, dst: Endpoint, npages: u64) -> Self {
        CopyRequest::new(src, dst, npages.saturating_mul(PAGE_SIZE))
    }

    /// Which way it goes.
    pub fn direction(&self) -> CopyDirection {
        CopyDirection::of(self.src, self.dst)
    }

    /// Checks it as request `index` of a batch: non-empty, neither end wraps around its address
    /// space, and source and destination do not overlap (a window-by-window copy of overlapping
    /// ranges would read bytes it already overwrote).
    pub fn validate(&self, index: usize) -> Result<(), CopyError> {
        if self.len == 0 {
            return Err(CopyError::ZeroLength { request: index });
        }
        let (s, d) = (self.src.base(), self.dst.base());
        let (Some(s_end), Some(d_end)) = (s.checked_add(self.len), d.checked_add(self.len)) else {
            return Err(CopyError::Overflow {
                request: index,
                len: self.len,
            });
        };
        if self.src.space() == self.dst.space() && s < d_end && d < s_end {
            return Err(CopyError::Overlap { request: index });
        }
        Ok(())
    }

    /// The windows it is split into, as `(offset, len)` pairs: consecutive, in order, each at
    /// most `window_bytes` long, together covering `[0, self.len)` exactly once.
    pub fn split(&self, window_bytes: NonZeroU64) -> impl Iterator<Item = (u64, u64)> {
        let (total, w) = (self.len, window_bytes.get());
        let mut at = 0u64;
        std::iter::from_fn(move || {
            if at >= total {
                return None;
            }
            let len = w.min(total - at);
            let window = (at, len);
            at += len;
            Some(window)
        })
    }

    /// How many windows of `window_bytes` it is split into.
    pub fn windows(&self, window_bytes: NonZeroU64) -> u64 {
        self.len.div_ceil(window_bytes.get())
    }
}

/// One bounded copy, as handed to the [`CopyBackend`]: bytes `[offset, offset + len)` of request
/// `request` of the batch whose fence is (`queue`, `seqno`). `len` never exceeds the engine's
/// window size, and never is zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CopyWindow {
    /// The queue running it.
    pub queue: QueueId,
    /// Sequence number of its batch's fence on that queue.
    pub seqno: u64,
    /// Index of its request in the batch.
    pub request: usize,
    /// The request's source (the start of the run, not of this window).
    pub src: Endpoint,
    /// The request's destination (the start of the run, not of this window).
    pub dst: Endpoint,
    /// Offset of this window inside the request.
    pub offset: u64,
    /// Bytes in this window.
    pub len: u64,
}

impl CopyWindow {
    /// Which way it goes.
    pub fn direction(&self) -> CopyDirection {
        CopyDirection::of(self.src, self.dst)
    }
    /// Address of its first source byte in the source's [`Space`] (`src.base() + offset`; the
    /// sum was checked at submit).
    pub fn src_addr(&self) -> u64 {
        self.src.base() + self.offset
    }
    /// Address of its first destination byte in the destination's [`Space`].
    pub fn dst_addr(&self) -> u64 {
        self.dst.base() + self.offset
    }
}

// ---------------------------------------------------------------------------------------------
// Consumer-side traits
// ---------------------------------------------------------------------------------------------

/// Performs one bounded copy (the SDMA engine's `amdgpu_copy_buffer` on one GART window). Called
/// from the engine's worker threads, one window at a time per queue, concurrently across queues.
/// An implementation must not wait on a [`Fence`] of the engine that calls it.
pub trait CopyBackend: Send + Sync {
    /// Copies `window.len` bytes from `window.src` + `window.offset` to `window.dst` +
    /// `window.offset`. An error fails the window's request (the rest of that request is not
    /// attempted); the bytes of this window may be partly written.
    fn copy(&self, window: &CopyWindow) -> Result<(), CopyFault>;
}

/// Takes device frames back once no copy refers to them any more (the device pool's free).
pub trait FrameSink: Send + Sync {
    /// Frees `frames` of device `dev`. Called after the fence of the batch that carried them has
    /// signalled, from the engine's worker thread (or the thread dropping the engine).
    fn release_frames(&self, dev: DeviceId, frames: &[DevPfn]);
}

// ---------------------------------------------------------------------------------------------
// Errors and outcomes
// ---------------------------------------------------------------------------------------------

/// Why one window failed: returned by a [`CopyBackend`], or made by the engine (injection, panic).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CopyFault {
    /// System memory could not be read or written (unmapped under the copy: a racing `munmap`).
    #[error("system memory at {addr} ({len} bytes) is not accessible")]
    SystemAccess {
        /// First byte of the access that failed.
        addr: VirtAddr,
        /// Its length.
        len: u64,
    },
    /// A device access fell outside the device's memory.
    #[error("device {dev:?} memory at offset {offset:#x} ({len} bytes) is out of range")]
    DeviceAccess {
        /// The device.
        dev: DeviceId,
        /// Byte offset in its memory.
        offset: u64,
        /// Length of the access.
        len: u64,
    },
    /// The backend knows no such device.
    #[error("no device {dev:?}")]
    NoSuchDevice {
        /// The device.
        dev: DeviceId,
    },
    /// Failed on purpose by the engine's [`FaultPlan`]; the backend was not called.
    #[error("injected failure of window {window} on queue {queue}")]
    Injected {
        /// The queue.
        queue: QueueId,
        /// Index of the window among those the queue started since the plan was installed.
        window: u64,
    },
    /// The backend panicked; the engine caught it and failed the window.
    #[error("copy backend panicked: {message}")]
    BackendPanicked {
        /// The panic's message, if it had one.
        message: String,
    },
}

/// Errors of the copy engine: bad configuration, bad input, busy queues, cancelled fences.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CopyError {
    /// [`CopyEngineConfig::window_bytes`] is zero.
    #[error("window size must be positive")]
    ZeroWindow,
    /// [`CopyEngineConfig::queues`] is zero or above [`MAX_QUEUES`].
    #[error("an engine has 1..={max} queues, {queues} asked for", max = MAX_QUEUES)]
    InvalidQueueCount {
        /// The number asked for.
        queues: usize,
    },
    /// [`CopyEngineConfig::max_queued_batches`] is zero.
    #[error("a queue must hold at least one batch")]
    ZeroQueueDepth,
    /// The link model is invalid.
    #[error("invalid link model: {0}")]
    InvalidLink(#[from] LinkError),
    /// [`CopyEngineConfig::local_bandwidth`] is zero, negative or NaN.
    #[error("local copy bandwidth must be positive, got {bytes_per_sec} B/s")]
    InvalidLocalBandwidth {
        /// The value given.
        bytes_per_sec: f64,
    },
    /// A [`FaultPlan::Fraction`] above one million per million.
    #[error("fault fraction {per_million} per million exceeds one")]
    InvalidFaultFraction {
        /// The value given.
        per_million: u32,
    },
    /// A worker thread could not be started.
    #[error("cannot start copy worker: {message}")]
    Spawn {
        /// The OS's reason.
        message: String,
    },
    /// A request of zero bytes.
    #[error("request {request} copies zero bytes")]
    ZeroLength {
        /// Index of the request in its batch.
        request: usize,
    },
    /// A request whose source or destination wraps around its address space.
    #[error("request {request} of {len} bytes wraps around its address space")]
    Overflow {
        /// Index of the request in its batch.
        request: usize,
        /// Its length.
        len: u64,
    },
    /// A request whose source and destination overlap.
    #[error("request {request} has overlapping source and destination")]
    Overlap {
        /// Index of the request in its batch.
        request: usize,
    },
    /// A queue (of a batch, or of a fault plan) the engine does not have.
    #[error("no queue {queue} (the engine has {queues})")]
    NoSuchQueue {
        /// The queue named.
        queue: QueueId,
        /// How many the engine has.
        queues: usize,
    },
    /// A [`ReleaseWhen`] names a request the batch does not have.
    #[error("release names request {request}, the batch has {requests}")]
    ReleaseOutOfRange {
        /// The request named.
        request: usize,
        /// Requests in the batch.
        requests: usize,
    },
    /// A batch releases frames but the engine was built without a [`FrameSink`].
    #[error("batch releases frames but the engine has no frame sink")]
    NoFrameSink,
    /// Busy, retry: the queue already holds its maximum of batches. Wait on an earlier fence.
    #[error("copy queue {queue} is full ({depth} batches waiting)")]
    QueueFull {
        /// The queue.
        queue: QueueId,
        /// Batches waiting on it.
        depth: usize,
    },
    /// The engine shut down before the batch finished: what ran is in the report, every request
    /// not finished is [`RequestOutcome::Cancelled`].
    #[error("copy batch {} on queue {} cancelled by engine shutdown", report.seqno, report.queue)]
    Cancelled {
        /// What was copied before the cancellation.
        report: CopyReport,
    },
    /// A wait on a fence from the worker thread of the queue that must signal it (a backend,
    /// sink or release callback waiting on its own queue): it could never finish.
    #[error("waiting on queue {queue}'s fence from its own worker would deadlock")]
    WouldDeadlock {
        /// The queue.
        queue: QueueId,
    },
}

/// What happened to one request of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Every byte was copied.
    Done,
    /// The window at `offset` failed: bytes `[0, offset)` were copied, the window's bytes may be
    /// partly written, and no later window of the request was attempted.
    Failed {
        /// Offset of the failed window in the request.
        offset: u64,
        /// Why it failed.
        fault: CopyFault,
    },
    /// The engine shut down: bytes `[0, offset)` were copied, nothing from `offset` on.
    Cancelled {
        /// Offset of the first window not run.
        offset: u64,
    },
}

impl RequestOutcome {
    /// Was every byte copied?
    pub fn is_done(&self) -> bool {
        matches!(self, RequestOutcome::Done)
    }

    /// How many leading bytes of a request of `len` bytes are known to be copied: all of them,
    /// or those before the window that failed or was cancelled. With whole-page windows, the
    /// pages of this prefix hold their new data even though the request did not complete.
    pub fn copied_bytes(&self, len: u64) -> u64 {
        match self {
            RequestOutcome::Done => len,
            RequestOutcome::Failed { offset, .. } | RequestOutcome::Cancelled { offset } => {
                (*offset).min(len)
            }
        }
    }
}

/// The result of a batch, request by request (partial success is a per-request report, STYLE.md
/// rule 6; the migration maps requests back to pages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyReport {
    /// The queue that ran it.
    pub queue: QueueId,
    /// Its fence's sequence number.
    pub seqno: u64,
    /// One outcome per request, in batch order.
    pub outcomes: Vec<RequestOutcome>,
    /// Bytes copied by windows that succeeded.
    pub bytes: u64,
    /// Windows that succeeded.
    pub windows: u64,
    /// Modelled time charged to the clock for them.
    pub modelled: ModelTime,
}

impl CopyReport {
    /// Did every request complete?
    pub fn is_complete(&self) -> bool {
        self.outcomes.iter().all(RequestOutcome::is_done)
    }
    /// Outcome of request `i`.
    pub fn outcome(&self, i: usize) -> Option<&RequestOutcome> {
        self.outcomes.get(i)
    }
    /// Indices of the requests that completed.
    pub fn done(&self) -> impl Iterator<Item = usize> + '_ {
        self.indices(|o| o.is_done())
    }
    /// Indices of the requests that did not complete (failed or cancelled): the pages to roll back.
    pub fn not_done(&self) -> impl Iterator<Item = usize> + '_ {
        self.indices(|o| !o.is_done())
    }
    /// Indices of the requests whose window failed.
    pub fn failed(&self) -> impl Iterator<Item = usize> + '_ {
        self.indices(|o| matches!(o, RequestOutcome::Failed { .. }))
    }

    fn indices(
        &self,
        pick: impl Fn(&RequestOutcome) -> bool + 'static,
    ) -> impl Iterator<Item = usize> + '_ {
        self.outcomes
            .iter()
            .enumerate()
            .filter(move |(_, o)| pick(o))
            .map(|(i, _)| i)
    }
}

/// What a fence reports: the batch's report, or why there is no complete one.
pub type FenceResult = Result<CopyReport, CopyError>;

/// The report inside a fence's result, whether it ran to the end or was cancelled.
fn report_of(result: &FenceResult) -> Option<&CopyReport> {
    match result {
        Ok(report) | Err(CopyError::Cancelled { report }) => Some(report),
        Err(_) => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Batches and deferred release
// ---------------------------------------------------------------------------------------------

/// A queue of an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(pub usize);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// When a [`Release::Frames`] payload frees its frames, decided after the fence signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReleaseWhen {
    /// Whatever happened (a staging buffer).
    Always,
    /// Only if request `i` completed: the source frames of an eviction are freed once their data
    /// is in system memory, and kept (the page stays valid on the device) otherwise.
    Done(usize),
    /// Only if request `i` did not complete: the destination frames of a migration to the device
    /// that must roll back.
    NotDone(usize),
}

impl ReleaseWhen {
    fn applies(self, result: &FenceResult) -> bool {
        let done = |i: usize| {
            report_of(result)
                .and_then(|r| r.outcome(i))
                .is_some_and(RequestOutcome::is_done)
        };
        match self {
            ReleaseWhen::Always => true,
            ReleaseWhen::Done(i) => done(i),
            ReleaseWhen::NotDone(i) => !done(i),
        }
    }
}

/// A callback run after a fence signalled, with its result.
pub type ReleaseFn = Box<dyn FnOnce(&FenceResult) + Send + 'static>;

/// Something a batch holds until its copy is over (STYLE.md rule 9, DESIGN.md invariant 3): run
/// after the batch's fence has signalled, on the queue's worker, before the queue's next batch
/// starts.
pub enum Release {
    /// Device frames handed to the engine's [`FrameSink`] if `when` holds.
    Frames {
        /// Their device.
        dev: DeviceId,
        /// The frames.
        frames: Vec<DevPfn>,
        /// On which outcome.
        when: ReleaseWhen,
    },
    /// Any callback (unpinning pages, unlocking them, freeing a buffer), with the fence's result.
    Callback(ReleaseFn),
}

impl Release {
    /// A callback payload.
    pub fn callback(f: impl FnOnce(&FenceResult) + Send + 'static) -> Self {
        Release::Callback(Box::new(f))
    }
}

impl fmt::Debug for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Release::Frames { dev, frames, when } => f
                .debug_struct("Frames")
                .field("dev", dev)
                .field("frames", &frames.len())
                .field("when", when)
                .finish(),
            Release::Callback(_) => f.write_str("Callback(..)"),
        }
    }
}

/// A list of copy requests submitted together, completed by one fence, carrying what to release
/// once it signals.
#[derive(Debug, Default)]
#[must_use = "a batch does nothing until it is submitted"]
pub struct CopyBatch {
    requests: Vec<CopyRequest>,
    releases: Vec<Release>,
    queue: Option<QueueId>,
}

impl CopyBatch {
    /// An empty batch. Submitted as it is, it is a barrier: its fence signals after every earlier
    /// fence of its queue, and after their releases ran.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a request; returns its index (the index outcomes are reported under).
    pub fn push(&mut self, request: CopyRequest) -> usize {
        self.requests.push(request);
        self.requests.len() - 1
    }
    /// Appends a request.
    pub fn with_request(mut self, request: CopyRequest) -> Self {
        self.push(request);
        self
    }
    /// Adds a payload to release after the fence.
    pub fn release_after(&mut self, release: Release) {
        self.releases.push(release);
    }
    /// Adds a payload to release after the fence.
    pub fn with_release(mut self, release: Release) -> Self {
        self.release_after(release);
        self
    }
    /// Runs it on `queue` instead of the one its direction picks ([`CopyEngine::queue_for`]).
    pub fn on_queue(mut self, queue: QueueId) -> Self {
        self.queue = Some(queue);
        self
    }
    /// The queue asked for, if any.
    pub fn queue(&self) -> Option<QueueId> {
        self.queue
    }
    /// The requests.
    pub fn requests(&self) -> &[CopyRequest] {
        &self.requests
    }
    /// Does it copy nothing?
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
    /// Bytes it copies (saturating).
    pub fn bytes(&self) -> u64 {
        self.requests
            .iter()
            .fold(0u64, |n, r| n.saturating_add(r.len))
    }

    /// Checks every request ([`CopyRequest::validate`]) and that every release names a request
    /// of the batch.
    pub fn validate(&self) -> Result<(), CopyError> {
        for (i, r) in self.requests.iter().enumerate() {
            r.validate(i)?;
        }
        for release in &self.releases {
            if let Release::Frames {
                when: ReleaseWhen::Done(i) | ReleaseWhen::NotDone(i),
                ..
            } = release
            {
                if *i >= self.requests.len() {
                    return Err(CopyError::ReleaseOutOfRange {
                        request: *i,
                        requests: self.requests.len(),
                    });
                }
            }
        }
        Ok(())
    }

    fn releases_frames(&self) -> bool {
        self.releases
            .iter()
            .any(|r| matches!(r, Release::Frames { .. }))
    }
}

// ---------------------------------------------------------------------------------------------
// Fences
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// (engine id, queue) when this thread is a copy worker: a wait for that queue's fences here
    /// could never finish.
    static WORKER: Cell<Option<(u64, usize)>> = const { Cell::new(None) };
}

struct FenceInner {
    engine: u64,
    queue: QueueId,
    seqno: u64,
    slot: Mutex<Option<FenceResult>>,
    signalled: Condvar,
}

impl FenceInner {
    fn signal(&self, result: FenceResult) {
        let mut slot = self.slot.lock();
        debug_assert!(slot.is_none(), "fence signalled twice");
        *slot = Some(result);
        drop(slot);
        self.signalled.notify_all();
    }

    fn would_deadlock(&self) -> bool {
        WORKER.with(Cell::get) == Some((self.engine, self.queue.0))
    }
}

/// Completion of a submitted batch (the kernel's `dma_fence`): signals once every window of the
/// batch has run, failed, or been cancelled. Clones share the fence. Fences of one queue signal in
/// submission order.
#[derive(Clone)]
#[must_use = "a copy is over only when its fence has signalled (seed 003 pitfall 1)"]
pub struct Fence(Arc<FenceInner>);

impl Fence {
    /// The queue it belongs to.
    pub fn queue(&self) -> QueueId {
        self.0.queue
    }
    /// Its sequence number on that queue (from 1, consecutive).
    pub fn seqno(&self) -> u64 {
        self.0.seqno
    }
    /// Has it signalled?
    pub fn is_signalled(&self) -> bool {
        self.0.slot.lock().is_some()
    }
    /// Its result if it has signalled, without waiting.
    pub fn poll(&self) -> Option<FenceResult> {
        self.0.slot.lock().clone()
    }

    /// Blocks until it signals. `Ok` when every window ran (failed requests are in the report),
    /// [`CopyError::Cancelled`] when the engine shut down first, [`CopyError::WouldDeadlock`]
    /// when called, before the fence signalled, on the worker of its own queue.
    pub fn wait(&self) -> FenceResult {
        let mut slot = self.0.slot.lock();
        loop {
            if let Some(result) = &*slot {
                return result.clone();
            }
            if self.0.would_deadlock() {
                return Err(CopyError::WouldDeadlock {
                    queue: self.0.queue,
                });
            }
            self.0.signalled.wait(&mut slot);
        }
    }

    /// [`Fence::wait`], giving up after `timeout`: `None` if it has not signalled by then.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<FenceResult> {
        let deadline = Instant::now().checked_add(timeout);
        let mut slot = self.0.slot.lock();
        loop {
            if let Some(result) = &*slot {
                return Some(result.clone());
            }
            if self.0.would_deadlock() {
                return Some(Err(CopyError::WouldDeadlock {
                    queue: self.0.queue,
                }));
            }
            match deadline {
                Some(deadline) => {
                    if self.0.signalled.wait_until(&mut slot, deadline).timed_out() {
                        return slot.clone();
                    }
                }
                None => self.0.signalled.wait(&mut slot),
            }
        }
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fence")
            .field("queue", &self.0.queue)
            .field("seqno", &self.0.seqno)
            .field("signalled", &self.is_signalled())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration, fault injection, statistics
// ---------------------------------------------------------------------------------------------

/// Deliberate window failures, for the reliability work: tests check that a migration rolls
/// back exactly what the report says did not copy. An injected failure does not call the backend
/// (the window's destination is untouched) and reports [`CopyFault::Injected`].
///
/// Windows are counted per queue from the moment the plan is installed (at construction, or by
/// [`CopyEngine::set_fault_plan`]), in the order the queue starts them; that order is the
/// submission order of the queue's batches, so a plan fails the same windows on every run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FaultPlan {
    /// No injected failure.
    #[default]
    None,
    /// Fail window `n` (0-based) of `queue`, once.
    Nth {
        /// The queue.
        queue: QueueId,
        /// Which window.
        n: u64,
    },
    /// Fail each window with probability `per_million / 10⁶`, decided by a hash of
    /// (`seed`, queue, window index).
    Fraction {
        /// The seed.
        seed: u64,
        /// Failures per million windows, at most 1 000 000.
        per_million: u32,
    },
}

impl FaultPlan {
    fn fails(self, queue: QueueId, window: u64) -> bool {
        match self {
            FaultPlan::None => false,
            FaultPlan::Nth { queue: q, n } => q == queue && n == window,
            FaultPlan::Fraction { seed, per_million } => {
                let h = splitmix64(splitmix64(seed ^ (queue.0 as u64).rotate_left(48)) ^ window);
                h % 1_000_000 < u64::from(per_million)
            }
        }
    }

    fn validate(self, queues: usize) -> Result<(), CopyError> {
        match self {
            FaultPlan::Nth { queue, .. } if queue.0 >= queues => {
                Err(CopyError::NoSuchQueue { queue, queues })
            }
            FaultPlan::Fraction { per_million, .. } if per_million > 1_000_000 => {
                Err(CopyError::InvalidFaultFraction { per_million })
            }
            _ => Ok(()),
        }
    }
}

/// SplitMix64's finaliser: a cheap, well-mixed, deterministic hash.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// How an engine is built.
#[derive(Clone, Debug, PartialEq)]
pub struct CopyEngineConfig {
    /// Number of queues, each with its own worker thread (1..=[`MAX_QUEUES`]).
    pub queues: usize,
    /// Largest window, in bytes (positive; need not be a multiple of the page size).
    pub window_bytes: u64,
    /// Batches that may wait on one queue before submit answers [`CopyError::QueueFull`].
    pub max_queued_batches: usize,
    /// The link each window is charged to ([`LinkModel::off`] charges nothing).
    pub link: LinkModel,
    /// Bandwidth of a copy inside one device's memory; `None` makes such copies free.
    pub local_bandwidth: Option<Bandwidth>,
    /// Injected failures.
    pub faults: FaultPlan,
}

impl Default for CopyEngineConfig {
    /// Two queues, 256 MiB windows, 1024 batches per queue, the link model off, local copies
    /// free, no injected failure.
    fn default() -> Self {
        CopyEngineConfig {
            queues: DEFAULT_QUEUES,
            window_bytes: DEFAULT_WINDOW_BYTES,
            max_queued_batches: DEFAULT_MAX_QUEUED_BATCHES,
            link: LinkModel::off(),
            local_bandwidth: None,
            faults: FaultPlan::None,
        }
    }
}

impl CopyEngineConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), CopyError> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(CopyError::InvalidQueueCount {
                queues: self.queues,
            });
        }
        if self.window_bytes == 0 {
            return Err(CopyError::ZeroWindow);
        }
        if self.max_queued_batches == 0 {
            return Err(CopyError::ZeroQueueDepth);
        }
        self.link.validate()?;
        if let Some(bw) = self.local_bandwidth {
            let bps = bw.bytes_per_sec();
            if bps.is_nan() || bps <= 0.0 {
                return Err(CopyError::InvalidLocalBandwidth {
                    bytes_per_sec: bw.bytes_per_sec(),
                });
            }
        }
        self.faults.validate(self.queues)
    }
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Bytes copied.
    pub bytes: u64,
    /// Windows copied.
    pub windows: u64,
    /// Modelled time charged for them.
    pub modelled: ModelTime,
}

/// Counters of a queue, or of an engine (the sum of its queues). Workers count per batch and
/// publish once per batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Successful windows by [`CopyDirection::index`].
    pub by_direction: [DirectionStats; CopyDirection::COUNT],
    /// Batches whose fence signalled (cancelled ones included).
    pub batches: u64,
    /// Batches cancelled by shutdown.
    pub batches_cancelled: u64,
    /// Requests of signalled batches.
    pub requests: u64,
    /// Requests that failed.
    pub requests_failed: u64,
    /// Requests cancelled by shutdown.
    pub requests_cancelled: u64,
    /// Windows that failed (injected ones and caught panics included).
    pub windows_failed: u64,
    /// Windows failed by the [`FaultPlan`].
    pub windows_injected: u64,
    /// Windows whose backend call panicked.
    pub backend_panics: u64,
    /// Windows not attempted because an earlier window of their request failed.
    pub windows_skipped: u64,
    /// Frames handed to the [`FrameSink`].
    pub frames_released: u64,
    /// Frames of [`Release::Frames`] payloads kept because their condition did not hold.
    pub frames_kept: u64,
    /// Submissions refused with [`CopyError::QueueFull`].
    pub rejected_full: u64,
    /// Most batches outstanding (waiting or running) on one queue at once.
    pub queue_high_water: u64,
    /// Modelled time charged, all directions.
    pub modelled: ModelTime,
}

impl CopyStats {
    /// Counters of one direction.
    pub fn direction(&self, dir: CopyDirection) -> DirectionStats {
        self.by_direction[dir.index()]
    }
    /// Bytes copied, all directions.
    pub fn bytes(&self) -> u64 {
        self.by_direction.iter().map(|d| d.bytes).sum()
    }
    /// Windows copied, all directions.
    pub fn windows(&self) -> u64 {
        self.by_direction.iter().map(|d| d.windows).sum()
    }

    /// Adds `other` (the high-water mark is the larger of the two).
    pub fn merge(&mut self, other: &CopyStats) {
        for (a, b) in self.by_direction.iter_mut().zip(other.by_direction.iter()) {
            a.bytes += b.bytes;
            a.windows += b.windows;
            a.modelled = a.modelled.saturating_add(b.modelled);
        }
        self.batches += other.batches;
        self.batches_cancelled += other.batches_cancelled;
        self.requests += other.requests;
        self.requests_failed += other.requests_failed;
        self.requests_cancelled += other.requests_cancelled;
        self.windows_failed += other.windows_failed;
        self.windows_injected += other.windows_injected;
        self.backend_panics += other.backend_panics;
        self.windows_skipped += other.windows_skipped;
        self.frames_released += other.frames_released;
        self.frames_kept += other.frames_kept;
        self.rejected_full += other.rejected_full;
        self.queue_high_water = self.queue_high_water.max(other.queue_high_water);
        self.modelled = self.modelled.saturating_add(other.modelled);
    }
}

// ---------------------------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------------------------

/// How [`CopyEngine::shutdown`] treats work still queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShutdownMode {
    /// Run every queued batch to the end, then stop.
    Drain,
    /// Stop at the next window boundary (a window in flight finishes: a DMA is not recalled);
    /// every unfinished batch signals [`CopyError::Cancelled`]. What [`Drop`] does.
    Cancel,
}

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

struct Job {
    fence: Arc<FenceInner>,
    requests: Vec<CopyRequest>,
    releases: Vec<Release>,
}

struct QueueState {
    pending: VecDeque<Job>,
    /// Seqno of the batch being run or released, if any.
    running: Option<u64>,
    /// Seqno of the last batch fully finished (fence signalled, releases run); 0 = none.
    finished: u64,
    /// Seqno the next submitted batch gets.
    next_seqno: u64,
    stopping: bool,
}

struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    stats: Mutex<CopyStats>,
}

struct PlanState {
    plan: FaultPlan,
    /// Windows each queue started since the plan was installed.
    started: Vec<u64>,
}

struct Shared {
    id: u64,
    config: CopyEngineConfig,
    window: NonZeroU64,
    backend: Arc<dyn CopyBackend>,
    sink: Option<Arc<dyn FrameSink>>,
    clock: Arc<DeviceClock>,
    queues: Vec<Queue>,
    plan: Mutex<PlanState>,
    cancel: AtomicBool,
}

/// An asynchronous copy engine: N queues of [`CopyBatch`]es, each run by its own worker thread,
/// window by window, completed by [`Fence`]s. See the module documentation.
///
/// Dropping it is [`CopyEngine::shutdown`] with [`ShutdownMode::Cancel`].
pub struct CopyEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl fmt::Debug for CopyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyEngine")
            .field("id", &self.shared.id)
            .field("config", &self.shared.config)
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl CopyEngine {
    /// Starts an engine copying through `backend` and charging `clock`. Batches that release
    /// frames need [`CopyEngine::with_frame_sink`].
    pub fn new(
        config: CopyEngineConfig,
        backend: Arc<dyn CopyBackend>,
        clock: Arc<DeviceClock>,
    ) -> Result<Self, CopyError> {
        Self::start(config, backend, clock, None)
    }

    /// [`CopyEngine::new`], with a sink for the frames batches release.
    pub fn with_frame_sink(
        config: CopyEngineConfig,
        backend: Arc<dyn CopyBackend>,
        clock: Arc<DeviceClock>,
        sink: Arc<dyn FrameSink>,
    ) -> Result<Self, CopyError> {
        Self::start(config, backend, clock, Some(sink))
    }

    fn start(
        config: CopyEngineConfig,
        backend: Arc<dyn CopyBackend>,
        clock: Arc<DeviceClock>,
        sink: Option<Arc<dyn FrameSink>>,
    ) -> Result<Self, CopyError> {
        config.validate()?;
        let window = NonZeroU64::new(config.window_bytes).ok_or(CopyError::ZeroWindow)?;
        let queues = (0..config.queues)
            .map(|_| Queue {
                state: Mutex::new(QueueState {
                    pending: VecDeque::new(),
                    running: None,
                    finished: 0,
                    next_seqno: 1,
                    stopping: false,
                }),
                wake: Condvar::new(),
                stats: Mutex::new(CopyStats::default()),
            })
            .collect();
        let shared = Arc::new(Shared {
            id: NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed),
            plan: Mutex::new(PlanState {
                plan: config.faults,
                started: vec![0; config.queues],
            }),
            window,
            backend,
            sink,
            clock,
            queues,
            cancel: AtomicBool::new(false),
            config,
        });
        let mut engine = CopyEngine {
            shared,
            workers: Vec::new(),
        };
        for q in 0..engine.shared.config.queues {
            let shared = Arc::clone(&engine.shared);
            let spawned = thread::Builder::new()
                .name(format!("hetmem-copy-{q}"))
                .spawn(move || shared.worker(q));
            match spawned {
                Ok(handle) => engine.workers.push(handle),
                // Dropping `engine` stops the workers already started.
                Err(e) => {
                    return Err(CopyError::Spawn {
                        message: e.to_string(),
                    })
                }
            }
        }
        tracing::debug!(
            engine = engine.shared.id,
            queues = engine.shared.config.queues,
            window_bytes = engine.shared.config.window_bytes,
            "copy engine: started"
        );
        Ok(engine)
    }

    /// Its configuration (the fault plan as built; see [`CopyEngine::set_fault_plan`]).
    pub fn config(&self) -> &CopyEngineConfig {
        &self.shared.config
    }
    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.shared.queues.len()
    }
    /// The clock it charges.
    pub fn clock(&self) -> &Arc<DeviceClock> {
        &self.shared.clock
    }

    /// The queue a batch goes to when it names none, from the direction of its first request:
    /// host → device on queue 0, device → host on queue 1, the rest on queue 2 (modulo the
    /// number of queues). An empty batch goes to queue 0.
    pub fn queue_for(&self, dir: CopyDirection) -> QueueId {
        let preferred = match dir {
            CopyDirection::HostToDevice => 0,
            CopyDirection::DeviceToHost => 1,
            CopyDirection::DeviceLocal | CopyDirection::PeerToPeer | CopyDirection::HostLocal => 2,
        };
        QueueId(preferred % self.queues())
    }

    /// Queues a batch and returns its fence at once (the copy runs on the queue's worker). Bad
    /// input is refused whole, before anything is queued: an invalid request, a release naming
    /// no request, frames to release without a sink, a queue the engine lacks. A full queue
    /// answers [`CopyError::QueueFull`] (busy, retry).
    pub fn submit(&self, batch: CopyBatch) -> Result<Fence, CopyError> {
        batch.validate()?;
        if self.shared.sink.is_none() && batch.releases_frames() {
            return Err(CopyError::NoFrameSink);
        }
        let queue = batch.queue.unwrap_or_else(|| {
            batch
                .requests
                .first()
                .map_or(QueueId(0), |r| self.queue_for(r.direction()))
        });
        let Some(q) = self.shared.queues.get(queue.0) else {
            return Err(CopyError::NoSuchQueue {
                queue,
                queues: self.queues(),
            });
        };
        let mut st = q.state.lock();
        if st.pending.len() >= self.shared.config.max_queued_batches {
            let depth = st.pending.len();
            drop(st);
            q.stats.lock().rejected_full += 1;
            return Err(CopyError::QueueFull { queue, depth });
        }
        let seqno = st.next_seqno;
        st.next_seqno += 1;
        let fence = Arc::new(FenceInner {
            engine: self.shared.id,
            queue,
            seqno,
            slot: Mutex::new(None),
            signalled: Condvar::new(),
        });
        let (requests, bytes) = (batch.requests.len(), batch.bytes());
        st.pending.push_back(Job {
            fence: Arc::clone(&fence),
            requests: batch.requests,
            releases: batch.releases,
        });
        let outstanding = (st.pending.len() + usize::from(st.running.is_some())) as u64;
        drop(st);
        q.wake.notify_one();
        {
            let mut stats = q.stats.lock();
            stats.queue_high_water = stats.queue_high_water.max(outstanding);
        }
        tracing::debug!(
            engine = self.shared.id,
            queue = queue.0,
            seqno,
            requests,
            bytes,
            "copy engine: batch submitted"
        );
        Ok(Fence(fence))
    }

    /// Replaces the fault plan; windows are counted from zero on every queue from now on.
    pub fn set_fault_plan(&self, plan: FaultPlan) -> Result<(), CopyError> {
        plan.validate(self.queues())?;
        let mut st = self.shared.plan.lock();
        st.plan = plan;
        st.started.iter_mut().for_each(|n| *n = 0);
        Ok(())
    }

    /// Counters of one queue.
    pub fn queue_stats(&self, queue: QueueId) -> Option<CopyStats> {
        self.shared.queues.get(queue.0).map(|q| *q.stats.lock())
    }

    /// Counters of the whole engine.
    pub fn stats(&self) -> CopyStats {
        let mut total = CopyStats::default();
        for q in &self.shared.queues {
            total.merge(&q.stats.lock());
        }
        total
    }

    /// Verifies each queue's bookkeeping: batches wait in consecutive seqno order right after
    /// the running one and the last finished one, within the queue bound; counters agree.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (i, q) in self.shared.queues.iter().enumerate() {
            let st = q.state.lock();
            let mut expect = st.finished + 1;
            if let Some(running) = st.running {
                if running != expect {
                    return Err(format!(
                        "queue {i}: running batch {running}, expected {expect}"
                    ));
                }
                expect += 1;
            }
            for job in &st.pending {
                if job.fence.seqno != expect {
                    return Err(format!(
                        "queue {i}: batch {} waits where {expect} should",
                        job.fence.seqno
                    ));
                }
                if job.fence.slot.lock().is_some() {
                    return Err(format!(
                        "queue {i}: waiting batch {expect} already signalled"
                    ));
                }
                expect += 1;
            }
            if expect != st.next_seqno {
                return Err(format!(
                    "queue {i}: next seqno {} but {} accounted for",
                    st.next_seqno, expect
                ));
            }
            if st.pending.len() > self.shared.config.max_queued_batches {
                return Err(format!(
                    "queue {i}: {} batches over the bound",
                    st.pending.len()
                ));
            }
            drop(st);
            let s = *q.stats.lock();
            if s.batches_cancelled > s.batches
                || s.requests_failed + s.requests_cancelled > s.requests
                || s.windows_injected + s.backend_panics > s.windows_failed
                || s.requests_failed != s.windows_failed
            {
                return Err(format!("queue {i}: inconsistent counters {s:?}"));
            }
            let modelled: ModelTime = s.by_direction.iter().map(|d| d.modelled).sum();
            if modelled != s.modelled {
                return Err(format!(
                    "queue {i}: modelled {} by direction, {} in total",
                    modelled, s.modelled
                ));
            }
        }
        Ok(())
    }

    /// Stops the engine: [`ShutdownMode::Drain`] runs everything queued first,
    /// [`ShutdownMode::Cancel`] stops at the next window boundary and signals every unfinished
    /// fence with [`CopyError::Cancelled`]. Either way every fence has signalled, every release
    /// has run and the workers are joined when it returns. Returns the final counters.
    pub fn shutdown(mut self, mode: ShutdownMode) -> CopyStats {
        self.stop(mode);
        self.stats()
    }

    fn stop(&mut self, mode: ShutdownMode) {
        if self.workers.is_empty() {
            return;
        }
        if mode == ShutdownMode::Cancel {
            self.shared.cancel.store(true, Ordering::Release);
        }
        for q in &self.shared.queues {
            q.state.lock().stopping = true;
            q.wake.notify_all();
        }
        let me = thread::current().id();
        for (q, handle) in self.workers.drain(..).enumerate() {
            // Stopped from one of its own workers (a release callback held the last reference):
            // that worker is in the middle of a batch; it finishes the batch, then the rest of
            // its queue, by itself. Joining it would hang.
            if handle.thread().id() == me {
                continue;
            }
            if handle.join().is_err() {
                tracing::error!(engine = self.shared.id, "copy engine: a worker panicked");
            }
            // Whatever the worker left behind (nothing, unless it died) is cancelled here, so
            // that no fence is left unsignalled.
            self.shared.cancel_pending(q);
        }
        tracing::debug!(engine = self.shared.id, ?mode, "copy engine: stopped");
    }
}

impl Drop for CopyEngine {
    /// Cancels: see [`ShutdownMode::Cancel`].
    fn drop(&mut self) {
        self.stop(ShutdownMode::Cancel);
    }
}

/// What a batch run accumulates before it is published.
struct Run {
    outcomes: Vec<RequestOutcome>,
    bytes: u64,
    windows: u64,
    modelled: ModelTime,
    stats: CopyStats,
    cancelled: bool,
}

impl Shared {
    fn worker(self: Arc<Self>, q: usize) {
        WORKER.with(|w| w.set(Some((self.id, q))));
        let queue = &self.queues[q];
        loop {
            let job = {
                let mut st = queue.state.lock();
                loop {
                    if self.cancel.load(Ordering::Acquire) {
                        break None;
                    }
                    if let Some(job) = st.pending.pop_front() {
                        st.running = Some(job.fence.seqno);
                        break Some(job);
                    }
                    if st.stopping {
                        break None;
                    }
                    queue.wake.wait(&mut st);
                }
            };
            match job {
                Some(job) => self.run(q, job),
                None => break,
            }
        }
        self.cancel_pending(q);
        WORKER.with(|w| w.set(None));
    }

    /// Signals every batch still waiting on queue `q` as cancelled, in order.
    fn cancel_pending(&self, q: usize) {
        loop {
            let job = {
                let mut st = self.queues[q].state.lock();
                let job = st.pending.pop_front();
                if let Some(job) = &job {
                    st.running = Some(job.fence.seqno);
                }
                job
            };
            let Some(job) = job else { break };
            let run = Run {
                outcomes: vec![RequestOutcome::Cancelled { offset: 0 }; job.requests.len()],
                bytes: 0,
                windows: 0,
                modelled: ModelTime::ZERO,
                stats: CopyStats {
                    requests_cancelled: job.requests.len() as u64,
                    ..CopyStats::default()
                },
                cancelled: true,
            };
            self.finish(q, job, run);
        }
    }

    fn run(&self, q: usize, job: Job) {
        let queue = QueueId(q);
        let mut run = Run {
            outcomes: Vec::with_capacity(job.requests.len()),
            bytes: 0,
            windows: 0,
            modelled: ModelTime::ZERO,
            stats: CopyStats::default(),
            cancelled: false,
        };
        for (i, req) in job.requests.iter().enumerate() {
            let outcome = if run.cancelled {
                RequestOutcome::Cancelled { offset: 0 }
            } else {
                self.run_request(queue, job.fence.seqno, i, req, &mut run)
            };
            match outcome {
                RequestOutcome::Done => {}
                RequestOutcome::Failed { .. } => run.stats.requests_failed += 1,
                RequestOutcome::Cancelled { .. } => run.stats.requests_cancelled += 1,
            }
            run.outcomes.push(outcome);
        }
        self.finish(q, job, run);
    }

    fn run_request(
        &self,
        queue: QueueId,
        seqno: u64,
        request: usize,
        req: &CopyRequest,
        run: &mut Run,
    ) -> RequestOutcome {
        let dir = req.direction();
        for (offset, len) in req.split(self.window) {
            // The window boundary is where shutdown may stop a queue (seed 003: the GART window
            // bounds how long one copy holds the engine).
            if self.cancel.load(Ordering::Acquire) {
                run.cancelled = true;
                return RequestOutcome::Cancelled { offset };
            }
            let window = CopyWindow {
                queue,
                seqno,
                request,
                src: req.src,
                dst: req.dst,
                offset,
                len,
            };
            match self.copy_window(&window, &mut run.stats) {
                Ok(()) => {
                    let t = self.charge(dir, len);
                    let d = &mut run.stats.by_direction[dir.index()];
                    d.bytes += len;
                    d.windows += 1;
                    d.modelled = d.modelled.saturating_add(t);
                    run.stats.modelled = run.stats.modelled.saturating_add(t);
                    run.bytes += len;
                    run.windows += 1;
                    run.modelled = run.modelled.saturating_add(t);
                    tracing::trace!(queue = queue.0, seqno, request, offset, len, "copy window");
                }
                Err(fault) => {
                    run.stats.windows_failed += 1;
                    let rest = req.len - offset - len;
                    run.stats.windows_skipped += rest.div_ceil(self.window.get());
                    tracing::warn!(
                        queue = queue.0,
                        seqno,
                        request,
                        offset,
                        %fault,
                        "copy engine: window failed"
                    );
                    return RequestOutcome::Failed { offset, fault };
                }
            }
        }
        RequestOutcome::Done
    }

    /// Runs one window through the fault plan and the backend; a panic fails the window.
    fn copy_window(&self, window: &CopyWindow, stats: &mut CopyStats) -> Result<(), CopyFault> {
        let injected = {
            let mut st = self.plan.lock();
            let n = st.started[window.queue.0];
            st.started[window.queue.0] += 1;
            st.plan.fails(window.queue, n).then_some(n)
        };
        if let Some(n) = injected {
            stats.windows_injected += 1;
            return Err(CopyFault::Injected {
                queue: window.queue,
                window: n,
            });
        }
        match panic::catch_unwind(AssertUnwindSafe(|| self.backend.copy(window))) {
            Ok(result) => result,
            Err(payload) => {
                stats.backend_panics += 1;
                Err(CopyFault::BackendPanicked {
                    message: panic_message(payload.as_ref()),
                })
            }
        }
    }

    /// Charges one successful window to the clock; returns what was charged.
    fn charge(&self, dir: CopyDirection, len: u64) -> ModelTime {
        let link = &self.config.link;
        let over = |d: Direction| {
            let t = link.transfer(d, len);
            self.clock.charge(d.migrate_cause(), t);
            t
        };
        match dir {
            CopyDirection::HostToDevice => over(Direction::HostToDevice),
            CopyDirection::DeviceToHost => over(Direction::DeviceToHost),
            CopyDirection::PeerToPeer => {
                over(Direction::DeviceToHost).saturating_add(over(Direction::HostToDevice))
            }
            CopyDirection::DeviceLocal => match self.config.local_bandwidth {
                Some(bw) => {
                    let t = time_at(bw, len);
                    self.clock.charge(Cause::MigrateToDevice, t);
                    t
                }
                None => ModelTime::ZERO,
            },
            CopyDirection::HostLocal => ModelTime::ZERO,
        }
    }

    /// Publishes the counters, signals the fence, then runs the releases: in that order, so a
    /// waiter sees the counters of its batch and a release never precedes the fence.
    fn finish(&self, q: usize, job: Job, mut run: Run) {
        let queue = &self.queues[q];
        run.stats.batches = 1;
        run.stats.batches_cancelled = u64::from(run.cancelled);
        run.stats.requests = job.requests.len() as u64;
        queue.stats.lock().merge(&run.stats);
        let report = CopyReport {
            queue: QueueId(q),
            seqno: job.fence.seqno,
            outcomes: run.outcomes,
            bytes: run.bytes,
            windows: run.windows,
            modelled: run.modelled,
        };
        let result = if run.cancelled {
            Err(CopyError::Cancelled { report })
        } else {
            Ok(report)
        };
        tracing::debug!(
            queue = q,
            seqno = job.fence.seqno,
            ok = result.is_ok(),
            "copy engine: fence signalled"
        );
        if job.releases.is_empty() {
            job.fence.signal(result);
        } else {
            job.fence.signal(result.clone());
            self.release(q, job.releases, &result);
        }
        let mut st = queue.state.lock();
        debug_assert_eq!(st.running, Some(job.fence.seqno));
        st.finished = job.fence.seqno;
        st.running = None;
    }

    fn release(&self, q: usize, releases: Vec<Release>, result: &FenceResult) {
        let (mut released, mut kept) = (0u64, 0u64);
        for release in releases {
            let ran = match release {
                Release::Frames { dev, frames, when } => {
                    if !when.applies(result) {
                        kept += frames.len() as u64;
                        continue;
                    }
                    released += frames.len() as u64;
                    match &self.sink {
                        Some(sink) => panic::catch_unwind(AssertUnwindSafe(|| {
                            sink.release_frames(dev, &frames)
                        })),
                        // Refused at submit.
                        None => Ok(()),
                    }
                }
                Release::Callback(f) => panic::catch_unwind(AssertUnwindSafe(|| f(result))),
            };
            if let Err(payload) = ran {
                tracing::error!(
                    queue = q,
                    message = panic_message(payload.as_ref()),
                    "copy engine: a release panicked"
                );
            }
        }
        if released + kept > 0 {
            let mut stats = self.queues[q].stats.lock();
            stats.frames_released += released;
            stats.frames_kept += kept;
        }
    }
}

/// `bytes` at `bw`, rounded to whole nanoseconds (an infinite bandwidth costs nothing).
fn time_at(bw: Bandwidth, bytes: u64) -> ModelTime {
    let ns = bytes as f64 * 1e9 / bw.bytes_per_sec();
    if ns.is_finite() && ns > 0.0 {
        // `as` saturates for values beyond u64.
        ModelTime::from_nanos(ns.round() as u64)
    } else {
        ModelTime::ZERO
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}
