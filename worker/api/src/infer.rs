//! The seam between the OpenAI HTTP layer and whatever generates tokens: the
//! in-process engine (`tandem serve`) or the router to decode workers
//! (`tandem frontend`). The HTTP layer only knows this trait.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

use crate::types::{GenerateEvent, GenerateRequest};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// Admission refused: the queue is full. The HTTP layer answers 429.
    #[error("server is overloaded: {0}")]
    Overloaded(String),
    /// The request cannot be served as asked (e.g. longer than the context).
    #[error("{0}")]
    Invalid(String),
    /// Not ready, shutting down, or no worker reachable. The HTTP layer answers 503.
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

/// Generates tokens for admitted requests.
pub trait Infer: Send + Sync + 'static {
    /// Admit a request, or refuse it at once. Dropping the returned stream
    /// cancels the request and frees what it holds.
    fn generate(&self, request: GenerateRequest) -> Result<GenerateStream, InferError>;

    /// True once the model is loaded and requests can be admitted.
    fn is_ready(&self) -> bool;
}

/// Runs a closure once, when dropped.
pub struct OnDrop(Option<Box<dyn FnOnce() + Send + Sync>>);

impl OnDrop {
    pub fn new(f: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self(Some(Box::new(f)))
    }
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// The events of one request. Dropping it before `Finished` cancels the request.
pub struct GenerateStream {
    rx: mpsc::UnboundedReceiver<GenerateEvent>,
    _cancel: OnDrop,
}

impl GenerateStream {
    /// `cancel` runs when the stream is dropped; it must be harmless for a
    /// request that already finished.
    pub fn new(rx: mpsc::UnboundedReceiver<GenerateEvent>, cancel: OnDrop) -> Self {
        Self {
            rx,
            _cancel: cancel,
        }
    }

    pub async fn next_event(&mut self) -> Option<GenerateEvent> {
        self.rx.recv().await
    }
}

impl Stream for GenerateStream {
    type Item = GenerateEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}
