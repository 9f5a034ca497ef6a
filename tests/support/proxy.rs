//! A TCP proxy whose connections can all be cut at once, as a restarting
//! load balancer or a network fault would: both sides see their connection
//! end, and new connections through the proxy work again at once. It can
//! also be paused, a partition: connections are cut and new ones closed at
//! once until it resumes.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};

/// A proxy on 127.0.0.1 in front of one upstream address.
pub struct CutProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    paused: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

impl CutProxy {
    /// Starts forwarding connections on a new port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let connections = Arc::new(Mutex::new(Vec::<AbortHandle>::new()));
        let open = connections.clone();
        let paused = Arc::new(AtomicBool::new(false));
        let refusing = paused.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    continue;
                }
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut open = open.lock().expect("not poisoned");
                open.retain(|handle| !handle.is_finished());
                open.push(pipe.abort_handle());
            }
        });
        Self {
            addr,
            connections,
            paused,
            accept,
        }
    }

    /// Cuts every connection and closes new ones until [`Self::resume`].
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// Forwards new connections again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Closes every connection open now; returns how many there were.
    pub fn cut(&self) -> usize {
        let mut open = self.connections.lock().expect("not poisoned");
        let live = open.iter().filter(|handle| !handle.is_finished()).count();
        for handle in open.drain(..) {
            handle.abort();
        }
        live
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
