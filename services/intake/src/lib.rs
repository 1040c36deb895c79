//! The accepting station at the place of residence (intake): takes applications and loss reports
//! in person, checks documents and the acceptance policy, and orchestrates verification (home
//! bureau) → registry → issuance → collection. It never decides who the applicant is.
#![forbid(unsafe_code)]

pub mod config;
mod entities;
mod grpc;
mod peers;
mod repo;
mod service;
mod worker;

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use yidi_common::{Clock, Shutdown};
use yidi_domain::{Role, SimulatedMatcher};
use yidi_intake_migration::{Migrator, MigratorTrait};
use yidi_proto::v1::intake_server::IntakeServer;

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
    let directory = yidi_common::directory::load(&config.directory.path)?;
    let station = directory
        .get_with_role(&config.server.bureau_id, Role::Intake)
        .with_context(|| {
            format!(
                "server.bureau_id: {:?} is not an intake bureau in the directory",
                config.server.bureau_id
            )
        })?;
    if directory
        .get_with_role(&config.station.producer_id, Role::Issuance)
        .is_none()
    {
        anyhow::bail!(
            "configuration key station.producer_id: {:?} is not an issuance bureau in the directory",
            config.station.producer_id
        );
    }
    let registry = directory
        .with_role(Role::Registry)
        .next()
        .context("the directory lists no registry bureau")?;
    let station = Station {
        id: station.id.clone(),
        region: station.region.clone(),
        producer_id: config.station.producer_id.clone(),
        registry_id: registry.id.clone(),
    };
    let clock = Clock::from_config(&config.clock)
        .map_err(|message| anyhow::anyhow!("configuration key clock: {message}"))?;

    let db = yidi_common::db::connect(&config.database)
        .await
        .context("database.url")?;
    Migrator::up(&db, None)
        .await
        .context("migrating the intake database")?;

    let (trigger, shutdown_handle) = Shutdown::new();
    let signal_task = trigger.trigger_on(shutdown);

    let matcher = SimulatedMatcher {
        face_threshold: config.biometrics.face_threshold,
        ..SimulatedMatcher::default()
    };
    let intake = Intake::new(IntakeParts {
        repo: Repo::new(db.clone()),
        clock,
        directory: Arc::new(directory),
        station,
        policy: config.policy.clone(),
        matcher: Arc::new(matcher),
        respond_within: Duration::from_millis(config.worker.respond_within_ms),
        shutdown: shutdown_handle.clone(),
    });
    let worker = tokio::spawn(worker::run(
        intake.clone(),
        Duration::from_millis(config.worker.tick_ms),
    ));

    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let served = yidi_common::server::serve(
        listener,
        IntakeServer::new(grpc::IntakeGrpc::new(intake)),
        shutdown_handle,
        grace,
    )
    .await;
    if served.is_err() {
        worker.abort();
        signal_task.abort();
    }
    let _ = worker.await;
    db.close().await?;
    served?;
    Ok(())
}
