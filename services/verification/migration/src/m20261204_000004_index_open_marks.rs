use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Verifications {
    Table,
    Open,
    CreatedAt,
}

const INDEX: &str = "ix_verifications_open_created_at";

/// K5: the open applications held longer than `verification.ask_station_after_seconds`, which the
/// home bureau asks their stations about, are found without reading every verification.
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(Verifications::Table)
                    .col(Verifications::Open)
                    .col(Verifications::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_index(Index::drop().name(INDEX).table(Verifications::Table).to_owned()).await
    }
}
