//! Integration tests of the gateway: a real broker (SQLite in a temporary
//! folder) and the gateway in front of it, both on loopback.

mod bridge_grpc;
mod cache;
mod contract;
mod fuzz;
mod grpc;
mod harness;
mod mtls;
mod real_idp;
mod rest;
