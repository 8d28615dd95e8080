//! Plumbing shared by the Nexus servers (broker, gateway, and the parts that
//! come after them), so that none of them depends on another's insides.
//!
//! Leaf modules only: nothing here knows about providers, connections or
//! storage. The one exception in spirit is [`wire`], the broker↔gateway
//! contract, which lives here because both sides must agree on it and
//! neither should own it.

#![warn(missing_docs)]

pub mod backoff;
pub mod challenge;
pub mod egress;
pub mod error;
pub mod limit;
pub mod linger;
pub mod middleware;
pub mod mtls;
pub mod net;
pub mod openapi;
pub mod outbound;
pub mod pages;
mod secret;
pub mod serve;
pub mod settings;
pub mod telemetry;
pub mod text;
pub mod time;
pub mod tls;
pub mod wire;

pub use secret::Secret;
pub use settings::ConfigError;

#[doc(hidden)]
pub use metrics as __metrics;
