//! The compute pool: tensor work runs here, at most `threads` jobs at once.
//! Callers wait for a permit instead of piling threads onto the cores; the
//! permits go round-robin across tenants and, within a tenant, across
//! connections ([`crate::scheduler`]), so that one caller's flood of jobs
//! delays another's by a bounded number of jobs. Large jobs run on blocking
//! threads, off the async runtime; small ones (see [`INLINE_BYTES`]) run
//! where they are awaited.
//!
//! A job started for a request whose client deadline has already passed is
//! not run (see [`with_deadline`]): its result could only be thrown away, and
//! a train step nobody waits for must not move the running statistics.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

pub use crate::scheduler::Caller;
use crate::scheduler::{FairPermit, FairPermits};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::rpc::current_rpc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ComputeError {
    /// The job panicked (a libtorch call without an `f_` guard, or a bug).
    #[error("compute job failed: {0}")]
    JobFailed(String),
    #[error("compute pool is shut down")]
    Closed,
    /// The request's deadline passed before its job could start; nothing ran.
    #[error("deadline exceeded before compute started")]
    DeadlineExceeded,
}

tokio::task_local! {
    static DEADLINE: Instant;
    static CALLER: Caller;
}

/// Runs `future` (a request's handling) as `caller`: its jobs wait for
/// their permits in that caller's queue.
pub async fn as_caller<F: Future>(caller: Caller, future: F) -> F::Output {
    CALLER.scope(caller, future).await
}

/// The caller the current task serves (the default, shared caller for work
/// done for no request).
pub fn current_caller() -> Caller {
    CALLER.try_with(Caller::clone).unwrap_or_default()
}

/// Runs `future` (a request's handling) with `deadline`: jobs it starts on
/// the pool after that instant fail with [`ComputeError::DeadlineExceeded`]
/// instead of running. `None`: no deadline.
pub async fn with_deadline<F: Future>(deadline: Option<Instant>, future: F) -> F::Output {
    match deadline {
        Some(deadline) => DEADLINE.scope(deadline, future).await,
        None => future.await,
    }
}

/// The deadline of the request the current task serves, if it has one.
pub fn current_deadline() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok()
}

/// Refuses to start a job past the current request's deadline.
fn check_deadline() -> Result<(), ComputeError> {
    match current_deadline() {
        Some(deadline) if Instant::now() >= deadline => Err(ComputeError::DeadlineExceeded),
        _ => Ok(()),
    }
}

/// Jobs over at most this many input bytes run on the awaiting (async)
/// thread. Handing a job to a blocking thread and back costs two thread
/// wake-ups — tens of microseconds on two shared cores (more in a VM, where
/// each is an inter-processor interrupt), several times the batch norm of a
/// 1 KiB tensor — while a 256 KiB batch norm (a (1024,64) float32 shard)
/// keeps the async thread busy for about 30 µs. A synchronized step of 8
/// such shards makes 16 of these hand-offs; run inline, the step over shared
/// memory took 0.9 ms instead of 1.46 ms. Larger jobs (1 MiB: ~130 µs) go to
/// blocking threads so that the async threads keep serving other connections.
pub const INLINE_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct ComputePool {
    permits: Arc<FairPermits>,
    metrics: Arc<Metrics>,
}

impl ComputePool {
    /// A pool of `threads` permits (at least one) reporting queue waits and
    /// job times to `metrics` (jobs that run for a request are labelled with
    /// its RPC; others, such as the recovery at start-up, count in the queue
    /// wait only).
    pub fn new(threads: usize, metrics: Arc<Metrics>) -> Self {
        ComputePool {
            permits: FairPermits::new(threads),
            metrics,
        }
    }

    /// Runs `job` over `input_bytes` of tensor data once a permit is free:
    /// inline when that is at most [`INLINE_BYTES`], else as [`Self::run`].
    /// Either way the job, once started, runs to completion; it does not
    /// start when the request's deadline has passed by then.
    pub async fn run_sized<T, F>(&self, input_bytes: usize, job: F) -> Result<T, ComputeError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if input_bytes > INLINE_BYTES {
            return self.run(job).await;
        }
        let _permit = self.start().await?;
        // As on a blocking thread, a panicking job fails its request only.
        let result = timed(&self.metrics, current_rpc(), || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
        });
        result.map_err(|panic| {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            ComputeError::JobFailed(text)
        })
    }

    /// Runs `job` on a blocking thread once a permit is free. If the caller
    /// goes away meanwhile the job still runs to completion: a mutation is
    /// applied whole or not at all. Past the request's deadline (when the
    /// permit comes) the job does not start.
    pub async fn run<T, F>(&self, job: F) -> Result<T, ComputeError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = self.start().await?;
        // The task-local RPC is not visible on the blocking thread: read it here.
        let rpc = current_rpc();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            timed(&metrics, rpc, job)
        })
        .await
        .map_err(|e| ComputeError::JobFailed(e.to_string()))
    }

    /// What every job goes through before it runs: a permit, waited for in
    /// its caller's turn (the wait measured), and the request's deadline,
    /// checked once the permit comes.
    async fn start(&self) -> Result<FairPermit, ComputeError> {
        let queued = Instant::now();
        let permit = self.permits.acquire(&current_caller()).await;
        self.metrics.queue_wait(queued.elapsed());
        check_deadline()?;
        Ok(permit)
    }
}

/// Runs `job`, its time counted under the request's `rpc` when it has one.
fn timed<T>(metrics: &Metrics, rpc: Option<&'static str>, job: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = job();
    if let Some(rpc) = rpc {
        metrics.compute(rpc, started.elapsed());
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_deadline_passed_while_queued_does_not_run() {
        let pool = ComputePool::new(1, Arc::new(Metrics::new()));
        // Occupy the only permit until released.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(move || released.recv().is_ok()).await }
        });
        while pool.permits.available() > 0 {
            tokio::task::yield_now().await;
        }
        let ran = Arc::new(AtomicBool::new(false));
        let late = tokio::spawn({
            let (pool, ran) = (pool.clone(), ran.clone());
            let deadline = Instant::now() + Duration::from_millis(5);
            with_deadline(Some(deadline), async move {
                pool.run_sized(0, move || ran.store(true, Ordering::SeqCst))
                    .await
            })
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(()).unwrap();
        assert!(busy.await.unwrap().unwrap());
        let outcome = late.await.unwrap();
        assert!(
            matches!(outcome, Err(ComputeError::DeadlineExceeded)),
            "{outcome:?}"
        );
        assert!(!ran.load(Ordering::SeqCst));

        // A deadline still ahead runs the job.
        let far = Instant::now() + Duration::from_secs(60);
        let value = with_deadline(Some(far), pool.run(|| 7)).await.unwrap();
        assert_eq!(value, 7);
    }
}
