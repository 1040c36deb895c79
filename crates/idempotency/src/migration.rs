//! The schema migrations of this crate's tables; every service's migrator lists them.
use super::*;

/// The migration creating `idempotent_requests`; every service's migrator lists it.
pub struct CreateIdempotentRequests;

impl CreateIdempotentRequests {
    /// Stable: recorded in each database's `seaql_migrations`.
    pub const NAME: &'static str = "m20261127_950000_create_idempotent_requests";
}

impl MigrationName for CreateIdempotentRequests {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateIdempotentRequests {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use record::{Column, Entity};
        manager
            .create_table(
                Table::create()
                    .table(Entity)
                    .if_not_exists()
                    .col(ColumnDef::new(Column::Caller).string_len(256).not_null())
                    .col(ColumnDef::new(Column::Method).string_len(256).not_null())
                    .col(ColumnDef::new(Column::IdempotencyKey).string_len(MAX_KEY_LEN as u32).not_null())
                    .col(ColumnDef::new(Column::RequestSha256).blob().not_null())
                    .col(ColumnDef::new(Column::StatusCode).integer().not_null())
                    .col(ColumnDef::new(Column::Message).text().not_null())
                    .col(ColumnDef::new(Column::Details).blob().not_null())
                    .col(ColumnDef::new(Column::Response).blob().not_null())
                    .col(ColumnDef::new(Column::CreatedAt).timestamp_with_time_zone().not_null())
                    .primary_key(Index::create().col(Column::Caller).col(Column::Method).col(Column::IdempotencyKey))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_idempotent_requests_created_at")
                    .table(Entity)
                    .col(Column::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(record::Entity).to_owned()).await
    }
}
