//! The sidecar's integration tests: one binary (link time is precious).

mod e2e;
mod harness;
mod mcp;
mod proxy;
mod sigv4;
mod streams;
