//! Integration tests of the bridge.

mod agent;
mod cache;
mod e2e;
mod fake;
mod long_lived;
mod sigv4;
