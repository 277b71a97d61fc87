//! The engine: scheduler, paged KV block manager, sampler and compute backends.

pub mod types;
