use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
pub(crate) enum Cards {
    Table,
    Serial,
    IdNumber,
    HomeBureauId,
    Status,
    ValidFrom,
    ValidUntil,
    DecisionId,
    ProducerId,
    StatusChangedAt,
    CreatedAt,
    RevokedBy,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Cards::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Cards::Serial).string_len(64).not_null().primary_key())
                    .col(ColumnDef::new(Cards::IdNumber).string_len(18).not_null())
                    .col(ColumnDef::new(Cards::HomeBureauId).string_len(256).not_null())
                    .col(ColumnDef::new(Cards::Status).string_len(16).not_null())
                    .col(ColumnDef::new(Cards::ValidFrom).date().not_null())
                    .col(ColumnDef::new(Cards::ValidUntil).date().null())
                    .col(ColumnDef::new(Cards::DecisionId).string_len(256).null().unique_key())
                    .col(ColumnDef::new(Cards::ProducerId).string_len(256).null())
                    .col(ColumnDef::new(Cards::StatusChangedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Cards::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Cards::RevokedBy).string_len(64).null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_cards_id_number")
                    .table(Cards::Table)
                    .col(Cards::IdNumber)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Cards::Table).to_owned()).await
    }
}
