//! `HmmPfn`: one entry of a range fault, in and out (seed 001, `include/linux/hmm.h`).
//!
//! On input an entry carries request bits ([`HmmPfn::REQ_FAULT`], [`HmmPfn::REQ_WRITE`]); the
//! effective request of page `i` is `(pfns[i] & pfn_flags_mask) | default_flags`, exactly as the
//! kernel computes it. On output it carries VALID / WRITE / ERROR, the CPU mapping order (0 or 9)
//! and a frame:
//!
//! ```text
//!  63    62    61    60..58  57..53   52   51   50   49..40     39..0
//! VALID WRITE ERROR  (rsvd)  order   DEV  COH  ZERO  device id  frame
//! ```
//!
//! The upper bits are the kernel's. Bits 52..40 are hetmem's: user space has no `struct page`, so
//! the entry says directly what the frame is: a system page (frame = virtual page number, since the
//! CPU reaches system memory only through its own address space), the shared zero page, or a frame
//! of a device's memory (device-private or device-coherent, with the device id).

use crate::addr::{DevPfn, DeviceId, VirtAddr, PAGE_SHIFT};

/// One range-fault entry.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct HmmPfn(pub u64);

impl HmmPfn {
    /// The frame is at least readable.
    pub const VALID: u64 = 1 << 63;
    /// The frame is writable.
    pub const WRITE: u64 = 1 << 62;
    /// Access is impossible (no mapping, no read permission, special mapping).
    pub const ERROR: u64 = 1 << 61;
    /// Input: the entry must come out VALID (same bit as VALID).
    pub const REQ_FAULT: u64 = Self::VALID;
    /// Input: the entry must come out WRITE (same bit as WRITE; needs REQ_FAULT).
    pub const REQ_WRITE: u64 = Self::WRITE;
    /// First bit of the 5-bit map-order field.
    pub const ORDER_SHIFT: u32 = 53;
    /// hetmem: the frame is device memory.
    pub const DEVICE: u64 = 1 << 52;
    /// hetmem: the device memory is device-coherent (CPU addressable).
    pub const COHERENT: u64 = 1 << 51;
    /// hetmem: the frame is the shared zero page.
    pub const ZERO: u64 = 1 << 50;
    const DEV_SHIFT: u32 = 40;
    const FRAME_MASK: u64 = (1 << Self::DEV_SHIFT) - 1;
    /// Every flag bit (everything that is not the frame).
    pub const FLAGS: u64 = !Self::FRAME_MASK;

    /// A valid system page at `addr` (the frame is the virtual page number).
    pub fn system(addr: VirtAddr, write: bool) -> Self {
        let mut v = Self::VALID | (addr.0 >> PAGE_SHIFT);
        if write {
            v |= Self::WRITE;
        }
        HmmPfn(v)
    }

    /// The shared zero page mapped at `addr` (always read-only).
    pub fn zero(addr: VirtAddr) -> Self {
        HmmPfn(Self::VALID | Self::ZERO | (addr.0 >> PAGE_SHIFT))
    }

    /// A frame of device memory.
    pub fn device(dev: DeviceId, pfn: DevPfn, write: bool, coherent: bool) -> Self {
        let mut v = Self::VALID
            | Self::DEVICE
            | ((dev.0 as u64) << Self::DEV_SHIFT)
            | (pfn.0 as u64 & Self::FRAME_MASK);
        if write {
            v |= Self::WRITE;
        }
        if coherent {
            v |= Self::COHERENT;
        }
        HmmPfn(v)
    }

    /// The error entry.
    pub fn error() -> Self {
        HmmPfn(Self::ERROR)
    }

    /// Same entry with the map order set (0 for a base page, 9 for a PMD).
    pub fn with_order(self, order: u32) -> Self {
        HmmPfn(
            (self.0 & !(0x1f << Self::ORDER_SHIFT)) | ((order as u64 & 0x1f) << Self::ORDER_SHIFT),
        )
    }

    /// VALID?
    pub fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }
    /// WRITE?
    pub fn is_write(self) -> bool {
        self.0 & Self::WRITE != 0
    }
    /// ERROR?
    pub fn is_error(self) -> bool {
        self.0 & Self::ERROR != 0
    }
    /// The shared zero page?
    pub fn is_zero(self) -> bool {
        self.0 & Self::ZERO != 0
    }
    /// CPU mapping order (the kernel's `hmm_pfn_to_map_order`).
    pub fn map_order(self) -> u32 {
        ((self.0 >> Self::ORDER_SHIFT) & 0x1f) as u32
    }
    /// The device frame, if this entry is device memory.
    pub fn device_frame(self) -> Option<(DeviceId, DevPfn, bool)> {
        (self.0 & Self::DEVICE != 0).then_some({
            (
                DeviceId(((self.0 >> Self::DEV_SHIFT) & 0xff) as u8),
                DevPfn((self.0 & Self::FRAME_MASK) as u32),
                self.0 & Self::COHERENT != 0,
            )
        })
    }
    /// The frame bits.
    pub fn frame(self) -> u64 {
        self.0 & Self::FRAME_MASK
    }
}

impl std::fmt::Debug for HmmPfn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        for (bit, name) in [
            (Self::VALID, "V"),
            (Self::WRITE, "W"),
            (Self::ERROR, "E"),
            (Self::DEVICE, "D"),
            (Self::COHERENT, "C"),
            (Self::ZERO, "Z"),
        ] {
            if self.0 & bit != 0 {
                s.push_str(name);
            }
        }
        write!(f, "HmmPfn({s} o{} {:#x})", self.map_order(), self.frame())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_entries_round_trip() {
        let e = HmmPfn::device(DeviceId(3), DevPfn(0x12345), true, false).with_order(9);
        assert!(e.is_valid() && e.is_write() && !e.is_error());
        assert_eq!(e.map_order(), 9);
        assert_eq!(
            e.device_frame(),
            Some((DeviceId(3), DevPfn(0x12345), false))
        );
        assert_eq!(HmmPfn::system(VirtAddr(0x7000), false).device_frame(), None);
        assert!(HmmPfn::zero(VirtAddr(0)).is_zero());
        assert_eq!(HmmPfn::REQ_FAULT, HmmPfn::VALID);
    }
}
