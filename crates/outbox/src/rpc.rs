//! `yidi.v1.Outbox`, served by every service next to `yidi.v1.Audit`: lists what the bureau owes
//! other bureaus and lets an operator put a dead letter back in the queue.
use std::sync::Arc;

use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};
use yidi_proto::v1::{self as pb, outbox_server::OutboxServer};

use crate::{self as outbox, MessageState, RetryError};
use yidi_grpc::{
    convert::timestamp,
    error::{ApiError, FieldViolations},
    page::{self, Filter, TimeId, page_size},
};

/// The Outbox service over a service's database.
#[derive(Debug, Clone)]
pub struct OutboxGrpc {
    db: DatabaseConnection,
    /// Wakes this replica's dispatcher when a dead letter is re-queued.
    wake: Arc<Notify>,
}

impl OutboxGrpc {
    pub fn server(db: DatabaseConnection, wake: Arc<Notify>) -> OutboxServer<Self> {
        OutboxServer::new(Self { db, wake }).max_decoding_message_size(yidi_grpc::overload::MAX_REQUEST_BYTES)
    }
}

pub fn state_to_proto(state: Option<MessageState>) -> pb::OutboxMessageState {
    match state {
        Some(MessageState::Pending) => pb::OutboxMessageState::Pending,
        Some(MessageState::Delivered) => pb::OutboxMessageState::Delivered,
        Some(MessageState::Dead) => pb::OutboxMessageState::Dead,
        Some(MessageState::Dropped) => pb::OutboxMessageState::Dropped,
        None => pb::OutboxMessageState::Unspecified,
    }
}

/// A row as operators see it.
pub fn to_proto(row: outbox::Model) -> pb::OutboxMessage {
    let state = row.message_state();
    pb::OutboxMessage {
        state: state_to_proto(state) as i32,
        next_attempt_at: (state == Some(MessageState::Pending)).then(|| timestamp(row.next_attempt_at)),
        delivered_at: row.delivered_at.map(timestamp),
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
        attempts: u32::try_from(row.attempts).unwrap_or(0),
        last_error: row.last_error.unwrap_or_default(),
        message_id: row.id,
        topic: row.topic,
        subject: row.subject,
        target_bureau_id: row.target,
    }
}

#[tonic::async_trait]
impl pb::outbox_server::Outbox for OutboxGrpc {
    async fn list_outbox_messages(
        &self,
        request: Request<pb::ListOutboxMessagesRequest>,
    ) -> Result<Response<pb::ListOutboxMessagesResponse>, Status> {
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let limit = page_size(request.page_size);
        let filter = Filter::new("outbox.messages", &[&request.state.to_string(), &request.subject]);
        let after: Option<TimeId> = page::decode(&mut v, "page_token", &request.page_token, filter);
        let state = match pb::OutboxMessageState::try_from(request.state) {
            Ok(pb::OutboxMessageState::Unspecified) => None,
            Ok(pb::OutboxMessageState::Pending) => Some(MessageState::Pending),
            Ok(pb::OutboxMessageState::Delivered) => Some(MessageState::Delivered),
            Ok(pb::OutboxMessageState::Dead) => Some(MessageState::Dead),
            Ok(pb::OutboxMessageState::Dropped) => Some(MessageState::Dropped),
            Err(_) => {
                v.add("state", format!("{} is not an OutboxMessageState", request.state));
                None
            }
        };
        if request.subject.len() > 64 {
            v.add("subject", "must be at most 64 bytes");
        }
        v.finish()?;
        let subject = Some(request.subject.as_str()).filter(|s| !s.is_empty());
        // One more than asked tells whether another page follows.
        let mut rows =
            outbox::list(&self.db, state, subject, after.as_ref(), limit + 1).await.map_err(ApiError::from)?;
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page::encode(filter, &TimeId { at: last.created_at, id: last.id.clone() }),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListOutboxMessagesResponse {
            messages: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn retry_dead_letter(
        &self,
        request: Request<pb::RetryDeadLetterRequest>,
    ) -> Result<Response<pb::RetryDeadLetterResponse>, Status> {
        let message_id = request.into_inner().message_id;
        if message_id.is_empty() || message_id.len() > 64 {
            return Err(FieldViolations::single("message_id", "must be 1 to 64 bytes").into());
        }
        let row = outbox::retry_dead_letter(&self.db, &message_id).await.map_err(|error| match error {
            RetryError::NotFound(id) => ApiError::not_found("outbox message", id),
            error @ RetryError::NotDead { .. } => ApiError::precondition("NOT_A_DEAD_LETTER", error.to_string()),
            RetryError::Database(error) => error.into(),
        })?;
        tracing::info!(message_id = %row.id, topic = %row.topic, subject = %row.subject, "dead letter re-queued by an operator");
        self.wake.notify_one();
        Ok(Response::new(pb::RetryDeadLetterResponse { message: Some(to_proto(row)) }))
    }
}
