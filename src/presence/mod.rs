//! Presence from the outside: a client of a server's `PresenceService`.
//!
//! [`PresenceClient`] lists and evicts sessions and opens watches, with the
//! admin token attached to every call. A [`Watcher`] keeps one watch going for
//! as long as its owner wants: it reads the snapshot, the `synced` marker and
//! the live changes, and when the stream breaks (a restart, a lag, a dropped
//! connection) it comes back by itself, with jittered backoff, resuming after
//! the last revision it can stand on. A [`PresenceView`] folds those events
//! into "who is open now".
//!
//! # Why the watch logic lives here
//!
//! Keeping a watch correct is subtle: a snapshot's revision is no place to
//! resume from (a stream that breaks inside a snapshot must not skip the rest
//! of it), while a replayed change is; a `reset` must reach the owner so it
//! drops what it knew; and only some failures are worth retrying. Written once, here, it
//! serves the `heartbeat sessions --watch` command, embedders, and anything
//! else that mirrors a server's sessions.
//!
//! Sessions arrive as the registry's own types ([`SessionInfo`],
//! [`Change`](crate::registry::Change)), read by `TryFrom` impls whose `From`
//! twins the server's presence service uses to write them.
//!
//! # Example
//!
//! ```
//! use tonic_heartbeat::presence::{PresenceClient, PresenceView, SessionFilter, WatchEvent};
//! # use tonic::transport::{server::TcpIncoming, Endpoint, Server};
//! # use tonic_heartbeat::{HeartbeatServer, ServerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (handle, heartbeat) = HeartbeatServer::new(ServerConfig::default())?;
//! # let incoming = TcpIncoming::bind("127.0.0.1:0".parse()?)?;
//! # let addr = incoming.local_addr()?;
//! # tokio::spawn(Server::builder().add_service(heartbeat).add_service(handle.presence()).serve_with_incoming(incoming));
//! let channel = Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();
//! let presence = PresenceClient::new(channel);
//! let mut watcher = presence.watch(SessionFilter::default());
//! let mut view = PresenceView::default();
//! loop {
//!     let event = watcher.next().await?;
//!     view.apply(&event);
//!     if let WatchEvent::Synced { .. } = event {
//!         break; // the view is whole; later events keep it current
//!     }
//! }
//! println!("{} session(s) open", view.len());
//! # Ok(()) }
//! ```

mod client;
mod view;
mod watcher;
pub(crate) mod wire;

use std::collections::HashMap;

pub use self::{
    client::PresenceClient,
    view::PresenceView,
    watcher::{WatchEvent, Watcher},
};
use crate::registry::SessionIdentity;
pub use crate::registry::{SessionInfo, Snapshot};

/// Which sessions a list or a watch covers: all of them by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Only sessions of this client id; empty for any.
    pub client_id: String,
    /// Only sessions carrying every one of these labels.
    pub labels: HashMap<String, String>,
}

impl SessionFilter {
    /// Whether a session with `identity` is covered.
    pub fn matches(&self, identity: &SessionIdentity) -> bool {
        (self.client_id.is_empty() || self.client_id == identity.client_id)
            && self
                .labels
                .iter()
                .all(|(key, value)| identity.labels.get(key) == Some(value))
    }
}
