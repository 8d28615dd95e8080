//! The Nexus broker: system of record for providers, connections and their
//! secrets. See `ARCHITECTURE.md` at the repository root for the map.
//!
//! The folders follow the architecture: `registry` (what providers are and
//! who may call), `handshake` and `oauth` (connecting an account), `tokens`
//! (serving, caching, refreshing, revoking, scope reports, the kill switch),
//! `events` (audit and webhooks), `vault` (encryption at rest), `store`
//! (SQLite and PostgreSQL, one file per table group) and `api` (HTTP).
//!
//! The crate is driven by the `nexus` binary; tests and embedders use
//! [`server::Broker`] with a [`config::BrokerConfig`].

#![warn(missing_docs)]

pub mod api;
mod batch;
pub mod browser_session;
pub mod config;
pub mod events;
pub mod handshake;
pub mod mcp;
pub mod oauth;
pub mod portal;
pub mod registry;
pub mod server;
pub mod store;
pub mod tokens;
pub mod vault;
