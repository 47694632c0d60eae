//! The runtime's placement policy, one per device: what the device's fault service does with
//! each faulted 2 MiB block, given the advice in force, and which chunks leave device memory
//! when it is full.
//!
//! Per block: pages whose preferred location is elsewhere, or that this device is advised to
//! access where they are (accessed-by, no preferred location), are mapped remotely (UVM's
//! policy: advice beats migration). The others migrate, widened to the range's granularity
//! window. Before a migration that would not fit, victims go: whole 2 MiB chunks of this device,
//! least recently used first, where "used" is read from the device's accessed bits (seed 000's
//! `clear_flush_young`, sampled when a victim is needed), not allocation order as NVIDIA's driver
//! has it. The block being serviced is never its own victim.
//!
//! An explicit prefetch is not a fault: it moves the pages it names and no others (UVM's
//! `UVM_MIGRATE` behind `cudaMemPrefetchAsync` migrates the range asked for; windows and
//! prefetchers serve faults). The device services a prefetch on the prefetching thread, which
//! marks itself ([`ExactPlacement`]) so that the policy plans exactly the pages asked for, still
//! making room for them. Without this, a prefetch to one device would take along neighbours that
//! another device holds.
//!
//! Thrashing (UVM's `uvm_perf_thrashing.c`, uvm-svm.md A.9): one [`ThrashingDetector`] for the
//! whole context hears every migration the heuristics own, in both directions: device faults
//! migrating pages in ([`PlacementPolicy::place`], peers' pages included), prefetches around
//! them, and CPU faults bringing pages back ([`PlacementPolicy::migrated_to_host`]); evictions,
//! suspend and the user's prefetches are not reported (they are not the heuristics' to undo).
//! A device's migrations are reported when its plan is made: a page that then fails to move
//! (device memory full, page busy) counts all the same, which the detector, after the rhythm of
//! the bounces, can afford. Before a faulted page migrates, the detector is asked for a hint:
//!
//! * **throttle**: the page stays where it is and this device maps it there for the throttling
//!   period (see [`Kept`] for why a mapping rather than a fault left pending); when the period
//!   is over, the mapping is revoked, so the next access faults and is decided again;
//! * a CPU fault on a thrashing page is throttled too, as UVM's CPU fault handler is: the
//!   faulting thread sleeps until the throttling period ends
//!   ([`PlacementPolicy::cpu_fault_delay`]), then the page comes back;
//! * **pin** elsewhere (the CPU: the only place every processor reaches): the page stays in
//!   system memory and every device maps it remotely until the pin expires; then, as UVM's
//!   delayed work does, the remote mappings are revoked and the next access decides afresh.
//!   A pin here migrates as usual.
//!
//! Thrashing pages, like pages the advice keeps remote, are never taken along by migration
//! windows, the tree prefetcher, the stream detector or access counters (UVM leaves thrashing
//! pages out of prefetch).
//!
//! Lock order, outermost first: advice, then this policy's own locks (LRU, prefetch and counter
//! state), then the context's thrashing state, then [`RuntimePlacement::kept`]. None of them is
//! held across a call into the address space that can fault or migrate, nor across a TLB
//! shootdown.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hetmem::{migrate::TriggerScope, AddressSpace};
use hetmem_core::{
    addr::PAGES_PER_HUGE,
    fault_ring::FaultAccess,
    link::{Direction, ModelTime},
    migrate::Trigger,
    page_state::Location,
    policy::{
        access_counters::AccessCounters,
        prefetch::{BlockMask, StreamDetector, TreePrefetcher},
        thrashing::{
            Hint, MigrationCause, ThrashingConfig, ThrashingDetector, ThrashingError,
            ThrashingStats,
        },
        Processor,
    },
    DeviceId, PageRange, VirtAddr, HUGE_PAGE_SIZE, PAGE_SIZE,
};
use hetmem_sim::accel::AccelHandle;
use hetmem_sim::placement::{BlockFaults, BlockPlan, PlacementAction, PlacementPolicy};
use parking_lot::{Mutex, RwLock};

use crate::advice::AdviceMap;
use crate::stats::Counters;

thread_local! {
    /// Set while this thread carries out a user request ([`UserRequest`]).
    static USER_REQUEST: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as carrying out a user request (a prefetch, an accessed-by mapping)
/// until dropped. The device services such a request on the calling thread, through
/// [`PlacementPolicy::place`], and forces its own action whatever the plan says; its migrations
/// are the user's ([`MigrationCause::UserPrefetch`]), which thrashing detection ignores, so
/// placement neither asks for hints nor reports them.
pub(crate) struct UserRequest(());

impl UserRequest {
    pub(crate) fn enter() -> Self {
        USER_REQUEST.with(|c| c.set(true));
        UserRequest(())
    }
}

impl Drop for UserRequest {
    fn drop(&mut self) {
        USER_REQUEST.with(|c| c.set(false));
    }
}

fn in_user_request() -> bool {
    USER_REQUEST.with(Cell::get)
}

/// Thrashing detection shared by every device of a context: thrashing is a property of a page
/// across processors, so all of them report to, and ask, one detector.
///
/// Time base: wall-clock time since the context was built ([`Instant`], monotonic). The
/// detector's thresholds are wall-clock durations in UVM (500 µs lapse, 150 ms pins, 1 s epoch)
/// and only mean something against one: a device's modelled clock
/// ([`hetmem_sim::accel::Accelerator::clock`]) is a sum of charges for link events, not a
/// timeline: it stands still while kernels compute or the CPU works (and entirely with the link
/// model off), so a page touched once a second by each side would look as if it bounced every
/// few microseconds; and each device has its own, while the detector compares times from all
/// devices and the CPU. Measured on the simulator (ping-pong of 8 pages, 2 compute units,
/// `tests/thrashing.rs`, `bounce_cost`): one round trip CPU → device → CPU (8 pages each way)
/// takes 0.4 to 0.6 ms of wall-clock time on an idle host, up to about 1.2 ms with other tests
/// running beside it, so consecutive migrations of a page come a few hundred microseconds
/// apart, the scale UVM's 500 µs lapse was chosen for; the modelled clock charges about 130 µs
/// per round trip with the PCIe 4 model, and nothing at all with the model off. A loaded host
/// stretches the wall-clock gaps past the lapse; UVM scales its lapse on slow platforms (×800
/// on emulation), and so can [`ThrashingConfig::lapse`].
#[derive(Debug)]
pub(crate) struct Thrashing {
    state: Mutex<ThrashingState>,
    start: Instant,
}

#[derive(Debug)]
struct ThrashingState {
    detector: ThrashingDetector,
    /// Last [`ThrashingDetector::tick`].
    last_tick: Duration,
    /// Time between two ticks: an eighth of the epoch (125 ms by default). A tick walks every
    /// tracked page, and only frees the state of blocks quiet for an epoch and counts expired
    /// pins: hints, reports and [`ThrashingDetector::pinned`] see a pin expire on time without
    /// it.
    tick_every: Duration,
}

impl Thrashing {
    /// Detection with `config`; `None` when it is disabled. A bad config is an error either way.
    pub(crate) fn new(config: ThrashingConfig) -> Result<Option<Self>, ThrashingError> {
        let detector = ThrashingDetector::new(config)?;
        // Cannot overflow: the detector checked that lapse × epoch fits.
        let tick_every = config.lapse * (config.epoch / 8).max(1);
        Ok(config.enabled.then(|| Thrashing {
            state: Mutex::new(ThrashingState {
                detector,
                last_tick: Duration::ZERO,
                tick_every,
            }),
            start: Instant::now(),
        }))
    }

    /// Now, on the detector's time base.
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The detector's counters.
    pub(crate) fn stats(&self) -> ThrashingStats {
        self.state.lock().detector.stats()
    }

    /// Checks the detector's invariants.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        self.state.lock().detector.check_invariants()
    }
}

/// Why this device maps a faulted page where it is instead of migrating it, and until when: when
/// that ends the mapping is revoked ([`AccelHandle::unmap`]), so that the next access faults and
/// asks again.
///
/// "Where it is" is system memory, or this device's memory; a page in a peer's private memory,
/// which no other processor can map, comes back to system memory on the way (the range fault
/// brings it, as `hmm_range_fault` does).
///
/// Throttling: UVM leaves a throttled GPU fault unserviced and replays it after the nap; here a
/// throttled page is mapped where it is for the nap. Both keep the page from migrating while
/// the period lasts, which is what throttling is for; a mapping also lets the warp progress at
/// once, and it cannot livelock: every faulted page leaves the service mapped, remote or local,
/// and a revoked page faults once more and is serviced again. Leaving the fault pending would
/// gain little here: the CPU never asks for hints (its faults must bring a device-private page
/// back), so in a CPU–device bounce the device is alone in its periods, and its replay,
/// microseconds later, would be serviced in the same period (the first to ask is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kept {
    /// Until the throttling period ends.
    Throttled { until: Duration },
    /// Until the pin expires.
    Pinned,
}

/// Which chunk of device memory leaves first when room is needed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EvictionOrder {
    /// Least recently used first, "used" read from the device's accessed bits, sampled when a
    /// victim is needed (seed 000's `clear_flush_young`). hetmem's default.
    #[default]
    AccessedLru,
    /// Least recently *allocated into* first: a chunk goes to the back of the list when the fault
    /// service or a prefetch migrates pages into it, never because warps use it (NVIDIA's PMM,
    /// `pick_root_chunk_to_evict`: the USED list is FIFO by allocation; uvm-svm.md A.7).
    AllocationOrder,
}

/// Chunks of device memory in use, with the tick each was last seen used.
#[derive(Debug, Default)]
struct Lru {
    last_used: BTreeMap<u64, u64>,
    tick: u64,
    /// Launches begun on the device so far (see [`RuntimePlacement::launch_began`]).
    epoch: u64,
    /// Per chunk, when the device was last seen using it (accessed bits, or a migration into
    /// it): see [`ChunkUse`].
    used: BTreeMap<u64, ChunkUse>,
}

/// When a device used a chunk of its memory.
#[derive(Clone, Copy, Debug, Default)]
struct ChunkUse {
    /// The last launch it was seen used in, and the one before that (0: none).
    last: u64,
    before: u64,
    /// The device's modelled time when it was last seen used.
    at: ModelTime,
}

/// How long, in the device's modelled time, a chunk used by the launch running now stays in
/// the working set without being used again: some twenty fault batches' service. A kernel
/// that walks its data once leaves the chunks behind it idle for longer, a kernel that keeps
/// reaching them (random accesses, tiles reread) does not. Chosen by measurement at 2x device
/// memory (`hetmem bench --matrix`): with 1 ms stream was 2.2x explicit copies and atax 3.7x,
/// with 4 ms 1.5x and 3.4x; conv2d 1.8x and 2.0x.
const RECENT: ModelTime = ModelTime::from_micros(4000);

impl Lru {
    /// Notes that the chunk at `base` was used now, in the launch running.
    fn used(&mut self, base: u64, now: ModelTime) {
        let epoch = self.epoch;
        let u = self.used.entry(base).or_default();
        if u.last != epoch {
            u.before = u.last;
            u.last = epoch;
        }
        u.at = now;
    }

    /// Whether the chunk at `base` is part of the working set at `now`: reused across launches
    /// (used by one of the two launches before this one: a kernel that rereads its data every
    /// launch, or every other launch when two kernels alternate, has not necessarily reached
    /// it yet in this one), or used by this launch within [`RECENT`].
    fn in_use(&self, base: u64, now: ModelTime) -> bool {
        let Some(u) = self.used.get(&base) else {
            return false;
        };
        let prior = if u.last < self.epoch {
            u.last
        } else {
            u.before
        };
        (prior > 0 && prior.saturating_add(2) >= self.epoch)
            || (u.last == self.epoch && now.saturating_sub(u.at) <= RECENT)
    }
}

/// The placement policy of one device of a context.
#[derive(Debug)]
pub(crate) struct RuntimePlacement {
    mm: &'static Arc<AddressSpace>,
    advice: Arc<RwLock<AdviceMap>>,
    counters: Arc<Counters>,
    /// Set once the device exists (the policy is built before it).
    me: OnceLock<AccelHandle>,
    granularity: u64,
    /// Held across an eviction, so two of them never pick the same victims.
    lru: Mutex<Lru>,
    /// How victims are ordered.
    eviction: EvictionOrder,
    /// Window a CPU fault brings back, bytes.
    cpu_window: u64,
    /// The most a CPU fault that continues a walk brings back, bytes (at most `cpu_window`:
    /// off; see [`crate::ContextBuilder::cpu_readahead`]).
    cpu_readahead: u64,
    /// The CPU's walks through allocations, most recent last.
    cpu_walks: Mutex<Vec<CpuWalk>>,
    /// Window of a fault that needs room, bytes (see [`crate::ContextBuilder::pressure_window`]).
    pressure_window: Option<u64>,
    /// Once memory is full, keep the working set and map the rest where it is (see
    /// [`crate::ContextBuilder::spill_remote`]).
    spill_remote: bool,
    /// Pages spilled (mapped remotely by a full device) since the last revocation.
    spilled: Mutex<Vec<PageRange>>,
    /// UVM's density prefetcher, per block.
    tree: Option<TreePrefetcher>,
    /// Fault-driven page migrations per block so far (the tree prefetcher's `min_faults` gate).
    fault_migrations: Mutex<HashMap<u64, u32>>,
    /// Our sequential-stream detector, fed each serviced block's faults.
    stream: Option<Mutex<StreamDetector>>,
    /// Ranges to migrate that lie beyond the block being serviced (stream prefetch ahead):
    /// handed to the fault service through `take_migrations`.
    ahead: Mutex<Vec<PageRange>>,
    /// Remote accesses per region; hot regions migrate in (trigger: access counters).
    access: Option<Mutex<AccessCounters>>,
    /// The context's thrashing detection.
    thrashing: Option<Arc<Thrashing>>,
    /// Pages this device maps where they are because of a thrashing hint, by page address.
    kept: Mutex<BTreeMap<u64, Kept>>,
    /// Pages CPU faults took back from this device since its last launch, to bring back at the
    /// next one (see [`crate::ContextBuilder::restore_on_launch`]); `None` when off.
    restore: Option<Mutex<Vec<PageRange>>>,
    /// Pages restored at launches, with how many restores in a row brought each back: a page
    /// a CPU write takes back before every launch is mapped where it is instead (see
    /// [`RuntimePlacement::take_launch_restores`]). Kept while thrashing detection is on.
    bounces: Mutex<Bounces>,
    /// Of the pages in `restore`, those a CPU write fault took.
    written: Mutex<Vec<PageRange>>,
    /// Pages the CPU takes back after every launch, read back as each launch ends (see
    /// [`crate::ContextBuilder::readback_after_launch`]); `None` when off.
    readback: Option<Mutex<Readback>>,
}

/// What the CPU takes back from a device after its launches, to read back as a launch ends.
#[derive(Debug, Default)]
struct Readback {
    /// Pages CPU faults took from the device since its last launch began.
    taken: Vec<PageRange>,
    /// Pages CPU faults took between the two launches before.
    before: Vec<PageRange>,
    /// Pages read back as each launch ends, by page address.
    pages: HashMap<u64, ReadbackPage>,
}

/// A page read back as launches end.
#[derive(Clone, Copy, Debug)]
struct ReadbackPage {
    /// Readbacks left before the next confirmation.
    left: u32,
    /// Readbacks the last confirmation granted.
    grant: u32,
    /// The launch now ending sat out its readback: the CPU must take the page again after it
    /// to keep it read back.
    confirming: bool,
}

/// Readbacks a page first gets; each confirmation (the CPU faulting on it again after a launch
/// that skipped it) doubles them, up to [`READBACK_MAX`].
const READBACK_FIRST: u32 = 4;
/// The most readbacks between two confirmations.
const READBACK_MAX: u32 = 64;
/// The most pages read back as a launch ends (256 MiB): past it, the CPU faults as before.
const READBACK_PAGES: usize = 1 << 16;

/// A CPU walk through an allocation: where the window the last CPU fault brought back ended,
/// and how large it was.
#[derive(Clone, Copy, Debug)]
struct CpuWalk {
    /// The allocation's first page.
    region: u64,
    /// The end of the last window.
    next: u64,
    /// The last window's size, bytes (before it was clipped to the allocation).
    window: u64,
}

/// CPU walks followed at once: a loop reading a few arrays side by side.
const CPU_WALKS: usize = 8;

/// Pages that bounce between the CPU and a device between launches.
#[derive(Debug, Default)]
struct Bounces {
    /// Restores so far (launches that found pages to bring back).
    restores: u64,
    /// By page address: restores in a row that brought the page back, and the latest.
    pages: HashMap<u64, (u32, u64)>,
    /// Launches so far.
    launches: u64,
    /// Pages mapped where they are, by page address, until which launch: policy migrations
    /// (access counters, readahead) leave them there meanwhile.
    pinned: BTreeMap<u64, u64>,
}

impl Readback {
    /// A launch begins: a page the CPU took after this launch's predecessor and after the one
    /// before it, or after a launch that skipped its readback to confirm it, is read back from
    /// now on; one read back that the CPU did not take again after its confirming launch is
    /// dropped.
    fn launch_began(&mut self) {
        let taken = merged(std::mem::take(&mut self.taken));
        let before = std::mem::replace(&mut self.before, taken.clone());
        // At most the pages followed (a CPU that read gigabytes back after a launch is not
        // reading a flag).
        let confirmed: std::collections::HashSet<u64> = taken
            .iter()
            .flat_map(|r| r.pages())
            .take(READBACK_PAGES)
            .map(|a| a.0)
            .collect();
        // `before` is sorted and merged: the range that could hold a page is the last one
        // starting at or below it.
        let in_before = |a: u64| {
            let i = before.partition_point(|r| r.start().0 <= a);
            i > 0 && before[i - 1].contains(VirtAddr(a))
        };
        // A confirming launch that the CPU did not follow by taking the page: dropped.
        self.pages
            .retain(|a, p| !p.confirming || confirmed.contains(a));
        for &a in &confirmed {
            if let Some(p) = self.pages.get_mut(&a) {
                if p.confirming {
                    p.grant = p.grant.saturating_mul(2).min(READBACK_MAX);
                    p.left = p.grant;
                    p.confirming = false;
                }
            } else if in_before(a) && self.pages.len() < READBACK_PAGES {
                self.pages.insert(
                    a,
                    ReadbackPage {
                        left: READBACK_FIRST,
                        grant: READBACK_FIRST,
                        confirming: false,
                    },
                );
            }
        }
    }

    /// The pages to read back as this launch ends (one readback each taken); those with none
    /// left sit this launch out, to be confirmed by a CPU fault.
    fn due(&mut self) -> Vec<PageRange> {
        let mut out = Vec::new();
        for (&a, p) in self.pages.iter_mut() {
            if p.left > 0 {
                p.left -= 1;
                out.push(a);
            } else {
                p.confirming = true;
            }
        }
        out.sort_unstable();
        page_runs(out)
    }
}

/// Launches a bounce pin lasts: UVM's pin of 300 lapses, with launches for lapses.
const BOUNCE_PIN: u64 = 300;

/// Restores in a row that bring a page back before the next one maps it where it is: UVM's
/// thrashing threshold (three migrations in a row, uvm-svm.md A.9), with restores for lapses.
const BOUNCE_THRESHOLD: u32 = 3;

/// The policies a device's placement runs.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    pub(crate) tree: Option<TreePrefetcher>,
    pub(crate) stream: Option<StreamDetector>,
    pub(crate) access: Option<AccessCounters>,
    pub(crate) thrashing: Option<Arc<Thrashing>>,
    pub(crate) eviction: EvictionOrder,
    /// Window a CPU fault on this device's pages brings back (bytes; a page: just the page).
    pub(crate) cpu_window: u64,
    /// The most a CPU fault continuing a walk brings back (bytes; `cpu_window` or less: off).
    pub(crate) cpu_readahead: u64,
    /// Window of a fault when device memory is full, if smaller than the usual one.
    pub(crate) pressure_window: Option<u64>,
    /// Once memory is full, evict only chunks out of the working set; map the rest remotely.
    pub(crate) spill_remote: bool,
    /// Bring back at a launch what CPU faults took from the device since the last one.
    pub(crate) restore_on_launch: bool,
    /// As a launch ends, move to system memory what the CPU took back after the launches
    /// before.
    pub(crate) readback_after_launch: bool,
}

impl RuntimePlacement {
    pub(crate) fn new(
        mm: &'static Arc<AddressSpace>,
        advice: Arc<RwLock<AdviceMap>>,
        counters: Arc<Counters>,
        granularity: u64,
        policies: Policies,
    ) -> Self {
        RuntimePlacement {
            mm,
            advice,
            counters,
            me: OnceLock::new(),
            granularity,
            lru: Mutex::new(Lru::default()),
            eviction: policies.eviction,
            cpu_window: policies.cpu_window.max(PAGE_SIZE),
            cpu_readahead: policies.cpu_readahead,
            cpu_walks: Mutex::new(Vec::new()),
            pressure_window: policies.pressure_window,
            spill_remote: policies.spill_remote,
            spilled: Mutex::new(Vec::new()),
            tree: policies.tree,
            fault_migrations: Mutex::new(HashMap::new()),
            stream: policies.stream.map(Mutex::new),
            ahead: Mutex::new(Vec::new()),
            access: policies.access.map(Mutex::new),
            thrashing: policies.thrashing,
            kept: Mutex::new(BTreeMap::new()),
            restore: policies.restore_on_launch.then(|| Mutex::new(Vec::new())),
            bounces: Mutex::new(Bounces::default()),
            written: Mutex::new(Vec::new()),
            readback: policies
                .readback_after_launch
                .then(|| Mutex::new(Readback::default())),
        }
    }

    /// The pages CPU faults took from this device since the last call, to migrate back before
    /// its next launch: sorted, merged, clipped to managed memory and to the pages still in
    /// system memory, without what the advice keeps remote or read-mostly and without thrashing
    /// pages (those stay where the detector put them). Empty when the policy is off.
    ///
    /// With thrashing detection on, the pages brought back by each of the last
    /// [`BOUNCE_THRESHOLD`] restores come back apart, as the second list: the CPU takes them
    /// between launches every time (a table it updates for each step), and each round trip
    /// costs a CPU fault, two copies and the invalidations. They are to be mapped where they
    /// are, as UVM pins a thrashing page in system memory and maps it remotely: the CPU then
    /// writes them in place, and the device reads them over the link.
    pub(crate) fn take_launch_restores(&self) -> (Vec<PageRange>, Vec<PageRange>) {
        let Some(restore) = &self.restore else {
            return (Vec::new(), Vec::new());
        };
        let out = self.restores(restore);
        let written = merged(std::mem::take(&mut *self.written.lock()));
        if self.thrashing.is_none() {
            return (out, Vec::new());
        }
        let mut b = self.bounces.lock();
        b.launches += 1;
        let now = b.launches;
        b.pinned.retain(|_, until| *until > now);
        if out.is_empty() {
            return (out, Vec::new());
        }
        b.restores += 1;
        let restore_no = b.restores;
        let mut back = Vec::new();
        let mut pinned = Vec::new();
        for r in out {
            for a in r.pages() {
                // Only what the CPU writes: a page it reads back (a kernel's result, a flag the
                // device sets) is the device's to write, and mapped remotely every write of
                // the device would cross the link.
                if !written.iter().any(|w| w.contains(a)) {
                    b.pages.remove(&a.0);
                    back.push(a.0);
                    continue;
                }
                let e = b.pages.entry(a.0).or_insert((0, 0));
                *e = if e.1 + 1 == restore_no {
                    (e.0.saturating_add(1), restore_no)
                } else {
                    (1, restore_no)
                };
                if e.0 >= BOUNCE_THRESHOLD {
                    pinned.push(a.0);
                    b.pinned.insert(a.0, now + BOUNCE_PIN);
                } else {
                    back.push(a.0);
                }
            }
        }
        // Forget what no longer bounces.
        b.pages.retain(|_, e| e.1 + 1 >= restore_no);
        (page_runs(back), page_runs(pinned))
    }

    /// Remembers pages a CPU fault took from this device, to restore at its next launch, and
    /// which of them a CPU write took (the CPU produces them: see
    /// [`RuntimePlacement::take_launch_restores`]).
    fn remember_restore(&self, ranges: impl IntoIterator<Item = PageRange>) {
        if self.readback.is_none() && self.restore.is_none() {
            return;
        }
        let ranges: Vec<PageRange> = ranges.into_iter().collect();
        if let Some(r) = &self.readback {
            r.lock().taken.extend(ranges.iter().copied());
        }
        let Some(restore) = &self.restore else {
            return;
        };
        if hetmem::migrate::cpu_fault_is_write() {
            self.written.lock().extend(ranges.iter().copied());
        }
        restore.lock().extend(ranges);
    }

    /// A launch on this device ended: the pages the CPU took back after each of the launches
    /// before (see [`Readback`]) move to system memory now, where the CPU will read them,
    /// instead of by a CPU fault each; the next launch restores them with the rest
    /// ([`crate::ContextBuilder::restore_on_launch`]). Returns the pages moved.
    pub(crate) fn read_back(&self) -> u64 {
        let (Some(r), Some(handle)) = (&self.readback, self.me.get()) else {
            return 0;
        };
        let due = r.lock().due();
        if due.is_empty() {
            return 0;
        }
        let _user = UserRequest::enter();
        let _trigger = TriggerScope::enter(Trigger::Prefetch);
        let (mut moved, mut pages) = (Vec::new(), 0);
        for run in due {
            for region in self.mm.regions_in(run) {
                let Some(sub) = region.range().intersect(&run) else {
                    continue;
                };
                // Only what this device holds: a page elsewhere is not its to move.
                let me = handle.id();
                let held = runs_at(
                    &region,
                    sub,
                    |l| matches!(l, Location::Device { dev, .. } if dev == me),
                );
                for piece in held {
                    match self.mm.evict_range(piece, Some(handle.id())) {
                        Ok(n) if n > 0 => {
                            handle.charge_migration(Direction::DeviceToHost, n * PAGE_SIZE);
                            self.counters.device(handle.id()).add_to_system(n);
                            pages += n;
                            moved.push(piece);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(start = %piece.start(), error = %e, "launch readback failed");
                        }
                    }
                }
            }
        }
        if let Some(restore) = &self.restore {
            restore.lock().extend(moved);
        }
        self.counters.add_launch_readback(pages);
        pages
    }

    /// `ranges` without the pages a bounce pin keeps where they are.
    fn without_bounce_pins(&self, ranges: Vec<PageRange>) -> Vec<PageRange> {
        let b = self.bounces.lock();
        if b.pinned.is_empty() {
            return ranges;
        }
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let mut at = r.start().0;
            for (&p, _) in b.pinned.range(r.start().0..r.end().0) {
                out.extend(PageRange::from_bounds(at, p).ok());
                at = p + PAGE_SIZE;
            }
            out.extend(PageRange::from_bounds(at, r.end().0).ok());
        }
        out
    }

    fn restores(&self, restore: &Mutex<Vec<PageRange>>) -> Vec<PageRange> {
        let taken = std::mem::take(&mut *restore.lock());
        let Some(me) = self.me() else {
            return Vec::new();
        };
        let merged = merged(taken);
        let mut out = Vec::new();
        {
            let advice = self.advice.read();
            for r in merged {
                for region in self.mm.regions_in(r) {
                    let Some(sub) = region.range().intersect(&r) else {
                        continue;
                    };
                    for (piece, attrs) in advice.pieces(sub.start().0..sub.end().0) {
                        if attrs.read_mostly || advised_remote(&attrs, me) {
                            continue;
                        }
                        let Ok(piece) = PageRange::from_bounds(piece.start, piece.end) else {
                            continue;
                        };
                        // Only what is still in system memory: a page another device faulted
                        // in since is that device's now, not taken back from it.
                        out.extend(system_runs(&region, piece));
                    }
                }
            }
        }
        match &self.thrashing {
            Some(t) if !out.is_empty() => without_thrashing(&t.state.lock().detector, t.now(), out),
            _ => out,
        }
    }

    pub(crate) fn attach(&self, handle: AccelHandle) {
        let _ = self.me.set(handle);
    }

    fn me(&self) -> Option<DeviceId> {
        self.me.get().map(AccelHandle::id)
    }

    /// Pages of `block` held by this device now; the pages of the allocations that hold one
    /// of `faulted`; and those allocations.
    fn block_masks(
        &self,
        block: PageRange,
        me: DeviceId,
        faulted: &[(VirtAddr, FaultAccess)],
    ) -> (BlockMask, BlockMask, Vec<PageRange>) {
        let mut resident = BlockMask::new();
        let mut managed = BlockMask::new();
        let mut allocations = Vec::new();
        for region in self.mm.regions_in(block) {
            let Some(sub) = region.range().intersect(&block) else {
                continue;
            };
            let from = block.index_of(sub.start()) as usize;
            if faulted.iter().any(|&(a, _)| region.range().contains(a)) {
                managed.set_range(from..from + sub.npages() as usize);
                allocations.push(region.range());
            }
            for a in sub.pages() {
                if matches!(region.states.get(region.index(a)).location,
                    Location::Device { dev, .. } if dev == me)
                {
                    resident.set(block.index_of(a) as usize);
                }
            }
        }
        (resident, managed, allocations)
    }

    /// Where the pages of `pages` (a mask of `block`) are now, those that are managed memory.
    fn locations(&self, block: PageRange, pages: &BlockMask) -> Vec<(VirtAddr, Processor)> {
        let mut out = Vec::with_capacity(pages.count() as usize);
        for region in self.mm.regions_in(block) {
            let Some(sub) = region.range().intersect(&block) else {
                continue;
            };
            let from = block.index_of(sub.start()) as usize;
            for k in pages
                .iter()
                .filter(|&k| (from..from + sub.npages() as usize).contains(&k))
            {
                let a = block.page(k as u64);
                let p = match region.states.get(region.index(a)).location {
                    Location::Device { dev, .. } | Location::Exclusive { dev, .. } => {
                        Processor::Device(dev)
                    }
                    Location::System => Processor::Cpu,
                };
                out.push((a, p));
            }
        }
        out
    }

    /// Thrashing, before the windows grow: asks the detector about each faulted page of `f`
    /// that would migrate into this device (not kept remote by the advice, not resident here),
    /// and reports the migrations that will happen. A page a hint keeps where it is is marked in
    /// `remote` and remembered in [`RuntimePlacement::kept`] until the hint ends. Returns the
    /// block's thrashing pages, which nothing may take along.
    fn thrashing_hints(
        &self,
        t: &Thrashing,
        f: &BlockFaults<'_>,
        advice: &AdviceMap,
        me: DeviceId,
        resident: &BlockMask,
        remote: &mut [bool],
    ) -> BlockMask {
        let dev = Processor::Device(me);
        let block = f.block;
        let mut moving = BlockMask::new();
        for (&(a, _), _) in f.pages.iter().zip(remote.iter()).filter(|(_, &r)| !r) {
            moving.set(block.index_of(a) as usize);
        }
        let moving = moving.difference(resident);
        // Region lookups before the detector's lock.
        let mut candidates = Vec::with_capacity(moving.count() as usize);
        let mut at = 0;
        for (a, from) in self.locations(block, &moving) {
            // Both in address order: find the fault of page `a` (every one has one).
            while at < f.pages.len() && f.pages[at].0.page_down() < a {
                at += 1;
            }
            let Some(&(_, access)) = f.pages.get(at) else {
                break;
            };
            candidates.push((at, a, access, from, advice.at(a.0).preferred));
        }
        let now = t.now();
        let mut kept = Vec::new();
        let mut migrating = Vec::new();
        let (mut throttled, mut pinned) = (0, 0);
        let thrashing = {
            let mut st = t.state.lock();
            let det = &mut st.detector;
            for &(i, a, access, from, preferred) in &candidates {
                let (hint, cause) = if access == FaultAccess::Prefetch {
                    // Not a fault: the service's own migrations of what `take_migrations` asked
                    // for, from which thrashing pages were taken out.
                    (Hint::None, MigrationCause::Prefetch)
                } else if preferred == Some(dev) {
                    // A fault from the preferred location migrates before thrashing is looked
                    // at (uvm-svm.md A.6, rules 3 and 5).
                    (Hint::None, MigrationCause::DeviceFault)
                } else {
                    (
                        det.hint(a, dev, now, preferred),
                        MigrationCause::DeviceFault,
                    )
                };
                match hint {
                    Hint::Throttle { until } => {
                        remote[i] = true;
                        throttled += 1;
                        kept.push((a, Kept::Throttled { until }));
                    }
                    Hint::Pin { location } if location != dev => {
                        remote[i] = true;
                        pinned += 1;
                        kept.push((a, Kept::Pinned));
                    }
                    // A pin here is carried out by migrating (the detector ignores that one).
                    Hint::None | Hint::Pin { .. } => {
                        det.record_migration(a, from, dev, cause, now);
                        migrating.push(a);
                    }
                }
            }
            det.thrashing_in_block(block.start(), now)
        };
        if throttled + pinned > 0 {
            self.counters.add_thrashing_kept(throttled, pinned);
            tracing::debug!(
                dev = me.0,
                block = %block.start(),
                throttled,
                pinned,
                "thrashing pages mapped where they are"
            );
        }
        if !kept.is_empty() || !migrating.is_empty() {
            let mut map = self.kept.lock();
            for (a, k) in kept {
                map.insert(a.0, k);
            }
            // A kept page that faulted again before its hint ended (its mapping went with some
            // other invalidation) and migrates now is no longer kept: nothing to revoke.
            if !map.is_empty() {
                for a in migrating {
                    map.remove(&a.0);
                }
            }
        }
        thrashing
    }

    /// Reports the pages of `pages` (a mask of `block`) that a prefetch migrates into this device.
    fn record_prefetch(&self, t: &Thrashing, block: PageRange, pages: &BlockMask, me: DeviceId) {
        let dev = Processor::Device(me);
        let moves = self.locations(block, pages);
        let now = t.now();
        let mut st = t.state.lock();
        for (a, from) in moves {
            st.detector
                .record_migration(a, from, dev, MigrationCause::Prefetch, now);
        }
    }

    /// Housekeeping for thrashing, from the service thread between batches: ticks the detector
    /// (now and then: [`ThrashingState::tick_every`]), and revokes this device's mappings of the
    /// pages whose throttling
    /// period ended or whose pin expired, so that their next access faults and is decided again
    /// (UVM's pin expiry unmaps the remote mappings the same way).
    fn thrashing_housekeeping(&self, t: &Thrashing) {
        let now = t.now();
        let mut revoke: Vec<u64> = Vec::new();
        {
            let mut st = t.state.lock();
            if now.saturating_sub(st.last_tick) >= st.tick_every {
                st.detector.tick(now);
                st.last_tick = now;
            }
            let mut kept = self.kept.lock();
            kept.retain(|&a, k| {
                let holds = match *k {
                    Kept::Throttled { until } => now < until,
                    Kept::Pinned => st.detector.pinned(VirtAddr(a), now).is_some(),
                };
                if !holds {
                    revoke.push(a);
                }
                holds
            });
        }
        if revoke.is_empty() {
            return;
        }
        let Some(handle) = self.me.get() else {
            return;
        };
        self.counters.add_thrashing_revoked(revoke.len() as u64);
        tracing::debug!(
            dev = handle.id().0,
            pages = revoke.len(),
            "thrashing mappings revoked"
        );
        // `revoke` is sorted (a BTreeMap's order): one unmap per run of adjacent pages.
        for range in page_runs(revoke) {
            // A page that is gone (unmapped memory, a device shut down) needs no revoking.
            if let Some(Err(e)) = handle.unmap(range) {
                tracing::debug!(start = %range.start(), error = %e, "thrashing revocation failed");
            }
        }
    }

    /// Reads the device's accessed bits: a chunk used since the last sample is young again (at
    /// this tick, and in the launch running now). In allocation order only migrations into a
    /// chunk make it young for eviction (`touch`), but the bits still tell which launches used
    /// it.
    fn sample_accessed(&self, handle: &AccelHandle, lru: &mut Lru) -> ModelTime {
        lru.tick += 1;
        let now = self.now(handle);
        if self.eviction == EvictionOrder::AllocationOrder && !self.spill_remote {
            return now;
        }
        let tick = lru.tick;
        let chunks: Vec<u64> = lru.last_used.keys().copied().collect();
        for base in chunks {
            let chunk = PageRange::new(base, HUGE_PAGE_SIZE).expect("aligned chunk");
            if let Some(Ok(young)) = handle.take_accessed(chunk) {
                if !young.is_empty() {
                    if self.eviction == EvictionOrder::AccessedLru {
                        lru.last_used.insert(base, tick);
                    }
                    lru.used(base, now);
                }
            }
        }
        now
    }

    /// The device's modelled time, for the working set's recency: only spilling reads it, so
    /// without it the fault path takes no clock snapshot.
    fn now(&self, handle: &AccelHandle) -> ModelTime {
        if self.spill_remote {
            handle.elapsed().unwrap_or_default()
        } else {
            ModelTime::ZERO
        }
    }

    /// A launch begins on this device: the chunks used so far are credited to the launch that
    /// just ended, and the next ones to the new one.
    pub(crate) fn launch_began(&self) {
        let Some(handle) = self.me.get() else {
            return;
        };
        if let Some(r) = &self.readback {
            r.lock().launch_began();
        }
        let mut lru = self.lru.lock();
        if !self.spill_remote {
            lru.epoch += 1;
            return;
        }
        let now = self.sample_accessed(handle, &mut lru);
        lru.epoch += 1;
        // Spilled pages never fault again: once the device has room (a free chunk, or a chunk
        // out of the working set), their remote mappings go, so that the next access decides
        // afresh, as UVM revokes a pin's remote mappings when it expires.
        let room = handle.free_frames().unwrap_or(0) >= PAGES_PER_HUGE
            || lru.last_used.keys().any(|&b| !lru.in_use(b, now));
        drop(lru);
        if !room {
            return;
        }
        let spilled = std::mem::take(&mut *self.spilled.lock());
        let mut revoked = 0;
        for r in spilled {
            for region in self.mm.regions_in(r) {
                let Some(sub) = region.range().intersect(&r) else {
                    continue;
                };
                // Only pages still in system memory: one that migrated since is mapped locally.
                for run in system_runs(&region, sub) {
                    match handle.unmap(run) {
                        Some(Ok(())) => revoked += run.npages(),
                        Some(Err(e)) => {
                            tracing::debug!(start = %run.start(), error = %e, "spill revocation failed")
                        }
                        None => {}
                    }
                }
            }
        }
        if revoked > 0 {
            self.counters.add_spill_revoked(revoked);
            tracing::debug!(
                dev = handle.id().0,
                pages = revoked,
                "spilled mappings revoked"
            );
        }
    }

    /// Whether device memory holds a chunk other than `keep` that the working set does not use
    /// (see [`Lru::in_use`]), after reading the accessed bits; and the time of that reading.
    fn has_idle_chunk(&self, keep: PageRange) -> (bool, ModelTime) {
        let Some(handle) = self.me.get() else {
            return (false, ModelTime::ZERO);
        };
        let mut lru = self.lru.lock();
        let now = self.sample_accessed(handle, &mut lru);
        let idle = lru
            .last_used
            .keys()
            .any(|&b| b != keep.start().0 && !lru.in_use(b, now));
        (idle, now)
    }

    /// Makes room for `needed` frames by evicting least recently used chunks other than
    /// `keep`, and with `idle_only` none the working set uses. Returns the pages evicted. The
    /// accessed bits are read first, unless `sampled` gives the time they were just read at
    /// (by [`RuntimePlacement::has_idle_chunk`], for the same fault).
    fn make_room(
        &self,
        needed: u64,
        free: u64,
        keep: PageRange,
        idle_only: bool,
        sampled: Option<ModelTime>,
    ) -> u64 {
        let Some(handle) = self.me.get() else {
            return 0;
        };
        let me = handle.id();
        let mut lru = self.lru.lock();
        let now = match sampled {
            Some(now) => now,
            None => self.sample_accessed(handle, &mut lru),
        };
        let mut order: Vec<(u64, u64)> = lru
            .last_used
            .iter()
            .filter(|(&b, _)| b != keep.start().0 && !(idle_only && lru.in_use(b, now)))
            .map(|(&b, &t)| (t, b))
            .collect();
        order.sort_unstable();
        let _trigger = TriggerScope::enter(Trigger::Eviction);
        let mut freed = 0;
        for (_, base) in order {
            if free + freed >= needed {
                break;
            }
            let chunk = PageRange::new(base, HUGE_PAGE_SIZE).expect("aligned chunk");
            lru.last_used.remove(&base);
            lru.used.remove(&base);
            // Read copies in the chunk go too: their pages stay in system memory.
            freed += handle.drop_copies(chunk).unwrap_or(0);
            match self.mm.evict_range(chunk, Some(me)) {
                Ok(pages) => {
                    freed += pages;
                    if pages > 0 {
                        // The copy back over the link, on this device's clock.
                        handle.charge_migration(Direction::DeviceToHost, pages * PAGE_SIZE);
                        self.counters.add_eviction(pages);
                        self.counters.device(me).add_eviction(pages);
                        tracing::debug!(dev = me.0, start = %chunk.start(), pages, "eviction");
                    }
                }
                Err(e) => tracing::warn!(chunk = %chunk.start(), error = %e, "eviction failed"),
            }
        }
        freed
    }

    /// After a CPU fault brought `page` back: the rest of its aligned window comes back too, in
    /// the faulting thread, before the access re-executes (UVM runs its prefetcher for CPU faults
    /// as for device faults; AMD's `svm_migrate_to_ram` moves the range's granularity back;
    /// uvm-svm.md, feature table). A fault in the window right after the one the previous CPU
    /// fault in the same allocation brought back continues a walk: its window is twice that one,
    /// up to the readahead limit (Linux's file readahead grows its window the same way). The
    /// copy is charged to this device's link; the pages count under the CPU fault's trigger.
    fn cpu_fault_window(&self, page: VirtAddr) {
        if self.cpu_window <= PAGE_SIZE {
            return;
        }
        let Some(handle) = self.me.get() else {
            return;
        };
        // The window, within the faulting page's allocation: UVM's blocks never span two
        // allocations (a VA block lies inside its VA range), and a neighbour's pages are not
        // what this access walks (a vector's output read back pulled the tail of an input
        // along, a sixth more traffic than the copy back).
        let Some(region) = self.mm.region_of(page) else {
            return;
        };
        let base = page.0 & !(self.cpu_window - 1);
        let Some(window) = self.cpu_walk(region.range(), base) else {
            return;
        };
        if self.restore.is_some() {
            // What this device holds of the window is its working set: remembered before the
            // window leaves, to come back at the next launch.
            for block in window.chunks(HUGE_PAGE_SIZE) {
                let Ok(whole) =
                    PageRange::new(block.start().0 & !(HUGE_PAGE_SIZE - 1), HUGE_PAGE_SIZE)
                else {
                    continue;
                };
                let (resident, _, _) = self.block_masks(whole, handle.id(), &[]);
                let from = whole.index_of(block.start()) as usize;
                let mut held = BlockMask::new();
                held.set_range(from..from + block.npages() as usize);
                let held = held.intersection(&resident);
                self.remember_restore(ranges(whole, &held));
            }
        }
        match self.mm.evict_range(window, Some(handle.id())) {
            Ok(pages) if pages > 0 => {
                handle.charge_migration(Direction::DeviceToHost, pages * PAGE_SIZE);
                self.counters.device(handle.id()).add_to_system(pages);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(%page, error = %e, "CPU fault window failed"),
        }
    }

    /// The window of a CPU fault at `base` (aligned to the CPU fault window) in `region` (the
    /// faulting page's allocation), clipped to it: twice the last one where it continues a walk
    /// (up to the readahead limit), the CPU fault window otherwise.
    fn cpu_walk(&self, region: PageRange, base: u64) -> Option<PageRange> {
        let mut walks = self.cpu_walks.lock();
        let found = walks.iter().position(|w| w.region == region.start().0);
        let mut walk = match found {
            Some(i) => walks.remove(i),
            None => {
                if walks.len() >= CPU_WALKS {
                    walks.remove(0);
                }
                CpuWalk {
                    region: region.start().0,
                    next: u64::MAX,
                    window: 0,
                }
            }
        };
        walk.window = if walk.next == base && self.cpu_readahead > self.cpu_window {
            walk.window
                .saturating_mul(2)
                .clamp(self.cpu_window, self.cpu_readahead)
        } else {
            self.cpu_window
        };
        let window = PageRange::new(base, walk.window)
            .ok()
            .and_then(|w| w.intersect(&region));
        walk.next = window.map_or(u64::MAX, |w| w.end().0);
        walks.push(walk);
        window
    }

    /// Counts the pages of `block` in `spilled` as spilled and remembers them, for the next
    /// launch with room to revoke.
    fn spill(&self, block: PageRange, spilled: &BlockMask) {
        self.counters.add_spilled_pages(spilled.count() as u64);
        let mut list = self.spilled.lock();
        list.extend(ranges(block, spilled));
        if list.len() > 1024 {
            // A page spilled, migrated by its counters, evicted and spilled again is listed
            // twice: merge, so the list stays as long as the ranges it covers.
            *list = merged(std::mem::take(&mut *list));
        }
    }

    /// Notes that `block` holds pages of this device now.
    fn touch(&self, block: PageRange) {
        let now = self.me.get().map_or(ModelTime::ZERO, |h| self.now(h));
        let mut lru = self.lru.lock();
        let tick = lru.tick;
        lru.last_used.insert(block.start().0, tick);
        lru.used(block.start().0, now);
    }
}

thread_local! {
    /// Set while this thread runs an explicit prefetch (see [`ExactPlacement`]).
    static EXACT: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread, until dropped, as running an explicit prefetch: the placements it
/// asks for (`make_resident` services them on the calling thread) cover exactly the pages named.
#[derive(Debug)]
pub(crate) struct ExactPlacement {
    /// The mark before this one (restored on drop).
    was: bool,
}

impl ExactPlacement {
    pub(crate) fn enter() -> Self {
        ExactPlacement {
            was: EXACT.with(|c| c.replace(true)),
        }
    }
}

impl Drop for ExactPlacement {
    fn drop(&mut self) {
        EXACT.with(|c| c.set(self.was));
    }
}

impl RuntimePlacement {
    /// An explicit prefetch's plan: the pages named migrate, no window, no prefetcher, no advice
    /// (the caller asked for them); room is made for those not here yet.
    fn place_exact(&self, f: &BlockFaults<'_>, me: DeviceId) -> BlockPlan {
        let block = f.block;
        let mut want = BlockMask::new();
        for &(a, _) in f.pages {
            want.set(block.index_of(a) as usize);
        }
        let (resident, _, _) = self.block_masks(block, me, &[]);
        let needed = want.difference(&resident).count() as u64;
        if needed > f.free_frames {
            self.make_room(needed, f.free_frames, block, false, None);
        }
        self.touch(block);
        let spans = ranges(block, &want);
        BlockPlan {
            action: PlacementAction::Migrate,
            spans,
            remote: Vec::new(),
            duplicate: Vec::new(),
        }
    }
}

impl PlacementPolicy for RuntimePlacement {
    fn place(&self, f: &BlockFaults<'_>) -> BlockPlan {
        let Some(me) = self.me() else {
            return BlockPlan {
                action: PlacementAction::Migrate,
                spans: f.pages.iter().map(|&(a, _)| page(a.0)).collect(),
                remote: Vec::new(),
                duplicate: Vec::new(),
            };
        };
        if EXACT.with(Cell::get) {
            return self.place_exact(f, me);
        }
        let advice = self.advice.read();
        // Read faults on read-mostly pages get a read-only copy here (CUDA: read-mostly
        // overrides the preferred location); writes to them collapse the copies and go the
        // ordinary way.
        let copy: Vec<bool> = f
            .pages
            .iter()
            .map(|&(a, access)| access == FaultAccess::Read && advice.at(a.0).read_mostly)
            .collect();
        let mut remote: Vec<bool> = f
            .pages
            .iter()
            .zip(&copy)
            .map(|(&(a, _), &c)| !c && advised_remote(&advice.at(a.0), me))
            .collect();
        let advised = remote.iter().filter(|&&r| r).count() as u64;
        if advised > 0 {
            self.counters.add_remote_pages(advised);
        }
        // Pages kept where they are (by the advice, then by thrashing): mapped, never migrated.
        let kept = |remote: &[bool]| -> Vec<PageRange> {
            f.pages
                .iter()
                .zip(remote)
                .filter(|(_, &r)| r)
                .map(|(&(a, _), _)| page(a.0))
                .collect()
        };
        if copy.iter().all(|&c| !c) && remote.iter().all(|&r| r) {
            return BlockPlan {
                action: PlacementAction::MapRemote,
                spans: kept(&remote),
                remote: Vec::new(),
                duplicate: Vec::new(),
            };
        }
        let block = f.block;
        // Windows and prefetchers stay inside the allocations that faulted, as UVM's VA blocks
        // lie inside their VA range: a neighbour's pages are not what these warps walk, and
        // may belong to another context sharing the address space (whose explicit copies
        // then faulted: its pages had moved into this context's device).
        let (resident, managed, allocations) = self.block_masks(block, me, f.pages);
        let thrashing_on = self.thrashing.as_deref().filter(|_| !in_user_request());
        let thrashing = match thrashing_on {
            Some(t) => self.thrashing_hints(t, f, &advice, me, &resident, &mut remote),
            None => BlockMask::new(),
        };
        // Read copies migrate nothing: thrashing does not keep them anywhere.
        for (r, &c) in remote.iter_mut().zip(&copy) {
            *r &= !c;
        }
        let kept = kept(&remote);
        if copy.iter().all(|&c| !c) && remote.iter().all(|&r| r) {
            return BlockPlan {
                action: PlacementAction::MapRemote,
                spans: kept,
                remote: Vec::new(),
                duplicate: Vec::new(),
            };
        }
        // Windows of the range's granularity around each faulted page.
        let mut want = BlockMask::new();
        let mut faulted = BlockMask::new();
        // Every page of the block the advice keeps remote or read-mostly, faulted or not:
        // neither windows nor prefetchers may migrate them.
        let mut keep = BlockMask::new();
        let mut mostly = BlockMask::new();
        for (r, attrs) in advice.pieces(f.block.start().0..f.block.end().0) {
            let from = block_index(f.block, VirtAddr(r.start));
            let pages = from..from + ((r.end - r.start) / PAGE_SIZE) as usize;
            if attrs.read_mostly {
                mostly.set_range(pages.clone());
                keep.set_range(pages);
            } else if advised_remote(&attrs, me) {
                keep.set_range(pages);
            }
        }
        // Read copies: the faulted pages widened to the granularity window, read-mostly pages
        // only.
        let mut dup = BlockMask::new();
        for (&(a, _), _) in f.pages.iter().zip(&copy).filter(|(_, &c)| c) {
            dup.set_range(window(
                block,
                a,
                advice.at(a.0).granularity.unwrap_or(self.granularity),
            ));
        }
        let dup = dup.intersection(&mostly);
        for (&(a, _), _) in f
            .pages
            .iter()
            .zip(remote.iter().zip(&copy))
            .filter(|(_, (&r, &c))| !r && !c)
        {
            want.set_range(window(
                block,
                a,
                advice.at(a.0).granularity.unwrap_or(self.granularity),
            ));
            faulted.set(block.index_of(a) as usize);
        }
        drop(advice);
        // What the windows asked for, and what each prefetcher added: counted once the plan is
        // final (advice, thrashing, pressure and spilling may still take pages out).
        let windows = want;
        let mut by_tree = BlockMask::new();
        let mut by_stream = BlockMask::new();
        if let Some(tree) = &self.tree {
            let mut seen = self.fault_migrations.lock();
            let n = seen.entry(block.start().0).or_insert(0);
            let extra = tree.prefetch(&resident, &want, &thrashing, *n);
            *n = n.saturating_add(faulted.count());
            by_tree = extra.intersection(&managed);
            want = want.union(&by_tree);
        }
        let mut later = Vec::new();
        if let Some(stream) = &self.stream {
            // The detector sees what this fault brings in, not only the faulted pages: with
            // windows of a whole block, a sequential walk faults once per block, each fault a
            // block past the last, farther than any stream window. Each migrated run that holds
            // a faulted page counts as faulted whole: the walk's next fault follows on from its
            // end.
            let mut addrs: Vec<VirtAddr> = f.pages.iter().map(|&(a, _)| a).collect();
            let covered = want.intersection(&managed);
            for r in covered.runs() {
                if faulted.count_range(r.clone()) > 0 {
                    addrs.extend(r.map(|k| block.page(k as u64)));
                }
            }
            // A walk that begins at an allocation's first page reads ahead at once.
            let heads: Vec<VirtAddr> = allocations.iter().map(PageRange::start).collect();
            let ahead = stream.lock().observe_from(&addrs, &heads);
            for r in ahead {
                if let Some(inside) = r.intersect(&block) {
                    let from = block.index_of(inside.start()) as usize;
                    by_stream.set_range(from..from + inside.npages() as usize);
                    want.set_range(from..from + inside.npages() as usize);
                }
                // The part past this block goes through the service's migration queue, without
                // what the advice keeps remote there, and no farther than the allocation the
                // stream walks (readahead stops at the end of the file).
                let Some(r) = allocations.iter().find_map(|a| r.intersect(a)) else {
                    continue;
                };
                if r.end().0 > block.end().0 {
                    let s = r.start().0.max(block.end().0);
                    let advice = self.advice.read();
                    for (piece, attrs) in advice.pieces(s..r.end().0) {
                        if advised_remote(&attrs, me) {
                            continue;
                        }
                        if let Ok(past) = PageRange::from_bounds(piece.start, piece.end) {
                            later.push(past);
                        }
                    }
                }
            }
        }
        // Never migrate what the advice keeps remote or read-mostly, nor a thrashing page that
        // did not fault (nor one a hint keeps where it is: not in `faulted`), however the windows
        // and prefetchers grew (a write fault on a read-mostly page migrates it all the same).
        let dup = dup.intersection(&managed).difference(&resident);
        let mut want = want
            .intersection(&managed)
            .difference(&keep)
            .difference(&thrashing)
            .union(&faulted);
        // Device memory full and every chunk in it part of the working set: evicting one would
        // fault it back in this launch or the next, so the faulted windows are mapped where
        // they are instead (AMD's SVM and Xe map system memory when VRAM cannot be had). A
        // kernel that rereads more than fits then reads the part that does not fit over the
        // link, once per pass, instead of moving it in and its working set out every pass.
        // Migrations a policy queued (all pages `Prefetch`) make room as before.
        let policy_migration = f.pages.iter().all(|&(_, a)| a == FaultAccess::Prefetch);
        let spilling = self.spill_remote && !policy_migration;
        let missing = want.difference(&resident);
        // The accessed bits as read for the spilling decision, for the eviction below.
        let mut sampled = None;
        if spilling && (missing.count() + dup.count()) as u64 > f.free_frames {
            let (idle, now) = self.has_idle_chunk(block);
            sampled = Some(now);
            if !idle {
                self.spill(block, &missing);
                let mut all = want;
                for (&(a, _), _) in f.pages.iter().zip(&remote).filter(|(_, &r)| r) {
                    all.set(block.index_of(a) as usize);
                }
                return BlockPlan {
                    action: PlacementAction::MapRemote,
                    spans: ranges(block, &all),
                    remote: Vec::new(),
                    duplicate: Vec::new(),
                };
            }
        }
        // Device memory full: what the windows and prefetchers add would each evict pages
        // someone uses for pages nobody asked for yet, so only the faulted pages' pressure
        // windows come in.
        if let Some(g) = self.pressure_window {
            if (want.difference(&resident).count() + dup.count()) as u64 > f.free_frames {
                let mut small = BlockMask::new();
                for k in faulted.iter() {
                    small.set_range(window(block, block.page(k as u64), g));
                }
                // The density prefetcher still grows the small windows where the block is
                // already dense (UVM's tree over its 4 KiB / 64 KiB faults): a block walked in
                // order comes in 64 KiB, 128 KiB, 256 KiB... pieces, a few faults a block, while
                // scattered faults stay small (a whole block for each of them evicted a chunk
                // per random page). Without this, whether a fault got its whole block or 64 KiB
                // hung on whether the last eviction left exactly a chunk free.
                if let Some(tree) = &self.tree {
                    let n = self
                        .fault_migrations
                        .lock()
                        .get(&block.start().0)
                        .copied()
                        .unwrap_or(0);
                    let extra = tree
                        .prefetch(&resident, &small, &thrashing, n)
                        .intersection(&managed);
                    small = small.union(&extra);
                }
                want = small
                    .intersection(&managed)
                    .difference(&keep)
                    .difference(&thrashing)
                    .union(&faulted);
            }
        }
        if let Some(t) = thrashing_on {
            let prefetched = want.difference(&faulted).difference(&resident);
            if !prefetched.is_empty() {
                self.record_prefetch(t, block, &prefetched, me);
            }
        }
        let spans = ranges(block, &want);
        // The prefetchers' share of what migrates: the tree's first (it runs first), the
        // stream's past it.
        let moving = want.difference(&resident).difference(&windows);
        let tree_pages = moving.intersection(&by_tree);
        self.counters.add_tree_prefetch(tree_pages.count() as u64);
        let stream_pages = moving.intersection(&by_stream).difference(&by_tree);
        self.counters
            .add_stream_prefetch(stream_pages.count() as u64);
        let needed = (want.difference(&resident).count() + dup.count()) as u64;
        if needed > f.free_frames {
            self.make_room(needed, f.free_frames, block, spilling, sampled);
        }
        // Stream prefetch past the block goes only into free frames above a watermark of one
        // chunk: a guess never evicts pages in use, nor takes the chunk an eviction just freed
        // for the faults to come (prefetching ahead under pressure made a tiled GEMM at 2x
        // device memory 4-6x slower), as the kernel's readahead backs off under pressure.
        let mut room = f
            .free_frames
            .saturating_sub(needed)
            .saturating_sub(PAGES_PER_HUGE);
        let mut queued = Vec::new();
        for r in later {
            if room == 0 {
                break;
            }
            let take = r.npages().min(room);
            if let Ok(part) = PageRange::from_pages(r.start().0, take) {
                room -= take;
                // Counted as what it will move: the pages still in system memory.
                let moving: u64 = self
                    .mm
                    .regions_in(part)
                    .iter()
                    .filter_map(|region| region.range().intersect(&part).map(|p| (region, p)))
                    .flat_map(|(region, p)| system_runs(region, p))
                    .map(|r| r.npages())
                    .sum();
                self.counters.add_stream_prefetch(moving);
                queued.push(part);
            }
        }
        if !queued.is_empty() {
            self.ahead.lock().extend(queued);
        }
        self.touch(block);
        let duplicate = ranges(block, &dup);
        BlockPlan {
            action: PlacementAction::Migrate,
            spans,
            remote: kept,
            duplicate,
        }
    }

    fn remote_access(&self, addr: VirtAddr) {
        if let Some(ac) = &self.access {
            ac.lock().record(addr, 1);
        }
    }

    fn take_migrations(&self) -> Vec<(PageRange, Trigger)> {
        let ahead = std::mem::take(&mut *self.ahead.lock());
        let hot = match &self.access {
            Some(ac) => {
                // UVM's notification batch size.
                let hot = ac.lock().take_notifications(256);
                self.counters.add_counter_notifications(hot.len() as u64);
                hot
            }
            None => Vec::new(),
        };
        let keep = |ranges: Vec<PageRange>| match &self.thrashing {
            Some(t) if !ranges.is_empty() => {
                without_thrashing(&t.state.lock().detector, t.now(), ranges)
            }
            _ => ranges,
        };
        if let Some(t) = &self.thrashing {
            // Called by the service thread between batches, and at least every few
            // milliseconds while idle: the clock of the thrashing reset rules.
            self.thrashing_housekeeping(t);
        }
        let keep = |ranges: Vec<PageRange>| self.without_bounce_pins(keep(ranges));
        let mut out: Vec<(PageRange, Trigger)> = keep(ahead)
            .into_iter()
            .map(|r| (r, Trigger::Prefetch))
            .collect();
        out.extend(keep(hot).into_iter().map(|r| (r, Trigger::AccessCounter)));
        out
    }

    fn cpu_fault_delay(&self, page: VirtAddr) -> Option<Duration> {
        if in_user_request() {
            return None;
        }
        let t = self.thrashing.as_ref()?;
        // A fault from the preferred location is serviced before thrashing is looked at
        // (uvm-svm.md A.6), as for devices.
        let preferred = self.advice.read().at(page.0).preferred;
        if preferred == Some(Processor::Cpu) {
            return None;
        }
        let now = t.now();
        let hint = t
            .state
            .lock()
            .detector
            .hint(page, Processor::Cpu, now, preferred);
        // A pin needs nothing of the CPU: the page comes back (a pin to a device is carried
        // out by the devices, which map it remotely; the CPU cannot map device memory).
        let Hint::Throttle { until } = hint else {
            return None;
        };
        self.counters.add_cpu_throttle();
        Some(until.saturating_sub(now))
    }

    fn migrated_to_host(&self, page: VirtAddr) {
        if in_user_request() {
            return;
        }
        self.remember_restore(PageRange::new(page.0, PAGE_SIZE).ok());
        self.cpu_fault_window(page);
        let (Some(t), Some(me)) = (&self.thrashing, self.me()) else {
            return;
        };
        let now = t.now();
        t.state.lock().detector.record_migration(
            page,
            Processor::Device(me),
            Processor::Cpu,
            MigrationCause::CpuFault,
            now,
        );
    }
}

/// `ranges` sorted, with overlapping and adjacent ones merged.
fn merged(mut ranges: Vec<PageRange>) -> Vec<PageRange> {
    ranges.sort_by_key(|r| r.start().0);
    let mut out: Vec<PageRange> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start().0 <= last.end().0 => {
                if r.end().0 > last.end().0 {
                    if let Ok(m) = PageRange::from_bounds(last.start().0, r.end().0) {
                        *last = m;
                    }
                }
            }
            _ => out.push(r),
        }
    }
    out
}

/// The runs of pages of `piece` (inside `region`) that are in system memory.
fn system_runs(region: &hetmem::region::Region, piece: PageRange) -> Vec<PageRange> {
    runs_at(region, piece, |l| matches!(l, Location::System))
}

/// The runs of `piece` (a part of `region`) whose pages' locations satisfy `at`.
fn runs_at(
    region: &hetmem::region::Region,
    piece: PageRange,
    at: impl Fn(Location) -> bool,
) -> Vec<PageRange> {
    page_runs(
        piece
            .pages()
            .filter(|&a| at(region.states.get(region.index(a)).location))
            .map(|a| a.0),
    )
}

/// UVM's rule: advice beats migration. A page preferred elsewhere, or one this device is advised
/// to access where it is (with no preferred location), is mapped remotely.
fn advised_remote(a: &crate::advice::PageAttrs, me: DeviceId) -> bool {
    match a.preferred {
        Some(p) => p != Processor::Device(me),
        None => a.accessed_by.contains(&Processor::Device(me)),
    }
}

/// `ranges` without the pages thrashing at `now`: migrations no fault asked for (access
/// counters, stream prefetch past a block) must not take a thrashing page along, a pinned one
/// least of all (UVM's access-counter servicing honours pins).
fn without_thrashing(
    det: &ThrashingDetector,
    now: Duration,
    ranges: Vec<PageRange>,
) -> Vec<PageRange> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        // Chunks never cross a block boundary.
        for chunk in r.chunks(HUGE_PAGE_SIZE) {
            let thrashing = det.thrashing_in_block(chunk.start(), now);
            if thrashing.is_empty() {
                out.push(chunk);
                continue;
            }
            let Ok(block) = PageRange::new(chunk.start().0 & !(HUGE_PAGE_SIZE - 1), HUGE_PAGE_SIZE)
            else {
                continue;
            };
            let from = block_index(block, chunk.start());
            let mine = BlockMask::from_range(from..from + chunk.npages() as usize);
            for run in mine.difference(&thrashing).runs() {
                out.extend(
                    PageRange::from_pages(block.page(run.start as u64).0, run.len() as u64).ok(),
                );
            }
        }
    }
    out
}

/// Sorted page addresses as maximal runs of adjacent pages.
fn page_runs(pages: impl IntoIterator<Item = u64>) -> Vec<PageRange> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for a in pages {
        match runs.last_mut() {
            Some((_, end)) if *end == a => *end += PAGE_SIZE,
            _ => runs.push((a, a + PAGE_SIZE)),
        }
    }
    runs.into_iter()
        .filter_map(|(start, end)| PageRange::from_bounds(start, end).ok())
        .collect()
}

/// The pages of `block` (as indices) in the aligned window of `g` bytes around `a`.
fn window(block: PageRange, a: VirtAddr, g: u64) -> std::ops::Range<usize> {
    let start = (a.0 & !(g - 1)).max(block.start().0);
    let end = (start + g).min(block.end().0);
    block.index_of(VirtAddr(start)) as usize..((end - block.start().0) / PAGE_SIZE) as usize
}

/// The runs of `mask` as ranges of `block`.
fn ranges(block: PageRange, mask: &BlockMask) -> Vec<PageRange> {
    mask.runs()
        .map(|r| {
            PageRange::from_pages(block.page(r.start as u64).0, (r.end - r.start) as u64)
                .expect("run inside the block")
        })
        .collect()
}

fn block_index(block: PageRange, a: VirtAddr) -> usize {
    block.index_of(a) as usize
}

fn page(a: u64) -> PageRange {
    PageRange::new(a & !(PAGE_SIZE - 1), PAGE_SIZE).expect("page")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 0x7f00_0000_0000;
    const CPU: Processor = Processor::Cpu;
    const GPU: Processor = Processor::Device(DeviceId(0));

    fn at(block: u64, page: u64) -> VirtAddr {
        VirtAddr(BLOCK + block * HUGE_PAGE_SIZE + page * PAGE_SIZE)
    }

    #[test]
    fn a_chunk_stays_in_the_working_set_while_reused_across_launches_or_used_lately() {
        let us = ModelTime::from_micros;
        // Used in launch 1 only: in use during it while recent, and through the two launches
        // after it (a kernel may reread it every other launch).
        let mut lru = Lru {
            epoch: 1,
            ..Lru::default()
        };
        lru.used(BLOCK, us(0));
        assert!(lru.in_use(BLOCK, RECENT));
        assert!(!lru.in_use(BLOCK, RECENT.saturating_add(us(1))));
        lru.epoch = 2;
        assert!(lru.in_use(BLOCK, us(1_000_000)));
        lru.epoch = 3;
        assert!(lru.in_use(BLOCK, us(1_000_000)));
        lru.epoch = 4;
        assert!(!lru.in_use(BLOCK, us(1_000_000)));
        // Used again in launch 4, long ago: launch 1 is too old to count, so only recency does.
        lru.used(BLOCK, us(2_000_000));
        assert!(lru.in_use(BLOCK, us(2_000_000)));
        assert!(!lru.in_use(BLOCK, us(3_000_000)));
        // Used in launches 4 and 5: launch 4 counts for launch 5 whenever it is.
        lru.epoch = 5;
        lru.used(BLOCK, us(3_000_000));
        assert!(lru.in_use(BLOCK, us(9_000_000)));
        // A chunk never seen used is idle.
        assert!(!lru.in_use(BLOCK + HUGE_PAGE_SIZE, us(0)));
    }

    /// A detector where page `page` of block `block` thrashes at 30 µs.
    fn thrashing(pages: &[(u64, u64)]) -> ThrashingDetector {
        let mut det = ThrashingDetector::new(ThrashingConfig::default()).unwrap();
        for &(b, p) in pages {
            for (k, (from, to)) in [(CPU, GPU), (GPU, CPU), (CPU, GPU)].into_iter().enumerate() {
                let t = Duration::from_micros(10 * k as u64 + 10);
                det.record_migration(at(b, p), from, to, MigrationCause::DeviceFault, t);
            }
        }
        det
    }

    fn bounds(ranges: &[PageRange]) -> Vec<(u64, u64)> {
        ranges
            .iter()
            .map(|r| ((r.start().0 - BLOCK) / PAGE_SIZE, r.npages()))
            .collect()
    }

    #[test]
    fn migrations_no_fault_asked_for_leave_thrashing_pages_out() {
        // Page 5 of block 0 and page 0 of block 1 thrash; a range over both blocks is cut
        // around them, and a range in a quiet block is left whole.
        let det = thrashing(&[(0, 5), (1, 0)]);
        let now = Duration::from_micros(40);
        assert!(det.is_thrashing(at(0, 5), now));
        let across = PageRange::from_bounds(at(0, 2).0, at(1, 3).0).unwrap();
        let quiet = PageRange::from_pages(at(3, 0).0, 4).unwrap();
        let out = without_thrashing(&det, now, vec![across, quiet]);
        let block1 = PAGES_PER_BLOCK;
        assert_eq!(
            bounds(&out),
            vec![(2, 3), (6, block1 - 6), (block1 + 1, 2), (3 * block1, 4)]
        );
        // Once the pages stopped bouncing (a lapse later) nothing is cut (ranges come out per
        // block, as the service migrates them).
        let later = now + Duration::from_millis(1);
        assert_eq!(
            without_thrashing(&det, later, vec![across]),
            across.chunks(HUGE_PAGE_SIZE).collect::<Vec<_>>()
        );
    }

    #[test]
    fn revoked_pages_are_unmapped_by_runs() {
        let pages = [0u64, 1, 2, 7, 9, 10].map(|p| at(0, p).0);
        assert_eq!(bounds(&page_runs(pages)), vec![(0, 3), (7, 1), (9, 2)]);
        assert!(page_runs([]).is_empty());
    }

    const PAGES_PER_BLOCK: u64 = HUGE_PAGE_SIZE / PAGE_SIZE;
}
