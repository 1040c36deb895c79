//! Schema of the intake station's database (SQLite or PostgreSQL).
#![forbid(unsafe_code)]

pub use sea_orm_migration::prelude::*;
use yidi_audit::{ChainAuditLog, CreateAuditLog};
use yidi_idempotency::CreateIdempotentRequests;
use yidi_outbox::CreateOutbox;

mod m20261127_000001_create_applications;
mod m20261127_000002_create_application_events;
mod m20261127_000003_add_application_trace_context;
mod m20261127_000004_add_application_request_key;
mod m20261203_000005_drop_unused_application_columns;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateAuditLog),
            Box::new(m20261127_000001_create_applications::Migration),
            Box::new(m20261127_000002_create_application_events::Migration),
            Box::new(m20261127_000003_add_application_trace_context::Migration),
            Box::new(ChainAuditLog),
            Box::new(CreateOutbox),
            Box::new(CreateIdempotentRequests),
            // Appended: databases migrated before it run it last.
            Box::new(m20261127_000004_add_application_request_key::Migration),
            Box::new(m20261203_000005_drop_unused_application_columns::Migration),
        ]
    }
}
