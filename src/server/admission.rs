//! Admission: who may open a stream, and the list of every admitted stream.
//!
//! The gate counts every admitted stream, Hello or not, so a client that opens
//! streams and never speaks holds a slot only until the liveness deadline ends
//! the stream. It also keeps each stream's liveness handle, so a drain can end
//! the streams that have not said Hello and are not in the registry yet.

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tonic::Status;

use crate::{config::ServerConfig, credentials::IdPermit, liveness::LivenessHandle};
use tokio_rustls::rustls::pki_types::CertificateDer;

/// Why a stream was refused before any frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The server is shutting down.
    Draining,
    /// Every session slot is taken.
    Full {
        /// The configured capacity.
        capacity: usize,
    },
    /// Client credentials are on, and the stream presented none, or an
    /// unknown one.
    Unauthenticated {
        /// Whether a token was presented at all.
        presented: bool,
    },
}

impl Refusal {
    /// The refusal's name in metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::Full { .. } => "capacity",
            Self::Unauthenticated { .. } => "unauthenticated",
        }
    }

    /// Every refusal, for the metrics' zero series.
    pub(crate) const ALL: [Refusal; 3] = [
        Self::Draining,
        Self::Full { capacity: 0 },
        Self::Unauthenticated { presented: false },
    ];

    /// The status the stream is refused with, before any frame.
    pub(crate) fn status(self) -> Status {
        match self {
            Self::Draining => Status::unavailable(
                "the server is shutting down; reconnect to another instance or retry shortly",
            ),
            Self::Full { capacity } => Status::resource_exhausted(format!(
                "the server holds its maximum of {capacity} sessions; retry later"
            )),
            Self::Unauthenticated { presented: false } => Status::unauthenticated(
                "this server requires client credentials: send authorization: Bearer <token>",
            ),
            Self::Unauthenticated { presented: true } => Status::unauthenticated(
                "the client token is not one this server knows: check the token you were given",
            ),
        }
    }
}

/// The credentials of an `authorization: Bearer <token>` value; the scheme is
/// case-insensitive (RFC 7235) and surrounding white space is ignored.
pub(crate) fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Checks a stream's credential when the server requires one: the ids its
/// bearer token allows or, when client ids come from certificates, those
/// its verified client certificate names. `None` when neither is required.
pub(crate) fn authenticate(
    config: &ServerConfig,
    headers: &http::HeaderMap,
    certificate: Option<&Arc<CertificateDer<'static>>>,
) -> Result<Option<IdPermit>, Refusal> {
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| bearer_token(value.as_bytes()));
    let refused = Refusal::Unauthenticated {
        presented: token.is_some(),
    };
    match (&config.client_credentials, token, certificate) {
        (Some(credentials), Some(token), _) => credentials
            .check(token)
            .map(|allowed| Some(IdPermit::Token(allowed)))
            .ok_or(refused),
        // Without a credentials file, a bearer header (an admin token sent
        // along) does not get in the way of the certificate.
        (_, _, Some(certificate)) if config.client_ids_from_certificate => {
            Ok(Some(IdPermit::Certificate(certificate.clone())))
        }
        (None, _, _) if !config.client_ids_from_certificate => Ok(None),
        _ => Err(refused),
    }
}

/// Counts admitted streams against the capacity and refuses during a drain.
pub(crate) struct AdmissionGate {
    capacity: usize,
    inner: Mutex<GateInner>,
    /// Notified whenever the last admitted stream ends.
    idle: Notify,
}

#[derive(Default)]
struct GateInner {
    next_key: u64,
    calls: HashMap<u64, LivenessHandle>,
    draining: bool,
}

/// A taken slot; dropping it frees the slot.
pub(crate) struct AdmissionPermit {
    gate: Arc<AdmissionGate>,
    key: u64,
}

impl AdmissionGate {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(GateInner::default()),
            idle: Notify::new(),
        }
    }

    /// Takes a slot for the stream with `handle`, or says why not.
    pub(crate) fn admit(
        self: &Arc<Self>,
        handle: LivenessHandle,
    ) -> Result<AdmissionPermit, Refusal> {
        let mut inner = self.inner.lock();
        if inner.draining {
            return Err(Refusal::Draining);
        }
        if inner.calls.len() >= self.capacity {
            return Err(Refusal::Full {
                capacity: self.capacity,
            });
        }
        let key = inner.next_key;
        inner.next_key += 1;
        inner.calls.insert(key, handle);
        Ok(AdmissionPermit {
            gate: self.clone(),
            key,
        })
    }

    /// Refuses every new stream from now on and returns the admitted ones.
    pub(crate) fn begin_drain(&self) -> Vec<LivenessHandle> {
        let mut inner = self.inner.lock();
        inner.draining = true;
        inner.calls.values().cloned().collect()
    }

    /// Whether a drain has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.inner.lock().draining
    }

    /// How many streams hold a slot.
    pub(crate) fn admitted(&self) -> usize {
        self.inner.lock().calls.len()
    }

    /// Waits until no stream holds a slot.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.admitted() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl AdmissionPermit {
    /// Frees the slot now; later calls (and the drop) do nothing more.
    ///
    /// A call's end frees its slot at once, even if its stream lingers: a
    /// client that stops reading keeps its HTTP/2 stream (only the client or
    /// the connection can end that) but not a session slot.
    pub(crate) fn release(&self) {
        let mut inner = self.gate.inner.lock();
        if inner.calls.remove(&self.key).is_some() && inner.calls.is_empty() {
            drop(inner);
            self.gate.idle.notify_waiters();
        }
    }
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        self.release();
    }
}
