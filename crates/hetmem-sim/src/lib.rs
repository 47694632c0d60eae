//! hetmem-sim: software devices for hetmem.
//!
//! [`mirror`] is the equivalent of the kernel's `lib/test_hmm.c` "dmirror" device: a device with
//! its own page table mirroring the process's, used to check hetmem against the Linux HMM
//! self-tests.
#![forbid(unsafe_code)]

pub mod mirror;

pub use mirror::{
    CmdResult, DmirrorDevice, Mirror, MirrorError, MirrorFlags, SnapshotProt, DEFAULT_CAPACITY,
    DEFAULT_CAPACITY_FOR_TESTS,
};
