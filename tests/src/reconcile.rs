//! Reconciles the bureaus' databases after a run with faults (the fault tests and the soak): every
//! application reached the state it should, exactly once. Reads each bureau's own database (SQLite
//! or PostgreSQL), never its internals, so it holds for any implementation of the same contract:
//!
//! * lost: an application the station acknowledged is not in its database, is stuck (not settled,
//!   or halted), or settled while a bureau has no trace of it (no order, no registered card, no
//!   loss report);
//! * duplicated: more than one order for an application (or a decision), more than one card
//!   registered for an order, more cards for a citizen than applications, more standing loss
//!   reports for a card than applications that reported it, more than one verification of an
//!   application for a purpose;
//! * unexpected: settled, but not in the outcome the run expected (e.g. refused instead of ready).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    time::{Duration, Instant},
};

use anyhow::Context;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbErr, QueryResult, Statement};
use yidi_demo::{suite::Suite, topology::Process};

/// Where a run expects an application to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// READY_FOR_COLLECTION: one order, one card registered and awaiting collection, the old card
    /// as the application left it (reported lost for a replacement, valid for a renewal).
    CardReady,
    /// As `CardReady`, then COLLECTED at the counter, the registry told (the new card valid, the old
    /// one revoked) and the home bureau told (K5): its verification is closed as collected and the
    /// new card is the citizen's current one.
    Collected,
    /// A loss report: APPROVED with the loss recorded, the card reported lost.
    LossRecorded,
    /// REFUSED by the home bureau: no order, no card.
    Refused,
}

/// An application the station acknowledged (its id came back from the RPC).
#[derive(Debug, Clone)]
pub struct Acknowledged {
    pub application_id: String,
    pub expect: Outcome,
}

/// Each bureau's database URL.
#[derive(Debug, Clone)]
pub struct Databases {
    pub intake: String,
    pub homes: Vec<String>,
    pub issuance: String,
    pub registry: String,
}

impl Databases {
    pub fn of(suite: &Suite) -> Self {
        Self {
            intake: suite.database_url(Process::Intake),
            homes: vec![suite.database_url(Process::HomeJiangxi), suite.database_url(Process::HomeSichuan)],
            issuance: suite.database_url(Process::Issuance),
            registry: suite.database_url(Process::Registry),
        }
    }
}

/// One application as the station's database holds it.
#[derive(Debug, Clone)]
struct Application {
    id: String,
    kind: String,
    state: String,
    id_number: String,
    previous_card_serial: String,
    new_card_serial: Option<String>,
    loss_recorded: bool,
    halted: bool,
    home_notified: bool,
    last_error: Option<String>,
    /// C3: the registry answered the station's report of the collection.
    registry_told: bool,
}

impl Application {
    fn makes_a_card(&self) -> bool {
        self.kind != "loss_report"
    }

    /// Nothing more will happen to it without someone at the counter.
    fn is_settled(&self) -> bool {
        !self.halted
            && match self.state.as_str() {
                "refused" | "ready_for_collection" => true,
                // Settled once the home bureau has been told (K5).
                "cancelled" => self.home_notified,
                // And the registry told, so that the new card is valid (C3).
                "collected" => self.home_notified && self.registry_told,
                "approved" => self.kind == "loss_report" && self.loss_recorded,
                _ => false,
            }
    }

    fn outcome(&self) -> Option<Outcome> {
        match self.state.as_str() {
            "ready_for_collection" => Some(Outcome::CardReady),
            "collected" => Some(Outcome::Collected),
            "approved" if self.kind == "loss_report" && self.loss_recorded => Some(Outcome::LossRecorded),
            "refused" => Some(Outcome::Refused),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Order {
    decision_id: String,
    application_id: String,
    card_serial: String,
    state: String,
}

#[derive(Debug, Clone)]
struct Card {
    serial: String,
    id_number: String,
    status: String,
    decision_id: Option<String>,
}

/// What a reconciliation found.
#[derive(Debug, Default)]
pub struct Reconciliation {
    /// Applications in the station's database (acknowledged or not).
    pub applications: usize,
    pub acknowledged: usize,
    /// (kind, final state) → count, over every application of the station.
    pub by_kind_and_state: BTreeMap<(String, String), usize>,
    pub orders: usize,
    pub cards_registered: usize,
    pub loss_reports: usize,
    pub unsettled: Vec<String>,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    pub unexpected: Vec<String>,
}

impl Reconciliation {
    /// No application lost, duplicated, unsettled or in an unexpected state.
    pub fn is_clean(&self) -> bool {
        self.unsettled.is_empty() && self.lost.is_empty() && self.duplicated.is_empty() && self.unexpected.is_empty()
    }
}

impl fmt::Display for Reconciliation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "applications: {} in the station's database, {} acknowledged to the caller",
            self.applications, self.acknowledged
        )?;
        for ((kind, state), count) in &self.by_kind_and_state {
            writeln!(f, "  {kind:<12} {state:<22} {count}")?;
        }
        writeln!(
            f,
            "orders: {}, cards registered: {}, standing loss reports: {}",
            self.orders, self.cards_registered, self.loss_reports
        )?;
        for (label, list) in [
            ("unsettled", &self.unsettled),
            ("lost", &self.lost),
            ("duplicated", &self.duplicated),
            ("unexpected", &self.unexpected),
        ] {
            writeln!(f, "{label}: {}", list.len())?;
            for line in list.iter().take(10) {
                writeln!(f, "  {line}")?;
            }
            if list.len() > 10 {
                writeln!(f, "  ... and {} more", list.len() - 10)?;
            }
        }
        Ok(())
    }
}

async fn query(db: &DatabaseConnection, sql: &str) -> anyhow::Result<Vec<QueryResult>> {
    Ok(db.query_all_raw(Statement::from_string(db.get_database_backend(), sql.to_owned())).await?)
}

/// Every row `sql` answers, each read by `read`.
async fn rows<T>(
    db: &DatabaseConnection,
    sql: &str,
    read: impl Fn(&QueryResult) -> Result<T, DbErr>,
) -> anyhow::Result<Vec<T>> {
    Ok(query(db, sql).await?.iter().map(read).collect::<Result<_, _>>()?)
}

async fn connect(url: &str) -> anyhow::Result<DatabaseConnection> {
    Database::connect(url).await.with_context(|| format!("connecting to {url}"))
}

async fn applications(url: &str) -> anyhow::Result<Vec<Application>> {
    let db = connect(url).await?;
    let rows = query(
        &db,
        // Halted: waiting on a dead letter of the station's outbox (see yidi_outbox); the
        // error shown is that of the newest message still owed.
        "SELECT a.application_id, a.kind, a.state, a.id_number, a.previous_card_serial, a.new_card_serial, \
         a.loss_recorded, \
         (SELECT COUNT(*) FROM outbox_messages m WHERE m.subject = a.application_id AND m.state = 'dead') > 0, \
         a.home_notified, \
         (SELECT m.last_error FROM outbox_messages m WHERE m.subject = a.application_id \
           AND m.state IN ('pending', 'dead') ORDER BY m.created_at DESC LIMIT 1), \
         (SELECT COUNT(*) FROM outbox_messages m WHERE m.subject = a.application_id \
           AND m.topic = 'record_collection' AND m.state = 'delivered') > 0 \
         FROM applications a",
    )
    .await?;
    db.close().await?;
    rows.iter()
        .map(|row| {
            Ok(Application {
                id: row.try_get_by_index(0)?,
                kind: row.try_get_by_index(1)?,
                state: row.try_get_by_index(2)?,
                id_number: row.try_get_by_index(3)?,
                previous_card_serial: row.try_get_by_index(4)?,
                new_card_serial: row.try_get_by_index(5)?,
                loss_recorded: row.try_get_by_index(6)?,
                halted: row.try_get_by_index(7)?,
                home_notified: row.try_get_by_index(8)?,
                last_error: row.try_get_by_index(9)?,
                registry_told: row.try_get_by_index(10)?,
            })
        })
        .collect()
}

/// The applications of the station that are not settled yet (id, state, last error).
pub async fn unsettled(databases: &Databases) -> anyhow::Result<Vec<String>> {
    Ok(applications(&databases.intake).await?.into_iter().filter(|a| !a.is_settled()).map(|a| describe(&a)).collect())
}

fn describe(application: &Application) -> String {
    format!(
        "{} {} {}{}{}",
        application.id,
        application.kind,
        application.state,
        if application.halted { " HALTED" } else { "" },
        application.last_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
    )
}

/// Waits until every application of the station is settled, at most `within`; returns those
/// still unsettled then (empty when all settled).
pub async fn wait_until_settled(databases: &Databases, within: Duration) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + within;
    loop {
        // A database being restarted under us is not a verdict: ask again.
        let left = unsettled(databases).await.unwrap_or_else(|error| vec![format!("cannot read: {error:#}")]);
        if left.is_empty() || Instant::now() > deadline {
            return Ok(left);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reads every bureau's database and checks each application against the others.
pub async fn reconcile(databases: &Databases, acknowledged: &[Acknowledged]) -> anyhow::Result<Reconciliation> {
    let applications = applications(&databases.intake).await?;

    let issuance = connect(&databases.issuance).await?;
    let orders = rows(&issuance, "SELECT decision_id, application_id, card_serial, state FROM orders", |row| {
        Ok(Order {
            decision_id: row.try_get_by_index(0)?,
            application_id: row.try_get_by_index(1)?,
            card_serial: row.try_get_by_index(2)?,
            state: row.try_get_by_index(3)?,
        })
    })
    .await?;
    issuance.close().await?;

    let registry = connect(&databases.registry).await?;
    let cards = rows(&registry, "SELECT serial, id_number, status, decision_id FROM cards", |row| {
        Ok(Card {
            serial: row.try_get_by_index(0)?,
            id_number: row.try_get_by_index(1)?,
            status: row.try_get_by_index(2)?,
            decision_id: row.try_get_by_index(3)?,
        })
    })
    .await?;
    let standing_loss_reports: Vec<String> =
        rows(&registry, "SELECT card_serial FROM loss_reports WHERE withdrawn_at IS NULL", |row| {
            row.try_get_by_index(0)
        })
        .await?;
    registry.close().await?;

    // (application, purpose, closed as) of every verification; the citizens' current cards.
    let mut verifications: Vec<(String, String, Option<String>)> = Vec::new();
    let mut current_card: HashMap<String, Option<String>> = HashMap::new();
    for url in &databases.homes {
        let home = connect(url).await?;
        for row in query(&home, "SELECT application_id, purpose, closed_state FROM verifications").await? {
            verifications.push((row.try_get_by_index(0)?, row.try_get_by_index(1)?, row.try_get_by_index(2)?));
        }
        for row in query(&home, "SELECT id_number, current_card_serial FROM citizens").await? {
            current_card.insert(row.try_get_by_index(0)?, row.try_get_by_index(1)?);
        }
        home.close().await?;
    }

    let mut report = Reconciliation {
        applications: applications.len(),
        acknowledged: acknowledged.len(),
        orders: orders.len(),
        cards_registered: cards.iter().filter(|c| c.decision_id.is_some()).count(),
        loss_reports: standing_loss_reports.len(),
        ..Reconciliation::default()
    };

    let by_id: HashMap<&str, &Application> = applications.iter().map(|a| (a.id.as_str(), a)).collect();
    for expected in acknowledged {
        match by_id.get(expected.application_id.as_str()) {
            None => {
                report.lost.push(format!("{} acknowledged but not in the station's database", expected.application_id))
            }
            Some(application) if application.is_settled() && application.outcome() != Some(expected.expect) => {
                report.unexpected.push(format!("{} (expected {:?})", describe(application), expected.expect));
            }
            Some(_) => {}
        }
    }

    // Every application the station holds was answered to some caller: one more is a request
    // lodged twice (a retry after a failed call that had in fact been committed).
    let answered: HashSet<&str> = acknowledged.iter().map(|a| a.application_id.as_str()).collect();
    for application in &applications {
        if !answered.contains(application.id.as_str()) {
            report.duplicated.push(format!(
                "{} is in the station's database but no caller was answered with it",
                describe(application)
            ));
        }
    }

    let mut orders_of: HashMap<&str, Vec<&Order>> = HashMap::new();
    for order in &orders {
        orders_of.entry(order.application_id.as_str()).or_default().push(order);
    }
    let mut orders_of_decision: HashMap<&str, usize> = HashMap::new();
    for order in &orders {
        *orders_of_decision.entry(order.decision_id.as_str()).or_default() += 1;
    }
    for (decision, count) in &orders_of_decision {
        if *count > 1 {
            report.duplicated.push(format!("{count} orders for decision {decision}"));
        }
    }
    let card_of_decision: HashMap<&str, Vec<&Card>> = cards.iter().fold(HashMap::new(), |mut map, card| {
        if let Some(decision) = card.decision_id.as_deref() {
            map.entry(decision).or_default().push(card);
        }
        map
    });
    let card_by_serial: HashMap<&str, &Card> = cards.iter().map(|c| (c.serial.as_str(), c)).collect();
    let mut issued_to: HashMap<&str, usize> = HashMap::new();
    for card in cards.iter().filter(|c| c.decision_id.is_some()) {
        *issued_to.entry(card.id_number.as_str()).or_default() += 1;
    }
    // A citizen may rightly have several cards made over time, one per application.
    let mut ordered_for: HashMap<&str, usize> = HashMap::new();
    for application in &applications {
        if application.makes_a_card()
            && matches!(application.state.as_str(), "in_production" | "ready_for_collection" | "collected")
        {
            *ordered_for.entry(application.id_number.as_str()).or_default() += 1;
        }
    }
    let mut loss_reports_of: HashMap<&str, usize> = HashMap::new();
    for serial in &standing_loss_reports {
        *loss_reports_of.entry(serial.as_str()).or_default() += 1;
    }
    // A card may rightly be reported by several applications (a loss report, then a replacement,
    // K1), each once; one standing report may also predate the run (the population's).
    let mut reporting_applications: HashMap<&str, usize> = HashMap::new();
    for application in applications.iter().filter(|a| a.loss_recorded) {
        *reporting_applications.entry(application.previous_card_serial.as_str()).or_default() += 1;
    }
    for (serial, count) in &loss_reports_of {
        let allowed = reporting_applications.get(serial).copied().unwrap_or_default().max(1);
        if *count > allowed {
            report.duplicated.push(format!("{count} standing loss reports for card {serial}, reported by {allowed}"));
        }
    }
    let closed_as: HashMap<&str, Option<&str>> = verifications
        .iter()
        .filter(|(_, purpose, _)| purpose == "issue_card")
        .map(|(application, _, closed)| (application.as_str(), closed.as_deref()))
        .collect();
    let mut verified: HashMap<(&str, &str), usize> = HashMap::new();
    for (application, purpose, _) in &verifications {
        *verified.entry((application.as_str(), purpose.as_str())).or_default() += 1;
    }
    for ((application, purpose), count) in &verified {
        if *count > 1 {
            report.duplicated.push(format!("{count} verifications of {application} for {purpose}"));
        }
    }
    let known: HashSet<&str> = by_id.keys().copied().collect();
    for order in &orders {
        if !known.contains(order.application_id.as_str()) {
            report.duplicated.push(format!(
                "order for decision {} of unknown application {}",
                order.decision_id, order.application_id
            ));
        }
    }

    for application in &applications {
        let settled = application.is_settled();
        let state_label =
            if application.halted { format!("{} (halted)", application.state) } else { application.state.clone() };
        *report.by_kind_and_state.entry((application.kind.clone(), state_label)).or_default() += 1;
        if !settled {
            report.unsettled.push(describe(application));
        }
        let id = application.id.as_str();
        let own_orders = orders_of.get(id).map(Vec::as_slice).unwrap_or_default();
        if own_orders.len() > 1 {
            report.duplicated.push(format!("{} orders for application {id}", own_orders.len()));
        }
        if !application.makes_a_card() || application.state == "refused" || application.state == "cancelled" {
            if !own_orders.is_empty() && application.state != "cancelled" {
                report.duplicated.push(format!("an order for application {id}, which makes no card"));
            }
        } else if matches!(application.state.as_str(), "ready_for_collection" | "collected") {
            match own_orders.first() {
                None => report.lost.push(format!("{id} ready but the producer has no order for it")),
                Some(order) => {
                    if order.state != "dispatched" {
                        report.lost.push(format!("{id} ready but its order is {}", order.state));
                    }
                    if application.new_card_serial.as_deref() != Some(order.card_serial.as_str()) {
                        report.lost.push(format!(
                            "{id} names card {:?} but its order made {}",
                            application.new_card_serial, order.card_serial
                        ));
                    }
                    match card_of_decision.get(order.decision_id.as_str()).map(Vec::as_slice).unwrap_or_default() {
                        [] => report.lost.push(format!("{id}: card {} never registered", order.card_serial)),
                        [card] if card.serial != order.card_serial => {
                            report.lost.push(format!("{id}: registry holds {} for the order's decision", card.serial))
                        }
                        // C3: valid once the registry was told of the collection, made until then.
                        [card] if card.status != "valid" && application.registry_told => {
                            report.unexpected.push(format!("{id}: new card {} is {}", card.serial, card.status))
                        }
                        [card] if !matches!(card.status.as_str(), "made" | "valid") => {
                            report.unexpected.push(format!("{id}: new card {} is {}", card.serial, card.status))
                        }
                        [_] => {}
                        many => report.duplicated.push(format!("{id}: {} cards for one decision", many.len())),
                    }
                    let made = issued_to.get(application.id_number.as_str()).copied().unwrap_or_default();
                    let ordered = ordered_for.get(application.id_number.as_str()).copied().unwrap_or_default();
                    if made > ordered {
                        report
                            .duplicated
                            .push(format!("{id}: {made} cards registered for a citizen who applied {ordered} times"));
                    }
                    // S1: revoked by the new card's collection; until then, as the application left it.
                    let new_valid =
                        card_by_serial.get(order.card_serial.as_str()).is_some_and(|card| card.status == "valid");
                    let old_until_collected = if application.kind == "renewal" { "valid" } else { "reported_lost" };
                    match card_by_serial.get(application.previous_card_serial.as_str()) {
                        Some(old) if new_valid && old.status == "revoked" => {}
                        Some(old) if !new_valid && old.status == old_until_collected => {}
                        Some(old) => report.unexpected.push(format!("{id}: old card {} is {}", old.serial, old.status)),
                        None => {
                            report.lost.push(format!("{id}: old card {} unknown", application.previous_card_serial))
                        }
                    }
                }
            }
        }
        if application.state == "collected" && application.home_notified {
            let closed = closed_as.get(id).copied().flatten();
            if closed != Some("collected") {
                report.lost.push(format!("{id}: collected, but the home bureau has it closed as {closed:?}"));
            }
            let current = current_card.get(&application.id_number).cloned().flatten();
            if current != application.new_card_serial {
                report.lost.push(format!(
                    "{id}: collected card {:?}, but the home bureau's current card is {current:?}",
                    application.new_card_serial
                ));
            }
        }
        if application.loss_recorded {
            // More than one is judged above, once per card.
            if !loss_reports_of.contains_key(application.previous_card_serial.as_str()) {
                report.lost.push(format!("{id}: loss recorded but the registry has no loss report"));
            }
            if application.kind == "loss_report"
                && let Some(old) = card_by_serial.get(application.previous_card_serial.as_str())
                && old.status != "reported_lost"
            {
                report.unexpected.push(format!("{id}: reported card {} is {}", old.serial, old.status));
            }
        } else if application.kind != "renewal"
            && settled
            && application.state != "refused"
            && application.state != "cancelled"
        {
            report.lost.push(format!("{id}: settled {} without its loss report", application.state));
        }
    }
    Ok(report)
}
