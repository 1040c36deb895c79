//! C3: a card registered by its producer awaits collection at the station that lodged its
//! application; the registry keeps that station so only it can report the hand-over. The index
//! lets the deadline sweep find cards still awaiting collection without reading every card.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Cards {
    Table,
    StationId,
    Status,
    StatusChangedAt,
}

const STATUS_INDEX: &str = "idx_cards_status_changed_at";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Cards::Table)
                    .add_column(ColumnDef::new(Cards::StationId).string_len(256).null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(STATUS_INDEX)
                    .table(Cards::Table)
                    .col(Cards::Status)
                    .col(Cards::StatusChangedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_index(Index::drop().name(STATUS_INDEX).table(Cards::Table).to_owned()).await?;
        manager.alter_table(Table::alter().table(Cards::Table).drop_column(Cards::StationId).to_owned()).await
    }
}
