//! One run of a workload: a fresh context with the preset's settings and one simulated device,
//! the workload driven through an [`Exec`], a sampler thread recording residency and migrations
//! over time, the result checked against the CPU's, and the counters turned into a
//! [`RunReport`]. [`run_with_baseline`] adds the explicit-copy run on the same link model and
//! the slowdown against it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hetmem_core::{
    link::{Cause, ClockReport, LinkPreset},
    migrate::Trigger,
    HUGE_PAGE_SIZE,
};
use hetmem_runtime::Context;
use hetmem_sim::accel::AccelConfig;
use serde::Serialize;

use crate::exec::{Exec, Observer};
use crate::model::DeviceModel;
use crate::preset::{Advise, Mode, Preset, PresetConfig};
use crate::report::{Latency, Migrations, RunReport, TriggerPages};
use crate::workload::{check, Workload, WorkloadSpec};
use crate::WorkloadError;

/// Warps resident on a compute unit by default.
pub const DEFAULT_WARPS_PER_CU: usize = 8;

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunConfig {
    /// The workload and its size.
    pub spec: WorkloadSpec,
    /// Device memory in bytes (whole 2 MiB chunks).
    pub device_memory: u64,
    /// The link model.
    pub link: LinkPreset,
    /// Managed, explicit copies, or CPU only.
    pub mode: Mode,
    /// The policy preset (managed runs).
    pub preset: Preset,
    /// Advice (managed runs).
    pub advise: Advise,
    /// Compute units of the device.
    pub compute_units: usize,
    /// Warps resident on a compute unit at a time: with the compute units, how many lanes (and
    /// so how many pages) are in flight at once, and so how full fault batches get. Lanes
    /// resume where they missed, so any number makes progress however small device memory is.
    pub warps_per_cu: usize,
    /// The device's throughput, for the compute model.
    pub model: DeviceModel,
    /// How often the sampler records residency (zero: no sampling).
    pub sample_every: Duration,
    /// Settings that replace the preset's (tuning by measurement).
    pub tuning: Option<PresetConfig>,
}

impl RunConfig {
    /// `spec` under `preset`, managed, on PCIe 3 with `device_memory`, 4 compute units,
    /// sampling every millisecond.
    pub fn new(spec: WorkloadSpec, device_memory: u64, preset: Preset) -> Self {
        RunConfig {
            spec,
            device_memory,
            link: LinkPreset::Pcie3X16,
            mode: Mode::Managed,
            preset,
            advise: Advise::None,
            compute_units: 4,
            warps_per_cu: DEFAULT_WARPS_PER_CU,
            model: DeviceModel::default(),
            sample_every: Duration::from_millis(1),
            tuning: None,
        }
    }
}

impl RunConfig {
    /// The policy settings of the run: the tuning if given, else the preset's.
    pub fn settings(&self) -> PresetConfig {
        self.tuning.unwrap_or_else(|| self.preset.config())
    }
}

/// Residency and migrations at one moment of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Wall-clock time since the workload started, in microseconds.
    pub t_us: u64,
    /// Pages in device memory.
    pub resident_pages: u64,
    /// Pages migrated into device memory so far.
    pub pages_in: u64,
    /// Pages that left device memory so far.
    pub pages_out: u64,
    /// Device faults so far.
    pub faults: u64,
    /// The device clock's modelled time so far (the finished launches' compute included), in
    /// nanoseconds.
    pub modelled_ns: u64,
}

/// A run's report and what the sampler saw.
#[derive(Debug)]
pub struct RunOutcome {
    /// The report.
    pub report: RunReport,
    /// Samples, in time order (empty for CPU-only runs or without sampling).
    pub samples: Vec<Sample>,
    /// When the workload started (the samples' time zero).
    pub started: Instant,
}

/// Device memory for an explicit-copy run of `footprint` bytes: enough to hold it all, because
/// the baseline stages every input in once and every output out once, the least a chunked copy
/// pipeline can move (see README, "How to read a report").
pub fn explicit_memory(device_memory: u64, footprint: u64) -> u64 {
    let need = (footprint + footprint / 16 + 2 * HUGE_PAGE_SIZE).next_multiple_of(HUGE_PAGE_SIZE);
    device_memory.max(need)
}

fn sample(ctx: &Context, t0: Instant) -> Sample {
    let dev = ctx.devices()[0];
    let (Ok(s), Ok(d)) = (ctx.device_stats(dev), ctx.device(dev)) else {
        return Sample::default();
    };
    Sample {
        t_us: t0.elapsed().as_micros() as u64,
        resident_pages: s.pages_resident,
        pages_in: s.pages_from_system + s.pages_from_peers,
        pages_out: s.pages_out,
        faults: s.faults,
        modelled_ns: d.clock().elapsed.as_nanos(),
    }
}

/// Runs `cfg` once; `observer` sees every finished launch.
pub fn run(cfg: &RunConfig, observer: Option<Observer<'_>>) -> Result<RunOutcome, WorkloadError> {
    let w = cfg.spec.kind.build(cfg.spec.bytes)?;
    run_workload(&*w, cfg, observer)
}

/// Runs an already built workload.
pub fn run_workload(
    w: &dyn Workload,
    cfg: &RunConfig,
    observer: Option<Observer<'_>>,
) -> Result<RunOutcome, WorkloadError> {
    if cfg.device_memory < HUGE_PAGE_SIZE {
        return Err(WorkloadError::DeviceTooSmall {
            bytes: cfg.device_memory,
        });
    }
    if cfg.mode == Mode::Cpu {
        let t = Instant::now();
        let out = w.cpu();
        let wall = t.elapsed();
        let mut report = RunReport::empty(w, cfg, wall);
        report.output_words = out.len() as u64;
        return Ok(RunOutcome {
            report,
            samples: Vec::new(),
            started: t,
        });
    }
    let memory = match cfg.mode {
        Mode::Explicit => explicit_memory(cfg.device_memory, w.footprint()),
        _ => cfg.device_memory,
    };
    let accel = AccelConfig {
        memory_bytes: memory,
        compute_units: cfg.compute_units.max(1),
        warps_per_cu: cfg.warps_per_cu.max(1),
        tlb_entries: 2048,
        link: cfg.link.model(),
        ..AccelConfig::default()
    };
    let ctx = cfg.settings().builder(accel).build()?;
    let dev = ctx.devices()[0];
    let acc = ctx.device(dev)?;
    let (clock0, stats0, rt0, lat0) = (acc.clock(), acc.stats(), ctx.stats(), acc.fault_latency());
    let dev0 = ctx.device_stats(dev)?;
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let (result, samples, wall, (compute, at_last), launches) = std::thread::scope(|s| {
        let sampler = (!cfg.sample_every.is_zero()).then(|| {
            let (ctx, stop) = (&ctx, &stop);
            s.spawn(move || {
                let mut v = vec![sample(ctx, t0)];
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(cfg.sample_every);
                    v.push(sample(ctx, t0));
                }
                v
            })
        });
        let mut ex = match Exec::new(&ctx, cfg.mode, cfg.advise, cfg.model, observer) {
            Ok(ex) => ex,
            Err(e) => {
                stop.store(true, Ordering::Release);
                return (Err(e), Vec::new(), Duration::ZERO, Default::default(), 0);
            }
        };
        let result = w.run(&mut ex);
        let wall = t0.elapsed();
        stop.store(true, Ordering::Release);
        let mut samples = sampler
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        samples.push(sample(&ctx, t0));
        let times = (ex.compute(), ex.clock_at_last_launch());
        (result, samples, wall, times, ex.launches())
    });
    let output = result?;
    check(w.kind(), &output, &w.cpu())?;
    let clock = acc.clock().since(&clock0);
    let s = acc.stats();
    let rt = ctx.stats();
    let lat = acc.fault_latency().since(&lat0);
    let faults = (s.faults_read + s.faults_write + s.faults_atomic)
        - (stats0.faults_read + stats0.faults_write + stats0.faults_atomic);
    let batches = s.batches - stats0.batches;
    let batched = s.batched_faults - stats0.batched_faults;
    let d = |a: u64, b: u64| a.saturating_sub(b);
    let prefetcher = d(rt.pages_tree_prefetch, rt0.pages_tree_prefetch)
        + d(rt.pages_stream_prefetch, rt0.pages_stream_prefetch);
    let now = ctx.device_stats(dev)?.migrations;
    let migrations = Migrations {
        by_trigger: Trigger::ALL
            .iter()
            .map(|&t| {
                let (a, b) = (now.get(t), dev0.migrations.get(t));
                TriggerPages {
                    trigger: t.name().to_owned(),
                    to_device: d(a.from_system + a.from_peer, b.from_system + b.from_peer),
                    to_host: d(a.to_system + a.to_peer, b.to_system + b.to_peer),
                }
            })
            .filter(|t| t.to_device + t.to_host > 0)
            .collect(),
        prefetcher_pages: prefetcher,
    };
    let mut report = RunReport::empty(w, cfg, wall);
    report.device_memory = memory;
    report.output_words = output.len() as u64;
    report.launches = launches;
    // The launches placed their compute on the device's timeline (`Exec::launch`).
    report.modelled_ns = clock.elapsed.as_nanos();
    report.compute_ns = compute.as_nanos();
    report.overlap_ns = clock.overlap.as_nanos();
    report.kernels_modelled_ns = at_last
        .map_or(clock0.elapsed, |t| t)
        .saturating_sub(clock0.elapsed)
        .as_nanos();
    report.by_cause = by_cause(&clock);
    report.faults = faults;
    report.batches = batches;
    report.mean_batch = if batches == 0 {
        0.0
    } else {
        batched as f64 / batches as f64
    };
    report.duplicates = s.duplicates - stats0.duplicates;
    report.pages_mapped_remote = d(s.pages_mapped_remote, stats0.pages_mapped_remote);
    report.remote_accesses = d(s.remote_accesses, stats0.remote_accesses);
    report.migrations = migrations;
    report.pages_spilled = d(rt.pages_spilled, rt0.pages_spilled);
    report.counter_notifications = d(rt.counter_notifications, rt0.counter_notifications);
    report.evictions = d(rt.evictions, rt0.evictions);
    report.thrashing_detected = d(rt.thrashing_detected, rt0.thrashing_detected);
    report.pages_throttled = d(rt.pages_throttled, rt0.pages_throttled);
    report.cpu_throttles = d(rt.cpu_throttles, rt0.cpu_throttles);
    report.thrashing_pins = d(rt.thrashing_pins, rt0.thrashing_pins);
    report.launch_bounce_pins = d(rt.pages_launch_bounce_pins, rt0.pages_launch_bounce_pins);
    report.launch_restores = d(rt.pages_launch_restore, rt0.pages_launch_restore);
    report.launch_readbacks = d(rt.pages_launch_readback, rt0.pages_launch_readback);
    report.latency = Latency::from(&lat);
    report.cpu_faults = d(s.cpu_faults, stats0.cpu_faults);
    Ok(RunOutcome {
        report,
        samples,
        started: t0,
    })
}

fn by_cause(c: &ClockReport) -> Vec<(String, u64)> {
    Cause::ALL
        .iter()
        .filter(|&&k| !c.get(k).is_zero())
        .map(|&k| (k.name().to_owned(), c.get(k).as_nanos()))
        .collect()
}

/// Runs `cfg` and, for a managed run, the explicit-copy baseline of the same workload on the
/// same link model, and sets the report's slowdown against it.
pub fn run_with_baseline(
    cfg: &RunConfig,
    observer: Option<Observer<'_>>,
) -> Result<RunOutcome, WorkloadError> {
    let w = cfg.spec.kind.build(cfg.spec.bytes)?;
    let mut out = run_workload(&*w, cfg, observer)?;
    if cfg.mode == Mode::Managed {
        let base = run_workload(
            &*w,
            &RunConfig {
                mode: Mode::Explicit,
                advise: Advise::None,
                sample_every: Duration::ZERO,
                ..*cfg
            },
            None,
        )?;
        out.report
            .set_baseline(base.report.modelled_ns, base.report.kernels_modelled_ns);
    }
    Ok(out)
}
