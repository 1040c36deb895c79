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
            | Self::RateLimited { reason, .. } => (*reason).into(),
            Self::Refused(reason) => format!("REFUSAL_REASON_{}", reason.code()),
            Self::Decision(error) => error.code().into(),
            Self::Unavailable { .. } => "PEER_UNAVAILABLE".into(),
            Self::Starting { .. } => "STARTING".into(),
            Self::Database(_) => "DATABASE".into(),
            Self::Internal(_) => "INTERNAL".into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::FailedPrecondition { .. } | Self::Refused(_) => Code::FailedPrecondition,
            Self::Decision(DecisionError::AlreadyUsed(_)) => Code::AlreadyExists,
            Self::Decision(DecisionError::Expired(_) | DecisionError::NotYetValid(_)) => Code::FailedPrecondition,
            Self::Decision(_) | Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::RateLimited { .. } => Code::ResourceExhausted,
            Self::Unavailable { .. } | Self::Starting { .. } => Code::Unavailable,
            Self::Database(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let code = error.code();
        if matches!(error, ApiError::Database(_) | ApiError::Internal(_)) {
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
            _ => {}
        }
        // Database and internal errors are logged above, not sent to the caller in detail.
        let message = match &error {
            ApiError::Database(_) => "internal database error".to_owned(),
            _ => error.to_string(),
        };
        details.set_error_info(error.reason(), ERROR_DOMAIN, metadata);
        Status::with_error_details(code, message, details)
    }
}

/// Turns a peer's `Status` into an `ApiError` for logs and retries.
pub fn from_peer(peer: &str, status: &Status) -> ApiError {
    ApiError::unavailable(peer, format!("{:?}: {}", status.code(), status.message()))
}
