//! The accepting station at the place of residence (intake): takes applications and loss reports
//! in person, checks documents and the acceptance policy, and orchestrates verification (home
//! bureau) → registry → issuance → collection. It never decides who the applicant is.
#![forbid(unsafe_code)]

pub mod config;
mod entities;
mod grpc;
mod handlers;
mod peers;
mod repo;
mod service;
mod topic;
mod watchers;
mod withdrawal;

use std::{future::Future, sync::Arc, time::Duration};
use yidi_bureau::BureauConfig;

use anyhow::Context;
use yidi_bureau::startup::{self, Prepared};
use yidi_domain::{Role, SimulatedMatcher};
use yidi_grpc::overload::MAX_REQUEST_BYTES;
use yidi_intake_migration::Migrator;
use yidi_outbox::Dispatcher;
use yidi_proto::v1::intake_server::IntakeServer;
use yidi_runtime::config::ConfigError;

use crate::{
    config::IntakeConfig,
    repo::Repo,
    service::{Intake, IntakeParts, Station},
};

/// Runs the intake service on `listener` until `shutdown` resolves.
pub async fn serve(
    config: IntakeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let sections = config.sections();
    let prepared = startup::prepare::<Migrator, _, _>(
        sections,
        Role::Intake,
        listener,
        shutdown,
        |directory, station, connector| {
            if directory.get_with_role(&config.station.producer_id, Role::Issuance).is_none() {
                anyhow::bail!(
                    "configuration key station.producer_id: {:?} is not an issuance bureau in the directory",
                    config.station.producer_id
                );
            }
            let registry =
                directory.with_role(Role::Registry).next().context("the directory lists no registry bureau")?;
            // Every bureau the station calls must be reachable the way `[tls]` says (https with
            // mutual TLS, http in plaintext): a mismatch is a configuration error, not an outage.
            for role in [Role::Verification, Role::Issuance, Role::Registry] {
                for bureau in directory.with_role(role) {
                    connector.channel(bureau).map_err(|e| ConfigError::key("directory.path", e.to_string()))?;
                }
            }
            Ok(Station {
                id: station.id.clone(),
                region: station.region.clone(),
                producer_id: config.station.producer_id.clone(),
                registry_id: registry.id.clone(),
            })
        },
    )
    .await?;
    let Prepared { directory, connector, clock, db, shutdown, signal, server, checked: station, outbox_wake, .. } =
        prepared;

    let matcher = SimulatedMatcher { face_threshold: config.biometrics.face_threshold, ..SimulatedMatcher::default() };
    let intake = Intake::new(IntakeParts {
        repo: Repo::new(db.clone()),
        clock,
        directory,
        connector,
        station,
        policy: config.policy.clone(),
        matcher: Arc::new(matcher),
        respond_within: Duration::from_millis(config.worker.respond_within_ms),
        shutdown: shutdown.clone(),
        wake: Arc::clone(&outbox_wake),
        call_timeout: config.outbox.call_timeout(),
        order_poll_after: Duration::from_millis(config.worker.order_poll_after_ms),
    });
    let dispatcher =
        Dispatcher::new(db.clone(), Arc::new(intake.clone()), config.outbox.clone(), outbox_wake, shutdown.clone());
    let worker = tokio::spawn(dispatcher.run());

    let service = IntakeServer::new(grpc::IntakeGrpc::new(intake)).max_decoding_message_size(MAX_REQUEST_BYTES);
    let served = server.serve(service).await;
    if served.is_err() {
        worker.abort();
        signal.abort();
    }
    let _ = worker.await;
    db.close().await?;
    served?;
    Ok(())
}
