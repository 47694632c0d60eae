//! Addresses and page ranges: the units every other module speaks in.
//!
//! A [`VirtAddr`] is a CPU virtual address of this process (the address space the CPU and every
//! device share). A [`PageRange`] is a validated, page-aligned, non-empty `[start, end)` interval;
//! everything that takes a range takes a `PageRange`, so no function below has to re-check
//! alignment or overflow (STYLE.md rule 2).

use std::fmt;

/// Base page shift (4 KiB pages).
pub const PAGE_SHIFT: u32 = 12;
/// Base page size.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// PMD order: a 2 MiB block holds `1 << HUGE_ORDER` base pages.
pub const HUGE_ORDER: u32 = 9;
/// Size of a PMD-mapped (transparent huge) page.
pub const HUGE_PAGE_SIZE: u64 = PAGE_SIZE << HUGE_ORDER;
/// Base pages per 2 MiB block.
pub const PAGES_PER_HUGE: u64 = 1 << HUGE_ORDER;

/// Why an address range was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The start or the length is not a multiple of the page size.
    #[error("address {addr:#x} is not page aligned")]
    Unaligned {
        /// The offending address or length.
        addr: u64,
    },
    /// The range covers no page.
    #[error("empty range at {start:#x}")]
    Empty {
        /// Its start.
        start: u64,
    },
    /// `start + len` does not fit in the address space.
    #[error("range at {start:#x} of {len:#x} bytes wraps around the address space")]
    Overflow {
        /// Its start.
        start: u64,
        /// Its length in bytes.
        len: u64,
    },
}

/// A virtual address of this process.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtAddr(pub u64);

impl VirtAddr {
    /// From a raw pointer value.
    pub fn from_usize(addr: usize) -> Self {
        VirtAddr(addr as u64)
    }
    /// As a pointer-sized integer.
    pub fn as_usize(self) -> usize {
        self.0 as usize
    }
    /// Is it page aligned?
    pub fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }
    /// Rounded down to its page.
    pub fn page_down(self) -> Self {
        VirtAddr(self.0 & !(PAGE_SIZE - 1))
    }
    /// Rounded down to its 2 MiB block.
    pub fn huge_down(self) -> Self {
        VirtAddr(self.0 & !(HUGE_PAGE_SIZE - 1))
    }
    /// Virtual page number.
    pub fn vpn(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Self> {
        self.0.checked_add(bytes).map(VirtAddr)
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VirtAddr({:#x})", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A page-aligned, non-empty, non-wrapping `[start, end)` range of virtual addresses.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRange {
    start: VirtAddr,
    end: VirtAddr,
}

impl PageRange {
    /// Validates `[start, start + len)`.
    pub fn new(start: u64, len: u64) -> Result<Self, AddrError> {
        if !start.is_multiple_of(PAGE_SIZE) {
            return Err(AddrError::Unaligned { addr: start });
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(AddrError::Unaligned { addr: len });
        }
        if len == 0 {
            return Err(AddrError::Empty { start });
        }
        let end = start
            .checked_add(len)
            .ok_or(AddrError::Overflow { start, len })?;
        Ok(PageRange {
            start: VirtAddr(start),
            end: VirtAddr(end),
        })
    }

    /// `npages` pages from `start`.
    pub fn from_pages(start: u64, npages: u64) -> Result<Self, AddrError> {
        let len = npages.checked_mul(PAGE_SIZE).ok_or(AddrError::Overflow {
            start,
            len: u64::MAX,
        })?;
        Self::new(start, len)
    }

    /// `[start, end)`.
    pub fn from_bounds(start: u64, end: u64) -> Result<Self, AddrError> {
        if end < start {
            return Err(AddrError::Overflow {
                start,
                len: end.wrapping_sub(start),
            });
        }
        Self::new(start, end - start)
    }

    /// First address.
    pub fn start(&self) -> VirtAddr {
        self.start
    }
    /// One past the last address.
    pub fn end(&self) -> VirtAddr {
        self.end
    }
    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.end.0 - self.start.0
    }
    /// Number of base pages.
    pub fn npages(&self) -> u64 {
        self.len_bytes() >> PAGE_SHIFT
    }
    /// Does it contain `addr`?
    pub fn contains(&self, addr: VirtAddr) -> bool {
        self.start <= addr && addr < self.end
    }
    /// Does it overlap `[start, end)`?
    pub fn overlaps(&self, start: VirtAddr, end: VirtAddr) -> bool {
        self.start < end && start < self.end
    }
    /// Is `other` entirely inside?
    pub fn contains_range(&self, other: &PageRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }
    /// The overlap with `other`, if any.
    pub fn intersect(&self, other: &PageRange) -> Option<PageRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(PageRange { start, end })
    }
    /// The smallest range covering both.
    pub fn hull(&self, other: &PageRange) -> PageRange {
        PageRange {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
    /// Address of page `i` (no bounds check beyond debug assertions).
    pub fn page(&self, i: u64) -> VirtAddr {
        debug_assert!(i < self.npages());
        VirtAddr(self.start.0 + (i << PAGE_SHIFT))
    }
    /// Index of the page holding `addr`.
    pub fn index_of(&self, addr: VirtAddr) -> u64 {
        (addr.0 - self.start.0) >> PAGE_SHIFT
    }
    /// The page addresses, in order.
    pub fn pages(&self) -> impl Iterator<Item = VirtAddr> + '_ {
        (self.start.0..self.end.0)
            .step_by(PAGE_SIZE as usize)
            .map(VirtAddr)
    }
    /// Splits into consecutive chunks that never cross a multiple of `boundary` (a power of two).
    pub fn chunks(&self, boundary: u64) -> impl Iterator<Item = PageRange> {
        debug_assert!(boundary.is_power_of_two() && boundary >= PAGE_SIZE);
        let end = self.end.0;
        let mut at = self.start.0;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let next = ((at / boundary) + 1).saturating_mul(boundary).min(end);
            let r = PageRange {
                start: VirtAddr(at),
                end: VirtAddr(next),
            };
            at = next;
            Some(r)
        })
    }
}

impl fmt::Debug for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end.0)
    }
}

/// A device identifier, small and dense (it is packed into the page-state word).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub u8);

/// A frame number inside one device's memory pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevPfn(pub u32);

/// The owner cookie of device memory (the kernel's `pgmap->owner`): range fault reports a
/// device-private page as valid only to the owner that holds it, and migration selects device pages
/// by owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_validated_at_construction() {
        assert_eq!(
            PageRange::new(1, 4096),
            Err(AddrError::Unaligned { addr: 1 })
        );
        assert_eq!(
            PageRange::new(4096, 100),
            Err(AddrError::Unaligned { addr: 100 })
        );
        assert_eq!(
            PageRange::new(4096, 0),
            Err(AddrError::Empty { start: 4096 })
        );
        assert!(matches!(
            PageRange::new(u64::MAX - 4095, 8192),
            Err(AddrError::Overflow { .. })
        ));
        assert!(matches!(
            PageRange::from_pages(0, u64::MAX),
            Err(AddrError::Overflow { .. })
        ));
        let r = PageRange::from_pages(0x10000, 3).unwrap();
        assert_eq!(r.npages(), 3);
        assert_eq!(r.page(2), VirtAddr(0x12000));
        assert_eq!(r.index_of(VirtAddr(0x11fff)), 1);
    }

    #[test]
    fn chunks_never_cross_the_boundary() {
        let r = PageRange::new(
            HUGE_PAGE_SIZE - 2 * PAGE_SIZE,
            HUGE_PAGE_SIZE + 4 * PAGE_SIZE,
        )
        .unwrap();
        let chunks: Vec<_> = r.chunks(HUGE_PAGE_SIZE).collect();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0].npages(), 2);
        assert_eq!(chunks[1].npages(), 512);
        assert_eq!(chunks[2].npages(), 2);
        assert_eq!(chunks.iter().map(|c| c.npages()).sum::<u64>(), r.npages());
    }
}
