//! hetmem-sys: the only crate of hetmem that contains `unsafe` code.
//!
//! It wraps the kernel interfaces a user-space HMM needs and exposes them as small, typed, mostly
//! safe functions. Everything above it (`hetmem-core`, `hetmem`, `hetmem-sim`) forbids unsafe code.
//!
//! | module    | what                                                                            |
//! |-----------|---------------------------------------------------------------------------------|
//! | `mman`    | mmap / munmap / mprotect / madvise / mremap, MADV_POPULATE_*                    |
//! | `uffd`    | userfaultfd: API handshake, register, COPY / ZEROPAGE / MOVE / WRITEPROTECT, events |
//! | `signal`  | SIGSEGV / SIGBUS handler installation with chaining to the previous handler      |
//! | `fork`    | `pthread_atfork` handlers (prepare / parent / child)                             |
//! | `futex`   | futex wait / wake on an `AtomicU32` (async-signal-safe waiting)                  |
//! | `pagemap` | `/proc/self/pagemap` entries and the PAGEMAP_SCAN ioctl                           |
//! | `maps`    | `/proc/self/maps` and `/proc/self/smaps` VmFlags                                  |
//! | `dma`     | fault-tolerant copies to and from this process's own VAs (process_vm_readv/writev), and `/proc/self/mem` forced access |
//! | `arena`   | an owned anonymous mapping addressed by offset: the backing of device memory     |
//!
//! Every `unsafe` block carries a `// SAFETY:` argument.

pub mod arena;
pub mod clock;
pub mod dma;
pub mod error;
pub mod fork;
pub mod futex;
pub mod maps;
pub mod mman;
pub mod pagemap;
pub mod signal;
#[cfg(test)]
mod test_map;
pub mod uffd;

pub use error::{SysError, SysResult};

/// The base page size hetmem supports (x86-64 and most aarch64 configurations).
pub const PAGE_SIZE: usize = 4096;
/// The PMD (transparent huge page) size for 4 KiB base pages.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;
