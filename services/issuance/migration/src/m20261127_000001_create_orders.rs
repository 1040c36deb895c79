use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Orders {
    Table,
    OrderId,
    DecisionId,
    ApplicationId,
    StationId,
    IdNumber,
    CardSerial,
    State,
    SignedDecision,
    ValidFrom,
    ValidUntil,
    ReadyAt,
    Attempts,
    LastError,
    RetryStopped,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Orders::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Orders::OrderId).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Orders::DecisionId).string_len(256).not_null().unique_key())
                    .col(ColumnDef::new(Orders::ApplicationId).string_len(256).not_null())
                    .col(ColumnDef::new(Orders::StationId).string_len(256).not_null())
                    .col(ColumnDef::new(Orders::IdNumber).string_len(64).not_null())
                    .col(ColumnDef::new(Orders::CardSerial).string_len(32).not_null().unique_key())
                    .col(ColumnDef::new(Orders::State).string_len(32).not_null())
                    .col(ColumnDef::new(Orders::SignedDecision).blob().not_null())
                    .col(ColumnDef::new(Orders::ValidFrom).date().not_null())
                    .col(ColumnDef::new(Orders::ValidUntil).date().null())
                    .col(ColumnDef::new(Orders::ReadyAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Orders::Attempts).integer().not_null().default(0))
                    .col(ColumnDef::new(Orders::LastError).text().not_null().default(""))
                    .col(ColumnDef::new(Orders::RetryStopped).boolean().not_null().default(false))
                    .col(ColumnDef::new(Orders::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Orders::UpdatedAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        // The production worker looks for due orders by state and ready time.
        manager
            .create_index(
                Index::create()
                    .name("idx_orders_state_ready_at")
                    .table(Orders::Table)
                    .col(Orders::State)
                    .col(Orders::ReadyAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Orders::Table).to_owned()).await
    }
}
