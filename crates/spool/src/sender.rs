//! Drains the spool to JetStream, exactly once.
//!
//! One task reads records in sequence order and hands them to a
//! [`cnnf_bus::Publisher`], which sends each under its stored message id,
//! keeps a bounded window of pending acks and resends until acked (never
//! giving up: the record is on disk, and a NATS outage of any length must
//! not lose it). The publisher settles its window oldest first, so after
//! every call the records that left the window are exactly the oldest ones
//! handed to it; the sender advances the spool's ack cursor through those
//! only. A record sent but not yet in the cursor when the agent crashes is
//! sent again after the restart, and JetStream drops the copy by its id
//! (within the stream's duplicate window).
//!
//! The sender never blocks appenders: it takes the spool's lock only to
//! read one record or to move the cursor, and while NATS is unreachable it
//! sits in the publisher's resend backoff while appends go to disk. An
//! append wakes it at once.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::Context;
use cnnf_bus::publisher::{OutgoingMessage, PublishError, Publisher, PublisherConfig, PublisherMetrics};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::handle::SpoolHandle;
use crate::spool::SpoolError;

/// Settings of a [`Sender`].
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Most records whose JetStream ack may be pending at once (records
    /// are batches: this bounds memory at this many payloads).
    pub max_in_flight: usize,
    /// First pause before a resend or a retried read (doubles up to
    /// `max_backoff`).
    pub backoff: Duration,
    /// Longest pause between retries.
    pub max_backoff: Duration,
    /// How often the ack cursor is written while records stream; it is
    /// always written when the sender catches up and when it stops. A
    /// crash repeats at most this much, deduplicated by JetStream.
    pub cursor_interval: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            cursor_interval: Duration::from_millis(200),
        }
    }
}

/// A record handed to the publisher and not yet known to be acked.
struct Pending {
    seq: u64,
    id: String,
    /// In the publisher's window (false: refused by the server, done once
    /// everything before it is acked).
    in_window: bool,
}

/// Drains a spool to JetStream (see the module docs).
pub struct Sender {
    spool: SpoolHandle,
    publisher: Publisher,
    js: Context,
    config: SenderConfig,
    pending: VecDeque<Pending>,
    /// Highest sequence known delivered (may be ahead of the cursor file).
    acked: u64,
    /// Next sequence to read.
    next: u64,
    cursor_written: Instant,
}

impl Sender {
    /// A sender draining `spool` through `js`, starting after the spool's
    /// ack cursor.
    pub fn new(spool: SpoolHandle, js: Context, config: SenderConfig) -> Result<Self, SpoolError> {
        let acked = spool.lock()?.acked();
        Ok(Self {
            publisher: Publisher::new(js.clone(), publisher_config(&config)),
            spool,
            js,
            config,
            pending: VecDeque::new(),
            acked,
            next: acked + 1,
            cursor_written: Instant::now(),
        })
    }

    /// Counters of the underlying publisher (acked, duplicates, resends).
    pub fn publisher_metrics(&self) -> PublisherMetrics {
        self.publisher.metrics().clone()
    }

    /// Runs until `shutdown` completes; then writes the cursor through what
    /// was acked and returns. Records not yet acked stay in the spool for
    /// the next run. Fails only if the cursor cannot be written.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), SpoolError> {
        tokio::pin!(shutdown);
        let mut read_backoff = self.config.backoff;
        loop {
            let read = self.spool.lock().and_then(|spool| spool.read_next(self.next));
            match read {
                Ok(Some((seq, record))) => {
                    read_backoff = self.config.backoff;
                    self.next = seq + 1;
                    self.pending.push_back(Pending {
                        seq,
                        id: record.id.clone(),
                        in_window: true,
                    });
                    let message = OutgoingMessage::new(record.subject, record.id, record.payload);
                    let result = tokio::select! {
                        result = self.publisher.publish(message) => result,
                        () = &mut shutdown => break,
                    };
                    self.settle(result, true);
                    if self.cursor_written.elapsed() >= self.config.cursor_interval {
                        self.write_cursor()?;
                    }
                }
                Ok(None) => {
                    // Caught up: wait for the window's acks, record them,
                    // then sleep until the next append.
                    if !self.pending.is_empty() {
                        let result = tokio::select! {
                            result = self.publisher.flush() => result,
                            () = &mut shutdown => break,
                        };
                        self.settle(result, false);
                        continue;
                    }
                    self.write_cursor()?;
                    tokio::select! {
                        () = self.spool.shared.appended.notified() => {}
                        () = &mut shutdown => break,
                    }
                }
                Err(error) => {
                    self.spool.metrics().read_errors.inc();
                    tracing::error!(message = "Spool read failed; retrying.", seq = self.next, %error);
                    tokio::select! {
                        () = tokio::time::sleep(read_backoff) => {}
                        () = &mut shutdown => break,
                    }
                    read_backoff = (read_backoff * 2).min(self.config.max_backoff);
                }
            }
        }
        self.write_cursor()
    }

    /// Accounts for the records that left the publisher's window during the
    /// last call (`publishing`: a `publish` of the newest pending record).
    fn settle(&mut self, result: Result<(), PublishError>, publishing: bool) {
        let failed = result.err();
        // On an error the new record never entered the window.
        let mut new = None;
        if publishing && failed.is_some() {
            new = self.pending.pop_back();
        }
        let in_window = self.pending.iter().filter(|p| p.in_window).count();
        let mut left = in_window.saturating_sub(self.publisher.in_flight());
        let mut last_left = None;
        for (i, pending) in self.pending.iter_mut().enumerate() {
            if left == 0 {
                break;
            }
            if pending.in_window {
                pending.in_window = false;
                left -= 1;
                last_left = Some(i);
            }
        }
        match failed {
            None => {}
            Some(PublishError::Rejected { subject, id, message }) => {
                let old = last_left.filter(|&i| self.pending[i].id == id);
                let rejected_new = old.is_none() && new.as_ref().is_some_and(|n| n.id == id);
                self.spool.metrics().server_rejected.inc();
                tracing::error!(
                    message = "JetStream refused a spooled record for good; skipping it.",
                    subject,
                    id,
                    reason = message
                );
                if let Some(mut new) = new {
                    if rejected_new {
                        new.in_window = false;
                        self.pending.push_back(new);
                    } else {
                        // Never sent: read it again.
                        self.next = new.seq;
                    }
                }
            }
            Some(error @ PublishError::GaveUp { .. }) => {
                // Not expected (the publisher never gives up here). Start
                // over after the last record known acked; resends are
                // dropped by JetStream as duplicates.
                tracing::warn!(message = "Publisher gave up; resending from the cursor.", %error);
                if let Some(i) = last_left {
                    self.pending[i].in_window = true;
                }
                self.pop_done();
                self.pending.clear();
                self.next = self.acked + 1;
                self.publisher = Publisher::new(self.js.clone(), publisher_config(&self.config));
                return;
            }
        }
        self.pop_done();
    }

    /// Drops the done prefix of `pending`, advancing `acked`.
    fn pop_done(&mut self) {
        while self.pending.front().is_some_and(|p| !p.in_window) {
            let done = self.pending.pop_front().expect("checked above");
            self.acked = done.seq;
        }
    }

    fn write_cursor(&mut self) -> Result<(), SpoolError> {
        self.cursor_written = Instant::now();
        let mut spool = self.spool.lock()?;
        if self.acked > spool.acked() {
            spool.ack_through(self.acked)?;
        }
        Ok(())
    }
}

fn publisher_config(config: &SenderConfig) -> PublisherConfig {
    PublisherConfig {
        max_in_flight: config.max_in_flight.max(1),
        backoff: config.backoff,
        max_backoff: config.max_backoff,
        give_up_after: None,
    }
}

/// Spawns a [`Sender`] on the current runtime; returns it with the
/// publisher's counters.
pub fn spawn_sender(
    spool: SpoolHandle,
    js: Context,
    config: SenderConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(JoinHandle<Result<(), SpoolError>>, PublisherMetrics), SpoolError> {
    let sender = Sender::new(spool, js, config)?;
    let metrics = sender.publisher_metrics();
    Ok((tokio::spawn(sender.run(shutdown)), metrics))
}
