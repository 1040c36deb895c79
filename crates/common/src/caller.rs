//! The authenticated caller of a request.
//!
//! On a mutual-TLS server the transport layer resolves the peer certificate's identity through the
//! directory and inserts a [`Caller`] into the request's extensions; handlers and the access layer
//! read it from there. A plaintext server (explicitly configured) has no callers: the extension is
//! absent.
use tonic::codegen::http::Extensions;
use yidi_domain::Principal;

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
