//! The schema migrations of this crate's tables; every service's migrator lists them.
use super::*;

/// Creates `outbox_messages`; every service's migrator lists it.
pub struct CreateOutbox;

impl CreateOutbox {
    /// Stable: recorded in each database's `seaql_migrations`.
    pub const NAME: &'static str = "m20261127_910000_create_outbox_messages";
}

impl MigrationName for CreateOutbox {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateOutbox {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Entity)
                    .if_not_exists()
                    .col(ColumnDef::new(Column::Id).string_len(36).not_null().primary_key())
                    .col(ColumnDef::new(Column::Topic).string_len(32).not_null())
                    .col(ColumnDef::new(Column::Subject).string_len(64).not_null())
                    .col(ColumnDef::new(Column::Target).string_len(256).not_null())
                    .col(ColumnDef::new(Column::State).string_len(16).not_null())
                    .col(ColumnDef::new(Column::Attempts).integer().not_null().default(0))
                    .col(ColumnDef::new(Column::NextAttemptAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Column::LeaseOwner).string_len(64).null())
                    .col(ColumnDef::new(Column::LeaseUntil).timestamp_with_time_zone().null())
                    .col(ColumnDef::new(Column::LastError).text().null())
                    .col(ColumnDef::new(Column::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Column::UpdatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Column::DeliveredAt).timestamp_with_time_zone().null())
                    .col(ColumnDef::new(Column::Claims).integer().not_null().default(0))
                    .col(ColumnDef::new(Column::SettledBy).string_len(64).null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_messages_due")
                    .table(Entity)
                    .col(Column::State)
                    .col(Column::NextAttemptAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_messages_subject")
                    .table(Entity)
                    .col(Column::Subject)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Entity).to_owned()).await
    }
}
