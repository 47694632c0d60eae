//! Tiled GEMM `C = A·B` with `A` `m × K`, `B` `K × N` and `C` `m × N` (K = 128, N = 1024: a
//! transformer projection's shape; cuBLAS sgemm in Allen & Ge, PolyBench GEMM): each lane
//! computes a 1×32 tile of C from one row of A and a 32-column strip of B, so a warp covers a row
//! of C and every warp walks all of B. B (1 MiB) is reused by every warp and must stay resident;
//! A and C stream. The footprint grows with `m`, so the work grows linearly with it (a square
//! GEMM's cubic work would not fit a simulator's budget at the sizes that oversubscribe).

use std::sync::Arc;

use hetmem_sim::accel::{Miss, Thread};

use super::{fill, fit, read, too_small, whole_pages};
use crate::exec::Exec;
use crate::model::Work;
use crate::workload::{hash, load, store, Workload, WorkloadKind};
use crate::WorkloadError;

/// `m` rows of A and C.
#[derive(Debug)]
pub struct Gemm {
    m: u64,
}

/// Inner dimension.
pub const K: u64 = 128;
/// Columns of B and C.
pub const N: u64 = 1024;
const TILE: u64 = 32;
const SALT_B: u64 = 1 << 41;

/// Managed memory of `A` (`m × K`), `B` and `C`.
fn footprint(m: u64) -> u64 {
    whole_pages(4 * m * K) + whole_pages(4 * K * N) + whole_pages(4 * m * N)
}

impl Gemm {
    /// A, B and C in about `bytes`.
    pub fn new(bytes: u64) -> Result<Self, WorkloadError> {
        let b = 4 * K * N;
        let m = fit(bytes.saturating_sub(b) / (4 * (K + N)), 1, bytes, footprint);
        if m == 0 {
            return Err(too_small(WorkloadKind::Gemm, bytes, b + 4 * (K + N)));
        }
        Ok(Gemm { m })
    }
}

impl Workload for Gemm {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Gemm
    }
    fn footprint(&self) -> u64 {
        footprint(self.m)
    }
    fn launches(&self) -> u64 {
        1
    }
    fn shape(&self) -> String {
        format!("{}x{K} * {K}x{N}", self.m)
    }

    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError> {
        let m = self.m;
        let mut a = ex.alloc("A", 4 * m * K)?;
        let mut b = ex.alloc("B", 4 * K * N)?;
        let c = ex.alloc("C", 4 * m * N)?;
        fill(&mut a, hash);
        fill(&mut b, |i| hash(i + SALT_B));
        ex.input(&a)?;
        ex.input(&b)?;
        ex.on_device(&c)?;
        let (pa, pb, pc) = (a.addr(), b.addr(), c.addr());
        let k = move |l: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let (i, j0) = (l / (N / TILE), (l % (N / TILE)) * TILE);
            let mut row = [0u32; K as usize];
            // The row of A and the first tile of B are independent loads.
            let ai = pa + 4 * i * K;
            t.issue_loads(&[(ai, 4 * K as usize), (pb + 4 * j0, 4 * TILE as usize)])?;
            load(t, ai, &mut row)?;
            let mut acc = [0u32; TILE as usize];
            let mut bk = [0u32; TILE as usize];
            for (k, &aik) in row.iter().enumerate() {
                load(t, pb + 4 * (k as u64 * N + j0), &mut bk)?;
                for (s, b) in acc.iter_mut().zip(bk) {
                    *s = s.wrapping_add(aik.wrapping_mul(b));
                }
            }
            store(t, pc + 4 * (i * N + j0), &acc)
        };
        ex.launch(
            "gemm",
            Arc::new(k),
            m * N / TILE,
            Work::new(self.footprint(), 2 * m * N * K),
        )?;
        ex.output(&c)?;
        Ok(read(&c, (m * N) as usize))
    }

    fn cpu(&self) -> Vec<u32> {
        let (m, k, n) = (self.m as usize, K as usize, N as usize);
        let a: Vec<u32> = (0..(m * k) as u64).map(hash).collect();
        let b: Vec<u32> = (0..(k * n) as u64).map(|i| hash(i + SALT_B)).collect();
        let mut c = vec![0u32; m * n];
        for i in 0..m {
            let ci = &mut c[i * n..(i + 1) * n];
            for kk in 0..k {
                let aik = a[i * k + kk];
                for (s, &bkj) in ci.iter_mut().zip(&b[kk * n..(kk + 1) * n]) {
                    *s = s.wrapping_add(aik.wrapping_mul(bkj));
                }
            }
        }
        c
    }
}
