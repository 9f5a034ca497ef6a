//! The `heartbeat.v1.HeartbeatService` implementation: admission, then a session.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::{
    admission::{authenticate, Refusal},
    connection::PeerInfo,
    session::SessionStream,
    shared::ServerShared,
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
        let refused = |refusal: Refusal| {
            self.shared.metrics.admission_rejected(refusal.as_str());
            refusal.status()
        };
        let peer_info = request.extensions().get::<PeerInfo>();
        let allowed = authenticate(
            &self.shared.config,
            request.metadata(),
            peer_info.and_then(|peer| peer.certificate.as_ref()),
        )
        .map_err(refused)?;
        let permit = self.shared.gate.admit(handle.clone()).map_err(refused)?;
        let peer = peer_info
            .map(|peer| peer.remote_addr)
            .or_else(|| request.remote_addr());
        Ok(Response::new(SessionStream::new(
            self.shared.clone(),
            handle,
            permit,
            peer,
            allowed,
            request.into_inner(),
        )))
    }
}
