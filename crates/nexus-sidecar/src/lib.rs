//! Nexus sidecar: a proxy on the agent's own machine (or pod) so that an
//! agent in any language holds no secret at all.
//!
//! The agent calls `http://127.0.0.1:8070/<route>/<path>?<query>`; the
//! sidecar fetches the route's connection's credentials from the gateway
//! (through the bridge: cached, single flight, refreshed ahead of expiry),
//! applies the strategy, and forwards to `<upstream>/<path>?<query>`, the
//! route's upstream from the routes file and nowhere else. Bodies stream
//! both ways; WebSocket upgrades and HTTP/2 (h2c from the agent, gRPC) pass
//! through. A 401 forces one refresh and one replay; a 403 is reported as
//! a scope failure; an upstream 429 with `Retry-After` is remembered; a
//! connection that needs a person is answered with a JSON error, without
//! an upstream call.
//!
//! Metrics: `nexus_sidecar_requests_total{route,outcome}`,
//! `nexus_sidecar_upstream_duration_seconds{route}`,
//! `nexus_sidecar_short_circuits_total{route}`, and the bridge's
//! `nexus_bridge_fetches_total` and `nexus_bridge_reports_total`.

#![warn(missing_docs)]

pub mod config;
pub mod connection;
pub mod error;
pub mod forward;
pub mod headers;
pub mod mcp;
pub mod memory;
pub mod ops;
pub mod pool;
pub mod routes;
pub mod server;
pub mod target;
pub mod upstream;

pub use config::{SidecarConfig, SidecarSettings};
pub use server::Sidecar;
