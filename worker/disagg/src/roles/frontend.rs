//! The frontend's [`Infer`]: requests go to decode workers over gRPC.
//!
//! Each request is routed (KV-aware by default) to a healthy decode worker and
//! its tokens are relayed as they arrive. If that worker is lost before the
//! request finished (connection reset, the stream ends without a finish, a
//! transport error), the request is re-issued to another decode worker with
//! the prompt plus every token generated so far and `max_tokens` reduced by as
//! many, at most `migration_limit` times. The client sees one stream: the
//! second worker's `Started` is not relayed and no token is repeated or lost.
//! Under greedy decoding the continuation is the one the first worker would
//! have produced. (With sampling it is a valid continuation from a different
//! random state; presence/frequency penalties then count the earlier tokens
//! as prompt.)
//!
//! Dropping the request's stream (client disconnect) aborts the relay task,
//! which drops the gRPC call: the decode worker sees the cancellation and
//! frees the sequence (and cancels a remote prefill in flight).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tracing::Instrument;

use super::pool::{PoolConfig, WorkerPool};
use super::{event_from_pb, infer_error_of, request_to_pb};
use crate::router::{Router, RouterConfig, RouterMode, WorkerId};
use crate::transfer::pb::decode_client::DecodeClient;
use tandem_api::infer::{GenerateStream, Infer, InferError, OnDrop};
use tandem_api::metrics::metrics;
use tandem_api::types::{GenerateEvent, GenerateRequest};

/// Default `--migration-limit`.
pub use tandem_api::args::DEFAULT_MIGRATION_LIMIT;

#[derive(Debug, Clone)]
pub struct FrontendConfig {
    pub router_mode: RouterMode,
    /// Tokens per KV block of the decode workers (for prefix hashing).
    pub block_size: usize,
    /// Times one request may move to another decode worker.
    pub migration_limit: usize,
    /// Label of the migration metric.
    pub model_name: String,
}

/// Routes requests to decode workers.
pub struct Frontend {
    pool: Arc<WorkerPool<DecodeClient<Channel>>>,
    config: FrontendConfig,
}

impl Frontend {
    /// Starts following the decode workers in `decode_workers`. Call inside a
    /// Tokio runtime.
    pub fn start(
        config: FrontendConfig,
        decode_workers: watch::Receiver<BTreeSet<String>>,
    ) -> Result<Arc<Self>, anyhow::Error> {
        let router = Router::new(config.router_mode, RouterConfig::new(config.block_size))?;
        let pool = WorkerPool::start(
            PoolConfig::new("decode"),
            router,
            decode_workers,
            |_address, channel| DecodeClient::new(channel),
        );
        Ok(Arc::new(Self { pool, config }))
    }

    pub fn pool(&self) -> &Arc<WorkerPool<DecodeClient<Channel>>> {
        &self.pool
    }
}

impl Infer for Frontend {
    fn generate(&self, request: GenerateRequest) -> Result<GenerateStream, InferError> {
        if self.pool.healthy_workers() == 0 {
            return Err(InferError::Unavailable(format!(
                "no decode worker is ready ({} known)",
                self.pool.known_workers()
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // The relay belongs to the HTTP request's span: its trace context and
        // request id go to the decode worker, its log lines carry the id.
        let task = tokio::spawn(
            relay(self.pool.clone(), self.config.clone(), request, tx)
                .instrument(tracing::Span::current()),
        );
        Ok(GenerateStream::new(rx, OnDrop::new(move || task.abort())))
    }

    fn is_ready(&self) -> bool {
        self.pool.healthy_workers() > 0
    }
}

/// How one attempt on one decode worker ended.
enum Attempt {
    /// Finished (or failed for a reason another worker would share).
    Done,
    /// The client went away.
    CallerGone,
    /// The worker refused before generating (overloaded): try another.
    Refused(InferError),
    /// The worker was lost: migrate.
    Lost(String),
}

async fn relay(
    pool: Arc<WorkerPool<DecodeClient<Channel>>>,
    config: FrontendConfig,
    request: GenerateRequest,
    tx: mpsc::UnboundedSender<GenerateEvent>,
) {
    let mut generated: Vec<u32> = Vec::new();
    let mut started = false;
    let mut excluded: Vec<WorkerId> = Vec::new();
    let mut migrations = 0;
    loop {
        let mut prompt = request.prompt.clone();
        prompt.extend_from_slice(&generated);
        let routed = {
            let _route = tandem_telemetry::phase_span("route").entered();
            pool.route(&prompt, &excluded, |_| true)
        };
        let (route, client) = match routed {
            Ok(routed) => routed,
            Err(e) => {
                let why = if excluded.is_empty() {
                    format!("no decode worker is ready: {e}")
                } else {
                    format!(
                        "no other decode worker is ready after {} failed: {e}",
                        excluded.len()
                    )
                };
                let _ = tx.send(GenerateEvent::Error(why));
                return;
            }
        };
        let mut attempt_request = request.clone();
        attempt_request.prompt = prompt;
        attempt_request.stop.max_tokens = request.stop.max_tokens - generated.len();
        attempt_request.sampling.output_prefix = request.sampling.output_prefix + generated.len();
        if !generated.is_empty() {
            // The client already has the prompt's logprobs.
            attempt_request.sampling.prompt_logprobs = None;
        }
        let worker = route.worker.clone();
        let call = tandem_telemetry::client_span("tandem.Decode/Generate");
        tandem_telemetry::set_attribute(&call, "tandem.decode_worker", worker.to_string());
        let outcome = attempt(
            &mut (*client).clone(),
            attempt_request,
            &tx,
            &mut generated,
            &mut started,
        )
        .instrument(call.clone())
        .await;
        match &outcome {
            Attempt::Refused(e) => tandem_telemetry::set_error(&call, e.to_string()),
            Attempt::Lost(reason) => tandem_telemetry::set_error(&call, reason.clone()),
            Attempt::Done | Attempt::CallerGone => {}
        }
        drop(call);
        pool.finish(route.ticket);
        match outcome {
            Attempt::Done | Attempt::CallerGone => return,
            Attempt::Refused(e) => {
                tracing::debug!(request = %request.id, decode_worker = %worker, "refused: {e}");
                excluded.push(worker);
            }
            Attempt::Lost(reason) => {
                pool.mark_unhealthy(&worker);
                if migrations >= config.migration_limit {
                    let _ = tx.send(GenerateEvent::Error(format!(
                        "decode worker {worker} failed and the request already moved {migrations} times (--migration-limit): {reason}"
                    )));
                    return;
                }
                migrations += 1;
                metrics()
                    .migrations
                    .with_label_values(&[&config.model_name])
                    .inc();
                tracing::warn!(
                    request = %request.id,
                    decode_worker = %worker,
                    generated = generated.len(),
                    "decode worker lost mid-request; migrating: {reason}"
                );
                excluded.push(worker);
            }
        }
    }
}

async fn attempt(
    client: &mut DecodeClient<Channel>,
    request: GenerateRequest,
    tx: &mpsc::UnboundedSender<GenerateEvent>,
    generated: &mut Vec<u32>,
    started: &mut bool,
) -> Attempt {
    let mut call = tonic::Request::new(request_to_pb(&request));
    tandem_telemetry::propagation::inject_current(call.metadata_mut());
    let call = tokio::select! {
        call = client.generate(call) => call,
        () = tx.closed() => return Attempt::CallerGone,
    };
    let mut stream = match call {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return match infer_error_of(&status) {
                e @ InferError::Overloaded(_) => Attempt::Refused(e),
                InferError::Invalid(m) => {
                    let _ = tx.send(GenerateEvent::Error(m));
                    Attempt::Done
                }
                InferError::Unavailable(m) => Attempt::Lost(m),
            };
        }
    };
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            () = tx.closed() => return Attempt::CallerGone,
        };
        let event = match message {
            Ok(Some(m)) => match event_from_pb(m) {
                Some(e) => e,
                None => continue,
            },
            Ok(None) => {
                return Attempt::Lost("the stream ended before the request finished".into())
            }
            Err(status) => {
                return match infer_error_of(&status) {
                    e @ InferError::Overloaded(_) if !*started => Attempt::Refused(e),
                    InferError::Invalid(m) => {
                        let _ = tx.send(GenerateEvent::Error(m));
                        Attempt::Done
                    }
                    e => Attempt::Lost(e.to_string()),
                }
            }
        };
        match event {
            GenerateEvent::Started { .. } => {
                if *started {
                    continue; // a migrated request: the client already saw it start
                }
                *started = true;
            }
            GenerateEvent::Token(ref t) => generated.push(t.id),
            GenerateEvent::PromptLogprobs(_) => {}
            GenerateEvent::Finished(_) | GenerateEvent::Error(_) => {
                let _ = tx.send(event);
                return Attempt::Done;
            }
        }
        if tx.send(event).is_err() {
            return Attempt::CallerGone;
        }
    }
}
