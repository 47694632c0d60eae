//! Fault injection, fork and teardown (issue 6): each injected fault ends in a typed error or a
//! clean fallback with every byte still readable where it was (hetmem-testkit's `Machine` checks
//! the bytes, the invariants and the frame accounting after every step); a child after `fork()`
//! sees every byte, device-held pages included; dropping a context, a device or memory with
//! work in flight loses nothing and leaks no frame or thread.
//!
//! Injections: device frame allocation failure (the pool refuses every frame: `set_limit(0)`),
//! copy-engine window errors (`Accelerator::set_copy_fault_plan`, the core's `FaultPlan`), a full
//! fault ring (a 4-slot ring: faults are dropped and raised again on replay), and a device lost
//! in the middle of a launch's migrations (the accelerator dropped under it). System-page
//! allocation failure is the dmirror `FAIL_ALLOC` flag, exercised by hetmem-sim's `hmm_tests`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmem_core::copy_engine::FaultPlan;
use hetmem_runtime::{Advice, Context, Page, Processor};
use hetmem_sim::accel::{AccelConfig, Accelerator, LaunchError, Miss, Thread};
use hetmem_testkit::{op_strategy, small_device, Machine, ModelConfig, Op, Tally};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// `n` sequences of up to 40 ops from a fixed seed (the same on every run).
fn sequences(n: usize, seed: u8) -> Vec<Vec<Op>> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    );
    let s = proptest::collection::vec(op_strategy(), 1..40);
    (0..n)
        .map(|_| s.new_tree(&mut runner).expect("a sequence").current())
        .collect()
}

/// Runs `seqs` on machines made by `config`, after `inject` on each; a prefetch may fail only
/// with a typed error, after which every byte must still be where it was. Returns the tally and
/// the prefetches refused.
fn run_injected(
    config: &ModelConfig,
    seqs: &[Vec<Op>],
    inject: impl Fn(&Machine),
    after: impl Fn(&Machine),
) -> (Tally, u64) {
    let mut total = Tally::default();
    let mut refused = 0;
    for (k, ops) in seqs.iter().enumerate() {
        let mut m = Machine::new(config.clone()).unwrap();
        inject(&m);
        for (i, op) in ops.iter().enumerate() {
            match m.apply(op) {
                Ok(()) => {}
                Err(e) if matches!(op, Op::Prefetch { .. }) => {
                    refused += 1;
                    eprintln!("sequence {k} step {i}: refused as it may be: {e}");
                }
                Err(e) => panic!("sequence {k} step {i}: {e}"),
            }
            m.check()
                .unwrap_or_else(|e| panic!("sequence {k} step {i} {op:?}: {e}"));
        }
        after(&m);
        total.add(&m.finish().unwrap());
    }
    (total, refused)
}

#[test]
fn device_frame_allocation_failure_falls_back_to_system_memory() {
    let config = ModelConfig::default();
    let seqs = sequences(12, 1);
    let (tally, refused) = run_injected(
        &config,
        &seqs,
        |m| {
            let ctx = m.context();
            // Every frame allocation from now on fails. Pages already on a device stay there.
            ctx.suspend().unwrap();
            for d in ctx.devices() {
                ctx.device(d)
                    .unwrap()
                    .memory()
                    .pool()
                    .lock()
                    .set_limit(Some(0));
            }
        },
        |m| {
            for d in m.context().devices() {
                assert_eq!(
                    m.context().memory_in_use(d).unwrap(),
                    0,
                    "no frame was handed out"
                );
            }
        },
    );
    eprintln!("frame allocation failure: {tally}; {refused} prefetches refused");
    assert!(
        tally.ops[5] > 10 && tally.ops[6] > 10,
        "kernels ran: {tally}"
    );
}

#[test]
fn copy_engine_errors_roll_back_and_lose_nothing() {
    let config = ModelConfig::default();
    let seqs = sequences(12, 2);
    let injected = std::sync::atomic::AtomicU64::new(0);
    let (tally, refused) = run_injected(
        &config,
        &seqs,
        |m| {
            let ctx = m.context();
            for (k, d) in ctx.devices().into_iter().enumerate() {
                ctx.device(d)
                    .unwrap()
                    .set_copy_fault_plan(FaultPlan::Fraction {
                        seed: k as u64,
                        per_million: 400_000,
                    })
                    .unwrap();
            }
        },
        |m| {
            for d in m.context().devices() {
                let s = m.context().device(d).unwrap().copy_stats();
                injected.fetch_add(s.windows_injected, std::sync::atomic::Ordering::Relaxed);
            }
        },
    );
    let injected = injected.into_inner();
    eprintln!("copy-engine errors: {injected} windows failed on purpose; {tally}; {refused} prefetches refused");
    assert!(injected > 0, "the plan failed some windows");
}

#[test]
fn a_full_fault_ring_drops_faults_that_are_raised_again() {
    let config = ModelConfig {
        ring_capacity: 4,
        ..ModelConfig::default()
    };
    let seqs = sequences(10, 3);
    let dropped = std::sync::atomic::AtomicU64::new(0);
    let (tally, _) = run_injected(
        &config,
        &seqs,
        |_| {},
        |m| {
            for d in m.context().devices() {
                let s = m.context().device(d).unwrap().stats();
                dropped.fetch_add(s.faults_dropped, std::sync::atomic::Ordering::Relaxed);
            }
        },
    );
    let dropped = dropped.into_inner();
    eprintln!("full fault ring (4 slots): {dropped} faults dropped and raised again; {tally}");
    assert!(dropped > 0, "the ring overflowed");
}

/// The device goes away in the middle of a launch whose warps fault and migrate pages in: the
/// launch ends (a typed error or done), every page is back in system memory, and each lane's
/// words hold a prefix of its stores (a lane's stores land one by one, in program order).
#[test]
fn a_device_lost_in_the_middle_of_migrations_loses_nothing() {
    let mut lost = 0;
    for round in 0..4u64 {
        let mm = hetmem::AddressSpace::current().unwrap();
        let pages = 256u64;
        let range = mm
            .map_anonymous(
                pages * 4096,
                hetmem::Prot::READ | hetmem::Prot::WRITE,
                false,
            )
            .unwrap();
        let words = (pages * 1024) as usize;
        let init: Vec<u8> = (0..words as u32).flat_map(|i| i.to_le_bytes()).collect();
        mm.cpu_write(range.start(), &init).unwrap();
        let acc = Accelerator::new(AccelConfig {
            compute_units: 2,
            ..small_device()
        })
        .unwrap();
        let base = range.start().0;
        // Lane t adds 1_000_000 to its 64 words.
        let k = move |t: u64, th: &mut Thread<'_>| -> Result<(), Miss> {
            for j in 0..64 {
                let a = base + 4 * (t * 64 + j);
                let v = th.load_u32(a)?;
                th.store_u32(a, v + 1_000_000)?;
            }
            Ok(())
        };
        let launch = acc.launch(Arc::new(k), pages * 16).unwrap();
        std::thread::sleep(Duration::from_micros(200 * round));
        drop(acc);
        match launch.wait() {
            Ok(_) => {}
            Err(LaunchError::Shutdown) | Err(LaunchError::Fatal { .. }) => lost += 1,
        }
        let mut back = vec![0u8; init.len()];
        mm.cpu_read(range.start(), &mut back).unwrap();
        // A lane stopped by the loss of its device has made some of its stores, in order: its
        // words hold a prefix of the increments, and every other byte what the CPU wrote.
        for lane in 0..(pages * 16) as usize {
            let w = |i: usize| u32::from_le_bytes(back[4 * i..4 * i + 4].try_into().unwrap());
            let done = (0..64)
                .take_while(|&j| w(lane * 64 + j) == (lane * 64 + j) as u32 + 1_000_000)
                .count();
            for j in done..64 {
                let i = lane * 64 + j;
                assert_eq!(w(i), i as u32, "round {round}: lane {lane} word {i}");
            }
        }
        mm.check_invariants().unwrap();
        // SAFETY: the mapping is this test's; nothing refers to it any more.
        unsafe { mm.unmap(range).unwrap() };
    }
    eprintln!("device lost mid-launch: 4 rounds, {lost} launches ended by the loss");
}

/// A child after `fork()` sees every byte of managed memory, the pages a device held included
/// (the prepare handler brings them home first), and the parent goes on using them.
#[test]
fn a_forked_child_sees_device_held_pages() {
    let ctx = Context::builder().device(small_device()).build().unwrap();
    let d = ctx.devices()[0];
    let mut m = ctx.alloc(32 * 4096).unwrap();
    for (i, w) in m.view_mut::<u32>().iter_mut().enumerate() {
        *w = (i as u32).wrapping_mul(2654435761);
    }
    let mut r = ctx.register(vec![Page::default(); 8]).unwrap();
    for (i, w) in r.view_mut::<u32>().iter_mut().enumerate() {
        *w = !(i as u32);
    }
    ctx.prefetch(m.range(), Processor::Device(d))
        .unwrap()
        .wait()
        .unwrap();
    ctx.prefetch(r.range(), Processor::Device(d))
        .unwrap()
        .wait()
        .unwrap();
    let held = ctx.memory_in_use(d).unwrap() / 4096;
    assert_eq!(held, 40, "every page is on the device before the fork");
    // SAFETY: fork() itself; the child only reads memory and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = m
            .view::<u32>()
            .iter()
            .enumerate()
            .all(|(i, &w)| w == (i as u32).wrapping_mul(2654435761))
            && r.view::<u32>()
                .iter()
                .enumerate()
                .all(|(i, &w)| w == !(i as u32));
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    while unsafe { libc::waitpid(pid, &mut status, 0) } != pid {}
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child saw other bytes"
    );
    // The parent's pages migrate again and keep their bytes.
    ctx.prefetch(m.range(), Processor::Device(d))
        .unwrap()
        .wait()
        .unwrap();
    ctx.check_invariants().unwrap();
    assert!(m
        .view::<u32>()
        .iter()
        .enumerate()
        .all(|(i, &w)| w == (i as u32).wrapping_mul(2654435761)));
    let buf = r.unregister().unwrap();
    assert_eq!(
        u32::from_le_bytes(buf[1].0[..4].try_into().unwrap()),
        !1024u32
    );
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Waits up to two seconds for the thread count to come back to `n`.
fn settles_to(n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let t = threads();
        if t == n || Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Memory, launches and prefetches dropped in flight, then the context: every byte is where
/// it should be, every frame is given back before the devices go, and every thread ends.
#[test]
fn dropping_everything_with_work_in_flight_leaks_no_frame_or_thread() {
    // The address space's own thread (userfaultfd events) lives as long as the process.
    drop(Context::builder().device(small_device()).build().unwrap());
    let base = threads();
    for round in 0..3 {
        let ctx = Context::builder()
            .device(small_device())
            .device(small_device())
            .build()
            .unwrap();
        let devs = ctx.devices();
        let mut a = ctx.alloc(64 * 4096).unwrap();
        a.view_mut::<u32>().fill(7);
        let mut r = ctx.register(vec![Page::default(); 16]).unwrap();
        r.view_mut::<u32>().fill(9);
        ctx.advise(r.range(), Advice::SetReadMostly).unwrap();
        let (pa, pr) = (a.addr(), r.addr());
        let k = move |t: u64, th: &mut Thread<'_>| -> Result<(), Miss> {
            th.load_u32(pr + 4 * (t % 16384))?;
            th.store_u32(pa + 4 * t, 8)
        };
        let fence = ctx.prefetch(a.range(), Processor::Device(devs[1])).unwrap();
        let launch = ctx.launch(devs[0], Arc::new(k), 64 * 1024).unwrap();
        let prefetch_r = ctx.prefetch(r.range(), Processor::Device(devs[1])).unwrap();
        // Dropped unwaited: each completes before it stops counting.
        drop(launch);
        let _ = fence.wait();
        let _ = prefetch_r.wait();
        assert!(a.view::<u32>().iter().all(|&w| w == 8), "round {round}");
        drop(a);
        if round == 1 {
            // The devices go first, the registration after (its copies and write protection
            // must not outlive them).
            drop(ctx);
            let mut buf = r.unregister().unwrap();
            buf[3].0[0] = 1; // writable again
            assert!(buf[5].0[..4] == 9u32.to_le_bytes());
            continue;
        }
        let buf = r.unregister().unwrap();
        assert!(buf.iter().all(|p| p.0[..4] == 9u32.to_le_bytes()));
        for d in &devs {
            assert_eq!(
                ctx.memory_in_use(*d).unwrap(),
                0,
                "round {round}: frames left on {d:?}"
            );
        }
        ctx.check_invariants().unwrap();
        drop(ctx);
    }
    assert_eq!(settles_to(base), base, "threads left behind");
}
