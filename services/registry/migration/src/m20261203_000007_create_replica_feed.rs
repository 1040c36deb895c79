//! Replicas on one database (issue 15): the ordered log every replica tails (`registry_feed`,
//! sequences allocated from the one-row `registry_feed_head` under its row lock, so they commit in
//! order with no gap), the replicas and how far each has applied it (`registry_replicas`), and the
//! C4 miss budgets shared by every replica (`registry_miss_budgets`).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum RegistryFeedHead {
    Table,
    Id,
    Sequence,
}

#[derive(DeriveIden)]
enum RegistryFeed {
    Table,
    Sequence,
    CardSerial,
    IdNumber,
    HomeBureauId,
    Status,
    ValidUntil,
    StatusChangedAt,
    StatusEvent,
}

#[derive(DeriveIden)]
enum RegistryReplicas {
    Table,
    ReplicaId,
    AppliedSequence,
    ReadHeadAt,
}

#[derive(DeriveIden)]
enum RegistryMissBudgets {
    Table,
    Caller,
    Tokens,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RegistryFeedHead::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(RegistryFeedHead::Id).integer().not_null().primary_key())
                    .col(ColumnDef::new(RegistryFeedHead::Sequence).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        // The log goes on from the status events already written, so their sequences stay unique.
        manager
            .get_connection()
            .execute_unprepared(
                "INSERT INTO registry_feed_head (id, sequence) \
                 SELECT 1, COALESCE(MAX(sequence), 0) FROM status_events",
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RegistryFeed::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(RegistryFeed::Sequence).big_integer().not_null().primary_key())
                    .col(ColumnDef::new(RegistryFeed::CardSerial).string_len(64).not_null())
                    .col(ColumnDef::new(RegistryFeed::IdNumber).string_len(18).not_null())
                    .col(ColumnDef::new(RegistryFeed::HomeBureauId).string_len(256).not_null())
                    .col(ColumnDef::new(RegistryFeed::Status).string_len(16).not_null())
                    .col(ColumnDef::new(RegistryFeed::ValidUntil).date().null())
                    .col(ColumnDef::new(RegistryFeed::StatusChangedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(RegistryFeed::StatusEvent).boolean().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RegistryReplicas::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(RegistryReplicas::ReplicaId).string_len(256).not_null().primary_key())
                    .col(ColumnDef::new(RegistryReplicas::AppliedSequence).big_integer().not_null())
                    .col(ColumnDef::new(RegistryReplicas::ReadHeadAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RegistryMissBudgets::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(RegistryMissBudgets::Caller).string_len(512).not_null().primary_key())
                    .col(ColumnDef::new(RegistryMissBudgets::Tokens).double().not_null())
                    .col(ColumnDef::new(RegistryMissBudgets::UpdatedAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            RegistryMissBudgets::Table.into_iden(),
            RegistryReplicas::Table.into_iden(),
            RegistryFeed::Table.into_iden(),
            RegistryFeedHead::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
