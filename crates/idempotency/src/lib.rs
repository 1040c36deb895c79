//! Idempotent mutating RPCs: a caller that sets the request's `request_id` field (AIP-155; every
//! mutating request message has one) or sends the metadata `idempotency-key` may repeat a mutating
//! call (after a timeout, a dropped connection, a restart of either side) and gets the first answer
//! again, with nothing written a second time. Both name the same key: if a call carries both, they
//! must be equal (else INVALID_ARGUMENT on `request_id`); `request_id` is validated like the header.
//!
//! The [`IdempotencyLayer`] sits on the main port behind the security layers, so it sees only
//! admitted calls and knows their [`Caller`]. For a method listed in [`MUTATING`] that carries a
//! key (1 to 128 visible ASCII characters; anything else is INVALID_ARGUMENT naming the field
//! `idempotency-key`), it buffers the request (bounded by [`MAX_REQUEST_BYTES`]), hashes it with
//! SHA-256 and looks up (caller, method, key) in the service's own table `idempotent_requests`:
//! - found, same request: the stored answer (status, message, details, response message) is
//!   replayed without calling the service, marked with the response header
//!   `idempotency-replayed: true`;
//! - found, another request: INVALID_ARGUMENT, ErrorInfo reason `IDEMPOTENCY_KEY_REUSED`;
//! - not found: the service answers, and a definitive answer ([`is_definitive`]: OK and errors
//!   that a repeat would meet again) is stored. A transient one (UNAVAILABLE, DEADLINE_EXCEEDED,
//!   INTERNAL...) is not, so the repeat runs again.
//!
//! Repeats of one key that arrive together are run one after the other in this process; across
//! replicas the table's primary key lets only the first answer be stored.
//!
//! Without the header a call behaves as before: retries are not de-duplicated here, though most
//! handlers are naturally idempotent on their business keys (a decision id, an application id).
//! Read-only methods ignore the header.
//!
//! One window stays open: the service commits its change, then the process dies before the layer
//! stores the answer; a repeat then runs the handler again. A handler that must close it reads the
//! key from the request's extensions ([`IdempotencyKey`]) and stores it with its own rows, in its
//! own transaction. Rows are kept `idempotency.retention_hours` (pruned by [`spawn_pruner`]).
#![forbid(unsafe_code)]

mod migration;

pub use migration::CreateIdempotentRequests;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use base64::Engine;
use sea_orm::{
    ActiveValue::Set, DatabaseConnection, DbErr, EntityTrait, QueryFilter, entity::prelude::*, sea_query::OnConflict,
};
use sea_orm_migration::prelude::{ColumnDef, Index, MigrationName, MigrationTrait, SchemaManager, Table, async_trait};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::{
    Code, Status,
    body::Body,
    codegen::{
        Bytes,
        http::{HeaderMap, HeaderValue, Request, Response, header::CONTENT_TYPE, response::Parts},
    },
};
use tonic_types::{ErrorDetails, StatusExt};
use tower::Service;

use yidi_grpc::{
    body::{self, Buffered, CollectError},
    caller::caller_of,
    error::{ERROR_DOMAIN, FieldViolations},
    layer::{CallFuture, Inner, Intercept, InterceptLayer},
};
use yidi_runtime::{clock::Clock, shutdown::Shutdown};

/// The request metadata carrying the caller's key.
pub const HEADER: &str = "idempotency-key";
/// The request field carrying the caller's key (AIP-155), in every mutating request message.
pub const REQUEST_ID: &str = "request_id";
/// The response header on a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotency-replayed";
/// The longest key accepted.
pub const MAX_KEY_LEN: usize = 128;
/// The largest request body buffered: tonic's default decode limit plus the 5-byte gRPC frame
/// header. No mutating request comes near it.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024 + 5;
/// ErrorInfo reason of a key sent again with another request.
pub const KEY_REUSED: &str = "IDEMPOTENCY_KEY_REUSED";

/// Every mutating RPC of the suite (full gRPC paths): those whose `(yidi.v1.policy)` option says
/// `mutating: true` ([`yidi_proto::policy`]). A new mutating RPC says so in the contract.
pub static MUTATING: LazyLock<Vec<&'static str>> = LazyLock::new(|| rpcs(true));

/// The RPCs that change nothing a repeat could duplicate (`mutating: false`). CheckCard/CheckCards
/// record a hit per check: a repeated check is another check, and is recorded as one.
pub static READ_ONLY: LazyLock<Vec<&'static str>> = LazyLock::new(|| rpcs(false));

fn rpcs(mutating: bool) -> Vec<&'static str> {
    yidi_proto::policy::method_policies().iter().filter(|p| p.mutating == mutating).map(|p| p.path.as_str()).collect()
}

pub fn is_mutating(path: &str) -> bool {
    MUTATING.contains(&path)
}

/// The caller's key, in the request extensions of a mutating call that carries one, for a
/// handler that stores it with its own rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub String);

/// The key of a request's headers: `Ok(None)` without the header, `Err` (a field violation on
/// `idempotency-key`) if it is not 1 to 128 visible ASCII characters or is sent twice.
pub fn key_of(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, FieldViolations> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else { return Ok(None) };
    let invalid = |description: String| {
        let mut violations = FieldViolations::new();
        violations.add(HEADER, description);
        violations
    };
    if values.next().is_some() {
        return Err(invalid("must be sent once".into()));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_LEN {
        return Err(invalid(format!("must be 1 to {MAX_KEY_LEN} characters, found {}", bytes.len())));
    }
    if !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(invalid("must be visible ASCII characters (no spaces)".into()));
    }
    Ok(Some(IdempotencyKey(String::from_utf8_lossy(bytes).into_owned())))
}

/// Whether an answer with `code` is final, so that a repeat must get it again: OK, or an error the
/// receiver decided about the request ([`yidi_grpc::client::is_transient`] says which, for every
/// bureau alike). Transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED,
/// INTERNAL, UNKNOWN, CANCELLED...) are not stored: the repeat runs again.
pub fn is_definitive(code: Code) -> bool {
    code == Code::Ok || !yidi_grpc::client::is_transient(code)
}

/// `[idempotency]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// Hours a stored answer is kept (and replayed); older rows are pruned.
    pub retention_hours: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self { retention_hours: 24 }
    }
}

/// Ten years: beyond any retry, and far from the clock's limits.
const MAX_RETENTION_HOURS: u64 = 10 * 366 * 24;

impl IdempotencyConfig {
    pub fn validate(&self) -> Result<(), yidi_runtime::config::ConfigError> {
        if !(1..=MAX_RETENTION_HOURS).contains(&self.retention_hours) {
            return Err(yidi_runtime::config::ConfigError::key(
                "idempotency.retention_hours",
                format!("must be 1 to {MAX_RETENTION_HOURS} (ten years), found {}", self.retention_hours),
            ));
        }
        Ok(())
    }

    pub fn retention(&self) -> chrono::Duration {
        let hours = self.retention_hours.min(MAX_RETENTION_HOURS);
        chrono::Duration::hours(i64::try_from(hours).unwrap_or(i64::from(u32::MAX)))
    }
}

/// A row of `idempotent_requests`: the first definitive answer to (caller, method, key).
pub mod record {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "idempotent_requests")]
    pub struct Model {
        /// The caller's directory id; empty on a plaintext server.
        #[sea_orm(primary_key, auto_increment = false)]
        pub caller: String,
        /// The full gRPC path.
        #[sea_orm(primary_key, auto_increment = false)]
        pub method: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub idempotency_key: String,
        /// SHA-256 of the request body as received (gRPC frames).
        pub request_sha256: Vec<u8>,
        /// The gRPC status code of the answer.
        pub status_code: i32,
        #[sea_orm(column_type = "Text")]
        pub message: String,
        /// `grpc-status-details-bin`, decoded (a `google.rpc.Status`); empty if none.
        pub details: Vec<u8>,
        /// The response body (gRPC frames); empty for an error.
        pub response: Vec<u8>,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Deletes the rows older than `retention` now, then every [`PRUNE_EVERY`], until shutdown.
pub fn spawn_pruner(
    db: DatabaseConnection,
    clock: Clock,
    retention: chrono::Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let cutoff = clock.now().checked_sub_signed(retention).unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
            match prune(&db, cutoff).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "idempotent answers past retention pruned"),
                Err(error) => tracing::warn!(%error, "cannot prune idempotent answers"),
            }
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(PRUNE_EVERY) => {}
            }
        }
    })
}

/// How often [`spawn_pruner`] looks for old rows.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Deletes the answers stored before `cutoff`; returns how many.
pub async fn prune(db: &DatabaseConnection, cutoff: chrono::DateTime<chrono::Utc>) -> Result<u64, DbErr> {
    let deleted = record::Entity::delete_many().filter(record::Column::CreatedAt.lt(cutoff)).exec(db).await?;
    Ok(deleted.rows_affected)
}

/// The database the answers are kept in, and the clock that dates them.
#[derive(Debug, Clone)]
pub struct Store {
    pub db: DatabaseConnection,
    pub clock: Clock,
}

/// (caller, method, key): one stored answer.
type RecordId = (String, String, String);

/// What the server's connections share: the store, and the keys with a call in progress.
#[derive(Debug, Default)]
pub struct KeyedAnswers {
    /// Set once the database is migrated; before that the service answers UNAVAILABLE anyway.
    store: OnceLock<Store>,
    /// One lock per key with a call in progress, so that simultaneous repeats run one by one.
    in_progress: Mutex<HashMap<RecordId, Arc<tokio::sync::Mutex<()>>>>,
}

/// The tower layer; one per server, shared by its connections. See the module documentation.
pub type IdempotencyLayer = InterceptLayer<KeyedAnswers>;

impl KeyedAnswers {
    /// The layer, keeping nothing until [`KeyedAnswers::open`].
    pub fn layer() -> IdempotencyLayer {
        InterceptLayer::new(Self::default())
    }

    /// Keeps and replays answers in `store` from now on (once; later calls are ignored).
    pub fn open(&self, store: Store) {
        let _ = self.store.set(store);
    }
}

impl Intercept for KeyedAnswers {
    fn intercept<S: Inner>(self: Arc<Self>, mut inner: S, request: Request<Body>) -> CallFuture {
        let path = request.uri().path();
        let Some(policy) = yidi_proto::policy::policy_of(path).filter(|policy| policy.mutating) else {
            return Box::pin(inner.call(request));
        };
        let header = match key_of(request.headers()) {
            Ok(header) => header,
            Err(violations) => return Box::pin(std::future::ready(Ok(invalid(violations)))),
        };
        let field = policy.request_id_field;
        if header.is_none() && field.is_none() {
            return Box::pin(inner.call(request));
        }
        Box::pin(async move { Ok(keyed(inner, self, header, field, request).await.unwrap_or_else(Status::into_http)) })
    }
}

fn invalid(violations: FieldViolations) -> Response<Body> {
    Status::from(yidi_grpc::ApiError::InvalidArgument(violations)).into_http()
}

/// A mutating call that may carry a key (the header, or the request's `request_id`): the key is
/// read, and the call answered [`once`] per key; without one, the service answers as usual.
async fn keyed<S>(
    mut inner: S,
    shared: Arc<KeyedAnswers>,
    header: Option<IdempotencyKey>,
    field: Option<u32>,
    request: Request<Body>,
) -> Result<Response<Body>, Status>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let (mut parts, body) = request.into_parts();
    let (body, _) = collect(body, Some(MAX_REQUEST_BYTES)).await?;
    let request_id = match field.map(|field| request_id_of(&body, field)).transpose() {
        Ok(request_id) => request_id.flatten(),
        Err(violations) => return Ok(invalid(violations)),
    };
    let key = match (header, request_id) {
        (None, None) => {
            let request = Request::from_parts(parts, Body::new(Buffered { data: Some(body), trailers: None }));
            return match inner.call(request).await {
                Ok(response) => Ok(response),
                Err(never) => match never {},
            };
        }
        (Some(key), None) | (None, Some(key)) => key,
        (Some(header), Some(request_id)) if header == request_id => request_id,
        (Some(_), Some(_)) => {
            let mut violations = FieldViolations::new();
            violations.add(REQUEST_ID, format!("differs from the {HEADER} header: send one, or the same in both"));
            return Ok(invalid(violations));
        }
    };
    let Some(store) = shared.store.get().cloned() else {
        return Err(yidi_grpc::ApiError::Starting { service: "the idempotency store" }.into());
    };
    let caller = caller_of(&parts.extensions).map(|caller| caller.id().to_owned()).unwrap_or_default();
    let id = (caller, parts.uri.path().to_owned(), key.0.clone());
    parts.extensions.insert(key);
    once(inner, shared, store, id, parts, body).await
}

/// The request's `request_id` (AIP-155), read from the encoded message (field number `field`):
/// `Ok(None)` if absent or empty, `Err` (a violation on `request_id`) if it is not 1 to 128
/// visible ASCII characters. The message is the body's first gRPC frame; a compressed one is not
/// read (the servers accept no compression).
pub fn request_id_of(body: &[u8], field: u32) -> Result<Option<IdempotencyKey>, FieldViolations> {
    let Some(bytes) = body::length_delimited_field(body, field).filter(|bytes| !bytes.is_empty()) else {
        return Ok(None);
    };
    let mut violations = FieldViolations::new();
    if bytes.len() > MAX_KEY_LEN {
        violations.add(REQUEST_ID, format!("must be 1 to {MAX_KEY_LEN} characters, found {}", bytes.len()));
    } else if !bytes.iter().all(u8::is_ascii_graphic) {
        violations.add(REQUEST_ID, "must be visible ASCII characters (no spaces); a UUID is a good choice");
    }
    if violations.is_empty() {
        Ok(Some(IdempotencyKey(String::from_utf8_lossy(bytes).into_owned())))
    } else {
        Err(violations)
    }
}

/// The answer to a mutating call with a key: replayed, refused, or the service's (then stored).
async fn once<S>(
    mut inner: S,
    shared: Arc<KeyedAnswers>,
    store: Store,
    id: RecordId,
    parts: tonic::codegen::http::request::Parts,
    body: Bytes,
) -> Result<Response<Body>, Status>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let request_sha256 = Sha256::digest(&body).to_vec();
    let _turn = KeyTurn::take(&shared, &id).await;

    let stored = record::Entity::find_by_id(id.clone()).one(&store.db).await.map_err(store_unavailable)?;
    if let Some(stored) = stored {
        if stored.request_sha256 != request_sha256 {
            return Err(key_reused(&id));
        }
        tracing::info!(method = %id.1, caller = %id.0, "idempotent repeat: the stored answer is replayed");
        return Ok(replay(&stored));
    }

    let request = Request::from_parts(parts, Body::new(Buffered { data: Some(body), trailers: None }));
    let response = match inner.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let (data, trailers) = collect(body, None).await?;
    let status = trailers.as_ref().and_then(status_of).or_else(|| status_of(&parts.headers));
    if let Some((code, message, details)) = status.filter(|(code, ..)| is_definitive(*code)) {
        let row = record::ActiveModel {
            caller: Set(id.0.clone()),
            method: Set(id.1.clone()),
            idempotency_key: Set(id.2.clone()),
            request_sha256: Set(request_sha256),
            status_code: Set(code as i32),
            message: Set(message),
            details: Set(details),
            response: Set(data.to_vec()),
            created_at: Set(store.clock.now()),
        };
        // Another replica may have stored its answer first: then its answer stands for repeats.
        let stored = record::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([record::Column::Caller, record::Column::Method, record::Column::IdempotencyKey])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&store.db)
            .await;
        if let Err(error) = stored {
            tracing::error!(%error, method = %id.1, "cannot store the answer of an idempotent call: a repeat runs again");
        }
    }
    Ok(rebuild(parts, data, trailers))
}

/// The turn of one key: held while its call runs, released (and forgotten if nobody waits) on drop.
struct KeyTurn {
    shared: Arc<KeyedAnswers>,
    id: RecordId,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyTurn {
    async fn take(shared: &Arc<KeyedAnswers>, id: &RecordId) -> Self {
        let lock = {
            let mut in_progress = shared.in_progress.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(in_progress.entry(id.clone()).or_default())
        };
        let guard = Some(Arc::clone(&lock).lock_owned().await);
        Self { shared: Arc::clone(shared), id: id.clone(), lock, guard }
    }
}

impl Drop for KeyTurn {
    fn drop(&mut self) {
        self.guard.take();
        let mut in_progress = self.shared.in_progress.lock().unwrap_or_else(PoisonError::into_inner);
        // Clones are taken only under this map's lock: two left (the map's and ours) means no
        // call waits for this key.
        if Arc::strong_count(&self.lock) == 2 {
            in_progress.remove(&self.id);
        }
    }
}

fn store_unavailable(error: DbErr) -> Status {
    tracing::error!(%error, "the idempotency store cannot be read");
    let mut details = ErrorDetails::new();
    details.set_error_info("IDEMPOTENCY_STORE_UNAVAILABLE", ERROR_DOMAIN, HashMap::new());
    Status::with_error_details(Code::Unavailable, "the stored answers cannot be read: try again", details)
}

fn key_reused(id: &RecordId) -> Status {
    let mut details = ErrorDetails::new();
    details.add_bad_request_violation(HEADER, "was used before for another request to this method");
    details.set_error_info(KEY_REUSED, ERROR_DOMAIN, HashMap::from([("method".to_owned(), id.1.clone())]));
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{HEADER} {:?} was used before with another request to {}", id.2, id.1),
        details,
    )
}

/// The stored answer, as the service first gave it.
fn replay(stored: &record::Model) -> Response<Body> {
    let code = Code::from_i32(stored.status_code);
    let mut response = if code == Code::Ok {
        let mut trailers = HeaderMap::new();
        trailers.insert(Status::GRPC_STATUS, HeaderValue::from_static("0"));
        let body = Buffered { data: Some(Bytes::from(stored.response.clone())), trailers: Some(trailers) };
        let mut response = Response::new(Body::new(body));
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        response
    } else {
        Status::with_details(code, stored.message.clone(), Bytes::from(stored.details.clone())).into_http()
    };
    response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

fn rebuild(parts: Parts, data: Bytes, trailers: Option<HeaderMap>) -> Response<Body> {
    Response::from_parts(parts, Body::new(Buffered { data: Some(data), trailers }))
}

/// The status an answer's headers or trailers carry: code, decoded message, decoded details.
/// `None` if there is none, or it cannot be read (then it is not stored).
fn status_of(headers: &HeaderMap) -> Option<(Code, String, Vec<u8>)> {
    let code = Code::from_bytes(headers.get(Status::GRPC_STATUS)?.as_bytes());
    let message = match headers.get(Status::GRPC_MESSAGE) {
        Some(value) => percent_decode(value.as_bytes())?,
        None => String::new(),
    };
    let details = match headers.get(Status::GRPC_STATUS_DETAILS) {
        Some(value) => base64::engine::general_purpose::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        )
        .decode(value.as_bytes())
        .ok()?,
        None => Vec::new(),
    };
    Some((code, message, details))
}

/// `grpc-message` is percent-encoded UTF-8.
fn percent_decode(bytes: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%'
            && let [high, low, after @ ..] = tail
            && let (Some(high), Some(low)) = ((*high as char).to_digit(16), (*low as char).to_digit(16))
        {
            out.push((high * 16 + low) as u8);
            rest = after;
            continue;
        }
        out.push(byte);
        rest = tail;
    }
    String::from_utf8(out).ok()
}

/// All of a body: its data, concatenated, and its trailers. More than `limit` bytes of data:
/// OUT_OF_RANGE, as tonic answers a message over its decode limit.
async fn collect(body: Body, limit: Option<usize>) -> Result<(Bytes, Option<HeaderMap>), Status> {
    body::collect(body, limit).await.map_err(|error| match error {
        CollectError::TooLarge(limit) => {
            Status::out_of_range(format!("request larger than {limit} bytes: not accepted with {HEADER}"))
        }
        CollectError::Body(status) => status,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use sea_orm::{Database, DatabaseConnection};
    use tokio::net::TcpListener;
    use tonic::{
        Code, Request as GrpcRequest, Response as GrpcResponse, Status,
        codegen::http::{HeaderMap, HeaderValue},
        transport::Channel,
    };
    use yidi_proto::v1::{self as pb, issuance_client::IssuanceClient};
    use yidi_testkit::fake::{IssuanceFake, issuance_server};

    use tower::Layer;

    use super::*;
    use yidi_grpc::ApiError;

    #[test]
    fn a_key_is_1_to_128_visible_ascii_characters_sent_once() {
        let headers = |values: &[&[u8]]| {
            let mut map = HeaderMap::new();
            for value in values {
                map.append(HEADER, HeaderValue::from_bytes(value).unwrap());
            }
            map
        };
        assert_eq!(key_of(&HeaderMap::new()), Ok(None), "no header: no key, the call runs as always");
        let longest = "k".repeat(MAX_KEY_LEN);
        for good in ["a", "order-2118-03-01/7", longest.as_str(), "~!#$%&'*+-.^_`|"] {
            assert_eq!(key_of(&headers(&[good.as_bytes()])), Ok(Some(IdempotencyKey(good.into()))), "{good:?}");
        }
        let too_long = "k".repeat(MAX_KEY_LEN + 1);
        for bad in [&b""[..], too_long.as_bytes(), b"two words", b"tab\there", "\u{e9}t\u{e9}".as_bytes()] {
            let violations = key_of(&headers(&[bad])).unwrap_err();
            let fields: Vec<&str> = violations.iter().map(|(field, _)| field.as_str()).collect();
            assert_eq!(fields, [HEADER], "{bad:?}");
        }
        assert!(key_of(&headers(&[b"a", b"b"])).is_err(), "sent twice");
    }

    #[test]
    fn every_rpc_in_the_descriptor_set_is_classified_mutating_or_read_only_once() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(yidi_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut served = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    served.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
        let unclassified: Vec<&String> = served
            .iter()
            .filter(|path| !MUTATING.contains(&path.as_str()) && !READ_ONLY.contains(&path.as_str()))
            .collect();
        assert!(unclassified.is_empty(), "give each an option (yidi.v1.policy): {unclassified:?}");
        let both: Vec<&&str> = MUTATING.iter().filter(|path| READ_ONLY.contains(path)).collect();
        assert!(both.is_empty(), "classified twice: {both:?}");
        let stale: Vec<&&str> =
            MUTATING.iter().chain(READ_ONLY.iter()).filter(|path| !served.iter().any(|s| s == **path)).collect();
        assert!(stale.is_empty(), "not an RPC of the descriptor set: {stale:?}");
        assert!(is_mutating("/yidi.v1.Intake/SubmitApplication"));
        assert!(!is_mutating("/yidi.v1.Intake/GetApplication"));
    }

    #[test]
    fn only_answers_the_request_decided_are_definitive() {
        for code in [Code::Ok, Code::InvalidArgument, Code::NotFound, Code::AlreadyExists, Code::FailedPrecondition] {
            assert!(is_definitive(code), "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert!(!is_definitive(code), "{code:?}");
        }
        assert_eq!(percent_decode(b"caf%C3%A9 50%25 %zz").as_deref(), Some("café 50% %zz"));
    }

    /// Counts `PlaceOrder` calls; the decision's signature says how to answer.
    #[derive(Debug, Clone, Default)]
    struct Counter {
        calls: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl IssuanceFake for Counter {
        async fn place_order(
            &self,
            request: GrpcRequest<pb::PlaceOrderRequest>,
        ) -> Result<GrpcResponse<pb::PlaceOrderResponse>, Status> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let seen_key = request.extensions().get::<IdempotencyKey>().map(|key| key.0.clone()).unwrap_or_default();
            let signature = request.into_inner().decision.map(|d| d.signature).unwrap_or_default();
            match signature.as_slice() {
                b"refuse" => Err(ApiError::precondition("ORDER_REFUSED", format!("refused, call {call}")).into()),
                b"busy" => Err(Status::unavailable(format!("busy, call {call}"))),
                other => {
                    if other == b"slow" {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let order =
                        pb::Order { order_id: format!("order-{call}"), last_error: seen_key, ..Default::default() };
                    Ok(GrpcResponse::new(pb::PlaceOrderResponse { order: Some(order) }))
                }
            }
        }
    }

    struct Served {
        calls: Arc<AtomicUsize>,
        channel: Channel,
        db: DatabaseConnection,
        _trigger: yidi_runtime::shutdown::ShutdownTrigger,
    }

    async fn serve() -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: SocketAddr = listener.local_addr().unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let db = Database::connect("sqlite::memory:").await.unwrap();
        CreateIdempotentRequests.up(&SchemaManager::new(&db)).await.unwrap();
        let layer = KeyedAnswers::layer();
        layer.shared().open(Store { db: db.clone(), clock: Clock::fixed(chrono::Utc::now()) });
        let counter = Counter::default();
        let calls = Arc::clone(&counter.calls);
        // The layer as every bureau's server mounts it (behind the security layers, which a
        // plaintext server leaves open).
        let server = tonic::transport::Server::builder()
            .layer(layer)
            .add_service(issuance_server(counter))
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async move {
                shutdown.wait().await
            });
        tokio::spawn(server);
        let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        Served { calls, channel, db, _trigger: trigger }
    }

    fn order(signature: &[u8], key: Option<&str>) -> GrpcRequest<pb::PlaceOrderRequest> {
        let decision = pb::SignedDecision { decision: None, signature: signature.to_vec() };
        let mut request =
            GrpcRequest::new(pb::PlaceOrderRequest { decision: Some(decision), request_id: String::new() });
        if let Some(key) = key {
            request.metadata_mut().insert(HEADER, key.parse().unwrap());
        }
        request
    }

    fn replayed<T>(response: &GrpcResponse<T>) -> bool {
        response.metadata().get(REPLAYED_HEADER).is_some()
    }

    #[tokio::test]
    async fn a_repeat_with_the_same_key_gets_the_first_answer_without_calling_the_service() {
        let served = serve().await;
        let mut client = IssuanceClient::new(served.channel.clone());
        let first = client.place_order(order(b"ok", Some("k-1"))).await.unwrap();
        let again = client.place_order(order(b"ok", Some("k-1"))).await.unwrap();
        assert_eq!(served.calls.load(Ordering::SeqCst), 1, "the repeat did not reach the service");
        assert!(!replayed(&first) && replayed(&again));
        assert_eq!(first.get_ref(), again.get_ref());
        assert_eq!(first.get_ref().order.as_ref().unwrap().last_error, "k-1", "the handler sees the key");

        let reused = client.place_order(order(b"other", Some("k-1"))).await.unwrap_err();
        assert_eq!(reused.code(), Code::InvalidArgument);
        assert_eq!(reused.get_details_error_info().unwrap().reason, KEY_REUSED);
        assert_eq!(reused.get_details_bad_request().unwrap().field_violations[0].field, HEADER);
        assert_eq!(served.calls.load(Ordering::SeqCst), 1);

        // Without a key, or with another one, the call runs.
        client.place_order(order(b"ok", None)).await.unwrap();
        client.place_order(order(b"ok", None)).await.unwrap();
        let other = client.place_order(order(b"ok", Some("k-2"))).await.unwrap();
        assert_eq!(other.get_ref().order.as_ref().unwrap().order_id, "order-4");
        assert_eq!(served.calls.load(Ordering::SeqCst), 4);

        let invalid = client.place_order(order(b"ok", Some("a key"))).await.unwrap_err();
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(invalid.get_details_bad_request().unwrap().field_violations[0].field, HEADER);
        assert_eq!(served.calls.load(Ordering::SeqCst), 4);
    }

    fn order_with_id(signature: &[u8], request_id: &str, header: Option<&str>) -> GrpcRequest<pb::PlaceOrderRequest> {
        let mut request = order(signature, header);
        request.get_mut().request_id = request_id.into();
        request
    }

    #[tokio::test]
    async fn the_request_id_field_is_the_key_and_must_agree_with_the_header() {
        let served = serve().await;
        let mut client = IssuanceClient::new(served.channel.clone());
        let first = client.place_order(order_with_id(b"ok", "r-1", None)).await.unwrap();
        let again = client.place_order(order_with_id(b"ok", "r-1", None)).await.unwrap();
        assert_eq!(served.calls.load(Ordering::SeqCst), 1, "the repeat did not reach the service");
        assert!(replayed(&again));
        assert_eq!(first.get_ref(), again.get_ref());
        assert_eq!(first.get_ref().order.as_ref().unwrap().last_error, "r-1", "the handler sees the key");
        // The same key in the header and the field: one key.
        let both = client.place_order(order_with_id(b"ok", "r-1", Some("r-1"))).await.unwrap();
        assert!(replayed(&both));
        let reused = client.place_order(order_with_id(b"other", "r-1", None)).await.unwrap_err();
        assert_eq!(reused.get_details_error_info().unwrap().reason, KEY_REUSED);
        for (request_id, header) in [("r-2", Some("r-3")), ("a key", None), (&"x".repeat(129)[..], None)] {
            let refused = client.place_order(order_with_id(b"ok", request_id, header)).await.unwrap_err();
            assert_eq!(refused.code(), Code::InvalidArgument);
            assert_eq!(refused.get_details_bad_request().unwrap().field_violations[0].field, REQUEST_ID);
        }
        assert_eq!(served.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_definitive_refusal_is_replayed_with_its_details_and_a_transient_failure_runs_again() {
        let served = serve().await;
        let mut client = IssuanceClient::new(served.channel.clone());
        let first = client.place_order(order(b"refuse", Some("r"))).await.unwrap_err();
        let again = client.place_order(order(b"refuse", Some("r"))).await.unwrap_err();
        assert_eq!(served.calls.load(Ordering::SeqCst), 1);
        assert_eq!((first.code(), first.message()), (Code::FailedPrecondition, "refused, call 1"));
        assert_eq!((again.code(), again.message(), again.details()), (first.code(), first.message(), first.details()));
        assert_eq!(again.get_details_error_info().unwrap().reason, "ORDER_REFUSED");

        for call in 2..=3 {
            let busy = client.place_order(order(b"busy", Some("b"))).await.unwrap_err();
            assert_eq!((busy.code(), busy.message()), (Code::Unavailable, format!("busy, call {call}").as_str()));
        }
        let stored = record::Entity::find().all(&served.db).await.unwrap();
        assert_eq!(stored.len(), 1, "only the definitive answer is kept: {stored:?}");
        assert_eq!((stored[0].caller.as_str(), stored[0].idempotency_key.as_str()), ("", "r"));
        assert_eq!(stored[0].method, "/yidi.v1.Issuance/PlaceOrder");
    }

    #[tokio::test]
    async fn simultaneous_repeats_run_the_service_once() {
        let served = serve().await;
        let calls = (0..4).map(|_| {
            let mut client = IssuanceClient::new(served.channel.clone());
            tokio::spawn(async move { client.place_order(order(b"slow", Some("together"))).await })
        });
        let answers: Vec<pb::PlaceOrderResponse> =
            futures::future::join_all(calls).await.into_iter().map(|a| a.unwrap().unwrap().into_inner()).collect();
        assert_eq!(served.calls.load(Ordering::SeqCst), 1);
        assert!(answers.iter().all(|answer| *answer == answers[0]), "{answers:?}");
    }

    #[tokio::test]
    async fn a_key_waits_for_its_turn_and_is_forgotten_once_nobody_waits() {
        let shared = Arc::new(KeyedAnswers::default());
        let id: RecordId = ("caller".into(), "/m".into(), "k".into());
        let first = KeyTurn::take(&shared, &id).await;
        let second = {
            let (shared, id) = (Arc::clone(&shared), id.clone());
            tokio::spawn(async move { drop(KeyTurn::take(&shared, &id).await) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the repeat waits while the first call runs");
        drop(first);
        second.await.unwrap();
        assert!(shared.in_progress.lock().unwrap().is_empty(), "no lock is left behind");
    }

    /// A PlaceOrder request as it arrives behind the security layers, from `caller`.
    fn framed(signature: &[u8], key: &str, caller: &str) -> Request<Body> {
        use prost::Message;
        let decision = pb::SignedDecision { decision: None, signature: signature.to_vec() };
        let message = pb::PlaceOrderRequest { decision: Some(decision), request_id: String::new() }.encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&message);
        let mut request = Request::post("http://station/yidi.v1.Issuance/PlaceOrder")
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .header(HEADER, key)
            .body(Body::new(Buffered { data: Some(Bytes::from(frame)), trailers: None }))
            .unwrap();
        let principal = yidi_domain::Principal::Bureau { id: caller.into(), role: yidi_domain::Role::Intake };
        request.extensions_mut().insert(yidi_grpc::caller::Caller { principal });
        request
    }

    #[tokio::test]
    async fn each_caller_has_its_own_keys() {
        use tower::ServiceExt;
        let db = Database::connect("sqlite::memory:").await.unwrap();
        CreateIdempotentRequests.up(&SchemaManager::new(&db)).await.unwrap();
        let layer = KeyedAnswers::layer();
        layer.shared().open(Store { db: db.clone(), clock: Clock::fixed(chrono::Utc::now()) });
        let counter = Counter::default();
        let service = layer.layer(issuance_server(counter.clone()));
        for caller in ["zj-station", "sc-station", "zj-station"] {
            let response = service.clone().oneshot(framed(b"ok", "same-key", caller)).await.unwrap();
            let (_, trailers) = collect(response.into_body(), None).await.unwrap();
            assert_eq!(trailers.unwrap().get(Status::GRPC_STATUS).unwrap(), "0");
        }
        assert_eq!(counter.calls.load(Ordering::SeqCst), 2, "the second station's key is its own");
        let callers: Vec<String> =
            record::Entity::find().all(&db).await.unwrap().into_iter().map(|r| r.caller).collect();
        assert_eq!(callers.len(), 2);
        assert!(callers.contains(&"zj-station".to_owned()) && callers.contains(&"sc-station".to_owned()));
    }

    #[tokio::test]
    async fn answers_past_retention_are_pruned() {
        let served = serve().await;
        let mut client = IssuanceClient::new(served.channel.clone());
        client.place_order(order(b"ok", Some("old"))).await.unwrap();
        let stored_at = record::Entity::find().one(&served.db).await.unwrap().unwrap().created_at;
        assert_eq!(prune(&served.db, stored_at).await.unwrap(), 0, "not older than the cutoff");
        assert_eq!(prune(&served.db, stored_at + chrono::Duration::seconds(1)).await.unwrap(), 1);
        client.place_order(order(b"ok", Some("old"))).await.unwrap();
        assert_eq!(served.calls.load(Ordering::SeqCst), 2, "pruned: the key is new again");
        assert!(IdempotencyConfig { retention_hours: 0 }.validate().is_err());
        assert!(IdempotencyConfig { retention_hours: u64::MAX }.validate().is_err());
        assert_eq!(IdempotencyConfig::default().retention(), chrono::Duration::hours(24));
    }
}
