//! A fleet of rotating clients for `benches/rotation.py`: `--sessions` of the
//! library's own `Client`, each on its own connection (so a rotation can land
//! on another server behind a load balancer), all on one runtime, until
//! SIGINT or SIGTERM. Once a second it prints one JSON line: how many are
//! live, and the running totals of rotations and losses.
//!
//! ```sh
//! cargo run --release --example fleet -- http://127.0.0.1:7000 --sessions 8000
//! ```

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tonic_heartbeat::client::{Client, ClientEvent, ClientState};

#[derive(Default)]
struct Totals {
    connected: AtomicU64,
    rotated: AtomicU64,
    lost: AtomicU64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args
        .next()
        .ok_or("usage: fleet URL [--sessions N] [--rate PER_SECOND]")?;
    let (mut sessions, mut rate) = (1000_u64, 500.0_f64);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sessions" => sessions = value.parse()?,
            "--rate" => {
                rate = value.parse()?;
                if rate.is_nan() || rate <= 0.0 {
                    return Err(format!("--rate {rate} must be above 0, like 500").into());
                }
            }
            other => return Err(format!("unknown flag {other}: use --sessions or --rate").into()),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let totals = Arc::new(Totals::default());
        let mut clients = Vec::new();
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        for n in 0..sessions {
            pace.tick().await;
            let client = Client::builder(target.clone())
                .client_id(format!("fleet-{n}"))
                .spawn_on(tokio::runtime::Handle::current())
                .connect()?;
            let mut events = client.events();
            let totals = totals.clone();
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    let counter = match event {
                        ClientEvent::Connected { .. } => &totals.connected,
                        ClientEvent::Rotated { .. } => &totals.rotated,
                        ClientEvent::Lost { .. } => &totals.lost,
                        _ => continue,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
            clients.push(client);
        }
        let mut every = tokio::time::interval(Duration::from_secs(1));
        let mut stop = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = &mut interrupt => break,
                _ = stop.recv() => break,
            }
            let live = clients
                .iter()
                .filter(|client| matches!(client.state(), ClientState::Live { .. }))
                .count();
            println!(
                "{{\"live\":{live},\"connected\":{},\"rotated\":{},\"lost\":{}}}",
                totals.connected.load(Ordering::Relaxed),
                totals.rotated.load(Ordering::Relaxed),
                totals.lost.load(Ordering::Relaxed)
            );
        }
        for client in clients {
            let _ = client.close().await;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
