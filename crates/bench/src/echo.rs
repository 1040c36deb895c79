//! The baseline: a bare tonic unary echo (no health, reflection, tracing or database), served by
//! this binary in a process of its own (`yidi-bench serve-echo`), like the registry.
use tonic::{Request, Response, Status, transport::Server};

pub mod pb {
    tonic::include_proto!("yidi.bench.v1");
}

use pb::echo_server::{Echo, EchoServer};

/// About the size of a CheckCardRequest (number, serial, relying party), so both move the same bytes.
pub const PAYLOAD_LEN: usize = 44;

#[derive(Default)]
struct Echoer;

#[tonic::async_trait]
impl Echo for Echoer {
    async fn echo(&self, request: Request<pb::EchoRequest>) -> Result<Response<pb::EchoResponse>, Status> {
        Ok(Response::new(pb::EchoResponse { payload: request.into_inner().payload }))
    }
}

/// Serves the echo on a free loopback port until the process is stopped; prints the address.
/// `--tls-dir DIR`: over mutual TLS with the certificates of [`crate::process::BenchCerts`] (the
/// echo's own, a client certificate of the CA required), as a bureau's port is configured.
pub async fn serve(args: &[String]) -> anyhow::Result<()> {
    let mut builder = Server::builder();
    match args {
        [] => {}
        [flag, dir] if flag == "--tls-dir" => {
            let certs = yidi_demo::certs::CertDir::new(dir);
            builder = builder.tls_config(certs.files(crate::process::ECHO_ID)?.server_config())?;
        }
        other => anyhow::bail!("serve-echo: unexpected arguments {other:?}"),
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("yidi-bench echo listening on {}", listener.local_addr()?);
    builder
        .add_service(EchoServer::new(Echoer))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

/// One echo call of [`PAYLOAD_LEN`] bytes.
pub async fn call(channel: yidi_grpc::balance::Balanced) -> Result<u64, Status> {
    let mut client = pb::echo_client::EchoClient::new(channel);
    client.echo(pb::EchoRequest { payload: vec![7; PAYLOAD_LEN] }).await?;
    Ok(1)
}
