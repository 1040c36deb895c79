use sea_orm_migration::prelude::*;

use crate::m20261127_000001_create_cards::Cards;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum LossReports {
    Table,
    Id,
    CardSerial,
    DecisionId,
    ReportedAt,
    WithdrawnAt,
    WithdrawDecisionId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(LossReports::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(LossReports::Id).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(LossReports::CardSerial).string_len(64).not_null())
                    .col(ColumnDef::new(LossReports::DecisionId).string_len(256).not_null().unique_key())
                    .col(ColumnDef::new(LossReports::ReportedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(LossReports::WithdrawnAt).timestamp_with_time_zone().null())
                    .col(ColumnDef::new(LossReports::WithdrawDecisionId).string_len(256).null().unique_key())
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_loss_reports_card")
                            .from(LossReports::Table, LossReports::CardSerial)
                            .to(Cards::Table, Cards::Serial),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_loss_reports_card_serial")
                    .table(LossReports::Table)
                    .col(LossReports::CardSerial)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(LossReports::Table).to_owned()).await
    }
}
