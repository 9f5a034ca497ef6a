//! `heartbeat bench`: a load generator that measures a heartbeat server.
//!
//! A run has four parts: the ramp (sessions open at `--rate`), the steady
//! phase (`--duration` of heartbeats, which is what the figures describe), the
//! optional freeze (chosen sessions stop writing, and the bench times how late
//! the server's `Goodbye{TIMEOUT}` comes), and the wind-down (every session
//! half-closes). The server's CPU and memory come from `/proc` when its pid is
//! given, and its own lateness histogram from its metrics when their URL is.

mod jitter;
mod load;
mod probe;
mod report;

use std::{sync::Arc, time::Duration};
use tokio::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;

use self::{
    load::{Freeze, Phase, Plan},
    probe::{process_use, HttpTarget, MetricsUrl},
    report::{Measured, ServerUse, Tally},
};
use super::{human, parse_duration, HumanDuration, Output};

/// Connections opened when --connections is not given.
const DEFAULT_CONNECTIONS: u64 = 10;
/// How long sessions may keep settling after the ramp should have ended.
const RAMP_GRACE: Duration = Duration::from_secs(30);
/// How long the wind-down may take before the bench leaves anyway.
const WIND_DOWN: Duration = Duration::from_secs(10);
/// How long frozen sessions are waited for beyond their timeout.
const FREEZE_GRACE: Duration = Duration::from_secs(5);
/// The longest wait for frozen sessions, whatever timeout the server announced.
const MAX_FREEZE_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The most sessions one bench process opens.
const MAX_SESSIONS: u64 = 10_000_000;
/// The fastest ramp the bench attempts, in sessions per second.
const MAX_RATE: f64 = 1_000_000.0;

/// Flags of `heartbeat bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// The server: http://127.0.0.1:50051 (plain-text HTTP/2; the bench
    /// measures the server, not TLS).
    #[arg(value_name = "URL")]
    url: String,

    /// Sessions to open in all.
    #[arg(long, default_value_t = 1000)]
    sessions: u64,

    /// HTTP/2 connections to spread them over. Each connection carries
    /// sessions/connections streams: a process may hold only so many open
    /// files, and the server caps connections and streams per client IP
    /// (--max-connections-per-ip, --max-streams-per-ip). Default: 10, or
    /// --sessions if that is fewer.
    #[arg(long)]
    connections: Option<u64>,

    /// Sessions opened per second during the ramp, over all connections.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,

    /// How long to run once every session is up (the steady phase).
    #[arg(long, default_value_t = human(Duration::from_secs(10)), value_parser = parse_duration)]
    duration: HumanDuration,

    /// How often each session pings the server. Default: the ping interval in
    /// the server's Welcome.
    #[arg(long, value_parser = parse_duration)]
    interval: Option<HumanDuration>,

    /// At the start of the steady phase, this many sessions (spread evenly)
    /// stop writing but keep reading; the bench times the server's
    /// Goodbye{TIMEOUT} to each against its deadline, waiting past --duration
    /// for them if need be.
    #[arg(long, default_value_t = 0, conflicts_with = "freeze_all")]
    freeze: u64,

    /// Every session sends one last ping at the start of the steady phase and
    /// then falls silent, so that their deadlines all but coincide; the bench
    /// reports how far apart the last frames left and how late the last
    /// goodbye came after its deadline. The steady phase's figures then
    /// describe silent sessions.
    #[arg(long)]
    freeze_all: bool,

    /// The server's process id, to read its CPU time and memory from /proc
    /// (a server on this machine).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,

    /// The server's metrics, for its own histogram of how late silent
    /// sessions were ended: http://127.0.0.1:9090/metrics.
    #[arg(long, value_name = "URL")]
    metrics_url: Option<String>,

    /// The prefix of each session's client id (PREFIX-0, PREFIX-1, ...).
    #[arg(long, default_value = "bench")]
    client_id_prefix: String,

    /// Measure suspicion instead: half the sessions steady (a frame every
    /// interval ± 1 ms), half jittery (log-normal gaps around the interval
    /// with this sigma, and stalls of 3 intervals with this probability per
    /// gap), neither answering the server's pings. Reports false
    /// suspicions per 1,000 session-minutes, and with --freeze N (per
    /// population) how soon frozen sessions are suspected. Run it against a
    /// server in each --suspicion mode.
    #[arg(long, value_name = "SIGMA[:STALLS]", value_parser = jitter::JitterDist::parse)]
    jitter: Option<jitter::JitterDist>,

    /// How the report is printed: a table for people, or one JSON object.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

impl BenchArgs {
    /// Connections to open: as asked, or 10 (fewer for fewer sessions).
    fn connections(&self) -> u64 {
        self.connections
            .unwrap_or(self.sessions.min(DEFAULT_CONNECTIONS))
    }

    /// Checks the flags; the error names the flag and the fix.
    fn validate(&self) -> anyhow::Result<()> {
        if self.sessions == 0 || self.sessions > MAX_SESSIONS {
            bail!(
                "--sessions {} must be between 1 and {MAX_SESSIONS}",
                self.sessions
            );
        }
        let connections = self.connections();
        if connections == 0 || connections > self.sessions {
            bail!(
                "--connections {connections} must be between 1 and --sessions ({})",
                self.sessions
            );
        }
        if !(self.rate >= 0.01 && self.rate <= MAX_RATE) {
            bail!(
                "--rate {} must be between 0.01 and {MAX_RATE} sessions per second, like 5000",
                self.rate
            );
        }
        if self.freeze > self.sessions {
            bail!(
                "--freeze {} is more than --sessions ({}): use --freeze-all to freeze every session",
                self.freeze,
                self.sessions
            );
        }
        if self
            .interval
            .is_some_and(|interval| Duration::from(interval).is_zero())
        {
            bail!("--interval 0s would ping without pause: give a duration like 1s, or leave it out to follow the server");
        }
        Ok(())
    }
}

/// Runs the bench and prints its report.
pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(dist) = args.jitter {
        let report = runtime.block_on(jitter::run(jitter::JitterPlan {
            url: args.url.clone(),
            sessions: args.sessions,
            connections: args.connections(),
            duration: args.duration.into(),
            interval: args.interval.map(Duration::from),
            freeze: args.freeze,
            dist,
            client_id_prefix: args.client_id_prefix.clone(),
        }))?;
        match args.output {
            Output::Text => print!("{}", jitter::text(&report)),
            Output::Json => println!("{report}"),
        }
        return Ok(());
    }
    let report = runtime.block_on(bench(&args))?;
    match args.output {
        Output::Text => print!("{}", report::text(&report)),
        Output::Json => println!("{report}"),
    }
    Ok(())
}

async fn bench(args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let target = HttpTarget::resolve(
        &args.url,
        "the server URL",
        "http://127.0.0.1:50051",
        "the bench speaks plain-text HTTP/2 only, to a plain-text listener",
    )
    .await?;
    let metrics = match &args.metrics_url {
        Some(url) => Some(MetricsUrl::parse(url).await?),
        None => None,
    };
    let lateness_before = match &metrics {
        Some(metrics) => Some(metrics.lateness().await?),
        None => None,
    };
    let server_before = args
        .server_pid
        .map(|pid| process_use(Some(pid)))
        .transpose()?;

    let freeze = match (args.freeze_all, args.freeze) {
        (true, _) => Freeze::All,
        (false, 0) => Freeze::None,
        (false, count) => Freeze::Some(count),
    };
    let plan = Arc::new(Plan {
        addr: target.addr,
        authority: target.authority,
        sessions: args.sessions,
        connections: args.connections(),
        rate: args.rate,
        interval: args.interval.map(Duration::from),
        freeze,
        client_id_prefix: args.client_id_prefix.clone(),
    });
    let tally = Arc::new(Tally::new());
    let (phase, phase_watch) = watch::channel(Phase::Running);
    let connections: Vec<_> = (0..plan.connections)
        .map(|index| {
            tokio::spawn(load::connection(
                plan.clone(),
                tally.clone(),
                index,
                phase_watch.clone(),
            ))
        })
        .collect();
    drop(phase_watch);

    let progress = Progress::new();

    // The ramp: until every session is up or has failed.
    let ramp_started = Instant::now();
    let ramp_limit = Duration::from_secs_f64(args.sessions as f64 / args.rate) + RAMP_GRACE;
    while tally.settled() < plan.sessions {
        if ramp_started.elapsed() > ramp_limit {
            progress.note(&format!(
                "{} sessions still opening after {}; measuring those that are up",
                plan.sessions - tally.settled(),
                humantime::format_duration(ramp_limit)
            ));
            break;
        }
        progress.show("ramp", &tally);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramp = ramp_started.elapsed();

    if tally.established_count() == 0 {
        progress.finish();
        let report = report::report(&tally, &measured_so_far(args, ramp));
        bail!(
            "no session could be established:\n{}",
            report::text(&report)
        );
    }

    // The steady phase.
    let server_loaded = progress.probe(args.server_pid.map(|pid| process_use(Some(pid))));
    tally.measure_rtt(true);
    let round_trips_before = tally.round_trips();
    let steady_started = Instant::now();
    let _ = phase.send(if freeze == Freeze::None {
        Phase::Running
    } else {
        Phase::Frozen
    });
    let duration = Duration::from(args.duration);
    while steady_started.elapsed() < duration {
        progress.show("steady", &tally);
        tokio::time::sleep(
            Duration::from_millis(100).min(duration - steady_started.elapsed().min(duration)),
        )
        .await;
    }
    let steady = steady_started.elapsed();
    tally.measure_rtt(false);
    let steady_round_trips = tally.round_trips() - round_trips_before;
    let server_after = progress.probe(args.server_pid.map(|pid| process_use(Some(pid))));

    // The freeze: wait for the goodbyes still owed. Every frozen session's
    // last frame left before the steady phase began (with --freeze-all, just
    // as it began), so each is owed its goodbye by then plus the timeout.
    if freeze != Freeze::None {
        let timeout = tally.announced_timeout().unwrap_or_default();
        let deadline = steady_started
            .checked_add(timeout.saturating_add(FREEZE_GRACE))
            .unwrap_or(steady_started + MAX_FREEZE_WAIT);
        while tally.frozen_ended() < tally.frozen() && Instant::now() < deadline {
            progress.show("frozen", &tally);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The wind-down.
    let _ = phase.send(Phase::Stopping);
    progress.show("stopping", &tally);
    let _ = tokio::time::timeout(WIND_DOWN, futures_util::future::join_all(connections)).await;
    progress.finish();

    let lateness = match (&metrics, lateness_before) {
        (Some(metrics), Some(before)) => progress
            .probe(Some(metrics.lateness().await))
            .map(|after| after.since(&before)),
        _ => None,
    };
    let server = match (args.server_pid, server_before, server_loaded, server_after) {
        (Some(pid), Some(before), Some(loaded), Some(after)) => Some(ServerUse {
            pid,
            steady_cpu: after.cpu.saturating_sub(loaded.cpu),
            rss_before: before.rss,
            rss_loaded: loaded.rss,
        }),
        _ => None,
    };
    let measured = Measured {
        steady,
        steady_round_trips,
        server,
        lateness,
        freeze_spread: (freeze == Freeze::All)
            .then(|| tally.last_writes_spread())
            .flatten(),
        ..measured_so_far(args, ramp)
    };
    Ok(report::report(&tally, &measured))
}

/// The parts of the report known before the steady phase.
fn measured_so_far(args: &BenchArgs, ramp: Duration) -> Measured {
    Measured {
        url: args.url.clone(),
        sessions: args.sessions,
        connections: args.connections(),
        ramp,
        steady: Duration::ZERO,
        steady_round_trips: 0,
        server: None,
        generator: process_use(None).unwrap_or(probe::ProcessUse {
            cpu: Duration::ZERO,
            rss: 0,
        }),
        lateness: None,
        freeze_spread: None,
    }
}

/// The live progress line on stderr; silent when stderr is not a terminal.
struct Progress {
    bar: ProgressBar,
    started: Instant,
}

impl Progress {
    fn new() -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Self {
            bar,
            started: Instant::now(),
        }
    }

    fn show(&self, phase: &str, tally: &Tally) {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!(
            "{phase}: {} established, {} failed, {} ended, rtt p99 {:.2} ms, {:.0} heartbeats/s",
            tally.established_count(),
            tally.failures(),
            tally.ends(),
            tally.rtt_p99_ms(),
            tally.round_trips() as f64 / elapsed,
        ));
        self.bar.tick();
    }

    fn note(&self, line: &str) {
        // A hidden bar (stderr is not a terminal) would swallow the line.
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// A reading taken once the run is under way: a failure (the server
    /// exited, say) costs that figure, noted, not the whole report.
    fn probe<T>(&self, reading: Option<anyhow::Result<T>>) -> Option<T> {
        match reading? {
            Ok(value) => Some(value),
            Err(error) => {
                self.note(&format!("note: {error:#}; that figure is left out"));
                None
            }
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
