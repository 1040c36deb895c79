//! Schema of the national loss registry: cards, loss reports, status events, hits, registration
//! transfers, the replicas' ordered log, audit log.
#![forbid(unsafe_code)]

pub use sea_orm_migration::prelude::*;
use yidi_audit::{ChainAuditLog, CreateAuditLog};
use yidi_idempotency::CreateIdempotentRequests;
use yidi_outbox::CreateOutbox;

mod m20261127_000001_create_cards;
mod m20261127_000002_create_loss_reports;
mod m20261127_000003_create_status_events;
mod m20261127_000004_create_hits;
mod m20261203_000005_add_card_station;
mod m20261203_000006_create_registration_transfers;
mod m20261203_000007_create_replica_feed;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateAuditLog),
            Box::new(m20261127_000001_create_cards::Migration),
            Box::new(m20261127_000002_create_loss_reports::Migration),
            Box::new(m20261127_000003_create_status_events::Migration),
            Box::new(m20261127_000004_create_hits::Migration),
            Box::new(ChainAuditLog),
            Box::new(CreateOutbox),
            Box::new(CreateIdempotentRequests),
            Box::new(m20261203_000005_add_card_station::Migration),
            Box::new(m20261203_000006_create_registration_transfers::Migration),
            Box::new(m20261203_000007_create_replica_feed::Migration),
        ]
    }
}
