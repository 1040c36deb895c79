//! What every request passes before it reaches a service: who is calling (mutual TLS, resolved
//! through the directory), then what that caller may call.
//!
//! [`ServerSecurity::layers`] is the one place both hang off, outermost first:
//! 1. [`CallerLayer`]: the peer certificate's identity → a [`Caller`] in the request extensions,
//!    or UNAUTHENTICATED (no certificate, or an id the directory does not know).
//! 2. The access matrix (`access.rs`): reads the [`Caller`], answers PERMISSION_DENIED.
//!
//! Health and reflection sit behind the same layers: on an mTLS port they need a certificate too
//! (probes that cannot present one use the plaintext health-only listener, `server.health_listen`).
use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either, Ready};
use tonic::{
    Status,
    codegen::http::{Request, Response},
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service, ServiceBuilder, layer::util::Identity};
use yidi_domain::{Directory, Principal};

use crate::{
    access::{AccessLayer, DeniedCalls},
    caller::Caller,
    tls::{PeerIdentityError, Transport, certificate_identity},
};
use yidi_runtime::directory::DirectoryHandle;

/// Resolves a certificate's identity to a principal of the directory.
pub trait Principals: Send + Sync + 'static {
    fn principal(&self, id: &str) -> Option<Principal>;
}

impl Principals for Directory {
    fn principal(&self, id: &str) -> Option<Principal> {
        Directory::principal(self, id)
    }
}

/// The directory as it is now: a reloaded directory names new principals at once.
impl Principals for DirectoryHandle {
    fn principal(&self, id: &str) -> Option<Principal> {
        self.current().principal(id)
    }
}

/// How a server authenticates (and authorises) its callers.
#[derive(Clone)]
pub struct ServerSecurity {
    transport: Transport,
    principals: Arc<dyn Principals>,
    access: AccessLayer,
}

impl std::fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSecurity").field("transport", &self.transport).finish_non_exhaustive()
    }
}

/// The layer stack [`ServerSecurity::layers`] returns (outermost first in the type's innermost
/// `Stack`). The access layer goes on top of `CallerLayer`.
pub type SecurityLayers =
    ServiceBuilder<tower::layer::util::Stack<AccessLayer, tower::layer::util::Stack<CallerLayer, Identity>>>;

impl ServerSecurity {
    /// The security of the bureau `serving_bureau`'s port: with mutual TLS, callers are
    /// identified through `principals` and admitted by the access matrix; plaintext (explicit
    /// `tls.plaintext`) has no callers and enforces nothing.
    pub fn new(transport: Transport, principals: Arc<dyn Principals>, serving_bureau: &str) -> Self {
        let access = if transport.is_tls() {
            AccessLayer::new(serving_bureau, DeniedCalls::default())
        } else {
            AccessLayer::disabled()
        };
        Self { transport, principals, access }
    }

    /// No TLS, no callers: every request passes unauthenticated (explicit `tls.plaintext`).
    pub fn plaintext() -> Self {
        Self {
            transport: Transport::Plaintext,
            principals: Arc::new(Directory::default()),
            access: AccessLayer::disabled(),
        }
    }

    /// Where denied calls are recorded: give it the database once it is open.
    pub fn denied_calls(&self) -> &DeniedCalls {
        self.access.denied_calls()
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The layers every request of the served port passes, outermost first.
    pub fn layers(&self) -> SecurityLayers {
        let caller = CallerLayer { principals: self.transport.is_tls().then(|| Arc::clone(&self.principals)) };
        ServiceBuilder::new().layer(caller).layer(self.access.clone())
    }
}

/// Identifies the caller of each request from its mutual-TLS peer certificate.
#[derive(Clone)]
pub struct CallerLayer {
    /// `None` on a plaintext server: nothing to identify, nothing inserted.
    principals: Option<Arc<dyn Principals>>,
}

impl<S> Layer<S> for CallerLayer {
    type Service = IdentifyCaller<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdentifyCaller { inner, principals: self.principals.clone() }
    }
}

#[derive(Clone)]
pub struct IdentifyCaller<S> {
    inner: S,
    principals: Option<Arc<dyn Principals>>,
}

/// Why a request has no caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnauthenticatedCaller {
    #[error(transparent)]
    Certificate(#[from] PeerIdentityError),
    #[error("certificate identity {0:?} is not in the directory")]
    UnknownPrincipal(String),
}

/// The caller of a request on a mutual-TLS port.
pub fn identify<B>(request: &Request<B>, principals: &dyn Principals) -> Result<Caller, UnauthenticatedCaller> {
    let certificates = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .ok_or(PeerIdentityError::NoCertificate)?;
    // The first certificate is the peer's own; the rest is its chain.
    let leaf = certificates.first().ok_or(PeerIdentityError::NoCertificate)?;
    let id = certificate_identity(leaf)?;
    let principal = principals.principal(&id).ok_or(UnauthenticatedCaller::UnknownPrincipal(id))?;
    Ok(Caller { principal })
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdentifyCaller<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future =
        Either<Ready<Result<Response<ResBody>, S::Error>>, BoxFuture<'static, Result<Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if let Some(principals) = &self.principals {
            match identify(&request, principals.as_ref()) {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                }
                Err(refusal) => {
                    tracing::warn!(path = request.uri().path(), %refusal, "unauthenticated call refused");
                    let status = Status::unauthenticated(refusal.to_string());
                    return Either::Left(futures::future::ready(Ok(status.into_http())));
                }
            }
        }
        Either::Right(Box::pin(self.inner.call(request)))
    }
}
