//! hetmem: heterogeneous memory management in user space.
//!
//! One virtual address space shared by the CPU and devices, over this process's real memory:
//! managed regions, interval notifiers that keep device page tables coherent, range fault,
//! migration to and from device memory, and CPU faults on device-resident pages served in the
//! faulting thread. The concepts are Linux HMM's (`../shared/seeds/`); the mechanisms that need no
//! OS live in `hetmem-core`, the system calls in `hetmem-sys`.
//!
//! ```no_run
//! use hetmem::{AddressSpace, Prot};
//! let mm = AddressSpace::current()?;
//! let range = mm.map_anonymous(1 << 20, Prot::READ | Prot::WRITE, false)?;
//! # Ok::<(), hetmem::MmError>(())
//! ```
#![deny(unsafe_code)]

pub mod cpu;
pub mod device;
mod dup;
pub mod error;
mod events;
pub mod fault;
mod fork;
pub mod migrate;
pub mod mm;
mod os;
pub mod region;
pub mod stats;
mod zaps;

pub use device::{ComputeDevice, Device, DeviceMemory, MigrateDriver, PeerCopy};
pub use error::{MigrateError, MmError};
pub use hetmem_sys::mman::Prot;
pub use mm::{AddressSpace, Config, CpuFaultBackend};
pub use os::{cpu_touch, write_user};
