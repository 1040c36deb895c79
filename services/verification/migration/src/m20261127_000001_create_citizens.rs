use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Citizens {
    Table,
    IdNumber,
    Name,
    Sex,
    BirthDate,
    RegistrationProvince,
    Address,
    FaceTemplate,
    FingerprintTemplate,
    CreditStatus,
    RegistrationStatus,
    DateOfDeath,
    CurrentCardSerial,
    CurrentCardValidFrom,
    CurrentCardValidUntil,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Citizens::Table)
                    .if_not_exists()
                    .col(string_len(Citizens::IdNumber, 18).primary_key())
                    .col(string_len(Citizens::Name, 256))
                    .col(string_len(Citizens::Sex, 16))
                    .col(date(Citizens::BirthDate))
                    .col(string_len(Citizens::RegistrationProvince, 2))
                    .col(string_len(Citizens::Address, 256))
                    .col(blob(Citizens::FaceTemplate))
                    .col(blob(Citizens::FingerprintTemplate))
                    .col(string_len(Citizens::CreditStatus, 16))
                    .col(string_len(Citizens::RegistrationStatus, 16))
                    .col(date_null(Citizens::DateOfDeath))
                    .col(string_len_null(Citizens::CurrentCardSerial, 64))
                    .col(date_null(Citizens::CurrentCardValidFrom))
                    .col(date_null(Citizens::CurrentCardValidUntil))
                    .col(timestamp_with_time_zone(Citizens::UpdatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Citizens::Table).to_owned()).await
    }
}
