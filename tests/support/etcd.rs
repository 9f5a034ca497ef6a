//! A real etcd for the cluster tests, from Debian's `etcd-server` package,
//! installed on first use when it is missing, one process per test on free
//! ports with its own data directory.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{mpsc, OnceLock},
    time::Duration,
};

use super::{free_port, signal};

/// A running etcd; killed and its data removed when dropped.
pub struct TestEtcd {
    child: Option<Child>,
    /// The client URL.
    pub url: String,
    /// The client address.
    pub client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    /// More flags for etcd (a quota).
    flags: Vec<String>,
}

impl TestEtcd {
    /// Starts an etcd with a fresh data directory named after `test`.
    pub fn start(test: &str) -> Self {
        Self::start_with(test, &[])
    }

    /// Like [`TestEtcd::start`], with more flags for etcd.
    pub fn start_with(test: &str, flags: &[&str]) -> Self {
        install();
        let data = std::env::temp_dir().join(format!("hb-etcd-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let client = free_port();
        let peer = free_port();
        let mut etcd = Self {
            child: None,
            url: format!("http://{client}"),
            client,
            peer,
            data,
            flags: flags.iter().map(|flag| flag.to_string()).collect(),
        };
        etcd.run();
        etcd
    }

    /// Starts the process on the same ports and data, and waits until it serves.
    fn run(&mut self) {
        let (client, peer) = (self.client, self.peer);
        let mut child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--name", "test"])
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &format!("test=http://{peer}")])
            .args(&self.flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start etcd");
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready, serving) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready to serve client requests") {
                    let _ = ready.send(());
                }
            }
        });
        serving
            .recv_timeout(Duration::from_secs(20))
            .expect("etcd serves within 20 s");
        self.child = Some(child);
    }

    /// Stops etcd (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "-TERM");
            let _ = child.wait();
        }
    }

    /// Starts a stopped etcd again on the same data directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is still running");
        self.run();
    }

    /// Freezes etcd (SIGSTOP): it stays reachable but answers nothing.
    pub fn freeze(&self) {
        if let Some(child) = &self.child {
            signal(child, "-STOP");
        }
    }

    /// Lets a frozen etcd go on (SIGCONT).
    pub fn thaw(&self) {
        if let Some(child) = &self.child {
            signal(child, "-CONT");
        }
    }
}

impl TestEtcd {
    /// Compacts etcd's history up to its current revision, through its JSON
    /// gateway.
    pub async fn compact(&self) {
        let answer = self.gateway("/v3/kv/range", r#"{"key":"AA=="}"#).await;
        let revision: u64 = answer
            .split_once(r#""revision":""#)
            .and_then(|(_, rest)| rest.split_once('"'))
            .and_then(|(revision, _)| revision.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {answer}"));
        let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
        let answer = self.gateway("/v3/kv/compaction", &body).await;
        assert!(answer.contains("200 OK"), "compaction refused: {answer}");
    }

    /// etcd's database size (what its quota counts) and its revision.
    pub async fn status(&self) -> (u64, u64) {
        let answer = self.gateway("/v3/maintenance/status", "{}").await;
        let revision = json_number(&answer, "revision");
        (json_number(&answer, "dbSize"), revision)
    }

    /// etcd's alarms, as its JSON answer lists them (`NOSPACE` when full).
    pub async fn alarms(&self) -> String {
        let answer = self
            .gateway("/v3/maintenance/alarm", r#"{"action":"GET"}"#)
            .await;
        answer
            .split_once("\r\n\r\n")
            .map_or(answer.clone(), |(_, body)| body.to_owned())
    }

    /// Puts values of 1 MiB under `/junk/` until etcd refuses one for want
    /// of space (its NOSPACE alarm goes off); how many it took.
    pub async fn fill(&self) -> usize {
        let value = "A".repeat(1024 * 1024 / 3 * 4);
        for n in 0..1024 {
            let body = format!(
                r#"{{"key":"{}","value":"{value}"}}"#,
                base64(format!("/junk/{n}").as_bytes())
            );
            let answer = self.gateway("/v3/kv/put", &body).await;
            if answer.contains("database space exceeded") {
                return n;
            }
            assert!(answer.contains("200 OK"), "put refused: {answer}");
        }
        panic!("etcd took 1 GiB without running out of space: no quota?");
    }

    /// Frees the space [`TestEtcd::fill`] took, as an operator would: deletes
    /// the data, compacts, defragments, and disarms the NOSPACE alarm.
    pub async fn free_space(&self) {
        let body = format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            base64(b"/junk/"),
            base64(b"/junk0")
        );
        let answer = self.gateway("/v3/kv/deleterange", &body).await;
        assert!(answer.contains("200 OK"), "delete refused: {answer}");
        self.compact().await;
        let answer = self.gateway("/v3/maintenance/defragment", "{}").await;
        assert!(answer.contains("200 OK"), "defrag refused: {answer}");
        let alarms = self.alarms().await;
        let member = alarms
            .split_once(r#""memberID":""#)
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(member, _)| member.to_owned())
            .unwrap_or_else(|| panic!("no alarm to disarm: {alarms}"));
        let body = format!(r#"{{"action":"DEACTIVATE","memberID":"{member}","alarm":"NOSPACE"}}"#);
        let answer = self.gateway("/v3/maintenance/alarm", &body).await;
        assert!(answer.contains("200 OK"), "disarm refused: {answer}");
    }

    /// POSTs `body` to the gateway's `path`; the whole HTTP answer.
    async fn gateway(&self, path: &str, body: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.client)
            .await
            .expect("etcd");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("request");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("answer");
        answer
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The number `field` holds in a JSON answer (etcd's gateway writes 64-bit
/// numbers as strings).
fn json_number(answer: &str, field: &str) -> u64 {
    answer
        .split_once(&format!(r#""{field}":"#))
        .map(|(_, rest)| rest.trim_start_matches('"'))
        .and_then(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in {answer}"))
}

/// Standard base64, as etcd's gateway takes keys and values.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, byte)| n | u32::from(*byte) << (16 - 8 * i));
        for i in 0..4 {
            match i <= chunk.len() {
                true => out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize])),
                false => out.push('='),
            }
        }
    }
    out
}

/// Installs Debian's etcd-server once, if `etcd` is not on the PATH.
fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        super::languages::debian_package("etcd", "--version", "etcd-server", "the cluster tests");
    });
}
