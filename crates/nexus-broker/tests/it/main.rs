//! Integration tests of the broker: a real server on loopback, against SQLite
//! and PostgreSQL (the same tests run on both).

mod harness;

mod agent_keys;
mod audit;
mod bad_input;
mod capture;
mod connect_sessions;
mod edge;
mod fake_idp;
mod fuzz;
mod handshake;
mod mcp;
mod mtls;
mod ops;
mod pauses;
mod providers;
mod real_idp;
mod refresh;
mod revocation;
mod rewrap;
mod scopes;
mod secrets;
mod token_cache;
mod tokens;
mod webhooks;
