//! KV transfer between prefill and decode workers (docs/architecture.md, "KV
//! transfer", and docs/disaggregation.md).
//!
//! It is one RPC, `Prefill.Prefill` (`worker/api/proto/tandem.proto`): a
//! decode worker sends a prompt's tokens to a prefill worker and gets back the
//! prompt's KV and its first token. How the KV comes back is a mode of that
//! request, not a separate transport:
//! - streamed (the default, any two hosts): the answer carries the KV in
//!   [`wire`] chunks as the prefill computes them;
//! - cuda-ipc ([`cuda_ipc`], both workers on one node with CUDA): the request
//!   offers blocks of the decode worker's GPU pool, the prefill worker writes
//!   the KV into them and the answer only says it did. A prefill worker that
//!   cannot streams the KV instead and says why.
//!
//! The modules, each importing only ones listed before it:
//! - [`rpc`]: what both sides share: the request, the result, the parts a
//!   prefill produces, the errors, the protobuf conversions, the metric labels;
//! - [`wire`]: the chunk format of streamed KV;
//! - [`channel`]: the HTTP/2 settings of both ends;
//! - [`cuda_ipc`]: the cuda-ipc mode: when a decode worker offers it, what the
//!   request carries, and how the prefill side writes into the peer's pool;
//! - [`service`]: the prefill side, the `Prefill` server;
//! - [`client`]: the decode side, calling `Prefill`.

pub mod channel;
pub mod client;
pub mod cuda_ipc;
pub mod rpc;
pub mod service;
pub mod wire;

pub use rpc::{PrefillPart, PrefillParts, RemotePrefill, RemotePrefillRequest, TransferError};
/// Code generated from `worker/api/proto/tandem.proto`.
pub use tandem_api::pb;
