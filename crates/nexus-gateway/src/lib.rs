//! Nexus gateway: the agent-facing API (SPEC §4).
//!
//! Agents and apps talk only to the gateway; the broker stays on a private
//! network. Every call carries an agent key (`Authorization: Bearer nxa_...`
//! or `X-API-Key`), verified by the broker and trusted briefly; a key reaches
//! only connections of its workspaces, and a connection of another workspace
//! answers exactly like an unknown one. REST and gRPC (`nexus.v1`) are served
//! on one port; the OAuth callback and the capture pages are forwarded to the
//! broker, so only the gateway faces the internet. Token answers the broker
//! marks cacheable are kept while its change stream is open (`token_cache`,
//! `changes`), so a warm fetch costs no broker round trip.

#![warn(missing_docs)]

pub mod auth;
pub mod broker;
pub mod changes;
pub mod config;
pub mod contract;
pub mod core;
pub mod error;
pub mod grpc;
pub mod proxy;
pub mod rest;
pub mod server;
pub mod token_cache;

pub use config::{GatewayConfig, GatewaySettings};
pub use server::GatewayServer;
