use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Verifications {
    Table,
    Id,
    ApplicationId,
    Purpose,
    StationId,
    IdNumber,
    Kind,
    Outcome,
    RefusalReason,
    DecisionId,
    LossDecisionId,
    Response,
    ValidFrom,
    ValidUntil,
    Open,
    ClosedState,
    ClosedAt,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Verifications::Table)
                    .if_not_exists()
                    .col(pk_auto(Verifications::Id))
                    .col(string_len(Verifications::ApplicationId, 64))
                    .col(string_len(Verifications::Purpose, 32))
                    .col(string_len(Verifications::StationId, 256))
                    .col(string_len(Verifications::IdNumber, 18))
                    .col(string_len_null(Verifications::Kind, 32))
                    .col(string_len(Verifications::Outcome, 16))
                    .col(string_len_null(Verifications::RefusalReason, 64))
                    .col(string_len_null(Verifications::DecisionId, 64))
                    .col(string_len_null(Verifications::LossDecisionId, 64))
                    .col(blob(Verifications::Response))
                    .col(date_null(Verifications::ValidFrom))
                    .col(date_null(Verifications::ValidUntil))
                    .col(boolean(Verifications::Open))
                    .col(string_len_null(Verifications::ClosedState, 32))
                    .col(timestamp_with_time_zone_null(Verifications::ClosedAt))
                    .col(timestamp_with_time_zone(Verifications::CreatedAt))
                    .to_owned(),
            )
            .await?;
        // Idempotency: one answer per (application, purpose).
        manager
            .create_index(
                Index::create()
                    .name("ux_verifications_application_purpose")
                    .table(Verifications::Table)
                    .col(Verifications::ApplicationId)
                    .col(Verifications::Purpose)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        // Every decision id is issued once.
        for (name, column) in [
            ("ux_verifications_decision_id", Verifications::DecisionId),
            ("ux_verifications_loss_decision_id", Verifications::LossDecisionId),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(Verifications::Table)
                        .col(column)
                        .unique()
                        .if_not_exists()
                        .to_owned(),
                )
                .await?;
        }
        // K5: open applications of a citizen.
        manager
            .create_index(
                Index::create()
                    .name("ix_verifications_id_number_open")
                    .table(Verifications::Table)
                    .col(Verifications::IdNumber)
                    .col(Verifications::Open)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Verifications::Table).to_owned()).await
    }
}
