//! Integration tests of the bridge.

mod agent;
mod cache;
mod e2e;
mod fake;
mod sigv4;
