//! The live presence page, and the two endpoints it reads.
//!
//! The page is one static HTML file with its script inline, embedded in the
//! binary: nothing to build, nothing to fetch. It follows presence with a
//! server-sent event stream of `WatchSessions` (each event's `data` is one
//! `WatchSessionsResponse` in proto3 JSON) and resumes after a drop by epoch
//! and revision, exactly as a gRPC watcher does. The endpoints call the same
//! `PresenceService` the gRPC listener serves, in-process, so the admin
//! token, the watcher cap, lag handling and resuming are those of gRPC.
//!
//! The stream is read with `fetch`, not `EventSource`, because a page must
//! send the admin token as a header, which `EventSource` cannot; it is still
//! plain `text/event-stream`, and `Last-Event-ID` (`<epoch>.<revision>`)
//! resumes it for clients that use `EventSource`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::stream;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;
use tokio_stream::{Stream, StreamExt};
use tonic::{metadata::MetadataValue, Status};

use super::{full, http_status, text, typed, WebBody, WebEndpoint};
use crate::{
    protocol::{
        json,
        pb::{self, presence_service_server::PresenceService, watch_sessions_response::Event},
    },
    server::connection::PeerInfo,
};

/// Where the page reads presence from.
pub(super) const WATCH_PATH: &str = "/v1/presence/watch";
/// Where the page evicts a session.
pub(super) const EVICT_PATH: &str = "/v1/presence/evict";

/// The page itself.
const PAGE_HTML: &str = include_str!("../../../web/presence.html");

/// A comment line sent on a quiet stream, so proxies and the page know it lives.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// The largest eviction request body taken.
const MAX_EVICT_BODY: usize = 16 * 1024;

/// `GET /`: the page.
pub(super) fn page() -> Response<WebBody> {
    let mut response = typed(StatusCode::OK, "text/html; charset=utf-8", PAGE_HTML);
    if let Ok(policy) = HeaderValue::try_from(content_security_policy()) {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    response
}

/// The page's Content-Security-Policy: its one inline script and style,
/// named by their hashes, may run; it talks only to this listener, and
/// cannot be framed. Client ids, labels and messages are shown as text,
/// never as markup; the policy is the second line of defence.
fn content_security_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        use base64::Engine as _;
        use sha2::Digest as _;
        let hash_of = |open: &str, close: &str| {
            let inline = PAGE_HTML
                .split_once(open)
                .and_then(|(_, rest)| rest.split_once(close))
                .map_or("", |(inline, _)| inline);
            let digest = sha2::Sha256::digest(inline.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        };
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash_of("<script type=\"module\">", "</script>"),
            hash_of("<style>", "</style>"),
        )
    })
}

/// `GET /v1/presence/watch?client_id=…&label=k=v&resume_epoch=…&resume_after=…`:
/// `WatchSessions` as server-sent events.
pub(super) async fn watch(
    endpoint: Arc<WebEndpoint>,
    request: Request<Incoming>,
    peer: PeerInfo,
) -> Response<WebBody> {
    if let Err(refusal) = endpoint.check_origin(request.headers()) {
        return text(StatusCode::FORBIDDEN, refusal);
    }
    let watch = match watch_request(request.uri().query().unwrap_or(""), request.headers()) {
        Ok(watch) => watch,
        Err(problem) => return status_response(&Status::invalid_argument(problem)),
    };
    let hold = match peer.connection.hold_stream() {
        Ok(hold) => hold,
        Err(limit) => return status_response(&Status::resource_exhausted(limit.refusal())),
    };

    let call = with_authorization(tonic::Request::new(watch), request.headers());
    let events = match endpoint.presence.watch_sessions(call).await {
        Ok(events) => events.into_inner(),
        Err(status) => return status_response(&status),
    };
    let mut epoch = 0;
    let events =
        events.map(move |event| Ok::<_, Infallible>(Frame::data(sse_event(&mut epoch, event))));
    // Ends after the status event; the hold keeps the connection busy till then.
    let keepalive = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval_at(
        tokio::time::Instant::now() + KEEPALIVE_EVERY,
        KEEPALIVE_EVERY,
    ))
    .map(|_| Ok(Frame::data(Bytes::from_static(b": keepalive\n\n"))));
    let body = merge_until_end(events, keepalive, hold);
    let mut response = Response::new(StreamBody::new(body).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The events, with keepalives in the gaps, ending when the events end.
fn merge_until_end<H: Send + 'static>(
    events: impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static,
    keepalive: impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static,
    hold: H,
) -> impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    let events = events.map(Some).chain(stream::once(async { None }));
    let keepalive = keepalive.map(Some);
    StreamExt::merge(events, keepalive)
        .take_while(|item| item.is_some())
        .filter_map(move |item| {
            let _ = &hold;
            item
        })
}

/// One watch event (or the status that ended the watch) as an SSE event.
fn sse_event(epoch: &mut u64, event: Result<pb::WatchSessionsResponse, Status>) -> Bytes {
    match event {
        Ok(event) => {
            if let Some(Event::Synced(synced)) = &event.event {
                *epoch = synced.epoch;
            }
            let data = json::to_json(json::names::WATCH_SESSIONS_RESPONSE, &event);
            let id = if *epoch != 0 {
                format!("id: {}.{}\n", epoch, event.revision)
            } else {
                String::new()
            };
            Bytes::from(format!("{id}data: {data}\n\n"))
        }
        Err(status) => Bytes::from(format!("event: end\ndata: {}\n\n", status_json(&status))),
    }
}

/// The `WatchSessionsRequest` a query string (and `Last-Event-ID`) asks for.
fn watch_request(query: &str, headers: &HeaderMap) -> Result<pb::WatchSessionsRequest, String> {
    let mut watch = pb::WatchSessionsRequest::default();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)
            .ok_or_else(|| format!("{name}'s value is not percent-encoded UTF-8"))?;
        let number = |value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("{name}={value} is not a whole number"))
        };
        match name {
            "client_id" => watch.client_id = value,
            "label" => {
                let (key, label) = value
                    .split_once('=')
                    .ok_or_else(|| format!("label={value} is not key=value"))?;
                watch.labels.insert(key.to_owned(), label.to_owned());
            }
            "resume_epoch" => watch.resume_epoch = number(&value)?,
            "resume_after" => watch.resume_after = number(&value)?,
            other => {
                return Err(format!(
                    "unknown parameter {other}: use client_id, label (key=value, repeatable), resume_epoch, resume_after"
                ))
            }
        }
    }
    if let Some(last) = headers.get("last-event-id") {
        let last = String::from_utf8_lossy(last.as_bytes());
        let (epoch, revision) = last
            .split_once('.')
            .and_then(|(epoch, revision)| Some((epoch.parse().ok()?, revision.parse().ok()?)))
            .ok_or_else(|| {
                format!("Last-Event-ID \"{last}\" is not <epoch>.<revision> as this stream sends")
            })?;
        watch.resume_epoch = epoch;
        watch.resume_after = revision;
    }
    Ok(watch)
}

/// Decodes `%XX` escapes and `+` (a space, as forms send it).
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        match first {
            b'%' => {
                let hex = tail.get(..2)?;
                bytes.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                rest = &tail[2..];
            }
            b'+' => {
                bytes.push(b' ');
                rest = tail;
            }
            other => {
                bytes.push(other);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

/// `POST /v1/presence/evict` with an `EvictSessionRequest` in proto3 JSON.
///
/// Eviction from a browser needs the server's admin token: without one
/// configured it is refused, since the page's listener may face the web.
pub(super) async fn evict(
    endpoint: Arc<WebEndpoint>,
    request: Request<Incoming>,
) -> Response<WebBody> {
    if let Err(refusal) = endpoint.check_origin(request.headers()) {
        return text(StatusCode::FORBIDDEN, refusal);
    }
    if endpoint.shared.config.admin_token.is_none() {
        return status_response(&Status::permission_denied(
            "eviction from the browser needs an admin token: start the server with --admin-token-file",
        ));
    }
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_EVICT_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return status_response(&Status::invalid_argument(format!(
                "the request body is over {MAX_EVICT_BODY} bytes or broken: send one EvictSessionRequest in JSON"
            )))
        }
    };
    let evict: pb::EvictSessionRequest =
        match json::from_json(json::names::EVICT_SESSION_REQUEST, &body) {
            Ok(evict) => evict,
            Err(error) => return status_response(&Status::invalid_argument(error.to_string())),
        };
    let call = with_authorization(tonic::Request::new(evict), &parts.headers);
    match endpoint.presence.evict_session(call).await {
        Ok(_) => {
            let mut response = Response::new(full(Bytes::from_static(b"{}")));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(status) => status_response(&status),
    }
}

/// The request with the HTTP request's `authorization` as its metadata.
fn with_authorization<T>(mut call: tonic::Request<T>, headers: &HeaderMap) -> tonic::Request<T> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| MetadataValue::try_from(value.as_bytes()).ok())
    {
        call.metadata_mut().insert("authorization", value);
    }
    call
}

/// A failed call as HTTP: the status's code and message as JSON, with the
/// HTTP status that means the same.
fn status_response(status: &Status) -> Response<WebBody> {
    let mut response = Response::new(full(status_json(status)));
    *response.status_mut() = http_status(status.code());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `{"code":"NOT_FOUND","message":"…"}`.
fn status_json(status: &Status) -> String {
    let code = format!("{:?}", status.code());
    serde_json::json!({
        "code": screaming_snake(&code),
        "message": status.message(),
    })
    .to_string()
}

/// `NotFound` → `NOT_FOUND`, as gRPC names its codes.
fn screaming_snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (index, c) in name.chars().enumerate() {
        if c.is_uppercase() && index > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that the query string becomes the request, labels and resume
    /// included, and that Last-Event-ID resumes.
    #[test]
    fn reads_the_watch_query() {
        let mut headers = HeaderMap::new();
        let watch = watch_request(
            "client_id=a%20b&label=tab%3Done&resume_epoch=7&resume_after=9",
            &headers,
        )
        .expect("valid");
        assert_eq!(watch.client_id, "a b");
        assert_eq!(watch.labels.get("tab").map(String::as_str), Some("one"));
        assert_eq!((watch.resume_epoch, watch.resume_after), (7, 9));
        headers.insert("last-event-id", HeaderValue::from_static("11.12"));
        let watch = watch_request("", &headers).expect("valid");
        assert_eq!((watch.resume_epoch, watch.resume_after), (11, 12));
        for bad in [
            "resume_after=x",
            "label=nokey",
            "colour=red",
            "client_id=%ZZ",
        ] {
            assert!(watch_request(bad, &HeaderMap::new()).is_err(), "{bad}");
        }
    }

    /// Tests the status body: gRPC's code name and the message.
    #[test]
    fn statuses_read_as_grpc_names() {
        assert_eq!(
            status_json(&Status::resource_exhausted("lagged")),
            r#"{"code":"RESOURCE_EXHAUSTED","message":"lagged"}"#
        );
    }
}
