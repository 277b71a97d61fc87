//! The engine: scheduler, paged KV block manager, sampler and compute backends.

pub mod backend;
pub mod block_manager;
pub mod sampler;
pub mod scheduler;
pub mod types;
