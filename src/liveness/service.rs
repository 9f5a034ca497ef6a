//! The service that wraps each call with liveness tracking.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Body;
use tower::Service;

use super::{
    body::LivenessBody,
    call::{CallCore, LivenessHandle},
    future::ResponseFuture,
    inbound::{Inbound, InboundBody},
    policy::LivenessPolicy,
    wheel::TimerWheel,
};

/// Tracks the liveness of every call to `S` and ends silent ones.
///
/// Built by [`LivenessLayer`](super::LivenessLayer); see the
/// [module docs](super) for an example.
#[derive(Clone)]
pub struct Liveness<S> {
    inner: S,
    policy: Arc<LivenessPolicy>,
    wheel: TimerWheel,
}

impl<S> Liveness<S> {
    pub(crate) fn new(inner: S, policy: Arc<LivenessPolicy>, wheel: TimerWheel) -> Self {
        Self {
            inner,
            policy,
            wheel,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Liveness<S>
where
    S: Service<http::Request<InboundBody<ReqBody>>, Response = http::Response<ResBody>>,
    ReqBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ReqBody::Error: Send,
    ResBody: Body<Data = Bytes>,
{
    type Response = http::Response<LivenessBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let core = CallCore::start(self.policy.clone(), self.wheel.clone());
        let (mut parts, body) = request.into_parts();
        parts
            .extensions
            .insert(LivenessHandle { core: core.clone() });
        let inbound = Arc::new(Inbound::new(body, core.clone()));
        let request = http::Request::from_parts(parts, InboundBody::new(inbound.clone()));
        ResponseFuture::new(self.inner.call(request), core, inbound)
    }
}

impl<S> std::fmt::Debug for Liveness<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Liveness")
            .field("timeout", &self.policy.timeout)
            .finish_non_exhaustive()
    }
}
