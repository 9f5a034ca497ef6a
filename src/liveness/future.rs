//! The response future: the service's, unless the call ends before it answers.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use http::{header::CONTENT_TYPE, HeaderValue};
use pin_project_lite::pin_project;

use super::{body::LivenessBody, call::CallCore, inbound::Pump};

pin_project! {
    /// The response future of [`Liveness`](super::Liveness).
    ///
    /// While the service works on its answer, this future keeps reading the
    /// request (so liveness is tracked) and watches the deadline: if the call
    /// ends first, it answers in the service's place with the ending and drops
    /// the service's future, however stuck that future is.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        core: Arc<CallCore>,
        pump: Option<Arc<dyn Pump>>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, core: Arc<CallCore>, pump: Arc<dyn Pump>) -> Self {
        Self {
            inner,
            core,
            pump: Some(pump),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<LivenessBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.core.register(cx);
        if let Some(pump) = this.pump.as_ref() {
            pump.pump(cx);
        }
        if let Some(ending) = this.core.take_ending() {
            this.core.ending_taken();
            if let Some(pump) = this.pump.take() {
                pump.close();
            }
            let mut response = http::Response::new(LivenessBody::ending(this.core.clone(), ending));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            return Poll::Ready(Ok(response));
        }
        let response = ready!(this.inner.poll(cx))?;
        let pump = this
            .pump
            .take()
            .expect("the pump is only taken when the future completes, and it is not polled after");
        let core = this.core.clone();
        Poll::Ready(Ok(response.map(|body| LivenessBody::new(body, core, pump))))
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
