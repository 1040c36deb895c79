//! Drops the retry bookkeeping of `applications` (`halted`, `attempts`, `last_error`,
//! `next_attempt_at`): the worker kept it on the row before the outbox, which keeps it per
//! message (`outbox_messages`); nothing writes or reads these columns any more.
//!
//! `ALTER TABLE ... DROP COLUMN` on both backends: the bundled SQLite (≥ 3.35) drops a column in
//! place as long as no index or constraint names it, and none of these is indexed. SQLite takes
//! one change per statement, hence one statement per column.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Applications {
    Table,
    Halted,
    Attempts,
    LastError,
    NextAttemptAt,
}

const DROPPED: [Applications; 4] =
    [Applications::Halted, Applications::Attempts, Applications::LastError, Applications::NextAttemptAt];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in DROPPED {
            manager.alter_table(Table::alter().table(Applications::Table).drop_column(column).to_owned()).await?;
        }
        Ok(())
    }

    /// Brings the columns back with the values the worker left on settled rows.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let columns = [
            ColumnDef::new(Applications::Halted).boolean().not_null().default(false).to_owned(),
            ColumnDef::new(Applications::Attempts).integer().not_null().default(0).to_owned(),
            ColumnDef::new(Applications::LastError).text().null().to_owned(),
            ColumnDef::new(Applications::NextAttemptAt).timestamp_with_time_zone().null().to_owned(),
        ];
        for column in columns {
            manager.alter_table(Table::alter().table(Applications::Table).add_column(column).to_owned()).await?;
        }
        Ok(())
    }
}
