use sea_orm_migration::prelude::*;

use crate::m20261127_000001_create_cards::Cards;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum StatusEvents {
    Table,
    Sequence,
    CardSerial,
    Status,
    ChangedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(StatusEvents::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(StatusEvents::Sequence).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(StatusEvents::CardSerial).string_len(64).not_null())
                    .col(ColumnDef::new(StatusEvents::Status).string_len(16).not_null())
                    .col(ColumnDef::new(StatusEvents::ChangedAt).timestamp_with_time_zone().not_null())
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_status_events_card")
                            .from(StatusEvents::Table, StatusEvents::CardSerial)
                            .to(Cards::Table, Cards::Serial),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(StatusEvents::Table).to_owned()).await
    }
}
