//! Request and response bodies held in memory: what a layer needs to look inside a call (the
//! idempotency layer hashes and stores it) or to send it again (a peer call failing over to another
//! endpoint of the same bureau).
use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Body as _, Frame};
use tonic::{
    Status,
    body::Body,
    codegen::{Bytes, http::HeaderMap},
};

/// Why a body was not read to its end.
#[derive(Debug)]
pub enum CollectError {
    /// More than this many bytes of data.
    TooLarge(usize),
    /// The body itself failed (its sender went away, an encoding error).
    Body(Status),
}

/// All of a body: its data, concatenated, and its trailers; at most `limit` bytes of data.
pub async fn collect(mut body: Body, limit: Option<usize>) -> Result<(Bytes, Option<HeaderMap>), CollectError> {
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = futures::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        match frame.map_err(CollectError::Body)?.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if let Some(limit) = limit
                    && data.len() > limit
                {
                    return Err(CollectError::TooLarge(limit));
                }
            }
            Err(frame) => {
                if let Ok(map) = frame.into_trailers() {
                    trailers = Some(map);
                }
            }
        }
    }
    Ok((Bytes::from(data), trailers))
}

/// A body already in memory: one data frame, then the trailers, if any.
#[derive(Debug, Clone, Default)]
pub struct Buffered {
    pub data: Option<Bytes>,
    pub trailers: Option<HeaderMap>,
}

impl Buffered {
    /// A tonic body of `data` alone.
    pub fn body(data: Bytes) -> Body {
        Body::new(Self { data: Some(data), trailers: None })
    }
}

impl http_body::Body for Buffered {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take().filter(|data| !data.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|trailers| Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.as_ref().is_none_or(Bytes::is_empty) && self.trailers.is_none()
    }
}

/// The bytes of the length-delimited field `field` (a string, bytes or message) of the message in
/// the body's first gRPC frame, read without its type: the last occurrence, as decoding would keep.
/// `None` if absent, or if the frame is compressed, cut short or not a protobuf message.
pub fn length_delimited_field(body: &[u8], field: u32) -> Option<&[u8]> {
    let ([0, l0, l1, l2, l3], message) = body.split_first_chunk::<5>()? else { return None };
    let length = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
    let mut rest = message.get(..length)?;
    let mut found = None;
    while !rest.is_empty() {
        let key = prost::encoding::decode_varint(&mut rest).ok()?;
        let (number, wire_type) = (key >> 3, key & 7);
        let skip = match wire_type {
            0 => prost::encoding::decode_varint(&mut rest).map(|_| 0).ok(),
            1 => Some(8),
            2 => prost::encoding::decode_varint(&mut rest).ok().and_then(|n| usize::try_from(n).ok()),
            5 => Some(4),
            _ => None,
        };
        let value = rest.get(..skip?)?;
        if wire_type == 2 && number == u64::from(field) {
            found = Some(value);
        }
        rest = &rest[value.len()..];
    }
    found
}
