//! Streaming triad `c[i] = a[i] + 3·b[i]` (BabelStream's triad, UVMSmart's stream triad): every
//! page is touched once, in order; each lane handles 32 consecutive words (128 bytes), so a warp
//! covers one page.

use std::sync::Arc;

use hetmem_sim::accel::{Miss, Thread};

use super::{fill, read, too_small};
use crate::exec::Exec;
use crate::model::Work;
use crate::workload::{hash, load, store, Workload, WorkloadKind};
use crate::WorkloadError;

/// The triad over `n` words per array.
#[derive(Debug)]
pub struct Stream {
    n: u64,
}

const LANE: u64 = 32;
const SALT_B: u64 = 1 << 40;

impl Stream {
    /// Three arrays in about `bytes`.
    pub fn new(bytes: u64) -> Result<Self, WorkloadError> {
        let n = bytes / 12 / 1024 * 1024;
        if n == 0 {
            return Err(too_small(WorkloadKind::Stream, bytes, 12 * 1024));
        }
        Ok(Stream { n })
    }
}

impl Workload for Stream {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Stream
    }
    fn footprint(&self) -> u64 {
        12 * self.n
    }
    fn launches(&self) -> u64 {
        1
    }
    fn shape(&self) -> String {
        format!("n={}", self.n)
    }

    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError> {
        let n = self.n;
        let mut a = ex.alloc("a", 4 * n)?;
        let mut b = ex.alloc("b", 4 * n)?;
        let c = ex.alloc("c", 4 * n)?;
        fill(&mut a, hash);
        fill(&mut b, |i| hash(i + SALT_B));
        ex.input(&a)?;
        ex.input(&b)?;
        ex.on_device(&c)?;
        let (pa, pb, pc) = (a.addr(), b.addr(), c.addr());
        let k = move |l: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let (mut x, mut y) = ([0u32; LANE as usize], [0u32; LANE as usize]);
            let off = 4 * LANE * l;
            let bytes = 4 * LANE as usize;
            t.issue_loads(&[(pa + off, bytes), (pb + off, bytes)])?;
            load(t, pa + off, &mut x)?;
            load(t, pb + off, &mut y)?;
            for (x, y) in x.iter_mut().zip(y) {
                *x = x.wrapping_add(y.wrapping_mul(3));
            }
            store(t, pc + off, &x)
        };
        ex.launch("triad", Arc::new(k), n / LANE, Work::new(12 * n, 2 * n))?;
        ex.output(&c)?;
        Ok(read(&c, n as usize))
    }

    fn cpu(&self) -> Vec<u32> {
        (0..self.n)
            .map(|i| hash(i).wrapping_add(hash(i + SALT_B).wrapping_mul(3)))
            .collect()
    }
}
