//! `heartbeat.v1.PresenceService`: list, watch and evict sessions.
//!
//! A watch is a snapshot (or a replay) from the registry followed by its
//! changes, forwarded by one small task per watcher into a short channel. The
//! registry bounds each watcher's queue; a watcher that cannot keep up is cut
//! off there and told so here (`RESOURCE_EXHAUSTED`), never silently dropped
//! behind, and never slowing the sessions or other watchers.

use std::{pin::Pin, sync::Arc};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

use super::shared::ServerShared;
use crate::{
    presence::SessionFilter,
    protocol::{
        pb::{self, watch_sessions_response::Event},
        text::{Escaped, QUOTE_BYTES},
    },
    registry::{Subscription, SubscriptionStart},
};

/// Events in flight between a watcher's forwarding task and its stream; the
/// registry's per-watcher queue is the real bound.
const FORWARD_QUEUE: usize = 32;

/// Sessions in a page when the request does not say (AIP-158's default).
const DEFAULT_PAGE_SIZE: usize = 1000;
/// The most sessions in one page; larger requests are lowered to it.
const MAX_PAGE_SIZE: usize = 10_000;
/// The most bytes of sessions in one page: under the 4 MiB every gRPC stack
/// accepts by default, with room for the rest of the response.
const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;
/// What a page token holds before the last session id of its page. Tokens
/// are opaque to clients; this only tells the server's own from others.
const PAGE_TOKEN_PREFIX: &str = "after:";

/// The service behind [`HeartbeatHandle::presence`](super::HeartbeatHandle::presence).
pub(crate) struct PresenceEndpoint {
    shared: Arc<ServerShared>,
}

impl PresenceEndpoint {
    pub(crate) fn new(shared: Arc<ServerShared>) -> Self {
        Self { shared }
    }

    /// Refuses the call while the server drains, and unless it carries the
    /// admin token, when one is set.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.shared.gate.is_draining() {
            return Err(Status::unavailable(
                "the server is shutting down; retry against another instance",
            ));
        }
        let Some(token) = &self.shared.config.admin_token else {
            return Ok(());
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| bearer_token(value.as_bytes()));
        match presented {
            Some(presented) if token.matches(presented) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "the admin token is wrong: send authorization: Bearer <token> with the server's token",
            )),
            None => Err(Status::unauthenticated(
                "this server requires an admin token: send authorization: Bearer <token>",
            )),
        }
    }
}

/// The credentials of an `authorization: Bearer <token>` value; the scheme is
/// case-insensitive (RFC 7235) and surrounding white space is ignored.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchSessionsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::presence_service_server::PresenceService for PresenceEndpoint {
    type WatchSessionsStream = WatchStream;

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let limit = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size if size < 0 => {
                return Err(Status::invalid_argument(format!(
                    "page_size {size} is negative: use 0 for the default ({DEFAULT_PAGE_SIZE}) or up to {MAX_PAGE_SIZE}"
                )))
            }
            // Positive, so it fits a usize.
            size => usize::try_from(size).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE),
        };
        let after = match request.page_token.as_str() {
            "" => "",
            token => token.strip_prefix(PAGE_TOKEN_PREFIX).filter(|after| !after.is_empty()).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "page_token \"{}\" is not one this server handed out: start again with an empty page_token",
                    Escaped::quote(token, QUOTE_BYTES)
                ))
            })?,
        };
        let filter = SessionFilter {
            client_id: request.client_id,
            labels: request.labels,
        };
        let page = self
            .shared
            .registry
            .page(after, limit, |identity| filter.matches(identity));
        // Stop early rather than break the receiver's 4 MiB limit.
        let mut sessions = Vec::with_capacity(page.snapshot.sessions.len());
        let mut bytes = 0;
        let mut cut = false;
        for session in &page.snapshot.sessions {
            let session = pb::Session::from(session);
            let size =
                prost::length_delimiter_len(session.encoded_len()) + 1 + session.encoded_len();
            if bytes + size > MAX_PAGE_BYTES && !sessions.is_empty() {
                cut = true;
                break;
            }
            bytes += size;
            sessions.push(session);
        }
        let next_page_token = match sessions.last() {
            Some(last) if cut || page.more => format!("{PAGE_TOKEN_PREFIX}{}", last.session_id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListSessionsResponse {
            sessions,
            epoch: page.snapshot.epoch,
            revision: page.snapshot.revision,
            next_page_token,
        }))
    }

    async fn watch_sessions(
        &self,
        request: Request<pb::WatchSessionsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let filter = SessionFilter {
            client_id: request.client_id,
            labels: request.labels,
        };
        let subscription = self
            .shared
            .registry
            .resume(request.resume_epoch, request.resume_after);
        let (events, stream) = mpsc::channel(FORWARD_QUEUE);
        let metrics = self.shared.metrics.clone();
        metrics.watcher_started();
        tokio::spawn(async move {
            let lagged = forward(subscription, filter, events).await;
            metrics.watcher_ended(lagged);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn evict_session(
        &self,
        request: Request<pb::EvictSessionRequest>,
    ) -> Result<Response<pb::EvictSessionResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        if self
            .shared
            .registry
            .evict(&request.session_id, &request.message)
        {
            Ok(Response::new(pb::EvictSessionResponse {}))
        } else {
            Err(Status::not_found(format!(
                "no session \"{}\" is open; list them with ListSessions",
                Escaped::quote(&request.session_id, QUOTE_BYTES)
            )))
        }
    }
}

type Sender = mpsc::Sender<Result<pb::WatchSessionsResponse, Status>>;

/// Sends the subscription's start, `synced`, then its changes, until the
/// watcher leaves or the registry ends it. Returns whether it lagged.
async fn forward(mut subscription: Subscription, filter: SessionFilter, events: Sender) -> bool {
    let epoch = subscription.epoch;
    let start = std::mem::replace(
        &mut subscription.start,
        SubscriptionStart::Replay {
            changes: Vec::new(),
            revision: 0,
        },
    );
    let synced_at = match start {
        SubscriptionStart::Snapshot { reset, snapshot } => {
            let revision = snapshot.revision;
            if reset && !send(&events, Event::Reset(pb::Reset {}), revision).await {
                return false;
            }
            for session in snapshot
                .sessions
                .iter()
                .filter(|s| filter.matches(&s.identity))
            {
                if !send(&events, Event::Opened(session.into()), revision).await {
                    return false;
                }
            }
            revision
        }
        SubscriptionStart::Replay { changes, revision } => {
            for change in changes
                .iter()
                .filter(|change| filter.matches(&change.event.session().identity))
            {
                if events.send(Ok(change.into())).await.is_err() {
                    return false;
                }
            }
            revision
        }
    };
    let synced = Event::Synced(pb::Synced {
        epoch,
        revision: synced_at,
    });
    if !send(&events, synced, synced_at).await {
        return false;
    }
    loop {
        let next = tokio::select! {
            next = subscription.next() => next,
            // A watcher that left is noticed now, not at the next change.
            () = events.closed() => return false,
        };
        let ending = match next {
            Ok(Some(change)) => {
                if filter.matches(&change.event.session().identity)
                    && events.send(Ok((&change).into())).await.is_err()
                {
                    return false;
                }
                continue;
            }
            Ok(None) => Status::unavailable(
                "the server is shutting down; resume the watch from the last revision seen",
            ),
            Err(lagged) => Status::resource_exhausted(lagged.to_string()),
        };
        let lagged = ending.code() == tonic::Code::ResourceExhausted;
        let _ = events.send(Err(ending)).await;
        return lagged;
    }
}

async fn send(events: &Sender, event: Event, revision: u64) -> bool {
    let response = pb::WatchSessionsResponse {
        event: Some(event),
        revision,
    };
    events.send(Ok(response)).await.is_ok()
}
