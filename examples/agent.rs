//! An agent that keeps its presence alive and logs loss and recovery.
//!
//! ```text
//! cargo run -- serve &                       # a server on 127.0.0.1:50051
//! cargo run --example agent -- http://127.0.0.1:50051 worker-1
//! ```
//!
//! Stop the server (Ctrl-C) and start it again: the agent logs the loss, the
//! reconnect attempts with their delays, and the new session. Ctrl-C on the
//! agent says goodbye, so the server records `client_goodbye`, not a timeout.

use tonic_heartbeat::client::{Client, ClientEvent};
use tracing::{info, warn};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let mut args = std::env::args().skip(1);
    let server = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let name = args.next().unwrap_or_else(|| "agent".into());

    let client = Client::builder(server)
        .client_id(name)
        .label("kind", "agent")
        .connect()?;
    let mut events = client.events();
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(ClientEvent::Connected { session_id, ping_interval, timeout }) => {
                    info!(%session_id, ?ping_interval, ?timeout, "present");
                }
                Some(ClientEvent::Rotated { from, to, .. }) => {
                    info!(%from, session_id = %to, "rotated to a new session; never missing");
                }
                Some(ClientEvent::Lost { reason }) => warn!(?reason, "presence lost"),
                Some(ClientEvent::Reconnecting { attempt, delay }) => {
                    info!(attempt, ?delay, "reconnecting");
                }
                Some(ClientEvent::Rtt { smoothed, .. }) => info!(?smoothed, "rtt"),
                Some(ClientEvent::Closed) | None => break,
                Some(ClientEvent::Missed { count }) => warn!(count, "missed events"),
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.close().await?;
    info!("goodbye said");
    Ok(())
}
