//! The authenticated caller of a request.
//!
//! On a mutual-TLS server the transport layer resolves the peer certificate's identity through the
//! directory and inserts a [`Caller`] into the request's extensions; handlers and the access layer
//! read it from there. A plaintext server (explicitly configured) has no callers: the extension is
//! absent.
use tonic::codegen::http::Extensions;
use yidi_domain::Principal;

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
}

impl Caller {
    pub fn id(&self) -> &str {
        self.principal.id()
    }
}

/// The caller of a request, if the server authenticates its callers.
pub fn caller_of(extensions: &Extensions) -> Option<&Caller> {
    extensions.get::<Caller>()
}

/// A bureau or relying party acts only in its own name: the id a request names in `field` must be
/// the caller's own (a station cannot ask for verification as another station, a producer cannot
/// register another producer's card, a bank cannot check cards as another bank). Operators, whom
/// the access matrix admits only at their own bureau, and plaintext servers (no caller) are not
/// restricted here.
pub fn ensure_acting_for_itself(extensions: &Extensions, field: &str, named: &str) -> Result<(), ApiError> {
    match caller_of(extensions) {
        Some(Caller { principal: Principal::Bureau { id, .. } | Principal::RelyingParty { id } }) if id != named => {
            Err(ApiError::PermissionDenied {
                reason: "NOT_IN_OWN_NAME",
                message: format!(
                    "{field} names {named:?}, but the caller is {id:?}: a caller acts only in its own name"
                ),
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use yidi_domain::{OperatorAccess, Role};

    use super::*;

    #[test]
    fn a_bureau_may_name_only_itself_operators_and_plaintext_are_not_restricted() {
        let mut extensions = Extensions::new();
        assert!(ensure_acting_for_itself(&extensions, "station_id", "anyone").is_ok(), "plaintext: no caller");

        extensions.insert(Caller { principal: Principal::Bureau { id: "zj-station".into(), role: Role::Intake } });
        assert!(ensure_acting_for_itself(&extensions, "station_id", "zj-station").is_ok());
        let error = ensure_acting_for_itself(&extensions, "station_id", "sc-station").unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied);
        assert_eq!(error.reason(), "NOT_IN_OWN_NAME");
        assert!(error.to_string().contains("station_id names \"sc-station\""), "{error}");

        extensions.insert(Caller {
            principal: Principal::Operator {
                id: "op".into(),
                bureau_id: "zj-station".into(),
                access: OperatorAccess::Admin,
            },
        });
        assert!(ensure_acting_for_itself(&extensions, "station_id", "sc-station").is_ok());

        extensions.insert(Caller { principal: Principal::RelyingParty { id: "bank".into() } });
        assert!(ensure_acting_for_itself(&extensions, "relying_party", "bank").is_ok());
        assert!(ensure_acting_for_itself(&extensions, "relying_party", "other-bank").is_err());
    }
}
