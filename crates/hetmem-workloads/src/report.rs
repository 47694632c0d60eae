//! A run's report: the table `hetmem run` prints and the JSON `--json` writes (README, "How to
//! read a report").

use std::fmt::Write as _;
use std::time::Duration;

use hetmem_core::{link::LinkPreset, PAGE_SIZE};
use hetmem_sim::latency::FaultLatency;
use serde::Serialize;

use crate::preset::{Advise, Mode, Preset, PresetConfig};
use crate::run::RunConfig;
use crate::workload::{Workload, WorkloadKind};

/// Pages one trigger migrated (seed 003's triggers, as the runtime counts them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TriggerPages {
    /// `prefetch`, `device_fault`, `cpu_fault`, `eviction`, `suspend`, `access_counter`,
    /// `explicit`.
    pub trigger: String,
    /// Into device memory (from system memory or a peer).
    pub to_device: u64,
    /// Out of device memory (to system memory or a peer).
    pub to_host: u64,
}

/// Pages migrated, by direction and trigger (the device's `DeviceStats::migrations`, as the
/// migration engine committed them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Migrations {
    /// Each trigger that moved pages.
    pub by_trigger: Vec<TriggerPages>,
    /// Pages the tree prefetcher and the stream detector added to fault migrations (counted
    /// under `device_fault` or `prefetch` above).
    pub prefetcher_pages: u64,
}

impl Migrations {
    /// The pages of `trigger` (by its name), both ways.
    pub fn get(&self, trigger: &str) -> (u64, u64) {
        self.by_trigger
            .iter()
            .find(|t| t.trigger == trigger)
            .map_or((0, 0), |t| (t.to_device, t.to_host))
    }
    /// Pages into device memory, every trigger.
    pub fn pages_to_device(&self) -> u64 {
        self.by_trigger.iter().map(|t| t.to_device).sum()
    }
    /// Pages out of device memory, every trigger.
    pub fn pages_to_host(&self) -> u64 {
        self.by_trigger.iter().map(|t| t.to_host).sum()
    }
    /// Bytes into device memory.
    pub fn bytes_to_device(&self) -> u64 {
        self.pages_to_device() * PAGE_SIZE
    }
    /// Bytes out of device memory.
    pub fn bytes_to_host(&self) -> u64 {
        self.pages_to_host() * PAGE_SIZE
    }
}

/// Fault-service latency percentiles, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Faults measured.
    pub faults: u64,
    /// Wall-clock p50: from the fault's entry in the ring to the end of its batch.
    pub wall_p50_us: Option<f64>,
    /// Wall-clock p99.
    pub wall_p99_us: Option<f64>,
    /// Modelled p50: the modelled service time of the fault's batch.
    pub modelled_p50_us: Option<f64>,
    /// Modelled p99.
    pub modelled_p99_us: Option<f64>,
}

impl From<&FaultLatency> for Latency {
    fn from(l: &FaultLatency) -> Self {
        let us = |d: Option<Duration>| d.map(|d| d.as_nanos() as f64 / 1e3);
        Latency {
            faults: l.wall.count(),
            wall_p50_us: us(l.wall.quantile(0.5)),
            wall_p99_us: us(l.wall.quantile(0.99)),
            modelled_p50_us: us(l.modelled.quantile(0.5)),
            modelled_p99_us: us(l.modelled.quantile(0.99)),
        }
    }
}

/// What one run did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunReport {
    /// The workload.
    pub workload: WorkloadKind,
    /// Its shape.
    pub shape: String,
    /// Its managed memory, bytes.
    pub footprint: u64,
    /// Device memory of the run, bytes (explicit-copy runs get enough for the footprint).
    pub device_memory: u64,
    /// Device memory asked for, bytes.
    pub device_memory_asked: u64,
    /// Footprint over device memory asked for.
    pub oversubscription: f64,
    /// The link model.
    pub link: String,
    /// The mode.
    pub mode: Mode,
    /// The preset (meaningful for managed runs).
    pub preset: Preset,
    /// The preset's settings.
    pub preset_config: PresetConfig,
    /// Advice.
    pub advise: Advise,
    /// Words of output checked against the CPU result (all of them, always).
    pub output_words: u64,
    /// Launches.
    pub launches: u64,
    /// Wall-clock time of the run (data preparation, launches, reading results back).
    pub wall_ns: u64,
    /// Modelled time: the end of the device clock's timeline, the launches' modelled compute
    /// placed on it (`hetmem_core::link::DeviceClock::launch_computed`).
    pub modelled_ns: u64,
    /// The launches' modelled compute.
    pub compute_ns: u64,
    /// Of that compute, what ran beside background work of the memory system (readahead,
    /// access-counter migrations): how much less `modelled_ns` is than the memory system's
    /// work and the compute one after the other.
    pub overlap_ns: u64,
    /// Modelled time to the end of the last launch: the run without reading the results back
    /// (no CPU faults on outputs, no copy of outputs back).
    pub kernels_modelled_ns: u64,
    /// The device clock's charges by cause, nanoseconds.
    pub by_cause: Vec<(String, u64)>,
    /// The explicit-copy baseline's modelled time on the same link model, when it was run.
    pub baseline_modelled_ns: Option<u64>,
    /// Modelled time over the baseline's.
    pub slowdown: Option<f64>,
    /// The baseline's modelled time to the end of its last launch.
    pub baseline_kernels_ns: Option<u64>,
    /// Modelled time to the end of the last launch over the baseline's.
    pub kernels_slowdown: Option<f64>,
    /// Device faults (fault-buffer entries raised).
    pub faults: u64,
    /// Fault batches serviced.
    pub batches: u64,
    /// Faults per batch.
    pub mean_batch: f64,
    /// Faults merged with another of the same batch.
    pub duplicates: u64,
    /// Pages the device mapped remotely instead of migrating them.
    pub pages_mapped_remote: u64,
    /// Accesses over the link to remote pages (a warp's accesses to one 128-byte line count
    /// once).
    pub remote_accesses: u64,
    /// Faulted pages (and their windows) a full device mapped remotely instead of evicting its
    /// working set for them (the `spill_remote` policy).
    pub pages_spilled: u64,
    /// Access-counter notifications (regions whose remote accesses crossed the threshold).
    pub counter_notifications: u64,
    /// Pages migrated, by direction and trigger.
    pub migrations: Migrations,
    /// CPU faults on device pages.
    pub cpu_faults: u64,
    /// Chunks evicted.
    pub evictions: u64,
    /// Pages declared thrashing.
    pub thrashing_detected: u64,
    /// Faulted thrashing pages throttled (mapped where they were).
    pub pages_throttled: u64,
    /// CPU faults on thrashing pages that slept out a throttling period.
    pub cpu_throttles: u64,
    /// Thrashing pins.
    pub thrashing_pins: u64,
    /// Pages the CPU wrote between each of three launches in a row, mapped where they are at
    /// the next launch instead of restored (`restore_on_launch`).
    pub launch_bounce_pins: u64,
    /// Pages launches brought back into the device after CPU faults took them
    /// (`restore_on_launch`).
    pub launch_restores: u64,
    /// Pages launches' ends moved to system memory because the CPU took them back after the
    /// launches before (`readback_after_launch`).
    pub launch_readbacks: u64,
    /// Fault-service latency.
    pub latency: Latency,
}

impl RunReport {
    /// A report with the run's identity and nothing counted yet.
    pub fn empty(w: &dyn Workload, cfg: &RunConfig, wall: Duration) -> Self {
        RunReport {
            workload: w.kind(),
            shape: w.shape(),
            footprint: w.footprint(),
            device_memory: cfg.device_memory,
            device_memory_asked: cfg.device_memory,
            oversubscription: w.footprint() as f64 / cfg.device_memory as f64,
            link: link_name(cfg.link).into(),
            mode: cfg.mode,
            preset: cfg.preset,
            preset_config: cfg.settings(),
            advise: cfg.advise,
            output_words: 0,
            launches: 0,
            wall_ns: wall.as_nanos() as u64,
            modelled_ns: 0,
            compute_ns: 0,
            overlap_ns: 0,
            kernels_modelled_ns: 0,
            by_cause: Vec::new(),
            baseline_modelled_ns: None,
            slowdown: None,
            baseline_kernels_ns: None,
            kernels_slowdown: None,
            faults: 0,
            batches: 0,
            mean_batch: 0.0,
            duplicates: 0,
            pages_mapped_remote: 0,
            remote_accesses: 0,
            pages_spilled: 0,
            counter_notifications: 0,
            migrations: Migrations::default(),
            cpu_faults: 0,
            evictions: 0,
            thrashing_detected: 0,
            pages_throttled: 0,
            cpu_throttles: 0,
            thrashing_pins: 0,
            launch_bounce_pins: 0,
            launch_restores: 0,
            launch_readbacks: 0,
            latency: Latency::default(),
        }
    }

    /// Sets the baseline's modelled times (end to end, to the end of its last launch) and the
    /// slowdowns against them.
    pub fn set_baseline(&mut self, baseline_ns: u64, baseline_kernels_ns: u64) {
        self.baseline_modelled_ns = Some(baseline_ns);
        self.slowdown = (baseline_ns > 0).then(|| self.modelled_ns as f64 / baseline_ns as f64);
        self.baseline_kernels_ns = Some(baseline_kernels_ns);
        self.kernels_slowdown = (baseline_kernels_ns > 0)
            .then(|| self.kernels_modelled_ns as f64 / baseline_kernels_ns as f64);
    }

    /// The report as a two-column table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
        let ms = |ns: u64| format!("{:.3} ms", ns as f64 / 1e6);
        let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} us"));
        row(
            "workload",
            format!(
                "{} ({}), {}",
                self.workload,
                self.shape,
                mib(self.footprint)
            ),
        );
        row(
            "device memory",
            format!(
                "{} (footprint {:.2}x)",
                mib(self.device_memory_asked),
                self.oversubscription
            ),
        );
        let how = match self.mode {
            Mode::Managed => format!("managed, preset {}, advice {}", self.preset, self.advise),
            m => m.to_string(),
        };
        row("mode", how);
        row("link", self.link.clone());
        row(
            "result",
            format!("{} words equal the CPU result", self.output_words),
        );
        row("wall time", ms(self.wall_ns));
        if self.mode == Mode::Cpu {
            return render(&rows);
        }
        row("launches", self.launches.to_string());
        row(
            "modelled time",
            format!(
                "{} (compute {}, {} of it beside background work; to the last launch's end {})",
                ms(self.modelled_ns),
                ms(self.compute_ns),
                ms(self.overlap_ns),
                ms(self.kernels_modelled_ns)
            ),
        );
        let causes: Vec<String> = self
            .by_cause
            .iter()
            .map(|(c, ns)| format!("{c} {:.3}", *ns as f64 / 1e6))
            .collect();
        row("  by cause (ms)", causes.join(", "));
        match (self.baseline_modelled_ns, self.slowdown) {
            (Some(b), Some(s)) => row(
                "vs explicit copy",
                format!(
                    "{s:.2}x (baseline {}); to the last launch's end {}",
                    ms(b),
                    self.kernels_slowdown
                        .map_or("-".into(), |k| format!("{k:.2}x"))
                ),
            ),
            _ => row("vs explicit copy", "-".into()),
        }
        row("faults", self.faults.to_string());
        row(
            "batches",
            format!(
                "{} (mean {:.1} faults, {} duplicates)",
                self.batches, self.mean_batch, self.duplicates
            ),
        );
        let m = &self.migrations;
        let per = |dev: bool| -> String {
            m.by_trigger
                .iter()
                .map(|t| {
                    (
                        t.trigger.as_str(),
                        if dev { t.to_device } else { t.to_host },
                    )
                })
                .filter(|&(_, n)| n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        row(
            "to device",
            format!(
                "{} ({} pages): {} (prefetchers added {})",
                mib(m.bytes_to_device()),
                m.pages_to_device(),
                per(true),
                m.prefetcher_pages
            ),
        );
        row(
            "to host",
            format!(
                "{} ({} pages): {} ({} cpu faults)",
                mib(m.bytes_to_host()),
                m.pages_to_host(),
                per(false),
                self.cpu_faults
            ),
        );
        row(
            "mapped remote",
            format!(
                "{} pages, {} remote accesses; {} pages spilled, {} counter notifications",
                self.pages_mapped_remote,
                self.remote_accesses,
                self.pages_spilled,
                self.counter_notifications
            ),
        );
        row(
            "around launches",
            format!(
                "{} pages restored as launches began, {} read back as they ended",
                self.launch_restores, self.launch_readbacks
            ),
        );
        row("evictions", format!("{} chunks", self.evictions));
        row(
            "thrashing",
            format!(
                "{} pages detected, {} throttled ({} CPU faults), {} pins; {} pages bouncing \
                 between launches kept in system memory",
                self.thrashing_detected,
                self.pages_throttled,
                self.cpu_throttles,
                self.thrashing_pins,
                self.launch_bounce_pins
            ),
        );
        let l = &self.latency;
        row(
            "fault latency",
            format!(
                "modelled p50 {} p99 {}; wall p50 {} p99 {}",
                us(l.modelled_p50_us),
                us(l.modelled_p99_us),
                us(l.wall_p50_us),
                us(l.wall_p99_us)
            ),
        );
        render(&rows)
    }
}

/// A link preset's name.
pub fn link_name(l: LinkPreset) -> &'static str {
    l.name()
}

fn render(rows: &[(String, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = String::new();
    for (k, v) in rows {
        let _ = writeln!(s, "{k:<w$}  {v}");
    }
    s
}
