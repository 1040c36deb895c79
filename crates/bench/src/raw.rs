//! Calls whose request is encoded once and sent as bytes: a 1,000-card CheckCards request built
//! per call would cost the load generator (on the same two cores) more CPU than the server.
use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
};
use yidi_grpc::balance::Balanced;

/// Sends pre-encoded request bytes, decodes the answer as `M`.
pub struct RawCodec<M>(PhantomData<M>);

impl<M> Default for RawCodec<M> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

pub struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = prost::bytes::Bytes;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

pub struct MessageDecoder<M>(PhantomData<M>);

impl<M: Message + Default + Send + 'static> Decoder for MessageDecoder<M> {
    type Item = M;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        M::decode(src).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

impl<M: Message + Default + Send + 'static> Codec for RawCodec<M> {
    type Encode = prost::bytes::Bytes;
    type Decode = M;
    type Encoder = RawEncoder;
    type Decoder = MessageDecoder<M>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

/// One unary call of `path` with an already encoded request.
pub async fn unary<M: Message + Default + Send + 'static>(
    channel: Balanced,
    path: &'static str,
    request: prost::bytes::Bytes,
) -> Result<M, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let answer =
        grpc.unary(tonic::Request::new(request), PathAndQuery::from_static(path), RawCodec::<M>::default()).await?;
    Ok(answer.into_inner())
}

/// A request as gRPC frames it on the wire (uncompressed flag, 4-byte length, message): the body
/// file `h2load -d` sends.
pub fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}
