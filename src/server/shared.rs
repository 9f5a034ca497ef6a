//! What every part of one server shares: settings, metrics, registry, gate, wheel.

use std::sync::{atomic::AtomicUsize, Arc};

use super::admission::AdmissionGate;
use crate::{
    config::ServerConfig, liveness::TimerWheel, metrics::Metrics, registry::SessionRegistry,
};

/// What every part of one server shares.
pub(crate) struct ServerShared {
    /// The validated settings.
    pub(super) config: ServerConfig,
    /// Gauges and counters of sessions, frames and watchers.
    pub(super) metrics: Arc<Metrics>,
    /// This server's open sessions.
    pub(super) registry: SessionRegistry,
    /// In cluster mode, every node's sessions, which presence answers from.
    pub(super) view: Option<SessionRegistry>,
    /// The node id sessions are held under: empty on a single server.
    pub(super) node: String,
    /// Capacity, draining, and every admitted stream.
    pub(super) gate: Arc<AdmissionGate>,
    /// Deadlines and ping timers of every session.
    pub(super) wheel: TimerWheel,
    /// Presence watches open now, held under `config.max_watchers`.
    pub(super) watchers: AtomicUsize,
    /// When sessions that came of age are asked to rotate.
    pub(super) rotations: super::rotation::RotationPace,
}

impl ServerShared {
    /// The sessions presence shows: the cluster's in cluster mode, else this
    /// server's.
    pub(super) fn presence(&self) -> &SessionRegistry {
        self.view.as_ref().unwrap_or(&self.registry)
    }
}
