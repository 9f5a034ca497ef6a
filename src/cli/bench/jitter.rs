//! `heartbeat bench --jitter`: how the server's suspicion treats steady and
//! jittery clients.
//!
//! Half the sessions are steady: a frame every interval ± 1 ms. Half are
//! jittery: gaps drawn from a log-normal around the interval, with occasional
//! stalls of three intervals (shorter than the timeout), as a GC pause or a
//! congested radio link gives. Neither answers the server's pings: each
//! population's frames are exactly the rhythm described, nothing else. A
//! presence watch counts every suspicion. After the steady phase, `--freeze`
//! sessions of each population stop writing, and the bench times how long the
//! server takes to suspect them.
//!
//! The bench does not set the server's mode: run it once against a server
//! with `--suspicion fixed` and once with `--suspicion adaptive`
//! (`benches/suspicion.py` does both and prints them side by side).

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::Context;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic_heartbeat::protocol::{
    pb::{
        self, heartbeat_request::Frame as Out, heartbeat_response::Frame as In,
        heartbeat_service_client::HeartbeatServiceClient,
        presence_service_client::PresenceServiceClient, watch_sessions_response::Event,
    },
    proto_to_duration,
};

/// The jittery population's distribution: log-normal gaps around the
/// interval with this σ (of the gap's logarithm), and stalls of three
/// intervals with this probability per gap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct JitterDist {
    sigma: f64,
    stall_probability: f64,
}

impl JitterDist {
    /// Parses `SIGMA[:STALLS]`, like `0.25:0.02`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let (sigma, stalls) = text.split_once(':').unwrap_or((text, "0.02"));
        let number = |part: &str, what: &str, range: std::ops::RangeInclusive<f64>| {
            part.parse::<f64>()
                .ok()
                .filter(|value| range.contains(value))
                .ok_or_else(|| {
                    format!("{what} {part:?} in --jitter {text:?} must be a number from {} to {}: write SIGMA[:STALLS], like 0.25:0.02", range.start(), range.end())
                })
        };
        Ok(Self {
            sigma: number(sigma, "the log-normal sigma", 0.0..=2.0)?,
            stall_probability: number(stalls, "the stall probability", 0.0..=0.5)?,
        })
    }

    /// The next gap after `interval`.
    fn gap(&self, interval: Duration) -> Duration {
        if rand::random::<f64>() < self.stall_probability {
            return interval * 3;
        }
        interval.mul_f64((self.sigma * standard_normal()).exp())
    }
}

impl std::fmt::Display for JitterDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.sigma, self.stall_probability)
    }
}

/// A standard normal draw (Box-Muller).
fn standard_normal() -> f64 {
    let u = rand::random::<f64>().max(f64::MIN_POSITIVE);
    let v = rand::random::<f64>();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// The two populations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Population {
    Steady,
    Jittery,
}

impl Population {
    fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Jittery => "jittery",
        }
    }
}

/// What the bench is told.
pub(crate) struct JitterPlan {
    pub(crate) url: String,
    pub(crate) sessions: u64,
    pub(crate) connections: u64,
    pub(crate) duration: Duration,
    pub(crate) interval: Option<Duration>,
    pub(crate) freeze: u64,
    pub(crate) dist: JitterDist,
    pub(crate) client_id_prefix: String,
}

/// One session's story, as the bench saw it.
#[derive(Debug, Clone)]
struct Story {
    population: Population,
    /// When it became live, and when it stopped counting (frozen or ended).
    live: Option<(Instant, Option<Instant>)>,
    frozen_at: Option<Instant>,
}

/// Every session's story and every suspicion, by session id.
#[derive(Default)]
struct Book {
    /// The timeout the server announced.
    timeout: Option<Duration>,
    stories: HashMap<String, Story>,
    /// (session id, when) of each suspicion.
    suspicions: Vec<(String, Instant)>,
    /// (session id, when) of each recovery.
    recoveries: Vec<(String, Instant)>,
}

/// Runs the bench; the report as JSON.
pub(crate) async fn run(plan: JitterPlan) -> anyhow::Result<Value> {
    let endpoint = Endpoint::from_shared(plan.url.clone())
        .with_context(|| format!("{} is not a URL like http://127.0.0.1:50051", plan.url))?;
    let book = Arc::new(Mutex::new(Book::default()));
    let presence = PresenceServiceClient::new(
        endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}: is the server running?", plan.url))?,
    );
    let watch = tokio::spawn(watch_suspicions(presence, book.clone()));
    let mut channels = Vec::new();
    for _ in 0..plan.connections {
        channels.push(endpoint.connect().await.context("connect")?);
    }
    let (freeze_tx, freeze_rx) = tokio::sync::watch::channel(false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let per_population = plan.sessions / 2;
    for n in 0..per_population * 2 {
        let population = if n % 2 == 0 {
            Population::Steady
        } else {
            Population::Jittery
        };
        let freezes = (n / 2) < plan.freeze;
        let channel = channels[usize::try_from(n % plan.connections).unwrap_or(0)].clone();
        let client_id = format!("{}-{}-{n}", plan.client_id_prefix, population.name());
        let session = SessionPlan {
            client_id,
            population,
            freezes,
            dist: plan.dist,
            interval: plan.interval,
        };
        tasks.push(tokio::spawn(run_session(
            channel,
            session,
            book.clone(),
            freeze_rx.clone(),
            stop_rx.clone(),
        )));
    }
    tokio::time::sleep(plan.duration).await;
    freeze_tx.send_replace(true);
    let frozen_at = Instant::now();
    // Frozen sessions are suspected by suspect_after at the latest, which is
    // under the timeout; the timeout bounds the wait.
    let timeout = book.lock().timeout.unwrap_or(Duration::from_secs(30));
    tokio::time::sleep(timeout + Duration::from_secs(1)).await;
    stop_tx.send_replace(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    watch.abort();
    let book = book.lock();
    Ok(report(&plan, &book, frozen_at))
}

struct SessionPlan {
    client_id: String,
    population: Population,
    freezes: bool,
    dist: JitterDist,
    interval: Option<Duration>,
}

/// One session: Hello, then frames in its population's rhythm until told
/// to freeze (if it is one that freezes) or stop.
async fn run_session(
    channel: Channel,
    plan: SessionPlan,
    book: Arc<Mutex<Book>>,
    mut freeze: tokio::sync::watch::Receiver<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut client = HeartbeatServiceClient::new(channel);
    let (outbound, requests) = mpsc::channel(4);
    let hello = pb::Hello {
        client_id: plan.client_id.clone(),
        labels: [("population".to_owned(), plan.population.name().to_owned())].into(),
    };
    let _ = outbound.try_send(request(Out::Hello(hello)));
    let Ok(response) = client.heartbeat(ReceiverStream::new(requests)).await else {
        return;
    };
    let mut inbound = response.into_inner();
    let welcome = match inbound.message().await {
        Ok(Some(pb::HeartbeatResponse {
            frame: Some(In::Welcome(welcome)),
        })) => welcome,
        _ => return,
    };
    let interval = plan.interval.unwrap_or_else(|| {
        welcome
            .ping_interval
            .as_ref()
            .and_then(proto_to_duration)
            .unwrap_or(Duration::from_secs(10))
    });
    {
        let mut written = book.lock();
        if let Some(timeout) = welcome.timeout.as_ref().and_then(proto_to_duration) {
            written.timeout.get_or_insert(timeout);
        }
        written.stories.insert(
            welcome.session_id.clone(),
            Story {
                population: plan.population,
                live: Some((Instant::now(), None)),
                frozen_at: None,
            },
        );
    }
    let mut seq = 0;
    let mut frozen = false;
    // A random phase, so that a freeze finds sessions at every point of
    // their rhythm, as it would in a real fleet.
    let mut next = Instant::now() + interval.mul_f64(rand::random::<f64>());
    loop {
        tokio::select! {
            // Read (and drop) the server's frames, so its pings never back up.
            message = inbound.message() => match message {
                Ok(Some(_)) => {}
                _ => break,
            },
            () = tokio::time::sleep_until(next), if !frozen => {
                seq += 1;
                if outbound.send(request(Out::Ping(pb::Ping { seq }))).await.is_err() {
                    break;
                }
                next = Instant::now() + gap(&plan, interval);
            }
            changed = freeze.changed(), if plan.freezes && !frozen => {
                if changed.is_err() || *freeze.borrow() {
                    frozen = true;
                    let mut book = book.lock();
                    if let Some(story) = book.stories.get_mut(&welcome.session_id) {
                        let now = Instant::now();
                        story.frozen_at = Some(now);
                        if let Some((_, end)) = &mut story.live {
                            *end = Some(now);
                        }
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
    let mut book = book.lock();
    if let Some(story) = book.stories.get_mut(&welcome.session_id) {
        if let Some((_, end)) = &mut story.live {
            end.get_or_insert_with(Instant::now);
        }
    }
}

fn gap(plan: &SessionPlan, interval: Duration) -> Duration {
    match plan.population {
        Population::Steady => {
            // ± 1 ms, uniformly.
            let offset = rand::random::<f64>() * 2.0 - 1.0;
            Duration::from_secs_f64((interval.as_secs_f64() + offset / 1000.0).max(0.0))
        }
        Population::Jittery => plan.dist.gap(interval),
    }
}

fn request(frame: Out) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest { frame: Some(frame) }
}

/// Follows presence and records every suspicion and recovery, until aborted.
async fn watch_suspicions(mut presence: PresenceServiceClient<Channel>, book: Arc<Mutex<Book>>) {
    let Ok(response) = presence
        .watch_sessions(pb::WatchSessionsRequest::default())
        .await
    else {
        return;
    };
    let mut events = response.into_inner();
    while let Ok(Some(event)) = events.message().await {
        let now = Instant::now();
        let mut book = book.lock();
        match event.event {
            Some(Event::Suspected(pb::SessionSuspected {
                session: Some(session),
            })) => book.suspicions.push((session.session_id, now)),
            Some(Event::Recovered(pb::SessionRecovered {
                session: Some(session),
            })) => book.recoveries.push((session.session_id, now)),
            _ => {}
        }
    }
}

/// The report: per population, false suspicions per 1,000 session-minutes
/// and how long after their freeze frozen sessions were suspected.
fn report(plan: &JitterPlan, book: &Book, frozen_at: Instant) -> Value {
    let mut populations = serde_json::Map::new();
    for population in [Population::Steady, Population::Jittery] {
        let stories: Vec<(&String, &Story)> = book
            .stories
            .iter()
            .filter(|(_, story)| story.population == population)
            .collect();
        let session_minutes: f64 = stories
            .iter()
            .filter_map(|(_, story)| story.live)
            .map(|(from, to)| {
                to.unwrap_or(frozen_at)
                    .saturating_duration_since(from)
                    .as_secs_f64()
                    / 60.0
            })
            .sum();
        let mut false_suspicions = 0u64;
        let mut after_freeze = Vec::new();
        for (id, at) in &book.suspicions {
            let Some(story) = book.stories.get(id) else {
                continue;
            };
            if story.population != population {
                continue;
            }
            match story.frozen_at {
                Some(frozen) if *at >= frozen => {
                    after_freeze.push(at.saturating_duration_since(frozen));
                }
                _ => false_suspicions += 1,
            }
        }
        after_freeze.sort();
        let frozen = stories
            .iter()
            .filter(|(_, story)| story.frozen_at.is_some())
            .count();
        // A session that was suspect (in a stall) when it froze is never
        // suspected again: it is counted apart, not timed.
        let last_before = |events: &[(String, Instant)], id: &str, at: Instant| {
            events
                .iter()
                .filter(|(event_id, when)| event_id == id && *when < at)
                .map(|(_, when)| *when)
                .max()
        };
        let already_suspect = stories
            .iter()
            .filter_map(|(id, story)| story.frozen_at.map(|at| (id, at)))
            .filter(|(id, at)| {
                last_before(&book.suspicions, id, *at) > last_before(&book.recoveries, id, *at)
            })
            .count();
        let ms = |duration: Duration| (duration.as_secs_f64() * 1e6).round() / 1e3;
        let quantile = |q: f64| {
            if after_freeze.is_empty() {
                return Value::Null;
            }
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let index = ((after_freeze.len() as f64 - 1.0) * q).round() as usize;
            json!(ms(after_freeze[index]))
        };
        let mean = if after_freeze.is_empty() {
            Value::Null
        } else {
            #[allow(clippy::cast_precision_loss)]
            let mean = after_freeze.iter().map(Duration::as_secs_f64).sum::<f64>()
                / after_freeze.len() as f64;
            json!((mean * 1e6).round() / 1e3)
        };
        populations.insert(
            population.name().into(),
            json!({
                "sessions": stories.len(),
                "session_minutes": (session_minutes * 10.0).round() / 10.0,
                "false_suspicions": false_suspicions,
                "false_suspicions_per_1000_session_minutes": if session_minutes > 0.0 {
                    json!(((false_suspicions as f64) * 1000.0 / session_minutes * 100.0).round() / 100.0)
                } else {
                    Value::Null
                },
                "frozen": frozen,
                "frozen_suspected": after_freeze.len(),
                "frozen_already_suspect": already_suspect,
                "suspected_after_freeze_ms": {
                    "mean": mean,
                    "p50": quantile(0.5),
                    "p99": quantile(0.99),
                    "max": quantile(1.0),
                },
            }),
        );
    }
    json!({
        "kind": "jitter",
        "url": plan.url,
        "duration_s": plan.duration.as_secs_f64(),
        "jitter": plan.dist.to_string(),
        "populations": populations,
    })
}

/// The report as a table for people.
pub(crate) fn text(report: &Value) -> String {
    let show = |value: &Value| match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "suspicion under jitter {} ({} s steady)\n",
        show(&report["jitter"]),
        show(&report["duration_s"])
    );
    out.push_str(&format!(
        "{:<10} {:>8} {:>11} {:>12} {:>7} {:>10} {:>10} {:>10}\n",
        "population",
        "sessions",
        "session-min",
        "false/1000m",
        "frozen",
        "mean ms",
        "p50 ms",
        "p99 ms"
    ));
    for name in ["steady", "jittery"] {
        let p = &report["populations"][name];
        let after = &p["suspected_after_freeze_ms"];
        out.push_str(&format!(
            "{name:<10} {:>8} {:>11} {:>12} {:>7} {:>10} {:>10} {:>10}\n",
            show(&p["sessions"]),
            show(&p["session_minutes"]),
            show(&p["false_suspicions_per_1000_session_minutes"]),
            show(&p["frozen"]),
            show(&after["mean"]),
            show(&after["p50"]),
            show(&after["p99"]),
        ));
    }
    out.push_str("false/1000m: suspicions of sessions that were sending, per 1,000 session-minutes; mean/p50/p99: how long after the freeze frozen sessions were suspected\n");
    out
}
