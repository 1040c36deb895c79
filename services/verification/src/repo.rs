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
use yidi_domain::{Credit, Registration};
use yidi_domain::{DecisionPurpose, Sex};
use yidi_runtime::db;

use crate::entities::{citizens, verifications};

pub fn purpose_str(purpose: DecisionPurpose) -> &'static str {
    purpose.as_str()
}

pub fn sex_str(sex: Sex) -> &'static str {
    match sex {
        Sex::Male => "male",
        Sex::Female => "female",
    }
}

fn sex_parse(s: &str) -> Option<Sex> {
    match s {
        "male" => Some(Sex::Male),
        "female" => Some(Sex::Female),
        _ => None,
    }
}

pub fn credit_str(credit: Credit) -> &'static str {
    match credit {
        Credit::Good => "good",
        Credit::Bad => "bad",
    }
}

pub fn registration_str(registration: Registration) -> &'static str {
    match registration {
        Registration::Active => "active",
        Registration::Cancelled => "cancelled",
    }
}

/// A citizen of the register, read into domain types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Citizen {
    pub id_number: String,
    pub name: String,
    pub sex: Sex,
    pub birth_date: NaiveDate,
    pub registration_province: String,
    pub address: String,
    pub face_template: Vec<u8>,
    pub fingerprint_template: Vec<u8>,
    pub credit: Credit,
    pub registration: Registration,
    pub date_of_death: Option<NaiveDate>,
    pub current_card_serial: Option<String>,
    pub current_card_valid_from: Option<NaiveDate>,
    pub current_card_valid_until: Option<NaiveDate>,
}

impl TryFrom<citizens::Model> for Citizen {
    type Error = DbErr;

    fn try_from(m: citizens::Model) -> Result<Self, DbErr> {
        let bad = |column: &str, value: &str| DbErr::Custom(format!("citizens.{column}: unexpected value {value:?}"));
        let sex = sex_parse(&m.sex).ok_or_else(|| bad("sex", &m.sex))?;
        let credit = match m.credit_status.as_str() {
            "good" => Credit::Good,
            "bad" => Credit::Bad,
            other => return Err(bad("credit_status", other)),
        };
        let registration = match m.registration_status.as_str() {
            "active" => Registration::Active,
            "cancelled" => Registration::Cancelled,
            other => return Err(bad("registration_status", other)),
        };
        Ok(Self {
            id_number: m.id_number,
            name: m.name,
            sex,
            birth_date: m.birth_date,
            registration_province: m.registration_province,
            address: m.address,
            face_template: m.face_template,
            fingerprint_template: m.fingerprint_template,
            credit,
            registration,
            date_of_death: m.date_of_death,
            current_card_serial: m.current_card_serial,
            current_card_valid_from: m.current_card_valid_from,
            current_card_valid_until: m.current_card_valid_until,
        })
    }
}

/// A verification to record.
#[derive(Debug, Clone)]
pub struct NewVerification {
    pub application_id: String,
    pub purpose: DecisionPurpose,
    pub station_id: String,
    pub id_number: String,
    pub kind: Option<&'static str>,
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
        citizens::Entity::find_by_id(id_number.to_owned()).one(&self.db).await?.map(Citizen::try_from).transpose()
    }

    pub async fn open_application_ids(&self, id_number: &str) -> Result<Vec<String>, DbErr> {
        open_application_ids(&self.db, id_number).await
    }

    pub async fn verification(
        &self,
        application_id: &str,
        purpose: DecisionPurpose,
    ) -> Result<Option<verifications::Model>, DbErr> {
        verification(&self.db, application_id, purpose).await
    }

    /// Inserts every citizen not yet registered; existing rows are never overwritten.
    /// Returns how many were inserted.
    pub async fn import_citizens(&self, citizens_to_add: Vec<citizens::ActiveModel>) -> Result<u64, DbErr> {
        let tx = self.begin().await?;
        let mut inserted = 0;
        for model in citizens_to_add {
            let result = citizens::Entity::insert(model)
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
) -> Result<Option<verifications::Model>, DbErr> {
    verifications::Entity::find()
        .filter(verifications::Column::ApplicationId.eq(application_id))
        .filter(verifications::Column::Purpose.eq(purpose_str(purpose)))
        .one(db)
        .await
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
    ) -> Result<Option<verifications::Model>, DbErr> {
        verification(&self.txn, application_id, purpose).await
    }

    /// Reads a citizen, locking the row until commit (PostgreSQL; SQLite holds the write lock already).
    pub async fn citizen_for_update(&self, id_number: &str) -> Result<Option<Citizen>, DbErr> {
        citizens::Entity::find_by_id(id_number.to_owned())
            .lock_exclusive()
            .one(&self.txn)
            .await?
            .map(Citizen::try_from)
            .transpose()
    }

    pub async fn open_application_ids(&self, id_number: &str) -> Result<Vec<String>, DbErr> {
        open_application_ids(&self.txn, id_number).await
    }

    pub async fn insert_verification(&self, v: NewVerification) -> Result<(), DbErr> {
        let model = verifications::ActiveModel {
            id: NotSet,
            application_id: Set(v.application_id),
            purpose: Set(purpose_str(v.purpose).to_owned()),
            station_id: Set(v.station_id),
            id_number: Set(v.id_number),
            kind: Set(v.kind.map(str::to_owned)),
            outcome: Set(if v.refusal_reason.is_some() { "refused" } else { "approved" }.to_owned()),
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
            .col_expr(citizens::Column::RegistrationStatus, Expr::value(registration_str(Registration::Cancelled)))
            .col_expr(citizens::Column::DateOfDeath, Expr::value(date_of_death))
            .col_expr(citizens::Column::UpdatedAt, Expr::value(at))
            .filter(citizens::Column::IdNumber.eq(id_number))
            .filter(citizens::Column::RegistrationStatus.eq(registration_str(Registration::Active)))
            .exec(&self.txn)
            .await?;
        Ok(result.rows_affected == 1)
    }

    pub async fn set_credit(&self, id_number: &str, credit: Credit, at: DateTime<Utc>) -> Result<(), DbErr> {
        citizens::Entity::update_many()
            .col_expr(citizens::Column::CreditStatus, Expr::value(credit_str(credit)))
            .col_expr(citizens::Column::UpdatedAt, Expr::value(at))
            .filter(citizens::Column::IdNumber.eq(id_number))
            .exec(&self.txn)
            .await?;
        Ok(())
    }

    /// Closes an open ISSUE_CARD verification; false when it was not open any more.
    pub async fn close_verification(&self, id: i32, state: &str, at: DateTime<Utc>) -> Result<bool, DbErr> {
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

pub fn new_citizen(c: &Citizen, at: DateTime<Utc>) -> citizens::ActiveModel {
    citizens::ActiveModel {
        id_number: Set(c.id_number.clone()),
        name: Set(c.name.clone()),
        sex: Set(sex_str(c.sex).to_owned()),
        birth_date: Set(c.birth_date),
        registration_province: Set(c.registration_province.clone()),
        address: Set(c.address.clone()),
        face_template: Set(c.face_template.clone()),
        fingerprint_template: Set(c.fingerprint_template.clone()),
        credit_status: Set(credit_str(c.credit).to_owned()),
        registration_status: Set(registration_str(c.registration).to_owned()),
        date_of_death: Set(c.date_of_death),
        current_card_serial: Set(c.current_card_serial.clone()),
        current_card_valid_from: Set(c.current_card_valid_from),
        current_card_valid_until: Set(c.current_card_valid_until),
        updated_at: Set(at),
    }
}
