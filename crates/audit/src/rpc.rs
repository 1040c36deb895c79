//! `yidi.v1.Audit`, served by every service next to health and reflection: verifies the chain of
//! the service's own audit log and lists its entries. One implementation for all four services.
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};
use yidi_proto::v1::{self as pb, audit_server::AuditServer};

use crate::{self as audit, EntryQuery};
use yidi_grpc::{
    convert::timestamp,
    error::{ApiError, FieldViolations},
    page::{self, Filter, page_size},
};

/// The Audit service over a service's database.
#[derive(Debug, Clone)]
pub struct AuditGrpc {
    db: DatabaseConnection,
}

impl AuditGrpc {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The tonic server for it.
    pub fn server(db: DatabaseConnection) -> AuditServer<Self> {
        AuditServer::new(Self::new(db)).max_decoding_message_size(yidi_grpc::overload::MAX_REQUEST_BYTES)
    }
}

/// An optional id bound: 0 is none, negatives are refused.
fn id_bound(violations: &mut FieldViolations, field: &str, raw: i64) -> Option<i64> {
    match raw {
        0 => None,
        id if id > 0 => Some(id),
        _ => {
            violations.add(field, "must not be negative");
            None
        }
    }
}

fn to_proto(row: audit::Model) -> pb::AuditEntry {
    pb::AuditEntry {
        id: row.id,
        seq: row.seq.unwrap_or_default(),
        at: Some(timestamp(row.at)),
        action: row.action,
        subject: row.subject,
        outcome: row.outcome,
        detail: row.detail,
        prev_hash: row.prev_hash.unwrap_or_default(),
        hash: row.hash.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditGrpc {
    async fn verify_audit_chain(
        &self,
        _: Request<pb::VerifyAuditChainRequest>,
    ) -> Result<Response<pb::VerifyAuditChainResponse>, Status> {
        let report = audit::verify_chain(&self.db).await.map_err(ApiError::from)?;
        if let Some((id, reason)) = &report.first_broken {
            tracing::error!(entry_id = id, %reason, "the audit chain is broken");
        }
        let (first_broken_id, first_broken_reason) = report.first_broken.clone().unwrap_or_default();
        Ok(Response::new(pb::VerifyAuditChainResponse {
            intact: report.is_intact(),
            entries_checked: i64::try_from(report.entries_checked).unwrap_or(i64::MAX),
            first_broken_id,
            first_broken_reason,
            last_hash: report.last_hash,
        }))
    }

    async fn list_audit_entries(
        &self,
        request: Request<pb::ListAuditEntriesRequest>,
    ) -> Result<Response<pb::ListAuditEntriesResponse>, Status> {
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let limit = page_size(request.page_size);
        // Page tokens carry the id of the last entry of the previous page; the next page lies below it.
        let filter = Filter::new("audit.entries", &[&request.min_id.to_string(), &request.max_id.to_string()]);
        let before_id = page::decode(&mut v, "page_token", &request.page_token, filter);
        let min_id = id_bound(&mut v, "min_id", request.min_id);
        let max_id = id_bound(&mut v, "max_id", request.max_id);
        if let (Some(min), Some(max)) = (min_id, max_id)
            && min > max
        {
            v.add("max_id", "must not be below min_id");
        }
        v.finish()?;
        // One more than asked tells whether another page follows.
        let query = EntryQuery { min_id, max_id, before_id, limit: limit + 1 };
        let mut rows = audit::list_entries(&self.db, query).await.map_err(ApiError::from)?;
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page::encode(filter, &last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAuditEntriesResponse {
            entries: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use pb::audit_server::Audit;
    use sea_orm::Database;
    use sea_orm_migration::{MigrationTrait, SchemaManager};
    use tonic::Code;

    use super::*;
    use crate::{AuditEntry, ChainAuditLog, CreateAuditLog};

    async fn service_with(entries: usize) -> AuditGrpc {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        CreateAuditLog.up(&SchemaManager::new(&db)).await.unwrap();
        ChainAuditLog.up(&SchemaManager::new(&db)).await.unwrap();
        for n in 0..entries {
            let entry = AuditEntry::new("verify", "110***********1234", "approved", format!("decision {n}"));
            audit::append(&db, chrono::Utc::now(), entry).await.unwrap();
        }
        AuditGrpc::new(db)
    }

    fn list(page_size: u32, page_token: &str, min_id: i64, max_id: i64) -> Request<pb::ListAuditEntriesRequest> {
        Request::new(pb::ListAuditEntriesRequest { page_size, page_token: page_token.into(), min_id, max_id })
    }

    #[tokio::test]
    async fn pages_run_newest_first_until_the_range_is_exhausted() {
        let service = service_with(5).await;
        let first = service.list_audit_entries(list(2, "", 0, 0)).await.unwrap().into_inner();
        assert_eq!(first.entries.iter().map(|e| e.id).collect::<Vec<_>>(), [5, 4]);
        assert_eq!(first.entries[0].seq, 5);
        assert_eq!(first.entries[0].prev_hash, first.entries[1].hash);
        let second = service.list_audit_entries(list(2, &first.next_page_token, 0, 0)).await.unwrap().into_inner();
        assert_eq!(second.entries.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 2]);
        let last = service.list_audit_entries(list(2, &second.next_page_token, 0, 0)).await.unwrap().into_inner();
        assert_eq!(last.entries.iter().map(|e| e.id).collect::<Vec<_>>(), [1]);
        assert!(last.next_page_token.is_empty());

        let ranged = service.list_audit_entries(list(0, "", 2, 3)).await.unwrap().into_inner();
        assert_eq!(ranged.entries.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 2]);
        assert!(ranged.next_page_token.is_empty());
    }

    #[tokio::test]
    async fn bad_paging_is_invalid_argument() {
        let service = service_with(3).await;
        let first = service.list_audit_entries(list(1, "", 0, 0)).await.unwrap().into_inner();
        // A token is tied to its range; an oversized page is clamped, not refused.
        let other_range = list(1, &first.next_page_token, 1, 0);
        for request in [list(0, "x", 0, 0), list(0, "2", 0, 0), other_range, list(0, "", -1, 0), list(0, "", 3, 2)] {
            let status = service.list_audit_entries(request).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        }
        let clamped = service.list_audit_entries(list(10_000, "", 0, 0)).await.unwrap().into_inner();
        assert_eq!(clamped.entries.len(), 3);
    }

    #[tokio::test]
    async fn an_intact_chain_verifies() {
        let service = service_with(3).await;
        let answer =
            service.verify_audit_chain(Request::new(pb::VerifyAuditChainRequest {})).await.unwrap().into_inner();
        assert!(answer.intact);
        assert_eq!(answer.entries_checked, 3);
        assert_eq!(answer.first_broken_id, 0);
        assert_eq!(answer.last_hash.len(), 64);
    }
}
