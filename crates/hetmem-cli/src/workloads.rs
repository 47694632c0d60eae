//! `hetmem run`, `hetmem inspect` and `hetmem bench --matrix`: the workloads of
//! hetmem-workloads on the simulated device, with reports, traces, plots and range dumps.

use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use hetmem_core::link::LinkPreset;
use hetmem_workloads::{
    exec::Step,
    run::{run_with_baseline, RunConfig},
    workload::Size,
    Advise, Mode, Preset, WorkloadKind, WorkloadSpec,
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
    /// Tuning: override the preset's fault migration window (bytes, 4k to 2M).
    #[arg(long)]
    pub granularity: Option<String>,
    /// Tuning: override the preset's tree prefetcher threshold (percent; 0 turns it off).
    #[arg(long)]
    pub tree: Option<u32>,
    /// Tuning: override the preset's stream detector (on/off).
    #[arg(long)]
    pub stream: Option<bool>,
    /// Tuning: override the preset's eviction order (true: allocation order).
    #[arg(long)]
    pub allocation_order: Option<bool>,
    /// Tuning: override the preset's thrashing detection (on/off).
    #[arg(long)]
    pub thrashing: Option<bool>,
    /// Tuning: override the preset's batch size.
    #[arg(long)]
    pub batch: Option<usize>,
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
        if let Some(a) = self.allocation_order {
            t.allocation_order_eviction = a;
        }
        if let Some(a) = self.thrashing {
            t.thrashing = a;
        }
        if let Some(b) = self.batch {
            t.batch_size = b;
        }
        Ok(RunConfig {
            tuning: (t != preset.config()).then_some(t),
            link,
            mode: self.mode.parse::<Mode>()?,
            advise: self.advice.parse::<Advise>()?,
            compute_units: self.compute_units,
            ..RunConfig::new(WorkloadSpec { kind, bytes }, device_memory, preset)
        })
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
    let out = if o.no_baseline || cfg.mode != Mode::Managed {
        hetmem_workloads::run::run(&cfg, Some(&mut obs))?
    } else {
        run_with_baseline(&cfg, Some(&mut obs))?
    };
    pb.finish_and_clear();
    if o.json {
        println!("{}", serde_json::to_string_pretty(&out.report)?);
    } else {
        print!("{}", out.report.table());
    }
    if let Some(path) = &o.trace {
        let c = collector.context("--trace without a collector")?;
        let n = hetmem_workloads::trace::write_chrome(path, c, &out.samples, out.started)?;
        eprintln!("trace: {} ({n} events)", path.display());
    }
    if let Some(path) = &o.plot {
        let svg = hetmem_workloads::plot::svg(&out.report, &out.samples);
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}
