//! Who is open now, kept current from a watcher's events.

use std::collections::HashMap;

use super::WatchEvent;
use crate::registry::{SessionEvent, SessionInfo, SessionState};

/// The open sessions as a [`Watcher`](super::Watcher) reports them.
///
/// Feed it every event with [`apply`](Self::apply); see the
/// [module docs](super) for an example.
#[derive(Debug, Clone, Default)]
pub struct PresenceView {
    /// The open sessions by session id.
    sessions: HashMap<String, SessionInfo>,
    /// The session id of each non-empty client id.
    by_client: HashMap<String, String>,
    /// The server's epoch, from the last `Synced`.
    epoch: u64,
    /// The revision of the last event applied.
    revision: u64,
    /// Whether the view is whole and the watch live.
    synced: bool,
}

impl PresenceView {
    /// Folds one event into the view.
    pub fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Reset { .. } => {
                self.sessions.clear();
                self.by_client.clear();
                self.synced = false;
            }
            WatchEvent::Snapshot { session, .. } => self.insert(session),
            WatchEvent::Synced { epoch, revision } => {
                self.epoch = *epoch;
                self.revision = *revision;
                self.synced = true;
            }
            WatchEvent::Change(change) => {
                self.revision = change.revision;
                match &change.event {
                    SessionEvent::Opened(session)
                    | SessionEvent::Suspected(session)
                    | SessionEvent::Recovered(session) => self.insert(session),
                    SessionEvent::Closed { session, .. } => self.remove(session),
                }
            }
            // Until the watch resumes, the view may miss changes.
            WatchEvent::Interrupted { .. } => self.synced = false,
        }
    }

    fn insert(&mut self, session: &SessionInfo) {
        let identity = &session.identity;
        if !identity.client_id.is_empty() {
            self.by_client
                .insert(identity.client_id.clone(), identity.session_id.clone());
        }
        self.sessions
            .insert(identity.session_id.clone(), session.clone());
    }

    fn remove(&mut self, session: &SessionInfo) {
        let identity = &session.identity;
        self.sessions.remove(&identity.session_id);
        if self.by_client.get(&identity.client_id) == Some(&identity.session_id) {
            self.by_client.remove(&identity.client_id);
        }
    }

    /// Every open session, live or suspect, in no particular order.
    pub fn sessions(&self) -> impl Iterator<Item = &SessionInfo> {
        self.sessions.values()
    }

    /// The open sessions whose clients are keeping up (not suspect).
    pub fn live(&self) -> impl Iterator<Item = &SessionInfo> {
        self.sessions()
            .filter(|session| session.state == SessionState::Live)
    }

    /// The open session with this id.
    pub fn session(&self, session_id: &str) -> Option<&SessionInfo> {
        self.sessions.get(session_id)
    }

    /// The open session of this (non-empty) client id.
    pub fn client(&self, client_id: &str) -> Option<&SessionInfo> {
        self.by_client
            .get(client_id)
            .and_then(|session_id| self.sessions.get(session_id))
    }

    /// How many sessions are open.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Whether the view is whole and current: true from `Synced` until the
    /// next interruption or reset.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The server's epoch, from the last `Synced` (0 before the first).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The revision of the last change or `Synced` applied.
    pub fn revision(&self) -> u64 {
        self.revision
    }
}
