//! A test mapping, unmapped on drop: the fixture the unit tests of this crate share.

use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};

/// An anonymous mapping owned by a test.
pub(crate) struct Map {
    pub(crate) addr: usize,
    pub(crate) len: usize,
}

impl Map {
    pub(crate) fn anon(len: usize, prot: ProtFlags, flags: MapFlags) -> Map {
        // SAFETY: a fresh mapping at an address of the kernel's choice overlaps nothing.
        let p = unsafe { rustix::mm::mmap_anonymous(std::ptr::null_mut(), len, prot, flags) }
            .expect("mmap");
        Map {
            addr: p as usize,
            len,
        }
    }

    /// Changes the protection of `[off, off + len)` of the mapping.
    pub(crate) fn protect(&self, off: usize, len: usize, prot: MprotectFlags) {
        assert!(off + len <= self.len);
        // SAFETY: the range is inside our mapping, which no Rust reference points into.
        unsafe { rustix::mm::mprotect((self.addr + off) as *mut _, len, prot) }.expect("mprotect");
    }

    /// Reads our (readable) mapping by raw pointer.
    pub(crate) fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        (0..len)
            // SAFETY: inside our mapping, which the test made readable.
            .map(|i| unsafe { ((self.addr + off + i) as *const u8).read_volatile() })
            .collect()
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and no reference into it outlives the test.
        unsafe { rustix::mm::munmap(self.addr as *mut _, self.len) }.expect("munmap");
    }
}
