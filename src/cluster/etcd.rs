//! A thin etcd v3 client: the stubs generated from `etcd.proto` and the few
//! calls cluster mode makes, over one tonic channel balanced across the
//! endpoints.
//!
//! It is thin on purpose. The watch and keep-alive streams do not reconnect by
//! themselves: their owners re-open them and resume from the last revision
//! they applied, which is the only place that knows it.
//!
//! Every unary call is timed into `heartbeat_cluster_etcd_request_duration_seconds`,
//! and every answer's header tells the metrics how far etcd has come, so the
//! view's lag is measured against etcd itself.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    transport::{Channel, Endpoint},
    Status, Streaming,
};

/// The generated messages and clients of `etcd.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub(crate) mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::{
    kv_client::KvClient, lease_client::LeaseClient, request_op::Request, watch_client::WatchClient,
    watch_request::RequestUnion, CompactionRequest, KeyValue, LeaseGrantRequest,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest, PutRequest, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, TxnRequest, TxnResponse, WatchCreateRequest,
    WatchProgressRequest, WatchRequest, WatchResponse,
};

use super::ClusterError;
use crate::metrics::Metrics;

/// How long one unary call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest response read from etcd: a few hundred thousand sessions.
const MAX_RESPONSE: usize = 512 * 1024 * 1024;

/// Clients of the KV, Watch and Lease services on one channel.
#[derive(Clone, Debug)]
pub(crate) struct Etcd {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
    metrics: Arc<Metrics>,
}

/// What kind of failure an etcd call's status is, as
/// `heartbeat_cluster_write_failures_total` labels it: `nospace` (etcd's
/// quota is full: "mvcc: database space exceeded"), `timeout`,
/// `unavailable` (no connection, no leader) or `other`.
pub(crate) fn failure_kind(status: &Status) -> &'static str {
    use tonic::Code;
    let message = status.message();
    if message.contains("database space exceeded") {
        "nospace"
    } else if status.code() == Code::DeadlineExceeded
        || message.contains("Timeout expired")
        || message.contains("timed out")
    {
        "timeout"
    } else if status.code() == Code::Unavailable {
        "unavailable"
    } else {
        "other"
    }
}

impl Etcd {
    /// A client of the etcd cluster at `endpoints` (`http://host:port`). The
    /// channel connects lazily and balances over the endpoints that answer.
    /// Calls are timed, and answers' revisions heard, in `metrics`.
    pub(crate) fn connect(
        endpoints: &[String],
        metrics: Arc<Metrics>,
    ) -> Result<Self, ClusterError> {
        let endpoints = endpoints
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .map(|endpoint| {
                        endpoint
                            .connect_timeout(CALL_TIMEOUT)
                            .timeout(CALL_TIMEOUT)
                            .tcp_nodelay(true)
                            // etcd refuses pings closer than 5 s, and
                            // pings without a call open.
                            .http2_keep_alive_interval(Duration::from_secs(10))
                            .keep_alive_timeout(Duration::from_secs(5))
                    })
                    .map_err(|error| ClusterError::Endpoint {
                        url: url.clone(),
                        reason: error.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        Ok(Self {
            // A range of every session, or one lost node's expiry in a single
            // watch response, is far over tonic's 4 MiB default.
            kv: KvClient::new(channel.clone()).max_decoding_message_size(MAX_RESPONSE),
            watch: WatchClient::new(channel.clone()).max_decoding_message_size(MAX_RESPONSE),
            lease: LeaseClient::new(channel),
            metrics,
        })
    }

    /// Runs `call` (etcd call `op`), timing it, and notes the revision its
    /// answer's header gives.
    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
        header: impl FnOnce(&T) -> Option<&ResponseHeader>,
    ) -> Result<T, Status> {
        let started = tokio::time::Instant::now();
        let answer = call.await;
        let cluster = self.metrics.cluster();
        cluster.etcd_request(op, started.elapsed());
        let answer = answer?.into_inner();
        if let Some(header) = header(&answer) {
            cluster.heard_head(header.revision);
        }
        Ok(answer)
    }

    /// The metrics this client reports to.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Every key under `prefix`, at `revision` (0: now).
    pub(crate) async fn range_prefix(
        &self,
        prefix: &[u8],
        revision: i64,
    ) -> Result<RangeResponse, Status> {
        let request = RangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            limit: 0,
            revision,
        };
        let mut kv = self.kv.clone();
        self.timed("range", kv.range(request), |answer| answer.header.as_ref())
            .await
    }

    /// One key, if it exists, and the revision it was read at.
    pub(crate) async fn get(&self, key: &[u8]) -> Result<(Option<KeyValue>, i64), Status> {
        let request = RangeRequest {
            key: key.to_vec(),
            ..RangeRequest::default()
        };
        let mut kv = self.kv.clone();
        let response = self
            .timed("range", kv.range(request), |answer| answer.header.as_ref())
            .await?;
        let revision = response.header.map_or(0, |header| header.revision);
        Ok((response.kvs.into_iter().next(), revision))
    }

    /// A transaction.
    pub(crate) async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, Status> {
        let mut kv = self.kv.clone();
        self.timed("txn", kv.txn(txn), |answer| answer.header.as_ref())
            .await
    }

    /// Compacts etcd's history up to `revision`: what is older can no longer
    /// be read or watched, and its pages are free for reuse (only a defrag
    /// shrinks the file). False if etcd was already compacted that far
    /// (another node, or the operator, got there first): not an error.
    pub(crate) async fn compact(&self, revision: i64) -> Result<bool, Status> {
        let mut kv = self.kv.clone();
        let request = CompactionRequest {
            revision,
            physical: false,
        };
        match self
            .timed("compact", kv.compact(request), |answer| {
                answer.header.as_ref()
            })
            .await
        {
            Err(status)
                if status
                    .message()
                    .contains("required revision has been compacted") =>
            {
                Ok(false)
            }
            answer => answer.map(|_| true),
        }
    }

    /// A new lease of `ttl` seconds: its id, and the TTL etcd granted (it
    /// may raise a short one to its minimum).
    pub(crate) async fn grant(&self, ttl: i64) -> Result<(i64, i64), Status> {
        let mut lease = self.lease.clone();
        let response = self
            .timed(
                "grant",
                lease.lease_grant(LeaseGrantRequest { ttl, id: 0 }),
                |answer| answer.header.as_ref(),
            )
            .await?;
        if response.error.is_empty() {
            Ok((response.id, response.ttl))
        } else {
            Err(Status::unavailable(response.error))
        }
    }

    /// Revokes a lease, deleting every key attached to it.
    pub(crate) async fn revoke(&self, id: i64) -> Result<(), Status> {
        let mut lease = self.lease.clone();
        self.timed(
            "revoke",
            lease.lease_revoke(LeaseRevokeRequest { id }),
            |answer| answer.header.as_ref(),
        )
        .await
        .map(drop)
    }

    /// A keep-alive stream for lease `id`, its first renewal already asked
    /// (etcd answers the call only then): send more on the sender, read the
    /// answers.
    pub(crate) async fn keep_alive(
        &self,
        id: i64,
    ) -> Result<
        (
            mpsc::Sender<LeaseKeepAliveRequest>,
            Streaming<LeaseKeepAliveResponse>,
        ),
        Status,
    > {
        let (sender, requests) = mpsc::channel(4);
        // The channel has room for it.
        let _ = sender.try_send(LeaseKeepAliveRequest { id });
        let mut lease = self.lease.clone();
        let responses = lease
            .lease_keep_alive(ReceiverStream::new(requests))
            .await?
            .into_inner();
        Ok((sender, responses))
    }

    /// Watches every key under `prefix` from `start_revision`, with progress
    /// notifications. Send [`progress_request`] on the sender to ask how far
    /// the watch has come.
    pub(crate) async fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
    ) -> Result<(mpsc::Sender<WatchRequest>, Streaming<WatchResponse>), Status> {
        let (sender, requests) = mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                start_revision,
                progress_notify: true,
                prev_kv: false,
            })),
        };
        // The channel has room for this one; the sender is kept so that the
        // stream stays open.
        let _ = sender.try_send(create);
        let mut watch = self.watch.clone();
        let responses = watch
            .watch(ReceiverStream::new(requests))
            .await?
            .into_inner();
        Ok((sender, responses))
    }
}

/// A request for a watch stream's progress: etcd answers with an empty
/// response once every event up to its header's revision was sent.
pub(crate) fn progress_request() -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
    }
}

/// The end of the range of keys that start with `prefix`: the prefix with its
/// last byte below 0xff incremented.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from the prefix on.
    vec![0]
}

/// A transaction that does `success` when every comparison holds, and
/// nothing otherwise (its answer says which).
pub(crate) fn txn(compare: Vec<pb::Compare>, success: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure: Vec::new(),
    }
}

/// The comparison that holds while `key` does not exist.
pub(crate) fn absent(key: Vec<u8>) -> pb::Compare {
    compare(
        key,
        pb::compare::CompareResult::Equal,
        pb::compare::TargetUnion::CreateRevision(0),
    )
}

/// A put, for a transaction.
pub(crate) fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest { key, value, lease })),
    }
}

/// A delete of one key, for a transaction.
pub(crate) fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key,
            range_end: Vec::new(),
        })),
    }
}

/// A comparison of `key`'s `target` with `value`.
pub(crate) fn compare(
    key: Vec<u8>,
    result: pb::compare::CompareResult,
    target: pb::compare::TargetUnion,
) -> pb::Compare {
    let target_kind = match target {
        pb::compare::TargetUnion::Version(_) => pb::compare::CompareTarget::Version,
        pb::compare::TargetUnion::CreateRevision(_) => pb::compare::CompareTarget::Create,
        pb::compare::TargetUnion::ModRevision(_) => pb::compare::CompareTarget::Mod,
        pb::compare::TargetUnion::Value(_) => pb::compare::CompareTarget::Value,
        pb::compare::TargetUnion::Lease(_) => pb::compare::CompareTarget::Lease,
    };
    pb::Compare {
        result: result.into(),
        target: target_kind.into(),
        key,
        target_union: Some(target),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests the end of a prefix's range, carries included.
    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/hb/"), b"/hb0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
