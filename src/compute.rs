//! The compute pool: tensor work runs here, off the async runtime, at most
//! `threads` jobs at once. Callers wait for a permit (in arrival order) instead
//! of piling threads onto the cores.

use std::sync::Arc;

use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The job panicked (a libtorch call without an `f_` guard, or a bug).
    #[error("compute job failed: {0}")]
    JobFailed(String),
    #[error("compute pool is shut down")]
    Closed,
}

#[derive(Clone)]
pub struct ComputePool {
    permits: Arc<Semaphore>,
    threads: usize,
}

impl ComputePool {
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        ComputePool {
            permits: Arc::new(Semaphore::new(threads)),
            threads,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job` on a blocking thread once a permit is free. If the caller
    /// goes away meanwhile the job still runs to completion: a mutation is
    /// applied whole or not at all.
    pub async fn run<T, F>(&self, job: F) -> Result<T, ComputeError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ComputeError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|e| ComputeError::JobFailed(e.to_string()))
    }
}
