//! yidi-issuance: the entrusted producer. Makes and issues a card only for a decision signed by
//! the citizen's home bureau (S4), keeps the card data verbatim, registers each card with the
//! national registry and dispatches it to the accepting station.
#![forbid(unsafe_code)]

pub mod config;
mod entities;
mod grpc;
mod order;
mod outbox;
mod repo;
mod service;

use std::{future::Future, sync::Arc, time::Duration};
use yidi_bureau::BureauConfig;

use anyhow::Context;
use yidi_bureau::startup::{self, Prepared};
use yidi_domain::Role;
use yidi_grpc::{client::Peers, overload::MAX_REQUEST_BYTES};
use yidi_issuance_migration::Migrator;
use yidi_outbox::{Dispatcher, bring_forward};
use yidi_proto::v1::issuance_server::IssuanceServer;
use yidi_runtime::{Shutdown, config::ConfigError};

use crate::{
    config::IssuanceConfig,
    grpc::IssuanceGrpc,
    order::OrderEvents,
    outbox::{Production, Registrar, Topic},
    repo::Repo,
    service::{IssuanceParts, IssuanceService},
};

/// Runs the service on `listener` until `shutdown` resolves.
pub async fn serve(
    config: IssuanceConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let sections = config.sections();
    let prepared =
        startup::prepare::<Migrator, _, _>(sections, Role::Issuance, listener, shutdown, |directory, _, connector| {
            let registry = config.registry(directory)?.clone();
            // The registry must be reachable the way `[tls]` says; its channel follows the directory.
            connector.channel(&registry).map_err(|e| ConfigError::key("directory.path", e.to_string()))?;
            Ok(registry)
        })
        .await?;
    let Prepared {
        directory, connector, clock, db, shutdown: stop, server, grace, checked: registry, outbox_wake, ..
    } = prepared;
    let peers = Peers::new(directory.clone(), connector);

    let events = OrderEvents::default();
    let production = Production {
        repo: Repo::new(db.clone()),
        clock: clock.clone(),
        bureau_id: config.server.bureau_id.clone(),
        events: events.clone(),
    };
    let service = Arc::new(IssuanceService::new(IssuanceParts {
        repo: Repo::new(db.clone()),
        directory,
        clock,
        bureau_id: config.server.bureau_id.clone(),
        serial_prefix: config.production.serial_prefix.clone(),
        delay: Duration::from_millis(config.production.delay_ms),
        registry_id: registry.id.clone(),
        wake: Arc::clone(&outbox_wake),
        events,
    }));
    // Production takes at most `production.delay_ms` from now, whatever it was when an order was
    // placed: a restart with a shorter delay (or a clock set back) cannot stall older orders.
    let latest = chrono::Utc::now() + chrono::Duration::milliseconds(config.production.delay_ms as i64);
    bring_forward(&db, Topic::RegisterCard.as_str(), latest).await.context("rescheduling registrations")?;
    let registrar = Registrar::new(production, peers, registry.id.clone(), config.outbox.call_timeout());
    let dispatcher = Dispatcher::new(db.clone(), Arc::new(registrar), config.outbox.clone(), outbox_wake, stop.clone());
    let worker = tokio::spawn(dispatcher.run());
    tracing::info!(
        bureau_id = %config.server.bureau_id,
        registry = %registry.id,
        delay_ms = config.production.delay_ms,
        "issuance starting"
    );

    let grpc = IssuanceGrpc::new(service, stop.clone());
    let served = server.serve(IssuanceServer::new(grpc).max_decoding_message_size(MAX_REQUEST_BYTES)).await;

    finish_worker(worker, &stop, grace).await;
    db.close().await.context("closing the database")?;
    served.context("gRPC server")?;
    Ok(())
}

/// Waits for the worker to notice the shutdown; aborts it if the server ended for another reason.
async fn finish_worker(worker: tokio::task::JoinHandle<()>, stop: &Shutdown, grace: Duration) {
    if !stop.is_triggered() {
        worker.abort();
        let _ = worker.await;
        return;
    }
    let abort = worker.abort_handle();
    if tokio::time::timeout(grace, worker).await.is_err() {
        abort.abort();
    }
}
