//! The national loss registry (S1, S4, C2, C4, K6): records loss reports and issued cards and
//! answers "is this card valid?" for every relying party.
#![forbid(unsafe_code)]

pub mod config;
mod entities;
mod feed;
mod grpc;
mod index;
mod limit;
mod repo;
mod service;
mod snapshot;
mod statements;

use std::{future::Future, sync::Arc};
use yidi_bureau::BureauConfig;

use anyhow::Context;
use yidi_bureau::startup::{self, Prepared};
use yidi_domain::{Bureau, Directory, Role};
use yidi_proto::v1::loss_registry_server::LossRegistryServer;
use yidi_registry_migration::Migrator;
use yidi_runtime::{Clock, config::ConfigError, population::Population, signing::KeyRing};

use crate::{
    config::RegistryConfig,
    grpc::RegistryGrpc,
    limit::MissBudgets,
    repo::Repo,
    service::{Checks, Registry, ReplicaSettings},
};

/// Largest gRPC message accepted: a full CheckCards batch fits comfortably.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Runs the registry on `listener` until `shutdown` resolves.
pub async fn serve(
    config: RegistryConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let sections = config.sections();
    let now = Clock::from_config(&config.clock).map_err(|message| ConfigError::key("clock", message))?.now();
    let check_keys = |directory: &Directory, bureau: &Bureau, _: &yidi_grpc::client::Connector| {
        let keys = KeyRing::load(bureau.id.clone(), config.signing.clone()).context("signing.keys")?;
        let active = keys.check(directory, now).context("signing.keys")?;
        tracing::info!(key_id = %active.id, held = ?keys.held_ids(), "status signing keys loaded");
        Ok(Arc::new(keys))
    };
    let Prepared { directory, clock, db, shutdown: stop, server, checked: keys, .. } =
        startup::prepare::<Migrator, _, _>(sections, Role::Registry, listener, shutdown, check_keys).await?;
    keys.spawn_reloader(config.directory.reload_every(), stop.clone());
    let limiter = MissBudgets::new(config.registry.check_misses_per_minute, &db);
    let repo = Repo::new(db);
    let bureau_id = config.server.bureau_id.clone();
    let loading = std::time::Instant::now();
    // Read before the cards: the index then holds every entry up to it, perhaps more.
    let head = feed::head(repo.db()).await.context("reading the head of the registry's log")?;
    let index = repo.load_index().await.context("loading the card index")?;
    tracing::info!(
        cards = index.len(),
        bytes = index.heap_bytes(),
        seconds = loading.elapsed().as_secs_f64(),
        "card index loaded"
    );
    let replica = ReplicaSettings {
        id: match config.registry.replica_id.as_str() {
            "" => feed::default_replica_id(),
            id => id.to_owned(),
        },
        fence: std::time::Duration::from_millis(config.registry.fence_after_ms),
        poll: std::time::Duration::from_millis(config.registry.feed_poll_ms),
    };
    let replica_id = replica.id.clone();
    let snapshot_sources = snapshot::Sources {
        repo: repo.clone(),
        clock: clock.clone(),
        keys: Arc::clone(&keys),
        directory: directory.clone(),
        bureau_id: config.server.bureau_id.clone(),
    };
    let snapshots = Arc::new(snapshot::Snapshots::new(snapshot_sources, config.registry.snapshot_settings()));
    let registry = Arc::new(Registry::new(
        repo.clone(),
        (index, head.sequence),
        directory.clone(),
        clock,
        bureau_id,
        stop.clone(),
        Checks {
            keys,
            limiter,
            collection_deadline: chrono::Duration::days(i64::from(config.registry.collection_deadline_days)),
            statements: statements::StatementCache::new(config.registry.statement_cache_entries),
            statement_validity: chrono::Duration::seconds(
                i64::try_from(config.registry.statement_validity_seconds).unwrap_or(i64::MAX),
            ),
        },
        replica,
    ));
    registry.join().await.context("catching up with the registry's log")?;
    tracing::info!(replica = %replica_id, applied = registry.freshness().applied(), "replica following the log");
    let follower = Arc::clone(&registry).spawn_follower();
    let health = server.health();
    let freshness = registry.freshness();
    health.set_ready_check(move || freshness.fresh_at(std::time::Instant::now()).is_some());
    // Health `Watch` streams hear of it too, a quarter of the bound late at most.
    let freshness = registry.freshness();
    let every = std::time::Duration::from_millis(config.registry.fence_after_ms / 4);
    let watched = stop.clone();
    let health_watch = tokio::spawn(async move {
        loop {
            health.set_behind(freshness.fresh_at(std::time::Instant::now()).is_none());
            tokio::select! {
                () = watched.wait() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    let sweep_every = std::time::Duration::from_secs(config.registry.void_sweep_every_seconds);
    let sweeper = Arc::clone(&registry).spawn_void_sweeper(sweep_every, stop.clone());

    if let Some(path) = &config.import.path {
        let population = Population::read(path)?;
        let imported = registry.import(&population).await.map_err(|e| anyhow::anyhow!("import: {e}"))?;
        tracing::info!(imported, path = %path.display(), "legacy cards imported");
    }

    // After the import, so that the first snapshot holds the imported cards.
    let snapshot_maker = Arc::clone(&snapshots).spawn(stop.clone());
    let service = LossRegistryServer::new(RegistryGrpc::new(Arc::clone(&registry), snapshots))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let served = server.serve(service).await;
    // Stopped like any transaction cut short: an unfinished void rolls back.
    sweeper.abort();
    health_watch.abort();
    // It ends at shutdown, leaving the replicas; a server that stopped otherwise stops it here.
    let mut follower = follower;
    if tokio::time::timeout(std::time::Duration::from_secs(2), &mut follower).await.is_err() {
        follower.abort();
    }
    snapshot_maker.abort();
    drop(registry);
    repo.close().await.context("closing the database")?;
    served?;
    Ok(())
}
