//! yidi-verification: the household-registration bureau of a home province. The only bureau that
//! verifies identity (S4): it checks the live biometrics against its register, refuses or approves,
//! and signs its decisions.
#![forbid(unsafe_code)]

pub mod config;
mod entities;
mod grpc;
mod registry;
mod repo;
mod service;

use std::{future::Future, path::Path, sync::Arc};
use yidi_bureau::BureauConfig;

use anyhow::Context;
use yidi_bureau::startup::{self, Prepared};
use yidi_domain::{BiometricMatcher, IdNumber, Particulars, Role, SimulatedMatcher};
use yidi_grpc::overload::MAX_REQUEST_BYTES;
use yidi_proto::v1::verification_server::VerificationServer;
use yidi_runtime::{Clock, config::ConfigError, population::Population, signing::KeyRing};
use yidi_verification_migration::Migrator;

use crate::{
    config::VerificationConfig,
    grpc::VerificationApi,
    repo::{Citizen, Repo},
    service::Verifier,
};

/// This bureau's signing keys and jurisdiction, checked against the directory.
struct Signer {
    keys: Arc<KeyRing>,
    jurisdiction: Vec<String>,
}

/// Runs the service on `listener` until `shutdown` resolves.
pub async fn serve(
    config: VerificationConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let sections = config.sections();
    let now =
        yidi_runtime::Clock::from_config(&config.clock).map_err(|message| ConfigError::key("clock", message))?.now();
    let prepared =
        startup::prepare::<Migrator, _, _>(sections, Role::Verification, listener, shutdown, |directory, bureau, _| {
            let keys = KeyRing::load(bureau.id.clone(), config.signing.sources()).context("signing.keys")?;
            let active = keys.check(directory, now).context("signing.keys")?;
            tracing::info!(key_id = %active.id, held = ?keys.held_ids(), "signing keys loaded");
            Ok(Signer { keys: Arc::new(keys), jurisdiction: bureau.jurisdiction.clone() })
        })
        .await?;
    let db = prepared.db.clone();
    let result = run(&config, prepared).await;
    let closed = db.close().await;
    result?;
    closed.context("closing the database")?;
    Ok(())
}

async fn run(
    config: &VerificationConfig,
    prepared: Prepared<VerificationServer<VerificationApi>, Signer>,
) -> anyhow::Result<()> {
    let Prepared { directory, clock, db, server, shutdown, checked: signer, connector, .. } = prepared;
    signer.keys.spawn_reloader(config.directory.reload_every(), shutdown);
    let bureau_id = config.server.bureau_id.clone();
    let repo = Repo::new(db);
    if let Some(path) = &config.register.import_path {
        let inserted = import(&repo, path, &bureau_id, &clock).await?;
        tracing::info!(inserted, path = %path.display(), "population imported");
    }
    let matcher: Arc<dyn BiometricMatcher> = Arc::new(SimulatedMatcher {
        face_threshold: config.biometrics.face_threshold,
        fingerprint_threshold: config.biometrics.fingerprint_threshold,
    });
    let ttl_seconds = i64::try_from(config.signing.decision_ttl_seconds).context("signing.decision_ttl_seconds")?;
    let peers = yidi_grpc::client::Peers::new(directory.clone(), connector);
    let registry = Arc::new(registry::RegistryLink::new(peers, yidi_grpc::client::DEFAULT_CALL_TIMEOUT));
    let verifier = Arc::new(Verifier {
        repo,
        clock,
        directory,
        bureau_id,
        jurisdiction: signer.jurisdiction,
        keys: signer.keys,
        ttl: chrono::Duration::seconds(ttl_seconds),
        matcher,
        encode: grpc::encode_answer,
        registry,
    });
    let api = VerificationApi::new(verifier);
    server.serve(VerificationServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES)).await?;
    Ok(())
}

/// Inserts every citizen of this bureau not yet on the register; never overwrites existing rows.
async fn import(repo: &Repo, path: &Path, bureau_id: &str, clock: &Clock) -> anyhow::Result<u64> {
    let population = Population::read(path).context("register.import_path")?;
    let now = clock.now();
    let today = clock.today();
    let mut rows = Vec::new();
    for c in population.citizens.into_iter().filter(|c| c.home_bureau_id == bureau_id) {
        let id_number = match IdNumber::parse(&c.person.id_number, today) {
            Ok(id) => id,
            Err(error) => {
                tracing::warn!(id_number = %yidi_domain::mask::mask_id_number(&c.person.id_number), %error, "population entry skipped");
                continue;
            }
        };
        let citizen = Citizen {
            person: Particulars { id_number: id_number.as_str().to_owned(), ..c.person },
            face_template: c.face_template,
            fingerprint_template: c.fingerprint_template,
            credit: c.credit,
            registration: c.registration,
            date_of_death: None,
            current_card_serial: c.card.as_ref().map(|card| card.serial.clone()),
            current_card_valid_from: c.card.as_ref().map(|card| card.valid_from),
            current_card_valid_until: c.card.as_ref().and_then(|card| card.valid_until),
        };
        rows.push(citizen);
    }
    repo.import_citizens(rows, now).await.context("register import")
}
