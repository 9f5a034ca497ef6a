//! The open sessions, and every change to them in order.
//!
//! The registry is the single place where sessions open and close, so it is
//! also where each change gets its **revision** (the previous plus one), where
//! the bounded **history** of recent changes is kept for resuming watchers, and
//! where the one log line per open and close is written.
//!
//! # No gap, no duplicate
//!
//! [`SessionRegistry::subscribe`] takes the snapshot and registers the
//! subscriber's queue under the same lock that every change is published under,
//! so the snapshot's revision is exactly the one before the first queued change.
//!
//! # Slow subscribers
//!
//! Each subscriber's queue is bounded. A subscriber whose queue is full when a
//! change is published is cut off, and learns it ([`Lagged`]) after draining what
//! was queued; it never slows the sessions or other subscribers, and it never
//! silently misses a change.
//!
//! The registry names no transport type: a session reaches its connection
//! through the [`SessionLink`] the server registers with it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt,
    net::SocketAddr,
    ops::Bound,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;
use tokio::{
    sync::{mpsc, Notify},
    time::Instant,
};
use tracing::info;

use crate::{
    metrics::Metrics,
    protocol::{
        text::{self, Escaped},
        CloseReason, Phi,
    },
};

/// Whether an open session's client is keeping up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Frames keep arriving.
    Live,
    /// No frame for the suspicion threshold: still open, but late.
    Suspect,
}

/// What never changes about a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionIdentity {
    /// The server-assigned id.
    pub session_id: String,
    /// The client's self-chosen name; empty for anonymous clients.
    pub client_id: String,
    /// The client's labels.
    pub labels: HashMap<String, String>,
    /// The client's address, when the transport knows it.
    pub peer: Option<SocketAddr>,
    /// When the session said Hello.
    pub opened_at: SystemTime,
    /// The server that holds it: its node id in cluster mode, empty on a
    /// single server.
    pub node: String,
}

/// A session as seen at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// What never changes about it.
    pub identity: Arc<SessionIdentity>,
    /// When its last frame arrived.
    pub last_seen: SystemTime,
    /// Smoothed round-trip time of the server's pings; `None` before a sample.
    pub rtt: Option<Duration>,
    /// Live or suspect.
    pub state: SessionState,
    /// Frames received from the client.
    pub frames_in: u64,
    /// Frames sent to the client.
    pub frames_out: u64,
    /// Its φ when this was read, under adaptive suspicion; 0 otherwise.
    pub phi: Phi,
}

/// The moving parts of a session, read when a snapshot or event is taken.
#[derive(Debug, Clone, Copy)]
pub struct SessionStats {
    /// When the last client frame arrived.
    pub last_seen: Instant,
    /// Smoothed round-trip time, if sampled.
    pub rtt: Option<Duration>,
    /// Frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Its φ now, under adaptive suspicion; 0 otherwise.
    pub phi: Phi,
}

/// How the registry reaches a session's connection; the server implements it.
pub trait SessionLink: Send + Sync {
    /// The session's current counters and times. Called under the registry's
    /// lock: it must be quick and must not call back into the registry.
    fn stats(&self) -> SessionStats;
    /// Asks the session to end for `reason`. The session decides: if its end
    /// is not decided yet, it ends its stream for `reason` and records that
    /// with [`SessionRegistry::close`]; otherwise the cause that came first
    /// stands, and it has recorded (or will record) that one. Called outside
    /// the registry's lock.
    fn conclude(&self, reason: CloseReason, message: &str);
}

/// One change of the session set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A session said Hello.
    Opened(SessionInfo),
    /// A session went quiet past the suspicion threshold.
    Suspected(SessionInfo),
    /// A suspect session spoke again.
    Recovered(SessionInfo),
    /// A session ended.
    Closed {
        /// The session as it was at the end.
        session: SessionInfo,
        /// Why it ended.
        reason: CloseReason,
        /// A detail, possibly empty.
        message: String,
    },
}

/// A change and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The server's revision after this change.
    pub revision: u64,
    /// What changed.
    pub event: SessionEvent,
}

impl SessionEvent {
    /// The session the event is about.
    pub fn session(&self) -> &SessionInfo {
        match self {
            Self::Opened(session) | Self::Suspected(session) | Self::Recovered(session) => session,
            Self::Closed { session, .. } => session,
        }
    }
}

/// The open sessions at one revision.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The server's epoch.
    pub epoch: u64,
    /// The revision the snapshot reflects.
    pub revision: u64,
    /// The open sessions.
    pub sessions: Vec<SessionInfo>,
}

/// One page of the open sessions: see [`SessionRegistry::page`].
#[derive(Debug, Clone)]
pub struct SessionPage {
    /// The sessions of the page, with the epoch and the revision read at.
    pub snapshot: Snapshot,
    /// Whether more matching sessions follow the last of this page.
    pub more: bool,
}

/// How a subscription begins.
#[derive(Debug, Clone)]
pub enum SubscriptionStart {
    /// Everything open now; `reset` is set when a resume could not be honoured
    /// (another epoch, or history no longer covering the revision).
    Snapshot {
        /// Whether the subscriber must drop what it knew.
        reset: bool,
        /// The open sessions and their revision.
        snapshot: Snapshot,
    },
    /// Exactly the changes missed since the resumed revision, read with
    /// [`Subscription::next_missed`].
    Replay {
        /// The revision of the last of them (the one resumed after, if none
        /// was missed).
        revision: u64,
    },
}

/// The registry is shut down and opens no more sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the registry is shut down and opens no more sessions")]
pub struct ShutDown;

/// A subscriber that fell behind and was cut off: more changes were waiting
/// than its queue holds, or a replay fell out of the bounded history. (A
/// subscriber cut off by a mirror's resynchronization gets this too; its
/// [`Subscription::restarted`] tells the two apart.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the subscriber lagged: it fell more than {queue} changes behind; resume from the last revision seen")]
pub struct Lagged {
    /// The queue bound it overflowed.
    pub queue: usize,
}

/// Changes a replay reads from the history under one short hold of the lock.
const REPLAY_CHUNK: usize = 256;

/// A snapshot (or replay) and then every change after it, in order.
#[derive(Debug)]
pub struct Subscription {
    /// The server's epoch.
    pub epoch: u64,
    /// Where the subscription begins.
    pub start: SubscriptionStart,
    /// Changes after the start, shared with every other subscriber.
    changes: mpsc::Receiver<Arc<Change>>,
    /// Set and notified when the registry cuts this subscriber off.
    lag: Arc<LagSignal>,
    /// The bound of `changes`.
    queue: usize,
    /// Where a replay has got to.
    missed: Option<MissedCursor>,
    /// The registry, for reading a replay from its history.
    registry: SessionRegistry,
}

/// How a subscriber learns that it was cut off, even while it waits elsewhere.
#[derive(Debug, Default)]
struct LagSignal {
    lagged: AtomicBool,
    /// Set with `lagged` when a mirror's resynchronization cut it off.
    restarted: AtomicBool,
    notify: Notify,
}

/// A replay's place in the history: changes after `after`, up to `until`.
#[derive(Debug)]
struct MissedCursor {
    after: u64,
    until: u64,
    read: VecDeque<Arc<Change>>,
}

impl Subscription {
    /// The next change missed before a [`SubscriptionStart::Replay`]:
    /// `Ok(None)` once all were read, and always for a snapshot start. The
    /// changes are shared with the history and read a few at a time, so a
    /// long replay neither copies the history nor holds the registry's lock.
    /// `Err` if the history moved past the replay meanwhile.
    pub fn next_missed(&mut self) -> Result<Option<Arc<Change>>, Lagged> {
        let Some(cursor) = &mut self.missed else {
            return Ok(None);
        };
        if cursor.read.is_empty() && cursor.after < cursor.until {
            let inner = self.registry.shared.inner.lock();
            if cursor.after < inner.dropped_through {
                return Err(self.lagged_error());
            }
            // Revisions increase (and may skip numbers in a mirror).
            let after = cursor.after;
            let skip = inner
                .history
                .partition_point(|change| change.revision <= after);
            let until = cursor.until;
            cursor.read.extend(
                inner
                    .history
                    .iter()
                    .skip(skip)
                    .take_while(|change| change.revision <= until)
                    .take(REPLAY_CHUNK)
                    .cloned(),
            );
        }
        let next = cursor.read.pop_front();
        match &next {
            Some(change) => cursor.after = change.revision,
            None => self.missed = None,
        }
        Ok(next)
    }

    /// The next change; `Ok(None)` once the registry is gone or shut down,
    /// `Err` once it cut this subscriber off (after the changes queued
    /// before): for lagging, or, if [`restarted`](Self::restarted), for a
    /// mirror's resynchronization.
    pub async fn next(&mut self) -> Result<Option<Arc<Change>>, Lagged> {
        match self.changes.recv().await {
            Some(change) => Ok(Some(change)),
            None if self.lag.lagged.load(Ordering::Acquire) => Err(self.lagged_error()),
            None => Ok(None),
        }
    }

    /// The next change if one is already queued, without waiting; `None`
    /// otherwise (a consumer batching what has queued up, which learns of
    /// an end or a lag from [`next`](Self::next)).
    pub fn try_next(&mut self) -> Option<Arc<Change>> {
        self.changes.try_recv().ok()
    }

    /// Completes once the registry has cut this subscriber off (for lagging,
    /// or [restarted](Self::restarted)), so an owner blocked on something
    /// else (a slow consumer) learns it at once.
    pub async fn lagged(&self) -> Lagged {
        loop {
            let notified = self.lag.notify.notified();
            if self.lag.lagged.load(Ordering::Acquire) {
                return self.lagged_error();
            }
            notified.await;
        }
    }

    /// Whether the cut off was a cluster view's resynchronization (it
    /// re-read the cluster) rather than a lag: the subscriber is not behind,
    /// and should resume (from the last revision it saw) as after a shutdown.
    pub fn restarted(&self) -> bool {
        self.lag.restarted.load(Ordering::Acquire)
    }

    fn lagged_error(&self) -> Lagged {
        Lagged { queue: self.queue }
    }
}

/// The live sessions of one server; cheap to clone.
///
/// # Example
///
/// ```
/// use tonic_heartbeat::registry::{SessionRegistry, SubscriptionStart};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # use std::sync::Arc;
/// # use tonic_heartbeat::metrics::Metrics;
/// let registry = SessionRegistry::new(10_000, 1024, Arc::new(Metrics::new(&[], &[])));
/// let mut subscription = registry.subscribe();
/// let SubscriptionStart::Snapshot { snapshot, .. } = &subscription.start else { unreachable!() };
/// assert!(snapshot.sessions.is_empty());
/// // A server using this registry would now publish opens, suspicions and
/// // closes; `subscription.next().await` yields each in order.
/// # drop(subscription);
/// # }
/// ```
#[derive(Clone)]
pub struct SessionRegistry {
    shared: Arc<Shared>,
}

struct Shared {
    /// Never 0; differs between server runs.
    epoch: u64,
    /// Session gauges and counters, updated with each change.
    metrics: Arc<Metrics>,
    /// Changes kept for resuming.
    history_limit: usize,
    /// Queue bound of each subscriber.
    queue: usize,
    /// A mirror of a cluster's sessions: changes come with their revisions
    /// from [`SessionRegistry::apply`], and the node that holds each session
    /// logs it and decides replacements.
    mirrored: bool,
    /// Everything mutable, behind a std mutex: nothing awaits under it.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Set by [`SessionRegistry::shut_down`]: no session opens any more.
    shut_down: bool,
    revision: u64,
    /// The newest revision whose change is no longer in `history` (or that
    /// the registry began at): a resume after it can be replayed.
    dropped_through: u64,
    /// In `session_id` order, so that listing pages through them cheaply.
    sessions: BTreeMap<String, Entry>,
    /// The open session of each non-empty client id.
    by_client: HashMap<String, String>,
    /// Recent changes, shared with subscribers and replays, never copied.
    history: VecDeque<Arc<Change>>,
    subscribers: Vec<Subscriber>,
}

struct Entry {
    identity: Arc<SessionIdentity>,
    state: SessionState,
    link: Arc<dyn SessionLink>,
}

impl Entry {
    /// A copy that shares the identity and the link.
    fn share(&self) -> Self {
        Self {
            identity: self.identity.clone(),
            state: self.state,
            link: self.link.clone(),
        }
    }
}

struct Subscriber {
    changes: mpsc::Sender<Arc<Change>>,
    lag: Arc<LagSignal>,
    delivery: Delivery,
}

/// What a subscriber that overflows its queue is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// A watcher: cut off and counted as lagging, except in a shutdown's
    /// burst of closes, where it just ends like every other watch.
    Watcher,
    /// A consumer of every change: cut off as lagging, whenever it happens.
    Every,
}

/// Epochs are drawn below this, so that a JavaScript number or a JSON decoder
/// that reads the epoch as a double holds it exactly; a resume with a rounded
/// epoch would get a reset instead of a replay.
pub const EPOCH_LIMIT: u64 = 1 << 53;

/// A random epoch in `1..EPOCH_LIMIT`.
fn new_epoch(rng: &mut impl rand::Rng) -> u64 {
    rng.random_range(1..EPOCH_LIMIT)
}

// === impl SessionRegistry ===

impl SessionRegistry {
    /// A registry keeping `history` changes for resuming, with subscriber
    /// queues of `queue` changes, recording into `metrics`.
    pub fn new(history: usize, queue: usize, metrics: Arc<Metrics>) -> Self {
        let epoch = new_epoch(&mut rand::rng());
        Self::build(epoch, 0, false, history, queue, metrics)
    }

    /// A registry that mirrors a cluster's sessions: it starts at `revision`
    /// of `epoch`, and changes reach it only through [`Self::apply`], with
    /// revisions that increase but may skip numbers.
    pub fn mirror(
        epoch: u64,
        revision: u64,
        history: usize,
        queue: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::build(epoch, revision, true, history, queue, metrics)
    }

    fn build(
        epoch: u64,
        revision: u64,
        mirrored: bool,
        history: usize,
        queue: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                epoch,
                metrics,
                history_limit: history,
                queue: queue.max(1),
                mirrored,
                inner: Mutex::new(Inner {
                    revision,
                    dropped_through: revision,
                    ..Inner::default()
                }),
            }),
        }
    }

    /// Adds an open session to a [mirror](Self::mirror) without a change:
    /// the sessions a mirror starts from, before anyone subscribes.
    pub fn seed(&self, info: SessionInfo, link: Arc<dyn SessionLink>) {
        let identity = info.identity.clone();
        let entry = Entry {
            identity: identity.clone(),
            state: info.state,
            link,
        };
        let mut inner = self.shared.inner.lock();
        if !identity.client_id.is_empty() {
            inner
                .by_client
                .insert(identity.client_id.clone(), identity.session_id.clone());
        }
        inner.sessions.insert(identity.session_id.clone(), entry);
    }

    /// Moves a [mirror](Self::mirror) that caught up by a difference rather
    /// than by the changes themselves to `revision`: applies `changes`
    /// without publishing them, forgets the history, and cuts off every
    /// subscription at once ([`Subscription::restarted`]), even one blocked
    /// on a slow consumer or in the middle of a replay. Each watcher then
    /// resumes from the last revision it saw: here it gets a reset and a
    /// snapshot, since the history is gone; on a mirror that saw the
    /// changes, a replay.
    pub(crate) fn resynchronize(
        &self,
        revision: u64,
        changes: Vec<(SessionEvent, Arc<dyn SessionLink>)>,
    ) {
        let mut inner = self.shared.inner.lock();
        for (event, link) in changes {
            Self::change_locked(&mut inner, &event, link);
        }
        inner.revision = inner.revision.max(revision);
        inner.dropped_through = inner.revision;
        inner.history.clear();
        for subscriber in inner.subscribers.drain(..) {
            subscriber.lag.restarted.store(true, Ordering::Release);
            subscriber.lag.lagged.store(true, Ordering::Release);
            subscriber.lag.notify.notify_one();
        }
    }

    /// The open session `session_id`, as it is now.
    pub fn session(&self, session_id: &str) -> Option<SessionInfo> {
        let entry = self.shared.inner.lock().sessions.get(session_id)?.share();
        Some(info_of(&entry))
    }

    /// Whether [`shut_down`](Self::shut_down) has begun.
    pub(crate) fn is_shut_down(&self) -> bool {
        self.shared.inner.lock().shut_down
    }

    /// Records that the open session `session_id` holds `client_id`, for a
    /// mirror: in cluster mode the claim in etcd decides the holder, not the
    /// order in which opens arrive. Does nothing if that session is not open.
    pub(crate) fn hold(&self, client_id: &str, session_id: &str) {
        let mut inner = self.shared.inner.lock();
        if !client_id.is_empty() && inner.sessions.contains_key(session_id) {
            inner
                .by_client
                .insert(client_id.to_owned(), session_id.to_owned());
        }
    }

    /// The open session that holds `client_id`, if any.
    pub fn holder(&self, client_id: &str) -> Option<String> {
        self.shared.inner.lock().by_client.get(client_id).cloned()
    }

    /// Another server's session `newer` took `client_id`: ends the session
    /// here that holds it, if any and if it is not `newer`, as
    /// [`CloseReason::Replaced`]. `newer` is empty when that session is no
    /// longer known. Returns whether one was asked to end.
    pub fn replaced_elsewhere(&self, client_id: &str, newer: &str) -> bool {
        let link = {
            let inner = self.shared.inner.lock();
            inner
                .by_client
                .get(client_id)
                .filter(|holder| holder.as_str() != newer)
                .and_then(|holder| inner.sessions.get(holder))
                .map(|entry| entry.link.clone())
        };
        match link {
            Some(link) => {
                let message = match newer {
                    "" => "replaced by a session on another node".to_owned(),
                    newer => format!("replaced by session {newer}"),
                };
                link.conclude(CloseReason::Replaced, &message);
                true
            }
            None => false,
        }
    }

    /// Applies one change of the cluster to a [mirror](Self::mirror) at
    /// `revision` (greater than the last): an opened session is added with
    /// `link` (how an eviction reaches the node that holds it), a suspicion or
    /// recovery updates it, a close removes it. Changes to sessions this
    /// mirror does not hold, and revisions not above the last, are ignored.
    pub fn apply(&self, revision: u64, event: SessionEvent, link: Arc<dyn SessionLink>) {
        let mut inner = self.shared.inner.lock();
        if revision > inner.revision && Self::change_locked(&mut inner, &event, link) {
            self.publish_at(&mut inner, revision, event);
        }
    }

    /// Changes a mirror's sessions as `event` says; whether that was news.
    fn change_locked(inner: &mut Inner, event: &SessionEvent, link: Arc<dyn SessionLink>) -> bool {
        let session_id = event.session().identity.session_id.clone();
        match event {
            // A record written twice (a retried write) is news only once.
            SessionEvent::Opened(_) if inner.sessions.contains_key(&session_id) => false,
            SessionEvent::Opened(info) => {
                // Only into a free slot. A claimed open that replaces a holder
                // is applied before its claim, which then closes the holder
                // and hands the slot over (`hold`); an unclaimed open (a
                // session closed or replaced on its node before its open was
                // written) must not unseat the holder.
                let client_id = &info.identity.client_id;
                if !client_id.is_empty() {
                    inner
                        .by_client
                        .entry(client_id.clone())
                        .or_insert_with(|| session_id.clone());
                }
                let entry = Entry {
                    identity: info.identity.clone(),
                    state: info.state,
                    link,
                };
                inner.sessions.insert(session_id, entry);
                true
            }
            SessionEvent::Suspected(info) | SessionEvent::Recovered(info) => {
                let Some(entry) = inner.sessions.get_mut(&session_id) else {
                    return false;
                };
                let changed = entry.state != info.state;
                entry.state = info.state;
                entry.link = link;
                changed
            }
            SessionEvent::Closed { session, .. } => {
                if inner.sessions.remove(&session_id).is_none() {
                    return false;
                }
                let client_id = &session.identity.client_id;
                if inner.by_client.get(client_id) == Some(&session_id) {
                    inner.by_client.remove(client_id);
                }
                true
            }
        }
    }

    /// The server's epoch: never 0, below 2^53, new on every start.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// How many sessions are open.
    pub fn len(&self) -> usize {
        self.shared.inner.lock().sessions.len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens a session. An open session with the same non-empty client id is
    /// closed as [`CloseReason::Replaced`] first, and its link told to end.
    /// Fails once the registry has been [shut down](Self::shut_down).
    pub fn open(
        &self,
        identity: SessionIdentity,
        link: Arc<dyn SessionLink>,
    ) -> Result<(), ShutDown> {
        let identity = Arc::new(identity);
        let replaced = {
            let mut inner = self.shared.inner.lock();
            if inner.shut_down {
                return Err(ShutDown);
            }
            // The client id points to the newer session from now on; the
            // older one closes when it has ended, for whatever cause came first.
            let replaced = if identity.client_id.is_empty() {
                None
            } else {
                inner
                    .by_client
                    .insert(identity.client_id.clone(), identity.session_id.clone())
                    .and_then(|older| inner.sessions.get(&older))
                    .map(|older| older.link.clone())
            };
            let entry = Entry {
                identity: identity.clone(),
                state: SessionState::Live,
                link,
            };
            let info = info_of(&entry);
            inner.sessions.insert(identity.session_id.clone(), entry);
            self.shared.metrics.session_opened();
            self.publish(&mut inner, SessionEvent::Opened(info));
            replaced
        };
        // Logging and ending happen outside the lock: the timer wheel's
        // callbacks wait on it, and a slow log sink must not delay deadlines.
        if let Some(older) = replaced {
            older.conclude(
                CloseReason::Replaced,
                &format!("replaced by session {}", identity.session_id),
            );
        }
        info!(
            session_id = %identity.session_id,
            client_id = %Escaped::new(&identity.client_id),
            peer = %identity.peer.map_or_else(|| "-".to_owned(), |peer| peer.to_string()),
            "session opened"
        );
        Ok(())
    }

    /// Marks a session suspect; no effect if it is not open and live.
    pub fn suspect(&self, session_id: &str) {
        self.set_state(session_id, SessionState::Suspect);
    }

    /// Marks a suspect session live again; no effect otherwise.
    pub fn recover(&self, session_id: &str) {
        self.set_state(session_id, SessionState::Live);
    }

    fn set_state(&self, session_id: &str, state: SessionState) {
        let mut inner = self.shared.inner.lock();
        let Some(entry) = inner.sessions.get_mut(session_id) else {
            return;
        };
        if entry.state == state {
            return;
        }
        entry.state = state;
        let info = info_of(entry);
        let event = match state {
            SessionState::Suspect => {
                self.shared.metrics.session_suspected();
                SessionEvent::Suspected(info)
            }
            SessionState::Live => {
                self.shared.metrics.session_recovered();
                SessionEvent::Recovered(info)
            }
        };
        self.publish(&mut inner, event);
    }

    /// Records that a session ended: the one place a close becomes an event,
    /// a metric and a log line. The session calls it once its end is decided
    /// (see [`SessionLink::conclude`]); a second close of the same session
    /// changes nothing. Returns false if the session was not open.
    pub fn close(&self, session_id: &str, reason: CloseReason, message: &str) -> bool {
        // A client's goodbye or an eviction's message is stored and passed on
        // only up to the contract's bound.
        let message = text::truncate(message, text::MAX_MESSAGE_BYTES);
        let identity = {
            let mut inner = self.shared.inner.lock();
            let Some(entry) = inner.sessions.remove(session_id) else {
                return false;
            };
            let client_id = &entry.identity.client_id;
            if inner.by_client.get(client_id).map(String::as_str) == Some(session_id) {
                inner.by_client.remove(client_id);
            }
            let info = info_of(&entry);
            self.shared
                .metrics
                .session_closed(reason.as_str(), entry.state == SessionState::Suspect);
            self.publish(
                &mut inner,
                SessionEvent::Closed {
                    session: info,
                    reason,
                    message: message.to_owned(),
                },
            );
            entry.identity
        };
        // Logged after unlock: a slow log sink must not delay deadlines.
        let lifetime = SystemTime::now()
            .duration_since(identity.opened_at)
            .unwrap_or_default();
        info!(
            session_id = %identity.session_id,
            client_id = %Escaped::new(&identity.client_id),
            %reason,
            lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX),
            "session closed"
        );
        true
    }

    /// Ends a session on an administrator's behalf (as
    /// [`CloseReason::Evicted`], unless another cause ended it first); false
    /// if no such session is open.
    pub fn evict(&self, session_id: &str, message: &str) -> bool {
        let link = self
            .shared
            .inner
            .lock()
            .sessions
            .get(session_id)
            .map(|entry| entry.link.clone());
        match link {
            Some(link) => {
                link.conclude(CloseReason::Evicted, message);
                true
            }
            None => false,
        }
    }

    /// Refuses every later [`open`](Self::open), then asks every open
    /// session to end as [`CloseReason::ServerShutdown`]; no session slips in
    /// between. Subscriptions end after the closes, and new ones get only
    /// their start. Returns how many sessions were asked to end.
    pub fn shut_down(&self, message: &str) -> usize {
        let links: Vec<Arc<dyn SessionLink>> = {
            let mut inner = self.shared.inner.lock();
            inner.shut_down = true;
            if self.shared.mirrored {
                // A mirror's sessions belong to their nodes: only its
                // watches end here.
                Vec::new()
            } else {
                inner
                    .sessions
                    .values()
                    .map(|entry| entry.link.clone())
                    .collect()
            }
        };
        for link in &links {
            link.conclude(CloseReason::ServerShutdown, message);
        }
        // Dropping the senders ends every subscription once it has read the
        // closes above.
        self.shared.inner.lock().subscribers.clear();
        links.len()
    }

    fn publish(&self, inner: &mut Inner, event: SessionEvent) {
        let revision = inner.revision + 1;
        self.publish_at(inner, revision, event);
    }

    fn publish_at(&self, inner: &mut Inner, revision: u64, event: SessionEvent) {
        inner.revision = revision;
        let change = Arc::new(Change { revision, event });
        inner.subscribers.retain(
            |subscriber| match subscriber.changes.try_send(change.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // During a shutdown the burst of closes is not a
                    // watcher's fault: it just ends, like every other watch.
                    let watcher = subscriber.delivery == Delivery::Watcher;
                    if !(watcher && inner.shut_down) {
                        subscriber.lag.lagged.store(true, Ordering::Release);
                        subscriber.lag.notify.notify_one();
                    }
                    if watcher && !inner.shut_down {
                        self.shared.metrics.watcher_lagged();
                    }
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
        );
        if self.shared.history_limit == 0 {
            inner.dropped_through = revision;
            return;
        }
        if inner.history.len() == self.shared.history_limit {
            if let Some(dropped) = inner.history.pop_front() {
                inner.dropped_through = dropped.revision;
            }
        }
        inner.history.push_back(change);
    }

    /// The open sessions now, with the revision they reflect.
    pub fn snapshot(&self) -> Snapshot {
        let draft = self.draft_locked(&self.shared.inner.lock());
        draft.into_snapshot(self.shared.epoch)
    }

    /// Up to `limit` open sessions that `keep` accepts, in `session_id` order
    /// after `after` (from the start if empty), with the revision they were
    /// read at; `more` says whether any accepted session follows them.
    pub fn page(
        &self,
        after: &str,
        limit: usize,
        keep: impl Fn(&SessionIdentity) -> bool,
    ) -> SessionPage {
        let (draft, more) = {
            let inner = self.shared.inner.lock();
            let from = match after {
                "" => Bound::Unbounded,
                after => Bound::Excluded(after),
            };
            let mut matching = inner
                .sessions
                .range::<str, _>((from, Bound::Unbounded))
                .map(|(_, entry)| entry)
                .filter(|entry| keep(&entry.identity));
            let entries: Vec<Entry> = matching.by_ref().take(limit).map(Entry::share).collect();
            let more = matching.next().is_some();
            (
                SnapshotDraft {
                    revision: inner.revision,
                    entries,
                },
                more,
            )
        };
        SessionPage {
            snapshot: draft.into_snapshot(self.shared.epoch),
            more,
        }
    }

    /// The set of sessions at this revision: only shared pointers are copied
    /// under the lock; their counters are read after it is released.
    fn draft_locked(&self, inner: &Inner) -> SnapshotDraft {
        SnapshotDraft {
            revision: inner.revision,
            entries: inner.sessions.values().map(Entry::share).collect(),
        }
    }

    /// A snapshot of the open sessions, then every change after it.
    pub fn subscribe(&self) -> Subscription {
        self.resume(0, 0)
    }

    /// Like [`Self::subscribe`], with a queue of `queue` changes instead of
    /// the registry's watcher bound, for a consumer that must not lag, such
    /// as a cluster node writing its sessions out. Unlike a watcher's, its
    /// overflow is an error also during a shutdown: it is not counted as a
    /// lagging watcher, but it never just ends with changes unread.
    pub fn subscribe_with_queue(&self, queue: usize) -> Subscription {
        self.start_subscription(0, 0, queue.max(1), Delivery::Every)
    }

    /// Resumes after `revision` of `epoch`: the missed changes if this server's
    /// history still holds all of them, otherwise a reset and a snapshot.
    /// `epoch` 0 asks for a fresh snapshot without a reset.
    pub fn resume(&self, epoch: u64, revision: u64) -> Subscription {
        self.start_subscription(epoch, revision, self.shared.queue, Delivery::Watcher)
    }

    fn start_subscription(
        &self,
        epoch: u64,
        revision: u64,
        queue: usize,
        delivery: Delivery,
    ) -> Subscription {
        let (sender, receiver) = mpsc::channel(queue);
        let lag = Arc::new(LagSignal::default());
        let start = {
            let mut inner = self.shared.inner.lock();
            let start = if epoch != 0 && self.can_replay_locked(&inner, epoch, revision) {
                Ok(inner.revision)
            } else {
                Err((epoch != 0, self.draft_locked(&inner)))
            };
            if !inner.shut_down {
                inner.subscribers.push(Subscriber {
                    changes: sender,
                    lag: lag.clone(),
                    delivery,
                });
            }
            start
        };
        let (start, missed) = match start {
            Ok(until) => (
                SubscriptionStart::Replay { revision: until },
                Some(MissedCursor {
                    after: revision,
                    until,
                    read: VecDeque::new(),
                }),
            ),
            Err((reset, draft)) => (
                SubscriptionStart::Snapshot {
                    reset,
                    snapshot: draft.into_snapshot(self.shared.epoch),
                },
                None,
            ),
        };
        Subscription {
            epoch: self.shared.epoch,
            start,
            changes: receiver,
            lag,
            queue,
            missed,
            registry: self.clone(),
        }
    }

    /// Whether this server's history still holds every change after `after`
    /// of `epoch`, so a resume can replay them.
    fn can_replay_locked(&self, inner: &Inner, epoch: u64, after: u64) -> bool {
        epoch == self.shared.epoch && (inner.dropped_through..=inner.revision).contains(&after)
    }
}

impl fmt::Debug for SessionRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionRegistry")
            .field("epoch", &self.shared.epoch)
            .finish_non_exhaustive()
    }
}

/// The sessions of a snapshot before their counters are read.
struct SnapshotDraft {
    revision: u64,
    entries: Vec<Entry>,
}

impl SnapshotDraft {
    fn into_snapshot(self, epoch: u64) -> Snapshot {
        Snapshot {
            epoch,
            revision: self.revision,
            sessions: self.entries.iter().map(info_of).collect(),
        }
    }
}

fn info_of(entry: &Entry) -> SessionInfo {
    let stats = entry.link.stats();
    let ago = Instant::now().saturating_duration_since(stats.last_seen);
    SessionInfo {
        identity: entry.identity.clone(),
        last_seen: SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(SystemTime::UNIX_EPOCH),
        rtt: stats.rtt,
        state: entry.state,
        frames_in: stats.frames_in,
        frames_out: stats.frames_out,
        phi: stats.phi,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session that records each ask to end, and closes at the first,
    /// as the server's sessions do.
    struct RecordingLink {
        registry: SessionRegistry,
        session_id: String,
        ended: Mutex<Vec<CloseReason>>,
    }

    impl SessionLink for RecordingLink {
        fn stats(&self) -> SessionStats {
            SessionStats {
                last_seen: Instant::now(),
                rtt: None,
                frames_in: 0,
                frames_out: 0,
                phi: Phi::default(),
            }
        }
        fn conclude(&self, reason: CloseReason, message: &str) {
            self.ended.lock().push(reason);
            self.registry.close(&self.session_id, reason, message);
        }
    }

    fn registry(history: usize, queue: usize) -> SessionRegistry {
        SessionRegistry::new(history, queue, Arc::new(Metrics::new(&[], &[])))
    }

    fn identity(session_id: &str, client_id: &str) -> SessionIdentity {
        SessionIdentity {
            session_id: session_id.into(),
            client_id: client_id.into(),
            labels: HashMap::new(),
            peer: None,
            opened_at: SystemTime::now(),
            node: String::new(),
        }
    }

    fn recording(registry: &SessionRegistry, session_id: &str) -> Arc<RecordingLink> {
        Arc::new(RecordingLink {
            registry: registry.clone(),
            session_id: session_id.into(),
            ended: Mutex::new(Vec::new()),
        })
    }

    /// A live session as a mirror's record shows it.
    fn mirror_info(session_id: &str, client_id: &str) -> SessionInfo {
        SessionInfo {
            identity: Arc::new(identity(session_id, client_id)),
            last_seen: SystemTime::now(),
            rtt: None,
            state: SessionState::Live,
            frames_in: 0,
            frames_out: 0,
            phi: Phi::default(),
        }
    }

    /// A mirror's record of a live session opening.
    fn mirror_open(session_id: &str, client_id: &str) -> SessionEvent {
        SessionEvent::Opened(mirror_info(session_id, client_id))
    }

    fn open(registry: &SessionRegistry, session_id: &str, client_id: &str) -> Arc<RecordingLink> {
        let link = recording(registry, session_id);
        registry
            .open(identity(session_id, client_id), link.clone())
            .expect("open registry");
        link
    }

    /// Tests that a subscription sees the snapshot, then every change, with
    /// consecutive revisions.
    #[tokio::test]
    async fn snapshot_then_changes_without_gap() {
        let registry = registry(100, 100);
        open(&registry, "a", "");
        let mut subscription = registry.subscribe();
        let SubscriptionStart::Snapshot { snapshot, reset } = &subscription.start else {
            panic!("fresh subscriptions start with a snapshot");
        };
        assert!(!reset);
        assert_eq!((snapshot.revision, snapshot.sessions.len()), (1, 1));
        open(&registry, "b", "");
        registry.suspect("b");
        registry.recover("b");
        registry.close("a", CloseReason::Timeout, "");
        let mut revisions = Vec::new();
        for _ in 0..4 {
            revisions.push(
                subscription
                    .next()
                    .await
                    .expect("not lagged")
                    .expect("open")
                    .revision,
            );
        }
        assert_eq!(revisions, [2, 3, 4, 5]);
    }

    /// Tests that epochs are never 0 and below 2^53, exact as a double.
    #[test]
    fn epochs_are_never_zero_and_fit_a_double() {
        // Most of 2^64 lies above 2^53: an unbounded draw fails this at once.
        for _ in 0..64 {
            let epoch = registry(1, 1).epoch();
            assert!((1..EPOCH_LIMIT).contains(&epoch), "epoch {epoch}");
        }
    }

    /// Tests that the first close reason wins and later ones are ignored.
    #[test]
    fn first_close_reason_wins() {
        let registry = registry(100, 100);
        open(&registry, "a", "");
        assert!(registry.close("a", CloseReason::Timeout, ""));
        assert!(!registry.close("a", CloseReason::Disconnected, ""));
    }

    /// Tests that a Hello with a live client id replaces the older session.
    #[test]
    fn same_client_id_replaces() {
        let registry = registry(100, 100);
        let older = open(&registry, "a", "worker-1");
        open(&registry, "b", "worker-1");
        assert_eq!(*older.ended.lock(), [CloseReason::Replaced]);
        assert_eq!(registry.len(), 1);
        let anonymous = open(&registry, "c", "");
        open(&registry, "d", "");
        assert!(anonymous.ended.lock().is_empty());
    }

    /// Tests that resuming replays exactly the missed changes, and resets when
    /// the epoch differs or history no longer covers the revision.
    #[test]
    fn resume_replays_or_resets() {
        let registry = registry(3, 100);
        let epoch = registry.epoch();
        for id in ["a", "b", "c", "d"] {
            open(&registry, id, "");
        }
        let mut resumed = registry.resume(epoch, 2);
        assert!(matches!(
            resumed.start,
            SubscriptionStart::Replay { revision: 4 }
        ));
        let mut missed = Vec::new();
        while let Some(change) = resumed.next_missed().expect("in the history") {
            missed.push(change.revision);
        }
        assert_eq!(missed, [3, 4]);
        for (epoch, after) in [(epoch, 0), (epoch.wrapping_add(1), 3), (epoch, 9)] {
            assert!(matches!(
                registry.resume(epoch, after).start,
                SubscriptionStart::Snapshot { reset: true, .. }
            ));
        }
    }

    /// Tests that a mirror takes revisions that skip numbers: it starts at
    /// its given revision, ignores changes not above the last, replays across
    /// the gaps, and resets a resume from before what its history holds.
    #[test]
    fn mirrors_replay_revisions_that_skip_numbers() {
        let mirror = SessionRegistry::mirror(7, 100, 2, 10, Arc::new(Metrics::new(&[], &[])));
        let link = recording(&mirror, "a");
        let info = |id: &str| mirror_info(id, "");
        let closed = |id: &str| SessionEvent::Closed {
            session: info(id),
            reason: CloseReason::NodeLost,
            message: String::new(),
        };
        mirror.apply(200, SessionEvent::Opened(info("a")), link.clone());
        mirror.apply(150, SessionEvent::Opened(info("b")), link.clone());
        mirror.apply(201, SessionEvent::Opened(info("c")), link.clone());
        mirror.apply(300, closed("a"), link.clone());
        mirror.apply(301, closed("nobody"), link);
        assert_eq!(mirror.snapshot().revision, 300);
        assert_eq!(mirror.len(), 1, "b was ignored, a closed");

        let mut resumed = mirror.resume(7, 200);
        assert!(matches!(
            resumed.start,
            SubscriptionStart::Replay { revision: 300 }
        ));
        let mut missed = Vec::new();
        while let Some(change) = resumed.next_missed().expect("in the history") {
            missed.push(change.revision);
        }
        assert_eq!(missed, [201, 300]);
        // 200 fell out of a history of two: a resume from before it resets.
        assert!(matches!(
            mirror.resume(7, 150).start,
            SubscriptionStart::Snapshot { reset: true, .. }
        ));
        assert!(matches!(
            mirror.resume(7, 300).start,
            SubscriptionStart::Replay { revision: 300 }
        ));
    }

    /// Tests that a long replay is read in chunks, every change once and in
    /// order, and that one the history moves past meanwhile is cut off as
    /// lagging rather than skipping changes.
    #[test]
    fn long_replays_read_in_chunks_or_lag() {
        let registry = registry(1000, 10);
        let epoch = registry.epoch();
        for i in 0..700 {
            open(&registry, &format!("s{i}"), "");
        }
        let mut resumed = registry.resume(epoch, 100);
        let mut revisions = Vec::new();
        while let Some(change) = resumed.next_missed().expect("in the history") {
            revisions.push(change.revision);
        }
        assert_eq!(revisions, (101..=700).collect::<Vec<_>>());

        let mut slow = registry.resume(epoch, 100);
        assert!(slow.next_missed().expect("in the history").is_some());
        for i in 700..1500 {
            open(&registry, &format!("s{i}"), "");
        }
        let mut result = Ok(None);
        for _ in 0..REPLAY_CHUNK + 1 {
            result = slow.next_missed();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Lagged { queue: 10 }));
    }

    /// Tests that shutting down closes every session and refuses later opens.
    #[test]
    fn shut_down_closes_all_and_refuses_opens() {
        let registry = registry(100, 100);
        let link = open(&registry, "a", "");
        assert_eq!(registry.shut_down("bye"), 1);
        assert_eq!(*link.ended.lock(), [CloseReason::ServerShutdown]);
        let late = registry.open(identity("b", ""), recording(&registry, "b"));
        assert_eq!(late, Err(ShutDown));
        assert!(registry.is_empty());
    }

    /// Tests that an overflowing subscriber is cut off and told it lagged.
    #[tokio::test]
    async fn lagging_subscriber_is_cut_off() {
        let registry = registry(100, 2);
        let mut slow = registry.subscribe();
        for id in ["a", "b", "c"] {
            open(&registry, id, "");
        }
        assert!(slow.next().await.expect("queued").is_some());
        assert!(slow.next().await.expect("queued").is_some());
        assert_eq!(slow.next().await, Err(Lagged { queue: 2 }));
    }

    /// Tests that a shutdown's burst of closes just ends a watcher that
    /// cannot hold it, but cuts off a consumer of every change as lagging,
    /// so that it never mistakes the end for having read everything.
    #[tokio::test]
    async fn a_shutdown_overflow_ends_watchers_but_fails_every_change_consumers() {
        let registry = registry(100, 2);
        for id in ["a", "b", "c", "d"] {
            open(&registry, id, "");
        }
        let mut watcher = registry.subscribe();
        let mut writer = registry.subscribe_with_queue(3);
        registry.shut_down("bye");
        for _ in 0..2 {
            assert!(watcher.next().await.expect("queued").is_some());
        }
        assert_eq!(watcher.next().await, Ok(None), "a watch just ends");
        for _ in 0..3 {
            assert!(writer.next().await.expect("queued").is_some());
        }
        assert_eq!(writer.next().await, Err(Lagged { queue: 3 }));
    }

    /// Tests a mirror's client-id holders: an open takes only a free slot,
    /// so an unclaimed open (a session closed on its node before its open
    /// was written) neither unseats the holder nor frees the slot when it
    /// closes; `hold` hands the slot over, and only to an open session.
    #[test]
    fn a_mirror_holder_is_decided_by_claims() {
        let mirror = SessionRegistry::mirror(7, 100, 2, 10, Arc::new(Metrics::new(&[], &[])));
        let link = recording(&mirror, "a");
        let opened = |id: &str| mirror_open(id, "x");
        mirror.apply(101, opened("a"), link.clone());
        assert_eq!(mirror.holder("x").as_deref(), Some("a"));
        mirror.apply(102, opened("u"), link.clone());
        assert_eq!(
            mirror.holder("x").as_deref(),
            Some("a"),
            "unseated by an unclaimed open"
        );
        let closed = SessionEvent::Closed {
            session: mirror.session("u").expect("open"),
            reason: CloseReason::ClientGoodbye,
            message: String::new(),
        };
        mirror.apply(103, closed, link.clone());
        assert_eq!(
            mirror.holder("x").as_deref(),
            Some("a"),
            "freed by another's close"
        );
        mirror.hold("x", "gone");
        assert_eq!(
            mirror.holder("x").as_deref(),
            Some("a"),
            "handed to no session"
        );
        mirror.apply(104, opened("b"), link);
        mirror.hold("x", "b");
        assert_eq!(mirror.holder("x").as_deref(), Some("b"));
    }

    /// Tests a mirror's resynchronization: the difference is applied but
    /// not published, live watches are cut off as restarted, and a resume
    /// from before it is a reset while one from its revision replays
    /// nothing.
    #[tokio::test]
    async fn a_resynchronized_mirror_ends_its_watches_and_forgets_its_history() {
        let mirror = SessionRegistry::mirror(7, 100, 10, 10, Arc::new(Metrics::new(&[], &[])));
        let opened = |id: &str| mirror_open(id, "");
        mirror.apply(101, opened("a"), recording(&mirror, "a"));
        let mut live = mirror.subscribe();
        let gone = SessionEvent::Closed {
            session: mirror.session("a").expect("open"),
            reason: CloseReason::NodeLost,
            message: String::new(),
        };
        mirror.resynchronize(
            500,
            vec![
                (gone, recording(&mirror, "a")),
                (opened("b"), recording(&mirror, "b")),
            ],
        );
        assert!(
            live.next().await.is_err(),
            "the watch is cut off, unpublished"
        );
        assert!(live.restarted(), "as restarted, not lagging");
        assert!(mirror.session("a").is_none() && mirror.session("b").is_some());
        let before = mirror.resume(7, 101);
        assert!(matches!(
            before.start,
            SubscriptionStart::Snapshot { reset: true, .. }
        ));
        let mut at = mirror.resume(7, 500);
        assert!(matches!(
            at.start,
            SubscriptionStart::Replay { revision: 500 }
        ));
        assert_eq!(at.next_missed(), Ok(None));
    }
}
