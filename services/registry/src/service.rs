//! The registry's rules (S1, S4, C2, C4, K6) on validated domain values. No tonic types here.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use sea_orm::{DbBackend, DbErr};
use tokio::sync::{Mutex, broadcast, mpsc};
use yidi_audit::AuditEntry;
use yidi_domain::{
    CardStatus, DecisionError, DecisionPurpose, IdNumber, RefusalReason, Role, SignedDecision, StoredCardStatus,
    decision::Expectation,
    mask::mask_id_number,
    status::{SignedStatusStatement, StatusStatement, id_number_hash},
};
use yidi_grpc::ApiError;
use yidi_runtime::{Clock, Shutdown, directory::DirectoryHandle, population::Population, signing::KeyRing};
use yidi_status_filter::{CardKey, CardReceipt};

use crate::{
    feed::{self, Entry, Freshness},
    index::{CardIndex, CardState, IndexedCard},
    limit::MissBudgets,
    repo::{Card, Change, Hit, LossDecision, NewHit, Repo, StatusEvent, Transfer, is_unique_violation},
    statements::{self, StatementCache},
};

/// How often a status change is retried when another writer changed the card meanwhile.
const ATTEMPTS: usize = 3;
/// Events read from the database per query when a watcher catches up.
const BACKLOG_PAGE: u64 = 500;
/// Capacity of the live event channel; a watcher that falls further behind re-reads the database.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;
/// Entries of the log read per query when a replica catches up.
const FEED_PAGE: u64 = 1000;
/// Added to the fence bound before a write is acknowledged without a replica's confirmation:
/// the replicas' and the writer's clocks may run at slightly different rates.
const FENCE_MARGIN: Duration = Duration::from_millis(10);
/// How often a writer looks whether every replica has applied its write.
const ACK_POLL: Duration = Duration::from_millis(2);
/// A replica not confirmed for this many fence bounds is forgotten by writers (stopped or gone).
const PRUNE_AFTER_FENCES: u32 = 10;

/// Where this replica stands among the others on its database (issue 15).
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// Unique among the replicas of one database.
    pub id: String,
    /// S1: checks are answered only within this long after the last proof of freshness.
    pub fence: Duration,
    /// How often the head of the log is read when no notification comes.
    pub poll: Duration,
}

/// What a write holds from its decision to its commit ([`Registry::lock_for_write`]).
struct WriteLocks<'a> {
    _writer: tokio::sync::MutexGuard<'a, ()>,
    _holder: feed::HolderLock,
}

/// One entry of the log as the live watchers receive it: every sequence, so a watcher can tell a
/// gap from an entry that is no status event.
#[derive(Debug, Clone)]
pub struct LogItem {
    pub sequence: u64,
    pub event: Option<StatusEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossOutcome {
    pub card_serial: String,
    pub status: CardStatus,
    pub changed_at: DateTime<Utc>,
    pub already_reported: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithdrawOutcome {
    pub card_serial: String,
    pub status: CardStatus,
    pub changed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterOutcome {
    pub card_serial: String,
    pub status: CardStatus,
}

/// C3: a station reports the hand-over of a card (validated).
#[derive(Debug, Clone)]
pub struct Collection {
    pub station_id: String,
    pub id_number: IdNumber,
    pub card_serial: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectOutcome {
    pub card_serial: String,
    pub status: CardStatus,
    pub revoked_card_serials: Vec<String>,
    pub collected_at: DateTime<Utc>,
    pub already_recorded: bool,
}

/// S4: where a citizen's cards stand after a registration transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferOutcome {
    /// The home bureau whose decisions the cards follow from now on.
    pub home_bureau_id: String,
    /// The cards that follow it (for a repeat: every card of the holder that does).
    pub card_serials: Vec<String>,
    pub transferred_at: DateTime<Utc>,
    /// True when this transfer was already recorded; nothing was changed.
    pub already_transferred: bool,
}

/// One card a relying party asks about (C4: number and serial, both validated).
#[derive(Debug, Clone)]
pub struct CardQuery {
    pub id_number: IdNumber,
    pub card_serial: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub status: CardStatus,
    /// When the card entered `status`; None for UNKNOWN.
    pub status_changed_at: Option<DateTime<Utc>>,
}

/// What relying parties' checks need besides the index: the keys answers are signed with, and
/// the limit on misses.
pub struct Checks {
    pub keys: Arc<KeyRing>,
    pub limiter: MissBudgets,
    /// C3: how long a made card may await collection before it is voided.
    pub collection_deadline: chrono::Duration,
    /// C4: the statements served again instead of a signature per answer.
    pub statements: StatementCache,
    /// C4: `next_update` − `answered_at` of every statement.
    pub statement_validity: chrono::Duration,
}

pub struct Registry {
    checks: Checks,
    repo: Repo,
    /// Every card's status; checks read only this. Updated only from the ordered log, in its order.
    index: CardIndex,
    directory: DirectoryHandle,
    clock: Clock,
    bureau_id: String,
    events: broadcast::Sender<LogItem>,
    /// One write at a time in this process (a connection for the holder's lock, one for the write);
    /// writes of several replicas are serialised per holder by the database ([`Repo::lock_holder`]).
    writer: Mutex<()>,
    shutdown: Shutdown,
    replica: ReplicaSettings,
    freshness: Arc<Freshness>,
}

/// N2: identity numbers are stored and compared with an upper-case check character.
fn normalised(id_number: &str) -> String {
    id_number.trim().to_ascii_uppercase()
}

/// C2: the status a relying party is told at `at`, and since when; dates are the clock's.
fn answer_state(
    status: StoredCardStatus,
    valid_until: Option<NaiveDate>,
    changed_at: DateTime<Utc>,
    clock: &Clock,
    at: DateTime<Utc>,
) -> CheckResult {
    let status = status.effective(valid_until, clock.date_of(at));
    let status_changed_at = match (status, valid_until.and_then(|until| until.succ_opt())) {
        // An expired card entered EXPIRED at the start of the day after its last valid day.
        (CardStatus::Expired, Some(first_expired_day)) => clock.start_of(first_expired_day),
        _ => changed_at,
    };
    CheckResult { status, status_changed_at: Some(status_changed_at) }
}

/// C2: the status a relying party is told about a stored card at `at`, and since when.
pub fn answer(card: &Card, clock: &Clock, at: DateTime<Utc>) -> CheckResult {
    answer_state(card.status, card.valid_until, card.status_changed_at, clock, at)
}

/// C4: a card is known to a relying party only under the number of its holder (the index finds
/// a card only under it).
pub fn check_one(state: Option<&CardState>, clock: &Clock, at: DateTime<Utc>) -> CheckResult {
    match state {
        Some(state) => answer_state(state.status, state.valid_until, state.status_changed_at, clock, at),
        None => CheckResult { status: CardStatus::Unknown, status_changed_at: None },
    }
}

impl Registry {
    /// `index` holds every card of `repo` ([`Repo::load_index`]) as of the log's entry `applied`
    /// or later (the head read before the index was loaded).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        repo: Repo,
        (index, applied): (CardIndex, u64),
        directory: DirectoryHandle,
        clock: Clock,
        bureau_id: String,
        shutdown: Shutdown,
        checks: Checks,
        replica: ReplicaSettings,
    ) -> Self {
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let freshness = Arc::new(Freshness::new(replica.fence, applied));
        Self {
            checks,
            repo,
            index,
            directory,
            clock,
            bureau_id,
            events,
            writer: Mutex::new(()),
            shutdown,
            replica,
            freshness,
        }
    }

    /// S1: how fresh this replica can prove it is (health and checks read it).
    pub fn freshness(&self) -> Arc<Freshness> {
        Arc::clone(&self.freshness)
    }

    fn on_postgres(&self) -> bool {
        self.repo.db().get_database_backend() == DbBackend::Postgres
    }

    /// Joins the replicas of the database and applies the log up to its head: afterwards this
    /// replica may answer checks.
    pub async fn join(&self) -> Result<(), DbErr> {
        if self.on_postgres() {
            feed::join(self.repo.db(), &self.replica.id, self.freshness.applied()).await?;
        }
        while !self.follow_once().await? {}
        Ok(())
    }

    /// Follows the log until shutdown (LISTEN as the wake-up on PostgreSQL, a poll of the head in
    /// any case), then leaves the replicas.
    pub fn spawn_follower(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut listener = self.listen().await;
            let mut pruned = Instant::now();
            let prune_every = self.replica.fence * PRUNE_AFTER_FENCES / 2;
            // Said once when it starts failing and once when it recovers, not at every poll.
            let mut failing = false;
            loop {
                match self.follow_once().await {
                    Ok(true) if failing => {
                        failing = false;
                        tracing::info!("following the registry's log again: checks answered");
                    }
                    Ok(true) => {}
                    // Joined again after being pruned: read the head again at once.
                    Ok(false) => continue,
                    Err(error) if failing => tracing::debug!(%error, "still cannot follow the registry's log"),
                    Err(error) => {
                        failing = true;
                        tracing::warn!(%error, "cannot follow the registry's log: checks fenced until it can");
                    }
                }
                if pruned.elapsed() >= prune_every {
                    pruned = Instant::now();
                    self.prune().await;
                }
                let poll = self.replica.poll;
                let notified = async {
                    match listener.as_mut() {
                        Some(listener) => loop {
                            match listener.recv().await {
                                // A write already applied (this replica's own, applied when the
                                // writer nudged it) asks for nothing.
                                Ok(notice)
                                    if notice
                                        .payload()
                                        .parse::<u64>()
                                        .is_ok_and(|last| last <= self.freshness.applied()) => {}
                                Ok(_) => break,
                                Err(error) => {
                                    tracing::debug!(%error, "registry log notification lost");
                                    tokio::time::sleep(poll).await;
                                    break;
                                }
                            }
                        },
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = self.shutdown.wait() => break,
                    () = self.freshness.nudge.notified() => {}
                    () = notified => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
            if self.on_postgres()
                && let Err(error) = feed::leave(self.repo.db(), &self.replica.id).await
            {
                tracing::warn!(%error, "cannot leave the replicas: writers wait for this one until it is pruned");
            }
        })
    }

    /// Forgets the replicas not heard of for [`PRUNE_AFTER_FENCES`] bounds, and the entries of the
    /// log every replica has long applied; learns which callers are out of misses (C4).
    async fn prune(&self) {
        let db = self.repo.db();
        if self.on_postgres() {
            match feed::prune(db, self.replica.fence * PRUNE_AFTER_FENCES).await {
                Ok(0) => {}
                Ok(gone) => tracing::warn!(gone, "replicas not heard of for a while forgotten"),
                Err(error) => tracing::warn!(%error, "cannot prune the replicas"),
            }
        }
        if let Err(error) = feed::trim(db, self.freshness.applied(), feed::RETAINED_ENTRIES).await {
            tracing::warn!(%error, "cannot trim the registry's log");
        }
        if let Err(error) = self.checks.limiter.sync(Instant::now()).await {
            tracing::warn!(%error, "cannot read the shared miss budgets");
        }
    }

    async fn listen(&self) -> Option<sqlx::postgres::PgListener> {
        if !self.on_postgres() {
            return None;
        }
        let listening = async {
            let mut listener =
                sqlx::postgres::PgListener::connect_with(self.repo.db().get_postgres_connection_pool()).await?;
            listener.listen(feed::FEED_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listening.await {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for the registry's log: polling only");
                None
            }
        }
    }

    /// Reads the head of the log, applies every entry up to it and records how far this replica
    /// is; then it is confirmed from the instant the read was sent. False when its row had been
    /// pruned: it joined again, and only a read sent after that may confirm it.
    async fn follow_once(&self) -> Result<bool, DbErr> {
        let db = self.repo.db();
        let sent = Instant::now();
        let head = feed::head(db).await?;
        let mut applied = self.freshness.applied();
        while applied < head.sequence {
            let entries = feed::entries(db, applied, head.sequence, FEED_PAGE).await?;
            if entries.is_empty() {
                return Err(DbErr::Custom(format!("the log has no entry after {applied} below its head")));
            }
            for entry in &entries {
                if entry.sequence != applied + 1 {
                    return Err(DbErr::Custom(format!("the log has a gap after {applied}")));
                }
                self.apply(entry);
                applied = entry.sequence;
            }
            self.freshness.set_applied(applied);
        }
        if let Some(read_at) = head.read_at {
            self.freshness.confirming(sent);
            let recorded = feed::record(db, &self.replica.id, applied, read_at).await;
            if !matches!(recorded, Ok(true)) {
                self.freshness.not_confirmed();
            }
            if !recorded? {
                feed::join(db, &self.replica.id, applied).await?;
                return Ok(false);
            }
        }
        self.freshness.confirm(sent);
        Ok(true)
    }

    /// One entry of the log reaches the index and the live watchers. C4: a changed card's cached
    /// statement is dropped, so no check after it is answered with the old one.
    fn apply(&self, entry: &Entry) {
        self.index_card(entry.change.indexed());
        // No receiver is not an error: nobody watches.
        let _ = self.events.send(LogItem { sequence: entry.sequence, event: entry.status_event() });
    }

    /// Locks a write for `holder` until its commit: this process's writer lock, then the holder's
    /// lock in the database. Released before the write waits for the replicas
    /// ([`Self::acknowledge`]), so that a stopped replica slows each write by at most the fence
    /// bound without queueing the others behind it.
    async fn lock_for_write(&self, holder: &str) -> Result<WriteLocks<'_>, ApiError> {
        let writer = self.writer.lock().await;
        let holder = self.repo.lock_holder(holder).await?;
        Ok(WriteLocks { _writer: writer, _holder: holder })
    }

    /// S1 across replicas: a committed write is answered only once every replica serving checks
    /// has applied it: this one (so its own next check sees it) and every other recorded in
    /// `registry_replicas`; or once the fence bound has passed since the commit, by when a
    /// replica that has not applied it has fenced itself (its last confirmation came from a head
    /// read sent before the commit). The last sequence of the write.
    async fn acknowledge(&self, entries: &[Entry]) -> u64 {
        let Some(last) = entries.last().map(|entry| entry.sequence) else {
            return self.freshness.applied();
        };
        let deadline = Instant::now() + self.replica.fence + FENCE_MARGIN;
        self.freshness.nudge.notify_one();
        if !self.freshness.applied_by(last, deadline).await {
            tracing::warn!(sequence = last, "acknowledged before this replica applied it: fenced until it has");
        }
        if self.on_postgres() {
            loop {
                match feed::laggards(self.repo.db(), last, &self.replica.id).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "cannot read how far the replicas are: waiting out the fence"),
                }
                let now = Instant::now();
                if now >= deadline {
                    tracing::info!(sequence = last, "acknowledged: the replicas that have not applied it are fenced");
                    break;
                }
                tokio::time::sleep(ACK_POLL.min(deadline - now)).await;
            }
        }
        last
    }

    /// C4: the answer about one card, signed with the registry's newest key valid at `answered_at`:
    /// without a nonce, the card's cached statement while it may be served again
    /// ([`statements::reusable`]), else a new one (cached); with a nonce, one signed for it. None
    /// (and an error logged) if the directory lists no key the registry holds as valid.
    pub fn sign_status(
        &self,
        query: &CardQuery,
        result: &CheckResult,
        answered_at: DateTime<Utc>,
        nonce: Vec<u8>,
    ) -> Option<Arc<SignedStatusStatement>> {
        let id_number_hash = id_number_hash(query.id_number.as_str());
        let cacheable = nonce.is_empty() && result.status != CardStatus::Unknown;
        self.statement(&query.card_serial, id_number_hash, result, answered_at, nonce, cacheable)
    }

    fn statement(
        &self,
        card_serial: &str,
        id_number_hash: [u8; 32],
        result: &CheckResult,
        answered_at: DateTime<Utc>,
        nonce: Vec<u8>,
        cacheable: bool,
    ) -> Option<Arc<SignedStatusStatement>> {
        let Some(key) = self.checks.keys.select(&self.directory.current(), answered_at) else {
            tracing::error!(held = ?self.checks.keys.held_ids(), "no status signing key is valid now: answer unsigned");
            return None;
        };
        if cacheable
            && let Some(cached) = self.checks.statements.get(card_serial)
            && statements::reusable(&cached.statement, &key.id, &id_number_hash, result, answered_at)
        {
            return Some(cached);
        }
        let statement = StatusStatement {
            registry_id: self.bureau_id.clone(),
            key_id: key.id.clone(),
            card_serial: card_serial.to_owned(),
            id_number_hash,
            status: result.status,
            status_changed_at: result.status_changed_at,
            answered_at,
            next_update: answered_at + self.checks.statement_validity,
            nonce,
        };
        let signed = Arc::new(statement.sign(&key.key));
        if cacheable {
            self.checks.statements.put(card_serial, Arc::clone(&signed));
        }
        Some(signed)
    }

    fn index_card(&self, card: IndexedCard<'_>) {
        self.checks.statements.remove(card.serial);
        if let Err(error) = self.index.insert(card) {
            // Only a directory of more than 65,535 home bureaus gets here.
            tracing::error!(%error, serial = card.serial, "card not indexed");
        }
    }

    /// Now, at the precision every database keeps (microseconds).
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now().trunc_subsecs(6)
    }

    pub fn today(&self) -> NaiveDate {
        self.clock.today()
    }

    /// Whether `id` is a home bureau (verification role) in the directory.
    pub fn is_home_bureau(&self, id: &str) -> bool {
        self.directory.current().get_with_role(id, Role::Verification).is_some()
    }

    /// Writes the audit record of a refusal and returns the refusal, or the database error if it
    /// cannot be written (yidi_audit, "When an audit write fails").
    async fn refuse(&self, action: &'static str, subject: String, detail: String, error: ApiError) -> ApiError {
        let outcome = format!("refused:{}", error.reason());
        tracing::info!(action, subject = %subject, outcome = %outcome, "request refused");
        let entry = AuditEntry { action, subject, outcome, detail: format!("{detail}; {error}") };
        match self.repo.audit(self.now(), entry).await {
            Ok(()) => error,
            Err(db) => ApiError::Database(db),
        }
    }

    /// The holder's card named by a loss or withdrawal decision, or NOT_FOUND.
    async fn decision_card(&self, signed: &SignedDecision) -> Result<Option<Card>, ApiError> {
        let d = &signed.decision;
        let card = self.repo.card(&d.previous_card_serial).await?;
        Ok(card.filter(|c| c.id_number == normalised(&d.card.holder.id_number)))
    }

    /// S4: the registry knows which home bureau each card belongs to; a decision about it must be
    /// signed by that bureau, whatever province the signer wrote into the decision.
    fn signed_by_holder_bureau(card: &Card, signed: &SignedDecision) -> Result<(), ApiError> {
        let d = &signed.decision;
        if card.home_bureau_id == d.bureau_id {
            return Ok(());
        }
        Err(DecisionError::WrongJurisdiction {
            signer: d.bureau_id.clone(),
            province: format!("of the holder of card {} (home bureau {})", card.serial, card.home_bureau_id),
        }
        .into())
    }

    /// A loss decision about a card its holder never had (awaiting collection, or voided).
    fn never_handed_over() -> ApiError {
        ApiError::precondition("CARD_NOT_HANDED_OVER", "the card was never handed over to its holder")
    }

    /// S4: a holder without cards in force follows the bureau of the latest registration transfer
    /// (if any): no other may register a first card for them, whatever province it wrote.
    async fn signed_by_transfer_bureau(&self, holder: &str, signed: &SignedDecision) -> Result<(), ApiError> {
        let d = &signed.decision;
        match self.repo.latest_transfer(holder).await? {
            Some(transfer) if transfer.to_bureau_id != d.bureau_id => Err(DecisionError::WrongJurisdiction {
                signer: d.bureau_id.clone(),
                province: format!("of a citizen whose registration moved to {}", transfer.to_bureau_id),
            }
            .into()),
            _ => Ok(()),
        }
    }

    fn not_found(serial: &str) -> ApiError {
        ApiError::not_found("decision.previous_card_serial", serial)
    }

    /// S1, S4: records a loss report signed by the holder's home bureau.
    pub async fn report_loss(&self, signed: SignedDecision) -> Result<LossOutcome, ApiError> {
        const ACTION: &str = "report_loss";
        let now = self.now();
        let d = &signed.decision;
        let subject = mask_id_number(&d.card.holder.id_number);
        let detail = format!("decision {} by {} card {}", d.decision_id, d.bureau_id, d.previous_card_serial);
        let expected = Expectation { purpose: DecisionPurpose::ReportLoss, addressee_id: &self.bureau_id, now };
        if let Err(error) = signed.verify(&self.directory.current(), expected) {
            return Err(self.refuse(ACTION, subject, detail, error.into()).await);
        }
        let locks = self.lock_for_write(&normalised(&d.card.holder.id_number)).await?;
        for _ in 0..ATTEMPTS {
            if self.repo.loss_report_decision_used(&d.decision_id).await? {
                // The same decision again: answer as before, write nothing.
                let card =
                    self.decision_card(&signed).await?.ok_or_else(|| Self::not_found(&d.previous_card_serial))?;
                let answer = answer(&card, &self.clock, now);
                return Ok(LossOutcome {
                    card_serial: card.serial,
                    status: answer.status,
                    changed_at: card.status_changed_at,
                    already_reported: true,
                });
            }
            let Some(card) = self.decision_card(&signed).await? else {
                return Err(self.refuse(ACTION, subject, detail, Self::not_found(&d.previous_card_serial)).await);
            };
            if let Err(error) = Self::signed_by_holder_bureau(&card, &signed) {
                return Err(self.refuse(ACTION, card.serial.clone(), detail, error).await);
            }
            let audit = |outcome: &str| AuditEntry {
                action: ACTION,
                subject: card.serial.clone(),
                outcome: outcome.to_owned(),
                detail: detail.clone(),
            };
            match card.status {
                StoredCardStatus::Revoked => {
                    let error = ApiError::precondition("CARD_REVOKED", "the card is revoked: a newer card was issued");
                    return Err(self.refuse(ACTION, card.serial.clone(), detail, error).await);
                }
                StoredCardStatus::Made | StoredCardStatus::Voided => {
                    return Err(self.refuse(ACTION, card.serial.clone(), detail, Self::never_handed_over()).await);
                }
                StoredCardStatus::ReportedLost => {
                    match self
                        .repo
                        .record_loss_report(LossDecision {
                            serial: &card.serial,
                            decision_id: &d.decision_id,
                            now,
                            audit: audit("already_reported"),
                        })
                        .await
                    {
                        Ok(()) => {}
                        Err(e) if is_unique_violation(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                    tracing::info!(serial = %card.serial, "loss report recorded for a card already reported lost");
                    return Ok(LossOutcome {
                        status: answer(&card, &self.clock, now).status,
                        changed_at: card.status_changed_at,
                        card_serial: card.serial,
                        already_reported: true,
                    });
                }
                StoredCardStatus::Valid => {
                    let decision = LossDecision {
                        serial: &card.serial,
                        decision_id: &d.decision_id,
                        now,
                        audit: audit("reported_lost"),
                    };
                    match self.repo.report_loss(decision).await {
                        Ok(Change::Done(entries)) => {
                            drop(locks);
                            let sequence = self.acknowledge(&entries).await;
                            tracing::info!(serial = %card.serial, sequence, "card reported lost");
                            return Ok(LossOutcome {
                                card_serial: card.serial,
                                status: CardStatus::ReportedLost,
                                changed_at: now,
                                already_reported: false,
                            });
                        }
                        Ok(Change::Raced) => continue,
                        Err(e) if is_unique_violation(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(ApiError::Internal("the card kept changing; try again".into()))
    }

    /// K6: a loss report is withdrawn (the card was found); never after a revocation.
    pub async fn withdraw_loss_report(&self, signed: SignedDecision) -> Result<WithdrawOutcome, ApiError> {
        const ACTION: &str = "withdraw_loss_report";
        let now = self.now();
        let d = &signed.decision;
        let subject = mask_id_number(&d.card.holder.id_number);
        let detail = format!("decision {} by {} card {}", d.decision_id, d.bureau_id, d.previous_card_serial);
        let expected = Expectation { purpose: DecisionPurpose::WithdrawLossReport, addressee_id: &self.bureau_id, now };
        if let Err(error) = signed.verify(&self.directory.current(), expected) {
            return Err(self.refuse(ACTION, subject, detail, error.into()).await);
        }
        let today = self.clock.date_of(now);
        let locks = self.lock_for_write(&normalised(&d.card.holder.id_number)).await?;
        for _ in 0..ATTEMPTS {
            if self.repo.withdraw_decision_used(&d.decision_id).await? {
                let error = DecisionError::AlreadyUsed(d.decision_id.clone()).into();
                return Err(self.refuse(ACTION, subject, detail, error).await);
            }
            let Some(card) = self.decision_card(&signed).await? else {
                return Err(self.refuse(ACTION, subject, detail, Self::not_found(&d.previous_card_serial)).await);
            };
            if let Err(error) = Self::signed_by_holder_bureau(&card, &signed) {
                return Err(self.refuse(ACTION, card.serial.clone(), detail, error).await);
            }
            // K6: a withdrawal signed before the loss now standing was reported is about an earlier
            // loss; it must not clear this one. (A minute's allowance for the bureaus' clocks and the
            // whole-second `issued_at`.)
            if card.status == StoredCardStatus::ReportedLost
                && d.issued_at + chrono::Duration::minutes(1) < card.status_changed_at
            {
                let error = ApiError::precondition(
                    "DECISION_PREDATES_LOSS_REPORT",
                    "the withdrawal was decided before the loss report now standing was made",
                );
                return Err(self.refuse(ACTION, card.serial.clone(), detail, error).await);
            }
            // K6, C3: once a replacement is made, the loss report stands: the new card revokes
            // this one when it is handed over, so "valid" now would be true for a few days at most.
            let awaiting = |c: &Card| {
                c.status == StoredCardStatus::Made && now - c.status_changed_at <= self.checks.collection_deadline
            };
            let replacement_made = card.status == StoredCardStatus::ReportedLost
                && self.repo.cards_of(&card.id_number).await?.iter().any(awaiting);
            if card.status == StoredCardStatus::Revoked || replacement_made {
                let error = ApiError::Refused(RefusalReason::LossReportFinal);
                return Err(self.refuse(ACTION, card.serial.clone(), detail, error).await);
            }
            match card.status {
                StoredCardStatus::Revoked | StoredCardStatus::Made | StoredCardStatus::Voided => {
                    return Err(self.refuse(ACTION, card.serial.clone(), detail, Self::never_handed_over()).await);
                }
                StoredCardStatus::Valid => {
                    let error = ApiError::precondition("NOT_REPORTED_LOST", "the card is not reported lost");
                    return Err(self.refuse(ACTION, card.serial.clone(), detail, error).await);
                }
                StoredCardStatus::ReportedLost => {
                    let audit = AuditEntry {
                        action: ACTION,
                        subject: card.serial.clone(),
                        outcome: "withdrawn".into(),
                        detail: detail.clone(),
                    };
                    let decision = LossDecision { serial: &card.serial, decision_id: &d.decision_id, now, audit };
                    match self.repo.withdraw_loss_report(decision).await {
                        Ok(Change::Done(entries)) => {
                            drop(locks);
                            let sequence = self.acknowledge(&entries).await;
                            tracing::info!(serial = %card.serial, sequence, "loss report withdrawn");
                            return Ok(WithdrawOutcome {
                                status: StoredCardStatus::Valid.effective(card.valid_until, today),
                                card_serial: card.serial,
                                changed_at: now,
                            });
                        }
                        Ok(Change::Raced) => continue,
                        Err(e) if is_unique_violation(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(ApiError::Internal("the card kept changing; try again".into()))
    }

    /// S4, C3: a producer registers a card made for a decision addressed to it. The card awaits
    /// collection; the holder's older cards change only when it is handed over ([`Self::collect`]).
    pub async fn register_card(
        &self,
        signed: SignedDecision,
        producer_id: String,
        card_serial: String,
    ) -> Result<RegisterOutcome, ApiError> {
        const ACTION: &str = "register_card";
        let now = self.now();
        let d = &signed.decision;
        let subject = mask_id_number(&d.card.holder.id_number);
        let detail =
            format!("decision {} by {} producer {} card {}", d.decision_id, d.bureau_id, producer_id, card_serial);
        if self.directory.current().get_with_role(&producer_id, Role::Issuance).is_none() {
            let error = DecisionError::Misaddressed {
                expected: "an issuance bureau of the directory".into(),
                found: producer_id.clone(),
            };
            return Err(self.refuse(ACTION, subject, detail, error.into()).await);
        }
        let expected = Expectation { purpose: DecisionPurpose::IssueCard, addressee_id: &producer_id, now };
        if let Err(error) = signed.verify(&self.directory.current(), expected) {
            return Err(self.refuse(ACTION, subject, detail, error.into()).await);
        }
        let holder = normalised(&d.card.holder.id_number);
        let locks = self.lock_for_write(&holder).await?;
        for _ in 0..ATTEMPTS {
            let known = self.repo.registration_cards(&d.decision_id, &holder, &card_serial).await?;
            if let Some(existing) = known.by_decision {
                if existing.serial == card_serial {
                    // The same registration again: the same answer, nothing written.
                    return Ok(RegisterOutcome {
                        status: answer(&existing, &self.clock, now).status,
                        card_serial: existing.serial,
                    });
                }
                let error = DecisionError::AlreadyUsed(d.decision_id.clone()).into();
                return Err(self.refuse(ACTION, subject, detail, error).await);
            }
            let active = known.active_of_holder;
            for card in &active {
                if let Err(error) = Self::signed_by_holder_bureau(card, &signed) {
                    return Err(self.refuse(ACTION, subject, detail, error).await);
                }
            }
            if active.is_empty()
                && let Err(error) = self.signed_by_transfer_bureau(&holder, &signed).await
            {
                return Err(self.refuse(ACTION, subject, detail, error).await);
            }
            if known.with_serial.is_some() {
                let error = ApiError::precondition(
                    "CARD_SERIAL_EXISTS",
                    format!("card serial {card_serial:?} is already registered"),
                );
                return Err(self.refuse(ACTION, card_serial.clone(), detail, error).await);
            }
            let new = Card {
                serial: card_serial.clone(),
                id_number: holder.clone(),
                home_bureau_id: d.bureau_id.clone(),
                status: StoredCardStatus::Made,
                valid_from: d.card.valid_from,
                valid_until: d.card.valid_until,
                decision_id: Some(d.decision_id.clone()),
                producer_id: Some(producer_id.clone()),
                station_id: Some(d.station_id.clone()),
                status_changed_at: now,
                created_at: now,
            };
            let audit = AuditEntry {
                action: ACTION,
                subject: card_serial.clone(),
                outcome: "registered".into(),
                detail: format!("{detail}; awaiting collection at {}", d.station_id),
            };
            match self.repo.register_card(new.clone(), now, audit).await {
                Ok(entries) => {
                    drop(locks);
                    let sequence = self.acknowledge(&entries).await;
                    tracing::info!(serial = %card_serial, holder = %subject, sequence, "card registered, awaiting collection");
                    return Ok(RegisterOutcome { status: answer(&new, &self.clock, now).status, card_serial });
                }
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Internal("the registration kept conflicting; try again".into()))
    }

    /// C3, S1: the station that lodged the application reports that the holder collected the card:
    /// it becomes valid and every older card of the holder is revoked, in one change, before the
    /// answer. Reporting it again changes nothing; a card not collected within the deadline is
    /// voided instead, and the collection refused.
    pub async fn collect(&self, collection: Collection) -> Result<CollectOutcome, ApiError> {
        const ACTION: &str = "record_collection";
        let Collection { station_id, id_number, card_serial } = collection;
        let holder = normalised(id_number.as_str());
        let subject = card_serial.clone();
        let detail = format!("station {station_id} holder {}", mask_id_number(&holder));
        let locks = self.lock_for_write(&holder).await?;
        for _ in 0..ATTEMPTS {
            let now = self.now();
            let card = self.repo.card(&card_serial).await?.filter(|card| card.id_number == holder);
            let Some(card) = card else {
                let error = ApiError::not_found("card_serial", &card_serial);
                return Err(self.refuse(ACTION, subject, detail, error).await);
            };
            if card.station_id.as_deref() != Some(station_id.as_str()) {
                let error = ApiError::PermissionDenied {
                    reason: "NOT_THE_COLLECTING_STATION",
                    message: format!("card {card_serial} is handed over by the station its application was lodged at"),
                };
                return Err(self.refuse(ACTION, subject, detail, error).await);
            }
            match card.status {
                StoredCardStatus::Made if now - card.status_changed_at > self.checks.collection_deadline => {
                    self.void(&card, now).await?;
                    continue;
                }
                StoredCardStatus::Made => {}
                StoredCardStatus::Valid | StoredCardStatus::ReportedLost => {
                    // Collected before: the same answer, nothing written.
                    return Ok(CollectOutcome {
                        status: answer(&card, &self.clock, now).status,
                        revoked_card_serials: self.repo.revoked_by_collection(&card.serial).await?,
                        collected_at: card.status_changed_at,
                        card_serial: card.serial,
                        already_recorded: true,
                    });
                }
                StoredCardStatus::Voided | StoredCardStatus::Revoked => {
                    let reason = if card.status == StoredCardStatus::Voided { "CARD_VOIDED" } else { "CARD_REVOKED" };
                    let error = ApiError::precondition(
                        reason,
                        format!("card {card_serial} is {}: it can no longer be handed over", card.status.as_str()),
                    );
                    return Err(self.refuse(ACTION, subject, detail, error).await);
                }
            }
            let audit = |revoked: &[String]| AuditEntry {
                action: ACTION,
                subject: card_serial.clone(),
                outcome: "collected".into(),
                detail: format!("{detail}; revoked [{}]", revoked.join(", ")),
            };
            match self.repo.collect_card(&card.serial, &holder, now, audit).await {
                Ok(Change::Done(entries)) => {
                    let revoked_card_serials: Vec<String> =
                        entries.iter().skip(1).map(|e| e.change.serial.clone()).collect();
                    drop(locks);
                    let sequence = self.acknowledge(&entries).await;
                    tracing::info!(serial = %card_serial, revoked = revoked_card_serials.len(), sequence, "card collected: valid");
                    return Ok(CollectOutcome {
                        status: StoredCardStatus::Valid.effective(card.valid_until, self.today()),
                        card_serial,
                        revoked_card_serials,
                        collected_at: now,
                        already_recorded: false,
                    });
                }
                Ok(Change::Raced) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Internal("the card kept changing; try again".into()))
    }

    /// C3: voids one card never collected in time. Called under the writer lock and the lock of
    /// the card's holder.
    async fn void(&self, card: &Card, now: DateTime<Utc>) -> Result<(), ApiError> {
        let audit = AuditEntry {
            action: "void_card",
            subject: card.serial.clone(),
            outcome: "voided".into(),
            detail: format!("not collected since {}", card.status_changed_at),
        };
        match self.repo.void_card(&card.serial, now, audit).await {
            Ok(Change::Done(entries)) => {
                let sequence = self.acknowledge(&entries).await;
                tracing::info!(serial = %card.serial, sequence, "card voided: not collected in time");
                Ok(())
            }
            Ok(Change::Raced) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// C3: voids overdue cards now, then every `every`, until shutdown.
    pub fn spawn_void_sweeper(
        self: Arc<Self>,
        every: std::time::Duration,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match self.void_overdue().await {
                    Ok(0) => {}
                    Ok(voided) => tracing::info!(voided, "cards not collected in time voided"),
                    Err(error) => tracing::warn!(%error, "cannot void cards past the collection deadline"),
                }
                tokio::select! {
                    () = shutdown.wait() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        })
    }

    /// C3: voids every card made longer than the collection deadline ago and still not collected;
    /// returns how many. The holders' other cards keep their status.
    pub async fn void_overdue(&self) -> Result<usize, ApiError> {
        const PAGE: u64 = 500;
        let mut voided = 0;
        loop {
            let now = self.now();
            let overdue = self.repo.overdue_cards(now - self.checks.collection_deadline, PAGE).await?;
            for card in &overdue {
                let _locks = self.lock_for_write(&card.id_number).await?;
                self.void(card, now).await?;
            }
            voided += overdue.len();
            if (overdue.len() as u64) < PAGE {
                return Ok(voided);
            }
        }
    }

    /// C2, C3: the answer about one indexed card. A made card past the collection deadline is
    /// void from the deadline on, even before the sweep has written it.
    fn check_state(&self, state: Option<&CardState>, checked_at: DateTime<Utc>) -> CheckResult {
        if let Some(state) = state
            && state.status == StoredCardStatus::Made
        {
            let voided_at = state.status_changed_at + self.checks.collection_deadline;
            if checked_at > voided_at {
                return CheckResult { status: CardStatus::Voided, status_changed_at: Some(voided_at) };
            }
        }
        check_one(state, &self.clock, checked_at)
    }

    /// S4: the holder's registration moved to another home bureau. Signed by the bureau the cards
    /// follow now (or, for a holder without cards, the bureau of the latest transfer, if any); from
    /// the commit on, decisions about the holder's cards are accepted from the new bureau only. The
    /// same decision again, or a new one for the transfer already recorded (the old bureau did not
    /// learn the first answer), is answered as before without a change.
    pub async fn transfer_registration(&self, signed: SignedDecision) -> Result<TransferOutcome, ApiError> {
        const ACTION: &str = "transfer_registration";
        let now = self.now();
        let d = &signed.decision;
        let subject = mask_id_number(&d.card.holder.id_number);
        let to = d.transfer_to_bureau_id.as_str();
        let detail = format!("decision {} by {} to {to}", d.decision_id, d.bureau_id);
        let expected =
            Expectation { purpose: DecisionPurpose::TransferRegistration, addressee_id: &self.bureau_id, now };
        if let Err(error) = signed.verify(&self.directory.current(), expected) {
            return Err(self.refuse(ACTION, subject, detail, error.into()).await);
        }
        if !self.is_home_bureau(to) || to == d.bureau_id {
            let error = ApiError::precondition(
                "TRANSFER_TARGET_INVALID",
                format!("{to:?} is not another home bureau of the directory"),
            );
            return Err(self.refuse(ACTION, subject, detail, error).await);
        }
        let holder = normalised(&d.card.holder.id_number);
        let locks = self.lock_for_write(&holder).await?;
        let cards = self.repo.cards_of(&holder).await?;
        let following = |bureau: &str| -> Vec<String> {
            cards.iter().filter(|c| c.home_bureau_id == bureau).map(|c| c.serial.clone()).collect()
        };
        let latest = self.repo.latest_transfer(&holder).await?;
        let done = match self.repo.transfer_by_decision(&d.decision_id).await? {
            Some(done) => Some(done),
            None => latest.clone().filter(|t| {
                t.from_bureau_id == d.bureau_id && t.to_bureau_id == to && cards.iter().all(|c| c.home_bureau_id == to)
            }),
        };
        if let Some(done) = done {
            return Ok(TransferOutcome {
                card_serials: following(&done.to_bureau_id),
                home_bureau_id: done.to_bureau_id,
                transferred_at: done.transferred_at,
                already_transferred: true,
            });
        }
        for card in &cards {
            if let Err(error) = Self::signed_by_holder_bureau(card, &signed) {
                return Err(self.refuse(ACTION, subject, detail, error).await);
            }
        }
        if cards.is_empty()
            && let Err(error) = self.signed_by_transfer_bureau(&holder, &signed).await
        {
            return Err(self.refuse(ACTION, subject, detail, error).await);
        }
        let transfer = Transfer {
            decision_id: d.decision_id.clone(),
            id_number: holder.clone(),
            from_bureau_id: d.bureau_id.clone(),
            to_bureau_id: to.to_owned(),
            transferred_at: now,
        };
        let audit = |moved: &[String]| AuditEntry {
            action: ACTION,
            subject: subject.clone(),
            outcome: "transferred".into(),
            detail: format!("{detail}; cards [{}]", moved.join(", ")),
        };
        match self.repo.transfer_registration(transfer, audit).await {
            Ok((card_serials, entries)) => {
                drop(locks);
                self.acknowledge(&entries).await;
                tracing::info!(holder = %subject, from = %d.bureau_id, to, cards = card_serials.len(), "registration transferred");
                Ok(TransferOutcome {
                    home_bureau_id: to.to_owned(),
                    card_serials,
                    transferred_at: now,
                    already_transferred: false,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// C2, C4: the status of each card, in order, from the index: a check never waits on the
    /// database. Checks of lost cards are hits, written (one multi-row insert per call) before the
    /// answer, so none is lost; only those calls touch the database.
    ///
    /// `caller` (the authenticated caller, else the peer address) may miss only so often.
    ///
    /// S1: answered only while this replica can prove it has applied every acknowledged write;
    /// with the sequence of the log the answers reflect.
    pub async fn check_cards(
        &self,
        queries: &[CardQuery],
        relying_party: &str,
        caller: &str,
    ) -> Result<(Vec<CheckResult>, DateTime<Utc>, u64), ApiError> {
        let asked = Instant::now();
        let Some(sequence) = self.freshness.fresh_for_check(asked).await else {
            return Err(Self::behind());
        };
        let checked_at = self.now();
        let mut hits = Vec::new();
        let results = queries
            .iter()
            .map(|query| {
                let state = self.index.get(&query.card_serial, query.id_number.as_str());
                let result = self.check_state(state.as_ref(), checked_at);
                if let (CardStatus::ReportedLost, Some(state)) = (result.status, state) {
                    hits.push(NewHit {
                        card_serial: query.card_serial.clone(),
                        id_number: query.id_number.as_str().to_owned(),
                        home_bureau_id: self.index.bureau_id(state.home_bureau),
                        relying_party: relying_party.to_owned(),
                        checked_at,
                    });
                }
                result
            })
            .collect::<Vec<_>>();
        let misses = results.iter().filter(|r| r.status == CardStatus::Unknown).count();
        self.spend_misses(caller, misses, asked).await?;
        if !hits.is_empty() {
            tracing::info!(hits = hits.len(), "checks of cards reported lost");
            self.repo.record_hits(hits).await?;
        }
        Ok((results, checked_at, sequence))
    }

    /// Issue 16: the registration receipt of a card (yidi-status-filter `CardReceipt`) and the
    /// sequence it states. A pair the registry does not hold is NOT_FOUND and spends `caller`'s
    /// misses as an unknown check does (C4: no enumeration through receipts).
    pub async fn card_receipt(&self, query: &CardQuery, caller: &str) -> Result<(Vec<u8>, u64), ApiError> {
        let asked = Instant::now();
        if self.freshness.fresh_for_check(asked).await.is_none() {
            return Err(Self::behind());
        }
        let Some(state) = self.index.get(&query.card_serial, query.id_number.as_str()) else {
            self.spend_misses(caller, 1, asked).await?;
            return Err(ApiError::not_found("card", &query.card_serial));
        };
        // Read after the card was found: the log's head is then at or past its registration (the
        // index may hold entries it has not yet counted as applied).
        let sequence = feed::head(self.repo.db()).await?.sequence;
        let now = self.now();
        let Some(key) = self.checks.keys.select(&self.directory.current(), now) else {
            return Err(ApiError::NotReady {
                reason: "NO_SIGNING_KEY",
                message: "no status signing key of this registry is valid now".into(),
            });
        };
        let receipt = CardReceipt {
            registry_id: self.bureau_id.clone(),
            key_id: key.id.clone(),
            card: *CardKey::new(query.id_number.as_str(), &query.card_serial).digest(),
            sequence,
            signed_at: now,
            valid_until: state.valid_until,
        };
        Ok((receipt.sign(&key.key), sequence))
    }

    /// C4: `caller` asked about `misses` pairs the registry does not hold; refused once it is out
    /// of misses.
    async fn spend_misses(&self, caller: &str, misses: usize, asked: Instant) -> Result<(), ApiError> {
        let Err(exhausted) = self.checks.limiter.admit(caller, misses, asked).await else { return Ok(()) };
        tracing::warn!(caller, misses, "check refused: too many misses (C4)");
        Err(ApiError::RateLimited {
            reason: "CHECK_MISSES_EXHAUSTED",
            message: "too many checks of unknown number/serial pairs; try again later".into(),
            retry_after: exhausted.retry_after,
        })
    }

    /// S1: this replica has not confirmed the newest entry of the log within the fence bound.
    fn behind() -> ApiError {
        ApiError::NotReady {
            reason: "REPLICA_BEHIND",
            message: "this registry replica cannot prove it has every acknowledged change; ask another".into(),
        }
    }

    /// C4: hits on the cards of a home bureau recorded after the hit `after` (0: from the first),
    /// oldest first; and the hit to resume after, which is `after` itself when there is nothing new.
    pub async fn list_hits(&self, home_bureau_id: &str, after: i64, size: u64) -> Result<(Vec<Hit>, i64), ApiError> {
        let hits = self.repo.hits(home_bureau_id, after, size).await?;
        let last = hits.last().map_or(after, |hit| hit.id);
        Ok((hits, last))
    }

    /// Sends every status event after `after` to `sink`, then the live ones as this replica applies
    /// the log, until shutdown or until the receiver goes away. A lagging watcher re-reads the
    /// database.
    pub async fn watch(&self, mut after: u64, sink: mpsc::Sender<Result<StatusEvent, ApiError>>) {
        // Subscribe before reading the backlog, so nothing committed in between is missed.
        let mut live = self.events.subscribe();
        let mut catch_up = true;
        loop {
            if catch_up {
                // Every entry up to it is committed: a backlog read after it holds their events.
                let applied = self.freshness.applied();
                match self.repo.events_after(after, BACKLOG_PAGE).await {
                    Ok(events) => {
                        let full = events.len() as u64 == BACKLOG_PAGE;
                        for event in events {
                            after = event.sequence;
                            if sink.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        if full {
                            continue;
                        }
                        after = after.max(applied);
                        catch_up = false;
                    }
                    Err(error) => {
                        let _ = sink.send(Err(error.into())).await;
                        return;
                    }
                }
            }
            tokio::select! {
                () = self.shutdown.wait() => return,
                () = sink.closed() => return,
                received = live.recv() => match received {
                    Ok(item) if item.sequence <= after => {}
                    Ok(item) if item.sequence == after + 1 => {
                        after = item.sequence;
                        if let Some(event) = item.event
                            && sink.send(Ok(event)).await.is_err()
                        {
                            return;
                        }
                    }
                    // A gap or a lag: the database has everything.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => catch_up = true,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }

    /// Registers every citizen's existing card not yet known (idempotent, never overwrites).
    pub async fn import(&self, population: &Population) -> Result<usize, ApiError> {
        let now = self.now();
        let mut imported = Vec::new();
        for citizen in &population.citizens {
            let Some(card) = &citizen.card else { continue };
            let new = Card {
                serial: card.serial.clone(),
                id_number: normalised(&citizen.person.id_number),
                home_bureau_id: citizen.home_bureau_id.clone(),
                status: if card.reported_lost { StoredCardStatus::ReportedLost } else { StoredCardStatus::Valid },
                valid_from: card.valid_from,
                valid_until: card.valid_until,
                decision_id: None,
                producer_id: None,
                station_id: None,
                status_changed_at: now,
                created_at: now,
            };
            match self.repo.import_card(new, self.clock.start_of(card.valid_from), now).await {
                Ok(Some(entry)) => imported.push(entry),
                Ok(None) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Acknowledged once: the last entry is applied only after every one before it.
        self.acknowledge(&imported[imported.len().saturating_sub(1)..]).await;
        Ok(imported.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    fn card(status: StoredCardStatus, valid_until: Option<NaiveDate>) -> Card {
        let at = d(2117, 1, 1).and_hms_opt(8, 0, 0).unwrap().and_utc();
        Card {
            serial: "S1".into(),
            id_number: IdNumber::compose("360102", d(1990, 3, 7), 123).as_str().to_owned(),
            home_bureau_id: "home-jiangxi".into(),
            status,
            valid_from: d(2110, 1, 1),
            valid_until,
            decision_id: None,
            producer_id: None,
            station_id: None,
            status_changed_at: at,
            created_at: at,
        }
    }

    /// The clock's date is `day` (09:00 UTC, 17:00 Beijing).
    fn on(day: NaiveDate) -> DateTime<Utc> {
        day.and_hms_opt(9, 0, 0).unwrap().and_utc()
    }

    fn clock() -> Clock {
        Clock::fixed(on(d(2118, 1, 1)))
    }

    #[test]
    fn c2_expired_card_entered_expired_the_day_after_its_last_day() {
        let c = card(StoredCardStatus::Valid, Some(d(2118, 1, 1)));
        let result = answer(&c, &clock(), on(d(2118, 1, 5)));
        assert_eq!(result.status, CardStatus::Expired);
        // Midnight in Beijing at the start of 2 January.
        assert_eq!(result.status_changed_at, Some(d(2118, 1, 1).and_hms_opt(16, 0, 0).unwrap().and_utc()));
        assert_eq!(answer(&c, &clock(), on(d(2118, 1, 1))).status, CardStatus::Valid);
    }

    #[test]
    fn c2_a_card_expires_at_midnight_in_beijing() {
        let c = card(StoredCardStatus::Valid, Some(d(2118, 1, 1)));
        let at = |instant: &str| instant.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(answer(&c, &clock(), at("2118-01-01T15:59:59Z")).status, CardStatus::Valid);
        assert_eq!(answer(&c, &clock(), at("2118-01-01T16:00:00Z")).status, CardStatus::Expired);
        assert_eq!(answer(&c, &clock(), at("2118-01-01T23:30:00Z")).status, CardStatus::Expired);
    }

    #[test]
    fn c2_lost_card_stays_lost_after_expiry() {
        let c = card(StoredCardStatus::ReportedLost, Some(d(2118, 1, 1)));
        assert_eq!(answer(&c, &clock(), on(d(2119, 1, 1))).status, CardStatus::ReportedLost);
    }

    #[test]
    fn c4_serial_of_another_holder_is_unknown() {
        let c = card(StoredCardStatus::Valid, None);
        let index = CardIndex::with_capacity(1);
        index.insert(c.change(false).indexed()).unwrap();
        let other = IdNumber::compose("360102", d(1991, 3, 7), 124);
        let now = on(d(2118, 1, 1));
        let result = check_one(index.get(&c.serial, other.as_str()).as_ref(), &clock(), now);
        assert_eq!(result, CheckResult { status: CardStatus::Unknown, status_changed_at: None });
        let holder = IdNumber::parse(&c.id_number, d(2118, 1, 1)).unwrap();
        let found = index.get(&c.serial, holder.as_str());
        assert_eq!(check_one(found.as_ref(), &clock(), now), answer(&c, &clock(), now));
        assert_eq!(check_one(None, &clock(), now).status, CardStatus::Unknown);
    }
}
