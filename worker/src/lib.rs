//! Tandem: disaggregated LLM serving. The `tandem` binary's library: the engine,
//! model loading, the OpenAI server, the router, KV transfer, the
//! disaggregated roles, worker discovery and the local supervisor.

pub mod bench;
pub mod cli;
pub mod discovery;
pub mod engine;
pub mod infer;
pub mod local;
pub mod metrics;
pub mod model;
pub mod roles;
pub mod router;
pub mod server;
pub mod transfer;
