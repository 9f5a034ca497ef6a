//! The request side: reads the peer's messages whether or not the service does.
//!
//! The service behind the layer gets an [`InboundBody`] that only reads from a
//! queue. The real request body is polled by the layer's own response future and
//! body (hyper polls both on the stream's task), which count whole messages into
//! the call's liveness and queue the chunks for the service. So a service that is
//! stuck, or simply slow to read, never makes a live peer look silent. The queue is
//! bounded ([`LivenessLayer::inbound_buffer`](super::LivenessLayer::inbound_buffer)):
//! once full, the layer stops reading and HTTP/2 flow control pushes back on the peer.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;

use super::{
    call::{CallCore, EndCause},
    framing::MessageFramer,
};

/// Something the response side drives to keep the request side read.
pub(crate) trait Pump: Send + Sync {
    /// Reads what the request body has ready, up to the buffer limit.
    fn pump(&self, cx: &mut Context<'_>);

    /// Stops reading for good: the service's reader sees the end of the stream
    /// once it has taken what was queued.
    fn close(&self);
}

/// The request body as the layer reads it, shared with the service's view of it.
pub(crate) struct Inbound<B: Body> {
    state: Mutex<InboundState<B>>,
    core: Arc<CallCore>,
}

struct InboundState<B: Body> {
    /// The real request body, until it ends, fails or the call ends.
    body: Option<B>,
    /// Data read but not yet taken by the service. Chunks, not `Frame`s: a
    /// `Frame` is sized for trailers, three times a chunk, and the queue's
    /// capacity stays with the call for its life.
    queue: VecDeque<Bytes>,
    /// The request's trailers, handed over after the data (gRPC clients
    /// rarely send any).
    trailers: Option<HeaderMap>,
    /// Bytes of data in `queue`.
    queued: usize,
    /// The body's error, handed to the service once.
    error: Option<B::Error>,
    /// The service's task, waiting for a frame.
    reader: Option<Waker>,
    /// Where the message boundaries fall.
    framer: MessageFramer,
}

/// The request body the service behind [`LivenessLayer`](super::LivenessLayer)
/// receives: the same frames as the original, read ahead by the layer.
pub struct InboundBody<B: Body> {
    inbound: Arc<Inbound<B>>,
}

// === impl Inbound ===

impl<B: Body> Inbound<B> {
    pub(crate) fn new(body: B, core: Arc<CallCore>) -> Self {
        Self {
            state: Mutex::new(InboundState {
                body: Some(body),
                queue: VecDeque::new(),
                trailers: None,
                queued: 0,
                error: None,
                reader: None,
                framer: MessageFramer::default(),
            }),
            core,
        }
    }
}

impl<B> Pump for Inbound<B>
where
    B: Body<Data = Bytes> + Send + Unpin,
    B::Error: Send,
{
    fn pump(&self, cx: &mut Context<'_>) {
        let policy = self.core.policy();
        let mut state = self.state.lock();
        let mut arrived = false;
        while state.queued < policy.inbound_buffer {
            let Some(body) = state.body.as_mut() else {
                break;
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        match state.framer.feed(data, policy.max_message_size) {
                            Ok(0) => {}
                            Ok(messages) => self.core.touch(messages),
                            Err(_) => {
                                // Stop reading: nothing more from this peer is wanted.
                                state.body = None;
                                state.queue.clear();
                                state.queued = 0;
                                let reader = state.reader.take();
                                drop(state);
                                if let Some(reader) = reader {
                                    reader.wake();
                                }
                                self.core
                                    .request_ending(EndCause::Oversize, policy.on_oversize.clone());
                                return;
                            }
                        }
                    }
                    match frame.into_data() {
                        Ok(data) => {
                            state.queued += data.len();
                            state.queue.push_back(data);
                        }
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                state.trailers = Some(trailers);
                            }
                        }
                    }
                    arrived = true;
                }
                Poll::Ready(Some(Err(error))) => {
                    state.error = Some(error);
                    state.body = None;
                    arrived = true;
                }
                Poll::Ready(None) => {
                    state.body = None;
                    arrived = true;
                }
                Poll::Pending => break,
            }
        }
        if arrived {
            if let Some(reader) = state.reader.take() {
                reader.wake();
            }
        }
    }

    fn close(&self) {
        let mut state = self.state.lock();
        state.body = None;
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

// === impl InboundBody ===

impl<B: Body> InboundBody<B> {
    pub(crate) fn new(inbound: Arc<Inbound<B>>) -> Self {
        Self { inbound }
    }
}

impl<B: Body> Body for InboundBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin,
    B::Error: Send,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let inbound = &self.inbound;
        let mut state = inbound.state.lock();
        if let Some(data) = state.queue.pop_front() {
            let was_full = state.queued >= inbound.core.policy().inbound_buffer;
            state.queued -= data.len();
            drop(state);
            if was_full {
                // The layer stopped reading at the limit; there is room again.
                inbound.core.wake();
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = state.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if let Some(error) = state.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        if state.body.is_none() {
            return Poll::Ready(None);
        }
        match &state.reader {
            Some(reader) if reader.will_wake(cx.waker()) => {}
            _ => state.reader = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let state = self.inbound.state.lock();
        state.body.is_none()
            && state.queue.is_empty()
            && state.trailers.is_none()
            && state.error.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl<B: Body> std::fmt::Debug for InboundBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundBody").finish_non_exhaustive()
    }
}
