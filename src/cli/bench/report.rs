//! What the bench counts while it runs, and the report it prints at the end.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        OnceLock,
    },
    time::Duration,
};
use tokio::time::Instant;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::probe::{Lateness, ProcessUse};

/// Counters and histograms every session writes to. Histograms hold
/// microseconds, with three significant digits.
pub(super) struct Tally {
    established: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
    ends: Mutex<BTreeMap<String, u64>>,
    wound_down: AtomicU64,
    round_trips: AtomicU64,
    frozen: AtomicU64,
    /// Frozen sessions that have ended, whether told TIMEOUT or not.
    frozen_ended: AtomicU64,
    detected: AtomicU64,
    /// The timeout the server announced in its first `Welcome`.
    timeout: OnceLock<Duration>,
    /// Goodbyes{TIMEOUT} that came before the announced timeout had passed.
    early: AtomicU64,
    /// The earliest of those, in microseconds before the timeout (0 if none).
    earliest: AtomicU64,
    /// The first and the last of the frozen sessions' last frames.
    last_writes: Mutex<Option<(Instant, Instant)>>,
    /// Whether RTTs are being recorded.
    measuring: AtomicBool,
    rtt: Mutex<Histogram<u64>>,
    establish: Mutex<Histogram<u64>>,
    detection: Mutex<Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    // One microsecond to an hour: `saturating_record` keeps whatever falls out.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

impl Tally {
    pub(super) fn new() -> Self {
        Self {
            established: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            failures: Mutex::new(BTreeMap::new()),
            ends: Mutex::new(BTreeMap::new()),
            wound_down: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            frozen: AtomicU64::new(0),
            frozen_ended: AtomicU64::new(0),
            timeout: OnceLock::new(),
            detected: AtomicU64::new(0),
            early: AtomicU64::new(0),
            earliest: AtomicU64::new(0),
            last_writes: Mutex::new(None),
            measuring: AtomicBool::new(true),
            rtt: Mutex::new(histogram()),
            establish: Mutex::new(histogram()),
            detection: Mutex::new(histogram()),
        }
    }

    /// The server's `Welcome` announced `timeout`.
    pub(super) fn announce_timeout(&self, timeout: Duration) {
        let _ = self.timeout.set(timeout);
    }

    /// The timeout of the first `Welcome`, once one arrived.
    pub(super) fn announced_timeout(&self) -> Option<Duration> {
        self.timeout.get().copied()
    }

    /// A session was welcomed, `took` after it started.
    pub(super) fn established(&self, took: Duration) {
        self.established.fetch_add(1, Ordering::Relaxed);
        self.establish.lock().saturating_record(micros(took));
    }

    /// `count` sessions failed to establish, for `problem`.
    pub(super) fn failed(&self, problem: &str, count: u64) {
        self.failed.fetch_add(count, Ordering::Relaxed);
        *self.failures.lock().entry(problem.to_owned()).or_default() += count;
    }

    /// An established session ended before the run stopped it: by the
    /// server, for `reason`, or for what went wrong on the stream.
    pub(super) fn ended_by(&self, reason: &str) {
        *self.ends.lock().entry(reason.to_owned()).or_default() += 1;
    }

    /// A session ended because the run stopped.
    pub(super) fn wound_down(&self) {
        self.wound_down.fetch_add(1, Ordering::Relaxed);
    }

    /// A ping, the server's or the session's, was answered.
    pub(super) fn round_trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// One of the generator's pings was answered after `rtt`.
    pub(super) fn rtt(&self, rtt: Duration) {
        if self.measuring.load(Ordering::Relaxed) {
            self.rtt.lock().saturating_record(micros(rtt));
        }
    }

    /// A session stopped writing; its last frame left at `last_write`.
    pub(super) fn froze(&self, last_write: Instant) {
        self.frozen.fetch_add(1, Ordering::Relaxed);
        let mut spread = self.last_writes.lock();
        *spread = Some(match *spread {
            None => (last_write, last_write),
            Some((first, last)) => (first.min(last_write), last.max(last_write)),
        });
    }

    /// How far apart the frozen sessions' last frames left.
    pub(super) fn last_writes_spread(&self) -> Option<Duration> {
        self.last_writes.lock().map(|(first, last)| last - first)
    }

    /// Frozen sessions that have ended, however.
    pub(super) fn frozen_ended(&self) -> u64 {
        self.frozen_ended.load(Ordering::Relaxed)
    }

    /// A frozen session ended.
    pub(super) fn frozen_end(&self) {
        self.frozen_ended.fetch_add(1, Ordering::Relaxed);
    }

    /// A frozen session got `Goodbye{TIMEOUT}` `error` seconds after its
    /// timeout had passed (negative: before).
    pub(super) fn detected(&self, error: f64) {
        self.detected.fetch_add(1, Ordering::Relaxed);
        if error < 0.0 {
            self.early.fetch_add(1, Ordering::Relaxed);
            self.earliest
                .fetch_max((-error * 1e6) as u64, Ordering::Relaxed);
        }
        let micros = (error.max(0.0) * 1e6) as u64;
        self.detection.lock().saturating_record(micros);
    }

    /// Sessions established so far, whether still open or not.
    pub(super) fn established_count(&self) -> u64 {
        self.established.load(Ordering::Relaxed)
    }

    /// Sessions that failed to establish so far.
    pub(super) fn failures(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Sessions that have either established or failed.
    pub(super) fn settled(&self) -> u64 {
        self.established_count() + self.failures()
    }

    /// Pings answered so far, both ways.
    pub(super) fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Frozen sessions that have been told `Goodbye{TIMEOUT}`.
    pub(super) fn detections(&self) -> u64 {
        self.detected.load(Ordering::Relaxed)
    }

    /// Sessions that stopped writing.
    pub(super) fn frozen(&self) -> u64 {
        self.frozen.load(Ordering::Relaxed)
    }

    /// Established sessions ended so far, other than by the run's stop.
    pub(super) fn ends(&self) -> u64 {
        self.ends.lock().values().sum()
    }

    /// The RTT p99 so far, in milliseconds.
    pub(super) fn rtt_p99_ms(&self) -> f64 {
        self.rtt.lock().value_at_quantile(0.99) as f64 / 1000.0
    }

    /// Starts or stops recording RTTs: the report covers the steady phase
    /// only, not the ramp's bursts of Hellos nor the wind-down's half-closes.
    /// Until the first call, RTTs are recorded for the progress line.
    pub(super) fn measure_rtt(&self, on: bool) {
        if on {
            self.rtt.lock().reset();
        }
        self.measuring.store(on, Ordering::Relaxed);
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Everything the run measured, beside the tally.
pub(super) struct Measured {
    pub(super) url: String,
    pub(super) sessions: u64,
    pub(super) connections: u64,
    pub(super) ramp: Duration,
    pub(super) steady: Duration,
    pub(super) steady_round_trips: u64,
    /// The server's CPU and RSS, with `--server-pid`.
    pub(super) server: Option<ServerUse>,
    /// The generator's own use over the whole run.
    pub(super) generator: ProcessUse,
    /// The server's lateness histogram over the run, with `--metrics-url`.
    pub(super) lateness: Option<Lateness>,
    /// With `--freeze-all`: how far apart the sessions' last frames left.
    pub(super) freeze_spread: Option<Duration>,
}

/// The server's use of CPU and memory, from `/proc`.
pub(super) struct ServerUse {
    pub(super) pid: u32,
    /// CPU time during the steady phase.
    pub(super) steady_cpu: Duration,
    /// RSS before the first session, and with every session up.
    pub(super) rss_before: u64,
    pub(super) rss_loaded: u64,
}

/// The final report, as JSON; the text table is printed from the same value.
pub(super) fn report(tally: &Tally, measured: &Measured) -> Value {
    let established = tally.established_count();
    let rtt = tally.rtt.lock();
    let detection = tally.detection.lock();
    let establish = tally.establish.lock();
    let steady_secs = measured.steady.as_secs_f64().max(1e-9);
    let server = measured.server.as_ref().map(|server| {
        let per_round_trip = if measured.steady_round_trips == 0 {
            Value::Null
        } else {
            json!(server.steady_cpu.as_secs_f64() * 1e6 / measured.steady_round_trips as f64)
        };
        let per_session = if established == 0 {
            Value::Null
        } else {
            json!(server.rss_loaded.saturating_sub(server.rss_before) as f64 / established as f64)
        };
        json!({
            "pid": server.pid,
            "cpu_seconds_steady": server.steady_cpu.as_secs_f64(),
            "cpu_us_per_round_trip": per_round_trip,
            "cpu_share_of_one_core": server.steady_cpu.as_secs_f64() / steady_secs,
            "rss_bytes_before": server.rss_before,
            "rss_bytes_loaded": server.rss_loaded,
            "rss_bytes_per_session": per_session,
        })
    });
    json!({
        "url": measured.url,
        "sessions": {
            "asked": measured.sessions,
            "connections": measured.connections,
            "established": established,
            "failed": tally.failures(),
            "failed_by": *tally.failures.lock(),
            "establish_per_second": established as f64 / measured.ramp.as_secs_f64().max(1e-9),
            "establish_ms": quantiles(&establish),
        },
        "steady": {
            "seconds": measured.steady.as_secs_f64(),
            "round_trips": measured.steady_round_trips,
            "heartbeats_per_second": measured.steady_round_trips as f64 / steady_secs,
        },
        "rtt_ms": quantiles(&rtt),
        "server_ends": *tally.ends.lock(),
        "wound_down": tally.wound_down.load(Ordering::Relaxed),
        // Still open when the wind-down gave up waiting for them.
        "still_open": established
            .saturating_sub(tally.ends())
            .saturating_sub(tally.wound_down.load(Ordering::Relaxed)),
        "detection": {
            "frozen": tally.frozen(),
            "closed": tally.detections(),
            "not_closed": tally.frozen().saturating_sub(tally.detections()),
            "early": tally.early.load(Ordering::Relaxed),
            "earliest_ms": tally.earliest.load(Ordering::Relaxed) as f64 / 1e3,
            "error_ms": quantiles(&detection),
            "last_frames_spread_ms": measured.freeze_spread.map(|spread| spread.as_secs_f64() * 1e3),
        },
        "server": server,
        "server_lateness": measured.lateness.as_ref().map(Lateness::to_json),
        "generator": {
            "cpu_seconds": measured.generator.cpu.as_secs_f64(),
            "rss_bytes": measured.generator.rss,
        },
    })
}

/// p50 … max of a histogram of microseconds, in milliseconds.
fn quantiles(histogram: &Histogram<u64>) -> Value {
    if histogram.is_empty() {
        return Value::Null;
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    json!({
        "count": histogram.len(),
        "p50": ms(histogram.value_at_quantile(0.5)),
        "p90": ms(histogram.value_at_quantile(0.9)),
        "p99": ms(histogram.value_at_quantile(0.99)),
        "p99_9": ms(histogram.value_at_quantile(0.999)),
        "max": ms(histogram.max()),
    })
}

/// The report as a table for people.
pub(super) fn text(report: &Value) -> String {
    let mut out = String::new();
    let get = |path: &str| -> &Value { report.pointer(path).unwrap_or(&Value::Null) };
    let num = |path: &str| get(path).as_f64().unwrap_or(0.0);
    let _ = writeln!(
        out,
        "heartbeat bench against {}",
        get("/url").as_str().unwrap_or("")
    );
    let _ = writeln!(
        out,
        "  sessions      {} established, {} failed, of {} over {} connections ({:.0}/s while ramping)",
        get("/sessions/established"),
        get("/sessions/failed"),
        get("/sessions/asked"),
        get("/sessions/connections"),
        num("/sessions/establish_per_second"),
    );
    if let Some(failures) = get("/sessions/failed_by").as_object() {
        for (problem, count) in failures {
            let _ = writeln!(out, "    failed: {count} × {problem}");
        }
    }
    let _ = writeln!(
        out,
        "  steady        {:.1} s, {:.0} heartbeats/s (pings answered, both ways)",
        num("/steady/seconds"),
        num("/steady/heartbeats_per_second"),
    );
    let _ = writeln!(out, "  rtt           {}", quantile_line(get("/rtt_ms")));
    if let Some(ends) = get("/server_ends").as_object() {
        let ends: Vec<String> = ends
            .iter()
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect();
        let ends = if ends.is_empty() {
            "none".to_owned()
        } else {
            ends.join(", ")
        };
        let _ = writeln!(out, "  server ended  {ends}");
    }
    if num("/detection/frozen") > 0.0 {
        let _ = writeln!(
            out,
            "  detection     {} frozen, {} told TIMEOUT ({} early, by up to {} ms; {} not closed); error {}",
            get("/detection/frozen"),
            get("/detection/closed"),
            get("/detection/early"),
            fixed(get("/detection/earliest_ms"), 3),
            get("/detection/not_closed"),
            quantile_line(get("/detection/error_ms")),
        );
        if let Some(spread) = get("/detection/last_frames_spread_ms").as_f64() {
            let _ = writeln!(
                out,
                "                their last frames left within {spread:.1} ms of each other; the last goodbye came {} ms after its deadline",
                fixed(get("/detection/error_ms/max"), 3)
            );
        }
    }
    if !get("/server").is_null() {
        let _ = writeln!(
            out,
            "  server        pid {}: {} µs CPU per round trip ({:.0}% of a core), {} bytes RSS per session ({} → {})",
            get("/server/pid"),
            fixed(get("/server/cpu_us_per_round_trip"), 1),
            num("/server/cpu_share_of_one_core") * 100.0,
            fixed(get("/server/rss_bytes_per_session"), 0),
            get("/server/rss_bytes_before"),
            get("/server/rss_bytes_loaded"),
        );
    }
    if let Some(lateness) = get("/server_lateness").as_object() {
        let _ = writeln!(
            out,
            "  lateness      {} silent sessions ended by the server: p50 ≤ {} ms, p99 ≤ {} ms, max ≤ {} ms (its histogram's buckets)",
            lateness.get("count").unwrap_or(&Value::Null),
            fixed(lateness.get("p50_le_ms").unwrap_or(&Value::Null), 1),
            fixed(lateness.get("p99_le_ms").unwrap_or(&Value::Null), 1),
            fixed(lateness.get("max_le_ms").unwrap_or(&Value::Null), 1),
        );
    }
    let _ = writeln!(
        out,
        "  generator     {:.1} s CPU, {} MiB RSS",
        num("/generator/cpu_seconds"),
        (num("/generator/rss_bytes") / 1_048_576.0).round(),
    );
    out
}

fn quantile_line(value: &Value) -> String {
    if value.is_null() {
        return "no samples".to_owned();
    }
    let q = |name: &str| fixed(value.get(name).unwrap_or(&Value::Null), 3);
    format!(
        "p50 {} ms, p90 {}, p99 {}, p99.9 {}, max {} ({} samples)",
        q("p50"),
        q("p90"),
        q("p99"),
        q("p99_9"),
        q("max"),
        value.get("count").unwrap_or(&Value::Null)
    )
}

fn fixed(value: &Value, places: usize) -> String {
    value
        .as_f64()
        .map_or_else(|| "?".to_owned(), |value| format!("{value:.places$}"))
}
