//! The tokio runtime the sidecar runs on. A sidecar usually gets a core or less (its CPU limit),
//! and one busy worker beats two that keep waking each other: with one worker the process uses
//! tokio's current-thread scheduler (no work stealing, no cross-thread wake-ups); otherwise a
//! multi-thread scheduler with that many workers. `0` means one per core the process may use,
//! which honours a cgroup CPU quota (a Kubernetes CPU limit).
use std::{io, num::NonZeroUsize};
use tokio::runtime::{Builder, Runtime};

/// How many workers `worker_threads` asks for: itself, or the usable cores when it is 0.
pub fn workers(worker_threads: usize) -> usize {
    match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n,
    }
}

/// A runtime with `workers(worker_threads)` workers, I/O and timers enabled.
pub fn build(worker_threads: usize) -> io::Result<Runtime> {
    let mut builder = match workers(worker_threads) {
        1 => Builder::new_current_thread(),
        n => {
            let mut builder = Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all().thread_name("callout-worker").build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_is_the_current_thread_scheduler() {
        let rt = build(1).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), tokio::runtime::RuntimeFlavor::CurrentThread);
        assert_eq!(rt.metrics().num_workers(), 1);
    }

    #[test]
    fn more_workers_are_a_multi_thread_scheduler() {
        let rt = build(3).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), tokio::runtime::RuntimeFlavor::MultiThread);
        assert_eq!(rt.metrics().num_workers(), 3);
    }

    #[test]
    fn zero_means_the_usable_cores() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(workers(0), cores);
        assert_eq!(build(0).unwrap().metrics().num_workers(), cores);
    }
}
