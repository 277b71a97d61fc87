//! Disaggregated serving: the roles' network side (`roles`), KV transfer between prefill and
//! decode workers (`transfer`), the frontend's KV-aware router (`router`), how a role finds the
//! workers of another tier (`discovery`), and the supervisor of `tandem local` (`local`).
//! The OpenAI HTTP server is `tandem-server`; the command line is the `tandem` crate
//! (docs/architecture.md).

pub mod discovery;
pub mod local;
pub mod roles;
pub mod router;
pub mod transfer;
