//! Integration tests against the real NATS and PostgreSQL of this machine. Every test makes a
//! [`env::TestEnv`]: its own namespace (subjects, streams, buckets) and its own database,
//! removed when the test ends, so tests run in parallel and leave nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod collaboration;
mod coordination;
mod env;
mod faults;
mod hostile;
mod http;

mod auth;
mod bus;
mod control_plane;
mod liveness;
mod locks;
mod nats_auth;
mod nats_cluster;
mod patterns;
mod policy;
mod processes;
mod provisioning;
mod registry;
mod repo;
mod scheduling;
mod schemathesis;
mod tasks;
mod workflow_api;
