//! The response body: the service's own, until the call must end.

use std::{
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;

use super::{
    call::{CallCore, Ending},
    framing::MessageFramer,
    inbound::Pump,
};

pin_project! {
    /// The response body of a call behind [`LivenessLayer`](super::LivenessLayer).
    ///
    /// Passes the service's body through, counting whole messages, and keeps the
    /// request side read. When the call must end (silence, an oversized message,
    /// or [`LivenessHandle::end`](super::LivenessHandle::end)) it drops the
    /// service's body and yields the ending's last message (if the stream is at a
    /// message boundary) and its trailers instead.
    pub struct LivenessBody<B> {
        #[pin]
        inner: Option<B>,
        core: Arc<CallCore>,
        pump: Option<Arc<dyn Pump>>,
        sent: MessageFramer,
        farewell: Option<Box<Ending>>,
        done: bool,
    }

    impl<B> PinnedDrop for LivenessBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // A body dropped before its end (the peer reset the stream, the
            // connection broke) must not leave timers running for the call,
            // nor a reader of the request waiting for frames that never come.
            this.core.mark_complete();
            if let Some(pump) = this.pump.as_ref() {
                pump.close();
            }
        }
    }
}

impl<B> LivenessBody<B> {
    pub(crate) fn new(inner: B, core: Arc<CallCore>, pump: Arc<dyn Pump>) -> Self {
        Self {
            inner: Some(inner),
            core,
            pump: Some(pump),
            sent: MessageFramer::default(),
            farewell: None,
            done: false,
        }
    }

    /// A body that only performs `ending`, for a service that never answered.
    pub(crate) fn ending(core: Arc<CallCore>, ending: Box<Ending>) -> Self {
        Self {
            inner: None,
            core,
            pump: None,
            sent: MessageFramer::default(),
            farewell: Some(ending),
            done: false,
        }
    }
}

impl<B> Body for LivenessBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            if let Some(farewell) = this.farewell.as_mut() {
                if let Some(message) = farewell.message.take() {
                    this.core.count_sent(1);
                    return Poll::Ready(Some(Ok(Frame::data(message))));
                }
                let trailers = std::mem::take(&mut farewell.trailers);
                *this.farewell = None;
                *this.done = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if *this.done {
                return Poll::Ready(None);
            }
            this.core.register(cx);
            if let Some(pump) = this.pump.as_ref() {
                pump.pump(cx);
            }
            if let Some(mut ending) = this.core.take_ending() {
                this.core.ending_taken();
                if !this.sent.at_boundary() {
                    ending.message = None;
                }
                // Dropping the service's body drops whatever work feeds it.
                this.inner.set(None);
                if let Some(pump) = this.pump.take() {
                    pump.close();
                }
                *this.farewell = Some(ending);
                continue;
            }
            let Some(inner) = this.inner.as_mut().as_pin_mut() else {
                *this.done = true;
                return Poll::Ready(None);
            };
            let frame = ready!(inner.poll_frame(cx));
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        // Outbound sizes are the service's own; no limit applies.
                        let messages = this.sent.feed(data, u32::MAX).unwrap_or(0);
                        this.core.count_sent(messages);
                    } else if frame.is_trailers() {
                        this.core.mark_complete();
                    }
                }
                Some(Err(_)) | None => {
                    this.core.mark_complete();
                    *this.done = true;
                }
            }
            return Poll::Ready(frame);
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.farewell.is_some() {
            return false;
        }
        // Deferring to the service's body lets an error-only answer (tonic's
        // `Status::into_http`) go out as a proper trailers-only response.
        self.done || self.inner.as_ref().is_none_or(B::is_end_stream)
    }
}

impl<B> std::fmt::Debug for LivenessBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LivenessBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}
