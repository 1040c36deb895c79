//! Trust between bureaus: every port speaks mutual TLS, and a caller is whoever its certificate
//! (chained to the suite's CA) names, resolved through the directory.
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use yidi_demo::certs::{CertDir, CertificateAuthority};
use yidi_grpc::tls::TlsFiles;
use yidi_proto::v1::{self as pb, loss_registry_client::LossRegistryClient};
use yidi_status_filter::CardKey;
use yidi_tests::{
    Db, NATIONAL_DAY, card_check, on_both_databases, serial, start_tls,
    topology::{Process, RELYING_PARTY},
    walks,
};

on_both_databases!(
    replacement_end_to_end_over_mutual_tls,
    c4_a_relying_party_s_revocation_stream_and_snapshot_hold_no_serial_and_no_number,
    a_plaintext_client_on_a_mutual_tls_port_is_refused,
    a_certificate_from_another_ca_is_refused,
    a_valid_certificate_whose_id_is_not_in_the_directory_is_unauthenticated,
);

/// K1 over mutual TLS: the walk of `k1_replacement_across_provinces_end_to_end`, each bureau
/// presenting its own certificate, a relying party checking cards with its own.
async fn replacement_end_to_end_over_mutual_tls(db: Db) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    walks::replacement_across_provinces(&t).await?;
    t.stop().await
}

/// Issue 16 point 5: what a relying party receives about status (the revocation stream, the
/// snapshot) holds no serial and no identity number of the population, searched in their bytes;
/// the digest of the card reported lost lets a holder of its number and serial match the event.
async fn c4_a_relying_party_s_revocation_stream_and_snapshot_hold_no_serial_and_no_number(
    db: Db,
) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let mut bank = LossRegistryClient::new(t.channel_as(Process::Registry, RELYING_PARTY).await?);
    let citizen = t.citizen("replacement", "36")?;
    let digest = CardKey::new(&citizen.person.id_number, &serial(&citizen)).digest().to_vec();
    let mut revocations = bank.watch_revocations(pb::WatchRevocationsRequest { after_sequence: 0 }).await?.into_inner();
    t.report_loss(&citizen).await?;
    let mut received = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), revocations.message())
            .await
            .context("revocation stream stalled")??
            .context("stream ended")?;
        received.extend(event.encode_to_vec());
        if event.card_digest == digest && event.status == pb::CardStatus::ReportedLost as i32 {
            break;
        }
    }
    let mut chunks = bank.get_status_snapshot(pb::GetStatusSnapshotRequest::default()).await?.into_inner();
    let mut snapshot = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        snapshot.extend(chunk.data);
    }
    anyhow::ensure!(snapshot.len() > 100, "a snapshot of the population");
    for other in &t.suite.population.citizens {
        let mut secrets = vec![other.person.id_number.clone(), other.person.id_number[6..14].to_owned()];
        secrets.extend(other.card.as_ref().map(|card| card.serial.clone()));
        for secret in secrets {
            for (what, bytes) in [("revocation stream", &received), ("snapshot", &snapshot)] {
                let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
                anyhow::ensure!(!found, "{secret} is in the relying party's {what}");
            }
        }
    }
    t.stop().await
}

/// The outcome of a health check over `channel` (a transport failure surfaces as a status too).
async fn health(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let answer = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    Ok(ServingStatus::try_from(answer.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

/// A call the transport refused: the connection failed (TLS handshake, or TLS against plain
/// HTTP/2), so the status comes from the client's transport, never from a server's answer. Which
/// code the client reports depends on how the connection died (UNAVAILABLE, INTERNAL for a TLS
/// alert read as HTTP/2, CANCELLED for a connection closed after the handshake).
fn assert_refused_by_transport(status: &tonic::Status, what: &str) {
    let transport = std::error::Error::source(status).and_then(|e| e.downcast_ref::<tonic::transport::Error>());
    assert!(transport.is_some(), "{what}: expected a transport failure, got an answer: {status:?}");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Internal | Code::Cancelled | Code::Unknown),
        "{what}: {status:?}"
    );
}

/// A lazy channel (so that a refused handshake shows as the call's status, not a connect error).
fn lazy(endpoint: tonic::transport::Endpoint) -> Channel {
    endpoint.timeout(Duration::from_secs(10)).connect_timeout(Duration::from_secs(5)).connect_lazy()
}

async fn a_plaintext_client_on_a_mutual_tls_port_is_refused(db: Db) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    for process in Process::ALL {
        let plaintext = format!("http://127.0.0.1:{}", t.suite.ports[&process]);
        let refused = health(lazy(Channel::from_shared(plaintext)?)).await;
        let status = refused.expect_err("a plaintext client gets no answer from an mTLS port");
        assert_refused_by_transport(&status, &format!("plaintext to {process:?}"));
        // The same port answers a client with a certificate of the CA.
        assert_eq!(health(t.channel(process).await?).await?, ServingStatus::Serving, "{process:?}");
    }
    t.stop().await
}

async fn a_certificate_from_another_ca_is_refused(db: Db) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    // Another CA issues a certificate naming a real bureau: the name alone proves nothing.
    let other = CertificateAuthority::generate()?;
    let (cert, key) = other.issue(Process::Intake.bureau_id())?;
    let suite_ca = std::fs::read(t.suite.certs().ca_pem())?;
    let impostor = TlsFiles::from_pem(suite_ca, cert, key);
    for process in [Process::Registry, Process::HomeJiangxi] {
        let refused = health(lazy(t.suite.endpoint_with(process, &impostor)?)).await;
        let status = refused.expect_err("a certificate of another CA is refused in the handshake");
        assert_refused_by_transport(&status, &format!("another CA's certificate to {process:?}"));
    }
    let citizen = t.ordinary("36", 0)?;
    let mut registry = LossRegistryClient::new(lazy(t.suite.endpoint_with(Process::Registry, &impostor)?));
    let check = card_check(&citizen, serial(&citizen), RELYING_PARTY);
    let refused = registry.check_card(check).await.expect_err("no answer to an impostor");
    assert_refused_by_transport(&refused, "CheckCard with another CA's certificate");
    // A client that trusts only the other CA refuses the bureau's server certificate in turn.
    let (bank_cert, bank_key) = other.issue(RELYING_PARTY)?;
    let misled = TlsFiles::from_pem(other.pem(), bank_cert, bank_key);
    let refused = health(lazy(t.suite.endpoint_with(Process::Registry, &misled)?)).await;
    assert_refused_by_transport(
        &refused.expect_err("the registry's certificate is not of the other CA"),
        "a client trusting only the other CA",
    );
    t.stop().await
}

async fn a_valid_certificate_whose_id_is_not_in_the_directory_is_unauthenticated(db: Db) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    // Issued by the suite's own CA (so the handshake succeeds) for an id the directory lacks.
    let stranger = "bank-unlisted";
    let certs: CertDir = t.suite.certs();
    CertificateAuthority::read(&certs)?.issue_into(&certs, stranger)?;
    let citizen = t.citizen("replacement", "36")?;
    let mut registry = LossRegistryClient::new(t.channel_as(Process::Registry, stranger).await?);
    let refused = registry
        .check_card(card_check(&citizen, serial(&citizen), stranger))
        .await
        .expect_err("an identity the directory does not know is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains(stranger), "the refusal names the id: {}", refused.message());

    // Health and reflection sit behind the same check.
    let health = health(t.channel_as(Process::Registry, stranger).await?).await;
    assert_eq!(health.expect_err("health needs a known caller too").code(), Code::Unauthenticated);

    // The same certificate file set for a listed principal works.
    let mut bank = LossRegistryClient::new(t.channel_as(Process::Registry, RELYING_PARTY).await?);
    let answer = bank.check_card(card_check(&citizen, serial(&citizen), RELYING_PARTY)).await?.into_inner();
    assert_eq!(answer.status, pb::CardStatus::Valid as i32);
    t.stop().await
}
