use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Applications {
    Table,
    ApplicationId,
    Kind,
    State,
    IdNumber,
    DeclaredProvince,
    HomeBureauId,
    PreviousCardSerial,
    DocumentKind,
    LiveFaceTemplate,
    LiveFingerprintTemplate,
    RefusalReason,
    Decision,
    LossDecision,
    LossRecorded,
    OrderId,
    NewCardSerial,
    HomeNotified,
    Halted,
    Attempts,
    LastError,
    NextAttemptAt,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Applications::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Applications::ApplicationId).string_len(36).not_null().primary_key())
                    .col(ColumnDef::new(Applications::Kind).string_len(32).not_null())
                    .col(ColumnDef::new(Applications::State).string_len(32).not_null())
                    .col(ColumnDef::new(Applications::IdNumber).string_len(64).not_null())
                    .col(ColumnDef::new(Applications::DeclaredProvince).string_len(8).not_null())
                    .col(ColumnDef::new(Applications::HomeBureauId).string_len(256).not_null())
                    .col(ColumnDef::new(Applications::PreviousCardSerial).string_len(64).not_null())
                    .col(ColumnDef::new(Applications::DocumentKind).string_len(32).not_null())
                    .col(ColumnDef::new(Applications::LiveFaceTemplate).blob().not_null())
                    .col(ColumnDef::new(Applications::LiveFingerprintTemplate).blob().not_null())
                    .col(ColumnDef::new(Applications::RefusalReason).string_len(64).null())
                    .col(ColumnDef::new(Applications::Decision).blob().null())
                    .col(ColumnDef::new(Applications::LossDecision).blob().null())
                    .col(ColumnDef::new(Applications::LossRecorded).boolean().not_null().default(false))
                    .col(ColumnDef::new(Applications::OrderId).string_len(64).null())
                    .col(ColumnDef::new(Applications::NewCardSerial).string_len(64).null())
                    .col(ColumnDef::new(Applications::HomeNotified).boolean().not_null().default(false))
                    .col(ColumnDef::new(Applications::Halted).boolean().not_null().default(false))
                    .col(ColumnDef::new(Applications::Attempts).integer().not_null().default(0))
                    .col(ColumnDef::new(Applications::LastError).text().null())
                    .col(ColumnDef::new(Applications::NextAttemptAt).timestamp_with_time_zone().null())
                    .col(ColumnDef::new(Applications::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Applications::UpdatedAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_applications_state")
                    .table(Applications::Table)
                    .col(Applications::State)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_applications_created_at")
                    .table(Applications::Table)
                    .col(Applications::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Applications::Table).to_owned()).await
    }
}
