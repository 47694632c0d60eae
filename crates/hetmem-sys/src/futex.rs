//! Futex wait / wake on an `AtomicU32`: the blocking primitive that may be used inside a signal
//! handler.
//!
//! Both calls are a single `futex(2)` system call (rustix's raw-syscall backend), so they are
//! async-signal-safe: a fault handler in [`crate::signal`] can park the faulting thread on a
//! per-page state word until the thread that holds the page lock wakes it. Private futexes only
//! (`FUTEX_PRIVATE_FLAG`): the word must not be shared with another process.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use rustix::io::Errno;
use rustix::thread::futex::{self, Timespec};

/// Blocks while `*word == expected`, at most `timeout` (relative) when given.
///
/// Returns `false` only when the timeout expired. `true` means "re-check the word": a wake-up,
/// the word no longer being `expected` (`EAGAIN`), a signal (`EINTR`), or a spurious return.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> bool {
    let ts = timeout.map(|d| Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos().into(),
    });
    match futex::wait(word, futex::Flags::PRIVATE, expected, ts.as_ref()) {
        Ok(()) => true,
        Err(Errno::TIMEDOUT) => false,
        // AGAIN: the value changed; INTR: a signal; anything else cannot happen for a valid
        // reference, and "re-check" is the safe answer.
        Err(_) => true,
    }
}

/// Wakes at most `n` threads waiting on `word` (`u32::MAX`: all of them); returns how many woke.
pub fn wake(word: &AtomicU32, n: u32) -> u32 {
    // The kernel reads the count as an `int`: u32::MAX would be -1, which wakes only one.
    let n = n.min(i32::MAX as u32);
    futex::wake(word, futex::Flags::PRIVATE, n).map_or(0, |woken| woken as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wait_returns_at_once_when_value_differs() {
        let w = AtomicU32::new(1);
        assert!(wait(&w, 0, Some(Duration::from_secs(5))));
    }

    #[test]
    fn wait_times_out() {
        let w = AtomicU32::new(0);
        let t = Instant::now();
        assert!(!wait(&w, 0, Some(Duration::from_millis(20))));
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert_eq!(wake(&w, 1), 0);
    }

    #[test]
    fn waiter_is_woken_by_store_and_wake() {
        let w = Arc::new(AtomicU32::new(0));
        let w2 = w.clone();
        let waiter = std::thread::spawn(move || {
            let mut rounds = 0;
            while w2.load(Ordering::Acquire) == 0 {
                assert!(wait(&w2, 0, Some(Duration::from_secs(5))), "timed out");
                rounds += 1;
            }
            rounds
        });
        std::thread::sleep(Duration::from_millis(20));
        w.store(1, Ordering::Release);
        wake(&w, u32::MAX);
        let rounds = waiter.join().unwrap();
        assert!(rounds <= 2, "{rounds}");
    }

    #[test]
    fn wake_all_wakes_several() {
        let w = Arc::new(AtomicU32::new(0));
        let ts: Vec<_> = (0..3)
            .map(|_| {
                let w = w.clone();
                std::thread::spawn(move || {
                    while w.load(Ordering::Acquire) == 0 {
                        wait(&w, 0, Some(Duration::from_secs(5)));
                    }
                })
            })
            .collect();
        // Give the three time to park; any that had not yet parked see the store instead.
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        w.store(1, Ordering::Release);
        let woken = wake(&w, u32::MAX);
        for t in ts {
            t.join().unwrap();
        }
        assert!(woken <= 3, "{woken}");
        // All were released well before their 5 s timeouts.
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
