//! One error type for every service's rules, mapped to `tonic::Status` with the richer error model:
//! `BadRequest` field violations for bad input, `ErrorInfo` (domain `yidi`, stable reason) always.
use std::{collections::HashMap, time::Duration};

use sea_orm::DbErr;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use yidi_domain::{DecisionError, RefusalReason};

/// `ErrorInfo.domain` of every yidi error.
pub const ERROR_DOMAIN: &str = "yidi";

/// Field violations gathered while validating a request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldViolations(Vec<(String, String)>);

impl FieldViolations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push((field.into(), description.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter()
    }

    /// `Ok` when nothing was added, else the INVALID_ARGUMENT error.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() { Ok(()) } else { Err(ApiError::InvalidArgument(self)) }
    }

    pub fn single(field: impl Into<String>, description: impl Into<String>) -> ApiError {
        let mut violations = Self::new();
        violations.add(field, description);
        ApiError::InvalidArgument(violations)
    }
}

impl std::fmt::Display for FieldViolations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(field, description)| format!("{field}: {description}")).collect();
        f.write_str(&parts.join("; "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {0}")]
    InvalidArgument(FieldViolations),
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{message}")]
    FailedPrecondition { reason: &'static str, message: String },
    /// A refusal of the rulebook (S2, S3, P0–P4, K2, K4, K5...).
    #[error("refused: {0}")]
    Refused(RefusalReason),
    /// A decision a producer or the registry does not accept (S4).
    #[error("decision refused: {0}")]
    Decision(#[from] DecisionError),
    /// The caller is authenticated and admitted to the method, but may not act on what it names.
    #[error("{message}")]
    PermissionDenied { reason: &'static str, message: String },
    /// Too many requests of a kind from one caller: RESOURCE_EXHAUSTED with `RetryInfo`.
    #[error("{message}")]
    RateLimited { reason: &'static str, message: String, retry_after: Duration },
    #[error("{peer} unavailable: {message}")]
    Unavailable { peer: String, message: String },
    /// The service is listening but not ready (its database is being migrated).
    #[error("{service} is starting: try again shortly")]
    Starting { service: &'static str },
    /// This instance is serving but may not answer now (a replica behind its log): another
    /// instance of the same service may.
    #[error("{message}")]
    NotReady { reason: &'static str, message: String },
    #[error("database error: {0}")]
    Database(#[from] DbErr),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound { what, id: id.into() }
    }

    pub fn precondition(reason: &'static str, message: impl Into<String>) -> Self {
        Self::FailedPrecondition { reason, message: message.into() }
    }

    pub fn unavailable(peer: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unavailable { peer: peer.into(), message: message.into() }
    }

    /// The stable `ErrorInfo.reason`.
    pub fn reason(&self) -> String {
        match self {
            Self::InvalidArgument(_) => "INVALID_ARGUMENT".into(),
            Self::NotFound { .. } => "NOT_FOUND".into(),
            Self::FailedPrecondition { reason, .. }
            | Self::PermissionDenied { reason, .. }
            | Self::RateLimited { reason, .. }
            | Self::NotReady { reason, .. } => (*reason).into(),
            Self::Refused(reason) => format!("REFUSAL_REASON_{}", reason.code()),
            Self::Decision(error) => error.code().into(),
            Self::Unavailable { .. } => "PEER_UNAVAILABLE".into(),
            Self::Starting { .. } => "STARTING".into(),
            Self::Database(error) if is_transient_database_error(error) => "DATABASE_UNAVAILABLE".into(),
            Self::Database(_) => "DATABASE".into(),
            Self::Internal(_) => "INTERNAL".into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::FailedPrecondition { .. } | Self::Refused(_) => Code::FailedPrecondition,
            Self::Decision(error) => decision_code(error),
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::RateLimited { .. } => Code::ResourceExhausted,
            Self::Unavailable { .. } | Self::Starting { .. } | Self::NotReady { .. } => Code::Unavailable,
            Self::Database(error) if is_transient_database_error(error) => Code::Unavailable,
            Self::Database(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let code = error.code();
        if matches!(error, ApiError::Database(_) | ApiError::Internal(_)) {
            // Transient database errors too: an operator wants to see the database flapping.
            tracing::error!(error = %error, "request failed");
        }
        let mut details = ErrorDetails::new();
        let mut metadata = HashMap::new();
        match &error {
            ApiError::InvalidArgument(violations) => {
                for (field, description) in violations.iter() {
                    details.add_bad_request_violation(field.clone(), description.clone());
                }
            }
            ApiError::NotFound { what, id } => {
                metadata.insert("resource".to_owned(), (*what).to_owned());
                metadata.insert("id".to_owned(), id.clone());
            }
            ApiError::Refused(reason) => {
                metadata.insert("refusal_reason".to_owned(), format!("REFUSAL_REASON_{}", reason.code()));
            }
            ApiError::Unavailable { peer, .. } => {
                metadata.insert("peer".to_owned(), peer.clone());
            }
            ApiError::RateLimited { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
                metadata.insert("retry_after_ms".to_owned(), retry_after.as_millis().to_string());
            }
            ApiError::Database(error) if is_transient_database_error(error) => {
                details.set_retry_info(Some(DATABASE_RETRY_AFTER));
                metadata.insert("retry_after_ms".to_owned(), DATABASE_RETRY_AFTER.as_millis().to_string());
            }
            ApiError::Decision(decision) if decision_code(decision) == Code::InvalidArgument => {
                details.add_bad_request_violation("decision", decision.to_string());
            }
            _ => {}
        }
        // Database and internal errors are logged above, not sent to the caller in detail.
        let message = match &error {
            ApiError::Database(error) if is_transient_database_error(error) => {
                "database unavailable: try again shortly".to_owned()
            }
            ApiError::Database(_) => "internal database error".to_owned(),
            _ => error.to_string(),
        };
        details.set_error_info(error.reason(), ERROR_DOMAIN, metadata);
        Status::with_error_details(code, message, details)
    }
}

/// How long a caller should wait before repeating a call that met a transient database error.
pub const DATABASE_RETRY_AFTER: Duration = Duration::from_millis(200);

/// The code of a decision the service does not accept. A decision that is bad in itself (unsigned,
/// tampered, for another purpose) is INVALID_ARGUMENT: no state of the system makes it good. One
/// that is sound but not acceptable here or now (unknown or retired key, another bureau's
/// jurisdiction, addressed to another producer, expired) is FAILED_PRECONDITION. A used one is
/// ALREADY_EXISTS. None is PERMISSION_DENIED: the caller may call; the document is what fails.
pub fn decision_code(error: &DecisionError) -> Code {
    match error {
        DecisionError::Unsigned | DecisionError::BadSignature | DecisionError::WrongPurpose { .. } => {
            Code::InvalidArgument
        }
        DecisionError::UnknownSigner(_)
        | DecisionError::UnknownKey { .. }
        | DecisionError::KeyRetired { .. }
        | DecisionError::KeyNotYetValid { .. }
        | DecisionError::WrongJurisdiction { .. }
        | DecisionError::Misaddressed { .. }
        | DecisionError::Expired(_)
        | DecisionError::NotYetValid(_) => Code::FailedPrecondition,
        DecisionError::AlreadyUsed(_) => Code::AlreadyExists,
    }
}

/// Whether a database error is worth repeating: the pool or the connection failed, or the
/// database gave up on a lock or a serialisation conflict (PostgreSQL SQLSTATE classes 08, 40, 53,
/// 57 and lock-not-available 55P03; SQLite BUSY and LOCKED). Constraint violations, decoding
/// errors and bugs are not: repeating them gives the same answer.
pub fn is_transient_database_error(error: &DbErr) -> bool {
    use sea_orm::{RuntimeErr, sqlx};
    match error {
        DbErr::ConnectionAcquire(_) => true,
        // A connection that could not be made is transient when the server did not answer or was
        // full, not when the URL or the credentials are wrong.
        DbErr::Conn(RuntimeErr::SqlxError(error))
        | DbErr::Exec(RuntimeErr::SqlxError(error))
        | DbErr::Query(RuntimeErr::SqlxError(error)) => match error.as_ref() {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(database) => database.code().is_some_and(|code| is_transient_sql_code(&code)),
            _ => false,
        },
        _ => false,
    }
}

fn is_transient_sql_code(code: &str) -> bool {
    match code.parse::<u32>() {
        // SQLite's result codes are numbers; the primary code is the low byte (5 BUSY, 6 LOCKED).
        Ok(sqlite) if code.len() < 5 => matches!(sqlite & 0xff, 5 | 6),
        // PostgreSQL's SQLSTATEs are five characters, some all digits.
        _ => ["08", "40", "53", "57"].iter().any(|class| code.starts_with(class)) || code == "55P03",
    }
}

/// Turns a peer's `Status` into an `ApiError` for logs and retries.
pub fn from_peer(peer: &str, status: &Status) -> ApiError {
    ApiError::unavailable(peer, format!("{:?}: {}", status.code(), status.message()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sea_orm::{ConnAcquireErr, RuntimeErr, sqlx};

    use super::*;

    fn status_of(error: ApiError) -> Status {
        Status::from(error)
    }

    #[test]
    fn a_transient_database_error_is_unavailable_with_retry_info() {
        for error in [
            DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
            DbErr::Query(RuntimeErr::SqlxError(Arc::new(sqlx::Error::PoolTimedOut))),
            DbErr::Exec(RuntimeErr::SqlxError(Arc::new(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())))),
        ] {
            let status = status_of(ApiError::Database(error));
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            let details = status.get_error_details();
            assert_eq!(details.retry_info().and_then(|info| info.retry_delay), Some(DATABASE_RETRY_AFTER));
            assert_eq!(details.error_info().map(|info| info.reason.as_str()), Some("DATABASE_UNAVAILABLE"));
        }
    }

    #[test]
    fn any_other_database_error_is_internal_and_not_described_to_the_caller() {
        let status = status_of(ApiError::Database(DbErr::Custom("constraint cards_pkey".into())));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("cards_pkey"), "{}", status.message());
        assert!(status.get_error_details().retry_info().is_none());
    }

    #[test]
    fn sql_codes_of_lock_conflicts_and_lost_connections_are_transient() {
        for code in ["40001", "40P01", "55P03", "57P01", "08006", "53300", "5", "517", "6", "262"] {
            assert!(is_transient_sql_code(code), "{code}");
        }
        for code in ["23505", "23503", "42P01", "19", "2067", "1"] {
            assert!(!is_transient_sql_code(code), "{code}");
        }
    }

    #[test]
    fn s4_a_tampered_or_misaddressed_decision_is_never_permission_denied() {
        let cases = [
            (DecisionError::BadSignature, Code::InvalidArgument),
            (DecisionError::Unsigned, Code::InvalidArgument),
            (DecisionError::Misaddressed { expected: "a".into(), found: "b".into() }, Code::FailedPrecondition),
            (DecisionError::WrongJurisdiction { signer: "a".into(), province: "36".into() }, Code::FailedPrecondition),
            (DecisionError::AlreadyUsed("d".into()), Code::AlreadyExists),
        ];
        for (error, code) in cases {
            let reason = error.code();
            let status = status_of(ApiError::Decision(error));
            assert_eq!(status.code(), code, "{reason}");
            assert_eq!(status.get_error_details().error_info().map(|info| info.reason.as_str()), Some(reason));
        }
    }
}
