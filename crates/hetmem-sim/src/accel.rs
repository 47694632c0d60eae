//! The simulated accelerator: a device that runs kernels on the CPU behind hetmem's `Device`
//! trait, with its own MMU (page table and per-compute-unit TLBs), a replayable fault ring, a
//! fault-servicing thread and a link model that charges modelled time (issue 3; seed 002's
//! replayable faults and fault buffer; DESIGN.md "Devices" and "Data flows").
//!
//! ```text
//!  launch(kernel, threads)          compute units (one thread each), warps of 32 lanes
//!        │                          a warp runs holding its CU's TLB lock: every access
//!        ▼                          translates through that TLB; a lane that misses keeps what
//!   warp runs lanes ──miss──►       it completed and goes on from the missing access after the
//!        │                          replay
//!        │  FaultEntry per page ──► SharedFaultRing ──► service thread: batch (256), merge
//!        │                                              duplicates, group by 2 MiB block, ask
//!        │                                              the placement policy, migrate to device
//!        │                                              memory (MigrateVma), range fault, map
//!   stalled until replay ◄─────────────── replay ◄───── the span under the notifier sequence
//!                                                       check, charge the link model
//! ```
//!
//! Kernels are written per thread index (`Kernel::thread`): they read what they need and write
//! results. A lane resumes where it missed, as a GPU replays the faulting instruction of a warp
//! rather than restarting the thread: every access a lane completes is logged (`LaneLog`: loads
//! and atomics with what they returned), and when the lane runs again after the replay its
//! completed accesses are answered from the log without touching memory, stores landing once, in
//! program order. A lane therefore needs only the page of its next access to be resident, never
//! all of its pages at once (a lane that started over needed every page it touches at the same
//! time, and livelocked once they outnumbered device memory: issue 5). An atomic reads and writes
//! under the device's atomics lock, so atomics of different compute units never interleave.
//!
//! Coherence (DESIGN.md invariant 1): the device subscribes an interval notifier over the whole
//! address space; every invalidation (the CPU faulting a page back, munmap, mprotect, another
//! device migrating, and this device's own migrations, which turn remote mappings of system pages
//! into device frames) unmaps the range under the page-table lock and then shoots down every
//! compute unit's TLB, which waits for the warp in flight on each ([`SharedMmu`]), before it
//! returns. The service thread maps a span only if the notifier sequence did not move since its
//! range fault (`read_retry` under the page-table lock).
//!
//! Locks: a compute unit holds its TLB lock for a warp and takes the page-table lock only to walk
//! on a TLB miss; the service thread takes the page-table lock to map; neither waits for the
//! other's work beyond that, so faults are serviced while every compute unit keeps running its
//! other warps.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Weak,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use hetmem::{
    migrate::{MigrateArgs, MigrateVma, ToSystem, TriggerScope},
    AddressSpace, ComputeDevice, Device, DeviceMemory, MigrateDriver, MigrateError, MmError,
};
use hetmem_core::{
    addr::PAGES_PER_HUGE,
    copy_engine::{CopyEngine, CopyEngineConfig, FaultPlan},
    device_mmu::{Access, MmuConfig, MmuFault, PtePerms, PteTarget},
    fault_ring::{
        FaultAccess, FaultBatch, FaultClient, FaultEntry, PushOutcome, ReplayDecision,
        ReplayPolicy, ReplayScheduler, SharedFaultRing, DEFAULT_BATCH_SIZE,
    },
    link::{
        AsyncTransfers, Cause, ClockReport, DeviceClock, Direction, LaunchMark, LinkModel,
        ModelTime,
    },
    migrate::{MigrateEntry, PageLoc, SelectFlags, SkipReason, Trigger},
    notifier::{IntervalNotifier, IntervalNotifierOps, NotifierRange, NotifyEvent},
    page_state::Location,
    pfn::HmmPfn,
    pool::MemoryKind,
    range_fault::{HmmRange, RangeFaultError},
    shared_mmu::{CuGuard, SharedMmu},
    DeviceId, Owner, PageRange, VirtAddr, HUGE_PAGE_SIZE, PAGE_SIZE,
};
use parking_lot::{Condvar, Mutex};

use crate::copy::{migrate_between, SimCopyBackend};

mod dup;
use crate::latency::{FaultLatency, LatencyRecorder};
use crate::placement::{BlockFaults, Granularity, PlacementAction, PlacementPolicy};

/// Lanes per warp.
pub const WARP_SIZE: u64 = 32;

/// The longest a CPU fault waits for a throttling period to end, whatever the policy says.
const MAX_CPU_THROTTLE: Duration = Duration::from_millis(100);

/// How the accelerator is built.
#[derive(Clone, Debug)]
pub struct AccelConfig {
    /// Device memory in bytes (rounded down to 2 MiB chunks).
    pub memory_bytes: u64,
    /// Compute units, each a host thread with its own TLB.
    pub compute_units: usize,
    /// Warps resident on a compute unit at a time (the grid runs in waves, as on a GPU where an
    /// SM holds 32-64 warps): a stalled warp holds its slot until its fault is serviced.
    pub warps_per_cu: usize,
    /// Entries of each compute unit's TLB.
    pub tlb_entries: usize,
    /// Device virtual address width; an access beyond it is a fatal fault.
    pub va_bits: u32,
    /// Fault ring capacity (a power of two).
    pub ring_capacity: usize,
    /// Faults fetched per batch.
    pub batch_size: usize,
    /// How long the service waits after the first fault of an empty ring before it fetches a
    /// batch (interrupt moderation; zero fetches at once).
    pub fault_coalesce: Duration,
    /// The wait ends as soon as every running compute unit has all its resident warps stalled
    /// (or has finished), `fault_coalesce` being only its limit. A GPU's warps go on running
    /// for the tens of microseconds the driver takes to be woken and fetch, so nearly every warp
    /// that will fault has faulted by then; the simulator's warps run on a few host threads,
    /// and a fixed wait caught however many the host scheduler had let run. With this, a batch
    /// holds what the warps in flight fault on, the same from one run to the next.
    pub coalesce_until_stalled: bool,
    /// When stalled warps are replayed.
    pub replay: ReplayPolicy,
    /// Faults are replayable (NVIDIA, AMD with XNACK on). Without retry (XNACK off) a miss is
    /// fatal: ranges must be made resident before the launch ([`Accelerator::make_resident`]).
    pub retry: bool,
    /// The link model that charges modelled time.
    pub link: LinkModel,
    /// Where faulted pages go (default: migrate whole 2 MiB blocks, AMD's default granularity).
    pub placement: Arc<dyn PlacementPolicy>,
}

impl Default for AccelConfig {
    fn default() -> Self {
        AccelConfig {
            memory_bytes: 256 << 20,
            compute_units: 4,
            warps_per_cu: 48,
            tlb_entries: 64,
            va_bits: 48,
            ring_capacity: 4096,
            batch_size: DEFAULT_BATCH_SIZE,
            fault_coalesce: Duration::from_micros(50),
            coalesce_until_stalled: false,
            replay: ReplayPolicy::default(),
            retry: true,
            link: LinkModel::pcie4_x16(),
            placement: Arc::new(Granularity::default()),
        }
    }
}

/// Errors of the accelerator's own API.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// The address space or device attachment failed.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// A configuration value is unusable.
    #[error("bad accelerator configuration: {0}")]
    Config(String),
    /// Making a range resident failed.
    #[error("range at {addr} cannot be mapped on the device: {source}")]
    Residency {
        /// Start of the range.
        addr: VirtAddr,
        /// Why.
        source: RangeFaultError,
    },
    /// A launch of zero threads.
    #[error("a launch needs at least one thread")]
    EmptyLaunch,
    /// A range the device's page table cannot hold (beyond its address width).
    #[error("device page table: {0}")]
    Mmu(#[from] hetmem_core::device_mmu::MmuError),
    /// A launch failed.
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

/// Why a launch failed: the fault the service cancelled, with the address and the access.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// A fault that cannot be serviced (no mapping, no permission, beyond the address width, a
    /// miss without retry).
    #[error("fatal {access:?} fault at {addr}: {reason}")]
    Fatal {
        /// The faulting address.
        addr: VirtAddr,
        /// The access.
        access: FaultAccess,
        /// Why it is fatal.
        reason: String,
    },
    /// The accelerator was shut down with the launch in flight.
    #[error("the accelerator shut down during the launch")]
    Shutdown,
}

/// A marker that a lane missed: propagate it with `?`; the lane runs again after the replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Miss;

/// A kernel: what one thread of the grid does.
pub trait Kernel: Send + Sync {
    /// Runs thread `tid`. Read and write device-visible memory only through `t`; return `Err`
    /// (with `?`) as soon as an access misses.
    fn thread(&self, tid: u64, t: &mut Thread<'_>) -> Result<(), Miss>;
}

impl<F> Kernel for F
where
    F: Fn(u64, &mut Thread<'_>) -> Result<(), Miss> + Send + Sync,
{
    fn thread(&self, tid: u64, t: &mut Thread<'_>) -> Result<(), Miss> {
        self(tid, t)
    }
}

/// Counters of the accelerator (issue 3 item 8).
#[derive(Debug, Default)]
struct Counters {
    faults_read: AtomicU64,
    faults_write: AtomicU64,
    faults_atomic: AtomicU64,
    faults_dropped: AtomicU64,
    faults_lost: AtomicU64,
    faults_flushed: AtomicU64,
    faults_stale: AtomicU64,
    pages_busy: AtomicU64,
    pages_from_peers: AtomicU64,
    nonreplayable: AtomicU64,
    duplicates: AtomicU64,
    fatal: AtomicU64,
    batches: AtomicU64,
    batched_faults: AtomicU64,
    replays: AtomicU64,
    pages_to_device: AtomicU64,
    pages_mapped_remote: AtomicU64,
    pages_to_host: AtomicU64,
    cpu_faults: AtomicU64,
    cpu_throttles: AtomicU64,
    pages_serviced: AtomicU64,
    service_ns: AtomicU64,
    service_cpu_ns: AtomicU64,
    migrations: AtomicU64,
    tlb_invalidations: AtomicU64,
    launches: AtomicU64,
    lanes_run: AtomicU64,
    lane_retries: AtomicU64,
    remote_accesses: AtomicU64,
    policy_migrations: AtomicU64,
    pages_duplicated: AtomicU64,
    copies_dropped: AtomicU64,
}

/// A snapshot of the accelerator's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccelStats {
    /// Faults raised by loads.
    pub faults_read: u64,
    /// Faults raised by stores.
    pub faults_write: u64,
    /// Faults raised by atomics.
    pub faults_atomic: u64,
    /// Replayable faults the full ring dropped (raised again on replay).
    pub faults_dropped: u64,
    /// Non-replayable faults the full ring lost (their launch fails).
    pub faults_lost: u64,
    /// Non-replayable faults raised (no retry: each fails its launch).
    pub nonreplayable: u64,
    /// Replayable faults flushed from the ring before a replay (batch-flush policy).
    pub faults_flushed: u64,
    /// Faults whose page an earlier batch had already mapped as the access needs.
    pub faults_stale: u64,
    /// Pages left for a later replay because another thread held them locked.
    pub pages_busy: u64,
    /// Pages migrated into this device from other devices (device to device, copy engines).
    pub pages_from_peers: u64,
    /// Faults merged into another of the same batch (same page).
    pub duplicates: u64,
    /// Fatal faults (launches failed).
    pub fatal: u64,
    /// Batches serviced.
    pub batches: u64,
    /// Faults fetched in those batches (mean batch size = this / batches).
    pub batched_faults: u64,
    /// Replays issued.
    pub replays: u64,
    /// Pages migrated into device memory by fault servicing.
    pub pages_to_device: u64,
    /// Pages mapped remotely (system memory over the link).
    pub pages_mapped_remote: u64,
    /// Pages brought back to system memory by CPU faults on device pages (each fault brings
    /// back its page, or its whole 2 MiB block when the block moved as one).
    pub pages_to_host: u64,
    /// CPU faults on device pages that migrated them back (`pages_to_host` counts their pages).
    pub cpu_faults: u64,
    /// CPU faults that waited for a thrashing throttling period to end first
    /// ([`PlacementPolicy::cpu_fault_delay`]).
    pub cpu_throttles: u64,
    /// Pages the fault service mapped on the device (faulted pages and those the placement
    /// policy took along).
    pub pages_serviced: u64,
    /// Time the fault service thread spent servicing batches (not waiting for faults).
    pub service_busy: Duration,
    /// CPU time the fault service thread used servicing batches (without the time it waited for
    /// a core or for a compute unit to finish its warp).
    pub service_cpu: Duration,
    /// Migrations (one per region of each serviced span that moved pages).
    pub migrations: u64,
    /// TLB invalidations dispatched.
    pub tlb_invalidations: u64,
    /// Launches.
    pub launches: u64,
    /// Lane executions (first runs and re-runs).
    pub lanes_run: u64,
    /// Lane re-runs after a miss.
    pub lane_retries: u64,
    /// Accesses that went over the link to memory outside this device (what access counters
    /// count).
    pub remote_accesses: u64,
    /// Blocks migrated in because the placement policy asked between batches (its access
    /// counters, or a prefetcher reaching past the faulted block).
    pub policy_migrations: u64,
    /// Pages copied into this device as read-only copies (read duplication).
    pub pages_duplicated: u64,
    /// Read-only copies dropped (a write collapsed them, the page moved, eviction).
    pub copies_dropped: u64,
    /// Read-only copies held now.
    pub copies_held: u64,
}

/// The device proper: what `AddressSpace` holds as a `Device`.
pub struct SimDevice {
    mm: &'static Arc<AddressSpace>,
    mem: Arc<DeviceMemory>,
    mmu: SharedMmu,
    /// Held by a lane from its first atomic until it completes or misses.
    atomics: Mutex<()>,
    ring: SharedFaultRing,
    clock: Arc<DeviceClock>,
    /// Copy engines for device-to-device migrations (system pages move by UFFDIO_MOVE, which
    /// copies nothing).
    copy: CopyEngine,
    config: AccelConfig,
    sub: Mutex<Option<Arc<IntervalNotifier>>>,
    /// Read-only copies of duplicated system pages (read duplication).
    dups: Mutex<dup::Duplicates>,
    /// Replay epoch: stalled warps wait for it to move.
    epoch: Mutex<u64>,
    replayed: Condvar,
    /// Compute unit threads of the launches in flight that have not finished.
    units_running: AtomicUsize,
    /// Of those, the ones waiting for a replay with every resident warp stalled.
    units_stalled: AtomicUsize,
    /// The fatal fault of the launch in flight, if any (one launch at a time per device).
    fatal: Mutex<Option<LaunchError>>,
    active_launches: AtomicU64,
    /// Held by the service thread while it services a batch. [`Launch::wait`] passes through it
    /// once the compute units are done, so that it returns only after the batch in flight is
    /// over: the replay of that batch may be what let the last warps finish, and the rest of it
    /// (its counters, its latencies) must not run behind the caller's back.
    servicing: Mutex<()>,
    /// Policy migrations (counter notifications, readahead) taken while no launch was in
    /// flight, for the next launch (at most [`MAX_DEFERRED`], the newest).
    deferred: Mutex<Vec<(PageRange, Trigger)>>,
    /// Device clock (ns) when the launch in flight started.
    launch_started: AtomicU64,
    stop: AtomicBool,
    counters: Counters,
    /// Fault-service latency of every fault-buffer entry serviced.
    latency: FaultLatencyRecorder,
    started: Instant,
}

/// Both clocks' latency histograms.
#[derive(Debug, Default)]
struct FaultLatencyRecorder {
    wall: LatencyRecorder,
    modelled: LatencyRecorder,
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevice")
            .field("id", &self.mem.id())
            .field("compute_units", &self.config.compute_units)
            .finish_non_exhaustive()
    }
}

impl Device for SimDevice {
    fn memory(&self) -> &Arc<DeviceMemory> {
        &self.mem
    }

    fn migrate_to_ram_in(
        &self,
        mm: &AddressSpace,
        region: &Arc<hetmem::region::Region>,
        addr: VirtAddr,
    ) -> Result<(), MigrateError> {
        // A page of a block that moved as one comes back with its whole block
        // (`hetmem::fault::migrate_to_ram`): the copy back is that long.
        let pages = if region.range().contains(addr) && region.states.get(region.index(addr)).huge {
            PAGES_PER_HUGE
        } else {
            1
        };
        // Thrashing mitigation may throttle the CPU: the faulting thread sleeps until the
        // period ends (bounded, whatever the policy says), then the fault is serviced. Only a
        // CPU fault: a device's range fault reaching this device's page comes here too, on that
        // device's fault service thread, which must not sleep for the CPU.
        let cpu_fault = hetmem::migrate::current_trigger() == Trigger::CpuFault;
        if let Some(nap) = cpu_fault
            .then(|| self.config.placement.cpu_fault_delay(addr))
            .flatten()
        {
            self.counters.cpu_throttles.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(nap.min(MAX_CPU_THROTTLE));
        }
        // The notifier callback (Migrate event) unmaps the page from the device first.
        hetmem::fault::migrate_to_ram(mm, region, &self.mem, addr, false, &ToSystem)?;
        self.config.placement.migrated_to_host(addr);
        self.counters.cpu_faults.fetch_add(1, Ordering::Relaxed);
        self.counters
            .pages_to_host
            .fetch_add(pages, Ordering::Relaxed);
        self.clock
            .charge(Cause::CpuFault, self.config.link.cpu_fault());
        self.clock.charge(
            Cause::MigrateToHost,
            self.config
                .link
                .transfer(Direction::DeviceToHost, pages * PAGE_SIZE),
        );
        Ok(())
    }
}

impl IntervalNotifierOps for SimDevice {
    fn invalidate(&self, sub: &IntervalNotifier, range: &NotifierRange, cur_seq: u64) -> bool {
        // Every event, this device's own migrations included: a page it mapped remotely that
        // moves into its memory must lose the remote mapping.
        let end = range.end.0.min(1u64 << self.config.va_bits);
        let r = PageRange::from_bounds(range.start.0, end).ok();
        // This device's own migration into its memory (the service thread, inside `migrate_in`
        // and `pull_from_peers`) collects system pages and peers' pages only: its remote mappings
        // of them must go, its local mappings of frames it already holds stay (they are not
        // collected, and dropping them would make every warp on them fault again).
        let own_to_device = range.event == NotifyEvent::Migrate
            && range.owner == Some(self.mem.owner())
            && OWN_TO_DEVICE.with(Cell::get);
        // Read duplication starting on a page: only writable mappings go (remote ones, since a
        // duplicated page is never local in a writable way); read copies stay. The duplicating
        // device's own sequence does not move, or its copies would never map.
        let write_protect = range.event == NotifyEvent::WriteProtect;
        let own = range.owner == Some(self.mem.owner());
        let unmap = |c: &mut hetmem_core::device_mmu::MmuCore| {
            if !(write_protect && own) {
                sub.set_seq(cur_seq);
            }
            let Some(r) = r else {
                return (0, Vec::new());
            };
            if write_protect {
                let n = c.unmap_where(r, |t| !matches!(t, PteTarget::Local(_)));
                return (n.unwrap_or(0), Vec::new());
            }
            // This device's read copies in the range go with every other event.
            let copies = self.unmap_copies(c, r);
            // Out of range cannot happen (clipped to the width above); nothing to undo.
            let n = if own_to_device {
                c.unmap_where(r, |t| !matches!(t, PteTarget::Local(_)))
            } else {
                c.unmap(r).map(|rep| rep.pages)
            }
            .unwrap_or(0);
            (n + copies.len() as u64, copies)
        };
        if !range.blockable {
            // A shootdown waits for the warps in flight: not allowed here. What was queued stays
            // queued and goes out with the next shootdown; the caller retries. (Never in hetmem:
            // every invalidation may sleep. A read copy is refused rather than freed unreachable.)
            if r.is_some_and(|r| self.dups.lock().any_in(r)) {
                return false;
            }
            return self.mmu.try_update(unmap).is_some() && self.mmu.try_sync();
        }
        let (unmapped, copies) = self.mmu.update(unmap);
        // Always, even when this update unmapped nothing: the leaves may have gone with another
        // thread's update whose shootdown is still reaching the units, and until it has, a warp
        // can still store through them (into a frame this invalidation's caller is about to copy
        // or hand out: a lost device store).
        // The frames belong to hetmem's page states, not to this table: nothing to free.
        self.mmu.shootdown();
        self.free_copies(&copies);
        if unmapped > 0 {
            self.counters
                .tlb_invalidations
                .fetch_add(1, Ordering::Relaxed);
            self.clock
                .charge(Cause::TlbInvalidate, self.config.link.tlb_invalidate(1));
        }
        true
    }
}

thread_local! {
    /// Set while this thread runs a device's own migration of system pages into its memory.
    static OWN_TO_DEVICE: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as inside its own to-device migration until dropped.
struct OwnToDevice;

impl OwnToDevice {
    fn enter() -> Self {
        OWN_TO_DEVICE.with(|c| c.set(true));
        OwnToDevice
    }
}

impl Drop for OwnToDevice {
    fn drop(&mut self) {
        OWN_TO_DEVICE.with(|c| c.set(false));
    }
}

/// Allocates device frames for a fault-driven migration (the driver's `alloc_and_copy`): a page
/// left without a frame (device memory full) stays in system memory and is mapped remotely.
struct FaultDriver<'a> {
    mem: &'a DeviceMemory,
    /// Only pages inside these get a destination.
    spans: &'a [PageRange],
}

impl MigrateDriver for FaultDriver<'_> {
    fn alloc_and_copy(&self, range: PageRange, entries: &mut [MigrateEntry], compound: &[bool]) {
        let mut pool = self.mem.pool().lock();
        let wanted = |k: usize| {
            let a = range.page(k as u64);
            self.spans.iter().any(|s| s.contains(a))
        };
        let mut k = 0;
        while k < entries.len() {
            if compound[k] && wanted(k) && wanted(k + PAGES_PER_HUGE as usize - 1) {
                if let Ok(base) = pool.alloc_huge() {
                    for j in 0..hetmem_core::addr::PAGES_PER_HUGE as usize {
                        entries[k + j].dst = Some(PageLoc::Device {
                            dev: self.mem.id(),
                            frame: hetmem_core::DevPfn(base.0 + j as u32),
                        });
                    }
                    k += hetmem_core::addr::PAGES_PER_HUGE as usize;
                    continue;
                }
            }
            if entries[k].migrates() && wanted(k) {
                if let Ok(frame) = pool.alloc_page() {
                    entries[k].dst = Some(PageLoc::Device {
                        dev: self.mem.id(),
                        frame,
                    });
                }
            }
            k += 1;
        }
    }
    fn finalize(&self, _: PageRange, _: &[MigrateEntry]) {}
}

/// Takes one off a count when dropped.
struct Uncount<'a>(&'a AtomicUsize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The accelerator as its user holds it: drop it to shut the device down (its pages come back to
/// system memory, its threads end).
pub struct Accelerator {
    dev: Arc<SimDevice>,
    service: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accelerator")
            .field("dev", &self.dev)
            .finish()
    }
}

impl Accelerator {
    /// Builds an accelerator in this process's address space and starts its fault service.
    pub fn new(config: AccelConfig) -> Result<Accelerator, AccelError> {
        if config.compute_units == 0 || config.compute_units > u16::MAX as usize {
            return Err(AccelError::Config("compute_units must be 1..=65535".into()));
        }
        if config.warps_per_cu == 0 {
            return Err(AccelError::Config("warps_per_cu must be at least 1".into()));
        }
        if config.batch_size == 0 {
            return Err(AccelError::Config("batch_size must be at least 1".into()));
        }
        config
            .link
            .validate()
            .map_err(|e| AccelError::Config(e.to_string()))?;
        let ring = SharedFaultRing::new(config.ring_capacity)
            .map_err(|e| AccelError::Config(e.to_string()))?;
        let mm = AddressSpace::current()?;
        let cfg = config.clone();
        let dev = mm.attach_device(move |id: DeviceId| {
            let owner = Owner(0xacce_0000 + id.0 as u64);
            let mem = DeviceMemory::new(id, owner, MemoryKind::DevicePrivate, cfg.memory_bytes)?;
            let mmu = SharedMmu::new(MmuConfig {
                dev: id,
                va_bits: cfg.va_bits,
                compute_units: cfg.compute_units,
                tlb_entries: cfg.tlb_entries,
            })
            .map_err(|e| MmError::Backend(format!("device MMU: {e}")))?;
            let clock = Arc::new(DeviceClock::new());
            let copy = CopyEngine::new(
                CopyEngineConfig {
                    link: cfg.link.clone(),
                    ..CopyEngineConfig::default()
                },
                Arc::new(SimCopyBackend::new(mm)),
                Arc::clone(&clock),
            )
            .map_err(|e| MmError::Backend(format!("copy engine: {e}")))?;
            Ok(Arc::new(SimDevice {
                mm,
                mem: Arc::new(mem),
                mmu,
                atomics: Mutex::new(()),
                ring,
                clock,
                copy,
                config: cfg,
                sub: Mutex::new(None),
                dups: Mutex::new(dup::Duplicates::default()),
                epoch: Mutex::new(0),
                replayed: Condvar::new(),
                units_running: AtomicUsize::new(0),
                units_stalled: AtomicUsize::new(0),
                fatal: Mutex::new(None),
                active_launches: AtomicU64::new(0),
                servicing: Mutex::new(()),
                deferred: Mutex::new(Vec::new()),
                launch_started: AtomicU64::new(0),
                stop: AtomicBool::new(false),
                counters: Counters::default(),
                latency: FaultLatencyRecorder::default(),
                started: Instant::now(),
            }))
        })?;
        let ops: Weak<dyn IntervalNotifierOps> = Arc::downgrade(&dev) as Weak<SimDevice>;
        let sub = mm
            .notifiers()
            .insert(VirtAddr(0), VirtAddr(1u64 << config.va_bits.min(63)), ops);
        *dev.sub.lock() = Some(sub);
        let d = Arc::clone(&dev);
        let service = std::thread::Builder::new()
            .name(format!("hetmem-accel{}-faults", dev.mem.id().0))
            .spawn(move || d.service_loop())
            .map_err(|e| AccelError::Config(format!("spawning the fault service: {e}")))?;
        Ok(Accelerator {
            dev,
            service: Some(service),
        })
    }

    /// The device id in the address space.
    pub fn id(&self) -> DeviceId {
        self.dev.mem.id()
    }

    /// The device's memory (pool statistics: pages in use, page_in, page_out).
    pub fn memory(&self) -> &Arc<DeviceMemory> {
        &self.dev.mem
    }

    /// Counters.
    pub fn stats(&self) -> AccelStats {
        let c = &self.dev.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AccelStats {
            faults_read: g(&c.faults_read),
            faults_write: g(&c.faults_write),
            faults_atomic: g(&c.faults_atomic),
            faults_dropped: g(&c.faults_dropped),
            faults_lost: g(&c.faults_lost),
            nonreplayable: g(&c.nonreplayable),
            faults_flushed: g(&c.faults_flushed),
            faults_stale: g(&c.faults_stale),
            pages_busy: g(&c.pages_busy),
            pages_from_peers: g(&c.pages_from_peers),
            duplicates: g(&c.duplicates),
            fatal: g(&c.fatal),
            batches: g(&c.batches),
            batched_faults: g(&c.batched_faults),
            replays: g(&c.replays),
            pages_to_device: g(&c.pages_to_device),
            pages_mapped_remote: g(&c.pages_mapped_remote),
            pages_to_host: g(&c.pages_to_host),
            cpu_faults: g(&c.cpu_faults),
            cpu_throttles: g(&c.cpu_throttles),
            pages_serviced: g(&c.pages_serviced),
            service_busy: Duration::from_nanos(g(&c.service_ns)),
            service_cpu: Duration::from_nanos(g(&c.service_cpu_ns)),
            migrations: g(&c.migrations),
            tlb_invalidations: g(&c.tlb_invalidations),
            launches: g(&c.launches),
            lanes_run: g(&c.lanes_run),
            lane_retries: g(&c.lane_retries),
            remote_accesses: g(&c.remote_accesses),
            policy_migrations: g(&c.policy_migrations),
            pages_duplicated: g(&c.pages_duplicated),
            copies_dropped: g(&c.copies_dropped),
            copies_held: self.dev.dups.lock().len() as u64,
        }
    }

    /// Fault-service latency of every fault serviced so far ([`crate::latency`]).
    pub fn fault_latency(&self) -> FaultLatency {
        FaultLatency {
            wall: self.dev.latency.wall.snapshot(),
            modelled: self.dev.latency.modelled.snapshot(),
        }
    }

    /// Charges a migration of `bytes` in `dir` that went past this device's own copy paths (a
    /// runtime's eviction or prefetch back to system memory, which the address space carries out)
    /// to its modelled clock, as one transfer over its link.
    pub fn charge_migration(&self, dir: Direction, bytes: u64) {
        self.dev.charge_migration(dir, bytes);
    }

    /// Counters of the copy engines (device-to-device migrations into this device).
    pub fn copy_stats(&self) -> hetmem_core::copy_engine::CopyStats {
        self.dev.copy.stats()
    }

    /// Fault injection (issue 6; never active unless a test calls this): the copy engines that
    /// bring pages into this device from its peers fail windows as `plan` says
    /// ([`FaultPlan::None`] ends it). A failed window rolls back its pages, which stay valid on
    /// the peer; the service maps or migrates what it can.
    pub fn set_copy_fault_plan(&self, plan: FaultPlan) -> Result<(), AccelError> {
        self.dev
            .copy
            .set_fault_plan(plan)
            .map_err(|e| AccelError::Config(format!("copy fault plan: {e}")))
    }

    /// Modelled time by cause.
    pub fn clock(&self) -> ClockReport {
        self.dev.clock.snapshot()
    }

    /// Where a launch begins on the device's timeline, for [`Accelerator::launch_computed`].
    pub fn launch_mark(&self) -> LaunchMark {
        self.dev.clock.launch_mark()
    }

    /// Places the modelled compute of a launch that began at `mark` and has ended on the
    /// device's timeline: after its warps' stalls, beside its background work
    /// ([`DeviceClock::launch_computed`]).
    pub fn launch_computed(&self, mark: LaunchMark, compute: ModelTime) {
        self.dev.clock.launch_computed(mark, compute);
    }

    /// Checks the device MMU's invariants (page table, TLBs, pending invalidations).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.dev.mmu.check_invariants()?;
        self.dev.ring.check_invariants()?;
        self.dev.check_coherence()
    }

    /// Makes `range` resident for the device before a launch, as a driver without retry (AMD's
    /// XNACK off) must: migrates what it can into device memory and maps every page (writable
    /// when `write`).
    pub fn make_resident(&self, range: PageRange, write: bool) -> Result<(), AccelError> {
        self.service_range(range, write, PlacementAction::Migrate)
    }

    /// Maps every page of `range` where it is, migrating nothing (writable when `write`).
    pub fn map_remote(&self, range: PageRange, write: bool) -> Result<(), AccelError> {
        self.service_range(range, write, PlacementAction::MapRemote)
    }

    /// Services a fault on every page of `range`, block by block, with `action`.
    fn service_range(
        &self,
        range: PageRange,
        write: bool,
        action: PlacementAction,
    ) -> Result<(), AccelError> {
        let access = if write {
            FaultAccess::Write
        } else {
            FaultAccess::Read
        };
        for block in range.chunks(HUGE_PAGE_SIZE) {
            let pages: Vec<(VirtAddr, FaultAccess)> = block.pages().map(|a| (a, access)).collect();
            self.dev
                .service_faults(&pages, Some(action))
                .map_err(|(addr, _, source)| AccelError::Residency { addr, source })?;
        }
        Ok(())
    }

    /// Drops the device's mappings of `range` (and its read copies there); when it returns no
    /// warp can reach them.
    pub fn unmap(&self, range: PageRange) -> Result<(), AccelError> {
        unmap(&self.dev, range)
    }

    /// Read duplication of `range` (`cudaMemPrefetchAsync` to this device of a read-mostly
    /// range): read-only copies of its pages in this device's memory, mapped, while the pages stay
    /// in system memory for every other reader. Pages other devices hold come back to system
    /// memory first; pages this device holds, and those it cannot copy (shared memory, device
    /// memory full), are left as they are. Returns the pages copied.
    pub fn read_duplicate(&self, range: PageRange) -> u64 {
        let mut n = 0;
        for block in range.chunks(HUGE_PAGE_SIZE) {
            n += self.dev.duplicate_in(block).len() as u64;
        }
        n
    }

    /// Drops this device's read copies inside `range` (the pages stay in system memory).
    /// Returns how many went.
    pub fn drop_copies(&self, range: PageRange) -> u64 {
        self.dev.drop_copies(range)
    }

    /// Drops every read copy this device holds. Returns how many went.
    pub fn drop_all_copies(&self) -> u64 {
        let hull = self.dev.dups.lock().hull();
        hull.map_or(0, |r| self.dev.drop_copies(r))
    }

    /// Clears the accessed bits of `range` and returns the ranges used since the last call; the
    /// TLBs drop those ranges, so the next access sets the bit again.
    pub fn take_accessed(&self, range: PageRange) -> Result<Vec<PageRange>, AccelError> {
        take_accessed(&self.dev, range)
    }

    /// A weak handle for policies running inside this device (see [`AccelHandle`]).
    pub fn handle(&self) -> AccelHandle {
        AccelHandle {
            dev: Arc::downgrade(&self.dev),
            id: self.dev.mem.id(),
        }
    }

    /// Launches `kernel` over `threads` threads (warps of [`WARP_SIZE`] lanes spread over the
    /// compute units). Returns at once; [`Launch::wait`] collects the result.
    pub fn launch(&self, kernel: Arc<dyn Kernel>, threads: u64) -> Result<Launch, AccelError> {
        if threads == 0 {
            return Err(AccelError::EmptyLaunch);
        }
        // The program's munmap or madvise returned once its userfaultfd event was read, maybe
        // before it was handled: the device pages it discards must be gone before any warp
        // can read them (found by the model test, issue 6).
        self.dev.mm.sync_events();
        self.dev
            .launch_started
            .store(self.dev.now_ns(), Ordering::Release);
        *self.dev.fatal.lock() = None;
        self.dev.counters.launches.fetch_add(1, Ordering::Relaxed);
        self.dev.active_launches.fetch_add(1, Ordering::AcqRel);
        let warps = threads.div_ceil(WARP_SIZE);
        let units = self.dev.config.compute_units as u64;
        let started = Instant::now();
        let clock_before = self.dev.clock.snapshot();
        let mut handles = Vec::new();
        // Every unit counted before the first starts, so that the service never takes the units
        // already stalled for all of them (counting each as it was spawned let the first unit's
        // faults go as a batch of their own before the second was counted).
        let spawn = units.min(warps);
        self.dev
            .units_running
            .fetch_add(spawn as usize, Ordering::AcqRel);
        for cu in 0..spawn {
            let dev = Arc::clone(&self.dev);
            let kernel = Arc::clone(&kernel);
            let spawned = std::thread::Builder::new()
                .name(format!("hetmem-accel-cu{cu}"))
                .spawn(move || {
                    // Uncounted however the unit ends (a kernel that panics included).
                    let _running = Uncount(&dev.units_running);
                    dev.run_unit(cu as usize, &*kernel, threads)
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // This unit and those not spawned after it.
                    self.dev
                        .units_running
                        .fetch_sub((spawn - cu) as usize, Ordering::AcqRel);
                    // The units already running see the fatal error and stop.
                    self.dev.set_fatal(LaunchError::Shutdown);
                    for h in handles {
                        let _ = h.join();
                    }
                    self.dev.active_launches.fetch_sub(1, Ordering::AcqRel);
                    return Err(AccelError::Config(format!("spawning a compute unit: {e}")));
                }
            }
        }
        Ok(Launch {
            dev: Arc::clone(&self.dev),
            handles,
            started,
            clock_before,
        })
    }
}

/// Most policy migrations kept for the next launch.
const MAX_DEFERRED: usize = 4096;

/// A weak handle on an accelerator for the policies that run inside its own service thread (a
/// placement policy that samples accessed bits to choose eviction victims): it does not keep the
/// device alive, so a policy holding it makes no reference cycle, and its calls fail once the
/// device is gone.
#[derive(Clone, Debug)]
pub struct AccelHandle {
    dev: Weak<SimDevice>,
    id: DeviceId,
}

impl AccelHandle {
    /// The device.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// [`Accelerator::drop_copies`]; `None` once the device is gone.
    pub fn drop_copies(&self, range: PageRange) -> Option<u64> {
        Some(self.dev.upgrade()?.drop_copies(range))
    }

    /// [`Accelerator::charge_migration`]; false once the device is gone.
    pub fn charge_migration(&self, dir: Direction, bytes: u64) -> bool {
        self.dev
            .upgrade()
            .map(|d| d.charge_migration(dir, bytes))
            .is_some()
    }

    /// The end of the device's modelled timeline ([`ClockReport::elapsed`]); `None` once the
    /// device is gone.
    pub fn elapsed(&self) -> Option<ModelTime> {
        Some(self.dev.upgrade()?.clock.snapshot().elapsed)
    }

    /// Free frames of the device's memory; `None` once the device is gone.
    pub fn free_frames(&self) -> Option<u64> {
        Some(self.dev.upgrade()?.free_frames())
    }

    /// [`Accelerator::take_accessed`]; `None` once the device is gone.
    pub fn take_accessed(&self, range: PageRange) -> Option<Result<Vec<PageRange>, AccelError>> {
        let dev = self.dev.upgrade()?;
        Some(take_accessed(&dev, range))
    }

    /// [`Accelerator::unmap`] (a policy revoking mappings it chose, so that the next access
    /// faults and is decided again); `None` once the device is gone.
    pub fn unmap(&self, range: PageRange) -> Option<Result<(), AccelError>> {
        let dev = self.dev.upgrade()?;
        Some(unmap(&dev, range))
    }
}

fn unmap(dev: &SimDevice, range: PageRange) -> Result<(), AccelError> {
    let (unmapped, copies) = dev.mmu.update(|c| {
        let copies = dev.unmap_copies(c, range);
        c.unmap(range).map(|u| (u, copies))
    })?;
    dev.mmu.shootdown();
    dev.free_copies(&copies);
    if unmapped.pages > 0 {
        dev.counters
            .tlb_invalidations
            .fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn take_accessed(dev: &SimDevice, range: PageRange) -> Result<Vec<PageRange>, AccelError> {
    let young = dev.mmu.update(|c| c.clear_accessed(range))?;
    if !young.is_empty() {
        dev.mmu.shootdown();
    }
    Ok(young)
}

impl Device for Accelerator {
    fn memory(&self) -> &Arc<DeviceMemory> {
        &self.dev.mem
    }

    fn migrate_to_ram_in(
        &self,
        mm: &AddressSpace,
        region: &Arc<hetmem::region::Region>,
        addr: VirtAddr,
    ) -> Result<(), MigrateError> {
        self.dev.migrate_to_ram_in(mm, region, addr)
    }
}

impl ComputeDevice for Accelerator {
    type Kernel = dyn Kernel;
    type Launch = Launch;
    type Error = AccelError;

    fn launch(&self, kernel: Arc<dyn Kernel>, threads: u64) -> Result<Launch, AccelError> {
        Accelerator::launch(self, kernel, threads)
    }

    fn wait(&self, launch: Launch) -> Result<(), AccelError> {
        launch.wait()?;
        Ok(())
    }

    fn make_resident(&self, range: PageRange, write: bool) -> Result<(), AccelError> {
        Accelerator::make_resident(self, range, write)
    }

    fn map_remote(&self, range: PageRange, write: bool) -> Result<(), AccelError> {
        Accelerator::map_remote(self, range, write)
    }

    fn unmap(&self, range: PageRange) -> Result<(), AccelError> {
        Accelerator::unmap(self, range)
    }

    fn take_accessed(&self, range: PageRange) -> Result<Vec<PageRange>, AccelError> {
        Accelerator::take_accessed(self, range)
    }

    fn clock(&self) -> ClockReport {
        Accelerator::clock(self)
    }
}

impl Drop for Accelerator {
    fn drop(&mut self) {
        self.dev.stop.store(true, Ordering::Release);
        self.dev.replay();
        if let Some(h) = self.service.take() {
            let _ = h.join();
        }
        // Read copies go first: the last copy of a page to go opens the CPU's write access
        // again. Left behind, the pages stayed write-protected after the device was gone (under
        // the mprotect backend, PROT_READ: the program's next write to its own memory was a
        // SIGSEGV nobody handled; found by the model test, issue 6).
        self.drop_all_copies();
        // Pages come home while the notifier still reaches this device: each eviction unmaps
        // them and waits for the warp in flight on every compute unit, so a lane of a launch
        // still running cannot commit stores into a frame whose page already left (found by the
        // reliability tests, issue 6: a device dropped mid-launch lost half a lane's stores).
        if let Err(e) = self.dev.mm.detach_device(self.dev.mem.id()) {
            tracing::error!(error = %e, "accelerator detach failed");
        }
        if let Some(sub) = self.dev.sub.lock().take() {
            self.dev.mm.notifiers().remove(&sub);
        }
    }
}

/// A launch in flight.
#[derive(Debug)]
pub struct Launch {
    dev: Arc<SimDevice>,
    handles: Vec<JoinHandle<Result<(), LaunchError>>>,
    started: Instant,
    clock_before: ClockReport,
}

/// What a finished launch reports.
#[derive(Clone, Debug)]
pub struct LaunchReport {
    /// Wall-clock time of the launch.
    pub wall: Duration,
    /// Modelled time charged to the device clock during the launch.
    pub modelled: ClockReport,
}

impl Launch {
    /// Waits for every compute unit; the first fatal fault fails the launch.
    pub fn wait(self) -> Result<LaunchReport, LaunchError> {
        let mut result = Ok(());
        for h in self.handles {
            let r = h.join().unwrap_or(Err(LaunchError::Shutdown));
            if result.is_ok() {
                result = r;
            }
        }
        self.dev.active_launches.fetch_sub(1, Ordering::AcqRel);
        // The batch in flight ends before the launch does; any later one finds no launch active
        // and services nothing (`SimDevice::service_batch`).
        drop(self.dev.servicing.lock());
        // Nor does it end before the copies it queued.
        self.dev.clock.fence();
        if let Some(e) = self.dev.fatal.lock().take() {
            result = Err(e);
        }
        result?;
        Ok(LaunchReport {
            wall: self.started.elapsed(),
            modelled: self.dev.clock.snapshot().since(&self.clock_before),
        })
    }
}

/// One lane's view of memory during one execution.
pub struct Thread<'a> {
    dev: &'a SimDevice,
    /// The compute unit's TLB, held for the whole warp.
    unit: CuGuard<'a>,
    /// What the lane completed in its earlier executions, and what this one adds.
    log: LaneLog,
    /// The next access's index in `log` (below its length: an access completed before, answered
    /// from the log).
    cursor: usize,
    /// Where the next logged access's bytes start in `log.data`.
    data_at: usize,
    miss: Option<(VirtAddr, FaultAccess)>,
    /// Further misses of this execution, raised with `miss` ([`Thread::issue_loads`]).
    issued: Vec<(VirtAddr, FaultAccess)>,
    fatal: Option<LaunchError>,
    /// Remote lines the warp moved in this execution (see [`Thread::charge_remote`]), held
    /// for the whole warp like `unit`.
    lines: RemoteLines,
}

/// The remote lines one execution of a warp moved over the link, each with its direction: a
/// warp's accesses to one line cost one line, as a GPU's coalescer merges the lanes' accesses
/// of an instruction into line transactions (and its L1 keeps the line for the warp's next
/// instruction). Lanes run one after another here, each to its end, so merging over the
/// execution is what merges each instruction's lanes.
#[derive(Debug, Default)]
struct RemoteLines(std::collections::HashSet<u64>);

impl RemoteLines {
    /// Of the lines `[va, va + bytes)` covers, `line` bytes each, how many are new for `dir`
    /// (and remembers them).
    fn add(&mut self, va: VirtAddr, bytes: usize, line: u64, dir: Direction) -> u64 {
        let line = line.max(1);
        if bytes == 0 {
            return 0;
        }
        let first = va.0 / line;
        let last = (va.0 + bytes as u64 - 1) / line;
        let tag = u64::from(dir == Direction::DeviceToHost) << 63;
        (first..=last).filter(|&l| self.0.insert(l | tag)).count() as u64
    }
}

impl std::fmt::Debug for Thread<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Thread")
            .field("completed", &self.log.ops.len())
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

/// What kind of access a lane completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Read,
    Write,
    Atomic,
}

/// One completed access of a lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LoggedOp {
    va: u64,
    len: u32,
    kind: OpKind,
}

/// The accesses a lane completed, in program order, with the bytes each load and atomic
/// returned. A lane that misses keeps its log; when it runs again after the replay its completed
/// accesses are answered from the log (loads and atomics return what they returned, stores are
/// not repeated) and it goes on from the access that missed, as a GPU replays the faulting
/// instruction of a warp rather than the thread (uvm-svm.md: replayable faults). Kernels are
/// deterministic functions of their thread index and what they read, so the second execution
/// reaches the same accesses in the same order; one that does not is a kernel bug, fatal.
#[derive(Debug, Default)]
struct LaneLog {
    ops: Vec<LoggedOp>,
    data: Vec<u8>,
}

impl LaneLog {
    fn clear(&mut self) {
        self.ops.clear();
        self.data.clear();
    }
}

/// The device access a fault stands for (a prefetch fault needs what a read needs).
fn device_access(kind: FaultAccess) -> Access {
    match kind {
        FaultAccess::Atomic => Access::Atomic,
        FaultAccess::Write => Access::Write,
        _ => Access::Read,
    }
}

fn fault_access(a: Access) -> FaultAccess {
    match a {
        Access::Read => FaultAccess::Read,
        Access::Write => FaultAccess::Write,
        Access::Atomic => FaultAccess::Atomic,
    }
}

impl Thread<'_> {
    #[inline]
    fn translate(&mut self, va: VirtAddr, access: Access) -> Result<PteTarget, Miss> {
        match self.unit.translate(va, access) {
            Ok(t) => t.target(va).ok_or(Miss),
            Err(f @ MmuFault::AddressWidth { .. }) => {
                self.fatal = Some(LaunchError::Fatal {
                    addr: va,
                    access: fault_access(access),
                    reason: f.to_string(),
                });
                Err(Miss)
            }
            Err(_) => {
                self.miss = Some((va, fault_access(access)));
                Err(Miss)
            }
        }
    }

    /// If this access completed in an earlier execution of the lane: checks that it is the same
    /// access and returns the bytes it returned then (`Some`); `None` for a new access. A
    /// different access is a nondeterministic kernel: fatal.
    #[inline]
    fn replayed(
        &mut self,
        va: VirtAddr,
        len: usize,
        kind: OpKind,
        access: FaultAccess,
    ) -> Option<Result<&[u8], Miss>> {
        let op = *self.log.ops.get(self.cursor)?;
        if op
            != (LoggedOp {
                va: va.0,
                len: len as u32,
                kind,
            })
        {
            let why = format!(
                "the lane's access {} differs from its earlier execution's ({op:?}): the kernel is \
                 not a deterministic function of its thread index and what it read",
                self.cursor
            );
            return Some(self.bad_access(va, access, &why));
        }
        self.cursor += 1;
        let at = self.data_at;
        let n = if kind == OpKind::Write { 0 } else { len };
        self.data_at += n;
        Some(Ok(&self.log.data[at..at + n]))
    }

    /// Records a completed access (`bytes`: what a load or atomic returned).
    #[inline]
    fn completed(&mut self, va: VirtAddr, len: usize, kind: OpKind, bytes: &[u8]) {
        self.log.ops.push(LoggedOp {
            va: va.0,
            len: len as u32,
            kind,
        });
        self.log.data.extend_from_slice(bytes);
        self.cursor += 1;
        self.data_at += bytes.len();
    }

    /// Issues loads of `spans` (address, bytes) ahead of their use, as a GPU warp issues its
    /// independent loads (a vector load's pieces, the operands of one expression) before an
    /// instruction that consumes one of them stalls it: every page of the spans that would miss
    /// faults now, all together, and the lane stalls until the replay (`Miss`); `Ok` when every
    /// page is mapped for reading. Reads nothing and logs nothing: the loads themselves follow,
    /// as ordinary [`Thread::read`]s. A kernel issues only what it goes on to load (a miss on
    /// memory that is not the device's to fault in fails the launch, as the load would).
    /// Without it a lane faults on one page at a time, in program order.
    ///
    /// A lane replaying accesses it completed before its last miss issues nothing: those are
    /// answered from its log, and it must never need their pages again (under
    /// oversubscription they may have left). So a lane needs at most the pages of one issue
    /// resident at once.
    pub fn issue_loads(&mut self, spans: &[(u64, usize)]) -> Result<(), Miss> {
        if self.cursor < self.log.ops.len() {
            return Ok(());
        }
        for &(va, bytes) in spans {
            if bytes == 0 {
                continue;
            }
            let last = va.saturating_add(bytes as u64 - 1) / PAGE_SIZE;
            let first = va / PAGE_SIZE;
            for page in first..=last {
                let at = VirtAddr((page * PAGE_SIZE).max(va));
                if self.translate(at, Access::Read).is_err() {
                    if self.fatal.is_some() {
                        return Err(Miss);
                    }
                    if let Some(m) = self.miss.take() {
                        self.issued.push(m);
                    }
                }
            }
        }
        match self.issued.pop() {
            Some(m) => {
                self.miss = Some(m);
                Err(Miss)
            }
            None => Ok(()),
        }
    }

    /// Reads `buf.len()` bytes at `va` (within one page).
    pub fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), Miss> {
        let va = VirtAddr(va);
        if va.0 % PAGE_SIZE + buf.len() as u64 > PAGE_SIZE {
            return self.bad_access(va, FaultAccess::Read, "access crosses a page");
        }
        if let Some(r) = self.replayed(va, buf.len(), OpKind::Read, FaultAccess::Read) {
            buf.copy_from_slice(r?);
            return Ok(());
        }
        let target = self.translate(va, Access::Read)?;
        self.read_target(va, target, buf)?;
        self.completed(va, buf.len(), OpKind::Read, buf);
        Ok(())
    }

    /// Writes `data` at `va` (within one page). The store lands now, in program order: a lane
    /// that misses later keeps it and does not repeat it.
    pub fn write(&mut self, va: u64, data: &[u8]) -> Result<(), Miss> {
        let va = VirtAddr(va);
        if va.0 % PAGE_SIZE + data.len() as u64 > PAGE_SIZE {
            return self.bad_access(va, FaultAccess::Write, "access crosses a page");
        }
        if let Some(r) = self.replayed(va, data.len(), OpKind::Write, FaultAccess::Write) {
            return r.map(drop);
        }
        let target = self.translate(va, Access::Write)?;
        self.write_target(va, target, data)?;
        self.completed(va, data.len(), OpKind::Write, &[]);
        Ok(())
    }

    /// Loads a `u32`.
    pub fn load_u32(&mut self, va: u64) -> Result<u32, Miss> {
        let mut b = [0u8; 4];
        self.read(va, &mut b)?;
        Ok(u32::from_ne_bytes(b))
    }

    /// Stores a `u32`.
    pub fn store_u32(&mut self, va: u64, v: u32) -> Result<(), Miss> {
        self.write(va, &v.to_ne_bytes())
    }

    /// Loads an `f32`.
    pub fn load_f32(&mut self, va: u64) -> Result<f32, Miss> {
        Ok(f32::from_bits(self.load_u32(va)?))
    }

    /// Stores an `f32`.
    pub fn store_f32(&mut self, va: u64, v: f32) -> Result<(), Miss> {
        self.store_u32(va, v.to_bits())
    }

    /// Atomically adds `v` to the `u32` at `va`; returns the old value. The read and the write
    /// happen under the device's atomics lock, so no atomic of another lane interleaves; a lane
    /// that misses later keeps its atomic done (and the old value it got).
    pub fn atomic_add_u32(&mut self, va: u64, v: u32) -> Result<u32, Miss> {
        let a = VirtAddr(va);
        if !va.is_multiple_of(4) {
            return self.bad_access(a, FaultAccess::Atomic, "unaligned atomic");
        }
        if let Some(r) = self.replayed(a, 4, OpKind::Atomic, FaultAccess::Atomic) {
            let b: [u8; 4] = r?.try_into().map_err(|_| Miss)?;
            return Ok(u32::from_ne_bytes(b));
        }
        let target = self.translate(a, Access::Atomic)?;
        let dev = self.dev;
        let mut b = [0u8; 4];
        {
            let _atomics = dev.atomics.lock();
            self.read_target(a, target, &mut b)?;
            let new = u32::from_ne_bytes(b).wrapping_add(v).to_ne_bytes();
            self.write_target(a, target, &new)?;
        }
        self.completed(a, 4, OpKind::Atomic, &b);
        Ok(u32::from_ne_bytes(b))
    }

    fn bad_access<T>(&mut self, va: VirtAddr, access: FaultAccess, why: &str) -> Result<T, Miss> {
        self.fatal = Some(LaunchError::Fatal {
            addr: va,
            access,
            reason: why.to_string(),
        });
        Err(Miss)
    }

    /// Runs `f` on the memory behind a device target and the byte offset of its frame: this
    /// device's frames (no reference count touched: the hot path) or a peer's. `None` for system
    /// memory, which the device reaches over the link; `Some(None)` for a peer that is gone.
    fn with_frames<R>(
        &self,
        target: PteTarget,
        f: impl FnOnce(&DeviceMemory, usize) -> R,
    ) -> Option<Option<R>> {
        match target {
            PteTarget::Local(frame) => {
                Some(Some(f(&self.dev.mem, DeviceMemory::frame_offset(frame))))
            }
            PteTarget::Peer { dev, frame } => Some(
                self.dev
                    .mm
                    .device(dev)
                    .map(|d| f(d.memory(), DeviceMemory::frame_offset(frame))),
            ),
            PteTarget::System => None,
        }
    }

    /// Charges a remote access of `bytes` at `va` over the link, the lines the warp has not
    /// moved yet in this execution, and counts it for the placement policy's access counters
    /// (one access per new line: a coalesced transaction).
    fn charge_remote(&mut self, va: VirtAddr, dir: Direction, bytes: usize) {
        let line = self.dev.config.link.remote_line_bytes.max(1);
        let new = self.lines.add(va, bytes, line, dir);
        if new == 0 {
            return;
        }
        self.dev.config.placement.remote_access(va);
        self.dev
            .counters
            .remote_accesses
            .fetch_add(1, Ordering::Relaxed);
        self.dev.clock.charge(
            Cause::RemoteAccess,
            self.dev.config.link.remote_access(dir, new * line),
        );
    }

    fn read_target(&mut self, va: VirtAddr, target: PteTarget, buf: &mut [u8]) -> Result<(), Miss> {
        let off = (va.0 % PAGE_SIZE) as usize;
        let ok = match self.with_frames(target, |mem, base| mem.arena().read(base + off, buf)) {
            Some(r) => r.is_some_and(|r| r.is_ok()),
            None => {
                // Data from system memory into the device.
                self.charge_remote(va, Direction::HostToDevice, buf.len());
                hetmem_sys::dma::read_user(va.as_usize(), buf).is_ok()
            }
        };
        if ok {
            Ok(())
        } else {
            self.bad_access(va, FaultAccess::Read, "device read failed")
        }
    }

    /// Stores `data` at `va` through `target` (translated under the warp's TLB lock, which an
    /// invalidation waits for, so the frame is still the page's).
    fn write_target(&mut self, va: VirtAddr, target: PteTarget, data: &[u8]) -> Result<(), Miss> {
        let off = (va.0 % PAGE_SIZE) as usize;
        let ok = match self.with_frames(target, |mem, base| mem.arena().write(base + off, data)) {
            Some(r) => r.is_some_and(|r| r.is_ok()),
            None => {
                self.charge_remote(va, Direction::DeviceToHost, data.len());
                hetmem::write_user(va.as_usize(), data).is_ok()
            }
        };
        if ok {
            Ok(())
        } else {
            let why = format!("device write failed (to {target:?})");
            self.bad_access(va, FaultAccess::Write, &why)
        }
    }
}

/// A warp's progress on its compute unit.
struct Warp {
    id: u64,
    /// Lanes (thread ids) still to complete.
    pending: Vec<u64>,
    /// What each of them completed so far (by position in `pending`; empty until a lane
    /// first misses).
    logs: Vec<LaneLog>,
    /// Stalled since this replay epoch (a replay after it makes the warp ready).
    stalled_at: Option<u64>,
}

impl SimDevice {
    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn charge_migration(&self, dir: Direction, bytes: u64) {
        if bytes > 0 {
            // An eviction's or a CPU fault window's copy: synchronous, even from the fault
            // service (the frames it frees are reused at once).
            let _sync = AsyncTransfers::suspend();
            self.clock
                .charge(dir.migrate_cause(), self.config.link.transfer(dir, bytes));
        }
    }

    /// Records the latency of a serviced batch's entries: wall-clock from each entry's raise to
    /// now, and the modelled time charged since `before` by the service itself (what compute
    /// units and CPU faults charged meanwhile is not the batch's).
    fn record_latency(&self, entries: &[FaultEntry], before: &ClockReport) {
        let now = self.now_ns();
        for e in entries {
            self.latency.wall.record(now.saturating_sub(e.timestamp));
        }
        let d = self.clock.snapshot().since(before);
        let service = d
            .total
            .saturating_sub(d.get(Cause::RemoteAccess))
            .saturating_sub(d.get(Cause::CpuFault));
        self.latency
            .modelled
            .record_n(service.as_nanos(), entries.len() as u64);
    }

    fn replay(&self) {
        *self.epoch.lock() += 1;
        self.replayed.notify_all();
    }

    /// Fails the launch in flight with `e`, found by servicing a fault raised at `raised` (device
    /// clock): a fault raised before the current launch started belongs to an earlier one (which
    /// already failed or finished) and must not fail this one.
    fn fail_launch(&self, raised: u64, e: LaunchError) {
        if raised >= self.launch_started.load(Ordering::Acquire) {
            self.set_fatal(e);
        } else {
            tracing::debug!(error = %e, "fault of an earlier launch ignored");
        }
    }

    fn set_fatal(&self, e: LaunchError) {
        self.counters.fatal.fetch_add(1, Ordering::Relaxed);
        let mut f = self.fatal.lock();
        if f.is_none() {
            *f = Some(e);
        }
        drop(f);
        self.replay();
    }

    /// DESIGN.md invariant 1 between the device page table and hetmem's page states: every leaf
    /// points where the page actually is (a local leaf at the frame of this device that holds the
    /// page, a peer leaf at the peer's frame, a system leaf at a page in system memory), and only
    /// inside managed memory. Taken under the table lock: an invalidation must pass it before a
    /// page's state may change, so the picture is consistent.
    fn check_coherence(&self) -> Result<(), String> {
        self.mmu.inspect(|pt| {
            let mut err = None;
            pt.for_each_leaf(|tr| {
                for i in 0..tr.size.pages() {
                    if err.is_some() {
                        return;
                    }
                    let va = VirtAddr(tr.leaf.0 + i * PAGE_SIZE);
                    let Some(region) = self.mm.region_of(va) else {
                        err = Some(format!("device maps {va}, outside managed memory"));
                        return;
                    };
                    let loc = region.states.get(region.index(va)).location;
                    let agrees = match (tr.target(va), loc) {
                        (Some(PteTarget::System), Location::System) => true,
                        (Some(PteTarget::Local(f)), Location::System) => {
                            self.dups.lock().holds(va, f)
                        }
                        (Some(PteTarget::Local(f)), Location::Device { dev, frame, .. }) => {
                            dev == self.mem.id() && frame == f
                        }
                        (
                            Some(PteTarget::Peer { dev, frame: f }),
                            Location::Device { dev: d, frame, .. },
                        ) => dev == d && frame == f,
                        _ => false,
                    };
                    if !agrees {
                        err = Some(format!(
                            "device leaf at {va} says {:?}, the page is at {loc:?}",
                            tr.target(va)
                        ));
                    }
                }
            });
            err.map_or_else(|| self.check_copies(pt), Err)
        })
    }

    /// A compute unit: runs its warps (every `units`-th warp from `cu`) until all completed or the
    /// launch failed.
    fn run_unit(&self, cu: usize, kernel: &dyn Kernel, threads: u64) -> Result<(), LaunchError> {
        let units = self.config.compute_units as u64;
        let warps_total = threads.div_ceil(WARP_SIZE);
        let mut queued = (cu as u64..warps_total)
            .step_by(units as usize)
            .map(|w| Warp {
                id: w,
                pending: (w * WARP_SIZE..((w + 1) * WARP_SIZE).min(threads)).collect(),
                logs: Vec::new(),
                stalled_at: None,
            });
        let mut warps: Vec<Warp> = Vec::with_capacity(self.config.warps_per_cu);
        loop {
            // Completed warps leave; queued ones take their slots.
            warps.retain(|w| !w.pending.is_empty());
            while warps.len() < self.config.warps_per_cu {
                match queued.next() {
                    Some(w) => warps.push(w),
                    None => break,
                }
            }
            if self.fatal.lock().is_some() {
                return Ok(()); // reported by Launch::wait
            }
            if self.stop.load(Ordering::Acquire) {
                return Err(LaunchError::Shutdown);
            }
            let epoch = *self.epoch.lock();
            let mut ran = false;
            for warp in warps.iter_mut() {
                if warp.pending.is_empty() {
                    continue;
                }
                if let Some(at) = warp.stalled_at {
                    if epoch <= at {
                        continue;
                    }
                }
                ran = true;
                warp.stalled_at = None;
                self.run_warp(cu, kernel, warp, epoch)?;
            }
            if warps.iter().all(|w| w.pending.is_empty()) {
                warps.clear();
                match queued.next() {
                    Some(w) => {
                        warps.push(w);
                        continue;
                    }
                    None => return Ok(()),
                }
            }
            if !ran {
                // Every remaining warp is stalled: wait for a replay.
                let mut e = self.epoch.lock();
                if *e == epoch {
                    self.units_stalled.fetch_add(1, Ordering::AcqRel);
                    self.replayed.wait_for(&mut e, Duration::from_millis(20));
                    self.units_stalled.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    fn run_warp(
        &self,
        cu: usize,
        kernel: &dyn Kernel,
        warp: &mut Warp,
        epoch: u64,
    ) -> Result<(), LaunchError> {
        let mut misses: Vec<(VirtAddr, FaultAccess)> = Vec::new();
        let mut unit = self.mmu.unit(cu).map_err(|e| LaunchError::Fatal {
            addr: VirtAddr(0),
            access: FaultAccess::Read,
            reason: e.to_string(),
        })?;
        let mut still = Vec::new();
        let mut still_logs = Vec::new();
        let lanes = warp.pending.len() as u64;
        let mut logs = std::mem::take(&mut warp.logs).into_iter();
        // Lanes that never missed share one log, cleared after each.
        let mut scratch = LaneLog::default();
        let mut lines = RemoteLines::default();
        for &tid in &warp.pending {
            let log = match logs.next() {
                Some(l) => l,
                None => {
                    scratch.clear();
                    std::mem::take(&mut scratch)
                }
            };
            let mut t = Thread {
                dev: self,
                unit,
                log,
                cursor: 0,
                data_at: 0,
                miss: None,
                issued: Vec::new(),
                fatal: None,
                lines: std::mem::take(&mut lines),
            };
            let r = kernel.thread(tid, &mut t);
            if let Some(e) = t.fatal.take() {
                drop(t);
                self.set_fatal(e);
                return Ok(());
            }
            match (r, t.miss) {
                (Ok(()), _) => {
                    scratch = std::mem::take(&mut t.log);
                }
                (Err(Miss), Some(m)) => {
                    still.push(tid);
                    still_logs.push(std::mem::take(&mut t.log));
                    for m in std::iter::once(m).chain(t.issued.drain(..)) {
                        if !misses.iter().any(|x| x.0.page_down() == m.0.page_down()) {
                            misses.push(m);
                        }
                    }
                }
                (Err(Miss), None) => {
                    // A kernel returned Miss without a miss: a kernel bug, fatal.
                    drop(t);
                    self.set_fatal(LaunchError::Fatal {
                        addr: VirtAddr(0),
                        access: FaultAccess::Read,
                        reason: format!("thread {tid} returned Miss without a fault"),
                    });
                    return Ok(());
                }
            }
            // The lane is over: the unit and the warp's lines go to the next.
            lines = std::mem::take(&mut t.lines);
            unit = t.unit;
        }
        drop(unit);
        self.counters.lanes_run.fetch_add(lanes, Ordering::Relaxed);
        if !still.is_empty() {
            self.counters
                .lane_retries
                .fetch_add(still.len() as u64, Ordering::Relaxed);
        }
        warp.pending = still;
        warp.logs = still_logs;
        if misses.is_empty() {
            return Ok(());
        }
        // Stalled from `epoch` (read before the faults are pushed, so a replay that services them
        // cannot be missed).
        warp.stalled_at = Some(epoch);
        let replayable = self.config.retry;
        for (addr, access) in misses {
            let c = match access {
                FaultAccess::Write => &self.counters.faults_write,
                FaultAccess::Atomic => &self.counters.faults_atomic,
                _ => &self.counters.faults_read,
            };
            c.fetch_add(1, Ordering::Relaxed);
            if !replayable {
                self.counters.nonreplayable.fetch_add(1, Ordering::Relaxed);
            }
            let outcome = self.ring.push(FaultEntry {
                addr,
                access,
                client: FaultClient {
                    cu: cu as u16,
                    warp: warp.id as u32,
                },
                timestamp: self.now_ns(),
                replayable,
            });
            match outcome {
                PushOutcome::Queued => {}
                PushOutcome::DroppedReplayable => {
                    self.counters.faults_dropped.fetch_add(1, Ordering::Relaxed);
                }
                PushOutcome::LostNonReplayable => {
                    // Nobody will ever service it and the warp cannot go on: the launch fails,
                    // and the loss is counted, never silent (seed 002).
                    self.counters.faults_lost.fetch_add(1, Ordering::Relaxed);
                    self.set_fatal(LaunchError::Fatal {
                        addr,
                        access,
                        reason: "non-replayable fault lost: the fault ring was full".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The fault service thread: batches, services, replays.
    fn service_loop(self: Arc<Self>) {
        // Every migration this thread makes serves the device's faults, unless a policy's queued
        // migration (below) or the placement policy's eviction says otherwise.
        let _trigger = TriggerScope::enter(Trigger::DeviceFault);
        let mut entries = Vec::with_capacity(self.config.batch_size);
        let mut scheduler = ReplayScheduler::new(self.config.replay);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            {
                // Queued on the copy engines: they run while the next batch is fetched and
                // sorted. No stalled warp waits for them (readahead past the faulted blocks,
                // pages warps reach remotely meanwhile), so no replay does either; a copy the
                // next batch needs queues behind them and is waited for.
                let _ahead = AsyncTransfers::ahead();
                let _servicing = self.servicing.lock();
                self.service_policy_migrations();
            }
            entries.clear();
            // Interrupt moderation: once a fault arrived, give the other warps a moment to add
            // theirs, so one batch carries many (a GPU's fault interrupt reaches the driver's
            // bottom half tens of microseconds after the first fault, with the buffer filling
            // meanwhile).
            let n = if self.ring.wait_nonempty(Duration::from_millis(5)) {
                self.coalesce();
                self.ring.fetch_batch(self.config.batch_size, &mut entries)
            } else {
                0
            };
            if n == 0 {
                // Idle: replay whatever is owed (dropped faults re-raise), and keep stalled warps
                // moving if a launch is active.
                if scheduler.after_drain().replays()
                    || self.active_launches.load(Ordering::Acquire) > 0
                {
                    self.replay();
                }
                continue;
            }
            if self.ring.stats().dropped_replayable > 0 {
                scheduler.note_overflow();
            }
            let (t, cpu) = (Instant::now(), hetmem_sys::clock::thread_cpu_time());
            let servicing = self.servicing.lock();
            {
                let _async = AsyncTransfers::enter();
                self.service_batch(&entries, &mut scheduler);
            }
            drop(servicing);
            self.counters
                .service_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.counters.service_cpu_ns.fetch_add(
                (hetmem_sys::clock::thread_cpu_time() - cpu).as_nanos() as u64,
                Ordering::Relaxed,
            );
        }
    }

    /// Interrupt moderation, once a fault is in the ring: waits `fault_coalesce`, or with
    /// `coalesce_until_stalled` until every running compute unit is stalled (at most that
    /// long), unless a whole batch is already there.
    fn coalesce(&self) {
        let limit = self.config.fault_coalesce;
        if limit.is_zero() || self.ring.len() >= self.config.batch_size {
            return;
        }
        if !self.config.coalesce_until_stalled {
            std::thread::sleep(limit);
            return;
        }
        let t = Instant::now();
        while self.units_stalled.load(Ordering::Acquire)
            < self.units_running.load(Ordering::Acquire)
            && self.ring.len() < self.config.batch_size
            && t.elapsed() < limit
        {
            std::thread::sleep(Duration::from_micros(10));
        }
    }

    /// Migrates what the placement policy's access counters ask for (UVM services access
    /// counter notifications like faults, with the prefetch access type): the pages come into
    /// this device's memory and are mapped there; warps that reached them remotely fault once
    /// more and then hit locally.
    /// Called with `servicing` held.
    fn service_policy_migrations(&self) {
        let taken = self.config.placement.take_migrations();
        let mut deferred = self.deferred.lock();
        // Only while a launch is in flight (the caller holds `servicing`): once `Launch::wait`
        // has passed through it, the program may open CPU views of managed memory, and nothing
        // may move pages under them (views and launches exclude each other). What the policies
        // asked for meanwhile (counter notifications, readahead queued at the end of the
        // launch) waits for the next launch, while its warps run. (Servicing it at the launch,
        // before the warps ran, made `kvcache` at 1x 2.1x explicit copies instead of 1.8x.
        // Migrating after the launch raced the CPU: lost writes, pages back on a device after
        // a prefetch home, found by the model test with access counters.)
        if self.active_launches.load(Ordering::Acquire) == 0 {
            deferred.extend(taken);
            if deferred.len() > MAX_DEFERRED {
                let over = deferred.len() - MAX_DEFERRED;
                deferred.drain(..over);
            }
            return;
        }
        let mut migrations = std::mem::take(&mut *deferred);
        drop(deferred);
        migrations.extend(taken);
        for (range, trigger) in migrations {
            let _trigger = TriggerScope::enter(trigger);
            for block in range.chunks(HUGE_PAGE_SIZE) {
                // A counter region may reach past managed memory: only its managed pages move.
                // And past what this device reached: of a counter region, only the pages it
                // maps remotely move (the rest may be another allocation's, even another
                // context's); readahead names exactly the pages it wants. Pages already local
                // need nothing (a readahead that a batch's window overtook).
                let reached: Vec<VirtAddr> = self.mmu.inspect(|pt| {
                    block
                        .pages()
                        .filter(|&a| match pt.lookup(a) {
                            Some(tr) => !matches!(tr.target(a), Some(PteTarget::Local(_))),
                            None => trigger != Trigger::AccessCounter,
                        })
                        .collect()
                });
                let pages: Vec<(VirtAddr, FaultAccess)> = reached
                    .into_iter()
                    .filter(|&a| self.mm.region_of(a).is_some())
                    .map(|a| (a, FaultAccess::Prefetch))
                    .collect();
                if pages.is_empty() {
                    continue;
                }
                match self.service_faults(&pages, Some(PlacementAction::Migrate)) {
                    Ok(()) => {
                        // The block's service on the host (populate, unmap from the CPU, map
                        // on the device) costs what a faulted block's does: UVM does the same
                        // work for a block it migrates without a fault. It runs on the host's
                        // timeline, beside the copies queued before it.
                        self.clock
                            .charge(Cause::FaultService, self.config.link.faults.per_vablock);
                        self.counters
                            .policy_migrations
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err((addr, _, e)) => {
                        tracing::debug!(%addr, error = %e, "policy migration failed");
                    }
                }
            }
        }
    }

    /// Services one batch; called with `servicing` held.
    fn service_batch(&self, entries: &[FaultEntry], scheduler: &mut ReplayScheduler) {
        // Faults raised before the launch in flight started belong to an earlier launch, whose
        // warps are gone (it finished, or failed with faults still in the ring): servicing them
        // is wasted work, and a stale write fault merged into a block with this launch's faults
        // failed this launch with the earlier one's permission fault (found by the fuzz smoke
        // run, issue 6). With no launch in flight every entry is such a leftover (a warp's
        // duplicate of a fault another warp's batch already serviced): serviced after the
        // launch returned, it pulled back into this device pages the program had moved
        // elsewhere since (read under `servicing`, which `Launch::wait` passes through after
        // the count drops, so a batch sees either the launch active or its wait not yet
        // returned).
        let started = if self.active_launches.load(Ordering::Acquire) == 0 {
            u64::MAX
        } else {
            self.launch_started.load(Ordering::Acquire)
        };
        let current: Vec<FaultEntry>;
        let entries = if entries.iter().any(|e| e.timestamp < started) {
            current = entries
                .iter()
                .filter(|e| e.timestamp >= started)
                .cloned()
                .collect();
            self.counters
                .faults_stale
                .fetch_add((entries.len() - current.len()) as u64, Ordering::Relaxed);
            if current.is_empty() {
                return;
            }
            &current[..]
        } else {
            entries
        };
        let clock_before = self.clock.snapshot();
        let batch = FaultBatch::from_entries(entries);
        let stats = batch.stats();
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .batched_faults
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        self.counters
            .duplicates
            .fetch_add(stats.duplicates, Ordering::Relaxed);
        // The batch's fixed and per-entry work comes first; each block's own service is
        // charged as it is serviced, so it runs while the copies of the blocks before it do
        // (UVM pushes a block's copies to the copy engines and goes on to the next block,
        // waiting for them only before the replay).
        self.clock.charge(
            Cause::FaultService,
            self.config.link.fault_service(stats.faults, 0),
        );
        tracing::debug!(
            dev = self.mem.id().0,
            faults = stats.faults,
            pages = stats.pages,
            blocks = stats.blocks,
            duplicates = stats.duplicates,
            "fault batch"
        );
        let name = |page: VirtAddr| {
            // Name the exact address a warp faulted on, not just its page.
            entries
                .iter()
                .find(|x| x.addr.page_down() == page.page_down())
                .map_or(page, |x| x.addr)
        };
        for block in batch.blocks() {
            if let Some(f) = block.faults().iter().find(|f| !f.is_replayable()) {
                // No retry (XNACK off): the warp is not waiting for a replay; the launch fails
                // with the address, as amdgpu reports a no-retry fault and kills the queue.
                self.fail_launch(
                    f.timestamp(),
                    LaunchError::Fatal {
                        addr: name(f.page()),
                        access: f.access(),
                        reason: "non-replayable fault: the range was not made resident (no retry)"
                            .into(),
                    },
                );
                continue;
            }
            let pages: Vec<(VirtAddr, FaultAccess)> = block.pages().collect();
            if let Err((page, access, e)) = self.service_faults(&pages, None) {
                let ts = block
                    .faults()
                    .iter()
                    .map(|f| f.timestamp())
                    .max()
                    .unwrap_or(0);
                self.fail_launch(
                    ts,
                    LaunchError::Fatal {
                        addr: name(page),
                        access,
                        reason: e.to_string(),
                    },
                );
            }
            let d = scheduler.after_block();
            self.replay_charged(d);
        }
        let d = scheduler.after_batch();
        self.replay_charged(d);
        self.record_latency(entries, &clock_before);
    }

    /// Carries out a replay decision. Batch-flush first drops the faults still in the ring: their
    /// warps are stalled and fault again after this replay if their pages are still missing, so
    /// servicing the stale copies would only repeat work (UVM's `fault_buffer_flush` before a
    /// replay). A non-replayable fault found there cannot come back: it fails the launch.
    fn replay_charged(&self, d: ReplayDecision) {
        if !d.replays() {
            return;
        }
        if d == ReplayDecision::FlushThenReplay {
            let mut kept = Vec::new();
            let report = self.ring.flush(&mut kept);
            self.counters
                .faults_flushed
                .fetch_add(report.discarded_replayable as u64, Ordering::Relaxed);
            if let Some(f) = kept.first() {
                self.fail_launch(
                    f.timestamp,
                    LaunchError::Fatal {
                        addr: f.addr,
                        access: f.access,
                        reason: "non-replayable fault: the range was not made resident (no retry)"
                            .into(),
                    },
                );
            }
        }
        self.counters.replays.fetch_add(1, Ordering::Relaxed);
        {
            // What the prefetchers queued past this batch's blocks goes to the copy engines
            // behind the batch's copies, before the replay: it runs while the warps go on and
            // the next batch is serviced, and the replay does not wait for it.
            let _ahead = AsyncTransfers::ahead();
            self.service_policy_migrations();
        }
        // The warps replay onto what the copies bring: the timeline waits for them first.
        self.clock.fence_replay();
        self.clock.charge(Cause::Replay, self.config.link.replay());
        self.replay();
    }

    /// Services the faulted pages of one 2 MiB block (sorted, one per page): the placement policy
    /// (or `action`, for [`Accelerator::make_resident`]) names the span and what to do; the span's
    /// pages are migrated into device memory (what fits), then range-faulted (the faulted pages
    /// must come out valid, the others are taken as they are) and mapped with one page-table
    /// update per region.
    fn service_faults(
        &self,
        pages: &[(VirtAddr, FaultAccess)],
        action: Option<PlacementAction>,
    ) -> Result<(), (VirtAddr, FaultAccess, RangeFaultError)> {
        let Some(&(first, first_access)) = pages.first() else {
            return Ok(());
        };
        // Isolation (DESIGN.md invariant 5): the device reaches only memory hetmem manages.
        if let Some(&(a, access)) = pages.iter().find(|p| self.mm.region_of(p.0).is_none()) {
            return Err((a, access, RangeFaultError::Fault { addr: a }));
        }
        let bad = |_| (first, first_access, RangeFaultError::Invalid("range"));
        let block = PageRange::new(first.0 & !(HUGE_PAGE_SIZE - 1), HUGE_PAGE_SIZE).map_err(bad)?;
        // Faults that an earlier batch already serviced (a warp that faulted before the replay
        // that would have let it hit) need nothing: UVM skips pages already mapped as wanted.
        let pending: Vec<(VirtAddr, FaultAccess)> = if action.is_some() {
            pages.to_vec()
        } else {
            let pending: Vec<_> = self.mmu.update(|c| {
                pages
                    .iter()
                    .copied()
                    .filter(|&(a, access)| {
                        !c.page_table()
                            .lookup(a)
                            .is_some_and(|tr| tr.perms.contains(device_access(access).required()))
                    })
                    .collect()
            });
            self.counters
                .faults_stale
                .fetch_add((pages.len() - pending.len()) as u64, Ordering::Relaxed);
            pending
        };
        if pending.is_empty() {
            // Every fault was stale: the block's pages are mapped as its warps want. UVM finds
            // that under the block's lock and goes on; the batch's per-entry cost covered it.
            return Ok(());
        }
        if action.is_none() {
            // A faulted block's service on the host (populate, unmap from the CPU, map on the
            // device), charged before its copies are queued, so that it runs while the copies
            // of the blocks before it do.
            self.clock
                .charge(Cause::FaultService, self.config.link.faults.per_vablock);
        }
        let plan = self.config.placement.place(&BlockFaults {
            block,
            pages: &pending,
            free_frames: self.free_frames(),
        });
        // A residency request (`action` given) migrates every page, the plan's remote ones too.
        let forced = action.is_some();
        let action = action.unwrap_or(plan.action);
        let clip = |v: &[PageRange]| -> Vec<PageRange> {
            v.iter().filter_map(|s| s.intersect(&block)).collect()
        };
        let mut remote = if forced {
            Vec::new()
        } else {
            clip(&plan.remote)
        };
        // Read copies first; what could not be copied is mapped where it is.
        let mut copied: Vec<PageRange> = Vec::new();
        if !forced {
            for span in clip(&plan.duplicate) {
                let done = self.duplicate_in(span);
                for a in span.pages() {
                    let p = PageRange::new(a.0, PAGE_SIZE).map_err(bad)?;
                    if done.binary_search(&a).is_ok() {
                        copied.push(p);
                    } else {
                        remote.push(p);
                    }
                }
            }
            remote.sort_by_key(|s| s.start());
        }
        let mut moving = clip(&plan.spans);
        if forced {
            moving.extend(clip(&plan.remote));
        }
        // Spans stay inside the block; a faulted page no span covers is serviced on its own.
        for &(a, _) in &pending {
            if !moving
                .iter()
                .chain(&remote)
                .chain(&copied)
                .any(|s| s.contains(a))
            {
                moving.push(PageRange::new(a.0, PAGE_SIZE).map_err(bad)?);
            }
        }
        moving.sort_by_key(|s| s.start());
        // Mapped: what moves and what stays remote.
        let mut spans: Vec<PageRange> = moving.iter().chain(&remote).copied().collect();
        spans.sort_by_key(|s| s.start());
        // One migration and one page-table update per region over the hull of the spans: pages
        // between spans are collected but get no destination and are not mapped.
        let (Some(lo), Some(hi)) = (spans.first(), spans.last()) else {
            return Ok(());
        };
        let hull = lo.hull(hi);
        for region in self.mm.regions_in(hull) {
            let Some(sub) = region.range().intersect(&hull) else {
                continue;
            };
            let busy = if action == PlacementAction::Migrate && !moving.is_empty() {
                self.pull_from_peers(&region, sub, &moving);
                self.migrate_in(sub, &moving)
            } else {
                Vec::new()
            };
            let at = pending.partition_point(|p| p.0 < sub.start());
            let to = pending.partition_point(|p| p.0 < sub.end());
            // Remote windows are populated in system memory like the faulted pages (writable
            // for a block that took a write fault), so that the warps reaching them next do not
            // fault one page at a time.
            let populate = (action == PlacementAction::MapRemote).then(|| {
                pending[at..to]
                    .iter()
                    .any(|&(_, access)| access >= FaultAccess::Write)
            });
            self.fault_and_map(&region, sub, &pending[at..to], &spans, &busy, populate)
                .map_err(|(a, e)| {
                    let access = pending
                        .iter()
                        .find(|p| p.0 == a.page_down())
                        .map_or(FaultAccess::Read, |p| p.1);
                    (a, access, e)
                })?;
        }
        Ok(())
    }

    /// Migrates the pages of `spans` within `sub` that live on other devices straight into this
    /// device's memory, copied device to device by the copy engines (instead of through system
    /// memory, where a range fault would send them).
    fn pull_from_peers(
        &self,
        region: &hetmem::region::Region,
        sub: PageRange,
        spans: &[PageRange],
    ) {
        for span in spans.iter().filter_map(|s| s.intersect(&sub)) {
            let mut peers: Vec<DeviceId> = Vec::new();
            for a in span.pages() {
                if let Location::Device {
                    dev,
                    coherent: false,
                    ..
                } = region.states.get(region.index(a)).location
                {
                    if dev != self.mem.id() && !peers.contains(&dev) {
                        peers.push(dev);
                    }
                }
            }
            for peer in peers {
                let Some(from) = self.mm.device(peer) else {
                    continue;
                };
                let moved = {
                    let _own = OwnToDevice::enter();
                    migrate_between(self.mm, span, from.memory(), &self.mem, &self.copy)
                };
                let Ok((summary, _)) = moved else { continue };
                if summary.migrated > 0 {
                    self.counters.migrations.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .pages_from_peers
                        .fetch_add(summary.migrated, Ordering::Relaxed);
                    tracing::debug!(
                        dev = self.mem.id().0,
                        trigger = hetmem::migrate::current_trigger().name(),
                        from = peer.0,
                        start = %span.start(),
                        pages = span.npages(),
                        migrated = summary.migrated,
                        "migration"
                    );
                }
            }
        }
    }

    fn free_frames(&self) -> u64 {
        self.mem.pool().lock().available_frames()
    }

    /// Migrates the system pages of `sub` (within one region) that lie in `spans` into device
    /// memory; pages that cannot move stay where they are (shared memory, other devices' pages, a
    /// full device).
    fn migrate_in(&self, sub: PageRange, spans: &[PageRange]) -> Vec<VirtAddr> {
        let args = MigrateArgs {
            range: sub,
            select: SelectFlags::SYSTEM | SelectFlags::COMPOUND,
            owner: self.mem.owner(),
            fault_page: None,
        };
        let setup = {
            let _own = OwnToDevice::enter();
            MigrateVma::setup(self.mm, args)
        };
        let Ok(mut m) = setup else {
            return Vec::new();
        };
        // Pages another thread holds locked right now (a CPU fault moving them, another
        // migration): not mapped remotely, but retried after the replay, as UVM retries a block
        // it could not lock instead of settling for a remote mapping.
        let busy: Vec<VirtAddr> = m
            .entries()
            .iter()
            .enumerate()
            .filter(|(_, e)| e.skipped == Some(SkipReason::Locked))
            .map(|(k, _)| sub.page(k as u64))
            .collect();
        self.counters
            .pages_busy
            .fetch_add(busy.len() as u64, Ordering::Relaxed);
        if m.cpages() == 0 {
            return busy;
        }
        m.alloc_and_copy(&FaultDriver {
            mem: &self.mem,
            spans,
        });
        let c = m.pages();
        let moved = c.entries().iter().filter(|e| e.migrates()).count() as u64;
        // Pages never populated (a hole, the zero page) are zero-filled in device memory: nothing
        // crosses the link for them (UVM populates untouched pages on the GPU, uvm-svm.md A.6).
        let copied = c
            .entries()
            .iter()
            .filter(|e| e.migrates() && e.src != PageLoc::Empty)
            .count() as u64;
        let summary = c.finalize();
        if moved == 0 {
            return busy;
        }
        self.counters.migrations.fetch_add(1, Ordering::Relaxed);
        self.counters
            .pages_to_device
            .fetch_add(moved, Ordering::Relaxed);
        let cost = self
            .config
            .link
            .transfer(Direction::HostToDevice, copied * PAGE_SIZE);
        self.clock.charge(Cause::MigrateToDevice, cost);
        tracing::debug!(
            dev = self.mem.id().0,
            trigger = hetmem::migrate::current_trigger().name(),
            from = "system",
            start = %sub.start(),
            pages = sub.npages(),
            collected = summary.collected,
            migrated = moved,
            modelled_ns = cost.as_nanos(),
            "migration"
        );
        busy
    }

    /// `hmm_range_fault` over `span` and the device page-table update, retried while the notifier
    /// sequence moves (seed 002's driver_populate_range). `faulted` (sorted, within `span`) must
    /// come out valid, writable for writes and atomics; the other pages inside `spans` are mapped
    /// as the range fault finds them, and not at all when they are not present; pages outside
    /// `spans` and those in `busy` (sorted) are left alone. `span` lies inside `region`.
    ///
    /// With `populate` (`Some(write)`), the pages of `spans` in system memory that the program
    /// may read and write are faulted in too (for writing when `write`): a remote window then
    /// maps pages never touched yet.
    fn fault_and_map(
        &self,
        region: &hetmem::region::Region,
        span: PageRange,
        faulted: &[(VirtAddr, FaultAccess)],
        spans: &[PageRange],
        busy: &[VirtAddr],
        populate: Option<bool>,
    ) -> Result<(), (VirtAddr, RangeFaultError)> {
        let sub = self
            .sub
            .lock()
            .clone()
            .ok_or((span.start(), RangeFaultError::Invalid("device shut down")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut targets: Vec<Option<(PteTarget, PtePerms)>> =
            Vec::with_capacity(span.npages() as usize);
        loop {
            if Instant::now() > deadline {
                return Err((span.start(), RangeFaultError::Busy));
            }
            let mut r = HmmRange::new(&sub, span, 0);
            r.pfn_flags_mask = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE;
            if let Some(write) = populate {
                for s in spans.iter().filter_map(|s| s.intersect(&span)) {
                    for a in s.pages() {
                        // Only pages the program may read and write: a fault on any page
                        // the range fault is asked for fails the whole service, and a page
                        // it may not write would fail a write.
                        let k = region.index(a);
                        if busy.binary_search(&a).is_ok()
                            || region.states.prot(k) & 0b11 != 0b11
                            || !matches!(region.states.get(k).location, Location::System)
                        {
                            continue;
                        }
                        let mut req = HmmPfn::REQ_FAULT;
                        if write {
                            req |= HmmPfn::REQ_WRITE;
                        }
                        r.hmm_pfns[span.index_of(a) as usize] = HmmPfn(req);
                    }
                }
            }
            for &(a, access) in faulted {
                let mut req = HmmPfn::REQ_FAULT;
                if access >= FaultAccess::Write {
                    req |= HmmPfn::REQ_WRITE;
                }
                r.hmm_pfns[span.index_of(a) as usize] = HmmPfn(req);
            }
            r.dev_private_owner = Some(self.mem.owner());
            r.notifier_seq = sub.read_begin();
            match self.mm.range_fault(&mut r) {
                Ok(_) => {}
                Err(RangeFaultError::Busy) => continue,
                Err(RangeFaultError::Fault { addr }) => {
                    return Err((addr, RangeFaultError::Fault { addr }))
                }
                Err(e) => return Err((faulted.first().map_or(span.start(), |p| p.0), e)),
            }
            // This device's own pages are reported as they are, never faulted (hmm.c), so a
            // write to one it holds read-only comes back valid but not writable: mapping it
            // read-only and replaying would fault again for ever (DESIGN.md invariant 4). When
            // the program made the page read-only (`AddressSpace::protect`), that is a
            // permission fault, as it would be in system memory (invariant 5); otherwise the
            // page came in read-only (a zero page, a write-protected page) and goes back to
            // system memory, where the next pass faults it writable.
            let read_only_own = |&&(a, access): &&(VirtAddr, FaultAccess)| {
                let pfn = r.hmm_pfns[span.index_of(a) as usize];
                access >= FaultAccess::Write
                    && pfn.is_valid()
                    && !pfn.is_write()
                    && pfn
                        .device_frame()
                        .is_some_and(|(dev, _, _)| dev == self.mem.id())
            };
            let mut upgraded = false;
            for &(a, _) in faulted.iter().filter(read_only_own) {
                let writable = region.states.prot(region.index(a)) & 0b10 != 0;
                if !writable {
                    return Err((a, RangeFaultError::Permission { addr: a }));
                }
                let page = PageRange::new(a.0, PAGE_SIZE)
                    .map_err(|_| (a, RangeFaultError::Invalid("page")))?;
                self.mm
                    .evict_range(page, Some(self.mem.id()))
                    .map_err(|_| (a, RangeFaultError::Busy))?;
                upgraded = true;
            }
            if upgraded {
                continue;
            }
            targets.clear();
            targets.extend(r.hmm_pfns.iter().enumerate().map(|(k, pfn)| {
                let a = span.page(k as u64);
                if !pfn.is_valid()
                    || !spans.iter().any(|s| s.contains(a))
                    || busy.binary_search(&a).is_ok()
                {
                    return None;
                }
                let target = match pfn.device_frame() {
                    Some((dev, frame, _)) if dev == self.mem.id() => PteTarget::Local(frame),
                    Some((dev, frame, _)) => PteTarget::Peer { dev, frame },
                    None => PteTarget::System,
                };
                let mut perms = PtePerms::READ;
                if pfn.is_write() {
                    perms |= PtePerms::WRITE | PtePerms::ATOMIC;
                }
                Some((target, perms))
            }));
            let mapped = self.mmu.update(|c| {
                if sub.read_retry(r.notifier_seq) {
                    return None;
                }
                // This device's read copies (the copies' lock is taken inside the table update,
                // as the notifier takes it, so none comes or goes meanwhile) keep their leaves:
                // the range fault reports the system page under a copy, and mapping that over
                // the copy's leaf would leave the copy booked but unreachable. A page the device
                // is to write cannot have a copy any more (the write collapsed them); should one
                // remain, it goes before the page is mapped writable.
                //
                // A page this device started duplicating since the snapshot (the fault service
                // and a prefetch's read duplication race) is not mapped writable either: this
                // device's own write protection does not move its sequence, so the snapshot's
                // write permission may be stale. Its DUPLICATED bit, set before the write
                // protection and read here under the table lock, says so; the warp faults again
                // and its range fault collapses the page.
                let mut dropped = Vec::new();
                {
                    let dups = self.dups.lock();
                    for (k, t) in targets.iter_mut().enumerate() {
                        let a = span.page(k as u64);
                        let Some((_, perms)) = t else { continue };
                        let write = perms.contains(PtePerms::WRITE);
                        if write && region.states.get(region.index(a)).duplicated {
                            *t = None;
                        } else if dups.copy_of(a).is_some() {
                            if write {
                                dropped.push(a);
                            } else {
                                *t = None;
                            }
                        }
                    }
                }
                let mut copies = Vec::new();
                for a in dropped {
                    let page = PageRange::new(a.0, PAGE_SIZE).expect("a page of the span");
                    copies.extend(self.unmap_copies(c, page));
                }
                Some((map_span(c, span, &targets), copies))
            });
            let Some((mapped, copies)) = mapped else {
                continue;
            };
            // Mapping over leaves queued their invalidations: send them (and wait for any other
            // in flight) before the replay lets warps run on the new mappings, and before a
            // dropped copy's frame goes back to the pool.
            self.mmu.shootdown();
            self.free_copies(&copies);
            let mapped = mapped.map_err(|e| (span.start(), e))?;
            self.counters
                .pages_mapped_remote
                .fetch_add(mapped.remote, Ordering::Relaxed);
            self.counters
                .pages_serviced
                .fetch_add(mapped.pages, Ordering::Relaxed);
            return Ok(());
        }
    }
}

/// What [`map_span`] mapped.
struct Mapped {
    /// Pages newly mapped or retargeted (a page mapped again as it was does not count).
    pages: u64,
    /// Pages mapped to system memory.
    remote: u64,
}

/// Maps `targets` (one per page of `span`, `None` = leave unmapped) with as few table updates as
/// it can: one 2 MiB leaf when the span is a whole block of this device's frames in one aligned
/// run with one permission, else one `map_pages` per run of mapped pages with one permission.
fn map_span(
    c: &mut hetmem_core::device_mmu::MmuCore,
    span: PageRange,
    targets: &[Option<(PteTarget, PtePerms)>],
) -> Result<Mapped, RangeFaultError> {
    let fail = |k: usize| RangeFaultError::Fault {
        addr: span.page(k as u64),
    };
    let remote = targets
        .iter()
        .filter(|t| matches!(t, Some((PteTarget::System, _))))
        .count() as u64;
    if let Some(Some((PteTarget::Local(base), perms))) = targets.first() {
        let whole = span.npages() == PAGES_PER_HUGE
            && span.start().0.is_multiple_of(HUGE_PAGE_SIZE)
            && u64::from(base.0).is_multiple_of(PAGES_PER_HUGE)
            && targets.iter().enumerate().all(|(k, t)| {
                *t == Some((
                    PteTarget::Local(hetmem_core::DevPfn(base.0 + k as u32)),
                    *perms,
                ))
            });
        if whole {
            let rep = c
                .map_huge(span, PteTarget::Local(*base), *perms)
                .map_err(|_| fail(0))?;
            return Ok(Mapped {
                pages: rep.mapped + rep.displaced.pages,
                remote,
            });
        }
    }
    let mut pages = 0;
    let mut run: Vec<PteTarget> = Vec::new();
    let mut k = 0;
    while k < targets.len() {
        let Some((_, perms)) = targets[k] else {
            k += 1;
            continue;
        };
        run.clear();
        let mut end = k;
        while end < targets.len() {
            match targets[end] {
                Some((t, p)) if p == perms => run.push(t),
                _ => break,
            }
            end += 1;
        }
        let r =
            PageRange::from_pages(span.page(k as u64).0, (end - k) as u64).map_err(|_| fail(k))?;
        let rep = c.map_pages(r, &run, perms).map_err(|_| fail(k))?;
        pages += rep.mapped + rep.displaced.pages;
        k = end;
    }
    Ok(Mapped { pages, remote })
}
