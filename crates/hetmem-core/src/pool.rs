//! Device memory pool: the ZONE_DEVICE analogue (hmm.rst "Represent and manage device memory from
//! core kernel point of view"; lib/test_hmm.c's chunk allocator).
//!
//! A pool hands out frames of one device's memory. Memory comes in 2 MiB chunks (512 frames),
//! added on demand up to the device's capacity, as the kernel's driver grows its `dev_pagemap`
//! chunks. A chunk added for a 4 KiB request feeds the single-frame free list; one added for a
//! 2 MiB request is handed out whole. Frames of a 2 MiB block that is freed page by page (after a
//! split) return to the single-frame list.
//!
//! The pool only does bookkeeping (which frames are allocated, by what kind of request, and the
//! counters); the bytes live in whatever backs the device (a host arena for simulated devices).
//! Invariant defended (DESIGN.md 3): a frame is never handed out twice, and a frame is freed only
//! once; `check_invariants` verifies free lists against the allocation bitmap.

use crate::addr::{DevPfn, DeviceId, Owner, PAGES_PER_HUGE};

/// Frames per 2 MiB chunk.
pub const FRAMES_PER_CHUNK: u32 = PAGES_PER_HUGE as u32;

/// The two kinds of ZONE_DEVICE memory HMM knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Not addressable by the CPU: a CPU access faults and migrates the page back.
    DevicePrivate,
    /// Addressable by the CPU (CXL-like): CPU access never faults.
    DeviceCoherent,
}

/// Errors of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No free frame and the device is at capacity.
    #[error("device {dev:?} is out of memory ({in_use} of {capacity} frames in use)")]
    OutOfMemory {
        /// The device.
        dev: DeviceId,
        /// Frames in use.
        in_use: u64,
        /// Frames the device has.
        capacity: u64,
    },
    /// The allocation would take the device past the limit set on its memory (a runtime's
    /// accounting, like a memory cgroup's charge).
    #[error("device {dev:?} is at its memory limit ({in_use} of {limit} frames in use)")]
    OverLimit {
        /// The device.
        dev: DeviceId,
        /// Frames in use.
        in_use: u64,
        /// The limit in frames.
        limit: u64,
    },
    /// A frame that is not allocated was freed.
    #[error("frame {frame:?} of device {dev:?} freed but not allocated")]
    DoubleFree {
        /// The device.
        dev: DeviceId,
        /// The frame.
        frame: DevPfn,
    },
}

/// Counters of a pool (the kernel's per-device `calloc`/`cfree`, plus page_in / page_out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Frames allocated now.
    pub pages_in_use: u64,
    /// Frames ever allocated.
    pub calloc: u64,
    /// Frames ever freed.
    pub cfree: u64,
    /// Pages migrated into this device.
    pub page_in: u64,
    /// Pages migrated out of this device.
    pub page_out: u64,
    /// Chunks added.
    pub chunks: u64,
}

/// One device's memory pool.
#[derive(Debug)]
pub struct DevicePool {
    dev: DeviceId,
    owner: Owner,
    kind: MemoryKind,
    capacity_chunks: u32,
    chunks: u32,
    free_small: Vec<DevPfn>,
    free_huge: Vec<DevPfn>,
    allocated: Vec<u64>,
    /// At most this many frames in use (`None`: the capacity).
    limit: Option<u64>,
    stats: PoolStats,
}

impl DevicePool {
    /// A pool of at most `capacity_frames` frames (rounded down to whole chunks, at least one).
    pub fn new(dev: DeviceId, owner: Owner, kind: MemoryKind, capacity_frames: u64) -> Self {
        let capacity_chunks = ((capacity_frames / FRAMES_PER_CHUNK as u64).max(1)) as u32;
        DevicePool {
            dev,
            owner,
            kind,
            capacity_chunks,
            chunks: 0,
            free_small: Vec::new(),
            free_huge: Vec::new(),
            allocated: vec![0; (capacity_chunks as usize * FRAMES_PER_CHUNK as usize).div_ceil(64)],
            limit: None,
            stats: PoolStats::default(),
        }
    }

    /// The device.
    pub fn dev(&self) -> DeviceId {
        self.dev
    }
    /// The owner cookie (`pgmap->owner`).
    pub fn owner(&self) -> Owner {
        self.owner
    }
    /// Private or coherent.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }
    /// Capacity in frames.
    pub fn capacity_frames(&self) -> u64 {
        self.capacity_chunks as u64 * FRAMES_PER_CHUNK as u64
    }
    /// Counters.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// Limits the frames in use to `frames` (`None`: no limit but the capacity). Frames already
    /// in use beyond a new limit stay; only new allocations are refused until usage falls below
    /// it. Freeing is never limited, so migration back to system memory never fails for it.
    pub fn set_limit(&mut self, frames: Option<u64>) {
        self.limit = frames;
    }

    /// The limit set by [`DevicePool::set_limit`].
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Frames that can still be allocated: under the capacity and the limit.
    pub fn available_frames(&self) -> u64 {
        let cap = self
            .limit
            .map_or(self.capacity_frames(), |l| l.min(self.capacity_frames()));
        cap.saturating_sub(self.stats.pages_in_use)
    }

    fn charge(&self, frames: u64) -> Result<(), PoolError> {
        match self.limit {
            Some(limit) if self.stats.pages_in_use + frames > limit => Err(PoolError::OverLimit {
                dev: self.dev,
                in_use: self.stats.pages_in_use,
                limit,
            }),
            _ => Ok(()),
        }
    }

    fn oom(&self) -> PoolError {
        PoolError::OutOfMemory {
            dev: self.dev,
            in_use: self.stats.pages_in_use,
            capacity: self.capacity_frames(),
        }
    }

    fn add_chunk(&mut self, for_huge: bool) -> bool {
        if self.chunks >= self.capacity_chunks {
            return false;
        }
        let base = self.chunks * FRAMES_PER_CHUNK;
        self.chunks += 1;
        self.stats.chunks += 1;
        if for_huge {
            self.free_huge.push(DevPfn(base));
        } else {
            // Reverse so frames come out in ascending order.
            self.free_small
                .extend((base..base + FRAMES_PER_CHUNK).rev().map(DevPfn));
        }
        true
    }

    fn mark(&mut self, frame: DevPfn, on: bool) -> bool {
        let (w, b) = (frame.0 as usize / 64, frame.0 % 64);
        let was = self.allocated[w] & (1 << b) != 0;
        if on {
            self.allocated[w] |= 1 << b;
        } else {
            self.allocated[w] &= !(1 << b);
        }
        was
    }

    /// Is `frame` allocated?
    pub fn is_allocated(&self, frame: DevPfn) -> bool {
        let w = frame.0 as usize / 64;
        w < self.allocated.len() && self.allocated[w] & (1 << (frame.0 % 64)) != 0
    }

    /// Allocates one frame.
    pub fn alloc_page(&mut self) -> Result<DevPfn, PoolError> {
        self.charge(1)?;
        if self.free_small.is_empty() && !self.add_chunk(false) {
            // Break a free 2 MiB block rather than fail.
            let Some(block) = self.free_huge.pop() else {
                return Err(self.oom());
            };
            self.free_small
                .extend((block.0..block.0 + FRAMES_PER_CHUNK).rev().map(DevPfn));
        }
        let f = self.free_small.pop().ok_or_else(|| self.oom())?;
        let was = self.mark(f, true);
        debug_assert!(!was);
        self.stats.pages_in_use += 1;
        self.stats.calloc += 1;
        Ok(f)
    }

    /// Allocates a 2 MiB block: 512 contiguous frames, the first 512-aligned.
    pub fn alloc_huge(&mut self) -> Result<DevPfn, PoolError> {
        self.charge(FRAMES_PER_CHUNK as u64)?;
        if self.free_huge.is_empty() && !self.add_chunk(true) {
            return Err(self.oom());
        }
        let base = self.free_huge.pop().ok_or_else(|| self.oom())?;
        for f in base.0..base.0 + FRAMES_PER_CHUNK {
            self.mark(DevPfn(f), true);
        }
        self.stats.pages_in_use += FRAMES_PER_CHUNK as u64;
        self.stats.calloc += FRAMES_PER_CHUNK as u64;
        Ok(base)
    }

    /// Frees one frame (including single frames of a split 2 MiB block).
    pub fn free_page(&mut self, frame: DevPfn) -> Result<(), PoolError> {
        if !self.is_allocated(frame) {
            return Err(PoolError::DoubleFree {
                dev: self.dev,
                frame,
            });
        }
        self.mark(frame, false);
        self.free_small.push(frame);
        self.stats.pages_in_use -= 1;
        self.stats.cfree += 1;
        Ok(())
    }

    /// Frees a whole 2 MiB block allocated by [`DevicePool::alloc_huge`].
    pub fn free_huge(&mut self, base: DevPfn) -> Result<(), PoolError> {
        if !base.0.is_multiple_of(FRAMES_PER_CHUNK) {
            return Err(PoolError::DoubleFree {
                dev: self.dev,
                frame: base,
            });
        }
        if let Some(f) =
            (base.0..base.0 + FRAMES_PER_CHUNK).find(|&f| !self.is_allocated(DevPfn(f)))
        {
            return Err(PoolError::DoubleFree {
                dev: self.dev,
                frame: DevPfn(f),
            });
        }
        for f in base.0..base.0 + FRAMES_PER_CHUNK {
            self.mark(DevPfn(f), false);
        }
        self.free_huge.push(base);
        self.stats.pages_in_use -= FRAMES_PER_CHUNK as u64;
        self.stats.cfree += FRAMES_PER_CHUNK as u64;
        Ok(())
    }

    /// Counts pages migrated in.
    pub fn account_in(&mut self, pages: u64) {
        self.stats.page_in += pages;
    }

    /// Counts pages migrated out.
    pub fn account_out(&mut self, pages: u64) {
        self.stats.page_out += pages;
    }

    /// Verifies that free lists and the allocation bitmap agree.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = vec![0u64; self.allocated.len()];
        let mut free = 0u64;
        let mut note = |f: u32| -> Result<(), String> {
            let (w, b) = (f as usize / 64, f % 64);
            if f >= self.chunks * FRAMES_PER_CHUNK {
                return Err(format!(
                    "free frame {f} beyond the {} chunks added",
                    self.chunks
                ));
            }
            if seen[w] & (1 << b) != 0 {
                return Err(format!("frame {f} is on a free list twice"));
            }
            if self.allocated[w] & (1 << b) != 0 {
                return Err(format!("frame {f} is free and allocated"));
            }
            seen[w] |= 1 << b;
            free += 1;
            Ok(())
        };
        for f in &self.free_small {
            note(f.0)?;
        }
        for b in &self.free_huge {
            for f in b.0..b.0 + FRAMES_PER_CHUNK {
                note(f)?;
            }
        }
        let in_use: u64 = self.allocated.iter().map(|w| w.count_ones() as u64).sum();
        if in_use != self.stats.pages_in_use {
            return Err(format!(
                "bitmap has {in_use} frames, counter {}",
                self.stats.pages_in_use
            ));
        }
        if in_use + free != self.chunks as u64 * FRAMES_PER_CHUNK as u64 {
            return Err(format!(
                "{in_use} used + {free} free != {} chunks",
                self.chunks
            ));
        }
        if self.stats.calloc - self.stats.cfree != in_use {
            return Err("calloc - cfree != frames in use".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(frames: u64) -> DevicePool {
        DevicePool::new(DeviceId(0), Owner(1), MemoryKind::DevicePrivate, frames)
    }

    #[test]
    fn a_limit_refuses_allocations_past_it_and_never_frees() {
        let mut p = pool(2 * FRAMES_PER_CHUNK as u64);
        p.set_limit(Some(3));
        assert_eq!(p.available_frames(), 3);
        let frames: Vec<DevPfn> = (0..3).map(|_| p.alloc_page().unwrap()).collect();
        assert_eq!(
            p.alloc_page(),
            Err(PoolError::OverLimit {
                dev: DeviceId(0),
                in_use: 3,
                limit: 3
            })
        );
        assert!(matches!(p.alloc_huge(), Err(PoolError::OverLimit { .. })));
        assert_eq!(p.available_frames(), 0);
        // Lowering the limit below usage keeps what is in use and frees normally.
        p.set_limit(Some(1));
        assert_eq!(p.available_frames(), 0);
        p.free_page(frames[0]).unwrap();
        p.free_page(frames[1]).unwrap();
        assert_eq!(p.available_frames(), 0, "one in use, limit one");
        p.set_limit(None);
        assert_eq!(p.available_frames(), 2 * FRAMES_PER_CHUNK as u64 - 1);
        assert!(p.alloc_huge().is_ok());
        p.check_invariants().unwrap();
    }

    #[test]
    fn grows_by_chunks_up_to_capacity() {
        let mut p = pool(1024);
        let a = p.alloc_page().unwrap();
        assert_eq!(a, DevPfn(0));
        assert_eq!(p.stats().chunks, 1);
        let h = p.alloc_huge().unwrap();
        assert_eq!(h.0 % FRAMES_PER_CHUNK, 0);
        assert_eq!(p.stats().chunks, 2);
        assert!(matches!(p.alloc_huge(), Err(PoolError::OutOfMemory { .. })));
        p.free_huge(h).unwrap();
        assert!(matches!(p.free_huge(h), Err(PoolError::DoubleFree { .. })));
        assert!(matches!(
            p.free_page(DevPfn(3)),
            Err(PoolError::DoubleFree { .. })
        ));
        p.check_invariants().unwrap();
    }

    #[test]
    fn exhausting_small_frames_breaks_a_free_block() {
        let mut p = pool(1024);
        let h = p.alloc_huge().unwrap();
        p.free_huge(h).unwrap();
        let frames: Vec<_> = (0..1024).map(|_| p.alloc_page().unwrap()).collect();
        assert_eq!(frames.len(), 1024);
        assert!(p.alloc_page().is_err());
        p.check_invariants().unwrap();
    }

    proptest! {
        #[test]
        fn random_alloc_free_keeps_invariants(ops in proptest::collection::vec(0u8..4, 1..200)) {
            let mut p = pool(2048);
            let mut small = Vec::new();
            let mut huge = Vec::new();
            for op in ops {
                match op {
                    0 => if let Ok(f) = p.alloc_page() { small.push(f) },
                    1 => if let Ok(f) = p.alloc_huge() { huge.push(f) },
                    2 => if let Some(f) = small.pop() { p.free_page(f).unwrap() },
                    _ => if let Some(f) = huge.pop() { p.free_huge(f).unwrap() },
                }
                prop_assert!(p.check_invariants().is_ok(), "{:?}", p.check_invariants());
            }
        }
    }
}
