//! The Nexus broker: system of record for providers, connections and their
//! secrets. See `ARCHITECTURE.md` at the repository root for the map.
//!
//! The crate is driven by the `nexus` binary; tests and embedders use
//! [`server::Broker`] with a [`config::BrokerConfig`].

#![warn(missing_docs)]

pub mod agent_keys;
pub mod api;
pub mod audit;
mod batch;
pub mod capture;
pub mod config;
pub mod discovery;
pub mod edge;
pub mod handshake;
pub mod id_token;
pub mod pause;
pub mod pkce;
pub mod profile;
pub mod registry;
pub mod revoke;
pub mod rewrap;
pub mod scope;
pub mod server;
pub mod shared_cache;
pub mod state_token;
pub mod store;
pub mod strategy;
pub mod token;
pub mod token_cache;
pub mod vault;
pub mod webhook;
