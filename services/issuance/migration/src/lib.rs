//! Schema of the issuance service (the entrusted producer): `orders` and `audit_log`.
#![forbid(unsafe_code)]

pub use sea_orm_migration::prelude::*;
use yidi_audit::{ChainAuditLog, CreateAuditLog};
use yidi_idempotency::CreateIdempotentRequests;
use yidi_outbox::CreateOutbox;

mod m20261127_000001_create_orders;
mod m20261127_000002_add_order_trace_context;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateAuditLog),
            Box::new(m20261127_000001_create_orders::Migration),
            Box::new(m20261127_000002_add_order_trace_context::Migration),
            Box::new(ChainAuditLog),
            Box::new(CreateOutbox),
            Box::new(CreateIdempotentRequests),
        ]
    }
}
