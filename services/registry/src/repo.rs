//! All database access of the registry. Every change of a card is written together with its
//! entries of the replicas' ordered log ([`feed`]), its event row and its audit row in one
//! transaction, committed before the caller waits for the replicas to apply it.
use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, SqlErr, TryInsertResult,
    sea_query::Expr,
};
use tokio_stream::StreamExt;
use yidi_audit::{self as audit, AuditEntry};
use yidi_domain::StoredCardStatus;
use yidi_runtime::db;

use crate::{
    entities::{CardStatusColumn, cards, hits, loss_reports, registration_transfers, status_events},
    feed::{self, CardChange, Entry},
    index::{CardIndex, IndexedCard},
};

/// The columns a check needs, as the index loader reads them.
type IndexRow = (String, String, String, CardStatusColumn, Option<NaiveDate>, DateTime<Utc>);

/// A card as the registry stores it; also what RegisterCard and the import write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    pub serial: String,
    pub id_number: String,
    pub home_bureau_id: String,
    pub status: StoredCardStatus,
    pub valid_from: NaiveDate,
    pub valid_until: Option<NaiveDate>,
    pub decision_id: Option<String>,
    pub producer_id: Option<String>,
    /// C3: the station that hands the card over; None for imported cards.
    pub station_id: Option<String>,
    pub status_changed_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

impl From<cards::Model> for Card {
    fn from(m: cards::Model) -> Self {
        Self {
            serial: m.serial,
            id_number: m.id_number,
            home_bureau_id: m.home_bureau_id,
            status: m.status.into(),
            valid_from: m.valid_from,
            valid_until: m.valid_until,
            decision_id: m.decision_id,
            producer_id: m.producer_id,
            station_id: m.station_id,
            status_changed_at: m.status_changed_at,
            created_at: m.created_at,
        }
    }
}

impl Card {
    /// The card as a change of the ordered log leaves it.
    pub fn change(&self, status_event: bool) -> CardChange {
        CardChange {
            serial: self.serial.clone(),
            id_number: self.id_number.clone(),
            home_bureau_id: self.home_bureau_id.clone(),
            status: self.status,
            valid_until: self.valid_until,
            status_changed_at: self.status_changed_at,
            status_event,
        }
    }
}

/// The cards a registration checks ([`Repo::registration_cards`]).
#[derive(Debug, Clone, Default)]
pub struct RegistrationCards {
    /// The card already made for the decision.
    pub by_decision: Option<Card>,
    /// The holder's cards not revoked, whatever else their status.
    pub active_of_holder: Vec<Card>,
    /// The card that has the serial to register, whoever holds it.
    pub with_serial: Option<Card>,
}

/// One row of `status_events`, as watchers receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEvent {
    pub sequence: u64,
    pub card_serial: String,
    pub status: StoredCardStatus,
    pub changed_at: DateTime<Utc>,
}

impl TryFrom<status_events::Model> for StatusEvent {
    type Error = DbErr;

    fn try_from(m: status_events::Model) -> Result<Self, DbErr> {
        Ok(Self {
            sequence: u64::try_from(m.sequence).map_err(|_| DbErr::Custom("negative sequence".into()))?,
            card_serial: m.card_serial,
            status: m.status.into(),
            changed_at: m.changed_at,
        })
    }
}

/// A check of a card reported lost (C4).
#[derive(Debug, Clone)]
pub struct NewHit {
    pub card_serial: String,
    pub id_number: String,
    pub home_bureau_id: String,
    pub relying_party: String,
    pub checked_at: DateTime<Utc>,
}

/// A stored hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Its place in the order hits were recorded: a home bureau resumes after it.
    pub id: i64,
    pub card_serial: String,
    pub id_number: String,
    pub relying_party: String,
    pub checked_at: DateTime<Utc>,
}

/// A loss report's (or its withdrawal's) decision on a card, with its audit record.
#[derive(Debug, Clone)]
pub struct LossDecision<'a> {
    pub serial: &'a str,
    pub decision_id: &'a str,
    pub now: DateTime<Utc>,
    pub audit: AuditEntry,
}

/// S4: a citizen's registration moved from one home bureau to another; the cards follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub decision_id: String,
    pub id_number: String,
    pub from_bureau_id: String,
    pub to_bureau_id: String,
    pub transferred_at: DateTime<Utc>,
}

impl From<registration_transfers::Model> for Transfer {
    fn from(m: registration_transfers::Model) -> Self {
        Self {
            decision_id: m.decision_id,
            id_number: m.id_number,
            from_bureau_id: m.from_bureau_id,
            to_bureau_id: m.to_bureau_id,
            transferred_at: m.transferred_at,
        }
    }
}

/// Whether a conditional status change found the card in the expected status.
#[derive(Debug)]
pub enum Change<T> {
    Done(T),
    /// The card changed meanwhile; nothing was written. The caller re-reads and decides again.
    Raced,
}

#[derive(Clone)]
pub struct Repo {
    db: DatabaseConnection,
}

/// Moves `serial` from `from` to `to` if it still is in `from`: the card as it now is, for the
/// log. `None`: the card was not in `from` (nothing written).
async fn move_status<C: ConnectionTrait>(
    db: &C,
    serial: &str,
    from: StoredCardStatus,
    to: StoredCardStatus,
    now: DateTime<Utc>,
) -> Result<Option<CardChange>, DbErr> {
    if !from.can_move_to(to) {
        return Err(DbErr::Custom(format!("transition {} -> {} is not allowed", from.as_str(), to.as_str())));
    }
    let updated = cards::Entity::update_many()
        .col_expr(cards::Column::Status, Expr::value(CardStatusColumn::from(to)))
        .col_expr(cards::Column::StatusChangedAt, Expr::value(now))
        .filter(cards::Column::Serial.eq(serial))
        .filter(cards::Column::Status.eq(CardStatusColumn::from(from)))
        .exec(db)
        .await?;
    if updated.rows_affected != 1 {
        return Ok(None);
    }
    let card = cards::Entity::find_by_id(serial.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("card {serial}")))?;
    Ok(Some(Card::from(card).change(true)))
}

fn card_model(card: Card) -> cards::ActiveModel {
    cards::ActiveModel {
        serial: Set(card.serial),
        id_number: Set(card.id_number),
        home_bureau_id: Set(card.home_bureau_id),
        status: Set(card.status.into()),
        valid_from: Set(card.valid_from),
        valid_until: Set(card.valid_until),
        decision_id: Set(card.decision_id),
        producer_id: Set(card.producer_id),
        status_changed_at: Set(card.status_changed_at),
        created_at: Set(card.created_at),
        revoked_by: Set(None),
        station_id: Set(card.station_id),
    }
}

impl Repo {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Serialises this holder's writes across every replica until the lock is dropped.
    pub async fn lock_holder(&self, id_number: &str) -> Result<feed::HolderLock, DbErr> {
        feed::HolderLock::acquire(&self.db, id_number).await
    }

    pub async fn card(&self, serial: &str) -> Result<Option<Card>, DbErr> {
        Ok(cards::Entity::find_by_id(serial.to_owned()).one(&self.db).await?.map(Card::from))
    }

    /// Every card, into a new index sized for them (read as one stream, never all in memory).
    pub async fn load_index(&self) -> Result<CardIndex, DbErr> {
        let count = cards::Entity::find().count(&self.db).await?;
        let mut index = CardIndex::loader(usize::try_from(count).unwrap_or(0));
        let mut rows = cards::Entity::find()
            .select_only()
            .columns([
                cards::Column::Serial,
                cards::Column::IdNumber,
                cards::Column::HomeBureauId,
                cards::Column::Status,
                cards::Column::ValidUntil,
                cards::Column::StatusChangedAt,
            ])
            .into_tuple::<IndexRow>()
            .stream(&self.db)
            .await?;
        while let Some(row) = rows.next().await {
            let (serial, id_number, home_bureau_id, status, valid_until, status_changed_at) = row?;
            let card = IndexedCard {
                serial: &serial,
                id_number: &id_number,
                home_bureau_id: &home_bureau_id,
                status: status.into(),
                valid_until,
                status_changed_at,
            };
            index.push(card).map_err(|e| DbErr::Custom(e.to_string()))?;
        }
        Ok(index.finish())
    }

    /// Every card of a holder, whatever its status.
    pub async fn cards_of(&self, id_number: &str) -> Result<Vec<Card>, DbErr> {
        Ok(cards::Entity::find()
            .filter(cards::Column::IdNumber.eq(id_number))
            .all(&self.db)
            .await?
            .into_iter()
            .map(Card::from)
            .collect())
    }

    /// What a registration checks before it writes, read in one query: the card made for
    /// `decision_id`, the holder's cards in force and the card that already has `serial`.
    pub async fn registration_cards(
        &self,
        decision_id: &str,
        holder: &str,
        serial: &str,
    ) -> Result<RegistrationCards, DbErr> {
        let cards = cards::Entity::find()
            .filter(
                Condition::any()
                    .add(cards::Column::DecisionId.eq(decision_id))
                    .add(cards::Column::IdNumber.eq(holder))
                    .add(cards::Column::Serial.eq(serial)),
            )
            .all(&self.db)
            .await?;
        let mut found = RegistrationCards::default();
        for card in cards.into_iter().map(Card::from) {
            if card.decision_id.as_deref() == Some(decision_id) {
                found.by_decision = Some(card.clone());
            }
            if card.serial == serial {
                found.with_serial = Some(card.clone());
            }
            if card.id_number == holder && card.status != StoredCardStatus::Revoked {
                found.active_of_holder.push(card);
            }
        }
        Ok(found)
    }

    /// Serials of the cards the registration of `serial` revoked.
    pub async fn revoked_by_collection(&self, serial: &str) -> Result<Vec<String>, DbErr> {
        let models = cards::Entity::find()
            .filter(cards::Column::RevokedBy.eq(serial))
            .order_by_asc(cards::Column::Serial)
            .all(&self.db)
            .await?;
        Ok(models.into_iter().map(|m| m.serial).collect())
    }

    pub async fn loss_report_decision_used(&self, decision_id: &str) -> Result<bool, DbErr> {
        Ok(loss_reports::Entity::find()
            .filter(loss_reports::Column::DecisionId.eq(decision_id))
            .one(&self.db)
            .await?
            .is_some())
    }

    pub async fn withdraw_decision_used(&self, decision_id: &str) -> Result<bool, DbErr> {
        Ok(loss_reports::Entity::find()
            .filter(loss_reports::Column::WithdrawDecisionId.eq(decision_id))
            .one(&self.db)
            .await?
            .is_some())
    }

    pub async fn audit(&self, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr> {
        audit::append(&self.db, at, entry).await
    }

    pub async fn transfer_by_decision(&self, decision_id: &str) -> Result<Option<Transfer>, DbErr> {
        Ok(registration_transfers::Entity::find()
            .filter(registration_transfers::Column::DecisionId.eq(decision_id))
            .one(&self.db)
            .await?
            .map(Transfer::from))
    }

    /// The holder's most recent registration transfer, if any.
    pub async fn latest_transfer(&self, id_number: &str) -> Result<Option<Transfer>, DbErr> {
        Ok(registration_transfers::Entity::find()
            .filter(registration_transfers::Column::IdNumber.eq(id_number))
            .order_by_desc(registration_transfers::Column::Id)
            .one(&self.db)
            .await?
            .map(Transfer::from))
    }

    /// S4: records the transfer and moves every card of the holder that follows its old home
    /// bureau to the new one, with the audit record, in one transaction. The serials moved.
    pub async fn transfer_registration(
        &self,
        transfer: Transfer,
        audit: impl FnOnce(&[String]) -> AuditEntry,
    ) -> Result<(Vec<String>, Vec<Entry>), DbErr> {
        let Transfer { decision_id, id_number, from_bureau_id, to_bureau_id, transferred_at } = transfer;
        let txn = db::begin(&self.db).await?;
        // The insert comes first: on SQLite it takes the write lock before anything is read.
        registration_transfers::Entity::insert(registration_transfers::ActiveModel {
            id: NotSet,
            decision_id: Set(decision_id),
            id_number: Set(id_number.clone()),
            from_bureau_id: Set(from_bureau_id.clone()),
            to_bureau_id: Set(to_bureau_id.clone()),
            transferred_at: Set(transferred_at),
        })
        .exec_without_returning(&txn)
        .await?;
        let moved: Vec<String> = cards::Entity::find()
            .filter(cards::Column::IdNumber.eq(id_number.as_str()))
            .filter(cards::Column::HomeBureauId.eq(from_bureau_id.as_str()))
            .order_by_asc(cards::Column::Serial)
            .all(&txn)
            .await?
            .into_iter()
            .map(|m| m.serial)
            .collect();
        cards::Entity::update_many()
            .col_expr(cards::Column::HomeBureauId, Expr::value(to_bureau_id.as_str()))
            .filter(cards::Column::IdNumber.eq(id_number.as_str()))
            .filter(cards::Column::HomeBureauId.eq(from_bureau_id.as_str()))
            .exec(&txn)
            .await?;
        let changes = cards::Entity::find()
            .filter(cards::Column::Serial.is_in(moved.iter().map(String::as_str)))
            .order_by_asc(cards::Column::Serial)
            .all(&txn)
            .await?
            .into_iter()
            .map(|m| Card::from(m).change(false))
            .collect();
        audit::append(&txn, transferred_at, audit(&moved)).await?;
        let entries = feed::append(&txn, changes).await?;
        txn.commit().await?;
        Ok((moved, entries))
    }

    /// Opens the transaction of a status change and moves the card; `None` (rolled back, nothing
    /// written) if the card was no longer in `from`.
    async fn begin_move(
        &self,
        serial: &str,
        from: StoredCardStatus,
        to: StoredCardStatus,
        now: DateTime<Utc>,
    ) -> Result<Option<(db::Transaction, CardChange)>, DbErr> {
        let txn = db::begin(&self.db).await?;
        match move_status(&txn, serial, from, to, now).await? {
            Some(change) => Ok(Some((txn, change))),
            None => {
                txn.rollback().await?;
                Ok(None)
            }
        }
    }

    /// A loss report for a card that already stands reported lost: the decision is used, no change.
    pub async fn record_loss_report(&self, decision: LossDecision<'_>) -> Result<(), DbErr> {
        let LossDecision { serial, decision_id, now, audit } = decision;
        let txn = db::begin(&self.db).await?;
        insert_loss_report(&txn, serial, decision_id, now).await?;
        audit::append(&txn, now, audit).await?;
        txn.commit().await
    }

    /// Valid → reported lost, with the loss report, the event and the audit record.
    pub async fn report_loss(&self, decision: LossDecision<'_>) -> Result<Change<Vec<Entry>>, DbErr> {
        let LossDecision { serial, decision_id, now, audit } = decision;
        let (from, to) = (StoredCardStatus::Valid, StoredCardStatus::ReportedLost);
        let Some((txn, change)) = self.begin_move(serial, from, to, now).await? else {
            return Ok(Change::Raced);
        };
        insert_loss_report(&txn, serial, decision_id, now).await?;
        audit::append(&txn, now, audit).await?;
        commit_with(txn, vec![change]).await
    }

    /// Reported lost → valid (K6): the open loss reports are closed, the latest with the decision.
    pub async fn withdraw_loss_report(&self, decision: LossDecision<'_>) -> Result<Change<Vec<Entry>>, DbErr> {
        let LossDecision { serial, decision_id, now, audit } = decision;
        let (from, to) = (StoredCardStatus::ReportedLost, StoredCardStatus::Valid);
        let Some((txn, change)) = self.begin_move(serial, from, to, now).await? else {
            return Ok(Change::Raced);
        };
        let open = loss_reports::Entity::find()
            .filter(loss_reports::Column::CardSerial.eq(serial))
            .filter(loss_reports::Column::WithdrawnAt.is_null())
            .order_by_desc(loss_reports::Column::Id)
            .all(&txn)
            .await?;
        match open.first() {
            Some(latest) => {
                loss_reports::Entity::update_many()
                    .col_expr(loss_reports::Column::WithdrawnAt, Expr::value(now))
                    .col_expr(loss_reports::Column::WithdrawDecisionId, Expr::value(decision_id))
                    .filter(loss_reports::Column::Id.eq(latest.id))
                    .exec(&txn)
                    .await?;
                loss_reports::Entity::update_many()
                    .col_expr(loss_reports::Column::WithdrawnAt, Expr::value(now))
                    .filter(loss_reports::Column::CardSerial.eq(serial))
                    .filter(loss_reports::Column::WithdrawnAt.is_null())
                    .exec(&txn)
                    .await?;
            }
            None => {
                // A loss report without a row (should not happen: imports write one): record the
                // withdrawal anyway so its decision stays single-use.
                loss_reports::Entity::insert(loss_reports::ActiveModel {
                    id: NotSet,
                    card_serial: Set(serial.to_owned()),
                    decision_id: Set(format!("unrecorded:{decision_id}")),
                    reported_at: Set(now),
                    withdrawn_at: Set(Some(now)),
                    withdraw_decision_id: Set(Some(decision_id.to_owned())),
                })
                .exec_without_returning(&txn)
                .await?;
            }
        }
        audit::append(&txn, now, audit).await?;
        commit_with(txn, vec![change]).await
    }

    /// C3: inserts a card its producer made, awaiting collection; the holder's other cards keep
    /// their status until the collection (`collect_card`).
    pub async fn register_card(&self, card: Card, now: DateTime<Utc>, audit: AuditEntry) -> Result<Vec<Entry>, DbErr> {
        let txn = db::begin(&self.db).await?;
        let change = card.change(false);
        cards::Entity::insert(card_model(card)).exec_without_returning(&txn).await?;
        audit::append(&txn, now, audit).await?;
        let entries = feed::append(&txn, vec![change]).await?;
        txn.commit().await?;
        Ok(entries)
    }

    /// C3, S1: the holder collected `serial`: it becomes valid and every other card of the holder
    /// that is or may still become valid is revoked, one event per card, all in one transaction.
    /// `Raced` if the card was no longer awaiting collection.
    pub async fn collect_card(
        &self,
        serial: &str,
        id_number: &str,
        now: DateTime<Utc>,
        audit: impl FnOnce(&[String]) -> AuditEntry,
    ) -> Result<Change<Vec<Entry>>, DbErr> {
        let (from, to) = (StoredCardStatus::Made, StoredCardStatus::Valid);
        let Some((txn, collected)) = self.begin_move(serial, from, to, now).await? else {
            return Ok(Change::Raced);
        };
        let superseded: Vec<CardStatusColumn> = StoredCardStatus::ALL
            .into_iter()
            .filter(|status| status.superseded_by_collection())
            .map(CardStatusColumn::from)
            .collect();
        let others = cards::Entity::find()
            .filter(cards::Column::IdNumber.eq(id_number))
            .filter(cards::Column::Serial.ne(serial))
            .filter(cards::Column::Status.is_in(superseded))
            .order_by_asc(cards::Column::Serial)
            .all(&txn)
            .await?;
        let mut changes = vec![collected];
        for other in others {
            let from = StoredCardStatus::from(other.status);
            if let Some(change) = move_status(&txn, &other.serial, from, StoredCardStatus::Revoked, now).await? {
                cards::Entity::update_many()
                    .col_expr(cards::Column::RevokedBy, Expr::value(serial))
                    .filter(cards::Column::Serial.eq(other.serial.as_str()))
                    .exec(&txn)
                    .await?;
                changes.push(change);
            }
        }
        let revoked: Vec<String> = changes[1..].iter().map(|c| c.serial.clone()).collect();
        audit::append(&txn, now, audit(&revoked)).await?;
        commit_with(txn, changes).await
    }

    /// C3: the cards made before `made_before` and still awaiting collection, oldest first.
    pub async fn overdue_cards(&self, made_before: DateTime<Utc>, limit: u64) -> Result<Vec<Card>, DbErr> {
        Ok(cards::Entity::find()
            .filter(cards::Column::Status.eq(CardStatusColumn::Made))
            .filter(cards::Column::StatusChangedAt.lt(made_before))
            .order_by_asc(cards::Column::StatusChangedAt)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(Card::from)
            .collect())
    }

    /// C3: a card never collected in time becomes void, with its event and audit record. The
    /// holder's other cards were never touched by it, so they keep their status.
    pub async fn void_card(
        &self,
        serial: &str,
        now: DateTime<Utc>,
        audit: AuditEntry,
    ) -> Result<Change<Vec<Entry>>, DbErr> {
        let (from, to) = (StoredCardStatus::Made, StoredCardStatus::Voided);
        let Some((txn, change)) = self.begin_move(serial, from, to, now).await? else {
            return Ok(Change::Raced);
        };
        audit::append(&txn, now, audit).await?;
        commit_with(txn, vec![change]).await
    }

    /// Imports a legacy card if its serial is not yet known; never overwrites. A card already
    /// reported lost gets a loss report row `import:<serial>` so a withdrawal can close it.
    /// `first_day_began`: when the card's first valid day began (in the clock's zone).
    /// Its entry of the log if it was imported.
    pub async fn import_card(
        &self,
        mut card: Card,
        first_day_began: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Option<Entry>, DbErr> {
        if cards::Entity::find_by_id(card.serial.clone()).one(&self.db).await?.is_some() {
            return Ok(None);
        }
        let serial = card.serial.clone();
        let lost = card.status == StoredCardStatus::ReportedLost;
        // A legacy valid card has been valid since its first day; when a legacy loss report was
        // made is unknown, so it counts from the import.
        card.status_changed_at = if lost { now } else { first_day_began.min(now) };
        card.created_at = now;
        let txn = db::begin(&self.db).await?;
        let inserted = cards::Entity::insert(card_model(card.clone()))
            .on_conflict_do_nothing()
            .exec_without_returning(&txn)
            .await?;
        if !matches!(inserted, TryInsertResult::Inserted(n) if n > 0) {
            txn.rollback().await?;
            return Ok(None);
        }
        if lost {
            insert_loss_report(&txn, &serial, &format!("import:{serial}"), now).await?;
        }
        let entries = feed::append(&txn, vec![card.change(false)]).await?;
        txn.commit().await?;
        Ok(entries.into_iter().next())
    }

    /// C4: hits, in one multi-row insert.
    pub async fn record_hits(&self, new: Vec<NewHit>) -> Result<(), DbErr> {
        if new.is_empty() {
            return Ok(());
        }
        let models = new.into_iter().map(|h| hits::ActiveModel {
            id: NotSet,
            card_serial: Set(h.card_serial),
            id_number: Set(h.id_number),
            home_bureau_id: Set(h.home_bureau_id),
            relying_party: Set(h.relying_party),
            checked_at: Set(h.checked_at),
        });
        hits::Entity::insert_many(models).exec_without_returning(&self.db).await?;
        Ok(())
    }

    /// Hits on the cards of `home_bureau_id` recorded after the hit `after`, oldest first.
    pub async fn hits(&self, home_bureau_id: &str, after: i64, limit: u64) -> Result<Vec<Hit>, DbErr> {
        let models = hits::Entity::find()
            .filter(hits::Column::HomeBureauId.eq(home_bureau_id))
            .filter(hits::Column::Id.gt(after))
            .order_by_asc(hits::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        Ok(models
            .into_iter()
            .map(|m| Hit {
                id: m.id,
                card_serial: m.card_serial,
                id_number: m.id_number,
                relying_party: m.relying_party,
                checked_at: m.checked_at,
            })
            .collect())
    }

    /// Status events with a sequence greater than `after`, oldest first.
    pub async fn events_after(&self, after: u64, limit: u64) -> Result<Vec<StatusEvent>, DbErr> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        status_events::Entity::find()
            .filter(status_events::Column::Sequence.gt(after))
            .order_by_asc(status_events::Column::Sequence)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(StatusEvent::try_from)
            .collect()
    }

    pub async fn close(self) -> Result<(), DbErr> {
        self.db.close().await
    }
}

/// Appends the changes to the log and commits.
async fn commit_with(txn: db::Transaction, changes: Vec<CardChange>) -> Result<Change<Vec<Entry>>, DbErr> {
    let entries = feed::append(&txn, changes).await?;
    txn.commit().await?;
    Ok(Change::Done(entries))
}

/// Whether a database error is a unique-constraint violation (a concurrent duplicate insert).
pub fn is_unique_violation(error: &DbErr) -> bool {
    matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

async fn insert_loss_report<C: ConnectionTrait>(
    db: &C,
    serial: &str,
    decision_id: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    loss_reports::Entity::insert(loss_reports::ActiveModel {
        id: NotSet,
        card_serial: Set(serial.to_owned()),
        decision_id: Set(decision_id.to_owned()),
        reported_at: Set(now),
        withdrawn_at: Set(None),
        withdraw_decision_id: Set(None),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}
