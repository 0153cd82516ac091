//! omoi coordinates a fleet of AI agents (or any workers) over NATS JetStream.
//!
//! Layers, with data flowing one way: `api`/`cli` → `service` → (`db`, `bus`) → `domain`.
//! `coordinator` is the control plane process, `worker` the stateless NATS-only worker process.

pub mod api;
pub mod bus;
pub mod cli;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod db;
pub mod domain;
pub mod pattern;
pub mod protocol;
pub mod runtime;
pub mod service;
pub mod sim;
pub mod worker;
