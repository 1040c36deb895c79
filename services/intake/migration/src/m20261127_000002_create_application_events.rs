use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApplicationEvents {
    Table,
    Id,
    ApplicationId,
    State,
    At,
    Note,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ApplicationEvents::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(ApplicationEvents::Id).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(ApplicationEvents::ApplicationId).string_len(36).not_null())
                    .col(ColumnDef::new(ApplicationEvents::State).string_len(32).not_null())
                    .col(ColumnDef::new(ApplicationEvents::At).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(ApplicationEvents::Note).text().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_application_events_application_id")
                    .table(ApplicationEvents::Table)
                    .col(ApplicationEvents::ApplicationId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(ApplicationEvents::Table).to_owned()).await
    }
}
