//! `applications.request_key`: the caller's `idempotency-key` of the SubmitApplication or
//! ReportLoss that lodged the application (with the caller and the method), unique. Stored in the
//! transaction that inserts the application, it closes the window the idempotency layer leaves
//! open (the station commits, then dies before the layer keeps its answer): a repeat finds the
//! application instead of lodging a second one.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Applications {
    Table,
    RequestKey,
}

const INDEX: &str = "idx_applications_request_key";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Applications::Table)
                    .add_column(ColumnDef::new(Applications::RequestKey).string_len(512).null())
                    .to_owned(),
            )
            .await?;
        // NULLs (no key) are distinct on both backends: only keyed requests are unique.
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(Applications::Table)
                    .col(Applications::RequestKey)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_index(Index::drop().name(INDEX).table(Applications::Table).to_owned()).await?;
        manager
            .alter_table(Table::alter().table(Applications::Table).drop_column(Applications::RequestKey).to_owned())
            .await
    }
}
