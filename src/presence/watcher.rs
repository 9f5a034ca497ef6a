//! A watch that outlives its streams.

use std::time::Duration;

use rand::{rngs::StdRng, SeedableRng};
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::{wire::session_event, PresenceClient, SessionFilter};
use crate::{
    backoff::Backoff,
    error::PresenceError,
    protocol::pb::{self, watch_sessions_response::Event},
    registry::{Change, SessionInfo},
};

/// What a [`Watcher`] reports, in the order it happened.
#[derive(Debug)]
pub enum WatchEvent {
    /// Forget every session you know: the server could not resume the watch
    /// (it restarted, or its history no longer covers the gap), or the stream
    /// broke inside a snapshot. A snapshot and `Synced` follow.
    Reset {
        /// The revision of the snapshot that follows; 0 when the watcher
        /// resets by itself, before it knows the snapshot's.
        revision: u64,
    },
    /// One open session of the snapshot that begins a fresh watch or follows
    /// a [`Reset`](Self::Reset).
    Snapshot {
        /// The session as it was at the snapshot.
        session: SessionInfo,
        /// The revision of the snapshot.
        revision: u64,
    },
    /// Everything reported so far is the server's state at `revision`; every
    /// later event is a live change.
    Synced {
        /// The server's epoch, new on every start.
        epoch: u64,
        /// The revision the state reflects.
        revision: u64,
    },
    /// A change of the session set: live after `Synced`, or one missed while
    /// the watch was interrupted and replayed on resuming.
    Change(Change),
    /// The stream broke; the watcher resumes by itself after `retry_in`.
    /// What is known stays valid: resuming replays the missed changes, or
    /// begins with a [`Reset`](Self::Reset).
    Interrupted {
        /// Why the stream broke.
        error: PresenceError,
        /// How long the watcher waits before it resumes.
        retry_in: Duration,
        /// The revision it resumes after (0 for a fresh watch).
        resume_after: u64,
    },
}

/// Where the current stream is: the events before `synced` are either a
/// snapshot or a replay, and only a replay may move the resume point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a snapshot: its revision is not a place to resume from.
    Snapshot,
    /// Reading the changes missed since the resume point, in order.
    Replay,
    /// After `synced`.
    Live,
}

/// A presence watch that resumes by itself; see the [module docs](super)
/// for an example.
///
/// [`next`](Self::next) yields the snapshot (or the replay of what was
/// missed), `Synced`, then every change. When the stream breaks it yields
/// [`WatchEvent::Interrupted`], waits a jittered backoff, and resumes after
/// the last revision it can stand on: one reached after `Synced`, or the last
/// change of a replay. A snapshot's revision is never one, since a stream that
/// breaks inside a snapshot has not delivered all of it.
///
/// `next` is cancel-safe: dropped mid-wait (in a `select!`), it keeps its
/// place, its planned backoff and its stream.
#[derive(Debug)]
pub struct Watcher {
    client: PresenceClient,
    filter: SessionFilter,
    backoff: Backoff,
    rng: StdRng,
    /// Failed attempts in a row; an event read starts the count again.
    attempt: u32,
    /// The epoch and revision to resume after; (0, 0) for a fresh watch.
    resume: (u64, u64),
    /// The open stream and what it is reading, if any.
    stream: Option<(Streaming<pb::WatchSessionsResponse>, Phase)>,
    /// When the next attempt may begin; kept until it has, so a `next`
    /// dropped mid-wait does not forget the backoff.
    retry_at: Option<Instant>,
    /// Set when a stream broke inside a snapshot: the owner holds part of a
    /// snapshot and must drop it before the next one.
    owes_reset: bool,
}

impl Watcher {
    pub(super) fn new(client: PresenceClient, filter: SessionFilter) -> Self {
        Self {
            client,
            filter,
            backoff: Backoff::default(),
            rng: StdRng::from_os_rng(),
            attempt: 0,
            resume: (0, 0),
            stream: None,
            retry_at: None,
            owes_reset: false,
        }
    }

    /// Delays between attempts. Default: [`Backoff::default`].
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Resumes after `revision` of `epoch` (from a `Synced` or change seen
    /// earlier) instead of starting with a snapshot. Default: a fresh watch.
    #[must_use]
    pub fn resume_after(mut self, epoch: u64, revision: u64) -> Self {
        self.resume = (epoch, revision);
        self
    }

    /// The epoch and revision the watcher would resume after now.
    pub fn resume_point(&self) -> (u64, u64) {
        self.resume
    }

    /// The next event. Breaks that may pass (a restart, a lag, a lost
    /// connection) come as [`WatchEvent::Interrupted`] and the watch goes on;
    /// an `Err` is one that will not pass by waiting (a refused token, a
    /// malformed answer). Calling `next` after an `Err` tries again from the
    /// same place, after the same backoff.
    pub async fn next(&mut self) -> Result<WatchEvent, PresenceError> {
        loop {
            let Some((stream, phase)) = &mut self.stream else {
                if let Some(event) = self.open().await? {
                    return Ok(event);
                }
                continue;
            };
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    let ended = Status::unavailable("the server ended the watch");
                    return self.interrupted(PresenceError::Status(ended));
                }
                Err(status) => return self.interrupted(PresenceError::Status(status)),
            };
            self.attempt = 0;
            let revision = message.revision;
            let event = match message.event {
                // A kind of event newer than this version: nothing to act on.
                None => continue,
                Some(Event::Reset(_)) => {
                    *phase = Phase::Snapshot;
                    self.owes_reset = false;
                    // The old place is gone for good: a break inside this
                    // snapshot starts afresh (and owes the owner a reset).
                    self.resume = (0, 0);
                    return Ok(WatchEvent::Reset { revision });
                }
                Some(Event::Synced(synced)) => {
                    *phase = Phase::Live;
                    self.resume = (synced.epoch, synced.revision);
                    return Ok(WatchEvent::Synced {
                        epoch: synced.epoch,
                        revision: synced.revision,
                    });
                }
                Some(Event::Opened(session)) if *phase == Phase::Snapshot => {
                    return match SessionInfo::try_from(session) {
                        Ok(session) => Ok(WatchEvent::Snapshot { session, revision }),
                        Err(error) => self.interrupted(error),
                    };
                }
                Some(event) => event,
            };
            // An unreadable change must not be stepped over: the stream is
            // dropped, so trying again reads it afresh.
            let event = match session_event(event) {
                Ok(Some(event)) => event,
                Ok(None) => continue,
                Err(error) => return self.interrupted(error),
            };
            // A replayed change is exactly the change it was, in order, so a
            // break in the middle of a replay resumes after it.
            self.resume.1 = revision;
            return Ok(WatchEvent::Change(Change { revision, event }));
        }
    }

    /// Opens the next stream after the planned wait. Returns an event when
    /// there is one to report first: the attempt failed, or the owner holds
    /// part of an earlier snapshot and must drop it.
    async fn open(&mut self) -> Result<Option<WatchEvent>, PresenceError> {
        if let Some(at) = self.retry_at {
            tokio::time::sleep_until(at).await;
            self.retry_at = None;
        }
        let (epoch, revision) = self.resume;
        let stream = match self.client.open_watch(&self.filter, epoch, revision).await {
            Ok(stream) => stream,
            Err(error) => return self.interrupted(error).map(Some),
        };
        let phase = if epoch == 0 {
            Phase::Snapshot
        } else {
            Phase::Replay
        };
        self.stream = Some((stream, phase));
        let owes_reset = phase == Phase::Snapshot && std::mem::take(&mut self.owes_reset);
        Ok(owes_reset.then_some(WatchEvent::Reset { revision: 0 }))
    }

    /// Drops the stream and plans the next attempt, after a backoff also when
    /// the error will not pass by waiting (then it is returned as it is, for
    /// the owner to decide whether to try again).
    fn interrupted(&mut self, error: PresenceError) -> Result<WatchEvent, PresenceError> {
        if let Some((_, Phase::Snapshot)) = self.stream.take() {
            self.owes_reset = true;
        }
        self.attempt = self.attempt.saturating_add(1);
        let retry_in = self.backoff.delay(self.attempt, &mut self.rng);
        self.retry_at = Some(Instant::now() + retry_in);
        if !error.is_transient() {
            return Err(error);
        }
        Ok(WatchEvent::Interrupted {
            error,
            retry_in,
            resume_after: self.resume.1,
        })
    }
}
