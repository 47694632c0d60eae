//! hetmem-core: the safe mechanisms of heterogeneous memory management, free of OS calls.
//!
//! | module        | kernel concept (seeds)                          |
//! |---------------|--------------------------------------------------|
//! | [`addr`]      | addresses, pages, ranges                         |
//! | [`pfn`]       | `HMM_PFN_*` entries                              |
//! | [`page_state`]| device-private PTEs and the page lock            |
//! | [`notifier`]  | `mmu_interval_notifier` and its sequence protocol |
//! | [`range_fault`]| `hmm_range_fault`                               |
//! | [`pool`]      | `ZONE_DEVICE` memory, `dev_pagemap`               |
//! | [`migrate`]   | `migrate_vma_*` flags and reports                 |
//! | [`fault_ring`]| replayable fault buffer (GET/PUT, overflow), UVM fault batching and replay policy |
//! | [`link`]      | PCIe / NVLink-C2C link, UVM fault costs, clock     |
//! | [`device_mmu`]| GPU page table, per-CU TLBs, batched TLB invalidation |
//! | [`copy_engine`]| SDMA copy queues, GART windows, `dma_fence`      |
//! | [`policy`]    | UVM's prefetcher, thrashing detection, access counters |
//! | [`sync`]      | the locks and atomics of the concurrent cores (shuttle under `cfg(shuttle)`) |
//!
//! `hetmem` wires these to the process's real memory; the simulated devices use them directly.
#![forbid(unsafe_code)]

pub mod addr;
pub mod copy_engine;
pub mod device_mmu;
pub mod fault_ring;
pub mod link;
pub mod migrate;
pub mod notifier;
pub mod page_state;
pub mod pfn;
pub mod policy;
pub mod pool;
pub mod range_fault;
pub mod shared_mmu;
pub mod sync;

pub use addr::{
    AddrError, DevPfn, DeviceId, Owner, PageRange, VirtAddr, HUGE_PAGE_SIZE, PAGE_SIZE,
};
