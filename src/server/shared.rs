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
    /// The open sessions.
    pub(super) registry: SessionRegistry,
    /// Capacity, draining, and every admitted stream.
    pub(super) gate: Arc<AdmissionGate>,
    /// Deadlines and ping timers of every session.
    pub(super) wheel: TimerWheel,
    /// Presence watches open now, held under `config.max_watchers`.
    pub(super) watchers: AtomicUsize,
}
