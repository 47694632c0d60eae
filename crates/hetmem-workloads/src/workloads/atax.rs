//! ATAX `y = Aᵀ(A·x)` (PolyBench, UVMSmart, ARIADNE) over an `m × 1024` matrix: a first kernel
//! walks rows (`tmp = A·x`, one lane per row), a second walks columns (`Aᵀ·tmp`: each lane steps
//! down one column through 32 rows, one page per row, so a warp touches 32 pages at once
//! and the grid every page of A in column order: the pattern that spreads faults over many 2 MiB
//! blocks and thrashes under oversubscription), a third sums the column partials into `y`.
//!
//! The column walk is cut into blocks of 32 rows because a simulated lane that misses runs
//! again from its start (hetmem-sim's accel.rs): a lane walking a whole column would need all of
//! A resident at once to finish, which oversubscription forbids.

use std::sync::Arc;

use hetmem_sim::accel::{Miss, Thread};

use super::{fill, fit, read, too_small, whole_pages};
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
/// Rows of one column-walk lane.
pub const ROWS: u64 = 32;
const SALT_X: u64 = 1 << 42;

/// Managed memory of `A` with `m` rows, `x`, `tmp`, the partials and `y`.
fn footprint(m: u64) -> u64 {
    [
        4 * m * COLS,
        4 * COLS,
        4 * m,
        4 * COLS * (m / ROWS),
        4 * COLS,
    ]
    .into_iter()
    .map(whole_pages)
    .sum()
}

fn x(j: u64) -> u32 {
    hash(j + SALT_X)
}

impl Atax {
    /// `A`, `x`, `tmp`, the partials and `y` in at most `bytes`: per row, a row of `A`, a word
    /// of `tmp` and its share of the partials; `x` and `y` on top.
    pub fn new(bytes: u64) -> Result<Self, WorkloadError> {
        let per_row = 4 * (COLS + 1 + COLS / ROWS);
        let m = bytes.saturating_sub(4 * 2 * COLS) / per_row / ROWS * ROWS;
        let m = fit(m, ROWS, bytes, footprint);
        if m == 0 {
            return Err(too_small(
                WorkloadKind::Atax,
                bytes,
                ROWS * per_row + 4 * 2 * COLS,
            ));
        }
        Ok(Atax { m })
    }
}

impl Workload for Atax {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Atax
    }
    fn footprint(&self) -> u64 {
        footprint(self.m)
    }
    fn launches(&self) -> u64 {
        3
    }
    fn shape(&self) -> String {
        format!("{}x{}", self.m, COLS)
    }

    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError> {
        let (m, n) = (self.m, COLS);
        let mut a = ex.alloc("A", 4 * m * n)?;
        let mut xv = ex.alloc("x", 4 * n)?;
        let tmp = ex.alloc("tmp", 4 * m)?;
        let part = ex.alloc("partials", 4 * n * (m / ROWS))?;
        let y = ex.alloc("y", 4 * n)?;
        fill(&mut a, hash);
        fill(&mut xv, x);
        ex.input(&a)?;
        ex.input(&xv)?;
        ex.on_device(&tmp)?;
        ex.on_device(&part)?;
        ex.on_device(&y)?;
        let (pa, px, pt, pp, py) = (a.addr(), xv.addr(), tmp.addr(), part.addr(), y.addr());
        let rows = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let mut row = [0u32; COLS as usize];
            let mut xs = [0u32; COLS as usize];
            let ai = pa + 4 * i * n;
            t.issue_loads(&[(ai, 4 * n as usize), (px, 4 * n as usize)])?;
            load(t, ai, &mut row)?;
            load(t, px, &mut xs)?;
            let s = row
                .iter()
                .zip(xs)
                .fold(0u32, |s, (&a, x)| s.wrapping_add(a.wrapping_mul(x)));
            store(t, pt + 4 * i, &[s])
        };
        let w = Work::new(4 * m * n, 2 * m * n);
        ex.launch("atax-rows", Arc::new(rows), m, w)?;
        let blocks = m / ROWS;
        let cols = move |l: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let (ib, j) = (l / n, l % n);
            let i0 = ib * ROWS;
            let mut ts = [0u32; ROWS as usize];
            let ti0 = pt + 4 * i0;
            t.issue_loads(&[(ti0, 4 * ROWS as usize), (pa + 4 * (i0 * n + j), 4)])?;
            load(t, ti0, &mut ts)?;
            let mut s = 0u32;
            for (di, &ti) in ts.iter().enumerate() {
                let a = t.load_u32(pa + 4 * ((i0 + di as u64) * n + j))?;
                s = s.wrapping_add(a.wrapping_mul(ti));
            }
            store(t, pp + 4 * (j * blocks + ib), &[s])
        };
        ex.launch("atax-cols", Arc::new(cols), n * blocks, w)?;
        let sum = move |j: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let mut ps = vec![0u32; blocks as usize];
            load(t, pp + 4 * j * blocks, &mut ps)?;
            let s = ps.iter().fold(0u32, |s, &p| s.wrapping_add(p));
            store(t, py + 4 * j, &[s])
        };
        let w = Work::new(4 * n * blocks, n * blocks);
        ex.launch("atax-sum", Arc::new(sum), n, w)?;
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
