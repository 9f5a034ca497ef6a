//! `heartbeat sessions`: the operator's view of a server's sessions.
//!
//! A thin printer over the library's `PresenceClient` and `Watcher`: the
//! logic that keeps a watch correct lives there, for every user.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{anyhow, Context};
use clap::Args;
use serde_json::json;
use tonic::Code;
use tonic_heartbeat::{
    client::{secure_endpoint, Backoff},
    config::AdminToken,
    error::PresenceError,
    presence::{PresenceClient, SessionFilter, SessionInfo, WatchEvent},
    protocol::pb,
    registry::{SessionEvent, SessionState},
};

use super::{current_thread_runtime, parse_label, Output, ShutdownSignals, TlsArgs};

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

    #[command(flatten)]
    tls: TlsArgs,

    /// A file holding the server's admin token, sent as `authorization: Bearer …`.
    #[arg(long, env = "HEARTBEAT_ADMIN_TOKEN_FILE", value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
}

/// Lists, watches or evicts, as the flags say.
pub(crate) fn run(args: SessionsArgs) -> anyhow::Result<()> {
    let endpoint = secure_endpoint(&args.url, args.tls.settings().as_ref())?;
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
        let mut presence = PresenceClient::new(channel);
        if let Some(token) = &token {
            presence = presence.admin_token(token)?;
        }
        let explain = |error| explain(error, token.is_some());
        let filter = SessionFilter {
            client_id: args.client_id,
            labels: args.labels.into_iter().collect(),
        };
        if let Some(session_id) = &args.evict {
            presence
                .evict(session_id, &args.message)
                .await
                .map_err(explain)?;
            match args.output {
                Output::Text => println!("evicted {session_id}"),
                Output::Json => println!("{}", json!({ "evicted": session_id })),
            }
            return Ok(());
        }
        if !args.watch {
            let mut sessions = presence.list(&filter).await.map_err(explain)?.sessions;
            sessions.sort_by(|a, b| {
                let key =
                    |s: &SessionInfo| (s.identity.client_id.clone(), s.identity.session_id.clone());
                key(a).cmp(&key(b))
            });
            match args.output {
                Output::Json => sessions
                    .iter()
                    .for_each(|session| println!("{}", session_json(session))),
                Output::Text => print_table(&sessions),
            }
            return Ok(());
        }
        // Quick to come back, and never more than 5 s away from a server
        // that returned: an operator is watching.
        let backoff = Backoff::try_new(
            Duration::from_millis(200),
            Duration::from_secs(5),
            Duration::from_secs(30),
        )?;
        let mut watcher = presence.watch(filter).backoff(backoff);
        loop {
            let event = tokio::select! {
                event = watcher.next() => event.map_err(explain)?,
                () = signals.recv() => return Ok(()),
            };
            match event {
                WatchEvent::Interrupted {
                    error,
                    retry_in,
                    resume_after,
                } => eprintln!(
                    "watch interrupted ({error}); resuming after revision {resume_after} in {}",
                    humantime::format_duration(retry_in)
                ),
                event => print_event(&event, args.output),
            }
        }
    })
}

/// The error for a call the server refused, saying what to do about it.
fn explain(error: PresenceError, has_token: bool) -> anyhow::Error {
    match (&error, has_token) {
        (PresenceError::Status(status), false) if status.code() == Code::Unauthenticated => {
            anyhow!(
                "{} (pass the token file with --admin-token-file)",
                status.message()
            )
        }
        (PresenceError::Status(status), true) if status.code() == Code::Unauthenticated => {
            anyhow!(
                "the server refused the admin token: {} (check the file given to --admin-token-file)",
                status.message()
            )
        }
        (PresenceError::NotFound(session_id), _) => {
            anyhow!("no session {session_id:?} is open (list them with heartbeat sessions URL)")
        }
        _ => anyhow!(error),
    }
}

fn print_event(event: &WatchEvent, output: Output) {
    let (kind, revision, session, closed) = match event {
        WatchEvent::Snapshot { session, revision } => ("opened", *revision, Some(session), None),
        WatchEvent::Change(change) => {
            let (kind, closed) = match &change.event {
                SessionEvent::Opened(_) => ("opened", None),
                SessionEvent::Suspected(_) => ("suspected", None),
                SessionEvent::Recovered(_) => ("recovered", None),
                SessionEvent::Closed {
                    reason, message, ..
                } => ("closed", Some((*reason, message))),
            };
            (kind, change.revision, Some(change.event.session()), closed)
        }
        WatchEvent::Synced { revision, .. } => ("synced", *revision, None, None),
        WatchEvent::Reset { revision } => ("reset", *revision, None, None),
        WatchEvent::Interrupted { .. } => return,
    };
    match output {
        Output::Text => {
            let about = session.map_or_else(String::new, |session| {
                let identity = &session.identity;
                format!(
                    " session={} client={} labels={}",
                    identity.session_id,
                    or_dash(&identity.client_id),
                    labels_text(&identity.labels)
                )
            });
            let extra = match (event, closed) {
                (_, Some((reason, message))) => format!(" reason={reason} message={message:?}"),
                (WatchEvent::Synced { epoch, .. }, _) => format!(" epoch={epoch}"),
                _ => String::new(),
            };
            println!("{kind} revision={revision}{about}{extra}");
        }
        Output::Json => {
            let mut object = json!({ "event": kind, "revision": revision });
            if let Some(session) = session {
                object["session"] = session_json(session);
            }
            if let Some((reason, message)) = closed {
                object["reason"] = json!(pb::CloseReason::from(reason).as_str_name());
                object["message"] = json!(message);
            }
            if let WatchEvent::Synced { epoch, .. } = event {
                object["epoch"] = json!(epoch);
            }
            println!("{object}");
        }
    }
}

fn session_json(session: &SessionInfo) -> serde_json::Value {
    let identity = &session.identity;
    let time = |time: SystemTime| prost_types::Timestamp::from(time).to_string();
    json!({
        "session_id": identity.session_id,
        "client_id": identity.client_id,
        "labels": identity.labels,
        "peer": identity.peer.map(|peer| peer.to_string()).unwrap_or_default(),
        "state": state_name(session.state),
        "opened_at": time(identity.opened_at),
        "last_seen": time(session.last_seen),
        "rtt_ms": session.rtt.map(|rtt| rtt.as_secs_f64() * 1000.0),
        "frames_in": session.frames_in,
        "frames_out": session.frames_out,
        "node": identity.node,
        "phi": session.phi.0,
    })
}

fn state_name(state: SessionState) -> &'static str {
    match state {
        SessionState::Live => "live",
        SessionState::Suspect => "suspect",
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
fn ago(time: SystemTime) -> String {
    let elapsed = SystemTime::now().duration_since(time).unwrap_or_default();
    let millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(millis)).to_string()
}

fn print_table(sessions: &[SessionInfo]) {
    let header = [
        "SESSION",
        "CLIENT",
        "LABELS",
        "PEER",
        "STATE",
        "AGE",
        "LAST SEEN",
        "RTT",
        "PHI",
        "NODE",
    ];
    let rows: Vec<[String; 10]> = sessions
        .iter()
        .map(|session| {
            let identity = &session.identity;
            [
                identity.session_id.clone(),
                or_dash(&identity.client_id).to_owned(),
                labels_text(&identity.labels),
                identity
                    .peer
                    .map_or_else(|| "-".into(), |peer| peer.to_string()),
                state_name(session.state).to_owned(),
                ago(identity.opened_at),
                format!("{} ago", ago(session.last_seen)),
                session.rtt.map_or_else(
                    || "-".into(),
                    |rtt| format!("{:.3}ms", rtt.as_secs_f64() * 1000.0),
                ),
                session.phi.to_string(),
                or_dash(&identity.node).to_owned(),
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
