//! 3×3 convolution stencil over an image of 1024-word rows (PolyBench 2DCONV): each output row
//! reads three input rows, so every input page is read by three rows of lanes (neighbour reuse).
//! Each lane computes 32 consecutive outputs; border pixels stay zero.

use std::sync::Arc;

use hetmem_sim::accel::{Miss, Thread};

use super::{fill, read, too_small};
use crate::exec::Exec;
use crate::model::Work;
use crate::workload::{hash, load, store, Workload, WorkloadKind};
use crate::WorkloadError;

/// The stencil over `h` rows of 1024 words.
#[derive(Debug)]
pub struct Conv2d {
    h: u64,
}

/// Words per row (one 4 KiB page).
pub const WIDTH: u64 = 1024;
const LANE: u64 = 32;
const WEIGHTS: [[u32; 3]; 3] = [[2, 5, 3], [7, 1, 4], [6, 9, 8]];

fn pixel(input: impl Fn(u64, u64) -> u32, i: u64, j: u64, h: u64) -> u32 {
    if i == 0 || i + 1 == h || j == 0 || j + 1 == WIDTH {
        return 0;
    }
    let mut s = 0u32;
    for (di, row) in WEIGHTS.iter().enumerate() {
        for (dj, &w) in row.iter().enumerate() {
            s = s.wrapping_add(w.wrapping_mul(input(i + di as u64 - 1, j + dj as u64 - 1)));
        }
    }
    s
}

impl Conv2d {
    /// An image and its output in about `bytes`.
    pub fn new(bytes: u64) -> Result<Self, WorkloadError> {
        let h = bytes / (8 * WIDTH);
        if h < 3 {
            return Err(too_small(WorkloadKind::Conv2d, bytes, 3 * 8 * WIDTH));
        }
        Ok(Conv2d { h })
    }
}

impl Workload for Conv2d {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Conv2d
    }
    fn footprint(&self) -> u64 {
        8 * WIDTH * self.h
    }
    fn launches(&self) -> u64 {
        1
    }
    fn shape(&self) -> String {
        format!("{}x{}", self.h, WIDTH)
    }

    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError> {
        let (h, w) = (self.h, WIDTH);
        let mut input = ex.alloc("in", 4 * h * w)?;
        let out = ex.alloc("out", 4 * h * w)?;
        fill(&mut input, hash);
        ex.input(&input)?;
        ex.on_device(&out)?;
        let (pi, po) = (input.addr(), out.addr());
        let k = move |l: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let per_row = w / LANE;
            let (i, j0) = (l / per_row, (l % per_row) * LANE);
            if i == 0 || i + 1 == h {
                return Ok(());
            }
            // Columns s..s+34 of the three rows around row i.
            let s = j0.saturating_sub(1).min(w - LANE - 2);
            let mut rows = [[0u32; LANE as usize + 2]; 3];
            let row = |d: u64| (pi + 4 * ((i + d - 1) * w + s), 4 * (LANE as usize + 2));
            t.issue_loads(&[row(0), row(1), row(2)])?;
            for (d, r) in rows.iter_mut().enumerate() {
                load(t, row(d as u64).0, r)?;
            }
            let mut o = [0u32; LANE as usize];
            for (c, o) in o.iter_mut().enumerate() {
                let j = j0 + c as u64;
                *o = pixel(|y, x| rows[(y + 1 - i) as usize][(x - s) as usize], i, j, h);
            }
            store(t, po + 4 * (i * w + j0), &o)
        };
        ex.launch(
            "conv2d",
            Arc::new(k),
            h * w / LANE,
            Work::new(8 * h * w, 18 * h * w),
        )?;
        ex.output(&out)?;
        Ok(read(&out, (h * w) as usize))
    }

    fn cpu(&self) -> Vec<u32> {
        let h = self.h;
        let input: Vec<u32> = (0..h * WIDTH).map(hash).collect();
        let at = |y: u64, x: u64| input[(y * WIDTH + x) as usize];
        (0..h * WIDTH)
            .map(|p| pixel(at, p / WIDTH, p % WIDTH, h))
            .collect()
    }
}
