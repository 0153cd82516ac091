//! Process plumbing shared by every omoi process: telemetry, signals and shutdown, and the
//! health/metrics HTTP endpoints, the HTTP server.

pub mod health;
pub mod http;
pub mod shutdown;
pub mod telemetry;

pub use shutdown::Shutdown;

/// What a caught panic said (its `&str` or `String` payload), for a log line.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
