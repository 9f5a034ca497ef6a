//! One server's PresenceService, with the admin token on every call.

use std::fmt;

use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::Channel,
    Code, Request, Streaming,
};

use super::{SessionFilter, Snapshot, Watcher};
use crate::{
    config::AdminToken,
    error::PresenceError,
    protocol::pb::{self, presence_service_client::PresenceServiceClient},
    registry::SessionInfo,
};

/// Sessions asked for per page: the most a server gives in one.
const LIST_PAGE_SIZE: i32 = 10_000;

/// A client of one server's `heartbeat.v1.PresenceService`; cheap to clone.
///
/// See the [module docs](super) for an example.
#[derive(Clone)]
pub struct PresenceClient {
    inner: PresenceServiceClient<Channel>,
    /// `Bearer <token>`, marked sensitive so HTTP/2 never indexes it.
    authorization: Option<MetadataValue<Ascii>>,
}

impl PresenceClient {
    /// A client on `channel` (a lazily connecting one reconnects by itself).
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: PresenceServiceClient::new(channel),
            authorization: None,
        }
    }

    /// Sends `token` as `authorization: Bearer <token>` with every call.
    /// Default: no token. Fails if the token cannot travel in a header.
    pub fn admin_token(mut self, token: &AdminToken) -> Result<Self, PresenceError> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.expose())
            .parse()
            .map_err(|_| PresenceError::InvalidToken)?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    /// The open sessions that `filter` covers, read page by page, with the
    /// epoch and the revision of the last page. Sessions that open or close
    /// while the pages are read may be missed or seen twice; a [`Watcher`]'s
    /// snapshot is the consistent view.
    pub async fn list(&self, filter: &SessionFilter) -> Result<Snapshot, PresenceError> {
        let mut listed = Snapshot {
            epoch: 0,
            revision: 0,
            sessions: Vec::new(),
        };
        let mut page_token = String::new();
        loop {
            let request = self.request(pb::ListSessionsRequest {
                client_id: filter.client_id.clone(),
                labels: filter.labels.clone(),
                page_size: LIST_PAGE_SIZE,
                page_token,
            });
            let page = self
                .inner
                .clone()
                .list_sessions(request)
                .await
                .map_err(PresenceError::Status)?
                .into_inner();
            listed.epoch = page.epoch;
            listed.revision = page.revision;
            for session in page.sessions {
                listed.sessions.push(SessionInfo::try_from(session)?);
            }
            if page.next_page_token.is_empty() {
                return Ok(listed);
            }
            page_token = page.next_page_token;
        }
    }

    /// Ends the session `session_id` (its client gets `Goodbye{EVICTED}`
    /// with `message`); [`PresenceError::NotFound`] if it is not open.
    pub async fn evict(&self, session_id: &str, message: &str) -> Result<(), PresenceError> {
        let request = self.request(pb::EvictSessionRequest {
            session_id: session_id.to_owned(),
            message: message.to_owned(),
        });
        match self.inner.clone().evict_session(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => {
                Err(PresenceError::NotFound(session_id.to_owned()))
            }
            Err(status) => Err(PresenceError::Status(status)),
        }
    }

    /// A watcher of the sessions `filter` covers; it connects on its first
    /// [`next`](Watcher::next).
    pub fn watch(&self, filter: SessionFilter) -> Watcher {
        Watcher::new(self.clone(), filter)
    }

    /// Opens one watch stream, resuming after `revision` of `epoch` (0 for a
    /// fresh watch).
    pub(super) async fn open_watch(
        &self,
        filter: &SessionFilter,
        epoch: u64,
        revision: u64,
    ) -> Result<Streaming<pb::WatchSessionsResponse>, PresenceError> {
        let request = self.request(pb::WatchSessionsRequest {
            client_id: filter.client_id.clone(),
            labels: filter.labels.clone(),
            resume_epoch: epoch,
            resume_after: revision,
        });
        Ok(self
            .inner
            .clone()
            .watch_sessions(request)
            .await
            .map_err(PresenceError::Status)?
            .into_inner())
    }
}

impl fmt::Debug for PresenceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresenceClient")
            .field("admin_token", &self.authorization.is_some())
            .finish_non_exhaustive()
    }
}
