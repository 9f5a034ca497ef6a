//! prost encoding with buffers sized for heartbeat frames.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial size of each call's encode and decode buffer.
///
/// tonic allocates 8 KiB each way per call by default; heartbeat messages are a
/// few bytes (a ping is 9 with its prefix; a `Hello` with labels, a few
/// hundred), presence messages rarely more than a few hundred, and buffers grow
/// on demand. The server's sessions do not use this codec at all (see
/// `server/heartbeat.rs`); a client's stream and each presence call do.
const BUFFER_SIZE: usize = 256;

/// How many encoded bytes tonic gathers before handing them to HTTP/2. Frames are
/// flushed anyway whenever the response stream has nothing more ready.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The prost codec with small per-call buffers; generated services use it.
#[derive(Debug)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
