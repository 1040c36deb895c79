//! The national loss registry (S1, S4, C2, C4, K6): records loss reports and issued cards and
//! answers "is this card valid?" for every relying party.
#![forbid(unsafe_code)]

pub mod config;
mod entities;
mod grpc;
mod repo;
mod service;

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use yidi_common::{Clock, Shutdown, population::Population};
use yidi_domain::Role;
use yidi_proto::v1::loss_registry_server::LossRegistryServer;
use yidi_registry_migration::Migrator;
use yidi_registry_migration::MigratorTrait;

use crate::{config::RegistryConfig, grpc::RegistryGrpc, repo::Repo, service::Registry};

/// Largest gRPC message accepted: a full CheckCards batch fits comfortably.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Runs the registry on `listener` until `shutdown` resolves.
pub async fn serve(
    config: RegistryConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let (trigger, stop) = Shutdown::new();
    trigger.trigger_on(shutdown);

    let directory = yidi_common::directory::load(&config.directory.path)?;
    let bureau_id = config.server.bureau_id.clone();
    if directory.get_with_role(&bureau_id, Role::Registry).is_none() {
        anyhow::bail!("configuration key server.bureau_id: {bureau_id:?} is not a registry bureau in the directory");
    }
    let clock = Clock::from_config(&config.clock).map_err(|e| anyhow::anyhow!("configuration key clock: {e}"))?;

    let db = yidi_common::db::connect(&config.database).await.context("database")?;
    Migrator::up(&db, None).await.context("database migration")?;
    let repo = Repo::new(db);
    let registry = Arc::new(Registry::new(repo.clone(), Arc::new(directory), clock, bureau_id, stop.clone()));

    if let Some(path) = &config.import.path {
        let population = Population::read(path)?;
        let imported = registry.import(&population).await.map_err(|e| anyhow::anyhow!("import: {e}"))?;
        tracing::info!(imported, path = %path.display(), "legacy cards imported");
    }

    let server =
        LossRegistryServer::new(RegistryGrpc::new(Arc::clone(&registry))).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let served = yidi_common::server::serve(listener, server, stop, grace).await;
    drop(registry);
    repo.close().await.context("closing the database")?;
    served?;
    Ok(())
}
