//! The tokio runtimes the sidecar runs on. A sidecar usually gets a core or less (its CPU limit),
//! and one busy worker beats two that keep waking each other. So with one worker the process
//! uses tokio's current-thread scheduler (no work stealing, no cross-thread wake-ups), and with
//! more it runs, by default, one current-thread runtime per worker (`per-core`): each serves the
//! connections handed to it, with its own upstream connection pools, so an action never crosses
//! threads. `work-stealing` is one multi-thread scheduler instead, for a caller whose load comes
//! down one connection (a per-core runtime serves a connection on one core). `0` workers means
//! one per core the process may use, which honours a cgroup CPU quota (a Kubernetes CPU limit).
use serde::{Deserialize, Serialize};
use std::{io, num::NonZeroUsize};
use tokio::runtime::{Builder, Runtime};

/// How more than one worker shares the work (`server.runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// One current-thread runtime per worker; connections are dealt out to them in turn.
    #[default]
    PerCore,
    /// One multi-thread runtime whose workers steal each other's tasks.
    WorkStealing,
}

/// How many workers `worker_threads` asks for: itself, or the usable cores when it is 0.
pub fn workers(worker_threads: usize) -> usize {
    match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n,
    }
}

/// How many runtimes serve connections: every worker's with `per-core`, else the one.
pub fn cores(worker_threads: usize, layout: Layout) -> usize {
    match layout {
        Layout::PerCore => workers(worker_threads),
        Layout::WorkStealing => 1,
    }
}

/// The runtime the process starts on. With `per-core` it is the first core's (the server starts
/// the others, `cores - 1` of them, with [`core`]); with `work-stealing` it has every worker.
pub fn build(worker_threads: usize, layout: Layout) -> io::Result<Runtime> {
    match (workers(worker_threads), layout) {
        (1, _) | (_, Layout::PerCore) => core(0),
        (n, Layout::WorkStealing) => {
            Builder::new_multi_thread().worker_threads(n).enable_all().thread_name("callout-worker").build()
        }
    }
}

/// A current-thread runtime for core `index`, I/O and timers enabled; its blocking pool's threads
/// are named after it.
pub fn core(index: usize) -> io::Result<Runtime> {
    Builder::new_current_thread().enable_all().thread_name(format!("callout-core-{index}")).build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_worker_is_the_current_thread_scheduler_either_way() {
        for layout in [Layout::PerCore, Layout::WorkStealing] {
            let rt = build(1, layout).unwrap();
            assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
            assert_eq!(rt.metrics().num_workers(), 1);
            assert_eq!(cores(1, layout), 1);
        }
    }

    #[test]
    fn per_core_starts_on_one_current_thread_runtime_and_serves_on_every_worker() {
        let rt = build(3, Layout::PerCore).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        assert_eq!(cores(3, Layout::PerCore), 3);
        assert_eq!(Layout::default(), Layout::PerCore);
    }

    #[test]
    fn work_stealing_is_one_multi_thread_scheduler() {
        let rt = build(3, Layout::WorkStealing).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(rt.metrics().num_workers(), 3);
        assert_eq!(cores(3, Layout::WorkStealing), 1);
    }

    #[test]
    fn zero_means_the_usable_cores() {
        let usable = std::thread::available_parallelism().unwrap().get();
        assert_eq!(workers(0), usable);
        assert_eq!(cores(0, Layout::PerCore), usable);
        assert_eq!(build(0, Layout::WorkStealing).unwrap().metrics().num_workers(), usable);
    }
}
