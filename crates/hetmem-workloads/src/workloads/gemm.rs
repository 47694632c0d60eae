//! Tiled GEMM `C = A·B` over `n × n` matrices (cuBLAS sgemm in Allen & Ge, PolyBench GEMM): each
//! lane computes a 1×32 tile of C from one row of A and a 32-column strip of B, so every warp
//! walks all of B (heavy reuse: B must stay resident, A and C stream).

use std::sync::Arc;

use hetmem_sim::accel::{Miss, Thread};

use super::{fill, read, too_small};
use crate::exec::Exec;
use crate::model::Work;
use crate::workload::{hash, load, store, Workload, WorkloadKind};
use crate::WorkloadError;

/// `n × n` matrices.
#[derive(Debug)]
pub struct Gemm {
    n: u64,
}

const TILE: u64 = 32;
/// Largest `n` (a lane keeps a row of A on its stack).
pub const MAX_N: u64 = 4096;
const SALT_B: u64 = 1 << 41;

impl Gemm {
    /// Three matrices in about `bytes`.
    pub fn new(bytes: u64) -> Result<Self, WorkloadError> {
        let n = (((bytes / 12) as f64).sqrt() as u64) / TILE * TILE;
        if n == 0 {
            return Err(too_small(WorkloadKind::Gemm, bytes, 12 * TILE * TILE));
        }
        if n > MAX_N {
            return Err(WorkloadError::TooLarge {
                workload: WorkloadKind::Gemm,
                bytes,
                max: 12 * MAX_N * MAX_N,
            });
        }
        Ok(Gemm { n })
    }
}

impl Workload for Gemm {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Gemm
    }
    fn footprint(&self) -> u64 {
        12 * self.n * self.n
    }
    fn launches(&self) -> u64 {
        1
    }
    fn shape(&self) -> String {
        format!("n={}", self.n)
    }

    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError> {
        let n = self.n;
        let mut a = ex.alloc("A", 4 * n * n)?;
        let mut b = ex.alloc("B", 4 * n * n)?;
        let c = ex.alloc("C", 4 * n * n)?;
        fill(&mut a, hash);
        fill(&mut b, |i| hash(i + SALT_B));
        ex.input(&a)?;
        ex.input(&b)?;
        ex.on_device(&c)?;
        let (pa, pb, pc) = (a.addr(), b.addr(), c.addr());
        let k = move |l: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let strips = n / TILE;
            let (i, j0) = (l / strips, (l % strips) * TILE);
            let mut row = vec![0u32; n as usize];
            load(t, pa + 4 * i * n, &mut row)?;
            let mut acc = [0u32; TILE as usize];
            let mut bk = [0u32; TILE as usize];
            for (k, &aik) in row.iter().enumerate() {
                load(t, pb + 4 * (k as u64 * n + j0), &mut bk)?;
                for (s, b) in acc.iter_mut().zip(bk) {
                    *s = s.wrapping_add(aik.wrapping_mul(b));
                }
            }
            store(t, pc + 4 * (i * n + j0), &acc)
        };
        ex.launch(
            "gemm",
            Arc::new(k),
            n * n / TILE,
            Work::new(12 * n * n, 2 * n * n * n),
        )?;
        ex.output(&c)?;
        Ok(read(&c, (n * n) as usize))
    }

    fn cpu(&self) -> Vec<u32> {
        let n = self.n as usize;
        let a: Vec<u32> = (0..(n * n) as u64).map(hash).collect();
        let b: Vec<u32> = (0..(n * n) as u64).map(|i| hash(i + SALT_B)).collect();
        let mut c = vec![0u32; n * n];
        for i in 0..n {
            let ci = &mut c[i * n..(i + 1) * n];
            for k in 0..n {
                let aik = a[i * n + k];
                for (s, &bkj) in ci.iter_mut().zip(&b[k * n..(k + 1) * n]) {
                    *s = s.wrapping_add(aik.wrapping_mul(bkj));
                }
            }
        }
        c
    }
}
