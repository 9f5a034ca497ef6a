//! `grpc.health.v1.Health`, whose watches end when the server drains.
//!
//! tonic-health's `Watch` streams last as long as the service does, so a
//! client doing gRPC client-side health checking would hold every shutdown for
//! its whole grace period. Here a watch delivers the `NOT_SERVING` the drain
//! sets, and then ends.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use tokio::sync::watch;
use tokio_stream::{wrappers::WatchStream, Stream};
use tonic::{Request, Response, Status};
use tonic_health::{
    pb::{health_server::Health, HealthCheckRequest, HealthCheckResponse},
    server::{HealthReporter, HealthService},
};

/// The health service of one server.
pub(crate) struct DrainingHealth {
    inner: HealthService,
    draining: watch::Receiver<bool>,
}

impl DrainingHealth {
    /// Serves what `reporter` reports; watches end once `draining` turns true.
    pub(crate) fn new(reporter: HealthReporter, draining: watch::Receiver<bool>) -> Self {
        Self {
            inner: HealthService::from_health_reporter(reporter),
            draining,
        }
    }
}

#[tonic::async_trait]
impl Health for DrainingHealth {
    type WatchStream = EndsAtDrain<<HealthService as Health>::WatchStream>;

    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        Ok(Response::new(EndsAtDrain {
            inner,
            draining: WatchStream::new(self.draining.clone()),
            drained: false,
        }))
    }
}

/// A stream that ends once the drain has begun and it has nothing more ready.
pub(crate) struct EndsAtDrain<S> {
    inner: S,
    draining: WatchStream<bool>,
    drained: bool,
}

impl<S> Stream for EndsAtDrain<S>
where
    S: Stream + Unpin,
{
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        // The service's own update (NOT_SERVING) goes out before the end.
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        while let Poll::Ready(Some(draining)) = Pin::new(&mut self.draining).poll_next(cx) {
            self.drained |= draining;
        }
        if self.drained {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}
