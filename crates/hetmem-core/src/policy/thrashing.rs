//! Thrashing detection and mitigation: NVIDIA UVM's `uvm_perf_thrashing.c` (uvm-svm.md A.9) as a
//! pure state machine over pages and time.
//!
//! The runtime reports every migration it performs ([`ThrashingDetector::record_migration`]) and,
//! before it services a fault, asks what to do ([`ThrashingDetector::hint`]). A page is
//! *thrashing* when `threshold` migrations in a row each came within `lapse` of the previous one.
//! A thrashing page is first **throttled** (one processor at a time may service faults on it, the
//! one allowed alternating between throttling periods of `nap × lapse`), and after
//! `pin_threshold` periods with throttling it is **pinned** to one location for `pin × lapse`,
//! every other processor being mapped remotely. [`ThrashingDetector::tick`] frees the state of
//! 2 MiB blocks that went quiet. A thrashing page whose last migration is more than a lapse old
//! is no longer treated as thrashing (unless pinned), and its next migration starts a new run;
//! the throttling periods it accumulated are kept, so a page that thrashes in bursts still ends
//! up pinned. Neighbours: the prefetcher should leave out pages for which
//! [`ThrashingDetector::is_thrashing`] holds (UVM does), and access-counter migrations
//! ([`super::access_counters`]) are reported here with [`MigrationCause::AccessCounter`].
//!
//! ```text
//!  migrations within lapse        count reaches threshold        pin_threshold periods
//!  ───────────────────────►  count ───────────────────► THROTTLE ──────────────────► PIN
//!         ▲                    │ gap > lapse: count = 1     │                          │
//!         └────────────────────┴────────────────────────────┘        pin × lapse later │
//!                                   page forgotten (from scratch) ◄────────────────────┘
//! ```
//!
//! Time is a [`Duration`] since an arbitrary epoch chosen by the caller (the runtime's clock, a
//! test's counter), so every decision is deterministic. Times should not go backwards; a time
//! earlier than the last one seen is treated as simultaneous with it (differences saturate at 0).
//!
//! Where this differs from UVM, and why:
//! * The count is of *migrations*: the first migration of a run counts 1, so `threshold = 3`
//!   means three migrations each within `lapse` of the previous one. UVM counts the gaps (its
//!   first event sets only the timestamp), one migration later.
//! * Migrations the heuristics do not own ([`MigrationCause::UserPrefetch`],
//!   [`MigrationCause::Eviction`]) are ignored; UVM also ignores evictions but *resets* the pages
//!   of user migrations.
//! * A pin goes to the preferred location when one is set, otherwise to the CPU: system memory is
//!   reachable by every processor, so it is always a valid common location. UVM also considers
//!   the current resident (NVLink/C2C with native atomics) and pins immediately when a preferred
//!   location is set; here the throttling phase always comes first.
//! * The per-page state is allocated at a page's first counted migration, not only after two
//!   processors touched the block within a lapse; [`ThrashingDetector::tick`] frees it again.
//!
//! Invariants ([`ThrashingDetector::check_invariants`]): a page flagged thrashing has at least
//! `threshold` consecutive events; a pinned page has no throttling state; a block with no
//! thrashing since its last reset holds no thrashing, throttled or pinned page.

use std::collections::HashMap;
use std::time::Duration;

use super::prefetch::BlockMask;
use crate::addr::{VirtAddr, HUGE_PAGE_SIZE, PAGES_PER_HUGE, PAGE_SHIFT};

/// Largest `threshold` (UVM keeps the count in 3 bits).
pub const MAX_THRESHOLD: u32 = 7;
/// Largest `pin_threshold` (UVM keeps the throttling count in 8 bits).
pub const MAX_PIN_THRESHOLD: u32 = 255;
/// Largest `nap`, in lapses.
pub const MAX_NAP: u32 = 100;

pub use super::Processor;

/// Parameters of thrashing detection (UVM's `uvm_perf_thrashing_*` module parameters; the defaults
/// are theirs, uvm-svm.md A.9). `nap`, `epoch` and `pin` are multiples of `lapse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrashingConfig {
    /// Detection and mitigation on (`uvm_perf_thrashing_enable`, default on). Off: nothing is
    /// recorded and every hint is [`Hint::None`].
    pub enabled: bool,
    /// Consecutive migrations, each within `lapse` of the previous, that make a page thrashing
    /// (default 3, valid `1..=7`).
    pub threshold: u32,
    /// Throttling periods before a thrashing page is pinned (default 10, valid `1..=255`).
    pub pin_threshold: u32,
    /// Largest gap between two migrations of a page that still counts as consecutive
    /// (default 500 µs, must not be zero).
    pub lapse: Duration,
    /// Length of a throttling period, in lapses (default 1, valid `1..=100`).
    pub nap: u32,
    /// Quiet time after which a block's thrashing state is freed, in lapses (default 2000, i.e.
    /// 1 s; must not be zero).
    pub epoch: u32,
    /// How long a pin lasts, in lapses (default 300, i.e. 150 ms); 0 pins forever.
    pub pin: u32,
    /// How many times a block's state may be reset; after that it stays tracked (default 4).
    pub max_resets: u32,
}

impl Default for ThrashingConfig {
    fn default() -> Self {
        ThrashingConfig {
            enabled: true,
            threshold: 3,
            pin_threshold: 10,
            lapse: Duration::from_micros(500),
            nap: 1,
            epoch: 2000,
            pin: 300,
            max_resets: 4,
        }
    }
}

/// A bad [`ThrashingConfig`] parameter. Values are refused, never clamped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ThrashingError {
    /// `threshold` outside `1..=7`.
    #[error("thrashing threshold {value} outside 1..={MAX_THRESHOLD}")]
    Threshold {
        /// The value given.
        value: u32,
    },
    /// `pin_threshold` outside `1..=255`.
    #[error("pin threshold {value} outside 1..={MAX_PIN_THRESHOLD}")]
    PinThreshold {
        /// The value given.
        value: u32,
    },
    /// `lapse` is zero: no two migrations could ever be consecutive.
    #[error("thrashing lapse is zero")]
    ZeroLapse,
    /// `nap` outside `1..=100`.
    #[error("nap of {value} lapses outside 1..={MAX_NAP}")]
    Nap {
        /// The value given.
        value: u32,
    },
    /// `epoch` is zero: blocks would be reset while their pages still thrash.
    #[error("thrashing epoch is zero lapses")]
    ZeroEpoch,
    /// A multiple of `lapse` does not fit in a [`Duration`].
    #[error("{parameter} of {lapses} lapses of {lapse:?} overflows")]
    Overflow {
        /// Which parameter (`"nap"`, `"epoch"` or `"pin"`).
        parameter: &'static str,
        /// Its value, in lapses.
        lapses: u32,
        /// The lapse.
        lapse: Duration,
    },
}

/// The durations a valid configuration works with.
#[derive(Clone, Copy, Debug)]
struct Spans {
    nap: Duration,
    epoch: Duration,
    /// `None`: pins never expire.
    pin: Option<Duration>,
}

impl ThrashingConfig {
    /// Checks every parameter against its valid range.
    pub fn validate(&self) -> Result<(), ThrashingError> {
        self.spans().map(|_| ())
    }

    fn spans(&self) -> Result<Spans, ThrashingError> {
        if !(1..=MAX_THRESHOLD).contains(&self.threshold) {
            return Err(ThrashingError::Threshold {
                value: self.threshold,
            });
        }
        if !(1..=MAX_PIN_THRESHOLD).contains(&self.pin_threshold) {
            return Err(ThrashingError::PinThreshold {
                value: self.pin_threshold,
            });
        }
        if self.lapse.is_zero() {
            return Err(ThrashingError::ZeroLapse);
        }
        if !(1..=MAX_NAP).contains(&self.nap) {
            return Err(ThrashingError::Nap { value: self.nap });
        }
        if self.epoch == 0 {
            return Err(ThrashingError::ZeroEpoch);
        }
        let lapses = |parameter: &'static str, lapses: u32| {
            self.lapse
                .checked_mul(lapses)
                .ok_or(ThrashingError::Overflow {
                    parameter,
                    lapses,
                    lapse: self.lapse,
                })
        };
        Ok(Spans {
            nap: lapses("nap", self.nap)?,
            epoch: lapses("epoch", self.epoch)?,
            pin: match self.pin {
                0 => None,
                n => Some(lapses("pin", n)?),
            },
        })
    }
}

/// What the fault handler should do about a fault on a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    /// Service the fault as usual.
    None,
    /// Leave the fault unserviced until `until` (a device replays it later, a CPU thread sleeps),
    /// then ask again.
    Throttle {
        /// End of the current throttling period.
        until: Duration,
    },
    /// Make the page resident at `location` (if it is not already) and map it there for the
    /// requester, remotely if the requester is another processor; do not migrate it elsewhere.
    Pin {
        /// Where the page stays.
        location: Processor,
    },
}

/// Why a page migrated. Only the migrations the heuristics own count towards thrashing: those
/// of faults, access counters and the prefetcher. User prefetches and advice take precedence over
/// the heuristics, and evictions are forced by memory pressure; both are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationCause {
    /// A device fault.
    DeviceFault,
    /// A CPU fault.
    CpuFault,
    /// An access-counter notification.
    AccessCounter,
    /// The prefetcher, around a fault.
    Prefetch,
    /// An explicit user migration (`cudaMemPrefetchAsync`) or advice.
    UserPrefetch,
    /// Eviction from a full device memory.
    Eviction,
}

impl MigrationCause {
    /// Does a migration for this cause count towards thrashing?
    pub fn counts(self) -> bool {
        match self {
            MigrationCause::DeviceFault
            | MigrationCause::CpuFault
            | MigrationCause::AccessCounter
            | MigrationCause::Prefetch => true,
            MigrationCause::UserPrefetch | MigrationCause::Eviction => false,
        }
    }
}

/// Counters of the detector. Everything but `pages_tracked` only grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrashingStats {
    /// Pages declared thrashing (once per run of consecutive migrations).
    pub thrashing_detected: u64,
    /// [`Hint::Throttle`] answers.
    pub throttles: u64,
    /// Pages pinned.
    pub pins: u64,
    /// Pins that expired.
    pub pin_expired: u64,
    /// Block resets (quiet for an epoch, nothing pinned).
    pub resets: u64,
    /// Pages with state right now.
    pub pages_tracked: u64,
}

/// A throttling period of one page: until `end`, only `serviced` may service faults on it.
#[derive(Clone, Copy, Debug)]
struct Period {
    end: Duration,
    /// `None` until a processor other than the previous period's serviced one asks.
    serviced: Option<Processor>,
    /// Has some processor been throttled in this period (it then counts towards pinning)?
    throttled: bool,
}

/// A pin of one page.
#[derive(Clone, Copy, Debug)]
struct Pin {
    location: Processor,
    /// `None`: forever.
    until: Option<Duration>,
}

impl Pin {
    fn expired(&self, now: Duration) -> bool {
        self.until.is_some_and(|until| now >= until)
    }
}

/// Per-page state (UVM's `page_thrashing_info_t`).
#[derive(Clone, Copy, Debug)]
struct PageState {
    /// Time of the last counted migration.
    last_migration: Duration,
    /// Consecutive migrations, each within `lapse` of the previous, saturating at
    /// [`MAX_THRESHOLD`]. 0: none yet (a fresh page).
    events: u32,
    /// The count reached the threshold in this run.
    thrashing: bool,
    /// The current or last throttling period.
    period: Option<Period>,
    /// Throttling periods so far; kept across runs (UVM's `throttling_count`), so a page that
    /// thrashes in bursts still ends up pinned. Zeroed by a pin.
    throttled_periods: u32,
    pin: Option<Pin>,
}

impl PageState {
    fn fresh(now: Duration) -> Self {
        PageState {
            last_migration: now,
            events: 0,
            thrashing: false,
            period: None,
            throttled_periods: 0,
            pin: None,
        }
    }

    /// Thrashing right now: pinned, or flagged with the last migration within a lapse.
    fn live(&self, now: Duration, lapse: Duration) -> bool {
        match self.pin {
            Some(pin) => !pin.expired(now),
            None => self.thrashing && now.saturating_sub(self.last_migration) <= lapse,
        }
    }
}

/// Per 2 MiB block state (UVM's `block_thrashing_info_t`).
#[derive(Clone, Debug)]
struct BlockState {
    /// Keyed by page index in the block.
    pages: HashMap<u16, PageState>,
    /// Last counted migration in the block.
    last_event: Duration,
    /// Last migration of a page at or over the threshold since the last reset.
    last_thrashing: Option<Duration>,
    /// Resets so far.
    resets: u32,
}

/// Thrashing detection for one address space. Plain `&mut self` state; the runtime wraps it in
/// its lock (STYLE.md 8).
#[derive(Debug)]
pub struct ThrashingDetector {
    config: ThrashingConfig,
    spans: Spans,
    /// Keyed by block number (address / 2 MiB).
    blocks: HashMap<u64, BlockState>,
    stats: ThrashingStats,
}

/// Block number and page index in the block of the page holding `page`.
fn split(page: VirtAddr) -> (u64, u16) {
    let block = page.0 / HUGE_PAGE_SIZE;
    // Lossless: the index is below PAGES_PER_HUGE (512).
    let index = ((page.0 >> PAGE_SHIFT) % PAGES_PER_HUGE) as u16;
    (block, index)
}

impl ThrashingDetector {
    /// A detector with no state, once `config` is valid.
    pub fn new(config: ThrashingConfig) -> Result<Self, ThrashingError> {
        let spans = config.spans()?;
        Ok(ThrashingDetector {
            config,
            spans,
            blocks: HashMap::new(),
            stats: ThrashingStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ThrashingConfig {
        &self.config
    }

    /// The page holding `page` migrated from `from` to `to` at `now` because of `cause`.
    ///
    /// Migrations that do not count ([`MigrationCause::counts`]), that stay on one processor, or
    /// that move a pinned page to its pin location (carrying out [`Hint::Pin`]) are ignored.
    pub fn record_migration(
        &mut self,
        page: VirtAddr,
        from: Processor,
        to: Processor,
        cause: MigrationCause,
        now: Duration,
    ) {
        if !self.config.enabled || !cause.counts() || from == to {
            return;
        }
        let (block_no, index) = split(page);
        let block = self.blocks.entry(block_no).or_insert_with(|| BlockState {
            pages: HashMap::new(),
            last_event: now,
            last_thrashing: None,
            resets: 0,
        });
        block.last_event = block.last_event.max(now);
        let state = block
            .pages
            .entry(index)
            .or_insert_with(|| PageState::fresh(now));
        if state.pin.is_some_and(|pin| pin.expired(now)) {
            *state = PageState::fresh(now);
            self.stats.pin_expired += 1;
        }
        if state.pin.is_some_and(|pin| pin.location == to) {
            return;
        }
        let consecutive =
            state.events > 0 && now.saturating_sub(state.last_migration) <= self.config.lapse;
        if consecutive {
            state.events = (state.events + 1).min(MAX_THRESHOLD);
        } else {
            // A gap breaks the run: the page is no longer thrashing (UVM's thrashing_reset_page,
            // which also keeps the throttling count).
            state.events = 1;
            state.thrashing = false;
            state.period = None;
        }
        state.last_migration = now;
        if state.events >= self.config.threshold {
            if !state.thrashing {
                state.thrashing = true;
                self.stats.thrashing_detected += 1;
                tracing::debug!(%page, ?from, ?to, "thrashing detected");
            }
            block.last_thrashing = Some(now);
        }
    }

    /// What to do before servicing a fault of `requester` on the page holding `page` at `now`;
    /// `preferred` is the page's preferred location, if the user set one.
    ///
    /// Not thrashing: [`Hint::None`]. Thrashing: the first processor to ask in a throttling period
    /// (and not the one serviced in the previous period) is serviced, the others get
    /// [`Hint::Throttle`] until the period ends. Once `pin_threshold` periods throttled someone,
    /// the page is pinned to `preferred`, else to the CPU, and every request gets [`Hint::Pin`]
    /// until the pin expires; the page is then forgotten and [`Hint::None`] is answered.
    pub fn hint(
        &mut self,
        page: VirtAddr,
        requester: Processor,
        now: Duration,
        preferred: Option<Processor>,
    ) -> Hint {
        if !self.config.enabled {
            return Hint::None;
        }
        let (block_no, index) = split(page);
        let Some(state) = self
            .blocks
            .get_mut(&block_no)
            .and_then(|b| b.pages.get_mut(&index))
        else {
            return Hint::None;
        };
        if let Some(pin) = state.pin {
            if !pin.expired(now) {
                return Hint::Pin {
                    location: pin.location,
                };
            }
            // Re-evaluated from scratch (UVM unmaps the remote mappings so the next access
            // faults and decides again).
            *state = PageState::fresh(now);
            self.stats.pin_expired += 1;
            tracing::debug!(%page, "thrashing pin expired");
            return Hint::None;
        }
        if !state.live(now, self.config.lapse) {
            return Hint::None;
        }
        if state.throttled_periods >= self.config.pin_threshold {
            let location = preferred.unwrap_or(Processor::Cpu);
            state.pin = Some(Pin {
                location,
                until: self.spans.pin.and_then(|d| now.checked_add(d)),
            });
            state.period = None;
            state.throttled_periods = 0;
            self.stats.pins += 1;
            tracing::debug!(%page, ?location, "thrashing page pinned");
            return Hint::Pin { location };
        }
        let period = match &mut state.period {
            Some(period) if now < period.end => {
                if period.serviced.is_none() {
                    period.serviced = Some(requester);
                }
                period
            }
            last => {
                // A new period: the first to ask is serviced, unless it was serviced in the
                // previous one (UVM's thrashing_throttle_update), so processors alternate.
                let previous = last.and_then(|p| p.serviced);
                last.insert(Period {
                    end: now.saturating_add(self.spans.nap),
                    serviced: (previous != Some(requester)).then_some(requester),
                    throttled: false,
                })
            }
        };
        if period.serviced == Some(requester) {
            return Hint::None;
        }
        let until = period.end;
        if !period.throttled {
            period.throttled = true;
            state.throttled_periods += 1;
        }
        self.stats.throttles += 1;
        Hint::Throttle { until }
    }

    /// Is the page holding `page` thrashing at `now` (pinned, or declared thrashing with its last
    /// migration within a lapse)?
    pub fn is_thrashing(&self, page: VirtAddr, now: Duration) -> bool {
        self.config.enabled
            && self
                .page(page)
                .is_some_and(|s| s.live(now, self.config.lapse))
    }

    /// Where the page holding `page` is pinned at `now`, if it is.
    pub fn pinned(&self, page: VirtAddr, now: Duration) -> Option<Processor> {
        self.page(page)
            .and_then(|s| s.pin)
            .filter(|pin| !pin.expired(now))
            .map(|pin| pin.location)
    }

    /// The pages of the 2 MiB block holding `addr` that are thrashing at `now` (as
    /// [`ThrashingDetector::is_thrashing`] has it), by index in the block: what the prefetcher
    /// and migration windows must leave out (UVM excludes thrashing pages from prefetch, and
    /// does not upgrade a region holding one to a big page). Costs the pages tracked in that
    /// block, not the block's 512.
    pub fn thrashing_in_block(&self, addr: VirtAddr, now: Duration) -> BlockMask {
        let mut mask = BlockMask::new();
        if !self.config.enabled {
            return mask;
        }
        let (block_no, _) = split(addr);
        if let Some(block) = self.blocks.get(&block_no) {
            for (&index, state) in &block.pages {
                if state.live(now, self.config.lapse) {
                    mask.set(usize::from(index));
                }
            }
        }
        mask
    }

    fn page(&self, page: VirtAddr) -> Option<&PageState> {
        let (block_no, index) = split(page);
        self.blocks.get(&block_no)?.pages.get(&index)
    }

    /// Housekeeping at `now`: expires pins, then frees the state of blocks with nothing pinned
    /// that have been quiet for `epoch × lapse`. A block that thrashed is *reset* (counted in
    /// [`ThrashingStats::resets`]) at most `max_resets` times; after that it stays tracked, so a
    /// block that keeps re-thrashing stays under management. A block that never thrashed since
    /// its last reset is simply dropped: its pages' counts would restart anyway.
    pub fn tick(&mut self, now: Duration) {
        let epoch = self.spans.epoch;
        let max_resets = self.config.max_resets;
        let stats = &mut self.stats;
        self.blocks.retain(|&block_no, block| {
            let mut pinned = false;
            for state in block.pages.values_mut() {
                match state.pin {
                    Some(pin) if pin.expired(now) => {
                        *state = PageState::fresh(now);
                        stats.pin_expired += 1;
                    }
                    Some(_) => pinned = true,
                    None => {}
                }
            }
            if pinned {
                return true;
            }
            match block.last_thrashing {
                // Past max_resets the block stays tracked.
                Some(last) if now.saturating_sub(last) > epoch && block.resets < max_resets => {
                    block.resets += 1;
                    block.pages.clear();
                    block.last_thrashing = None;
                    stats.resets += 1;
                    tracing::debug!(
                        block = block_no,
                        resets = block.resets,
                        "thrashing block reset"
                    );
                }
                None if now.saturating_sub(block.last_event) > epoch => block.pages.clear(),
                _ => {}
            }
            // A reset block is kept (empty) to remember how many resets it has had.
            !block.pages.is_empty() || block.resets > 0
        });
    }

    /// The counters.
    pub fn stats(&self) -> ThrashingStats {
        ThrashingStats {
            pages_tracked: self.blocks.values().map(|b| b.pages.len() as u64).sum(),
            ..self.stats
        }
    }

    /// Checks the state invariants (see the module documentation).
    pub fn check_invariants(&self) -> Result<(), String> {
        for (&block_no, block) in &self.blocks {
            if block.resets > self.config.max_resets {
                return Err(format!(
                    "block {block_no:#x} reset {} times, max {}",
                    block.resets, self.config.max_resets
                ));
            }
            for (&index, p) in &block.pages {
                let at = format!("block {block_no:#x} page {index}");
                if u64::from(index) >= PAGES_PER_HUGE {
                    return Err(format!("{at}: index out of the block"));
                }
                if p.events > MAX_THRESHOLD {
                    return Err(format!("{at}: count {} over {MAX_THRESHOLD}", p.events));
                }
                if p.thrashing && p.events < self.config.threshold {
                    return Err(format!("{at}: thrashing with count {}", p.events));
                }
                if p.throttled_periods > self.config.pin_threshold {
                    return Err(format!(
                        "{at}: {} throttling periods, pin threshold {}",
                        p.throttled_periods, self.config.pin_threshold
                    ));
                }
                if p.pin.is_some() && (p.period.is_some() || p.throttled_periods > 0) {
                    return Err(format!("{at}: pinned and throttled"));
                }
                if block.last_thrashing.is_none()
                    && (p.thrashing || p.pin.is_some() || p.throttled_periods > 0)
                {
                    return Err(format!(
                        "{at}: thrashing state in a block that never thrashed"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CPU: Processor = Processor::Cpu;
    use crate::addr::DeviceId;
    const GPU: Processor = Processor::Device(DeviceId(0));
    const GPU1: Processor = Processor::Device(DeviceId(1));
    const PAGE: VirtAddr = VirtAddr(0x7f00_0020_3000);
    /// The default lapse, and so the default throttling period.
    const LAPSE: Duration = Duration::from_micros(500);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn detector(config: ThrashingConfig) -> ThrashingDetector {
        let det = ThrashingDetector::new(config).unwrap();
        det.check_invariants().unwrap();
        det
    }

    fn cause(to: Processor) -> MigrationCause {
        match to {
            Processor::Cpu => MigrationCause::CpuFault,
            Processor::Device(_) => MigrationCause::DeviceFault,
        }
    }

    /// Migrates `page` back and forth between the CPU and the GPU at each time, starting on the
    /// CPU; returns where it ends.
    fn ping_pong(det: &mut ThrashingDetector, page: VirtAddr, times: &[Duration]) -> Processor {
        let mut at = CPU;
        for &t in times {
            let to = if at == CPU { GPU } else { CPU };
            det.record_migration(page, at, to, cause(to), t);
            det.check_invariants().unwrap();
            at = to;
        }
        at
    }

    /// Drives `periods` throttling periods of a CPU/GPU fight over a thrashing `page` resident on
    /// the GPU, the first at `start`: in each, one processor is serviced and migrates the page, the
    /// other is throttled to the period's end. Returns the start of the next period.
    fn fight(
        det: &mut ThrashingDetector,
        page: VirtAddr,
        start: Duration,
        periods: u32,
    ) -> Duration {
        let mut t = start;
        for k in 0..periods {
            let (serviced, throttled) = if k % 2 == 0 { (CPU, GPU) } else { (GPU, CPU) };
            assert_eq!(det.hint(page, serviced, t, None), Hint::None, "period {k}");
            det.record_migration(page, throttled, serviced, cause(serviced), t + us(10));
            assert_eq!(
                det.hint(page, throttled, t + us(20), None),
                Hint::Throttle { until: t + LAPSE },
                "period {k}"
            );
            det.check_invariants().unwrap();
            t += LAPSE;
        }
        t
    }

    #[test]
    fn thrashing_declared_exactly_at_threshold_migrations_within_lapse() {
        for threshold in 1..=MAX_THRESHOLD {
            let mut det = detector(ThrashingConfig {
                threshold,
                ..Default::default()
            });
            let times: Vec<_> = (0..u64::from(threshold)).map(|i| us(i * 500)).collect();
            ping_pong(&mut det, PAGE, &times[..times.len() - 1]);
            let before = *times.last().unwrap();
            assert!(!det.is_thrashing(PAGE, before), "threshold {threshold}");
            assert_eq!(det.stats().thrashing_detected, 0);
            ping_pong(&mut det, PAGE, &times[times.len() - 1..]);
            assert!(det.is_thrashing(PAGE, before), "threshold {threshold}");
            assert_eq!(det.stats().thrashing_detected, 1);
            // Further migrations in the same run do not declare it again.
            ping_pong(&mut det, PAGE, &[before + us(100), before + us(200)]);
            assert_eq!(det.stats().thrashing_detected, 1);
        }
    }

    #[test]
    fn a_gap_longer_than_lapse_restarts_the_count() {
        let mut det = detector(ThrashingConfig::default());
        // The third migration comes 1 ns too late: the count restarts at 1.
        ping_pong(
            &mut det,
            PAGE,
            &[us(0), us(500), us(1000) + Duration::from_nanos(1)],
        );
        assert!(!det.is_thrashing(PAGE, us(1001)));
        // Two more within the lapse make three in a row.
        let _ = ping_pong(&mut det, PAGE, &[us(1400), us(1800)]);
        assert!(det.is_thrashing(PAGE, us(1800)));
        // Thrashing is live only while the last migration is within a lapse.
        assert!(det.is_thrashing(PAGE, us(2300)));
        assert!(!det.is_thrashing(PAGE, us(2300) + Duration::from_nanos(1)));
        assert_eq!(
            det.hint(PAGE, GPU, us(2301), None),
            Hint::None,
            "a page that stopped thrashing is serviced"
        );
        // A late migration breaks the run for good.
        ping_pong(&mut det, PAGE, &[us(5000)]);
        assert!(!det.is_thrashing(PAGE, us(5000)));
        assert_eq!(det.stats().thrashing_detected, 1);
        det.check_invariants().unwrap();
    }

    #[test]
    fn only_fault_access_counter_and_prefetch_migrations_count() {
        for (c, counts) in [
            (MigrationCause::DeviceFault, true),
            (MigrationCause::CpuFault, true),
            (MigrationCause::AccessCounter, true),
            (MigrationCause::Prefetch, true),
            (MigrationCause::UserPrefetch, false),
            (MigrationCause::Eviction, false),
        ] {
            assert_eq!(c.counts(), counts);
            let mut det = detector(ThrashingConfig::default());
            for i in 0..3 {
                let (from, to) = if i % 2 == 0 { (CPU, GPU) } else { (GPU, CPU) };
                det.record_migration(PAGE, from, to, c, us(i * 100));
            }
            assert_eq!(det.is_thrashing(PAGE, us(200)), counts, "{c:?}");
            assert_eq!(det.stats().pages_tracked, u64::from(counts), "{c:?}");
        }
        // A migration that stays put is no event either.
        let mut det = detector(ThrashingConfig::default());
        for i in 0..5 {
            det.record_migration(PAGE, GPU, GPU, MigrationCause::DeviceFault, us(i));
        }
        assert_eq!(det.stats().pages_tracked, 0);
    }

    #[test]
    fn a_disabled_detector_records_nothing_and_never_hints() {
        let mut det = detector(ThrashingConfig {
            enabled: false,
            ..Default::default()
        });
        ping_pong(&mut det, PAGE, &[us(0), us(1), us(2), us(3)]);
        assert!(!det.is_thrashing(PAGE, us(3)));
        assert_eq!(det.hint(PAGE, CPU, us(4), None), Hint::None);
        assert_eq!(det.stats(), ThrashingStats::default());
    }

    #[test]
    fn pages_are_tracked_separately_even_in_one_block() {
        let mut det = detector(ThrashingConfig::default());
        let other = VirtAddr(PAGE.0 + 0x1000);
        ping_pong(&mut det, PAGE, &[us(0), us(100), us(200)]);
        ping_pong(&mut det, other, &[us(0), us(100)]);
        // An unaligned address means its page.
        assert!(det.is_thrashing(VirtAddr(PAGE.0 + 0x123), us(200)));
        assert!(!det.is_thrashing(other, us(200)));
        assert_eq!(det.hint(other, CPU, us(300), None), Hint::None);
        assert_eq!(det.stats().pages_tracked, 2);
    }

    #[test]
    fn throttle_alternates_processors_between_periods() {
        let mut det = detector(ThrashingConfig::default());
        assert_eq!(ping_pong(&mut det, PAGE, &[us(0), us(100), us(200)]), GPU);
        // Period 1 [300, 800): the CPU asks first and is serviced; the GPU waits it out.
        assert_eq!(det.hint(PAGE, CPU, us(300), None), Hint::None);
        det.record_migration(PAGE, GPU, CPU, MigrationCause::CpuFault, us(310));
        let until = Hint::Throttle { until: us(800) };
        assert_eq!(det.hint(PAGE, GPU, us(400), None), until);
        assert_eq!(det.hint(PAGE, GPU, us(799), None), until, "still throttled");
        assert_eq!(det.hint(PAGE, CPU, us(700), None), Hint::None);
        // Period 2 [800, 1300): the GPU's turn.
        assert_eq!(det.hint(PAGE, GPU, us(800), None), Hint::None);
        det.record_migration(PAGE, CPU, GPU, MigrationCause::DeviceFault, us(810));
        assert_eq!(
            det.hint(PAGE, CPU, us(900), None),
            Hint::Throttle { until: us(1300) }
        );
        // Period 3 [1300, 1800): the GPU asks first again but was serviced last period, so it is
        // throttled and the CPU, asking next, is serviced.
        assert_eq!(
            det.hint(PAGE, GPU, us(1300), None),
            Hint::Throttle { until: us(1800) }
        );
        assert_eq!(det.hint(PAGE, CPU, us(1305), None), Hint::None);
        det.record_migration(PAGE, GPU, CPU, MigrationCause::CpuFault, us(1310));
        assert_eq!(
            det.hint(PAGE, GPU1, us(1320), None),
            Hint::Throttle { until: us(1800) },
            "a third processor waits too"
        );
        assert_eq!(det.stats().throttles, 5);
        assert_eq!(det.stats().pins, 0);
        det.check_invariants().unwrap();
    }

    #[test]
    fn pin_after_pin_threshold_periods_to_the_preferred_location() {
        for pin_threshold in [1, 2, 10] {
            let mut det = detector(ThrashingConfig {
                pin_threshold,
                ..Default::default()
            });
            ping_pong(&mut det, PAGE, &[us(0), us(10), us(20)]);
            let t = fight(&mut det, PAGE, us(100), pin_threshold);
            assert_eq!(det.stats().throttles, u64::from(pin_threshold));
            assert_eq!(det.pinned(PAGE, t), None);
            let pin = Hint::Pin { location: GPU1 };
            assert_eq!(det.hint(PAGE, CPU, t, Some(GPU1)), pin);
            assert_eq!(det.stats().pins, 1);
            assert_eq!(det.pinned(PAGE, t), Some(GPU1));
            assert!(
                det.is_thrashing(PAGE, t + us(100_000)),
                "pinned pages stay thrashing"
            );
            // Every processor is told the same; the preferred location given later is ignored.
            assert_eq!(det.hint(PAGE, GPU, t + us(1), None), pin);
            assert_eq!(det.hint(PAGE, CPU, t + us(2), Some(CPU)), pin);
            assert_eq!(det.stats().pins, 1);
            // Carrying out the pin is no thrashing event.
            det.record_migration(PAGE, GPU, GPU1, MigrationCause::CpuFault, t + us(3));
            assert_eq!(det.pinned(PAGE, t + us(4)), Some(GPU1));
            det.check_invariants().unwrap();
        }
    }

    #[test]
    fn pin_goes_to_the_cpu_without_a_preferred_location() {
        let mut det = detector(ThrashingConfig {
            pin_threshold: 3,
            ..Default::default()
        });
        ping_pong(&mut det, PAGE, &[us(0), us(10), us(20)]);
        let t = fight(&mut det, PAGE, us(100), 3);
        assert_eq!(det.hint(PAGE, GPU, t, None), Hint::Pin { location: CPU });
    }

    #[test]
    fn pin_expires_after_pin_lapses_and_the_page_starts_over() {
        let mut det = detector(ThrashingConfig {
            pin_threshold: 1,
            ..Default::default()
        });
        ping_pong(&mut det, PAGE, &[us(0), us(10), us(20)]);
        let t = fight(&mut det, PAGE, us(100), 1);
        assert_eq!(det.hint(PAGE, CPU, t, None), Hint::Pin { location: CPU });
        let expiry = t + LAPSE * 300;
        assert_eq!(expiry - t, Duration::from_millis(150));
        let before = expiry - Duration::from_nanos(1);
        assert_eq!(det.pinned(PAGE, before), Some(CPU));
        assert_eq!(
            det.hint(PAGE, GPU, before, None),
            Hint::Pin { location: CPU }
        );
        assert_eq!(det.pinned(PAGE, expiry), None);
        assert!(!det.is_thrashing(PAGE, expiry));
        assert_eq!(det.hint(PAGE, GPU, expiry, None), Hint::None);
        assert_eq!(det.stats().pin_expired, 1);
        // From scratch: one migration is a count of 1, not thrashing.
        det.record_migration(PAGE, CPU, GPU, MigrationCause::DeviceFault, expiry + us(1));
        assert!(!det.is_thrashing(PAGE, expiry + us(1)));
        assert_eq!(det.hint(PAGE, CPU, expiry + us(2), None), Hint::None);
        // And it thrashes again only after a new run, throttled before any new pin.
        ping_pong(&mut det, PAGE, &[expiry + us(10), expiry + us(20)]);
        assert!(det.is_thrashing(PAGE, expiry + us(20)));
        assert!(matches!(
            det.hint(PAGE, CPU, expiry + us(30), None),
            Hint::None | Hint::Throttle { .. }
        ));
        assert_eq!(det.stats().pin_expired, 1);
        assert_eq!(det.stats().thrashing_detected, 2);
        det.check_invariants().unwrap();
    }

    #[test]
    fn pin_expiry_is_noticed_by_migrations_and_ticks_too() {
        let config = ThrashingConfig {
            pin_threshold: 1,
            pin: 2,
            ..Default::default()
        };
        for by_tick in [false, true] {
            let mut det = detector(config);
            ping_pong(&mut det, PAGE, &[us(0), us(10), us(20)]);
            let t = fight(&mut det, PAGE, us(100), 1);
            assert_eq!(det.hint(PAGE, CPU, t, None), Hint::Pin { location: CPU });
            let expiry = t + LAPSE * 2;
            if by_tick {
                det.tick(expiry);
            } else {
                det.record_migration(PAGE, CPU, GPU, MigrationCause::DeviceFault, expiry);
            }
            assert_eq!(det.stats().pin_expired, 1, "by tick: {by_tick}");
            assert_eq!(det.pinned(PAGE, expiry), None);
            assert_eq!(det.hint(PAGE, CPU, expiry, None), Hint::None);
            assert_eq!(det.stats().pin_expired, 1, "counted once");
            det.check_invariants().unwrap();
        }
    }

    #[test]
    fn pin_zero_never_expires() {
        let mut det = detector(ThrashingConfig {
            pin_threshold: 1,
            pin: 0,
            ..Default::default()
        });
        ping_pong(&mut det, PAGE, &[us(0), us(10), us(20)]);
        let t = fight(&mut det, PAGE, us(100), 1);
        assert_eq!(
            det.hint(PAGE, CPU, t, Some(GPU)),
            Hint::Pin { location: GPU }
        );
        let much_later = t + Duration::from_secs(1_000_000);
        det.tick(much_later);
        assert_eq!(det.pinned(PAGE, much_later), Some(GPU));
        assert_eq!(
            det.hint(PAGE, CPU, much_later, None),
            Hint::Pin { location: GPU }
        );
        assert_eq!(det.stats().pin_expired, 0);
        assert_eq!(det.stats().resets, 0, "a block is never reset while pinned");
    }

    #[test]
    fn thrashing_in_block_lists_the_live_pages_of_one_block() {
        let mut det = detector(ThrashingConfig {
            pin_threshold: 1,
            ..Default::default()
        });
        let block = VirtAddr(PAGE.0 & !(HUGE_PAGE_SIZE - 1));
        let index = |a: VirtAddr| ((a.0 - block.0) >> PAGE_SHIFT) as usize;
        let quiet = VirtAddr(PAGE.0 + 0x1000);
        let pinned = VirtAddr(PAGE.0 + 0x2000);
        let elsewhere = VirtAddr(PAGE.0 + HUGE_PAGE_SIZE);
        ping_pong(&mut det, PAGE, &[us(0), us(10), us(20)]);
        ping_pong(&mut det, quiet, &[us(0), us(10)]);
        ping_pong(&mut det, pinned, &[us(0), us(10), us(20)]);
        ping_pong(&mut det, elsewhere, &[us(0), us(10), us(20)]);
        let t = fight(&mut det, pinned, us(100), 1);
        assert_eq!(det.hint(pinned, CPU, t, None), Hint::Pin { location: CPU });
        let mask = det.thrashing_in_block(PAGE, us(30));
        assert_eq!(
            mask.iter().collect::<Vec<_>>(),
            vec![index(PAGE), index(pinned)]
        );
        assert_eq!(
            det.thrashing_in_block(VirtAddr(block.0 + 0x5000), us(30)),
            mask
        );
        // Past a lapse without migrations PAGE is no longer thrashing; the pin holds.
        let later = t + LAPSE * 2;
        assert_eq!(
            det.thrashing_in_block(PAGE, later)
                .iter()
                .collect::<Vec<_>>(),
            vec![index(pinned)]
        );
        for a in [PAGE, quiet, pinned] {
            assert_eq!(
                det.thrashing_in_block(PAGE, later).contains(index(a)),
                det.is_thrashing(a, later)
            );
        }
        let off = detector(ThrashingConfig {
            enabled: false,
            ..Default::default()
        });
        assert!(off.thrashing_in_block(PAGE, us(0)).is_empty());
    }

    #[test]
    fn block_reset_after_an_epoch_without_thrashing() {
        let mut det = detector(ThrashingConfig::default());
        ping_pong(&mut det, PAGE, &[us(0), us(10), us(20)]);
        // A page of the same block that never thrashed goes with it.
        ping_pong(&mut det, VirtAddr(PAGE.0 + 0x1000), &[us(30)]);
        assert_eq!(det.hint(PAGE, CPU, us(100), None), Hint::None);
        assert!(matches!(
            det.hint(PAGE, GPU, us(110), None),
            Hint::Throttle { .. }
        ));
        let epoch = Duration::from_secs(1);
        assert_eq!(LAPSE * 2000, epoch);
        det.tick(us(20) + epoch);
        assert_eq!(det.stats().resets, 0, "not before a full epoch");
        assert_eq!(det.stats().pages_tracked, 2);
        det.tick(us(20) + epoch + Duration::from_nanos(1));
        assert_eq!(det.stats().resets, 1);
        assert_eq!(det.stats().pages_tracked, 0);
        det.check_invariants().unwrap();
        // After the reset the page starts over.
        ping_pong(&mut det, PAGE, &[epoch * 2, epoch * 2 + us(10)]);
        assert!(!det.is_thrashing(PAGE, epoch * 2 + us(10)));
    }

    #[test]
    fn thrashing_keeps_a_block_from_being_reset() {
        let mut det = detector(ThrashingConfig::default());
        let times: Vec<_> = (0..5000).map(|i| us(i * 400)).collect();
        ping_pong(&mut det, PAGE, &times);
        det.tick(*times.last().unwrap());
        assert_eq!(det.stats().resets, 0);
        assert!(det.is_thrashing(PAGE, *times.last().unwrap()));
    }

    #[test]
    fn block_not_reset_while_a_page_is_pinned() {
        // Pins of 3000 lapses (1.5 s) outlive the epoch (1 s).
        let mut det = detector(ThrashingConfig {
            pin_threshold: 1,
            pin: 3000,
            ..Default::default()
        });
        let other = VirtAddr(PAGE.0 + 0x5000);
        ping_pong(&mut det, PAGE, &[us(0), us(10), us(20)]);
        ping_pong(&mut det, other, &[us(0), us(10), us(20)]);
        let t = fight(&mut det, PAGE, us(100), 1);
        assert_eq!(det.hint(PAGE, CPU, t, None), Hint::Pin { location: CPU });
        // The block has not thrashed for more than an epoch, but PAGE is pinned.
        let quiet = t + Duration::from_secs(1);
        det.tick(quiet);
        assert_eq!(det.stats().resets, 0);
        assert_eq!(det.stats().pages_tracked, 2);
        assert_eq!(det.pinned(PAGE, quiet), Some(CPU));
        assert!(det.is_thrashing(PAGE, quiet));
        // Once the pin expired, the quiet block is reset.
        let expiry = t + LAPSE * 3000;
        det.tick(expiry);
        assert_eq!(det.stats().pin_expired, 1);
        assert_eq!(det.stats().resets, 1);
        assert_eq!(det.stats().pages_tracked, 0);
        det.check_invariants().unwrap();
    }

    #[test]
    fn a_block_is_reset_at_most_max_resets_times_then_stays_tracked() {
        let max_resets = 2;
        let mut det = detector(ThrashingConfig {
            max_resets,
            ..Default::default()
        });
        let epoch = Duration::from_secs(1);
        let mut t = Duration::ZERO;
        for round in 0..4u64 {
            ping_pong(&mut det, PAGE, &[t, t + us(10), t + us(20)]);
            assert!(det.is_thrashing(PAGE, t + us(20)));
            t += us(20) + epoch + us(1);
            det.tick(t);
            let resets = (round + 1).min(u64::from(max_resets));
            assert_eq!(det.stats().resets, resets, "round {round}");
            assert_eq!(
                det.stats().pages_tracked,
                u64::from(round + 1 > u64::from(max_resets)),
                "round {round}"
            );
            det.check_invariants().unwrap();
            t += epoch;
        }
        assert_eq!(det.stats().thrashing_detected, 4);
    }

    #[test]
    fn quiet_blocks_that_never_thrashed_are_dropped_without_a_reset() {
        let mut det = detector(ThrashingConfig::default());
        for i in 0..4 {
            let page = VirtAddr(i * HUGE_PAGE_SIZE);
            ping_pong(&mut det, page, &[us(i * 10), us(i * 10 + 1)]);
        }
        assert_eq!(det.stats().pages_tracked, 4);
        det.tick(Duration::from_secs(1));
        assert_eq!(det.stats().pages_tracked, 4);
        det.tick(Duration::from_secs(2));
        assert_eq!(det.stats().pages_tracked, 0);
        assert_eq!(det.stats().resets, 0);
        assert!(det.blocks.is_empty(), "nothing left behind");
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let ok = ThrashingConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let bad = |config: ThrashingConfig| {
            let err = config.validate().unwrap_err();
            assert_eq!(ThrashingDetector::new(config).unwrap_err(), err);
            err
        };
        for value in [0, 8, 100] {
            let config = ThrashingConfig {
                threshold: value,
                ..ok
            };
            assert_eq!(bad(config), ThrashingError::Threshold { value });
        }
        for value in [0, 256] {
            let config = ThrashingConfig {
                pin_threshold: value,
                ..ok
            };
            assert_eq!(bad(config), ThrashingError::PinThreshold { value });
        }
        let zero_lapse = ThrashingConfig {
            lapse: Duration::ZERO,
            ..ok
        };
        assert_eq!(bad(zero_lapse), ThrashingError::ZeroLapse);
        for value in [0, 101] {
            assert_eq!(
                bad(ThrashingConfig { nap: value, ..ok }),
                ThrashingError::Nap { value }
            );
        }
        assert_eq!(
            bad(ThrashingConfig { epoch: 0, ..ok }),
            ThrashingError::ZeroEpoch
        );
        let huge = ThrashingConfig {
            lapse: Duration::MAX,
            ..ok
        };
        assert_eq!(
            bad(huge),
            ThrashingError::Overflow {
                parameter: "epoch",
                lapses: 2000,
                lapse: Duration::MAX
            }
        );
        let long_pin = ThrashingConfig {
            lapse: Duration::from_secs(u64::MAX / 1000),
            nap: 1,
            epoch: 1,
            pin: 2000,
            ..ok
        };
        assert!(matches!(
            bad(long_pin),
            ThrashingError::Overflow {
                parameter: "pin",
                ..
            }
        ));
        // The bounds themselves are valid, and so is a disabled detector's config.
        for config in [
            ThrashingConfig {
                threshold: 1,
                pin_threshold: 255,
                nap: 100,
                epoch: 1,
                pin: 0,
                max_resets: 0,
                ..ok
            },
            ThrashingConfig {
                threshold: 7,
                pin_threshold: 1,
                nap: 1,
                enabled: false,
                ..ok
            },
        ] {
            assert_eq!(config.validate(), Ok(()));
        }
        assert!(ThrashingError::Threshold { value: 9 }
            .to_string()
            .contains("1..=7"));
    }

    /// One step of a random run.
    #[derive(Clone, Debug)]
    enum Op {
        Migrate {
            page: u8,
            from: u8,
            to: u8,
            cause: u8,
        },
        Hint {
            page: u8,
            requester: u8,
            preferred: Option<u8>,
        },
        Tick,
    }

    fn processor(i: u8) -> Processor {
        match i % 3 {
            0 => CPU,
            n => Processor::Device(DeviceId(n - 1)),
        }
    }

    /// Pages in two blocks.
    fn page_addr(i: u8) -> VirtAddr {
        VirtAddr(u64::from(i % 2) * HUGE_PAGE_SIZE + u64::from(i % 4) * 0x1000)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, 0u8..3, 0u8..3, 0u8..6).prop_map(|(page, from, to, cause)| Op::Migrate {
                page,
                from,
                to,
                cause
            }),
            4 => (0u8..4, 0u8..3, proptest::option::of(0u8..3)).prop_map(
                |(page, requester, preferred)| Op::Hint {
                    page,
                    requester,
                    preferred
                }
            ),
            1 => Just(Op::Tick),
        ]
    }

    /// Microseconds between two steps: mostly within a lapse, sometimes past an epoch.
    fn step() -> impl Strategy<Value = u64> {
        prop_oneof![12 => 0u64..120, 2 => 0u64..1500, 1 => 0u64..4000]
    }

    const CAUSES: [MigrationCause; 6] = [
        MigrationCause::DeviceFault,
        MigrationCause::CpuFault,
        MigrationCause::AccessCounter,
        MigrationCause::Prefetch,
        MigrationCause::UserPrefetch,
        MigrationCause::Eviction,
    ];

    proptest! {
        #[test]
        fn random_runs_keep_the_invariants(
            ops in proptest::collection::vec((op(), step()), 1..300),
            threshold in 1u32..=4,
            pin_threshold in 1u32..=3,
            pin in 0u32..4,
            epoch in 1u32..6,
            max_resets in 0u32..3,
        ) {
            let config = ThrashingConfig {
                threshold,
                pin_threshold,
                pin,
                epoch,
                max_resets,
                ..Default::default()
            };
            let mut det = detector(config);
            // Pages declared thrashing at some point of the run.
            let mut detected = [false; 4];
            let mut now = Duration::ZERO;
            for (op, step_us) in ops {
                now += us(step_us);
                let before = det.stats();
                match op {
                    Op::Migrate { page, from, to, cause } => {
                        let c = CAUSES[usize::from(cause)];
                        det.record_migration(page_addr(page), processor(from), processor(to), c, now);
                        let after = det.stats();
                        prop_assert!(after.thrashing_detected - before.thrashing_detected <= 1);
                        if after.thrashing_detected > before.thrashing_detected {
                            prop_assert!(c.counts() && from % 3 != to % 3);
                            detected[usize::from(page % 4)] = true;
                        }
                    }
                    Op::Hint { page, requester, preferred } => {
                        let addr = page_addr(page);
                        let thrashing = det.is_thrashing(addr, now);
                        let hint = det.hint(addr, processor(requester), now, preferred.map(processor));
                        match hint {
                            Hint::None => {}
                            Hint::Throttle { until } => {
                                prop_assert!(thrashing && detected[usize::from(page % 4)]);
                                prop_assert!(until > now && until <= now + LAPSE);
                                prop_assert_eq!(det.pinned(addr, now), None);
                            }
                            Hint::Pin { location } => {
                                prop_assert!(thrashing && detected[usize::from(page % 4)]);
                                prop_assert_eq!(det.pinned(addr, now), Some(location));
                                if det.stats().pins > before.pins {
                                    prop_assert_eq!(location, preferred.map_or(CPU, processor));
                                }
                            }
                        }
                        if !thrashing {
                            prop_assert_eq!(hint, Hint::None);
                        }
                    }
                    Op::Tick => det.tick(now),
                }
                if let Err(e) = det.check_invariants() {
                    return Err(TestCaseError::fail(e));
                }
                for i in 0..4u8 {
                    let addr = page_addr(i);
                    if det.pinned(addr, now).is_some() {
                        prop_assert!(det.is_thrashing(addr, now));
                    }
                }
                let stats = det.stats();
                prop_assert!(stats.pins <= stats.thrashing_detected);
                prop_assert!(stats.pin_expired <= stats.pins);
                prop_assert!(stats.resets <= 2 * u64::from(max_resets));
                prop_assert!(stats.pages_tracked <= 4);
            }
        }
    }
}
