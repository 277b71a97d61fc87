//! Tandem's contracts: what the operator and the worker's parts agree on.
//!
//! - [`pb`]: the worker-to-worker gRPC services (`proto/tandem.proto`).
//! - [`types`]: engine requests, events and the layout-independent KV format.
//! - [`infer`]: the seam between the OpenAI HTTP layer and whatever generates tokens.
//! - [`metrics`]: the Prometheus series every role exports (`docs/metrics.md`).
//! - [`args`]: the flags of the roles the operator renders (`serve`, `frontend`, `prefill`,
//!   `decode`, `model fetch`), so both sides compile against one definition.
//! - [`control`]: the JSON of `tandem local`'s control endpoint, which the planner drives.
//!
//! Nothing here loads a model or runs a kernel: the crate is small and changes rarely, so
//! the crates above it rebuild only when a contract changes.

pub mod args;
pub mod control;
pub mod infer;
pub mod metrics;
pub mod types;

/// The generated gRPC code of `proto/tandem.proto`.
pub mod pb {
    tonic::include_proto!("tandem.v1");
}
