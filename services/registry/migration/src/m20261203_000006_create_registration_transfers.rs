use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// S4: a citizen's registration moved to another home bureau; the citizen's cards follow it.
#[derive(DeriveIden)]
enum RegistrationTransfers {
    Table,
    Id,
    DecisionId,
    IdNumber,
    FromBureauId,
    ToBureauId,
    TransferredAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RegistrationTransfers::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(RegistrationTransfers::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(RegistrationTransfers::DecisionId).string_len(256).not_null().unique_key())
                    .col(ColumnDef::new(RegistrationTransfers::IdNumber).string_len(18).not_null())
                    .col(ColumnDef::new(RegistrationTransfers::FromBureauId).string_len(256).not_null())
                    .col(ColumnDef::new(RegistrationTransfers::ToBureauId).string_len(256).not_null())
                    .col(ColumnDef::new(RegistrationTransfers::TransferredAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_registration_transfers_id_number")
                    .table(RegistrationTransfers::Table)
                    .col(RegistrationTransfers::IdNumber)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(RegistrationTransfers::Table).to_owned()).await
    }
}
