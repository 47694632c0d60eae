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

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use hetmem::AddressSpace;
use hetmem_core::{
    fault_ring::FaultAccess,
    page_state::Location,
    policy::{
        access_counters::AccessCounters,
        prefetch::{BlockMask, StreamDetector, TreePrefetcher},
        Processor,
    },
    DeviceId, PageRange, VirtAddr, HUGE_PAGE_SIZE, PAGE_SIZE,
};
use hetmem_sim::accel::AccelHandle;
use hetmem_sim::placement::{BlockFaults, BlockPlan, PlacementAction, PlacementPolicy};
use parking_lot::{Mutex, RwLock};

use crate::advice::AdviceMap;
use crate::stats::Counters;

/// Chunks of device memory in use, with the tick each was last seen used.
#[derive(Debug, Default)]
struct Lru {
    last_used: BTreeMap<u64, u64>,
    tick: u64,
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
}

/// The policies a device's placement runs.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    pub(crate) tree: Option<TreePrefetcher>,
    pub(crate) stream: Option<StreamDetector>,
    pub(crate) access: Option<AccessCounters>,
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
            tree: policies.tree,
            fault_migrations: Mutex::new(HashMap::new()),
            stream: policies.stream.map(Mutex::new),
            ahead: Mutex::new(Vec::new()),
            access: policies.access.map(Mutex::new),
        }
    }

    pub(crate) fn attach(&self, handle: AccelHandle) {
        let _ = self.me.set(handle);
    }

    fn me(&self) -> Option<DeviceId> {
        self.me.get().map(AccelHandle::id)
    }

    /// Pages of `block` held by this device now, and those that are managed memory.
    fn block_masks(&self, block: PageRange, me: DeviceId) -> (BlockMask, BlockMask) {
        let mut resident = BlockMask::new();
        let mut managed = BlockMask::new();
        for region in self.mm.regions_in(block) {
            let Some(sub) = region.range().intersect(&block) else {
                continue;
            };
            for a in sub.pages() {
                let k = block.index_of(a) as usize;
                managed.set(k);
                if matches!(region.states.get(region.index(a)).location,
                    Location::Device { dev, .. } if dev == me)
                {
                    resident.set(k);
                }
            }
        }
        (resident, managed)
    }

    /// Makes room for `needed` frames by evicting least recently used chunks other than
    /// `keep`. Returns the pages evicted.
    fn make_room(&self, needed: u64, free: u64, keep: PageRange) -> u64 {
        let Some(handle) = self.me.get() else {
            return 0;
        };
        let me = handle.id();
        let mut lru = self.lru.lock();
        lru.tick += 1;
        let tick = lru.tick;
        // Sample the accessed bits: a chunk used since the last sample is young again.
        let chunks: Vec<u64> = lru.last_used.keys().copied().collect();
        for base in chunks {
            let chunk = PageRange::new(base, HUGE_PAGE_SIZE).expect("aligned chunk");
            if let Some(Ok(young)) = handle.take_accessed(chunk) {
                if !young.is_empty() {
                    lru.last_used.insert(base, tick);
                }
            }
        }
        let mut order: Vec<(u64, u64)> = lru
            .last_used
            .iter()
            .filter(|(&b, _)| b != keep.start().0)
            .map(|(&b, &t)| (t, b))
            .collect();
        order.sort_unstable();
        let mut freed = 0;
        for (_, base) in order {
            if free + freed >= needed {
                break;
            }
            let chunk = PageRange::new(base, HUGE_PAGE_SIZE).expect("aligned chunk");
            lru.last_used.remove(&base);
            // Read copies in the chunk go too: their pages stay in system memory.
            freed += handle.drop_copies(chunk).unwrap_or(0);
            match self.mm.evict_range(chunk, Some(me)) {
                Ok(pages) => {
                    freed += pages;
                    if pages > 0 {
                        self.counters.add_eviction(pages);
                        self.counters.device(me).add_eviction(pages);
                        tracing::debug!(
                            dev = me.0,
                            trigger = "eviction",
                            start = %chunk.start(),
                            pages,
                            "migration"
                        );
                    }
                }
                Err(e) => tracing::warn!(chunk = %chunk.start(), error = %e, "eviction failed"),
            }
        }
        freed
    }

    /// Notes that `block` holds pages of this device now.
    fn touch(&self, block: PageRange) {
        let mut lru = self.lru.lock();
        let tick = lru.tick;
        lru.last_used.insert(block.start().0, tick);
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
        let (resident, _) = self.block_masks(block, me);
        let needed = want.difference(&resident).count() as u64;
        if needed > f.free_frames {
            self.make_room(needed, f.free_frames, block);
        }
        self.touch(block);
        let spans = want
            .runs()
            .map(|r| {
                PageRange::from_pages(block.page(r.start as u64).0, (r.end - r.start) as u64)
                    .expect("run inside the block")
            })
            .collect();
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
        let remote: Vec<bool> = f
            .pages
            .iter()
            .zip(&copy)
            .map(|(&(a, _), &c)| !c && advised_remote(&advice.at(a.0), me))
            .collect();
        // Pages the advice keeps where they are: mapped remotely, never migrated.
        let kept: Vec<PageRange> = f
            .pages
            .iter()
            .zip(&remote)
            .filter(|(_, &r)| r)
            .map(|(&(a, _), _)| page(a.0))
            .collect();
        if !kept.is_empty() {
            self.counters.add_remote_pages(kept.len() as u64);
        }
        if copy.iter().all(|&c| !c) && remote.iter().all(|&r| r) {
            return BlockPlan {
                action: PlacementAction::MapRemote,
                spans: kept,
                remote: Vec::new(),
                duplicate: Vec::new(),
            };
        }
        // Windows of the range's granularity around each faulted page.
        let block = f.block;
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
            let g = advice.at(a.0).granularity.unwrap_or(self.granularity);
            let start = (a.0 & !(g - 1)).max(block.start().0);
            let end = (start + g).min(block.end().0);
            dup.set_range(
                block.index_of(VirtAddr(start)) as usize
                    ..(end - block.start().0) as usize / PAGE_SIZE as usize,
            );
        }
        let dup = dup.intersection(&mostly);
        for (&(a, _), _) in f
            .pages
            .iter()
            .zip(remote.iter().zip(&copy))
            .filter(|(_, (&r, &c))| !r && !c)
        {
            let g = advice.at(a.0).granularity.unwrap_or(self.granularity);
            let start = (a.0 & !(g - 1)).max(block.start().0);
            let end = (start + g).min(block.end().0);
            want.set_range(
                block.index_of(VirtAddr(start)) as usize
                    ..(end - block.start().0) as usize / PAGE_SIZE as usize,
            );
            faulted.set(block.index_of(a) as usize);
        }
        drop(advice);
        let (resident, managed) = self.block_masks(block, me);
        if let Some(tree) = &self.tree {
            let mut seen = self.fault_migrations.lock();
            let n = seen.entry(block.start().0).or_insert(0);
            let extra = tree.prefetch(&resident, &want, &BlockMask::new(), *n);
            *n = n.saturating_add(faulted.count());
            let extra = extra.intersection(&managed);
            self.counters.add_tree_prefetch(extra.count() as u64);
            want = want.union(&extra);
        }
        if let Some(stream) = &self.stream {
            let addrs: Vec<VirtAddr> = f.pages.iter().map(|&(a, _)| a).collect();
            let ahead = stream.lock().observe(&addrs);
            let mut later = Vec::new();
            for r in ahead {
                if let Some(inside) = r.intersect(&block) {
                    let from = block.index_of(inside.start()) as usize;
                    let before = want.count();
                    want.set_range(from..from + inside.npages() as usize);
                    let added = (want.count() - before) as u64;
                    self.counters.add_stream_prefetch(added);
                }
                // The part past this block goes through the service's migration queue, without
                // what the advice keeps remote there.
                if r.end().0 > block.end().0 {
                    let s = r.start().0.max(block.end().0);
                    let advice = self.advice.read();
                    for (piece, attrs) in advice.pieces(s..r.end().0) {
                        if advised_remote(&attrs, me) {
                            continue;
                        }
                        if let Ok(past) = PageRange::from_bounds(piece.start, piece.end) {
                            self.counters.add_stream_prefetch(past.npages());
                            later.push(past);
                        }
                    }
                }
            }
            if !later.is_empty() {
                self.ahead.lock().extend(later);
            }
        }
        // Never migrate what the advice keeps remote or read-mostly, however the windows and
        // prefetchers grew (a write fault on a read-mostly page migrates it all the same).
        let dup = dup.intersection(&managed).difference(&resident);
        let want = want
            .intersection(&managed)
            .difference(&keep)
            .union(&faulted);
        let spans: Vec<PageRange> = want
            .runs()
            .map(|r| {
                PageRange::from_pages(block.page(r.start as u64).0, (r.end - r.start) as u64)
                    .expect("run inside the block")
            })
            .collect();
        let needed = (want.difference(&resident).count() + dup.count()) as u64;
        if needed > f.free_frames {
            self.make_room(needed, f.free_frames, block);
        }
        self.touch(block);
        let duplicate = dup
            .runs()
            .map(|r| {
                PageRange::from_pages(block.page(r.start as u64).0, (r.end - r.start) as u64)
                    .expect("run inside the block")
            })
            .collect();
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

    fn take_migrations(&self) -> Vec<PageRange> {
        let mut out = std::mem::take(&mut *self.ahead.lock());
        if let Some(ac) = &self.access {
            // UVM's notification batch size.
            let hot = ac.lock().take_notifications(256);
            self.counters.add_counter_notifications(hot.len() as u64);
            out.extend(hot);
        }
        out
    }
}

/// UVM's rule: advice beats migration. A page preferred elsewhere, or one this device is advised
/// to access where it is (with no preferred location), is mapped remotely.
fn advised_remote(a: &crate::advice::PageAttrs, me: DeviceId) -> bool {
    match a.preferred {
        Some(p) => p != Processor::Device(me),
        None => a.accessed_by.contains(&Processor::Device(me)),
    }
}

fn block_index(block: PageRange, a: VirtAddr) -> usize {
    block.index_of(a) as usize
}

fn page(a: u64) -> PageRange {
    PageRange::new(a & !(PAGE_SIZE - 1), PAGE_SIZE).expect("page")
}
