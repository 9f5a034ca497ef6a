//! `heartbeat connect`: hold a session and print what happens to it.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use serde_json::json;
use tonic_heartbeat::client::{Client, ClientEvent, LossReason};

use super::{current_thread_runtime, parse_label, read_token, Output, ShutdownSignals, TlsArgs};

/// Flags of `heartbeat connect`.
#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// The server: http://127.0.0.1:50051, or a bare host:port. Give more
    /// than one (the nodes of a cluster) and each loss moves on to the next.
    #[arg(value_name = "URL", required = true, num_args = 1..)]
    urls: Vec<String>,

    /// The name this client goes by in presence; empty means anonymous.
    #[arg(long, env = "HEARTBEAT_CLIENT_ID", default_value = "")]
    client_id: String,

    /// A label for presence filters, as key=value; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,

    #[command(flatten)]
    tls: TlsArgs,

    /// A file holding this client's bearer token (surrounding white space
    /// ignored), for a server with client credentials.
    #[arg(long, env = "HEARTBEAT_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,

    /// How events are printed: text for people, json (one object a line) for programs.
    #[arg(long, value_enum, default_value_t = Output::Text, env = "HEARTBEAT_OUTPUT")]
    output: Output,
}

/// Connects and prints events until a signal, then says goodbye.
pub(crate) fn run(args: ConnectArgs) -> anyhow::Result<()> {
    let runtime = current_thread_runtime()?;
    runtime.block_on(async move {
        // Listening before the session opens: a signal right after it must
        // say goodbye, not kill the process.
        let mut signals = ShutdownSignals::listen()?;
        let (first, others) = args
            .urls
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("give the server's URL, like http://127.0.0.1:50051"))?;
        let mut builder = Client::builder(first.clone()).client_id(args.client_id);
        for url in others {
            builder = builder.endpoint(url.clone());
        }
        if let Some(tls) = args.tls.settings() {
            builder = builder.tls(tls);
        }
        if let Some(path) = &args.token_file {
            builder = builder.bearer_token(read_token(path)?);
        }
        for (key, value) in args.labels {
            builder = builder.label(key, value);
        }
        let client = builder.connect()?;
        let mut events = client.events();
        loop {
            tokio::select! {
                event = events.next() => match event {
                    // Closed for good (replaced by another instance): done.
                    Some(ClientEvent::Closed) | None => {
                        print_event(&ClientEvent::Closed, args.output);
                        return Ok(());
                    }
                    Some(event) => print_event(&event, args.output),
                },
                () = signals.recv() => break,
            }
        }
        if let Err(error) = client.close().await {
            // Stopping was asked for and the goodbye is sent; a server that
            // does not confirm it in time is worth a word, not a failure.
            tracing::warn!(%error, "closing without the server's confirmation");
        }
        // The goodbye's outcome (and the final `closed`) is already queued.
        while let Some(event) = events.next().await {
            print_event(&event, args.output);
        }
        Ok(())
    })
}

fn print_event(event: &ClientEvent, output: Output) {
    match output {
        Output::Text => println!("{}", text(event)),
        Output::Json => println!("{}", json_of(event)),
    }
}

/// Milliseconds rounded to the microsecond, without float noise in the output.
fn ms(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn text(event: &ClientEvent) -> String {
    match event {
        ClientEvent::Connected {
            session_id,
            ping_interval,
            timeout,
        } => format!(
            "connected session_id={session_id} ping_interval={} timeout={}",
            humantime::format_duration(*ping_interval),
            humantime::format_duration(*timeout)
        ),
        ClientEvent::Rotated {
            from,
            to,
            ping_interval,
            timeout,
        } => format!(
            "rotated from={from} session_id={to} ping_interval={} timeout={}",
            humantime::format_duration(*ping_interval),
            humantime::format_duration(*timeout)
        ),
        ClientEvent::Rtt {
            sample, smoothed, ..
        } => format!(
            "rtt sample={:.3}ms smoothed={:.3}ms",
            ms(*sample),
            ms(*smoothed)
        ),
        ClientEvent::Lost { reason } => format!("lost {}", loss_text(reason)),
        ClientEvent::Reconnecting { attempt, delay } => {
            format!("reconnecting attempt={attempt} delay={:.0}ms", ms(*delay))
        }
        ClientEvent::Closed => "closed".into(),
        ClientEvent::Missed { count } => format!("missed events={count}"),
    }
}

fn loss_text(reason: &LossReason) -> String {
    match reason {
        LossReason::Timeout { silence } => {
            format!("reason=timeout silence={:.0}ms", ms(*silence))
        }
        LossReason::Transport { message } => format!("reason=transport message={message:?}"),
        LossReason::Status { code, message } => {
            format!("reason=status code={code:?} message={message:?}")
        }
        LossReason::Goodbye {
            reason,
            message,
            reconnect_after,
        } => {
            let hint = reconnect_after
                .map(|after| format!(" reconnect_after={:.0}ms", ms(after)))
                .unwrap_or_default();
            format!(
                "reason=goodbye goodbye={} message={message:?}{hint}",
                reason.as_str()
            )
        }
    }
}

fn json_of(event: &ClientEvent) -> serde_json::Value {
    match event {
        ClientEvent::Connected {
            session_id,
            ping_interval,
            timeout,
        } => json!({
            "event": "connected",
            "session_id": session_id,
            "ping_interval_ms": ms(*ping_interval),
            "timeout_ms": ms(*timeout),
        }),
        ClientEvent::Rotated {
            from,
            to,
            ping_interval,
            timeout,
        } => json!({
            "event": "rotated",
            "from": from,
            "session_id": to,
            "ping_interval_ms": ms(*ping_interval),
            "timeout_ms": ms(*timeout),
        }),
        ClientEvent::Rtt {
            sample,
            smoothed,
            variance,
        } => json!({
            "event": "rtt",
            "sample_ms": ms(*sample),
            "smoothed_ms": ms(*smoothed),
            "variance_ms": ms(*variance),
        }),
        ClientEvent::Lost { reason } => {
            let mut object = json!({ "event": "lost" });
            let detail = match reason {
                LossReason::Timeout { silence } => {
                    json!({ "reason": "timeout", "silence_ms": ms(*silence) })
                }
                LossReason::Transport { message } => {
                    json!({ "reason": "transport", "message": message })
                }
                LossReason::Status { code, message } => {
                    json!({ "reason": "status", "code": format!("{code:?}"), "message": message })
                }
                LossReason::Goodbye {
                    reason,
                    message,
                    reconnect_after,
                } => json!({
                    "reason": "goodbye",
                    "goodbye": reason.as_str(),
                    "message": message,
                    "reconnect_after_ms": reconnect_after.map(ms),
                }),
            };
            if let (Some(object), Some(detail)) = (object.as_object_mut(), detail.as_object()) {
                object.extend(detail.clone());
            }
            object
        }
        ClientEvent::Reconnecting { attempt, delay } => json!({
            "event": "reconnecting",
            "attempt": attempt,
            "delay_ms": ms(*delay),
        }),
        ClientEvent::Closed => json!({ "event": "closed" }),
        ClientEvent::Missed { count } => json!({ "event": "missed", "count": count }),
    }
}
