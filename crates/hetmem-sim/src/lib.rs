//! hetmem-sim: software devices for hetmem.
//!
//! [`mirror`] is the equivalent of the kernel's `lib/test_hmm.c` "dmirror" device: a device with
//! its own page table mirroring the process's, used to check hetmem against the Linux HMM
//! self-tests. [`accel`] is the simulated accelerator: device MMU and TLBs, replayable fault
//! ring, batched fault servicing, compute units running kernels, and the link model. [`copy`]
//! is the copy engine backend of the simulated devices and device-to-device migration through it.
#![forbid(unsafe_code)]

pub mod accel;
pub mod copy;
pub mod latency;
pub mod mirror;
pub mod placement;

pub use copy::{migrate_between, PeerDriver, SimCopyBackend};

pub use mirror::{
    CmdResult, DmirrorDevice, Mirror, MirrorError, MirrorFlags, SnapshotProt, DEFAULT_CAPACITY,
    DEFAULT_CAPACITY_FOR_TESTS,
};
