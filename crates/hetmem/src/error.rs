//! Errors of the runtime: one enum per subsystem (STYLE.md rule 6).

use hetmem_core::{
    addr::AddrError, pool::PoolError, range_fault::RangeFaultError, DeviceId, VirtAddr,
};
use hetmem_sys::SysError;

/// Errors of the address space: registration, mapping, protection.
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// A malformed range.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// The address is not in memory hetmem manages, and the operation needs managed memory.
    #[error("{addr} is not in memory managed by hetmem")]
    NotManaged {
        /// The address.
        addr: VirtAddr,
    },
    /// The range overlaps memory hetmem already manages.
    #[error("range at {addr} overlaps managed memory")]
    AlreadyManaged {
        /// Where it starts.
        addr: VirtAddr,
    },
    /// Registration asked for memory that is not anonymous (or not mapped at all).
    #[error("range at {addr} is not anonymous memory of this process")]
    NotAnonymous {
        /// Where it starts.
        addr: VirtAddr,
    },
    /// A release of something that is not registered (double release).
    #[error("range at {addr} is not registered (already released?)")]
    NotRegistered {
        /// Where it starts.
        addr: VirtAddr,
    },
    /// No device with this id is attached.
    #[error("no device {0:?} is attached")]
    NoDevice(DeviceId),
    /// Too many devices.
    #[error("at most 255 devices can be attached")]
    TooManyDevices,
    /// The CPU fault backend cannot start.
    #[error("CPU fault backend unavailable: {0}")]
    Backend(String),
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// Migration failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// Errors of migration (`migrate_vma_setup` and friends).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A malformed range.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// `-EINVAL`: the range is not inside one managed region.
    #[error("migration range at {addr} is not inside one managed region")]
    NotManaged {
        /// Start of the range.
        addr: VirtAddr,
    },
    /// No device with this id is attached.
    #[error("no device {0:?} is attached")]
    NoDevice(DeviceId),
    /// Device memory ran out where the migration could not skip the page (CPU fault path).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Moving data failed in a way that left the page where it was.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A page could not be brought back to system memory; its data is still in device memory.
    #[error("page {addr} could not be brought back to system memory")]
    Stuck {
        /// The page.
        addr: VirtAddr,
    },
    /// A device-to-device migration between a device and itself, or involving memory that is
    /// not device-private (device-coherent pages live where the CPU maps them: nothing to copy
    /// between arenas).
    #[error("no device-to-device migration from {from:?} to {to:?} (two distinct devices with private memory needed)")]
    PeerUnsupported {
        /// The source device.
        from: DeviceId,
        /// The destination device.
        to: DeviceId,
    },
    /// This process is the child of a `fork()`: its memory is plain memory and never migrates
    /// (the userfaultfd and devices belong to the parent).
    #[error("no migration in a forked child")]
    ForkedChild,
}

impl From<MigrateError> for RangeFaultError {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::Pool(_) => RangeFaultError::NoMemory { addr: VirtAddr(0) },
            MigrateError::Stuck { addr } | MigrateError::NotManaged { addr } => {
                RangeFaultError::Fault { addr }
            }
            _ => RangeFaultError::Fault { addr: VirtAddr(0) },
        }
    }
}
