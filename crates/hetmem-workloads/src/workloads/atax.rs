//! ATAX `y = Aᵀ(A·x)` (PolyBench, UVMSmart, ARIADNE) over an `m × 1024` matrix: a first kernel
//! walks rows (`tmp = A·x`, one lane per row), a second walks columns (`y = Aᵀ·tmp`, one lane per
//! column, each stepping down every row, hence every page of A, one after another: the pattern
//! that touches many 2 MiB blocks at once and thrashes under oversubscription).

use std::sync::Arc;

use hetmem_sim::accel::{Miss, Thread};

use super::{fill, read, too_small};
use crate::exec::Exec;
use crate::model::Work;
use crate::workload::{hash, load, store, Workload, WorkloadKind};
use crate::WorkloadError;

/// `A` is `m × COLS`.
#[derive(Debug)]
pub struct Atax {
    m: u64,
}

/// Columns (one 4 KiB page per row).
pub const COLS: u64 = 1024;
const SALT_X: u64 = 1 << 42;

fn x(j: u64) -> u32 {
    hash(j + SALT_X)
}

impl Atax {
    /// `A`, `x`, `tmp` and `y` in about `bytes`.
    pub fn new(bytes: u64) -> Result<Self, WorkloadError> {
        let m = bytes / (4 * COLS) / 32 * 32;
        if m == 0 {
            return Err(too_small(WorkloadKind::Atax, bytes, 32 * 4 * COLS));
        }
        Ok(Atax { m })
    }
}

impl Workload for Atax {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Atax
    }
    fn footprint(&self) -> u64 {
        4 * (self.m * COLS + 2 * COLS + self.m)
    }
    fn launches(&self) -> u64 {
        2
    }
    fn shape(&self) -> String {
        format!("{}x{}", self.m, COLS)
    }

    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError> {
        let (m, n) = (self.m, COLS);
        let mut a = ex.alloc("A", 4 * m * n)?;
        let mut xv = ex.alloc("x", 4 * n)?;
        let tmp = ex.alloc("tmp", 4 * m)?;
        let y = ex.alloc("y", 4 * n)?;
        fill(&mut a, hash);
        fill(&mut xv, x);
        ex.input(&a)?;
        ex.input(&xv)?;
        ex.on_device(&tmp)?;
        ex.on_device(&y)?;
        let (pa, px, pt, py) = (a.addr(), xv.addr(), tmp.addr(), y.addr());
        let rows = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let mut row = [0u32; COLS as usize];
            let mut xs = [0u32; COLS as usize];
            load(t, pa + 4 * i * n, &mut row)?;
            load(t, px, &mut xs)?;
            let s = row
                .iter()
                .zip(xs)
                .fold(0u32, |s, (&a, x)| s.wrapping_add(a.wrapping_mul(x)));
            store(t, pt + 4 * i, &[s])
        };
        let w = Work::new(4 * m * n, 2 * m * n);
        ex.launch("atax-rows", Arc::new(rows), m, w)?;
        let cols = move |j: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let mut ts = [0u32; 32];
            let mut s = 0u32;
            for i0 in (0..m).step_by(32) {
                load(t, pt + 4 * i0, &mut ts)?;
                for (di, &ti) in ts.iter().enumerate() {
                    let a = t.load_u32(pa + 4 * ((i0 + di as u64) * n + j))?;
                    s = s.wrapping_add(a.wrapping_mul(ti));
                }
            }
            store(t, py + 4 * j, &[s])
        };
        ex.launch("atax-cols", Arc::new(cols), n, w)?;
        ex.output(&y)?;
        Ok(read(&y, n as usize))
    }

    fn cpu(&self) -> Vec<u32> {
        let (m, n) = (self.m, COLS);
        let a = |i: u64, j: u64| hash(i * n + j);
        let tmp: Vec<u32> = (0..m)
            .map(|i| (0..n).fold(0u32, |s, j| s.wrapping_add(a(i, j).wrapping_mul(x(j)))))
            .collect();
        (0..n)
            .map(|j| {
                (0..m).fold(0u32, |s, i| {
                    s.wrapping_add(a(i, j).wrapping_mul(tmp[i as usize]))
                })
            })
            .collect()
    }
}
