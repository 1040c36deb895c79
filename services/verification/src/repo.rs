//! All database access. Writes go through [`Tx`], a write transaction (IMMEDIATE on SQLite, with
//! the citizen's row locked on PostgreSQL) so that read-decide-write sequences never race.
use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect, SqlErr,
    SqliteTransactionMode, TransactionOptions,
    sea_query::Expr,
};
use yidi_audit::{self as audit, AuditEntry};
use yidi_domain::{ApplicationKind, ApplicationState, Credit, DecisionPurpose, Particulars, Registration};
use yidi_runtime::db;

use crate::entities::{
    StoredClosedState, StoredCredit, StoredOutcome, StoredPurpose, StoredRegistration, citizens, verifications,
};

/// A citizen of the register, read into domain types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Citizen {
    pub person: Particulars,
    pub face_template: Vec<u8>,
    pub fingerprint_template: Vec<u8>,
    pub credit: Credit,
    pub registration: Registration,
    pub date_of_death: Option<NaiveDate>,
    pub current_card_serial: Option<String>,
    pub current_card_valid_from: Option<NaiveDate>,
    pub current_card_valid_until: Option<NaiveDate>,
}

impl From<citizens::Model> for Citizen {
    fn from(m: citizens::Model) -> Self {
        Self {
            person: Particulars {
                id_number: m.id_number,
                name: m.name,
                sex: m.sex.into(),
                birth_date: m.birth_date,
                registration_province: m.registration_province,
                address: m.address,
            },
            face_template: m.face_template,
            fingerprint_template: m.fingerprint_template,
            credit: m.credit_status.into(),
            registration: m.registration_status.into(),
            date_of_death: m.date_of_death,
            current_card_serial: m.current_card_serial,
            current_card_valid_from: m.current_card_valid_from,
            current_card_valid_until: m.current_card_valid_until,
        }
    }
}

/// A recorded Verify answer (approved or refused), read into domain types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub id: i32,
    pub station_id: String,
    pub id_number: String,
    pub kind: Option<ApplicationKind>,
    /// Refusal code (`RefusalReason::code`); None when approved.
    pub refusal_reason: Option<String>,
    /// The answer as stored, replayed unchanged for a repeated request.
    pub response: Vec<u8>,
    /// Term of the card the ISSUE_CARD decision authorises.
    pub valid_from: Option<NaiveDate>,
    pub valid_until: Option<NaiveDate>,
    /// Collected or cancelled, once closed.
    pub closed_state: Option<ApplicationState>,
}

impl From<verifications::Model> for Verification {
    fn from(m: verifications::Model) -> Self {
        Self {
            id: m.id,
            station_id: m.station_id,
            id_number: m.id_number,
            kind: m.kind.map(ApplicationKind::from),
            refusal_reason: m.refusal_reason,
            response: m.response,
            valid_from: m.valid_from,
            valid_until: m.valid_until,
            closed_state: m.closed_state.map(ApplicationState::from),
        }
    }
}

/// A verification to record.
#[derive(Debug, Clone)]
pub struct NewVerification {
    pub application_id: String,
    pub purpose: DecisionPurpose,
    pub station_id: String,
    pub id_number: String,
    pub kind: Option<ApplicationKind>,
    pub refusal_reason: Option<&'static str>,
    pub decision_id: Option<String>,
    pub loss_decision_id: Option<String>,
    pub response: Vec<u8>,
    pub valid_from: Option<NaiveDate>,
    pub valid_until: Option<NaiveDate>,
    pub open: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Repo {
    db: DatabaseConnection,
}

impl Repo {
    /// Appends an audit row on its own (a refusal that changed nothing).
    pub async fn audit(&self, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr> {
        audit::append(&self.db, at, entry).await
    }

    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Starts a write transaction (IMMEDIATE on SQLite: the write lock is taken at BEGIN, so two
    /// writers never both read and then fail to upgrade).
    pub async fn begin(&self) -> Result<Tx, DbErr> {
        let options = TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        Ok(Tx { txn: db::begin_with_options(&self.db, options).await? })
    }

    pub async fn citizen(&self, id_number: &str) -> Result<Option<Citizen>, DbErr> {
        Ok(citizens::Entity::find_by_id(id_number.to_owned()).one(&self.db).await?.map(Citizen::from))
    }

    pub async fn open_application_ids(&self, id_number: &str) -> Result<Vec<String>, DbErr> {
        open_application_ids(&self.db, id_number).await
    }

    pub async fn verification(
        &self,
        application_id: &str,
        purpose: DecisionPurpose,
    ) -> Result<Option<Verification>, DbErr> {
        verification(&self.db, application_id, purpose).await
    }

    /// Inserts every citizen not yet registered; existing rows are never overwritten.
    /// Returns how many were inserted.
    pub async fn import_citizens(&self, citizens_to_add: Vec<Citizen>, at: DateTime<Utc>) -> Result<u64, DbErr> {
        let tx = self.begin().await?;
        let mut inserted = 0;
        for citizen in citizens_to_add {
            let result = citizens::Entity::insert(new_citizen(citizen, at))
                .on_conflict_do_nothing_on([citizens::Column::IdNumber])
                .exec_without_returning(&tx.txn)
                .await?;
            if let sea_orm::TryInsertResult::Inserted(n) = result {
                inserted += n;
            }
        }
        tx.commit().await?;
        Ok(inserted)
    }
}

async fn open_application_ids<C: ConnectionTrait>(db: &C, id_number: &str) -> Result<Vec<String>, DbErr> {
    let rows = verifications::Entity::find()
        .filter(verifications::Column::IdNumber.eq(id_number))
        .filter(verifications::Column::Open.eq(true))
        .order_by_asc(verifications::Column::Id)
        .all(db)
        .await?;
    Ok(rows.into_iter().map(|row| row.application_id).collect())
}

async fn verification<C: ConnectionTrait>(
    db: &C,
    application_id: &str,
    purpose: DecisionPurpose,
) -> Result<Option<Verification>, DbErr> {
    let row = verifications::Entity::find()
        .filter(verifications::Column::ApplicationId.eq(application_id))
        .filter(verifications::Column::Purpose.eq(StoredPurpose::from(purpose)))
        .one(db)
        .await?;
    Ok(row.map(Verification::from))
}

/// A write transaction. Dropped without `commit`, it rolls back.
pub struct Tx {
    txn: db::Transaction,
}

impl Tx {
    pub async fn commit(self) -> Result<(), DbErr> {
        self.txn.commit().await
    }

    pub async fn verification(
        &self,
        application_id: &str,
        purpose: DecisionPurpose,
    ) -> Result<Option<Verification>, DbErr> {
        verification(&self.txn, application_id, purpose).await
    }

    /// Reads a citizen, locking the row until commit (PostgreSQL; SQLite holds the write lock already).
    pub async fn citizen_for_update(&self, id_number: &str) -> Result<Option<Citizen>, DbErr> {
        Ok(citizens::Entity::find_by_id(id_number.to_owned()).lock_exclusive().one(&self.txn).await?.map(Citizen::from))
    }

    pub async fn open_application_ids(&self, id_number: &str) -> Result<Vec<String>, DbErr> {
        open_application_ids(&self.txn, id_number).await
    }

    pub async fn insert_verification(&self, v: NewVerification) -> Result<(), DbErr> {
        let model = verifications::ActiveModel {
            id: NotSet,
            application_id: Set(v.application_id),
            purpose: Set(v.purpose.into()),
            station_id: Set(v.station_id),
            id_number: Set(v.id_number),
            kind: Set(v.kind.map(Into::into)),
            outcome: Set(if v.refusal_reason.is_some() { StoredOutcome::Refused } else { StoredOutcome::Approved }),
            refusal_reason: Set(v.refusal_reason.map(str::to_owned)),
            decision_id: Set(v.decision_id),
            loss_decision_id: Set(v.loss_decision_id),
            response: Set(v.response),
            valid_from: Set(v.valid_from),
            valid_until: Set(v.valid_until),
            open: Set(v.open),
            closed_state: Set(None),
            closed_at: Set(None),
            created_at: Set(v.created_at),
        };
        verifications::Entity::insert(model).exec_without_returning(&self.txn).await?;
        Ok(())
    }

    pub async fn audit(&self, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr> {
        audit::append(&self.txn, at, entry).await
    }

    /// Cancels the registration (idempotent). Returns false when it already was cancelled.
    pub async fn cancel_registration(
        &self,
        id_number: &str,
        date_of_death: NaiveDate,
        at: DateTime<Utc>,
    ) -> Result<bool, DbErr> {
        let result = citizens::Entity::update_many()
            .col_expr(citizens::Column::RegistrationStatus, Expr::value(StoredRegistration::Cancelled))
            .col_expr(citizens::Column::DateOfDeath, Expr::value(date_of_death))
            .col_expr(citizens::Column::UpdatedAt, Expr::value(at))
            .filter(citizens::Column::IdNumber.eq(id_number))
            .filter(citizens::Column::RegistrationStatus.eq(StoredRegistration::Active))
            .exec(&self.txn)
            .await?;
        Ok(result.rows_affected == 1)
    }

    /// S4: the citizen's registration moved to `province` (another bureau's jurisdiction).
    pub async fn move_registration(&self, id_number: &str, province: &str, at: DateTime<Utc>) -> Result<(), DbErr> {
        citizens::Entity::update_many()
            .col_expr(citizens::Column::RegistrationProvince, Expr::value(province))
            .col_expr(citizens::Column::UpdatedAt, Expr::value(at))
            .filter(citizens::Column::IdNumber.eq(id_number))
            .exec(&self.txn)
            .await?;
        Ok(())
    }

    pub async fn set_credit(&self, id_number: &str, credit: Credit, at: DateTime<Utc>) -> Result<(), DbErr> {
        citizens::Entity::update_many()
            .col_expr(citizens::Column::CreditStatus, Expr::value(StoredCredit::from(credit)))
            .col_expr(citizens::Column::UpdatedAt, Expr::value(at))
            .filter(citizens::Column::IdNumber.eq(id_number))
            .exec(&self.txn)
            .await?;
        Ok(())
    }

    /// Closes an open ISSUE_CARD verification; false when it was not open any more.
    pub async fn close_verification(&self, id: i32, state: ApplicationState, at: DateTime<Utc>) -> Result<bool, DbErr> {
        let state = StoredClosedState::try_from(state)?;
        let result = verifications::Entity::update_many()
            .col_expr(verifications::Column::Open, Expr::value(false))
            .col_expr(verifications::Column::ClosedState, Expr::value(state))
            .col_expr(verifications::Column::ClosedAt, Expr::value(at))
            .filter(verifications::Column::Id.eq(id))
            .filter(verifications::Column::ClosedState.is_null())
            .exec(&self.txn)
            .await?;
        Ok(result.rows_affected == 1)
    }

    /// The citizen's current card becomes `serial` with this term.
    pub async fn set_current_card(
        &self,
        id_number: &str,
        serial: &str,
        valid_from: Option<NaiveDate>,
        valid_until: Option<NaiveDate>,
        at: DateTime<Utc>,
    ) -> Result<(), DbErr> {
        citizens::Entity::update_many()
            .col_expr(citizens::Column::CurrentCardSerial, Expr::value(serial))
            .col_expr(citizens::Column::CurrentCardValidFrom, Expr::value(valid_from))
            .col_expr(citizens::Column::CurrentCardValidUntil, Expr::value(valid_until))
            .col_expr(citizens::Column::UpdatedAt, Expr::value(at))
            .filter(citizens::Column::IdNumber.eq(id_number))
            .exec(&self.txn)
            .await?;
        Ok(())
    }
}

/// Whether a database error is a unique-constraint violation (a concurrent duplicate insert).
pub fn is_unique_violation(error: &DbErr) -> bool {
    matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

fn new_citizen(c: Citizen, at: DateTime<Utc>) -> citizens::ActiveModel {
    citizens::ActiveModel {
        id_number: Set(c.person.id_number),
        name: Set(c.person.name),
        sex: Set(c.person.sex.into()),
        birth_date: Set(c.person.birth_date),
        registration_province: Set(c.person.registration_province),
        address: Set(c.person.address),
        face_template: Set(c.face_template),
        fingerprint_template: Set(c.fingerprint_template),
        credit_status: Set(c.credit.into()),
        registration_status: Set(c.registration.into()),
        date_of_death: Set(c.date_of_death),
        current_card_serial: Set(c.current_card_serial),
        current_card_valid_from: Set(c.current_card_valid_from),
        current_card_valid_until: Set(c.current_card_valid_until),
        updated_at: Set(at),
    }
}
