//! The bench matrix: workloads × presets × oversubscription factors, each managed run against
//! the explicit-copy run of the same workload on the same link model (`hetmem bench --matrix`).
//! Every run's result is checked against the CPU's, as in any run.

use std::fmt::Write as _;
use std::time::Duration;

use hetmem_core::link::LinkPreset;
use serde::Serialize;

use crate::preset::{Mode, Preset};
use crate::run::{run_workload, RunConfig};
use crate::workload::{WorkloadKind, WorkloadSpec};
use crate::WorkloadError;

/// What the matrix covers.
#[derive(Clone, Debug, PartialEq)]
pub struct MatrixConfig {
    /// Workloads.
    pub workloads: Vec<WorkloadKind>,
    /// Presets.
    pub presets: Vec<Preset>,
    /// Footprints, as multiples of device memory.
    pub factors: Vec<f64>,
    /// Device memory, bytes.
    pub device_memory: u64,
    /// Link model.
    pub link: LinkPreset,
    /// Compute units.
    pub compute_units: usize,
    /// Warps resident on each compute unit.
    pub warps_per_cu: usize,
}

impl Default for MatrixConfig {
    fn default() -> Self {
        MatrixConfig {
            workloads: WorkloadKind::ALL.to_vec(),
            presets: Preset::ALL.to_vec(),
            factors: vec![0.5, 1.0, 2.0],
            device_memory: 32 << 20,
            link: LinkPreset::Pcie3X16,
            compute_units: 4,
            warps_per_cu: crate::run::DEFAULT_WARPS_PER_CU,
        }
    }
}

/// One run of the matrix.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cell {
    /// Workload.
    pub workload: WorkloadKind,
    /// Oversubscription factor asked for.
    pub factor: f64,
    /// Footprint, bytes.
    pub footprint: u64,
    /// `explicit` or the preset's name.
    pub run: String,
    /// Modelled time, end to end, ns.
    pub modelled_ns: u64,
    /// Modelled time to the end of the last launch, ns.
    pub kernels_ns: u64,
    /// End to end over the explicit-copy run's.
    pub slowdown: f64,
    /// To the last launch's end over the explicit-copy run's.
    pub kernels_slowdown: f64,
    /// Device faults.
    pub faults: u64,
    /// Fault batches.
    pub batches: u64,
    /// Chunks evicted.
    pub evictions: u64,
    /// Wall-clock time, ms.
    pub wall_ms: f64,
}

/// Runs the matrix; `progress` hears about each run before it starts, `done` gets each cell as
/// it is measured.
pub fn run_matrix(
    m: &MatrixConfig,
    progress: &mut dyn FnMut(&str),
    done: &mut dyn FnMut(&Cell),
) -> Result<Vec<Cell>, WorkloadError> {
    let mut cells = Vec::new();
    for &kind in &m.workloads {
        for &factor in &m.factors {
            let bytes = (m.device_memory as f64 * factor) as u64;
            let w = kind.build(bytes)?;
            let base_cfg = RunConfig {
                link: m.link,
                compute_units: m.compute_units,
                warps_per_cu: m.warps_per_cu,
                sample_every: Duration::ZERO,
                mode: Mode::Explicit,
                ..RunConfig::new(
                    WorkloadSpec { kind, bytes },
                    m.device_memory,
                    Preset::UvmDefault,
                )
            };
            progress(&format!("{kind} {factor}x explicit"));
            let base = run_workload(&*w, &base_cfg, None)?.report;
            let cell = |run: String, r: &crate::RunReport| Cell {
                workload: kind,
                factor,
                footprint: r.footprint,
                run,
                modelled_ns: r.modelled_ns,
                kernels_ns: r.kernels_modelled_ns,
                slowdown: r.modelled_ns as f64 / base.modelled_ns.max(1) as f64,
                kernels_slowdown: r.kernels_modelled_ns as f64
                    / base.kernels_modelled_ns.max(1) as f64,
                faults: r.faults,
                batches: r.batches,
                evictions: r.evictions,
                wall_ms: r.wall_ns as f64 / 1e6,
            };
            let c = cell("explicit".into(), &base);
            done(&c);
            cells.push(c);
            for &preset in &m.presets {
                progress(&format!("{kind} {factor}x {preset}"));
                let cfg = RunConfig {
                    mode: Mode::Managed,
                    preset,
                    ..base_cfg
                };
                let r = run_workload(&*w, &cfg, None)?.report;
                let c = cell(preset.name().into(), &r);
                done(&c);
                cells.push(c);
            }
        }
    }
    Ok(cells)
}

/// The CSV header.
pub const CSV_HEADER: &str = "workload,factor,footprint_bytes,run,modelled_ms,kernels_ms,slowdown,kernels_slowdown,faults,batches,evictions,wall_ms";

/// One cell as a CSV line (no newline).
pub fn csv_line(c: &Cell) -> String {
    format!(
        "{},{},{},{},{:.4},{:.4},{:.4},{:.4},{},{},{},{:.1}",
        c.workload,
        c.factor,
        c.footprint,
        c.run,
        c.modelled_ns as f64 / 1e6,
        c.kernels_ns as f64 / 1e6,
        c.slowdown,
        c.kernels_slowdown,
        c.faults,
        c.batches,
        c.evictions,
        c.wall_ms
    )
}

/// The cells as CSV, one line per run.
pub fn csv(cells: &[Cell]) -> String {
    let mut s = format!("{CSV_HEADER}\n");
    for c in cells {
        let _ = writeln!(s, "{}", csv_line(c));
    }
    s
}

fn geomean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp()
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// The slowdowns as a Markdown table: a row per workload and factor, a column per preset, each
/// cell "end to end (to the last launch's end)"; then the mean and geometric mean per factor.
pub fn table(m: &MatrixConfig, cells: &[Cell]) -> String {
    let mut s = String::new();
    let _ = write!(s, "| workload | footprint | explicit (ms) |");
    for p in &m.presets {
        let _ = write!(s, " {p} |");
    }
    s.push('\n');
    s.push_str("|---|---|---|");
    for _ in &m.presets {
        s.push_str("---|");
    }
    s.push('\n');
    let find = |k: WorkloadKind, f: f64, run: &str| {
        cells
            .iter()
            .find(|c| c.workload == k && c.factor == f && c.run == run)
    };
    for &f in &m.factors {
        for &k in &m.workloads {
            let Some(base) = find(k, f, "explicit") else {
                continue;
            };
            let _ = write!(
                s,
                "| {k} | {f}x ({:.0} MiB) | {:.2} |",
                base.footprint as f64 / 1048576.0,
                base.modelled_ns as f64 / 1e6
            );
            for p in &m.presets {
                match find(k, f, p.name()) {
                    Some(c) => {
                        let _ = write!(s, " {:.2}x ({:.2}x) |", c.slowdown, c.kernels_slowdown);
                    }
                    None => s.push_str(" - |"),
                }
            }
            s.push('\n');
        }
        for (name, agg) in [("mean", mean as fn(&[f64]) -> f64), ("geomean", geomean)] {
            let _ = write!(s, "| **{name}** | {f}x | |");
            for p in &m.presets {
                let e2e: Vec<f64> = cells
                    .iter()
                    .filter(|c| c.factor == f && c.run == p.name())
                    .map(|c| c.slowdown)
                    .collect();
                let ker: Vec<f64> = cells
                    .iter()
                    .filter(|c| c.factor == f && c.run == p.name())
                    .map(|c| c.kernels_slowdown)
                    .collect();
                let _ = write!(s, " **{:.2}x ({:.2}x)** |", agg(&e2e), agg(&ker));
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(k: WorkloadKind, run: &str, slowdown: f64) -> Cell {
        Cell {
            workload: k,
            factor: 1.0,
            footprint: 1 << 20,
            run: run.into(),
            modelled_ns: 1_000_000,
            kernels_ns: 500_000,
            slowdown,
            kernels_slowdown: slowdown,
            faults: 1,
            batches: 1,
            evictions: 0,
            wall_ms: 1.0,
        }
    }

    #[test]
    fn the_table_and_csv_hold_every_run_and_the_means() {
        let m = MatrixConfig {
            workloads: vec![WorkloadKind::Stream, WorkloadKind::Gemm],
            presets: vec![Preset::UvmDefault],
            factors: vec![1.0],
            ..MatrixConfig::default()
        };
        let cells = vec![
            cell(WorkloadKind::Stream, "explicit", 1.0),
            cell(WorkloadKind::Stream, "uvm-default", 2.0),
            cell(WorkloadKind::Gemm, "explicit", 1.0),
            cell(WorkloadKind::Gemm, "uvm-default", 8.0),
        ];
        let t = table(&m, &cells);
        assert!(
            t.contains("| stream | 1x (1 MiB) | 1.00 | 2.00x (2.00x) |"),
            "{t}"
        );
        assert!(t.contains("**mean** | 1x | | **5.00x (5.00x)**"), "{t}");
        assert!(t.contains("**geomean** | 1x | | **4.00x (4.00x)**"), "{t}");
        let c = csv(&cells);
        assert_eq!(c.lines().count(), 5);
        assert!(c
            .lines()
            .nth(2)
            .unwrap()
            .starts_with("stream,1,1048576,uvm-default,1.0000,0.5000,2.0000"));
    }
}
