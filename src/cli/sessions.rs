//! `heartbeat sessions`: the operator's view of a server's sessions.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use tonic::{transport::Channel, Code, Request, Status};
use tonic_heartbeat::{
    client::endpoint_for,
    config::AdminToken,
    protocol::{
        pb::{
            self, presence_service_client::PresenceServiceClient, watch_sessions_response::Event,
        },
        proto_to_duration,
    },
};

use super::{current_thread_runtime, parse_label, Output, ShutdownSignals};

/// Flags of `heartbeat sessions`.
#[derive(Debug, Args)]
pub(crate) struct SessionsArgs {
    /// The server: http://127.0.0.1:50051, or a bare host:port.
    #[arg(value_name = "URL")]
    url: String,

    /// Print every change as it happens, resuming by itself after a dropped stream.
    #[arg(long, conflicts_with = "evict")]
    watch: bool,

    /// End this session (the client gets Goodbye{EVICTED} and ABORTED).
    #[arg(long, value_name = "SESSION_ID")]
    evict: Option<String>,

    /// With --evict: the message passed on to the client in its goodbye.
    #[arg(long, requires = "evict", default_value = "")]
    message: String,

    /// Only the sessions of this client id.
    #[arg(long, default_value = "")]
    client_id: String,

    /// Only sessions with this label, as key=value; repeat to require several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,

    /// How to print: text (a table, or one line per event) or json (one object a line).
    #[arg(long, value_enum, default_value_t = Output::Text, env = "HEARTBEAT_OUTPUT")]
    output: Output,

    /// A file holding the server's admin token, sent as `authorization: Bearer …`.
    #[arg(long, env = "HEARTBEAT_ADMIN_TOKEN_FILE", value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
}

/// Talks to one server's PresenceService, token attached.
struct Presence {
    client: PresenceServiceClient<Channel>,
    token: Option<AdminToken>,
}

impl Presence {
    fn request<T>(&self, message: T) -> anyhow::Result<Request<T>> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            let mut value: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.expose())
                .parse()
                .context("the admin token is not valid in a header: it must be printable ASCII")?;
            // Kept out of HTTP/2 header compression tables.
            value.set_sensitive(true);
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// Lists, watches or evicts, as the flags say.
pub(crate) fn run(args: SessionsArgs) -> anyhow::Result<()> {
    let endpoint = endpoint_for(&args.url)?;
    let token = args
        .admin_token_file
        .as_deref()
        .map(AdminToken::from_file)
        .transpose()?;
    let runtime = current_thread_runtime()?;
    runtime.block_on(async move {
        let mut signals = ShutdownSignals::listen()?;
        let channel = endpoint
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", args.url))?;
        let mut presence = Presence {
            client: PresenceServiceClient::new(channel),
            token,
        };
        let labels: HashMap<String, String> = args.labels.iter().cloned().collect();
        if let Some(session_id) = &args.evict {
            return evict(&mut presence, session_id, &args.message, args.output).await;
        }
        if args.watch {
            tokio::select! {
                result = watch(&mut presence, &args.client_id, &labels, args.output) => result,
                () = signals.recv() => Ok(()),
            }
        } else {
            list(&mut presence, &args.client_id, &labels, args.output).await
        }
    })
}

impl Presence {
    /// The error for a call the server refused, saying what to do about it.
    fn refused(&self, status: Status) -> anyhow::Error {
        match (status.code(), &self.token) {
            (Code::Unauthenticated, None) => anyhow::anyhow!(
                "{} (pass the token file with --admin-token-file)",
                status.message()
            ),
            (Code::Unauthenticated, Some(_)) => anyhow::anyhow!(
                "the server refused the admin token: {} (check the file given to --admin-token-file)",
                status.message()
            ),
            (code, _) => anyhow::anyhow!("the server answered {code:?}: {}", status.message()),
        }
    }
}

async fn evict(
    presence: &mut Presence,
    session_id: &str,
    message: &str,
    output: Output,
) -> anyhow::Result<()> {
    let request = presence.request(pb::EvictSessionRequest {
        session_id: session_id.to_owned(),
        message: message.to_owned(),
    })?;
    match presence.client.evict_session(request).await {
        Ok(_) => {
            match output {
                Output::Text => println!("evicted {session_id}"),
                Output::Json => println!("{}", json!({ "evicted": session_id })),
            }
            Ok(())
        }
        Err(status) if status.code() == Code::NotFound => {
            bail!("no session {session_id:?} is open (list them with heartbeat sessions URL)")
        }
        Err(status) => Err(presence.refused(status)),
    }
}

async fn list(
    presence: &mut Presence,
    client_id: &str,
    labels: &HashMap<String, String>,
    output: Output,
) -> anyhow::Result<()> {
    let request = presence.request(pb::ListSessionsRequest {
        client_id: client_id.to_owned(),
        labels: labels.clone(),
    })?;
    let response = match presence.client.list_sessions(request).await {
        Ok(response) => response,
        Err(status) => return Err(presence.refused(status)),
    };
    let mut sessions = response.into_inner().sessions;
    sessions.sort_by(|a, b| (&a.client_id, &a.session_id).cmp(&(&b.client_id, &b.session_id)));
    match output {
        Output::Json => {
            for session in &sessions {
                println!("{}", session_json(session));
            }
        }
        Output::Text => print_table(&sessions),
    }
    Ok(())
}

/// Watches, resuming from the last revision seen whenever the stream drops.
///
/// Only a revision reached after `synced` is a place to resume from: a stream
/// that drops in the middle of a snapshot resumes from where it was before
/// that snapshot (or afresh), so no session of the snapshot is skipped.
async fn watch(
    presence: &mut Presence,
    client_id: &str,
    labels: &HashMap<String, String>,
    output: Output,
) -> anyhow::Result<()> {
    let (mut epoch, mut revision) = (0, 0);
    let mut delay = Duration::from_millis(200);
    loop {
        let request = presence.request(pb::WatchSessionsRequest {
            client_id: client_id.to_owned(),
            labels: labels.clone(),
            resume_epoch: epoch,
            resume_after: revision,
        })?;
        let ended = match presence.client.watch_sessions(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                let mut synced = false;
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            delay = Duration::from_millis(200);
                            if let Some(Event::Synced(marker)) = &event.event {
                                synced = true;
                                epoch = marker.epoch;
                            }
                            if synced {
                                revision = event.revision;
                            }
                            print_event(&event, output);
                        }
                        Ok(None) => break Status::unavailable("the server ended the watch"),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        // Only what may pass is worth waiting for: a restart, a lag, a hiccup.
        let transient = matches!(
            ended.code(),
            Code::Unavailable
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Internal
                | Code::Unknown
        );
        if !transient {
            return Err(presence.refused(ended));
        }
        eprintln!(
            "watch interrupted ({:?}: {}); resuming after revision {revision} in {}",
            ended.code(),
            ended.message(),
            humantime::format_duration(delay)
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn print_event(event: &pb::WatchSessionsResponse, output: Output) {
    let revision = event.revision;
    let Some(inner) = &event.event else { return };
    let (kind, session, extra) = match inner {
        Event::Opened(session) => ("opened", Some(session), String::new()),
        Event::Suspected(suspected) => ("suspected", suspected.session.as_ref(), String::new()),
        Event::Recovered(recovered) => ("recovered", recovered.session.as_ref(), String::new()),
        Event::Closed(closed) => {
            let reason = pb::CloseReason::try_from(closed.reason)
                .map(|reason| {
                    reason
                        .as_str_name()
                        .trim_start_matches("CLOSE_REASON_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| closed.reason.to_string());
            let extra = format!(" reason={reason} message={:?}", closed.message);
            ("closed", closed.session.as_ref(), extra)
        }
        Event::Synced(synced) => ("synced", None, format!(" epoch={}", synced.epoch)),
        Event::Reset(_) => ("reset", None, String::new()),
    };
    match output {
        Output::Text => {
            let about = session.map_or_else(String::new, |session| {
                format!(
                    " session={} client={} labels={}",
                    session.session_id,
                    or_dash(&session.client_id),
                    labels_text(&session.labels)
                )
            });
            println!("{kind} revision={revision}{about}{extra}");
        }
        Output::Json => {
            let mut object = json!({ "event": kind, "revision": revision });
            if let Some(session) = session {
                object["session"] = session_json(session);
            }
            match inner {
                Event::Closed(closed) => {
                    object["reason"] = json!(pb::CloseReason::try_from(closed.reason)
                        .map(|r| r.as_str_name())
                        .unwrap_or("CLOSE_REASON_UNSPECIFIED"));
                    object["message"] = json!(closed.message);
                }
                Event::Synced(synced) => object["epoch"] = json!(synced.epoch),
                _ => {}
            }
            println!("{object}");
        }
    }
}

fn session_json(session: &pb::Session) -> serde_json::Value {
    json!({
        "session_id": session.session_id,
        "client_id": session.client_id,
        "labels": session.labels,
        "peer": session.peer,
        "state": state_name(session),
        "opened_at": session.opened_at.as_ref().map(ToString::to_string),
        "last_seen": session.last_seen.as_ref().map(ToString::to_string),
        "rtt_ms": session.rtt.as_ref().and_then(proto_to_duration).map(|rtt| rtt.as_secs_f64() * 1000.0),
        "frames_in": session.frames_in,
        "frames_out": session.frames_out,
    })
}

fn state_name(session: &pb::Session) -> &'static str {
    match session.state() {
        pb::SessionState::Live => "live",
        pb::SessionState::Suspect => "suspect",
        pb::SessionState::Unspecified => "unknown",
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

fn labels_text(labels: &HashMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(",")
}

/// How long ago `time` was, to the millisecond, in human form.
fn ago(time: Option<&prost_types::Timestamp>) -> String {
    let Some(time) = time.and_then(|t| SystemTime::try_from(*t).ok()) else {
        return "-".into();
    };
    let elapsed = SystemTime::now().duration_since(time).unwrap_or_default();
    let millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(millis)).to_string()
}

fn print_table(sessions: &[pb::Session]) {
    let header = [
        "SESSION",
        "CLIENT",
        "LABELS",
        "PEER",
        "STATE",
        "AGE",
        "LAST SEEN",
        "RTT",
    ];
    let rows: Vec<[String; 8]> = sessions
        .iter()
        .map(|session| {
            [
                session.session_id.clone(),
                or_dash(&session.client_id).to_owned(),
                labels_text(&session.labels),
                or_dash(&session.peer).to_owned(),
                state_name(session).to_owned(),
                ago(session.opened_at.as_ref()),
                format!("{} ago", ago(session.last_seen.as_ref())),
                session
                    .rtt
                    .as_ref()
                    .and_then(proto_to_duration)
                    .map_or_else(
                        || "-".into(),
                        |rtt| format!("{:.3}ms", rtt.as_secs_f64() * 1000.0),
                    ),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    println!("{} session(s)", rows.len());
}
