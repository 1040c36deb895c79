//! The access matrix, enforced on every port of a mutual-TLS suite (the real binaries): every kind
//! of principal calls every RPC of every service. A call the matrix denies is refused with
//! PERMISSION_DENIED (ErrorInfo `ROLE_MISSING`, naming the role that was missing) before the
//! service sees it; a call it admits is never refused for want of a role. Each denial is in the
//! serving bureau's audit trail.
use anyhow::Context;
use prost::Message;
use prost_types::FileDescriptorSet;
use tonic::Code;
use tonic_types::StatusExt;
use yidi_domain::OperatorAccess;
use yidi_grpc::{access, caller::Caller};
use yidi_proto::v1::{self as pb, audit_client::AuditClient};
use yidi_runtime::directory::DirectoryFile;
use yidi_tests::{
    Db, NATIONAL_DAY, on_both_databases,
    raw::call,
    start_tls,
    topology::{HOME_JIANGXI, HOME_SICHUAN, PRODUCER, Process, RELYING_PARTY, STATION, operator_id},
};

on_both_databases!(
    every_forbidden_role_and_rpc_pair_is_refused_and_every_granted_one_passes,
    s4_a_station_is_refused_when_it_verifies_in_another_stations_name,
    c4_a_home_bureau_is_refused_reading_another_bureaus_hits,
);

/// PERMISSION_DENIED with ErrorInfo `NOT_IN_OWN_NAME`.
fn not_in_own_name(status: &tonic::Status) -> bool {
    status.code() == Code::PermissionDenied
        && status.get_error_details().error_info().is_some_and(|info| info.reason == "NOT_IN_OWN_NAME")
}

async fn s4_a_station_is_refused_when_it_verifies_in_another_stations_name(db: Db) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let mut home = pb::verification_client::VerificationClient::new(t.channel_as(Process::HomeJiangxi, STATION).await?);
    let request = pb::VerifyRequest { station_id: "station-ningbo".into(), ..Default::default() };
    let status = home.verify(request).await.expect_err("verifying in another station's name");
    assert!(not_in_own_name(&status), "{status:?}");
    let close = pb::CloseApplicationRequest { station_id: "station-ningbo".into(), ..Default::default() };
    let status = home.close_application(close).await.expect_err("closing in another station's name");
    assert!(not_in_own_name(&status), "{status:?}");
    t.stop().await
}

async fn c4_a_home_bureau_is_refused_reading_another_bureaus_hits(db: Db) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let mut registry =
        pb::loss_registry_client::LossRegistryClient::new(t.channel_as(Process::Registry, HOME_SICHUAN).await?);
    let theirs = pb::ListHitsRequest { home_bureau_id: HOME_JIANGXI.into(), ..Default::default() };
    let status = registry.list_hits(theirs).await.expect_err("reading another bureau's hits");
    assert!(not_in_own_name(&status), "{status:?}");
    let own = pb::ListHitsRequest { home_bureau_id: HOME_SICHUAN.into(), ..Default::default() };
    registry.list_hits(own).await?;
    t.stop().await
}

async fn every_forbidden_role_and_rpc_pair_is_refused_and_every_granted_one_passes(db: Db) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let directory =
        DirectoryFile::read(&t.suite.dir.join("directory.toml"))?.to_directory().map_err(anyhow::Error::msg)?;
    let descriptors = FileDescriptorSet::decode(yidi_proto::FILE_DESCRIPTOR_SET)?;
    let services = [
        (Process::Intake, "yidi.v1.Intake"),
        (Process::HomeJiangxi, "yidi.v1.Verification"),
        (Process::Issuance, "yidi.v1.Issuance"),
        (Process::Registry, "yidi.v1.LossRegistry"),
    ];
    let (mut denied, mut granted) = (0, 0);
    for (process, service_name) in services {
        let serving = process.bureau_id();
        // One principal of every kind: each bureau role, a relying party, both operators of the
        // serving bureau and an admin operator of another one.
        let other_bureau = if process == Process::Registry { Process::Intake } else { Process::Registry };
        let principals = [
            Process::Intake.bureau_id().to_owned(),
            Process::HomeJiangxi.bureau_id().to_owned(),
            PRODUCER.to_owned(),
            Process::Registry.bureau_id().to_owned(),
            RELYING_PARTY.to_owned(),
            operator_id(serving, OperatorAccess::Read),
            operator_id(serving, OperatorAccess::Admin),
            operator_id(other_bureau.bureau_id(), OperatorAccess::Admin),
        ];
        let mut methods: Vec<(String, bool)> = descriptors
            .file
            .iter()
            .filter(|file| file.package() == "yidi.v1")
            .flat_map(|file| &file.service)
            .filter(|service| {
                let full = format!("yidi.v1.{}", service.name());
                full == service_name || full == "yidi.v1.Audit"
            })
            .flat_map(|service| {
                service
                    .method
                    .iter()
                    .map(move |m| (format!("/yidi.v1.{}/{}", service.name(), m.name()), m.server_streaming()))
            })
            .collect();
        methods.push(("/grpc.health.v1.Health/Check".into(), false));
        anyhow::ensure!(methods.len() > 3, "{service_name} has methods in the descriptor set");
        for principal_id in &principals {
            let principal =
                directory.principal(principal_id).with_context(|| format!("{principal_id} in the directory"))?;
            let caller = Caller { principal };
            let channel = t.channel_as(process, principal_id).await?;
            for (path, streaming) in &methods {
                let status = call(&channel, path, Vec::new(), *streaming).await;
                let role_missing = status.code() == Code::PermissionDenied
                    && status.get_error_details().error_info().is_some_and(|info| info.reason == "ROLE_MISSING");
                match access::check(path, Some(&caller), serving) {
                    Err(denial) => {
                        assert!(
                            role_missing,
                            "{principal_id} → {serving} {path}: expected ROLE_MISSING, got {status:?}"
                        );
                        assert_eq!(status.message(), denial.message(), "{principal_id} → {path}");
                        denied += 1;
                    }
                    Ok(()) => {
                        assert!(
                            !role_missing && status.code() != Code::Unauthenticated,
                            "{principal_id} → {serving} {path}: granted by the matrix, refused: {status:?}"
                        );
                        granted += 1;
                    }
                }
            }
        }
    }
    assert!(denied > 100 && granted > 20, "{denied} denied and {granted} granted calls were tried");

    // Each denial is in the serving bureau's audit trail (written behind the answer: poll).
    for (process, _) in services {
        let channel = t.channel_as(process, &operator_id(process.bureau_id(), OperatorAccess::Read)).await?;
        let mut audit = AuditClient::new(channel);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let page = audit.list_audit_entries(pb::ListAuditEntriesRequest { page_size: 500, ..Default::default() });
            let entries = page.await?.into_inner().entries;
            let denials: Vec<_> = entries.iter().filter(|e| e.action == "denied_call").collect();
            if denials.iter().any(|e| e.subject == RELYING_PARTY || e.subject.starts_with("op-")) {
                assert!(denials.iter().all(|e| e.outcome == "PERMISSION_DENIED"), "{denials:?}");
                break;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "{process:?}: no denied_call in the audit trail");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    t.stop().await
}
