//! A bureau listed at several endpoints (replicas), called through the peer client against real
//! tonic servers on 127.0.0.1: calls are spread over the endpoints; reads and keyed writes move to
//! another endpoint when one is down (a closed port, a server stopped mid-test, UNAVAILABLE); a
//! write without a key that reached a server is never sent twice; a call ends at its deadline.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status};
use yidi_domain::Role;
use yidi_grpc::client::{Connector, Peers};
use yidi_proto::v1::{self as pb, issuance_client::IssuanceClient};
use yidi_runtime::directory::DirectoryHandle;
use yidi_testkit::{
    bureau::closed_endpoint,
    directory::DirectoryBuilder,
    fake::{IssuanceFake, issuance_server},
};

const PRODUCER: &str = "producer-zhejiang";

/// What each replica was asked, by name: (method, idempotency key sent).
type Calls = Arc<Mutex<BTreeMap<&'static str, Vec<(&'static str, bool)>>>>;

/// A producer replica that answers every call with an order naming itself, or UNAVAILABLE.
#[derive(Clone)]
struct Replica {
    name: &'static str,
    unavailable: bool,
    /// How long it takes to answer.
    delay: Duration,
    calls: Calls,
}

impl Replica {
    fn answer<T>(&self, method: &'static str, request: &Request<T>) -> Result<pb::Order, Status> {
        let keyed = request.metadata().contains_key("idempotency-key");
        self.calls.lock().unwrap().entry(self.name).or_default().push((method, keyed));
        if self.unavailable {
            return Err(Status::unavailable(format!("{} is behind", self.name)));
        }
        Ok(pb::Order { order_id: self.name.to_owned(), ..pb::Order::default() })
    }
}

#[tonic::async_trait]
impl IssuanceFake for Replica {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        let order = self.answer("PlaceOrder", &request)?;
        Ok(Response::new(pb::PlaceOrderResponse { order: Some(order) }))
    }

    async fn get_order(&self, request: Request<pb::GetOrderRequest>) -> Result<Response<pb::GetOrderResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        let order = self.answer("GetOrder", &request)?;
        Ok(Response::new(pb::GetOrderResponse { order: Some(order) }))
    }
}

/// A replica served on a free port until `stop` is sent; its endpoint.
async fn serve(replica: Replica) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder().add_service(issuance_server(replica)).serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stopped.await;
            },
        ),
    );
    (endpoint, stop)
}

/// Peers of a station whose directory lists the producer at `endpoints`, read from the file as a
/// bureau reads it.
fn peers(dir: &tempfile::TempDir, endpoints: &[String]) -> Peers {
    let path = DirectoryBuilder::new()
        .bureau(PRODUCER, Role::Issuance)
        .endpoints(endpoints.iter().cloned())
        .write_into(dir.path())
        .unwrap();
    Peers::new(DirectoryHandle::load(&path).unwrap(), Connector::plaintext())
}

async fn get_order(peers: &Peers) -> Result<String, Status> {
    let mut request = Request::new(pb::GetOrderRequest { order_id: "o-1".into(), ..Default::default() });
    request.set_timeout(Duration::from_secs(5));
    let answer = IssuanceClient::new(peers.channel(PRODUCER).unwrap()).get_order(request).await?;
    Ok(answer.into_inner().order.unwrap_or_default().order_id)
}

async fn place_order(peers: &Peers, key: Option<&str>) -> Result<String, Status> {
    let mut request = Request::new(pb::PlaceOrderRequest::default());
    request.set_timeout(Duration::from_secs(5));
    if let Some(key) = key {
        request.metadata_mut().insert("idempotency-key", key.parse().unwrap());
    }
    let answer = IssuanceClient::new(peers.channel(PRODUCER).unwrap()).place_order(request).await?;
    Ok(answer.into_inner().order.unwrap_or_default().order_id)
}

fn replica(name: &'static str, calls: &Calls) -> Replica {
    Replica { name, unavailable: false, delay: Duration::ZERO, calls: Arc::clone(calls) }
}

fn count(calls: &Calls, name: &str) -> usize {
    calls.lock().unwrap().get(name).map_or(0, Vec::len)
}

/// Replicas "a" and "b", both up, and the peers reaching them; dropping a sender stops its replica.
struct TwoUp {
    calls: Calls,
    peers: Peers,
    stop_a: tokio::sync::oneshot::Sender<()>,
    _stop_b: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn two_up() -> TwoUp {
    let calls = Calls::default();
    let (a, stop_a) = serve(replica("a", &calls)).await;
    let (b, stop_b) = serve(replica("b", &calls)).await;
    let dir = tempfile::tempdir().unwrap();
    let peers = peers(&dir, &[a, b]);
    TwoUp { calls, peers, stop_a, _stop_b: stop_b, _dir: dir }
}

#[tokio::test]
async fn both_endpoints_get_traffic_when_both_are_up() {
    let up = two_up().await;
    for i in 0..20 {
        let answer = if i % 2 == 0 { get_order(&up.peers).await } else { place_order(&up.peers, Some("k")).await };
        assert!(answer.is_ok(), "{answer:?}");
    }
    // Round robin: ten each.
    assert_eq!((count(&up.calls, "a"), count(&up.calls, "b")), (10, 10));
}

#[tokio::test]
async fn reads_and_keyed_writes_succeed_via_the_other_endpoint_when_one_is_a_closed_port() {
    let calls = Calls::default();
    let (up, _stop) = serve(replica("up", &calls)).await;
    let dir = tempfile::tempdir().unwrap();
    // The first call of fresh peers tries the closed port first. A connection never made sent
    // nothing: a write without a key moves on too.
    let closed = closed_endpoint();
    assert_eq!(place_order(&peers(&dir, &[closed.clone(), up.clone()]), None).await.unwrap(), "up");
    let peers = peers(&dir, &[closed, up]);
    for _ in 0..10 {
        assert_eq!(get_order(&peers).await.unwrap(), "up");
        assert_eq!(place_order(&peers, Some("k-1")).await.unwrap(), "up");
    }
    assert_eq!(count(&calls, "up"), 21);
}

#[tokio::test]
async fn reads_and_keyed_writes_move_on_from_unavailable_and_a_write_without_a_key_does_not() {
    let calls = Calls::default();
    let behind = Replica { unavailable: true, ..replica("behind", &calls) };
    let (behind, _stop_behind) = serve(behind).await;
    let (up, _stop_up) = serve(replica("up", &calls)).await;
    let dir = tempfile::tempdir().unwrap();

    // Fresh peers each time, so that the round robin starts at the replica that is behind.
    assert_eq!(get_order(&peers(&dir, &[behind.clone(), up.clone()])).await.unwrap(), "up");
    assert_eq!(place_order(&peers(&dir, &[behind.clone(), up.clone()]), Some("k-2")).await.unwrap(), "up");
    assert_eq!((count(&calls, "behind"), count(&calls, "up")), (2, 2));

    // It reached a server, which may have acted on it: UNAVAILABLE is the answer, nothing is repeated.
    let refused = place_order(&peers(&dir, &[behind.clone(), up.clone()]), None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!((count(&calls, "behind"), count(&calls, "up")), (3, 2));
    assert_eq!(calls.lock().unwrap()["behind"], [("GetOrder", false), ("PlaceOrder", true), ("PlaceOrder", false)]);

    // The replica that answered UNAVAILABLE is passed over by the next calls.
    let peers = peers(&dir, &[behind, up]);
    assert_eq!(place_order(&peers, Some("k-3")).await.unwrap(), "up");
    for _ in 0..5 {
        assert_eq!(place_order(&peers, None).await.unwrap(), "up");
    }
    assert_eq!(count(&calls, "behind"), 4);
}

#[tokio::test]
async fn a_call_ends_at_its_deadline_and_the_replica_that_let_it_pass_is_passed_over() {
    let calls = Calls::default();
    let slow = Replica { delay: Duration::from_millis(1500), ..replica("slow", &calls) };
    let (slow, _stop_slow) = serve(slow).await;
    let (up, _stop_up) = serve(replica("up", &calls)).await;
    let dir = tempfile::tempdir().unwrap();
    let peers = peers(&dir, &[slow, up]);
    let mut request = Request::new(pb::GetOrderRequest { order_id: "o-1".into(), ..Default::default() });
    request.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let late = IssuanceClient::new(peers.channel(PRODUCER).unwrap()).get_order(request).await.unwrap_err();
    // tonic's client ends a call at its deadline as CANCELLED ("Timeout expired").
    assert!(matches!(late.code(), Code::Cancelled | Code::DeadlineExceeded), "{late:?}");
    assert!(started.elapsed() < Duration::from_millis(1000), "{:?}", started.elapsed());
    assert_eq!(count(&calls, "up"), 0, "nothing is left of the deadline to try another replica");
    // Without the pass-over, every other call would wait 1.5 s for "slow".
    for _ in 0..4 {
        assert_eq!(get_order(&peers).await.unwrap(), "up");
    }
}

#[tokio::test]
async fn calls_keep_succeeding_when_an_endpoint_stops_mid_test() {
    let TwoUp { calls, peers, stop_a, _stop_b, _dir } = two_up().await;
    for _ in 0..4 {
        get_order(&peers).await.unwrap();
    }
    assert_eq!((count(&calls, "a"), count(&calls, "b")), (2, 2));

    stop_a.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..10 {
        assert_eq!(get_order(&peers).await.unwrap(), "b");
        assert_eq!(place_order(&peers, Some("k-4")).await.unwrap(), "b");
    }
    assert_eq!((count(&calls, "a"), count(&calls, "b")), (2, 22));
}
