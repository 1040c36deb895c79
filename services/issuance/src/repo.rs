//! All database access. Every state change is committed, with its audit row, before it is
//! acknowledged or broadcast; state transitions are conditional updates.
use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, Set, SqlErr,
    UpdateMany,
    sea_query::{Expr, ExprTrait},
};
use uuid::Uuid;
use yidi_audit::{self as audit, AuditEntry};
use yidi_domain::mask::mask_id_number;
use yidi_grpc::ApiError;
use yidi_outbox::{self as outbox, NewMessage};
use yidi_runtime::db;

use crate::{
    entities::orders,
    order::{Order, OrderState},
};

impl From<orders::Model> for Order {
    fn from(model: orders::Model) -> Self {
        Self {
            order_id: model.order_id,
            decision_id: model.decision_id,
            application_id: model.application_id,
            station_id: model.station_id,
            id_number_masked: mask_id_number(&model.id_number),
            card_serial: model.card_serial,
            state: model.state,
            valid_from: model.valid_from,
            valid_until: model.valid_until,
            ready_at: model.ready_at,
            attempts: model.attempts,
            last_error: model.last_error,
            retry_stopped: model.retry_stopped,
            trace_context: model.trace_context,
            created_at: model.created_at,
            updated_at: model.updated_at,
        }
    }
}

/// An order to insert.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub order_id: Uuid,
    pub decision_id: String,
    pub application_id: String,
    pub station_id: String,
    pub id_number: String,
    pub card_serial: String,
    pub signed_decision: Vec<u8>,
    pub valid_from: NaiveDate,
    pub valid_until: Option<NaiveDate>,
    pub ready_at: DateTime<Utc>,
    pub trace_context: Option<String>,
    pub now: DateTime<Utc>,
}

/// Why an insert failed.
#[derive(Debug)]
pub enum InsertError {
    /// An order for this decision exists already (S4, single use).
    DecisionUsed,
    /// The card serial is taken; draw another.
    SerialTaken,
    Db(DbErr),
}

/// A registration attempt's outcome, as the worker records it.
#[derive(Debug, Clone)]
pub enum Attempt {
    /// Transient failure: retry later.
    Retry(String),
    /// Definitive refusal: stop retrying, keep the error visible.
    Refused(String),
}

#[derive(Debug, Clone)]
pub struct Repo {
    db: DatabaseConnection,
}

impl Repo {
    pub async fn audit(&self, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), ApiError> {
        audit::append(&self.db, at, entry).await?;
        Ok(())
    }

    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Inserts the order, its audit row and the message that will register its card, in one
    /// transaction.
    pub async fn insert_order(
        &self,
        order: NewOrder,
        audit: AuditEntry,
        registration: NewMessage,
    ) -> Result<Order, InsertError> {
        let decision_id = order.decision_id.clone();
        let serial = order.card_serial.clone();
        let result = async {
            let txn = db::begin(&self.db).await?;
            let model = orders::ActiveModel {
                order_id: Set(order.order_id),
                decision_id: Set(order.decision_id),
                application_id: Set(order.application_id),
                station_id: Set(order.station_id),
                id_number: Set(order.id_number),
                card_serial: Set(order.card_serial),
                state: Set(OrderState::InProduction),
                signed_decision: Set(order.signed_decision),
                valid_from: Set(order.valid_from),
                valid_until: Set(order.valid_until),
                ready_at: Set(order.ready_at),
                attempts: Set(0),
                last_error: Set(String::new()),
                retry_stopped: Set(false),
                trace_context: Set(order.trace_context),
                created_at: Set(order.now),
                updated_at: Set(order.now),
            }
            .insert(&txn)
            .await?;
            audit::append(&txn, order.now, audit).await?;
            outbox::enqueue(&txn, registration).await?;
            txn.commit().await?;
            Ok::<_, DbErr>(model)
        }
        .await;
        match result {
            Ok(model) => Ok(Order::from(model)),
            Err(error) => {
                if matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) {
                    // Which key? Ask the database rather than parse driver messages.
                    match self.find_model_by_decision(&decision_id).await {
                        Ok(Some(_)) => return Err(InsertError::DecisionUsed),
                        Ok(None) => {}
                        Err(e) => return Err(InsertError::Db(e)),
                    }
                    match orders::Entity::find().filter(orders::Column::CardSerial.eq(serial)).one(&self.db).await {
                        Ok(Some(_)) => return Err(InsertError::SerialTaken),
                        Ok(None) => {}
                        Err(e) => return Err(InsertError::Db(e)),
                    }
                }
                Err(InsertError::Db(error))
            }
        }
    }

    async fn find_model_by_decision(&self, decision_id: &str) -> Result<Option<orders::Model>, DbErr> {
        orders::Entity::find().filter(orders::Column::DecisionId.eq(decision_id)).one(&self.db).await
    }

    pub async fn decision_used(&self, decision_id: &str) -> Result<bool, ApiError> {
        Ok(self.find_model_by_decision(decision_id).await?.is_some())
    }

    pub async fn find(&self, order_id: Uuid) -> Result<Option<Order>, ApiError> {
        Ok(orders::Entity::find_by_id(order_id).one(&self.db).await?.map(Order::from))
    }

    pub async fn find_by_decision(&self, decision_id: &str) -> Result<Option<Order>, ApiError> {
        Ok(self.find_model_by_decision(decision_id).await?.map(Order::from))
    }

    /// An order with its stored signed decision (protobuf bytes), in one read.
    pub async fn find_with_decision(&self, order_id: Uuid) -> Result<Option<(Order, Vec<u8>)>, ApiError> {
        let model = orders::Entity::find_by_id(order_id).one(&self.db).await?;
        Ok(model.map(|mut model| {
            let signed_decision = std::mem::take(&mut model.signed_decision);
            (Order::from(model), signed_decision)
        }))
    }

    /// Moves an order from `from` to `to` if it is still in `from`, with its audit rows (one per
    /// step it takes). `None`: it was not in `from` (another worker or a replay moved it).
    pub async fn transition(
        &self,
        order_id: Uuid,
        from: OrderState,
        to: OrderState,
        now: DateTime<Utc>,
        audits: Vec<AuditEntry>,
    ) -> Result<Option<Order>, ApiError> {
        let txn = db::begin(&self.db).await?;
        let mut update = orders::Entity::update_many()
            .col_expr(orders::Column::State, Expr::value(to))
            .col_expr(orders::Column::UpdatedAt, Expr::value(now));
        if from == OrderState::InProduction {
            update = update
                .col_expr(orders::Column::Attempts, Expr::col(orders::Column::Attempts).add(1))
                .col_expr(orders::Column::LastError, Expr::value(""))
                // Registered after all (an operator retried a refused registration).
                .col_expr(orders::Column::RetryStopped, Expr::value(false));
        }
        let update = update.filter(orders::Column::State.eq(from));
        let Some(model) = update_one(&txn, update, order_id).await? else {
            txn.rollback().await?;
            return Ok(None);
        };
        for audit in audits {
            audit::append(&txn, now, audit).await?;
        }
        txn.commit().await?;
        Ok(Some(Order::from(model)))
    }

    /// Records a failed registration attempt of an order still in production.
    pub async fn record_attempt(
        &self,
        order_id: Uuid,
        attempt: Attempt,
        now: DateTime<Utc>,
        audit: Option<AuditEntry>,
    ) -> Result<Option<Order>, ApiError> {
        let (error, stop) = match attempt {
            Attempt::Retry(error) => (error, false),
            Attempt::Refused(error) => (error, true),
        };
        let txn = db::begin(&self.db).await?;
        let update = orders::Entity::update_many()
            .col_expr(orders::Column::Attempts, Expr::col(orders::Column::Attempts).add(1))
            .col_expr(orders::Column::LastError, Expr::value(error))
            .col_expr(orders::Column::RetryStopped, Expr::value(stop))
            .col_expr(orders::Column::UpdatedAt, Expr::value(now))
            .filter(orders::Column::State.eq(OrderState::InProduction));
        let Some(model) = update_one(&txn, update, order_id).await? else {
            txn.rollback().await?;
            return Ok(None);
        };
        if let Some(entry) = audit {
            audit::append(&txn, now, entry).await?;
        }
        txn.commit().await?;
        Ok(Some(Order::from(model)))
    }
}

/// Runs `update` on order `order_id` and returns the row as it left it, `None` if it matched
/// nothing: one statement where the database returns updated rows (PostgreSQL), an update and a
/// read back in `txn` otherwise (SQLite).
async fn update_one(
    txn: &impl ConnectionTrait,
    update: UpdateMany<orders::Entity>,
    order_id: Uuid,
) -> Result<Option<orders::Model>, DbErr> {
    let update = update.filter(orders::Column::OrderId.eq(order_id));
    if txn.support_returning() {
        return Ok(update.exec_with_returning(txn).await?.into_iter().next());
    }
    if update.exec(txn).await?.rows_affected != 1 {
        return Ok(None);
    }
    orders::Entity::find_by_id(order_id).one(txn).await
}
