//! Random unique-page access (Allen & Ge's "random", UVMSmart's RA): warp `w` reads page
//! `perm(w)` of the data, each lane 128 bytes of it, and writes the sums: every page is read
//! exactly once, in an order with no locality at all, so faults land in many 2 MiB blocks at once
//! and no prefetcher can guess the next page.

use std::sync::Arc;

use hetmem_core::PAGE_SIZE;
use hetmem_sim::accel::{Miss, Thread, WARP_SIZE};

use super::{fill, fit, read, too_small, whole_pages};
use crate::exec::Exec;
use crate::model::Work;
use crate::workload::{hash, load, store, Workload, WorkloadKind};
use crate::WorkloadError;

/// `pages` pages of data, read in a permuted order.
#[derive(Debug)]
pub struct RandomAccess {
    pages: u64,
    stride: u64,
}

const WORDS: u64 = PAGE_SIZE / 4 / WARP_SIZE;

/// Managed memory of `pages` pages of data and their sums.
fn footprint(pages: u64) -> u64 {
    pages * PAGE_SIZE + whole_pages(pages * WARP_SIZE * 4)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl RandomAccess {
    /// Data and sums in about `bytes` (the sums are 1/32 of the data).
    pub fn new(bytes: u64) -> Result<Self, WorkloadError> {
        let pages = fit(bytes * 32 / 33 / PAGE_SIZE, 1, bytes, footprint);
        if pages < 2 {
            return Err(too_small(WorkloadKind::Random, bytes, 3 * PAGE_SIZE));
        }
        // A stride coprime to `pages` near the golden ratio of it: a permutation that scatters
        // consecutive warps across the whole array.
        let mut stride = (pages as f64 * 0.618_033_988_7) as u64 | 1;
        while gcd(stride, pages) != 1 {
            stride += 2;
        }
        Ok(RandomAccess { pages, stride })
    }

    fn page(&self, w: u64) -> u64 {
        (w * self.stride + 7) % self.pages
    }

    fn value(&self, w: u64, lane: u64, data: impl Fn(u64) -> u32) -> u32 {
        let base = self.page(w) * (PAGE_SIZE / 4) + lane * WORDS;
        (0..WORDS).fold(hash(w), |s, k| s.wrapping_add(data(base + k)))
    }
}

impl Workload for RandomAccess {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Random
    }
    fn footprint(&self) -> u64 {
        footprint(self.pages)
    }
    fn launches(&self) -> u64 {
        1
    }
    fn shape(&self) -> String {
        format!("pages={}", self.pages)
    }

    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError> {
        let pages = self.pages;
        let mut data = ex.alloc("data", pages * PAGE_SIZE)?;
        let out = ex.alloc("sums", pages * WARP_SIZE * 4)?;
        fill(&mut data, hash);
        ex.input(&data)?;
        ex.on_device(&out)?;
        let (pd, po, stride) = (data.addr(), out.addr(), self.stride);
        let k = move |tid: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let (w, lane) = (tid / WARP_SIZE, tid % WARP_SIZE);
            let page = (w * stride + 7) % pages;
            let mut v = [0u32; WORDS as usize];
            load(t, pd + page * PAGE_SIZE + lane * WORDS * 4, &mut v)?;
            let s = v.iter().fold(hash(w), |s, &x| s.wrapping_add(x));
            store(t, po + 4 * tid, &[s])
        };
        let n = pages * WARP_SIZE;
        let w = Work::new(pages * PAGE_SIZE + 4 * n, pages * PAGE_SIZE / 4);
        ex.launch("random", Arc::new(k), n, w)?;
        ex.output(&out)?;
        Ok(read(&out, n as usize))
    }

    fn cpu(&self) -> Vec<u32> {
        (0..self.pages * WARP_SIZE)
            .map(|tid| self.value(tid / WARP_SIZE, tid % WARP_SIZE, hash))
            .collect()
    }
}
