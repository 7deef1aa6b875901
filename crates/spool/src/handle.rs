//! A cheap, cloneable handle on a [`Spool`] shared by the tasks that append
//! and the sender that drains it.
//!
//! Appends take a plain mutex for one page-cache `write` (microseconds),
//! which is cheaper than any hand-off to another thread, so they are safe
//! to call from async tasks at high rates. Fsyncs never happen under the
//! mutex: with [`SyncPolicy::EveryAppend`] the appender fsyncs after
//! releasing it (concurrent appenders overlap their fsyncs), with
//! [`SyncPolicy::Interval`] a background task does. Every append wakes
//! the sender.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;

use crate::frame::SpoolRecord;
use crate::metrics::SpoolMetrics;
use crate::spool::{Spool, SpoolError, SyncPolicy};

pub(crate) struct Shared {
    spool: Mutex<Spool>,
    pub(crate) appended: Notify,
    metrics: SpoolMetrics,
    policy: SyncPolicy,
}

/// A shared spool (clones share it).
#[derive(Clone)]
pub struct SpoolHandle {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for SpoolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolHandle")
            .field("policy", &self.shared.policy)
            .finish()
    }
}

impl SpoolHandle {
    /// Shares `spool`. With [`SyncPolicy::Interval`] this starts the
    /// background syncer, so it must then be called inside a Tokio runtime;
    /// the syncer ends when the last handle is dropped.
    pub fn new(spool: Spool) -> Self {
        let metrics = spool.metrics().clone();
        let policy = spool.config().sync;
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            appended: Notify::new(),
            metrics,
            policy,
        });
        if let SyncPolicy::Interval(interval) = policy {
            tokio::spawn(run_syncer(Arc::downgrade(&shared), interval));
        }
        Self { shared }
    }

    /// Appends `record`, returning its sequence, and wakes the sender.
    /// Refusals ([`SpoolError::Full`], [`SpoolError::RecordTooLarge`]) are
    /// counted in the metrics; the caller keeps its own count of what it
    /// could not spool too.
    pub fn append(&self, record: &SpoolRecord) -> Result<u64, SpoolError> {
        let (seq, job) = {
            let mut spool = self.lock()?;
            let seq = spool.write(record)?;
            let job = (self.shared.policy == SyncPolicy::EveryAppend).then(|| spool.sync_job());
            (seq, job)
        };
        if let Some(job) = job {
            job.run()?;
        }
        self.shared.appended.notify_one();
        Ok(seq)
    }

    /// The spool's counters and gauges (read without locking).
    pub fn metrics(&self) -> &SpoolMetrics {
        &self.shared.metrics
    }

    /// Fsyncs everything appended so far.
    pub fn sync(&self) -> Result<(), SpoolError> {
        let job = self.lock()?.sync_job();
        job.run()
    }

    /// Direct access to the spool (inspection, tests). Holding the guard
    /// blocks appenders and the sender.
    pub fn lock(&self) -> Result<MutexGuard<'_, Spool>, SpoolError> {
        self.shared.spool.lock().map_err(|_| SpoolError::Poisoned)
    }
}

async fn run_syncer(shared: Weak<Shared>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let job = match shared.spool.lock() {
            Ok(mut spool) => spool.sync_job(),
            Err(_) => return,
        };
        if job.is_empty() {
            continue;
        }
        let metrics = shared.metrics.clone();
        drop(shared);
        match tokio::task::spawn_blocking(move || job.run()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                metrics.sync_errors.inc();
                tracing::error!(message = "Spool fsync failed.", %error);
            }
            Err(error) => {
                metrics.sync_errors.inc();
                tracing::error!(message = "Spool fsync task failed.", %error);
            }
        }
    }
}
