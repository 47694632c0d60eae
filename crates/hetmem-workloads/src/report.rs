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

/// Pages migrated, by direction and trigger.
///
/// Derived from the runtime's and the device's counters: `to_device_fault` is what the fault
/// service migrated minus what the prefetchers added and what explicit prefetches moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Migrations {
    /// Into device memory: faulted pages and their migration windows.
    pub to_device_fault: u64,
    /// Into device memory: pages the tree prefetcher and stream detector added.
    pub to_device_prefetcher: u64,
    /// Into device memory: explicit prefetches (`cudaMemPrefetchAsync`, explicit copies).
    pub to_device_user_prefetch: u64,
    /// Access-counter notifications (regions pulled in).
    pub to_device_access_counters: u64,
    /// To system memory: CPU faults on device pages.
    pub to_host_cpu_fault: u64,
    /// To system memory: evictions.
    pub to_host_eviction: u64,
    /// To system memory: explicit prefetches.
    pub to_host_user_prefetch: u64,
    /// To system memory: suspend.
    pub to_host_suspend: u64,
}

impl Migrations {
    /// Pages into device memory, every trigger.
    pub fn pages_to_device(&self) -> u64 {
        self.to_device_fault + self.to_device_prefetcher + self.to_device_user_prefetch
    }
    /// Pages to system memory, every trigger.
    pub fn pages_to_host(&self) -> u64 {
        self.to_host_cpu_fault
            + self.to_host_eviction
            + self.to_host_user_prefetch
            + self.to_host_suspend
    }
    /// Bytes into device memory.
    pub fn bytes_to_device(&self) -> u64 {
        self.pages_to_device() * PAGE_SIZE
    }
    /// Bytes to system memory.
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
    /// Modelled time: the device clock's charges plus modelled compute.
    pub modelled_ns: u64,
    /// Of which the compute model's share.
    pub compute_ns: u64,
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
    /// Accesses over the link to remote pages.
    pub remote_accesses: u64,
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
    /// Thrashing pins.
    pub thrashing_pins: u64,
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
            migrations: Migrations::default(),
            cpu_faults: 0,
            evictions: 0,
            thrashing_detected: 0,
            pages_throttled: 0,
            thrashing_pins: 0,
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
                "{} (compute {}; to the last launch's end {})",
                ms(self.modelled_ns),
                ms(self.compute_ns),
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
        row(
            "to device",
            format!(
                "{} ({} pages): fault {}, prefetcher {}, prefetch {}",
                mib(m.bytes_to_device()),
                m.pages_to_device(),
                m.to_device_fault,
                m.to_device_prefetcher,
                m.to_device_user_prefetch
            ),
        );
        row(
            "to host",
            format!(
                "{} ({} pages): cpu faults {} ({} faults), eviction {}, prefetch {}",
                mib(m.bytes_to_host()),
                m.pages_to_host(),
                m.to_host_cpu_fault,
                self.cpu_faults,
                m.to_host_eviction,
                m.to_host_user_prefetch
            ),
        );
        row(
            "mapped remote",
            format!(
                "{} pages, {} remote accesses",
                self.pages_mapped_remote, self.remote_accesses
            ),
        );
        row("evictions", format!("{} chunks", self.evictions));
        row(
            "thrashing",
            format!(
                "{} pages detected, {} throttled, {} pins",
                self.thrashing_detected, self.pages_throttled, self.thrashing_pins
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
