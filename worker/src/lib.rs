//! The `tandem` binary's command line: each subcommand's start-up and wiring over the crates
//! that do the work — `tandem-server` (the OpenAI API), `tandem-disagg` (roles, KV transfer,
//! router, discovery, local supervisor), `tandem-engine`, `tandem-model`, `tandem-loadgen`, and
//! the contracts in `tandem-api` (docs/architecture.md).

pub mod cli;
