//! What this process serves: the coordinator of its current term of leadership, or, between
//! terms, why there is none (a standby waiting for the leader to go, a store that cannot be
//! reached). A process outlives its terms: a leader that cannot renew its lease (etcd down)
//! stops deciding at once and campaigns again, and serves again once it wins, rebuilt from the
//! store; its ports stay open meanwhile, answering every call UNAVAILABLE with the reason, so
//! that clients try the next coordinator at once and `ladder health` says why.

use crate::state::Coordinator;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::watch;
use tonic::Status;
use tonic::codegen::{BoxFuture, Service, http};

#[derive(Clone)]
pub enum Term {
    Leading(Arc<Coordinator>),
    /// Why no coordinator serves.
    Waiting(String),
}

pub struct Serving {
    term: watch::Sender<Term>,
}

impl Serving {
    pub fn new(why: impl Into<String>) -> Arc<Serving> {
        Arc::new(Serving {
            term: watch::channel(Term::Waiting(why.into())).0,
        })
    }

    /// Serves `coordinator` from now on.
    pub fn lead(&self, coordinator: Arc<Coordinator>) {
        self.term.send_replace(Term::Leading(coordinator));
    }

    /// Serves nothing from now on, saying `why`.
    pub fn wait(&self, why: impl Into<String>) {
        self.term.send_replace(Term::Waiting(why.into()));
    }

    /// The coordinator serving now, if any.
    pub fn leading(&self) -> Option<Arc<Coordinator>> {
        match &*self.term.borrow() {
            Term::Leading(coordinator) => Some(coordinator.clone()),
            Term::Waiting(_) => None,
        }
    }

    /// The coordinator serving now, or UNAVAILABLE saying why there is none.
    pub fn coordinator(&self) -> Result<Arc<Coordinator>, Status> {
        match &*self.term.borrow() {
            Term::Leading(coordinator) => Ok(coordinator.clone()),
            Term::Waiting(why) => Err(Status::unavailable(format!(
                "this coordinator does not serve now: {why}"
            ))),
        }
    }

    /// Resolves when the term changes (a stream opened in one term ends with it).
    pub fn changes(&self) -> watch::Receiver<Term> {
        self.term.subscribe()
    }
}

/// A tower layer answering every gRPC call (the health check too) UNAVAILABLE, with the
/// reason, while no coordinator serves.
#[derive(Clone)]
pub struct WhileServingLayer(pub Arc<Serving>);

impl<S> tower::Layer<S> for WhileServingLayer {
    type Service = WhileServing<S>;

    fn layer(&self, inner: S) -> WhileServing<S> {
        WhileServing {
            inner,
            serving: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct WhileServing<S> {
    inner: S,
    serving: Arc<Serving>,
}

impl<S, B, R> Service<http::Request<B>> for WhileServing<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Err(unavailable) = self.serving.coordinator() {
            return Box::pin(async move { Ok(unavailable.into_http()) });
        }
        Box::pin(self.inner.call(request))
    }
}
