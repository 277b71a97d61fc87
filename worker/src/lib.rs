//! Tandem: disaggregated LLM serving. The `tandem` binary's serving crate: the OpenAI
//! server, the router, the disaggregated roles and their KV transfer, worker discovery, the
//! local supervisor and the command line. The engine (`tandem-engine`), the model files
//! (`tandem-model`), the contracts (`tandem-api`) and the load generator (`tandem-loadgen`)
//! are crates of their own (docs/architecture.md).

pub mod cli;
pub mod discovery;
pub mod local;
pub mod roles;
pub mod router;
pub mod server;
pub mod transfer;
