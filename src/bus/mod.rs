//! Everything that talks to NATS: names, provisioning, typed events, consumers with
//! dead-lettering, and the KV lease.

pub mod consume;
pub mod events;
pub mod kv_lock;
pub mod lease;
pub mod names;
pub mod provision;

pub use consume::{Delivery, TypedConsumer};
pub use events::EventBus;
pub use names::Names;

/// Errors of the bus layer.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("publish to {subject}: {reason}")]
    Publish { subject: String, reason: String },
    #[error("provision {what}: {reason}")]
    Provision { what: String, reason: String },
    #[error("consumer on {stream}: {reason}")]
    Consumer { stream: String, reason: String },
    #[error("key-value {bucket}: {reason}")]
    Kv { bucket: String, reason: String },
    #[error("request {subject}: {reason}")]
    Request { subject: String, reason: String },
}

/// Connects to NATS with a client name that shows up in `nats server report connections`.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, BusError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(std::time::Duration::from_secs(3))
        .connect(url)
        .await
        .map_err(|source| BusError::Connect {
            url: crate::config::mask_url_password(url),
            source,
        })
}

/// Connects without retrying: fails fast when nothing listens (for `omoi dev` and readiness).
pub async fn connect_once(url: &str, name: &str) -> Result<async_nats::Client, BusError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(std::time::Duration::from_secs(2))
        .connect(url)
        .await
        .map_err(|source| BusError::Connect {
            url: crate::config::mask_url_password(url),
            source,
        })
}
