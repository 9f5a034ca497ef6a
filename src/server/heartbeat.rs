//! The `heartbeat.v1.HeartbeatService` implementation: admission, then a session.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::{
    admission::Refusal, connection::PeerInfo, session::SessionStream, shared::ServerShared,
};
use crate::{liveness::LivenessHandle, protocol::pb};

/// The generated service's implementation; mounted behind the liveness layer.
#[derive(Clone)]
pub(crate) struct HeartbeatEndpoint {
    pub(crate) shared: Arc<ServerShared>,
}

#[tonic::async_trait]
impl pb::heartbeat_service_server::HeartbeatService for HeartbeatEndpoint {
    type HeartbeatStream = SessionStream;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<SessionStream>, Status> {
        let handle = request
            .extensions()
            .get::<LivenessHandle>()
            .cloned()
            .ok_or_else(|| {
                Status::internal("HeartbeatService must be mounted behind the liveness layer: use server::HeartbeatServer")
            })?;
        let permit = self
            .shared
            .gate
            .admit(handle.clone())
            .inspect_err(|refusal| self.shared.metrics.admission_rejected(refusal.as_str()))
            .map_err(|refusal| match refusal {
                Refusal::Draining => Status::unavailable(
                    "the server is shutting down; reconnect to another instance or retry shortly",
                ),
                Refusal::Full { capacity } => Status::resource_exhausted(format!(
                    "the server holds its maximum of {capacity} sessions; retry later"
                )),
            })?;
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .map(|peer| peer.remote_addr)
            .or_else(|| request.remote_addr());
        Ok(Response::new(SessionStream::new(
            self.shared.clone(),
            handle,
            permit,
            peer,
            request.into_inner(),
        )))
    }
}
