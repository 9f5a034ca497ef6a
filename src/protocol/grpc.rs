//! gRPC's message framing, for the code that speaks `Heartbeat` without
//! tonic's codec: the server's sessions and the `heartbeat bench` generator.
//!
//! On the wire each message is a flag byte (0: not compressed), its length as
//! four big-endian bytes, then the protobuf payload. HTTP/2 may cut that
//! anywhere: a chunk can hold several messages, or part of one. [`Deframer`]
//! hands out whole payloads without copying them, except a message that
//! arrives split across chunks, which it gathers.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// The path of the `Heartbeat` method.
pub const HEARTBEAT_PATH: &str = "/heartbeat.v1.HeartbeatService/Heartbeat";

/// Bytes before each payload: the compressed flag and the length.
const PREFIX: usize = 5;

/// Appends `message` to `out`, framed.
pub fn put_message(message: &impl Message, out: &mut BytesMut) {
    let length = message.encoded_len();
    out.reserve(PREFIX + length);
    out.put_u8(0);
    // Heartbeat messages are bytes to kilobytes (the server's limits bound
    // them); gRPC cannot frame 4 GiB, so there is nothing better to write.
    debug_assert!(u32::try_from(length).is_ok(), "a message over 4 GiB");
    out.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    message.encode_raw(out);
}

/// `message`, framed on its own.
pub fn frame(message: &impl Message) -> Bytes {
    let mut out = BytesMut::new();
    put_message(message, &mut out);
    out.freeze()
}

/// Why a framed stream cannot be read any further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeframeError {
    /// A message has its compressed flag set; heartbeats are never compressed.
    #[error(
        "a compressed message: only uncompressed ones are taken (send grpc-encoding identity)"
    )]
    Compressed,
}

/// Gathers chunks of a framed stream and yields whole payloads.
///
/// Push a chunk after [`next_message`](Self::next_message) has returned
/// `None`: then nothing is copied but a message split across chunks. It sets
/// no limit on a message's size: the caller bounds that before the bytes get
/// here (the server's liveness layer refuses an oversized prefix).
#[derive(Debug, Default)]
pub struct Deframer {
    /// The unread rest of the last chunk.
    chunk: Bytes,
    /// The start of a message split across chunks; empty, and unallocated,
    /// otherwise.
    partial: BytesMut,
}

impl Deframer {
    /// Adds the next chunk of the stream.
    pub fn push(&mut self, chunk: Bytes) {
        if !self.chunk.is_empty() {
            // Used out of order: keep the bytes in order all the same.
            self.partial.extend_from_slice(&self.chunk);
        }
        self.chunk = chunk;
    }

    /// Whether nothing is buffered: no unread message and no part of one.
    pub fn is_empty(&self) -> bool {
        self.chunk.is_empty() && self.partial.is_empty()
    }

    /// The next whole payload, if one is here.
    pub fn next_message(&mut self) -> Option<Result<Bytes, DeframeError>> {
        if self.partial.is_empty() {
            match prefix(&self.chunk) {
                Some((0, length)) if self.chunk.len() - PREFIX >= length => {
                    let payload = self.chunk.slice(PREFIX..PREFIX + length);
                    self.chunk.advance(PREFIX + length);
                    return Some(Ok(payload));
                }
                Some((0, _)) | None => {}
                Some(_) => return Some(Err(DeframeError::Compressed)),
            }
            if self.chunk.is_empty() {
                return None;
            }
        }
        // Gather the prefix, then exactly the rest of the message: the
        // chunk's remainder stays uncopied for the messages after it.
        self.take_into_partial(PREFIX);
        let (flag, length) = prefix(&self.partial)?;
        if flag != 0 {
            return Some(Err(DeframeError::Compressed));
        }
        let whole = PREFIX.saturating_add(length);
        self.take_into_partial(whole);
        if self.partial.len() < whole {
            return None;
        }
        let mut message = self.partial.split_to(whole);
        if self.partial.is_empty() {
            // Let the gathering buffer go with the message.
            self.partial = BytesMut::new();
        }
        message.advance(PREFIX);
        Some(Ok(message.freeze()))
    }

    /// Moves bytes from the chunk into `partial` until it holds `goal` bytes
    /// or the chunk is used up.
    fn take_into_partial(&mut self, goal: usize) {
        let wanted = goal
            .saturating_sub(self.partial.len())
            .min(self.chunk.len());
        self.partial.extend_from_slice(&self.chunk[..wanted]);
        self.chunk.advance(wanted);
    }
}

/// The flag and the announced length, once all five prefix bytes are in.
fn prefix(buffer: &[u8]) -> Option<(u8, usize)> {
    let flag = *buffer.first()?;
    let length: [u8; 4] = buffer.get(1..PREFIX)?.try_into().ok()?;
    Some((flag, usize::try_from(u32::from_be_bytes(length)).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pb;

    fn ping(seq: u64) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            frame: Some(pb::heartbeat_request::Frame::Ping(pb::Ping { seq })),
        }
    }

    /// Tests that three messages come out whole and in order however the
    /// stream is cut into two or three chunks, prefixes included.
    #[test]
    fn every_split_yields_the_same_messages() {
        let mut wire = BytesMut::new();
        for seq in [1, 300, 70_000] {
            put_message(&ping(seq), &mut wire);
        }
        let wire = wire.freeze();
        for first in 0..=wire.len() {
            for second in first..=wire.len() {
                let mut deframer = Deframer::default();
                let mut seen = Vec::new();
                for chunk in [
                    wire.slice(..first),
                    wire.slice(first..second),
                    wire.slice(second..),
                ] {
                    deframer.push(chunk);
                    while let Some(payload) = deframer.next_message() {
                        let payload = payload.expect("uncompressed");
                        seen.push(pb::HeartbeatRequest::decode(payload).expect("decodes"));
                    }
                }
                assert_eq!(
                    seen,
                    vec![ping(1), ping(300), ping(70_000)],
                    "{first}/{second}"
                );
                assert!(deframer.is_empty());
            }
        }
    }

    /// Tests that a compressed flag is refused whether the message arrives
    /// whole or split, and that a cut-off message is reported as pending.
    #[test]
    fn compressed_and_partial_messages() {
        let mut compressed = BytesMut::from(&frame(&ping(9))[..]);
        compressed[0] = 1;
        let compressed = compressed.freeze();
        for cut in 0..=compressed.len() {
            let mut deframer = Deframer::default();
            deframer.push(compressed.slice(..cut));
            let early = deframer.next_message();
            deframer.push(compressed.slice(cut..));
            let outcome = early.or_else(|| deframer.next_message());
            assert_eq!(outcome, Some(Err(DeframeError::Compressed)), "cut at {cut}");
        }
        let mut deframer = Deframer::default();
        deframer.push(frame(&ping(9)).slice(..7));
        assert_eq!(deframer.next_message(), None);
        assert!(!deframer.is_empty());
    }

    /// Tests that pushing before the last chunk is read keeps every message
    /// whole and in order.
    #[test]
    fn an_early_push_keeps_messages_apart() {
        let mut wire = BytesMut::new();
        for seq in 1..=3 {
            put_message(&ping(seq), &mut wire);
        }
        let mut deframer = Deframer::default();
        deframer.push(wire.freeze());
        deframer.push(frame(&ping(4)));
        let seen: Vec<pb::HeartbeatRequest> = std::iter::from_fn(|| deframer.next_message())
            .map(|payload| pb::HeartbeatRequest::decode(payload.expect("plain")).expect("decodes"))
            .collect();
        assert_eq!(seen, (1..=4).map(ping).collect::<Vec<_>>());
        assert!(deframer.is_empty());
    }
}
