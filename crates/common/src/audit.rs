//! The audit log every service keeps: one `audit_log` table, one entity, one way to append a row,
//! one migration that creates it.
//!
//! One row per decision, refusal and state change. `subject` is a masked identity number or a card
//! serial, never a full number or a name.
use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::NotSet, Set, entity::prelude::*};
use sea_orm_migration::prelude::{ColumnDef, Index, MigrationName, MigrationTrait, SchemaManager, Table, async_trait};

/// A row of `audit_log`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_log")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub at: DateTimeUtc,
    pub action: String,
    /// Masked identity number or card serial; never a full number or a name.
    pub subject: String,
    pub outcome: String,
    #[sea_orm(column_type = "Text")]
    pub detail: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// One audit record, still to be written. Its time is given to [`append`]: the `now` of the
/// transaction it belongs to, so that the audit row and the change it records share one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub action: &'static str,
    /// Masked identity number or card serial.
    pub subject: String,
    pub outcome: String,
    pub detail: String,
}

impl AuditEntry {
    pub fn new(
        action: &'static str,
        subject: impl Into<String>,
        outcome: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self { action, subject: subject.into(), outcome: outcome.into(), detail: detail.into() }
    }
}

/// Appends one row. `db` may be a connection or a transaction (the row then commits, or not, with
/// the change it records).
pub async fn append(db: &impl ConnectionTrait, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr> {
    Entity::insert(ActiveModel {
        id: NotSet,
        at: Set(at),
        action: Set(entry.action.to_owned()),
        subject: Set(entry.subject),
        outcome: Set(entry.outcome),
        detail: Set(entry.detail),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The migration creating `audit_log` (and its index on `at`); every service's migrator lists it.
pub struct CreateAuditLog;

impl CreateAuditLog {
    /// Stable: recorded in each database's `seaql_migrations`.
    pub const NAME: &'static str = "m20261127_000000_create_audit_log";
}

impl MigrationName for CreateAuditLog {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateAuditLog {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Entity)
                    .if_not_exists()
                    .col(ColumnDef::new(Column::Id).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(Column::At).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Column::Action).string_len(64).not_null())
                    .col(ColumnDef::new(Column::Subject).string_len(256).not_null())
                    .col(ColumnDef::new(Column::Outcome).string_len(64).not_null())
                    .col(ColumnDef::new(Column::Detail).text().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create().name("idx_audit_log_at").table(Entity).col(Column::At).if_not_exists().to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Entity).to_owned()).await
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{Database, EntityTrait, TransactionTrait};
    use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager};

    use super::*;

    #[tokio::test]
    async fn the_migration_creates_the_table_and_append_writes_a_row_in_a_transaction() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        assert_eq!(CreateAuditLog.name(), "m20261127_000000_create_audit_log");
        CreateAuditLog.up(&SchemaManager::new(&db)).await.unwrap();
        let at = "2117-07-01T08:00:00Z".parse().unwrap();

        let txn = db.begin().await.unwrap();
        append(&txn, at, AuditEntry::new("verify", "110***********1234", "APPROVED", "detail")).await.unwrap();
        txn.rollback().await.unwrap();
        assert!(Entity::find().all(&db).await.unwrap().is_empty(), "rolled back with its transaction");

        let txn = db.begin().await.unwrap();
        append(&txn, at, AuditEntry::new("verify", "110***********1234", "APPROVED", "detail")).await.unwrap();
        txn.commit().await.unwrap();
        let rows = Entity::find().all(&db).await.unwrap();
        assert_eq!(
            rows,
            vec![Model {
                id: 1,
                at,
                action: "verify".into(),
                subject: "110***********1234".into(),
                outcome: "APPROVED".into(),
                detail: "detail".into(),
            }]
        );
    }
}
