//! Schema of the verification service (a home bureau's register, its verifications and audit log).
//! Works on SQLite and PostgreSQL: built with sea-query's schema builder only.
#![forbid(unsafe_code)]

pub use sea_orm_migration::prelude::*;
use yidi_audit::{ChainAuditLog, CreateAuditLog};
use yidi_idempotency::CreateIdempotentRequests;
use yidi_outbox::CreateOutbox;

mod m20261127_000001_create_citizens;
mod m20261127_000002_create_verifications;
mod m20261203_000003_create_early_closes;
mod m20261204_000004_index_open_marks;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateAuditLog),
            Box::new(m20261127_000001_create_citizens::Migration),
            Box::new(m20261127_000002_create_verifications::Migration),
            Box::new(ChainAuditLog),
            Box::new(CreateOutbox),
            Box::new(CreateIdempotentRequests),
            Box::new(m20261203_000003_create_early_closes::Migration),
            Box::new(m20261204_000004_index_open_marks::Migration),
        ]
    }
}
