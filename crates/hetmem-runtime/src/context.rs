//! The context: devices in one address space, managed allocations, registered memory, advice,
//! prefetch, eviction and suspend, as a CUDA or HIP user expects them
//! (../shared/reference/uvm-svm.md).
//!
//! With several devices, each device's fault service pulls the pages another device holds
//! straight into its own memory through its copy engines (UVM's peer migration; nothing passes
//! through system memory), prefetch does the same, and the devices' memory is private to each:
//! a device-private page is reported by range fault to its owner only, as the kernel reports
//! `dev_private_owner`'s pages.

use std::sync::Arc;
use std::thread::JoinHandle;

use hetmem::{
    migrate::TriggerScope, AddressSpace, ComputeDevice, Config, CpuFaultBackend, MmError, Prot,
};
use hetmem_core::{
    link::Direction,
    migrate::Trigger,
    page_state::Location,
    policy::{
        access_counters::{AccessCounterConfig, AccessCounters},
        prefetch::{PrefetchConfig, StreamConfig, StreamDetector, TreePrefetcher},
        thrashing::ThrashingConfig,
        Processor,
    },
    DeviceId, PageRange, HUGE_PAGE_SIZE, PAGE_SIZE,
};
use hetmem_sim::accel::{AccelConfig, Accelerator, Kernel, Launch};
use parking_lot::RwLock;

use crate::advice::{Advice, AdviceMap, RangeAttributes};
use crate::managed::{Gate, Managed, Plain, RegisterError, Registered, RegistrationParts};
use crate::policy::{
    EvictionOrder, ExactPlacement, Policies, RuntimePlacement, Thrashing, UserRequest,
};
use crate::stats::{Counters, DeviceStats, RuntimeStats};
use crate::RuntimeError;

/// How a [`Context`] is built.
#[derive(Debug)]
pub struct ContextBuilder {
    devices: Vec<AccelConfig>,
    memory_limit: Option<u64>,
    granularity: u64,
    backend: Option<CpuFaultBackend>,
    prefetch: Option<PrefetchConfig>,
    stream: Option<StreamConfig>,
    access: Option<AccessCounterConfig>,
    thrashing: Option<ThrashingConfig>,
    eviction: EvictionOrder,
    cpu_window: u64,
    cpu_readahead: Option<u64>,
    pressure_window: Option<u64>,
    spill_remote: bool,
    restore_on_launch: bool,
    readback_after_launch: bool,
}

impl Default for ContextBuilder {
    fn default() -> Self {
        ContextBuilder {
            devices: Vec::new(),
            memory_limit: None,
            granularity: PAGE_SIZE,
            backend: None,
            prefetch: Some(PrefetchConfig::default()),
            stream: None,
            access: None,
            thrashing: Some(ThrashingConfig::default()),
            eviction: EvictionOrder::default(),
            cpu_window: PAGE_SIZE,
            cpu_readahead: None,
            pressure_window: None,
            spill_remote: false,
            restore_on_launch: false,
            readback_after_launch: false,
        }
    }
}

impl ContextBuilder {
    /// Adds a device (its `placement` is replaced by the context's policy).
    pub fn device(mut self, config: AccelConfig) -> Self {
        self.devices.push(config);
        self
    }

    /// Limits the device memory this context may use on each device, in bytes (whole frames);
    /// faults and prefetches past it evict, and migration back to system memory is never limited.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// The migration window of faults where no granularity is advised (a power of two from 4 KiB
    /// to 2 MiB; 4 KiB by default: UVM's demand paging).
    pub fn granularity(mut self, bytes: u64) -> Self {
        self.granularity = bytes;
        self
    }

    /// The CPU fault backend, when this call starts the address space (default: the best the
    /// kernel offers, or `HETMEM_CPU_FAULT_BACKEND`).
    pub fn backend(mut self, backend: CpuFaultBackend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// UVM's tree-based density prefetcher (on by default with UVM's parameters: 64 KiB leaves,
    /// threshold 51%); `None` turns it off.
    pub fn prefetcher(mut self, config: Option<PrefetchConfig>) -> Self {
        self.prefetch = config;
        self
    }

    /// Our sequential-stream detector, which migrates ahead of faults that advance through
    /// memory (off by default).
    pub fn stream_prefetcher(mut self, config: Option<StreamConfig>) -> Self {
        self.stream = config;
        self
    }

    /// Access counters: a device's remote accesses are counted per region, and a region past
    /// the threshold migrates into the device (off by default, as UVM has it on PCIe systems).
    pub fn access_counters(mut self, config: Option<AccessCounterConfig>) -> Self {
        self.access = config;
        self
    }

    /// Thrashing detection and mitigation, for all the context's devices together (on by default
    /// with UVM's parameters: 3 migrations each within 500 µs of the previous make a page
    /// thrashing; it is throttled, then after 10 throttling periods pinned to system memory for
    /// 150 ms with remote mappings; see [`ThrashingConfig`]). `None`, or a config with `enabled`
    /// false, turns it off; a config out of range fails [`ContextBuilder::build`] with
    /// [`RuntimeError::Thrashing`].
    ///
    /// Pages that bounce between the CPU and a device (each side writing them in turn) cost two
    /// migrations per round; once they are pinned, the CPU uses them where they are and the
    /// device reaches them over the link, which is cheaper when the rounds are short. Time is
    /// wall-clock time: on a slow or loaded simulator host, scale `lapse` as UVM does on
    /// emulation.
    pub fn thrashing(mut self, config: Option<ThrashingConfig>) -> Self {
        self.thrashing = config;
        self
    }

    /// Which chunks leave a full device first ([`EvictionOrder`]; by default the least recently
    /// used by the device's accessed bits; NVIDIA's driver evicts by allocation order).
    pub fn eviction(mut self, order: EvictionOrder) -> Self {
        self.eviction = order;
        self
    }

    /// The window a CPU fault on a device page brings back with it: the aligned `bytes` around
    /// the page (a power of two from 4 KiB to 2 MiB; 4 KiB by default: the page alone, or its
    /// whole block when the block moved as one). A program reading a kernel's output on the CPU
    /// then takes one fault per window instead of one per page, as UVM's CPU fault path (which
    /// runs its prefetcher) and AMD's (which moves the range's granularity) do.
    pub fn cpu_fault_window(mut self, bytes: u64) -> Self {
        self.cpu_window = bytes;
        self
    }

    /// CPU fault readahead: a CPU fault in the window right after the one the previous CPU fault
    /// in the same allocation brought back continues a walk, and brings back twice that window,
    /// up to `max` bytes (a power of two from 4 KiB to 64 MiB; `None`, the default: every fault
    /// brings back one [`ContextBuilder::cpu_fault_window`]). A program reading a kernel's
    /// output back takes a fault per doubling instead of one per window: a 14 MiB result in
    /// three faults with 2 MiB windows and 16 MiB of readahead, not seven, as Linux's file
    /// readahead grows its window while reads stay sequential. Up to eight walks are followed
    /// at once (a loop over a few arrays side by side); a fault anywhere else starts again from
    /// one window. Off while the CPU fault window is a single page.
    pub fn cpu_readahead(mut self, max: Option<u64>) -> Self {
        self.cpu_readahead = max;
        self
    }

    /// The migration window of a fault that needs room (device memory full), when it should be
    /// smaller than the usual one (a power of two from 4 KiB to 2 MiB; `None`, the default: the
    /// same window). Under oversubscription a large window, and what the prefetchers add, evict
    /// pages in use for pages nobody asked for yet; with a pressure window only the faulted pages'
    /// windows come in once memory is full, and eviction still frees whole chunks.
    pub fn pressure_window(mut self, bytes: Option<u64>) -> Self {
        self.pressure_window = bytes;
        self
    }

    /// Once a device's memory is full, keep its working set there: a fault evicts only chunks
    /// out of the working set, and when every chunk is in it, the faulted pages' windows are
    /// mapped where they are (over the link, populated) instead of evicting (off by default:
    /// UVM evicts). A chunk is in the working set while one of the device's two previous
    /// launches used it (a kernel that rereads its data each launch), or while the launch
    /// running now used it within the last 4 ms of the device's modelled time (random accesses
    /// and reread tiles keep reaching it; a single walk leaves it behind). A kernel that
    /// rereads more data than fits then reads the part that does not fit remotely once per
    /// pass, instead of moving it in and its working set out each pass. Spilled pages do not
    /// fault again: access counters ([`ContextBuilder::access_counters`]) bring in those reread
    /// often, and a launch that finds its device with room (a free chunk, or one out of the
    /// working set) revokes the spilled mappings, so that the next access decides afresh
    /// ([`RuntimeStats::spill_revocations`]). Explicit prefetches and access-counter migrations
    /// evict as before.
    pub fn spill_remote(mut self, on: bool) -> Self {
        self.spill_remote = on;
        self
    }

    /// At each launch on a device, migrate back first the pages CPU faults took from that
    /// device since its previous launch (off by default: UVM waits for the kernel to fault on
    /// them). A program whose CPU updates a small table between launches (a block table, a
    /// frontier flag) otherwise pays a fault batch per launch to get back pages the device held
    /// a moment ago; AMD's SVM restores the ranges a CPU invalidation took from the GPU before
    /// its queues run again (`svm_range_restore_work`). Only free memory is used, so a restore
    /// never evicts; advice and thrashing pins are respected.
    ///
    /// With thrashing detection on, pages a CPU *write* took back before each of three
    /// restores in a row (a table the CPU rewrites for every kernel) are mapped where they are
    /// at the next launch instead, for 300 launches (UVM's threshold and pin, with launches for
    /// its lapses): the CPU then writes them in place and the device reads them over the link,
    /// without a CPU fault, two copies and the invalidations per launch. Policy migrations
    /// (access counters, readahead) leave them there meanwhile. Pages the CPU only reads back
    /// (results, a flag the device sets) are the device's to write and keep moving.
    /// [`crate::RuntimeStats::pages_launch_bounce_pins`] counts them.
    pub fn restore_on_launch(mut self, on: bool) -> Self {
        self.restore_on_launch = on;
        self
    }

    /// As a launch ends ([`LaunchHandle::wait`]), move to system memory the pages of its device
    /// that the CPU took back by faults after each of the two launches before (off by
    /// default): a program that reads a flag or a small result after every kernel then finds
    /// it in system memory instead of taking a CPU fault for it each time, and with
    /// [`ContextBuilder::restore_on_launch`] the next launch brings it back, as an explicit
    /// program copies it each way. A page is read back four times, then one launch goes
    /// without to see whether the CPU still takes it; each time it does, the readbacks before
    /// the next such check double, up to 64. Only what the device holds moves; at most 64 Ki
    /// pages are followed. [`crate::RuntimeStats::pages_launch_readback`] counts them.
    pub fn readback_after_launch(mut self, on: bool) -> Self {
        self.readback_after_launch = on;
        self
    }

    /// Starts the devices.
    pub fn build(self) -> Result<Context, RuntimeError> {
        if self.devices.is_empty() {
            return Err(RuntimeError::NoDevices);
        }
        check_granularity(self.granularity)?;
        check_granularity(self.cpu_window)?;
        if let Some(max) = self.cpu_readahead {
            if !(max.is_power_of_two() && (PAGE_SIZE..=MAX_CPU_READAHEAD).contains(&max)) {
                return Err(RuntimeError::BadReadahead(max));
            }
        }
        if let Some(g) = self.pressure_window {
            check_granularity(g)?;
        }
        let mm = match AddressSpace::current() {
            Ok(mm) => mm,
            Err(_) => AddressSpace::init(Config {
                backend: self.backend,
            })?,
        };
        let advice = Arc::new(RwLock::new(AdviceMap::new()));
        let counters = Arc::new(Counters::default());
        let mut devices = Vec::with_capacity(self.devices.len());
        let mut placements = Vec::with_capacity(self.devices.len());
        let tree = self.prefetch.map(TreePrefetcher::new).transpose()?;
        if let Some(s) = &self.stream {
            s.validate()?;
        }
        let thrashing = match self.thrashing {
            Some(config) => Thrashing::new(config)?.map(Arc::new),
            None => None,
        };
        for mut config in self.devices {
            let policies = Policies {
                tree: tree.clone(),
                stream: self.stream.map(StreamDetector::new).transpose()?,
                access: self.access.map(AccessCounters::new).transpose()?,
                thrashing: thrashing.clone(),
                eviction: self.eviction,
                cpu_window: self.cpu_window,
                cpu_readahead: self.cpu_readahead.unwrap_or(0),
                pressure_window: self.pressure_window,
                spill_remote: self.spill_remote,
                restore_on_launch: self.restore_on_launch,
                readback_after_launch: self.readback_after_launch,
            };
            let policy = Arc::new(RuntimePlacement::new(
                mm,
                Arc::clone(&advice),
                Arc::clone(&counters),
                self.granularity,
                policies,
            ));
            config.placement = policy.clone();
            let acc = Accelerator::new(config)?;
            policy.attach(acc.handle());
            if let Some(bytes) = self.memory_limit {
                acc.memory()
                    .pool()
                    .lock()
                    .set_limit(Some(bytes / PAGE_SIZE));
            }
            devices.push(Arc::new(acc));
            placements.push(policy);
        }
        Ok(Context {
            mm,
            devices,
            placements,
            advice,
            counters,
            thrashing,
            gate: Arc::new(Gate::default()),
        })
    }
}

/// Where the pages of `range` are, as maximal runs.
fn residency(mm: &AddressSpace, range: PageRange) -> Vec<(PageRange, Processor)> {
    let mut runs: Vec<(PageRange, Processor)> = Vec::new();
    for region in mm.regions_in(range) {
        let Some(sub) = region.range().intersect(&range) else {
            continue;
        };
        for a in sub.pages() {
            let p = match region.states.get(region.index(a)).location {
                Location::Device { dev, .. } | Location::Exclusive { dev, .. } => {
                    Processor::Device(dev)
                }
                Location::System => Processor::Cpu,
            };
            match runs.last_mut() {
                Some((r, q)) if *q == p && r.end() == a => {
                    *r = PageRange::new(r.start().0, r.npages() * PAGE_SIZE + PAGE_SIZE)
                        .expect("run");
                }
                _ => runs.push((PageRange::new(a.0, PAGE_SIZE).expect("page"), p)),
            }
        }
    }
    runs
}

/// Pages of `range` that live on `p`.
fn pages_on(mm: &AddressSpace, range: PageRange, p: Processor) -> u64 {
    residency(mm, range)
        .iter()
        .filter(|(_, q)| *q == p)
        .map(|(r, _)| r.npages())
        .sum()
}

/// Charges `pages` that left `dev` for system memory at the runtime's request (prefetch to the
/// CPU, suspend) to its clock, as the copy engine would move them: in 2 MiB transfers.
fn charge_to_host(dev: &Accelerator, pages: u64) {
    let per = HUGE_PAGE_SIZE / PAGE_SIZE;
    for _ in 0..pages / per {
        dev.charge_migration(Direction::DeviceToHost, HUGE_PAGE_SIZE);
    }
    dev.charge_migration(Direction::DeviceToHost, (pages % per) * PAGE_SIZE);
}

/// The largest CPU fault readahead window ([`ContextBuilder::cpu_readahead`]).
pub const MAX_CPU_READAHEAD: u64 = 64 << 20;

fn check_granularity(bytes: u64) -> Result<(), RuntimeError> {
    if bytes.is_power_of_two() && (PAGE_SIZE..=HUGE_PAGE_SIZE).contains(&bytes) {
        Ok(())
    } else {
        Err(RuntimeError::BadGranularity(bytes))
    }
}

/// Devices sharing the process's address space with the CPU, and the memory they share.
#[derive(Debug)]
pub struct Context {
    mm: &'static Arc<AddressSpace>,
    devices: Vec<Arc<Accelerator>>,
    /// Each device's placement policy, in the order of `devices`.
    placements: Vec<Arc<RuntimePlacement>>,
    advice: Arc<RwLock<AdviceMap>>,
    counters: Arc<Counters>,
    thrashing: Option<Arc<Thrashing>>,
    gate: Arc<Gate>,
}

/// A prefetch in flight ([`Context::prefetch`]).
#[derive(Debug)]
#[must_use = "a prefetch runs in the background; wait on its fence"]
pub struct Fence {
    worker: JoinHandle<Result<u64, RuntimeError>>,
}

impl Fence {
    /// Waits for the prefetch; returns the pages it moved.
    pub fn wait(self) -> Result<u64, RuntimeError> {
        self.worker.join().map_err(|_| RuntimeError::Worker)?
    }
}

/// A launch in flight ([`Context::launch`]).
#[derive(Debug)]
#[must_use = "a launch runs in the background; wait for it"]
pub struct LaunchHandle {
    launch: Option<Launch>,
    gate: Arc<Gate>,
    /// The device's placement policy, for its readback as the launch ends.
    placement: Option<Arc<RuntimePlacement>>,
}

impl LaunchHandle {
    /// Waits for the launch; then, with [`ContextBuilder::readback_after_launch`], moves to
    /// system memory what the CPU keeps taking back after launches (still inside the launch:
    /// no CPU view is open).
    pub fn wait(mut self) -> Result<(), RuntimeError> {
        let launch = self.launch.take().expect("waited once");
        launch.wait().map_err(|e| RuntimeError::Accel(e.into()))?;
        if let Some(p) = &self.placement {
            p.read_back();
        }
        Ok(())
    }
}

impl Drop for LaunchHandle {
    fn drop(&mut self) {
        if let Some(l) = self.launch.take() {
            // Dropped without a wait: the launch still completes before it stops counting.
            let _ = l.wait();
        }
        self.gate.leave_launch();
    }
}

impl Context {
    /// A context with default settings; add devices with [`ContextBuilder::device`].
    pub fn builder() -> ContextBuilder {
        ContextBuilder::default()
    }

    /// The devices, in the order they were added.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.devices.iter().map(|d| d.id()).collect()
    }

    /// Device `id`.
    pub fn device(&self, id: DeviceId) -> Result<&Accelerator, RuntimeError> {
        self.devices
            .iter()
            .find(|d| d.id() == id)
            .map(|d| &**d)
            .ok_or(RuntimeError::NoSuchDevice(id))
    }

    fn check_processor(&self, p: Processor) -> Result<(), RuntimeError> {
        match p {
            Processor::Cpu => Ok(()),
            Processor::Device(id) => self.device(id).map(|_| ()),
        }
    }

    fn check_managed(&self, range: PageRange) -> Result<(), RuntimeError> {
        let mut covered = 0;
        for r in self.mm.regions_in(range) {
            if let Some(sub) = r.range().intersect(&range) {
                covered += sub.npages();
            }
        }
        if covered == range.npages() {
            Ok(())
        } else {
            Err(RuntimeError::NotManaged(range))
        }
    }

    /// Allocates `bytes` of managed memory (zeroed, read-write, rounded up to pages).
    pub fn alloc(&self, bytes: u64) -> Result<Managed, RuntimeError> {
        if bytes == 0 {
            return Err(RuntimeError::EmptyAllocation);
        }
        let len = bytes
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(RuntimeError::TooLarge(bytes))?;
        let range = self
            .mm
            .map_anonymous(len, Prot::READ | Prot::WRITE, false)?;
        Ok(Managed::new(
            self.mm,
            range,
            bytes,
            Arc::clone(&self.gate),
            Arc::clone(&self.advice),
        ))
    }

    /// Launches `kernel` over `threads` threads on device `dev`. Refused while a CPU view of
    /// managed memory is open (see [`crate::managed`]).
    pub fn launch(
        &self,
        dev: DeviceId,
        kernel: Arc<dyn Kernel>,
        threads: u64,
    ) -> Result<LaunchHandle, RuntimeError> {
        let d = self.device(dev)?;
        self.gate.enter_launch()?;
        if let Some(p) = self.placement_of(d) {
            p.launch_began();
        }
        if let Err(e) = self.restore_for_launch(d) {
            self.gate.leave_launch();
            return Err(e);
        }
        match ComputeDevice::launch(d, kernel, threads) {
            Ok(launch) => Ok(LaunchHandle {
                launch: Some(launch),
                gate: Arc::clone(&self.gate),
                placement: self.placement_of(d).cloned(),
            }),
            Err(e) => {
                self.gate.leave_launch();
                Err(e.into())
            }
        }
    }

    /// The placement policy of device `d`.
    fn placement_of(&self, d: &Accelerator) -> Option<&Arc<RuntimePlacement>> {
        self.devices
            .iter()
            .position(|x| x.id() == d.id())
            .and_then(|i| self.placements.get(i))
    }

    /// Migrates back into `d` what CPU faults took from it since its last launch
    /// ([`ContextBuilder::restore_on_launch`]), as far as free memory goes. All of it: on a full
    /// device the frames the CPU faults freed are what is free, and keeping a chunk in reserve
    /// left the pages to come back by a fault batch each (kvcache at 1x: 10 batches, 1.72x; 5 and
    /// 1.46x without the reserve).
    fn restore_for_launch(&self, d: &Accelerator) -> Result<(), RuntimeError> {
        let Some(p) = self.placement_of(d) else {
            return Ok(());
        };
        let (ranges, bouncing) = p.take_launch_restores();
        if !bouncing.is_empty() {
            // Mapped where they are, with the CPU's permissions (as every mirror of system
            // memory): the CPU keeps writing them in place. Only pages the CPU writes get here;
            // the device's accesses to them cross the link. A pin is a placement hint: a page
            // the program made inaccessible meanwhile is left to fault as it would anyway.
            let _user = UserRequest::enter();
            let mut pinned = 0;
            for r in bouncing {
                for block in r.chunks(HUGE_PAGE_SIZE) {
                    match d.map_remote(block, false) {
                        Ok(()) => pinned += block.npages(),
                        Err(e) => {
                            tracing::debug!(start = %block.start(), error = %e, "launch bounce pin failed");
                        }
                    }
                }
            }
            self.counters.add_launch_bounce_pins(pinned);
        }
        if ranges.is_empty() {
            return Ok(());
        }
        let mut room = d.memory().pool().lock().available_frames();
        let _user = UserRequest::enter();
        let _trigger = TriggerScope::enter(Trigger::Prefetch);
        let _exact = ExactPlacement::enter();
        let mut moved = 0;
        for r in ranges {
            if room == 0 {
                break;
            }
            let take = r.npages().min(room);
            let Ok(part) = PageRange::from_pages(r.start().0, take) else {
                continue;
            };
            room -= take;
            for block in part.chunks(HUGE_PAGE_SIZE) {
                d.make_resident(block, false)?;
            }
            moved += take;
        }
        self.counters.add_launch_restore(moved);
        Ok(())
    }

    /// Applies `advice` to `range` (managed memory). Accessed-by maps the range on that device
    /// at once, wherever its pages are; unsetting read-mostly collapses the range's read copies
    /// at once; the other advice steers later faults and prefetches.
    pub fn advise(&self, range: PageRange, advice: Advice) -> Result<(), RuntimeError> {
        self.check_managed(range)?;
        match advice {
            Advice::SetPreferredLocation(p)
            | Advice::SetAccessedBy(p)
            | Advice::UnsetAccessedBy(p) => self.check_processor(p)?,
            Advice::SetGranularity(g) => check_granularity(g)?,
            _ => {}
        }
        self.advice.write().advise(range, advice);
        self.counters.add_advice();
        match advice {
            Advice::SetAccessedBy(Processor::Device(id)) => {
                let _user = UserRequest::enter();
                self.device(id)?.map_remote(range, false)?;
            }
            // CUDA: "any read-duplicated copies of the data will be collapsed into a single
            // copy". Faults from here on see the advice unset and make no new copies.
            Advice::UnsetReadMostly => self.mm.collapse_duplicates(range),
            _ => {}
        }
        Ok(())
    }

    /// The advice in force over `range` and where its pages are.
    pub fn attributes(&self, range: PageRange) -> Result<RangeAttributes, RuntimeError> {
        self.check_managed(range)?;
        let mut attrs = self.advice.read().attributes(range);
        attrs.residency = self.residency(range);
        Ok(attrs)
    }

    /// Where the pages of `range` are, as maximal runs.
    pub fn residency(&self, range: PageRange) -> Vec<(PageRange, Processor)> {
        residency(self.mm, range)
    }

    /// Moves `range` to `to` in the background (`cudaMemPrefetchAsync`): into a device's memory
    /// (evicting what its policy chooses if it is full) and mapped there, or back to system
    /// memory. Exactly the pages of `range` move, from wherever they are (another device's pages
    /// device to device); no fault window or prefetcher widens it. The range's last prefetch
    /// location is recorded at once.
    pub fn prefetch(&self, range: PageRange, to: Processor) -> Result<Fence, RuntimeError> {
        self.check_managed(range)?;
        self.check_processor(to)?;
        self.advice
            .write()
            .update(range, |a| a.last_prefetch = Some(to));
        let mm = self.mm;
        let counters = Arc::clone(&self.counters);
        let dev = match to {
            Processor::Device(id) => Some(Arc::clone(
                self.devices.iter().find(|d| d.id() == id).expect("checked"),
            )),
            Processor::Cpu => None,
        };
        let devices = self.devices.clone();
        // Held until the worker ends: memory is not released under a prefetch.
        let ticket = self.gate.enter_prefetch();
        let before = pages_on(mm, range, to);
        let mostly: Vec<(PageRange, bool)> = self
            .advice
            .read()
            .pieces(range.start().0..range.end().0)
            .into_iter()
            .filter_map(|(r, a)| {
                Some((PageRange::from_bounds(r.start, r.end).ok()?, a.read_mostly))
            })
            .collect();
        let worker = std::thread::Builder::new()
            .name("hetmem-prefetch".into())
            .spawn(move || -> Result<u64, RuntimeError> {
                let _ticket = ticket;
                let mut copies = 0;
                let _user = UserRequest::enter();
                let _trigger = TriggerScope::enter(Trigger::Prefetch);
                match &dev {
                    Some(d) => {
                        // The range, not the windows and prefetchers a fault would get.
                        let _exact = ExactPlacement::enter();
                        // Read-mostly pieces get read copies there (CUDA's prefetch of a
                        // read-mostly range), the rest migrates.
                        for (piece, mostly) in mostly {
                            for block in piece.chunks(HUGE_PAGE_SIZE) {
                                if mostly {
                                    copies += d.read_duplicate(block);
                                } else {
                                    d.make_resident(block, false)?;
                                }
                            }
                        }
                    }
                    None => {
                        // Device by device, so that each one's pages are counted as its own;
                        // then whatever other contexts' devices hold.
                        for d in devices {
                            let pages = mm.evict_range(range, Some(d.id()))?;
                            counters.device(d.id()).add_to_system(pages);
                            charge_to_host(&d, pages);
                        }
                        mm.evict_range(range, None)?;
                    }
                }
                let moved = pages_on(mm, range, to).saturating_sub(before) + copies;
                match to {
                    Processor::Cpu => counters.add_prefetch(0, moved),
                    Processor::Device(_) => counters.add_prefetch(moved, 0),
                }
                Ok(moved)
            })
            .map_err(|_| RuntimeError::Worker)?;
        Ok(Fence { worker })
    }

    /// Moves every page the context's devices hold back to system memory (seed 003's suspend
    /// trigger). Returns the pages moved.
    pub fn suspend(&self) -> Result<u64, RuntimeError> {
        let _closed = self.gate.close();
        let _trigger = TriggerScope::enter(Trigger::Suspend);
        let mut moved = 0;
        for d in &self.devices {
            d.drop_all_copies();
            let pages = self.mm.evict_device(d.id())?;
            self.counters.device(d.id()).add_to_system(pages);
            charge_to_host(d, pages);
            moved += pages;
        }
        self.counters.add_suspended(moved);
        Ok(moved)
    }

    /// The runtime's counters.
    pub fn stats(&self) -> RuntimeStats {
        let mut s = self.counters.snapshot();
        for d in &self.devices {
            s.migrations.add(&d.memory().migrations());
        }
        match &self.thrashing {
            Some(t) => s.with_thrashing(t.stats()),
            None => s,
        }
    }

    /// Device memory in use by this context on `dev`, in bytes.
    pub fn memory_in_use(&self, dev: DeviceId) -> Result<u64, RuntimeError> {
        let d = self.device(dev)?;
        let pages = d.memory().pool().lock().stats().pages_in_use;
        Ok(pages * PAGE_SIZE)
    }

    /// Checks the devices' and the address space's invariants.
    pub fn check_invariants(&self) -> Result<(), String> {
        for d in &self.devices {
            d.check_invariants()?;
        }
        if let Some(t) = &self.thrashing {
            t.check_invariants()?;
        }
        self.mm.check_invariants()
    }
}

/// Registered memory and per-device statistics.
impl Context {
    /// Makes the program's own memory managed (`cudaHostRegister`, `hipHostRegister`; HMM's plain
    /// `malloc` memory): kernels on the context's devices reach `buf` by its own address
    /// ([`Registered::addr`]), the CPU through views, and pages migrate as they do in an
    /// allocation. The buffer must be whole pages of anonymous memory (a `Vec` of
    /// [`crate::Page`]s is) that nothing else manages. It comes back, every page in system memory
    /// with the devices' writes, from [`Registered::unregister`]; dropping the registration
    /// unregisters too. A refused buffer comes back untouched inside the error.
    pub fn register<T: Plain>(&self, buf: Vec<T>) -> Result<Registered<T>, RegisterError<T>> {
        let addr = buf.as_ptr() as u64;
        // A `Vec` holds at most `isize::MAX` bytes: no overflow.
        let len = std::mem::size_of_val(buf.as_slice()) as u64;
        let refused = |error, buffer| Err(RegisterError { error, buffer });
        if len == 0 {
            return refused(RuntimeError::EmptyRegistration, buf);
        }
        // Not empty: what `PageRange` refuses now is whatever is not whole pages.
        let Ok(range) = PageRange::new(addr, len) else {
            return refused(RuntimeError::Unaligned { addr, len }, buf);
        };
        match self.mm.register(addr, len) {
            Ok(r) => debug_assert_eq!(r, range),
            Err(MmError::AlreadyManaged { .. }) => {
                return refused(RuntimeError::AlreadyManaged(range), buf)
            }
            Err(e) => return refused(e.into(), buf),
        }
        let parts = RegistrationParts {
            mm: self.mm,
            gate: Arc::clone(&self.gate),
            advice: Arc::clone(&self.advice),
            counters: Arc::clone(&self.counters),
            devices: self.devices(),
        };
        Ok(Registered::new(parts, range, buf))
    }

    /// Device `dev`'s counters: pages in from system memory and from peers, pages out, faults,
    /// batches, evictions ([`DeviceStats`]).
    pub fn device_stats(&self, dev: DeviceId) -> Result<DeviceStats, RuntimeError> {
        let d = self.device(dev)?;
        let pool = d.memory().pool().lock().stats();
        Ok(DeviceStats::new(
            dev,
            &d.stats(),
            &pool,
            &self.counters.device(dev),
            d.memory().migrations(),
        ))
    }
}
