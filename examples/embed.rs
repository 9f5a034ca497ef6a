//! Embedding the heartbeat service in your own tonic server, next to another
//! service, and reacting when a peer dies.
//!
//! Run it, then point a client at it:
//!
//! ```text
//! cargo run --example embed -- 127.0.0.1:50051
//! ```

use std::net::SocketAddr;

use tonic::transport::{server::TcpIncoming, Server};
use tonic_heartbeat::{
    registry::{SessionEvent, SubscriptionStart},
    HeartbeatServer, ServerConfig,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".into())
        .parse()?;

    // The heartbeat service and a handle to its sessions, like tonic-health's pair.
    let (heartbeat_handle, heartbeat) = HeartbeatServer::new(ServerConfig::default())?;
    // Any other service of yours; here, the standard health service.
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>>()
        .await;

    // React to peers: stop routing work to a suspect worker, forget a closed one.
    let mut sessions = heartbeat_handle.subscribe();
    if let SubscriptionStart::Snapshot { snapshot, .. } = &sessions.start {
        println!("{} sessions open at start", snapshot.sessions.len());
    }
    tokio::spawn(async move {
        while let Ok(Some(change)) = sessions.next().await {
            let session = change.event.session();
            let who = &session.identity.client_id;
            match &change.event {
                SessionEvent::Opened(_) => println!("{who}: up"),
                SessionEvent::Suspected(_) => println!("{who}: late, stop routing to it"),
                SessionEvent::Recovered(_) => println!("{who}: back"),
                SessionEvent::Closed { reason, .. } => println!("{who}: gone ({reason})"),
            }
        }
    });

    let incoming = TcpIncoming::bind(addr)?.with_nodelay(Some(true));
    let drain = heartbeat_handle.clone();
    Server::builder()
        .max_concurrent_streams(4096)
        .add_service(health)
        .add_service(heartbeat)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = tokio::signal::ctrl_c().await;
            // Tell every client why, then let tonic finish the connections.
            drain.drain();
        })
        .await?;
    Ok(())
}
