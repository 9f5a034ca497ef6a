//! The command line: `heartbeat serve` (and the commands later issues add).
//!
//! Every flag can also come from an environment variable `HEARTBEAT_<FLAG>`
//! (`--ping-interval` ↔ `HEARTBEAT_PING_INTERVAL`); the flag wins. Durations are
//! written as people write them: `200ms`, `10s`, `1m30s`.

mod bench;
mod connect;
mod serve;
mod sessions;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, EnvFilter};

/// gRPC heartbeats and presence: know which clients are alive, end the silent
/// ones on time, and say why every session ended.
#[derive(Debug, Parser)]
#[command(name = "heartbeat", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Log format: `text` for people, `json` (one object a line) for collectors.
    /// The level comes from RUST_LOG (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "HEARTBEAT_LOG_FORMAT")]
    pub(crate) log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the heartbeat server.
    ///
    /// Clients open a `heartbeat.v1.HeartbeatService/Heartbeat` stream, say Hello
    /// and answer pings. A client silent for --timeout is ended with
    /// Goodbye{TIMEOUT} and DEADLINE_EXCEEDED; one silent for --suspect-after is
    /// reported suspect. SIGTERM or Ctrl-C drains: every session gets
    /// Goodbye{SERVER_SHUTDOWN} and UNAVAILABLE, and the server exits 0 once the
    /// goodbyes are out (at most --shutdown-grace). A second signal exits at once.
    ///
    /// Example: heartbeat serve --listen 0.0.0.0:50051 --ping-interval 5s --timeout 15s
    Serve(Box<serve::ServeArgs>),

    /// Hold a heartbeat session with a server and print what happens.
    ///
    /// Prints one line per state change and per round-trip sample (text, or
    /// one JSON object a line with --output json). Reconnects with backoff when
    /// the session is lost. Ctrl-C or SIGTERM says goodbye and exits 0.
    ///
    /// Example: heartbeat connect http://127.0.0.1:50051 --client-id worker-1 --label zone=eu-1
    Connect(connect::ConnectArgs),

    /// Show the server's open sessions, watch them change, or evict one.
    ///
    /// Without options, prints a table of the open sessions. --watch prints
    /// every change as it happens and resumes by itself after a dropped stream.
    /// --evict ends one session (the client gets Goodbye{EVICTED}).
    ///
    /// Example: heartbeat sessions http://127.0.0.1:50051 --label zone=eu-1 --watch
    Sessions(sessions::SessionsArgs),

    /// Load a server with many sessions and measure it.
    ///
    /// Opens --sessions sessions over --connections HTTP/2 connections at
    /// --rate per second; each says Hello, answers every server ping and
    /// pings every interval. After the ramp it runs for --duration and
    /// reports sessions established and failed, heartbeats per second, RTT
    /// percentiles and the ends the server chose. --freeze K silences K
    /// sessions and times the server's Goodbye{TIMEOUT} against each deadline;
    /// --server-pid adds the server's CPU per round trip and memory per
    /// session; --metrics-url adds the server's own deadline lateness.
    ///
    /// Example: heartbeat bench http://127.0.0.1:50051 --sessions 10000 --connections 100 --freeze 100 --duration 40s
    Bench(bench::BenchArgs),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Runs the parsed command.
pub(crate) fn run(cli: Cli, logs: &LogSink) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(*args, logs),
        Command::Connect(args) => connect::run(args),
        Command::Sessions(args) => sessions::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// Log lines queued for stderr before new ones are dropped (and counted).
const LOG_QUEUE_LINES: usize = 16_384;

/// Where log lines go: stderr, through a bounded queue drained by a thread of
/// its own, so a slow or blocked stderr (a pipe nobody reads) never stalls a
/// heartbeat. Lines that find the queue full are dropped and counted.
pub(crate) struct LogSink {
    /// Flushes what is queued when the program ends.
    _flush: WorkerGuard,
    dropped: ErrorCounter,
}

impl LogSink {
    /// A handle on the count of dropped lines, for a task of its own.
    pub(crate) fn drops(&self) -> ErrorCounter {
        self.dropped.clone()
    }
}

/// Sends `tracing` output to stderr in the chosen format, without blocking.
pub(crate) fn init_tracing(format: LogFormat) -> LogSink {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into files or pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, flush) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("hb-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    LogSink {
        _flush: flush,
        dropped,
    }
}

/// How a command prints what it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Lines for people.
    Text,
    /// One JSON object per line, for programs.
    Json,
}

/// Parses `key=value` for `--label`.
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some(("", _)) => Err(format!(
            "label {text:?} has an empty key: write key=value, for example zone=eu-1"
        )),
        Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
        None => Err(format!(
            "label {text:?} has no '=': write key=value, for example zone=eu-1"
        )),
    }
}

/// TLS flags of the commands that talk to a server over `https://`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TlsArgs {
    /// CA certificates (PEM) the server's certificate must chain to. Default:
    /// the Mozilla roots built in.
    #[arg(long, env = "HEARTBEAT_CA", value_name = "PATH")]
    ca: Option<std::path::PathBuf>,

    /// A client certificate (PEM), for a server that requires mutual TLS.
    #[arg(long, env = "HEARTBEAT_CERT", value_name = "PATH", requires = "key")]
    cert: Option<std::path::PathBuf>,

    /// The private key (PEM) of --cert.
    #[arg(long, env = "HEARTBEAT_KEY", value_name = "PATH", requires = "cert")]
    key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// The client's TLS settings, if any flag was given.
    fn settings(&self) -> Option<tonic_heartbeat::client::ClientTls> {
        (self.ca.is_some() || self.cert.is_some()).then(|| tonic_heartbeat::client::ClientTls {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        })
    }
}

/// Reads a token file: its content with surrounding white space trimmed.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty: write the token into it",
        path.display()
    );
    Ok(token.to_owned())
}

/// The small runtime of a command that talks to one server.
fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// SIGTERM and SIGINT, listened for from the moment this is created, so a
/// signal that arrives before the program first waits is not lost (nor does it
/// kill the process with the default action).
pub(crate) struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Starts listening; needs a running tokio runtime.
    pub(crate) fn listen() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use anyhow::Context;
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Completes on the next SIGTERM or SIGINT.
    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => {}
                _ = self.interrupt.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A duration as people write it (`200ms`, `10s`, `1m30s`), and as `--help`
/// shows a default.
type HumanDuration = humantime::Duration;

/// A default duration as `--help` shows it.
fn human(duration: Duration) -> HumanDuration {
    duration.into()
}

/// Parses a human duration (`200ms`, `10s`, `1m30s`) for clap.
fn parse_duration(text: &str) -> Result<HumanDuration, String> {
    text.parse::<HumanDuration>().map_err(|_| {
        format!("'{text}' is not a duration: write a number and a unit, like 200ms, 10s or 1m")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that the command line is consistent (clap's own checks).
    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// Tests that `heartbeat serve` with no flags runs with exactly the
    /// library's defaults, so the two can never drift apart.
    #[test]
    fn serve_defaults_are_the_library_defaults() {
        // Flags also come from HEARTBEAT_* variables; this test is about the
        // defaults, so none may be set (no other test here reads them).
        let set: Vec<String> = std::env::vars()
            .map(|(name, _)| name)
            .filter(|name| name.starts_with("HEARTBEAT_"))
            .collect();
        for name in set {
            std::env::remove_var(name);
        }
        let cli = Cli::try_parse_from(["heartbeat", "serve"]).expect("no flags parse");
        let Command::Serve(args) = cli.command else {
            panic!("parsed as another command");
        };
        let config = args.config().expect("defaults are usable");
        assert_eq!(config, tonic_heartbeat::ServerConfig::default());
    }

    /// Tests that labels parse as key=value and malformed ones say how to write them.
    #[test]
    fn labels_parse_as_key_value() {
        assert_eq!(parse_label("zone=eu=1"), Ok(("zone".into(), "eu=1".into())));
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_label("zone")
            .expect_err("no =")
            .contains("write key=value"));
        assert!(parse_label("=x")
            .expect_err("empty key")
            .contains("empty key"));
    }

    /// Tests that durations parse in human form and bad ones say how to write them.
    #[test]
    fn parses_human_durations() {
        assert_eq!(
            parse_duration("200ms"),
            Ok(human(Duration::from_millis(200)))
        );
        assert_eq!(parse_duration("1m30s"), Ok(human(Duration::from_secs(90))));
        let error = parse_duration("ten").expect_err("not a duration");
        assert!(error.contains("like 200ms, 10s or 1m"), "{error}");
    }
}
