//! The shape of the server's own tower layers: one state shared by every connection of a server,
//! and, per call, a decision to answer at once or to pass the call on to the service inside.
use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tonic::{
    body::Body,
    codegen::http::{Request, Response},
};
use tower::{Layer, Service};

/// What a call through a layer resolves to.
pub type CallFuture = BoxFuture<'static, Result<Response<Body>, Infallible>>;

/// The service inside a layer, as tonic's router and the layers below it are.
pub trait Inner:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send + 'static> + Clone + Send + 'static
{
}

impl<S> Inner for S where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// What a layer does with one call, given the state it shares and the inner service, ready.
pub trait Intercept: Send + Sync + 'static {
    fn intercept<S: Inner>(self: Arc<Self>, inner: S, request: Request<Body>) -> CallFuture;
}

/// The layer over the shared state `T`.
#[derive(Debug)]
pub struct InterceptLayer<T> {
    shared: Arc<T>,
}

impl<T> Clone for InterceptLayer<T> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared) }
    }
}

impl<T> InterceptLayer<T> {
    pub fn new(shared: T) -> Self {
        Self { shared: Arc::new(shared) }
    }

    /// The state every connection's service shares.
    pub fn shared(&self) -> &T {
        &self.shared
    }
}

impl<S, T> Layer<S> for InterceptLayer<T> {
    type Service = Intercepted<S, T>;

    fn layer(&self, inner: S) -> Self::Service {
        Intercepted { inner, shared: Arc::clone(&self.shared) }
    }
}

/// A service wrapped by an [`InterceptLayer`].
#[derive(Debug)]
pub struct Intercepted<S, T> {
    inner: S,
    shared: Arc<T>,
}

impl<S: Clone, T> Clone for Intercepted<S, T> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), shared: Arc::clone(&self.shared) }
    }
}

impl<S: Inner, T: Intercept> Service<Request<Body>> for Intercepted<S, T> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh one waits for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        T::intercept(Arc::clone(&self.shared), inner, request)
    }
}
