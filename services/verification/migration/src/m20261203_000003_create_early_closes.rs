use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// K5: closes that arrived before the Verify of their application (a cancel at the station while
/// its Verify was still on the way). Remembered so that the late Verify opens nothing.
#[derive(DeriveIden)]
enum EarlyCloses {
    Table,
    ApplicationId,
    StationId,
    FinalState,
    ClosedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(EarlyCloses::Table)
                    .if_not_exists()
                    .col(string_len(EarlyCloses::ApplicationId, 64).primary_key())
                    .col(string_len(EarlyCloses::StationId, 256))
                    .col(string_len(EarlyCloses::FinalState, 32))
                    .col(timestamp_with_time_zone(EarlyCloses::ClosedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(EarlyCloses::Table).to_owned()).await
    }
}
