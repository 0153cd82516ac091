//! Process plumbing shared by every omoi process: telemetry, signals and shutdown, and the
//! health/metrics HTTP endpoints, the HTTP server.

pub mod health;
pub mod http;
pub mod shutdown;
pub mod telemetry;

pub use shutdown::Shutdown;
