//! Model checking of hetmem's three concurrent protocols with [shuttle](https://docs.rs/shuttle)
//! (issue 6, item 3): the notifier sequence protocol, the fault ring, and migration against CPU
//! faults.
//!
//! Built only with `RUSTFLAGS="--cfg shuttle"`, which makes hetmem-core take its mutexes,
//! condition variables and atomics from shuttle (`src/sync.rs`): the notifier, the fault ring, the
//! shared device MMU and the page-state words below are the real code, and shuttle chooses which
//! thread runs at every lock, wait and atomic access. Each model runs a bounded number of random
//! schedules and as many PCT schedules (shuttle's `RandomScheduler` and `PctScheduler`, depth 3);
//! `HETMEM_SHUTTLE_ITERS` sets the number of each (`scripts/test.sh` and the README show the
//! command). A failure prints the schedule, which `shuttle::replay` runs again.
//!
//! What is real and what is modelled is said on each model. Each model also has a *mutant*, a
//! copy of the protocol with one step removed, that the checker must catch: proof that the model
//! asserts something.
#![cfg(shuttle)]

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Weak};

use hetmem_core::device_mmu::{Access, MmuConfig, PtePerms, PteTarget};
use hetmem_core::fault_ring::{
    FaultAccess, FaultBatch, FaultClient, FaultEntry, FaultOutcome, PushOutcome, ReplayDecision,
    ReplayPolicy, ReplayScheduler, SharedFaultRing,
};
use hetmem_core::notifier::{
    IntervalNotifier, IntervalNotifierOps, MmNotifiers, NotifierRange, NotifyEvent,
};
use hetmem_core::page_state::{DevicePlacement, Location, PageStates};
use hetmem_core::pool::{DevicePool, MemoryKind};
use hetmem_core::shared_mmu::SharedMmu;
use hetmem_core::sync::{Condvar, Mutex};
use hetmem_core::{DevPfn, DeviceId, Owner, PageRange, VirtAddr, PAGE_SIZE};
use shuttle::scheduler::{PctScheduler, RandomScheduler};
use shuttle::sync::atomic::{AtomicBool, AtomicU32};
use shuttle::{thread, Config, Runner};

// ---- running the models ---------------------------------------------------------------------

/// Schedules each model runs per scheduler by default (about a second per model on a 2-core
/// machine).
const DEFAULT_ITERS: usize = 10_000;

/// Schedules per scheduler within which each mutant must be caught (fixed seeds: the same
/// schedules every run, whatever `HETMEM_SHUTTLE_ITERS` says).
const MUTANT_ITERS: usize = 10_000;

/// Schedules per scheduler: `HETMEM_SHUTTLE_ITERS`, else `default`.
fn iterations(default: usize) -> usize {
    std::env::var("HETMEM_SHUTTLE_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn config() -> Config {
    let mut c = Config::new();
    // Shuttle treats every atomic ordering as SeqCst and says so once per run: known, and noted
    // in the README (the models check the protocols' interleavings, not weak-memory reorderings).
    c.silence_warnings = true;
    c
}

/// Runs `model` under `iters` random schedules, then `iters` PCT schedules of depth 3.
fn explore(model: impl Fn() + Send + Sync + 'static, iters: usize) {
    let model = Arc::new(model);
    let m = Arc::clone(&model);
    Runner::new(RandomScheduler::new(iters), config()).run(move || m());
    Runner::new(PctScheduler::new(3, iters), config()).run(move || model());
}

/// Runs `model` under seeded schedules, `iters` random ones then `iters` PCT ones (depth 3), and
/// returns the failure message of the first that failed, if one did. The seed makes it
/// deterministic: the same schedules every run.
fn failure_of(model: impl Fn() + Send + Sync + 'static, seed: u64, iters: usize) -> Option<String> {
    let model = Arc::new(model);
    let run = |pct: bool| {
        let m = Arc::clone(&model);
        catch_unwind(AssertUnwindSafe(move || {
            if pct {
                Runner::new(PctScheduler::new_from_seed(seed, 3, iters), config()).run(move || m());
            } else {
                Runner::new(RandomScheduler::new_from_seed(seed, iters), config()).run(move || m());
            }
        }))
    };
    let r = run(false).and_then(|()| run(true));
    r.err().map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a non-string panic".into())
    })
}

/// Asserts that a mutant's model fails within `iters` seeded random schedules, with a message
/// containing `expected`.
fn assert_caught(model: impl Fn() + Send + Sync + 'static, iters: usize, expected: &str) {
    let msg = failure_of(model, 0x006e_7a11, iters)
        .unwrap_or_else(|| panic!("the mutant survived {iters} schedules"));
    assert!(
        msg.contains(expected),
        "the mutant failed, but not as expected ({expected:?}): {msg}"
    );
}

const DEV: DeviceId = DeviceId(0);
const OWNER: Owner = Owner(0xacce_0000);
const BASE: u64 = 0x10_0000;
const RW: PtePerms = PtePerms::READ.union(PtePerms::WRITE);

fn va(page: usize) -> VirtAddr {
    VirtAddr(BASE + page as u64 * PAGE_SIZE)
}

fn pages(first: usize, n: usize) -> PageRange {
    PageRange::from_pages(va(first).0, n as u64).expect("page range")
}

fn invalidation(range: PageRange, event: NotifyEvent, owner: Option<Owner>) -> NotifierRange {
    NotifierRange::new(range.start(), range.end(), event, owner)
}

/// A protocol step a mutant leaves out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The protocol as hetmem runs it.
    Real,
    /// Mirror faults install their snapshot without `read_retry` (model A).
    NoRetryCheck,
    /// A warp reads the replay epoch after pushing its faults instead of before (model B).
    EpochAfterPush,
    /// A migration to the device skips its notifier invalidation (model C).
    NoMigrateInvalidation,
    /// The mprotect fault handler gives a system page its protection back without taking the
    /// page lock (model C; the bug `hetmem::fault::fault_system_page` documents).
    UnlockedProtectionRestore,
}

/// A one-shot gate: threads wait until it opens.
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock() = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock();
        while !*open {
            self.cv.wait(&mut open);
        }
    }
}

// ---- a mirror: the accelerator's device page table and notifier ----------------------------

/// A device mirror as the simulated accelerator runs one (`hetmem-sim`'s `SimDevice`): the real
/// [`SharedMmu`] (page table, one compute unit's TLB, shootdowns that wait for the unit) and the
/// accelerator's notifier callback, which, under the page-table lock, moves the subscription's
/// sequence and unmaps the range, then shoots the TLBs down before returning.
#[derive(Debug)]
struct Mirror {
    mmu: SharedMmu,
}

impl Mirror {
    fn new() -> Arc<Mirror> {
        let mmu = SharedMmu::new(MmuConfig {
            dev: DEV,
            va_bits: 48,
            compute_units: 1,
            tlb_entries: 4,
        })
        .expect("device MMU");
        Arc::new(Mirror { mmu })
    }

    fn subscribe(
        self: &Arc<Self>,
        mm: &Arc<MmNotifiers>,
        range: PageRange,
    ) -> Arc<IntervalNotifier> {
        let ops: Weak<dyn IntervalNotifierOps> = Arc::downgrade(self) as Weak<Mirror>;
        mm.insert(range.start(), range.end(), ops)
    }

    /// The collision-retry protocol of a mirror fault (hmm.rst; `accel.rs` `map_block`):
    /// `read_begin`, a snapshot of where the page is, then, under the page-table lock, either
    /// `read_retry` says an invalidation collided (start again) or the snapshot is installed.
    fn fault(
        &self,
        sub: &IntervalNotifier,
        page: usize,
        snapshot: impl Fn() -> Option<PteTarget>,
        variant: Variant,
    ) {
        loop {
            let seq = sub.read_begin();
            let Some(target) = snapshot() else { continue };
            let installed = self.mmu.update(|c| {
                if variant != Variant::NoRetryCheck && sub.read_retry(seq) {
                    return false;
                }
                c.map(pages(page, 1), target, RW).expect("map");
                true
            });
            if installed {
                // Mapping over a leaf queued its invalidation: send it before the warps run.
                self.mmu.shootdown();
                return;
            }
        }
    }

    /// Where the device's page table sends `page`, if anywhere.
    fn mapping(&self, page: usize) -> Option<PteTarget> {
        self.mmu
            .inspect(|pt| pt.lookup(va(page)).and_then(|tr| tr.target(va(page))))
    }
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(&self, sub: &IntervalNotifier, range: &NotifierRange, cur_seq: u64) -> bool {
        let r = PageRange::from_bounds(range.start.0, range.end.0).expect("range");
        self.mmu.update(|c| {
            sub.set_seq(cur_seq);
            c.unmap(r).expect("unmap");
        });
        // Even when nothing was unmapped here: another update's shootdown may still be on its way.
        self.mmu.shootdown();
        true
    }
}

// ---- model A: the notifier sequence protocol ------------------------------------------------

/// **Model A: the notifier sequence protocol** (`mmu_interval_notifier`; hmm.rst "Address space
/// mirroring"; DESIGN.md invariant 1: no device mapping is installed from a snapshot taken before
/// an invalidation of that range, and none survives one).
///
/// Real: [`MmNotifiers`] and [`IntervalNotifier`] (insert, remove, `invalidate_start` and its
/// guard, `read_begin`, `read_retry`, `set_seq`), the [`SharedMmu`] of each mirror (table lock,
/// TLB, shootdown), the accelerator's callback and fault protocol as [`Mirror`] transcribes them.
/// Modelled: the CPU page table is one atomic per page, the frame the page lives in; "the page
/// moves" is an invalidation bracketing a store of a new frame number, as a migration brackets
/// its copy.
///
/// Threads: an invalidator moving page 0 twice and page 1 once, then invalidating a range nobody
/// mirrors; mirror A (subscribed to page 0 from the start) faulting page 0 in and a compute unit
/// of A using its translation; mirror B subscribing to pages 0-1 *while* those run (page 1 has
/// no other subscriber: an invalidation of it may be active and have called nobody), faulting
/// both in, using them before and after the moves, and unsubscribing. Checked: every translation
/// a unit uses, while it holds its TLB (which the callback's shootdown waits for), names the frame
/// the page is in; at the end A's mappings still do, the sequence is even and idle, the MMUs are
/// consistent, and no thread is stuck (remove included: shuttle reports a deadlock).
fn notifier_model(variant: Variant) {
    let mm = MmNotifiers::new();
    // The CPU page table: page k lives in frame `cpu[k]`.
    let cpu: Arc<[AtomicU32; 2]> = Arc::new([AtomicU32::new(10), AtomicU32::new(20)]);
    let a = Mirror::new();
    let sub_a = a.subscribe(&mm, pages(0, 1));

    // Opened once the pages have made their moves.
    let moved = Arc::new(Gate::default());
    let invalidator = {
        let (mm, cpu, moved) = (Arc::clone(&mm), Arc::clone(&cpu), Arc::clone(&moved));
        thread::spawn(move || {
            for page in [0, 1, 0] {
                let guard =
                    mm.invalidate_start(invalidation(pages(page, 1), NotifyEvent::Migrate, None));
                cpu[page].fetch_add(1, SeqCst);
                drop(guard);
            }
            moved.open();
            // Nobody mirrors page 8: this invalidation calls no callback.
            mm.invalidate(invalidation(pages(8, 1), NotifyEvent::Clear, None));
        })
    };
    let snapshot = |cpu: &Arc<[AtomicU32; 2]>, page: usize| {
        let cpu = Arc::clone(cpu);
        move || Some(PteTarget::Local(DevPfn(cpu[page].load(SeqCst))))
    };
    // A compute unit uses a page: under its TLB guard the translation must be current.
    let use_page = |m: &Mirror, cpu: &[AtomicU32; 2], page: usize, who: &str| {
        let mut unit = m.mmu.unit(0).expect("unit");
        if let Ok(tr) = unit.translate(va(page), Access::Write) {
            let now = PteTarget::Local(DevPfn(cpu[page].load(SeqCst)));
            assert_eq!(
                tr.target(va(page)),
                Some(now),
                "stale mapping: mirror {who} reaches {:?} for page {page}, which is in {now:?}",
                tr.target(va(page))
            );
        }
    };
    let service_a = {
        let (a, sub_a, cpu) = (Arc::clone(&a), Arc::clone(&sub_a), Arc::clone(&cpu));
        let snap = snapshot(&cpu, 0);
        thread::spawn(move || {
            for _ in 0..2 {
                a.fault(&sub_a, 0, &snap, variant);
                use_page(&a, &cpu, 0, "A");
            }
        })
    };
    let mirror_b = {
        let (mm, cpu, moved) = (Arc::clone(&mm), Arc::clone(&cpu), Arc::clone(&moved));
        let (snap0, snap1) = (snapshot(&cpu, 0), snapshot(&cpu, 1));
        thread::spawn(move || {
            let b = Mirror::new();
            let sub_b = b.subscribe(&mm, pages(0, 2));
            b.fault(&sub_b, 1, &snap1, variant);
            b.fault(&sub_b, 0, &snap0, variant);
            use_page(&b, &cpu, 1, "B");
            use_page(&b, &cpu, 0, "B");
            // Still subscribed once the pages have moved: what B maps must have followed them.
            moved.wait();
            use_page(&b, &cpu, 1, "B");
            use_page(&b, &cpu, 0, "B");
            // Unsubscribing while the last invalidation may be in flight must return.
            mm.remove(&sub_b);
            b.mmu.check_invariants().unwrap();
        })
    };
    invalidator.join().unwrap();
    service_a.join().unwrap();
    mirror_b.join().unwrap();
    let now = Some(PteTarget::Local(DevPfn(cpu[0].load(SeqCst))));
    let a_maps = a.mapping(0);
    assert!(
        a_maps.is_none() || a_maps == now,
        "stale mapping survived: mirror A maps {a_maps:?}, the page is in {now:?}"
    );
    mm.check_invariants().unwrap();
    a.mmu.check_invariants().unwrap();
    mm.remove(&sub_a);
    assert!(mm.is_empty());
}

#[test]
fn notifier_protocol_leaves_no_stale_mapping() {
    explore(|| notifier_model(Variant::Real), iterations(DEFAULT_ITERS));
}

#[test]
fn notifier_model_catches_a_missing_retry_check() {
    assert_caught(
        || notifier_model(Variant::NoRetryCheck),
        MUTANT_ITERS,
        "stale mapping",
    );
}

/// The smallest program of the insert race model A found: one invalidation moving a page that
/// nobody mirrors yet, against a mirror subscribing and faulting the page in. Before the fix,
/// `invalidate_start` read the subscriber list, then (after a window) marked itself active: a
/// subscription inserted in the window was neither called nor made to wait, and kept a mapping
/// of the page's old frame.
fn insert_vs_invalidate_model() {
    let mm = MmNotifiers::new();
    let cpu = Arc::new(AtomicU32::new(1));
    let mover = {
        let (mm, cpu) = (Arc::clone(&mm), Arc::clone(&cpu));
        thread::spawn(move || {
            let guard = mm.invalidate_start(invalidation(pages(0, 1), NotifyEvent::Migrate, None));
            cpu.store(2, SeqCst);
            drop(guard);
        })
    };
    let b = Mirror::new();
    let sub = b.subscribe(&mm, pages(0, 1));
    let snap = {
        let cpu = Arc::clone(&cpu);
        move || Some(PteTarget::Local(DevPfn(cpu.load(SeqCst))))
    };
    b.fault(&sub, 0, snap, Variant::Real);
    mover.join().unwrap();
    let maps = b.mapping(0);
    let now = Some(PteTarget::Local(DevPfn(cpu.load(SeqCst))));
    assert!(
        maps.is_none() || maps == now,
        "stale mapping survived: the mirror maps {maps:?}, the page is in {now:?}"
    );
    mm.remove(&sub);
}

/// Regression: the insert / `invalidate_start` race, on fixed seeds (the same schedules every
/// run; before the fix they failed).
#[test]
fn regression_insert_racing_invalidate_start() {
    assert_eq!(
        failure_of(insert_vs_invalidate_model, 0x006e_7a11, 5000),
        None
    );
    assert_eq!(failure_of(insert_vs_invalidate_model, 0xface, 5000), None);
}

// ---- model B: the fault ring ----------------------------------------------------------------

/// The page warp `w` of compute unit `cu` faults on: every warp its own, except that the last
/// warp shares the first one's page (the batch merges the duplicates).
fn ring_page(cu: u16, w: u32) -> usize {
    match (cu, w) {
        (1, 1) => 0,
        _ => cu as usize * 2 + w as usize,
    }
}

/// What a compute unit pushed: the ids of the entries the ring accepted, in order, and how many
/// it dropped (ring full or overflowed).
type Pushed = (Vec<u64>, u64);

/// **Model B: the fault ring** (seed 002's replayable fault buffer; UVM's fault batching and
/// replay policies; DESIGN.md invariant 4: every fault is serviced or reported fatal, replayable
/// faults dropped by a full ring fault again on replay, no deadlock).
///
/// Real: [`SharedFaultRing`] (push with overflow, `fetch_batch`, `flush`, `wait_nonempty`, its
/// lock and condition variable, `check_invariants`), [`FaultBatch`] (merging, grouping by block,
/// resolution) and [`ReplayScheduler`] under each [`ReplayPolicy`]. Modelled, transcribing
/// `hetmem-sim`'s accelerator: a compute unit's warps (`run_unit` / `run_warp`: read the replay
/// epoch, run the ready warps, push a fault for each miss and stall at that epoch, sleep until a
/// replay when none is ready) and the fault service loop (fetch a batch, service it, replay per
/// the scheduler; replay what is owed before sleeping on an empty ring). Servicing a fault is
/// setting the page's "mapped" flag. The real service loop also wakes every 5 ms to poll its stop
/// flag and replays while a launch is active: not modelled, so that a warp left stalled with
/// nothing owed is a deadlock here instead of a 5 ms hiccup there. Shutdown is a stop flag and an
/// entry pushed to wake the service.
///
/// Two compute units of two warps on a 4-slot ring (3 entries), batches of 2: the ring overflows.
/// Checked: every warp completes (no deadlock), the ring's invariants after every fetch, and no
/// entry lost, duplicated or reordered: what each unit's pushes queued is exactly what the service
/// fetched, what the flushes discarded and what is left, in each unit's order.
fn fault_ring_model(policy: ReplayPolicy, variant: Variant) {
    const CUS: u16 = 2;
    const WARPS: u32 = 2;
    const STOP: u64 = 0xdead_0000;
    let ring = Arc::new(SharedFaultRing::new(4).expect("ring"));
    let epoch = Arc::new((Mutex::new(0u64), Condvar::new()));
    let mapped: Arc<[AtomicBool; 3]> = Arc::new(Default::default());
    let stop = Arc::new(AtomicBool::new(false));

    let units: Vec<thread::JoinHandle<Pushed>> = (0..CUS)
        .map(|cu| {
            let (ring, epoch, mapped) =
                (Arc::clone(&ring), Arc::clone(&epoch), Arc::clone(&mapped));
            thread::spawn(move || {
                let mut stalled_at: [Option<u64>; WARPS as usize] = [None; WARPS as usize];
                let mut done = [false; WARPS as usize];
                let (mut queued, mut dropped, mut next) = (Vec::new(), 0u64, 0u64);
                loop {
                    // Read before the faults are pushed, so that a replay servicing them is seen.
                    let e = *epoch.0.lock();
                    let mut ran = false;
                    for w in 0..WARPS {
                        let k = w as usize;
                        if done[k] || stalled_at[k].is_some_and(|at| e <= at) {
                            continue;
                        }
                        ran = true;
                        stalled_at[k] = None;
                        let page = ring_page(cu, w);
                        if mapped[page].load(SeqCst) {
                            done[k] = true;
                            continue;
                        }
                        let id = ((cu as u64) << 32) | next;
                        next += 1;
                        let outcome = ring.push(FaultEntry {
                            addr: va(page),
                            access: FaultAccess::Write,
                            client: FaultClient { cu, warp: w },
                            timestamp: id,
                            replayable: true,
                        });
                        match outcome {
                            PushOutcome::Queued => queued.push(id),
                            PushOutcome::DroppedReplayable => dropped += 1,
                            PushOutcome::LostNonReplayable => unreachable!("replayable"),
                        }
                        stalled_at[k] = Some(if variant == Variant::EpochAfterPush {
                            *epoch.0.lock()
                        } else {
                            e
                        });
                    }
                    if done.iter().all(|&d| d) {
                        return (queued, dropped);
                    }
                    if !ran {
                        // Every warp is stalled: sleep until a replay.
                        let mut now = epoch.0.lock();
                        if *now == e {
                            epoch.1.wait(&mut now);
                        }
                    }
                }
            })
        })
        .collect();

    let service = {
        let (ring, epoch, mapped, stop) = (
            Arc::clone(&ring),
            Arc::clone(&epoch),
            Arc::clone(&mapped),
            Arc::clone(&stop),
        );
        thread::spawn(move || {
            let mut sched = ReplayScheduler::new(policy);
            let (mut fetched, mut discarded) = (Vec::new(), 0u64);
            let mut buf = Vec::new();
            let carry_out = |d: ReplayDecision, discarded: &mut u64| {
                if d == ReplayDecision::FlushThenReplay {
                    let mut kept = Vec::new();
                    *discarded += ring.flush(&mut kept).discarded_replayable as u64;
                    assert!(kept.is_empty(), "no non-replayable faults here");
                }
                if d.replays() {
                    *epoch.0.lock() += 1;
                    epoch.1.notify_all();
                }
            };
            loop {
                buf.clear();
                let n = ring.fetch_batch(2, &mut buf);
                ring.check_invariants().unwrap();
                if n == 0 {
                    let d = sched.after_drain();
                    if d.replays() {
                        carry_out(d, &mut discarded);
                        continue;
                    }
                    if stop.load(SeqCst) {
                        return (fetched, discarded, sched.stats());
                    }
                    ring.wait_nonempty(std::time::Duration::from_millis(5));
                    continue;
                }
                if ring.stats().dropped_replayable > 0 {
                    sched.note_overflow();
                }
                buf.retain(|e| e.addr.0 != STOP);
                fetched.extend(buf.iter().map(|e| e.timestamp));
                let mut batch = FaultBatch::from_entries(&buf);
                assert_eq!(batch.stats().faults, buf.len() as u64);
                for block in batch.blocks_mut() {
                    for f in block.faults() {
                        let page = ((f.page().0 - BASE) / PAGE_SIZE) as usize;
                        mapped[page].store(true, SeqCst);
                    }
                    block.resolve_all(FaultOutcome::Serviced);
                    carry_out(sched.after_block(), &mut discarded);
                }
                assert!(batch.is_resolved());
                carry_out(sched.after_batch(), &mut discarded);
            }
        })
    };

    let pushed: Vec<Pushed> = units.into_iter().map(|u| u.join().unwrap()).collect();
    stop.store(true, SeqCst);
    // The wake-up may find the ring full: dropped then, but the service is not asleep.
    let stop_outcome = ring.push(FaultEntry {
        addr: VirtAddr(STOP),
        access: FaultAccess::Read,
        client: FaultClient { cu: 0, warp: 0 },
        timestamp: u64::MAX,
        replayable: true,
    });
    let stop_queued = stop_outcome == PushOutcome::Queued;
    let (fetched, discarded, _) = service.join().unwrap();

    ring.check_invariants().unwrap();
    let stats = ring.stats();
    let queued: u64 = pushed.iter().map(|p| p.0.len() as u64).sum();
    let dropped: u64 =
        pushed.iter().map(|p| p.1).sum::<u64>() + (stop_outcome != PushOutcome::Queued) as u64;
    assert_eq!(stats.pushed, queued + stop_queued as u64, "pushes counted");
    assert_eq!(stats.dropped_replayable, dropped, "drops counted");
    // Nothing lost or duplicated: fetched + discarded + left == queued (the stop entry aside).
    let left = ring.len() as u64;
    let stop_fetched = stats.fetched - fetched.len() as u64;
    assert_eq!(
        fetched.len() as u64 + discarded + left,
        queued + stop_queued as u64 - stop_fetched,
        "entries lost or duplicated"
    );
    let mut seen = std::collections::BTreeSet::new();
    for id in &fetched {
        assert!(seen.insert(*id), "entry {id:#x} fetched twice");
    }
    // Each unit's fetched entries are among its queued ones, in its order.
    for (cu, (q, _)) in pushed.iter().enumerate() {
        let mine: Vec<u64> = fetched
            .iter()
            .copied()
            .filter(|id| id >> 32 == cu as u64)
            .collect();
        let mut it = q.iter();
        for id in &mine {
            assert!(
                it.any(|x| x == id),
                "unit {cu}: entry {id:#x} fetched out of order or never queued"
            );
        }
    }
    assert!(mapped.iter().all(|m| m.load(SeqCst)));
}

#[test]
fn fault_ring_loses_nothing_and_never_strands_a_warp_replaying_per_block() {
    explore(
        || fault_ring_model(ReplayPolicy::Block, Variant::Real),
        iterations(DEFAULT_ITERS),
    );
}

#[test]
fn fault_ring_loses_nothing_and_never_strands_a_warp_replaying_per_batch() {
    explore(
        || fault_ring_model(ReplayPolicy::Batch, Variant::Real),
        iterations(DEFAULT_ITERS),
    );
}

#[test]
fn fault_ring_loses_nothing_and_never_strands_a_warp_flushing_before_each_replay() {
    explore(
        || fault_ring_model(ReplayPolicy::BatchFlush, Variant::Real),
        iterations(DEFAULT_ITERS),
    );
}

#[test]
fn fault_ring_loses_nothing_and_never_strands_a_warp_replaying_once_drained() {
    explore(
        || fault_ring_model(ReplayPolicy::Once, Variant::Real),
        iterations(DEFAULT_ITERS),
    );
}

#[test]
fn fault_ring_model_catches_a_warp_that_reads_the_epoch_late() {
    assert_caught(
        || fault_ring_model(ReplayPolicy::BatchFlush, Variant::EpochAfterPush),
        MUTANT_ITERS,
        "deadlock",
    );
}

// ---- model C: migration against CPU faults --------------------------------------------------

/// The futex the page lock sleeps on (`hetmem_sys::futex`): `wait` sleeps while the word holds
/// `val` (checked and slept atomically against `wake`, as the kernel does under its hash-bucket
/// lock), `wake` wakes every sleeper. No timeout: hetmem's waits time out after 5 ms and re-check,
/// which would hide a lost wake-up; here one is a deadlock.
#[derive(Debug, Default)]
struct Futex {
    bucket: Mutex<()>,
    cv: Condvar,
}

impl Futex {
    fn wait(&self, word: &AtomicU32, val: u32) {
        let mut g = self.bucket.lock();
        if word.load(SeqCst) == val {
            self.cv.wait(&mut g);
        }
    }

    fn wake(&self) {
        let _g = self.bucket.lock();
        self.cv.notify_all();
    }
}

/// The CPU-fault backend a model runs (README "CPU fault backends").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// A device page is a hole in the CPU page table; pages move by `UFFDIO_MOVE`.
    Uffd,
    /// A device page is `PROT_NONE`; a migration write-stops its pages (`PROT_READ`), copies,
    /// then takes them away.
    Mprotect,
}

/// What the CPU may do with a page: its page-table entry as the MMU sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CpuAccess {
    /// Nothing: a hole (userfaultfd) or `PROT_NONE` (mprotect); a touch faults.
    None,
    /// Read only: write-stopped while a migration copies it (mprotect).
    Read,
    /// Read and write.
    Write,
}

/// A page as the CPU reaches it: its page-table entry and its bytes (one counter). An access
/// checks the entry and touches the bytes in one step, as the MMU does; `UFFDIO_MOVE` takes both
/// away in one step; the mprotect backend's copy and its `mprotect` are separate steps.
#[derive(Debug)]
struct CpuPage {
    access: CpuAccess,
    data: u64,
}

/// One address space of `NPAGES` managed pages and one device-private device.
#[derive(Debug)]
struct World {
    states: PageStates,
    cpu: Vec<Mutex<CpuPage>>,
    pool: Mutex<DevicePool>,
    /// The device's memory: frame → (the page whose data it holds, the bytes).
    arena: Mutex<BTreeMap<u32, (usize, u64)>>,
    mm: Arc<MmNotifiers>,
    dev: Arc<Mirror>,
    sub: Arc<IntervalNotifier>,
    futex: Futex,
    backend: Backend,
    variant: Variant,
}

const NPAGES: usize = 2;

impl World {
    fn new(backend: Backend, variant: Variant) -> Arc<World> {
        let mm = MmNotifiers::new();
        let dev = Mirror::new();
        let sub = dev.subscribe(&mm, pages(0, NPAGES));
        // Room for one page: a migration of both is partial, the other page stays (and a device
        // fault on it maps it remotely).
        let mut pool = DevicePool::new(DEV, OWNER, MemoryKind::DevicePrivate, 512);
        pool.set_limit(Some(1));
        Arc::new(World {
            states: PageStates::new(NPAGES),
            // Page 0 is populated; page 1 is a hole (never touched): with userfaultfd a touch
            // faults, with mprotect the kernel fills it.
            cpu: vec![
                Mutex::new(CpuPage {
                    access: CpuAccess::Write,
                    data: 0,
                }),
                Mutex::new(CpuPage {
                    access: match backend {
                        Backend::Uffd => CpuAccess::None,
                        Backend::Mprotect => CpuAccess::Write,
                    },
                    data: 0,
                }),
            ],
            pool: Mutex::new(pool),
            arena: Mutex::new(BTreeMap::new()),
            mm,
            dev,
            sub,
            futex: Futex::default(),
            backend,
            variant,
        })
    }

    /// `hetmem::fault::unlock_page` (and the migration's `wake_unlock`).
    fn unlock_page(&self, i: usize) {
        if self.states.unlock(i) {
            self.futex.wake();
        }
    }

    /// A migration of system pages into the device (`MigrateVma` with `SELECT_SYSTEM`, as a
    /// prefetch or a device fault makes it): collect and lock, invalidate, (mprotect: write-stop),
    /// a frame per page, commit (`UFFDIO_MOVE`; or copy, then `PROT_NONE`), unlock, end the
    /// invalidation.
    fn migrate_to_device(&self, first: usize, n: usize) {
        let mut collected = Vec::new();
        for i in first..first + n {
            if !self.states.try_lock(i) {
                continue; // SkipReason::Locked
            }
            if self.states.get(i).location == Location::System {
                collected.push(i);
            } else {
                self.unlock_page(i); // not selected: unlocked at once
            }
        }
        if collected.is_empty() {
            return;
        }
        let guard = (self.variant != Variant::NoMigrateInvalidation).then(|| {
            self.mm.invalidate_start(invalidation(
                pages(first, n),
                NotifyEvent::Migrate,
                Some(OWNER),
            ))
        });
        if self.backend == Backend::Mprotect {
            // Writers stop now (they wait on the page lock in the fault handler).
            for &i in &collected {
                self.cpu[i].lock().access = CpuAccess::Read;
            }
        }
        let frames: Vec<Option<DevPfn>> = {
            let mut pool = self.pool.lock();
            collected.iter().map(|_| pool.alloc_page().ok()).collect()
        };
        for (&i, frame) in collected.iter().zip(&frames) {
            let Some(frame) = *frame else {
                // SkipReason::NoDestination: the page stays where it is; mprotect gives it its
                // protection back (`restore_prot` when the migration is dropped).
                if self.backend == Backend::Mprotect {
                    self.cpu[i].lock().access = CpuAccess::Write;
                }
                continue;
            };
            let bytes = match self.backend {
                Backend::Uffd => {
                    // UFFDIO_MOVE: the bytes and the entry go in one step (a hole moves as
                    // zeros).
                    let mut c = self.cpu[i].lock();
                    let b = c.data;
                    *c = CpuPage {
                        access: CpuAccess::None,
                        data: 0,
                    };
                    b
                }
                Backend::Mprotect => {
                    // One copy into the frame, then the CPU loses the page (PROT_NONE and
                    // MADV_DONTNEED).
                    let b = self.cpu[i].lock().data;
                    *self.cpu[i].lock() = CpuPage {
                        access: CpuAccess::None,
                        data: 0,
                    };
                    b
                }
            };
            self.arena.lock().insert(frame.0, (i, bytes));
            self.states.set_device(
                i,
                DevicePlacement {
                    dev: DEV,
                    frame,
                    write: true,
                    huge: false,
                    coherent: false,
                    exclusive: false,
                },
            );
            self.pool.lock().account_in(1);
        }
        for &i in &collected {
            self.unlock_page(i);
        }
        drop(guard);
    }

    /// A migration of the device's pages back to system memory (`migrate_to_ram` for a CPU
    /// fault, eviction for the runtime): collect and lock, invalidate (the device unmaps and
    /// shoots down), move the bytes back (`UFFDIO_MOVE`; or a refill through `/proc/self/mem`
    /// and `mprotect` back), record them as system pages, free the frames, unlock, end the
    /// invalidation.
    fn migrate_to_system(&self, first: usize, n: usize) {
        let mut collected = Vec::new();
        for i in first..first + n {
            if !self.states.try_lock(i) {
                continue;
            }
            if matches!(self.states.get(i).location, Location::Device { .. }) {
                collected.push(i);
            } else {
                self.unlock_page(i);
            }
        }
        if collected.is_empty() {
            return;
        }
        let guard = self.mm.invalidate_start(invalidation(
            pages(first, n),
            NotifyEvent::Migrate,
            Some(OWNER),
        ));
        let mut freed = Vec::new();
        for &i in &collected {
            let Location::Device { frame, .. } = self.states.get(i).location else {
                unreachable!("a locked page does not move");
            };
            let (page, bytes) = self
                .arena
                .lock()
                .remove(&frame.0)
                .expect("the frame holds the page");
            assert_eq!(page, i, "frame {frame:?} held page {page}, not {i}");
            match self.backend {
                Backend::Uffd => {
                    *self.cpu[i].lock() = CpuPage {
                        access: CpuAccess::Write,
                        data: bytes,
                    }
                }
                Backend::Mprotect => {
                    self.cpu[i].lock().data = bytes;
                    self.cpu[i].lock().access = CpuAccess::Write;
                }
            }
            self.states.set_system(i);
            self.pool.lock().account_out(1);
            freed.push(frame);
        }
        {
            let mut pool = self.pool.lock();
            for f in freed {
                pool.free_page(f).expect("frame allocated");
            }
        }
        for &i in &collected {
            self.unlock_page(i);
        }
        drop(guard);
    }

    /// `AddressSpace::handle_cpu_fault`: wait while the page is locked; a device page comes back
    /// (`migrate_to_ram`); a system page is, under its lock, zero-filled if a hole (userfaultfd)
    /// or given back the protection a migration that ended left behind (mprotect). The access
    /// then runs again.
    fn cpu_fault(&self, i: usize) {
        loop {
            let st = self.states.get(i);
            if st.locked {
                if let Some(v) = self.states.prepare_wait(i) {
                    self.futex.wait(self.states.word(i), v);
                }
                continue;
            }
            match st.location {
                // Had a concurrent migration kept it, the access faults again.
                Location::Device { .. } => return self.migrate_to_system(i, 1),
                Location::System => {
                    if self.variant == Variant::UnlockedProtectionRestore {
                        self.cpu[i].lock().access = CpuAccess::Write;
                        return;
                    }
                    if !self.states.try_lock(i) {
                        return; // someone is working on it: retry the access
                    }
                    if self.states.get(i).location == Location::System {
                        let mut c = self.cpu[i].lock();
                        match self.backend {
                            // UFFDIO_COPY of a zero page (EEXIST when present: nothing to do).
                            Backend::Uffd if c.access == CpuAccess::None => {
                                *c = CpuPage {
                                    access: CpuAccess::Write,
                                    data: 0,
                                }
                            }
                            Backend::Uffd => {}
                            // mprotect to the program's protection.
                            Backend::Mprotect => c.access = CpuAccess::Write,
                        }
                    }
                    self.unlock_page(i);
                    return;
                }
                Location::Exclusive { .. } => unreachable!("no exclusive access here"),
            }
        }
    }

    /// The CPU adds 1 to page `i`, faulting until it can.
    fn cpu_add(&self, i: usize) {
        loop {
            {
                let mut c = self.cpu[i].lock();
                if c.access == CpuAccess::Write {
                    c.data += 1;
                    return;
                }
            }
            self.cpu_fault(i);
        }
    }

    /// What range fault reports for page `i` as the device sees it (its own pages as they are,
    /// a hole faulted in first): `None` asks for another try.
    fn snapshot(&self, i: usize) -> Option<PteTarget> {
        match self.states.get(i).location {
            Location::Device { frame, .. } => Some(PteTarget::Local(frame)),
            Location::System => {
                let hole = self.cpu[i].lock().access == CpuAccess::None;
                if hole && self.backend == Backend::Uffd {
                    // REQ_FAULT: range fault faults the hole in.
                    self.cpu_fault(i);
                    None
                } else {
                    Some(PteTarget::System)
                }
            }
            Location::Exclusive { .. } => unreachable!("no exclusive access here"),
        }
    }

    /// A device fault on page `i`, serviced as the accelerator's service thread does: migrate the
    /// page in (a page left in system memory is mapped remotely), then map it under the notifier
    /// sequence check.
    fn device_fault(&self, i: usize) {
        self.migrate_to_device(i, 1);
        self.dev
            .fault(&self.sub, i, || self.snapshot(i), Variant::Real);
    }

    /// A compute unit adds 1 to page `i` through its translation, faulting until it can.
    fn device_add(&self, i: usize) {
        loop {
            {
                let mut unit = self.dev.mmu.unit(0).expect("unit");
                if let Ok(tr) = unit.translate(va(i), Access::Write) {
                    match tr.target(va(i)) {
                        Some(PteTarget::Local(f)) => {
                            let mut arena = self.arena.lock();
                            let slot = arena
                                .get_mut(&f.0)
                                .unwrap_or_else(|| panic!("device stored to freed frame {f:?}"));
                            assert_eq!(slot.0, i, "device stored to another page's frame");
                            slot.1 += 1;
                        }
                        Some(PteTarget::System) => {
                            let mut c = self.cpu[i].lock();
                            assert!(
                                c.access != CpuAccess::None,
                                "device stored to page {i} through a remote mapping after the \
                                 page left system memory (a lost store)"
                            );
                            c.data += 1;
                        }
                        other => unreachable!("target {other:?}"),
                    }
                    return;
                }
            }
            self.device_fault(i);
        }
    }

    /// Every check at the end: the bytes, the page states and their frames, the pool, the
    /// arena, the device's mappings (the accelerator's `check_coherence`), the notifier.
    fn check(&self, expected: [u64; NPAGES]) {
        let pool = self.pool.lock();
        let arena = self.arena.lock();
        let mut on_device = 0;
        for (i, &want) in expected.iter().enumerate() {
            let st = self.states.get(i);
            assert!(!st.locked, "page {i} left locked");
            let (bytes, mapped_ok) = match st.location {
                Location::Device { frame, .. } => {
                    on_device += 1;
                    let (page, b) = arena[&frame.0];
                    assert_eq!(page, i);
                    let m = self.dev.mapping(i);
                    (b, m.is_none() || m == Some(PteTarget::Local(frame)))
                }
                Location::System => {
                    let c = self.cpu[i].lock();
                    assert_eq!(
                        c.access,
                        CpuAccess::Write,
                        "page {i}: protection left behind"
                    );
                    let m = self.dev.mapping(i);
                    (c.data, m.is_none() || m == Some(PteTarget::System))
                }
                Location::Exclusive { .. } => unreachable!(),
            };
            assert_eq!(bytes, want, "page {i}: lost or duplicated stores");
            assert!(
                mapped_ok,
                "page {i} is at {:?}, the device maps {:?}",
                st.location,
                self.dev.mapping(i)
            );
        }
        self.states
            .check_invariants(|dev, f| dev == DEV && pool.is_allocated(f))
            .unwrap();
        assert_eq!(pool.stats().pages_in_use, on_device, "frames leaked");
        assert_eq!(arena.len() as u64, on_device, "bytes left in freed frames");
        pool.check_invariants().unwrap();
        self.mm.check_invariants().unwrap();
        self.dev.mmu.check_invariants().unwrap();
    }
}

/// **Model C: migration against CPU faults** (hmm.rst "Migration to and from device memory";
/// DESIGN.md invariants 1-4: every change of location under the page lock, commit page by page,
/// no frame freed while reachable, no deadlock between CPU faults, device faults and migration).
///
/// Real: [`PageStates`] (the lock bit, the waiters bit, `prepare_wait`, locations and their
/// frames), [`MmNotifiers`], the device's [`SharedMmu`] and its callback ([`Mirror`]), the
/// [`DevicePool`]. Modelled, transcribing `hetmem`'s code step by step (the real steps run
/// `userfaultfd` ioctls, `mprotect` and futexes, which shuttle cannot run): the futex
/// ([`Futex`]), the CPU page table and the page bytes ([`CpuPage`]; `UFFDIO_MOVE` is one step,
/// as the kernel does it under the page-table lock), the device arena, `MigrateVma` in both
/// directions ([`World::migrate_to_device`], [`World::migrate_to_system`]), the CPU fault handler
/// ([`World::cpu_fault`], userfaultfd backend), range fault's view of a page
/// ([`World::snapshot`]), the accelerator's device fault (migrate in, then map under the sequence
/// check). Unlike the accelerator, the model's callback unmaps every page of its own migrations
/// into the device too (the accelerator keeps local mappings of frames it already holds): fewer
/// mappings survive, the protocol is the same.
///
/// Threads: the CPU adding to page 0, page 1 (a hole: zero-filled on first touch) and page 0
/// again; a compute unit adding to the same pages in the same order (faulting them in); a
/// prefetch of both pages to the device followed by their eviction. Checked: every store lands
/// (each page ends holding the number of additions made to it, wherever it is), no store goes
/// through a remote mapping to a page that left system memory or to a freed or foreign frame,
/// and at the end no page is locked, every device page names an allocated frame, no frame or
/// arena byte leaked, the device maps every page where it is, and no thread is stuck.
fn migration_model(backend: Backend, variant: Variant) {
    let w = World::new(backend, variant);
    let cpu = {
        let w = Arc::clone(&w);
        thread::spawn(move || {
            for i in [0, 1, 0] {
                w.cpu_add(i);
            }
        })
    };
    let device = {
        let w = Arc::clone(&w);
        thread::spawn(move || {
            for i in [0, 1, 0] {
                w.device_add(i);
            }
        })
    };
    let mover = {
        let w = Arc::clone(&w);
        thread::spawn(move || {
            w.migrate_to_device(0, NPAGES);
            w.migrate_to_system(0, NPAGES);
        })
    };
    cpu.join().unwrap();
    device.join().unwrap();
    mover.join().unwrap();
    w.check([4, 2]);
    w.mm.remove(&w.sub);
}

#[test]
fn migration_against_cpu_faults_loses_nothing_with_userfaultfd() {
    explore(
        || migration_model(Backend::Uffd, Variant::Real),
        iterations(DEFAULT_ITERS),
    );
}

#[test]
fn migration_against_cpu_faults_loses_nothing_with_mprotect() {
    explore(
        || migration_model(Backend::Mprotect, Variant::Real),
        iterations(DEFAULT_ITERS),
    );
}

#[test]
fn migration_model_catches_a_migration_without_invalidation() {
    assert_caught(
        || migration_model(Backend::Uffd, Variant::NoMigrateInvalidation),
        MUTANT_ITERS,
        "lost store",
    );
}

/// Model C's mprotect write stop, narrowed to one page: a migration that finds no frame (it
/// write-stops the page, then gives its protection back) and one that moves it, against two CPU
/// stores. The store that faulted on the first migration's write stop must neither be lost nor
/// land in the second one's copy window.
fn write_stop_model(variant: Variant) {
    let w = World::new(Backend::Mprotect, variant);
    w.pool.lock().set_limit(Some(0));
    let cpu = {
        let w = Arc::clone(&w);
        thread::spawn(move || {
            w.cpu_add(0);
            w.cpu_add(0);
        })
    };
    w.migrate_to_device(0, 1);
    w.pool.lock().set_limit(Some(1));
    w.migrate_to_device(0, 1);
    cpu.join().unwrap();
    w.check([2, 0]);
    w.mm.remove(&w.sub);
}

#[test]
fn mprotect_write_stop_loses_no_store() {
    explore(
        || write_stop_model(Variant::Real),
        iterations(DEFAULT_ITERS),
    );
}

#[test]
fn migration_model_catches_a_protection_restored_without_the_page_lock() {
    assert_caught(
        || write_stop_model(Variant::UnlockedProtectionRestore),
        MUTANT_ITERS,
        "lost or duplicated stores",
    );
}
