//! Process plumbing shared by every omoi process: telemetry, signals and shutdown, and the
//! health/metrics HTTP endpoints.

pub mod health;
pub mod shutdown;
pub mod telemetry;

pub use shutdown::Shutdown;
