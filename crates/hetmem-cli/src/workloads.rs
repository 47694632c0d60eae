//! `hetmem run`, `hetmem inspect` and `hetmem bench --matrix`: the workloads of
//! hetmem-workloads on the simulated device, with reports, traces, plots and range dumps.

use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use hetmem_core::{fault_ring::ReplayPolicy, link::LinkPreset};
use hetmem_workloads::{
    exec::Step, run::RunConfig, workload::Size, Advise, Mode, Preset, WorkloadKind, WorkloadSpec,
};
use indicatif::{ProgressBar, ProgressStyle};

/// What a run is: shared by `run` and `inspect`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// stream, conv2d, gemm, atax, random, bfs or kvcache.
    pub workload: String,
    /// Managed memory the workload uses: bytes (`64MiB`, `512k`) or a multiple of device memory
    /// (`0.5x`, `2x`: the oversubscription factor).
    #[arg(long, default_value = "0.5x")]
    pub size: String,
    /// Device memory (whole 2 MiB chunks).
    #[arg(long, default_value = "64MiB")]
    pub device_memory: String,
    /// Link model: pcie3, pcie4, pcie5, nvlink-c2c or off.
    #[arg(long, default_value = "pcie3")]
    pub link: String,
    /// Policy preset: uvm-default, none or hetmem.
    #[arg(long, default_value = "uvm-default")]
    pub preset: String,
    /// managed (faults under the preset), explicit (copies, no faults) or cpu.
    #[arg(long, default_value = "managed")]
    pub mode: String,
    /// Advice for managed runs: none, prefetch (cudaMemPrefetchAsync where copies would go) or
    /// read-mostly (inputs).
    #[arg(long, default_value = "none")]
    pub advice: String,
    /// Compute units of the simulated device.
    #[arg(long, default_value_t = 4)]
    pub compute_units: usize,
    /// Warps resident on each compute unit (how many are in flight, so how full fault batches
    /// get); default: the workloads' default.
    #[arg(long)]
    pub warps_per_cu: Option<usize>,
    /// Tuning: override the preset's fault migration window (bytes, 4k to 2M).
    #[arg(long)]
    pub granularity: Option<String>,
    /// Tuning: override the preset's tree prefetcher threshold (percent; 0 turns it off).
    #[arg(long)]
    pub tree: Option<u32>,
    /// Tuning: override the preset's stream detector (on/off).
    #[arg(long)]
    pub stream: Option<bool>,
    /// Tuning: override how far ahead the stream detector reaches (pages).
    #[arg(long)]
    pub stream_depth: Option<u64>,
    /// Tuning: override how many advancing faults confirm a stream before it reads ahead.
    #[arg(long)]
    pub stream_confirm: Option<u32>,
    /// Tuning: override the preset's eviction order (true: allocation order).
    #[arg(long)]
    pub allocation_order: Option<bool>,
    /// Tuning: override the preset's thrashing detection (on/off).
    #[arg(long)]
    pub thrashing: Option<bool>,
    /// Tuning: override the window a CPU fault brings back (bytes, 4k to 2M).
    #[arg(long)]
    pub cpu_window: Option<String>,
    /// Tuning: the most a CPU fault continuing a walk brings back (bytes, 4k to 64M; `off`).
    #[arg(long)]
    pub cpu_readahead: Option<String>,
    /// Tuning: the window of a fault once device memory is full (bytes; `off`).
    #[arg(long)]
    pub pressure_window: Option<String>,
    /// Tuning: once device memory is full, keep the working set and map the rest remotely
    /// (on/off).
    #[arg(long)]
    pub spill_remote: Option<bool>,
    /// Tuning: access counters, migrating a 64 KiB region after this many remote accesses
    /// (0 turns them off).
    #[arg(long)]
    pub access_counters: Option<u32>,
    /// Tuning: override the preset's batch size.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tuning: override when replays are issued (UVM's `uvm_perf_fault_replay_policy`):
    /// block, batch, batch-flush or once.
    #[arg(long)]
    pub replay: Option<String>,
}

impl RunArgs {
    pub fn config(&self) -> Result<RunConfig> {
        let kind: WorkloadKind = self.workload.parse()?;
        let device: Size = self.device_memory.parse()?;
        let device_memory = match device {
            Size::Bytes(b) => b,
            Size::Factor(_) => anyhow::bail!("--device-memory takes bytes, not a factor"),
        };
        let bytes = self.size.parse::<Size>()?.bytes(device_memory);
        let link: LinkPreset = self
            .link
            .parse()
            .map_err(|e| anyhow::anyhow!("--link: {e}"))?;
        let preset = self.preset.parse::<Preset>()?;
        let mut t = preset.config();
        if let Some(g) = &self.granularity {
            t.granularity = match g.parse::<Size>()? {
                Size::Bytes(b) => b,
                Size::Factor(_) => anyhow::bail!("--granularity takes bytes"),
            };
        }
        if let Some(p) = self.tree {
            t.tree_threshold = (p > 0).then_some(p);
        }
        if let Some(s) = self.stream {
            t.stream = s;
        }
        if let Some(d) = self.stream_depth {
            t.stream_max_depth_pages = d;
        }
        if let Some(c) = self.stream_confirm {
            t.stream_confirm = c;
        }
        if let Some(a) = self.allocation_order {
            t.allocation_order_eviction = a;
        }
        if let Some(a) = self.thrashing {
            t.thrashing = a;
        }
        if let Some(a) = self.spill_remote {
            t.spill_remote = a;
        }
        if let Some(a) = self.access_counters {
            t.access_counter_threshold = (a > 0).then_some(a);
        }
        if let Some(g) = &self.cpu_window {
            t.cpu_window = match g.parse::<Size>()? {
                Size::Bytes(b) => b,
                Size::Factor(_) => anyhow::bail!("--cpu-window takes bytes"),
            };
        }
        if let Some(g) = &self.cpu_readahead {
            t.cpu_readahead = bytes_or_off("--cpu-readahead", g)?;
        }
        if let Some(g) = &self.pressure_window {
            t.pressure_window = bytes_or_off("--pressure-window", g)?;
        }
        if let Some(b) = self.batch {
            t.batch_size = b;
        }
        if let Some(r) = &self.replay {
            t.replay = r.parse::<ReplayPolicy>().context("--replay")?;
        }
        Ok(RunConfig {
            tuning: (t != preset.config()).then_some(t),
            link,
            mode: self.mode.parse::<Mode>()?,
            advise: self.advice.parse::<Advise>()?,
            compute_units: self.compute_units,
            warps_per_cu: self
                .warps_per_cu
                .unwrap_or(hetmem_workloads::run::DEFAULT_WARPS_PER_CU),
            ..RunConfig::new(WorkloadSpec { kind, bytes }, device_memory, preset)
        })
    }
}

/// A tuning flag's value: bytes, or `off`.
fn bytes_or_off(flag: &str, value: &str) -> Result<Option<u64>> {
    match value {
        "off" => Ok(None),
        v => match v.parse::<Size>()? {
            Size::Bytes(b) => Ok(Some(b)),
            Size::Factor(_) => anyhow::bail!("{flag} takes bytes or `off`"),
        },
    }
}

/// Options of `hetmem run`.
#[derive(Args, Debug, Clone)]
pub struct RunOpts {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write Chrome trace events (open in Perfetto or chrome://tracing).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<std::path::PathBuf>,
    /// Write an SVG of residency and migrations over time.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
    /// Skip the explicit-copy baseline (no slowdown in the report).
    #[arg(long)]
    pub no_baseline: bool,
}

fn progress(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} launches {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

pub fn run_cmd(o: &RunOpts, collector: Option<&hetmem_workloads::trace::Collector>) -> Result<()> {
    let cfg = o.run.config()?;
    let w = cfg.spec.kind.build(cfg.spec.bytes)?;
    let pb = progress(w.launches());
    pb.set_message(format!("{} {}", cfg.spec.kind, w.shape()));
    let mut obs = |s: &Step<'_>| {
        pb.set_position(s.index);
        pb.set_message(s.kernel);
    };
    let mut out = hetmem_workloads::run::run(&cfg, Some(&mut obs))?;
    // The trace holds this run only, not the baseline's.
    let events = collector.map(|c| c.take()).unwrap_or_default();
    if !o.no_baseline && cfg.mode == Mode::Managed {
        pb.set_message("explicit-copy baseline");
        let base = hetmem_workloads::run::run(
            &RunConfig {
                mode: Mode::Explicit,
                advise: Advise::None,
                sample_every: Duration::ZERO,
                ..cfg
            },
            None,
        )?;
        out.report
            .set_baseline(base.report.modelled_ns, base.report.kernels_modelled_ns);
    }
    pb.finish_and_clear();
    if o.json {
        println!("{}", serde_json::to_string_pretty(&out.report)?);
    } else {
        print!("{}", out.report.table());
    }
    if let (Some(path), Some(c)) = (&o.trace, collector) {
        hetmem_workloads::trace::write_chrome(path, c, &events, &out.samples, out.started)?;
        eprintln!(
            "trace: {} ({} events, {} residency samples)",
            path.display(),
            events.len(),
            out.samples.len()
        );
    }
    if let Some(path) = &o.plot {
        let svg = hetmem_workloads::plot::svg(&out.report, &out.samples);
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

/// Options of `hetmem inspect`.
#[derive(Args, Debug, Clone)]
pub struct InspectOpts {
    #[command(flatten)]
    pub run: RunArgs,
    /// Dump the ranges after this launch (1-based) instead of at the end.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub at: Option<u64>,
    /// Residency runs shown per range.
    #[arg(long, default_value_t = 8)]
    pub runs: usize,
    /// Print the ranges as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn inspect_cmd(o: &InspectOpts) -> Result<()> {
    let cfg = o.run.config()?;
    anyhow::ensure!(
        cfg.mode != Mode::Cpu,
        "a CPU-only run has no ranges to inspect"
    );
    let mut dumps: Vec<(u64, &'static str, Vec<hetmem_workloads::inspect::RangeInfo>)> = Vec::new();
    let mut err = None;
    let mut obs = |s: &Step<'_>| {
        if o.at.is_none_or(|a| a == s.index) {
            match hetmem_workloads::inspect::ranges(s.ctx, s.allocs) {
                Ok(r) => {
                    if o.at.is_some() {
                        dumps.push((s.index, s.kernel, r));
                    } else {
                        dumps.clear();
                        dumps.push((s.index, s.kernel, r));
                    }
                }
                Err(e) => err = Some(e),
            }
        }
    };
    let out = hetmem_workloads::run::run(&cfg, Some(&mut obs))?;
    if let Some(e) = err {
        return Err(e.into());
    }
    let Some((index, kernel, ranges)) = dumps.pop() else {
        match o.at {
            Some(at) => anyhow::bail!(
                "the run made {} launches: there is no launch {at} to inspect after",
                out.report.launches
            ),
            None => anyhow::bail!("the run made no launch to inspect after"),
        }
    };
    if o.json {
        println!("{}", serde_json::to_string_pretty(&ranges)?);
    } else {
        println!(
            "{} ({}) under {}: ranges after launch {index} ({kernel}) of {}",
            out.report.workload, out.report.shape, out.report.preset, out.report.launches
        );
        print!("{}", hetmem_workloads::inspect::render(&ranges, o.runs));
    }
    Ok(())
}

/// Options of `hetmem bench --matrix`.
#[derive(Args, Debug, Clone)]
pub struct MatrixOpts {
    /// Workloads (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Presets (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    pub presets: Vec<String>,
    /// Oversubscription factors (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2")]
    pub factors: Vec<f64>,
    /// Device memory of every run.
    #[arg(long, default_value = "32MiB")]
    pub matrix_device_memory: String,
    /// Link model.
    #[arg(long, default_value = "pcie3")]
    pub matrix_link: String,
    /// Compute units.
    #[arg(long, default_value_t = 4)]
    pub matrix_compute_units: usize,
    /// Warps resident on each compute unit; default: the workloads' default.
    #[arg(long)]
    pub matrix_warps_per_cu: Option<usize>,
    /// Where to write the CSV.
    #[arg(long, default_value = "bench-matrix.csv")]
    pub csv: std::path::PathBuf,
}

pub fn matrix_cmd(o: &MatrixOpts) -> Result<()> {
    use hetmem_workloads::bench::{run_matrix, table, MatrixConfig};
    let d = MatrixConfig::default();
    let device_memory = match o.matrix_device_memory.parse::<Size>()? {
        Size::Bytes(b) => b,
        Size::Factor(_) => anyhow::bail!("--matrix-device-memory takes bytes"),
    };
    let m = MatrixConfig {
        workloads: if o.workloads.is_empty() {
            d.workloads
        } else {
            o.workloads
                .iter()
                .map(|w| w.parse())
                .collect::<Result<_, _>>()?
        },
        presets: if o.presets.is_empty() {
            d.presets
        } else {
            o.presets
                .iter()
                .map(|p| p.parse())
                .collect::<Result<_, _>>()?
        },
        factors: o.factors.clone(),
        device_memory,
        link: o
            .matrix_link
            .parse()
            .map_err(|e| anyhow::anyhow!("--matrix-link: {e}"))?,
        compute_units: o.matrix_compute_units,
        warps_per_cu: o.matrix_warps_per_cu.unwrap_or(d.warps_per_cu),
    };
    let total = (m.workloads.len() * m.factors.len() * (m.presets.len() + 1)) as u64;
    let pb = progress(total);
    let t = std::time::Instant::now();
    // Each cell goes to the CSV (and to stderr) as soon as it is measured: a long matrix
    // interrupted keeps what it measured.
    let mut file =
        std::fs::File::create(&o.csv).with_context(|| format!("creating {}", o.csv.display()))?;
    use std::io::Write as _;
    writeln!(file, "{}", hetmem_workloads::bench::CSV_HEADER)?;
    let mut write_err = None;
    let cells = run_matrix(
        &m,
        &mut |what| {
            pb.set_message(what.to_owned());
            pb.inc(1);
        },
        &mut |c| {
            let line = hetmem_workloads::bench::csv_line(c);
            if pb.is_hidden() {
                eprintln!("{line}");
            }
            if let Err(e) = writeln!(file, "{line}") {
                write_err = Some(e);
            }
        },
    )?;
    pb.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e).with_context(|| format!("writing {}", o.csv.display()));
    }
    println!(
        "hetmem bench --matrix: {} MiB device, link {}, {} compute units of {} warps; slowdown against explicit copies on the same link model, end to end (to the last launch's end); every result checked against the CPU; {:.0} s",
        device_memory >> 20,
        m.link,
        m.compute_units,
        m.warps_per_cu,
        t.elapsed().as_secs_f64()
    );
    print!("{}", table(&m, &cells));
    println!("csv: {}", o.csv.display());
    Ok(())
}
