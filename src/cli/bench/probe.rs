//! What the bench reads from outside the sessions: a process's CPU time and
//! RSS from `/proc`, and the server's deadline-lateness histogram from its
//! metrics endpoint.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The histogram the server keeps of how late silent sessions were ended.
const LATENESS_BUCKET: &str = "heartbeat_deadline_lateness_seconds_bucket{le=\"";

/// `/proc`'s clock ticks per second (`USER_HZ`): fixed by the kernel's ABI.
const USER_HZ: f64 = 100.0;

/// A process's CPU time (user and system, all threads) and resident memory.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProcessUse {
    pub(super) cpu: Duration,
    pub(super) rss: u64,
}

/// Reads `/proc/<pid>` (or `/proc/self` for `None`).
pub(super) fn process_use(pid: Option<u32>) -> anyhow::Result<ProcessUse> {
    let dir = pid.map_or_else(|| "/proc/self".to_owned(), |pid| format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(format!("{dir}/stat")).with_context(|| {
        format!("cannot read {dir}/stat: is the process running, on this machine (Linux)?")
    })?;
    // The command name may hold spaces: fields are counted after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15; the first after ')' is field 3.
    let ticks = |index: usize| {
        fields
            .get(index - 3)
            .and_then(|field| field.parse::<u64>().ok())
    };
    let (Some(user), Some(system)) = (ticks(14), ticks(15)) else {
        bail!("{dir}/stat is not in the format of Linux's /proc");
    };
    let status = std::fs::read_to_string(format!("{dir}/status"))
        .with_context(|| format!("cannot read {dir}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .with_context(|| format!("{dir}/status has no VmRSS line"))?;
    Ok(ProcessUse {
        cpu: Duration::from_secs_f64((user + system) as f64 / USER_HZ),
        rss: rss_kib * 1024,
    })
}

/// The cumulative buckets of the server's lateness histogram: (upper bound in
/// seconds, count at or below it), in order, `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Lateness {
    buckets: Vec<(f64, u64)>,
}

impl Lateness {
    /// Parses the histogram out of Prometheus or OpenMetrics text.
    pub(super) fn parse(text: &str) -> anyhow::Result<Self> {
        let mut buckets = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(LATENESS_BUCKET) else {
                continue;
            };
            let Some((bound, count)) = rest.split_once("\"}") else {
                continue;
            };
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse()?
            };
            let count = count.trim().parse::<f64>()? as u64;
            buckets.push((bound, count));
        }
        if buckets.is_empty() {
            bail!("the metrics have no heartbeat_deadline_lateness_seconds histogram: is --metrics-url the server's /metrics?");
        }
        Ok(Self { buckets })
    }

    /// What happened between `earlier` and `self`.
    pub(super) fn since(&self, earlier: &Self) -> Self {
        let buckets = self
            .buckets
            .iter()
            .map(|&(bound, count)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(other, _)| *other == bound)
                    .map_or(0, |(_, count)| *count);
                (bound, count.saturating_sub(before))
            })
            .collect();
        Self { buckets }
    }

    fn count(&self) -> u64 {
        self.buckets.last().map_or(0, |(_, count)| *count)
    }

    /// The upper bound of the bucket holding quantile `q`, in milliseconds.
    fn quantile_le_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        self.buckets
            .iter()
            .find(|(_, count)| *count >= rank)
            .map(|(bound, _)| bound * 1e3)
    }

    pub(super) fn to_json(&self) -> Value {
        let ms = |value: Option<f64>| {
            value
                .filter(|v| v.is_finite())
                .map_or(Value::Null, |v| json!(v))
        };
        json!({
            "count": self.count(),
            "p50_le_ms": ms(self.quantile_le_ms(0.5)),
            "p99_le_ms": ms(self.quantile_le_ms(0.99)),
            "max_le_ms": ms(self.quantile_le_ms(1.0)),
            "buckets": self.buckets.iter().map(|(bound, count)| json!([if bound.is_finite() { json!(bound) } else { json!("+Inf") }, count])).collect::<Vec<_>>(),
        })
    }
}

/// A plain-text `http://` URL the bench was given, resolved.
pub(super) struct HttpTarget {
    pub(super) uri: http::Uri,
    /// `host:port` as written, for requests' `:authority` or `Host`.
    pub(super) authority: String,
    pub(super) addr: SocketAddr,
}

impl HttpTarget {
    /// Parses and resolves `url`, given as `what`; the errors show `example`,
    /// and say `why_plain` when the URL asks for TLS.
    pub(super) async fn resolve(
        url: &str,
        what: &str,
        example: &str,
        why_plain: &str,
    ) -> anyhow::Result<Self> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("{what} {url:?} is not a URL: write {example}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!("{what} {url:?}: {why_plain}; write http://, like {example}"),
            _ => bail!("{what} {url:?} must start with http://, like {example}"),
        }
        let authority = uri
            .authority()
            .with_context(|| format!("{what} {url:?} has no host: write {example}"))?
            .to_string();
        let addr =
            tokio::net::lookup_host((uri.host().unwrap_or_default(), uri.port_u16().unwrap_or(80)))
                .await
                .with_context(|| format!("cannot resolve the host of {what} {url:?}"))?
                .next()
                .with_context(|| format!("the host of {what} {url:?} has no address"))?;
        Ok(Self {
            uri,
            authority,
            addr,
        })
    }
}

/// Where to scrape the server's metrics: an `http://host:port/path` URL.
#[derive(Debug, Clone)]
pub(super) struct MetricsUrl {
    addr: SocketAddr,
    host: String,
    path: String,
}

impl MetricsUrl {
    pub(super) async fn parse(url: &str) -> anyhow::Result<Self> {
        let target = HttpTarget::resolve(
            url,
            "--metrics-url",
            "http://127.0.0.1:9090/metrics",
            "the metrics listener speaks plain HTTP",
        )
        .await?;
        let path = target
            .uri
            .path_and_query()
            .map_or("/metrics".to_owned(), |path| path.to_string());
        Ok(Self {
            addr: target.addr,
            host: target.authority,
            path,
        })
    }

    /// Fetches the metrics and reads the lateness histogram out of them.
    pub(super) async fn lateness(&self) -> anyhow::Result<Lateness> {
        let fetch = async {
            let mut stream = tokio::net::TcpStream::connect(self.addr).await?;
            let request = format!(
                "GET {} HTTP/1.0\r\nHost: {}\r\nAccept: text/plain\r\n\r\n",
                self.path, self.host
            );
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            std::io::Result::Ok(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), fetch)
            .await
            .with_context(|| format!("the metrics at {} did not answer within 10s", self.addr))?
            .with_context(|| format!("cannot fetch the metrics from {}", self.addr))?;
        let response = String::from_utf8_lossy(&response);
        let Some((head, body)) = response.split_once("\r\n\r\n") else {
            bail!("the metrics endpoint {} sent no HTTP response", self.addr);
        };
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!(
                "the metrics endpoint {} answered {:?}",
                self.addr,
                head.lines().next().unwrap_or_default()
            );
        }
        Lateness::parse(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that this process's use reads back as something plausible.
    #[test]
    fn reads_its_own_process() {
        let own = process_use(None).expect("/proc/self");
        assert!(own.rss > 1024 * 1024, "{own:?}");
    }

    /// Tests that the lateness buckets parse, subtract and give quantiles.
    #[test]
    fn lateness_quantiles_come_from_bucket_bounds() {
        let text = |counts: [u64; 4]| {
            format!(
                "# TYPE heartbeat_deadline_lateness_seconds histogram\n\
                 heartbeat_deadline_lateness_seconds_bucket{{le=\"0.001\"}} {}\n\
                 heartbeat_deadline_lateness_seconds_bucket{{le=\"0.003\"}} {}\n\
                 heartbeat_deadline_lateness_seconds_bucket{{le=\"0.01\"}} {}\n\
                 heartbeat_deadline_lateness_seconds_bucket{{le=\"+Inf\"}} {}\n",
                counts[0], counts[1], counts[2], counts[3]
            )
        };
        let before = Lateness::parse(&text([5, 5, 5, 5])).expect("parses");
        let after = Lateness::parse(&text([55, 104, 105, 105])).expect("parses");
        let run = after.since(&before);
        assert_eq!(run.count(), 100);
        assert_eq!(run.quantile_le_ms(0.5), Some(1.0));
        assert_eq!(run.quantile_le_ms(0.99), Some(3.0));
        assert_eq!(run.quantile_le_ms(1.0), Some(10.0));
        assert!(Lateness::parse("up 1\n").is_err());
    }
}
