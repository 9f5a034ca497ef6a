//! A thin etcd v3 client: the stubs generated from `etcd.proto` and the few
//! calls cluster mode makes, over one tonic channel balanced across the
//! endpoints.
//!
//! It is thin on purpose. The watch and keep-alive streams do not reconnect by
//! themselves: their owners re-open them and resume from the last revision
//! they applied, which is the only place that knows it.

use std::time::Duration;

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
    watch_request::RequestUnion, KeyValue, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseRevokeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest, WatchResponse,
};

use super::ClusterError;

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
}

impl Etcd {
    /// A client of the etcd cluster at `endpoints` (`http://host:port`). The
    /// channel connects lazily and balances over the endpoints that answer.
    pub(crate) fn connect(endpoints: &[String]) -> Result<Self, ClusterError> {
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
        })
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
        Ok(self.kv.clone().range(request).await?.into_inner())
    }

    /// One key, if it exists, and the revision it was read at.
    pub(crate) async fn get(&self, key: &[u8]) -> Result<(Option<KeyValue>, i64), Status> {
        let request = RangeRequest {
            key: key.to_vec(),
            ..RangeRequest::default()
        };
        let response = self.kv.clone().range(request).await?.into_inner();
        let revision = response.header.map_or(0, |header| header.revision);
        Ok((response.kvs.into_iter().next(), revision))
    }

    /// A transaction.
    pub(crate) async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, Status> {
        Ok(self.kv.clone().txn(txn).await?.into_inner())
    }

    /// A new lease of `ttl` seconds: its id, and the TTL etcd granted (it
    /// may raise a short one to its minimum).
    pub(crate) async fn grant(&self, ttl: i64) -> Result<(i64, i64), Status> {
        let response = self
            .lease
            .clone()
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await?
            .into_inner();
        if response.error.is_empty() {
            Ok((response.id, response.ttl))
        } else {
            Err(Status::unavailable(response.error))
        }
    }

    /// Revokes a lease, deleting every key attached to it.
    pub(crate) async fn revoke(&self, id: i64) -> Result<(), Status> {
        self.lease
            .clone()
            .lease_revoke(LeaseRevokeRequest { id })
            .await?;
        Ok(())
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
    /// notifications.
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
