//! A client process driven from a test: its stdout read as JSON lines as
//! they come, its stderr kept for failure messages, and (for drivers that
//! take commands) JSON lines written to its stdin.

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;
use tokio::sync::mpsc;

use super::{signal, WAIT};

/// A client process; its stdout is read line by line as it comes.
pub struct Driver {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    pub seen: Vec<String>,
    pub stderr: Arc<Mutex<String>>,
    /// Whether the process exits by itself once its stdin closes.
    ends_on_eof: bool,
}

impl Driver {
    pub fn spawn(name: String, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("start {name}: {error}"));
        let (send, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            sink.lock().expect("not poisoned").push_str(&text);
        });
        let stdin = child.stdin.take();
        Self {
            name,
            stdin,
            child,
            lines,
            seen: Vec::new(),
            stderr,
            ends_on_eof: false,
        }
    }

    /// Marks a process that exits by itself once its stdin closes, so that
    /// dropping it lets it clean up before it is killed.
    pub fn ends_on_eof(mut self) -> Self {
        self.ends_on_eof = true;
        self
    }

    /// Writes `command` as one JSON line to the process's stdin.
    pub fn send(&mut self, command: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        let line = format!("{command}\n");
        if let Err(error) = stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.flush())
        {
            panic!("write to {}: {error}\n{}", self.name, self.transcript());
        }
    }

    /// What the process said so far, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "{}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.name,
            self.seen.join("\n"),
            self.stderr.lock().expect("not poisoned")
        )
    }

    /// The next line, or `None` once stdout closed.
    pub async fn next_line(&mut self) -> Option<String> {
        let line = self.lines.recv().await?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Reads lines until one (JSON) satisfies `wanted`, within `WAIT`.
    pub async fn expect(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.next_line().await {
                let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if wanted(&value) {
                    return Some(value);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(value)) => value,
            Ok(None) => panic!("{what}: the process ended first\n{}", self.transcript()),
            Err(_) => panic!("{what}: not seen within {WAIT:?}\n{}", self.transcript()),
        }
    }

    /// Reads lines until one starts with `prefix` (for the sketches' text).
    pub async fn expect_text(&mut self, prefix: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.next_line().await {
                if line.starts_with(prefix) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        found
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("'{prefix}…' not seen\n{}", self.transcript()))
    }

    /// Every JSON line until the process ends (a `raw` session's whole story).
    pub async fn until_exit(&mut self) -> Vec<Value> {
        let mut values = Vec::new();
        let finished = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.next_line().await {
                values.push(serde_json::from_str(&line).unwrap_or(Value::Null));
            }
        })
        .await;
        if finished.is_err() {
            panic!(
                "the process did not end within {WAIT:?}\n{}",
                self.transcript()
            );
        }
        values
    }

    pub fn signal(&self, how: &str) {
        signal(&self.child, how);
    }

    /// Waits (bounded) for the process to exit.
    pub async fn exit(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "the process did not exit within {WAIT:?}\n{}",
                    self.transcript()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Driver {
    /// Kills the process; one that [ends on EOF](Driver::ends_on_eof) first
    /// gets its stdin closed and a few seconds to clean up (close its
    /// browser, remove its profile).
    fn drop(&mut self) {
        drop(self.stdin.take());
        // Up to five seconds, in steps of 20 ms.
        let waits = if self.ends_on_eof { 250 } else { 0 };
        for _ in 0..waits {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
