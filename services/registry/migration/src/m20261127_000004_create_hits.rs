use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Hits {
    Table,
    Id,
    CardSerial,
    IdNumber,
    HomeBureauId,
    RelyingParty,
    CheckedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Hits::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Hits::Id).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(Hits::CardSerial).string_len(64).not_null())
                    .col(ColumnDef::new(Hits::IdNumber).string_len(18).not_null())
                    .col(ColumnDef::new(Hits::HomeBureauId).string_len(256).not_null())
                    .col(ColumnDef::new(Hits::RelyingParty).string_len(128).not_null())
                    .col(ColumnDef::new(Hits::CheckedAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_hits_home_bureau_checked_at")
                    .table(Hits::Table)
                    .col(Hits::HomeBureauId)
                    .col(Hits::CheckedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Hits::Table).to_owned()).await
    }
}
