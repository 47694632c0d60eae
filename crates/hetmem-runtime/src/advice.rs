//! Advice and attributes per range: what `cudaMemAdvise` sets and `cudaMemRangeGetAttribute`
//! reads back (preferred location, accessed-by, read-mostly, last prefetch location), plus AMD's
//! per-range migration granularity.
//!
//! Attributes are kept per byte range in a [`RangeMap`]: advice over part of a range splits it,
//! and neighbours that end up alike merge again, so the map stays as small as the advice is
//! varied. A query over a range answers as CUDA does: a value that differs across the range is
//! reported as [`Attr::Mixed`] (CUDA's `cudaInvalidDeviceId`), an accessed-by device only if it is
//! set over the whole range.

use std::collections::BTreeSet;
use std::ops::Range;

use hetmem_core::{policy::Processor, PageRange};
use rangemap::RangeMap;

/// One piece of advice (`cudaMemoryAdvise`, with AMD's granularity attribute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// The pages should live on this processor: faults elsewhere map them remotely instead of
    /// migrating them (`cudaMemAdviseSetPreferredLocation`).
    SetPreferredLocation(Processor),
    /// `cudaMemAdviseUnsetPreferredLocation`.
    UnsetPreferredLocation,
    /// This device keeps a mapping of the pages wherever they are, so it does not fault on
    /// them (`cudaMemAdviseSetAccessedBy`).
    SetAccessedBy(Processor),
    /// `cudaMemAdviseUnsetAccessedBy`.
    UnsetAccessedBy(Processor),
    /// Mostly read: readers get their own read-only copy (`cudaMemAdviseSetReadMostly`).
    SetReadMostly,
    /// `cudaMemAdviseUnsetReadMostly`.
    UnsetReadMostly,
    /// Faults migrate aligned windows of this many bytes (AMD's `granularity` attribute: a power
    /// of two from 4 KiB to 2 MiB).
    SetGranularity(u64),
    /// Back to the context's default window.
    UnsetGranularity,
}

/// The attributes of one byte range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageAttrs {
    /// Preferred location, if advised.
    pub preferred: Option<Processor>,
    /// Devices advised to keep a mapping.
    pub accessed_by: BTreeSet<Processor>,
    /// Read-mostly advice.
    pub read_mostly: bool,
    /// Where the last prefetch sent these pages.
    pub last_prefetch: Option<Processor>,
    /// Migration window in bytes, if set.
    pub granularity: Option<u64>,
}

impl PageAttrs {
    /// These attributes with `advice` applied.
    pub fn apply(&mut self, advice: Advice) {
        match advice {
            Advice::SetPreferredLocation(p) => self.preferred = Some(p),
            Advice::UnsetPreferredLocation => self.preferred = None,
            Advice::SetAccessedBy(p) => {
                self.accessed_by.insert(p);
            }
            Advice::UnsetAccessedBy(p) => {
                self.accessed_by.remove(&p);
            }
            Advice::SetReadMostly => self.read_mostly = true,
            Advice::UnsetReadMostly => self.read_mostly = false,
            Advice::SetGranularity(g) => self.granularity = Some(g),
            Advice::UnsetGranularity => self.granularity = None,
        }
    }
}

/// An attribute read over a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attr<T> {
    /// Not set anywhere in the range.
    Unset,
    /// The same value over the whole range.
    Same(T),
    /// Different values (or set over part of the range only): CUDA's `cudaInvalidDeviceId`.
    Mixed,
}

/// The advice in force over a range and where its pages are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeAttributes {
    /// `cudaMemRangeAttributePreferredLocation`.
    pub preferred_location: Attr<Processor>,
    /// `cudaMemRangeAttributeLastPrefetchLocation`.
    pub last_prefetch_location: Attr<Processor>,
    /// `cudaMemRangeAttributeAccessedBy`: processors advised over the whole range.
    pub accessed_by: Vec<Processor>,
    /// `cudaMemRangeAttributeReadMostly`: set over the whole range.
    pub read_mostly: bool,
    /// The migration window over the range, when one is set.
    pub granularity: Attr<u64>,
    /// Where the pages actually are, as maximal runs (what CUDA cannot tell its users).
    pub residency: Vec<(PageRange, Processor)>,
}

/// Attributes of every byte of the address space that was advised.
#[derive(Debug, Default)]
pub struct AdviceMap {
    map: RangeMap<u64, PageAttrs>,
}

impl AdviceMap {
    /// No advice anywhere.
    pub fn new() -> Self {
        AdviceMap::default()
    }

    /// Applies `f` to the attributes of every byte of `range` (unadvised bytes start from the
    /// defaults).
    pub fn update(&mut self, range: PageRange, f: impl Fn(&mut PageAttrs)) {
        let pieces = self.pieces(range.start().0..range.end().0);
        for (r, mut attrs) in pieces {
            f(&mut attrs);
            if attrs == PageAttrs::default() {
                self.map.remove(r);
            } else {
                self.map.insert(r, attrs);
            }
        }
    }

    /// Applies one piece of advice to `range`.
    pub fn advise(&mut self, range: PageRange, advice: Advice) {
        self.update(range, |a| a.apply(advice));
    }

    /// The attributes at one address.
    pub fn at(&self, addr: u64) -> PageAttrs {
        self.map.get(&addr).cloned().unwrap_or_default()
    }

    /// `range` cut where its attributes change: each piece with its attributes (defaults for
    /// unadvised pieces), in address order, covering `range` exactly.
    pub fn pieces(&self, range: Range<u64>) -> Vec<(Range<u64>, PageAttrs)> {
        let mut out = Vec::new();
        let mut at = range.start;
        for (r, attrs) in self.map.overlapping(&range) {
            let s = r.start.max(range.start);
            let e = r.end.min(range.end);
            if at < s {
                out.push((at..s, PageAttrs::default()));
            }
            out.push((s..e, attrs.clone()));
            at = e;
        }
        if at < range.end {
            out.push((at..range.end, PageAttrs::default()));
        }
        out
    }

    /// The advice over `range`, read as `cudaMemRangeGetAttributes` reads it (residency left
    /// empty: the context fills it from the page states).
    pub fn attributes(&self, range: PageRange) -> RangeAttributes {
        let pieces = self.pieces(range.start().0..range.end().0);
        fn fold<T: Copy + PartialEq>(vals: impl Iterator<Item = Option<T>>) -> Attr<T> {
            let mut out = None;
            for v in vals {
                out = match (out, v) {
                    (None, None) => Some(Attr::Unset),
                    (None, Some(x)) => Some(Attr::Same(x)),
                    (Some(Attr::Unset), None) => Some(Attr::Unset),
                    (Some(Attr::Same(y)), Some(x)) if x == y => Some(Attr::Same(y)),
                    _ => Some(Attr::Mixed),
                };
            }
            out.unwrap_or(Attr::Unset)
        }
        let accessed_by = pieces
            .iter()
            .map(|(_, a)| a.accessed_by.clone())
            .reduce(|x, y| x.intersection(&y).copied().collect())
            .unwrap_or_default();
        RangeAttributes {
            preferred_location: fold(pieces.iter().map(|(_, a)| a.preferred)),
            last_prefetch_location: fold(pieces.iter().map(|(_, a)| a.last_prefetch)),
            accessed_by: accessed_by.into_iter().collect(),
            read_mostly: pieces.iter().all(|(_, a)| a.read_mostly),
            granularity: fold(pieces.iter().map(|(_, a)| a.granularity)),
            residency: Vec::new(),
        }
    }

    /// Forgets every attribute of `range` (its memory was released).
    pub fn clear(&mut self, range: PageRange) {
        self.map.remove(range.start().0..range.end().0);
    }

    /// Advised pieces (a statistic and a check of how well the map merges).
    pub fn pieces_stored(&self) -> usize {
        self.map.iter().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetmem_core::{DeviceId, PAGE_SIZE};
    use proptest::prelude::*;

    const BASE: u64 = 0x7000_0000_0000;
    const GPU0: Processor = Processor::Device(DeviceId(0));
    const GPU1: Processor = Processor::Device(DeviceId(1));

    fn pages(first: u64, n: u64) -> PageRange {
        PageRange::from_pages(BASE + first * PAGE_SIZE, n).unwrap()
    }

    #[test]
    fn advice_over_part_of_a_range_reads_back_as_mixed_and_merges_when_undone() {
        let mut m = AdviceMap::new();
        m.advise(pages(0, 8), Advice::SetPreferredLocation(GPU0));
        assert_eq!(
            m.attributes(pages(0, 8)).preferred_location,
            Attr::Same(GPU0)
        );
        assert_eq!(m.attributes(pages(0, 16)).preferred_location, Attr::Mixed);
        assert_eq!(m.attributes(pages(8, 8)).preferred_location, Attr::Unset);
        m.advise(pages(4, 8), Advice::SetPreferredLocation(GPU1));
        assert_eq!(m.attributes(pages(0, 12)).preferred_location, Attr::Mixed);
        assert_eq!(
            m.attributes(pages(4, 8)).preferred_location,
            Attr::Same(GPU1)
        );
        m.advise(pages(0, 16), Advice::UnsetPreferredLocation);
        assert_eq!(m.attributes(pages(0, 16)).preferred_location, Attr::Unset);
        assert_eq!(m.pieces_stored(), 0, "defaults are not stored");
    }

    #[test]
    fn accessed_by_lists_only_processors_set_over_the_whole_range() {
        let mut m = AdviceMap::new();
        m.advise(pages(0, 8), Advice::SetAccessedBy(GPU0));
        m.advise(pages(0, 4), Advice::SetAccessedBy(GPU1));
        assert_eq!(m.attributes(pages(0, 8)).accessed_by, vec![GPU0]);
        assert_eq!(m.attributes(pages(0, 4)).accessed_by, vec![GPU0, GPU1]);
        m.advise(pages(2, 1), Advice::UnsetAccessedBy(GPU0));
        assert!(m.attributes(pages(0, 8)).accessed_by.is_empty());
        assert_eq!(m.attributes(pages(3, 1)).accessed_by, vec![GPU0, GPU1]);
    }

    #[test]
    fn read_mostly_and_granularity_over_ranges() {
        let mut m = AdviceMap::new();
        m.advise(pages(0, 4), Advice::SetReadMostly);
        assert!(m.attributes(pages(0, 4)).read_mostly);
        assert!(!m.attributes(pages(0, 5)).read_mostly);
        m.advise(pages(0, 2), Advice::SetGranularity(65536));
        assert_eq!(m.attributes(pages(0, 2)).granularity, Attr::Same(65536));
        assert_eq!(m.attributes(pages(0, 4)).granularity, Attr::Mixed);
        m.advise(pages(0, 4), Advice::UnsetReadMostly);
        m.advise(pages(0, 4), Advice::UnsetGranularity);
        assert_eq!(m.pieces_stored(), 0);
    }

    proptest! {
        /// The map against a plain per-page model: every query equals the model's answer.
        #[test]
        fn the_map_answers_like_a_per_page_model(
            ops in proptest::collection::vec((0u64..32, 1u64..12, 0usize..6), 1..40),
            q in (0u64..32, 1u64..16),
        ) {
            let mut m = AdviceMap::new();
            let mut model = vec![PageAttrs::default(); 48];
            for (first, n, kind) in ops {
                let advice = match kind {
                    0 => Advice::SetPreferredLocation(GPU0),
                    1 => Advice::SetPreferredLocation(GPU1),
                    2 => Advice::UnsetPreferredLocation,
                    3 => Advice::SetAccessedBy(GPU1),
                    4 => Advice::UnsetAccessedBy(GPU1),
                    _ => Advice::SetReadMostly,
                };
                m.advise(pages(first, n), advice);
                for p in first..first + n {
                    model[p as usize].apply(advice);
                }
            }
            for p in 0..48 {
                prop_assert_eq!(m.at(BASE + p * PAGE_SIZE + 7), model[p as usize].clone());
            }
            let (first, n) = q;
            let got = m.attributes(pages(first, n));
            let slice = &model[first as usize..(first + n) as usize];
            prop_assert_eq!(got.read_mostly, slice.iter().all(|a| a.read_mostly));
            let all_gpu1 = slice.iter().all(|a| a.accessed_by.contains(&GPU1));
            prop_assert_eq!(got.accessed_by.contains(&GPU1), all_gpu1);
            let first_pref = slice[0].preferred;
            let same = slice.iter().all(|a| a.preferred == first_pref);
            let want = match (same, first_pref) {
                (true, None) => Attr::Unset,
                (true, Some(p)) => Attr::Same(p),
                _ => Attr::Mixed,
            };
            prop_assert_eq!(got.preferred_location, want);
        }
    }
}
