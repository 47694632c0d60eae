//! The error type of hetmem-sys: which call failed and the errno it failed with.

use std::io;

/// A failed system call (or a call that the kernel in use does not offer).
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// The kernel rejected the call.
    #[error("{op} failed: {source}")]
    Os {
        /// The system call or ioctl, for example `"UFFDIO_MOVE"`.
        op: &'static str,
        /// The errno, as an `io::Error`.
        #[source]
        source: io::Error,
    },
    /// A copy stopped early (for example `process_vm_readv` reaching an unmapped page).
    #[error("{op} stopped after {done} of {len} bytes")]
    Short {
        /// The call.
        op: &'static str,
        /// Bytes transferred before it stopped.
        done: usize,
        /// Bytes asked for.
        len: usize,
    },
    /// The running kernel lacks a feature hetmem asked for.
    #[error("the kernel does not offer {0}")]
    Unsupported(&'static str),
    /// Arguments rejected before any call was made.
    #[error("invalid argument to {op}: {why}")]
    Invalid {
        /// The call.
        op: &'static str,
        /// Why.
        why: &'static str,
    },
}

impl SysError {
    /// Builds an [`SysError::Os`] from a rustix errno.
    pub fn os(op: &'static str, errno: rustix::io::Errno) -> Self {
        SysError::Os {
            op,
            source: io::Error::from_raw_os_error(errno.raw_os_error()),
        }
    }

    /// Builds an [`SysError::Os`] from the thread's last OS error.
    pub fn last(op: &'static str) -> Self {
        SysError::Os {
            op,
            source: io::Error::last_os_error(),
        }
    }

    /// The errno, when the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SysError::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type SysResult<T> = Result<T, SysError>;
