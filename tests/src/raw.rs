//! Calls with raw message bytes, so that anything can be put on the wire and any method reached by
//! its path: for the tests that sweep every RPC of the descriptor set.
use std::{str::FromStr, time::Duration};

use prost::bytes::{Buf, BufMut};
use tonic::{
    Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};

/// How long a call may take (the server's answer, or a stream's first message).
const DEADLINE: Duration = Duration::from_secs(2);

/// One call of `path` with `body` as the request message; the status it ended with (OK if it
/// answered). A server stream is drained until it ends or the client's deadline passes
/// (DEADLINE_EXCEEDED), as grpcurl's `-max-time` does.
pub async fn call(channel: &Channel, path: &str, body: Vec<u8>, streaming: bool) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    if let Err(error) = grpc.ready().await {
        return Status::unavailable(error.to_string());
    }
    let Ok(path) = PathAndQuery::from_str(path) else { return Status::internal("bad path") };
    let mut request = Request::new(body);
    request.set_timeout(DEADLINE);
    let answered = tokio::time::timeout(5 * DEADLINE, async {
        if streaming {
            let mut stream = grpc.server_streaming(request, path, RawCodec).await?.into_inner();
            let drained = async {
                while stream.message().await?.is_some() {}
                Ok(())
            };
            tokio::time::timeout(DEADLINE, drained)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("the client's deadline")))
        } else {
            grpc.unary(request, path, RawCodec).await.map(drop)
        }
    })
    .await;
    match answered {
        Ok(Ok(())) => Status::ok(""),
        Ok(Err(status)) => status,
        Err(_) => Status::unknown("no answer within 10 s"),
    }
}

/// Sends and receives message bodies as they are.
#[derive(Debug, Clone, Copy)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}
