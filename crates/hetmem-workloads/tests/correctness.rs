//! Every workload's device result equals its CPU result, under every preset, with explicit
//! copies, and at every oversubscription factor of the bench matrix (issue 5, "Must show"),
//! sized small so the suite stays fast. `run` itself checks the result word by word and fails
//! with `WorkloadError::Mismatch`; these tests also check that the runs did what their mode
//! says (faults where there should be, none with explicit copies, evictions past device memory).

use hetmem_core::link::LinkPreset;
use hetmem_workloads::{
    report::RunReport,
    run::{run, RunConfig},
    Mode, Preset, WorkloadKind, WorkloadSpec,
};

/// Four 2 MiB chunks: a lane of these kernels touches up to a few blocks at once, and with
/// whole-block windows (the `hetmem` preset) a device of two chunks would evict what a lane needs
/// before it can replay (see `RunConfig::warps_per_cu`).
const DEVICE: u64 = 8 << 20;

fn cfg(kind: WorkloadKind, factor: f64, mode: Mode, preset: Preset) -> RunConfig {
    let spec = WorkloadSpec {
        kind,
        bytes: (DEVICE as f64 * factor) as u64,
    };
    RunConfig {
        mode,
        compute_units: 2,
        link: LinkPreset::Pcie3X16,
        ..RunConfig::new(spec, DEVICE, preset)
    }
}

/// The memory system's work charged to the device clock, all causes.
fn charged(r: &RunReport) -> u64 {
    r.by_cause.iter().map(|(_, ns)| ns).sum()
}

fn every_mode(kind: WorkloadKind) {
    for factor in [0.5, 2.0] {
        let base = run(&cfg(kind, factor, Mode::Explicit, Preset::UvmDefault), None)
            .unwrap_or_else(|e| panic!("{kind} explicit {factor}x: {e}"))
            .report;
        assert_eq!(
            base.faults, 0,
            "{kind} {factor}x: explicit copies fault: {base:?}"
        );
        assert!(base.migrations.get("prefetch").0 > 0, "{base:?}");
        assert_eq!(base.migrations.get("device_fault"), (0, 0), "{base:?}");
        // Explicit copies are synchronous and nothing runs in the background: copies and
        // compute take their turns on the timeline.
        assert_eq!(base.overlap_ns, 0, "{base:?}");
        assert_eq!(
            base.modelled_ns,
            charged(&base) + base.compute_ns,
            "{base:?}"
        );
        for preset in Preset::ALL {
            let r = run(&cfg(kind, factor, Mode::Managed, preset), None)
                .unwrap_or_else(|e| panic!("{kind} {preset} {factor}x: {e}"))
                .report;
            assert_eq!(r.output_words, base.output_words);
            assert!(r.faults > 0, "{kind} {preset} {factor}x: no faults: {r:?}");
            // Compute overlaps only the memory system's background work (readahead,
            // access-counter migrations), which UVM's defaults and pure demand paging have none
            // of; the timeline never ends before the compute, nor after everything in a row.
            assert!(
                r.overlap_ns <= r.compute_ns && r.compute_ns <= r.modelled_ns,
                "{r:?}"
            );
            assert!(
                r.modelled_ns + r.overlap_ns <= charged(&r) + r.compute_ns,
                "{r:?}"
            );
            let pc = r.preset_config;
            if !pc.stream && pc.access_counter_threshold.is_none() {
                assert_eq!(r.overlap_ns, 0, "{kind} {preset} {factor}x: {r:?}");
            }
            if factor > 1.0 {
                // What does not fit leaves device memory, or (spilling) never enters it.
                let spilled = r.preset_config.spill_remote && r.pages_spilled > 0;
                assert!(
                    r.evictions > 0 || spilled,
                    "{kind} {preset} {factor}x: {r:?}"
                );
            }
        }
    }
    let cpu = run(&cfg(kind, 0.5, Mode::Cpu, Preset::None), None)
        .unwrap()
        .report;
    assert!(cpu.output_words > 0);
}

#[test]
fn stream_equals_the_cpu_result_everywhere() {
    every_mode(WorkloadKind::Stream);
}
#[test]
fn conv2d_equals_the_cpu_result_everywhere() {
    every_mode(WorkloadKind::Conv2d);
}
#[test]
fn gemm_equals_the_cpu_result_everywhere() {
    every_mode(WorkloadKind::Gemm);
}
#[test]
fn atax_equals_the_cpu_result_everywhere() {
    every_mode(WorkloadKind::Atax);
}
#[test]
fn random_equals_the_cpu_result_everywhere() {
    every_mode(WorkloadKind::Random);
}
#[test]
fn bfs_equals_the_cpu_result_everywhere() {
    every_mode(WorkloadKind::Bfs);
}
#[test]
fn kvcache_equals_the_cpu_result_everywhere() {
    every_mode(WorkloadKind::Kvcache);
}

#[test]
fn contexts_side_by_side_keep_to_their_own_pages() {
    // Contexts share the process's address space, and their allocations interleave: explicit
    // copies must not fault however managed runs beside them place their pages (whole-block
    // windows once took a neighbour context's pages; see the runtime's
    // `a_device_fault_window_never_takes_another_contexts_pages`).
    std::thread::scope(|s| {
        let runs: Vec<_> = [WorkloadKind::Stream, WorkloadKind::Gemm, WorkloadKind::Atax]
            .into_iter()
            .flat_map(|kind| {
                [
                    cfg(kind, 0.5, Mode::Explicit, Preset::UvmDefault),
                    cfg(kind, 2.0, Mode::Managed, Preset::Hetmem),
                ]
            })
            .map(|c| s.spawn(move || (c.mode, run(&c, None))))
            .collect();
        for h in runs {
            let (mode, r) = h.join().unwrap();
            let r = r.unwrap().report;
            if mode == Mode::Explicit {
                assert_eq!(r.faults, 0, "{r:?}");
                assert_eq!(r.migrations.get("device_fault"), (0, 0), "{r:?}");
            }
        }
    });
}

#[test]
fn a_footprint_is_the_managed_memory_a_run_allocates() {
    // Sizing by footprint is what keeps a run at `1x` within device memory: it must count what
    // the allocations take, partial pages included.
    for kind in WorkloadKind::ALL {
        let mut allocated = 0;
        let mut see = |s: &hetmem_workloads::exec::Step<'_>| {
            allocated = s.allocs.iter().map(|(_, r)| r.npages() * 4096).sum::<u64>();
        };
        let r = run(
            &cfg(kind, 0.5, Mode::Explicit, Preset::UvmDefault),
            Some(&mut see),
        )
        .unwrap()
        .report;
        assert_eq!(allocated, r.footprint, "{kind}");
        assert!(r.footprint <= DEVICE / 2, "{kind}: {}", r.footprint);
    }
}
