//! Counts gRPC length-prefixed messages in a byte stream without buffering them.
//!
//! A gRPC message on the wire is a 5-byte prefix (a compression flag and a
//! big-endian `u32` length) followed by that many bytes. HTTP/2 is free to split a
//! message across DATA frames or to pack several into one, so liveness counts
//! whole messages, not chunks: a client that trickles half a message is not alive.

/// A message header announced more bytes than the configured limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oversize {
    /// The announced length of the message, in bytes.
    pub(crate) len: u32,
}

/// Tracks where the message boundaries fall in a stream of chunks.
#[derive(Debug, Default)]
pub(crate) struct MessageFramer {
    /// The prefix bytes seen so far of the message being read.
    header: [u8; 5],
    /// How many bytes of `header` are filled; 0 at a boundary.
    header_len: usize,
    /// Payload bytes of the current message still to come.
    remaining: usize,
}

impl MessageFramer {
    /// Feeds one chunk and returns how many messages it completed.
    ///
    /// Fails as soon as a prefix announces more than `limit` bytes, before any of
    /// the payload is read.
    pub(crate) fn feed(&mut self, mut chunk: &[u8], limit: u32) -> Result<u64, Oversize> {
        let mut completed = 0;
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(chunk.len());
                self.remaining -= take;
                chunk = &chunk[take..];
                if self.remaining == 0 {
                    completed += 1;
                }
                continue;
            }
            let take = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&chunk[..take]);
            self.header_len += take;
            chunk = &chunk[take..];
            if self.header_len == 5 {
                self.header_len = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if len > limit {
                    return Err(Oversize { len });
                }
                // A u32 always fits a usize on the 32- and 64-bit targets tokio supports.
                self.remaining = len as usize;
                if self.remaining == 0 {
                    completed += 1;
                }
            }
        }
        Ok(completed)
    }

    /// Whether the stream so far ends exactly at a message boundary, so that a
    /// whole message may be appended without corrupting the stream.
    pub(crate) fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, len as usize));
        out
    }

    /// Tests that messages are counted whole whatever the chunking.
    #[test]
    fn counts_messages_across_any_split() {
        let mut wire = message(3);
        wire.extend(message(0));
        wire.extend(message(10));
        for split in 1..wire.len() {
            let mut framer = MessageFramer::default();
            let mut total = 0;
            for chunk in wire.chunks(split) {
                total += framer.feed(chunk, 100).expect("within limit");
            }
            assert_eq!(total, 3, "chunk size {split}");
            assert!(framer.at_boundary());
        }
    }

    /// Tests that a partial message is neither counted nor a boundary.
    #[test]
    fn partial_message_is_not_counted() {
        let mut framer = MessageFramer::default();
        assert_eq!(framer.feed(&message(4)[..7], 100), Ok(0));
        assert!(!framer.at_boundary());
    }

    /// Tests that an oversized prefix is refused before its payload arrives.
    #[test]
    fn refuses_oversize_at_the_prefix() {
        let mut framer = MessageFramer::default();
        assert_eq!(
            framer.feed(&message(101)[..5], 100),
            Err(Oversize { len: 101 })
        );
    }
}
