//! Where cluster mode keeps things in etcd, and how etcd's numbers become the
//! contract's.
//!
//! Under the prefix `P`:
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `P/epoch` | a random number, written once by the first node | none |
//! | `P/nodes/<node>` | the node id | the node's |
//! | `P/sessions/<session>` | the session's last change, as a `WatchSessionsResponse` | the node's, or a short tombstone lease once closed |
//! | `P/clients/<client id>` | the session that holds the id | the node's |
//! | `P/evict/<session>` | an eviction's message | a short tombstone lease |
//! | `P/compacted` | the etcd revision the cluster last compacted etcd's history to | none |
//!
//! A closed session's key is overwritten with its close (the *tombstone*) and
//! left to a short lease, so every node reads why it closed. A session key
//! deleted while its session was open went with its node's lease: the node
//! was lost.

/// The contract's revisions in cluster mode: etcd's revision × 2^20 plus the
/// index within it of the event (each session key's event and each client
/// id's claim, whether or not it changes a view), so a node's lost lease
/// (many sessions closing in one etcd revision) still gives one revision per
/// change. Past 2^20 events in one revision the index stays at the last:
/// only a short lease's tombstones expiring can get there, and their
/// deletions change no view, so nothing is published under a repeated
/// number (a node's own lease holds at most 1,000,000 sessions).
pub(crate) const CHANGES_PER_REVISION: u64 = 1 << 20;

/// The version of how cluster mode numbers revisions, mixed into the epoch:
/// raise it whenever the numbering changes, so nodes of two versions never
/// share an epoch (a watch moving between them gets a reset).
pub(crate) const NUMBERING: u64 = 2;

/// How the contract's revisions are counted from etcd's: from the etcd
/// revision at which the cluster's epoch began (its epoch key was written),
/// so they stay below 2^53, exact in JavaScript numbers and JSON doubles,
/// for the first 2^33 etcd revisions of the epoch, however many revisions
/// an etcd shared with other users had already counted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Revisions {
    base: i64,
}

impl Revisions {
    /// Revisions counted from etcd revision `base`.
    pub(crate) fn from_base(base: i64) -> Self {
        Self { base }
    }

    /// The contract's revision of the `index`th numbered event of etcd
    /// revision `etcd_revision`.
    pub(crate) fn of(self, etcd_revision: i64, index: u64) -> u64 {
        u64::try_from(etcd_revision.saturating_sub(self.base))
            .unwrap_or(0)
            .saturating_mul(CHANGES_PER_REVISION)
            .saturating_add(index.min(CHANGES_PER_REVISION - 1))
    }

    /// The first etcd revision of the epoch.
    pub(crate) fn base(self) -> i64 {
        self.base
    }
}

/// The cluster's epoch from etcd's cluster id and `epoch_key`, the epoch
/// key's value mixed with the revision it was created at: never 0, below
/// 2^53 like every epoch, the same on every node, and new when etcd's data
/// is (the key is gone, or it is another cluster).
pub(crate) fn epoch(cluster_id: u64, epoch_key: u64) -> u64 {
    let limit = crate::registry::EPOCH_LIMIT;
    (cluster_id ^ epoch_key) % (limit - 1) + 1
}

/// The keys of one cluster, under its prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

/// What a key under the prefix is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Key<'a> {
    /// A session's record.
    Session(&'a str),
    /// The session holding a client id.
    Client(&'a str),
    /// An eviction request for a session.
    Evict(&'a str),
    /// A node's registration.
    Node(&'a str),
    /// Anything else (the epoch, the compaction mark).
    Other,
}

impl Keys {
    /// The keys under `prefix` (which has no trailing `/`).
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Everything of this cluster.
    pub(crate) fn all(&self) -> Vec<u8> {
        format!("{}/", self.prefix).into_bytes()
    }

    pub(crate) fn epoch(&self) -> Vec<u8> {
        format!("{}/epoch", self.prefix).into_bytes()
    }

    pub(crate) fn compacted(&self) -> Vec<u8> {
        format!("{}/compacted", self.prefix).into_bytes()
    }

    pub(crate) fn nodes(&self) -> Vec<u8> {
        format!("{}/nodes/", self.prefix).into_bytes()
    }

    pub(crate) fn node(&self, node: &str) -> Vec<u8> {
        format!("{}/nodes/{node}", self.prefix).into_bytes()
    }

    pub(crate) fn sessions(&self) -> Vec<u8> {
        format!("{}/sessions/", self.prefix).into_bytes()
    }

    pub(crate) fn session(&self, session_id: &str) -> Vec<u8> {
        format!("{}/sessions/{session_id}", self.prefix).into_bytes()
    }

    pub(crate) fn clients(&self) -> Vec<u8> {
        format!("{}/clients/", self.prefix).into_bytes()
    }

    pub(crate) fn client(&self, client_id: &str) -> Vec<u8> {
        format!("{}/clients/{client_id}", self.prefix).into_bytes()
    }

    pub(crate) fn evictions(&self) -> Vec<u8> {
        format!("{}/evict/", self.prefix).into_bytes()
    }

    pub(crate) fn evict(&self, session_id: &str) -> Vec<u8> {
        format!("{}/evict/{session_id}", self.prefix).into_bytes()
    }

    /// What `key` is; keys of other prefixes and malformed keys are `Other`.
    pub(crate) fn parse<'a>(&self, key: &'a [u8]) -> Key<'a> {
        let Ok(key) = std::str::from_utf8(key) else {
            return Key::Other;
        };
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
        else {
            return Key::Other;
        };
        if let Some(id) = rest.strip_prefix("sessions/") {
            Key::Session(id)
        } else if let Some(id) = rest.strip_prefix("clients/") {
            Key::Client(id)
        } else if let Some(id) = rest.strip_prefix("evict/") {
            Key::Evict(id)
        } else if let Some(id) = rest.strip_prefix("nodes/") {
            Key::Node(id)
        } else {
            Key::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that keys parse back to what they name.
    #[test]
    fn keys_round_trip() {
        let keys = Keys::new("/hb");
        assert_eq!(keys.parse(&keys.session("s1")), Key::Session("s1"));
        assert_eq!(
            keys.parse(&keys.client("worker/1")),
            Key::Client("worker/1")
        );
        assert_eq!(keys.parse(&keys.evict("s2")), Key::Evict("s2"));
        assert_eq!(keys.parse(&keys.node("n1")), Key::Node("n1"));
        assert_eq!(keys.parse(&keys.compacted()), Key::Other);
        assert_eq!(keys.parse(b"/other/sessions/s1"), Key::Other);
    }

    /// Tests that revisions keep etcd's order, give each change of one etcd
    /// revision its own number, and count from the epoch's start; and that
    /// epochs stay in range.
    #[test]
    fn revisions_and_epochs() {
        let revisions = Revisions::from_base(1_000_000_000_000);
        let revision = |etcd: i64, index| revisions.of(1_000_000_000_000 + etcd, index);
        assert!(revision(7, 0) < revision(7, 1));
        assert!(revision(7, CHANGES_PER_REVISION + 5) < revision(8, 0));
        assert_eq!(
            revision(1 << 32, 0),
            1 << 52,
            "below 2^53 however old etcd is"
        );
        assert_eq!(revisions.of(5, 0), 0, "before the epoch: nothing");
        for (cluster, key) in [(0, 0), (u64::MAX, 1), (12345, u64::MAX)] {
            let epoch = epoch(cluster, key);
            assert!((1..crate::registry::EPOCH_LIMIT).contains(&epoch));
        }
    }
}
