//! The disaggregated roles' network side (docs/architecture.md, "Request flow"):
//!
//! - [`worker_service`]: `Worker.KvEvents` and `Worker.Load`, served by every
//!   engine-owning worker (prefill and decode).
//! - [`decode`]: `Decode.Generate`, with conditional disaggregation: a prompt
//!   is prefilled on a prefill worker only when enough of it is uncached and a
//!   prefill worker has room, else locally; a failed remote prefill falls back.
//! - [`frontend`]: the frontend's [`Infer`](tandem_api::infer::Infer) over decode
//!   workers: routes, streams, and migrates a request whose worker died.
//! - [`pool`]: a set of remote workers kept current from discovery, with their
//!   KV events and load reports feeding a [`Router`](crate::router::Router).
//! - [`http`]: the workers' `/health` and `/metrics`.

pub mod decode;
pub mod frontend;
pub mod http;
pub mod pool;
pub mod worker_service;

use tonic::Status;

use crate::transfer::pb;
use crate::transfer::rpc::{sampling_from_pb, sampling_to_pb, token_from_pb, token_to_pb};
use tandem_api::infer::InferError;
use tandem_api::types::{FinishReason, GenerateEvent, GenerateRequest, StopParams};

/// `host:port` (as discovery yields) → the URI a tonic endpoint wants.
pub fn grpc_uri(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

pub fn request_to_pb(r: &GenerateRequest) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: r.id.clone(),
        prompt: r.prompt.clone(),
        sampling: Some(sampling_to_pb(&r.sampling)),
        stop: Some(pb::StopParams {
            max_tokens: r.stop.max_tokens as u32,
            stop_token_ids: r.stop.stop_token_ids.clone(),
            ignore_eos: r.stop.ignore_eos,
        }),
    }
}

pub fn request_from_pb(r: pb::GenerateRequest) -> Result<GenerateRequest, Status> {
    let stop = r
        .stop
        .ok_or_else(|| Status::invalid_argument("GenerateRequest.stop is required"))?;
    Ok(GenerateRequest {
        id: r.request_id,
        prompt: r.prompt,
        sampling: r
            .sampling
            .map(sampling_from_pb)
            .transpose()?
            .unwrap_or_default(),
        stop: StopParams {
            max_tokens: stop.max_tokens as usize,
            stop_token_ids: stop.stop_token_ids,
            ignore_eos: stop.ignore_eos,
        },
    })
}

pub fn event_to_pb(e: &GenerateEvent) -> pb::GenerateResponse {
    use pb::generate_response::Event;
    let event = match e {
        GenerateEvent::Started {
            prompt_tokens,
            cached_tokens,
        } => Event::Started(pb::Started {
            prompt_tokens: *prompt_tokens as u32,
            cached_tokens: *cached_tokens as u32,
        }),
        GenerateEvent::PromptLogprobs(tokens) => Event::PromptLogprobs(pb::PromptLogprobs {
            tokens: tokens.iter().map(token_to_pb).collect(),
        }),
        GenerateEvent::Token(t) => Event::Token(token_to_pb(t)),
        GenerateEvent::Finished(reason) => Event::Finished(
            match reason {
                FinishReason::Stop => pb::FinishReason::Stop,
                FinishReason::Length => pb::FinishReason::Length,
                FinishReason::Cancelled => pb::FinishReason::Cancelled,
            }
            .into(),
        ),
        GenerateEvent::Error(message) => Event::Error(message.clone()),
    };
    pb::GenerateResponse { event: Some(event) }
}

/// `None` for a message that carries no event (a newer peer's addition).
pub fn event_from_pb(r: pb::GenerateResponse) -> Option<GenerateEvent> {
    use pb::generate_response::Event;
    Some(match r.event? {
        Event::Started(s) => GenerateEvent::Started {
            prompt_tokens: s.prompt_tokens as usize,
            cached_tokens: s.cached_tokens as usize,
        },
        Event::PromptLogprobs(p) => {
            GenerateEvent::PromptLogprobs(p.tokens.into_iter().map(token_from_pb).collect())
        }
        Event::Token(t) => GenerateEvent::Token(token_from_pb(t)),
        Event::Finished(code) => GenerateEvent::Finished(
            match pb::FinishReason::try_from(code).unwrap_or(pb::FinishReason::Unspecified) {
                pb::FinishReason::Length => FinishReason::Length,
                pb::FinishReason::Cancelled => FinishReason::Cancelled,
                // Unspecified: an older or newer peer; it finished, call it a stop.
                pb::FinishReason::Stop | pb::FinishReason::Unspecified => FinishReason::Stop,
            },
        ),
        Event::Error(message) => GenerateEvent::Error(message),
    })
}

/// A gRPC status from a worker, back as the frontend's error kinds.
pub fn infer_error_of(status: &Status) -> InferError {
    let message = status.message().to_string();
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => InferError::Invalid(message),
        tonic::Code::ResourceExhausted => InferError::Overloaded(message),
        _ => InferError::Unavailable(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_api::types::{SamplingParams, TokenOutput};

    #[test]
    fn requests_and_events_survive_the_wire() {
        let request = GenerateRequest {
            id: "r-1".into(),
            prompt: vec![1, 2, 3],
            sampling: SamplingParams {
                temperature: 0.7,
                top_k: Some(5),
                seed: Some(9),
                logprobs: Some(2),
                ..SamplingParams::default()
            },
            stop: StopParams {
                max_tokens: 17,
                stop_token_ids: vec![4],
                ignore_eos: true,
            },
        };
        assert_eq!(request_from_pb(request_to_pb(&request)).unwrap(), request);
        for event in [
            GenerateEvent::Started {
                prompt_tokens: 3,
                cached_tokens: 2,
            },
            GenerateEvent::Token(TokenOutput {
                id: 7,
                logprob: Some(-0.5),
                top_logprobs: vec![(7, -0.5), (8, -1.5)],
            }),
            GenerateEvent::Finished(FinishReason::Length),
            GenerateEvent::Finished(FinishReason::Stop),
            GenerateEvent::Error("boom".into()),
        ] {
            assert_eq!(event_from_pb(event_to_pb(&event)), Some(event));
        }
    }

    #[test]
    fn a_request_without_stop_params_is_refused() {
        let mut pb = request_to_pb(&GenerateRequest {
            id: "x".into(),
            prompt: vec![1],
            sampling: SamplingParams::greedy(),
            stop: StopParams {
                max_tokens: 1,
                stop_token_ids: vec![],
                ignore_eos: false,
            },
        });
        pb.stop = None;
        let err = request_from_pb(pb).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("stop"));
    }
}
