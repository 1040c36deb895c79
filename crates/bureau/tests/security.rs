use std::{sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tokio::net::TcpListener;
use tonic::{Code, Request as GrpcRequest, Response as GrpcResponse, Status, transport::Endpoint};
use yidi_domain::{Bureau, Directory, Operator, OperatorAccess, RelyingParty, Role};
use yidi_proto::v1::{self as pb, issuance_client::IssuanceClient, issuance_server::IssuanceServer};
use yidi_testkit::fake::{FakeIssuance, IssuanceFake, issuance_server};

use yidi_bureau::server;
use yidi_grpc::security::*;
use yidi_grpc::{
    caller::caller_of,
    tls::{TlsFiles, Transport},
};
use yidi_runtime::shutdown::Shutdown;

/// `GetOrder` answers NOT_FOUND with the caller the layer inserted as message.
#[derive(Debug, Clone, Default)]
struct WhoCalls;

#[tonic::async_trait]
impl IssuanceFake for WhoCalls {
    async fn get_order(
        &self,
        request: GrpcRequest<pb::GetOrderRequest>,
    ) -> Result<GrpcResponse<pb::GetOrderResponse>, Status> {
        let caller = caller_of(request.extensions()).map(|caller| format!("{:?}", caller.principal));
        Err(Status::not_found(caller.unwrap_or_else(|| "nobody".into())))
    }
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let pem = params.self_signed(&key).unwrap().pem();
        Self { issuer: Issuer::new(params, key), pem }
    }

    fn files(&self, id: &str) -> TlsFiles {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![id.to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap().pem();
        TlsFiles::from_pem(self.pem.clone(), cert, key.serialize_pem())
    }
}

fn directory() -> Directory {
    let bureau = |id: &str, role| Bureau::new(id, role).with_name(id);
    Directory::new(vec![bureau("producer", Role::Issuance), bureau("station", Role::Intake)])
        .unwrap()
        .with_principals(
            vec![RelyingParty { id: "bank".into(), name: String::new() }],
            vec![Operator { id: "op-read".into(), bureau_id: "producer".into(), access: OperatorAccess::Read }],
        )
        .unwrap()
}

#[tokio::test]
async fn the_caller_is_the_directory_principal_its_certificate_names() {
    let ca = Ca::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let security =
        ServerSecurity::new(Transport::MutualTls(Arc::new(ca.files("producer"))), Arc::new(directory()), "producer");
    let (trigger, shutdown) = Shutdown::new();
    let starting = server::start::<IssuanceServer<FakeIssuance<WhoCalls>>>(
        listener,
        &security,
        shutdown,
        Duration::from_secs(5),
        Default::default(),
    )
    .unwrap();
    let serving = tokio::spawn(starting.serve(issuance_server(WhoCalls)));

    let ask_as = |id: &str| {
        let tls = ca.files(id).client_config("producer");
        let channel = Endpoint::from_shared(format!("https://{address}")).unwrap().tls_config(tls).unwrap();
        async move {
            let request = pb::GetOrderRequest { order_id: "order-1".into(), ..Default::default() };
            IssuanceClient::new(channel.connect_lazy()).get_order(request).await.unwrap_err()
        }
    };
    let answer = ask_as("station").await;
    assert_eq!((answer.code(), answer.message()), (Code::NotFound, r#"Bureau { id: "station", role: Intake }"#));
    // The access matrix, behind the identity layer, refuses the bank the producer's orders,
    // naming it as what its certificate made it: a relying party.
    let bank = ask_as("bank").await;
    assert_eq!(bank.code(), Code::PermissionDenied);
    assert!(bank.message().ends_with("bank is a relying party"), "{bank:?}");
    let operator = ask_as("op-read").await;
    assert!(operator.message().starts_with(r#"Operator { id: "op-read", bureau_id: "producer""#), "{operator:?}");
    let stranger = ask_as("stranger").await;
    assert_eq!(stranger.code(), Code::Unauthenticated);
    assert!(stranger.message().contains("\"stranger\" is not in the directory"), "{stranger:?}");

    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(5), serving).await.unwrap().unwrap().unwrap();
}
