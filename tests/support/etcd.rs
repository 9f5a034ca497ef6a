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
}

impl TestEtcd {
    /// Starts an etcd with a fresh data directory named after `test`.
    pub fn start(test: &str) -> Self {
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

/// Installs Debian's etcd-server once, if `etcd` is not on the PATH.
fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        super::languages::debian_package("etcd", "--version", "etcd-server", "the cluster tests");
    });
}
