//! Tandem: disaggregated LLM serving. The `tandem` binary's library: the engine,
//! model loading, the OpenAI server, the router, and (later) KV transfer.

pub mod bench;
pub mod cli;
pub mod engine;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod router;
pub mod server;
pub mod transfer;
