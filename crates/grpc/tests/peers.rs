//! The peer client against real tonic servers on 127.0.0.1: it follows a directory reload that
//! moves a bureau, and a call's own deadline (`outbox.call_timeout_ms`) is not cut short by the
//! channel.
use std::{
    path::Path,
    pin::Pin,
    time::{Duration, Instant},
};

use tokio::net::TcpListener;
use tokio_stream::{Stream, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_client::HealthClient,
    health_server::{Health, HealthServer},
};
use yidi_domain::Role;
use yidi_grpc::client::{Connector, Peers};
use yidi_runtime::directory::{BureauEntry, DirectoryFile, DirectoryHandle, Reloaded};

const PRODUCER: &str = "producer-zhejiang";
const SERVED_BY: &str = "served-by";

/// A health service that answers SERVING after `delay`, saying which server it is.
struct Fake {
    name: &'static str,
    delay: Duration,
}

#[tonic::async_trait]
impl Health for Fake {
    async fn check(&self, _: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        let mut response = Response::new(HealthCheckResponse { status: ServingStatus::Serving as i32 });
        response.metadata_mut().insert(SERVED_BY, self.name.parse().unwrap());
        Ok(response)
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }
}

/// Serves `fake` on a free port of 127.0.0.1; returns its endpoint.
async fn serve(fake: Fake) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    endpoint
}

fn write_directory(path: &Path, producer_endpoint: &str) {
    let producer = BureauEntry {
        id: PRODUCER.into(),
        role: Role::Issuance,
        name: PRODUCER.into(),
        jurisdiction: Vec::new(),
        region: String::new(),
        endpoint: producer_endpoint.into(),
        endpoints: Vec::new(),
        keys: Vec::new(),
    };
    DirectoryFile { bureaus: vec![producer], ..DirectoryFile::default() }.write(path).unwrap();
}

/// Checks the producer's health through `peers` with `deadline`; returns which server answered.
async fn served_by(peers: &Peers, deadline: Duration) -> Result<String, Status> {
    let mut request = Request::new(HealthCheckRequest { service: String::new() });
    request.set_timeout(deadline);
    let response = HealthClient::new(peers.channel(PRODUCER).unwrap()).check(request).await?;
    Ok(response.metadata().get(SERVED_BY).unwrap().to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_directory_reload_that_moves_a_bureau_is_followed_by_the_next_call() {
    let first = serve(Fake { name: "first", delay: Duration::ZERO }).await;
    let second = serve(Fake { name: "second", delay: Duration::ZERO }).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("directory.toml");
    write_directory(&path, &first);
    let directory = DirectoryHandle::load(&path).unwrap();
    let peers = Peers::new(directory.clone(), Connector::plaintext());

    assert_eq!(served_by(&peers, Duration::from_secs(5)).await.unwrap(), "first");
    assert_eq!(served_by(&peers, Duration::from_secs(5)).await.unwrap(), "first", "the channel is kept");

    write_directory(&path, &second);
    // What SIGHUP does (`spawn_reloader` calls it forced); the file poll calls it unforced.
    assert_eq!(directory.reload(true).unwrap(), Reloaded::Replaced);
    assert_eq!(served_by(&peers, Duration::from_secs(5)).await.unwrap(), "second");
}

/// Takes ~12 s: the point is a deadline past the 10 s that used to be the channel's own timeout.
#[tokio::test]
async fn a_30_second_call_timeout_really_waits_past_10_seconds() {
    let slow = serve(Fake { name: "slow", delay: Duration::from_millis(11_500) }).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("directory.toml");
    write_directory(&path, &slow);
    let peers = Peers::new(DirectoryHandle::load(&path).unwrap(), Connector::plaintext());

    let started = Instant::now();
    let answer = served_by(&peers, Duration::from_secs(30)).await;
    assert_eq!(answer.unwrap(), "slow");
    assert!(started.elapsed() > Duration::from_secs(10), "{:?}", started.elapsed());
}
