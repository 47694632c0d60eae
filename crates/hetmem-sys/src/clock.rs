//! Per-thread CPU time: what a service thread spent running, as opposed to waiting for a core
//! (the simulated compute units are host threads competing for the same cores, which a real
//! device's compute units never do).

use std::time::Duration;

use rustix::time::{clock_gettime, ClockId};

/// CPU time the calling thread has consumed (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Duration {
    let ts = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_advances_with_work_not_with_sleep() {
        let t0 = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_time() - t0;
        let t1 = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() - t1 < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let worked = thread_cpu_time() - t1;
        assert!(
            slept < Duration::from_millis(15),
            "sleep counted as CPU time: {slept:?}"
        );
        assert!(worked >= Duration::from_millis(20));
    }
}
