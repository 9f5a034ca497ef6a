//! `heartbeat.v1.PresenceService`: list, watch and evict sessions.
//!
//! A watch is a snapshot (or a replay) from the registry followed by its
//! changes, forwarded by one small task per watcher into a short channel. The
//! registry bounds each watcher's queue; a watcher that cannot keep up is cut
//! off there and told so here (`RESOURCE_EXHAUSTED`), never silently dropped
//! behind, and never slowing the sessions or other watchers.

use std::{
    future::Future,
    pin::Pin,
    sync::{atomic::Ordering as AtomicOrdering, Arc},
    task::{Context, Poll},
};

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{admission::bearer_token, shared::ServerShared};
use crate::{
    presence::SessionFilter,
    protocol::{
        pb::{self, watch_sessions_response::Event},
        text::{Escaped, QUOTE_BYTES},
    },
    registry::{Lagged, Subscription, SubscriptionStart},
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
            .presence()
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
        let slot = WatcherSlot::take(&self.shared).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "the server holds its maximum of {} presence watches; retry later, or raise --max-watchers",
                self.shared.config.max_watchers
            ))
        })?;
        let subscription = self
            .shared
            .presence()
            .resume(request.resume_epoch, request.resume_after);
        let (events, stream) = mpsc::channel(FORWARD_QUEUE);
        let (cut, cut_off) = oneshot::channel();
        tokio::spawn(async move {
            // Held for the watch's life: the cap and the gauge.
            let _slot = slot;
            let ending = match forward(subscription, filter, &events).await {
                WatchEnd::Over => None,
                WatchEnd::Lagged(lagged) => Some(Status::resource_exhausted(lagged.to_string())),
                WatchEnd::Restarted => Some(Status::unavailable(
                    "this node re-read the cluster after etcd compacted what it missed; resume the watch from the last revision seen",
                )),
            };
            if let Some(ending) = ending {
                let _ = cut.send(ending);
            }
            // Dropped only now: the stream must not end before it hears of a lag.
            drop(events);
        });
        Ok(Response::new(Box::pin(WatchResponses {
            events: stream,
            cut_off: Some(cut_off),
        })))
    }

    async fn evict_session(
        &self,
        request: Request<pb::EvictSessionRequest>,
    ) -> Result<Response<pb::EvictSessionResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        // A session held here is ended here; one of another node's is
        // passed on through the cluster.
        let (id, message) = (&request.session_id, &request.message);
        if self.shared.registry.evict(id, message) || self.shared.presence().evict(id, message) {
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

/// How a watch's forwarding ended.
enum WatchEnd {
    /// The watcher left, or the server shut down (and said so, in order).
    Over,
    /// The registry cut the watcher off for lagging.
    Lagged(Lagged),
    /// The registry (a cluster's view that re-read the cluster) cut every
    /// watcher off, to resume.
    Restarted,
}

/// Sends the subscription's start, `synced`, then its changes, until the
/// watcher leaves or the registry ends it.
async fn forward(
    mut subscription: Subscription,
    filter: SessionFilter,
    events: &Sender,
) -> WatchEnd {
    match stream_watch(&mut subscription, &filter, events).await {
        Ok(()) => WatchEnd::Over,
        Err(WatchEnd::Lagged(_)) if subscription.restarted() => WatchEnd::Restarted,
        Err(end) => end,
    }
}

async fn stream_watch(
    subscription: &mut Subscription,
    filter: &SessionFilter,
    events: &Sender,
) -> Result<(), WatchEnd> {
    let epoch = subscription.epoch;
    // Taken, so a large snapshot is freed as soon as it is sent.
    let start = std::mem::replace(
        &mut subscription.start,
        SubscriptionStart::Replay { revision: 0 },
    );
    let synced_at = match start {
        SubscriptionStart::Snapshot { reset, snapshot } => {
            let revision = snapshot.revision;
            if reset {
                deliver(
                    events,
                    subscription,
                    response(Event::Reset(pb::Reset {}), revision),
                )
                .await?;
            }
            for session in snapshot
                .sessions
                .iter()
                .filter(|s| filter.matches(&s.identity))
            {
                let opened = response(Event::Opened(session.into()), revision);
                deliver(events, subscription, opened).await?;
            }
            revision
        }
        SubscriptionStart::Replay { revision } => {
            while let Some(change) = subscription.next_missed().map_err(WatchEnd::Lagged)? {
                if filter.matches(&change.event.session().identity) {
                    deliver(events, subscription, change.as_ref().into()).await?;
                }
            }
            revision
        }
    };
    let synced = Event::Synced(pb::Synced {
        epoch,
        revision: synced_at,
    });
    deliver(events, subscription, response(synced, synced_at)).await?;
    loop {
        let next = tokio::select! {
            next = subscription.next() => next,
            // A watcher that left is noticed now, not at the next change.
            () = events.closed() => return Ok(()),
        };
        match next {
            Ok(Some(change)) => {
                if filter.matches(&change.event.session().identity) {
                    deliver(events, subscription, change.as_ref().into()).await?;
                }
            }
            Ok(None) => {
                let ending = Status::unavailable(
                    "the server is shutting down; resume the watch from the last revision seen",
                );
                let _ = events.send(Err(ending)).await;
                return Ok(());
            }
            Err(lagged) => return Err(WatchEnd::Lagged(lagged)),
        }
    }
}

/// Sends one response, unless the watcher left or, while the send waits on
/// a watcher that does not read, the registry cuts it off for lagging.
async fn deliver(
    events: &Sender,
    subscription: &Subscription,
    response: pb::WatchSessionsResponse,
) -> Result<(), WatchEnd> {
    tokio::select! {
        sent = events.send(Ok(response)) => sent.map_err(|_| WatchEnd::Over),
        lagged = subscription.lagged() => Err(WatchEnd::Lagged(lagged)),
    }
}

fn response(event: Event, revision: u64) -> pb::WatchSessionsResponse {
    pb::WatchSessionsResponse {
        event: Some(event),
        revision,
    }
}

/// A watch's responses: its events in order, except that a watcher cut off
/// (for lagging, or by a cluster view's resynchronization) hears it at once,
/// ahead of what was queued for it (it resumes from the last revision it
/// saw, so nothing is lost).
struct WatchResponses {
    events: mpsc::Receiver<Result<pb::WatchSessionsResponse, Status>>,
    cut_off: Option<oneshot::Receiver<Status>>,
}

impl Stream for WatchResponses {
    type Item = Result<pb::WatchSessionsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(cut_off) = &mut self.cut_off {
            match Pin::new(cut_off).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.cut_off = None;
                    // What was queued is dropped now; tonic ends the call here.
                    self.events.close();
                    return Poll::Ready(Some(Err(status)));
                }
                // The watch ended without being cut off.
                Poll::Ready(Err(_)) => self.cut_off = None,
                Poll::Pending => {}
            }
        }
        self.events.poll_recv(cx)
    }
}

/// One of the server's presence watches, counted against
/// `ServerConfig::max_watchers` and in the metrics for as long as it lives.
struct WatcherSlot {
    shared: Arc<ServerShared>,
}

impl WatcherSlot {
    /// Takes a slot, or `None` if every one is taken.
    fn take(shared: &Arc<ServerShared>) -> Option<Self> {
        let max = shared.config.max_watchers;
        shared
            .watchers
            .fetch_update(AtomicOrdering::AcqRel, AtomicOrdering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        shared.metrics.watcher_started();
        Some(Self {
            shared: shared.clone(),
        })
    }
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        self.shared.watchers.fetch_sub(1, AtomicOrdering::AcqRel);
        self.shared.metrics.watcher_ended();
    }
}
