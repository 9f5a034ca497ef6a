//! The drain: how a server stops without leaving a client guessing.
//!
//! Order matters. The gate closes first, so no stream slips in after the
//! goodbyes are sent. Then the registry shuts down: every session is closed as
//! `SERVER_SHUTDOWN` (one event and one log line each) and told to end, and a
//! Hello still in flight can no longer open a session. Last, every admitted
//! stream that never said Hello is ended the same way.
//! Ending is immediate; the grace period (in [`serve`](super::serve)) only bounds
//! how long the server waits for those endings to reach the clients.

use super::{farewell, shared::ServerShared};
use crate::protocol::CloseReason;

/// The message of every shutdown goodbye.
pub(crate) const SHUTDOWN_MESSAGE: &str = "the server is shutting down";

/// Closes the gate and ends every stream with `Goodbye{SERVER_SHUTDOWN}`.
pub(crate) fn begin(shared: &ServerShared) {
    let admitted = shared.gate.begin_drain();
    shared.registry.shut_down(SHUTDOWN_MESSAGE);
    if let Some(view) = &shared.view {
        // Watches of the cluster end too; they resume on another node.
        view.shut_down(SHUTDOWN_MESSAGE);
    }
    let ending = farewell::ending_for(
        CloseReason::ServerShutdown,
        SHUTDOWN_MESSAGE,
        Some(shared.config.reconnect_after),
    );
    for handle in admitted {
        // Sessions ended above are already ending; this reaches the rest.
        handle.end(ending.clone());
    }
}
