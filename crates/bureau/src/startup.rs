//! The start-up every service shares, between validating its configuration and serving: the
//! directory (and this bureau's role in it), the clock, the service's own checks, the database
//! (connected and migrated) and the shutdown signal. Start-up is an edge, so errors are
//! `anyhow` ones, each naming the configuration key at fault.
use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use sea_orm_migration::MigratorTrait;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use yidi_domain::{Bureau, Directory, Role};

use yidi_audit::AuditEntry;
use yidi_grpc::{access::DeniedCall, client::Connector, security::ServerSecurity};
use yidi_runtime::{
    clock::Clock,
    config::{ConfigError, DatabaseConfig},
    db,
    directory::DirectoryHandle,
    shutdown::Shutdown,
};

use crate::{
    Sections,
    server::{self, GrpcService, Listeners, Starting},
};

/// A service ready to build its parts and serve.
#[derive(Debug)]
pub struct Prepared<S, T> {
    /// Re-read on SIGHUP and when the file changes (`directory.reload_seconds`), until shutdown.
    pub directory: DirectoryHandle,
    /// Channels to the other bureaus, over mutual TLS unless `tls.plaintext`.
    pub connector: Connector,
    pub clock: Clock,
    /// Connected and migrated; the service closes it once it has served.
    pub db: DatabaseConnection,
    /// Triggered when the caller's shutdown future resolves.
    pub shutdown: Shutdown,
    /// The task that triggers `shutdown`.
    pub signal: JoinHandle<()>,
    /// Already listening (health NOT_SERVING); `server.serve(service)` makes it SERVING.
    pub server: Starting<S>,
    /// `server.shutdown_grace_seconds`.
    pub grace: Duration,
    /// What the service's own check returned.
    pub checked: T,
    /// Wakes the service's outbox dispatcher (an operator re-queued a dead letter).
    pub outbox_wake: Arc<Notify>,
}

/// Loads the directory and checks that `server.bureau_id` is listed there with `role`, reads the
/// `[tls]` files, builds the clock and runs the service's own `check` (given the directory, this
/// bureau's entry and the connector to its peers). Then it starts answering on `listener` (and
/// `server.health_listen`, if set) with health NOT_SERVING, connects to the database and runs the
/// migrator `M`.
///
/// Everything that can be wrong with the configuration is reported before the port answers or the
/// database is touched; a failed connection or migration stops the server and closes the database.
pub async fn prepare<M: MigratorTrait, S: GrpcService, T>(
    sections: Sections<'_>,
    role: Role,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    check: impl FnOnce(&Directory, &Bureau, &Connector) -> anyhow::Result<T>,
) -> anyhow::Result<Prepared<S, T>> {
    sections.validate()?;
    let transport = sections.tls.load()?;
    let handle = DirectoryHandle::load(&sections.directory.path)?;
    let directory = handle.current();
    let bureau_id = &sections.server.bureau_id;
    let bureau = directory.get_with_role(bureau_id, role).ok_or_else(|| {
        ConfigError::key(
            "server.bureau_id",
            format!(
                "{bureau_id:?} is not a bureau with role {} in the directory {}",
                format!("{role:?}").to_lowercase(),
                sections.directory.path.display()
            ),
        )
    })?;
    let clock = Clock::from_config(sections.clock).map_err(|message| ConfigError::key("clock", message))?;
    let limits = sections.server.limits()?;
    let connector = Connector::new(transport.clone());
    let checked = check(&directory, bureau, &connector)?;
    let health = match sections.server.health_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|e| ConfigError::key("server.health_listen", format!("cannot listen on {address}: {e}")))?,
        ),
        None => None,
    };
    let security = ServerSecurity::new(transport, Arc::new(handle.clone()), bureau_id);

    let (trigger, shutdown_handle) = Shutdown::new();
    let grace = Duration::from_secs(sections.server.shutdown_grace_seconds);
    let listeners = Listeners { main: listener, health };
    let server = server::start::<S>(listeners, &security, shutdown_handle.clone(), grace, limits)
        .context("starting the gRPC server")?;
    let signal = trigger.trigger_on(shutdown);
    let reloader = handle.spawn_reloader(sections.directory.reload_every(), shutdown_handle.clone());

    let db = match connect_and_migrate::<M>(sections.database, DATABASE_PATIENCE).await {
        Ok(db) => db,
        Err(error) => {
            signal.abort();
            reloader.abort();
            server.abandon().await;
            return Err(error);
        }
    };
    server.open_audit(db.clone());
    let outbox_wake = Arc::new(Notify::new());
    server.open_outbox(db.clone(), Arc::clone(&outbox_wake));
    server.open_idempotency(yidi_idempotency::Store { db: db.clone(), clock: clock.clone() });
    yidi_idempotency::spawn_pruner(
        db.clone(),
        clock.clone(),
        sections.idempotency.retention(),
        shutdown_handle.clone(),
    );
    record_denials_in_the_audit_trail(&security, db.clone(), clock.clone());
    Ok(Prepared {
        directory: handle,
        connector,
        clock,
        db,
        shutdown: shutdown_handle,
        signal,
        server,
        grace,
        checked,
        outbox_wake,
    })
}

/// Every call the access layer denies becomes a `denied_call` row of this bureau's audit trail.
fn record_denials_in_the_audit_trail(security: &ServerSecurity, db: DatabaseConnection, clock: Clock) {
    security.denied_calls().start_recording(move |denied: DeniedCall| {
        let (db, now) = (db.clone(), clock.now());
        async move {
            let entry = AuditEntry::new("denied_call", denied.subject, denied.outcome, denied.detail);
            if let Err(error) = yidi_audit::append(&db, now, entry).await {
                tracing::error!(%error, "cannot audit a denied call");
            }
        }
    });
}

/// How long start-up waits out a database that cannot be reached or is busy (a server restarting,
/// every connection taken) before it gives up: long enough for a restart, short enough that an
/// orchestrator sees a bureau that will never start.
const DATABASE_PATIENCE: Duration = Duration::from_secs(60);

/// Connects and migrates. A transient failure (the connection or the pool, a lock: see
/// `is_transient_database_error`) is tried again with a growing pause until [`DATABASE_PATIENCE`]
/// (`patience`) is spent; any other failure (a bad URL, a failed migration) ends the start at once. A migration
/// interrupted half-way is safe to repeat: each one runs in its own transaction on PostgreSQL and
/// the applied ones are recorded.
async fn connect_and_migrate<M: MigratorTrait>(
    config: &DatabaseConfig,
    patience: Duration,
) -> anyhow::Result<DatabaseConnection> {
    use yidi_grpc::error::is_transient_database_error;
    let give_up_at = tokio::time::Instant::now() + patience;
    let mut pause = Duration::from_millis(250);
    loop {
        let (error, what) = match db::connect(config).await {
            Err(error) => (error, "database.url: cannot connect"),
            Ok(db) => match migrate_alone::<M>(&db, config).await {
                Ok(()) => return Ok(db),
                Err(error) => {
                    let _ = db.close().await;
                    (error, "database migration")
                }
            },
        };
        if !is_transient_database_error(&error) || tokio::time::Instant::now() + pause > give_up_at {
            return Err(anyhow::Error::new(error).context(what));
        }
        tracing::warn!(%error, retry_in_ms = pause.as_millis() as u64, "{what}: the database is not answering; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(4));
    }
}

/// The key of the advisory lock migrations run under (advisory locks are per database).
const MIGRATION_LOCK: i64 = 0x7969_6469_6d69_6772; // "yidimigr"

/// Migrates `db`. On PostgreSQL the migrations run under an advisory lock held by a connection of
/// its own, so that replicas started together on an empty database (compose starts two
/// registries) do not create the same tables at once: the second waits, then finds them applied.
async fn migrate_alone<M: MigratorTrait>(db: &DatabaseConnection, config: &DatabaseConfig) -> Result<(), DbErr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return M::up(db, None).await;
    }
    let lock = db::connect(&DatabaseConfig { url: config.url.clone(), max_connections: 1 }).await?;
    let acquire = Statement::from_string(DbBackend::Postgres, format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"));
    let migrated = match lock.execute_raw(acquire).await {
        Ok(_) => M::up(db, None).await,
        Err(error) => Err(error),
    };
    // Ending the session releases the lock, also when the migrations failed.
    let _ = lock.close().await;
    migrated
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait, Statement};
    use sea_orm_migration::{MigrationTrait, prelude::async_trait};

    use yidi_audit::{ChainAuditLog, CreateAuditLog};
    use yidi_grpc::{server_config::ServerConfig, tls::TlsConfig};
    use yidi_idempotency::IdempotencyConfig;
    use yidi_runtime::{
        clock::ClockConfig,
        config::DirectoryConfig,
        directory::{BureauEntry, DirectoryFile},
        telemetry::LogConfig,
    };

    use super::*;
    use crate::config::BureauConfig;
    use crate::server::tests::{SlowIssuance, TestService, issuance_server};

    async fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    struct AuditOnly;

    #[async_trait::async_trait]
    impl MigratorTrait for AuditOnly {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![
                Box::new(CreateAuditLog),
                Box::new(ChainAuditLog),
                Box::new(yidi_idempotency::CreateIdempotentRequests),
            ]
        }
    }

    crate::bureau_config! {
        /// Only the shared sections, which are all start-up reads.
        pub struct SharedSectionsOnly {}
    }

    struct Setup {
        dir: tempfile::TempDir,
        config: SharedSectionsOnly,
    }

    impl Setup {
        fn new(bureau_id: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let entry = |id: &str, role| BureauEntry {
                id: id.into(),
                role,
                name: id.into(),
                jurisdiction: Vec::new(),
                region: String::new(),
                endpoint: "http://127.0.0.1:1".into(),
                endpoints: Vec::new(),
                keys: Vec::new(),
            };
            let path = dir.path().join("directory.toml");
            DirectoryFile {
                bureaus: vec![entry("registry-national", Role::Registry), entry("station", Role::Intake)],
                ..DirectoryFile::default()
            }
            .write(&path)
            .unwrap();
            let config = SharedSectionsOnly {
                server: ServerConfig {
                    shutdown_grace_seconds: 3,
                    ..ServerConfig::new(bureau_id, "127.0.0.1:0".parse().unwrap())
                },
                database: DatabaseConfig {
                    url: format!("sqlite://{}?mode=rwc", dir.path().join("db.sqlite").display()),
                    max_connections: 1,
                },
                directory: DirectoryConfig::new(path),
                clock: ClockConfig::default(),
                log: LogConfig::default(),
                tls: TlsConfig { plaintext: true, ..TlsConfig::default() },
                idempotency: IdempotencyConfig::default(),
            };
            Self { dir, config }
        }

        fn sections(&self) -> Sections<'_> {
            self.config.sections()
        }

        fn database_exists(&self) -> bool {
            self.dir.path().join("db.sqlite").exists()
        }
    }

    #[tokio::test]
    async fn a_bureau_with_the_role_gets_a_migrated_database_and_a_shutdown_armed_by_the_signal() {
        let setup = Setup::new("registry-national");
        let (fire, fired) = tokio::sync::oneshot::channel::<()>();
        let signal = async {
            let _ = fired.await;
        };
        let prepared = prepare::<AuditOnly, TestService, _>(
            setup.sections(),
            Role::Registry,
            listener().await,
            signal,
            |directory, bureau, _| Ok((directory.with_role(Role::Intake).count(), bureau.id.clone())),
        )
        .await
        .unwrap();
        assert_eq!(prepared.checked, (1, "registry-national".to_owned()));
        let backend = prepared.db.get_database_backend();
        let count = Statement::from_string(backend, "SELECT COUNT(*) FROM audit_log");
        assert!(prepared.db.query_one_raw(count).await.unwrap().is_some(), "migrated");

        assert!(!prepared.shutdown.is_triggered());
        fire.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), prepared.shutdown.wait()).await.unwrap();
        let service = issuance_server(SlowIssuance::default());
        tokio::time::timeout(Duration::from_secs(5), prepared.server.serve(service)).await.unwrap().unwrap();
        prepared.db.close().await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_database_is_waited_for_and_a_bad_url_is_not() {
        // Nothing listens on port 1: connection refused, a transient error, tried again.
        let closed = DatabaseConfig { url: "postgres://postgres@127.0.0.1:1/none".into(), max_connections: 1 };
        let started = std::time::Instant::now();
        let error = connect_and_migrate::<AuditOnly>(&closed, Duration::from_secs(1)).await.unwrap_err();
        assert!(format!("{error:#}").contains("cannot connect"), "{error:#}");
        assert!(started.elapsed() >= Duration::from_millis(700), "tried again: {:?}", started.elapsed());
        // A URL no driver takes is no outage: refused at once.
        let bad = DatabaseConfig { url: "nosuchdb://x".into(), max_connections: 1 };
        let started = std::time::Instant::now();
        connect_and_migrate::<AuditOnly>(&bad, Duration::from_secs(30)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    /// The error of a start-up that must fail.
    async fn refused(setup: &Setup) -> anyhow::Error {
        let never = std::future::pending::<()>();
        let prepared = prepare::<AuditOnly, TestService, _>(
            setup.sections(),
            Role::Registry,
            listener().await,
            never,
            |_, _, _| Ok(()),
        );
        prepared.await.unwrap_err()
    }

    #[tokio::test]
    async fn configuration_errors_name_their_key_before_the_database_is_touched() {
        let never = std::future::pending::<()>;

        let setup = Setup::new("station");
        let error = refused(&setup).await;
        assert!(error.to_string().contains("server.bureau_id"), "{error}");

        let mut setup = Setup::new("registry-national");
        let now = chrono::Utc::now();
        (setup.config.clock.fixed, setup.config.clock.start) = (Some(now), Some(now));
        let error = refused(&setup).await;
        assert!(error.to_string().contains("clock"), "{error}");

        let mut setup = Setup::new("registry-national");
        setup.config.server.max_in_flight = 0;
        let error = refused(&setup).await;
        assert!(error.to_string().contains("server.max_in_flight"), "{error}");

        let setup = Setup::new("registry-national");
        let error = prepare::<AuditOnly, TestService, ()>(
            setup.sections(),
            Role::Registry,
            listener().await,
            never(),
            |_, _, _| anyhow::bail!("configuration key import.path: missing"),
        )
        .await
        .unwrap_err();
        assert!(error.to_string().contains("import.path"), "{error}");
        assert!(!setup.database_exists(), "the service's own check runs before the database is touched");
    }

    /// Replicas of one bureau started together on an empty PostgreSQL database each migrate it
    /// (under the lock, one after another) and each start.
    #[tokio::test]
    async fn replicas_started_together_on_an_empty_postgres_database_all_migrate_it() {
        let Some(scratch) = yidi_testkit::postgres_for_tests("bureau_migrate_together").await.unwrap() else { return };
        let config = DatabaseConfig { url: scratch.url().to_owned(), max_connections: 2 };
        let starts = (0..4).map(|_| connect_and_migrate::<AuditOnly>(&config, Duration::from_secs(5)));
        for started in futures::future::join_all(starts).await {
            started.unwrap().close().await.unwrap();
        }
        scratch.drop().await.unwrap();
    }
}
