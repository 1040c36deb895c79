//! The national loss registry (S1, S4, C2, C4, K6): records loss reports and issued cards and
//! answers "is this card valid?" for every relying party.
#![forbid(unsafe_code)]

pub mod config;
mod entities;
mod grpc;
mod index;
mod repo;
mod service;

use std::{future::Future, sync::Arc};

use anyhow::Context;
use yidi_common::{
    population::Population,
    startup::{self, Prepared, Sections},
};
use yidi_domain::Role;
use yidi_proto::v1::loss_registry_server::LossRegistryServer;
use yidi_registry_migration::Migrator;

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
    let sections = Sections {
        server: &config.server,
        database: &config.database,
        directory: &config.directory,
        clock: &config.clock,
        tls: &config.tls,
    };
    let Prepared { directory, clock, db, shutdown: stop, server, .. } =
        startup::prepare::<Migrator, _, _>(sections, Role::Registry, listener, shutdown, |_, _, _| Ok(())).await?;
    let repo = Repo::new(db);
    let bureau_id = config.server.bureau_id.clone();
    let loading = std::time::Instant::now();
    let index = repo.load_index().await.context("loading the card index")?;
    tracing::info!(cards = index.len(), seconds = loading.elapsed().as_secs_f64(), "card index loaded");
    let registry = Arc::new(Registry::new(repo.clone(), index, Arc::new(directory), clock, bureau_id, stop.clone()));

    if let Some(path) = &config.import.path {
        let population = Population::read(path)?;
        let imported = registry.import(&population).await.map_err(|e| anyhow::anyhow!("import: {e}"))?;
        tracing::info!(imported, path = %path.display(), "legacy cards imported");
    }

    let service =
        LossRegistryServer::new(RegistryGrpc::new(Arc::clone(&registry))).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let served = server.serve(service).await;
    drop(registry);
    repo.close().await.context("closing the database")?;
    served?;
    Ok(())
}
