//! The schema migrations of this crate's tables; every service's migrator lists them.
use super::*;

/// The migration creating `audit_log` (and its index on `at`); every service's migrator lists it.
pub struct CreateAuditLog;

impl CreateAuditLog {
    /// Stable: recorded in each database's `seaql_migrations`.
    pub const NAME: &'static str = "m20261127_000000_create_audit_log";
}

impl MigrationName for CreateAuditLog {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateAuditLog {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Entity)
                    .if_not_exists()
                    .col(ColumnDef::new(Column::Id).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(Column::At).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Column::Action).string_len(64).not_null())
                    .col(ColumnDef::new(Column::Subject).string_len(256).not_null())
                    .col(ColumnDef::new(Column::Outcome).string_len(64).not_null())
                    .col(ColumnDef::new(Column::Detail).text().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create().name("idx_audit_log_at").table(Entity).col(Column::At).if_not_exists().to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Entity).to_owned()).await
    }
}

/// The migration making the log a hash chain: adds `seq`, `prev_hash` and `hash`, chains the rows
/// already there (in id order) and creates `audit_head`. Every service's migrator lists it after
/// [`CreateAuditLog`].
pub struct ChainAuditLog;

impl ChainAuditLog {
    /// Stable: recorded in each database's `seaql_migrations`.
    pub const NAME: &'static str = "m20261127_900000_chain_audit_log";
}

impl MigrationName for ChainAuditLog {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ChainAuditLog {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters a table one column at a time.
        let add =
            |column: ColumnDef| -> TableAlterStatement { Table::alter().table(Entity).add_column(column).to_owned() };
        manager.alter_table(add(ColumnDef::new(Column::Seq).big_integer().null().to_owned())).await?;
        manager.alter_table(add(ColumnDef::new(Column::PrevHash).string_len(64).null().to_owned())).await?;
        manager.alter_table(add(ColumnDef::new(Column::Hash).string_len(64).null().to_owned())).await?;
        manager
            .create_table(
                Table::create()
                    .table(head::Entity)
                    .if_not_exists()
                    .col(ColumnDef::new(head::Column::Id).integer().not_null().primary_key())
                    .col(ColumnDef::new(head::Column::LastSeq).big_integer().not_null())
                    .col(ColumnDef::new(head::Column::LastHash).string_len(64).not_null())
                    .to_owned(),
            )
            .await?;

        // Chain what is there, a page at a time, then record the head.
        let db = manager.get_connection();
        let (mut seq, mut last_hash, mut last_id) = (0_i64, GENESIS_HASH.to_owned(), None::<i64>);
        loop {
            let mut query = Entity::find().order_by_asc(Column::Id).limit(VERIFY_PAGE);
            if let Some(last_id) = last_id {
                query = query.filter(Column::Id.gt(last_id));
            }
            let page = query.all(db).await?;
            let page_len = page.len() as u64;
            for row in page {
                seq += 1;
                let at = micros(row.at);
                let hash = entry_hash(seq, at, &row.action, &row.subject, &row.outcome, &row.detail, &last_hash);
                Entity::update_many()
                    .col_expr(Column::At, Expr::value(at))
                    .col_expr(Column::Seq, Expr::value(seq))
                    .col_expr(Column::PrevHash, Expr::value(last_hash.clone()))
                    .col_expr(Column::Hash, Expr::value(hash.clone()))
                    .filter(Column::Id.eq(row.id))
                    .exec(db)
                    .await?;
                last_hash = hash;
                last_id = Some(row.id);
            }
            if page_len < VERIFY_PAGE {
                break;
            }
        }
        head::Entity::insert(head::ActiveModel { id: Set(head::ROW), last_seq: Set(seq), last_hash: Set(last_hash) })
            .exec_without_returning(db)
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_audit_log_seq")
                    .table(Entity)
                    .col(Column::Seq)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        if db.get_database_backend() == DbBackend::Postgres {
            // Every row is chained now; SQLite cannot add the constraint to existing columns.
            db.execute_unprepared(
                "ALTER TABLE audit_log ALTER COLUMN seq SET NOT NULL, ALTER COLUMN prev_hash SET NOT NULL, \
                 ALTER COLUMN hash SET NOT NULL",
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(head::Entity).to_owned()).await?;
        manager.drop_index(Index::drop().name("idx_audit_log_seq").table(Entity).to_owned()).await?;
        for column in [Column::Seq, Column::PrevHash, Column::Hash] {
            manager.alter_table(Table::alter().table(Entity).drop_column(column).to_owned()).await?;
        }
        Ok(())
    }
}
