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
//!   caller:  collect k ─ submit k ─ collect k+1 ─ submit k+1 ─ pages k ─ wait k ─ finalize k
//!                            │                        │                    ▲
//!                            ▼                        ▼                    │
//!   queue:          [k.w0 | k.w1 | k.w2] ─ fence k ─ release k ─ [k+1.w0 | k+1.w1] ─ fence k+1
//!                                            └─────────────────────────────┘
//!            (windows of at most window_bytes; fences of one queue signal in order)
//! ```
//!
//! This is seed 003's two-phase commit (`svm_migrate_ram_to_vram`): the copy is submitted
//! (`svm_migrate_copy_to_vram` returns an `mfence`), the page tables are updated
//! (`migrate_vma_pages`), and only then does the driver wait on the fence
//! (`svm_migrate_copy_done`) before `migrate_vma_finalize` releases what the copy read.
//!
//! Modelled time: each window that succeeds is charged once, as one transfer
//! ([`LinkModel::transfer`]: fixed latency plus the data phase), in the direction its endpoints
//! give ([`CopyDirection`]); failed and cancelled windows are not charged. Windows are charged
//! one by one, not as a pipelined batch: at the default 256 MiB a window's latency is noise, and
//! with small test windows every latency is paid, which errs on the slow side. As everywhere on
//! the [`DeviceClock`], two queues charging at once are summed, not overlapped.
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
//! let clock = Arc::new(DeviceClock::new());
//! let engine = CopyEngine::new(CopyEngineConfig::default(), Arc::new(Nothing), clock).unwrap();
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

/// A batch [`CopyEngine::submit`] refused, handed back as it was given: nothing of it was
/// queued and none of its releases ran (a release that unlocks pages must not be lost). Fix it,
/// or after [`CopyError::QueueFull`] wait on an earlier fence and submit it again.
#[derive(Debug, thiserror::Error)]
#[error("copy batch refused: {error}")]
pub struct SubmitError {
    /// Why.
    pub error: CopyError,
    /// The batch (boxed: a refusal is the rare path, the `Result` stays small).
    pub batch: Box<CopyBatch>,
}

impl SubmitError {
    /// The batch, to submit again.
    pub fn into_batch(self) -> CopyBatch {
        *self.batch
    }
}

impl From<SubmitError> for CopyError {
    /// The reason alone; the batch (and whatever its releases hold) is dropped.
    fn from(e: SubmitError) -> CopyError {
        e.error
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
/// after the batch's fence has signalled, on the queue's worker (or, if the worker died, on the
/// thread stopping the engine), before the queue's next batch starts. A release that panics is
/// caught and logged; the queue goes on.
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
    /// answers [`CopyError::QueueFull`] (busy, retry). A refused batch comes back in the
    /// [`SubmitError`], its releases not run, so that nothing it holds is lost.
    pub fn submit(&self, batch: CopyBatch) -> Result<Fence, SubmitError> {
        let (queue, q) = match self.admit(&batch) {
            Ok(admitted) => admitted,
            Err(error) => {
                return Err(SubmitError {
                    error,
                    batch: Box::new(batch),
                })
            }
        };
        let mut st = q.state.lock();
        if st.pending.len() >= self.shared.config.max_queued_batches {
            let depth = st.pending.len();
            drop(st);
            q.stats.lock().rejected_full += 1;
            return Err(SubmitError {
                error: CopyError::QueueFull { queue, depth },
                batch: Box::new(batch),
            });
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

    /// Checks a batch and picks its queue.
    fn admit(&self, batch: &CopyBatch) -> Result<(QueueId, &Queue), CopyError> {
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
        match self.shared.queues.get(queue.0) {
            Some(q) => Ok((queue, q)),
            None => Err(CopyError::NoSuchQueue {
                queue,
                queues: self.queues(),
            }),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkModel;
    use proptest::prelude::*;

    const SYS_BASE: u64 = 0x10_0000;
    const SYS_BYTES: usize = 256 << 10;
    const DEV_FRAMES: usize = 16;
    const DEVICES: usize = 2;
    const T: Duration = Duration::from_secs(5);
    const PAGE: u64 = PAGE_SIZE;

    fn sys(off: u64) -> Endpoint {
        Endpoint::System(VirtAddr(SYS_BASE + off))
    }
    fn dev(d: u8, frame: u32) -> Endpoint {
        Endpoint::Device {
            dev: DeviceId(d),
            frame: DevPfn(frame),
        }
    }

    /// What the fakes were asked, in order.
    #[derive(Clone, Debug, PartialEq)]
    enum Event {
        /// A window the backend completed.
        Copied(CopyWindow),
        /// Frames handed to the sink.
        Freed(DeviceId, Vec<DevPfn>),
        /// A release callback ran, with a tag.
        Released(u64),
    }

    /// System memory and device memories as plain byte arrays.
    #[derive(Clone, Debug, PartialEq)]
    struct Memory {
        sys: Vec<u8>,
        devs: Vec<Vec<u8>>,
    }

    impl Memory {
        fn new(seed: u8) -> Self {
            let fill = |n: usize, k: u8| -> Vec<u8> {
                (0..n)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(k) ^ seed)
                    .collect()
            };
            Memory {
                sys: fill(SYS_BYTES, 1),
                devs: (0..DEVICES)
                    .map(|d| fill(DEV_FRAMES * PAGE as usize, 7 + d as u8 * 13))
                    .collect(),
            }
        }

        fn bytes(&mut self, space: Space, addr: u64, len: u64) -> Result<&mut [u8], CopyFault> {
            let (buf, off, err) = match space {
                Space::System => (
                    &mut self.sys,
                    addr.wrapping_sub(SYS_BASE),
                    CopyFault::SystemAccess {
                        addr: VirtAddr(addr),
                        len,
                    },
                ),
                Space::Device(d) => (
                    self.devs
                        .get_mut(d.0 as usize)
                        .ok_or(CopyFault::NoSuchDevice { dev: d })?,
                    addr,
                    CopyFault::DeviceAccess {
                        dev: d,
                        offset: addr,
                        len,
                    },
                ),
            };
            match off.checked_add(len) {
                Some(end) if end <= buf.len() as u64 => Ok(&mut buf[off as usize..end as usize]),
                _ => Err(err),
            }
        }

        /// Copies `len` bytes at `offset` of a request (the model does whole prefixes).
        fn copy(&mut self, req: &CopyRequest, offset: u64, len: u64) -> Result<(), CopyFault> {
            let data = self
                .bytes(req.src.space(), req.src.base() + offset, len)?
                .to_vec();
            self.bytes(req.dst.space(), req.dst.base() + offset, len)?
                .copy_from_slice(&data);
            Ok(())
        }
    }

    /// A backend over [`Memory`] that records every window and every release, and can hold the
    /// windows of one queue at a gate (a number of permits; `u64::MAX` is open).
    struct FakeBackend {
        mem: Mutex<Memory>,
        log: Mutex<Vec<Event>>,
        gated: Option<QueueId>,
        permits: Mutex<u64>,
        permits_cv: Condvar,
        entered: Mutex<u64>,
        entered_cv: Condvar,
        panic_on: Option<(u64, usize)>,
    }

    impl FakeBackend {
        fn new() -> Arc<Self> {
            Self::build(None, None)
        }
        /// Windows on `queue` wait for a permit; none at first.
        fn gated(queue: usize) -> Arc<Self> {
            Self::build(Some(QueueId(queue)), None)
        }
        fn build(gated: Option<QueueId>, panic_on: Option<(u64, usize)>) -> Arc<Self> {
            Arc::new(FakeBackend {
                mem: Mutex::new(Memory::new(0)),
                log: Mutex::new(Vec::new()),
                gated,
                permits: Mutex::new(0),
                permits_cv: Condvar::new(),
                entered: Mutex::new(0),
                entered_cv: Condvar::new(),
                panic_on,
            })
        }
        fn allow(&self, n: u64) {
            let mut p = self.permits.lock();
            *p = p.saturating_add(n);
            self.permits_cv.notify_all();
        }
        fn open(&self) {
            self.allow(u64::MAX);
        }
        /// Waits until `n` gated windows have reached the gate.
        fn wait_entered(&self, n: u64) {
            let deadline = Instant::now() + T;
            let mut e = self.entered.lock();
            while *e < n {
                assert!(
                    !self.entered_cv.wait_until(&mut e, deadline).timed_out(),
                    "only {} of {n} windows reached the gate",
                    *e
                );
            }
        }
        fn log(&self) -> Vec<Event> {
            self.log.lock().clone()
        }
        fn copies(&self) -> Vec<CopyWindow> {
            self.log()
                .into_iter()
                .filter_map(|e| match e {
                    Event::Copied(w) => Some(w),
                    _ => None,
                })
                .collect()
        }
        fn memory(&self) -> Memory {
            self.mem.lock().clone()
        }
    }

    impl CopyBackend for FakeBackend {
        fn copy(&self, w: &CopyWindow) -> Result<(), CopyFault> {
            if Some(w.queue) == self.gated {
                {
                    let mut e = self.entered.lock();
                    *e += 1;
                    self.entered_cv.notify_all();
                }
                let mut p = self.permits.lock();
                while *p == 0 {
                    self.permits_cv.wait(&mut p);
                }
                if *p != u64::MAX {
                    *p -= 1;
                }
            }
            if self.panic_on == Some((w.seqno, w.request)) {
                panic!("boom in window {w:?}");
            }
            {
                let mut mem = self.mem.lock();
                let data = mem.bytes(w.src.space(), w.src_addr(), w.len)?.to_vec();
                mem.bytes(w.dst.space(), w.dst_addr(), w.len)?
                    .copy_from_slice(&data);
            }
            self.log.lock().push(Event::Copied(*w));
            Ok(())
        }
    }

    impl FrameSink for FakeBackend {
        fn release_frames(&self, dev: DeviceId, frames: &[DevPfn]) {
            self.log.lock().push(Event::Freed(dev, frames.to_vec()));
        }
    }

    fn config(window_bytes: u64) -> CopyEngineConfig {
        CopyEngineConfig {
            window_bytes,
            ..CopyEngineConfig::default()
        }
    }

    fn engine_with(
        config: CopyEngineConfig,
        backend: &Arc<FakeBackend>,
    ) -> (CopyEngine, Arc<DeviceClock>) {
        let clock = Arc::new(DeviceClock::new());
        let engine = CopyEngine::with_frame_sink(
            config,
            Arc::clone(backend) as Arc<dyn CopyBackend>,
            Arc::clone(&clock),
            Arc::clone(backend) as Arc<dyn FrameSink>,
        )
        .unwrap();
        (engine, clock)
    }

    fn engine(window_bytes: u64, backend: &Arc<FakeBackend>) -> CopyEngine {
        engine_with(config(window_bytes), backend).0
    }

    fn wait(f: &Fence) -> FenceResult {
        f.wait_timeout(T).expect("fence did not signal")
    }

    fn tag(log: &Arc<Mutex<Vec<u64>>>, t: u64) -> Release {
        let log = Arc::clone(log);
        Release::callback(move |_| log.lock().push(t))
    }

    #[test]
    fn windows_never_exceed_window_bytes_and_cover_each_request_once() {
        const W: u64 = 3000;
        let backend = FakeBackend::new();
        let e = engine(W, &backend);
        let lens = [1, W - 1, W, W + 1, 3 * W, 3 * PAGE];
        let mut batch = CopyBatch::new();
        for (i, &len) in lens.iter().enumerate() {
            let i = i as u64;
            batch.push(CopyRequest::new(
                sys(i * 4 * PAGE),
                dev(0, i as u32 * 2),
                len,
            ));
        }
        let requests = batch.requests().to_vec();
        let report = wait(&e.submit(batch).unwrap()).unwrap();
        assert!(report.is_complete());
        let copies = backend.copies();
        // In order: request by request, offset by offset.
        let mut expect = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let mut at = 0;
            for (offset, len) in r.split(NonZeroU64::new(W).unwrap()) {
                assert_eq!(offset, at);
                assert!(len > 0 && len <= W, "window of {len}");
                expect.push((i, offset, len));
                at += len;
            }
            assert_eq!(at, r.len, "request {i} covered");
        }
        let got: Vec<_> = copies
            .iter()
            .map(|w| (w.request, w.offset, w.len))
            .collect();
        assert_eq!(got, expect);
        let windows: u64 = requests
            .iter()
            .map(|r| r.windows(NonZeroU64::new(W).unwrap()))
            .sum();
        assert_eq!(report.windows, windows);
        assert_eq!(e.stats().windows(), windows);
        assert_eq!(report.bytes, lens.iter().sum::<u64>());
        e.check_invariants().unwrap();
    }

    #[test]
    fn copied_data_equals_source() {
        let backend = FakeBackend::new();
        let e = engine(PAGE, &backend);
        let before = backend.memory();
        let reqs = [
            CopyRequest::pages(sys(0), dev(0, 0), 3),             // H2D
            CopyRequest::new(dev(1, 2), sys(8 * PAGE + 5), 5000), // D2H
            CopyRequest::pages(dev(0, 8), dev(0, 12), 2),         // device-local
            CopyRequest::new(dev(1, 4), dev(0, 4), PAGE + 17),    // peer
            CopyRequest::new(sys(20 * PAGE), sys(30 * PAGE), 12345), // host-local
        ];
        let mut batch = CopyBatch::new();
        for r in reqs {
            batch.push(r);
        }
        assert!(wait(&e.submit(batch).unwrap()).unwrap().is_complete());
        let mut want = before.clone();
        for r in &reqs {
            want.copy(r, 0, r.len).unwrap();
        }
        let mut after = backend.memory();
        assert_eq!(after, want);
        for r in &reqs {
            let mut src = before.clone();
            let s = src
                .bytes(r.src.space(), r.src.base(), r.len)
                .unwrap()
                .to_vec();
            let d = after
                .bytes(r.dst.space(), r.dst.base(), r.len)
                .unwrap()
                .to_vec();
            assert_eq!(s, d, "{r:?}");
        }
        let stats = e.stats();
        for dir in CopyDirection::ALL {
            let want: u64 = reqs
                .iter()
                .filter(|r| r.direction() == dir)
                .map(|r| r.len)
                .sum();
            assert_eq!(stats.direction(dir).bytes, want, "{dir}");
        }
    }

    #[test]
    fn fence_waits_for_every_window() {
        let backend = FakeBackend::gated(0);
        let e = engine(PAGE, &backend);
        backend.allow(3);
        let fence = e
            .submit(CopyBatch::new().with_request(CopyRequest::pages(sys(0), dev(0, 0), 4)))
            .unwrap();
        // Three windows done, the fourth held at the gate: the fence has not signalled.
        backend.wait_entered(4);
        assert_eq!(backend.copies().len(), 3);
        assert!(!fence.is_signalled());
        assert!(fence.poll().is_none());
        assert!(fence.wait_timeout(Duration::from_millis(20)).is_none());
        e.check_invariants().unwrap();
        backend.allow(1);
        let report = wait(&fence).unwrap();
        assert_eq!(report.windows, 4);
        assert_eq!(backend.copies().len(), 4);
        assert!(fence.is_signalled());
        assert_eq!(fence.poll(), Some(Ok(report)));
    }

    #[test]
    fn submit_returns_before_the_copy_runs_so_collecting_the_next_overlaps_it() {
        let backend = FakeBackend::gated(0);
        let e = engine(PAGE, &backend);
        let first = e
            .submit(CopyBatch::new().with_request(CopyRequest::pages(sys(0), dev(0, 0), 2)))
            .unwrap();
        // The copy of the first migration is in flight (held at the gate) while the next one is
        // collected and submitted.
        backend.wait_entered(1);
        assert!(!first.is_signalled());
        let second = e
            .submit(CopyBatch::new().with_request(CopyRequest::pages(sys(0), dev(1, 0), 2)))
            .unwrap();
        assert!(backend.copies().is_empty());
        backend.open();
        // Finalisation waits on the fence.
        assert!(wait(&second).unwrap().is_complete());
        assert!(first.is_signalled());
        let seqnos: Vec<_> = backend.copies().iter().map(|w| w.seqno).collect();
        assert_eq!(seqnos, [1, 1, 2, 2]);
    }

    #[test]
    fn fences_on_one_queue_signal_in_order() {
        let backend = FakeBackend::new();
        let e = engine(PAGE, &backend);
        let order = Arc::new(Mutex::new(Vec::new()));
        let fences: Vec<Fence> = (0..30u64)
            .map(|i| {
                let batch = CopyBatch::new()
                    .with_request(CopyRequest::new(sys(i * 100), dev(0, 0), 100 + i))
                    .with_release(tag(&order, i + 1))
                    .on_queue(QueueId(0));
                e.submit(batch).unwrap()
            })
            .collect();
        for (i, f) in fences.iter().enumerate() {
            assert_eq!(f.seqno(), i as u64 + 1);
            assert_eq!(f.queue(), QueueId(0));
        }
        // Waiting on the last one: every earlier one has signalled too.
        wait(&fences[29]).unwrap();
        assert!(fences.iter().all(Fence::is_signalled));
        // Releases ran in fence order; a barrier behind them sees them all.
        wait(&e.submit(CopyBatch::new()).unwrap()).unwrap();
        assert_eq!(*order.lock(), (1..=30).collect::<Vec<u64>>());
        e.check_invariants().unwrap();
    }

    #[test]
    fn a_failed_window_fails_exactly_its_request() {
        let backend = FakeBackend::new();
        let (e, _) = engine_with(
            CopyEngineConfig {
                faults: FaultPlan::Nth {
                    queue: QueueId(0),
                    n: 4,
                },
                ..config(PAGE)
            },
            &backend,
        );
        let before = backend.memory();
        // Windows 0-2 are request 0, 3-5 request 1, 6-8 request 2: window 4 is request 1's second.
        let reqs = [
            CopyRequest::pages(sys(0), dev(0, 0), 3),
            CopyRequest::pages(sys(3 * PAGE), dev(0, 3), 3),
            CopyRequest::pages(sys(6 * PAGE), dev(0, 6), 3),
        ];
        let mut batch = CopyBatch::new();
        reqs.iter().for_each(|&r| {
            batch.push(r);
        });
        let report = wait(&e.submit(batch).unwrap()).unwrap();
        let fault = CopyFault::Injected {
            queue: QueueId(0),
            window: 4,
        };
        assert_eq!(
            report.outcomes,
            [
                RequestOutcome::Done,
                RequestOutcome::Failed {
                    offset: PAGE,
                    fault: fault.clone()
                },
                RequestOutcome::Done
            ]
        );
        assert_eq!(report.failed().collect::<Vec<_>>(), [1]);
        assert_eq!(report.not_done().collect::<Vec<_>>(), [1]);
        assert_eq!(report.done().collect::<Vec<_>>(), [0, 2]);
        assert!(!report.is_complete());
        assert_eq!(report.outcomes[1].copied_bytes(3 * PAGE), PAGE);
        assert_eq!(report.windows, 7);
        // Exactly the prefix before the failed window reached the destination.
        let mut want = before.clone();
        want.copy(&reqs[0], 0, 3 * PAGE).unwrap();
        want.copy(&reqs[1], 0, PAGE).unwrap();
        want.copy(&reqs[2], 0, 3 * PAGE).unwrap();
        assert_eq!(backend.memory(), want);
        let s = e.stats();
        assert_eq!(
            (
                s.windows_failed,
                s.windows_injected,
                s.windows_skipped,
                s.requests_failed
            ),
            (1, 1, 1, 1)
        );
        assert!(fault.to_string().contains("window 4"));
        e.check_invariants().unwrap();
    }

    #[test]
    fn release_payloads_run_only_after_the_fence() {
        let backend = FakeBackend::gated(0);
        let e = engine(PAGE, &backend);
        let slot: Arc<Mutex<Option<Fence>>> = Arc::new(Mutex::new(None));
        let saw_signalled = Arc::new(AtomicBool::new(false));
        let release = {
            let (slot, saw, backend) = (
                Arc::clone(&slot),
                Arc::clone(&saw_signalled),
                Arc::clone(&backend),
            );
            Release::callback(move |result| {
                let fence = slot.lock().clone().expect("fence stored");
                saw.store(fence.is_signalled(), Ordering::SeqCst);
                assert_eq!(fence.poll().as_ref(), Some(result));
                backend.log.lock().push(Event::Released(7));
            })
        };
        let batch = CopyBatch::new()
            .with_request(CopyRequest::pages(dev(0, 4), sys(0), 3))
            .on_queue(QueueId(0))
            .with_release(Release::Frames {
                dev: DeviceId(0),
                frames: vec![DevPfn(4), DevPfn(5), DevPfn(6)],
                when: ReleaseWhen::Always,
            })
            .with_release(release);
        let fence = e.submit(batch).unwrap();
        *slot.lock() = Some(fence.clone());
        backend.allow(2);
        backend.wait_entered(3);
        // Two of three windows have read the frames; nothing is released yet.
        assert!(backend
            .log()
            .iter()
            .all(|ev| matches!(ev, Event::Copied(_))));
        backend.open();
        wait(&fence).unwrap();
        wait(&e.submit(CopyBatch::new().on_queue(QueueId(0))).unwrap()).unwrap();
        let log = backend.log();
        assert_eq!(log.len(), 5, "{log:?}");
        assert!(log[..3].iter().all(|ev| matches!(ev, Event::Copied(_))));
        assert_eq!(
            log[3],
            Event::Freed(DeviceId(0), vec![DevPfn(4), DevPfn(5), DevPfn(6)])
        );
        assert_eq!(log[4], Event::Released(7));
        assert!(saw_signalled.load(Ordering::SeqCst));
        assert_eq!(e.stats().frames_released, 3);
    }

    #[test]
    fn released_frames_follow_each_requests_outcome() {
        let backend = FakeBackend::new();
        let (e, _) = engine_with(
            CopyEngineConfig {
                faults: FaultPlan::Nth {
                    queue: QueueId(1),
                    n: 1,
                },
                ..config(PAGE)
            },
            &backend,
        );
        let frames = |f: u32, when| Release::Frames {
            dev: DeviceId(1),
            frames: vec![DevPfn(f)],
            when,
        };
        // An eviction of two frames; the second copy fails.
        let batch = CopyBatch::new()
            .with_request(CopyRequest::pages(dev(1, 0), sys(0), 1))
            .with_request(CopyRequest::pages(dev(1, 1), sys(PAGE), 1))
            .with_release(frames(0, ReleaseWhen::Done(0)))
            .with_release(frames(1, ReleaseWhen::Done(1)))
            .with_release(frames(10, ReleaseWhen::NotDone(0)))
            .with_release(frames(11, ReleaseWhen::NotDone(1)))
            .with_release(frames(12, ReleaseWhen::Always));
        let fence = e.submit(batch).unwrap();
        assert_eq!(fence.queue(), QueueId(1), "device-to-host picks queue 1");
        let report = wait(&fence).unwrap();
        assert_eq!(report.not_done().collect::<Vec<_>>(), [1]);
        wait(&e.submit(CopyBatch::new().on_queue(QueueId(1))).unwrap()).unwrap();
        let freed: Vec<_> = backend
            .log()
            .into_iter()
            .filter_map(|ev| match ev {
                Event::Freed(_, f) => Some(f[0].0),
                _ => None,
            })
            .collect();
        // Source frame 0 is freed (its data is home), frame 1 is kept (the page stays valid on
        // the device).
        assert_eq!(freed, [0, 11, 12]);
        let s = e.stats();
        assert_eq!((s.frames_released, s.frames_kept), (3, 2));
    }

    #[test]
    fn two_queues_run_concurrently() {
        let backend = FakeBackend::gated(0);
        let e = engine(PAGE, &backend);
        let slow = e
            .submit(CopyBatch::new().with_request(CopyRequest::pages(sys(0), dev(0, 0), 2)))
            .unwrap();
        backend.wait_entered(1);
        let fast = e
            .submit(CopyBatch::new().with_request(CopyRequest::pages(dev(1, 0), sys(8 * PAGE), 4)))
            .unwrap();
        assert_eq!((slow.queue(), fast.queue()), (QueueId(0), QueueId(1)));
        // Queue 1 finishes while queue 0 is held inside its first window.
        assert!(wait(&fast).unwrap().is_complete());
        assert!(!slow.is_signalled());
        backend.open();
        assert!(wait(&slow).unwrap().is_complete());
        assert_eq!(e.queue_stats(QueueId(1)).unwrap().windows(), 4);
        assert_eq!(e.queue_stats(QueueId(0)).unwrap().windows(), 2);
        assert_eq!(e.queue_stats(QueueId(2)), None);
    }

    #[test]
    fn windows_charge_the_clock_at_the_link_models_transfer_time() {
        let link = LinkModel::pcie4_x16();
        let local = Bandwidth::from_gb_per_sec(100.0);
        let backend = FakeBackend::new();
        let (e, clock) = engine_with(
            CopyEngineConfig {
                link: link.clone(),
                local_bandwidth: Some(local),
                ..config(PAGE)
            },
            &backend,
        );
        let batch = CopyBatch::new()
            .with_request(CopyRequest::new(sys(0), dev(0, 0), 10_000)) // 4096 + 4096 + 1808
            .with_request(CopyRequest::pages(dev(0, 4), sys(4 * PAGE), 1))
            .with_request(CopyRequest::pages(dev(0, 8), dev(0, 12), 2))
            .with_request(CopyRequest::pages(dev(1, 0), dev(0, 15), 1))
            .with_request(CopyRequest::pages(sys(8 * PAGE), sys(12 * PAGE), 1));
        let report = wait(&e.submit(batch).unwrap()).unwrap();
        let (h2d, d2h) = (Direction::HostToDevice, Direction::DeviceToHost);
        let page_local = ModelTime::from_nanos((PAGE as f64 / 100.0).round() as u64);
        assert_eq!(time_at(local, PAGE), page_local);
        let sum = |ts: &[ModelTime]| ts.iter().copied().sum::<ModelTime>();
        let to_device = sum(&[
            link.transfer(h2d, PAGE).saturating_mul(2),
            link.transfer(h2d, 1808),
            page_local.saturating_mul(2),
            link.transfer(h2d, PAGE),
        ]);
        let to_host = link.transfer(d2h, PAGE).saturating_mul(2);
        let r = clock.snapshot();
        assert_eq!(r.get(Cause::MigrateToDevice), to_device);
        assert_eq!(r.get(Cause::MigrateToHost), to_host);
        assert_eq!(r.charges_of(Cause::MigrateToDevice), 3 + 2 + 1);
        assert_eq!(r.charges_of(Cause::MigrateToHost), 2);
        assert_eq!(report.modelled, sum(&[to_device, to_host]));
        let s = e.stats();
        assert_eq!(s.modelled, report.modelled);
        assert_eq!(
            s.direction(CopyDirection::HostToDevice),
            DirectionStats {
                bytes: 10_000,
                windows: 3,
                modelled: sum(&[
                    link.transfer(h2d, PAGE).saturating_mul(2),
                    link.transfer(h2d, 1808)
                ]),
            }
        );
        assert_eq!(
            s.direction(CopyDirection::PeerToPeer).modelled,
            sum(&[link.transfer(d2h, PAGE), link.transfer(h2d, PAGE)])
        );
        assert_eq!(
            s.direction(CopyDirection::HostLocal),
            DirectionStats {
                bytes: PAGE,
                windows: 1,
                modelled: ModelTime::ZERO
            }
        );
        e.check_invariants().unwrap();

        // Without a local bandwidth, copies inside a device are free and not charged.
        let (free, clock) = engine_with(config(PAGE), &backend);
        let b = CopyBatch::new().with_request(CopyRequest::pages(dev(0, 0), dev(0, 2), 2));
        assert_eq!(
            wait(&free.submit(b).unwrap()).unwrap().modelled,
            ModelTime::ZERO
        );
        assert_eq!(clock.snapshot().charges_of(Cause::MigrateToDevice), 0);
    }

    #[test]
    fn dropping_the_engine_signals_every_fence() {
        let backend = FakeBackend::gated(0);
        let e = engine(PAGE, &backend);
        let shared = Arc::clone(&e.shared);
        let released = Arc::new(Mutex::new(Vec::new()));
        let first = e
            .submit(
                CopyBatch::new()
                    .with_request(CopyRequest::pages(sys(0), dev(0, 0), 3))
                    .with_release(tag(&released, 1)),
            )
            .unwrap();
        let rest: Vec<Fence> = (2..=5)
            .map(|i| {
                let batch = CopyBatch::new()
                    .with_request(CopyRequest::pages(dev(0, 8), sys(8 * PAGE), 1))
                    .with_release(Release::Frames {
                        dev: DeviceId(0),
                        frames: vec![DevPfn(8)],
                        when: ReleaseWhen::Done(0),
                    })
                    .with_release(tag(&released, i))
                    .on_queue(QueueId(0));
                e.submit(batch).unwrap()
            })
            .collect();
        backend.allow(1);
        backend.wait_entered(2); // window 0 done, window 1 in flight at the gate
        let dropper = thread::spawn(move || drop(e));
        while !shared.cancel.load(Ordering::Acquire) {
            thread::yield_now();
        }
        backend.open(); // the window in flight finishes; nothing further starts
        dropper.join().unwrap();

        let Err(CopyError::Cancelled { report }) = first.poll().expect("signalled") else {
            panic!("first batch not cancelled: {first:?}");
        };
        assert_eq!(
            report.outcomes,
            [RequestOutcome::Cancelled { offset: 2 * PAGE }]
        );
        assert_eq!((report.windows, report.bytes), (2, 2 * PAGE));
        for f in &rest {
            let Some(Err(CopyError::Cancelled { report })) = f.poll() else {
                panic!("{f:?} not cancelled");
            };
            assert_eq!(report.outcomes, [RequestOutcome::Cancelled { offset: 0 }]);
            assert_eq!(report.windows, 0);
        }
        assert_eq!(backend.copies().len(), 2);
        // Every release ran, in order; no frame whose copy did not complete was freed.
        assert_eq!(*released.lock(), [1, 2, 3, 4, 5]);
        assert!(!backend
            .log()
            .iter()
            .any(|ev| matches!(ev, Event::Freed(..))));
        let s = *shared.queues[0].stats.lock();
        assert_eq!(
            (s.batches, s.batches_cancelled, s.requests_cancelled),
            (5, 5, 5)
        );
        assert_eq!(s.frames_kept, 4);
    }

    #[test]
    fn shutdown_drain_runs_every_queued_batch() {
        let backend = FakeBackend::gated(0);
        let e = engine(PAGE, &backend);
        let shared = Arc::clone(&e.shared);
        let fences: Vec<Fence> = (0..5u64)
            .map(|i| {
                e.submit(CopyBatch::new().with_request(CopyRequest::pages(
                    sys(i * PAGE),
                    dev(0, 0),
                    1,
                )))
                .unwrap()
            })
            .collect();
        backend.wait_entered(1);
        let stopper = thread::spawn(move || e.shutdown(ShutdownMode::Drain));
        while !shared.queues[0].state.lock().stopping {
            thread::yield_now();
        }
        backend.open();
        let stats = stopper.join().unwrap();
        for f in &fences {
            assert!(f.poll().expect("signalled").unwrap().is_complete());
        }
        assert_eq!((stats.batches, stats.batches_cancelled), (5, 0));
        assert_eq!(stats.queue_high_water, 5);
    }

    #[test]
    fn an_engine_dropped_from_its_own_release_does_not_hang() {
        let backend = FakeBackend::gated(0);
        let e = Arc::new(engine(PAGE, &backend));
        let slot = Arc::new(Mutex::new(Some(Arc::clone(&e))));
        let first = {
            let slot = Arc::clone(&slot);
            e.submit(
                CopyBatch::new()
                    .with_request(CopyRequest::pages(sys(0), dev(0, 0), 1))
                    .with_release(Release::callback(move |_| drop(slot.lock().take()))),
            )
            .unwrap()
        };
        let second = e
            .submit(CopyBatch::new().with_request(CopyRequest::pages(sys(0), dev(0, 1), 1)))
            .unwrap();
        drop(e); // the release callback now holds the last reference
        backend.open();
        assert!(wait(&first).unwrap().is_complete());
        assert!(matches!(wait(&second), Err(CopyError::Cancelled { .. })));
    }

    #[test]
    fn waiting_on_its_own_queue_from_a_worker_is_refused() {
        let backend = FakeBackend::gated(0);
        let e = engine(PAGE, &backend);
        let slot: Arc<Mutex<Vec<Fence>>> = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let callback = {
            let (slot, seen) = (Arc::clone(&slot), Arc::clone(&seen));
            Release::callback(move |_| {
                let fences = slot.lock().clone();
                let mut seen = seen.lock();
                // Its own fence has signalled: fine. The next one on the same queue cannot
                // signal while this worker waits: refused. Another queue's: fine.
                seen.push(fences[0].wait().map(|r| r.seqno));
                seen.push(fences[1].wait().map(|r| r.seqno));
                seen.push(
                    fences[1]
                        .wait_timeout(Duration::from_secs(60))
                        .unwrap()
                        .map(|r| r.seqno),
                );
                seen.push(fences[2].wait().map(|r| r.seqno));
            })
        };
        let f1 = e
            .submit(
                CopyBatch::new()
                    .with_request(CopyRequest::pages(sys(0), dev(0, 0), 1))
                    .with_release(callback),
            )
            .unwrap();
        let f2 = e
            .submit(CopyBatch::new().with_request(CopyRequest::pages(sys(0), dev(0, 1), 1)))
            .unwrap();
        let other = e
            .submit(CopyBatch::new().with_request(CopyRequest::pages(dev(0, 0), sys(0), 1)))
            .unwrap();
        *slot.lock() = vec![f1.clone(), f2.clone(), other];
        backend.open();
        wait(&f2).unwrap();
        let refused = Err(CopyError::WouldDeadlock { queue: QueueId(0) });
        assert_eq!(*seen.lock(), [Ok(1), refused.clone(), refused, Ok(1)]);
    }

    #[test]
    fn a_panicking_backend_fails_its_window_not_the_queue() {
        let backend = FakeBackend::build(None, Some((1, 1)));
        let e = engine(PAGE, &backend);
        let batch = CopyBatch::new()
            .with_request(CopyRequest::pages(sys(0), dev(0, 0), 1))
            .with_request(CopyRequest::pages(sys(PAGE), dev(0, 1), 2))
            .with_request(CopyRequest::pages(sys(3 * PAGE), dev(0, 3), 1));
        let report = wait(&e.submit(batch).unwrap()).unwrap();
        assert_eq!(report.failed().collect::<Vec<_>>(), [1]);
        let Some(RequestOutcome::Failed {
            offset: 0,
            fault: CopyFault::BackendPanicked { message },
        }) = report.outcome(1)
        else {
            panic!("{report:?}");
        };
        assert!(message.contains("boom"), "{message}");
        // The queue still works.
        let next = CopyBatch::new().with_request(CopyRequest::pages(sys(0), dev(0, 0), 1));
        assert!(wait(&e.submit(next).unwrap()).unwrap().is_complete());
        let s = e.stats();
        assert_eq!(
            (s.backend_panics, s.windows_failed, s.windows_skipped),
            (1, 1, 1)
        );
        e.check_invariants().unwrap();
    }

    #[test]
    fn an_empty_batch_is_a_barrier() {
        let backend = FakeBackend::gated(0);
        let e = engine(PAGE, &backend);
        let order = Arc::new(Mutex::new(Vec::new()));
        let copy = e
            .submit(
                CopyBatch::new()
                    .with_request(CopyRequest::pages(sys(0), dev(0, 0), 1))
                    .with_release(tag(&order, 1)),
            )
            .unwrap();
        let barrier = e.submit(CopyBatch::new()).unwrap();
        assert_eq!(barrier.queue(), QueueId(0));
        backend.wait_entered(1);
        assert!(barrier.wait_timeout(Duration::from_millis(20)).is_none());
        backend.open();
        let report = wait(&barrier).unwrap();
        assert!(report.is_complete() && report.outcomes.is_empty());
        assert!(copy.is_signalled());
        assert_eq!(*order.lock(), [1]);
    }

    #[test]
    fn a_full_queue_answers_busy_retry() {
        let backend = FakeBackend::gated(0);
        let (e, _) = engine_with(
            CopyEngineConfig {
                max_queued_batches: 2,
                ..config(PAGE)
            },
            &backend,
        );
        let one = || CopyBatch::new().with_request(CopyRequest::pages(sys(0), dev(0, 0), 1));
        let a = e.submit(one()).unwrap();
        backend.wait_entered(1); // a runs, held at the gate
        let b = e.submit(one()).unwrap();
        let c = e.submit(one()).unwrap();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let refused = e.submit(one().with_release(tag(&ran, 4))).unwrap_err();
        assert_eq!(
            refused.error,
            CopyError::QueueFull {
                queue: QueueId(0),
                depth: 2
            }
        );
        assert!(refused.to_string().contains("full"), "{refused}");
        e.check_invariants().unwrap();
        backend.open();
        for f in [&a, &b, &c] {
            wait(f).unwrap();
        }
        // The refused batch came back whole, its release not run; retried, it runs.
        assert!(ran.lock().is_empty());
        let batch = refused.into_batch();
        assert_eq!(batch.requests().len(), 1);
        wait(&e.submit(batch).unwrap()).unwrap();
        wait(&e.submit(CopyBatch::new()).unwrap()).unwrap();
        assert_eq!(*ran.lock(), [4]);
        let s = e.stats();
        assert_eq!((s.rejected_full, s.queue_high_water, s.batches), (1, 3, 5));
        e.check_invariants().unwrap();
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let backend = FakeBackend::new();
        let bad_config = |c: CopyEngineConfig| {
            CopyEngine::new(c, backend.clone(), Arc::new(DeviceClock::new())).unwrap_err()
        };
        assert_eq!(bad_config(config(0)), CopyError::ZeroWindow);
        for queues in [0, MAX_QUEUES + 1] {
            assert_eq!(
                bad_config(CopyEngineConfig {
                    queues,
                    ..config(PAGE)
                }),
                CopyError::InvalidQueueCount { queues }
            );
        }
        assert_eq!(
            bad_config(CopyEngineConfig {
                max_queued_batches: 0,
                ..config(PAGE)
            }),
            CopyError::ZeroQueueDepth
        );
        let mut link = LinkModel::pcie3_x16();
        link.remote_line_bytes = 0;
        assert_eq!(
            bad_config(CopyEngineConfig {
                link,
                ..config(PAGE)
            }),
            CopyError::InvalidLink(LinkError::ZeroRemoteLine)
        );
        for bps in [0.0, -1.0, f64::NAN] {
            let err = bad_config(CopyEngineConfig {
                local_bandwidth: Some(Bandwidth::from_bytes_per_sec(bps)),
                ..config(PAGE)
            });
            assert!(
                matches!(err, CopyError::InvalidLocalBandwidth { .. }),
                "{err}"
            );
        }
        assert_eq!(
            bad_config(CopyEngineConfig {
                faults: FaultPlan::Fraction {
                    seed: 1,
                    per_million: 1_000_001
                },
                ..config(PAGE)
            }),
            CopyError::InvalidFaultFraction {
                per_million: 1_000_001
            }
        );
        let nth3 = FaultPlan::Nth {
            queue: QueueId(3),
            n: 0,
        };
        let no_queue_3 = CopyError::NoSuchQueue {
            queue: QueueId(3),
            queues: 2,
        };
        assert_eq!(
            bad_config(CopyEngineConfig {
                faults: nth3,
                ..config(PAGE)
            }),
            no_queue_3
        );

        let e =
            CopyEngine::new(config(PAGE), backend.clone(), Arc::new(DeviceClock::new())).unwrap();
        assert_eq!(e.set_fault_plan(nth3), Err(no_queue_3.clone()));
        let submit = |r: CopyRequest| {
            e.submit(
                CopyBatch::new()
                    .with_request(CopyRequest::pages(sys(0), dev(0, 0), 1))
                    .with_request(r),
            )
            .unwrap_err()
            .error
        };
        assert_eq!(
            submit(CopyRequest::new(sys(0), dev(0, 0), 0)),
            CopyError::ZeroLength { request: 1 }
        );
        assert_eq!(
            submit(CopyRequest::new(sys(0), sys(100), 200)),
            CopyError::Overlap { request: 1 }
        );
        assert_eq!(
            submit(CopyRequest::pages(dev(1, 3), dev(1, 2), 2)),
            CopyError::Overlap { request: 1 }
        );
        assert_eq!(
            submit(CopyRequest::new(sys(0), sys(0), 1)),
            CopyError::Overlap { request: 1 }
        );
        assert_eq!(
            submit(CopyRequest::new(
                Endpoint::System(VirtAddr(u64::MAX - 10)),
                dev(0, 0),
                100
            )),
            CopyError::Overflow {
                request: 1,
                len: 100
            }
        );
        assert!(matches!(
            submit(CopyRequest::pages(sys(0), dev(0, 0), u64::MAX)),
            CopyError::Overflow { request: 1, .. }
        ));
        // Adjacent ranges in one space, and the same addresses in different spaces, are fine.
        CopyRequest::new(sys(0), sys(100), 100).validate(0).unwrap();
        CopyRequest::pages(dev(0, 0), dev(1, 0), 4)
            .validate(0)
            .unwrap();
        let one = CopyRequest::pages(sys(0), dev(0, 0), 1);
        assert_eq!(
            e.submit(CopyBatch::new().with_request(one).on_queue(QueueId(2)))
                .unwrap_err()
                .error,
            CopyError::NoSuchQueue {
                queue: QueueId(2),
                queues: 2
            }
        );
        assert_eq!(
            e.submit(
                CopyBatch::new()
                    .with_request(one)
                    .with_release(Release::Frames {
                        dev: DeviceId(0),
                        frames: vec![DevPfn(0)],
                        when: ReleaseWhen::Always
                    })
            )
            .unwrap_err()
            .error,
            CopyError::NoFrameSink
        );
        let (with_sink, _) = engine_with(config(PAGE), &backend);
        assert_eq!(
            with_sink
                .submit(
                    CopyBatch::new()
                        .with_request(one)
                        .with_release(Release::Frames {
                            dev: DeviceId(0),
                            frames: vec![DevPfn(0)],
                            when: ReleaseWhen::NotDone(1)
                        })
                )
                .unwrap_err()
                .error,
            CopyError::ReleaseOutOfRange {
                request: 1,
                requests: 1
            }
        );
        // `?` into a CopyError keeps the reason and drops the batch.
        let as_copy_error = |b: CopyBatch| -> Result<Fence, CopyError> { Ok(e.submit(b)?) };
        assert_eq!(
            as_copy_error(CopyBatch::new().on_queue(QueueId(9))).unwrap_err(),
            CopyError::NoSuchQueue {
                queue: QueueId(9),
                queues: 2
            }
        );
        // Nothing was queued by the refused submissions.
        assert_eq!(e.stats(), CopyStats::default());
        e.check_invariants().unwrap();
        // A backend error is a failed window, not a panic.
        let out_of_range = CopyRequest::pages(sys(0), dev(0, DEV_FRAMES as u32), 1);
        let report = wait(
            &e.submit(CopyBatch::new().with_request(out_of_range))
                .unwrap(),
        )
        .unwrap();
        assert!(matches!(
            report.outcome(0),
            Some(RequestOutcome::Failed {
                fault: CopyFault::DeviceAccess { .. },
                ..
            })
        ));
    }

    #[test]
    fn queue_for_picks_a_queue_per_direction() {
        let backend = FakeBackend::new();
        for (queues, want) in [
            (1, [0, 0, 0, 0, 0]),
            (2, [0, 1, 0, 0, 0]),
            (3, [0, 1, 2, 2, 2]),
        ] {
            let (e, _) = engine_with(
                CopyEngineConfig {
                    queues,
                    ..config(PAGE)
                },
                &backend,
            );
            let got: Vec<usize> = CopyDirection::ALL
                .iter()
                .map(|&d| e.queue_for(d).0)
                .collect();
            assert_eq!(got, want, "{queues} queues");
            assert_eq!(e.queues(), queues);
        }
        assert_eq!(
            CopyDirection::of(sys(0), dev(0, 0)),
            CopyDirection::HostToDevice
        );
        assert_eq!(
            CopyDirection::of(dev(0, 0), sys(0)),
            CopyDirection::DeviceToHost
        );
        assert_eq!(
            CopyDirection::of(dev(0, 0), dev(0, 1)),
            CopyDirection::DeviceLocal
        );
        assert_eq!(
            CopyDirection::of(dev(0, 0), dev(1, 0)),
            CopyDirection::PeerToPeer
        );
        assert_eq!(CopyDirection::of(sys(0), sys(9)), CopyDirection::HostLocal);
        for (i, d) in CopyDirection::ALL.iter().enumerate() {
            assert_eq!(d.index(), i);
        }
    }

    #[test]
    fn a_fault_fraction_is_deterministic_for_a_seed() {
        let failed_with = |seed: u64| {
            let backend = FakeBackend::new();
            let (e, _) = engine_with(
                CopyEngineConfig {
                    queues: 1,
                    faults: FaultPlan::Fraction {
                        seed,
                        per_million: 300_000,
                    },
                    ..config(PAGE)
                },
                &backend,
            );
            let mut batch = CopyBatch::new();
            for i in 0..40u64 {
                batch.push(CopyRequest::pages(sys(i * PAGE), dev(0, 0), 1));
            }
            let report = wait(&e.submit(batch).unwrap()).unwrap();
            assert_eq!(e.stats().windows_injected, report.failed().count() as u64);
            report.failed().collect::<Vec<_>>()
        };
        let a = failed_with(42);
        assert_eq!(a, failed_with(42));
        assert!(!a.is_empty() && a.len() < 40, "{a:?}");
        assert_ne!(a, failed_with(43));

        // A plan installed later counts windows from then on.
        let backend = FakeBackend::new();
        let e = engine(PAGE, &backend);
        let two = CopyBatch::new()
            .with_request(CopyRequest::pages(sys(0), dev(0, 0), 1))
            .with_request(CopyRequest::pages(sys(0), dev(0, 1), 1));
        wait(&e.submit(two).unwrap()).unwrap();
        e.set_fault_plan(FaultPlan::Nth {
            queue: QueueId(0),
            n: 1,
        })
        .unwrap();
        let two = CopyBatch::new()
            .with_request(CopyRequest::pages(sys(0), dev(0, 0), 1))
            .with_request(CopyRequest::pages(sys(0), dev(0, 1), 1));
        let report = wait(&e.submit(two).unwrap()).unwrap();
        assert_eq!(report.failed().collect::<Vec<_>>(), [1]);
        e.set_fault_plan(FaultPlan::None).unwrap();
    }

    proptest! {
        #[test]
        fn split_covers_a_request_exactly_once(len in 1u64..(1 << 40), w in 1u64..(1 << 34)) {
            let r = CopyRequest::new(sys(0), dev(0, 0), len);
            let w = NonZeroU64::new(w).unwrap();
            let n = r.windows(w);
            prop_assume!(n <= 100_000);
            let mut at = 0;
            let mut count = 0;
            for (offset, l) in r.split(w) {
                prop_assert_eq!(offset, at);
                prop_assert!(l >= 1 && l <= w.get());
                at += l;
                count += 1;
            }
            prop_assert_eq!(at, len);
            prop_assert_eq!(count, n);
        }
    }

    /// A random valid request inside the fake memories.
    fn arb_request() -> impl Strategy<Value = CopyRequest> {
        let space = prop_oneof![Just(None), Just(Some(0u8)), Just(Some(1u8))];
        (
            space.clone(),
            space,
            1u64..12_000,
            0u64..(1 << 16),
            0u64..(1 << 16),
        )
            .prop_map(|(s, d, len, a, b)| {
                let dev_bytes = DEV_FRAMES as u64 * PAGE;
                let end = |space: Option<u8>, pick: u64| match space {
                    None => sys(pick % (SYS_BYTES as u64 - len + 1)),
                    Some(d) => dev(d, (pick % ((dev_bytes - len) / PAGE + 1)) as u32),
                };
                CopyRequest::new(end(s, a), end(d, b), len)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random batches on random queues, with random window sizes and injected failures,
        /// against a plain byte-array model that applies each request's reported prefix in
        /// order: every byte equal at the end.
        #[test]
        fn random_batches_match_a_byte_array_model(
            window in 1u64..9_000,
            per_million in prop_oneof![Just(0u32), 0u32..400_000],
            seed in any::<u64>(),
            batches in proptest::collection::vec(
                (0usize..2, proptest::collection::vec(arb_request(), 0..6)),
                1..8,
            ),
        ) {
            let backend = FakeBackend::new();
            let (e, clock) = engine_with(
                CopyEngineConfig {
                    faults: FaultPlan::Fraction { seed, per_million },
                    link: LinkModel::pcie4_x16(),
                    ..config(window)
                },
                &backend,
            );
            let mut model = backend.memory();
            let mut outstanding: Vec<(Vec<CopyRequest>, Fence)> = Vec::new();
            let mut last_queue = None;
            let settle = |outstanding: &mut Vec<(Vec<CopyRequest>, Fence)>,
                              model: &mut Memory|
             -> Result<(), TestCaseError> {
                for (reqs, fence) in outstanding.drain(..) {
                    let report = wait(&fence).unwrap();
                    prop_assert_eq!(report.outcomes.len(), reqs.len());
                    for (r, o) in reqs.iter().zip(&report.outcomes) {
                        let cancelled = matches!(o, RequestOutcome::Cancelled { .. });
                        prop_assert!(!cancelled, "cancelled without a shutdown");
                        model.copy(r, 0, o.copied_bytes(r.len)).unwrap();
                    }
                    if per_million == 0 {
                        prop_assert!(report.is_complete());
                    }
                }
                Ok(())
            };
            for (queue, reqs) in batches {
                let reqs: Vec<_> =
                    reqs.into_iter().filter(|r| r.validate(0).is_ok()).collect();
                // Batches on one queue run in order; across queues, wait before switching so
                // that the model's order is the engine's.
                if last_queue.is_some_and(|q| q != queue) {
                    settle(&mut outstanding, &mut model)?;
                }
                last_queue = Some(queue);
                let mut batch = CopyBatch::new().on_queue(QueueId(queue));
                reqs.iter().for_each(|&r| { batch.push(r); });
                outstanding.push((reqs, e.submit(batch).unwrap()));
                prop_assert!(e.check_invariants().is_ok(), "{:?}", e.check_invariants());
            }
            settle(&mut outstanding, &mut model)?;
            prop_assert!(backend.memory() == model, "memory differs from the model");
            let s = e.stats();
            prop_assert_eq!(s.windows_injected, s.requests_failed);
            prop_assert_eq!(s.windows(), backend.copies().len() as u64);
            prop_assert_eq!(s.bytes(), backend.copies().iter().map(|w| w.len).sum::<u64>());
            prop_assert_eq!(s.modelled, clock.total());
            prop_assert!(backend.copies().iter().all(|w| w.len <= window));
            prop_assert!(e.check_invariants().is_ok(), "{:?}", e.check_invariants());
        }
    }
}
